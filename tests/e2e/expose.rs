//! Exposed paths on real programs (Consul, HAProxy, Dataplane API): `Proxy.Expose.Paths` and
//! `Proxy.Expose.Checks` serve one path of a loopback-only app each, without mTLS, and nothing
//! else of it; plus Consul's own `case-expose-checks` (test/integration/connect/envoy) ported.

use std::net::TcpStream;
use std::time::Duration;

use crate::support::mesh::{sidecar, workdir};
use crate::support::*;
use serde_json::Value;

const T: Duration = Duration::from_secs(3);

/// `name`'s registration (app on 127.0.0.1:`app_port`, sidecar on `sidecar_port`) with the
/// proxy's `Expose` block and the service's own `Checks`.
fn registration(
    name: &str,
    app_port: u16,
    sidecar_port: u16,
    upstreams: &[(&str, u16)],
    expose: Value,
    checks: Value,
) -> String {
    let mut reg: Value = serde_json::from_str(&sidecar_registration(
        name,
        app_port,
        sidecar_port,
        upstreams,
    ))
    .unwrap();
    reg["Connect"]["SidecarService"]["Proxy"]["Expose"] = expose;
    reg["Checks"] = checks;
    reg.to_string()
}

fn listening(port: u16) -> bool {
    TcpStream::connect_timeout(&format!("127.0.0.1:{port}").parse().unwrap(), T).is_ok()
}

/// The agent's view of the HTTP check of `service` (its ID is `service:<service>` when it is
/// the only check, `service:<service>:<n>` otherwise).
fn check(consul: &Consul, service: &str) -> Value {
    let all = consul.get_json("/v1/agent/checks");
    all.as_object()
        .and_then(|m| {
            m.values()
                .find(|c| c["ServiceID"] == service && c["Type"] == "http")
        })
        .cloned()
        .unwrap_or(Value::Null)
}

#[test]
fn explicit_paths_serve_only_their_path_and_removing_one_closes_its_port() {
    let consul = Consul::start();
    let app = HttpApp::start("metrics of the app");
    let (sidecar_port, exposed) = (free_port(), free_port());
    let plain =
        |expose: Value| registration("web", app.port(), sidecar_port, &[], expose, Value::Null);
    consul.register(&plain(Value::Null));
    let base = TempDir::new("expose");
    let stats = format!("127.0.0.1:{}", free_port());
    let web = sidecar(&consul, &base, "web", false, &["-stats-addr", &stats]);
    wait_until(
        Duration::from_secs(60),
        "the sidecar to pass its checks",
        || consul.passing_connect_instances("web") == 1,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", web.logs()));
    let master = workdir(&base, "web").join("master.sock");
    let reloads_before = reloads(&master);

    // Added live: one validated reload (a full render: v1.2.5 cannot create the 404 rule).
    consul.register(&plain(serde_json::json!({"Paths": [{
        "Path": "/metrics", "LocalPathPort": app.port(), "ListenerPort": exposed, "Protocol": "http"
    }]})));
    let addr = format!("127.0.0.1:{exposed}");
    wait_until(
        Duration::from_secs(30),
        "/metrics on the exposed port",
        || matches!(http_get(&addr, "/metrics", T), Ok((200, b)) if b == "metrics of the app"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", web.logs()));
    assert_eq!(reloads(&master), reloads_before + 1, "{}", web.logs());

    // Plain HTTP, the exact path and its query strings only; the rest is HAProxy's 404.
    let served = app.requests();
    assert_eq!(http_get(&addr, "/metrics?format=text", T).unwrap().0, 200);
    for other in ["/secret", "/", "/metrics/x", "/metricsx", "/METRICS"] {
        let (status, _) = http_get(&addr, other, T).unwrap();
        assert_eq!(status, 404, "{other}");
    }
    assert_eq!(app.requests(), served + 1, "only /metrics reached the app");
    assert_eq!(app.requests_for("/secret"), 0);

    // Access logs and metrics name the path.
    wait_until(Duration::from_secs(10), "the access log of /secret", || {
        web.logs().lines().any(|l| {
            l.contains("[haproxy]")
                && l.contains(&format!("exp_{exposed}"))
                && l.contains("GET /secret")
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", web.logs()));
    let (_, metrics) = http_get(&stats, "/metrics", T).unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("haproxy_frontend_http_requests_total")
                && l.contains("exposed_path=\"/metrics\"")),
        "{metrics}"
    );

    // Removed live: the port closes, the public listener stays.
    consul.register(&plain(Value::Null));
    wait_until(Duration::from_secs(30), "the exposed port to close", || {
        !listening(exposed)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", web.logs()));
    assert!(listening(sidecar_port));
}

/// Waits until Consul's check of `service` passes, having requested the sidecar's exposed
/// listener on `port` (the check's output names the URL it requested).
fn wait_check_passes_through_sidecar(consul: &Consul, service: &str, port: u16, sidecar: &Child) {
    wait_until(Duration::from_secs(60), "the HTTP check to pass", || {
        let c = check(consul, service);
        c["Status"] == "passing"
            && c["Output"]
                .as_str()
                .is_some_and(|o| o.contains(&format!("127.0.0.1:{port}")))
    })
    .unwrap_or_else(|e| panic!("{e}\ncheck: {}\n{}", check(consul, service), sidecar.logs()));
}

#[test]
fn exposed_checks_pass_through_the_sidecar_and_nothing_else_reaches_the_app() {
    let exposed = free_port_pair();
    let consul = Consul::start_expose_from(exposed);
    let app = HttpApp::start("healthy");
    let sidecar_port = free_port();
    consul.register(&registration(
        "web",
        app.port(),
        sidecar_port,
        &[],
        serde_json::json!({"Checks": true}),
        serde_json::json!([{
            "Name": "web health", "HTTP": format!("http://127.0.0.1:{}/health", app.port()),
            "Interval": "1s", "Timeout": "1s"
        }]),
    ));
    // The agent runs the check against the sidecar's exposed port, not the app: nothing
    // listens there yet.
    wait_until(Duration::from_secs(20), "the check to run once", || {
        check(&consul, "web")["Output"]
            .as_str()
            .is_some_and(|o| o.contains(&format!("127.0.0.1:{exposed}/health")))
    })
    .unwrap();
    assert_ne!(check(&consul, "web")["Status"], "passing");
    assert_eq!(app.requests_for("/health"), 0);

    let base = TempDir::new("expose-checks");
    let web = sidecar(&consul, &base, "web", false, &[]);
    wait_check_passes_through_sidecar(&consul, "web", exposed, &web);
    assert!(app.requests_for("/health") > 0);

    let addr = format!("127.0.0.1:{exposed}");
    assert_eq!(http_get(&addr, "/secret", T).unwrap().0, 404);
    assert_eq!(http_get(&addr, "/health?verbose=1", T).unwrap().0, 200);
    assert_eq!(
        app.requests_for("/secret"),
        0,
        "/secret never reached the app"
    );
}

/// Consul's `case-expose-checks`: s1 reaches s2 through its upstream; s2, with
/// `expose { checks = true }` and an HTTP check on `/debug`, is healthy and exposes exactly one
/// listener, whose only route is the path `/debug`.
#[test]
fn case_expose_checks() {
    let exposed = free_port_pair();
    let consul = Consul::start_expose_from(exposed);
    let (s1_app, s2_app) = (HttpApp::start("s1"), HttpApp::start("hello"));
    let (s1_port, s2_port, upstream) = (free_port(), free_port(), free_port());
    consul.register(&registration(
        "s1",
        s1_app.port(),
        s1_port,
        &[("s2", upstream)],
        Value::Null,
        Value::Null,
    ));
    consul.register(&registration(
        "s2",
        s2_app.port(),
        s2_port,
        &[],
        serde_json::json!({"Checks": true}),
        serde_json::json!([{
            "Name": "http", "HTTP": format!("http://127.0.0.1:{}/debug", s2_app.port()),
            "Method": "GET", "Interval": "1s", "Timeout": "1s"
        }]),
    ));
    let base = TempDir::new("case-expose-checks");
    let s1 = sidecar(&consul, &base, "s1", false, &[]);
    let s2 = sidecar(&consul, &base, "s2", false, &[]);

    // "s1 proxy listener should be up and have right cert" / "s2 …": the mesh listeners serve
    // mTLS (a plain request is refused by the TLS handshake, not answered) and present their
    // service's SPIFFE ID.
    for (name, port, sidecar) in [("s1", s1_port, &s1), ("s2", s2_port, &s2)] {
        wait_until(Duration::from_secs(60), "the public listener", || {
            listening(port)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.logs()));
        assert!(http_get(&format!("127.0.0.1:{port}"), "/", T).is_err());
        let sans = presented_sans(port);
        assert!(
            sans.contains("URI:spiffe://") && sans.contains(&format!("/svc/{name}\n")),
            "{name} presents {sans:?}"
        );
    }
    // "s2 proxy should be healthy": its check passes through the exposed listener.
    wait_check_passes_through_sidecar(&consul, "s2", exposed, &s2);
    wait_until(Duration::from_secs(30), "s2 healthy in the catalog", || {
        consul.passing_connect_instances("s2") == 1
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s2.logs()));
    // "s1 upstream should be able to connect to s2".
    let addr = format!("127.0.0.1:{upstream}");
    wait_until(Duration::from_secs(30), "s1 to reach s2", || {
        matches!(http_request(&addr, "POST", "/", Some(b"hello"), T), Ok(r) if r.status == 200 && r.body == "hello")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s1.logs()));
    // "s2 exposes checks on a new listener": exactly one, plain, matching exactly /debug.
    let cfg = std::fs::read_to_string(workdir(&base, "s2").join("haproxy.cfg")).unwrap();
    // The file as the Dataplane API last wrote it (it pads section headers with a space).
    let exposed_frontends: Vec<&str> = cfg
        .lines()
        .map(str::trim_end)
        .filter(|l| l.starts_with("frontend exp_"))
        .collect();
    assert_eq!(
        exposed_frontends,
        [format!("frontend exp_{exposed}")],
        "{cfg}"
    );
    let rules: Vec<&str> = cfg
        .lines()
        .map(str::trim)
        .filter(|l| l.starts_with("http-request return"))
        .collect();
    assert_eq!(
        rules,
        ["http-request return status 404 unless { path /debug }"],
        "{cfg}"
    );
    let probe = format!("127.0.0.1:{exposed}");
    assert_eq!(
        http_get(&probe, "/debug", T).unwrap(),
        (200, "hello".into())
    );
    assert_eq!(http_get(&probe, "/debug/x", T).unwrap().0, 404);
    assert_eq!(s2_app.requests_for("/debug/x"), 0);
}

/// `case-expose-checks` also asserts that a check's listener admits only the local agent
/// (Envoy's filter chain matches loopback and the agent's address). The node runs in a
/// network namespace of its own (tests/e2e/support/netns.rs) so that another host can try: its
/// connection to the check's listener is refused before a byte is read, while the node itself
/// and, for the other host, an explicit `Expose.Paths` listener still serve.
#[test]
fn exposed_check_listeners_refuse_other_hosts() {
    use crate::support::netns::{can_create_namespaces, Net};
    if !can_create_namespaces() {
        eprintln!("expose: SKIPPED: network namespaces need root (CI runs as root)");
        return;
    }
    let net = Net::new(&["node", "outsider"]);
    let (node, outsider) = (net.host("node"), net.host("outsider"));
    // Everything of the node starts on this thread, inside its namespace, so every child
    // process inherits it; all of it is dropped (and stopped by PID) before the thread ends.
    node.run(|| {
        let exposed = free_port_pair();
        let consul = Consul::start_expose_from(exposed);
        let app = HttpApp::start("healthy");
        let (sidecar_port, metrics_port) = (free_port(), free_port());
        consul.register(&registration(
            "web",
            app.port(),
            sidecar_port,
            &[],
            serde_json::json!({"Checks": true, "Paths": [{
                "Path": "/metrics", "LocalPathPort": app.port(), "ListenerPort": metrics_port
            }]}),
            serde_json::json!([{
                "Name": "web health", "HTTP": format!("http://127.0.0.1:{}/health", app.port()),
                "Interval": "1s", "Timeout": "1s"
            }]),
        ));
        let base = TempDir::new("expose-sources");
        let web = sidecar(&consul, &base, "web", false, &[]);
        wait_check_passes_through_sidecar(&consul, "web", exposed, &web);

        // The agent's address is 127.0.0.1 here, already in the rule.
        let cfg_path = workdir(&base, "web").join("haproxy.cfg");
        let rule = "tcp-request connection reject unless { src 127.0.0.0/8 ::1 }";
        wait_until(
            Duration::from_secs(20),
            "the check listener's source rule",
            || std::fs::read_to_string(&cfg_path).is_ok_and(|c| c.contains(rule)),
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n{}\n{}",
                std::fs::read_to_string(&cfg_path).unwrap_or_default(),
                web.logs()
            )
        });
        let cfg = std::fs::read_to_string(&cfg_path).unwrap();
        assert_eq!(
            cfg.matches("tcp-request connection reject").count(),
            1,
            "{cfg}"
        );

        // This host: admitted.
        assert_eq!(
            http_get(&format!("127.0.0.1:{exposed}"), "/health", T).unwrap(),
            (200, "healthy".into())
        );
        // Another host: refused; its explicit path is open to it.
        let (refused, open) = outsider.run(|| {
            (
                http_get(&node.at(exposed), "/health", T),
                http_get(&node.at(metrics_port), "/metrics", T),
            )
        });
        assert!(
            refused.is_err(),
            "another host reached the check listener: {refused:?}\n{cfg}"
        );
        assert_eq!(open.unwrap(), (200, "healthy".into()));
    });
    net.remove_and_check();
}
