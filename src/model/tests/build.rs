//! Building a sidecar's state: upstreams, certificates, weights, unix sockets, exposed paths.

use super::*;

#[test]
fn client_sidecar_gets_one_upstream_with_both_server_instances() {
    for v in CONSUL_VERSIONS {
        let d = build(
            &snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json"),
            &settings(),
            None,
        )
        .unwrap();
        assert_eq!(d.service, "client");
        assert_eq!(d.sidecar().bind_address, "0.0.0.0");
        assert_eq!(d.sidecar().bind_port, 21002);
        assert_eq!(
            d.sidecar().mode,
            Mode::Tcp,
            "Consul's default protocol is tcp"
        );
        assert_eq!(
            (
                d.sidecar().app_address.to_string().as_str(),
                d.sidecar().app_port
            ),
            ("127.0.0.1", 8080)
        );
        assert_eq!(d.upstreams.len(), 1);
        let up = &d.upstreams[0];
        assert_eq!(up.name, "up_svc_server_local_127.0.0.1_9191");
        assert_eq!(
            (up.bind_address.to_string().as_str(), up.bind_port),
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
}

#[test]
fn rich_sidecar_honours_every_config_key_and_keeps_upstreams_apart() {
    for v in CONSUL_VERSIONS {
        let d = build(
            &snapshot(v, "rich-sidecar-proxy", "ca-leaf-rich.json"),
            &settings(),
            None,
        )
        .unwrap();
        assert_eq!(
            (
                d.sidecar().bind_address.to_string().as_str(),
                d.sidecar().bind_port
            ),
            ("127.0.0.2", 21500)
        );
        assert_eq!(d.sidecar().mode, Mode::Http);
        assert_eq!(
            (
                d.sidecar().app_address.to_string().as_str(),
                d.sidecar().app_port
            ),
            ("127.0.0.3", 8282)
        );
        assert_eq!(d.sidecar().connect_timeout_ms, 2000);
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
}

#[test]
fn nothing_is_built_until_registration_leaf_and_roots_are_known() {
    for v in CONSUL_VERSIONS {
        let full = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
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
}

#[test]
fn a_leaf_for_another_service_is_not_used() {
    for v in CONSUL_VERSIONS {
        let s = snapshot(v, "client-sidecar-proxy", "ca-leaf-server.json");
        let err = build(&s, &settings(), None).unwrap_err().to_string();
        assert!(err.contains("leaf certificate of \"client\""), "{err}");
    }
}

#[test]
fn bad_certificates_are_refused_with_a_reason() {
    for v in CONSUL_VERSIONS {
        let mut s = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
        if let Some(leaf) = s.leaf.as_mut() {
            leaf.cert_pem =
                "-----BEGIN CERTIFICATE-----\nbm90IGEgY2VydA==\n-----END CERTIFICATE-----\n".into();
        }
        let err = build(&s, &settings(), None).unwrap_err().to_string();
        assert!(err.contains("does not parse"), "{err}");

        let mut s = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
        if let Some(leaf) = s.leaf.as_mut() {
            leaf.private_key_pem.clear();
        }
        let err = build(&s, &settings(), None).unwrap_err().to_string();
        assert!(err.contains("private key"), "{err}");
    }
}

#[test]
fn colliding_and_broken_upstreams_are_skipped_without_harming_the_rest() {
    for v in CONSUL_VERSIONS {
        let mut s = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
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
}

#[test]
fn weights_are_clamped_to_haproxy_range() {
    for v in CONSUL_VERSIONS {
        let mut s = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
        for entries in s.endpoints.values_mut() {
            entries[0].service.weights = Some(crate::consul::api::Weights {
                passing: 1000,
                warning: 1,
            });
        }
        let d = build(&s, &settings(), None).unwrap();
        assert!(d.upstreams[0].instances().any(|s| s.weight == 256));
    }
}

/// Consul 1.16.3's `modern` sidecar: transparent mode, an upstream on a unix socket with a
/// mode, one in a cluster peer, and a plain one.
#[test]
fn current_consul_registrations_serve_what_they_can_and_name_the_rest() {
    let d = build(
        &snapshot("1.16.3", "modern-sidecar-proxy", "ca-leaf-client.json"),
        &settings(),
        None,
    );
    // The recorded leaf is client's; the model must wait for modern's.
    assert!(d.unwrap_err().to_string().contains("leaf certificate of"));
    let mut s = snapshot("1.16.3", "modern-sidecar-proxy", "ca-leaf-client.json");
    if let Some(leaf) = s.leaf.as_mut() {
        leaf.service = "modern".into();
    }
    let d = build(&s, &settings(), None).unwrap();
    let names: Vec<&str> = d.upstreams.iter().map(|u| u.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "up_svc_client_local_127.0.0.1_9195",
            "up_svc_server_local_unix__tmp_hcc-modern-server.sock",
            "up_svc_server_peer_peer1_127.0.0.1_9194",
        ]
    );
    let unix = &d.upstreams[1];
    assert_eq!(
        unix.socket,
        Some(UnixSocket {
            path: "/tmp/hcc-modern-server.sock".into(),
            mode: Some("0660".into()),
        })
    );
    assert_eq!(unix.instances().count(), 2, "fed by server's instances");
    assert_eq!(d.warnings.len(), 1, "{:?}", d.warnings);
    // The peered upstream listens, and refuses until its peering is read.
    assert!(
        d.warnings[0].contains(
            "service server of peer peer1: the peering or its instances are not read yet"
        ),
        "{}",
        d.warnings[0]
    );
    assert_eq!(d.upstreams[2].instances().count(), 0);
    // Transparent mode: an outbound listener, with no route until the intention upstreams
    // are read, and refusing what it cannot route until the mesh entry is.
    let o = d.transparent.as_ref().unwrap();
    assert_eq!((o.port, o.mesh_only, o.routes.len()), (15001, true, 0));
    let watched: Vec<String> = crate::consul::destinations(s.registration.as_ref().unwrap(), &[])
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(
        watched.len(),
        2,
        "the peer upstream is not watched as ours: {watched:?}"
    );
}

#[test]
fn unix_socket_upstreams_are_checked() {
    let mut s = snapshot("1.16.3", "client-sidecar-proxy", "ca-leaf-client.json");
    up(&mut s).local_bind_port = 0;
    let d = build(&s, &settings(), None).unwrap();
    assert!(d.upstreams.is_empty());
    assert!(d.warnings[0].contains("neither LocalBindPort nor LocalBindSocketPath"));
    for (path, mode, want) in [
        ("relative.sock", "", "not an absolute path"),
        ("/tmp/a b.sock", "", "white space"),
        ("/tmp/x.sock", "0999", "not an octal mode"),
        ("/tmp/x.sock", "rw", "not an octal mode"),
    ] {
        up(&mut s).local_bind_socket_path = path.into();
        up(&mut s).local_bind_socket_mode = mode.into();
        let d = build(&s, &settings(), None).unwrap();
        assert!(d.upstreams.is_empty(), "{path} {mode}");
        assert!(
            d.warnings[0].contains(want),
            "{path} {mode}: {:?}",
            d.warnings
        );
    }
    up(&mut s).local_bind_socket_path = format!("/{}", "d".repeat(100));
    up(&mut s).local_bind_socket_mode = String::new();
    let d = build(&s, &settings(), None).unwrap();
    assert!(
        d.warnings[0].contains("more than the 97"),
        "{:?}",
        d.warnings
    );
    up(&mut s).local_bind_socket_path = "/tmp/ok.sock".into();
    let d = build(&s, &settings(), None).unwrap();
    assert_eq!(d.upstreams[0].socket.as_ref().unwrap().mode, None);
    assert!(d.warnings.is_empty());
}

#[test]
fn explicit_expose_paths_become_plain_listeners_on_the_public_address() {
    // Both versions register `Proxy.Expose.Paths` as given (ParsedFromCheck false).
    for v in CONSUL_VERSIONS {
        let d = build(
            &snapshot(v, "paths-sidecar-proxy", "ca-leaf-paths.json"),
            &settings(),
            None,
        )
        .unwrap();
        let got: Vec<(&str, &str, &str, u16, String, u16, bool)> = d
            .exposed
            .iter()
            .map(|e| {
                (
                    e.name.as_str(),
                    e.backend.as_str(),
                    e.path.as_str(),
                    e.bind_port,
                    e.app_address.to_string(),
                    e.app_port,
                    e.http2,
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                (
                    "exp_21600",
                    "be_exp_21600",
                    "/metrics",
                    21600,
                    "127.0.0.1".to_string(),
                    8585,
                    false
                ),
                (
                    "exp_21601",
                    "be_exp_21601",
                    "/grpc.health.v1.Health/Check",
                    21601,
                    "127.0.0.1".to_string(),
                    8586,
                    true
                ),
            ],
            "{v}"
        );
        assert!(d
            .exposed
            .iter()
            .all(|e| e.bind_address == d.sidecar().bind_address && e.check.is_none()));
        assert!(d.warnings.is_empty(), "{v}: {:?}", d.warnings);
    }
}

#[test]
fn exposed_checks_are_read_from_the_agents_checks_on_both_versions() {
    // Neither version lists the checks' paths in the registration (`{"Checks": true}` only);
    // 1.16.3 tells each check's listener port (`ExposedPort`), 1.8.7 only in the check's
    // output, which also carries the HTTP check's path on both.
    for v in CONSUL_VERSIONS {
        let s = snapshot(v, "checked-sidecar-proxy", "ca-leaf-checked.json");
        let expose = &s
            .registration
            .as_ref()
            .unwrap()
            .proxy
            .as_ref()
            .unwrap()
            .expose;
        assert!(expose.checks && expose.paths.is_empty(), "{v}: {expose:?}");
        let checks = s.checks.as_ref().unwrap();
        assert_eq!(checks.len(), 2, "{v}");
        let exposed_ports: Vec<u16> = checks.iter().map(|c| c.exposed_port).collect();
        match v {
            "1.8.7" => assert_eq!(exposed_ports, [0, 0]),
            _ => assert_eq!(exposed_ports, [21500, 21501]),
        }
        let d = build(&s, &settings(), None).unwrap();
        let got: Vec<(&str, u16, u16, bool, Option<&str>)> = d
            .exposed
            .iter()
            .map(|e| {
                (
                    e.path.as_str(),
                    e.bind_port,
                    e.app_port,
                    e.http2,
                    e.check.as_deref(),
                )
            })
            .collect();
        assert_eq!(
            got,
            [
                ("/health", 21500, 8484, false, Some("service:checked:1")),
                (
                    "/grpc.health.v1.Health/Check",
                    21501,
                    8484,
                    true,
                    Some("service:checked:2")
                ),
            ],
            "{v}"
        );
        // Check listeners admit this host only; the agent's address joins when known.
        for e in &d.exposed {
            assert_eq!(e.sources, ["127.0.0.0/8", "::1"], "{v}: {e:?}");
        }
        let mut s = s.clone();
        s.agent_address = Some("10.1.2.3".into());
        let d = build(&s, &settings(), None).unwrap();
        assert!(
            d.exposed
                .iter()
                .all(|e| e.sources == ["127.0.0.0/8", "::1", "10.1.2.3"]),
            "{v}: {:?}",
            d.exposed
        );
    }
}

#[test]
fn explicit_exposed_paths_admit_any_source() {
    for v in CONSUL_VERSIONS {
        let mut s = snapshot(v, "paths-sidecar-proxy", "ca-leaf-paths.json");
        s.agent_address = Some("10.1.2.3".into());
        let d = build(&s, &settings(), None).unwrap();
        assert!(!d.exposed.is_empty());
        assert!(d.exposed.iter().all(|e| e.sources.is_empty()), "{v}");
    }
}

#[test]
fn an_exposed_port_taken_by_another_listener_is_skipped_with_a_warning() {
    let mut s = snapshot(fixtures::ANY, "paths-sidecar-proxy", "ca-leaf-paths.json");
    let proxy = s.registration.as_mut().unwrap().proxy.as_mut().unwrap();
    proxy.expose.paths[1].listener_port = proxy.expose.paths[0].listener_port;
    let mut bad = proxy.expose.paths[0].clone();
    bad.path = "/no space".into();
    bad.listener_port = 21700;
    proxy.expose.paths.push(bad);
    let d = build(&s, &settings(), None).unwrap();
    assert_eq!(d.exposed.len(), 1, "{:?}", d.exposed);
    assert_eq!(d.exposed[0].path, "/metrics");
    assert_eq!(d.warnings.len(), 2, "{:?}", d.warnings);
    assert!(d.warnings.iter().any(|w| w.contains("already has")));
    assert!(d.warnings.iter().any(|w| w.contains("\"/no space\"")));
}
