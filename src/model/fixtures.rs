//! Test helpers: snapshots made of the responses recorded from real Consul agents, one
//! directory per supported version (`fixtures/consul/<version>/`, by `scripts/record-fixtures`).

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use super::{Paths, Settings};
use crate::consul::api::{AgentCheck, AgentService, CaRoots, HealthEntry, LeafCert, QueryResult};
use crate::consul::kinds::{Role, Watch};
use crate::consul::DestinationKind;
use crate::consul::{checks_update, Update};
use crate::snapshot::Snapshot;

/// Every Consul version the sidecar supports; tests driven by recorded answers run on each.
pub const CONSUL_VERSIONS: [&str; 2] = ["1.8.7", "1.16.3"];

/// The oldest recorded version, for tests whose subject does not vary with Consul's version.
pub const ANY: &str = CONSUL_VERSIONS[0];

pub fn fixture(version: &str, name: &str) -> String {
    let path = format!(
        "{}/fixtures/consul/{version}/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn json<T: serde::de::DeserializeOwned>(version: &str, name: &str) -> T {
    serde_json::from_str(&fixture(version, name))
        .unwrap_or_else(|e| panic!("{version}/{name}: {e}"))
}

pub fn settings() -> Settings {
    settings_in(Path::new("/run/hcc-test"), false)
}

pub fn settings_in(workdir: &Path, intentions: bool) -> Settings {
    Settings {
        paths: Paths::new(workdir),
        intentions,
        knobs: crate::config::Knobs::default(),
        haproxy: crate::haproxy_version::HaproxyVersion::V2_6,
        identity_check: false,
        gateway: None,
    }
}

/// The registration's `Proxy`, to change in a test.
pub fn proxy(s: &mut Snapshot) -> &mut crate::consul::api::ProxyConfig {
    s.registration
        .as_mut()
        .expect("a fixture snapshot has a registration")
        .proxy
        .as_mut()
        .expect("a sidecar registration has a Proxy")
}

/// The first upstream of the snapshot's registration, to change in a test.
pub fn first_upstream(s: &mut Snapshot) -> &mut crate::consul::api::Upstream {
    &mut proxy(s).upstreams[0]
}

/// The registration's `Proxy.Config`, to change in a test.
pub fn proxy_config(s: &mut Snapshot) -> &mut BTreeMap<String, serde_json::Value> {
    &mut proxy(s).config
}

/// The recorded `rich` sidecar (http, two service upstreams and a prepared query) with every
/// setting of the Go original and Consul's local timeouts and connection cap, each with a value
/// HAProxy can take.
pub fn rich_with_settings(version: &str) -> Snapshot {
    let mut s = snapshot(version, "rich-sidecar-proxy", "ca-leaf-rich.json");
    let config = proxy_config(&mut s);
    for (k, v) in [
        ("enable_forwardfor", serde_json::json!(true)),
        ("appname_header", serde_json::json!("X-App")),
        // Loses to the recorded local_connect_timeout_ms (2000).
        ("connect_timeout", serde_json::json!("3s")),
        ("read_timeout", serde_json::json!("20s")),
        ("local_request_timeout_ms", serde_json::json!(700)),
        ("local_idle_timeout_ms", serde_json::json!("9000")),
        ("max_inbound_connections", serde_json::json!(64)),
    ] {
        config.insert(k.into(), v);
    }
    let proxy = s
        .registration
        .as_mut()
        .and_then(|r| r.proxy.as_mut())
        .expect("a sidecar registration has a Proxy");
    for u in &mut proxy.upstreams {
        u.config
            .insert("read_timeout".into(), serde_json::json!("7s"));
        // Loses to connect_timeout_ms where the upstream has one (1500 on the first).
        u.config
            .insert("connect_timeout".into(), serde_json::json!("4s"));
        if u.destination_type == "prepared_query" {
            u.config
                .insert("poll_interval".into(), serde_json::json!("2s"));
        }
    }
    s
}

/// A complete snapshot for `proxy` with every watch a sidecar wants answered from the recorded
/// fixtures where one is recorded for it (registration, leaf, roots, instances, checks); the
/// rest (chains, intentions, mesh) is left for a test to add.
pub fn snapshot(version: &str, proxy: &str, leaf: &str) -> Snapshot {
    let role = Role {
        proxy_id: proxy.to_string(),
        gateway: false,
        agentless: false,
        intentions: false,
    };
    let mut s = Snapshot::default();
    let mut answered = BTreeSet::new();
    loop {
        let new: Vec<Watch> = s.watches(&role).difference(&answered).cloned().collect();
        if new.is_empty() {
            return s;
        }
        for watch in new {
            if let Some(update) = recorded(version, &watch, leaf) {
                s.apply(update);
            }
            answered.insert(watch);
        }
    }
}

/// The recorded answer to `watch`, if one is recorded (`leaf`: the file of the leaf).
fn recorded(version: &str, watch: &Watch, leaf: &str) -> Option<Update> {
    Some(match watch {
        Watch::Registration(proxy) => Update::Registration(json::<AgentService>(
            version,
            &format!("agent-service-{proxy}.json"),
        )),
        Watch::Leaf(_) => Update::Leaf(json::<LeafCert>(version, leaf)),
        Watch::Roots => Update::Roots(json::<CaRoots>(version, "ca-roots.json")),
        Watch::Instances(key, _) => {
            let entries: Vec<HealthEntry> = match key.kind {
                DestinationKind::Service if key.datacenter.is_empty() => {
                    json(version, "health-connect-server.json")
                }
                DestinationKind::Service => Vec::new(),
                DestinationKind::PreparedQuery => {
                    json::<QueryResult>(version, "query-pq-server-execute.json").nodes
                }
            };
            Update::Endpoints(key.clone(), entries)
        }
        Watch::Checks(id) => {
            // What the watcher's `filter=ServiceID == "<id>"` leaves of the recorded checks.
            let mut checks: BTreeMap<String, AgentCheck> = json(version, "agent-checks.json");
            checks.retain(|_, c| &c.service_id == id);
            checks_update(checks)
        }
        _ => return None,
    })
}

/// The client's desired state from the recorded registration (any Consul version).
pub fn client_desired() -> super::Desired {
    super::build(
        &snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json"),
        &settings(),
        None,
    )
    .expect("the recorded client state builds")
}

/// `client`'s snapshot with the recorded chain `name` compiled for its upstream `server`
/// (the chain's own service renamed to `server`, as if recorded for it).
pub fn with_chain(v: &str, name: &str, as_server: bool) -> Snapshot {
    let mut s = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
    let key = crate::consul::destinations(s.registration.as_ref().unwrap(), &[])[0].clone();
    let mut body = fixture(v, &format!("discovery-chain-{name}.json"));
    if as_server {
        body = body
            .replace(&format!("\"{name}"), "\"server")
            .replace(&format!(":{name}."), ":server.");
    }
    let chain = crate::consul::chain::parse_chain(&body).unwrap();
    s.apply(crate::consul::Update::Chain(key, chain));
    s
}

/// A mesh gateway `gw` on this agent (listening on 127.0.0.1:8443, WAN 127.0.0.2:8443) that
/// exports `server` to the peer `dc1`, with the recorded instances of `server` and the recorded
/// roots (the recorded leaf stands for the gateway's own).
pub fn gateway_snapshot(version: &str, workdir: &Path) -> (Snapshot, Settings) {
    let mut s = Snapshot::default();
    let reg = AgentService {
        kind: "mesh-gateway".into(),
        id: "gw".into(),
        service: "gw".into(),
        port: 8443,
        address: "127.0.0.1".into(),
        ..AgentService::default()
    };
    s.apply(Update::Registration(reg));
    let mut leaf = json::<LeafCert>(version, "ca-leaf-server.json");
    leaf.service = "gw".into();
    s.apply(Update::Leaf(leaf));
    s.apply(Update::Roots(json::<CaRoots>(version, "ca-roots.json")));
    s.apply(Update::ExportedServices(
        serde_json::from_str(
            r#"[{"Name":"default","Services":[{"Name":"server","Consumers":[{"Peer":"dc1"}]}]}]"#,
        )
        .expect("the exported-services entry parses"),
    ));
    s.apply(Update::Endpoints(
        crate::consul::DestinationKey {
            kind: DestinationKind::Service,
            name: "server".into(),
            datacenter: String::new(),
        },
        json(version, "health-connect-server.json"),
    ));
    let listen = |ip: &str| crate::config::Listen {
        ip: ip.parse().expect("an IP"),
        port: 8443,
    };
    let settings = Settings {
        gateway: Some(crate::config::MeshGateway {
            service: crate::value::Name::parse("t", "gw").expect("a name"),
            register: true,
            lan: listen("127.0.0.1"),
            wan: Some(listen("127.0.0.2")),
        }),
        ..settings_in(workdir, false)
    };
    (s, settings)
}
