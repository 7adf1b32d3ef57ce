//! The snapshot's tests: merging updates, and what it wants watched.

use super::*;

use crate::consul::chain::TargetKey;
use crate::consul::DestinationKey;
use crate::model::fixtures::{self, CONSUL_VERSIONS};

fn role(proxy: &str) -> Role {
    Role {
        proxy_id: proxy.into(),
        gateway: false,
        agentless: false,
        intentions: true,
    }
}

fn service(name: &str, dc: &str) -> DestinationKey {
    DestinationKey {
        kind: DestinationKind::Service,
        name: name.into(),
        datacenter: dc.into(),
    }
}

fn query(name: &str) -> DestinationKey {
    DestinationKey {
        kind: DestinationKind::PreparedQuery,
        name: name.into(),
        datacenter: String::new(),
    }
}

/// Before anything is read, only what names the rest: the registration, and what every
/// sidecar reads whatever it is.
#[test]
fn an_empty_snapshot_wants_the_registration_roots_and_mesh() {
    let w = Snapshot::default().watches(&role("p"));
    assert_eq!(
        w,
        BTreeSet::from([Watch::Registration("p".into()), Watch::Roots, Watch::Mesh])
    );
    let gw = Role {
        gateway: true,
        intentions: false,
        ..role("gw")
    };
    assert!(Snapshot::default()
        .watches(&gw)
        .contains(&Watch::ExportedServices));
}

/// The recorded `client` sidecar (one upstream `server`): its leaf, the intentions with the
/// default policy, and the upstream's instances and chain; nothing of checks or transparent
/// mode.
#[test]
fn a_sidecar_wants_its_leaf_intentions_and_each_upstream() {
    for v in CONSUL_VERSIONS {
        let p = "client-sidecar-proxy";
        let s = fixtures::snapshot(v, p, "ca-leaf-client.json");
        let want = BTreeSet::from([
            Watch::Registration(p.into()),
            Watch::Roots,
            Watch::Mesh,
            Watch::Leaf("client".into()),
            Watch::Intentions,
            Watch::AclDefaultPolicy("client".into()),
            Watch::Instances(service("server", ""), None),
            Watch::Chain(service("server", "")),
            Watch::ExportedServices,
        ]);
        assert_eq!(s.watches(&role(p)), want, "{v}");
        let without = Role {
            intentions: false,
            ..role(p)
        };
        let w = s.watches(&without);
        assert!(
            !w.contains(&Watch::Intentions)
                && !w.contains(&Watch::AclDefaultPolicy("client".into())),
            "{v}: {w:?}"
        );
    }
}

/// `rich`: a service in another datacenter has no chain of its own watch kind here (it is a
/// service: it has one), a prepared query has no chain and is keyed by its poll interval, so
/// a new `poll_interval` is another watch (the old one stops, the new one starts).
#[test]
fn prepared_queries_are_keyed_by_their_poll_interval() {
    for v in CONSUL_VERSIONS {
        let p = "rich-sidecar-proxy";
        let plain = fixtures::snapshot(v, p, "ca-leaf-rich.json").watches(&role(p));
        assert!(
            plain.contains(&Watch::Instances(query("pq-server"), None)),
            "{v}"
        );
        assert!(!plain.contains(&Watch::Chain(query("pq-server"))), "{v}");
        assert!(
            plain.contains(&Watch::Chain(service("server", "dc2"))),
            "{v}"
        );
        assert!(
            plain.contains(&Watch::Instances(service("server", "dc2"), None)),
            "{v}"
        );
        let set = fixtures::rich_with_settings(v).watches(&role(p));
        let two =
            crate::value::Millis::from_go_json("t", &serde_json::json!("2s")).and_then(Result::ok);
        assert!(two.is_some(), "2s is a duration");
        assert!(
            set.contains(&Watch::Instances(query("pq-server"), two)),
            "{v}"
        );
        assert!(
            !set.contains(&Watch::Instances(query("pq-server"), None)),
            "{v}"
        );
    }
}

/// `Expose.Checks`: the checks of the service instance and the address checks come from (the
/// agent's; agentless, the catalog node's), and agentless the central config entries.
#[test]
fn exposed_checks_want_the_checks_and_the_agent_address() {
    for v in CONSUL_VERSIONS {
        let p = "checked-sidecar-proxy";
        let s = fixtures::snapshot(v, p, "ca-leaf-checked.json");
        let w = s.watches(&role(p));
        assert!(w.contains(&Watch::Checks("checked".into())), "{v}: {w:?}");
        assert!(w.contains(&Watch::AgentAddress), "{v}: {w:?}");
        assert!(!w.contains(&Watch::ServiceDefaults), "{v}");
        let agentless = Role {
            agentless: true,
            ..role(p)
        };
        let w = s.watches(&agentless);
        assert!(w.contains(&Watch::Checks("checked".into())), "{v}: {w:?}");
        assert!(w.contains(&Watch::AgentAddress), "{v}: {w:?}");
        assert!(w.contains(&Watch::ServiceDefaults), "{v}");
        assert!(w.contains(&Watch::ProxyDefaults), "{v}");
    }
}

/// Transparent mode (`modern`, 1.16.3 only): the service's topology; each implicit upstream
/// it reports is one more destination, and one gone is no longer watched. A peer's service is
/// never watched as ours.
#[test]
fn transparent_mode_wants_the_topology_and_each_implicit_upstream() {
    let p = "modern-sidecar-proxy";
    let mut s = fixtures::snapshot("1.16.3", p, "ca-leaf-client.json");
    let w = s.watches(&role(p));
    assert!(w.contains(&Watch::Topology("modern".into())), "{w:?}");
    assert!(w.contains(&Watch::Instances(service("server", ""), None)));
    assert!(w.contains(&Watch::Instances(service("client", ""), None)));
    let instances = |w: &BTreeSet<Watch>| {
        w.iter()
            .filter(|w| matches!(w, Watch::Instances(..)))
            .count()
    };
    assert_eq!(instances(&w), 2, "the peer's server is not ours: {w:?}");
    s.apply(Update::IntentionUpstreams(vec!["web".into()]));
    let w = s.watches(&role(p));
    assert!(w.contains(&Watch::Instances(service("web", ""), None)));
    assert!(w.contains(&Watch::Chain(service("web", ""))));
    s.apply(Update::IntentionUpstreams(Vec::new()));
    assert!(!s
        .watches(&role(p))
        .contains(&Watch::Chain(service("web", ""))));
}

/// A chain that splits or fails over names targets other than the destination: each is
/// watched while its chain is, and no longer once the upstream is gone.
#[test]
fn chain_targets_are_watched_while_their_upstream_is() {
    for v in CONSUL_VERSIONS {
        let p = "client-sidecar-proxy";
        let mut s = fixtures::with_chain(v, "split", true);
        let targets = |s: &Snapshot| -> Vec<TargetKey> {
            s.watches(&role(p))
                .into_iter()
                .filter_map(|w| match w {
                    Watch::TargetInstances(t) => Some(t),
                    _ => None,
                })
                .collect()
        };
        let found = targets(&s);
        assert!(!found.is_empty(), "{v}");
        assert!(
            found.iter().all(|t| t.service.starts_with("web")),
            "{v}: {found:?}"
        );
        fixtures::proxy(&mut s).upstreams.clear();
        assert!(targets(&s).is_empty(), "{v}");
    }
}

/// The `jwt-provider` entries are read from the first intention that names a provider on,
/// and only where intentions are.
#[test]
fn jwt_providers_are_wanted_once_an_intention_names_one() {
    let p = "client-sidecar-proxy";
    let mut s = fixtures::snapshot("1.16.3", p, "ca-leaf-client.json");
    let recorded: Vec<IntentionEntry> = fixtures::json("1.16.3", "intentions.json");
    s.apply(Update::Intentions(recorded));
    assert!(!s.watches(&role(p)).contains(&Watch::JwtProviders));
    let jwt: IntentionEntry = serde_json::from_str(
        r#"{"SourceName":"api","DestinationName":"client","Action":"allow","JWT":{"Providers":[{"Name":"okta"}]}}"#,
    )
    .unwrap();
    s.apply(Update::Intentions(vec![jwt]));
    assert!(s.watches(&role(p)).contains(&Watch::JwtProviders));
    s.apply(Update::JwtProviders(JwtProviders::default()));
    s.apply(Update::Intentions(Vec::new()));
    assert!(
        s.watches(&role(p)).contains(&Watch::JwtProviders),
        "kept for the rest of the run"
    );
    let gw = Role {
        intentions: false,
        ..role(p)
    };
    assert!(!s.watches(&gw).contains(&Watch::JwtProviders));
}

/// A mesh gateway: its own leaf, the exports and each exported service's instances; no
/// intentions (the destination's sidecar enforces them) and no chains.
#[test]
fn a_gateway_wants_its_exports_and_their_instances() {
    for v in CONSUL_VERSIONS {
        let (s, _) = fixtures::gateway_snapshot(v, std::path::Path::new("/run/hcc-test"));
        let gw = Role {
            gateway: true,
            intentions: false,
            ..role("gw")
        };
        let want = BTreeSet::from([
            Watch::Registration("gw".into()),
            Watch::Roots,
            Watch::Mesh,
            Watch::ExportedServices,
            Watch::Leaf("gw".into()),
            Watch::Instances(service("server", ""), None),
        ]);
        assert_eq!(s.watches(&gw), want, "{v}");
    }
}

fn registration(config: &str) -> AgentService {
    serde_json::from_str(&format!(
        r#"{{"ID":"web-1-sidecar-proxy","Service":"web-sidecar-proxy","Kind":"connect-proxy",
           "Proxy":{{"DestinationServiceName":"web","Config":{config}}}}}"#
    ))
    .unwrap()
}

fn protocol(s: &Snapshot) -> Option<&str> {
    s.registration
        .as_ref()?
        .proxy
        .as_ref()?
        .config
        .get("protocol")?
        .as_str()
}

/// Agentless: the central config entries fill in what the catalog's registration does not
/// say, whichever comes first (`consul::central`); a protocol of the registration's own wins;
/// and the first render waits for both lists.
#[test]
fn the_central_config_fills_in_the_catalog_registration() {
    let mut s = Snapshot {
        agentless: true,
        ..Snapshot::default()
    };
    let defaults = |protocol: &str| {
        vec![serde_json::json!({"Kind": "service-defaults", "Name": "web", "Protocol": protocol})]
    };
    assert!(!s.apply(Update::ServiceDefaults(defaults("http"))));
    assert!(s.apply(Update::Registration(registration("{}"))));
    assert_eq!(protocol(&s), Some("http"));
    assert!(s.missing().contains(&"the proxy-defaults config entries"));
    assert!(!s.missing().contains(&"the service-defaults config entries"));
    assert!(s.apply(Update::ServiceDefaults(defaults("grpc"))));
    assert_eq!(protocol(&s), Some("grpc"));
    assert!(
        !s.apply(Update::ServiceDefaults(defaults("grpc"))),
        "no change"
    );
    assert!(
        !s.apply(Update::ProxyDefaults(vec![serde_json::json!({
            "Kind": "proxy-defaults", "Name": "global", "Config": {"protocol": "http2"}
        })])),
        "service-defaults' protocol wins over proxy-defaults'"
    );
    assert!(!s.missing().iter().any(|m| m.contains("config entries")));
    assert!(s.apply(Update::Registration(registration(r#"{"protocol":"tcp"}"#))));
    assert_eq!(protocol(&s), Some("tcp"));
    assert!(
        !s.apply(Update::ServiceDefaults(Vec::new())),
        "the registration's protocol still wins"
    );
    assert!(s.apply(Update::Registration(registration("{}"))));
    assert_eq!(protocol(&s), Some("http2"));
}

/// With intentions enforced, nothing is complete before the agent's first real table:
/// a listener started earlier would deny what the intentions allow.
#[test]
fn enforcing_waits_for_the_intentions_table() {
    let roots: CaRoots = serde_json::from_str(
        r#"{"TrustDomain":"t.consul","Roots":[{"ID":"r","RootCert":"x","Active":true}]}"#,
    )
    .unwrap();
    let leaf: LeafCert =
        serde_json::from_str(r#"{"CertPEM":"c","PrivateKeyPEM":"k","Service":"web"}"#).unwrap();
    let mut s = Snapshot::default();
    s.apply(Update::Registration(registration("{}")));
    s.apply(Update::Leaf(leaf));
    s.apply(Update::Roots(roots));
    assert!(
        s.missing().is_empty(),
        "without enforcement: {:?}",
        s.missing()
    );
    s.enforcing = true;
    assert_eq!(s.missing(), ["the intentions", "the ACL default policy"]);
    let jwt: IntentionEntry = serde_json::from_str(
        r#"{"SourceName":"api","DestinationName":"web","Action":"allow","JWT":{"Providers":[{"Name":"okta"}]}}"#,
    )
    .unwrap();
    s.apply(Update::Intentions(vec![jwt]));
    s.apply(Update::AclDefaultPolicy("deny".into()));
    assert_eq!(s.missing(), ["the jwt-provider config entries"]);
    s.apply(Update::JwtProviders(JwtProviders::default()));
    assert!(s.missing().is_empty(), "{:?}", s.missing());
    s.apply(Update::Intentions(Vec::new()));
    s.jwt_providers = None;
    assert!(s.missing().is_empty(), "no intention names a provider");
}

/// A peered upstream (`modern`'s `server` of `peer1`) wants that peering and the instances
/// Consul lists for the peer's service; the exports name the peers whose CAs the public
/// listener trusts, so each such peering is read too. Nothing of the peer's is read as ours.
#[test]
fn peered_upstreams_and_exports_want_their_peerings() {
    let p = "modern-sidecar-proxy";
    let mut s = fixtures::snapshot("1.16.3", p, "ca-leaf-client.json");
    let key = crate::peering::PeerKey {
        peer: "peer1".into(),
        service: "server".into(),
    };
    let w = s.watches(&role(p));
    assert!(w.contains(&Watch::Peering("peer1".into())), "{w:?}");
    assert!(w.contains(&Watch::PeerInstances(key.clone())), "{w:?}");
    assert!(w.contains(&Watch::ExportedServices), "{w:?}");
    assert!(!s.endpoints_known(), "the peered upstream is not read yet");
    assert!(!s.exports_known(), "the exports are not read yet");
    s.apply(Update::ExportedServices(
        serde_json::from_str(
            r#"[{"Name":"default","Services":[{"Name":"modern","Consumers":[{"Peer":"dc9"}]},
                {"Name":"other","Consumers":[{"Peer":"dc8"}]}]}]"#,
        )
        .unwrap(),
    ));
    let w = s.watches(&role(p));
    assert!(w.contains(&Watch::Peering("dc9".into())), "{w:?}");
    assert!(!w.contains(&Watch::Peering("dc8".into())), "{w:?}");
    assert!(s.apply(Update::Peering("peer1".into(), Default::default())));
    assert!(s.apply(Update::PeerInstances(key, Vec::new())));
    assert!(!s.apply(Update::Peering("peer1".into(), Default::default())));
    // The first render also waits for the peering (its CA) of each peer `modern` is
    // exported to, so that a new instance does not refuse the clients a gateway sends it.
    assert!(!s.exports_known(), "dc9's peering is not read yet");
    s.apply(Update::Peering("dc9".into(), Default::default()));
    assert!(s.exports_known());
}

/// With an agent, the defaults entries are read for `MutualTLSMode` only from the mesh entry's
/// consent on, and then kept; a change of the mode counts though the merged registration
/// does not change.
#[test]
fn agent_mode_reads_the_defaults_for_mutual_tls_from_the_mesh_consent_on() {
    let p = "client-sidecar-proxy";
    let mut s = fixtures::snapshot(fixtures::CONSUL_VERSIONS[0], p, "ca-leaf-client.json");
    let service = s
        .registration
        .as_ref()
        .and_then(|r| r.proxy.as_ref())
        .map(|p| p.destination_service_name.clone())
        .unwrap_or_default();
    let w = s.watches(&role(p));
    assert!(!w.contains(&Watch::ProxyDefaults), "{w:?}");
    assert!(!w.contains(&Watch::ServiceDefaults), "{w:?}");
    let consent = |allow: bool| {
        Update::Mesh(vec![serde_json::json!({
            "Kind": "mesh", "AllowEnablingPermissiveMutualTLS": allow})])
    };
    s.apply(consent(true));
    let w = s.watches(&role(p));
    assert!(w.contains(&Watch::ProxyDefaults), "{w:?}");
    assert!(w.contains(&Watch::ServiceDefaults), "{w:?}");

    s.apply(Update::ProxyDefaults(Vec::new()));
    let defaults = |mode: &str| {
        Update::ServiceDefaults(vec![serde_json::json!({"Kind": "service-defaults",
            "Name": service, "MutualTLSMode": mode})])
    };
    assert!(s.apply(defaults("permissive")));
    assert_eq!(s.mutual_tls_mode(), "permissive");
    assert!(!s.apply(defaults("permissive")));
    assert!(s.apply(defaults("strict")));
    // Consent withdrawn: still read, so that a permissive service is named.
    s.apply(consent(false));
    assert!(s.watches(&role(p)).contains(&Watch::ServiceDefaults));
}
