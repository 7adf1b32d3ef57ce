//! Test helpers: snapshots made of the responses recorded from a real Consul agent.

use std::path::Path;

use super::{Paths, Settings};
use crate::consul::api::{AgentService, CaRoots, HealthEntry, LeafCert, QueryResult};
use crate::consul::watch::{destinations, Update};
use crate::consul::DestinationKind;
use crate::snapshot::Snapshot;

pub fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/consul/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

pub fn json<T: serde::de::DeserializeOwned>(name: &str) -> T {
    serde_json::from_str(&fixture(name)).unwrap_or_else(|e| panic!("{name}: {e}"))
}

pub fn settings() -> Settings {
    settings_in(Path::new("/run/hcc-test"), false)
}

pub fn settings_in(workdir: &Path, intentions: bool) -> Settings {
    Settings {
        paths: Paths::new(workdir),
        intentions,
        grace_period_ms: 30_000,
        haproxy_params: Vec::new(),
        balance: "roundrobin".into(),
        log_format: None,
        haproxy_log_level: "info",
    }
}

/// A complete snapshot for `proxy` with every destination answered from the recorded fixtures.
pub fn snapshot(proxy: &str, leaf: &str) -> Snapshot {
    let mut s = Snapshot::default();
    let reg: AgentService = json(&format!("agent-service-{proxy}.json"));
    for key in destinations(&reg) {
        let entries: Vec<HealthEntry> = match key.kind {
            DestinationKind::Service if key.datacenter.is_empty() => {
                json("health-connect-server.json")
            }
            DestinationKind::Service => Vec::new(),
            DestinationKind::PreparedQuery => {
                json::<QueryResult>("query-pq-server-execute.json").nodes
            }
        };
        s.apply(Update::Endpoints(key, entries));
    }
    s.apply(Update::Registration(reg));
    s.apply(Update::Leaf(json::<LeafCert>(leaf)));
    s.apply(Update::Roots(json::<CaRoots>("ca-roots.json")));
    s
}
