use super::*;
use crate::model::fixtures::{settings, snapshot, ANY};
use crate::model::UpstreamListener;
use crate::model::{build, place, Server, MIN_SLOTS};
use crate::objects::upstream_server;

fn client() -> Desired {
    crate::model::fixtures::client_desired()
}

fn instances(u: &UpstreamListener) -> Vec<Server> {
    u.instances().cloned().collect()
}

fn server(id: &str, port: u16) -> Server {
    Server {
        id: id.into(),
        address: "127.0.0.9".into(),
        port,
        weight: 1,
        identity: crate::admission::Identity::service("server", "dc1"),
        admission: crate::model::Admission::Unchecked,
    }
}

/// A change of the mesh entry's TLS settings is a reload; a slot pool resized while they
/// are set still goes through the runtime API, whose `add server` takes them.
#[test]
fn mesh_tls_changes_take_a_full_render() {
    let a = client();
    let mut b = a.clone();
    b.mesh_tls.incoming.min = Some(crate::value::TlsVersion::V1_3);
    let p = plan(&a, &b);
    assert!(p.full_render_reason() == Some(crate::objects::MESH_TLS_REASON));
    assert!(p.ops.iter().any(|o| matches!(o, Op::ReplaceBind(_))));
    let mut c = b.clone();
    c.mesh_tls.outgoing.min = Some(crate::value::TlsVersion::V1_3);
    assert!(plan(&b, &c).needs_full_render());

    let mut d = c.clone();
    let many: Vec<Server> = (0..MIN_SLOTS + 1)
        .map(|i| server(&format!("i{i}.n"), 22000 + i as u16))
        .collect();
    d.upstreams[0].slots = place(many, &d.upstreams[0].slots);
    let p = plan(&c, &d);
    assert!(p.only_servers() && !p.needs_full_render(), "{p:#?}");
    let added = p.ops.iter().find_map(|o| match o {
        Op::CreateServer(s) => Some(s.line()),
        _ => None,
    });
    assert!(added.is_some_and(|l| l.contains("ssl-min-ver TLSv1.3")));
}

#[test]
fn same_state_plans_nothing() {
    assert!(plan(&client(), &client()).is_empty());
}

#[test]
fn instance_churn_within_capacity_is_live_only() {
    let a = client();
    let mut b = a.clone();
    let up = &mut b.upstreams[0];
    let mut now = instances(up);
    now.remove(0);
    now[0].weight = 7;
    now.push(server("server-3-sidecar-proxy.node2", 21009));
    up.slots = place(now, &up.slots);
    let p = plan(&a, &b);
    assert!(p.ops.is_empty(), "no transaction, no reload: {:#?}", p.ops);
    assert!(!p.roots_changed && !p.leaf_changed);
    // The newcomer takes the slot just freed, through maintenance (so it starts up and
    // checked, not with the check state of the instance it replaces); the weight changes in
    // place.
    assert_eq!(p.live.len(), 3, "{:#?}", p.live);
    assert!(p.live.iter().any(|s| s.weight == Some(7) && !s.maintenance));
    let newcomer: Vec<bool> = p
        .live
        .iter()
        .filter(|s| s.port == 21009)
        .map(|s| s.maintenance)
        .collect();
    assert_eq!(newcomer, [true, false]);

    // An instance that leaves puts its slot in maintenance, live too.
    let mut c = b.clone();
    let mut fewer = instances(&c.upstreams[0]);
    fewer.retain(|s| s.port != 21009);
    c.upstreams[0].slots = place(fewer, &c.upstreams[0].slots);
    let p = plan(&b, &c);
    assert!(p.ops.is_empty());
    assert_eq!(p.live.len(), 1);
    assert!(p.live[0].maintenance && p.live[0].address == "127.0.0.1");
}

#[test]
fn growing_past_capacity_is_one_transaction() {
    let a = client();
    let mut b = a.clone();
    let up = &mut b.upstreams[0];
    let many: Vec<Server> = (0..MIN_SLOTS + 1)
        .map(|i| server(&format!("i{i}.n"), 22000 + i as u16))
        .collect();
    up.slots = place(many, &up.slots);
    assert_eq!(up.slots.len(), 2 * MIN_SLOTS);
    let p = plan(&a, &b);
    assert!(p.live.is_empty(), "everything rides the transaction");
    let creates = p
        .ops
        .iter()
        .filter(|o| matches!(o, Op::CreateServer(_)))
        .count();
    let replaces = p
        .ops
        .iter()
        .filter(|o| matches!(o, Op::ReplaceServer(_)))
        .count();
    assert_eq!(creates, MIN_SLOTS);
    assert_eq!(replaces, MIN_SLOTS, "the old slots all changed instance");
}

/// Every slot is checked; a resize within the shortest interval stays live (the runtime
/// API adds the slots), one that lengthens it replaces every slot in a transaction.
#[test]
fn a_resize_that_changes_the_check_interval_is_a_transaction() {
    let a = client();
    let grow = |from: &Desired, n: usize| {
        let mut b = from.clone();
        let up = &mut b.upstreams[0];
        let many: Vec<Server> = (0..n)
            .map(|i| server(&format!("i{i}.n"), 22000 + i as u16))
            .collect();
        up.slots = place(many, &up.slots);
        b
    };
    let inter = |d: &Desired| {
        let u = &d.upstreams[0];
        let all: Vec<_> = u
            .slots
            .iter()
            .map(|s| upstream_server(d, u, s).check_inter_ms)
            .collect();
        assert!(all.iter().all(|i| *i == all[0]), "{all:?}");
        all[0]
    };
    assert_eq!(inter(&a), Some(crate::model::CHECK_MIN_INTERVAL_MS));
    let b = grow(&a, 40);
    assert_eq!(b.upstreams[0].slots.len(), 64);
    assert_eq!(inter(&b), inter(&a));
    let p = plan(&a, &b);
    assert!(p.only_servers() && !p.check_interval_changed);

    let c = grow(&b, 100);
    assert_eq!(c.upstreams[0].slots.len(), 128);
    assert_eq!(inter(&c), Some(512));
    let p = plan(&b, &c);
    assert!(p.check_interval_changed && !p.only_servers());
    let replaced = p
        .ops
        .iter()
        .filter(|o| matches!(o, Op::ReplaceServer(s) if s.check_inter_ms == Some(512)))
        .count();
    assert_eq!(replaced, 64, "every old slot, at the new interval");
    assert!(p.live.is_empty());
}

#[test]
fn instances_keep_their_slots_and_the_pool_shrinks_lazily() {
    let five: Vec<Server> = (0..5)
        .map(|i| server(&format!("i{i}.n"), 100 + i))
        .collect();
    let slots = place(five.clone(), &[]);
    assert_eq!(slots.len(), MIN_SLOTS);
    // i1 and i3 leave, i9 arrives: survivors stay put, the newcomer takes the lowest hole.
    let next: Vec<Server> = vec![
        five[0].clone(),
        five[2].clone(),
        five[4].clone(),
        server("i9.n", 109),
    ];
    let slots2 = place(next, &slots);
    let at = |s: &[crate::model::Slot], i: usize| s[i].instance.as_ref().map(|x| x.id.clone());
    assert_eq!(at(&slots2, 0).as_deref(), Some("i0.n"));
    assert_eq!(at(&slots2, 1).as_deref(), Some("i9.n"));
    assert_eq!(at(&slots2, 2).as_deref(), Some("i2.n"));
    assert_eq!(at(&slots2, 4).as_deref(), Some("i4.n"));
    // 20 instances need 32 slots; back to 9 keeps 32 (more than a quarter); to 3 shrinks.
    let twenty: Vec<Server> = (0..20)
        .map(|i| server(&format!("j{i}.n"), 200 + i))
        .collect();
    let big = place(twenty.clone(), &slots2);
    assert_eq!(big.len(), 32);
    assert_eq!(place(twenty[..9].to_vec(), &big).len(), 32);
    let small = place(twenty[..3].to_vec(), &big);
    assert_eq!(small.len(), MIN_SLOTS);
    assert_eq!(small.iter().filter(|s| s.instance.is_some()).count(), 3);
}

#[test]
fn upstream_added_and_removed_in_transaction_order() {
    let a = client();
    let mut b = a.clone();
    let mut extra = b.upstreams[0].clone();
    extra.name = "up_svc_other_local_127.0.0.1_9292".into();
    extra.backend = "be_up_svc_other_local_127.0.0.1_9292".into();
    extra.bind_port = 9292;
    b.upstreams.push(extra);
    let p = plan(&a, &b);
    let kinds: Vec<&str> = p
        .ops
        .iter()
        .map(|o| match o {
            Op::CreateBackend(_) => "backend",
            Op::CreateServer(_) => "server",
            Op::CreateFrontend(_) => "frontend",
            Op::CreateBind(_) => "bind",
            _ => "other",
        })
        .collect();
    let mut want = vec!["backend"];
    want.extend(std::iter::repeat_n("server", MIN_SLOTS));
    want.extend(["frontend", "bind"]);
    assert_eq!(kinds, want);

    let back = plan(&b, &a);
    assert_eq!(
        back.ops,
        [
            Op::DeleteFrontend("up_svc_other_local_127.0.0.1_9292".into()),
            Op::DeleteBackend("be_up_svc_other_local_127.0.0.1_9292".into())
        ]
    );
}

/// `client` with its upstream following the recorded chain `name`.
fn chained(name: &str) -> Desired {
    let mut s = snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json");
    let key = crate::consul::destinations(s.registration.as_ref().unwrap(), &[])[0].clone();
    let chain = crate::consul::chain::parse_chain(&crate::model::fixtures::fixture(
        ANY,
        &format!("discovery-chain-{name}.json"),
    ))
    .unwrap();
    s.apply(crate::consul::Update::Chain(key, chain));
    build(&s, &settings(), None).unwrap()
}

/// A new intentions fast map is one live replacement: no operation, no full render.
#[test]
fn a_new_intentions_fast_map_is_applied_live() {
    let a = client();
    let mut b = a.clone();
    b.intentions_map = vec![("^k_0:".into(), "allow".into())];
    let p = plan(&a, &b);
    assert!(p.intentions_map_changed && !p.is_empty(), "{p:#?}");
    assert!(p.ops.is_empty() && p.live.is_empty() && !p.needs_full_render());
    assert!(!plan(&b, &b).intentions_map_changed);
}

#[test]
fn new_split_weights_are_live_and_new_routes_a_full_render() {
    let a = chained("split");
    let mut b = a.clone();
    let r = b.upstreams[0].routing.as_mut().unwrap();
    r.routes[0].splits[0].upto = 5000;
    let p = plan(&a, &b);
    assert!(p.ops.is_empty() && p.live.is_empty(), "{p:#?}");
    assert_eq!(p.live_splits.len(), 1);
    assert_eq!(p.live_splits[0].1, 5000);

    let p = plan(&client(), &a);
    assert!(p.needs_full_render(), "{:#?}", p.ops);
    assert!(p.full_render_reason().unwrap().contains("discovery-chain"));
    // Back to the plain upstream: routing rules go, so the frontend is rebuilt.
    let back = plan(&a, &client());
    assert!(back
        .ops
        .iter()
        .any(|o| matches!(o, Op::DeleteBackend(n) if n.contains(".t."))));
    assert!(plan(&a, &a.clone()).is_empty());
}

#[test]
fn instance_churn_of_a_chain_target_is_live() {
    let a = chained("old");
    let mut b = a.clone();
    let t = &mut b.upstreams[0].routing.as_mut().unwrap().targets[0];
    t.slots = place(vec![server("web-v1-sidecar-proxy.node1", 21444)], &t.slots);
    let backend = t.backend.clone();
    let p = plan(&a, &b);
    assert!(p.ops.is_empty(), "{:#?}", p.ops);
    assert_eq!(p.live.len(), 1);
    assert_eq!(p.live[0].backend, backend);
}

fn paths() -> Desired {
    build(
        &snapshot(ANY, "paths-sidecar-proxy", "ca-leaf-paths.json"),
        &settings(),
        None,
    )
    .unwrap()
}

#[test]
fn a_new_exposed_path_is_a_full_render_and_a_removed_one_a_transaction() {
    let with = paths();
    let mut without = with.clone();
    let gone = without.exposed.remove(0);
    let p = plan(&without, &with);
    assert!(p.needs_full_render(), "{:#?}", p.ops);
    assert!(p.full_render_reason().unwrap().contains("exposed path"));

    let back = plan(&with, &without);
    assert!(!back.needs_full_render());
    assert_eq!(
        back.ops,
        [
            Op::DeleteFrontend(gone.name.clone()),
            Op::DeleteBackend(gone.backend.clone())
        ]
    );
    // A changed path rebuilds its listener, through a full render too.
    let mut moved = with.clone();
    moved.exposed[0].path = "/stats".into();
    let p = plan(&with, &moved);
    assert!(p.needs_full_render());
    assert_eq!(p.ops[0], Op::DeleteFrontend(gone.name));
    assert!(plan(&with, &with.clone()).is_empty());
}

/// The public listener's rules are rendered only and differ by mode (paths refused and
/// normalized in http): a Dataplane API replacement would keep the old mode's, so a mode
/// change either way is a full render.
#[test]
fn a_public_listener_mode_change_is_a_full_render() {
    let tcp = client();
    let mut http = tcp.clone();
    http.sidecar_mut().mode = crate::model::Mode::Http;
    for (a, b) in [(&tcp, &http), (&http, &tcp)] {
        let p = plan(a, b);
        assert!(
            p.full_render_reason()
                .is_some_and(|r| r.contains("public listener")),
            "{:#?}",
            p.ops
        );
    }
}

#[test]
fn local_app_and_certificates_changes_are_seen() {
    let a = client();
    let mut b = a.clone();
    b.sidecar_mut().app_port = 9999;
    b.tls.leaf_pem.push_str("# rotated\n");
    let p = plan(&a, &b);
    assert_eq!(p.ops.len(), 1);
    assert!(matches!(&p.ops[0], Op::ReplaceServer(s) if s.port == 9999 && s.name == "app"));
    assert!(p.leaf_changed && !p.roots_changed);
}

#[test]
fn applying_a_plan_to_from_scratch_ops_lands_on_the_target() {
    // Model the Dataplane API as a set of objects: deltas on top of `a` must give exactly the
    // objects `b` would have from scratch.
    let a = client();
    let mut b = a.clone();
    let mut now = instances(&b.upstreams[0]);
    now.pop();
    now[0].weight = 3;
    b.upstreams[0].slots = place(now, &b.upstreams[0].slots);
    let mut extra = b.upstreams[0].clone();
    extra.name = "up_svc_x_local_127.0.0.1_9300".into();
    extra.backend = "be_up_svc_x_local_127.0.0.1_9300".into();
    extra.bind_port = 9300;
    b.upstreams.push(extra);
    b.sidecar_mut().connect_timeout_ms = crate::value::Millis::constant(1234);
    b.sidecar_mut().server_timeout_ms = Some(crate::value::Millis::constant(700));
    b.sidecar_mut().client_timeout_ms = Some(crate::value::Millis::constant(9000));
    b.sidecar_mut().max_connections = crate::value::Limit::new("t", 2).ok();
    b.sidecar_mut().forwardfor = true;
    b.upstreams[0].read_timeout_ms = Some(crate::value::Millis::constant(7000));

    let mut objects = objects_of(&from_scratch(&a));
    let p = plan(&a, &b);
    for op in p
        .ops
        .into_iter()
        .chain(p.live.into_iter().map(Op::ReplaceServer))
    {
        apply_to_objects(&mut objects, op);
    }
    assert_eq!(objects, objects_of(&from_scratch(&b)));
}

/// The local settings' changes: timeouts, the connection cap and `option forwardfor` are
/// fields of v1.2.5's models, so one transaction; `appname_header` rules are not, so any
/// change of them (removal included) is a full render.
#[test]
fn local_settings_ride_a_transaction_and_app_header_rules_a_full_render() {
    let s = crate::model::fixtures::rich_with_settings(ANY);
    let with = build(&s, &settings(), None).unwrap();
    let mut faster = s.clone();
    crate::model::fixtures::proxy_config(&mut faster)
        .insert("local_request_timeout_ms".into(), 300.into());
    let faster = build(&faster, &settings(), Some(&with)).unwrap();
    let p = plan(&with, &faster);
    assert!(!p.needs_full_render(), "{p:#?}");
    assert!(
        matches!(&p.ops[..], [Op::ReplaceBackend(b)] if b.server_timeout_ms == Some(crate::value::Millis::constant(300))),
        "{:#?}",
        p.ops
    );
    let mut capped = s.clone();
    crate::model::fixtures::proxy_config(&mut capped)
        .insert("max_inbound_connections".into(), 1.into());
    let capped = build(&capped, &settings(), Some(&with)).unwrap();
    let p = plan(&with, &capped);
    assert!(!p.needs_full_render(), "{p:#?}");
    assert!(
        matches!(&p.ops[..], [Op::ReplaceFrontend(f)] if f.maxconn.map(crate::value::Limit::get) == Some(1)),
        "{:#?}",
        p.ops
    );
    let mut without = s.clone();
    crate::model::fixtures::proxy_config(&mut without).remove("appname_header");
    let without = build(&without, &settings(), Some(&with)).unwrap();
    for (a, b) in [(&with, &without), (&without, &with)] {
        let p = plan(a, b);
        assert!(
            p.full_render_reason()
                .is_some_and(|r| r.contains("appname_header")),
            "{p:#?}"
        );
    }
    assert!(plan(&with, &with.clone()).is_empty());
}

type Objects = std::collections::BTreeMap<String, String>;

fn objects_of(ops: &[Op]) -> Objects {
    let mut o = Objects::new();
    for op in ops {
        apply_to_objects(&mut o, op.clone());
    }
    o
}

fn apply_to_objects(o: &mut Objects, op: Op) {
    match op {
        Op::CreateBackend(b) | Op::ReplaceBackend(b) => {
            o.insert(format!("backend/{}", b.name), format!("{b:?}"));
        }
        Op::CreateFrontend(f) | Op::ReplaceFrontend(f) => {
            o.insert(format!("frontend/{}", f.name), format!("{f:?}"));
        }
        Op::CreateBind(b) | Op::ReplaceBind(b) => {
            o.insert(
                format!("frontend/{}/bind/{}", b.frontend, b.name),
                format!("{b:?}"),
            );
        }
        Op::CreateServer(s) | Op::ReplaceServer(s) => {
            o.insert(
                format!("backend/{}/server/{}", s.backend, s.name),
                format!("{s:?}"),
            );
        }
        Op::DeleteServer { backend, name } => {
            o.remove(&format!("backend/{backend}/server/{name}"));
        }
        Op::DeleteFrontend(n) => remove_section(o, &format!("frontend/{n}")),
        Op::DeleteBackend(n) => remove_section(o, &format!("backend/{n}")),
    }
}

fn remove_section(o: &mut Objects, key: &str) {
    let children = format!("{key}/");
    o.retain(|k, _| k != key && !k.starts_with(&children));
}

/// The phase of the one ordering rule an operation belongs to.
fn phase(op: &Op) -> u8 {
    match op {
        Op::DeleteFrontend(_) => 0,
        Op::DeleteServer { .. } => 1,
        Op::DeleteBackend(_) => 2,
        Op::CreateBackend(_)
        | Op::ReplaceBackend(_)
        | Op::CreateServer(_)
        | Op::ReplaceServer(_) => 3,
        Op::CreateFrontend(_) | Op::ReplaceFrontend(_) | Op::CreateBind(_) | Op::ReplaceBind(_) => {
            4
        }
    }
}

/// Pairs of states across the object kinds (upstreams, chain targets, exposed paths, the
/// public listener): each plan follows the one ordering rule (a server after its backend
/// too), and applied to the objects of the first lands on those of the second.
#[test]
fn every_kind_follows_one_ordering_rule_and_lands_on_the_target() {
    let with = paths();
    let mut without = with.clone();
    without.exposed.remove(0);
    let mut moved = with.clone();
    moved.exposed[0].path = "/stats".into();
    let mut http = client();
    http.sidecar_mut().mode = crate::model::Mode::Http;
    http.sidecar_mut().app_port = 9999;
    let mut grown = client();
    let many: Vec<Server> = (0..MIN_SLOTS + 1)
        .map(|i| server(&format!("i{i}.n"), 22000 + i as u16))
        .collect();
    grown.upstreams[0].slots = place(many, &grown.upstreams[0].slots);
    let split = chained("split");
    let pairs = [
        (client(), split.clone()),
        (split, client()),
        (without.clone(), with.clone()),
        (with.clone(), without),
        (with, moved),
        (client(), http),
        (client(), grown.clone()),
        (grown, client()),
    ];
    for (a, b) in &pairs {
        let p = plan(a, b);
        let phases: Vec<u8> = p.ops.iter().map(phase).collect();
        assert!(phases.windows(2).all(|w| w[0] <= w[1]), "{:#?}", p.ops);
        // A server created with its backend comes after it.
        let created = |name: &str| {
            p.ops
                .iter()
                .position(|o| matches!(o, Op::CreateBackend(b) if b.name == name))
        };
        for (i, op) in p.ops.iter().enumerate() {
            if let Op::CreateServer(s) | Op::ReplaceServer(s) = op {
                assert!(created(&s.backend).is_none_or(|at| at < i), "{:#?}", p.ops);
            }
        }
        let mut objects = objects_of(&from_scratch(a));
        for op in p
            .ops
            .into_iter()
            .chain(p.live.into_iter().map(Op::ReplaceServer))
        {
            apply_to_objects(&mut objects, op);
        }
        assert_eq!(objects, objects_of(&from_scratch(b)));
    }
}
