//! What only current Consul (1.10+) puts in a registration, on real programs: an upstream on a
//! unix socket, an upstream in a cluster peer, and the protocol
//! that service-defaults fills in. On Consul 1.8.7 these tests check only that they were
//! skipped for a reason (the fields do not exist there).

use std::io::{Read, Write};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use crate::support;
use crate::support::mesh::{Mesh, MeshOptions, APP_BODY};
use crate::support::*;
use serde_json::Value;

/// One HTTP/1.0 GET over a unix socket; the body when the status is 200.
fn get_over_unix(path: &std::path::Path) -> Result<String, String> {
    let mut s =
        UnixStream::connect(path).map_err(|e| format!("connect {}: {e}", path.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(3)))
        .map_err(|e| e.to_string())?;
    s.write_all(b"GET / HTTP/1.0\r\nHost: x\r\n\r\n")
        .map_err(|e| e.to_string())?;
    let mut out = String::new();
    s.read_to_string(&mut out).map_err(|e| e.to_string())?;
    match out.split_once("\r\n\r\n") {
        Some((head, body))
            if head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200") =>
        {
            Ok(body.to_string())
        }
        _ => Err(format!("unexpected answer: {out:?}")),
    }
}

/// `client` re-registered with `upstreams` as raw JSON (fields only current Consul knows).
fn register_client(mesh: &Mesh, upstreams: Value) {
    let mut reg: Value = serde_json::from_str(&sidecar_registration(
        "client",
        free_port(),
        mesh.client_port,
        &[],
    ))
    .unwrap();
    reg["Connect"]["SidecarService"]["Proxy"]["Upstreams"] = upstreams;
    mesh.consul.register(&reg.to_string());
}

fn skip_on_old_consul(what: &str) -> bool {
    if consul_is_current() {
        return false;
    }
    eprintln!(
        "skipped on Consul {}: {what} exists from Consul 1.10",
        consul_version()
    );
    true
}

#[test]
fn a_unix_socket_upstream_serves_with_its_mode_and_the_rest_keeps_serving() {
    if skip_on_old_consul("LocalBindSocketPath") {
        return;
    }
    let mesh = Mesh::start(MeshOptions::default());
    let sock = mesh.base.join("up.sock");
    register_client(
        &mesh,
        serde_json::json!([
            {"DestinationName": "server", "LocalBindPort": mesh.upstream_port},
            {"DestinationName": "server", "Datacenter": "dc1",
             "LocalBindSocketPath": sock.display().to_string(), "LocalBindSocketMode": "0640"},
        ]),
    );
    wait_until(
        Duration::from_secs(30),
        "the unix socket listener to answer",
        || get_over_unix(&sock).is_ok_and(|b| b == APP_BODY),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let meta = std::fs::metadata(&sock).unwrap();
    assert!(meta.file_type().is_socket());
    assert_eq!(
        meta.permissions().mode() & 0o777,
        0o640,
        "LocalBindSocketMode is applied"
    );
    assert!(
        mesh.client_sidecar
            .log_contains("rendering the whole configuration instead"),
        "a socket with a mode is created by a full render:\n{}",
        mesh.client_sidecar.logs()
    );
    // The port upstream never stopped being served.
    assert!(matches!(
        http_get(&mesh.upstream_addr(), "/", Duration::from_secs(3)),
        Ok((200, b)) if b == APP_BODY
    ));
}

#[test]
fn peer_upstreams_are_named_once_and_the_rest_serves() {
    // Transparent mode has its own test (tests/e2e/transparent_proxy.rs, in namespaces: its
    // outbound listener's port is fixed).
    if skip_on_old_consul("DestinationPeer") {
        return;
    }
    let mesh = Mesh::start(MeshOptions::default());
    let peer_port = free_port();
    register_client(
        &mesh,
        serde_json::json!([
            {"DestinationName": "server", "LocalBindPort": mesh.upstream_port},
            {"DestinationName": "server", "DestinationPeer": "peer1", "LocalBindPort": peer_port},
        ]),
    );
    // No such peering here: the peered upstream listens and closes what it accepts.
    let peer_warning =
        "upstream service server of peer peer1: the peering or its instances are not read yet";
    wait_until(Duration::from_secs(30), "the warning", || {
        mesh.client_sidecar.log_contains(peer_warning)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    // Churn on the destination the client watches (a second instance of `server`, then its
    // removal) rebuilds the model; each warning stays one line. Each step is waited for in
    // HAProxy before counting, so the rebuilds have happened.
    let client_dir = mesh.workdir("client");
    let slots = format!("_{}", mesh.upstream_port);
    let up = || servers_up(&client_dir, &slots);
    let second = HttpApp::start(APP_BODY);
    let mut reg: Value = serde_json::from_str(&sidecar_registration(
        "server-2",
        second.port(),
        free_port(),
        &[],
    ))
    .expect("a registration");
    reg["Name"] = "server".into();
    mesh.consul.register(&reg.to_string());
    let second_sidecar = support::mesh::sidecar(&mesh.consul, &mesh.base, "server-2", false, &[]);
    wait_until(
        Duration::from_secs(30),
        "the second instance in service",
        || up() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}: {} up\n{}", up(), mesh.client_sidecar.logs()));
    mesh.consul.deregister("server-2");
    wait_until(Duration::from_secs(30), "the second instance gone", || {
        up() == 1
    })
    .unwrap_or_else(|e| panic!("{e}: {} up\n{}", up(), mesh.client_sidecar.logs()));
    drop(second_sidecar);
    let logs = mesh.client_sidecar.logs();
    assert_eq!(logs.matches(peer_warning).count(), 1, "{logs}");
    let peered = http_get(
        &format!("127.0.0.1:{peer_port}"),
        "/",
        Duration::from_secs(3),
    );
    assert!(
        peered.is_err(),
        "the undialable peer's upstream answered: {peered:?}"
    );
    assert!(matches!(
        http_get(&mesh.upstream_addr(), "/", Duration::from_secs(3)),
        Ok((200, b)) if b == APP_BODY
    ));
}

#[test]
fn service_defaults_protocol_switches_the_public_listener_live() {
    if skip_on_old_consul("service-defaults reaching the registration") {
        return;
    }
    let mesh = Mesh::start(MeshOptions::default());
    mesh.consul.set_protocol("server", "http");
    let cfg = mesh.workdir("server").join("haproxy.cfg");
    wait_until(
        Duration::from_secs(30),
        "the public listener in http mode",
        || {
            std::fs::read_to_string(&cfg).is_ok_and(|c| {
                c.split("\nfrontend ")
                    .any(|f| f.starts_with("public") && f.contains("mode http"))
            })
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    wait_until(Duration::from_secs(10), "traffic in http mode", || {
        matches!(http_get(&mesh.upstream_addr(), "/", Duration::from_secs(3)), Ok((200, b)) if b == APP_BODY)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
}
