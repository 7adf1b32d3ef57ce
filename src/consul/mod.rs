//! Everything the sidecar reads from the local Consul agent: the response types (`api`), the
//! client with its proxy lookup (`client`), what each kind of watch reads (`kinds`) and the
//! blocking-query watchers (`watch`).
//! This module knows nothing about HAProxy.

pub mod api;
pub mod catalog_service;
pub mod central;
pub mod chain;
pub mod client;
pub mod jwks;
pub mod kinds;
pub mod servers;
pub mod source;
pub mod watch;

use std::collections::BTreeMap;

use api::{AgentService, CaRoots, HealthEntry, IntentionEntry, LeafCert};
use serde_json::Value;

use crate::value::{Millis, Refused};

/// One upstream destination as Consul resolves it. Two upstreams that name the same destination
/// in the same datacenter share one watch; the listeners stay apart (see `model`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestinationKey {
    pub kind: DestinationKind,
    pub name: String,
    /// Empty for the agent's own datacenter.
    pub datacenter: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DestinationKind {
    Service,
    PreparedQuery,
}

impl std::fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            DestinationKind::Service => "service",
            DestinationKind::PreparedQuery => "prepared query",
        };
        write!(f, "{kind} {}", self.name)?;
        if !self.datacenter.is_empty() {
            write!(f, " in {}", self.datacenter)?;
        }
        Ok(())
    }
}

/// What changed in Consul.
#[derive(Clone, Debug)]
pub enum Update {
    Registration(AgentService),
    /// The registration is gone (404): the service was deregistered.
    RegistrationGone,
    Leaf(LeafCert),
    Roots(CaRoots),
    Endpoints(DestinationKey, Vec<HealthEntry>),
    /// Every intention in the cluster; the sidecar keeps those for its own service.
    Intentions(Vec<IntentionEntry>),
    /// Every `jwt-provider` config entry, with the local JWKS files they name, as read.
    JwtProviders(api::JwtProviders),
    /// A remote JWKS URI's key set as just fetched (`jwks`), when it differs from the last.
    RemoteJwks(String, String),
    /// The `mesh` config entries as read (`/v1/config/mesh`: none or one); empty on a Consul
    /// that has no such kind (before 1.10).
    Mesh(Vec<serde_json::Value>),
    /// The ACL default policy as the agent spells it (`allow`/`deny`; anything else is kept
    /// as it came): what a connection that no intention matches gets.
    AclDefaultPolicy(String),
    /// The agent's checks of the proxied service (`Expose.Checks`), sorted by check ID.
    Checks(Vec<api::AgentCheck>),
    /// The local agent's address (`/v1/agent/self` Member.Addr); agentless, the catalog
    /// node's `Address` as an IP, empty when it is none.
    AgentAddress(String),
    /// The compiled discovery chain of a service destination.
    Chain(DestinationKey, chain::DiscoveryChain),
    /// The serving instances of one chain target other than the destination itself.
    TargetEndpoints(chain::TargetKey, Vec<HealthEntry>),
    /// Every `proxy-defaults` and every `service-defaults` config entry: agentless, what an
    /// agent would have merged into the registration (`central`) and the catalog's
    /// registration lacks; transparent mode reads the latter's `Destination`s.
    ProxyDefaults(Vec<Value>),
    ServiceDefaults(Vec<Value>),
    /// Every `exported-services` config entry (a mesh gateway's routes).
    ExportedServices(Vec<api::ExportedServicesEntry>),
    /// Transparent mode: the services this one may reach (`api::ServiceTopology::allowed`).
    IntentionUpstreams(Vec<String>),
    /// A cluster peering as read (`/v1/peering/<peer>`).
    Peering(String, crate::peering::Peering),
    /// The instances Consul lists for a peer's service (its gateways).
    PeerInstances(crate::peering::PeerKey, Vec<crate::peering::PeerInstance>),
}

/// A mesh gateway's registration as Consul's own `-register` makes it: kind `mesh-gateway`,
/// its service name as its ID, the LAN address as its address and both addresses tagged (the
/// WAN one is what peers and other datacenters dial). Returns the ID and the JSON body.
///
/// Like Consul's, it carries a TCP check of the LAN listener every 10 s (a gateway that died
/// without deregistering turns critical, and peers stop being sent to it), deregistered after
/// 6 h critical.
pub fn gateway_registration(g: &crate::config::MeshGateway) -> (String, String) {
    let wan = g.wan.unwrap_or(g.lan);
    let tagged = |l: crate::config::Listen| serde_json::json!({ "Address": l.ip.to_string(), "Port": l.port });
    let checked = if g.lan.ip.is_unspecified() {
        std::net::SocketAddr::new(std::net::Ipv4Addr::LOCALHOST.into(), g.lan.port)
    } else {
        std::net::SocketAddr::new(g.lan.ip, g.lan.port)
    };
    let body = serde_json::json!({
        "Kind": "mesh-gateway",
        "ID": g.service.as_str(),
        "Name": g.service.as_str(),
        "Address": g.lan.ip.to_string(),
        "Port": g.lan.port,
        "TaggedAddresses": { "lan": tagged(g.lan), "wan": tagged(wan) },
        "Check": {
            "Name": "mesh-gateway listening",
            "TCP": checked.to_string(),
            "Interval": "10s",
            "DeregisterCriticalServiceAfter": "6h",
        },
    });
    (g.service.to_string(), body.to_string())
}

/// The registration is a mesh gateway's, not a sidecar's.
pub fn is_mesh_gateway(registration: &AgentService) -> bool {
    registration.kind == "mesh-gateway"
}

/// The local services a mesh gateway carries: every service an `exported-services` entry names
/// (its local instances are read as a sidecar reads an upstream's). A wildcard (`*`) is left to
/// the model, which warns of it.
pub fn exported_destinations(entries: &[api::ExportedServicesEntry]) -> Vec<DestinationKey> {
    let mut keys: Vec<DestinationKey> = entries
        .iter()
        .flat_map(|e| e.services.iter())
        .filter(|s| !s.name.is_empty() && s.name != "*")
        .map(|s| DestinationKey {
            kind: DestinationKind::Service,
            name: s.name.clone(),
            datacenter: String::new(),
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// The cluster peers an `exported-services` entry exports `service` to (default partition and
/// namespace, the only ones Consul's community edition has), sorted. A wildcard names it too.
pub fn exported_to(entries: &[api::ExportedServicesEntry], service: &str) -> Vec<String> {
    let default = |s: &str| s.is_empty() || s == "default";
    let mut peers: Vec<String> = entries
        .iter()
        .filter(|e| default(&e.partition))
        .flat_map(|e| e.services.iter())
        .filter(|s| (s.name == service || s.name == "*") && default(&s.namespace))
        .flat_map(|s| s.consumers.iter())
        .filter(|c| !c.peer.is_empty())
        .map(|c| c.peer.clone())
        .collect();
    peers.sort();
    peers.dedup();
    peers
}

/// The peered upstreams of a registration (`DestinationPeer`), one key per peer's service.
pub fn peered_destinations(registration: &AgentService) -> Vec<crate::peering::PeerKey> {
    let mut keys: Vec<crate::peering::PeerKey> = registration
        .proxy
        .iter()
        .flat_map(|p| p.upstreams.iter())
        .filter(|u| !u.destination_peer.is_empty() && !u.destination_name.is_empty())
        .map(|u| crate::peering::PeerKey {
            peer: u.destination_peer.clone(),
            service: u.destination_name.clone(),
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Whether the registration asks for transparent mode (`Proxy.Mode: transparent`).
pub fn is_transparent(registration: &AgentService) -> bool {
    registration
        .proxy
        .as_ref()
        .is_some_and(|p| p.mode.eq_ignore_ascii_case("transparent"))
}

/// The service instance whose agent checks the registration asks to expose
/// (`Proxy.Expose.Checks`), if any.
pub fn exposed_checks_of(registration: &AgentService) -> Option<String> {
    registration
        .proxy
        .as_ref()
        .filter(|p| p.expose.checks && !p.destination_service_id.is_empty())
        .map(|p| p.destination_service_id.clone())
}

/// The agent's checks as an update: sorted by check ID, so that their order in the answer
/// (a JSON object) never reads as a change.
pub fn checks_update(checks: BTreeMap<String, api::AgentCheck>) -> Update {
    Update::Checks(checks.into_values().collect())
}

/// Transparent mode's part of the `mesh` config entries (`Update::Mesh`, the list Consul
/// answers; empty when none is written, which is Consul's defaults). An entry that does not
/// read fails closed: only mesh destinations.
pub fn mesh_entry(entries: &[serde_json::Value]) -> api::MeshEntry {
    match entries.first() {
        None => api::MeshEntry::default(),
        Some(e) => serde_json::from_value(e.clone()).unwrap_or(api::MeshEntry {
            transparent_proxy: api::MeshTransparentProxy {
                mesh_destinations_only: true,
            },
        }),
    }
}

/// The destinations a registration's upstreams need watched, and in transparent mode each
/// implicit upstream (`implicit`: the services intentions let it reach) in our datacenter.
pub fn destinations(registration: &AgentService, implicit: &[String]) -> Vec<DestinationKey> {
    let implicit = implicit
        .iter()
        .filter(|_| is_transparent(registration))
        .map(|name| DestinationKey {
            kind: DestinationKind::Service,
            name: name.clone(),
            datacenter: String::new(),
        });
    let mut keys: Vec<DestinationKey> = registration
        .proxy
        .iter()
        .flat_map(|p| p.upstreams.iter())
        // A peer's service is not ours of the same name; the model refuses such upstreams.
        .filter(|u| u.destination_peer.is_empty())
        .map(|u| DestinationKey {
            kind: if u.destination_type == "prepared_query" {
                DestinationKind::PreparedQuery
            } else {
                DestinationKind::Service
            },
            name: u.destination_name.clone(),
            datacenter: u.datacenter.clone(),
        })
        .chain(implicit)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Polling a prepared query more often than this would load the agent for nothing.
pub const MIN_POLL_INTERVAL_MS: u64 = 100;

/// An upstream's `poll_interval` (the Go original's key: a Go duration such as `"30s"`), how
/// often its prepared query is executed again: `None` when unset, an error when it is not a
/// duration from `MIN_POLL_INTERVAL_MS` up to HAProxy's largest timeout (the model names it in
/// a warning, the watcher then polls at its default).
pub fn poll_interval(config: &BTreeMap<String, Value>) -> Option<Result<Millis, Refused>> {
    const KEY: &str = "poll_interval";
    let parsed = Millis::from_go_json(KEY, config.get(KEY)?)?;
    Some(parsed.and_then(|ms| {
        if ms.get() < MIN_POLL_INTERVAL_MS {
            Err(Refused {
                field: KEY,
                value: format!("{} ms", ms.get()),
                reason: "below 100 ms, which would poll the agent for nothing",
            })
        } else {
            Ok(ms)
        }
    }))
}

/// The poll interval each prepared-query destination asks for: the shortest of the valid
/// `poll_interval`s of the upstreams that name it; absent when none sets one.
pub fn poll_intervals(registration: &AgentService) -> BTreeMap<DestinationKey, Millis> {
    let mut out: BTreeMap<DestinationKey, Millis> = BTreeMap::new();
    for u in registration.proxy.iter().flat_map(|p| p.upstreams.iter()) {
        if u.destination_type != "prepared_query" || !u.destination_peer.is_empty() {
            continue;
        }
        let Some(Ok(every)) = poll_interval(&u.config) else {
            continue;
        };
        let key = DestinationKey {
            kind: DestinationKind::PreparedQuery,
            name: u.destination_name.clone(),
            datacenter: u.datacenter.clone(),
        };
        out.entry(key)
            .and_modify(|m| *m = (*m).min(every))
            .or_insert(every);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Listen, MeshGateway};

    #[test]
    fn a_gateway_registers_both_addresses_and_a_check_of_its_lan_listener() {
        let listen = |ip: &str, port| Listen {
            ip: ip.parse().unwrap(),
            port,
        };
        let gw = MeshGateway {
            service: crate::value::Name::parse("t", "mesh-gw").unwrap(),
            register: true,
            lan: listen("0.0.0.0", 8443),
            wan: Some(listen("203.0.113.5", 443)),
        };
        let (id, body) = gateway_registration(&gw);
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(id, "mesh-gw");
        assert_eq!(
            (&v["Kind"], &v["ID"], &v["Name"]),
            (&"mesh-gateway".into(), &"mesh-gw".into(), &"mesh-gw".into())
        );
        assert_eq!(v["TaggedAddresses"]["wan"]["Address"], "203.0.113.5");
        assert_eq!(v["TaggedAddresses"]["wan"]["Port"], 443);
        assert_eq!(v["TaggedAddresses"]["lan"]["Port"], 8443);
        // An unspecified LAN address is checked on loopback.
        assert_eq!(v["Check"]["TCP"], "127.0.0.1:8443");
        assert_eq!(v["Check"]["Interval"], "10s");
        // Without -wan-address, the WAN address is the LAN one.
        let (_, body) = gateway_registration(&MeshGateway { wan: None, ..gw });
        let v: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(v["TaggedAddresses"]["wan"], v["TaggedAddresses"]["lan"]);
    }

    /// A prepared query is polled at the shortest valid `poll_interval` of the upstreams that
    /// name it; a bad one, or one on a service upstream, asks for nothing (the default).
    #[test]
    fn poll_intervals_take_the_shortest_valid_one_per_query() {
        let reg: AgentService = serde_json::from_str(
            r#"{"ID":"c-sidecar-proxy","Service":"c-sidecar-proxy","Kind":"connect-proxy",
               "Proxy":{"DestinationServiceName":"c","Upstreams":[
                 {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindPort":1,
                  "Config":{"poll_interval":"2s"}},
                 {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindPort":2,
                  "Config":{"poll_interval":"500ms"}},
                 {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindPort":3,
                  "Config":{"poll_interval":"1ms"}},
                 {"DestinationType":"prepared_query","DestinationName":"other","LocalBindPort":4,
                  "Config":{"poll_interval":30}},
                 {"DestinationName":"server","LocalBindPort":5,
                  "Config":{"poll_interval":"1s"}}]}}"#,
        )
        .unwrap();
        let polls = poll_intervals(&reg);
        let got: Vec<(String, u64)> = polls
            .iter()
            .map(|(k, v)| (k.name.clone(), v.get()))
            .collect();
        assert_eq!(got, [("pq".to_string(), 500)]);
        let bad = |v: serde_json::Value| {
            let c = BTreeMap::from([("poll_interval".to_string(), v)]);
            super::poll_interval(&c).map(|r| r.is_err())
        };
        assert_eq!(bad("99ms".into()), Some(true));
        assert_eq!(bad("1000h".into()), Some(true));
        assert_eq!(bad("30s\nx".into()), Some(true));
        assert_eq!(bad("30s".into()), Some(false));
        assert_eq!(bad(serde_json::Value::Null), None);
    }

    #[test]
    fn destinations_are_deduplicated_and_keep_datacenters_apart() {
        let reg: AgentService = serde_json::from_str(
            r#"{"ID":"c-sidecar-proxy","Service":"c-sidecar-proxy","Kind":"connect-proxy",
               "Proxy":{"DestinationServiceName":"c","Upstreams":[
                 {"DestinationName":"server","LocalBindPort":9191},
                 {"DestinationName":"server","LocalBindPort":9192},
                 {"DestinationName":"server","Datacenter":"dc2","LocalBindPort":9193},
                 {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindPort":9194}]}}"#,
        )
        .unwrap();
        let keys = destinations(&reg, &[]);
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(keys.iter().any(|k| k.datacenter == "dc2"));
        assert!(keys
            .iter()
            .any(|k| k.kind == DestinationKind::PreparedQuery && k.name == "pq"));
    }
}
