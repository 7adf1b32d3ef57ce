//! Transparent proxy (issue 29) on Consul 1.16.3, in network namespaces this test makes:
//! host `srv` runs a Consul dev agent and the mesh services (`server`, `denied`, later
//! `late`), each an app with its sidecar; host `pod` runs the client's sidecar as its own UID
//! with `consul connect redirect-traffic` applied there by the test, and the test's requests
//! from inside `pod` are the client app; host `ext` runs a plain app outside the mesh.
//! Needs root (namespaces, iptables); skipped on Consul 1.8.7, which has no transparent mode.

use std::time::Duration;

use crate::support::load::Load;
use crate::support::mesh::config_objects;
use crate::support::netns::{can_create_namespaces, Host, Net};
use crate::support::{
    bin_path, consul_bin, consul_is_current, dry_run, http_request, servers_up, sidecar_workdir,
    wait_until, Child, HttpApp, TempDir,
};
use serde_json::{json, Value};

const AGENT_PORT: u16 = 8500;
const PROXY_UID: &str = "5995";
const CLIENT_APP_PORT: u16 = 18000;
const CLIENT_SIDECAR_PORT: u16 = 21000;
const EXT_PORT: u16 = 18080;
/// The client's explicit upstream listener (127.0.0.1) to server.
const EXPLICIT_PORT: u16 = 19000;

struct Service {
    name: &'static str,
    /// The instance's ID (and its sidecar's `-sidecar-for`).
    id: &'static str,
    app_port: u16,
    sidecar_port: u16,
}

const SERVER: Service = Service {
    name: "server",
    id: "server",
    app_port: 18001,
    sidecar_port: 21001,
};
const DENIED: Service = Service {
    name: "denied",
    id: "denied",
    app_port: 18002,
    sidecar_port: 21002,
};
/// A second instance of server, for churn under load.
const SERVER_2: Service = Service {
    name: "server",
    id: "server-2",
    app_port: 18004,
    sidecar_port: 21004,
};
const LATE: Service = Service {
    name: "late",
    id: "late",
    app_port: 18003,
    sidecar_port: 21003,
};

fn agent_addr(srv: &Host) -> String {
    srv.at(AGENT_PORT)
}

fn request(srv: &Host, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
    let addr = agent_addr(srv);
    srv.run(|| {
        http_request(
            &addr,
            method,
            path,
            body.map(str::as_bytes),
            Duration::from_secs(10),
        )
        .map(|r| (r.status, r.body))
        .unwrap_or_else(|e| panic!("{method} {path}: {e}"))
    })
}

fn put(srv: &Host, path: &str, body: &Value) {
    let (status, text) = request(srv, "PUT", path, Some(&body.to_string()));
    assert_eq!(status, 200, "PUT {path}: {text}");
}

/// An app in `srv` and its sidecar (public listener on srv's address).
struct Running {
    _app: HttpAppIn,
    _sidecar: Child,
}

/// A test app whose listener lives in a host; dropped from inside it.
struct HttpAppIn {
    app: Option<HttpApp>,
    host: Host,
}

impl Drop for HttpAppIn {
    fn drop(&mut self) {
        let app = self.app.take();
        self.host.run(move || drop(app));
    }
}

/// An app on the host's loopback (`ip` None) or on `ip`.
fn app_in(host: &Host, ip: Option<&str>, port: u16, body: &str) -> HttpAppIn {
    HttpAppIn {
        app: Some(host.run(|| HttpApp::start_at(ip.unwrap_or("127.0.0.1"), port, body))),
        host: host.clone(),
    }
}

fn start_service(srv: &Host, s: &Service, base: &TempDir) -> Running {
    let app = app_in(srv, None, s.app_port, &format!("hello from {}", s.name));
    put(
        srv,
        "/v1/agent/service/register",
        &json!({
            "Name": s.name, "ID": s.id, "Address": srv.addr, "Port": s.app_port,
            "Connect": { "SidecarService": {
                "Address": srv.addr, "Port": s.sidecar_port,
                "Proxy": {
                    "LocalServiceAddress": "127.0.0.1",
                    "Config": { "bind_address": srv.addr },
                },
                "Checks": [{ "Name": "listening", "TCP": srv.at(s.sidecar_port), "Interval": "1s" }],
            } },
        }),
    );
    let dir = base.join(s.id);
    std::fs::create_dir_all(&dir).expect("sidecar base dir");
    let mut cmd = srv.command(bin_path());
    cmd.args(["-sidecar-for", s.id, "-http-addr", &agent_addr(srv)])
        .arg("-haproxy-cfg-base-path")
        .arg(&dir);
    Running {
        _app: app,
        _sidecar: Child::spawn(&format!("sidecar-{}", s.id), &mut cmd, base.path()),
    }
}

/// The service's virtual IP as Consul tags its sidecar's instances.
fn virtual_ip(srv: &Host, service: &str) -> String {
    let mut vip = String::new();
    wait_until(Duration::from_secs(30), "a virtual IP", || {
        let (_, body) = request(
            srv,
            "GET",
            &format!("/v1/health/connect/{service}?passing=1"),
            None,
        );
        let v: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
        match v[0]["Service"]["TaggedAddresses"]["consul-virtual"]["Address"].as_str() {
            Some(a) => {
                vip = a.to_string();
                true
            }
            None => false,
        }
    })
    .unwrap_or_else(|e| panic!("{service}: {e}"));
    vip
}

/// A request the client app makes from inside the pod (so the redirect applies to it).
fn from_pod(pod: &Host, addr: &str) -> Result<(u16, String), String> {
    pod.run(|| {
        http_request(addr, "GET", "/", None, Duration::from_secs(3)).map(|r| (r.status, r.body))
    })
}

fn answers(pod: &Host, addr: &str, body: &str) -> bool {
    matches!(from_pod(pod, addr), Ok((200, b)) if b == body)
}

fn plain_get(addr: &str) -> Result<(u16, String), String> {
    http_request(addr, "GET", "/", None, Duration::from_secs(3)).map(|r| (r.status, r.body))
}

/// The client's sidecar in the pod, run as `PROXY_UID` (`setpriv`), its children too.
fn client_sidecar(pod: &Host, srv: &Host, dir: &std::path::Path, base: &TempDir) -> Child {
    let mut cmd = pod.command("setpriv");
    cmd.args([
        &format!("--reuid={PROXY_UID}"),
        &format!("--regid={PROXY_UID}"),
        "--clear-groups",
    ])
    .arg(bin_path())
    .args(["-sidecar-for", "client", "-http-addr", &agent_addr(srv)])
    .arg("-haproxy-cfg-base-path")
    .arg(dir)
    .args(["-log-level", "debug"]);
    Child::spawn("sidecar-client", &mut cmd, base.path())
}

/// `consul connect redirect-traffic` for the client's proxy, applied in the pod.
fn redirect_traffic(pod: &Host, srv: &Host, uid: &str, excluded_cidrs: &[&str]) {
    let mut cmd = pod.command(consul_bin());
    cmd.args([
        "connect",
        "redirect-traffic",
        "-proxy-id",
        "client-sidecar-proxy",
        "-proxy-uid",
        uid,
        "-http-addr",
        &agent_addr(srv),
    ]);
    for c in excluded_cidrs {
        cmd.args(["-exclude-outbound-cidr", c]);
    }
    let out = cmd.output().expect("consul connect redirect-traffic");
    assert!(
        out.status.success(),
        "redirect-traffic: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Removes every NAT rule and chain of the pod; whether that worked.
fn flush_rules(pod: &Host) -> bool {
    [["-t", "nat", "-F"], ["-t", "nat", "-X"]]
        .iter()
        .all(|args| {
            pod.command("iptables")
                .args(args)
                .status()
                .is_ok_and(|s| s.success())
        })
}

/// The pod's redirect, flushed when dropped.
struct Rules(Host);

impl Drop for Rules {
    fn drop(&mut self) {
        flush_rules(&self.0);
    }
}

/// `HCC_BENCH_TPROXY=1` (scripts/bench-tproxy): requests/s through the outbound listener
/// (server's virtual IP) against the explicit upstream listener to the same instance, in
/// alternating rounds of the same length, a new connection per request; printed, and a
/// failed request fails the run (a failing path must not read as fast).
fn bench(pod: &Host, explicit: &str, outbound: &str) {
    const ROUNDS: usize = 3;
    const SECONDS: u64 = 5;
    const WORKERS: usize = 4;
    let mut rows = Vec::new();
    for round in 0..ROUNDS {
        for (path, addr) in [("explicit", explicit), ("outbound", outbound)] {
            let (ok, failed, first) = pod.run(|| rate(addr, WORKERS, Duration::from_secs(SECONDS)));
            let rps = ok as f64 / SECONDS as f64;
            eprintln!(
                "bench round {round} {path}: {rps:.0} requests/s ({ok} in {SECONDS} s), {failed} failed{}",
                first.map(|f| format!(", first: {f}")).unwrap_or_default()
            );
            rows.push((path, rps, failed));
        }
    }
    let total = |p: &str| rows.iter().filter(|r| r.0 == p).map(|r| r.1).sum::<f64>();
    let failed: u64 = rows.iter().map(|r| r.2).sum();
    eprintln!(
        "bench: outbound/explicit = {:.3} ({:.0} vs {:.0} requests/s over {ROUNDS} rounds)",
        total("outbound") / total("explicit"),
        total("outbound") / ROUNDS as f64,
        total("explicit") / ROUNDS as f64
    );
    assert_eq!(failed, 0, "failed requests in the benchmark");
}

/// `workers` threads (in the caller's namespace) sending requests to `addr` for `length`;
/// requests answered 200, requests failed and the first failure.
fn rate(addr: &str, workers: usize, length: Duration) -> (u64, u64, Option<String>) {
    let until = std::time::Instant::now() + length;
    std::thread::scope(|s| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                s.spawn(move || {
                    let (mut ok, mut failed, mut first) = (0, 0, None);
                    while std::time::Instant::now() < until {
                        match plain_get(addr) {
                            Ok((200, _)) => ok += 1,
                            other => {
                                failed += 1;
                                first.get_or_insert(format!("{other:?}"));
                            }
                        }
                    }
                    (ok, failed, first)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or((0, 1, Some("a worker panicked".into()))))
            .fold((0, 0, None), |a, b| (a.0 + b.0, a.1 + b.1, a.2.or(b.2)))
    })
}

#[test]
fn the_app_reaches_mesh_services_by_virtual_ip_and_the_rest_as_the_mesh_entry_says() {
    if !consul_is_current() {
        eprintln!("skipped: transparent proxy needs Consul 1.10+");
        return;
    }
    if !can_create_namespaces() {
        eprintln!("SKIPPED: needs root for network namespaces and iptables");
        return;
    }
    let net = Net::new(&["srv", "pod", "ext"]);
    let (srv, pod, ext) = (net.host("srv"), net.host("pod"), net.host("ext"));
    let base = TempDir::new("tproxy");
    let agent_dir = base.join("agent");
    std::fs::create_dir_all(&agent_dir).expect("agent dir");
    let config = json!({
        "bind_addr": srv.addr, "advertise_addr": srv.addr,
        "client_addr": format!("127.0.0.1 {}", srv.addr),
        "ports": { "http": AGENT_PORT, "dns": -1, "serf_wan": -1, "grpc": -1, "grpc_tls": -1 },
        "disable_update_check": true,
    });
    let config_path = agent_dir.join("consul.json");
    std::fs::write(&config_path, config.to_string()).expect("consul.json");
    let mut cmd = srv.command(consul_bin());
    cmd.args(["agent", "-dev", "-config-file"])
        .arg(&config_path);
    let agent = Child::spawn("consul", &mut cmd, &agent_dir);
    wait_until(Duration::from_secs(30), "the agent's CA", || {
        let addr = agent_addr(srv);
        srv.run(|| {
            http_request(
                &addr,
                "GET",
                "/v1/agent/connect/ca/roots",
                None,
                Duration::from_secs(2),
            )
            .is_ok_and(|r| r.status == 200 && r.body.contains("RootCert"))
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.logs()));

    let server = start_service(srv, &SERVER, &base);
    let denied = start_service(srv, &DENIED, &base);
    put(
        srv,
        "/v1/config",
        &json!({"Kind": "service-intentions", "Name": "denied",
                "Sources": [{"Name": "client", "Action": "deny"}]}),
    );
    let ext_app = app_in(ext, Some(&ext.addr), EXT_PORT, "outside the mesh");

    // The client: registered in transparent mode, its sidecar in the pod as its own UID.
    put(
        srv,
        "/v1/agent/service/register",
        &json!({
            "Name": "client", "ID": "client", "Address": pod.addr, "Port": CLIENT_APP_PORT,
            "Connect": { "SidecarService": {
                "Address": pod.addr, "Port": CLIENT_SIDECAR_PORT,
                "Proxy": {
                    "Mode": "transparent", "LocalServiceAddress": "127.0.0.1",
                    // An explicit upstream keeps its own listener (loopback: not redirected).
                    "Upstreams": [{ "DestinationName": "server", "LocalBindPort": EXPLICIT_PORT }],
                },
                "Checks": [{ "Name": "alive", "TTL": "1h", "Status": "passing" }],
            } },
        }),
    );
    let client_dir = base.join("client");
    std::fs::create_dir_all(&client_dir).expect("client dir");
    for d in [base.path(), client_dir.as_path()] {
        std::process::Command::new("chmod")
            .arg("0777")
            .arg(d)
            .status()
            .expect("chmod");
    }
    // The client app listens on the pod's address: reachable from other hosts until the
    // redirect sends inbound connections to the public listener.
    let client_app = app_in(pod, Some(&pod.addr), CLIENT_APP_PORT, "the client app");
    let client_app_at = pod.at(CLIENT_APP_PORT);
    assert!(
        srv.run(|| plain_get(&client_app_at)).is_ok(),
        "the app answers before the redirect"
    );
    let client = client_sidecar(pod, srv, &client_dir, &base);
    redirect_traffic(pod, srv, PROXY_UID, &[]);
    // Dropped before the apps (also on a panic): an app in the pod stops by connecting to
    // itself, which the redirect would take away.
    let rules = Rules(pod.clone());
    // The sidecar runs as the exempt UID: the start-up check says so, and warns of nothing.
    wait_until(Duration::from_secs(60), "the redirect check", || {
        client.log_contains(&format!("this sidecar runs as UID {PROXY_UID}"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));
    assert!(
        !client.log_contains("WARN  [supervisor] transparent mode:"),
        "{}",
        client.logs()
    );

    // Inbound: a plain request from another host to the app's port reaches the public
    // listener (mTLS), not the app.
    let plain = srv.run(|| plain_get(&client_app_at));
    assert!(
        !matches!(&plain, Ok((200, b)) if b == "the client app"),
        "the app answered a plain request from outside: {plain:?}"
    );

    // A pod has a default route; without one, a connection to a virtual IP fails before the
    // redirect can take it.
    let route = std::process::Command::new("ip")
        .args(["-n", &pod.ns, "route", "add", "default", "via", &srv.addr])
        .status()
        .expect("ip route");
    assert!(route.success(), "default route in the pod");
    let server_vip = virtual_ip(srv, "server");
    let denied_vip = virtual_ip(srv, "denied");
    let server_at = format!("{server_vip}:80");
    wait_until(
        Duration::from_secs(60),
        "server through its virtual IP",
        || answers(pod, &server_at, "hello from server"),
    )
    .unwrap_or_else(|e| {
        let nat = pod
            .command("iptables-save")
            .output()
            .expect("iptables-save");
        panic!(
            "{e}: {:?}\nthe pod's rules:\n{}\n{}",
            from_pod(pod, &server_at),
            String::from_utf8_lossy(&nat.stdout),
            client.logs()
        )
    });

    // A service whose intention denies the client has no route: passed through to its virtual
    // IP, which nothing serves.
    assert!(
        from_pod(pod, &format!("{denied_vip}:80")).is_err(),
        "denied service reached\n{}",
        client.logs()
    );

    // A destination outside the mesh: passed through while MeshDestinationsOnly is false.
    let ext_at = ext.at(EXT_PORT);
    assert!(
        answers(pod, &ext_at, "outside the mesh"),
        "{:?}\n{}",
        from_pod(pod, &ext_at),
        client.logs()
    );

    // A service registered after the sidecar started: reachable without a restart.
    let late = start_service(srv, &LATE, &base);
    let late_vip = virtual_ip(srv, "late");
    let late_at = format!("{late_vip}:80");
    wait_until(
        Duration::from_secs(60),
        "late through its virtual IP",
        || answers(pod, &late_at, "hello from late"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));

    // --dry-run prints the outbound routing table; and the configuration the deltas left
    // (the late service's backend came through a Dataplane API transaction, its route
    // through the runtime API) describes the same HAProxy objects as a fresh render.
    let dry_base = base.join("dry");
    std::fs::create_dir_all(&dry_base).expect("dry-run dir");
    let text = srv.run(|| dry_run(&agent_addr(srv), &dry_base, "client", &[]));
    for (service, vip) in [("server", &server_vip), ("late", &late_vip)] {
        let route =
            format!("# service {service}\n{vip} be_up_svc_{service}_local_127.0.0.1_15001\n");
        assert!(text.contains(&route), "no route {route:?} in\n{text}");
    }
    let fresh = text
        .split_once("haproxy.cfg <==\n")
        .map(|(_, cfg)| cfg)
        .expect("haproxy.cfg in the dry run");
    let fresh_dir = dry_base.join("hcc-client-sidecar-proxy-dry-run");
    let workdir = sidecar_workdir(&client_dir, "client");
    let applied =
        std::fs::read_to_string(workdir.join("haproxy.cfg")).expect("client's haproxy.cfg");
    let a = config_objects(&applied, &workdir.display().to_string());
    let b = config_objects(fresh, &fresh_dir.display().to_string());
    assert_eq!(
        a.difference(&b).collect::<Vec<_>>(),
        b.difference(&a).collect::<Vec<_>>(),
        "deltas (left) and a fresh render (right) differ"
    );

    // Churn under load through the virtual IP: a second instance of server joins and leaves
    // (deregistered before its sidecar stops, as an orchestrator drains it); no request fails.
    let load = pod.run(|| Load::expecting(server_at.clone(), "hello from server"));
    let up = || servers_up(&workdir, "server_local_127.0.0.1_15001");
    let second = start_service(srv, &SERVER_2, &base);
    wait_until(
        Duration::from_secs(60),
        "two instances of server live",
        || up() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));
    let (status, text) = request(srv, "PUT", "/v1/agent/service/deregister/server-2", None);
    assert_eq!(status, 200, "{text}");
    wait_until(
        Duration::from_secs(60),
        "one instance of server live",
        || up() == 1,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));
    drop(second);
    let (served, failed, errors) = load.finish();
    eprintln!("churn through the virtual IP: {served} served, {failed} failed");
    assert!(served > 0 && failed == 0, "{failed} failed: {errors:?}");

    // MeshDestinationsOnly: the address outside the mesh is refused, the mesh still served.
    put(
        srv,
        "/v1/config",
        &json!({"Kind": "mesh", "TransparentProxy": {"MeshDestinationsOnly": true}}),
    );
    wait_until(
        Duration::from_secs(30),
        "the outside address refused",
        || !answers(pod, &ext_at, "outside the mesh"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));
    assert!(
        answers(pod, &server_at, "hello from server"),
        "{}",
        client.logs()
    );
    // The redirect rules were applied in the pod only: the sidecar's own UID is excluded
    // (its upstream connections are not captured, or nothing above would have answered).

    // The explicit upstream still has its listener.
    let explicit_at = format!("127.0.0.1:{EXPLICIT_PORT}");
    assert!(
        answers(pod, &explicit_at, "hello from server"),
        "{:?}",
        from_pod(pod, &explicit_at)
    );
    if std::env::var_os("HCC_BENCH_TPROXY").is_some() {
        bench(pod, &explicit_at, &server_at);
    }

    // The sidecar run as a UID the redirect does not exempt (Consul's address excluded, so it
    // still starts): the start-up check names it.
    drop(client);
    assert!(flush_rules(pod), "flushing the pod's rules");
    redirect_traffic(pod, srv, "5996", &[&format!("{}/32", srv.addr)]);
    let client = client_sidecar(pod, srv, &client_dir, &base);
    wait_until(Duration::from_secs(60), "the redirect warning", || {
        client.log_contains("own connections are redirected")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));

    drop((rules, client, late, server, denied, ext_app, client_app));
    drop(agent);
    net.remove_and_check();
}
