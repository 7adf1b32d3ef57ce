//! Intentions enforced by the sidecar's own SPOE agent, against real Consul and HAProxy: the
//! original's `case-badauthz`, fail-closed behaviour, and agreement with Consul's authorize.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::mesh::{Mesh, MeshOptions, APP_BODY};
use support::*;

fn allowed(mesh: &Mesh) -> bool {
    matches!(http_get(&mesh.upstream_addr(), "/", Duration::from_secs(3)), Ok((200, b)) if b == APP_BODY)
}

#[test]
fn a_deny_intention_blocks_and_its_removal_lets_traffic_through_without_a_reload() {
    let mesh = Mesh::start(MeshOptions {
        intentions: true,
        ..Default::default()
    });
    assert!(
        allowed(&mesh),
        "ACLs off and no intention: allowed by default"
    );
    let master = mesh.workdir("server").join("master.sock");
    let reloads_before = reloads(&master);

    let id = mesh.consul.create_intention("client", "server", "deny");
    let t = Instant::now();
    wait_until(Duration::from_secs(10), "the deny to take effect", || {
        !allowed(&mesh)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    eprintln!(
        "measured: deny effective after {} ms",
        t.elapsed().as_millis()
    );
    let bytes = mesh.app.bytes_received();
    let requests = mesh.app.requests();
    for _ in 0..5 {
        assert!(!allowed(&mesh), "a denied request got through");
    }
    assert_eq!(
        mesh.app.bytes_received(),
        bytes,
        "the app received bytes from a denied client"
    );
    assert_eq!(mesh.app.requests(), requests);

    mesh.consul.delete_intention(&id);
    let t = Instant::now();
    wait_until(
        Duration::from_secs(10),
        "traffic to be allowed again",
        || allowed(&mesh),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    eprintln!(
        "measured: allowed again after {} ms",
        t.elapsed().as_millis()
    );
    assert_eq!(
        reloads(&master),
        reloads_before,
        "an intention change reloaded HAProxy"
    );
}

#[test]
fn a_stalled_agent_fails_closed() {
    let mesh = Mesh::start(MeshOptions {
        intentions: true,
        ..Default::default()
    });
    assert!(allowed(&mesh));
    // Stopping the supervisor stops the agent's threads with it; HAProxy keeps running.
    // The sidecar itself: a launcher (HCC_HAPROXY_ROOTFS) cannot pass SIGSTOP on.
    let sidecar = Pid::from_raw(sidecar_pid(mesh.server_sidecar.pid()) as i32);
    kill(sidecar, Signal::SIGSTOP).unwrap();
    let requests = mesh.app.requests();
    let verdict = http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5));
    kill(sidecar, Signal::SIGCONT).unwrap();
    assert!(
        !matches!(verdict, Ok((200, _))),
        "a request passed while the agent could not answer: {verdict:?}"
    );
    assert_eq!(
        mesh.app.requests(),
        requests,
        "the app was reached without a decision"
    );
    wait_until(
        Duration::from_secs(10),
        "traffic after the agent is back",
        || allowed(&mesh),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
}

#[test]
fn with_enforcement_off_an_ignored_deny_is_never_silent() {
    let mesh = Mesh::start(MeshOptions::default());
    mesh.consul.create_intention("client", "server", "deny");
    wait_until(
        Duration::from_secs(10),
        "a warning about the ignored deny",
        || {
            mesh.server_sidecar
                .log_contains("deny intentions from client to server are ignored")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    assert!(allowed(&mesh), "enforcement is off, as the flag says");
}

#[test]
fn with_acls_default_deny_the_sidecar_agrees_with_consul_authorize() {
    let consul = Consul::start_acl_deny();
    let app = HttpApp::start(APP_BODY);
    let port = free_port();
    consul.register(&sidecar_registration("server", app.port(), port, &[]));
    for (source, action) in [("web", "allow"), ("client", "deny")] {
        consul.create_intention(source, "server", action);
    }
    // The sidecar gets what an operator would give it: a service identity, no agent:read.
    let (status, body) = consul.put(
        "/v1/acl/token",
        r#"{"Description": "server sidecar", "ServiceIdentities": [{"ServiceName": "server"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let base = TempDir::new("acl");
    std::fs::write(base.join("token"), token["SecretID"].as_str().unwrap()).unwrap();
    let sidecar = Child::spawn(
        "sidecar-server",
        std::process::Command::new(bin_path())
            .args([
                "-sidecar-for",
                "server",
                "-enable-intentions",
                "-http-addr",
                &consul.http_addr(),
            ])
            .arg("-token-file")
            .arg(base.join("token"))
            .arg("-haproxy-cfg-base-path")
            .arg(base.path()),
        base.path(),
    );
    wait_until(
        Duration::from_secs(30),
        "the sidecar to know the intentions",
        || {
            sidecar.log_contains("-> Ready")
                && sidecar
                    .log_contains("intentions table updated: 2 intention(s) for this service [")
                && sidecar.log_contains("], default deny")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.logs()));

    let ca = ready_with_ca(&sidecar, &consul, base.path());
    let mut verdicts = Vec::new();
    for source in ["web", "client", "other"] {
        let (cert, key, leaf) = consul.leaf_files(source, base.path());
        let ours = curl_mtls(port, Some((&cert, &key)), &ca).is_ok();
        let theirs = consul.authorize("server", &leaf);
        assert_eq!(
            ours,
            theirs["Authorized"].as_bool().unwrap(),
            "{source}: the sidecar {} it, Consul says {}\n{}",
            if ours { "let through" } else { "refused" },
            theirs["Reason"],
            sidecar.logs()
        );
        verdicts.push(ours);
    }
    assert_eq!(
        verdicts,
        [true, false, false],
        "allow, exact deny, default deny"
    );
}
