//! Protocols and the config keys the sidecar honours, on the recorded Consul versions.

use super::*;

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

/// `s` built with the intentions agent on or off.
fn built(s: &Snapshot, intentions: bool) -> Desired {
    let settings = super::fixtures::settings_in(Path::new("/run/hcc-test"), intentions);
    build(s, &settings, None).unwrap()
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
            let d = built(&s, intentions);
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
            // What the sidecar reads is not warned about; only appname_header and
            // X-Forwarded-Client-Cert without the agent that reads the caller's certificate.
            let expected = 2 * usize::from(!intentions);
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
        "balance_outbound_connections".into(),
        "exact_balance".into(),
    );
    let d = build(&s, &settings(), None).unwrap();
    let w = &d.warnings;
    // The four keys, and X-Forwarded-Client-Cert without the agent (an http listener).
    assert_eq!(w.len(), 5, "{w:#?}");
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
        .contains("upstream Config key \"balance_outbound_connections\" not supported")
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
    // 16 named, the rest in one line, the upstream's key and X-Forwarded-Client-Cert.
    assert!(d.warnings.len() <= 16 + 1 + 1 + 1, "{}", d.warnings.len());
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

/// An http public listener removes `X-Forwarded-Client-Cert` always and, with the intentions
/// agent, sets it from our own SPIFFE ID, HAProxy's hash of the client's certificate and the
/// agent's reading of it; a tcp one leaves requests alone (it reads none).
#[test]
fn xfcc_is_removed_always_and_set_only_from_the_agents_reading() {
    use crate::objects::{public_bind, public_frontend};
    for intentions in [false, true] {
        let mut s = snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json");
        super::fixtures::proxy_config(&mut s).insert("protocol".into(), "http".into());
        let d = built(&s, intentions);
        let p = d.sidecar();
        let lines = public_frontend(&d, p).lines(&public_bind(&d, p));
        let uri = &s.leaf.as_ref().unwrap().service_uri;
        assert!(lines.contains(&"http-request del-header X-Forwarded-Client-Cert".to_string()));
        let set = lines
            .iter()
            .filter(|l| l.starts_with("http-request set-header X-Forwarded-Client-Cert"))
            .collect::<Vec<_>>();
        if intentions {
            assert_eq!(
                set,
                [&format!("http-request set-header X-Forwarded-Client-Cert By={uri};%[var(sess.hcc.xfcc)] if {{ var(sess.hcc.xfcc) -m found }}")]
            );
            assert!(d.warnings.is_empty(), "{:#?}", d.warnings);
        } else {
            assert!(set.is_empty(), "{set:?}");
            assert!(d.warnings[0].contains("X-Forwarded-Client-Cert"));
        }
        super::fixtures::proxy_config(&mut s).insert("protocol".into(), "tcp".into());
        let d = build(&s, &settings(), None).unwrap();
        let p = d.sidecar();
        let lines = public_frontend(&d, p).lines(&public_bind(&d, p));
        assert!(
            !lines.iter().any(|l| l.contains("Forwarded-Client")),
            "{lines:?}"
        );
    }
}

/// `passive_health_check` reaches every server of the upstream's backend with the `rise` its
/// check interval gives, a new slot too, and another ejection time takes a full render.
#[test]
fn passive_checks_reach_the_servers_and_a_change_takes_a_full_render() {
    let mut s = snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json");
    up(&mut s).config.insert(
        "passive_health_check".into(),
        serde_json::json!({"MaxFailures": 2, "BaseEjectionTime": 9_000_000_000u64,
            "MaxEjectionPercent": 100}),
    );
    up(&mut s).config.insert("protocol".into(), "http".into());
    let d = build(&s, &settings(), None).unwrap();
    let u = &d.upstreams[0];
    let inter = check_interval_ms(u.slots.len());
    for slot in &u.slots {
        let line = crate::objects::upstream_server(&d, u, slot).line();
        let rise = 9000_u64.div_ceil(inter);
        assert!(
            line.ends_with(&format!(
                " check inter {inter} observe layer7 error-limit 2 on-error mark-down rise {rise}"
            )),
            "{line}"
        );
    }
    assert!(d.warnings.is_empty(), "{:#?}", d.warnings);
    // A new slot gets the options too, after the `default-server` ones it repeats (the
    // last `rise` wins in HAProxy).
    let cmd =
        crate::haproxy::live::add_command(&crate::objects::upstream_server(&d, u, &u.slots[0]));
    assert!(
        cmd.ends_with(&format!("rise {}", 9000_u64.div_ceil(inter))),
        "{cmd}"
    );
    // Another ejection time changes the servers' options, which only a full render applies.
    let mut s2 = s.clone();
    up(&mut s2).config.insert(
        "passive_health_check".into(),
        serde_json::json!({"MaxFailures": 2, "BaseEjectionTime": "60s",
            "MaxEjectionPercent": 100}),
    );
    let d2 = build(&s2, &settings(), Some(&d)).unwrap();
    let plan = crate::haproxy::diff::plan(&d, &d2);
    assert!(
        plan.full_render_reason()
            .is_some_and(|r| r.contains("passive health check")),
        "{:?}",
        plan.full_render_reason()
    );
}

/// `MutualTLSMode` as Consul 1.16 resolves it (the service's own service-defaults, else
/// proxy-defaults global, else strict) takes the mesh entry's consent, and then puts a front
/// listener on the public port.
#[test]
fn permissive_mtls_needs_the_mesh_entry_and_splits_the_public_port() {
    let mut s = snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json");
    let service = s
        .registration
        .as_ref()
        .and_then(|r| r.proxy.as_ref())
        .unwrap()
        .destination_service_name
        .clone();
    let defaults = |mode: &str| {
        vec![
            serde_json::json!({"Kind": "service-defaults", "Name": service,
            "MutualTLSMode": mode}),
        ]
    };
    let allow = vec![serde_json::json!({
        "Kind": "mesh", "AllowEnablingPermissiveMutualTLS": true,
    })];
    // proxy-defaults says permissive, the service's own entry strict: strict, silently.
    s.mesh = Some(allow.clone());
    s.proxy_defaults = Some(vec![serde_json::json!({"Kind": "proxy-defaults",
        "Name": "global", "MutualTLSMode": "permissive"})]);
    s.service_defaults = Some(defaults("strict"));
    let d = build(&s, &settings(), None).unwrap();
    assert!(!d.sidecar().permissive);
    assert!(d.warnings.is_empty(), "{:#?}", d.warnings);
    // Another service's entry says nothing of this one: proxy-defaults' permissive holds.
    s.service_defaults = Some(vec![serde_json::json!({"Kind": "service-defaults",
        "Name": "other", "MutualTLSMode": "strict"})]);
    assert!(build(&s, &settings(), None).unwrap().sidecar().permissive);
    s.proxy_defaults = None;

    // Permissive without the mesh entry's consent: named, and the listener stays mTLS.
    s.mesh = None;
    s.service_defaults = Some(defaults("permissive"));
    let d = build(&s, &settings(), None).unwrap();
    assert!(
        d.warnings
            .iter()
            .any(|w| w.contains("needs the mesh entry's AllowEnablingPermissiveMutualTLS")),
        "{:#?}",
        d.warnings
    );
    assert!(!d.sidecar().permissive);
    let index = crate::objects::index(&d);
    let public = index.unit("public").unwrap();
    assert!(public.rendered.is_empty());
    assert!(public.listeners[0].bind.line().contains(" ssl "));

    // With it: the public port is the front listener's, the mTLS listener takes PROXY
    // connections on its sockets, and intentions judge TLS connections only.
    s.mesh = Some(allow);
    let d = build(&s, &settings(), None).unwrap();
    assert!(d.warnings.is_empty(), "{:#?}", d.warnings);
    let p = d.sidecar();
    assert!(p.permissive);
    let index = crate::objects::index(&d);
    let public = index.unit("public").unwrap();
    let front = &public.rendered[0];
    assert_eq!(front.header, "frontend public_front");
    assert!(front.lines.contains(&format!(
        "bind {}:{} name public_front",
        p.bind_address, p.bind_port
    )));
    // Plaintext only when it was sent to the app's port (the transparent-proxy redirect), as
    // Consul's Envoy; a TLS hello is taken first, whatever the port.
    let rules: Vec<&str> = front
        .lines
        .iter()
        .map(String::as_str)
        .filter(|l| l.starts_with("tcp-request content"))
        .collect();
    assert_eq!(
        rules,
        [
            "tcp-request content accept if { req.ssl_hello_type 1 }",
            &format!(
                "tcp-request content reject unless {{ dst_port {} }}",
                p.app_port
            ),
        ],
        "{:#?}",
        front.lines
    );
    assert_ne!(p.app_port, p.bind_port);
    let l = &public.listeners[0];
    let bind = l.bind.line();
    assert!(
        bind.starts_with(&format!(
            "bind {} name public accept-proxy ssl ",
            d.paths.public_tls_socket.display()
        )),
        "{bind}"
    );
    assert!(l.bind.beyond_dataplane().is_some());
    let mut settings = settings();
    settings.intentions = true;
    let d = build(&s, &settings, None).unwrap();
    let p = d.sidecar();
    let lines = crate::objects::public_frontend(&d, p).lines(&crate::objects::public_bind(&d, p));
    assert!(
        lines.contains(&format!(
            "bind {} name public_plain accept-proxy",
            d.paths.public_plain_socket.display()
        )),
        "{lines:#?}"
    );
    assert!(
        lines.contains(
            &"tcp-request content reject if !{ var(sess.hcc.allow) -m bool } { ssl_fc }"
                .to_string()
        ),
        "{lines:#?}"
    );
}
