//! The model built from responses recorded from real Consul agents (fixtures/consul/<version>),
//! each test on every supported version.

use super::fixtures::{first_upstream as up, settings, snapshot, with_chain, ANY, CONSUL_VERSIONS};
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
    assert!(
        d.warnings[0].contains("cluster peer \"peer1\""),
        "{}",
        d.warnings[0]
    );
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
        "the peer upstream is not watched: {watched:?}"
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

fn checked() -> Settings {
    Settings {
        identity_check: true,
        ..settings()
    }
}

fn client(v: &str) -> Snapshot {
    snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json")
}

/// The verdict `verdict` for every endpoint `d` wants checked.
fn admit_all(s: &mut Snapshot, d: &Desired, verdict: Verdict) {
    s.admit(
        d.identity_checks()
            .endpoints
            .into_iter()
            .map(|e| (e, verdict.clone()))
            .collect(),
    );
}

#[test]
fn unproven_and_refused_instances_keep_their_slots_in_maintenance() {
    for v in CONSUL_VERSIONS {
        let mut s = client(v);
        let d = build(&s, &checked(), None).unwrap();
        let wanted = d.identity_checks();
        assert_eq!(wanted.endpoints.len(), 2, "{v}");
        for e in &wanted.endpoints {
            assert_eq!(e.identity.path(), "/ns/default/dc/dc1/svc/server", "{v}");
        }
        let up = &d.upstreams[0];
        assert_eq!(up.instances().count(), 2);
        assert!(up.instances().all(|i| i.admission == Admission::Unproven));
        assert_eq!(d.live_instances()[&up.name], 0, "nothing in service yet");
        let servers = |d: &Desired| -> Vec<(u16, bool)> {
            let up = &d.upstreams[0];
            up.slots
                .iter()
                .filter(|s| s.instance.is_some())
                .map(|s| {
                    let spec = crate::objects::upstream_server(d, up, s);
                    (spec.port, spec.maintenance)
                })
                .collect()
        };
        assert!(servers(&d).iter().all(|(_, m)| *m), "{v}");

        // One proven, one refused: only the proven one serves, and nothing moved.
        let (a, b) = {
            let mut it = wanted.endpoints.iter().cloned();
            (it.next().unwrap(), it.next().unwrap())
        };
        s.admit(
            [
                (a.clone(), Verdict::Proven { common_name: None }),
                (
                    b.clone(),
                    Verdict::Refused {
                        presented: "spiffe://x/ns/default/dc/dc1/svc/rogue".into(),
                    },
                ),
            ]
            .into_iter()
            .collect(),
        );
        let d2 = build(&s, &checked(), Some(&d)).unwrap();
        assert_eq!(d2.upstreams[0].slots.len(), d.upstreams[0].slots.len());
        for ((p1, _), (p2, m2)) in servers(&d).iter().zip(servers(&d2)) {
            assert_eq!(*p1, p2, "instances keep their slots");
            assert_eq!(m2, p2 != a.port, "{v}: only {} serves", a.port);
        }
        assert_eq!(d2.live_instances()[&d2.upstreams[0].name], 1);
        // A diff of it is live slot changes only: no reload.
        let p = crate::haproxy::diff::plan(&d, &d2);
        assert!(p.ops.is_empty() && p.live.len() == 1, "{p:#?}");

        // With the check off, nothing waits for a verdict.
        let off = build(&client(v), &settings(), None).unwrap();
        assert!(off.identity_checks().endpoints.is_empty());
        assert_eq!(off.live_instances()[&off.upstreams[0].name], 2);
    }
}

#[test]
fn the_legacy_cn_is_pinned_only_while_every_proven_instance_carries_it() {
    let cn = "server.svc.default.11111111.consul";
    for v in CONSUL_VERSIONS {
        let mut s = client(v);
        let d0 = build(&s, &checked(), None).unwrap();
        assert_eq!(
            d0.upstreams[0].verifyhost, None,
            "nothing proven, nothing pinned"
        );

        admit_all(
            &mut s,
            &d0,
            Verdict::Proven {
                common_name: Some(cn.into()),
            },
        );
        let d1 = build(&s, &checked(), Some(&d0)).unwrap();
        assert_eq!(d1.upstreams[0].verifyhost.as_deref(), Some(cn), "{v}");
        let be = crate::objects::upstream_backend(&d1, &d1.upstreams[0]);
        let lines = be.lines(&[]);
        assert!(
            lines.contains(&format!("default-server verifyhost {cn}")),
            "{lines:?}"
        );
        let p = crate::haproxy::diff::plan(&d0, &d1);
        assert!(
            p.full_render_reason()
                .is_some_and(|r| r.contains("verifyhost")),
            "{p:#?}"
        );
        // A new slot added at runtime gets the name itself.
        let spec =
            crate::objects::upstream_server(&d1, &d1.upstreams[0], &d1.upstreams[0].slots[0]);
        assert_eq!(spec.verifyhost.as_deref(), Some(cn));

        // Everything unproven again (say, roots changed and no check completed): kept.
        s.admit(Default::default());
        let d2 = build(&s, &checked(), Some(&d1)).unwrap();
        assert_eq!(d2.upstreams[0].verifyhost.as_deref(), Some(cn));

        // One proven instance without the CN (a current leaf) unpins.
        let mut it = d0.identity_checks().endpoints.into_iter();
        let (a, b) = (it.next().unwrap(), it.next().unwrap());
        s.admit(
            [
                (
                    a,
                    Verdict::Proven {
                        common_name: Some(cn.into()),
                    },
                ),
                (b, Verdict::Proven { common_name: None }),
            ]
            .into_iter()
            .collect(),
        );
        let d3 = build(&s, &checked(), Some(&d2)).unwrap();
        assert_eq!(d3.upstreams[0].verifyhost, None, "{v}");

        // A CN other than the destination's legacy name is never pinned.
        let mut t = client(v);
        admit_all(
            &mut t,
            &d0,
            Verdict::Proven {
                common_name: Some("web.svc.default.11111111.consul".into()),
            },
        );
        assert_eq!(
            build(&t, &checked(), None).unwrap().upstreams[0].verifyhost,
            None
        );
    }
}

#[test]
fn a_prepared_query_expects_each_instance_to_be_the_service_it_is_listed_as() {
    for v in CONSUL_VERSIONS {
        let d = build(
            &snapshot(v, "rich-sidecar-proxy", "ca-leaf-rich.json"),
            &checked(),
            None,
        )
        .unwrap();
        let pq = d
            .upstreams
            .iter()
            .find(|u| u.name.starts_with("up_pq_"))
            .expect("the rich sidecar has a prepared query upstream");
        assert_eq!(pq.identity, None, "a query has no one identity");
        assert!(pq.instances().count() > 0);
        for i in pq.instances() {
            assert_eq!(i.identity.path(), "/ns/default/dc/dc1/svc/server", "{v}");
        }
        let svc = d
            .upstreams
            .iter()
            .find(|u| u.name.starts_with("up_svc_server_local"))
            .unwrap();
        assert_eq!(
            svc.identity.as_ref().map(Identity::path).as_deref(),
            Some("/ns/default/dc/dc1/svc/server")
        );
    }
}

#[test]
fn a_chain_that_is_the_destination_itself_gives_exactly_the_config_without_chains() {
    for v in CONSUL_VERSIONS {
        let plain = build(
            &snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json"),
            &settings(),
            None,
        )
        .unwrap();
        let chained = build(&with_chain(v, "plain", true), &settings(), None).unwrap();
        assert_eq!(chained, plain, "{v}");
        assert!(chained.upstreams[0].routing.is_none());
    }
}

#[test]
fn a_chain_that_cannot_be_followed_keeps_the_routing_that_served() {
    for v in CONSUL_VERSIONS {
        let s = with_chain(v, "split", false);
        let good = build(&s, &settings(), None).unwrap();
        assert!(good.upstreams[0].routing.is_some());
        let mut broken = s.clone();
        let key =
            crate::consul::destinations(broken.registration.as_ref().unwrap(), &[])[0].clone();
        let chain = broken.chains.get_mut(&key).unwrap();
        // A splitter leading to a node the chain does not define.
        for n in chain.nodes.values_mut() {
            for split in &mut n.splits {
                split.next_node = "resolver:nowhere".into();
            }
        }
        let d = build(&broken, &settings(), Some(&good)).unwrap();
        assert_eq!(d.upstreams[0].routing, good.upstreams[0].routing, "{v}");
        assert!(
            d.warnings
                .iter()
                .any(|w| w.contains("cannot be followed") && w.contains("resolver:nowhere")),
            "{:?}",
            d.warnings
        );
        // Without a routing before it, the destination itself serves.
        let d = build(&broken, &settings(), None).unwrap();
        assert!(d.upstreams[0].routing.is_none());
    }
}

#[test]
fn chain_targets_are_admitted_by_their_own_services_identity() {
    for v in CONSUL_VERSIONS {
        let mut s = with_chain(v, "split", false);
        let dest = crate::consul::destinations(s.registration.as_ref().unwrap(), &[])[0].clone();
        let entries = s.endpoints.get(&dest).cloned().unwrap_or_default();
        assert!(!entries.is_empty(), "{v}: the fixture has instances");
        let chain = s.chains.get(&dest).unwrap().clone();
        for t in chain.targets.values() {
            s.targets
                .insert(crate::consul::chain::TargetKey::of(t), entries.clone());
        }
        let d = build(&s, &checked(), None).unwrap();
        let targets = &d.upstreams[0].routing.as_ref().unwrap().targets;
        assert!(!targets.is_empty(), "{v}");
        for t in targets {
            let want = chain
                .targets
                .values()
                .find(|c| c.id == t.id)
                .map(|c| c.service.clone())
                .unwrap();
            assert_eq!(t.identity.service, want, "{v}: {}", t.backend);
            for slot in t.slots.iter().filter(|s| s.instance.is_some()) {
                let i = slot.instance.as_ref().unwrap();
                assert_eq!(i.identity, t.identity, "{v}");
                assert_eq!(i.admission, Admission::Unproven, "{v}");
                assert!(
                    crate::objects::target_server(&d, &d.upstreams[0], t, slot).maintenance,
                    "{v}"
                );
            }
        }
        // Every target's endpoints are checked, each against its target's identity.
        let wanted = d.identity_checks();
        for t in targets {
            let n = t.slots.iter().filter(|s| s.instance.is_some()).count();
            let checked = wanted
                .endpoints
                .iter()
                .filter(|e| e.identity == t.identity)
                .count();
            assert!(checked >= n && n > 0, "{v}: {}", t.backend);
        }
        // Proven: in service, with no slot moved.
        admit_all(&mut s, &d, Verdict::Proven { common_name: None });
        let d2 = build(&s, &checked(), Some(&d)).unwrap();
        for t in &d2.upstreams[0].routing.as_ref().unwrap().targets {
            for slot in t.slots.iter().filter(|s| s.instance.is_some()) {
                assert!(
                    !crate::objects::target_server(&d2, &d2.upstreams[0], t, slot).maintenance,
                    "{v}"
                );
            }
        }
        assert!(d2.live_instances()[&d2.upstreams[0].name] > 0);
    }
}

/// `protocol` http2 or grpc: HTTP mode on both sides, h2c towards the app, `alpn h2` towards
/// the destination's sidecars, h2 offered on the public listener; http keeps HTTP/1.1 towards
/// the app and its upstreams; tcp stays tcp. HAProxy loads the result (`render`'s tests check
/// every rendered file with `haproxy -c`; this one checks the lines).
#[test]
fn grpc_and_http2_are_http_with_h2_on_each_hop() {
    for (protocol, mode, h2) in [
        ("grpc", Mode::Http, true),
        ("http2", Mode::Http, true),
        ("http", Mode::Http, false),
        ("tcp", Mode::Tcp, false),
        ("redis", Mode::Tcp, false),
    ] {
        let mut s = snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json");
        super::fixtures::proxy_config(&mut s).insert("protocol".into(), protocol.into());
        up(&mut s).config.insert("protocol".into(), protocol.into());
        let d = build(&s, &settings(), None).unwrap();
        assert_eq!((d.sidecar().mode, d.sidecar().h2), (mode, h2), "{protocol}");
        let u = &d.upstreams[0];
        assert_eq!((u.mode, u.h2), (mode, h2), "{protocol}");
        let app = crate::objects::local_server(d.sidecar()).line();
        assert_eq!(app.ends_with(" proto h2"), h2, "{protocol}: {app}");
        let server = crate::objects::upstream_server(&d, u, &u.slots[0]).line();
        assert_eq!(server.contains(" alpn h2"), h2, "{protocol}: {server}");
        let bind = crate::objects::public_bind(&d, d.sidecar()).line();
        assert_eq!(
            bind.contains(" alpn h2,http/1.1"),
            mode == Mode::Http,
            "{protocol}: {bind}"
        );
    }
}

/// The Go original's own keys and Consul's local timeouts and connection cap, on both recorded
/// versions: each reaches the object it maps to, Consul's key winning where both say the same.
#[test]
fn the_originals_keys_and_consuls_local_settings_reach_their_objects() {
    use crate::objects::{
        local_backend, local_server, public_bind, public_frontend, upstream_backend,
        upstream_frontend,
    };
    for v in CONSUL_VERSIONS {
        for intentions in [false, true] {
            let s = super::fixtures::rich_with_settings(v);
            let d = build(
                &s,
                &super::fixtures::settings_in(Path::new("/run/hcc-test"), intentions),
                None,
            )
            .unwrap();
            let p = d.sidecar();
            assert_eq!(p.mode, Mode::Http);
            assert_eq!(p.connect_timeout_ms, 2000, "local_connect_timeout_ms wins");
            assert_eq!(
                p.server_timeout_ms,
                Some(Millis::constant(700)),
                "request wins"
            );
            assert_eq!(
                p.client_timeout_ms,
                Some(Millis::constant(9000)),
                "idle wins"
            );
            assert_eq!(p.max_connections.map(Limit::get), Some(64));
            assert!(p.forwardfor);
            assert_eq!(
                p.app_header,
                Some(AppHeader {
                    name: "X-App".into(),
                    from_agent: intentions
                })
            );
            let fe = public_frontend(&d, d.sidecar())
                .lines(&public_bind(&d, d.sidecar()))
                .join("\n");
            for want in [
                "maxconn 64",
                "timeout client 9000",
                "http-request del-header X-App",
            ] {
                assert!(fe.contains(want), "{want} missing:\n{fe}");
            }
            let set = "http-request set-header X-App %[var(sess.hcc.app)] if { var(sess.hcc.app) -m found }";
            assert_eq!(fe.contains(set), intentions, "{fe}");
            let be = local_backend(p).lines(&[local_server(p)]).join("\n");
            for want in [
                "timeout connect 2000",
                "timeout server 700",
                "option forwardfor",
            ] {
                assert!(be.contains(want), "{want} missing:\n{be}");
            }
            let local = d.upstream("up_svc_server_local_127.0.0.1_9191").unwrap();
            assert_eq!(local.connect_timeout_ms, 1500, "connect_timeout_ms wins");
            assert_eq!(local.read_timeout_ms, Some(Millis::constant(7000)));
            let dc2 = d.upstream("up_svc_server_dc2_127.0.0.1_9192").unwrap();
            assert_eq!(
                dc2.connect_timeout_ms, 4000,
                "the original's connect_timeout"
            );
            let fe = upstream_frontend(&d, dc2).lines(&crate::objects::upstream_bind(dc2));
            assert!(fe.contains(&"timeout client 7000".to_string()), "{fe:?}");
            let be = upstream_backend(&d, dc2).lines(&[]);
            assert!(be.contains(&"timeout server 7000".to_string()), "{be:?}");
            assert!(be.contains(&"timeout connect 4000".to_string()), "{be:?}");
            // What the sidecar reads is not warned about; only appname_header without the
            // agent that names the caller.
            let expected = usize::from(!intentions);
            assert_eq!(d.warnings.len(), expected, "{:#?}", d.warnings);
            // poll_interval reaches the prepared query's watch.
            let polls = crate::consul::poll_intervals(s.registration.as_ref().unwrap());
            assert_eq!(polls.len(), 1);
            assert_eq!(polls.values().next().map(|m| m.get()), Some(2000));
        }
    }
}

/// In tcp mode the idle timeout is both sides' and the http-only keys are named and ignored.
#[test]
fn a_tcp_public_listener_takes_the_idle_timeout_and_names_the_http_only_keys() {
    let mut s = super::fixtures::rich_with_settings(ANY);
    super::fixtures::proxy_config(&mut s).insert("protocol".into(), "tcp".into());
    let d = build(&s, &settings(), None).unwrap();
    let p = d.sidecar();
    assert_eq!(p.mode, Mode::Tcp);
    assert_eq!(p.server_timeout_ms, Some(Millis::constant(9000)));
    assert_eq!(p.client_timeout_ms, Some(Millis::constant(9000)));
    assert!(!p.forwardfor && p.app_header.is_none());
    for key in [
        "local_request_timeout_ms",
        "enable_forwardfor",
        "appname_header",
    ] {
        let n = d.warnings.iter().filter(|w| w.contains(key)).count();
        assert_eq!(n, 1, "{key}: {:#?}", d.warnings);
    }
    // read_timeout alone, as the Go original has it: both sides of the public listener.
    let c = super::fixtures::proxy_config(&mut s);
    c.remove("local_idle_timeout_ms");
    let d = build(&s, &settings(), None).unwrap();
    assert_eq!(
        d.sidecar().server_timeout_ms,
        Some(Millis::constant(20_000))
    );
    assert_eq!(
        d.sidecar().client_timeout_ms,
        Some(Millis::constant(20_000))
    );
}

/// Nothing set: no line of its own, so the defaults section's timeouts apply as before.
#[test]
fn without_the_keys_the_listeners_are_as_before() {
    let d = crate::model::fixtures::client_desired();
    let p = d.sidecar();
    assert_eq!(
        (p.client_timeout_ms, p.server_timeout_ms, p.max_connections),
        (None, None, None)
    );
    assert!(!p.forwardfor && p.app_header.is_none());
    assert!(d.upstreams.iter().all(|u| u.read_timeout_ms.is_none()));
    assert!(d.warnings.is_empty(), "{:?}", d.warnings);
}

/// Every value is untrusted: out of HAProxy's range, of the wrong type or holding what could
/// break a line is dropped with one warning naming key and value, and never reaches a line.
#[test]
fn out_of_range_and_malformed_settings_are_refused_one_warning_each() {
    for v in CONSUL_VERSIONS {
        let mut s = super::fixtures::rich_with_settings(v);
        let c = super::fixtures::proxy_config(&mut s);
        for (k, val) in [
            (
                "local_request_timeout_ms",
                serde_json::json!(2_147_483_648u64),
            ),
            ("local_idle_timeout_ms", serde_json::json!("soon")),
            ("max_inbound_connections", serde_json::json!(0)),
            ("read_timeout", serde_json::json!("0s")),
            ("connect_timeout", serde_json::json!(5)),
            ("appname_header", serde_json::json!("X-App\r\nX-Evil: 1")),
            ("enable_forwardfor", serde_json::json!("yes")),
        ] {
            c.insert(k.into(), val);
        }
        let up = super::fixtures::first_upstream(&mut s);
        up.config
            .insert("read_timeout".into(), serde_json::json!("720h"));
        let proxy = s.registration.as_mut().unwrap().proxy.as_mut().unwrap();
        let pq = proxy
            .upstreams
            .iter_mut()
            .find(|u| u.destination_type == "prepared_query")
            .unwrap();
        pq.config
            .insert("poll_interval".into(), serde_json::json!("1ms"));
        let d = build(&s, &settings(), None).unwrap();
        for key in [
            "local_request_timeout_ms",
            "local_idle_timeout_ms",
            "max_inbound_connections",
            "read_timeout \"0s\"",
            "connect_timeout \"5\"",
            "appname_header",
            "enable_forwardfor",
            "read_timeout \"720h\"",
            "poll_interval",
        ] {
            let n = d.warnings.iter().filter(|w| w.contains(key)).count();
            assert_eq!(n, 1, "{key}: {:#?}", d.warnings);
        }
        assert!(
            d.warnings.iter().all(|w| !w.contains(['\r', '\n'])),
            "{:#?}",
            d.warnings
        );
        let p = d.sidecar();
        assert_eq!(
            (p.server_timeout_ms, p.client_timeout_ms, p.max_connections),
            (None, None, None),
            "refused values fall back to the defaults section's"
        );
        assert!(!p.forwardfor && p.app_header.is_none());
        assert_eq!(p.connect_timeout_ms, 2000);
        let up = d.upstream("up_svc_server_local_127.0.0.1_9191").unwrap();
        assert_eq!(up.read_timeout_ms, None);
        let polls = crate::consul::poll_intervals(s.registration.as_ref().unwrap());
        assert!(
            polls.is_empty(),
            "the watcher polls at its default: {polls:?}"
        );
        let cfg = crate::objects::sections(&d)
            .iter()
            .flat_map(|s| s.lines.clone())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            !cfg.contains("X-Evil") && !cfg.contains("2147483648"),
            "{cfg}"
        );
        // Consul documents 0 as "no request timeout": not a refusal.
        let c = super::fixtures::proxy_config(&mut s);
        c.insert("local_request_timeout_ms".into(), serde_json::json!(0));
        let d = build(&s, &settings(), None).unwrap();
        assert!(!d
            .warnings
            .iter()
            .any(|w| w.contains("local_request_timeout_ms")));
    }
}

/// A key the sidecar does not read is named once per distinct key (the supervisor logs a
/// warning line when it first appears): Envoy's own keys as Envoy's, Consul's unserved keys
/// with why, the rest as unknown; a flood of keys gives a bounded number of lines.
#[test]
fn unknown_keys_are_named_once_each_and_envoys_as_envoys() {
    let mut s = snapshot(ANY, "rich-sidecar-proxy", "ca-leaf-rich.json");
    let c = super::fixtures::proxy_config(&mut s);
    c.insert("envoy_prometheus_bind_addr".into(), "0.0.0.0:9102".into());
    c.insert("handshake_timeout_ms".into(), 1000.into());
    c.insert("bogus\nkey".into(), 1.into());
    super::fixtures::first_upstream(&mut s).config.insert(
        "passive_health_check".into(),
        serde_json::json!({"max_failures": 1}),
    );
    let d = build(&s, &settings(), None).unwrap();
    let w = &d.warnings;
    assert_eq!(w.len(), 4, "{w:#?}");
    assert!(w
        .iter()
        .any(|l| l.contains("\"envoy_prometheus_bind_addr\" is Envoy's")));
    assert!(w
        .iter()
        .any(|l| l.contains("\"handshake_timeout_ms\" not supported")));
    assert!(w
        .iter()
        .any(|l| l.contains("\"bogus?key\" is not a key this sidecar reads")));
    assert!(w.iter().any(|l| l
        .contains("upstream Config key \"passive_health_check\" is not honoured")
        && l.contains("upstream service server")));
    // Rebuilt from the same snapshot: the same lines, so nothing new to log.
    let again = build(&s, &settings(), Some(&d)).unwrap();
    assert_eq!(again.warnings, d.warnings);
    // Thousands of keys: at most 16 named, then one line for the rest.
    let c = super::fixtures::proxy_config(&mut s);
    for i in 0..5000 {
        c.insert(format!("junk{i}"), 1.into());
    }
    let d = build(&s, &settings(), None).unwrap();
    assert!(d.warnings.len() <= 16 + 1 + 1, "{}", d.warnings.len());
    assert!(
        d.warnings.iter().any(|l| l.contains("more keys")),
        "{:#?}",
        d.warnings
    );
}

/// The README's table lists every key the sidecar reads, per level.
#[test]
fn the_readme_lists_every_key_the_sidecar_reads() {
    let readme =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/README.md")).unwrap();
    for ((keys, _), level) in [
        (keys::PROXY, "`Proxy.Config`"),
        (keys::UPSTREAM, "upstream `Config`"),
    ] {
        for k in keys {
            let row = format!("| {level} | `{k}` |");
            assert!(readme.contains(&row), "README.md has no row {row}");
        }
    }
}

/// An upstream's read_timeout reaches each chain target's backend that has no request timeout
/// of its own (the route's `RequestTimeout` wins there).
#[test]
fn an_upstreams_read_timeout_reaches_its_chain_targets() {
    for v in CONSUL_VERSIONS {
        let mut s = with_chain(v, "split", false);
        up(&mut s)
            .config
            .insert("read_timeout".into(), serde_json::json!("7s"));
        let d = build(&s, &settings(), None).unwrap();
        let u = &d.upstreams[0];
        let targets = &u.routing.as_ref().expect("the split chain routes").targets;
        assert!(!targets.is_empty());
        for t in targets {
            let lines = crate::objects::target_backend(u, t).lines(&[]);
            let want = format!(
                "timeout server {}",
                t.request_timeout_ms.map_or(7000, Millis::get)
            );
            assert!(lines.contains(&want), "{v} {}: {lines:?}", t.backend);
        }
    }
}

/// The checks of one backend stay under `CHECKS_PER_SECOND` at any size, at the shortest
/// interval up to 100 slots.
#[test]
fn check_intervals_bound_the_checks_per_second() {
    use crate::model::{check_interval_ms, CHECKS_PER_SECOND, CHECK_MIN_INTERVAL_MS};
    for slots in [8usize, 16, 64, 100] {
        assert_eq!(check_interval_ms(slots), CHECK_MIN_INTERVAL_MS);
    }
    assert_eq!(check_interval_ms(128), 512);
    assert_eq!(check_interval_ms(1024), 4096);
    for slots in [8usize, 64, 128, 1000, 1024, 4096, 1 << 20] {
        let per_second = slots as f64 * 1000.0 / check_interval_ms(slots) as f64;
        assert!(
            per_second <= CHECKS_PER_SECOND as f64,
            "{slots}: {per_second}"
        );
    }
    assert!(check_interval_ms(usize::MAX) > 0);
}
