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

async fn accept_loop(listener: UnixListener, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    let mut conns = JoinSet::new();
    loop {
        tokio::select! {
            () = stopped(&mut shutdown) => break,
            // Reap finished tasks so the set does not grow with every connection ever made.
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    ctx.stats.connections.fetch_add(1, Ordering::Relaxed);
                    conns.spawn(serve_connection(stream, Arc::clone(&ctx), shutdown.clone()));
                }
                Err(e) => {
                    // Typically EMFILE; pausing keeps a persistent error from spinning a core.
                    log::warn!("SPOE accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
        }
    }
    drop(listener);
    let drained = tokio::time::timeout(DRAIN_TIMEOUT, async {
        while conns.join_next().await.is_some() {}
    })
    .await;
    if drained.is_err() {
        log::debug!("SPOE shutdown: dropping {} connections", conns.len());
        conns.abort_all();
    }
    log::info!("SPOE agent stopped");
}

/// Resolves once shutdown is requested (or the handle is gone). The guard `wait_for` returns
/// is dropped here because it must not live across the awaits that follow in a task.
async fn stopped(rx: &mut watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
}

/// How a connection ends, decided while handling a frame.
enum Next {
    Continue,
    /// Flush what is queued, then close.
    Close,
}

/// A protocol failure: answered with AGENT-DISCONNECT(status) and logged at warn.
struct Fail {
    status: StatusCode,
    problem: String,
}

impl From<FrameError> for Fail {
    fn from(e: FrameError) -> Self {
        Fail {
            status: e.status_code(),
            problem: e.to_string(),
        }
    }
}

struct Conn {
    stream: UnixStream,
    ctx: Arc<Ctx>,
    inbuf: Vec<u8>,
    out: Vec<u8>,
    /// Before HELLO our own limit; after, the negotiated one.
    max_frame: usize,
    ready: bool,
}

async fn serve_connection(stream: UnixStream, ctx: Arc<Ctx>, mut shutdown: watch::Receiver<bool>) {
    let mut c = Conn {
        stream,
        ctx,
        inbuf: Vec::with_capacity(4096),
        out: Vec::with_capacity(256),
        max_frame: AGENT_MAX_FRAME_SIZE as usize,
        ready: false,
    };
    loop {
        // Answer every frame already buffered (pipelining: several NOTIFYs may arrive in one
        // read), in order, then write the answers in one go.
        let mut next = Next::Continue;
        loop {
            match frame::decode(&c.inbuf, c.max_frame) {
                Ok(None) => break,
                Ok(Some((f, used))) => {
                    c.inbuf.drain(..used);
                    match c.handle(f) {
                        Ok(Next::Continue) => {}
                        Ok(Next::Close) => {
                            next = Next::Close;
                            break;
                        }
                        Err(fail) => return c.fail(fail).await,
                    }
                }
                Err(e) => return c.fail(e.into()).await,
            }
        }
        if let Err(e) = c.flush().await {
            c.ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
            log::warn!("SPOE connection: write failed: {e}");
            return;
        }
        if let Next::Close = next {
            return;
        }

        let wait = if c.ready { IDLE_TIMEOUT } else { HELLO_TIMEOUT };
        c.inbuf.reserve(8192);
        let read = tokio::select! {
            () = stopped(&mut shutdown) => {
                c.say_goodbye(StatusCode::Normal, "agent shutting down").await;
                return;
            }
            r = tokio::time::timeout(wait, c.stream.read_buf(&mut c.inbuf)) => r,
        };
        match read {
            Err(_elapsed) => {
                let what = if c.ready {
                    "idle timeout"
                } else {
                    "no HELLO in time"
                };
                return c
                    .fail(Fail {
                        status: StatusCode::Timeout,
                        problem: what.into(),
                    })
                    .await;
            }
            Ok(Ok(0)) => {
                if !c.inbuf.is_empty() {
                    log::debug!(
                        "SPOE connection closed by HAProxy with {} bytes of a frame unread",
                        c.inbuf.len()
                    );
                }
                return;
            }
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                c.ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
                log::warn!("SPOE connection: read failed: {e}");
                return;
            }
        }
    }
}

impl Conn {
    fn handle(&mut self, f: Frame) -> Result<Next, Fail> {
        match (self.ready, f) {
            (false, Frame::HaproxyHello(kv)) => {
                let hello = HaproxyHello::from_kv(&kv)?;
                let size = hello.negotiate_frame_size(AGENT_MAX_FRAME_SIZE);
                self.queue(&Frame::agent_hello(size))?;
                if hello.healthcheck {
                    // A health check is not a session: HAProxy closes after our HELLO.
                    self.ctx.stats.health_checks.fetch_add(1, Ordering::Relaxed);
                    return Ok(Next::Close);
                }
                log::debug!(
                    "SPOE connection from engine {}: max-frame-size {size}, capabilities {:?}",
                    hello.engine_id.as_deref().unwrap_or("-"),
                    hello.capabilities
                );
                self.max_frame = size as usize;
                self.ready = true;
                Ok(Next::Continue)
            }
            (true, Frame::Notify(n)) => {
                let started = std::time::Instant::now();
                let ack = if n.messages.iter().any(|m| m.name == REQUEST_MESSAGE) {
                    let decision = self.decide_request(&n);
                    self.ctx.record(&decision, true);
                    let mut actions = vec![frame::Action::SetVar {
                        scope: VarScope::Transaction,
                        name: REQUEST_VAR.into(),
                        value: TypedData::Bool(decision.allow),
                    }];
                    // What the accepted token changes on the request (`objects` numbers the
                    // headers as the table does).
                    let f = &decision.forwarded;
                    if let Some(i) = f.strip {
                        actions.push(frame::Action::SetVar {
                            scope: VarScope::Transaction,
                            name: JWT_STRIP_VAR.into(),
                            value: TypedData::Uint32(u32::try_from(i).unwrap_or(u32::MAX)),
                        });
                    }
                    if let Some((i, payload)) = &f.payload {
                        actions.push(frame::Action::SetVar {
                            scope: VarScope::Transaction,
                            name: JWT_FORWARD_VAR.into(),
                            value: TypedData::Uint32(u32::try_from(*i).unwrap_or(u32::MAX)),
                        });
                        actions.push(frame::Action::SetVar {
                            scope: VarScope::Transaction,
                            name: JWT_PAYLOAD_VAR.into(),
                            value: TypedData::String(payload.clone().into_bytes()),
                        });
                    }
                    // The connection's later requests look up the current table's rules.
                    actions.extend(decision.fast_key.map(fast_key_action));
                    Frame::Ack(frame::Ack {
                        stream_id: n.stream_id,
                        frame_id: n.frame_id,
                        actions,
                    })
                } else {
                    let (decision, generation) = self.decide(&n);
                    self.ctx.record(&decision, false);
                    self.connection_ack(&n, decision, generation)
                };
                self.queue(&ack)?;
                self.ctx.stats.decision_time.record(started.elapsed());
                Ok(Next::Continue)
            }
            (_, Frame::HaproxyDisconnect(kv)) => {
                match Disconnect::from_kv(&kv) {
                    // 0 is a reload or stop, 2 an idle timeout: routine.
                    Ok(d) if d.status_code == 0 || d.status_code == 2 => log::debug!(
                        "SPOE connection: HAProxy disconnected ({} {})",
                        d.status_code,
                        d.message.escape_debug()
                    ),
                    Ok(d) => log::warn!(
                        "SPOE connection: HAProxy disconnected with status {}: {}",
                        d.status_code,
                        d.message.escape_debug()
                    ),
                    Err(e) => log::warn!("SPOE connection: malformed HAPROXY-DISCONNECT: {e}"),
                }
                self.queue(&Frame::agent_disconnect(StatusCode::Normal, "normal"))?;
                Ok(Next::Close)
            }
            (ready, other) => Err(Fail {
                status: StatusCode::Invalid,
                problem: format!(
                    "unexpected {} frame {}",
                    other.frame_type(),
                    if ready { "after HELLO" } else { "before HELLO" }
                ),
            }),
        }
    }

    /// The answer to [`CHECK_MESSAGE`]: `allow`, the generation of the table that decided,
    /// the caller's service ([`APP_VAR`]) on an allowed connection, and for a connection whose
    /// requests are each judged also `l7` and `src`, all session variables.
    fn connection_ack(&self, n: &Notify, d: Decision, generation: String) -> Frame {
        let mut actions = vec![frame::Action::SetVar {
            scope: VarScope::Session,
            name: self.ctx.var_name.clone(),
            value: TypedData::Bool(d.allow),
        }];
        // A table that can only deny has none: the connection is then asked about again.
        if !generation.is_empty() {
            actions.push(frame::Action::SetVar {
                scope: VarScope::Session,
                name: GENERATION_VAR.into(),
                value: TypedData::String(generation.into_bytes()),
            });
        }
        // Only a name a service can have reaches a header: the certificate is the mesh CA's,
        // but its path is percent-decoded and could hold anything.
        let app = d
            .source
            .as_deref()
            .filter(|_| d.allow)
            .and_then(|src| crate::pki::SpiffeId::parse(src).ok())
            .and_then(|id| crate::value::Name::parse("source service", &id.service).ok());
        if let Some(app) = app {
            actions.push(frame::Action::SetVar {
                scope: VarScope::Session,
                name: APP_VAR.into(),
                value: TypedData::String(app.as_str().as_bytes().to_vec()),
            });
        }
        if d.allow && d.per_request {
            if let Some(src) = d.source {
                actions.push(frame::Action::SetVar {
                    scope: VarScope::Session,
                    name: L7_VAR.into(),
                    value: TypedData::Bool(true),
                });
                actions.push(frame::Action::SetVar {
                    scope: VarScope::Session,
                    name: SRC_VAR.into(),
                    value: TypedData::String(src.into_bytes()),
                });
                actions.extend(d.fast_key.map(fast_key_action));
            }
        }
        Frame::Ack(frame::Ack {
            stream_id: n.stream_id,
            frame_id: n.frame_id,
            actions,
        })
    }

    /// Decides one request of a connection [`CHECK_MESSAGE`] let in with `l7`. Anything
    /// missing or malformed denies.
    fn decide_request(&self, n: &Notify) -> Decision {
        let arg = |name: &str| n.find_arg(Some(REQUEST_MESSAGE), name);
        let text = |name: &str| match arg(name) {
            Some(TypedData::String(b)) => std::str::from_utf8(b).ok(),
            _ => None,
        };
        let Some(src) = text("src") else {
            return Decision::deny(
                format!("{REQUEST_MESSAGE} has no src string (var(sess.hcc.src))"),
                None,
            );
        };
        let (Some(method), Some(path)) = (text("method"), text("path")) else {
            return Decision::deny(
                format!("{REQUEST_MESSAGE} needs method and path strings"),
                Some(src),
            );
        };
        let fields = match arg("headers") {
            Some(TypedData::Binary(b)) => match frame::decode_hdrs_bin(b) {
                Ok(f) => f,
                Err(e) => return Decision::deny(format!("request headers: {e}"), Some(src)),
            },
            _ => {
                return Decision::deny(
                    format!("{REQUEST_MESSAGE} has no headers (req.hdrs_bin)"),
                    Some(src),
                )
            }
        };
        // HAProxy sends no query (NULL) for a path without `?`; only a JWT location reads it.
        let req = HdrsRequest {
            method,
            path: l7::url_path(path),
            query: text("query"),
            fields,
        };
        self.ctx.table.current().decide_request(src, &req)
    }

    /// The connection's decision, and the generation of the table that made it.
    fn decide(&self, n: &Notify) -> (Decision, String) {
        let table = self.ctx.table.current();
        let decision = match n.find_arg(Some(CHECK_MESSAGE), CERT_ARG) {
            Some(TypedData::Binary(der)) => table.decide(Some(der)),
            // ssl_c_der is NULL when the client sent no certificate.
            Some(TypedData::Null) => table.decide(None),
            Some(other) => Decision::deny(
                format!(
                    "NOTIFY argument {CERT_ARG} is {}, expected BINARY (ssl_c_der)",
                    other.type_name()
                ),
                None,
            ),
            None => Decision::deny(
                format!(
                    "NOTIFY has no {CERT_ARG} argument: spoe-message {CHECK_MESSAGE} \
                     must have args {CERT_ARG}=ssl_c_der"
                ),
                None,
            ),
        };
        (decision, table.generation().to_string())
    }

    fn queue(&mut self, f: &Frame) -> Result<(), Fail> {
        f.encode(self.max_frame, &mut self.out).map_err(|e| Fail {
            status: StatusCode::Resource,
            problem: format!("cannot encode {}: {e}", f.frame_type()),
        })
    }

    async fn flush(&mut self) -> io::Result<()> {
        if self.out.is_empty() {
            return Ok(());
        }
        match tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(&self.out)).await {
            Ok(r) => r?,
            Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "write timed out")),
        }
        self.out.clear();
        Ok(())
    }

    async fn fail(mut self, fail: Fail) {
        self.ctx.stats.errors.fetch_add(1, Ordering::Relaxed);
        log::warn!(
            "SPOE connection: {}; sending AGENT-DISCONNECT status {}",
            fail.problem,
            fail.status.code()
        );
        self.say_goodbye(fail.status, &fail.problem).await;
    }

    /// Best effort: the peer may already be gone, and we close either way. ACKs still queued
    /// for earlier frames of the same read go out first, so those streams get their answer.
    async fn say_goodbye(&mut self, status: StatusCode, message: &str) {
        // The negotiated size is at least 256 and the message is cut well below that.
        let _ = Frame::agent_disconnect(status, message).encode(self.max_frame, &mut self.out);
        let _ = self.flush().await;
        let _ = self.stream.shutdown().await;
    }
}

/// Sets [`FAST_KEY_VAR`]: the key an L7 connection's requests are looked up under.
fn fast_key_action(key: String) -> frame::Action {
    frame::Action::SetVar {
        scope: VarScope::Session,
        name: FAST_KEY_VAR.into(),
        value: TypedData::String(key.into_bytes()),
    }
}

/// A request as [`REQUEST_MESSAGE`] carries it: header fields straight from `req.hdrs_bin`.
struct HdrsRequest<'a> {
    method: &'a str,
    path: &'a str,
    query: Option<&'a str>,
    fields: Vec<frame::HeaderField<'a>>,
}

impl l7::Request for HdrsRequest<'_> {
    fn method(&self) -> &str {
        self.method
    }
    fn path(&self) -> &str {
        self.path
    }
    fn header(&self, lower_name: &str) -> Option<String> {
        l7::join_fields(self.fields.iter().copied(), lower_name)
    }
    fn query(&self) -> Option<&str> {
        self.query
    }
}

#[cfg(test)]
mod tests;
