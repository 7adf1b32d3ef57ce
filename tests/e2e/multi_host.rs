//! A Consul cluster across hosts (network namespaces on this machine, tests/e2e/support/netns.rs):
//! host A runs a Consul server (not -dev), hosts B, C and D Consul client agents joined to it.
//! The `server` app runs on B and C with a sidecar each, listening on the host's address; the
//! `client` service and its sidecar run on D, with Consul's defaults (connect timeout 5 s).
//! Under continuous load through the client's upstream, the test pulls C's cable and plugs it
//! back in (`HCC_MULTI_HOST_ROUNDS` times, default 1), then stops the Consul server for 30 s,
//! measuring what the requests saw. Needs root; skipped (loudly) without it.

use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crate::support;
use crate::support::netns::{can_create_namespaces, enter, Host, Net};
use crate::support::{
    bin_path, consul_bin, consul_is_current, http_request, wait_until, Child, HttpApp,
};
use serde_json::{json, Value};

const HTTP: &str = "127.0.0.1:8500";
const APP_PORT: u16 = 18080;
const SIDECAR_PORT: u16 = 21000;
const UPSTREAM_PORT: u16 = 19191;
/// What a client of the mesh waits for an answer, as in the measurement.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// A Consul agent in a test host, on the standard ports of that host (each host is its own
/// network namespace, so nothing collides).
struct Agent {
    child: Child,
    host: Host,
    config: PathBuf,
    dir: support::TempDir,
}

impl Agent {
    fn start(host: &Host, server: Option<&Host>) -> Agent {
        let dir = support::TempDir::new(&format!("agent-{}", host.name));
        let mut config = json!({
            "node_name": format!("host-{}", host.name),
            "datacenter": "dc1",
            "data_dir": dir.join("data"),
            "bind_addr": host.addr,
            "advertise_addr": host.addr,
            "client_addr": "127.0.0.1",
            "log_level": "info",
            "disable_update_check": true,
            "disable_anonymous_signature": true,
            "ports": { "dns": -1, "serf_wan": -1, "grpc": 8502 },
            "connect": { "enabled": true },
            "performance": { "raft_multiplier": 1 },
        });
        match server {
            None => {
                config["server"] = true.into();
                config["bootstrap_expect"] = 1.into();
            }
            Some(s) => config["retry_join"] = json!([s.addr]),
        }
        if consul_is_current() {
            config["ports"]["grpc_tls"] = (-1).into();
        }
        let path = dir.join("consul.json");
        std::fs::write(&path, config.to_string()).expect("write consul.json");
        let child = spawn_agent(host, &path, dir.path());
        Agent {
            child,
            host: host.clone(),
            config: path,
            dir,
        }
    }

    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
    ) -> Result<(u16, String), String> {
        self.host.run(|| {
            http_request(
                HTTP,
                method,
                path,
                body.map(str::as_bytes),
                Duration::from_secs(10),
            )
            .map(|r| (r.status, r.body))
        })
    }

    fn json(&self, path: &str) -> Option<Value> {
        match self.request("GET", path, None) {
            Ok((200, body)) => serde_json::from_str(&body).ok(),
            _ => None,
        }
    }

    fn put(&self, path: &str, body: &str) {
        match self.request("PUT", path, Some(body)) {
            Ok((200, _)) => {}
            other => panic!(
                "PUT {path} on host {}: {other:?}\n{}",
                self.host.name,
                self.child.logs()
            ),
        }
    }

    fn passing(&self, service: &str) -> Option<usize> {
        self.json(&format!("/v1/health/connect/{service}?passing"))
            .and_then(|v| v.as_array().map(Vec::len))
    }

    fn restart(&mut self) {
        self.child.stop();
        self.child = spawn_agent(&self.host, &self.config, self.dir.path());
    }
}

fn spawn_agent(host: &Host, config: &std::path::Path, dir: &std::path::Path) -> Child {
    let mut cmd = host.command(consul_bin());
    cmd.args(["agent", "-config-file"]).arg(config);
    Child::spawn("consul", &mut cmd, dir)
}

/// The test app on a host's loopback; dropped from inside the host, where its listener is.
struct App {
    app: Option<HttpApp>,
    host: Host,
}

impl App {
    fn start(host: &Host, body: &str) -> App {
        App {
            app: Some(host.run(|| HttpApp::start_on(APP_PORT, body))),
            host: host.clone(),
        }
    }
}

impl Drop for App {
    fn drop(&mut self) {
        let app = self.app.take();
        self.host.run(move || drop(app));
    }
}

/// Registers `name` on `agent`'s host with a sidecar whose public listener binds the host's
/// address (and is advertised with it), with the given upstreams.
fn register(agent: &Agent, name: &str, upstreams: Value) {
    let addr = agent.host.addr.clone();
    let reg = json!({
        "Name": name, "ID": name, "Address": addr, "Port": APP_PORT,
        "Connect": { "SidecarService": {
            "Address": addr,
            "Port": SIDECAR_PORT,
            "Proxy": {
                "LocalServiceAddress": "127.0.0.1",
                "Config": { "bind_address": addr },
                "Upstreams": upstreams,
            },
            "Checks": [
                { "Name": "Connect Sidecar Listening", "TCP": format!("{addr}:{SIDECAR_PORT}"), "Interval": "1s" },
            ],
        } },
    });
    agent.put("/v1/agent/service/register", &reg.to_string());
}

fn register_server(agent: &Agent) {
    register(agent, "server", json!([]));
}

fn register_client(agent: &Agent) {
    register(
        agent,
        "client",
        json!([{
            "DestinationName": "server",
            "LocalBindPort": UPSTREAM_PORT,
        }]),
    );
}

fn sidecar(host: &Host, service: &str, base: &support::TempDir) -> Child {
    let dir = base.join(&host.name);
    std::fs::create_dir_all(&dir).expect("sidecar base dir");
    let mut cmd = host.command(bin_path());
    cmd.args(["-sidecar-for", service, "-http-addr", HTTP])
        .arg("-haproxy-cfg-base-path")
        .arg(&dir)
        .args(["-log-level", "debug"]);
    Child::spawn(&format!("sidecar-{}", host.name), &mut cmd, base.path())
}

/// One request of the load: when it started (since the load began), how long it took, and
/// which host answered (the app's body) or why it failed.
#[derive(Clone, Debug)]
struct Sample {
    start: Duration,
    took: Duration,
    answer: Result<String, String>,
}

/// Requests through the client's upstream from host D by `workers` threads, each one after
/// another with a short pause, until stopped (or 10 minutes at most).
struct Load {
    began: Instant,
    samples: Arc<Mutex<Vec<Sample>>>,
    stop: Arc<AtomicBool>,
    workers: Vec<JoinHandle<()>>,
}

impl Load {
    fn start(host: &Host, workers: usize) -> Load {
        let began = Instant::now();
        let samples = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let workers = (0..workers)
            .map(|_| {
                let (samples, stop) = (samples.clone(), stop.clone());
                let ns = format!("/run/netns/{}", host.ns);
                thread::spawn(move || {
                    enter(&ns);
                    let addr = format!("127.0.0.1:{UPSTREAM_PORT}");
                    while !stop.load(Ordering::SeqCst) && began.elapsed() < Duration::from_secs(600)
                    {
                        let t = Instant::now();
                        let answer = match http_request(&addr, "GET", "/", None, CLIENT_TIMEOUT) {
                            Ok(r) if r.status == 200 => Ok(r.body),
                            Ok(r) => Err(format!("status {}", r.status)),
                            Err(e) => Err(e),
                        };
                        samples.lock().unwrap().push(Sample {
                            start: t - began,
                            took: t.elapsed(),
                            answer,
                        });
                        thread::sleep(Duration::from_millis(25));
                    }
                })
            })
            .collect();
        Load {
            began,
            samples,
            stop,
            workers,
        }
    }

    fn now(&self) -> Duration {
        self.began.elapsed()
    }

    /// Samples that started in `[from, to)`.
    fn between(&self, from: Duration, to: Duration) -> Vec<Sample> {
        self.samples
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.start >= from && s.start < to)
            .cloned()
            .collect()
    }

    /// Waits until every request started before `t` has finished.
    fn settle(&self, t: Duration) {
        thread::sleep((t + CLIENT_TIMEOUT + Duration::from_secs(1)).saturating_sub(self.now()));
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for w in self.workers.drain(..) {
            let _ = w.join();
        }
    }
}

struct Window {
    requests: usize,
    failed: usize,
    slow: usize,
    max: Duration,
    from_c: usize,
    /// The failures' errors, when they started (since the load began) and how long they took.
    errors: Vec<(Duration, Duration, String)>,
}

/// Whether the client saw `s` fail: an error, or an answer after its whole budget
/// (`CLIENT_TIMEOUT`; our reader's timeout restarts per read, so an answer may come later).
fn failed(s: &Sample) -> bool {
    s.answer.is_err() || s.took >= CLIENT_TIMEOUT
}

fn summarize(samples: &[Sample]) -> Window {
    Window {
        requests: samples.len(),
        failed: samples.iter().filter(|s| failed(s)).count(),
        slow: samples
            .iter()
            .filter(|s| s.took > Duration::from_millis(500))
            .count(),
        max: samples.iter().map(|s| s.took).max().unwrap_or_default(),
        from_c: samples
            .iter()
            .filter(|s| s.answer.as_deref() == Ok(BODY_C))
            .count(),
        errors: samples
            .iter()
            .filter(|s| failed(s))
            .map(|s| {
                let why = s.answer.clone().err();
                (
                    s.start,
                    s.took,
                    why.unwrap_or_else(|| "answered too late".into()),
                )
            })
            .collect(),
    }
}

fn report(what: &str, w: &Window) {
    println!(
        "multi_host: {what}: {} requests, {} failed, {} slower than 500 ms (max {:?}), {} answered by C",
        w.requests, w.failed, w.slow, w.max, w.from_c
    );
    for (start, took, e) in w.errors.iter().take(5) {
        println!("multi_host:   failed: started at {start:?}, after {took:?}: {e}");
    }
}

/// How many times C's link is cut and restored: `HCC_MULTI_HOST_ROUNDS`, 1 unless set (the
/// issue's measurement is 5 rounds; CI keeps the suite lean with one).
fn rounds() -> usize {
    std::env::var("HCC_MULTI_HOST_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .filter(|n| *n > 0)
        .unwrap_or(1)
}

/// The client's sidecar checks its upstream slots itself (`check inter 400`, fall 2): a
/// vanished host is out of its rotation within three intervals. Requests that started before
/// then may have been sent to C (each waits for the connect timeout, Consul's default 5 s, as
/// long as the client does) and are counted apart; every one that started later must succeed.
const DETECTION: Duration = Duration::from_millis(1500);

/// What one cut and rejoin of C's link measured.
struct Round {
    round: usize,
    /// Started in the first `DETECTION` after the cut.
    early: Window,
    /// Started later, until Consul noticed the loss and 5 s more.
    late: Window,
    rejoin: Window,
}

fn host_loss_round(
    round: usize,
    net: &Net,
    server: &Agent,
    load: &Load,
    logs: &dyn Fn() -> String,
) -> Round {
    // A request already forwarded to C when the link goes down cannot be saved (its bytes are
    // on a host that is gone; in tcp mode nothing may be replayed), so the requests started
    // while `ip link set down` ran are counted apart.
    let cutting = load.now();
    net.cut("c");
    let cut = load.now();
    wait_until(
        Duration::from_secs(60),
        "Consul to mark C's instance critical",
        || server.passing("server") == Some(1),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.child.logs()));
    let detected = load.now();
    thread::sleep(Duration::from_secs(5));
    let after = load.now();
    load.settle(after);
    let in_flight = summarize(&load.between(cutting, cut));
    let early = summarize(&load.between(cut, cut + DETECTION));
    let late = summarize(&load.between(cut + DETECTION, after));
    println!(
        "multi_host: round {round}: Consul noticed C's loss after {:?}",
        detected - cut
    );
    report(
        &format!("round {round}: started as C's link went down"),
        &in_flight,
    );
    report(&format!("round {round}: C cut, first 1.5 s"), &early);
    report(
        &format!("round {round}: C cut, from 1.5 s to 5 s after Consul noticed"),
        &late,
    );

    // C comes back with no operator action.
    // Serf notices the link back on its own schedule: 8-31 s here, so 120 s of slack.
    let restored = load.now();
    net.restore("c");
    wait_until(
        Duration::from_secs(120),
        "C's instance passing and answering again",
        || {
            server.passing("server") == Some(2)
                && summarize(&load.between(restored, load.now())).from_c > 0
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let back = load.now();
    thread::sleep(Duration::from_secs(2));
    load.settle(load.now());
    let rejoin = summarize(&load.between(restored, load.now()));
    println!(
        "multi_host: round {round}: C answered again {:?} after its link came back",
        back - restored
    );
    report(&format!("round {round}: C rejoining"), &rejoin);
    Round {
        round,
        early,
        late,
        rejoin,
    }
}

const BODY_B: &str = "hello from host B";
const BODY_C: &str = "hello from host C";

#[test]
fn consul_cluster_across_hosts_host_loss_and_server_outage() {
    if !can_create_namespaces() {
        eprintln!("multi_host: SKIPPED: network namespaces need root (CI runs as root)");
        return;
    }
    let net = Net::new(&["a", "b", "c", "d"]);
    run(&net);
    net.remove_and_check();
}

fn run(net: &Net) {
    let (a, b, c, d) = (net.host("a"), net.host("b"), net.host("c"), net.host("d"));
    let mut server = Agent::start(a, None);
    let agents: Vec<Agent> = [b, c, d].iter().map(|h| Agent::start(h, Some(a))).collect();
    let (agent_b, agent_c, agent_d) = (&agents[0], &agents[1], &agents[2]);
    wait_until(
        Duration::from_secs(60),
        "a leader, four nodes and a CA root",
        || {
            let nodes = server
                .json("/v1/catalog/nodes")
                .and_then(|v| v.as_array().map(Vec::len));
            let roots = agents.iter().all(|a| {
                a.json("/v1/agent/connect/ca/roots")
                    .is_some_and(|r| !r["ActiveRootID"].as_str().unwrap_or_default().is_empty())
            });
            nodes == Some(4) && roots
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.child.logs()));

    let _apps = [App::start(b, BODY_B), App::start(c, BODY_C)];
    register_server(agent_b);
    register_server(agent_c);
    register_client(agent_d);
    let base = support::TempDir::new("multihost");
    let sidecars = [
        sidecar(b, "server", &base),
        sidecar(c, "server", &base),
        sidecar(d, "client", &base),
    ];
    let logs = || {
        sidecars
            .iter()
            .map(Child::logs)
            .collect::<Vec<_>>()
            .join("\n")
    };

    // Both instances reached from D, across hosts.
    let mut seen = std::collections::HashSet::new();
    wait_until(
        Duration::from_secs(90),
        "answers from both B and C through D's upstream",
        || {
            let answer = d.run(|| {
                http_request(
                    &format!("127.0.0.1:{UPSTREAM_PORT}"),
                    "GET",
                    "/",
                    None,
                    CLIENT_TIMEOUT,
                )
            });
            if let Ok(r) = answer {
                seen.insert(r.body);
            }
            seen.contains(BODY_B) && seen.contains(BODY_C)
        },
    )
    .unwrap_or_else(|e| panic!("{e} (seen {seen:?})\n{}", logs()));
    println!(
        "multi_host: Consul {}: traffic from D reaches B and C",
        support::consul_version()
    );

    let load = Load::start(d, 4);
    thread::sleep(Duration::from_secs(3));
    let steady = summarize(&load.between(Duration::ZERO, load.now()));
    report("steady state", &steady);
    assert_eq!(steady.failed, 0, "failures before any fault\n{}", logs());
    assert!(steady.from_c > 0, "C answered nothing in the steady state");

    // Host C loses its link and comes back, `rounds()` times.
    let results: Vec<Round> = (1..=rounds())
        .map(|round| host_loss_round(round, net, &server, &load, &logs))
        .collect();

    // The Consul server stops for 30 s: every sidecar keeps serving what it had.
    let outage = load.now();
    server.child.stop();
    thread::sleep(Duration::from_secs(30));
    let outage_end = load.now();
    server.restart();
    wait_until(
        Duration::from_secs(60),
        "the Consul server back with a leader",
        || {
            agent_d
                .json("/v1/status/leader")
                .is_some_and(|l| !l.as_str().unwrap_or_default().is_empty())
                && agent_d.passing("server") == Some(2)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", server.child.logs()));
    load.settle(outage_end);
    let stopped = summarize(&load.between(outage, outage_end));
    report("Consul server stopped for 30 s", &stopped);

    // And converges once it is back: C's instance in maintenance leaves the client's rotation,
    // and returns when maintenance ends.
    agent_c.put(
        "/v1/agent/service/maintenance/server-sidecar-proxy?enable=true&reason=test",
        "",
    );
    wait_until(
        Duration::from_secs(30),
        "C out of the client's rotation",
        || {
            let t = load.now();
            thread::sleep(Duration::from_secs(1));
            summarize(&load.between(t, load.now())).from_c == 0
                && !load.between(t, load.now()).is_empty()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    agent_c.put(
        "/v1/agent/service/maintenance/server-sidecar-proxy?enable=false",
        "",
    );
    let t = load.now();
    wait_until(
        Duration::from_secs(30),
        "C back in the client's rotation",
        || summarize(&load.between(t, load.now())).from_c > 0,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    let converged = load.now();
    load.settle(converged);
    let after_outage = summarize(&load.between(outage_end, converged));
    report(
        "after the Consul server came back (maintenance on and off)",
        &after_outage,
    );
    drop(load);

    // Zero failures in a window prove something only if the load ran in it. (Requests started
    // while the link went down, `in_flight`, are counted apart and may be none.)
    for (what, w) in [
        ("steady state", &steady),
        ("Consul server stopped", &stopped),
        ("after the Consul server came back", &after_outage),
    ]
    .into_iter()
    .chain(results.iter().flat_map(|r| {
        [
            ("C cut, from 1.5 s on", &r.late),
            ("C rejoining", &r.rejoin),
        ]
    })) {
        assert!(w.requests > 0, "no request measured in the window {what:?}");
    }
    for r in &results {
        println!(
            "multi_host: round {}: first 1.5 s after the cut: {} of {} failed; later: {} of {} failed; rejoin: {} of {} failed",
            r.round,
            r.early.failed,
            r.early.requests,
            r.late.failed,
            r.late.requests,
            r.rejoin.failed,
            r.rejoin.requests
        );
    }
    for r in &results {
        assert_eq!(
            r.late.failed,
            0,
            "round {}: requests started 1.5 s or more after C's link went down failed\n{}",
            r.round,
            logs()
        );
        assert_eq!(
            r.rejoin.failed,
            0,
            "round {}: requests failed while C rejoined: {:?}\n{}",
            r.round,
            r.rejoin.errors,
            logs()
        );
    }
    assert_eq!(
        stopped.failed,
        0,
        "requests failed while the Consul server was down\n{}",
        logs()
    );
    assert_eq!(
        after_outage.failed,
        0,
        "requests failed after the Consul server came back\n{}",
        logs()
    );
    // While the servers were gone the agents answered reads without an index from their cache
    // and failed every blocking one; that is one outage to the sidecar (a warning per distinct
    // error, and a recovery line once a blocking read returns again), not a warning and a
    // recovery every 0.2 s.
    let client_log = sidecars[2].logs();
    let warnings = client_log.matches("cannot read CA roots").count();
    let recoveries = client_log.matches("CA roots readable again").count();
    println!("multi_host: the client's CA roots watch: {warnings} warning(s), {recoveries} recovery line(s)");
    // A 30 s outage of the only server is noticed (at least one warning) and its end too (at
    // least one recovery); none of either would mean the watch never saw it.
    assert!(
        (1..=4).contains(&warnings) && (1..=2).contains(&recoveries),
        "the CA roots watch through the Consul outage: {warnings} warnings (want 1 to 4), {recoveries} recoveries (want 1 to 2)\n{client_log}"
    );
    let _ = agent_b;
}
