//! Discovery chains recorded from real Consul agents, turned into routing.

use super::*;
use crate::consul::chain::parse_chain;
use crate::consul::DestinationKind;

fn chain(version: &str, name: &str) -> DiscoveryChain {
    let path = format!(
        "{}/fixtures/consul/{version}/discovery-chain-{name}.json",
        env!("CARGO_MANIFEST_DIR")
    );
    parse_chain(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn build(version: &str, name: &str, mode: Mode) -> (Option<Routing>, Vec<String>) {
    let dest = DestinationKey {
        kind: DestinationKind::Service,
        name: name.into(),
        datacenter: String::new(),
    };
    let mut w = Vec::new();
    let r = routing(
        &chain(version, name),
        &dest,
        "be_up_x",
        mode,
        None,
        &Here {
            datacenter: "dc1".into(),
            trust_domain: "11111111-2222-3333-4444-555555555555.consul",
            identity_check: true,
            balance: "roundrobin",
        },
        &Snapshot::default(),
        None,
        &mut w,
    )
    .unwrap();
    (r, w)
}

const VERSIONS: [&str; 2] = ["1.8.7", "1.16.3"];

#[test]
fn a_plain_chain_changes_nothing() {
    for v in VERSIONS {
        assert_eq!(build(v, "plain", Mode::Tcp).0, None, "{v}");
    }
}

#[test]
fn a_resolver_gives_its_default_subset_then_its_failover() {
    for v in VERSIONS {
        let r = build(v, "web", Mode::Http).0.unwrap();
        assert_eq!(r.routes.len(), 1);
        assert_eq!(
            r.routes[0].splits[0].group,
            ["be_up_x.t.v2.web.dc1", "be_up_x.t.web-backup.dc1"],
            "{v}"
        );
        let v2 = r.targets.iter().find(|t| t.subset == "v2").unwrap();
        assert_eq!(v2.connect_timeout_ms, 3000);
        assert_eq!(v2.identity.service, "web");
        assert_eq!(v2.identity.datacenter, "dc1");
        assert_eq!(v2.identity.namespace, "default");
        let backup = r.targets.iter().find(|t| t.subset.is_empty()).unwrap();
        assert_eq!(backup.identity.service, "web-backup", "{v}");
        if v == "1.16.3" {
            assert_eq!(v2.balance, "hdr(x-user)");
            assert!(v2.hash_consistent);
        }
    }
}

#[test]
fn a_redirect_goes_to_the_other_service_and_carries_its_identity() {
    for v in VERSIONS {
        let r = build(v, "old", Mode::Http).0.unwrap();
        // web's own resolver adds its failover to the redirected-to subset.
        assert_eq!(
            r.routes[0].splits[0].group,
            ["be_up_x.t.v1.web.dc1", "be_up_x.t.web-backup.dc1"],
            "{v}"
        );
        let first = r.targets.iter().find(|t| t.subset == "v1").unwrap();
        assert_eq!(first.identity.service, "web");
        let r = build(v, "tcpold", Mode::Tcp).0.unwrap();
        assert_eq!(r.targets[0].identity.service, "tcpweb", "{v}");
    }
}

#[test]
fn datacenter_failover_is_in_order() {
    for v in VERSIONS {
        let r = build(v, "dcweb", Mode::Tcp).0.unwrap();
        assert_eq!(
            r.routes[0].splits[0].group,
            [
                "be_up_x.t.dcweb.dc1",
                "be_up_x.t.dcweb.dc2",
                "be_up_x.t.dcweb.dc3"
            ],
            "{v}"
        );
    }
}

#[test]
fn a_split_is_cumulative_over_ten_thousand() {
    for v in VERSIONS {
        let r = build(v, "split", Mode::Http).0.unwrap();
        let s = &r.routes[0].splits;
        assert_eq!(s.len(), 2);
        assert_eq!((s[0].upto, s[1].upto), (9000, SPLIT_SCALE), "{v}");
    }
}

#[test]
fn router_routes_keep_their_order_and_settings() {
    for v in VERSIONS {
        let (r, w) = build(v, "front", Mode::Http);
        let r = r.unwrap();
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(r.routes.len(), 6, "{v}");
        assert_eq!(
            r.routes[0].matches,
            [
                Match::PathPrefix("/api/".into()),
                Match::Methods(vec!["GET".into(), "PUT".into()])
            ]
        );
        assert_eq!(
            r.routes[0].prefix_rewrite,
            Some(("/api/".into(), "/".into()))
        );
        let v1 = r.targets.iter().find(|t| t.subset == "v1").unwrap();
        assert_eq!(
            v1.request_timeout_ms,
            Some(crate::value::Millis::constant(2000))
        );
        assert_eq!(
            v1.retries,
            Some(Retries {
                count: 3,
                on: vec!["conn-failure".into(), "503".into(), "502".into()]
            })
        );
        assert_eq!(r.routes[1].splits.len(), 2, "the split route");
        assert!(matches!(
            &r.routes[3].matches[1],
            Match::Header {
                value: ValueMatch::Present,
                ..
            }
        ));
        assert!(
            matches!(&r.routes[4].matches[0], Match::Query { value: ValueMatch::Exact(x), .. } if x == "yes")
        );
        // Consul's catch-all route to the service itself matches everything.
        assert!(r.routes[5].matches.is_empty());
        assert_eq!(r.routes[5].splits[0].group, ["be_up_x.t.front.dc1"]);
    }
}

#[test]
fn http_routes_on_a_tcp_listener_are_skipped_with_a_warning() {
    let (r, w) = build("1.16.3", "front", Mode::Tcp);
    assert_eq!(r.unwrap().routes.len(), 1);
    assert_eq!(w.len(), 5, "{w:?}");
}

#[test]
fn go_durations() {
    assert_eq!(duration_ms("5s"), Some(5000));
    assert_eq!(duration_ms("1m30s"), Some(90_000));
    assert_eq!(duration_ms("250ms"), Some(250));
    assert_eq!(duration_ms("1.5s"), Some(1500));
    assert_eq!(duration_ms(""), None);
    assert_eq!(duration_ms("5x"), None);
}

#[test]
fn retry_conditions_map_to_haproxys_and_grpc_statuses_are_named() {
    let d = RouteDestination {
        num_retries: 2,
        retry_on: ["reset", "gateway-error", "unavailable", "cancelled"]
            .map(String::from)
            .to_vec(),
        retry_on_status_codes: vec![503, 418],
        ..RouteDestination::default()
    };
    let mut warnings = Vec::new();
    let r = retries(&d, &mut warnings).unwrap();
    assert_eq!(r.count, 2);
    assert_eq!(
        r.on,
        [
            "conn-failure",
            "empty-response",
            "response-timeout",
            "502",
            "503",
            "504"
        ]
    );
    assert_eq!(warnings.len(), 3, "{warnings:?}");
    assert!(warnings[0].contains("\"unavailable\""), "{warnings:?}");
    assert!(warnings[2].contains("418"), "{warnings:?}");
}
