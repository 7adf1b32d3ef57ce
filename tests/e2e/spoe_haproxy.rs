//! The SPOE agent against the real HAProxy 2.6: an mTLS frontend sends each client certificate
//! to the agent, and only connections the agent allows reach the backend.
//!
//! HAProxy's ca-file trusts two CAs while the agent's table trusts only one, so a client of the
//! second CA passes the TLS handshake and must be stopped by the agent itself (what protects a
//! resumed TLS session after a root rotation).

use std::fs;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread;
use std::time::{Duration, Instant};

use crate::support::{free_port, http_get, wait_until, Child, TempDir, TRUST_DOMAIN};
use haproxy_consul_connect::spoe::authz::{Action, AuthzTable, DefaultPolicy, Intention};
use haproxy_consul_connect::spoe::server::{spawn, AgentConfig, SharedTable};

const CERTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/fixtures/spop/certs");

fn cert(name: &str) -> PathBuf {
    Path::new(CERTS).join(name)
}

fn haproxy_bin() -> String {
    std::env::var("HAPROXY").unwrap_or_else(|_| "haproxy".into())
}

/// A TCP echo server on loopback, for as long as the test process lives; the counter is the
/// connections it accepted.
fn start_echo() -> (u16, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let accepted = Arc::new(AtomicU64::new(0));
    let counter = accepted.clone();
    thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            counter.fetch_add(1, Ordering::SeqCst);
            thread::spawn(move || {
                let mut buf = [0u8; 4096];
                while let Ok(n) = conn.read(&mut buf) {
                    if n == 0 || conn.write_all(&buf[..n]).is_err() {
                        break;
                    }
                }
            });
        }
    });
    (port, accepted)
}

/// `openssl s_client`, killed and reaped on drop even if the test panics.
struct SClient(std::process::Child);

impl Drop for SClient {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Connects with client certificate `name`, sends "ping" and returns what came back before
/// the connection closed or 5 s passed (stopping early once the echo arrived).
fn exchange(port: u16, name: &str, log_dir: &Path) -> String {
    let stderr = fs::File::create(log_dir.join(format!("s_client-{name}.stderr"))).unwrap();
    let mut client = SClient(
        Command::new("openssl")
            .args(["s_client", "-quiet", "-connect"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("-CAfile")
            .arg(cert("ca.crt"))
            .arg("-cert")
            .arg(cert(&format!("{name}.crt")))
            .arg("-key")
            .arg(cert(&format!("{name}.key")))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .process_group(0)
            .spawn()
            .expect("spawn openssl s_client"),
    );
    // stdin stays open until the client is dropped: closing it could end the session early.
    let mut stdin = client.0.stdin.take().unwrap();
    stdin.write_all(b"ping\n").unwrap();
    let mut stdout = client.0.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut buf = [0u8; 4096];
        while let Ok(n) = stdout.read(&mut buf) {
            if n == 0 || tx.send(buf[..n].to_vec()).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut got = Vec::new();
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        match rx.recv_timeout(left) {
            Ok(chunk) => {
                got.extend(chunk);
                if got.windows(4).any(|w| w == b"ping") {
                    break;
                }
            }
            Err(_) => break, // closed by the server, or timed out
        }
    }
    drop(stdin);
    String::from_utf8_lossy(&got).into_owned()
}

fn write_config(dir: &TempDir, port: u16, stats: u16, echo: u16, agent_sock: &Path) -> PathBuf {
    // The client-facing trust bundle holds both CAs; the agent's table only the first.
    let bundle = [
        fs::read_to_string(cert("ca.crt")).unwrap(),
        fs::read_to_string(cert("ca2.crt")).unwrap(),
    ]
    .concat();
    fs::write(dir.join("ca-bundle.crt"), bundle).unwrap();
    let spoe = "\
[hcc]
spoe-agent hcc-agent
    messages check-client
    option var-prefix hcc
    option set-on-error err
    timeout hello 2s
    timeout idle 30s
    timeout processing 500ms
    use-backend spoe_agents
    log global

spoe-message check-client
    args cert=ssl_c_der
    event on-frontend-tcp-request
";
    fs::write(dir.join("spoe.conf"), spoe).unwrap();
    let cfg = format!(
        "\
global
    log stdout format raw local0 info
    nbthread 2
    # No TLS resumption: every connection must reach the agent with a full handshake.
    tune.ssl.cachesize 0

defaults
    mode tcp
    log global
    option tcplog
    timeout connect 2s
    timeout client 10s
    timeout server 10s

frontend fe_mtls
    bind 127.0.0.1:{port} ssl crt {certs}/server.pem ca-file {dir}/ca-bundle.crt verify required no-tls-tickets
    filter spoe engine hcc config {dir}/spoe.conf
    # Fail closed: no answer from the agent leaves the variable unset.
    tcp-request content reject unless {{ var(sess.hcc.allow) -m bool }}
    default_backend be_echo

backend be_echo
    server echo 127.0.0.1:{echo}

# Outside the SPOE path: shows HAProxy itself is still up when fe_mtls refuses.
listen stats
    mode http
    bind 127.0.0.1:{stats}
    stats enable
    stats uri /stats

backend spoe_agents
    mode tcp
    timeout connect 1s
    timeout server 3m
    option spop-check
    server agent unix@{sock} check inter 500ms fall 2 rise 1
",
        certs = CERTS,
        dir = dir.path().display(),
        sock = agent_sock.display(),
    );
    let path = dir.join("haproxy.cfg");
    fs::write(&path, cfg).unwrap();
    path
}

#[test]
fn haproxy_asks_the_agent_and_fails_closed_without_it() {
    let dir = TempDir::new("spoe-haproxy");
    let sock = dir.join("agent.sock");
    let roots = fs::read_to_string(cert("ca.crt")).unwrap();
    let table = AuthzTable::new(
        TRUST_DOMAIN,
        &roots,
        vec![Intention::new("web", Action::Deny, 9)],
        DefaultPolicy::Allow,
    )
    .unwrap();
    let mut agent = spawn(
        AgentConfig {
            socket_path: sock.clone(),
            worker_threads: 2,
            var_name: "allow".into(),
        },
        SharedTable::new(table),
    )
    .unwrap();
    let stats = agent.stats().clone();

    let port = free_port();
    let stats_port = free_port();
    let (echo, echoed) = start_echo();
    let cfg = write_config(&dir, port, stats_port, echo, &sock);
    let check = Command::new(haproxy_bin())
        .arg("-c")
        .arg("-f")
        .arg(&cfg)
        .output()
        .expect("run haproxy -c (is haproxy 2.6 installed? scripts/install-deps)");
    assert!(
        check.status.success(),
        "haproxy -c: {}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    let mut haproxy = Child::spawn(
        "haproxy",
        Command::new(haproxy_bin()).arg("-db").arg("-f").arg(&cfg),
        dir.path(),
    );
    wait_until(Duration::from_secs(10), "haproxy listening", || {
        TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", haproxy.logs()));
    wait_until(
        Duration::from_secs(10),
        "an spop-check health check",
        || stats.health_checks.load(Ordering::Relaxed) > 0,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", haproxy.logs()));

    // Allowed by default policy: the echo comes back through HAProxy.
    let out = exchange(port, "client", dir.path());
    assert!(
        out.contains("ping"),
        "client: got {out:?}\n{}",
        haproxy.logs()
    );
    assert_eq!(stats.allowed.load(Ordering::Relaxed), 1);
    assert_eq!(
        echoed.load(Ordering::SeqCst),
        1,
        "the echo counts connections"
    );

    // Each of these completes the TLS handshake and must be stopped by the agent.
    for (name, why) in [
        ("web", "intention web => deny"),
        ("other-td", "another trust domain"),
        (
            "client-ca2",
            "a CA HAProxy trusts but the agent's roots do not hold",
        ),
    ] {
        let before = stats.denied.load(Ordering::Relaxed);
        let out = exchange(port, name, dir.path());
        assert!(
            !out.contains("ping"),
            "{name} ({why}) got data through: {out:?}"
        );
        assert_eq!(
            stats.denied.load(Ordering::Relaxed),
            before + 1,
            "{name} ({why}) denied by the agent\n{}",
            haproxy.logs()
        );
    }

    // Without the agent HAProxy gets no answer, the variable stays unset, and the rule rejects.
    agent.shutdown();
    assert!(!sock.exists());
    let stats_addr = format!("127.0.0.1:{stats_port}");
    let denied_before = denied_requests(&stats_addr);
    let echoed_before = echoed.load(Ordering::SeqCst);
    // Only log lines from here on are about the connection below.
    let mark = haproxy.stdout().len();
    let started = Instant::now();
    let out = exchange(port, "client", dir.path());
    assert!(
        !out.contains("ping"),
        "agent down but data went through: {out:?}"
    );
    assert!(started.elapsed() < Duration::from_secs(5));
    assert_eq!(
        echoed.load(Ordering::SeqCst),
        echoed_before,
        "agent down but the connection reached the backend"
    );
    // Refused by the rule, and by nothing else: the handshake completed (`~`), no server was
    // chosen, and the session ended on a rule (`PR`) after an SPOE exchange that got no answer
    // (status not 0).
    let new_lines = || haproxy.stdout()[mark..].to_string();
    wait_until(
        Duration::from_secs(5),
        "HAProxy's log of the refusal",
        || {
            let lines = new_lines();
            lines.contains("fe_mtls~ fe_mtls/<NOSRV>") && lines.contains("SPOE: [hcc-agent]")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", haproxy.logs()));
    let lines = new_lines();
    let ours: Vec<&str> = lines
        .lines()
        .filter(|l| l.contains("fe_mtls") || l.starts_with("SPOE:"))
        .collect();
    assert_eq!(ours.len(), 2, "one connection, one SPOE event:\n{lines}");
    let refusal = ours.iter().find(|l| l.contains("fe_mtls~")).unwrap();
    assert_eq!(
        refusal.split_whitespace().nth(6),
        Some("PR"),
        "not ended by a rule: {refusal}"
    );
    let event = ours.iter().find(|l| l.starts_with("SPOE:")).unwrap();
    assert!(!event.contains(" st=0 "), "the agent answered: {event}");
    assert_eq!(denied_requests(&stats_addr), denied_before + 1);
    assert!(haproxy.is_running(), "HAProxy died\n{}", haproxy.logs());
    assert_eq!(stats.errors.load(Ordering::Relaxed), 0);
}

/// fe_mtls's denied-requests counter (`dreq`), from HAProxy's stats page, which answering at all
/// shows HAProxy still serves.
fn denied_requests(stats: &str) -> u64 {
    let (status, csv) = http_get(stats, "/stats;csv", Duration::from_secs(2))
        .unwrap_or_else(|e| panic!("HAProxy's stats: {e}"));
    assert_eq!(status, 200, "{csv}");
    let header: Vec<&str> = csv.lines().next().unwrap_or_default().split(',').collect();
    let dreq = header
        .iter()
        .position(|h| *h == "dreq")
        .unwrap_or_else(|| panic!("no dreq in {csv}"));
    let row = csv
        .lines()
        .find(|l| l.starts_with("fe_mtls,FRONTEND,"))
        .unwrap_or_else(|| panic!("no fe_mtls frontend in {csv}"));
    row.split(',').nth(dreq).unwrap().parse().unwrap()
}
