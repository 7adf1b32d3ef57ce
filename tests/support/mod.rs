//! Shared harness for the end-to-end tests: real processes (Consul, the sidecar, HAProxy) on
//! loopback, each owned by a guard that stops it even when a test panics.
//!
//! Every test file includes this with `mod support;` and uses only part of it, hence the
//! module-wide dead-code allowance below.
#![allow(dead_code)]

pub mod mesh;

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

/// Grace period between SIGTERM and SIGKILL when a guard stops a process.
const STOP_GRACE: Duration = Duration::from_secs(5);

// ---------------------------------------------------------------------------------------------
// Ports, directories, paths

/// A loopback port that nothing listens on right now and that this test process has not
/// handed out before. The kernel may still give it to someone else before the caller binds it;
/// remembering what was handed out removes the likelier race, between tests of this binary.
pub fn free_port() -> u16 {
    static HANDED_OUT: OnceLock<Mutex<HashSet<u16>>> = OnceLock::new();
    let handed_out = HANDED_OUT.get_or_init(|| Mutex::new(HashSet::new()));
    loop {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
        let port = listener.local_addr().expect("local_addr").port();
        if handed_out.lock().unwrap().insert(port) {
            return port;
        }
    }
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
const SIDECAR_IN_ROOTFS: &str = "/usr/local/bin/haproxy-consul-connect";

/// `program` run as PID 1 of its own PID and mount namespaces inside `rootfs`
/// (`hcc-run-rootfs`), with the system temp dir shared at the same path (every test file lives
/// there, so paths mean the same on both sides) and this build of the sidecar bind-mounted in.
fn in_rootfs(rootfs: &Path, program: &str) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_hcc-run-rootfs"));
    cmd.arg(rootfs)
        .arg("--bind")
        .arg(std::env::temp_dir())
        .arg("--bind")
        .arg(format!("{}:{SIDECAR_IN_ROOTFS}", bin_path().display()))
        .arg("--")
        .arg(program);
    cmd
}

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

// ---------------------------------------------------------------------------------------------
// Child processes

/// A spawned program in its own process group, with stdout/stderr in files. Dropping it stops
/// the whole group (SIGTERM, then SIGKILL after 5 s) and any descendant that left the group, so
/// a failing test leaks no HAProxy or Consul; if the test is panicking the logs are printed.
pub struct Child {
    name: String,
    child: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
    stopped: bool,
}

impl Child {
    /// Spawns `cmd` with stdin closed and output in `<log_dir>/<name>[.N].stdout|stderr`.
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Child {
        let (stdout, stderr) = log_paths(log_dir, name);
        let out = File::create(&stdout).unwrap_or_else(|e| panic!("{}: {e}", stdout.display()));
        let err = File::create(&stderr).unwrap_or_else(|e| panic!("{}: {e}", stderr.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own group: stopping it reaches the grandchildren without touching the test runner.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({:?}): {e}", cmd.get_program()));
        Child {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            stopped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Both output files, labelled, for assertion messages.
    pub fn logs(&self) -> String {
        format!(
            "==== {} stdout ====\n{}\n==== {} stderr ====\n{}",
            self.name,
            read_lossy(&self.stdout),
            self.name,
            read_lossy(&self.stderr)
        )
    }

    /// True once `needle` appears in stdout or stderr; for readiness via `wait_until`.
    pub fn log_contains(&self, needle: &str) -> bool {
        read_lossy(&self.stdout).contains(needle) || read_lossy(&self.stderr).contains(needle)
    }

    /// Everything written to stdout so far; its length marks a point that later output can be
    /// told apart from.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout)
    }

    /// Reaps the process if it has exited; later calls return the same status.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name))
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Signals the process alone (not its group), as an init system or a user would, so tests
    /// can check how the program itself shuts its children down.
    pub fn signal(&mut self, signal: Signal) {
        // A reaped PID may already belong to someone else.
        if self.try_wait().is_none() {
            let _ = kill(pid_of(self.pid()), signal);
        }
    }

    /// Stops the process group and leftover descendants, reaps the process, returns its exit
    /// status. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.stopped {
            return self.try_wait();
        }
        self.stopped = true;
        // Taken before signalling: once the parent is gone, orphans are reparented and can no
        // longer be found from its PID.
        let tree: Vec<ProcRef> = if self.try_wait().is_none() {
            descendants(self.pid())
                .into_iter()
                .filter_map(ProcRef::new)
                .collect()
        } else {
            Vec::new()
        };
        let group = pid_of(self.pid());
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        let mut status = None;
        loop {
            if status.is_none() {
                status = self.try_wait();
            }
            if status.is_some() && tree.iter().all(|p| !p.is_running()) {
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        for p in tree.iter().filter(|p| p.is_running()) {
            let _ = kill(pid_of(p.pid), Signal::SIGKILL);
        }
        // SIGKILL is delivered asynchronously; callers assert on "gone" right after stop().
        let deadline = Instant::now() + Duration::from_secs(2);
        while tree.iter().any(ProcRef::is_running) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        match status {
            Some(status) => Some(status),
            None => self.child.wait().ok(),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "==== {} (pid {}) last output ====\n-- stdout --\n{}\n-- stderr --\n{}",
                self.name,
                self.pid(),
                tail(&read_lossy(&self.stdout), 80),
                tail(&read_lossy(&self.stderr), 80)
            );
        }
    }
}

fn log_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    // A restarted program gets new files, so the first run's output survives for diagnosis.
    for n in 0.. {
        let stem = if n == 0 {
            name.to_string()
        } else {
            format!("{name}.{n}")
        };
        let stdout = dir.join(format!("{stem}.stdout"));
        if !stdout.exists() {
            return (stdout, dir.join(format!("{stem}.stderr")));
        }
    }
    unreachable!()
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"))
}

// ---------------------------------------------------------------------------------------------
// /proc inspection

struct ProcStat {
    state: char,
    ppid: u32,
    start_time: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// A PID plus its start time, so a PID the kernel reused for another process is not mistaken
/// for ours (pid_max is often only 32768 in containers).
struct ProcRef {
    pid: u32,
    start_time: u64,
}

impl ProcRef {
    fn new(pid: u32) -> Option<ProcRef> {
        proc_stat(pid).map(|s| ProcRef {
            pid,
            start_time: s.start_time,
        })
    }

    fn is_running(&self) -> bool {
        proc_stat(self.pid)
            .is_some_and(|s| s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X'))
    }
}

/// True if `pid` exists and is not a zombie (an orphan reparented to a PID 1 that does not reap
/// stays a zombie forever, and that still counts as stopped).
pub fn is_running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X'))
}

/// The PIDs from `pids` that are still running; empty means everything we started is gone.
pub fn still_running(pids: &[u32]) -> Vec<u32> {
    pids.iter().copied().filter(|&p| is_running(p)).collect()
}

/// The process's short name (`/proc/<pid>/comm`, at most 15 bytes), e.g. "haproxy".
pub fn process_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// All live descendants of `pid` (children, grandchildren, …), found through the parent PIDs
/// in /proc; used to find the HAProxy and Dataplane API processes a sidecar started.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = proc_stat(p) {
            if !matches!(stat.state, 'Z' | 'X') {
                children.entry(stat.ppid).or_default().push(p);
            }
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            found.push(c);
            queue.push(c);
        }
    }
    found.sort_unstable();
    found
}

/// Descendants of `pid` whose name is `name`, e.g. `descendants_named(sidecar, "haproxy")`.
pub fn descendants_named(pid: u32, name: &str) -> Vec<u32> {
    descendants(pid)
        .into_iter()
        .filter(|&p| process_name(p).as_deref() == Some(name))
        .collect()
}

/// The parent PID, as seen from this process's PID namespace; None once `pid` is gone.
pub fn parent_of(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|s| s.ppid)
}

/// Processes a test did not spawn itself (say, orphans some child left behind): SIGKILLed on
/// drop while they still run, so a failing test leaks none of them. Start times are recorded so
/// a PID the kernel has since reused is left alone.
pub struct PidGuard {
    procs: Vec<ProcRef>,
}

impl PidGuard {
    pub fn new(pids: &[u32]) -> PidGuard {
        PidGuard {
            procs: pids.iter().copied().filter_map(ProcRef::new).collect(),
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    /// The guarded processes that were reaped: gone from /proc, or their PID now names another
    /// process. A zombie has not been reaped.
    pub fn reaped(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|p| proc_stat(p.pid).is_none_or(|s| s.start_time != p.start_time))
            .map(|p| p.pid)
            .collect()
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        for p in self.procs.iter().filter(|p| p.is_running()) {
            let _ = kill(pid_of(p.pid), Signal::SIGKILL);
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Minimal HTTP/1.1 client (std only, so the tests do not depend on the HTTP stack under test)

#[derive(Debug, Clone)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl HttpResponse {
    /// Header value by case-insensitive name (Consul sends `X-Consul-Contenthash`).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One request on a fresh connection (`Connection: close`). `timeout` bounds the whole
/// exchange, so a stalled peer fails the request instead of hanging the test.
pub fn http_request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    timeout: Duration,
) -> Result<HttpResponse, String> {
    let deadline = Instant::now() + timeout;
    let err = |what: &str, e: &dyn std::fmt::Display| {
        format!("{method} http://{addr}{path}: {what}: {e}")
    };
    let targets: Vec<SocketAddr> = addr
        .to_socket_addrs()
        .map_err(|e| err("resolve", &e))?
        .collect();
    let target = targets
        .first()
        .ok_or_else(|| err("resolve", &"no address"))?;
    let mut stream = TcpStream::connect_timeout(target, timeout).map_err(|e| err("connect", &e))?;
    stream
        .set_write_timeout(Some(remaining(deadline)))
        .map_err(|e| err("set timeout", &e))?;
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nUser-Agent: hcc-test\r\nAccept: */*\r\nConnection: close\r\n"
    );
    if !body.is_empty() || matches!(method, "POST" | "PUT" | "PATCH") {
        request.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.write_all(&bytes).map_err(|e| err("send", &e))?;

    let mut buf = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        let left = remaining(deadline);
        if left.is_zero() {
            return Err(err("receive", &format!("timed out after {timeout:?}")));
        }
        stream
            .set_read_timeout(Some(left))
            .map_err(|e| err("set timeout", &e))?;
        let n = match stream.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == ErrorKind::Interrupted => continue,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                return Err(err("receive", &format!("timed out after {timeout:?}")))
            }
            Err(e) => return Err(err("receive", &e)),
        };
        buf.extend_from_slice(&chunk[..n]);
        if let Some(done) = parse_response(&buf, n == 0, method == "HEAD") {
            return done.map_err(|e| err("response", &e));
        }
        if n == 0 {
            return Err(err(
                "receive",
                &format!("connection closed after {} bytes", buf.len()),
            ));
        }
    }
}

/// GET `path` from `addr` ("127.0.0.1:PORT"): status and body, or why it failed.
pub fn http_get(addr: &str, path: &str, timeout: Duration) -> Result<(u16, String), String> {
    http_request(addr, "GET", path, None, timeout).map(|r| (r.status, r.body))
}

fn remaining(deadline: Instant) -> Duration {
    deadline.saturating_duration_since(Instant::now())
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// `None` while more bytes are needed; parsing as they arrive means a server that keeps the
/// connection open despite `Connection: close` still works.
fn parse_response(buf: &[u8], eof: bool, head_only: bool) -> Option<Result<HttpResponse, String>> {
    let head_end = find(buf, b"\r\n\r\n")? + 4;
    let head = String::from_utf8_lossy(&buf[..head_end - 4]);
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let status = match status_line.split_whitespace().nth(1).map(str::parse::<u16>) {
        Some(Ok(s)) => s,
        _ => return Some(Err(format!("bad status line {status_line:?}"))),
    };
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
        .collect();
    let get = |name: &str| {
        headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    };
    let rest = &buf[head_end..];
    let body = if head_only || status == 204 || status == 304 || (100..200).contains(&status) {
        Vec::new()
    } else if get("transfer-encoding").is_some_and(|v| v.to_ascii_lowercase().contains("chunked")) {
        match decode_chunked(rest)? {
            Ok(b) => b,
            Err(e) => return Some(Err(e)),
        }
    } else if let Some(len) = get("content-length") {
        let Ok(len) = len.parse::<usize>() else {
            return Some(Err(format!("bad Content-Length {len:?}")));
        };
        if rest.len() < len {
            return None;
        }
        rest[..len].to_vec()
    } else if eof {
        rest.to_vec()
    } else {
        return None;
    };
    Some(Ok(HttpResponse {
        status,
        headers,
        body: String::from_utf8_lossy(&body).into_owned(),
    }))
}

fn decode_chunked(mut rest: &[u8]) -> Option<Result<Vec<u8>, String>> {
    let mut body = Vec::new();
    loop {
        let line_end = find(rest, b"\r\n")?;
        let line = String::from_utf8_lossy(&rest[..line_end]);
        let size_hex = line.split(';').next().unwrap_or_default().trim();
        let Ok(size) = usize::from_str_radix(size_hex, 16) else {
            return Some(Err(format!("bad chunk size {line:?}")));
        };
        rest = &rest[line_end + 2..];
        if size == 0 {
            // Trailers, if any, end with an empty line; none of them matter here.
            find(rest, b"\r\n")?;
            return Some(Ok(body));
        }
        if rest.len() < size + 2 {
            return None;
        }
        body.extend_from_slice(&rest[..size]);
        rest = &rest[size + 2..];
    }
}

// ---------------------------------------------------------------------------------------------
// Consul

/// The Consul binary every test runs: `CONSUL_BIN`, or `consul` on the PATH. scripts/test runs
/// the whole suite once per supported version by setting it.
pub fn consul_bin() -> std::ffi::OsString {
    std::env::var_os("CONSUL_BIN").unwrap_or_else(|| "consul".into())
}

/// The version of `consul_bin()` as `(major, minor, patch)`, asked once.
pub fn consul_version() -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new(consul_bin())
                .arg("version")
                .output()
                .expect("consul installed by scripts/install-deps (or CONSUL_BIN)");
            let text = String::from_utf8_lossy(&out.stdout);
            text.lines()
                .next()
                .and_then(|l| l.strip_prefix("Consul v"))
                .map(|v| v.split(['-', '+', ' ']).next().unwrap_or(v).to_string())
                .unwrap_or_else(|| panic!("cannot tell the Consul version from {text:?}"))
        })
        .clone()
}

/// Consul 1.10 or later: config-entry intentions, the gRPC TLS port, no duplicate upstreams.
pub fn consul_is_current() -> bool {
    let v: Vec<u32> = consul_version()
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    v.as_slice() >= [1, 10].as_slice()
}

/// One intention as a test wants it, written as Consul's version expects (see
/// `Consul::set_intentions`).
#[derive(Clone, Debug)]
pub struct IntentionSpec {
    pub source: String,
    /// `allow` or `deny`; `None` with `permissions` for an L7 intention.
    pub action: Option<String>,
    /// A cluster peer's source (Consul 1.13+).
    pub peer: Option<String>,
    /// HTTP permissions, as the config entry takes them (Consul 1.9+).
    pub permissions: Option<Value>,
}

impl IntentionSpec {
    pub fn l4(source: &str, action: &str) -> IntentionSpec {
        IntentionSpec {
            source: source.into(),
            action: Some(action.into()),
            peer: None,
            permissions: None,
        }
    }
}

/// A `consul agent -dev` of its own: free loopback ports (DNS and WAN off), the fixed
/// `CLUSTER_ID`, in-memory state in a temp dir, from `consul_bin()`.
pub struct Consul {
    // Declared before `dir`: the process must stop before its directory is removed.
    child: Child,
    http_addr: String,
    trust_domain: String,
    /// The management token when ACLs are on; the harness's own calls carry it.
    token: Option<String>,
    dir: TempDir,
}

/// The bootstrap ("master" in 1.8) token of `Consul::start_acl_deny`.
pub const ACL_MASTER_TOKEN: &str = "a1b2c3d4-0000-4000-8000-00000000feed";

impl Consul {
    pub fn start() -> Consul {
        Consul::start_with(serde_json::json!({}), None)
    }

    /// An agent with ACLs on and default policy deny; the harness uses `ACL_MASTER_TOKEN`.
    pub fn start_acl_deny() -> Consul {
        Consul::start_acl("deny")
    }

    /// An agent with ACLs on and the given default policy (`allow` or `deny`).
    pub fn start_acl(default_policy: &str) -> Consul {
        Consul::start_with(
            serde_json::json!({"acl": {
                "enabled": true,
                "default_policy": default_policy,
                "down_policy": "extend-cache",
                "tokens": {"master": ACL_MASTER_TOKEN, "agent": ACL_MASTER_TOKEN}
            }}),
            Some(ACL_MASTER_TOKEN.to_string()),
        )
    }

    fn start_with(extra: Value, token: Option<String>) -> Consul {
        let dir = TempDir::new("consul");
        let http_port = free_port();
        let config = serde_json::json!({
            "node_name": "node1",
            "datacenter": "dc1",
            "bind_addr": "127.0.0.1",
            "client_addr": "127.0.0.1",
            "advertise_addr": "127.0.0.1",
            "data_dir": dir.join("data"),
            "log_level": "info",
            // No checkpoint calls to hashicorp.com: tests stay on loopback.
            "disable_update_check": true,
            "disable_anonymous_signature": true,
            // Every port explicit: -dev defaults (8500, 8502, 8600, …) would collide between
            // agents of parallel tests.
            "ports": {
                "http": http_port,
                "dns": -1,
                "serf_lan": free_port(),
                "serf_wan": -1,
                "server": free_port(),
                "grpc": free_port(),
            },
            "connect": { "enabled": true, "ca_config": { "cluster_id": CLUSTER_ID } },
        });
        let mut config = config;
        if consul_is_current() {
            // 1.14+ opens a gRPC TLS port (8503) unless told not to; 1.8 rejects the key.
            config["ports"]["grpc_tls"] = (-1).into();
        }
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                c.insert(k.clone(), v.clone());
            }
        }
        let config_path = dir.join("consul.json");
        fs::write(&config_path, config.to_string()).expect("write consul.json");
        let mut cmd = Command::new(consul_bin());
        cmd.arg("agent")
            .arg("-dev")
            .arg("-config-file")
            .arg(&config_path);
        let child = Child::spawn("consul", &mut cmd, dir.path());
        let mut consul = Consul {
            child,
            http_addr: format!("127.0.0.1:{http_port}"),
            trust_domain: String::new(),
            token,
            dir,
        };
        consul.wait_ready();
        consul
    }

    // Ready means what a sidecar needs: a leader, our node in the catalog (so health queries
    // see registered services) and a CA root (so leaf certificates can be signed).
    fn wait_ready(&mut self) {
        let timeout = Duration::from_secs(30);
        let addr = self.http_addr.clone();
        let token = self.token.clone();
        let with_token = |p: &str| match &token {
            Some(t) => format!("{p}?token={t}"),
            None => p.to_string(),
        };
        let mut trust_domain = String::new();
        let ready = wait_until(timeout, "consul leader, catalog node and CA root", || {
            if !self.child.is_running() {
                return true;
            }
            let leader = json_at(&addr, "/v1/status/leader");
            if leader
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or_default()
                .is_empty()
            {
                return false;
            }
            let nodes = json_at(&addr, &with_token("/v1/catalog/nodes"));
            if nodes
                .as_ref()
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                return false;
            }
            let Some(roots) = json_at(&addr, "/v1/agent/connect/ca/roots") else {
                return false;
            };
            if roots["ActiveRootID"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
            {
                return false;
            }
            trust_domain = roots["TrustDomain"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            true
        });
        if let Some(status) = self.child.try_wait() {
            panic!("consul exited ({status}) while starting\n{}", self.logs());
        }
        if let Err(e) = ready {
            panic!("{e}\n{}", self.logs());
        }
        self.trust_domain = trust_domain;
    }

    /// "127.0.0.1:PORT", the value for `CONSUL_HTTP_ADDR` / `-http-addr`.
    pub fn http_addr(&self) -> String {
        self.http_addr.clone()
    }

    /// `<cluster id>.consul` as the agent reports it; equals `TRUST_DOMAIN`.
    pub fn trust_domain(&self) -> String {
        self.trust_domain.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn logs(&self) -> String {
        self.child.logs()
    }

    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    /// Stops the agent now rather than at drop (e.g. to test a sidecar losing Consul).
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.child.stop()
    }

    /// Any request, with headers; use for blocking queries (pass a timeout above `wait`).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, String> {
        // A query parameter keeps the tiny client header-free; fine for a throwaway test token.
        let path = match &self.token {
            Some(t) => format!(
                "{path}{}token={t}",
                if path.contains('?') { '&' } else { '?' }
            ),
            None => path.to_string(),
        };
        http_request(
            &self.http_addr,
            method,
            &path,
            body.map(str::as_bytes),
            timeout,
        )
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        match self.request(method, path, body, Duration::from_secs(10)) {
            Ok(r) => (r.status, r.body),
            Err(e) => panic!("{e}\n{}", self.logs()),
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.call("GET", path, None)
    }

    pub fn put(&self, path: &str, body: &str) -> (u16, String) {
        self.call("PUT", path, Some(body))
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        self.call("POST", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> (u16, String) {
        self.call("DELETE", path, None)
    }

    /// GET that must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub fn is_current(&self) -> bool {
        consul_is_current()
    }

    /// Creates (or replaces) one intention as an operator of this Consul version would: a
    /// `service-intentions` config entry on current Consul, `POST /v1/connect/intentions` on
    /// 1.8. Asserts Consul took it; returns a handle for `delete_intention`.
    pub fn create_intention(&self, source: &str, destination: &str, action: &str) -> String {
        if !self.is_current() {
            let body = serde_json::json!({
                "SourceName": source, "DestinationName": destination, "Action": action
            });
            let (status, body) = self.post("/v1/connect/intentions", &body.to_string());
            assert_eq!(status, 200, "{body}");
            return serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["ID"].as_str().map(str::to_string))
                .unwrap_or_else(|| panic!("no ID in {body}"));
        }
        self.edit_intentions(destination, |sources| {
            sources.retain(|s| s["Name"] != source || s.get("Peer").is_some());
            sources.push(serde_json::json!({"Name": source, "Action": action}));
        });
        format!("config-entry {destination} {source}")
    }

    /// Deletes what `create_intention` made.
    pub fn delete_intention(&self, handle: &str) {
        match handle.strip_prefix("config-entry ") {
            Some(rest) => {
                let (destination, source) = rest.split_once(' ').expect("a handle of ours");
                self.edit_intentions(destination, |sources| {
                    sources.retain(|s| s["Name"] != source || s.get("Peer").is_some());
                });
            }
            None => {
                let (status, body) = self.delete(&format!("/v1/connect/intentions/{handle}"));
                assert_eq!(status, 200, "{body}");
            }
        }
    }

    /// Makes `intentions` the whole set for `destination`: one config entry written at once on
    /// current Consul, or the legacy intentions deleted and created one by one on 1.8.
    pub fn set_intentions(&self, destination: &str, intentions: &[IntentionSpec]) {
        if self.is_current() {
            if intentions.is_empty() {
                let (status, body) =
                    self.delete(&format!("/v1/config/service-intentions/{destination}"));
                assert_eq!(status, 200, "{body}");
                return;
            }
            let sources: Vec<Value> = intentions
                .iter()
                .map(|i| {
                    let mut s = serde_json::json!({"Name": i.source});
                    if let Some(a) = &i.action {
                        s["Action"] = a.as_str().into();
                    }
                    if let Some(p) = &i.peer {
                        s["Peer"] = p.as_str().into();
                    }
                    if let Some(p) = &i.permissions {
                        s["Permissions"] = p.clone();
                    }
                    s
                })
                .collect();
            let entry = serde_json::json!({
                "Kind": "service-intentions", "Name": destination, "Sources": sources
            });
            let (status, body) = self.put("/v1/config", &entry.to_string());
            assert!(status == 200 && body.trim() == "true", "{status} {body}");
            return;
        }
        let all = self.get_json("/v1/connect/intentions");
        for old in all.as_array().into_iter().flatten() {
            if old["DestinationName"] == destination {
                let id = old["ID"].as_str().expect("1.8 intentions have an ID");
                self.delete_intention(id);
            }
        }
        for i in intentions {
            assert!(
                i.peer.is_none() && i.permissions.is_none(),
                "Consul {} has no peers or L7 intentions",
                consul_version()
            );
            self.create_intention(&i.source, destination, i.action.as_deref().unwrap_or(""));
        }
    }

    /// Reads, changes and writes back (check-and-set) the `service-intentions` entry of
    /// `destination`, deleting it when no source is left.
    fn edit_intentions(&self, destination: &str, change: impl Fn(&mut Vec<Value>)) {
        let path = format!("/v1/config/service-intentions/{destination}");
        for _ in 0..10 {
            let (status, body) = self.get(&path);
            let (mut sources, index) = match status {
                200 => {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    let sources = v["Sources"].as_array().cloned().unwrap_or_default();
                    (sources, v["ModifyIndex"].as_u64().unwrap_or(0))
                }
                404 => (Vec::new(), 0),
                _ => panic!("GET {path}: {status} {body}"),
            };
            change(&mut sources);
            let (status, body) = if sources.is_empty() {
                self.delete(&format!("{path}?cas={index}"))
            } else {
                // Consul computes these; sending back what it returned is refused.
                for s in &mut sources {
                    if let Some(o) = s.as_object_mut() {
                        for k in [
                            "Precedence",
                            "Type",
                            "LegacyID",
                            "LegacyMeta",
                            "LegacyCreateTime",
                            "LegacyUpdateTime",
                        ] {
                            o.remove(k);
                        }
                    }
                }
                let entry = serde_json::json!({
                    "Kind": "service-intentions", "Name": destination, "Sources": sources
                });
                self.put(&format!("/v1/config?cas={index}"), &entry.to_string())
            };
            assert_eq!(status, 200, "{body}");
            if body.trim() == "true" {
                return;
            }
        }
        panic!("the intentions of {destination} kept changing under the test");
    }

    /// Sets `protocol` in the service-defaults config entry of `service` (Consul 1.5+).
    pub fn set_protocol(&self, service: &str, protocol: &str) {
        let entry = serde_json::json!({
            "Kind": "service-defaults", "Name": service, "Protocol": protocol
        });
        let (status, body) = self.put("/v1/config", &entry.to_string());
        assert!(status == 200 && body.trim() == "true", "{status} {body}");
    }

    /// A leaf certificate for `service` from the agent, written to `<dir>/<service>.pem` and
    /// `.key` for a client such as curl; returns the paths and Consul's whole answer.
    pub fn leaf_files(&self, service: &str, dir: &Path) -> (PathBuf, PathBuf, Value) {
        let leaf = self.get_json(&format!("/v1/agent/connect/ca/leaf/{service}"));
        let (cert, key) = (
            dir.join(format!("{service}.pem")),
            dir.join(format!("{service}.key")),
        );
        fs::write(&cert, leaf["CertPEM"].as_str().expect("CertPEM")).expect("write the leaf");
        fs::write(&key, leaf["PrivateKeyPEM"].as_str().expect("PrivateKeyPEM"))
            .expect("write the key");
        (cert, key, leaf)
    }

    /// Consul's own verdict on the holder of `leaf` (a `/v1/agent/connect/ca/leaf` answer)
    /// connecting to `target`: the whole `/v1/agent/connect/authorize` answer.
    pub fn authorize(&self, target: &str, leaf: &Value) -> Value {
        let body = serde_json::json!({
            "Target": target,
            "ClientCertURI": leaf["ServiceURI"],
            "ClientCertSerial": leaf["SerialNumber"],
        });
        let (status, body) = self.post("/v1/agent/connect/authorize", &body.to_string());
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn register(&self, service_json: &str) {
        let (status, body) = self.put("/v1/agent/service/register", service_json);
        assert_eq!(status, 200, "register {service_json}: {body}");
    }

    pub fn deregister(&self, service_id: &str) {
        let (status, body) = self.put(&format!("/v1/agent/service/deregister/{service_id}"), "");
        assert_eq!(status, 200, "deregister {service_id}: {body}");
    }

    /// How many instances `/v1/health/connect/<service>?passing` lists right now.
    pub fn passing_connect_instances(&self, service: &str) -> usize {
        let (status, body) = self.get(&format!("/v1/health/connect/{service}?passing"));
        if status != 200 {
            return 0;
        }
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    }
}

/// The JSON a 200 answer carries, or None for anything else (not up yet, still electing, …).
fn json_at(addr: &str, path: &str) -> Option<Value> {
    match http_request(addr, "GET", path, None, Duration::from_secs(2)) {
        Ok(r) if r.status == 200 => serde_json::from_str(&r.body).ok(),
        _ => None,
    }
}

/// Registration for service `name` (ID `name`) on 127.0.0.1:`port` with a sidecar pinned to
/// `sidecar_port` and plain service upstreams `(destination, local_bind_port)`.
///
/// Pinning matters: auto-assigned sidecar ports start at 21000 in every agent, so concurrent
/// tests would collide. The sidecar's checks mirror Consul's defaults (TCP on the public port,
/// alias of the app) but run every second instead of every 10 s, so `?passing` turns true fast.
pub fn sidecar_registration(
    name: &str,
    port: u16,
    sidecar_port: u16,
    upstreams: &[(&str, u16)],
) -> String {
    // `name@dc` names a datacenter: Consul 1.10+ refuses two upstreams of one name and
    // datacenter, and `server@dc1` is a second upstream to the local `server`.
    let upstreams: Vec<Value> = upstreams
        .iter()
        .map(|(dest, bind)| match dest.split_once('@') {
            Some((name, dc)) => serde_json::json!({
                "DestinationName": name, "Datacenter": dc, "LocalBindPort": bind
            }),
            None => serde_json::json!({ "DestinationName": dest, "LocalBindPort": bind }),
        })
        .collect();
    serde_json::json!({
        "Name": name,
        "ID": name,
        "Address": "127.0.0.1",
        "Port": port,
        "Connect": { "SidecarService": {
            "Port": sidecar_port,
            "Proxy": { "Upstreams": upstreams },
            "Checks": [
                {
                    "Name": "Connect Sidecar Listening",
                    "TCP": format!("127.0.0.1:{sidecar_port}"),
                    "Interval": "1s",
                },
                { "Name": format!("Connect Sidecar Aliasing {name}"), "AliasService": name },
            ],
        } },
    })
    .to_string()
}

// ---------------------------------------------------------------------------------------------
// Test application

/// A tiny HTTP/1.1 server on 127.0.0.1 that answers every request with 200 and a fixed body,
/// counting requests and raw bytes received; an optional delay before each answer makes slow
/// upstreams for timeout tests. Keep-alive is honoured. Stops, closing every connection, on
/// drop.
pub struct HttpApp {
    addr: SocketAddr,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
    acceptor: Option<JoinHandle<()>>,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
}

#[derive(Clone)]
struct AppShared {
    body: Arc<Vec<u8>>,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
    delay_ms: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
    conns: Arc<Mutex<HashMap<u64, TcpStream>>>,
}

impl HttpApp {
    /// On a free port.
    pub fn start(body: &str) -> HttpApp {
        HttpApp::start_on(free_port(), body)
    }

    pub fn start_on(port: u16, body: &str) -> HttpApp {
        let listener = TcpListener::bind(("127.0.0.1", port))
            .unwrap_or_else(|e| panic!("HttpApp bind 127.0.0.1:{port}: {e}"));
        let addr = listener.local_addr().expect("local_addr");
        let shared = AppShared {
            body: Arc::new(body.as_bytes().to_vec()),
            requests: Arc::new(AtomicU64::new(0)),
            bytes: Arc::new(AtomicU64::new(0)),
            delay_ms: Arc::new(AtomicU64::new(0)),
            stop: Arc::new(AtomicBool::new(false)),
            conns: Arc::new(Mutex::new(HashMap::new())),
        };
        let handlers: Arc<Mutex<Vec<JoinHandle<()>>>> = Arc::default();
        let acceptor = {
            let shared = shared.clone();
            let handlers = handlers.clone();
            thread::spawn(move || accept_loop(listener, shared, handlers))
        };
        HttpApp {
            addr,
            requests: shared.requests,
            bytes: shared.bytes,
            delay_ms: shared.delay_ms,
            stop: shared.stop,
            conns: shared.conns,
            acceptor: Some(acceptor),
            handlers,
        }
    }

    pub fn with_delay(self, delay: Duration) -> HttpApp {
        self.set_delay(delay);
        self
    }

    /// Applies to requests that arrive from now on.
    pub fn set_delay(&self, delay: Duration) {
        let ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX);
        self.delay_ms.store(ms, Ordering::SeqCst);
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    /// "127.0.0.1:PORT".
    pub fn addr(&self) -> String {
        self.addr.to_string()
    }

    /// Complete requests received (counted before the delay, so a slow request counts even if
    /// the client gave up).
    pub fn requests(&self) -> u64 {
        self.requests.load(Ordering::SeqCst)
    }

    pub fn bytes_received(&self) -> u64 {
        self.bytes.load(Ordering::SeqCst)
    }
}

impl Drop for HttpApp {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // accept() has no timeout; a connection of our own wakes it to see the stop flag.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        for (_, conn) in self.conns.lock().unwrap().drain() {
            let _ = conn.shutdown(Shutdown::Both);
        }
        for handler in self.handlers.lock().unwrap().drain(..) {
            let _ = handler.join();
        }
    }
}

fn accept_loop(
    listener: TcpListener,
    shared: AppShared,
    handlers: Arc<Mutex<Vec<JoinHandle<()>>>>,
) {
    let mut next_id = 0u64;
    for conn in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(conn) = conn else {
            // E.g. out of file descriptors: back off instead of spinning.
            thread::sleep(Duration::from_millis(10));
            continue;
        };
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = conn.try_clone() {
            shared.conns.lock().unwrap().insert(id, clone);
        }
        let shared = shared.clone();
        let handler = thread::spawn(move || {
            serve_connection(conn, &shared);
            shared.conns.lock().unwrap().remove(&id);
        });
        let mut handlers = handlers.lock().unwrap();
        // Long benchmark runs open many connections; keep only live handles.
        handlers.retain(|h| !h.is_finished());
        handlers.push(handler);
    }
}

fn serve_connection(mut conn: TcpStream, shared: &AppShared) {
    // Bounds how long an idle keep-alive connection pins a thread.
    let _ = conn.set_read_timeout(Some(Duration::from_secs(30)));
    let _ = conn.set_nodelay(true);
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    let mut read_more = |conn: &mut TcpStream, buf: &mut Vec<u8>| -> bool {
        match conn.read(&mut chunk) {
            Ok(0) | Err(_) => false,
            Ok(n) => {
                shared.bytes.fetch_add(n as u64, Ordering::SeqCst);
                buf.extend_from_slice(&chunk[..n]);
                true
            }
        }
    };
    loop {
        let head_end = loop {
            if let Some(i) = find(&buf, b"\r\n\r\n") {
                break i + 4;
            }
            if !read_more(&mut conn, &mut buf) {
                return;
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let request_line = head.lines().next().unwrap_or_default().to_string();
        let header = |name: &str| {
            head.lines()
                .skip(1)
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim() == name)
                .map(|(_, v)| v.trim().to_string())
        };
        let connection = header("connection").unwrap_or_default();
        let mut close = if request_line.ends_with("http/1.0") {
            !connection.contains("keep-alive")
        } else {
            connection.contains("close")
        };
        if header("transfer-encoding").is_some_and(|v| v.contains("chunked")) {
            // Enough for tests: read to the last chunk, then close instead of parsing trailers.
            while find(&buf[head_end - 2..], b"\r\n0\r\n\r\n").is_none() {
                if !read_more(&mut conn, &mut buf) {
                    return;
                }
            }
            buf.clear();
            close = true;
        } else {
            let len: usize = header("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            while buf.len() < head_end + len {
                if !read_more(&mut conn, &mut buf) {
                    return;
                }
            }
            buf.drain(..head_end + len);
        }
        shared.requests.fetch_add(1, Ordering::SeqCst);

        let delay = Duration::from_millis(shared.delay_ms.load(Ordering::SeqCst));
        let until = Instant::now() + delay;
        // Sliced so dropping the app does not wait out a long delay.
        while Instant::now() < until {
            if shared.stop.load(Ordering::SeqCst) {
                return;
            }
            thread::sleep(remaining(until).min(Duration::from_millis(10)));
        }

        let mut response = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
            shared.body.len(),
            if close { "Connection: close\r\n" } else { "" }
        )
        .into_bytes();
        if !request_line.starts_with("head ") {
            response.extend_from_slice(&shared.body);
        }
        if conn.write_all(&response).is_err() || close {
            let _ = conn.shutdown(Shutdown::Write);
            return;
        }
    }
}

/// An HTTPS request with the given client certificate files; Ok(body) or Err(curl's complaint),
/// which includes an HTTP error status (a request an L7 intention refused gets 403).
pub fn curl_mtls(
    port: u16,
    cert: Option<(&std::path::Path, &std::path::Path)>,
    ca: &std::path::Path,
) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "5", "-k"])
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://127.0.0.1:{port}/"));
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    let out = cmd
        .output()
        .expect("curl installed by scripts/install-deps");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// Waits until the server `sidecar` is Ready, then writes Consul's first CA root to
/// `<dir>/roots.pem` for clients such as curl, and returns that path.
pub fn ready_with_ca(sidecar: &Child, consul: &Consul, dir: &Path) -> PathBuf {
    wait_until(
        Duration::from_secs(30),
        "the server sidecar to be ready",
        || sidecar.log_contains("-> Ready"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.logs()));
    let roots = consul.get_json("/v1/agent/connect/ca/roots");
    let ca = dir.join("roots.pem");
    std::fs::write(&ca, roots["Roots"][0]["RootCert"].as_str().unwrap()).unwrap();
    ca
}

/// The working directory the sidecar of `service` made under `base` (its master socket,
/// rendered files), resolved.
pub fn sidecar_workdir(base: &Path, service: &str) -> PathBuf {
    let prefix = format!("hcc-{service}-sidecar-proxy-");
    let link = std::fs::read_dir(base)
        .expect("base path readable")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with(&prefix) && !name.ends_with("-dry-run")
        })
        .unwrap_or_else(|| panic!("no working directory for {service}"));
    std::fs::canonicalize(&link).unwrap_or(link)
}

/// The mode (`tcp`, `http`) HAProxy runs the public listener of the sidecar whose working
/// directory is `workdir` in, from `show stat` on its stats socket.
pub fn public_listener_mode(workdir: &Path) -> Option<String> {
    let out = haproxy_cli(&workdir.join("haproxy.sock"), "show stat");
    let mut lines = out.lines();
    let header: Vec<&str> = lines.next()?.trim_start_matches("# ").split(',').collect();
    let col = header.iter().position(|h| *h == "mode")?;
    lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&"public_listener") && f.get(1) == Some(&"FRONTEND"))
        .and_then(|f| f.get(col).map(|m| m.to_string()))
}

/// Waits until the public listener under `base` of `service` runs in `mode`: a protocol
/// change reaches HAProxy by a reload, after the intentions table already knows it.
pub fn wait_public_mode(base: &Path, service: &str, mode: &str) {
    let dir = sidecar_workdir(base, service);
    wait_until(
        Duration::from_secs(20),
        &format!("the public listener of {service} in {mode} mode"),
        || public_listener_mode(&dir).as_deref() == Some(mode),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", public_listener_mode(&dir)));
}

/// The HAProxy master's reload count, from its CLI.
pub fn reloads(master: &Path) -> u32 {
    // The master re-executes itself on a reload and its socket is briefly gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(master) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                panic!("master socket {}: {e}", master.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.write_all(b"show proc\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some("master"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no master line in {out}"))
}

/// One command on an HAProxy CLI socket (stats or master), its whole answer.
pub fn haproxy_cli(socket: &Path, command: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("HAProxy socket");
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Runs the sidecar's `--dry-run` for `service`; asserts it succeeded and returns its output.
pub fn dry_run(consul_addr: &str, base: &Path, service: &str, args: &[&str]) -> String {
    // In the rootfs too: the rendered configuration depends on the HAProxy version.
    let out = sidecar_command()
        .args([
            "--dry-run",
            "-sidecar-for",
            service,
            "-http-addr",
            consul_addr,
        ])
        .arg("-haproxy-cfg-base-path")
        .arg(base)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}
