//! The model built from responses recorded from a real Consul 1.8.7 agent (fixtures/consul).

use super::fixtures::{settings, snapshot};
use super::*;

#[test]
fn client_sidecar_gets_one_upstream_with_both_server_instances() {
    let d = build(
        &snapshot("client-sidecar-proxy", "ca-leaf-client.json"),
        &settings(),
        None,
    )
    .unwrap();
    assert_eq!(d.service, "client");
    assert_eq!(d.public.bind_address, "0.0.0.0");
    assert_eq!(d.public.bind_port, 21002);
    assert_eq!(d.public.mode, Mode::Tcp, "Consul's default protocol is tcp");
    assert_eq!(
        (d.public.app_address.as_str(), d.public.app_port),
        ("127.0.0.1", 8080)
    );
    assert_eq!(d.upstreams.len(), 1);
    let up = &d.upstreams[0];
    assert_eq!(up.name, "up_svc_server_local_127.0.0.1_9191");
    assert_eq!(
        (up.bind_address.as_str(), up.bind_port),
        ("127.0.0.1", 9191)
    );
    let servers: Vec<(&str, u16, u32)> = up
        .instances()
        .map(|s| (s.id.as_str(), s.port, s.weight))
        .collect();
    assert_eq!(
        servers,
        [
            ("server-2-sidecar-proxy.node1", 21001, 1),
            ("server-sidecar-proxy.node1", 21000, 1)
        ]
    );
    assert_eq!(
        d.tls.trust_domain,
        "11111111-2222-3333-4444-555555555555.consul"
    );
    assert!(d.tls.leaf_pem.contains("BEGIN CERTIFICATE"));
    assert!(d.tls.leaf_pem.trim_end().ends_with("PRIVATE KEY-----"));
    assert!(
        !d.tls.leaf_pem.contains("\n\n"),
        "no blank line for the runtime API"
    );
}

#[test]
fn rich_sidecar_honours_every_config_key_and_keeps_upstreams_apart() {
    let d = build(
        &snapshot("rich-sidecar-proxy", "ca-leaf-rich.json"),
        &settings(),
        None,
    )
    .unwrap();
    assert_eq!(
        (d.public.bind_address.as_str(), d.public.bind_port),
        ("127.0.0.2", 21500)
    );
    assert_eq!(d.public.mode, Mode::Http);
    assert_eq!(
        (d.public.app_address.as_str(), d.public.app_port),
        ("127.0.0.3", 8282)
    );
    assert_eq!(d.public.connect_timeout_ms, 2000);
    let names: Vec<&str> = d.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "up_pq_pq-server_local_127.0.0.1_9193",
            "up_svc_server_dc2_127.0.0.1_9192",
            "up_svc_server_local_127.0.0.1_9191",
        ]
    );
    let local = d.upstream("up_svc_server_local_127.0.0.1_9191").unwrap();
    assert_eq!(local.mode, Mode::Http);
    assert_eq!(local.connect_timeout_ms, 1500);
    assert_eq!(local.instances().count(), 2);
    let dc2 = d.upstream("up_svc_server_dc2_127.0.0.1_9192").unwrap();
    assert_eq!(dc2.mode, Mode::Tcp);
    assert_eq!(dc2.connect_timeout_ms, 5000);
    assert_eq!(dc2.instances().count(), 0, "no instance answered in dc2");
    let pq = d.upstream("up_pq_pq-server_local_127.0.0.1_9193").unwrap();
    assert_eq!(pq.instances().count(), 2);
}

#[test]
fn nothing_is_built_until_registration_leaf_and_roots_are_known() {
    let full = snapshot("client-sidecar-proxy", "ca-leaf-client.json");
    for drop in ["registration", "leaf", "roots"] {
        let mut s = full.clone();
        match drop {
            "registration" => s.registration = None,
            "leaf" => s.leaf = None,
            _ => s.roots = None,
        }
        let err = build(&s, &settings(), None).unwrap_err().to_string();
        assert!(err.contains("waiting for"), "{drop}: {err}");
    }
}

#[test]
fn a_leaf_for_another_service_is_not_used() {
    let s = snapshot("client-sidecar-proxy", "ca-leaf-server.json");
    let err = build(&s, &settings(), None).unwrap_err().to_string();
    assert!(err.contains("leaf certificate of \"client\""), "{err}");
}

#[test]
fn bad_certificates_are_refused_with_a_reason() {
    let mut s = snapshot("client-sidecar-proxy", "ca-leaf-client.json");
    if let Some(leaf) = s.leaf.as_mut() {
        leaf.cert_pem =
            "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".into();
    }
    let err = build(&s, &settings(), None).unwrap_err().to_string();
    assert!(err.contains("does not parse"), "{err}");

    let mut s = snapshot("client-sidecar-proxy", "ca-leaf-client.json");
    if let Some(leaf) = s.leaf.as_mut() {
        leaf.private_key_pem.clear();
    }
    let err = build(&s, &settings(), None).unwrap_err().to_string();
    assert!(err.contains("private key"), "{err}");
}

#[test]
fn colliding_and_broken_upstreams_are_skipped_without_harming_the_rest() {
    let mut s = snapshot("client-sidecar-proxy", "ca-leaf-client.json");
    if let Some(p) = s.registration.as_mut().and_then(|r| r.proxy.as_mut()) {
        let mut dup = p.upstreams[0].clone();
        dup.datacenter = "dc9".into(); // same listener address and port
        p.upstreams.push(dup);
        let mut no_port = p.upstreams[0].clone();
        no_port.local_bind_port = 0;
        p.upstreams.push(no_port);
    }
    let d = build(&s, &settings(), None).unwrap();
    assert_eq!(d.upstreams.len(), 1);
    assert_eq!(d.upstreams[0].name, "up_svc_server_local_127.0.0.1_9191");
}

#[test]
fn weights_are_clamped_to_haproxy_range() {
    let mut s = snapshot("client-sidecar-proxy", "ca-leaf-client.json");
    for entries in s.endpoints.values_mut() {
        entries[0].service.weights = Some(crate::consul::api::Weights {
            passing: 1000,
            warning: 1,
        });
    }
    let d = build(&s, &settings(), None).unwrap();
    assert!(d.upstreams[0].instances().any(|s| s.weight == 256));
}

#[test]
fn sanitize_keeps_haproxy_names_legal() {
    assert_eq!(sanitize("web/v2 (blue)"), "web_v2__blue_");
    assert_eq!(sanitize("a.b-c_d:1"), "a.b-c_d:1");
}
