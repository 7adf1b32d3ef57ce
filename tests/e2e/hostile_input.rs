//! Hostile values from Consul never change what HAProxy does (issue 24). Anyone who may
//! register a service or write a config entry can put any string where the sidecar reads an
//! address or a name; each case here registers one in a real Consul while traffic flows and
//! checks that the client's HAProxy is exactly as it was (configuration, no reload, nothing
//! listening where the payload asked), that no request failed, that the sidecar named the
//! value once, and that a sidecar started while the value is present serves all the same.

use std::net::{TcpListener, TcpStream};
use std::path::Path;
use std::time::Duration;

use crate::support::load::Load;
use crate::support::mesh::{sidecar, Mesh, MeshOptions, APP_BODY};
use crate::support::*;
use nix::sys::signal::Signal;

/// The running configuration without the Dataplane API's version line, which a write of the
/// same content changes.
fn config(workdir: &Path) -> String {
    std::fs::read_to_string(workdir.join("haproxy.cfg"))
        .expect("haproxy.cfg")
        .lines()
        .filter(|l| !l.starts_with("# _version="))
        .collect::<Vec<_>>()
        .join("\n")
}

/// Every frontend and backend the running HAProxy has, from `show stat`.
fn proxies(workdir: &Path) -> Vec<String> {
    let stat = haproxy_cli(&workdir.join("haproxy.sock"), "show stat");
    let mut out: Vec<String> = stat
        .lines()
        .filter_map(|l| {
            let mut cols = l.split(',');
            let (px, sv) = (cols.next()?, cols.next()?);
            matches!(sv, "FRONTEND" | "BACKEND").then(|| format!("{px}/{sv}"))
        })
        .collect();
    out.sort();
    out
}

/// How many log lines name a refused value and hold `needle`.
fn refusals(logs: &str, needle: &str) -> usize {
    logs.lines()
        .filter(|l| l.contains("refused by the sidecar") && l.contains(needle))
        .count()
}

fn nothing_listens_on(port: u16) -> bool {
    TcpStream::connect_timeout(
        &format!("127.0.0.1:{port}").parse().unwrap(),
        Duration::from_millis(500),
    )
    .is_err()
}

/// A `server-sidecar-proxy` instance registered as-is, address and all.
fn register_proxy_instance(consul: &Consul, id: &str, address: &str, port: u16) {
    consul.register(
        &serde_json::json!({
            "ID": id,
            "Name": "server-sidecar-proxy",
            "Kind": "connect-proxy",
            "Address": address,
            "Port": port,
            "Proxy": {"DestinationServiceName": "server", "DestinationServiceID": "server",
                      "LocalServicePort": 1},
        })
        .to_string(),
    );
}

/// `hcc_refused_values_total` from a sidecar's `-stats-addr`.
fn refused_metric(stats: &str) -> u64 {
    let (_, body) = http_get(stats, "/metrics", Duration::from_secs(5)).expect("/metrics");
    body.lines()
        .find_map(|l| l.strip_prefix("hcc_refused_values_total "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or_else(|| panic!("no hcc_refused_values_total in\n{body}"))
}

#[test]
fn hostile_instance_addresses_change_nothing_and_are_named_once() {
    let mut mesh = Mesh::start(MeshOptions {
        stats: true,
        ..MeshOptions::default()
    });
    let workdir = mesh.workdir("client");
    let proxies_before = proxies(&workdir);
    let reloads_before = reloads(&workdir.join("master.sock"));
    let load = Load::expecting(mesh.upstream_addr(), APP_BODY);

    let pwn = free_port();
    let injected = format!(
        "10.0.0.9\nlisten pwn\n bind 127.0.0.1:{pwn}\n server s 127.0.0.1:{}\n#",
        mesh.app.port()
    );
    register_proxy_instance(&mesh.consul, "evil-newline", &injected, 21000);
    // HAProxy's CLI splits commands on ';': this would run a second command if it reached a
    // runtime-API line.
    register_proxy_instance(&mesh.consul, "evil-semicolon", "127.0.0.1;show info", 21000);
    wait_until(
        Duration::from_secs(30),
        "the client's sidecar to name both refused addresses",
        || {
            let logs = mesh.client_sidecar.logs();
            refusals(&logs, "evil-newline") == 1 && refusals(&logs, "evil-semicolon") == 1
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));

    // A legitimate change after them: another registration of the real server sidecar, which
    // the client must serve (the state is rebuilt with the hostile instances still present).
    register_proxy_instance(&mesh.consul, "server-again", "127.0.0.1", mesh.server_port);
    let server_backend = "_local_127.0.0.1_".to_string() + &mesh.upstream_port.to_string();
    wait_until(
        Duration::from_secs(30),
        "the second real instance to be live in the client's HAProxy",
        || servers_up(&workdir, &server_backend) == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));

    let after = config(&workdir);
    for payload in ["listen pwn", "10.0.0.9", "show info"] {
        assert!(
            !after.contains(payload),
            "{payload:?} reached haproxy.cfg:\n{after}"
        );
    }
    let state = haproxy_cli(&workdir.join("haproxy.sock"), "show servers state");
    assert!(
        !state.contains("10.0.0.9"),
        "a hostile address reached HAProxy's servers:\n{state}"
    );
    assert!(
        nothing_listens_on(pwn),
        "something listens where the payload asked"
    );
    assert_eq!(
        reloads(&workdir.join("master.sock")),
        reloads_before,
        "a refused value reloaded HAProxy"
    );
    assert_eq!(
        proxies(&workdir),
        proxies_before,
        "the refused values changed HAProxy's listeners or backends"
    );
    let logs = mesh.client_sidecar.logs();
    assert_eq!(refusals(&logs, "evil-newline"), 1, "named once:\n{logs}");
    assert_eq!(refusals(&logs, "evil-semicolon"), 1, "named once:\n{logs}");
    assert!(
        !logs.contains("\nlisten pwn"),
        "the warning itself carried the line break:\n{logs}"
    );
    let stats = mesh.client_stats.clone().expect("stats address");
    assert!(refused_metric(&stats) >= 2, "the refusals are counted");
    let (ok, failed, errors) = load.finish();
    assert!(ok > 0, "no request was served");
    assert_eq!(
        failed,
        0,
        "requests failed, the first: {:?}",
        &errors[..errors.len().min(5)]
    );

    // A sidecar started while the hostile instances are registered serves all the same.
    mesh.client_sidecar.stop();
    mesh.client_sidecar = sidecar(
        &mesh.consul,
        &mesh.base,
        "client",
        false,
        &["-stats-addr", &stats],
    );
    wait_until(
        Duration::from_secs(60),
        "the restarted client's sidecar to serve",
        || matches!(http_get(&mesh.upstream_addr(), "/", Duration::from_secs(2)), Ok((200, b)) if b == APP_BODY),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let workdir = mesh.workdir("client");
    let cfg = config(&workdir);
    assert!(
        !cfg.contains("listen pwn") && !cfg.contains("10.0.0.9"),
        "{cfg}"
    );
    assert!(nothing_listens_on(pwn));
    let logs = mesh.client_sidecar.logs();
    assert_eq!(refusals(&logs, "evil-newline"), 1, "named once:\n{logs}");
}

#[test]
fn a_hostile_discovery_chain_keeps_the_routing_that_served() {
    let mut mesh = Mesh::start(MeshOptions::default());
    let workdir = mesh.workdir("client");
    let reloads_before = reloads(&workdir.join("master.sock"));
    let load = Load::expecting(mesh.upstream_addr(), APP_BODY);
    let admin = free_port();
    let entry = serde_json::json!({
        "Kind": "service-resolver",
        "Name": "server",
        "Redirect": {"Datacenter": format!(
            "dc9\nglobal\n stats socket ipv4@127.0.0.1:{admin} level admin\n#"
        )},
    });
    let (status, body) = mesh.consul.put("/v1/config", &entry.to_string());
    assert!(
        status == 200 && body.trim() == "true",
        "Consul took the resolver: {status} {body}"
    );
    wait_until(
        Duration::from_secs(30),
        "the client's sidecar to refuse the redirect's datacenter",
        || refusals(&mesh.client_sidecar.logs(), "Target.") == 1,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let cfg = config(&workdir);
    assert!(
        !cfg.contains("stats socket ipv4@127.0.0.1"),
        "the payload reached haproxy.cfg:\n{cfg}"
    );
    assert!(nothing_listens_on(admin), "an admin socket listens");
    assert_eq!(reloads(&workdir.join("master.sock")), reloads_before);
    // Every file rendered anew from the current state (SIGHUP) carries no payload either.
    mesh.client_sidecar.signal(Signal::SIGHUP);
    wait_until(
        Duration::from_secs(30),
        "the full reconcile to be applied",
        || mesh.client_sidecar.log_contains("full reconcile applied"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let cfg = config(&workdir);
    assert!(!cfg.contains("stats socket ipv4@127.0.0.1"), "{cfg}");
    assert!(nothing_listens_on(admin), "an admin socket listens");
    let (ok, failed, errors) = load.finish();
    assert!(ok > 0);
    assert_eq!(
        failed,
        0,
        "requests failed, the first: {:?}",
        &errors[..errors.len().min(5)]
    );
    let logs = mesh.client_sidecar.logs();
    assert!(
        logs.contains("keeping the routing it had"),
        "the warning says what keeps serving:\n{logs}"
    );
}

#[test]
fn a_listener_haproxy_refuses_and_an_out_of_range_timeout_hold_back_nothing() {
    let mesh = Mesh::start(MeshOptions::default());
    let workdir = mesh.workdir("client");
    // A route whose RequestTimeout (720h) is above HAProxy's largest timeout, next to the
    // healthy upstream: the route serves without it and nothing else is held back.
    mesh.consul.set_protocol("server", "http");
    let router = serde_json::json!({
        "Kind": "service-router",
        "Name": "server",
        "Routes": [
            {"Match": {"HTTP": {"PathPrefix": "/slow"}},
             "Destination": {"Service": "server", "RequestTimeout": "720h"}},
            {"Match": {"HTTP": {"Header": [{"Name": "x)", "Present": true}]}},
             "Destination": {"Service": "server"}},
            {"Match": {"HTTP": {"Header": [{"Name": "x-brace", "Exact": "{"}]}},
             "Destination": {"Service": "server"}},
        ],
    });
    let (status, body) = mesh.consul.put("/v1/config", &router.to_string());
    assert!(status == 200 && body.trim() == "true", "{status} {body}");
    wait_until(
        Duration::from_secs(30),
        "the client's sidecar to refuse the timeout and both header matchers",
        || {
            let logs = mesh.client_sidecar.logs();
            refusals(&logs, "RequestTimeout") == 1
                && refusals(&logs, "Header.Name") == 1
                && refusals(&logs, "Exact") == 1
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    wait_until(
        Duration::from_secs(30),
        "the route to /slow to be in the client's configuration",
        || config(&workdir).contains("path -m beg /slow"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let cfg = config(&workdir);
    assert!(!cfg.contains("2592000000"), "{cfg}");
    assert!(!cfg.contains("x)"), "{cfg}");
    assert!(matches!(
        http_get(&mesh.upstream_addr(), "/slow", Duration::from_secs(5)),
        Ok((200, b)) if b == APP_BODY
    ));

    // A listener HAProxy cannot load: a second upstream on a port another process holds.
    let held = TcpListener::bind("127.0.0.1:0").expect("a port to hold");
    let held_port = held.local_addr().unwrap().port();
    let load = Load::expecting(mesh.upstream_addr(), APP_BODY);
    mesh.consul.register(&sidecar_registration(
        "client",
        free_port(),
        mesh.client_port,
        &[("server", mesh.upstream_port), ("server@dc1", held_port)],
    ));
    wait_until(
        Duration::from_secs(60),
        "the client's sidecar to set the refused listener aside",
        || {
            mesh.client_sidecar
                .log_contains("HAProxy refuses its new configuration")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));

    // Churn on the healthy upstream is still applied live.
    register_proxy_instance(&mesh.consul, "server-again", "127.0.0.1", mesh.server_port);
    wait_until(
        Duration::from_secs(30),
        "the second instance to be live while the refused listener is set aside",
        || servers_up(&workdir, &format!("_{}", mesh.upstream_port)) >= 2,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {}\n{}",
            servers_up(&workdir, &format!("_{}", mesh.upstream_port)),
            mesh.client_sidecar.logs()
        )
    });
    let (ok, failed, errors) = load.finish();
    let logs = mesh.client_sidecar.logs();
    let events: Vec<&str> = logs
        .lines()
        .filter(|l| !l.contains("[haproxy] 127.0.0.1:"))
        .collect();
    assert!(ok > 0);
    assert_eq!(
        failed,
        0,
        "requests failed, the first: {:?}\n{}",
        &errors[..errors.len().min(5)],
        events.join("\n")
    );
    assert_eq!(
        logs.matches("HAProxy refuses its new configuration")
            .count(),
        1,
        "the refused listener is named once:\n{logs}"
    );
    drop(held);
}
