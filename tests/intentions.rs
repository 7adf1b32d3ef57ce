//! Intentions enforced by the sidecar's own SPOE agent, against real Consul and HAProxy: the
//! original's `case-badauthz`, fail-closed behaviour, and agreement with Consul's authorize.

mod support;

use std::time::{Duration, Instant};

use haproxy_consul_connect::consul::api::IntentionEntry;
use haproxy_consul_connect::intentions::for_destination;
use haproxy_consul_connect::spoe::authz::{AuthzTable, DefaultPolicy};
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

/// For a table of intentions, our decisions equal Consul's own `/v1/agent/connect/authorize`.
#[test]
fn decisions_agree_with_consul_authorize_on_a_live_agent() {
    let consul = Consul::start();
    for (source, action) in [
        ("client", "deny"),
        ("*", "allow"),
        ("db", "deny"),
        ("web", "allow"),
    ] {
        consul.create_intention(source, "server", action);
    }
    // An intention for another destination must not count.
    consul.create_intention("other", "elsewhere", "deny");
    let all: Vec<IntentionEntry> =
        serde_json::from_value(consul.get_json("/v1/connect/intentions")).unwrap();
    let me = consul.get_json("/v1/agent/self");
    let default_allow = !me["DebugConfig"]["ACLsEnabled"].as_bool().unwrap()
        || me["DebugConfig"]["ACLDefaultPolicy"] == "allow";
    let roots = consul.get_json("/v1/agent/connect/ca/roots");
    let roots_pem: Vec<&str> = roots["Roots"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r["RootCert"].as_str().unwrap())
        .collect();
    let table = AuthzTable::new(
        roots["TrustDomain"].as_str().unwrap(),
        &roots_pem.join("\n"),
        for_destination(&all, "server"),
        if default_allow {
            DefaultPolicy::Allow
        } else {
            DefaultPolicy::Deny
        },
    )
    .unwrap();

    let mut verdicts = Vec::new();
    for source in ["client", "web", "db", "other", "anything"] {
        let leaf = consul.get_json(&format!("/v1/agent/connect/ca/leaf/{source}"));
        let pem = leaf["CertPEM"].as_str().unwrap();
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        let der = decode_base64(&b64);
        let ours = table.decide(Some(&der));
        let theirs = consul.authorize("server", &leaf);
        assert_eq!(
            ours.allow,
            theirs["Authorized"].as_bool().unwrap(),
            "{source}: ours {:?}, Consul {:?}",
            ours.reason,
            theirs["Reason"]
        );
        verdicts.push((source, ours.allow));
    }
    // Agreement alone would also hold if the intentions never reached Consul: both sides would
    // then allow everything.
    assert_eq!(
        verdicts,
        [
            ("client", false),
            ("web", true),
            ("db", false),
            ("other", true),
            ("anything", true),
        ],
        "exact deny, exact allow, exact deny, another destination's deny ignored, wildcard allow"
    );
}

fn decode_base64(s: &str) -> Vec<u8> {
    let val = |c: u8| match c {
        b'A'..=b'Z' => c - b'A',
        b'a'..=b'z' => c - b'a' + 26,
        b'0'..=b'9' => c - b'0' + 52,
        b'+' => 62,
        b'/' => 63,
        _ => panic!("not base64: {c}"),
    };
    let bytes: Vec<u8> = s.bytes().filter(|b| *b != b'=').collect();
    let mut out = Vec::new();
    for chunk in bytes.chunks(4) {
        let n = chunk.iter().enumerate().fold(0u32, |acc, (i, c)| {
            acc | (u32::from(val(*c)) << (18 - 6 * i))
        });
        out.push((n >> 16) as u8);
        if chunk.len() > 2 {
            out.push((n >> 8) as u8);
        }
        if chunk.len() > 3 {
            out.push(n as u8);
        }
    }
    out
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

    let roots = consul.get_json("/v1/agent/connect/ca/roots");
    std::fs::write(
        base.join("roots.pem"),
        roots["Roots"][0]["RootCert"].as_str().unwrap(),
    )
    .unwrap();
    let mut verdicts = Vec::new();
    for source in ["web", "client", "other"] {
        let (cert, key, leaf) = consul.leaf_files(source, base.path());
        let ours = curl_mtls(port, Some((&cert, &key)), &base.join("roots.pem")).is_ok();
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
