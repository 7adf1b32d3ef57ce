//! Transparent proxy (issue 29) on Consul 1.16.3, in network namespaces this test makes:
//! host `srv` runs a Consul dev agent and the mesh services (`server`, `denied`, later
//! `late`), each an app with its sidecar; host `pod` runs the client's sidecar as its own UID
//! with `consul connect redirect-traffic` applied there by the test, and the test's requests
//! from inside `pod` are the client app; host `ext` runs a plain app outside the mesh; host
//! `dd` runs `direct`, whose proxy allows `DialedDirectly`, with its own redirect. With
//! `HCC_HAPROXY_ROOTFS` (scripts/test-rootfs) every sidecar runs in that rootfs.
//! Needs root (namespaces, iptables); skipped on Consul 1.8.7, which has no transparent mode.

use std::time::Duration;

use crate::support::load::Load;
use crate::support::mesh::config_objects;
use crate::support::netns::{can_create_namespaces, Host, Net};
use crate::support::{
    bin_path, consul_bin, consul_is_current, dry_run, haproxy_rootfs, http_request, in_rootfs_args,
    servers_up, sidecar_workdir, wait_until, Child, HttpApp, TempDir, RUN_ROOTFS,
    SIDECAR_IN_ROOTFS,
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
/// In host `dd`: its proxy allows `DialedDirectly`.
const DIRECT: Service = Service {
    name: "direct",
    id: "direct",
    app_port: 18005,
    sidecar_port: 21005,
};
/// http services: `web` has a router that sends `/v2` to `web2`.
const WEB: Service = Service {
    name: "web",
    id: "web",
    app_port: 18006,
    sidecar_port: 21006,
};
const WEB2: Service = Service {
    name: "web2",
    id: "web2",
    app_port: 18007,
    sidecar_port: 21007,
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
    start_service_in(srv, srv, s, base, false)
}

/// A service instance in `host` (its app on the host's loopback, its sidecar's public listener
/// on the host's address), registered with the agent in `srv`. `dialed_directly`: its proxy
/// allows it, the sidecar runs as `PROXY_UID` and its own redirect sends the app's port to the
/// public listener, as `consul connect redirect-traffic` does in a pod.
fn start_service_in(
    host: &Host,
    srv: &Host,
    s: &Service,
    base: &TempDir,
    dialed_directly: bool,
) -> Running {
    let app = app_in(host, None, s.app_port, &format!("hello from {}", s.name));
    put(
        srv,
        "/v1/agent/service/register",
        &json!({
            "Name": s.name, "ID": s.id, "Address": host.addr, "Port": s.app_port,
            "Connect": { "SidecarService": {
                "Address": host.addr, "Port": s.sidecar_port,
                "Proxy": {
                    "LocalServiceAddress": "127.0.0.1",
                    "Config": { "bind_address": host.addr },
                    "TransparentProxy": { "DialedDirectly": dialed_directly },
                },
                "Checks": [{ "Name": "listening", "TCP": host.at(s.sidecar_port), "Interval": "1s" }],
            } },
        }),
    );
    let dir = base.join(s.id);
    std::fs::create_dir_all(&dir).expect("sidecar base dir");
    let sidecar = if dialed_directly {
        open_to_proxy_uid(&dir);
        let c = sidecar_as_proxy_uid(host, srv, s.id, &dir, base);
        redirect_traffic(
            host,
            srv,
            &format!("{}-sidecar-proxy", s.id),
            PROXY_UID,
            &[],
        );
        c
    } else {
        let mut cmd = sidecar_in(host, None);
        cmd.args(["-sidecar-for", s.id, "-http-addr", &agent_addr(srv)])
            .arg("-haproxy-cfg-base-path")
            .arg(&dir);
        Child::spawn(&format!("sidecar-{}", s.id), &mut cmd, base.path())
    };
    Running {
        _app: app,
        _sidecar: sidecar,
    }
}

/// The sidecar binary run in `host`, as `uid` (`setpriv`, its children too) when given; with
/// `HCC_HAPROXY_ROOTFS` as PID 1 of that rootfs (`hcc-run-rootfs`, which needs root: the UID
/// is dropped inside it).
fn sidecar_in(host: &Host, uid: Option<&str>) -> std::process::Command {
    let setpriv = |uid: &str| {
        [
            "setpriv".to_string(),
            format!("--reuid={uid}"),
            format!("--regid={uid}"),
            "--clear-groups".to_string(),
        ]
    };
    match haproxy_rootfs() {
        Some(rootfs) => {
            let mut cmd = host.command(RUN_ROOTFS);
            cmd.args(in_rootfs_args(&rootfs));
            if let Some(uid) = uid {
                cmd.args(setpriv(uid));
            }
            cmd.arg(SIDECAR_IN_ROOTFS);
            cmd
        }
        None => match uid {
            Some(uid) => {
                let [program, args @ ..] = setpriv(uid);
                let mut cmd = host.command(program);
                cmd.args(args).arg(bin_path());
                cmd
            }
            None => host.command(bin_path()),
        },
    }
}

/// `dir` writable by `PROXY_UID`.
fn open_to_proxy_uid(dir: &std::path::Path) {
    let ok = std::process::Command::new("chmod")
        .arg("0777")
        .arg(dir)
        .status()
        .expect("chmod");
    assert!(ok.success(), "chmod 0777 {}", dir.display());
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

/// `GET path` from inside the pod to `addr` with `Host: host`: the status and body.
fn get_with_host(pod: &Host, addr: &str, path: &str, host: &str) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    pod.run(|| {
        let target: std::net::SocketAddr = addr.parse().map_err(|e| format!("{addr}: {e}"))?;
        let mut s = std::net::TcpStream::connect_timeout(&target, Duration::from_secs(3))
            .map_err(|e| format!("connect {addr}: {e}"))?;
        s.set_read_timeout(Some(Duration::from_secs(3)))
            .map_err(|e| e.to_string())?;
        write!(
            s,
            "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
        )
        .map_err(|e| format!("send: {e}"))?;
        let mut text = String::new();
        s.read_to_string(&mut text)
            .map_err(|e| format!("receive: {e}"))?;
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|c| c.parse().ok())
            .ok_or_else(|| format!("no status in {text:?}"))?;
        let body = text.split_once("\r\n\r\n").map_or("", |(_, b)| b);
        Ok((status, body.to_string()))
    })
}

fn answers_host(pod: &Host, addr: &str, path: &str, host: &str, body: &str) -> bool {
    matches!(get_with_host(pod, addr, path, host), Ok((200, b)) if b == body)
}

fn plain_get(addr: &str) -> Result<(u16, String), String> {
    http_request(addr, "GET", "/", None, Duration::from_secs(3)).map(|r| (r.status, r.body))
}

/// The client's sidecar in the pod, run as `PROXY_UID` (`setpriv`), its children too.
fn client_sidecar(pod: &Host, srv: &Host, dir: &std::path::Path, base: &TempDir) -> Child {
    sidecar_as_proxy_uid(pod, srv, "client", dir, base)
}

fn sidecar_as_proxy_uid(
    host: &Host,
    srv: &Host,
    id: &str,
    dir: &std::path::Path,
    base: &TempDir,
) -> Child {
    let mut cmd = sidecar_in(host, Some(PROXY_UID));
    cmd.args(["-sidecar-for", id, "-http-addr", &agent_addr(srv)])
        .arg("-haproxy-cfg-base-path")
        .arg(dir)
        .args(["-log-level", "debug"]);
    Child::spawn(&format!("sidecar-{id}"), &mut cmd, base.path())
}

/// `consul connect redirect-traffic` for `proxy_id`, applied in `host` (the pod, or `dd`).
fn redirect_traffic(host: &Host, srv: &Host, proxy_id: &str, uid: &str, excluded_cidrs: &[&str]) {
    let mut cmd = host.command(consul_bin());
    cmd.args([
        "connect",
        "redirect-traffic",
        "-proxy-id",
        proxy_id,
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
    let net = Net::new(&["srv", "pod", "ext", "dd"]);
    let (srv, pod, ext, dd) = (
        net.host("srv"),
        net.host("pod"),
        net.host("ext"),
        net.host("dd"),
    );
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
    redirect_traffic(pod, srv, "client-sidecar-proxy", PROXY_UID, &[]);
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
    // In a rootfs (scripts/test-rootfs) its HAProxy is the one that runs, not the host's.
    if haproxy_rootfs().is_some() {
        assert!(client.log_contains("HAProxy 3."), "{}", client.logs());
    }

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
    // A terminating gateway's Destination for it (service-defaults) is named, not routed:
    // the address stays outside the mesh (passed through here, refused further down).
    put(
        srv,
        "/v1/config",
        &json!({"Kind": "service-defaults", "Name": "ext", "Protocol": "tcp",
                "Destination": {"Addresses": [ext.addr], "Port": EXT_PORT}}),
    );
    wait_until(Duration::from_secs(30), "the Destination named", || {
        client.log_contains("service-defaults \"ext\" has a Destination")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));
    let ext_at = ext.at(EXT_PORT);
    assert!(
        answers(pod, &ext_at, "outside the mesh"),
        "{:?}\n{}",
        from_pod(pod, &ext_at),
        client.logs()
    );

    // DialedDirectly: the app dials direct's instance at its own address and port; the
    // client's sidecar takes it through the mesh (mTLS to that address and port, which
    // direct's own redirect hands to its public listener). A plain connection from outside
    // the mesh meets that public listener and gets no answer from the app.
    let direct = start_service_in(dd, srv, &DIRECT, &base, true);
    // Dropped before direct's app, which stops by connecting to itself.
    let dd_rules = Rules(dd.clone());
    let direct_at = dd.at(DIRECT.app_port);
    wait_until(
        Duration::from_secs(60),
        "direct at its own address through the mesh",
        || answers(pod, &direct_at, "hello from direct"),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}\n{}", from_pod(pod, &direct_at), client.logs()));
    let outside = ext.run(|| plain_get(&direct_at));
    assert!(
        !matches!(&outside, Ok((200, b)) if b == "hello from direct"),
        "a plain request reached direct's app: {outside:?}"
    );

    // MutualTLSMode permissive (issue 28), as Consul's Envoy accepts it: plaintext from outside
    // the mesh sent to direct's own port (which the redirect hands to the public listener)
    // reaches the app; plaintext sent to the public port itself is still refused, and mTLS
    // keeps working. Without the mesh entry's consent: strict again.
    let consent = |allow: bool| {
        put(
            srv,
            "/v1/config",
            &json!({"Kind": "mesh", "AllowEnablingPermissiveMutualTLS": allow}),
        )
    };
    let plain_direct = || matches!(ext.run(|| plain_get(&direct_at)), Ok((200, ref b)) if b == "hello from direct");
    consent(true);
    put(
        srv,
        "/v1/config",
        &json!({"Kind": "service-defaults", "Name": "direct", "MutualTLSMode": "permissive"}),
    );
    wait_until(
        Duration::from_secs(60),
        "permissive: plaintext to direct's port",
        plain_direct,
    )
    .unwrap_or_else(|e| {
        let cfg = std::fs::read_to_string(base.join("direct").join("haproxy.cfg"));
        panic!("{e}: {:?}\n{cfg:?}", ext.run(|| plain_get(&direct_at)))
    });
    let direct_public = dd.at(DIRECT.sidecar_port);
    let outside = ext.run(|| plain_get(&direct_public));
    assert!(
        !matches!(&outside, Ok((200, _))),
        "permissive took plaintext on the public port: {outside:?}"
    );
    assert!(
        answers(pod, &direct_at, "hello from direct"),
        "{:?}\n{}",
        from_pod(pod, &direct_at),
        client.logs()
    );
    consent(false);
    wait_until(
        Duration::from_secs(60),
        "strict again without the consent",
        || !plain_direct(),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    let (status, text) = request(srv, "DELETE", "/v1/config/service-defaults/direct", None);
    assert_eq!(status, 200, "{text}");

    // http services: web's router sends /v2 to web2; the client reaches both through web's
    // virtual IP (its implicit upstream follows the chain), and picks a service by Host.
    for name in ["web", "web2"] {
        put(
            srv,
            "/v1/config",
            &json!({"Kind": "service-defaults", "Name": name, "Protocol": "http"}),
        );
    }
    let web = start_service(srv, &WEB, &base);
    let web2 = start_service(srv, &WEB2, &base);
    put(
        srv,
        "/v1/config",
        &json!({"Kind": "service-router", "Name": "web", "Routes": [{
            "Match": {"HTTP": {"PathPrefix": "/v2"}},
            "Destination": {"Service": "web2"},
        }]}),
    );
    let web_at = format!("{}:80", virtual_ip(srv, "web"));
    let web2_vip = virtual_ip(srv, "web2");
    let web2_at = format!("{web2_vip}:80");
    wait_until(Duration::from_secs(60), "web's router followed", || {
        answers_host(pod, &web_at, "/v2/x", "web", "hello from web2")
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            get_with_host(pod, &web_at, "/v2/x", "web"),
            client.logs()
        )
    });
    let web_vip = web_at.trim_end_matches(":80").to_string();
    let web2_host = format!("{web2_vip}:80");
    for (at, path, host, body) in [
        (&web_at, "/", "web", "hello from web"),
        (&web_at, "/", "whatever.example", "hello from web"),
        (&web2_at, "/", "web.virtual.consul", "hello from web"),
        (&web2_at, "/v2", "WEB.service.consul", "hello from web2"),
        (
            &web_at,
            "/",
            "web2.service.dc1.consul:80",
            "hello from web2",
        ),
        (&web_at, "/", web2_host.as_str(), "hello from web2"),
        (&web2_at, "/", web_vip.as_str(), "hello from web"),
        (&web2_at, "/", "web2", "hello from web2"),
    ] {
        assert!(
            answers_host(pod, at, path, host, body),
            "{at}{path} Host {host}: {:?}, not {body:?}\n{}",
            get_with_host(pod, at, path, host),
            client.logs()
        );
    }

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

    // An intention that denies direct takes its instance's address out of the mesh: the
    // connection goes to direct's public listener as plain TCP, which refuses it.
    put(
        srv,
        "/v1/config",
        &json!({"Kind": "service-intentions", "Name": "direct",
                "Sources": [{"Name": "client", "Action": "deny"}]}),
    );
    wait_until(
        Duration::from_secs(30),
        "direct refused by its intention",
        || !answers(pod, &direct_at, "hello from direct"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));

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
    redirect_traffic(
        pod,
        srv,
        "client-sidecar-proxy",
        "5996",
        &[&format!("{}/32", srv.addr)],
    );
    let client = client_sidecar(pod, srv, &client_dir, &base);
    wait_until(Duration::from_secs(60), "the redirect warning", || {
        client.log_contains("own connections are redirected")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));

    drop((rules, client, late, server, denied, ext_app, client_app));
    drop((dd_rules, web, web2, direct));
    drop(agent);
    net.remove_and_check();
}
