use super::*;
use crate::consul::api::{self, NodeServices};

const DIR: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/fixtures/central/consul-1.16.3"
);

fn read(name: &str) -> String {
    std::fs::read_to_string(format!("{DIR}/{name}")).unwrap()
}

fn entries(name: &str) -> Vec<Value> {
    serde_json::from_str(&read(name)).unwrap()
}

fn catalog(id: &str) -> AgentService {
    let node: NodeServices = api::parse("node", &read("node-services.json")).unwrap();
    node.services.into_iter().find(|s| s.id == id).unwrap()
}

fn agent(name: &str) -> AgentService {
    api::parse("agent", &read(name)).unwrap()
}

/// What the agent merged, recorded from a real 1.16.3 agent, is what the sidecar merges from
/// the catalog's registration and the config entries the servers list: the proxy's config,
/// mode, transparent settings, expose, access logs and every upstream's config.
#[test]
fn the_merge_of_the_catalog_registration_is_the_agents() {
    let (pd, sd) = (
        entries("proxy-defaults.json"),
        entries("service-defaults.json"),
    );
    let central = Central {
        proxy_defaults: &pd,
        service_defaults: &sd,
    };
    for (id, file) in [
        ("web-1-sidecar-proxy", "agent-web.json"),
        ("tp-1-sidecar-proxy", "agent-tp.json"),
    ] {
        let raw = catalog(id);
        let merged = merge(raw.clone(), &central).proxy.unwrap();
        let want = agent(file).proxy.unwrap();
        assert_ne!(
            raw.proxy.as_ref().unwrap(),
            &want,
            "{id}: the fixture merges something"
        );
        assert_eq!(merged.config, want.config, "{id}");
        assert_eq!(merged.mode, want.mode, "{id}");
        assert_eq!(merged.transparent_proxy, want.transparent_proxy, "{id}");
        assert_eq!(merged.expose, want.expose, "{id}");
        assert_eq!(merged.access_logs, want.access_logs, "{id}");
        let configs = |p: &api::ProxyConfig| -> Vec<BTreeMap<String, Value>> {
            p.upstreams.iter().map(|u| u.config.clone()).collect()
        };
        assert_eq!(configs(&merged), configs(&want), "{id}");
    }
}

/// No config entries: the registration is left as it came; a registration's own values win
/// over both entries.
#[test]
fn the_registration_wins_and_nothing_is_invented() {
    let raw = catalog("web-1-sidecar-proxy");
    let none = Central::default();
    assert_eq!(merge(raw.clone(), &none), raw);

    let pd = vec![
        serde_json::json!({"Kind": "proxy-defaults", "Name": "global",
        "Mode": "transparent", "Config": {"protocol": "tcp"},
        "Expose": {"Checks": true}, "AccessLogs": {"Enabled": true, "Path": "/x"}}),
    ];
    let sd = vec![
        serde_json::json!({"Kind": "service-defaults", "Name": "web",
        "Protocol": "http2", "Mode": "direct",
        "UpstreamConfig": {"Defaults": {"Protocol": "http", "MeshGateway": {"Mode": "local"}}}}),
    ];
    let mut own = raw.clone();
    let p = own.proxy.as_mut().unwrap();
    p.config.insert("protocol".into(), "grpc".into());
    p.mode = "direct".into();
    p.access_logs = serde_json::json!({"Enabled": false, "Path": "/mine"});
    p.upstreams[0]
        .config
        .insert("protocol".into(), "tcp".into());
    let central = Central {
        proxy_defaults: &pd,
        service_defaults: &sd,
    };
    let merged = merge(own, &central).proxy.unwrap();
    assert_eq!(merged.config["protocol"], "grpc");
    assert_eq!(merged.mode, "direct");
    assert!(merged.expose.checks);
    // Go's merge fills a false field from the defaults, as Consul's does.
    assert_eq!(
        merged.access_logs,
        serde_json::json!({"Enabled": true, "Path": "/mine"})
    );
    assert_eq!(merged.upstreams[0].config["protocol"], "tcp");
    // Defaults' protocol for the others, but never for a peer's; no mesh_gateway kept.
    assert_eq!(merged.upstreams[1].config["protocol"], "http");
    assert!(!merged.upstreams[2].config.contains_key("protocol"));
    assert!(merged
        .upstreams
        .iter()
        .all(|u| !u.config.contains_key("mesh_gateway")));
    // A prepared query's upstream takes nothing.
    assert!(merged.upstreams[3].config.is_empty());

    // Service-defaults' mode wins over proxy-defaults' when the registration has none.
    let merged = merge(raw.clone(), &central).proxy.unwrap();
    assert_eq!(merged.mode, "direct");
    assert_eq!(merged.config["protocol"], "http2");
}

/// A gateway's or a plain service's registration is not a sidecar's: left as it came.
#[test]
fn only_a_sidecar_registration_is_merged() {
    let pd = entries("proxy-defaults.json");
    let central = Central {
        proxy_defaults: &pd,
        service_defaults: &[],
    };
    let mut gw = catalog("web-1-sidecar-proxy");
    gw.kind = "mesh-gateway".into();
    assert_eq!(merge(gw.clone(), &central), gw);
    let mut plain = gw;
    plain.kind = String::new();
    plain.proxy = None;
    assert_eq!(merge(plain.clone(), &central), plain);
}
