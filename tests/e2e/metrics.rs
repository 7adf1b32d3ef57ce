//! `/metrics` on `-stats-addr`: valid Prometheus text (promtool), counters that rise with real
//! traffic, upstream series named by service and instance, and intentions decisions counted.

use std::process::{Command, Stdio};
use std::time::Duration;

use crate::support;
use crate::support::mesh::{Mesh, MeshOptions};
use crate::support::*;

fn scrape(addr: &str) -> String {
    let (status, body) = http_get(addr, "/metrics", Duration::from_secs(5)).expect("scrape");
    assert_eq!(status, 200);
    body
}

/// The value of the first sample whose line starts with `prefix` and contains every `needle`.
fn sample(text: &str, prefix: &str, needles: &[&str]) -> Option<f64> {
    text.lines()
        .filter(|l| l.starts_with(prefix) && needles.iter().all(|n| l.contains(n)))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

fn promtool_check(text: &str) {
    let mut child = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool installed by scripts/install-deps");
    std::io::Write::write_all(child.stdin.as_mut().unwrap(), text.as_bytes()).unwrap();
    drop(child.stdin.take());
    let out = child.wait_with_output().unwrap();
    // promtool exits 1 on errors and 3 on lint warnings only (e.g. HAProxy's own metric names).
    let report = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.code() != Some(1) && !report.contains("error"),
        "promtool: {report}"
    );
    if let Some(line) = report.lines().find(|l| l.contains("hcc_")) {
        panic!("promtool finds fault with our own metric: {line}");
    }
}

#[test]
fn metrics_are_valid_and_count_real_traffic() {
    let mesh = Mesh::start(MeshOptions {
        intentions: true,
        stats: true,
        ..Default::default()
    });
    let client = mesh.client_stats.clone().unwrap();
    let server = mesh.server_stats.clone().unwrap();
    let before = scrape(&client);
    promtool_check(&before);
    let instance = "server=\"server-sidecar-proxy.node1\"";
    let service = "service=\"service server\"";
    let sessions = |t: &str| sample(t, "haproxy_server_sessions_total", &[instance, service]);
    let n0 = sessions(&before).unwrap_or_else(|| panic!("no series for the instance in\n{before}"));
    assert!(!before.contains("server=\"s1\""), "a free slot is exported");
    for _ in 0..10 {
        let (status, _) = http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5)).unwrap();
        assert_eq!(status, 200);
    }
    let after = scrape(&client);
    assert!(
        sessions(&after).unwrap() >= n0 + 10.0,
        "sessions did not rise:\n{after}"
    );
    assert_eq!(sample(&after, "hcc_ready", &[]), Some(1.0));
    assert!(sample(&after, "hcc_certificate_expiry_seconds", &["cert=\"leaf\""]).unwrap() > 3600.0);

    // A deny intention raises the server sidecar's deny counter.
    let denied = |t: &str| sample(t, "hcc_intentions_decisions_total", &["result=\"deny\""]);
    let d0 = denied(&scrape(&server)).expect("decisions counted");
    mesh.consul.create_intention("client", "server", "deny");
    wait_until(
        Duration::from_secs(10),
        "a denied request to be counted",
        || {
            let _ = http_get(&mesh.upstream_addr(), "/", Duration::from_secs(2));
            denied(&scrape(&server)).unwrap_or(0.0) > d0
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", scrape(&server)));
    promtool_check(&scrape(&server));
}

#[test]
fn the_stats_service_is_registered_with_a_passing_check_and_gone_after_sigterm() {
    let consul = Consul::start();
    let app = HttpApp::start("ok");
    let port = free_port();
    consul.register(&sidecar_registration("server", app.port(), port, &[]));
    let base = TempDir::new("statsreg");
    let stats = format!("127.0.0.1:{}", free_port());
    let mut sc = Child::spawn(
        "sidecar",
        Command::new(bin_path())
            .args(["-sidecar-for", "server", "-http-addr", &consul.http_addr()])
            .args(["-stats-addr", &stats, "-stats-service-register"])
            .arg("-haproxy-cfg-base-path")
            .arg(base.path()),
        base.path(),
    );
    let passing = || {
        let list = consul.get_json("/v1/health/service/server-sidecar-stats?passing=1");
        list.as_array().cloned().unwrap_or_default()
    };
    wait_until(
        Duration::from_secs(30),
        "the stats service to pass its check",
        || !passing().is_empty(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.logs()));
    let entry = &passing()[0];
    assert_eq!(
        entry["Service"]["Port"].as_u64(),
        stats.rsplit(':').next().unwrap().parse().ok()
    );
    assert_eq!(entry["Service"]["Address"], "127.0.0.1");
    let tags = entry["Service"]["Tags"].to_string();
    assert!(
        tags.contains("haproxy-consul-connect") && tags.contains("metrics"),
        "{tags}"
    );
    let check = entry["Checks"].to_string();
    assert!(check.contains(&format!("http://{stats}/ready")), "{check}");

    sc.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(
        sc.wait_timeout(Duration::from_secs(40))
            .and_then(|s| s.code()),
        Some(0)
    );
    let gone = consul.get_json("/v1/catalog/service/server-sidecar-stats");
    assert_eq!(
        gone.as_array().map(Vec::len),
        Some(0),
        "still registered: {gone}"
    );
}

#[test]
fn http_access_logs_reach_the_sidecar_log_tagged_at_info() {
    let consul = Consul::start();
    let app = HttpApp::start("ok");
    let server_port = free_port();
    consul.register(&sidecar_registration(
        "server",
        app.port(),
        server_port,
        &[],
    ));
    // Two clients of the same server, one printing INFO and one only WARN and worse.
    let (up_info, up_warn) = (free_port(), free_port());
    for (name, up) in [("client", up_info), ("quiet", up_warn)] {
        let mut reg: serde_json::Value = serde_json::from_str(&sidecar_registration(
            name,
            free_port(),
            free_port(),
            &[("server", up)],
        ))
        .unwrap();
        reg["Connect"]["SidecarService"]["Proxy"]["Upstreams"][0]["Config"] =
            serde_json::json!({"protocol": "http"});
        consul.register(&reg.to_string());
    }
    let base = TempDir::new("access");
    let _server = support::mesh::sidecar(&consul, &base, "server", false, &[]);
    let client = support::mesh::sidecar(&consul, &base, "client", false, &["-log-level", "info"]);
    let mut quiet = support::mesh::sidecar(&consul, &base, "quiet", false, &["-log-level", "warn"]);
    for (addr, sidecar) in [
        (format!("127.0.0.1:{up_warn}"), &quiet),
        (format!("127.0.0.1:{up_info}"), &client),
    ] {
        wait_until(
            Duration::from_secs(30),
            "an answer through the http upstream",
            || {
                matches!(
                    http_get(&addr, "/access-probe", Duration::from_secs(2)),
                    Ok((200, _))
                )
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.logs()));
    }
    wait_until(Duration::from_secs(10), "the access log line", || {
        client.logs().lines().any(|l| {
            l.contains("INFO")
                && l.contains("[haproxy]")
                && l.contains("GET /access-probe")
                // The syslog priority HAProxy writes is read, not printed.
                && !l.contains("<134>")
        })
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", client.logs()));

    // At WARN the operator sees no access line (stopping the sidecar flushes whatever its
    // HAProxy wrote), and the work is saved at the source: HAProxy itself is told to log
    // only warnings and worse, so it neither formats nor writes a line per request.
    let rendered = std::fs::read_to_string(
        std::fs::read_dir(base.path())
            .unwrap()
            .filter_map(Result::ok)
            .map(|e| e.path().join("haproxy.cfg"))
            .find(|p| p.to_string_lossy().contains("quiet") && p.exists())
            .expect("the quiet sidecar's haproxy.cfg"),
    )
    .unwrap();
    assert!(
        rendered.contains("log stdout format short local0 warning"),
        "{rendered}"
    );
    quiet.stop();
    let logs = quiet.logs();
    assert!(!logs.contains("/access-probe"), "{logs}");
}
