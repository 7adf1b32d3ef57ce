//! The stats endpoint on `-stats-addr`: `/health` (the process answers), `/ready` (HAProxy
//! serves the full configuration: 200 in phase Ready only, 503 while starting or draining) and
//! `/metrics`. Every client is untrusted: each connection gets its own thread, up to a fixed
//! number at once, and a client may send at most `head_bytes` of request head within
//! `head_time`, so a slow, silent or endless client costs one bounded slot for a bounded time
//! and never delays `/ready` for Consul's check or `/metrics` for Prometheus. It reads the
//! phase others publish and owns no state anyone needs.

use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::consul::catalog_service::{CatalogService, Ready};
use crate::consul::client::{deregister_path, Consul, AGENT_SELF_PATH, REGISTER_PATH};
use crate::consul::source::Source;
use crate::error::{Context, Result};
use crate::phase::{Phase, PhaseCell};

/// The stats endpoint registered in Consul as a service (`-stats-service-register`): named after
/// the sidecar's service, tagged for what it is. With an agent, its HTTP check reads `/ready`
/// at the address the endpoint really listens on, and it is deregistered when the drain
/// starts. Agentless, it is a catalog service on the proxy's node whose check the sidecar
/// writes (`consul::catalog_service`): critical while draining, deregistered when the run ends.
pub enum StatsService {
    Agent {
        id: String,
    },
    /// Deregistered when dropped.
    Catalog(CatalogService),
}

impl StatsService {
    pub fn register(
        consul: &Consul,
        proxy_id: &str,
        service: &str,
        registration_address: &str,
        stats: SocketAddr,
        ready: Ready,
    ) -> Result<StatsService> {
        let (id, mut body) = registration(consul, proxy_id, service, registration_address, stats)?;
        if let Source::Catalog { node } = consul.source() {
            let registered = CatalogService::register(consul, node, body, ready)?;
            log::info!("registered the stats endpoint as {id} on the catalog node {node}");
            return Ok(StatsService::Catalog(registered));
        }
        // The agent's register endpoint names the service `Name`, the catalog's `Service`.
        if let Some(name) = body.as_object_mut().and_then(|o| o.remove("Service")) {
            body["Name"] = name;
        }
        let address = body["Address"].as_str().unwrap_or_default();
        let host = if address.contains(':') {
            format!("[{address}]")
        } else {
            address.to_string()
        };
        body["Check"] = serde_json::json!({
            "Name": "sidecar ready",
            "HTTP": format!("http://{host}:{}/ready", stats.port()),
            "Interval": "10s",
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "10m"
        });
        let answer = consul.send("PUT", REGISTER_PATH, Some(&body.to_string()))?;
        if answer.status != 200 {
            return Err(crate::error::Error::msg(format!(
                "registering {id}: status {}: {}",
                answer.status,
                answer.body.trim()
            )));
        }
        log::info!("registered the stats endpoint in Consul as {id}");
        Ok(StatsService::Agent { id })
    }

    /// The drain started: with an agent the service goes now; agentless it stays, its check
    /// critical, until the run ends (the returned value is dropped then).
    pub fn drain(self, consul: &Consul) -> Option<StatsService> {
        match self {
            StatsService::Agent { id } => {
                match consul.send("PUT", &deregister_path(&id), None) {
                    Ok(a) if a.status == 200 => log::info!("deregistered {id} from Consul"),
                    Ok(a) => log::warn!("deregistering {id}: status {}", a.status),
                    Err(e) => log::warn!("deregistering {id}: {e}"),
                }
                None
            }
            StatsService::Catalog(registered) => {
                registered.look_now();
                Some(StatsService::Catalog(registered))
            }
        }
    }
}

/// The service's ID and body, without its check.
fn registration(
    consul: &Consul,
    proxy_id: &str,
    service: &str,
    registration_address: &str,
    stats: SocketAddr,
) -> Result<(String, serde_json::Value)> {
    // An unspecified listen address is reached at the proxy's own address, else the node's.
    let address = if stats.ip().is_unspecified() {
        if !registration_address.is_empty() {
            registration_address.to_string()
        } else if consul.source().is_agentless() {
            // The servers' own address is not this node's.
            return Err(crate::error::Error::msg(
                "the proxy's catalog registration has no Address, so the stats endpoint's cannot be told: give -stats-addr an address",
            ));
        } else {
            consul.agent_address()?.ok_or_else(|| {
                crate::error::Error::msg(format!(
                    "the token may not read {AGENT_SELF_PATH}, so the agent did not say its address (Member.Addr)"
                ))
            })?
        }
    } else {
        stats.ip().to_string()
    };
    let id = format!("{proxy_id}-stats");
    let body = serde_json::json!({
        "ID": id,
        "Service": format!("{service}-sidecar-stats"),
        "Tags": ["haproxy-consul-connect", "stats", "metrics"],
        "Meta": {"proxy": proxy_id, "metrics_path": "/metrics"},
        "Address": address,
        "Port": stats.port(),
    });
    Ok((id, body))
}

/// Produces the /metrics body at scrape time.
pub type MetricsFn = Arc<dyn Fn() -> String + Send + Sync>;

/// What one client may cost the endpoint.
#[derive(Clone, Copy, Debug)]
struct Limits {
    /// Request line and headers together; a longer head gets 431 and the connection closed.
    head_bytes: usize,
    /// From accept to the end of the head, however the bytes trickle in; then it is closed.
    head_time: Duration,
    /// To write the whole response; a client that does not read it is abandoned.
    write_time: Duration,
    /// Connections served at once; one more is answered 503 and closed, never queued.
    connections: usize,
}

impl Limits {
    /// Consul's check and Prometheus send a few hundred bytes at once and read promptly; 32
    /// slots leave room for them beside a handful of stuck clients, at most 32 threads and
    /// 32 × 8 KiB of heads.
    const DEFAULT: Limits = Limits {
        head_bytes: 8 * 1024,
        head_time: Duration::from_secs(5),
        write_time: Duration::from_secs(5),
        connections: 32,
    };
}

/// After answering, bytes the client still sends are read and dropped for at most this long
/// (and this many bytes) before closing, so the close does not reset the connection under the
/// answer (a close with unread input sends RST, which may discard the answer in flight).
const LINGER_TIME: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 64 * 1024;

const THREAD_STACK: usize = 128 * 1024;

/// Binds `addr` (a failure here is a configuration error) and serves it on its own threads.
pub fn serve(addr: SocketAddr, phase: PhaseCell, metrics: Option<MetricsFn>) -> Result<SocketAddr> {
    serve_with(addr, phase, metrics, Limits::DEFAULT)
}

fn serve_with(
    addr: SocketAddr,
    phase: PhaseCell,
    metrics: Option<MetricsFn>,
    limits: Limits,
) -> Result<SocketAddr> {
    let listener =
        TcpListener::bind(addr).with_context(|| format!("listening on -stats-addr {addr}"))?;
    let bound = listener.local_addr().context("reading the stats address")?;
    std::thread::Builder::new()
        .name("stats".into())
        .stack_size(THREAD_STACK)
        .spawn(move || accept_loop(listener, phase, metrics, limits))
        .context("starting the stats thread")?;
    log::info!("stats endpoint on http://{bound} (/health, /ready, /metrics)");
    Ok(bound)
}

/// Accepts and hands each connection to a thread of its own, or refuses it when every slot is
/// taken. It never reads from a client itself, so no client can stop it accepting.
fn accept_loop(
    listener: TcpListener,
    phase: PhaseCell,
    metrics: Option<MetricsFn>,
    limits: Limits,
) {
    let active = Arc::new(AtomicUsize::new(0));
    for conn in listener.incoming() {
        let conn = match conn {
            Ok(conn) => conn,
            Err(e) => {
                // Out of descriptors, or a connection reset before it was accepted: pause a
                // little so a persistent error does not spin this thread.
                log::debug!("stats accept: {e}");
                std::thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        let Some(slot) = Slot::take(&active, limits.connections) else {
            refuse(conn);
            continue;
        };
        let (phase, metrics) = (phase.clone(), metrics.clone());
        let spawned = std::thread::Builder::new()
            .name("stats-conn".into())
            .stack_size(THREAD_STACK)
            .spawn(move || {
                let _slot = slot;
                if let Err(e) = answer(conn, &phase, metrics.as_ref(), limits) {
                    log::debug!("stats request: {e}");
                }
            });
        // A failed spawn drops the closure, hence the connection and its slot.
        if let Err(e) = spawned {
            log::warn!("stats: starting a connection thread: {e}");
        }
    }
}

/// One of `Limits::connections`; given back when the connection's thread ends.
struct Slot(Arc<AtomicUsize>);

impl Slot {
    fn take(active: &Arc<AtomicUsize>, cap: usize) -> Option<Slot> {
        active
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < cap).then_some(n + 1)
            })
            .ok()
            .map(|_| Slot(active.clone()))
    }
}

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Over the cap: one non-blocking attempt at a 503 (a new socket's send buffer has room for
/// it), then closed, so the accept thread never waits on this client.
fn refuse(conn: TcpStream) {
    log::debug!("stats: every connection slot is taken; refusing a client");
    if conn.set_nonblocking(true).is_ok() {
        let _ = (&conn).write(&Response::text(503, "busy\n").bytes());
    }
    let _ = conn.shutdown(Shutdown::Write);
}

fn answer(
    conn: TcpStream,
    phase: &PhaseCell,
    metrics: Option<&MetricsFn>,
    limits: Limits,
) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut reader = Deadlined::new(&conn, limits.head_time);
    let response = match read_head(&mut reader, limits.head_bytes, &mut head)? {
        Head::Complete(end) => route(&head[..end], phase, metrics),
        Head::TooLarge => Response::text(431, "request head too large\n"),
        // The client went away before asking anything.
        Head::Closed => return Ok(()),
    };
    Deadlined::new(&conn, limits.write_time).write_all(&response.bytes())?;
    conn.shutdown(Shutdown::Write)?;
    // Drop what the client may still send (the rest of an oversized head, a body) for a
    // bounded time and amount, into a fixed buffer.
    let mut sink = [0u8; 4096];
    let mut linger = Deadlined::new(&conn, LINGER_TIME);
    let mut dropped = 0;
    while dropped < LINGER_BYTES {
        match linger.read(&mut sink) {
            Ok(0) | Err(_) => break,
            Ok(n) => dropped += n,
        }
    }
    Ok(())
}

/// A connection whose reads and writes all end by one deadline, however the client paces its
/// bytes: every call gets only the time left, so a client sending a byte just before each
/// timeout cannot extend it.
struct Deadlined<'a> {
    conn: &'a TcpStream,
    deadline: Instant,
}

impl<'a> Deadlined<'a> {
    fn new(conn: &'a TcpStream, limit: Duration) -> Self {
        Deadlined {
            conn,
            deadline: Instant::now() + limit,
        }
    }

    fn left(&self) -> io::Result<Duration> {
        let left = self.deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "stats client out of time",
            ));
        }
        Ok(left)
    }
}

/// A socket timeout surfaces as `WouldBlock` on Unix; say what it is.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(io::ErrorKind::TimedOut, "stats client out of time")
    } else {
        e
    }
}

impl Read for Deadlined<'_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.conn.set_read_timeout(Some(self.left()?))?;
        self.conn.read(buf).map_err(timed_out)
    }
}

impl Write for Deadlined<'_> {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.conn.set_write_timeout(Some(self.left()?))?;
        self.conn.write(buf).map_err(timed_out)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Head {
    /// The head is `buf[..end]`, ending with its empty line.
    Complete(usize),
    /// `limit` bytes read without an empty line; nothing more was read.
    TooLarge,
    /// The client closed before the head was complete.
    Closed,
}

/// Reads into `buf` until the empty line that ends a request head, never past `limit` bytes
/// in all: the client decides how much it sends, not how much this keeps.
fn read_head(r: &mut impl Read, limit: usize, buf: &mut Vec<u8>) -> io::Result<Head> {
    const CHUNK: usize = 1024;
    let mut chunk = [0u8; CHUNK];
    loop {
        let room = limit.saturating_sub(buf.len());
        if room == 0 {
            return Ok(Head::TooLarge);
        }
        let n = match r.read(&mut chunk[..room.min(CHUNK)]) {
            Ok(0) => return Ok(Head::Closed),
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        // The empty line may straddle the previous chunk: look back three bytes.
        let from = buf.len().saturating_sub(3);
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = head_end(&buf[from..]) {
            return Ok(Head::Complete(from + end));
        }
    }
}

/// Where the first empty line (`\r\n` or a bare `\n`) ends, counted from the start of `bytes`.
fn head_end(bytes: &[u8]) -> Option<usize> {
    (0..bytes.len()).find_map(|i| match &bytes[i..] {
        [b'\n', b'\n', ..] => Some(i + 2),
        [b'\n', b'\r', b'\n', ..] => Some(i + 3),
        _ => None,
    })
}

fn route(head: &[u8], phase: &PhaseCell, metrics: Option<&MetricsFn>) -> Response {
    let line = head.split(|&b| b == b'\n').next().unwrap_or_default();
    let Ok(line) = std::str::from_utf8(line) else {
        return Response::text(400, "bad request line\n");
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Response::text(400, "bad request line\n");
    };
    if !version.starts_with("HTTP/1.") {
        return Response::text(400, "bad request line\n");
    }
    let head_only = match method {
        "GET" => false,
        "HEAD" => true,
        _ => return Response::text(405, "only GET and HEAD\n"),
    };
    let path = target.split('?').next().unwrap_or_default();
    let mut response = match path {
        "/health" => Response::text(200, "ok\n"),
        "/metrics" => match metrics {
            Some(m) => Response {
                content_type: "text/plain; version=0.0.4",
                ..Response::text(200, m())
            },
            None => Response::text(404, "not found\n"),
        },
        "/ready" => match phase.get() {
            Phase::Ready => Response::text(200, "ready\n"),
            p => Response::text(503, format!("not ready: {p}\n")),
        },
        _ => Response::text(404, "not found\n"),
    };
    response.head_only = head_only;
    response
}

struct Response {
    status: u16,
    content_type: &'static str,
    body: String,
    /// HEAD: the headers GET would get, without the body.
    head_only: bool,
}

impl Response {
    fn text(status: u16, body: impl Into<String>) -> Response {
        Response {
            status,
            content_type: "text/plain",
            body: body.into(),
            head_only: false,
        }
    }

    fn bytes(&self) -> Vec<u8> {
        let reason = match self.status {
            200 => "OK",
            400 => "Bad Request",
            404 => "Not Found",
            405 => "Method Not Allowed",
            431 => "Request Header Fields Too Large",
            503 => "Service Unavailable",
            _ => "",
        };
        let allow = if self.status == 405 {
            "Allow: GET, HEAD\r\n"
        } else {
            ""
        };
        let mut out = format!(
            "HTTP/1.1 {} {reason}\r\nContent-Type: {}\r\nContent-Length: {}\r\n{allow}Connection: close\r\n\r\n",
            self.status,
            self.content_type,
            self.body.len()
        )
        .into_bytes();
        if !self.head_only {
            out.extend_from_slice(self.body.as_bytes());
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc;

    /// Guards every wait in these tests against hanging forever; never a timing assertion.
    const GUARD: Duration = Duration::from_secs(30);

    fn start(phase: PhaseCell, metrics: Option<MetricsFn>, limits: Limits) -> SocketAddr {
        serve_with("127.0.0.1:0".parse().unwrap(), phase, metrics, limits).unwrap()
    }

    fn ready_server(limits: Limits) -> SocketAddr {
        let phase = PhaseCell::default();
        phase.set(Phase::Ready);
        start(phase, None, limits)
    }

    /// Everything the server sends until it closes (or resets after closing).
    fn read_all(s: &mut TcpStream) -> String {
        s.set_read_timeout(Some(GUARD)).unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            match s.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) if e.kind() == io::ErrorKind::ConnectionReset => break,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    panic!(
                        "the server neither answered nor closed within {GUARD:?} ({} bytes so far)",
                        out.len()
                    )
                }
                Err(e) => panic!("reading the answer ({} bytes so far): {e}", out.len()),
            }
        }
        String::from_utf8_lossy(&out).into_owned()
    }

    fn request(addr: SocketAddr, raw: impl AsRef<[u8]>) -> String {
        let mut s = TcpStream::connect(addr).unwrap();
        s.write_all(raw.as_ref()).unwrap();
        read_all(&mut s)
    }

    fn get(addr: SocketAddr, path: &str) -> String {
        request(addr, format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n"))
    }

    /// True while the server keeps `s` open: nothing to read yet, and no EOF.
    fn still_open(s: &TcpStream) -> bool {
        s.set_nonblocking(true).unwrap();
        let open =
            matches!((&*s).read(&mut [0u8; 1]), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        s.set_nonblocking(false).unwrap();
        open
    }

    #[test]
    fn ready_follows_the_phase() {
        let phase = PhaseCell::default();
        let metrics: MetricsFn = Arc::new(|| "hcc_ready 1\n".to_string());
        let addr = start(phase.clone(), Some(metrics), Limits::DEFAULT);
        assert!(get(addr, "/health").starts_with("HTTP/1.1 200"));
        assert!(get(addr, "/ready").starts_with("HTTP/1.1 503"));
        phase.set(Phase::Ready);
        assert!(get(addr, "/ready").starts_with("HTTP/1.1 200"));
        phase.set(Phase::Draining);
        let r = get(addr, "/ready");
        assert!(
            r.starts_with("HTTP/1.1 503") && r.contains("draining"),
            "{r}"
        );
        assert!(get(addr, "/nope").starts_with("HTTP/1.1 404"));
        assert!(get(addr, "/metrics").ends_with("hcc_ready 1\n"));
        assert!(get(addr, "/metrics?x=1").ends_with("hcc_ready 1\n"));
    }

    #[test]
    fn only_get_and_head_of_well_formed_requests() {
        let addr = ready_server(Limits::DEFAULT);
        let head = request(addr, "HEAD /ready HTTP/1.1\r\n\r\n");
        assert!(
            head.starts_with("HTTP/1.1 200") && head.contains("Content-Length: 6\r\n"),
            "{head}"
        );
        assert!(head.ends_with("\r\n\r\n"), "HEAD has no body: {head:?}");
        let post = request(addr, "POST /ready HTTP/1.1\r\nContent-Length: 0\r\n\r\n");
        assert!(
            post.starts_with("HTTP/1.1 405") && post.contains("Allow: GET, HEAD\r\n"),
            "{post}"
        );
        assert!(request(addr, "GET /ready\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(request(addr, "GET /ready SPDY/3\r\n\r\n").starts_with("HTTP/1.1 400"));
        assert!(request(addr, b"\xff\xfe\r\n\r\n").starts_with("HTTP/1.1 400"));
        // Bare newlines end the head too.
        assert!(request(addr, "GET /health HTTP/1.0\n\n").starts_with("HTTP/1.1 200"));
    }

    /// (a) Clients that connect and send nothing, or half a head, hold a slot each but not the
    /// endpoint: /ready is answered while they are all still connected.
    #[test]
    fn slow_clients_do_not_hold_back_ready() {
        let limits = Limits {
            // Longer than the test: the slow clients are certainly still connected.
            head_time: Duration::from_secs(120),
            ..Limits::DEFAULT
        };
        let addr = ready_server(limits);
        let mut slow = Vec::new();
        for i in 0..8 {
            let mut s = TcpStream::connect(addr).unwrap();
            if i % 2 == 1 {
                s.write_all(b"GET /ready HTTP/1.1\r\nHost").unwrap();
            }
            slow.push(s);
        }
        let answer = get(addr, "/ready");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        for (i, s) in slow.iter().enumerate() {
            assert!(still_open(s), "slow client {i} was closed");
        }
    }

    /// (a) A scrape that takes its time (HAProxy's exporter) does not hold back /ready.
    #[test]
    fn a_slow_scrape_does_not_hold_back_ready() {
        let phase = PhaseCell::default();
        phase.set(Phase::Ready);
        let (entered_tx, entered) = mpsc::channel();
        let (release, release_rx) = mpsc::channel::<()>();
        let release_rx = std::sync::Mutex::new(release_rx);
        let metrics: MetricsFn = Arc::new(move || {
            let _ = entered_tx.send(());
            // Until released, or until the test ends and drops the sender (also on failure).
            let _ = release_rx.lock().unwrap().recv();
            "scraped\n".to_string()
        });
        let addr = start(phase, Some(metrics), Limits::DEFAULT);
        let scrape = std::thread::spawn(move || get(addr, "/metrics"));
        entered.recv_timeout(GUARD).unwrap();
        let answer = get(addr, "/ready");
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        release.send(()).unwrap();
        assert!(scrape.join().unwrap().ends_with("scraped\n"));
    }

    /// (b) The reader keeps at most `limit` bytes of an endless head, and reads no more.
    #[test]
    fn an_endless_head_is_read_up_to_the_limit_only() {
        struct Endless(usize);
        impl Read for Endless {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                buf.fill(b'a');
                self.0 += buf.len();
                Ok(buf.len())
            }
        }
        let mut r = Endless(0);
        let mut buf = Vec::new();
        assert_eq!(read_head(&mut r, 8192, &mut buf).unwrap(), Head::TooLarge);
        assert_eq!((r.0, buf.len()), (8192, 8192));
        // A head that ends exactly at the limit is complete.
        let exact = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(100));
        let mut buf = Vec::new();
        let got = read_head(&mut exact.as_bytes(), exact.len(), &mut buf).unwrap();
        assert_eq!(got, Head::Complete(exact.len()));
        // The empty line found across reads of one byte each.
        struct Trickle<'a>(&'a [u8]);
        impl Read for Trickle<'_> {
            fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
                let Some((first, rest)) = self.0.split_first() else {
                    return Ok(0);
                };
                buf[0] = *first;
                self.0 = rest;
                Ok(1)
            }
        }
        let mut buf = Vec::new();
        let got = read_head(&mut Trickle(b"GET / HTTP/1.1\r\n\r\nbody"), 8192, &mut buf);
        assert_eq!(got.unwrap(), Head::Complete(18));
        let mut buf = Vec::new();
        let got = read_head(&mut Trickle(b"GET / HTTP/1.1\r\nX: y"), 8192, &mut buf);
        assert_eq!(got.unwrap(), Head::Closed);
    }

    /// (b) Over the wire: a client sending headers without end gets 431 and is closed while it
    /// is still sending; the server does not wait for (or keep) the rest.
    #[test]
    fn an_oversized_head_is_refused_and_closed() {
        let addr = ready_server(Limits::DEFAULT);
        let mut reader = TcpStream::connect(addr).unwrap();
        let mut writer = reader.try_clone().unwrap();
        writer.set_write_timeout(Some(GUARD)).unwrap();
        let sender = std::thread::spawn(move || -> io::Result<()> {
            writer.write_all(b"GET /ready HTTP/1.1\r\n")?;
            let line = format!("X-Pad: {}\r\n", "a".repeat(1000));
            loop {
                writer.write_all(line.as_bytes())?;
            }
        });
        let answer = read_all(&mut reader);
        assert!(answer.starts_with("HTTP/1.1 431"), "{answer:?}");
        // The endless sender stops only because the server closed the connection.
        let e = sender.join().unwrap().unwrap_err();
        assert!(
            !matches!(
                e.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            "the server kept the connection open: {e}"
        );
    }

    /// (c) A client silent past the time limit is closed; so is one that trickles its head a
    /// byte at a time, each within the limit but the whole beyond it.
    #[test]
    fn a_client_past_the_time_limit_is_closed() {
        let limits = Limits {
            head_time: Duration::from_millis(300),
            ..Limits::DEFAULT
        };
        let addr = ready_server(limits);
        let mut silent = TcpStream::connect(addr).unwrap();
        assert_eq!(read_all(&mut silent), "", "closed without an answer");

        let mut trickler = TcpStream::connect(addr).unwrap();
        let mut writer = trickler.try_clone().unwrap();
        let sender = std::thread::spawn(move || {
            let head = b"GET /ready HTTP/1.1\r\nX-Pad: ".iter();
            for b in head.chain(std::iter::repeat(&b'a')) {
                if writer.write_all(&[*b]).is_err() {
                    return;
                }
                // The pace of the client under test, well within the time limit per byte.
                std::thread::sleep(Duration::from_millis(20));
            }
        });
        assert_eq!(read_all(&mut trickler), "", "closed without an answer");
        sender.join().unwrap();
    }

    /// (d) Many clients at once are all answered.
    #[test]
    fn concurrent_clients_are_all_answered() {
        let addr = ready_server(Limits::DEFAULT);
        let n = 24;
        let together = Arc::new(std::sync::Barrier::new(n));
        let clients: Vec<_> = (0..n)
            .map(|_| {
                let together = together.clone();
                std::thread::spawn(move || {
                    let mut s = TcpStream::connect(addr).unwrap();
                    together.wait();
                    s.write_all(b"GET /ready HTTP/1.1\r\n\r\n").unwrap();
                    read_all(&mut s)
                })
            })
            .collect();
        for c in clients {
            let answer = c.join().unwrap();
            assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        }
    }

    /// Past the cap a new client is refused at once (not queued behind the stuck ones), and
    /// a freed slot serves again.
    #[test]
    fn over_the_cap_a_client_is_refused_at_once() {
        let limits = Limits {
            head_time: Duration::from_secs(120),
            connections: 4,
            ..Limits::DEFAULT
        };
        let addr = ready_server(limits);
        // Accepted in order, so these four hold every slot before the fifth is accepted.
        let mut held: Vec<_> = (0..4).map(|_| TcpStream::connect(addr).unwrap()).collect();
        let refused = get(addr, "/ready");
        assert!(refused.starts_with("HTTP/1.1 503"), "{refused}");
        assert!(held.iter().all(still_open));
        drop(held.pop());
        // The slot comes back once the server's thread sees the close; wait for that.
        let deadline = Instant::now() + GUARD;
        loop {
            let answer = get(addr, "/ready");
            if answer.starts_with("HTTP/1.1 200") {
                break;
            }
            assert!(Instant::now() < deadline, "no slot came back: {answer}");
            std::thread::yield_now();
        }
    }
}
