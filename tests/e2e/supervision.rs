//! The supervisor's duties with real children: restarts after crashes, re-applied state, giving
//! up with the child's code, and children dying with a killed supervisor.

use std::time::{Duration, Instant};

use crate::support::mesh::{Mesh, MeshOptions, APP_BODY};
use crate::support::*;
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

fn child_named(sidecar: &Child, name: &str) -> u32 {
    // The direct child: haproxy's master (its workers are its children), or dataplaneapi.
    let sidecar_pid = sidecar_pid(sidecar.pid());
    descendants(sidecar_pid)
        .into_iter()
        .find(|p| {
            process_name(*p).as_deref() == Some(name)
                && std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit(')').next().map(str::to_string))
                    .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
                    .is_some_and(|ppid| ppid == sidecar_pid.to_string())
        })
        .unwrap_or_else(|| panic!("no {name} under the sidecar"))
}

fn allowed(mesh: &Mesh) -> bool {
    matches!(http_get(&mesh.upstream_addr(), "/", Duration::from_secs(2)), Ok((200, b)) if b == APP_BODY)
}

#[test]
fn a_killed_haproxy_is_restarted_with_the_applied_state() {
    let mesh = Mesh::start(MeshOptions::default());
    let master = child_named(&mesh.client_sidecar, "haproxy");
    kill(Pid::from_raw(master as i32), Signal::SIGKILL).unwrap();
    let t = Instant::now();
    // The killed master's worker may serve a moment longer; what counts is the new HAProxy.
    wait_until(Duration::from_secs(20), "the restart", || {
        mesh.client_sidecar.log_contains("haproxy restarted")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    wait_until(
        Duration::from_secs(20),
        "traffic through the restarted HAProxy",
        || allowed(&mesh),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    eprintln!(
        "measured: restarted and serving {} ms after kill -9 of haproxy",
        t.elapsed().as_millis()
    );
    assert_ne!(child_named(&mesh.client_sidecar, "haproxy"), master);

    // The applier still works against the restarted HAProxy: a new upstream gets its listener.
    mesh.add_upstream();
}

#[test]
fn a_killed_dataplane_api_is_restarted_and_later_changes_apply() {
    let mesh = Mesh::start(MeshOptions::default());
    let dpapi = child_named(&mesh.client_sidecar, "dataplaneapi");
    kill(Pid::from_raw(dpapi as i32), Signal::SIGKILL).unwrap();
    wait_until(Duration::from_secs(20), "a new dataplaneapi", || {
        descendants(mesh.client_sidecar.pid())
            .into_iter()
            .any(|p| p != dpapi && process_name(p).as_deref() == Some("dataplaneapi"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    assert!(
        allowed(&mesh),
        "traffic never depended on the Dataplane API"
    );
    mesh.add_upstream();
}

#[test]
fn a_child_that_keeps_dying_ends_the_run_with_its_code() {
    let mut mesh = Mesh::start(MeshOptions::default());
    let mut killed = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline && mesh.client_sidecar.try_wait().is_none() {
        for p in descendants(mesh.client_sidecar.pid()) {
            if process_name(p).as_deref() == Some("haproxy") && !killed.contains(&p) {
                let _ = kill(Pid::from_raw(p as i32), Signal::SIGKILL);
                killed.push(p);
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let status = mesh
        .client_sidecar
        .wait_timeout(Duration::from_secs(60))
        .unwrap_or_else(|| panic!("still running\n{}", mesh.client_sidecar.logs()));
    assert_eq!(
        status.code(),
        Some(128 + 9),
        "{}",
        mesh.client_sidecar.logs()
    );
    assert!(mesh.client_sidecar.log_contains("giving up"));
}

#[test]
fn children_die_with_a_killed_supervisor() {
    let mut mesh = Mesh::start(MeshOptions::default());
    let started = descendants(mesh.client_sidecar.pid());
    assert!(
        started.len() >= 3,
        "haproxy master, worker and dataplaneapi: {started:?}"
    );
    mesh.client_sidecar.signal(Signal::SIGKILL);
    mesh.client_sidecar
        .wait_timeout(Duration::from_secs(10))
        .expect("killed");
    wait_until(
        Duration::from_secs(10),
        "the supervisor's children to exit",
        || still_running(&started).is_empty(),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", still_running(&started)));
}

#[test]
fn sigterm_lets_an_in_flight_request_finish_and_refuses_new_ones() {
    let mut mesh = Mesh::start(MeshOptions::default());
    let started = descendants(mesh.server_sidecar.pid());
    mesh.app.set_delay(Duration::from_secs(3));
    // Mesh::start's own requests are counted too; only what follows is this test's.
    let initial = mesh.app.requests();
    let addr = mesh.upstream_addr();
    let slow = std::thread::spawn(move || http_get(&addr, "/slow", Duration::from_secs(15)));
    wait_until(
        Duration::from_secs(5),
        "the slow request to reach the app",
        || mesh.app.requests() == initial + 1,
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    mesh.server_sidecar.signal(Signal::SIGTERM);
    wait_until(
        Duration::from_secs(5),
        "the public listener to close",
        || std::net::TcpStream::connect(("127.0.0.1", mesh.server_port)).is_err(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.server_sidecar.logs()));
    // A new request while the old one is still being served.
    let late = http_get(&mesh.upstream_addr(), "/late", Duration::from_secs(5));
    assert!(
        !matches!(late, Ok((200, _))),
        "a request made after SIGTERM was served: {late:?}"
    );
    assert_eq!(
        slow.join().unwrap(),
        Ok((200, APP_BODY.to_string())),
        "the in-flight request was cut"
    );
    assert_eq!(
        mesh.app.requests(),
        initial + 1,
        "only the in-flight request may reach the app"
    );
    let status = mesh
        .server_sidecar
        .wait_timeout(Duration::from_secs(40))
        .expect("the sidecar exits after its drain");
    assert_eq!(status.code(), Some(0), "{}", mesh.server_sidecar.logs());
    assert!(
        still_running(&started).is_empty(),
        "left: {:?}",
        still_running(&started)
    );
}

/// Processes whose parent is `pid` and that are zombies.
fn zombies_of(pid: u32) -> Vec<u32> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .ok()
                .and_then(|s| {
                    let rest = s.rsplit(')').next()?.to_string();
                    let mut f = rest.split_whitespace();
                    let state = f.next()?.to_string();
                    let ppid = f.next()?.parse::<u32>().ok()?;
                    Some(state == "Z" && ppid == pid)
                })
                .unwrap_or(false)
        })
        .collect()
}

#[test]
fn as_pid_1_orphans_are_reaped() {
    let consul = Consul::start();
    let app = HttpApp::start(APP_BODY);
    let port = free_port();
    consul.register(&sidecar_registration("server", app.port(), port, &[]));
    let base = TempDir::new("pid1");
    // HAProxy through a wrapper that leaves an orphan behind on every run (the Dataplane API also
    // runs it to validate), as a badly behaved child in a container would. The orphan lives long
    // enough to still be there however slow the start; the test ends it itself.
    let wrapper = base.join("haproxy-orphaning");
    std::fs::write(
        &wrapper,
        "#!/bin/sh\n( sleep 600 & )\nexec haproxy \"$@\"\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
    let mut unshared = Child::spawn(
        "pid1",
        std::process::Command::new("unshare")
            .args(["--pid", "--fork", "--mount-proc"])
            .arg(bin_path())
            .args(["-sidecar-for", "server", "-http-addr", &consul.http_addr()])
            .arg("-haproxy")
            .arg(&wrapper)
            .arg("-haproxy-cfg-base-path")
            .arg(base.path()),
        base.path(),
    );
    wait_until(
        Duration::from_secs(30),
        "the sidecar as PID 1 to be ready",
        || unshared.log_contains("-> Ready"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", unshared.logs()));
    let pid1 = descendants(unshared.pid())
        .into_iter()
        .find(|p| process_name(*p).is_some_and(|n| n.starts_with("haproxy-consul")))
        .expect("the sidecar inside the namespace");
    let status = std::fs::read_to_string(format!("/proc/{pid1}/status")).unwrap();
    let nspid = status
        .lines()
        .find(|l| l.starts_with("NSpid:"))
        .unwrap_or("");
    assert!(
        nspid.trim_end().ends_with("\t1"),
        "not PID 1 in its namespace: {nspid}"
    );
    // A live orphan, adopted by the sidecar: only its parent can reap it once it dies.
    let is_adopted_orphan = |p: u32| {
        std::fs::read(format!("/proc/{p}/cmdline")).is_ok_and(|c| c == b"sleep\x00600\x00")
            && parent_of(p) == Some(pid1)
            && is_running(p)
    };
    let mut adopted: Vec<u32> = Vec::new();
    wait_until(
        Duration::from_secs(30),
        "an orphan adopted by PID 1",
        || {
            adopted = descendants(unshared.pid())
                .into_iter()
                .filter(|p| is_adopted_orphan(*p))
                .collect();
            !adopted.is_empty()
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", unshared.logs()));
    let orphans = PidGuard::new(&adopted);
    // Its death is PID 1's to collect: unreaped, it would stay a zombie forever.
    for p in orphans.pids() {
        kill(Pid::from_raw(p as i32), Signal::SIGKILL).unwrap();
    }
    wait_until(
        Duration::from_secs(10),
        "PID 1 to reap the killed orphans",
        || orphans.reaped().len() == orphans.pids().len(),
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}: reaped {:?} of {:?}, zombies of PID 1: {:?}\n{}",
            orphans.reaped(),
            orphans.pids(),
            zombies_of(pid1),
            unshared.logs()
        )
    });
    assert!(
        zombies_of(pid1).is_empty(),
        "zombies: {:?}",
        zombies_of(pid1)
    );
    // unshare does not forward signals; PID 1 gets them from outside since it handles them.
    kill(Pid::from_raw(pid1 as i32), Signal::SIGTERM).unwrap();
    let status = unshared
        .wait_timeout(Duration::from_secs(40))
        .expect("stops");
    assert_eq!(status.code(), Some(0), "{}", unshared.logs());
}

fn http_status(addr: &str, path: &str) -> Option<u16> {
    http_get(addr, path, Duration::from_secs(2))
        .ok()
        .map(|(s, _)| s)
}

#[test]
fn ready_is_503_before_the_first_apply_and_while_draining() {
    let consul = Consul::start();
    let app = HttpApp::start(APP_BODY);
    let port = free_port();
    let base = TempDir::new("ready");
    let stats = format!("127.0.0.1:{}", free_port());
    let mut sc = Child::spawn(
        "sidecar",
        std::process::Command::new(bin_path())
            .args(["-sidecar-for", "server", "-http-addr", &consul.http_addr()])
            .args(["-stats-addr", &stats])
            .arg("-haproxy-cfg-base-path")
            .arg(base.path()),
        base.path(),
    );
    wait_until(Duration::from_secs(10), "the stats endpoint", || {
        http_status(&stats, "/health") == Some(200)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.logs()));
    assert_eq!(
        http_status(&stats, "/ready"),
        Some(503),
        "ready before any registration"
    );
    consul.register(&sidecar_registration("server", app.port(), port, &[]));
    wait_until(Duration::from_secs(30), "/ready to turn 200", || {
        http_status(&stats, "/ready") == Some(200)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.logs()));
    assert!(sc.log_contains("-> Ready"));

    // A slow request keeps the drain going long enough to look at /ready meanwhile.
    app.set_delay(Duration::from_secs(3));
    let leaf = consul.get_json("/v1/agent/connect/ca/leaf/client");
    std::fs::write(base.join("c.pem"), leaf["CertPEM"].as_str().unwrap()).unwrap();
    std::fs::write(base.join("c.key"), leaf["PrivateKeyPEM"].as_str().unwrap()).unwrap();
    let roots = consul.get_json("/v1/agent/connect/ca/roots");
    std::fs::write(
        base.join("r.pem"),
        roots["Roots"][0]["RootCert"].as_str().unwrap(),
    )
    .unwrap();
    let (c, k, r) = (base.join("c.pem"), base.join("c.key"), base.join("r.pem"));
    let slow = std::thread::spawn(move || curl_mtls(port, Some((&c, &k)), &r));
    wait_until(
        Duration::from_secs(5),
        "the slow request at the app",
        || app.requests() > 0,
    )
    .unwrap();
    sc.signal(Signal::SIGTERM);
    wait_until(Duration::from_secs(5), "/ready to say draining", || {
        matches!(http_get(&stats, "/ready", Duration::from_secs(1)), Ok((503, b)) if b.contains("draining"))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.logs()));
    assert_eq!(slow.join().unwrap().as_deref(), Ok(APP_BODY));
    assert_eq!(
        sc.wait_timeout(Duration::from_secs(40))
            .and_then(|s| s.code()),
        Some(0)
    );
}

#[test]
fn under_runit_sv_term_stops_gracefully_and_runsv_restarts_it() {
    let consul = Consul::start();
    let app = HttpApp::start(APP_BODY);
    let port = free_port();
    consul.register(&sidecar_registration("server", app.port(), port, &[]));
    let base = TempDir::new("runit");
    let svc = base.join("svc");
    std::fs::create_dir_all(&svc).unwrap();
    let log = base.join("sidecar.log");
    let run = format!(
        "#!/bin/sh\nexec {} -sidecar-for server -http-addr {} -haproxy-cfg-base-path {} >>{} 2>&1\n",
        bin_path().display(),
        consul.http_addr(),
        base.path().display(),
        log.display()
    );
    std::fs::write(svc.join("run"), run).unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(svc.join("run"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let runsv = Child::spawn(
        "runsv",
        std::process::Command::new("runsv").arg(&svc),
        base.path(),
    );
    let logs = || std::fs::read_to_string(&log).unwrap_or_default();
    wait_until(
        Duration::from_secs(30),
        "the sidecar under runsv to be ready",
        || logs().matches("-> Ready").count() == 1,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));

    let sv = |cmd: &str| {
        let out = std::process::Command::new("sv")
            .arg(cmd)
            .arg(&svc)
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    sv("term");
    wait_until(
        Duration::from_secs(40),
        "a graceful stop and a clean restart",
        || {
            let l = logs();
            l.contains("Draining -> Stopped") && l.matches("-> Ready").count() == 2
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert!(sv("status").starts_with("run:"), "{}", sv("status"));
    sv("down");
    wait_until(Duration::from_secs(40), "sv down to stop it", || {
        sv("status").starts_with("down:")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs()));
    assert_eq!(
        logs().matches("Draining -> Stopped").count(),
        2,
        "{}",
        logs()
    );
    drop(runsv);
}

#[test]
fn sighup_reconciles_away_runtime_drift() {
    let mut mesh = Mesh::start(MeshOptions::default());
    let stats = mesh.workdir("client").join("haproxy.sock");
    // Traffic flows first (the server's identity proven, its name pinned on 1.8.7), so that
    // what breaks it below is the drift and nothing else.
    wait_until(Duration::from_secs(20), "traffic before the drift", || {
        allowed(&mesh)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    // Drift: someone puts the serving slot in maintenance by hand.
    let state = haproxy_cli(&stats, "show servers state");
    let (backend, slot) = state
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            (f.len() > 18 && f[1].starts_with("be_up_") && f[18] == mesh.server_port.to_string())
                .then(|| (f[1].to_string(), f[3].to_string()))
        })
        .next()
        .unwrap_or_else(|| panic!("no slot for the server in\n{state}"));
    haproxy_cli(&stats, &format!("set server {backend}/{slot} state maint"));
    wait_until(Duration::from_secs(5), "the drift to break traffic", || {
        !allowed(&mesh)
    })
    .unwrap();

    mesh.client_sidecar.signal(Signal::SIGHUP);
    wait_until(Duration::from_secs(30), "the reconcile to finish", || {
        mesh.client_sidecar.log_contains("full reconcile applied")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    assert!(allowed(&mesh), "traffic after the reconcile");
}

#[test]
fn a_second_stop_signal_stops_at_once() {
    let mut mesh = Mesh::start(MeshOptions::default());
    // A connection held open with half a request: in tcp mode HAProxy cannot know it is idle,
    // so the first drain would last the whole grace period.
    let mut held = std::net::TcpStream::connect(mesh.upstream_addr()).unwrap();
    std::io::Write::write_all(&mut held, b"GET /held HTTP/1.1\r\n").unwrap();
    std::thread::sleep(Duration::from_millis(500));
    mesh.server_sidecar.signal(Signal::SIGTERM);
    wait_until(Duration::from_secs(5), "draining", || {
        mesh.server_sidecar.log_contains("-> Draining")
    })
    .unwrap();
    let t = Instant::now();
    mesh.server_sidecar.signal(Signal::SIGTERM);
    let status = mesh
        .server_sidecar
        .wait_timeout(Duration::from_secs(15))
        .unwrap_or_else(|| panic!("no fast stop\n{}", mesh.server_sidecar.logs()));
    eprintln!("measured: fast stop took {} ms", t.elapsed().as_millis());
    assert_eq!(status.code(), Some(0));
    assert!(
        mesh.server_sidecar.log_contains("second stop signal"),
        "{}",
        mesh.server_sidecar.logs()
    );
}
