//! A mesh gateway's desired state (`-gateway mesh`): the listeners on its LAN and WAN
//! addresses and one route per exported service, chosen by the TLS SNI the dialing sidecar
//! sends. The gateway never terminates the mesh TLS: a route's servers are the service's local
//! sidecars, reached in plain TCP, and the end-to-end mTLS stays between the two sidecars.
//! Pure, like the rest of `model`.

use std::collections::BTreeMap;

use serde::Serialize;

use super::{local_datacenter, pool, tls, Desired, Here, Settings, Slot, BACKEND_PREFIX};
use crate::admission::{Identity, DEFAULT};
use crate::config::MeshGateway;
use crate::consul::api::ExportedServicesEntry;
use crate::consul::{DestinationKey, DestinationKind};
use crate::error::{Error, Result};
use crate::names::sanitize;
use crate::snapshot::Snapshot;
use crate::value::{Address, Name, Refused};

/// The gateway's frontend names: one per address it listens on.
pub const LAN_FRONTEND: &str = "mesh_gateway_lan";
pub const WAN_FRONTEND: &str = "mesh_gateway_wan";

#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Gateway {
    /// One listener per address (LAN, and WAN when it differs), each with the same rules.
    pub listeners: Vec<GatewayListener>,
    /// Sorted by backend name.
    pub routes: Vec<GatewayRoute>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayListener {
    pub name: &'static str,
    pub address: Address,
    pub port: u16,
}

/// One exported service: the SNIs that reach it and its local instances.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct GatewayRoute {
    pub service: Name,
    /// `gw_<service>`.
    pub backend: String,
    /// One per consumer (peer) the service is exported to; sorted.
    pub snis: Vec<Sni>,
    /// The service's local instances (its sidecars), placed as an upstream's are.
    pub slots: Vec<Slot>,
}

/// A server name as Consul's sidecars send it in their TLS hello, built only from typed parts:
/// lowercase (the gateway looks up `req.ssl_sni,lower`), and free of anything a map line or a
/// runtime-API command could misread (each part is a `Name` with no dot, except the trust
/// domain, whose dots are its own).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct Sni(String);

impl Sni {
    /// Consul's peered form: `<service>.<namespace>.<partition>.<peer>.external.<trust domain>`,
    /// where the peer is the name the exporting cluster gave the consumer, and the trust
    /// domain the exporting cluster's own.
    pub fn peered(
        service: &Name,
        namespace: &Name,
        partition: &Name,
        peer: &Name,
        trust_domain: &Name,
    ) -> std::result::Result<Sni, Refused> {
        for (field, part) in [
            ("exported service", service),
            ("namespace", namespace),
            ("partition", partition),
            ("peer", peer),
        ] {
            if part.as_str().contains(['.', ':']) {
                return Err(Refused {
                    field,
                    value: part.to_string(),
                    reason: "a dot or colon would make the SNI ambiguous",
                });
            }
        }
        Ok(Sni(format!(
            "{service}.{namespace}.{partition}.{peer}.external.{trust_domain}"
        )
        .to_ascii_lowercase()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Sni {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl Gateway {
    /// The SNI map's entries (`sni backend`), sorted by SNI.
    pub fn map_entries(&self) -> Vec<(Sni, String)> {
        let mut out: Vec<(Sni, String)> = self
            .routes
            .iter()
            .flat_map(|r| r.snis.iter().map(|s| (s.clone(), r.backend.clone())))
            .collect();
        out.sort();
        out
    }

    pub fn route(&self, backend: &str) -> Option<&GatewayRoute> {
        self.routes.iter().find(|r| r.backend == backend)
    }
}

/// Builds a gateway's desired state. Like a sidecar's, it waits for the registration, its leaf
/// and the roots (the trust domain names the SNIs); an export that cannot be served is skipped
/// with a warning, never the whole state.
pub fn build(
    snapshot: &Snapshot,
    settings: &Settings,
    gw: &MeshGateway,
    previous: Option<&Desired>,
) -> Result<Desired> {
    let (Some(reg), Some(leaf), Some(roots)) =
        (&snapshot.registration, &snapshot.leaf, &snapshot.roots)
    else {
        return Err(Error::msg("the Consul snapshot is incomplete"));
    };
    if !crate::consul::is_mesh_gateway(reg) {
        return Err(Error::msg(format!(
            "service {:?} is registered as kind {:?}, not mesh-gateway",
            reg.id, reg.kind
        )));
    }
    if !leaf.service.is_empty() && leaf.service != gw.service.as_str() {
        return Err(Error::msg(format!(
            "waiting for the leaf certificate of {:?} (the one held is for {:?})",
            gw.service.as_str(),
            leaf.service
        )));
    }
    let tls = tls(leaf, roots)?;
    let trust_domain = Name::parse("CARoots.TrustDomain", &tls.trust_domain)?;
    let datacenter = Name::parse(
        "Datacenter",
        &local_datacenter(&leaf.service_uri, &reg.datacenter),
    )?;
    let mut warnings = Vec::new();
    let wanted = exports(
        snapshot.exported.as_deref().unwrap_or_default(),
        &trust_domain,
        &mut warnings,
    );
    let here = Here {
        datacenter: datacenter.to_string(),
        trust_domain: &tls.trust_domain,
        // The gateway proves nothing and checks nothing: the dialing sidecar checks the
        // server's identity end to end, through the gateway's TCP stream.
        identity_check: false,
        balance: &settings.knobs.balance,
    };
    let before = previous.and_then(|p| p.gateway.as_ref());
    let mut routes = Vec::new();
    for (service, snis) in wanted {
        let key = DestinationKey {
            kind: DestinationKind::Service,
            name: service.to_string(),
            datacenter: String::new(),
        };
        let entries = snapshot
            .endpoints
            .get(&key)
            .map_or(&[][..], |v| v.as_slice());
        let backend = sanitize(&format!("{BACKEND_PREFIX}gw_{service}"));
        let had = before.and_then(|g| g.route(&backend));
        let identity = Identity {
            namespace: DEFAULT.to_string(),
            ..Identity::service(service.as_str(), datacenter.as_str())
        };
        let (slots, _) = pool(
            entries,
            service.as_str(),
            Some(&identity),
            &here,
            snapshot,
            had.map_or(&[][..], |r| r.slots.as_slice()),
            None,
            &mut warnings,
        );
        routes.push(GatewayRoute {
            service,
            backend,
            snis,
            slots,
        });
    }
    routes.sort_by(|a, b| a.backend.cmp(&b.backend));
    let mut listeners = vec![GatewayListener {
        name: LAN_FRONTEND,
        address: Address::Ip(gw.lan.ip),
        port: gw.lan.port,
    }];
    if let Some(wan) = gw.wan {
        listeners.push(GatewayListener {
            name: WAN_FRONTEND,
            address: Address::Ip(wan.ip),
            port: wan.port,
        });
    }
    Ok(Desired {
        service: gw.service.to_string(),
        public: None,
        upstreams: Vec::new(),
        exposed: Vec::new(),
        tls,
        intentions: false,
        intentions_map: Vec::new(),
        knobs: settings.knobs.clone(),
        spoe_backend_mode: settings.haproxy.spoe_backend_mode(),
        paths: settings.paths.clone(),
        warnings,
        gateway: Some(Gateway { listeners, routes }),
        transparent: None,
        mesh_tls: Default::default(),
        jwt_headers: Default::default(),
        access_log: None,
    })
}

/// The services to route and the SNIs of each: every service an entry exports to a peer, in
/// the default partition and namespace (what Consul's community edition has).
fn exports(
    entries: &[ExportedServicesEntry],
    trust_domain: &Name,
    warnings: &mut Vec<String>,
) -> BTreeMap<Name, Vec<Sni>> {
    let mut out: BTreeMap<Name, Vec<Sni>> = BTreeMap::new();
    let default = Name::parse("partition", DEFAULT).ok();
    let Some(default) = default else {
        return out;
    };
    for e in entries {
        if !e.partition.is_empty() && e.partition != DEFAULT {
            warnings.push(format!(
                "exported-services {:?} of partition {:?}: only the default partition is served; skipping it",
                e.name.escape_debug().to_string(),
                e.partition.escape_debug().to_string()
            ));
            continue;
        }
        for s in &e.services {
            let named = || s.name.escape_debug().to_string();
            if s.name == "*" {
                warnings.push(
                    "exported-services: the wildcard service \"*\" is not served by this gateway yet; name each service".into(),
                );
                continue;
            }
            if !s.namespace.is_empty() && s.namespace != DEFAULT {
                warnings.push(format!(
                    "exported service {:?} is in namespace {:?}: only the default namespace is served; skipping it",
                    named(),
                    s.namespace.escape_debug().to_string()
                ));
                continue;
            }
            let service = match Name::parse("exported service", &s.name) {
                Ok(n) => n,
                Err(e) => {
                    warnings.push(format!("exported-services: {e}; skipping it"));
                    continue;
                }
            };
            for c in &s.consumers {
                if c.peer.is_empty() {
                    warnings.push(format!(
                        "exported service {:?}: a consumer that is not a peer (partition {:?}, sameness group {:?}) is not served by this gateway; skipping it",
                        named(),
                        c.partition.escape_debug().to_string(),
                        c.sameness_group.escape_debug().to_string()
                    ));
                    continue;
                }
                let sni =
                    Name::parse("exported-services consumer Peer", &c.peer).and_then(|peer| {
                        Sni::peered(&service, &default, &default, &peer, trust_domain)
                    });
                match sni {
                    Ok(sni) => {
                        let snis = out.entry(service.clone()).or_default();
                        if !snis.contains(&sni) {
                            snis.push(sni);
                            snis.sort();
                        }
                    }
                    Err(e) => warnings.push(format!(
                        "exported service {:?}: {e}; skipping this consumer",
                        named()
                    )),
                }
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Name {
        Name::parse("t", s).unwrap()
    }

    #[test]
    fn the_peered_sni_is_consuls_form_lowercased() {
        let d = name("default");
        let sni = Sni::peered(&name("Server"), &d, &d, &name("dc1"), &name("abc.consul")).unwrap();
        assert_eq!(
            sni.as_str(),
            "server.default.default.dc1.external.abc.consul"
        );
        let dotted = Sni::peered(&name("a.b"), &d, &d, &name("dc1"), &name("abc.consul"));
        assert!(
            dotted.is_err(),
            "a dotted service name would read as two labels"
        );
    }

    fn entry(json: &str) -> Vec<ExportedServicesEntry> {
        serde_json::from_str(json).unwrap()
    }

    #[test]
    fn exports_to_peers_become_routes_and_the_rest_warnings() {
        let entries = entry(
            r#"[{"Name":"default","Services":[
                {"Name":"server","Consumers":[{"Peer":"dc1"},{"Peer":"dc3"},{"Peer":"dc1"}]},
                {"Name":"api","Namespace":"other","Consumers":[{"Peer":"dc1"}]},
                {"Name":"*","Consumers":[{"Peer":"dc1"}]},
                {"Name":"web","Consumers":[{"Partition":"p1"},{"Peer":"bad peer"}]}
            ]}]"#,
        );
        let mut warnings = Vec::new();
        let out = exports(&entries, &name("td.consul"), &mut warnings);
        assert_eq!(out.len(), 1, "{out:?}");
        let snis: Vec<&str> = out[&name("server")].iter().map(Sni::as_str).collect();
        assert_eq!(
            snis,
            [
                "server.default.default.dc1.external.td.consul",
                "server.default.default.dc3.external.td.consul"
            ]
        );
        assert_eq!(warnings.len(), 4, "{warnings:#?}");
        assert!(warnings.iter().any(|w| w.contains("namespace")));
        assert!(warnings.iter().any(|w| w.contains("wildcard")));
        assert!(warnings
            .iter()
            .any(|w| w.contains("partition \\\"p1\\\"") || w.contains("p1")));
        assert!(warnings.iter().any(|w| w.contains("bad peer")));
    }
}

#[cfg(test)]
mod build_tests {
    use std::path::Path;

    use super::*;
    use crate::model::build;
    use crate::model::fixtures::{gateway_snapshot, CONSUL_VERSIONS};

    #[test]
    fn a_gateway_routes_each_export_to_its_local_instances_without_tls() {
        for v in CONSUL_VERSIONS {
            let (s, settings) = gateway_snapshot(v, Path::new("/run/hcc-test"));
            let d = build(&s, &settings, None).unwrap();
            assert!(d.public.is_none() && d.upstreams.is_empty(), "{v}");
            let g = d.gateway.as_ref().unwrap();
            let names: Vec<_> = g
                .listeners
                .iter()
                .map(|l| (l.name, l.address.to_string()))
                .collect();
            assert_eq!(
                names,
                [
                    (LAN_FRONTEND, "127.0.0.1".into()),
                    (WAN_FRONTEND, "127.0.0.2".into())
                ]
            );
            assert_eq!(g.routes.len(), 1);
            let r = &g.routes[0];
            assert_eq!(r.backend, "be_gw_server");
            let td = &d.tls.trust_domain;
            assert_eq!(
                g.map_entries(),
                [(
                    Sni(format!("server.default.default.dc1.external.{td}")),
                    "be_gw_server".to_string()
                )]
            );
            let live: Vec<_> = r.slots.iter().filter_map(|s| s.instance.as_ref()).collect();
            assert!(
                !live.is_empty() && live.iter().all(|i| i.in_service()),
                "{v}: {live:?}"
            );
            for s in &r.slots {
                let spec = crate::objects::gateway_server(r, s);
                assert!(
                    spec.tls.is_none() && !spec.line().contains("ssl"),
                    "{v}: {}",
                    spec.line()
                );
            }
            assert!(d.warnings.is_empty(), "{v}: {:?}", d.warnings);
            // Readiness counts the routes: serving means every export's instances are live.
            assert_eq!(d.live_instances()["be_gw_server"], live.len(), "{v}");
            let nothing_live = std::collections::BTreeMap::new();
            assert!(
                !d.served_by(&nothing_live) && d.served_by(&d.live_instances()),
                "{v}"
            );
        }
    }

    #[test]
    fn instance_churn_is_live_and_a_new_export_adds_a_backend_and_map_entries() {
        let (mut s, settings) = gateway_snapshot(crate::model::fixtures::ANY, Path::new("/run/t"));
        let before = build(&s, &settings, None).unwrap();
        let key = DestinationKey {
            kind: DestinationKind::Service,
            name: "server".into(),
            datacenter: String::new(),
        };
        let mut fewer = s.endpoints[&key].clone();
        fewer.pop();
        s.apply(crate::consul::Update::Endpoints(key, fewer));
        let churned = build(&s, &settings, Some(&before)).unwrap();
        let p = crate::haproxy::diff::plan(&before, &churned);
        assert!(
            p.ops.is_empty() && !p.live.is_empty() && !p.gateway_map_changed,
            "{p:?}"
        );

        s.apply(crate::consul::Update::ExportedServices(
            serde_json::from_str(
                r#"[{"Name":"default","Services":[
                    {"Name":"server","Consumers":[{"Peer":"dc1"},{"Peer":"dc3"}]},
                    {"Name":"api","Consumers":[{"Peer":"dc1"}]}]}]"#,
            )
            .unwrap(),
        ));
        let more = build(&s, &settings, Some(&churned)).unwrap();
        let p = crate::haproxy::diff::plan(&churned, &more);
        assert!(p.gateway_map_changed, "{p:?}");
        assert!(!p.needs_full_render(), "{:?}", p.full_render_reason());
        use crate::haproxy::diff::Op;
        assert!(
            matches!(&p.ops[0], Op::CreateBackend(b) if b.name == "be_gw_api"),
            "{:?}",
            p.ops
        );
        assert_eq!(more.gateway.as_ref().unwrap().map_entries().len(), 3);
        let back = crate::haproxy::diff::plan(&more, &churned);
        assert_eq!(back.ops, [Op::DeleteBackend("be_gw_api".into())]);
    }
}
