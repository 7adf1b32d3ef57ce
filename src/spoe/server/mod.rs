//! The SPOE agent server: a unix socket HAProxy's `spoe_agents` backend connects to.
//!
//! It runs on its own fixed set of OS threads, each with a single-threaded tokio runtime that
//! serves the connections it accepted (see [`spawn`]), apart from the control plane, so neither
//! a slow control plane nor a connection storm can starve the other. A decision only reads the current [`AuthzTable`] (an `Arc` swapped whole by
//! `intentions::agent` when Consul's data changes); nothing on this path performs network I/O or holds a lock across I/O.
//!
//! Per connection: HAPROXY-HELLO → AGENT-HELLO (a health-check HELLO is answered and the
//! connection closed), then each NOTIFY is answered, in order, by an ACK that sets
//! `sess.<var-prefix>.<var_name>` to a BOOL. HAPROXY-DISCONNECT is answered with
//! AGENT-DISCONNECT, and so is any malformed frame, with the matching status code. Answers go
//! back on the connection the NOTIFY came from and echo its stream and frame ids, which is all
//! HAProxy 3.x allows.

use std::fmt;
use std::io;
use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::thread::JoinHandle;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::watch;
use tokio::task::JoinSet;

use super::authz::{l7, AuthzTable, Decision};
use super::frame::{
    self, Disconnect, Frame, FrameError, HaproxyHello, Notify, StatusCode, TypedData, VarScope,
    AGENT_MAX_FRAME_SIZE,
};
use super::ForgetfulMap;

/// The `spoe-message` the HAProxy configuration must declare, with `args cert=ssl_c_der` and
/// `event on-frontend-tcp-request`.
pub const CHECK_MESSAGE: &str = "check-client";
/// The argument of [`CHECK_MESSAGE`] that carries the client certificate.
pub const CERT_ARG: &str = "cert";
/// The per-request `spoe-message` of an http listener, sent only for connections whose
/// [`CHECK_MESSAGE`] answer set `sess.<prefix>.`[`L7_VAR`] and whose request HAProxy's fast map
/// did not allow: `args src=var(sess.hcc.src) method=method path=path query=query
/// headers=req.hdrs_bin`,
/// in a `spoe-group` the frontend sends with `send-spoe-group`.
pub const REQUEST_MESSAGE: &str = "check-request";
/// Session variable set (BOOL true) on a connection whose requests are each judged.
pub const L7_VAR: &str = "l7";
/// Session variable holding the connection's source identity (its SPIFFE ID) for
/// [`REQUEST_MESSAGE`].
pub const SRC_VAR: &str = "src";
/// Session variable (STRING) set on every allowed connection whose certificate names a
/// service: that service's name, which the public frontend puts in the `appname_header`.
pub const APP_VAR: &str = "app";
/// Transaction variable [`REQUEST_MESSAGE`]'s answer sets (BOOL): whether the request may go on.
pub const REQUEST_VAR: &str = "req_allow";
/// An accepted token's header to remove: its number in `JwtHeaders::strip` (txn scope).
pub const JWT_STRIP_VAR: &str = "jwt_strip";
/// The `Forwarding` header of an accepted token: its number in `JwtHeaders::forward`.
pub const JWT_FORWARD_VAR: &str = "jwt_fwd";
/// That token's base64url payload, the header's value.
pub const JWT_PAYLOAD_VAR: &str = "jwt_payload";
/// Session variable (STRING) both answers set on an L7 connection: the key its next requests
/// are looked up under in HAProxy's fast map (`AuthzTable::fast_map`).
pub const FAST_KEY_VAR: &str = "l7key";
/// `sess.<prefix>.gen`: the generation of the table that judged the connection
/// (`AuthzTable::generation`); an http listener asks again once the table's differs.
pub const GENERATION_VAR: &str = "gen";

/// HAProxy sends its HELLO as soon as it connects; a silent peer is not HAProxy.
const HELLO_TIMEOUT: Duration = Duration::from_secs(5);
/// Must exceed HAProxy's `timeout idle` (2.6) and agent backend `timeout server` (3.x) so
/// HAProxy, not us, decides when a pooled connection ends; this only reaps leaked peers.
const IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// A peer that stops reading must not pin a task forever.
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// How long shutdown waits for connections to say AGENT-DISCONNECT before they are dropped.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);
/// Bounds the memory of the "already logged this denial" set; it is cleared when full.
const DENIAL_LOG_CAP: usize = 4096;
/// HAProxy truncates `<scope>.<prefix>.<name>` to 63 bytes, so a longer name can never match.
const MAX_VAR_NAME: usize = 63;

/// How the agent is started.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    /// Where to listen; a stale socket there is replaced. Created with mode 0600, so HAProxy
    /// must run as the same user.
    pub socket_path: PathBuf,
    /// Tokio worker threads, at least 1.
    pub worker_threads: usize,
    /// The ACK sets `sess.<prefix>.<var_name>`, where HAProxy's `option var-prefix` supplies
    /// the prefix (e.g. `hcc` + `allow` → `var(sess.hcc.allow)`).
    pub var_name: String,
}

/// The current decision table, shared between the intentions watcher (writer) and the agent
/// (readers). The lock is only held to clone or swap the `Arc`.
#[derive(Clone)]
pub struct SharedTable {
    inner: Arc<RwLock<Arc<AuthzTable>>>,
}

impl SharedTable {
    pub fn new(table: AuthzTable) -> Self {
        SharedTable {
            inner: Arc::new(RwLock::new(Arc::new(table))),
        }
    }

    /// Swaps in a new table; decisions already running finish with the old one.
    pub fn replace(&self, table: AuthzTable) {
        let new = Arc::new(table);
        // A poisoned lock only means a panic elsewhere while swapping an Arc, which cannot
        // leave it half-written, so the value is still good to use.
        let mut guard = self.inner.write().unwrap_or_else(|e| e.into_inner());
        *guard = new;
    }

    pub fn current(&self) -> Arc<AuthzTable> {
        Arc::clone(&self.inner.read().unwrap_or_else(|e| e.into_inner()))
    }
}

impl fmt::Debug for SharedTable {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SharedTable").finish_non_exhaustive()
    }
}

/// Counters for metrics. Monotonic; read with `Ordering::Relaxed`.
#[derive(Debug, Default)]
pub struct AgentStats {
    /// NOTIFYs answered with allow.
    pub allowed: AtomicU64,
    /// NOTIFYs answered with deny.
    pub denied: AtomicU64,
    /// Per-request NOTIFYs ([`REQUEST_MESSAGE`]) answered with allow.
    pub requests_allowed: AtomicU64,
    /// Per-request NOTIFYs answered with deny.
    pub requests_denied: AtomicU64,
    /// Connections ended by a protocol or I/O error (malformed frame, timeout, reset…).
    pub errors: AtomicU64,
    /// Connections accepted, health checks included.
    pub connections: AtomicU64,
    /// `option spop-check` HELLOs answered.
    pub health_checks: AtomicU64,
    /// Time from a NOTIFY read to its ACK queued: the agent's decision time.
    pub decision_time: LatencyHistogram,
}

/// Durations in power-of-two microsecond buckets: lock-free to record on the decision path,
/// precise to a factor of two, which is what a p50/p99 against a 1 ms target needs.
#[derive(Debug, Default)]
pub struct LatencyHistogram {
    /// Bucket `i` counts durations below `2^(i+1)` µs (and at least `2^i` µs for i > 0).
    buckets: [AtomicU64; 32],
}

impl LatencyHistogram {
    pub fn record(&self, d: std::time::Duration) {
        let us = u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1);
        let i = (63 - us.leading_zeros() as usize).min(31);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self) -> u64 {
        self.buckets.iter().map(|b| b.load(Ordering::Relaxed)).sum()
    }

    /// The upper bound of the bucket holding quantile `q` (0..=1); `None` when empty.
    pub fn quantile(&self, q: f64) -> Option<std::time::Duration> {
        let total = self.count();
        if total == 0 {
            return None;
        }
        let rank = ((total as f64) * q.clamp(0.0, 1.0)).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            seen += b.load(Ordering::Relaxed);
            if seen >= rank {
                return Some(std::time::Duration::from_micros(1u64 << (i + 1)));
            }
        }
        Some(std::time::Duration::from_micros(1u64 << 32))
    }
}

/// Why the agent could not start.
#[derive(Debug)]
pub enum AgentError {
    InvalidConfig(String),
    Socket { path: PathBuf, source: io::Error },
    Runtime(io::Error),
    Thread(io::Error),
}

impl fmt::Display for AgentError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            AgentError::InvalidConfig(m) => write!(f, "SPOE agent config: {m}"),
            AgentError::Socket { path, source } => {
                write!(f, "SPOE agent socket {}: {source}", path.display())
            }
            AgentError::Runtime(e) => write!(f, "SPOE agent runtime: {e}"),
            AgentError::Thread(e) => write!(f, "SPOE agent thread: {e}"),
        }
    }
}

impl std::error::Error for AgentError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            AgentError::InvalidConfig(_) => None,
            AgentError::Socket { source, .. } => Some(source),
            AgentError::Runtime(e) | AgentError::Thread(e) => Some(e),
        }
    }
}

/// A running agent. Dropping it stops the agent like [`AgentHandle::shutdown`].
pub struct AgentHandle {
    stats: Arc<AgentStats>,
    shutdown: watch::Sender<bool>,
    threads: Vec<JoinHandle<()>>,
    socket_path: PathBuf,
    identity: Option<FileIdentity>,
}

impl AgentHandle {
    pub fn stats(&self) -> &Arc<AgentStats> {
        &self.stats
    }

    pub fn socket_path(&self) -> &Path {
        &self.socket_path
    }

    /// Stops accepting, tells every open connection AGENT-DISCONNECT, removes the socket
    /// file and stops the runtimes. Blocks for at most about [`DRAIN_TIMEOUT`] plus a second.
    /// HAProxy then fails closed: with no agent the variable stays unset and its rule rejects.
    pub fn shutdown(&mut self) {
        // send_replace, unlike send, works when every receiver is already gone.
        self.shutdown.send_replace(true);
        for t in self.threads.drain(..) {
            if t.join().is_err() {
                log::error!("SPOE agent thread panicked");
            }
        }
        if let Some(identity) = self.identity.take() {
            remove_if_ours(&self.socket_path, identity);
        }
    }
}

impl Drop for AgentHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

impl fmt::Debug for AgentHandle {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AgentHandle")
            .field("socket_path", &self.socket_path)
            .field("running", &!self.threads.is_empty())
            .finish()
    }
}

/// Starts the agent: binds the socket and builds the runtimes before returning, so every
/// startup failure is reported here rather than logged later.
///
/// Each worker is an OS thread with a single-threaded runtime of its own that accepts on the
/// shared socket and serves the connections it accepted, start to end. A NOTIFY and its ACK
/// therefore never cross threads (a work-stealing runtime may wake an idle worker for a
/// frame: a futex call and a context switch), and nothing is lost by it: HAProxy's agent
/// connections are few and long-lived, so there is nothing to balance after the accept.
pub fn spawn(cfg: AgentConfig, table: SharedTable) -> Result<AgentHandle, AgentError> {
    validate(&cfg)?;
    let (std_listener, identity) =
        bind_socket(&cfg.socket_path).map_err(|source| AgentError::Socket {
            path: cfg.socket_path.clone(),
            source,
        })?;
    let stats = Arc::new(AgentStats::default());
    let ctx = Arc::new(Ctx {
        table,
        var_name: cfg.var_name.clone(),
        stats: Arc::clone(&stats),
        denials: ForgetfulMap::new(DENIAL_LOG_CAP),
    });
    let (tx, rx) = watch::channel(false);
    let mut handle = AgentHandle {
        stats,
        shutdown: tx,
        threads: Vec::new(),
        socket_path: cfg.socket_path.clone(),
        identity: Some(identity),
    };
    let socket_error = |source| AgentError::Socket {
        path: cfg.socket_path.clone(),
        source,
    };
    for i in 0..cfg.worker_threads {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_io()
            .enable_time()
            .build()
            .map_err(AgentError::Runtime)?;
        let listener = {
            let std = std_listener.try_clone().map_err(socket_error)?;
            // from_std registers with the reactor of the runtime entered here.
            let _enter = runtime.enter();
            UnixListener::from_std(std).map_err(socket_error)?
        };
        let (ctx, rx) = (Arc::clone(&ctx), rx.clone());
        let thread = std::thread::Builder::new()
            .name(format!("spoe-worker-{i}"))
            .spawn(move || {
                runtime.block_on(accept_loop(listener, ctx, rx));
                runtime.shutdown_timeout(Duration::from_secs(1));
            })
            .map_err(AgentError::Thread)?;
        handle.threads.push(thread);
    }
    log::info!(
        "SPOE agent listening on {} with {} worker threads",
        cfg.socket_path.display(),
        cfg.worker_threads
    );
    Ok(handle)
}

fn validate(cfg: &AgentConfig) -> Result<(), AgentError> {
    // Tokio panics on zero workers; a config error is the better failure.
    if cfg.worker_threads == 0 {
        return Err(AgentError::InvalidConfig(
            "worker_threads must be at least 1".into(),
        ));
    }
    let name = &cfg.var_name;
    if name.is_empty()
        || name.len() > MAX_VAR_NAME
        || !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'.')
    {
        return Err(AgentError::InvalidConfig(format!(
            "var_name {name:?} must be 1-{MAX_VAR_NAME} characters of [A-Za-z0-9_.]"
        )));
    }
    if cfg.socket_path.file_name().is_none() {
        return Err(AgentError::InvalidConfig(format!(
            "socket_path {} has no file name",
            cfg.socket_path.display()
        )));
    }
    Ok(())
}

/// (device, inode) of the socket file we created, so shutdown never removes a socket that a
/// newer agent has since bound at the same path.
type FileIdentity = (u64, u64);

/// Binds at a temporary name, restricts it to 0600, then renames it over `path`: the socket
/// is never reachable with wider permissions, and a stale socket is replaced atomically.
fn bind_socket(path: &Path) -> io::Result<(std::os::unix::net::UnixListener, FileIdentity)> {
    match std::fs::symlink_metadata(path) {
        Ok(m) if !m.file_type().is_socket() => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "exists and is not a socket; refusing to replace it",
            ))
        }
        Ok(_) => log::debug!("replacing stale SPOE socket {}", path.display()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    static SEQ: AtomicU64 = AtomicU64::new(0);
    // Short on purpose: unix socket paths are limited to 107 bytes.
    let tmp = path.with_file_name(format!(
        ".spoe{}-{}.tmp",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let _ = std::fs::remove_file(&tmp);
    let listener = std::os::unix::net::UnixListener::bind(&tmp)?;
    let placed = std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o600))
        .and_then(|()| std::fs::rename(&tmp, path))
        .and_then(|()| listener.set_nonblocking(true))
        .and_then(|()| std::fs::metadata(path));
    match placed {
        Ok(m) => Ok((listener, (m.dev(), m.ino()))),
        Err(e) => {
            let _ = std::fs::remove_file(&tmp);
            Err(e)
        }
    }
}

fn remove_if_ours(path: &Path, identity: FileIdentity) {
    if let Ok(m) = std::fs::symlink_metadata(path) {
        if (m.dev(), m.ino()) == identity {
            if let Err(e) = std::fs::remove_file(path) {
                log::warn!("removing SPOE socket {}: {e}", path.display());
            }
        }
    }
}

/// What every connection task shares.
struct Ctx {
    table: SharedTable,
    var_name: String,
    stats: Arc<AgentStats>,
    /// (identity, reason) pairs already logged at info, so a denied client that retries in a
    /// loop produces one line, not one per connection.
    denials: ForgetfulMap<String, ()>,
}

impl Ctx {
    fn record(&self, d: &Decision, request: bool) {
        // Identities and reasons quote certificate contents; escaped, a crafted certificate
        // cannot forge log lines.
        let who = d
            .source
            .as_deref()
            .unwrap_or("<no identity>")
            .escape_debug();
        let why = d.reason.escape_debug();
        let (allowed, denied) = if request {
            (&self.stats.requests_allowed, &self.stats.requests_denied)
        } else {
            (&self.stats.allowed, &self.stats.denied)
        };
        if d.allow {
            allowed.fetch_add(1, Ordering::Relaxed);
            log::debug!("SPOE allow {who}: {why}");
            return;
        }
        denied.fetch_add(1, Ordering::Relaxed);
        let key = format!("{}\0{}", d.source.as_deref().unwrap_or(""), d.reason);
        if self.denials.insert(key, ()) {
            log::info!("SPOE deny {who}: {why} (logged once per identity and reason)");
        } else {
            log::debug!("SPOE deny {who}: {why}");
        }
    }
}

mod conn;
use conn::accept_loop;
pub mod xfcc;
pub use xfcc::{CHAIN_ARG, XFCC_VAR};

#[cfg(test)]
mod tests;
