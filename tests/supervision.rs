//! The supervisor's duties with real children: restarts after crashes, re-applied state, giving
//! up with the child's code, and children dying with a killed supervisor.

mod support;

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use support::mesh::{Mesh, MeshOptions, APP_BODY};
use support::*;

fn child_named(sidecar: &Child, name: &str) -> u32 {
    // The direct child: haproxy's master (its workers are its children), or dataplaneapi.
    descendants(sidecar.pid())
        .into_iter()
        .find(|p| {
            process_name(*p).as_deref() == Some(name)
                && std::fs::read_to_string(format!("/proc/{p}/stat"))
                    .ok()
                    .and_then(|s| s.rsplit(')').next().map(str::to_string))
                    .and_then(|s| s.split_whitespace().nth(1).map(str::to_string))
                    .is_some_and(|ppid| ppid == sidecar.pid().to_string())
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
    wait_until(
        Duration::from_secs(20),
        "traffic through a restarted HAProxy",
        || allowed(&mesh),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    eprintln!(
        "measured: traffic flows again {} ms after kill -9 of haproxy",
        t.elapsed().as_millis()
    );
    assert_ne!(child_named(&mesh.client_sidecar, "haproxy"), master);
    assert!(mesh.client_sidecar.log_contains("haproxy restarted"));

    // The applier still works against the restarted HAProxy: a new upstream gets its listener.
    let extra = free_port();
    mesh.consul.register(&sidecar_registration(
        "client",
        free_port(),
        mesh.client_port,
        &[("server", mesh.upstream_port), ("server", extra)],
    ));
    wait_until(
        Duration::from_secs(30),
        "the new upstream after the restart",
        || {
            matches!(
                http_get(&format!("127.0.0.1:{extra}"), "/", Duration::from_secs(2)),
                Ok((200, _))
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
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
    let extra = free_port();
    mesh.consul.register(&sidecar_registration(
        "client",
        free_port(),
        mesh.client_port,
        &[("server", mesh.upstream_port), ("server", extra)],
    ));
    wait_until(
        Duration::from_secs(30),
        "a change applied by the new dataplaneapi",
        || {
            matches!(
                http_get(&format!("127.0.0.1:{extra}"), "/", Duration::from_secs(2)),
                Ok((200, _))
            )
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
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
