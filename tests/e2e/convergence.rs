//! Live convergence: instance churn, weights and certificate rotation reach HAProxy without a
//! reload and without a failed request (real Consul, HAProxy and Dataplane API).

use std::thread;
use std::time::{Duration, Instant};

use crate::support::load::Load;
use crate::support::mesh::{another_server_instance, Mesh, MeshOptions, APP_BODY};
use crate::support::*;

/// Another instance of `server`: its own app (answering `body`) and its own sidecar.
struct Instance {
    // Held for its Drop: the instance's sidecar stops with it.
    _sidecar: Child,
    app: HttpApp,
    id: String,
}

fn add_instance(mesh: &Mesh, id: &str, body: &str) -> Instance {
    let (sidecar, app) = another_server_instance(&mesh.consul, &mesh.base, id, body);
    Instance {
        _sidecar: sidecar,
        app,
        id: id.to_string(),
    }
}

#[test]
fn churn_under_load_fails_no_request_and_reloads_nothing() {
    let mesh = Mesh::start(MeshOptions::default());
    let master = mesh.workdir("client").join("master.sock");
    let reloads_before = reloads(&master);
    let load = Load::start(mesh.upstream_addr());
    mesh.app.wait_serving("the first instance to serve");

    // 1 → 3 instances.
    let two = add_instance(&mesh, "server-2", "two");
    let three = add_instance(&mesh, "server-3", "three");
    two.app.wait_serving("instance 2 to serve");
    three.app.wait_serving("instance 3 to serve");

    // Instance 2 critical, then passing again.
    let check = r#"{"Name": "flip", "ID": "flip-2", "ServiceID": "server-2-sidecar-proxy", "TTL": "10m", "Status": "passing"}"#;
    let (status, body) = mesh.consul.put("/v1/agent/check/register", check);
    assert_eq!(status, 200, "{body}");
    assert_eq!(mesh.consul.put("/v1/agent/check/fail/flip-2", "").0, 200);
    two.app
        .wait_idle("instance 2 to stop receiving while critical");
    mesh.app.wait_serving("instance 1 still serving");
    assert_eq!(mesh.consul.put("/v1/agent/check/pass/flip-2", "").0, 200);
    two.app.wait_serving("instance 2 to serve again");

    // 3 → 1: leave Consul first, then stop, as an orchestrator does.
    for inst in [&three, &two] {
        mesh.consul.deregister(&inst.id);
        inst.app
            .wait_idle("a deregistered instance to stop receiving");
    }
    let (three_seen, two_seen) = (three.app.requests(), two.app.requests());
    mesh.app.wait_serving("instance 1 serving alone");
    drop(three);
    drop(two);

    let (ok, failed, errors) = load.finish();
    eprintln!("measured: churn under load: {ok} requests ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests during churn: {errors:?}");
    assert!(ok > 50, "the load generator barely ran: {ok}");
    assert!(three_seen > 0 && two_seen > 0);
    assert_eq!(
        reloads(&master),
        reloads_before,
        "instance churn reloaded HAProxy\n{}",
        mesh.client_sidecar.logs()
    );
}

#[test]
fn a_weight_change_reaches_haproxy_live() {
    let mesh = Mesh::start(MeshOptions::default());
    let workdir = mesh.workdir("client");
    let master = workdir.join("master.sock");
    let stats = workdir.join("haproxy.sock");
    let reloads_before = reloads(&master);
    let port = mesh.server_port;
    let weight_of_server = || {
        // `show servers state`: be_id be_name srv_id srv_name srv_addr op admin uweight …
        haproxy_cli(&stats, "show servers state")
            .lines()
            .filter(|l| {
                l.split_whitespace()
                    .nth(1)
                    .is_some_and(|b| b.starts_with("be_up_svc_server"))
            })
            .find_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.get(18) == Some(&port.to_string().as_str())).then(|| f[7].to_string())
            })
    };
    assert_eq!(weight_of_server().as_deref(), Some("1"));

    let mut reg: serde_json::Value =
        serde_json::from_str(&sidecar_registration("server", mesh.app.port(), port, &[])).unwrap();
    reg["Connect"]["SidecarService"]["Weights"] = serde_json::json!({"Passing": 9, "Warning": 1});
    mesh.consul.register(&reg.to_string());
    wait_until(
        Duration::from_secs(30),
        "HAProxy's runtime weight to follow Consul",
        || weight_of_server().as_deref() == Some("9"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    assert_eq!(
        reloads(&master),
        reloads_before,
        "a weight change reloaded HAProxy"
    );
    let (status, body) = http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5)).unwrap();
    assert_eq!((status, body.as_str()), (200, APP_BODY));
}

/// The certificate a TLS server presents (PEM of the first certificate).
fn presented_leaf(port: u16) -> String {
    let out = std::process::Command::new("openssl")
        .args(["s_client", "-connect", &format!("127.0.0.1:{port}")])
        .stdin(std::process::Stdio::null())
        .output()
        .expect("openssl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let start = text.find("-----BEGIN CERTIFICATE-----").unwrap_or(0);
    let end = text
        .find("-----END CERTIFICATE-----")
        .map_or(text.len(), |e| e + "-----END CERTIFICATE-----".len());
    text[start..end].to_string()
}

fn chains_to(leaf_pem: &str, root_pem: &str, dir: &TempDir) -> bool {
    std::fs::write(dir.join("leaf.pem"), leaf_pem).unwrap();
    std::fs::write(dir.join("root.pem"), root_pem).unwrap();
    std::process::Command::new("openssl")
        .args(["verify", "-partial_chain", "-CAfile"])
        .arg(dir.join("root.pem"))
        .arg(dir.join("leaf.pem"))
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false)
}

#[test]
fn ca_rotation_under_load_fails_no_request_with_one_reload_per_certificate_change() {
    let mesh = Mesh::start(MeshOptions::default());
    let masters = [
        mesh.workdir("client").join("master.sock"),
        mesh.workdir("server").join("master.sock"),
    ];
    let before: Vec<u32> = masters.iter().map(|m| reloads(m)).collect();
    let old_root = mesh.consul.get_json("/v1/agent/connect/ca/roots")["ActiveRootID"]
        .as_str()
        .unwrap()
        .to_string();
    let load = Load::start(mesh.upstream_addr());
    mesh.app.wait_serving("traffic before the rotation");

    let key = std::process::Command::new("openssl")
        .args(["ecparam", "-name", "prime256v1", "-genkey", "-noout"])
        .output()
        .unwrap();
    let key = String::from_utf8(key.stdout).unwrap();
    let (status, body) = mesh.consul.put(
        "/v1/connect/ca/configuration",
        &serde_json::json!({"Provider": "consul", "Config": {"PrivateKey": key, "LeafCertTTL": "72h"}})
            .to_string(),
    );
    assert_eq!(status, 200, "{body}");
    let t = Instant::now();
    let dir = TempDir::new("rotation");
    let mut new_root = String::new();
    wait_until(
        Duration::from_secs(60),
        "the server sidecar to present a leaf of the new root",
        || {
            let roots = mesh.consul.get_json("/v1/agent/connect/ca/roots");
            let Some(active) = roots["Roots"].as_array().and_then(|r| {
                r.iter()
                    .find(|r| r["Active"] == true && r["ID"] != old_root.as_str())
            }) else {
                return false;
            };
            new_root = active["RootCert"].as_str().unwrap_or_default().to_string();
            chains_to(&presented_leaf(mesh.server_port), &new_root, &dir)
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    eprintln!(
        "measured: new leaf served {} ms after the CA change",
        t.elapsed().as_millis()
    );
    // Keep the load on a little after the switch: new handshakes on both sides use new leaves.
    mesh.app.wait_serving("traffic after the rotation");
    let (ok, failed, errors) = load.finish();
    eprintln!("measured: CA rotation under load: {ok} requests ok, {failed} failed");
    assert_eq!(
        failed, 0,
        "failed requests during the CA rotation: {errors:?}"
    );
    // The sidecar asks HAProxy after `commit ssl ca-file` whether its leaf is still attached
    // (src/apply.rs): where it is (3.2) the roots go live with no reload; where it is not (2.6,
    // 3.0) each sidecar reloads exactly once. Whichever way each took, the count must match.
    // Every new leaf on the public listener still demands a client certificate.
    assert!(
        asks_for_client_certificate(mesh.server_port),
        "the server's public listener stopped asking for client certificates"
    );
    let after: Vec<u32> = masters.iter().map(|m| reloads(m)).collect();
    let extra: Vec<u32> = after.iter().zip(&before).map(|(a, b)| a - b).collect();
    for (sidecar, extra) in [&mesh.client_sidecar, &mesh.server_sidecar]
        .iter()
        .zip(&extra)
    {
        let live = sidecar.log_contains("CA roots updated live");
        let reloaded = sidecar.log_contains("CA roots (and leaf) updated with one reload");
        assert!(
            live != reloaded,
            "exactly one way per sidecar:\n{}",
            sidecar.logs()
        );
        // A leaf that came after its roots is loaded by one reload of its own: a live commit
        // of it would leave the public listener without `verify required` (src/apply.rs).
        let leaf_later = sidecar.log_contains("leaf certificate updated with one reload");
        let want = u32::from(!live) + u32::from(leaf_later);
        assert_eq!(
            *extra,
            want,
            "reloads for the rotation:\n{}",
            sidecar.logs()
        );
        eprintln!(
            "measured: CA rotation {} ({} reload(s))",
            if live { "live" } else { "by reload" },
            extra
        );
    }
}

#[test]
fn an_upstream_added_and_removed_costs_one_reload_each_and_no_failed_request() {
    let mesh = Mesh::start(MeshOptions::default());
    let master = mesh.workdir("client").join("master.sock");
    let load = Load::start(mesh.upstream_addr());
    mesh.app.wait_serving("traffic on the first upstream");

    let r0 = reloads(&master);
    let extra = mesh.add_upstream();
    let r1 = reloads(&master);

    mesh.consul.register(&sidecar_registration(
        "client",
        free_port(),
        mesh.client_port,
        &[("server", mesh.upstream_port)],
    ));
    wait_until(Duration::from_secs(30), "the listener to go", || {
        std::net::TcpStream::connect(("127.0.0.1", extra)).is_err()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    mesh.app
        .wait_serving("traffic on the first upstream afterwards");
    let r2 = reloads(&master);
    let (ok, failed, errors) = load.finish();
    eprintln!(
        "measured: upstream add/remove: reloads {} and {}, {ok} ok, {failed} failed",
        r1 - r0,
        r2 - r1
    );
    assert!(
        r1 - r0 <= 1 && r2 - r1 <= 1,
        "reloads: add {}, remove {}",
        r1 - r0,
        r2 - r1
    );
    assert_eq!(failed, 0, "the other upstream failed requests: {errors:?}");
}

/// An http client's sidecar keeps idle mTLS connections to the server's sidecar for its next
/// requests (`http-reuse always`). When the server's HAProxy reloads (any Dataplane API
/// transaction), its old worker keeps those idle connections for one more request, answered
/// with `Connection: close` (`option idle-close-on-response`), instead of closing them at once:
/// a close racing with a request just sent on that connection loses the request, and the
/// client's HAProxy can then only close the app's connection without an answer (seen once on
/// HAProxy 3.2, in `l7_intentions::odd_paths_are_judged_and_served_in_normal_form`).
#[test]
fn a_reloading_destination_keeps_pooled_connections_for_one_more_request() {
    let mesh = Mesh::start(MeshOptions {
        protocol: Some("http"),
        ..MeshOptions::default()
    });
    let master = mesh.workdir("server").join("master.sock");
    // One request leaves an idle connection to the server's current worker in the pool.
    let first = http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5));
    assert_eq!(first.map(|r| r.0), Ok(200));
    let old = reload_server(&mesh, &master);
    // An old worker with nothing to serve exits within milliseconds; this one still holds the
    // client's idle connection.
    thread::sleep(Duration::from_secs(1));
    let kept = all_workers(&master);
    assert!(
        old.iter().all(|w| kept.contains(w)),
        "the old worker {old:?} closed the pooled connection at the reload (workers now {kept:?})\n{}",
        mesh.server_sidecar.logs()
    );
    // The next request is answered, and the old worker lets the connection go after it.
    let next = http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5));
    assert_eq!(next.map(|r| r.0), Ok(200));
    wait_until(Duration::from_secs(20), "the old worker to exit", || {
        let now = all_workers(&master);
        old.iter().all(|w| !now.contains(w))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
}

/// The same under load: clients sending request after request, each on a new connection to
/// the client's sidecar, while the server's HAProxy reloads again and again.
#[test]
fn an_http_client_sees_no_failure_while_its_destination_reloads() {
    let mesh = Mesh::start(MeshOptions {
        protocol: Some("http"),
        ..MeshOptions::default()
    });
    let master = mesh.workdir("server").join("master.sock");
    let loads: Vec<Load> = (0..4).map(|_| Load::start(mesh.upstream_addr())).collect();
    mesh.app.wait_serving("traffic before the reloads");
    const RELOADS: usize = 20;
    for _ in 0..RELOADS {
        reload_server(&mesh, &master);
        // Requests pool connections to the new worker before the next reload.
        thread::sleep(Duration::from_millis(200));
    }
    mesh.app.wait_serving("traffic after the reloads");
    let (mut ok, mut failed, mut errors) = (0, 0, Vec::new());
    for load in loads {
        let (o, f, e) = load.finish();
        ok += o;
        failed += f;
        errors.extend(e);
    }
    eprintln!("measured: {RELOADS} reloads of the destination: {ok} requests ok, {failed} failed");
    assert_eq!(failed, 0, "failed requests across the reloads: {errors:?}");
}

/// Reloads the server's HAProxy through its master socket (`reload`, as the Dataplane API's
/// reload command sends it) and waits until only new workers are current; returns the workers
/// it replaced. The master re-executes itself and may reset the connection before any answer,
/// so only the sending counts.
fn reload_server(mesh: &Mesh, master: &std::path::Path) -> Vec<u32> {
    use std::io::{Read, Write};
    let old = current_workers(master);
    let mut s = std::os::unix::net::UnixStream::connect(master).expect("the master socket");
    s.write_all(b"reload\n").expect("reload sent to the master");
    let _ = s.shutdown(std::net::Shutdown::Write);
    let _ = s.read_to_end(&mut Vec::new());
    wait_until(
        Duration::from_secs(20),
        "the server's HAProxy to reload",
        || {
            let now = current_workers(master);
            !now.is_empty() && now.iter().all(|w| !old.contains(w))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    old
}

/// Servers HAProxy itself has in `backend`: (name, address:port) of each, from its stats socket.
fn servers_in(stats: &std::path::Path, backend: &str) -> Vec<(String, String)> {
    haproxy_cli(stats, &format!("show servers state {backend}"))
        .lines()
        .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 5)
        .map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            (w[3].to_string(), format!("{}:{}", w[4], w[18]))
        })
        .collect()
}

/// Which slots of `backend` break the rule: HAProxy checks a slot in service, at its own port,
/// and never one in maintenance (a free slot, or an instance that has not proven its identity).
fn checks_off_service(stats: &std::path::Path, backend: &str) -> Vec<String> {
    haproxy_cli(stats, &format!("show servers state {backend}"))
        .lines()
        .filter(|l| !l.starts_with('#') && l.split_whitespace().count() > 21)
        .filter_map(|l| {
            let w: Vec<&str> = l.split_whitespace().collect();
            let num = |i: usize| w[i].parse::<u32>().unwrap_or(u32::MAX);
            // srv_admin_state bit 0x1: forced maintenance; srv_check_state 0x4: enabled,
            // 0x8: paused; srv_check_port 0 means the server's own port.
            let maintenance = num(6) & 0x1 != 0;
            let running = num(13) & 0x4 != 0 && num(13) & 0x8 == 0;
            let own_port = w[21] == "0" || w[21] == w[18];
            let wrong = if maintenance {
                running
            } else {
                !running || !own_port
            };
            wrong.then(|| l.to_string())
        })
        .collect()
}

/// Ten instances where the pool has eight slots, then one again: the pool doubles and halves
/// through HAProxy's runtime API (dynamic servers), with the file written once, never reloaded.
#[test]
fn a_slot_pool_grows_and_shrinks_live() {
    let mesh = Mesh::start(MeshOptions::default());
    let workdir = mesh.workdir("client");
    let (master, stats) = (workdir.join("master.sock"), workdir.join("haproxy.sock"));
    let backend = format!("be_up_svc_server_local_127.0.0.1_{}", mesh.upstream_port);
    let before = reloads(&master);
    assert_eq!(servers_in(&stats, &backend).len(), 8, "the smallest pool");

    // Nine more instances, each a port that accepts (Consul's TCP check of a sidecar).
    let listeners: Vec<std::net::TcpListener> = (0..9)
        .map(|_| std::net::TcpListener::bind("127.0.0.1:0").unwrap())
        .collect();
    for (i, l) in listeners.iter().enumerate() {
        let mut reg: serde_json::Value = serde_json::from_str(&sidecar_registration(
            &format!("extra-{i}"),
            free_port(),
            l.local_addr().unwrap().port(),
            &[],
        ))
        .unwrap();
        reg["Name"] = "server".into();
        mesh.consul.register(&reg.to_string());
    }
    wait_until(
        Duration::from_secs(60),
        "all ten instances in HAProxy",
        || {
            let s = servers_in(&stats, &backend);
            s.len() == 16 && s.iter().filter(|(_, a)| !a.ends_with(":1")).count() == 10
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            servers_in(&stats, &backend),
            mesh.client_sidecar.logs()
        )
    });
    // The applier logs once HAProxy has the servers, so the line may trail what the runtime
    // API already shows.
    wait_until(Duration::from_secs(10), "the resize logged", || {
        mesh.client_sidecar.log_contains("slot pools resized live")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    // The new slots are dynamic servers; these instances never prove an identity (a bare TCP
    // port), so they stay in maintenance, where nothing is checked, like the free slots.
    let wrong = checks_off_service(&stats, &backend);
    assert!(
        wrong.is_empty(),
        "slots checked against the rule:\n{wrong:#?}"
    );

    for i in 0..9 {
        mesh.consul.deregister(&format!("extra-{i}-sidecar-proxy"));
        mesh.consul.deregister(&format!("extra-{i}"));
    }
    wait_until(
        Duration::from_secs(60),
        "the pool back to eight slots",
        || servers_in(&stats, &backend).len() == 8,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    assert_eq!(reloads(&master), before, "a pool resize reloaded HAProxy");
    assert!(
        matches!(http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5)), Ok((200, b)) if b == APP_BODY),
        "the first instance still serves"
    );
    // The Dataplane API's file follows what HAProxy runs (a fresh render agrees, see mesh_deltas);
    // it is written right after the runtime changes of each batch.
    let cfg_path = workdir.join("haproxy.cfg");
    let slots_in_file = || {
        std::fs::read_to_string(&cfg_path)
            .unwrap_or_default()
            .lines()
            .filter(|l| l.trim_start().starts_with("server s"))
            .count()
    };
    wait_until(
        Duration::from_secs(10),
        "the file to hold eight slots",
        || slots_in_file() == 8,
    )
    .unwrap_or_else(|e| panic!("{e}: {}\n{}", slots_in_file(), mesh.client_sidecar.logs()));
}
