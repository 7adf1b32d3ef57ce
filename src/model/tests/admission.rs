//! Slots and the identity check: admission verdicts, pinned names, prepared queries, chain
//! targets and the check intervals of a pool.

use super::*;

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
