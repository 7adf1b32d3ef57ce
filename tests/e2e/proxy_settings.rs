//! The proxy settings a drop-in replacement of the Go original must honour, on a real mesh:
//! Consul's `local_request_timeout_ms` (504 from HAProxy for a slow app),
//! `max_inbound_connections` (the public listener's `maxconn`), the original's
//! `enable_forwardfor` and `appname_header` as the app sees them, and an upstream's
//! `read_timeout` closing an idle connection, `X-Forwarded-Client-Cert` as Consul's Envoy sets
//! it and an upstream's passive health check ejecting a failing instance. Each is set by
//! re-registering a running sidecar, so each also reaches a running HAProxy.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::mesh::{same_as_fresh_render, Mesh, MeshOptions, APP_BODY};
use crate::support::*;
use serde_json::{json, Value};

/// `sidecar_registration` with a `Proxy.Config` and, on every upstream, a `Config`.
fn registration(
    name: &str,
    port: u16,
    sidecar_port: u16,
    upstreams: &[(&str, u16)],
    proxy_config: Value,
    upstream_config: Value,
) -> String {
    let mut r: Value =
        serde_json::from_str(&sidecar_registration(name, port, sidecar_port, upstreams)).unwrap();
    let proxy = &mut r["Connect"]["SidecarService"]["Proxy"];
    proxy["Config"] = proxy_config;
    if let Some(ups) = proxy["Upstreams"].as_array_mut() {
        for u in ups {
            u["Config"] = upstream_config.clone();
        }
    }
    r.to_string()
}

/// Re-registers `server`'s sidecar with `config` plus a `local_connect_timeout_ms` of
/// `marker` and waits until the change was applied (HAProxy reloaded with it). The marker, not
/// the setting under test, tells that the change arrived: a test whose setting is broken then
/// fails on what the traffic shows, not on a missing line.
fn configure_server(mesh: &Mesh, mut config: Value, marker: u64) {
    config["local_connect_timeout_ms"] = json!(marker);
    mesh.consul.register(&registration(
        "server",
        mesh.app.port(),
        mesh.server_port,
        &[],
        config,
        Value::Null,
    ));
    wait_for_lines(
        mesh,
        "server",
        &[&format!("timeout connect {marker}")],
        &mesh.server_sidecar,
    );
}

/// How many batches of changes the sidecar has applied so far (its log says so once each).
fn applied(sidecar: &Child) -> usize {
    sidecar.logs().matches(" applied in ").count()
}

/// Waits until `service`'s haproxy.cfg holds every line of `want`, then until the sidecar
/// logs one more applied batch than it had when the file first held them: the file is written
/// before HAProxy reloads with it, and the batch is logged after the reload (an earlier,
/// unrelated batch must not count, or a connection could reach the old worker, which keeps it
/// with the old settings).
fn wait_for_lines(mesh: &Mesh, service: &str, want: &[&str], sidecar: &Child) {
    let cfg = mesh.workdir(service).join("haproxy.cfg");
    let fail = |e: String| -> ! {
        panic!(
            "{e}\n{}\n{}",
            std::fs::read_to_string(&cfg).unwrap_or_default(),
            sidecar.logs()
        )
    };
    let mut seen = 0;
    wait_until(
        Duration::from_secs(60),
        &format!("{want:?} in {service}'s haproxy.cfg"),
        || {
            let text = std::fs::read_to_string(&cfg).unwrap_or_default();
            seen = applied(sidecar);
            want.iter().all(|w| text.contains(w))
        },
    )
    .unwrap_or_else(|e| fail(e));
    wait_until(
        Duration::from_secs(60),
        &format!("{service}'s sidecar to apply {want:?}"),
        || applied(sidecar) > seen,
    )
    .unwrap_or_else(|e| fail(e));
}

/// Re-registers `client` with `upstream_config` plus a `connect_timeout_ms` of `marker` on its
/// upstream, waits until its sidecar applied that (and holds each of `lines`), then until the
/// mesh serves (see `configure_server`).
fn configure_client(mesh: &Mesh, mut upstream_config: Value, marker: u64, lines: &[&str]) {
    upstream_config["connect_timeout_ms"] = json!(marker);
    mesh.consul.register(&registration(
        "client",
        free_port(),
        mesh.client_port,
        &[("server", mesh.upstream_port)],
        Value::Null,
        upstream_config,
    ));
    let marker = format!("timeout connect {marker}");
    let mut want = vec![marker.as_str()];
    want.extend_from_slice(lines);
    wait_for_lines(mesh, "client", &want, &mesh.client_sidecar);
    wait_served(mesh);
}

/// Waits until a request through the client's upstream is answered by the app again (a
/// re-registration can make Consul re-check the instance).
fn wait_served(mesh: &Mesh) {
    let addr = mesh.upstream_addr();
    wait_until(
        Duration::from_secs(60),
        "an answer through the mesh",
        || matches!(http_get(&addr, "/", Duration::from_secs(5)), Ok((200, b)) if b == APP_BODY),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
}

/// An http public listener with `local_request_timeout_ms`, `enable_forwardfor` and
/// `appname_header` (intentions on, so the agent names the caller): the app sees
/// `X-Forwarded-For` and the caller's service in the header (never what the client sent under
/// that name), and a slow app is answered 504 by HAProxy. A key the sidecar does not read is
/// logged once, however often the registration changes.
#[test]
fn http_settings_reach_the_app_and_a_slow_app_gets_504() {
    let mesh = Mesh::start(MeshOptions {
        intentions: true,
        ..Default::default()
    });
    let config = |request_ms: u64| {
        json!({
            "protocol": "http",
            "local_request_timeout_ms": request_ms,
            "enable_forwardfor": true,
            "appname_header": "X-Hcc-App",
            "envoy_stats_bind_addr": "0.0.0.0:9102",
        })
    };
    configure_server(&mesh, config(1000), 4001);
    wait_served(&mesh);

    let addr = mesh.upstream_addr();
    let r = http_request_with(
        &addr,
        "GET",
        "/",
        &[("X-Hcc-App", "forged")],
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let head = mesh.app.last_request_head();
    assert!(head.contains("x-forwarded-for: 127.0.0.1"), "{head}");
    assert!(head.contains("x-hcc-app: client\r\n"), "{head}");
    assert!(!head.contains("forged"), "{head}");

    // Slower than the request timeout: HAProxy answers 504 itself.
    mesh.app.set_delay(Duration::from_secs(5));
    let r = http_request(&addr, "GET", "/", None, Duration::from_secs(30)).unwrap();
    assert_eq!(r.status, 504, "{r:?}");
    mesh.app.set_delay(Duration::ZERO);

    // A changed timeout reaches the running HAProxy; the unknown key is still named once.
    configure_server(&mesh, config(1500), 4002);
    let cfg = std::fs::read_to_string(mesh.workdir("server").join("haproxy.cfg")).unwrap();
    assert!(cfg.contains("timeout server 1500"), "{cfg}");
    wait_served(&mesh);
    let logs = mesh.server_sidecar.logs();
    let named = logs
        .matches("\"envoy_stats_bind_addr\" is Envoy's; ignored")
        .count();
    assert_eq!(named, 1, "{logs}");
}

/// `max_inbound_connections 1`: while one connection is served, HAProxy accepts no other on
/// the public listener; the second connection waits in the kernel's backlog and is served
/// once the first ends (HAProxy's `maxconn` refuses nothing).
#[test]
fn max_inbound_connections_holds_the_second_connection_until_the_first_ends() {
    let mesh = Mesh::start(MeshOptions::default());
    configure_server(&mesh, json!({ "max_inbound_connections": 1 }), 4001);
    wait_served(&mesh);

    let addr = mesh.upstream_addr();
    let finished = Arc::new(AtomicU64::new(0));
    let request = |name: &'static str| {
        let (addr, finished) = (addr.clone(), finished.clone());
        std::thread::spawn(move || {
            let r = http_get(&addr, "/", Duration::from_secs(120));
            (name, r, finished.fetch_add(1, Ordering::SeqCst))
        })
    };
    // The first is slow at the app; the second would be answered at once if it got in.
    mesh.app.set_delay(Duration::from_secs(10));
    let before = mesh.app.requests();
    let first = request("first");
    wait_until(
        Duration::from_secs(30),
        "the first request at the app",
        || mesh.app.requests() > before,
    )
    .unwrap();
    mesh.app.set_delay(Duration::ZERO);
    let second = request("second");
    let (a, b) = (first.join().unwrap(), second.join().unwrap());
    for (name, r, _) in [&a, &b] {
        assert!(
            matches!(r, Ok((200, body)) if body == APP_BODY),
            "{name}: {r:?}"
        );
    }
    assert!(
        a.2 < b.2,
        "the second connection was served while the first held the only slot"
    );
}

/// An upstream's `read_timeout` (the Go original's key): an idle connection to the upstream
/// listener is closed by HAProxy after it, not kept for the defaults section's hour.
#[test]
fn an_upstreams_read_timeout_closes_an_idle_connection() {
    let mesh = Mesh::start(MeshOptions::default());
    configure_client(&mesh, json!({ "read_timeout": "1s" }), 4001, &[]);

    let mut idle = TcpStream::connect(mesh.upstream_addr()).unwrap();
    // A request head never finished: the app waits for the rest, and the connection carries
    // data, so HAProxy logs it (`option dontlognull` leaves out connections that carry none).
    idle.write_all(b"GET / HTTP/1.1\r\n").unwrap();
    // A guard only, past the test app's own 30 s idle limit: something closes the connection
    // in the end either way, and HAProxy's log says who.
    idle.set_read_timeout(Some(Duration::from_secs(90)))
        .unwrap();
    let mut buf = [0u8; 64];
    match idle.read(&mut buf) {
        Ok(0) => {}
        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => {}
        other => panic!(
            "the idle connection was not closed: {other:?}\n{}",
            mesh.client_sidecar.logs()
        ),
    }
    // The upstream listener's access log: termination state `cD`, the client-side timeout
    // during the data phase, which only `timeout client` (the read_timeout) gives here. Were it
    // the app's own idle limit, the log would say the server side closed (`SD`).
    let closed_by_timeout = |logs: &str| {
        logs.lines()
            .any(|l| l.contains("[haproxy]") && l.contains(" up_svc_server_") && l.contains(" cD "))
    };
    wait_until(
        Duration::from_secs(10),
        "the access log of the idle connection",
        || closed_by_timeout(&mesh.client_sidecar.logs()),
    )
    .unwrap_or_else(|e| {
        let logs = mesh.client_sidecar.logs();
        let access: Vec<&str> = logs
            .lines()
            .filter(|l| l.contains(" up_svc_server_"))
            .collect();
        panic!("{e}: HAProxy did not close it for the read timeout\n{access:#?}")
    });
}

/// Timeouts, the connection cap and `option forwardfor` reach HAProxy through one Dataplane
/// API transaction (fields of the v1.2.5 models), and the file those deltas give describes the
/// same HAProxy objects as a from-scratch render of the same registration (as
/// `tests/e2e/mesh_deltas.rs` checks for the rest).
#[test]
fn local_settings_through_the_dataplane_api_match_a_fresh_render() {
    let mesh = Mesh::start(MeshOptions::default());
    // The public listener's mode first: a mode change is a full render (its rules for either
    // mode are rendered only); the settings after it ride a transaction.
    configure_server(&mesh, json!({"protocol": "http"}), 4000);
    let renders = mesh
        .server_sidecar
        .logs()
        .matches("rendering the whole configuration instead")
        .count();
    configure_server(
        &mesh,
        json!({
            "protocol": "http",
            "local_request_timeout_ms": 700,
            "read_timeout": "20s",
            "max_inbound_connections": 64,
            "enable_forwardfor": true,
        }),
        4001,
    );
    let workdir = mesh.workdir("server");
    let applied = std::fs::read_to_string(workdir.join("haproxy.cfg")).unwrap();
    assert!(
        applied.contains("# _version="),
        "the Dataplane API wrote this file"
    );
    for want in [
        "maxconn 64",
        "timeout client 20000",
        "timeout server 700",
        "option forwardfor",
    ] {
        assert!(applied.contains(want), "{want} missing:\n{applied}");
    }
    let logs = mesh.server_sidecar.logs();
    assert_eq!(
        logs.matches("rendering the whole configuration instead")
            .count(),
        renders,
        "a transaction, not a full render:\n{logs}"
    );
    same_as_fresh_render(&mesh, "server", &[], &applied, &workdir);
    wait_served(&mesh);
}

/// An upstream's `poll_interval` (the Go original's key) sets how often its prepared query is
/// executed again, and a new value restarts the poll at once.
#[test]
fn a_prepared_querys_poll_interval_is_followed_and_restarted_when_changed() {
    let mesh = Mesh::start(MeshOptions::default());
    let (status, body) = mesh.consul.post(
        "/v1/query",
        &json!({ "Name": "pq-server", "Service": { "Service": "server" } }).to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let pq_port = free_port();
    let register = |every: &str| {
        let mut r: Value = serde_json::from_str(&sidecar_registration(
            "client",
            free_port(),
            mesh.client_port,
            &[("server", mesh.upstream_port)],
        ))
        .unwrap();
        let ups = &mut r["Connect"]["SidecarService"]["Proxy"]["Upstreams"];
        ups.as_array_mut().unwrap().push(json!({
            "DestinationType": "prepared_query",
            "DestinationName": "pq-server",
            "LocalBindPort": pq_port,
            "Config": { "poll_interval": every },
        }));
        mesh.consul.register(&r.to_string());
    };
    let polling = |ms: u64| {
        let line = format!("polling prepared query pq-server every {ms} ms");
        wait_until(Duration::from_secs(60), &line, || {
            mesh.client_sidecar.logs().contains(&line)
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    };
    register("700ms");
    polling(700);
    let addr = format!("127.0.0.1:{pq_port}");
    wait_until(
        Duration::from_secs(60),
        "an answer through the prepared query",
        || matches!(http_get(&addr, "/", Duration::from_secs(5)), Ok((200, b)) if b == APP_BODY),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    register("900ms");
    polling(900);
}

/// One TLS handshake with the public listener at `addr` by `openssl s_client` limited to one
/// version (`-tls1_2`, `-tls1_3`), presenting `client`'s leaf: the version it negotiated, or
/// `None` when there was no handshake.
fn handshake(
    addr: &str,
    version: &str,
    cert: &std::path::Path,
    key: &std::path::Path,
) -> Option<String> {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", addr, version, "-cert"])
        .arg(cert)
        .arg("-key")
        .arg(key)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl must be installed");
    let text = String::from_utf8_lossy(&out.stdout);
    // s_client prints the session as `New, TLSv1.3, Cipher is …` once a handshake completed.
    text.lines()
        .find_map(|l| l.strip_prefix("New, "))
        .filter(|l| !l.starts_with("(NONE)"))
        .and_then(|l| l.split(',').next())
        .map(str::to_string)
}

/// The `mesh` entry's `TLS.Incoming.TLSMinVersion TLSv1_3` (and the same for `Outgoing`):
/// the public listener completes no TLS 1.2 handshake and completes a TLS 1.3 one, and the
/// mesh between the two sidecars keeps serving. On Consul 1.8, which has no `mesh` kind, the
/// sidecar says so once and serves as before.
#[test]
fn mesh_tls_min_version_refuses_tls_1_2_on_the_public_listener() {
    let mesh = Mesh::start(MeshOptions::default());
    if !consul_is_current() {
        let logs = mesh.server_sidecar.logs();
        assert_eq!(
            logs.matches("has no mesh config entries").count(),
            1,
            "{logs}"
        );
        return;
    }
    let addr = format!("127.0.0.1:{}", mesh.server_port);
    let (cert, key, _) = mesh.consul.leaf_files("client", mesh.base.path());
    assert_eq!(
        handshake(&addr, "-tls1_2", &cert, &key).as_deref(),
        Some("TLSv1.2"),
        "before the mesh entry, TLS 1.2 is HAProxy's (and Envoy's) minimum"
    );
    let entry = json!({
        "Kind": "mesh",
        "TLS": {
            "Incoming": {"TLSMinVersion": "TLSv1_3"},
            "Outgoing": {"TLSMinVersion": "TLSv1_3"}
        }
    });
    let (status, body) = mesh.consul.put("/v1/config", &entry.to_string());
    assert!(status == 200 && body.trim() == "true", "{status} {body}");
    wait_for_lines(
        &mesh,
        "server",
        &["verify required ssl-min-ver TLSv1.3"],
        &mesh.server_sidecar,
    );
    assert_eq!(
        handshake(&addr, "-tls1_2", &cert, &key),
        None,
        "a TLS 1.2 handshake completed at TLSMinVersion TLSv1_3"
    );
    assert_eq!(
        handshake(&addr, "-tls1_3", &cert, &key).as_deref(),
        Some("TLSv1.3")
    );
    // `--dry-run` prints what a run renders: the mesh entry's versions too.
    let printed = dry_run(&mesh.consul.http_addr(), mesh.base.path(), "server", &[]);
    assert!(
        printed.contains("verify required ssl-min-ver TLSv1.3"),
        "{printed}"
    );
    // The client's servers ask for TLS 1.3 too, and the mesh keeps serving over it.
    let client_cfg = mesh.workdir("client").join("haproxy.cfg");
    wait_until(
        Duration::from_secs(60),
        "TLS 1.3 on the client's servers",
        || {
            std::fs::read_to_string(&client_cfg)
                .unwrap_or_default()
                .lines()
                .any(|l| l.contains("server s0 ") && l.contains("ssl-min-ver TLSv1.3"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    wait_served(&mesh);
}

/// The current queue of `backend` in the client sidecar's HAProxy (`qcur` of its `BACKEND`
/// row of `show stat`).
fn queued(mesh: &Mesh, backend_prefix: &str) -> u64 {
    use std::os::unix::net::UnixStream;
    let sock = mesh.workdir("client").join("haproxy.sock");
    let Ok(mut s) = UnixStream::connect(&sock) else {
        return 0;
    };
    let _ = s.write_all(b"show stat\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.lines()
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.len() > 2 && f[0].starts_with(backend_prefix) && f[1] == "BACKEND")
        .and_then(|f| f[2].parse().ok())
        .unwrap_or(0)
}

/// An upstream's `limits` (Consul's circuit breakers) with one instance: `MaxConnections 1`
/// and `MaxPendingRequests 0`, two concurrent slow requests: one is served, the other gets 503
/// from HAProxy at once and never reaches the app. With `MaxPendingRequests 1` one request
/// may wait: of three, two are served and the third gets 503.
#[test]
fn upstream_limits_answer_503_past_the_cap_and_the_queue() {
    let mesh = Mesh::start(MeshOptions::default());
    let configure = |pending: u64, marker: u64| {
        let config = json!({
            "protocol": "http",
            "limits": {"MaxConnections": 1, "MaxPendingRequests": pending},
        });
        configure_client(&mesh, config, marker, &[" maxconn 1"]);
    };
    let addr = mesh.upstream_addr();
    let request = || {
        let addr = addr.clone();
        std::thread::spawn(move || http_get(&addr, "/", Duration::from_secs(60)))
    };
    let at_app = |n: u64| {
        wait_until(Duration::from_secs(30), "the request at the app", || {
            mesh.app.requests() >= n
        })
        .unwrap()
    };

    // A connect timeout (HAProxy's queue timeout when none is set) far past the app's delay:
    // only the limits can refuse a request here.
    configure(0, 20001);
    mesh.app.set_delay(Duration::from_secs(4));
    let before = mesh.app.requests();
    let first = request();
    at_app(before + 1);
    let second = http_get(&addr, "/", Duration::from_secs(30));
    assert!(matches!(second, Ok((503, _))), "{second:?}");
    assert!(matches!(first.join().unwrap(), Ok((200, ref b)) if b == APP_BODY));
    assert_eq!(
        mesh.app.requests(),
        before + 1,
        "the refused request reached the app"
    );

    mesh.app.set_delay(Duration::ZERO);
    configure(1, 20002);
    mesh.app.set_delay(Duration::from_secs(4));
    let before = mesh.app.requests();
    let first = request();
    at_app(before + 1);
    let second = request();
    wait_until(Duration::from_secs(30), "the second request queued", || {
        queued(&mesh, "be_up_svc_server") == 1
    })
    .unwrap();
    let third = http_get(&addr, "/", Duration::from_secs(30));
    assert!(matches!(third, Ok((503, _))), "{third:?}");
    mesh.app.set_delay(Duration::ZERO);
    for r in [first.join().unwrap(), second.join().unwrap()] {
        assert!(matches!(r, Ok((200, ref b)) if b == APP_BODY), "{r:?}");
    }
    assert_eq!(mesh.app.requests(), before + 2);
}

/// proxy-defaults' `AccessLogs` with a `TextFormat`: HAProxy's access lines follow it (Envoy's
/// operators mapped), an operator without an equivalent logs `-` and is named once, and a
/// `Type` that cannot be honoured (stderr) is named once too. On Consul 1.8 (no
/// `AccessLogs`) the test says it skipped.
#[test]
fn access_logs_from_proxy_defaults_shape_haproxys_access_lines() {
    if !consul_is_current() {
        eprintln!(
            "skipped on Consul {}: AccessLogs exist from Consul 1.15",
            consul_version()
        );
        return;
    }
    let mesh = Mesh::start(MeshOptions::default());
    let entry = json!({
        "Kind": "proxy-defaults", "Name": "global",
        "Config": {"protocol": "http"},
        "AccessLogs": {"Enabled": true, "Type": "stderr",
            "TextFormat": "hcc-access %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %REQ(X-TRACE)%"},
    });
    let (status, body) = mesh.consul.put("/v1/config", &entry.to_string());
    assert!(status == 200 && body.trim() == "true", "{status} {body}");
    wait_for_lines(
        &mesh,
        "server",
        &["log-format \"hcc-access %HM %HU %ST -\""],
        &mesh.server_sidecar,
    );
    wait_served(&mesh);
    let addr = mesh.upstream_addr();
    assert!(matches!(
        http_get(&addr, "/logged?x=1", Duration::from_secs(10)),
        Ok((200, _))
    ));
    wait_until(Duration::from_secs(10), "the access line", || {
        mesh.server_sidecar
            .logs()
            .lines()
            .any(|l| l.contains("[haproxy]") && l.contains("hcc-access GET /logged?x=1 200 -"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    let logs = mesh.server_sidecar.logs();
    assert_eq!(
        logs.matches("operator %REQ(X-TRACE)% has no HAProxy equivalent")
            .count(),
        1,
        "{logs}"
    );
    assert_eq!(
        logs.matches("AccessLogs Type \"stderr\" is not honoured")
            .count(),
        1,
        "{logs}"
    );
}

/// What `openssl x509 -noout <args>` prints of the first certificate in `pem_file`.
fn openssl_x509(pem_file: &std::path::Path, args: &[&str]) -> String {
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout"])
        .args(args)
        .arg("-in")
        .arg(pem_file)
        .output()
        .expect("openssl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The SHA-256 of the first certificate in `pem_file`, lower-case hex, as Envoy's `Hash`.
fn leaf_sha256(pem_file: &std::path::Path) -> String {
    let text = openssl_x509(pem_file, &["-fingerprint", "-sha256"]);
    let (_, hex) = text.trim().split_once('=').expect("a fingerprint line");
    hex.replace(':', "").to_ascii_lowercase()
}

/// Envoy's percent-encoding of a PEM block undone (`%0A`, `%20`, `%2B`, `%2F`, `%3D`).
fn url_decoded(s: &str) -> String {
    s.replace("%0A", "\n")
        .replace("%20", " ")
        .replace("%2B", "+")
        .replace("%2F", "/")
        .replace("%3D", "=")
}

/// An http public listener with intentions on sets `X-Forwarded-Client-Cert` as Consul's
/// Envoy does: `By` is the server's own SPIFFE ID, `Hash` the SHA-256 of the client's leaf,
/// `Cert` that leaf as URL-encoded PEM, `URI` the client's SPIFFE ID. What the client sent
/// under that name never reaches the app.
#[test]
fn xfcc_names_the_client_by_its_certificate_never_by_what_it_sent() {
    let mesh = Mesh::start(MeshOptions {
        intentions: true,
        ..Default::default()
    });
    configure_server(&mesh, json!({ "protocol": "http" }), 4001);
    wait_served(&mesh);

    let r = http_request_with(
        &mesh.upstream_addr(),
        "GET",
        "/",
        &[(
            "X-Forwarded-Client-Cert",
            "By=forged;URI=spiffe://forged.consul/ns/default/dc/dc1/svc/admin",
        )],
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 200, "{r:?}");
    let head = mesh.app.last_request_head();
    assert!(!head.contains("forged"), "{head}");
    let values: Vec<&str> = head
        .lines()
        .filter_map(|l| l.split_once(':'))
        .filter(|(n, _)| n.eq_ignore_ascii_case("x-forwarded-client-cert"))
        .map(|(_, v)| v.trim())
        .collect();
    assert_eq!(values.len(), 1, "{head}");
    let fields: Vec<(&str, &str)> = values[0]
        .split(';')
        .map(|f| f.split_once('=').expect("key=value"))
        .collect();
    // The test app keeps the head lower-cased: compared as such (the unit tests of the
    // agent and the rules check the exact spelling).
    let keys: Vec<&str> = fields.iter().map(|(k, _)| *k).collect();
    assert_eq!(
        keys,
        ["by", "hash", "cert", "chain", "subject", "uri"],
        "{head}"
    );
    let field = |k: &str| fields.iter().find(|(n, _)| *n == k).unwrap().1;
    let td = mesh.consul.trust_domain().to_ascii_lowercase();
    assert_eq!(
        field("by"),
        format!("spiffe://{td}/ns/default/dc/dc1/svc/server")
    );
    assert_eq!(
        field("uri"),
        format!("spiffe://{td}/ns/default/dc/dc1/svc/client")
    );
    let client_leaf = mesh.workdir("client").join("certs").join("leaf.pem");
    assert_eq!(field("hash"), leaf_sha256(&client_leaf));
    let leaf_text = std::fs::read_to_string(&client_leaf).unwrap();
    let end = "-----END CERTIFICATE-----\n";
    let first_pem = leaf_text[..leaf_text.find(end).unwrap() + end.len()].to_ascii_lowercase();
    let cert = url_decoded(&field("cert").trim_matches('"').to_ascii_uppercase());
    assert_eq!(cert.to_ascii_lowercase(), first_pem);
    let chain = url_decoded(&field("chain").trim_matches('"').to_ascii_uppercase());
    assert!(chain.to_ascii_lowercase().starts_with(&first_pem));
    // Empty for Consul 1.16's leaves, the legacy CN for 1.8's: as OpenSSL writes RFC 2253.
    let subject = openssl_x509(&client_leaf, &["-subject", "-nameopt", "RFC2253"]);
    let subject = subject.trim().trim_start_matches("subject=").trim();
    assert_eq!(
        field("subject"),
        format!("\"{}\"", subject.to_ascii_lowercase())
    );
}

/// Starts another instance of `server` (its own app answering `body` and its own sidecar),
/// registered under `id`.
fn server_instance(mesh: &Mesh, id: &str, body: &str) -> (HttpApp, Child) {
    let app = HttpApp::start(body);
    let mut reg: Value =
        serde_json::from_str(&sidecar_registration(id, app.port(), free_port(), &[])).unwrap();
    reg["Name"] = "server".into();
    mesh.consul.register(&reg.to_string());
    let sidecar = crate::support::mesh::sidecar(&mesh.consul, &mesh.base, id, false, &[]);
    (app, sidecar)
}

/// An upstream's `passive_health_check`: of two instances, the one answering 500s is ejected
/// after `MaxFailures` of them and gets no request until `BaseEjectionTime` has passed, then
/// is tried again; the healthy one is never ejected and answers every other request.
#[test]
fn passive_health_check_ejects_a_failing_instance_for_the_base_ejection_time() {
    let mesh = Mesh::start(MeshOptions::default());
    let (bad, _bad_sidecar) = server_instance(&mesh, "server-2", "failing");
    let addr = mesh.upstream_addr();
    wait_until(
        Duration::from_secs(60),
        "the second instance to serve",
        || {
            let _ = http_get(&addr, "/", Duration::from_secs(5));
            bad.requests() > 0
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let ejection = Duration::from_secs(8);
    configure_client(
        &mesh,
        json!({
            "protocol": "http",
            "passive_health_check": {
                "max_failures": 3, "base_ejection_time": "8s", "max_ejection_percent": 100,
            },
        }),
        20001,
        &[" observe layer7 error-limit 3 on-error mark-down rise "],
    );
    wait_until(
        Duration::from_secs(60),
        "both instances in rotation",
        || {
            let before = bad.requests();
            let _ = http_get(&addr, "/", Duration::from_secs(5));
            let _ = http_get(&addr, "/", Duration::from_secs(5));
            bad.requests() > before
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));

    bad.fail_next(1_000_000, 500);
    let before = bad.requests();
    let mut failures = 0;
    for _ in 0..40 {
        match http_get(&addr, "/", Duration::from_secs(5)) {
            Ok((200, b)) => assert_eq!(b, APP_BODY),
            Ok((500, _)) => failures += 1,
            other => panic!("{other:?}"),
        }
        if bad.requests() - before >= 3 {
            break;
        }
    }
    let ejected_at = std::time::Instant::now();
    assert_eq!(bad.requests() - before, 3, "three 500s, then ejected");
    assert_eq!(failures, 3);

    // Out for the ejection time: every request is the healthy instance's.
    let healthy_before = mesh.app.requests();
    while ejected_at.elapsed() < ejection - Duration::from_secs(2) {
        let r = http_get(&addr, "/", Duration::from_secs(5));
        assert!(matches!(r, Ok((200, ref b)) if b == APP_BODY), "{r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert_eq!(
        bad.requests() - before,
        3,
        "an ejected instance was sent a request"
    );
    assert!(mesh.app.requests() > healthy_before + 10);

    // Then back in rotation (and ejected again by its next failures).
    wait_until(Duration::from_secs(20), "the ejected instance back", || {
        let _ = http_get(&addr, "/", Duration::from_secs(5));
        bad.requests() - before > 3
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let back = ejected_at.elapsed();
    assert!(
        back >= ejection - Duration::from_secs(2),
        "back after {back:?}"
    );
    // HAProxy's own count of each server's falls: the failing one's, never the healthy one's.
    let downs = downs_by_address(&mesh, "be_up_svc_server");
    let healthy = format!("127.0.0.1:{}", mesh.server_port);
    assert_eq!(downs.get(&healthy), Some(&0), "{downs:?}");
    assert!(
        downs.iter().any(|(a, n)| *a != healthy && *n >= 1),
        "{downs:?}"
    );
}

/// Per server address of `backend_prefix`'s backend in the client's HAProxy: how often it
/// went down (`chkdown` of `show stat`).
fn downs_by_address(mesh: &Mesh, backend_prefix: &str) -> std::collections::BTreeMap<String, u64> {
    use std::os::unix::net::UnixStream;
    let sock = mesh.workdir("client").join("haproxy.sock");
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"show stat\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let mut lines = out.lines();
    let header: Vec<&str> = lines
        .next()
        .unwrap()
        .trim_start_matches("# ")
        .split(',')
        .collect();
    let col = |name: &str| header.iter().position(|h| *h == name).unwrap();
    let (chkdown, addr) = (col("chkdown"), col("addr"));
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f.len() > addr && f[0].starts_with(backend_prefix))
        .filter(|f| !matches!(f[1], "BACKEND" | "FRONTEND") && !f[addr].is_empty())
        .map(|f| (f[addr].to_string(), f[chkdown].parse().unwrap_or(0)))
        .collect()
}

/// `MutualTLSMode: permissive` from service-defaults, with the mesh entry's consent (Consul
/// 1.16): as Consul's Envoy, the public port itself never takes plaintext (only plaintext
/// redirected from the app's port does, `transparent_proxy`'s permissive test), in http or tcp
/// mode, while the mesh's mTLS keeps working and a deny intention still refuses the mesh client;
/// back to strict, the front listener goes. On Consul 1.8 the test says it skipped.
#[test]
fn permissive_mtls_refuses_plaintext_to_the_public_port_and_keeps_mtls() {
    if !consul_is_current() {
        eprintln!(
            "skipped on Consul {}: MutualTLSMode exists from Consul 1.16",
            consul_version()
        );
        return;
    }
    let mesh = Mesh::start(MeshOptions {
        intentions: true,
        ..Default::default()
    });
    let put = |entry: Value| {
        let (status, body) = mesh.consul.put("/v1/config", &entry.to_string());
        assert!(status == 200 && body.trim() == "true", "{status} {body}");
    };
    let defaults = |mode: &str, protocol: &str| {
        json!({"Kind": "service-defaults", "Name": "server", "Protocol": protocol,
               "MutualTLSMode": mode})
    };
    let plain = format!("127.0.0.1:{}", mesh.server_port);
    let plain_ok = || matches!(http_get(&plain, "/", Duration::from_secs(5)), Ok((200, ref b)) if b == APP_BODY);
    let mesh_ok = || {
        matches!(
            http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5)),
            Ok((200, ref b)) if b == APP_BODY
        )
    };
    assert!(!plain_ok(), "strict took plaintext");

    put(json!({"Kind": "mesh", "AllowEnablingPermissiveMutualTLS": true}));
    put(defaults("permissive", "http"));
    wait_for_lines(
        &mesh,
        "server",
        &["frontend public_front", "accept-proxy"],
        &mesh.server_sidecar,
    );
    wait_served(&mesh);
    assert!(mesh_ok(), "{}", mesh.server_sidecar.logs());
    assert!(
        !plain_ok(),
        "permissive took plaintext on the public port\n{}",
        mesh.server_sidecar.logs()
    );

    mesh.consul.create_intention("client", "server", "deny");
    wait_until(Duration::from_secs(30), "the mesh client refused", || {
        !matches!(
            http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5)),
            Ok((200, _))
        )
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    assert!(!plain_ok(), "permissive took plaintext on the public port");

    // Plain TCP too: a tcp public listener behind the same front listener.
    put(defaults("permissive", "tcp"));
    let cfg = mesh.workdir("server").join("haproxy.cfg");
    wait_until(Duration::from_secs(60), "a tcp public listener", || {
        let text = std::fs::read_to_string(&cfg).unwrap_or_default();
        let public = text
            .split("\nfrontend ")
            .find(|s| s.starts_with("public_listener"));
        public.is_some_and(|p| p.lines().nth(1).is_some_and(|l| l.trim() == "mode tcp"))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}",
            std::fs::read_to_string(&cfg).unwrap_or_default(),
            mesh.server_sidecar.logs()
        )
    });
    assert!(!plain_ok(), "permissive took plain TCP on the public port");
    assert!(
        !mesh_ok(),
        "the deny intention let the mesh client in over tcp"
    );
    mesh.consul.create_intention("client", "server", "allow");
    wait_until(
        Duration::from_secs(30),
        "the mesh client allowed over tcp",
        mesh_ok,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    assert!(!plain_ok(), "permissive took plain TCP on the public port");

    put(defaults("strict", "tcp"));
    wait_until(Duration::from_secs(60), "the front listener gone", || {
        !std::fs::read_to_string(&cfg)
            .unwrap_or_default()
            .contains("public_front")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    wait_until(Duration::from_secs(30), "mTLS in strict", mesh_ok)
        .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    assert!(!plain_ok(), "strict took plaintext");
}
