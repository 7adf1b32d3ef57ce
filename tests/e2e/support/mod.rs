//! Shared harness for the end-to-end tests: real processes (Consul, the sidecar, HAProxy) on
//! loopback, each owned by a guard that stops it even when a test panics.
//!
//! One file per concern: `processes` (children and their guards, /proc), `http` (a std-only
//! client), `consul` (a dev agent per test), `apps` (the test application), `haproxy` (curl,
//! CLIs, dry runs), `mesh` (a whole mesh), `netns` (test hosts); this file holds ports,
//! directories and waiting, and re-exports the rest, so a test says `use crate::support::*`.

pub mod apps;
pub mod consul;
pub mod haproxy;
pub mod http;
pub mod load;
pub mod mesh;
pub mod netns;
pub mod processes;

pub use {apps::*, consul::*, haproxy::*, http::*, processes::*};

use std::collections::{HashMap, HashSet};
use std::fs::{self, File};
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use serde_json::Value;

/// Fixed so SPIFFE IDs in assertions are constants: trust domain `<CLUSTER_ID>.consul`.
pub const CLUSTER_ID: &str = "11111111-2222-3333-4444-555555555555";
pub const TRUST_DOMAIN: &str = "11111111-2222-3333-4444-555555555555.consul";
/// The second cluster of `Consul::start_peered`: a trust domain of its own, as real peers have.
pub const PEER_CLUSTER_ID: &str = "11111111-2222-3333-4444-666666666666";

/// Grace period between SIGTERM and SIGKILL when a guard stops a process.
const STOP_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Ports, directories, paths

/// A loopback port that nothing listens on right now and that this test process has not
/// handed out before. The kernel may still give it to someone else before the caller binds it;
/// remembering what was handed out removes the likelier race, between tests of this binary.
pub fn free_port() -> u16 {
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out().lock().unwrap().insert(port) {
            return port;
        }
    }
}

/// Two consecutive free loopback ports, `p` and `p + 1`, both remembered as handed out (so no
/// `free_port` of this process gives either to another test); returns `p`. For a range a
/// program allocates from itself, such as Consul's exposed-check ports.
pub fn free_port_pair() -> u16 {
    loop {
        let p = free_port();
        let Some(next) = p.checked_add(1) else {
            continue;
        };
        if TcpListener::bind(("127.0.0.1", next)).is_ok()
            && handed_out().lock().unwrap().insert(next)
        {
            return p;
        }
    }
}

/// Whether this process handed `port` out (`free_port`, `free_port_pair`).
pub fn was_handed_out(port: u16) -> bool {
    handed_out().lock().unwrap().contains(&port)
}

fn handed_out() -> &'static Mutex<HashSet<u16>> {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()))
}

/// The sidecar binary Cargo built for this test run.
pub fn bin_path() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_haproxy-consul-connect"))
}

/// The root filesystem (made by `scripts/rootfs`) whose HAProxy the end-to-end tests use, from
/// `HCC_HAPROXY_ROOTFS`; unset or empty: the host's HAProxy.
pub fn haproxy_rootfs() -> Option<PathBuf> {
    std::env::var_os("HCC_HAPROXY_ROOTFS")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
}

/// Where `in_rootfs` puts the sidecar under test inside the rootfs.
pub const SIDECAR_IN_ROOTFS: &str = "/usr/local/bin/haproxy-consul-connect";

/// `program` run as PID 1 of its own PID and mount namespaces inside `rootfs`
/// (`hcc-run-rootfs`), with the system temp dir shared at the same path (every test file lives
/// there, so paths mean the same on both sides) and this build of the sidecar bind-mounted in.
fn in_rootfs(rootfs: &Path, program: &str) -> Command {
    let mut cmd = Command::new(RUN_ROOTFS);
    cmd.args(in_rootfs_args(rootfs)).arg(program);
    cmd
}

/// The launcher (`hcc-run-rootfs`) and its arguments up to the program it runs, as
/// `in_rootfs` gives them, for a test that must start it under another command (`ip netns
/// exec`); the sidecar's path inside is `SIDECAR_IN_ROOTFS`.
pub fn in_rootfs_args(rootfs: &Path) -> Vec<std::ffi::OsString> {
    vec![
        rootfs.into(),
        "--bind".into(),
        std::env::temp_dir().into(),
        "--bind".into(),
        format!("{}:{SIDECAR_IN_ROOTFS}", bin_path().display()).into(),
        "--".into(),
    ]
}

/// `hcc-run-rootfs`, built by Cargo for this test run.
pub const RUN_ROOTFS: &str = env!("CARGO_BIN_EXE_hcc-run-rootfs");

/// A command that runs the sidecar: the host's binary, or with `HCC_HAPROXY_ROOTFS` the same
/// binary as PID 1 inside that rootfs, with its HAProxy and Dataplane API.
pub fn sidecar_command() -> Command {
    match haproxy_rootfs() {
        Some(rootfs) => in_rootfs(&rootfs, SIDECAR_IN_ROOTFS),
        None => Command::new(bin_path()),
    }
}

/// The sidecar's own PID for a process started by `sidecar_command`: `pid` itself, or in a
/// rootfs the launcher's only child (PID 1 of the namespace).
pub fn sidecar_pid(pid: u32) -> u32 {
    if haproxy_rootfs().is_none() {
        return pid;
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        if let Some(p) = descendants(pid)
            .into_iter()
            .find(|p| parent_of(*p) == Some(pid))
        {
            return p;
        }
        assert!(Instant::now() < deadline, "no sidecar under launcher {pid}");
        thread::sleep(Duration::from_millis(20));
    }
}

/// A command that runs the HAProxy under test (see `haproxy_rootfs`).
pub fn haproxy_command() -> Command {
    match haproxy_rootfs() {
        Some(rootfs) => in_rootfs(&rootfs, "haproxy"),
        None => Command::new("haproxy"),
    }
}

/// A fresh directory under the system temp dir, removed on drop unless `KEEP_TEST_DIRS` is set
/// (then its path is printed, to look at configs and logs after a run).
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    pub fn new(prefix: &str) -> TempDir {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        loop {
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map(|d| d.subsec_nanos())
                .unwrap_or(0);
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = std::env::temp_dir().join(format!(
                "hcc-{prefix}-{}-{n}-{nanos:08x}",
                std::process::id()
            ));
            match fs::create_dir(&path) {
                Ok(()) => return TempDir { path },
                Err(e) if e.kind() == ErrorKind::AlreadyExists => continue,
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn join(&self, name: impl AsRef<Path>) -> PathBuf {
        self.path.join(name)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        if std::env::var_os("KEEP_TEST_DIRS").is_some() {
            eprintln!("KEEP_TEST_DIRS: kept {}", self.path.display());
        } else {
            let _ = fs::remove_dir_all(&self.path);
        }
    }
}

/// Polls `f` every 50 ms until it returns true; the error names `what` so a timeout says which
/// condition never held.
pub fn wait_until(
    timeout: Duration,
    what: &str,
    mut f: impl FnMut() -> bool,
) -> Result<(), String> {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return Ok(());
        }
        if Instant::now() >= deadline {
            return Err(format!("timed out after {timeout:?} waiting for {what}"));
        }
        thread::sleep(Duration::from_millis(50));
    }
}
