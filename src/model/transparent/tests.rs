use crate::consul::{destinations, DestinationKey, DestinationKind, Update};
use crate::model::build;
use crate::model::fixtures::{fixture, settings, snapshot};
use crate::snapshot::Snapshot;

/// The recorded `modern` sidecar (transparent) with `server` as its one implicit upstream,
/// fed by server's recorded instances (which carry `consul-virtual` 240.0.0.x).
fn modern(mesh_only: Option<bool>) -> Snapshot {
    let mut s = snapshot("1.16.3", "modern-sidecar-proxy", "ca-leaf-client.json");
    if let Some(leaf) = s.leaf.as_mut() {
        leaf.service = "modern".into();
    }
    s.apply(Update::IntentionUpstreams(vec!["server".into()]));
    if let Some(only) = mesh_only {
        s.apply(Update::Mesh(vec![serde_json::json!({
            "Kind": "mesh",
            "Name": "mesh",
            "TransparentProxy": { "MeshDestinationsOnly": only },
        })]));
    }
    s
}

#[test]
fn an_implicit_upstream_is_watched_and_routed_by_its_virtual_ip() {
    let s = modern(Some(false));
    let key = DestinationKey {
        kind: DestinationKind::Service,
        name: "server".into(),
        datacenter: String::new(),
    };
    let reg = s.registration.as_ref().unwrap();
    assert!(destinations(reg, s.implicit_upstreams()).contains(&key));
    let d = build(&s, &settings(), None).unwrap();
    let implicit: Vec<_> = d.upstreams.iter().filter(|u| u.implicit).collect();
    assert_eq!(implicit.len(), 1, "{:#?}", d.upstreams);
    let u = implicit[0];
    assert_eq!(u.instances().count(), 2, "fed by server's instances");
    assert!(u.identity.is_some(), "its servers must prove to be server");
    let o = d.transparent.as_ref().unwrap();
    assert!(!o.mesh_only);
    assert_eq!(o.routes.len(), 1, "{o:#?}");
    assert_eq!(o.routes[0].service, "server");
    assert_eq!(o.routes[0].backend, u.backend);
    assert!(o.routes[0].virtual_ip.to_string().starts_with("240."));
    // Rendered: a backend and no frontend of its own; the outbound listener routes by map.
    let cfg: Vec<String> = crate::objects::sections(&d)
        .iter()
        .map(|x| x.header.clone())
        .collect();
    assert!(cfg.contains(&format!("backend {}", u.backend)), "{cfg:?}");
    assert!(!cfg.contains(&format!("frontend {}", u.name)), "{cfg:?}");
    assert!(
        cfg.contains(&"frontend hcc_outbound".to_string()),
        "{cfg:?}"
    );
    let map = crate::render::transparent_map(o, &o.maps(&d.paths)[0]);
    assert!(
        map.contains(&format!("{} {}\n", o.routes[0].virtual_ip, u.backend)),
        "{map}"
    );
}

/// Consul 1.16.3's answer for a transparent `client` (trimmed), with `other` denied by an
/// intention (Consul leaves denied services out; an entry that says not allowed is dropped
/// too).
#[test]
fn the_topology_answer_gives_the_allowed_services() {
    let body = r#"{"Protocol":"tcp","TransparentProxy":true,"Upstreams":[
        {"Name":"server","Datacenter":"dc1","Tags":null,"Source":"default-allow",
         "Intention":{"Allowed":true,"HasPermissions":false,"DefaultAllow":true}},
        {"Name":"other","Datacenter":"dc1","Intention":{"Allowed":false}},
        {"Name":"server","Datacenter":"dc1","Intention":{"Allowed":true}}],
        "Downstreams":[],"FilteredByACLs":false}"#;
    let t: crate::consul::api::ServiceTopology =
        crate::consul::api::parse("the service topology", body).unwrap();
    assert_eq!(t.allowed(), ["server"]);
    let empty: crate::consul::api::ServiceTopology =
        crate::consul::api::parse("the service topology", r#"{"Upstreams":null}"#).unwrap();
    assert!(empty.allowed().is_empty());
}

fn server_key() -> DestinationKey {
    DestinationKey {
        kind: DestinationKind::Service,
        name: "server".into(),
        datacenter: String::new(),
    }
}

/// `server`'s discovery chain: the recorded splitter (http), renamed as if recorded for it.
fn with_split_chain(s: &mut Snapshot, key: DestinationKey) {
    let body = fixture("1.16.3", "discovery-chain-split.json")
        .replace("\"split\"", "\"server\"")
        .replace("\"split.", "\"server.")
        .replace(":split.", ":server.");
    let chain = crate::consul::chain::parse_chain(&body).unwrap();
    s.apply(Update::Chain(key, chain));
}

/// Instances whose proxy allows `DialedDirectly` are routed by their own address and the
/// port their service registered, to a dialer with the mesh's mTLS; the others are not.
#[test]
fn dialed_directly_instances_are_routed_by_their_own_address_through_a_dialer() {
    let mut s = modern(Some(true));
    let mut entries = s.endpoints[&server_key()].clone();
    if let Some(p) = entries[0].service.proxy.as_mut() {
        p.transparent_proxy.dialed_directly = true;
        p.local_service_port = 8080;
    }
    s.apply(Update::Endpoints(server_key(), entries.clone()));
    let d = build(&s, &settings(), None).unwrap();
    let o = d.transparent.as_ref().unwrap();
    let u = d.upstreams.iter().find(|u| u.implicit).unwrap();
    assert_eq!(o.direct.len(), 1, "{o:#?}");
    assert_eq!(o.direct[0].port, 8080);
    let node = &entries[0].node.address;
    assert_eq!(
        o.direct[0].address.to_string(),
        *node,
        "Service.Address is empty: the node's"
    );
    assert_eq!(o.direct[0].backend, format!("{}_direct", u.backend));
    assert_eq!(o.dialers.len(), 1);
    let text: String = crate::objects::outbound_sections(&d, o)
        .iter()
        .flat_map(|x| std::iter::once(x.header.clone()).chain(x.lines.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(
        text.contains(&format!("backend {}_direct", u.backend)),
        "{text}"
    );
    assert!(
        text.contains("server direct 0.0.0.0:0 ssl crt ") && text.contains("verify required"),
        "{text}"
    );
    // Mesh destinations only: an address routed directly is a mesh destination too.
    assert!(
        text.contains("reject unless { dst,map_ip(")
            && text.contains("|| { var(sess.hcc_dst),map_str("),
        "{text}"
    );
    let maps = o.maps(&d.paths);
    let direct = crate::render::transparent_map(o, &maps[2]);
    assert!(
        direct.contains(&format!(
            "{}:8080 {}_direct\n",
            entries[0].service.address, u.backend
        )),
        "{direct}"
    );
    // Without DialedDirectly the address stays outside the mesh.
    for e in &mut entries {
        if let Some(p) = e.service.proxy.as_mut() {
            p.transparent_proxy.dialed_directly = false;
        }
    }
    s.apply(Update::Endpoints(server_key(), entries));
    let d = build(&s, &settings(), None).unwrap();
    let o = d.transparent.as_ref().unwrap();
    assert!(o.direct.is_empty() && o.dialers.is_empty(), "{o:#?}");
}

#[test]
fn a_bad_virtual_ip_is_named_and_not_routed() {
    let mut s = modern(Some(false));
    let mut entries = s.endpoints[&server_key()].clone();
    for e in &mut entries {
        e.service.tagged_addresses.insert(
            "consul-virtual".into(),
            serde_json::json!({"Address": "240.0.0.1 be_x\n1.2.3.4", "Port": 1}),
        );
    }
    s.apply(Update::Endpoints(server_key(), entries));
    let d = build(&s, &settings(), None).unwrap();
    assert!(d.transparent.as_ref().unwrap().routes.is_empty());
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("consul-virtual") && w.contains("not routed")),
        "{:?}",
        d.warnings
    );
}

/// An implicit upstream whose chain splits gets the listener an explicit one would have (the
/// chain's rules), on a unix socket; its virtual IP and names reach it through a hop. Being
/// http, its names and virtual IP route requests by `Host`.
#[test]
fn a_routed_implicit_upstream_is_reached_through_its_own_listener_and_by_host() {
    let mut s = modern(Some(false));
    with_split_chain(&mut s, server_key());
    let d = build(&s, &settings(), None).unwrap();
    assert!(
        !d.warnings.iter().any(|w| w.contains("not routed")),
        "{:?}",
        d.warnings
    );
    let u = d.upstreams.iter().find(|u| u.implicit).unwrap();
    assert!(u.routing.is_some(), "{:?}", d.warnings);
    let socket = u
        .socket
        .as_ref()
        .expect("a routed implicit upstream binds a socket");
    assert_eq!(socket.path, "/run/hcc-test/tp-server.sock");
    let o = d.transparent.as_ref().unwrap();
    let hop = format!("{}_hop", u.backend);
    assert_eq!(o.hops.len(), 1);
    assert_eq!(o.routes[0].backend, hop);
    let vip = o.routes[0].virtual_ip.to_string();
    let hosts: Vec<&str> = o.hosts.iter().map(|h| h.host.as_str()).collect();
    for h in [
        "server",
        "server.virtual.consul",
        "server.service.consul",
        "server.service.dc1.consul",
        vip.as_str(),
    ] {
        assert!(hosts.contains(&h), "{h} in {hosts:?}");
    }
    assert!(o.hosts.iter().all(|h| h.backend == hop));
    let sections = crate::objects::sections(&d);
    let text: String = sections
        .iter()
        .flat_map(|x| std::iter::once(x.header.clone()).chain(x.lines.clone()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(text.contains(&format!("frontend {}", u.name)), "{text}");
    assert!(
        text.contains(&format!("bind {} name {}", socket.path, u.name)),
        "{text}"
    );
    assert!(text.contains(&format!("backend {hop}")), "{text}");
    assert!(
        text.contains(&format!("server hop unix@{}", socket.path)),
        "{text}"
    );
    assert!(
        text.contains("tcp-request content switch-mode http if { dst,map_str("),
        "{text}"
    );
    // The split's own rules, as an explicit upstream's listener has them.
    let mut explicit = snapshot("1.16.3", "client-sidecar-proxy", "ca-leaf-client.json");
    let key = destinations(explicit.registration.as_ref().unwrap(), &[])[0].clone();
    with_split_chain(&mut explicit, key);
    let e = build(&explicit, &settings(), None).unwrap();
    let rules = |d: &crate::model::Desired, name: &str| -> Vec<String> {
        crate::objects::sections(d)
            .into_iter()
            .find(|x| x.header == format!("frontend {name}"))
            .map(|x| {
                x.lines
                    .iter()
                    .filter(|l| l.starts_with("use_backend") || l.contains("splits"))
                    .map(|l| l.replace(&name.to_string(), "X"))
                    .collect()
            })
            .unwrap_or_default()
    };
    let theirs = rules(&e, &e.upstreams[0].name);
    assert!(!theirs.is_empty());
    assert_eq!(
        rules(&d, &u.name).len(),
        theirs.len(),
        "the implicit listener has the explicit one's chain rules"
    );
    let maps = o.maps(&d.paths);
    let by_host = crate::render::transparent_map(o, &maps[1]);
    assert!(
        by_host.contains(&format!("server.virtual.consul {hop}\n")),
        "{by_host}"
    );
}

/// A tcp service has no `Host` routes: its connections are never parsed as HTTP.
#[test]
fn a_tcp_service_is_routed_by_virtual_ip_only() {
    let d = build(&modern(Some(false)), &settings(), None).unwrap();
    let o = d.transparent.as_ref().unwrap();
    assert_eq!(o.routes.len(), 1);
    assert!(o.hosts.is_empty() && o.hops.is_empty(), "{o:#?}");
}

#[test]
fn mesh_destinations_only_refuses_and_an_unknown_mesh_entry_fails_closed() {
    for (mesh, only) in [(None, true), (Some(true), true), (Some(false), false)] {
        let d = build(&modern(mesh), &settings(), None).unwrap();
        let o = d.transparent.as_ref().unwrap();
        assert_eq!(o.mesh_only, only, "{mesh:?}");
        let lines = crate::objects::outbound_sections(&d, o)[0].lines.join("\n");
        assert_eq!(
            lines.contains("tcp-request connection reject unless"),
            only,
            "{lines}"
        );
    }
}

#[test]
fn a_service_gone_from_the_intention_upstreams_loses_its_route_and_backend() {
    let mut s = modern(Some(false));
    let before = build(&s, &settings(), None).unwrap();
    s.apply(Update::IntentionUpstreams(Vec::new()));
    let after = build(&s, &settings(), Some(&before)).unwrap();
    assert!(after.upstreams.iter().all(|u| !u.implicit));
    assert!(after.transparent.as_ref().unwrap().routes.is_empty());
    let p = crate::haproxy::diff::plan(&before, &after);
    assert!(
        p.transparent_map_changed && p.rendered_only.is_empty(),
        "{p:#?}"
    );
    assert!(
        !p.needs_full_render(),
        "a route and a backend go without a full render"
    );
}

#[test]
fn the_default_mode_has_no_outbound_listener_and_no_implicit_upstream() {
    let mut s = snapshot("1.16.3", "client-sidecar-proxy", "ca-leaf-client.json");
    s.apply(Update::IntentionUpstreams(vec!["server".into()]));
    let d = build(&s, &settings(), None).unwrap();
    assert!(d.transparent.is_none());
    assert!(d.upstreams.iter().all(|u| !u.implicit));
}

/// The whole configuration with every kind of outbound route (a routed http upstream, an
/// instance dialed directly, mesh destinations only) as HAProxy reads it: valid, and no
/// warning about the outbound listener's rules.
#[test]
fn every_kind_of_outbound_route_renders_a_config_haproxy_accepts() {
    let dir = std::env::temp_dir().join(format!("hcc-tp-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let mut s = modern(Some(true));
    with_split_chain(&mut s, server_key());
    let mut entries = s.endpoints[&server_key()].clone();
    if let Some(p) = entries[0].service.proxy.as_mut() {
        p.transparent_proxy.dialed_directly = true;
        p.local_service_port = 8080;
    }
    s.apply(Update::Endpoints(server_key(), entries));
    let d = build(&s, &crate::model::fixtures::settings_in(&dir, false), None).unwrap();
    let o = d.transparent.as_ref().unwrap();
    assert!(!o.hops.is_empty() && !o.dialers.is_empty() && !o.hosts.is_empty());
    let creds = crate::render::DataplaneCredentials {
        user: "hcc".into(),
        password: crate::config::Secret::new("pw"),
    };
    let files = crate::render::render(&d, &creds, &crate::render::Templates::builtin()).unwrap();
    for f in &files {
        std::fs::write(&f.path, &f.contents).unwrap();
    }
    let out = std::process::Command::new("haproxy")
        .args(["-W", "-c", "-f"])
        .arg(dir.join("haproxy.cfg"))
        .output()
        .expect("haproxy must be installed (scripts/install-deps)");
    let err = String::from_utf8_lossy(&out.stderr);
    let cfg = &files.last().unwrap().contents;
    assert!(out.status.success(), "haproxy -c failed:\n{err}\n{cfg}");
    assert!(!err.contains("WARNING"), "{err}\n{cfg}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// `service-defaults` with a `Destination` (a terminating gateway's external address) is
/// named once per build, saying what the outbound listener does with it instead.
#[test]
fn a_service_defaults_destination_is_named_with_what_happens_instead() {
    let entries: Vec<serde_json::Value> = serde_json::from_str(
        r#"[{"Kind":"service-defaults","Name":"web","Protocol":"http"},
            {"Kind":"service-defaults","Name":"example","Protocol":"tcp",
             "Destination":{"Addresses":["example.com","10.1.2.3"],"Port":443}}]"#,
    )
    .unwrap();
    for (only, what) in [
        (false, "passed through"),
        (true, "refused (MeshDestinationsOnly)"),
    ] {
        let mut s = modern(Some(only));
        s.apply(Update::ServiceDefaults(entries.clone()));
        let d = build(&s, &settings(), None).unwrap();
        let named: Vec<&String> = d
            .warnings
            .iter()
            .filter(|w| w.contains("Destination"))
            .collect();
        assert_eq!(named.len(), 1, "{:?}", d.warnings);
        assert!(
            named[0].contains("\"example\"")
                && named[0].contains("10.1.2.3")
                && named[0].contains(what),
            "{named:?}"
        );
    }
    let role = crate::consul::kinds::Role {
        proxy_id: "modern-sidecar-proxy".into(),
        gateway: false,
        agentless: false,
        intentions: false,
    };
    let w = modern(None).watches(&role);
    assert!(
        w.contains(&crate::consul::kinds::Watch::ServiceDefaults),
        "{w:?}"
    );
    let plain = snapshot("1.16.3", "client-sidecar-proxy", "ca-leaf-client.json");
    let role = crate::consul::kinds::Role {
        proxy_id: "client-sidecar-proxy".into(),
        ..role
    };
    assert!(!plain
        .watches(&role)
        .contains(&crate::consul::kinds::Watch::ServiceDefaults));
}

/// Two services whose instances claim one address and port: the first by name keeps it, the
/// other is named.
#[test]
fn one_address_claimed_by_two_services_is_routed_to_one_and_named() {
    let mut s = modern(Some(false));
    let mut entries = s.endpoints[&server_key()].clone();
    for e in &mut entries {
        if let Some(p) = e.service.proxy.as_mut() {
            p.transparent_proxy.dialed_directly = true;
            p.local_service_port = 8080;
        }
    }
    s.apply(Update::Endpoints(server_key(), entries.clone()));
    let other = DestinationKey {
        name: "other".into(),
        ..server_key()
    };
    s.apply(Update::IntentionUpstreams(vec![
        "server".into(),
        "other".into(),
    ]));
    for e in &mut entries {
        if let Some(p) = e.service.proxy.as_mut() {
            p.destination_service_name = "other".into();
        }
    }
    s.apply(Update::Endpoints(other, entries));
    let d = build(&s, &settings(), None).unwrap();
    let o = d.transparent.as_ref().unwrap();
    assert!(!o.direct.is_empty());
    assert!(o.direct.iter().all(|r| r.service == "other"), "{o:#?}");
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("\"server\"") && w.contains("is already \"other\"'s address")),
        "{:?}",
        d.warnings
    );
}
