//! Transparent mode (`Proxy.Mode: transparent`): the app dials a mesh service's virtual IP,
//! `consul connect redirect-traffic` sends the connection to the outbound listener, and the
//! listener picks the service's backend by the connection's original destination. Every
//! service intentions let this one reach is an implicit upstream, built like an explicit one
//! (`model::upstream`: slots, identity, protocol, TLS) but without a listener of its own.

use serde::Serialize;

use super::UpstreamListener;
use crate::consul::api::{ProxyConfig, Upstream};
use crate::snapshot::Snapshot;
use crate::value::Address;

/// Consul's default `TransparentProxy.OutboundListenerPort`.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// Where the outbound listener binds: an iptables REDIRECT of a locally made connection
/// delivers it to 127.0.0.1, as Consul's Envoy binds its outbound listener.
pub const OUTBOUND_BIND: Address = Address::Ip(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

/// What `supervisor::redirect` dials to learn whether the sidecar's own connections are
/// redirected (TEST-NET-1: nothing answers it); the outbound listener refuses it.
pub const PROBE_ADDRESS: &str = "192.0.2.1";

/// The outbound listener and its routing table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outbound {
    pub bind_address: Address,
    pub port: u16,
    /// `mesh` config entry `TransparentProxy.MeshDestinationsOnly`: a destination that is no
    /// mesh service is refused instead of passed through. Unknown (the entry not read yet)
    /// counts as true: a security setting that cannot be honoured fails closed.
    pub mesh_only: bool,
    /// Virtual IP → route, sorted by address; each address once.
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub virtual_ip: Address,
    pub service: String,
    /// The implicit upstream's backend (`UpstreamListener::backend`).
    pub backend: String,
}

impl Outbound {
    /// The routes as the map file and the runtime API hold them: (virtual IP, backend).
    pub fn map_entries(&self) -> Vec<(String, String)> {
        self.routes
            .iter()
            .map(|r| (r.virtual_ip.to_string(), r.backend.clone()))
            .collect()
    }
}

/// The registration's outbound listener port, Consul's default when it names none.
pub fn outbound_port(proxy: &ProxyConfig) -> u16 {
    match proxy.transparent_proxy.outbound_listener_port {
        0 => DEFAULT_OUTBOUND_PORT,
        p => p,
    }
}

/// An implicit upstream as an explicit one would be written: the service in our datacenter,
/// "listening" on the outbound port (its listener is never rendered; the name stays unique
/// per service because the outbound address is no other listener's).
pub fn as_upstream(service: &str, port: u16) -> Upstream {
    Upstream {
        destination_name: service.to_string(),
        local_bind_address: OUTBOUND_BIND.to_string(),
        local_bind_port: port,
        ..Upstream::default()
    }
}

/// The outbound listener for the implicit upstreams built: each routed by the virtual IP its
/// instances carry (`consul-virtual`). An upstream with no instance has no address yet; one
/// whose discovery chain does more than reach the service itself is not routed (named once).
pub fn outbound(
    port: u16,
    snapshot: &Snapshot,
    implicit: &[(String, UpstreamListener)],
    warnings: &mut Vec<String>,
) -> Outbound {
    let mut routes: Vec<Route> = Vec::new();
    for (service, u) in implicit {
        let service = service.clone();
        if u.routing.is_some() {
            warnings.push(format!(
                "implicit upstream {service:?}: its discovery chain routes or splits, which transparent mode does not follow yet; its virtual IP is not routed (give it an explicit upstream)"
            ));
            continue;
        }
        let Some((vip, dialed_directly)) = virtual_ip(snapshot, &service, warnings) else {
            continue;
        };
        if dialed_directly {
            warnings.push(format!(
                "implicit upstream {service:?}: its proxy allows DialedDirectly, which this sidecar does not route yet; only its virtual IP goes through the mesh (its instances' own addresses are treated as outside the mesh)"
            ));
        }
        if let Some(other) = routes.iter().find(|r| r.virtual_ip == vip) {
            warnings.push(format!(
                "implicit upstream {service:?}: virtual IP {vip} is already {:?}'s; not routed",
                other.service
            ));
            continue;
        }
        routes.push(Route {
            virtual_ip: vip,
            service,
            backend: u.backend.clone(),
        });
    }
    routes.sort_by_key(|r| r.virtual_ip.to_string());
    Outbound {
        bind_address: OUTBOUND_BIND,
        port,
        mesh_only: snapshot
            .mesh
            .as_deref()
            .map(crate::consul::mesh_entry)
            .is_none_or(|m| m.transparent_proxy.mesh_destinations_only),
        routes,
    }
}

/// The service's virtual IP from its instances (the same on each), and whether any of them
/// may be dialed directly; a refused address is named and the service not routed.
fn virtual_ip(
    snapshot: &Snapshot,
    service: &str,
    warnings: &mut Vec<String>,
) -> Option<(Address, bool)> {
    let key = crate::consul::DestinationKey {
        kind: crate::consul::DestinationKind::Service,
        name: service.to_string(),
        datacenter: String::new(),
    };
    let entries = snapshot.endpoints.get(&key)?;
    let raw = entries.iter().find_map(|e| e.service.virtual_ip())?;
    let dialed_directly = entries.iter().any(|e| {
        e.service
            .proxy
            .as_ref()
            .is_some_and(|p| p.transparent_proxy.dialed_directly)
    });
    match Address::parse_ip("TaggedAddresses.consul-virtual", raw) {
        Ok(a) => Some((a, dialed_directly)),
        Err(e) => {
            warnings.push(format!("implicit upstream {service:?}: {e}; not routed"));
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::consul::{destinations, DestinationKey, DestinationKind, Update};
    use crate::model::build;
    use crate::model::fixtures::{settings, snapshot};
    use crate::snapshot::Snapshot;

    /// The recorded `modern` sidecar (transparent) with `server` as its one implicit upstream,
    /// fed by server's recorded instances (which carry `consul-virtual` 240.0.0.x).
    fn modern(mesh_only: Option<bool>) -> Snapshot {
        let mut s = snapshot("1.16.3", "modern-sidecar-proxy", "ca-leaf-client.json");
        if let Some(leaf) = s.leaf.as_mut() {
            leaf.service = "modern".into();
        }
        s.apply(Update::IntentionUpstreams(vec!["server".into()]));
        if let Some(only) = mesh_only {
            s.apply(Update::Mesh(vec![serde_json::json!({
                "Kind": "mesh",
                "Name": "mesh",
                "TransparentProxy": { "MeshDestinationsOnly": only },
            })]));
        }
        s
    }

    #[test]
    fn an_implicit_upstream_is_watched_and_routed_by_its_virtual_ip() {
        let s = modern(Some(false));
        let key = DestinationKey {
            kind: DestinationKind::Service,
            name: "server".into(),
            datacenter: String::new(),
        };
        let reg = s.registration.as_ref().unwrap();
        assert!(destinations(reg, s.implicit_upstreams()).contains(&key));
        let d = build(&s, &settings(), None).unwrap();
        let implicit: Vec<_> = d.upstreams.iter().filter(|u| u.implicit).collect();
        assert_eq!(implicit.len(), 1, "{:#?}", d.upstreams);
        let u = implicit[0];
        assert_eq!(u.instances().count(), 2, "fed by server's instances");
        assert!(u.identity.is_some(), "its servers must prove to be server");
        let o = d.transparent.as_ref().unwrap();
        assert!(!o.mesh_only);
        assert_eq!(o.routes.len(), 1, "{o:#?}");
        assert_eq!(o.routes[0].service, "server");
        assert_eq!(o.routes[0].backend, u.backend);
        assert!(o.routes[0].virtual_ip.to_string().starts_with("240."));
        // Rendered: a backend and no frontend of its own; the outbound listener routes by map.
        let cfg: Vec<String> = crate::objects::sections(&d)
            .iter()
            .map(|x| x.header.clone())
            .collect();
        assert!(cfg.contains(&format!("backend {}", u.backend)), "{cfg:?}");
        assert!(!cfg.contains(&format!("frontend {}", u.name)), "{cfg:?}");
        assert!(
            cfg.contains(&"frontend hcc_outbound".to_string()),
            "{cfg:?}"
        );
        let map = crate::render::transparent_map(o);
        assert!(
            map.contains(&format!("{} {}\n", o.routes[0].virtual_ip, u.backend)),
            "{map}"
        );
    }

    /// Consul 1.16.3's answer for a transparent `client` (trimmed), with `other` denied by an
    /// intention (Consul leaves denied services out; an entry that says not allowed is dropped
    /// too).
    #[test]
    fn the_topology_answer_gives_the_allowed_services() {
        let body = r#"{"Protocol":"tcp","TransparentProxy":true,"Upstreams":[
            {"Name":"server","Datacenter":"dc1","Tags":null,"Source":"default-allow",
             "Intention":{"Allowed":true,"HasPermissions":false,"DefaultAllow":true}},
            {"Name":"other","Datacenter":"dc1","Intention":{"Allowed":false}},
            {"Name":"server","Datacenter":"dc1","Intention":{"Allowed":true}}],
            "Downstreams":[],"FilteredByACLs":false}"#;
        let t: crate::consul::api::ServiceTopology =
            crate::consul::api::parse("the service topology", body).unwrap();
        assert_eq!(t.allowed(), ["server"]);
        let empty: crate::consul::api::ServiceTopology =
            crate::consul::api::parse("the service topology", r#"{"Upstreams":null}"#).unwrap();
        assert!(empty.allowed().is_empty());
    }

    #[test]
    fn dialed_directly_and_a_bad_virtual_ip_are_named() {
        let mut s = modern(Some(false));
        let key = DestinationKey {
            kind: DestinationKind::Service,
            name: "server".into(),
            datacenter: String::new(),
        };
        let mut entries = s.endpoints[&key].clone();
        if let Some(p) = entries[0].service.proxy.as_mut() {
            p.transparent_proxy.dialed_directly = true;
        }
        s.apply(Update::Endpoints(key.clone(), entries.clone()));
        let d = build(&s, &settings(), None).unwrap();
        assert!(
            d.warnings.iter().any(|w| w.contains("DialedDirectly")),
            "{:?}",
            d.warnings
        );
        assert_eq!(d.transparent.as_ref().unwrap().routes.len(), 1);
        for e in &mut entries {
            e.service.tagged_addresses.insert(
                "consul-virtual".into(),
                serde_json::json!({"Address": "240.0.0.1 be_x\n1.2.3.4", "Port": 1}),
            );
        }
        s.apply(Update::Endpoints(key, entries));
        let d = build(&s, &settings(), None).unwrap();
        assert!(d.transparent.as_ref().unwrap().routes.is_empty());
        assert!(
            d.warnings
                .iter()
                .any(|w| w.contains("consul-virtual") && w.contains("not routed")),
            "{:?}",
            d.warnings
        );
    }

    #[test]
    fn mesh_destinations_only_refuses_and_an_unknown_mesh_entry_fails_closed() {
        for (mesh, only) in [(None, true), (Some(true), true), (Some(false), false)] {
            let d = build(&modern(mesh), &settings(), None).unwrap();
            let o = d.transparent.as_ref().unwrap();
            assert_eq!(o.mesh_only, only, "{mesh:?}");
            let lines = crate::objects::outbound_sections(&d, o)[0].lines.join("\n");
            assert_eq!(
                lines.contains("tcp-request connection reject unless"),
                only,
                "{lines}"
            );
        }
    }

    #[test]
    fn a_service_gone_from_the_intention_upstreams_loses_its_route_and_backend() {
        let mut s = modern(Some(false));
        let before = build(&s, &settings(), None).unwrap();
        s.apply(Update::IntentionUpstreams(Vec::new()));
        let after = build(&s, &settings(), Some(&before)).unwrap();
        assert!(after.upstreams.iter().all(|u| !u.implicit));
        assert!(after.transparent.as_ref().unwrap().routes.is_empty());
        let p = crate::haproxy::diff::plan(&before, &after);
        assert!(
            p.transparent_map_changed && p.rendered_only.is_empty(),
            "{p:#?}"
        );
        assert!(
            !p.needs_full_render(),
            "a route and a backend go without a full render"
        );
    }

    #[test]
    fn the_default_mode_has_no_outbound_listener_and_no_implicit_upstream() {
        let mut s = snapshot("1.16.3", "client-sidecar-proxy", "ca-leaf-client.json");
        s.apply(Update::IntentionUpstreams(vec!["server".into()]));
        let d = build(&s, &settings(), None).unwrap();
        assert!(d.transparent.is_none());
        assert!(d.upstreams.iter().all(|u| !u.implicit));
    }
}
