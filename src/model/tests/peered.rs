//! Peered upstreams and exports to peers, from Consul 1.16.3's recorded peering answers
//! (fixtures/peering/consul-1.16.3): `modern`'s upstream `server` of `peer1`, fed dc2's answers.

use super::*;
use crate::peering::{PeerInstance, PeerKey, Peering};

fn peering_fixture(name: &str) -> String {
    let path = format!(
        "{}/fixtures/peering/consul-1.16.3/{name}",
        env!("CARGO_MANIFEST_DIR")
    );
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

fn key() -> PeerKey {
    PeerKey {
        peer: "peer1".into(),
        service: "server".into(),
    }
}

fn modern() -> Snapshot {
    let mut s = snapshot("1.16.3", "modern-sidecar-proxy", "ca-leaf-client.json");
    if let Some(leaf) = s.leaf.as_mut() {
        leaf.service = "modern".into();
    }
    s
}

fn peering() -> Peering {
    serde_json::from_str(&peering_fixture("peering-dc2.json")).unwrap()
}

fn with_peer(mut s: Snapshot) -> Snapshot {
    let instances: Vec<PeerInstance> =
        serde_json::from_str(&peering_fixture("health-connect-server-peer-dc2.json")).unwrap();
    s.apply(crate::consul::Update::Peering("peer1".into(), peering()));
    s.apply(crate::consul::Update::PeerInstances(key(), instances));
    s
}

fn peered(d: &Desired) -> &UpstreamListener {
    d.upstreams
        .iter()
        .find(|u| u.peer.is_some())
        .expect("a peered upstream")
}

/// Read and running: one server, the forwarder, in plain TCP (the forwarder originates the
/// mesh TLS) and unchecked by HAProxy; the state names the forwarder's target.
#[test]
fn a_peered_upstreams_server_is_its_forwarder_in_plain_tcp() {
    let mut s = with_peer(modern());
    s.forwarding([(key(), "127.0.0.1:40123".parse().unwrap())].into());
    let d = build(&s, &settings(), None).unwrap();
    let u = peered(&d);
    assert_eq!(u.name, "up_svc_server_peer_peer1_127.0.0.1_9194");
    assert_eq!(u.bind_port, 9194);
    let servers: Vec<&Server> = u.instances().collect();
    assert_eq!(servers.len(), 1);
    assert_eq!(
        (servers[0].address.to_string(), servers[0].port),
        ("127.0.0.1".to_string(), 40123)
    );
    assert!(servers[0].in_service());
    let spec = crate::objects::upstream_server(&d, u, &u.slots[0]);
    assert!(spec.tls.is_none(), "{spec:?}");
    assert!(spec.check_inter_ms.is_none(), "{spec:?}");
    let line = spec.line();
    assert!(!line.contains("ssl") && !line.contains("check"), "{line}");
    let wanted = d.peered();
    let target = wanted[&key()].as_ref().expect("a target");
    assert_eq!(target.gateways.len(), 1);
    assert!(target
        .sni
        .ends_with(".external.11111111-2222-3333-4444-666666666666.consul"));
    assert!(
        d.identity_checks()
            .endpoints
            .iter()
            .all(|e| e.port != 40123),
        "the identity checker never probes the forwarder"
    );
    assert!(
        !d.warnings.iter().any(|w| w.contains("peer1")),
        "{:?}",
        d.warnings
    );
}

/// Not dialable yet (no forwarder, a peering not ACTIVE, no gateway listed): the listener is
/// there with no server (HAProxy closes what it accepts), with one warning saying why, and the
/// forwarder gets no target.
#[test]
fn a_peered_upstream_that_cannot_be_dialed_fails_closed() {
    let no_forwarder = build(&with_peer(modern()), &settings(), None).unwrap();
    assert_eq!(peered(&no_forwarder).instances().count(), 0);
    assert!(no_forwarder
        .warnings
        .iter()
        .any(|w| w.contains("forwarder is not running")));
    let mut pending = with_peer(modern());
    let mut p = peering();
    p.state = Some("PENDING".into());
    pending.apply(crate::consul::Update::Peering("peer1".into(), p));
    pending.forwarding([(key(), "127.0.0.1:40123".parse().unwrap())].into());
    let d = build(&pending, &settings(), None).unwrap();
    assert_eq!(peered(&d).instances().count(), 0);
    assert_eq!(d.peered()[&key()], None);
    let about: Vec<&String> = d.warnings.iter().filter(|w| w.contains("peer1")).collect();
    assert_eq!(about.len(), 1, "{about:?}");
    assert!(about[0].contains("PENDING"), "{about:?}");
    let mut gone = with_peer(modern());
    gone.apply(crate::consul::Update::PeerInstances(key(), Vec::new()));
    gone.forwarding([(key(), "127.0.0.1:40123".parse().unwrap())].into());
    let d = build(&gone, &settings(), None).unwrap();
    assert_eq!(peered(&d).instances().count(), 0);
    assert_eq!(d.peered()[&key()], None);
}

/// The exporting side: a service exported to an active peer trusts that peer's CA on its
/// public listener (HAProxy's `ca-file`), never for judging upstreams (the identity checker
/// keeps our own roots); a service exported to nobody, or to a peer not read, trusts ours only.
#[test]
fn a_service_exported_to_a_peer_trusts_its_ca_on_the_public_listener_only() {
    let peer_ca = peering().ca_pem();
    let base = with_peer(snapshot(ANY, "server-sidecar-proxy", "ca-leaf-server.json"));
    let plain = build(&base, &settings(), None).unwrap();
    assert_eq!(plain.tls.roots_pem, plain.tls.own_roots_pem);
    let mut s = base.clone();
    s.apply(crate::consul::Update::ExportedServices(
        serde_json::from_str(
            r#"[{"Name":"default","Services":[{"Name":"server","Consumers":[{"Peer":"peer1"},{"Peer":"unread"}]}]}]"#,
        )
        .unwrap(),
    ));
    let d = build(&s, &settings(), None).unwrap();
    assert!(d.tls.roots_pem.starts_with(&plain.tls.roots_pem));
    assert!(
        d.tls.roots_pem.ends_with(peer_ca.trim_start()),
        "the peer's CA is appended"
    );
    assert_eq!(d.tls.own_roots_pem, plain.tls.roots_pem);
    assert_eq!(d.identity_checks().roots_pem, plain.tls.roots_pem);
    // Another service's export changes nothing.
    let mut other = base;
    other.apply(crate::consul::Update::ExportedServices(
        serde_json::from_str(
            r#"[{"Name":"default","Services":[{"Name":"web","Consumers":[{"Peer":"peer1"}]}]}]"#,
        )
        .unwrap(),
    ));
    let d = build(&other, &settings(), None).unwrap();
    assert_eq!(d.tls.roots_pem, plain.tls.roots_pem);
}

/// The split, on the rendered files: the public bind's `ca-file` holds our roots and the
/// peer's CA, while every server towards a local upstream names a file of our roots alone, so
/// a certificate the peer's CA signed never passes HAProxy's check of a local upstream.
#[test]
fn only_the_public_bind_names_the_file_with_the_peers_ca() {
    let peer_ca = peering().ca_pem();
    let mut s = with_peer(snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json"));
    s.apply(crate::consul::Update::ExportedServices(
        serde_json::from_str(
            r#"[{"Name":"default","Services":[{"Name":"client","Consumers":[{"Peer":"peer1"}]}]}]"#,
        )
        .unwrap(),
    ));
    let d = build(&s, &settings(), None).unwrap();
    assert_ne!(
        d.tls.roots_pem, d.tls.own_roots_pem,
        "exported: the peer's CA is trusted"
    );
    let creds = crate::render::DataplaneCredentials {
        user: "hcc".into(),
        password: crate::config::Secret::new("pw"),
    };
    let files = crate::render::render(&d, &creds, &crate::render::Templates::builtin()).unwrap();
    let file = |p: &std::path::Path| {
        files
            .iter()
            .find(|f| f.path == p)
            .map(|f| f.contents.clone())
            .unwrap_or_else(|| panic!("{} is rendered", p.display()))
    };
    let (own, public) = (d.paths.roots.display(), d.paths.public_roots.display());
    assert_eq!(file(&d.paths.roots), d.tls.own_roots_pem);
    assert!(!file(&d.paths.roots).contains(peer_ca.trim()));
    assert!(file(&d.paths.public_roots).contains(peer_ca.trim()));
    let cfg = file(&d.paths.haproxy_cfg);
    let binds: Vec<&str> = cfg.lines().filter(|l| l.contains(" ca-file ")).collect();
    let public_binds = binds.iter().filter(|l| l.trim_start().starts_with("bind "));
    assert_eq!(public_binds.clone().count(), 1, "{cfg}");
    assert!(public_binds
        .clone()
        .all(|l| l.contains(&format!("ca-file {public} "))));
    let servers: Vec<&&str> = binds
        .iter()
        .filter(|l| l.trim_start().starts_with("server "))
        .collect();
    assert!(!servers.is_empty(), "the local upstream's servers: {cfg}");
    for line in servers {
        assert!(line.contains(&format!("ca-file {own} ")), "{line}");
    }
}

/// A grpc (or http2) peered upstream speaks HTTP/2 in clear text to its forwarder (`proto h2`),
/// which offers `h2` in ALPN to the peer; http offers `http/1.1`; tcp offers nothing.
#[test]
fn a_peered_upstreams_protocol_reaches_the_forwarders_alpn() {
    use crate::peering::Alpn;
    for (protocol, alpn, h2) in [
        (Some("grpc"), Alpn::H2, true),
        (Some("http2"), Alpn::H2, true),
        (Some("http"), Alpn::Http1, false),
        (None, Alpn::None, false),
    ] {
        let mut s = with_peer(modern());
        s.forwarding([(key(), "127.0.0.1:40123".parse().unwrap())].into());
        if let Some(p) = protocol {
            let proxy = s.registration.as_mut().unwrap().proxy.as_mut().unwrap();
            let up = proxy
                .upstreams
                .iter_mut()
                .find(|u| u.destination_peer == "peer1")
                .unwrap();
            up.config.insert("protocol".into(), serde_json::json!(p));
        }
        let d = build(&s, &settings(), None).unwrap();
        assert_eq!(
            d.peered()[&key()].as_ref().map(|t| t.alpn),
            Some(alpn),
            "{protocol:?}"
        );
        let u = peered(&d);
        let line = crate::objects::upstream_server(&d, u, &u.slots[0]).line();
        assert_eq!(line.contains(" proto h2"), h2, "{protocol:?}: {line}");
        assert!(!line.contains("ssl"), "{line}");
    }
}
