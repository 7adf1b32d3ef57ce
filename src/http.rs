//! The one HTTP client of the sidecar (ureq underneath), for the Consul agent and the Dataplane
//! API. It reaches a server over TCP, TLS or a unix socket, adds the credential header to every
//! request, and never treats a non-2xx status as a transport error: callers decide what a 404 or
//! a 409 means.
//!
//! A TCP connection also notices a peer that is cut off rather than stopped (network cut,
//! packets dropped, the host gone): nothing answers then, not even a reset, and a blocking
//! query would wait out its whole wait. Every TCP connection therefore probes an idle peer
//! (keepalive) and gives up on unacknowledged data (`TCP_USER_TIMEOUT`), so a dead peer fails
//! the request within `DEAD_PEER_AFTER`, and a connect within `CONNECT_TIMEOUT`. A live peer's
//! kernel answers the probes itself, so a long wait on a live server is not cut short.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::time::Duration;

use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, LazyBuffers, NextTimeout, RustlsConnector, Transport,
};

pub use crate::config::{Endpoint, Secret, TlsFiles};
use crate::error::{Context, Error, Result};

/// How long a TCP peer may leave the connection without any answer before it counts as dead:
/// after `KEEPALIVE_IDLE` of silence a probe, then one every `KEEPALIVE_INTERVAL`; Linux drops
/// the connection once `DEAD_PEER_AFTER` has passed since the last segment received with a
/// probe unanswered (`TCP_USER_TIMEOUT` decides over the probe count when both are set), and
/// likewise when sent data stays unacknowledged that long. At rest the peer is probed every
/// `KEEPALIVE_IDLE` (a bare segment its kernel answers; no HTTP request), so its last answer
/// is never more than `KEEPALIVE_IDLE` old when it is cut: a cut peer fails the request
/// `DEAD_PEER_AFTER - KEEPALIVE_IDLE` to `DEAD_PEER_AFTER` after the cut.
pub const DEAD_PEER_AFTER: Duration = Duration::from_secs(14);
const KEEPALIVE_IDLE: Duration = Duration::from_secs(5);
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(3);
/// Probes before giving up when the kernel ignores `TCP_USER_TIMEOUT`:
/// `KEEPALIVE_IDLE + KEEPALIVE_PROBES * KEEPALIVE_INTERVAL` = `DEAD_PEER_AFTER`.
const KEEPALIVE_PROBES: u32 = 3;
/// A connect that has no answer by then goes to a host that is not there: a server on a
/// reachable host answers (or refuses) within a round trip, two SYNs lost included.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

#[derive(Clone)]
pub enum Credential {
    None,
    /// `X-Consul-Token`.
    ConsulToken(Secret),
    /// HTTP basic auth, for the Dataplane API.
    Basic {
        user: String,
        password: Secret,
    },
}

pub struct Response {
    pub status: u16,
    pub body: String,
    headers: Vec<(String, String)>,
}

impl Response {
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
    pub fn is_success(&self) -> bool {
        (200..300).contains(&self.status)
    }
}

/// The system's resolver, or one address given in advance (`Client::pinned`).
#[derive(Debug)]
struct PinnedResolver(Option<SocketAddr>);

impl Resolver for PinnedResolver {
    fn resolve(
        &self,
        uri: &ureq::http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> std::result::Result<ResolvedSocketAddrs, ureq::Error> {
        match self.0 {
            Some(addr) => {
                let mut addrs = self.empty();
                addrs.push(addr);
                Ok(addrs)
            }
            None => DefaultResolver::default().resolve(uri, config, timeout),
        }
    }
}

#[derive(Clone)]
pub struct Client {
    agent: ureq::Agent,
    base: String,
    endpoint: Endpoint,
    credential: Credential,
}

impl fmt::Debug for Client {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Client")
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

impl Client {
    pub fn new(endpoint: Endpoint, tls: &TlsFiles, credential: Credential) -> Result<Client> {
        Client::pinned(endpoint, None, tls, credential)
    }

    /// A client of `endpoint` that connects to `pinned` when given, instead of what the
    /// endpoint's host resolves to; the URL, the Host header and TLS keep the endpoint's host.
    pub fn pinned(
        endpoint: Endpoint,
        pinned: Option<SocketAddr>,
        tls: &TlsFiles,
        credential: Credential,
    ) -> Result<Client> {
        let mut config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .user_agent(concat!(
                "haproxy-consul-connect/",
                env!("CARGO_PKG_VERSION")
            ))
            // Per-request timeouts are set by the callers (blocking queries need long ones).
            .timeout_global(Some(Duration::from_secs(30)));
        if let Endpoint::Https { .. } = endpoint {
            config = config.tls_config(tls_config(tls)?);
        }
        let config = config.build();
        let agent = match &endpoint {
            Endpoint::Unix { path } => ureq::Agent::with_parts(
                config,
                UnixConnector { path: path.clone() },
                DefaultResolver::default(),
            ),
            _ => ureq::Agent::with_parts(
                config,
                ().chain(TcpLivenessConnector)
                    .chain(RustlsConnector::default()),
                PinnedResolver(pinned),
            ),
        };
        Ok(Client {
            base: endpoint.base_url(),
            agent,
            endpoint,
            credential,
        })
    }

    pub fn get(&self, path_and_query: &str, timeout: Duration) -> Result<Response> {
        self.send("GET", path_and_query, None, timeout)
    }

    /// Sends one request. `body` is sent as JSON when given.
    pub fn send(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<Response> {
        self.send_typed(
            method,
            path_and_query,
            body.map(|b| (b, "application/json")),
            timeout,
        )
    }

    /// Sends one request with a body of the given content type.
    pub fn send_typed(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<(&str, &str)>,
        timeout: Duration,
    ) -> Result<Response> {
        self.exchange(method, path_and_query, body, timeout, &self.credential)
    }

    /// Sends one request (a JSON body when given) as the holder of `token`, whatever the
    /// client's own credential: for a token that changes during the run (an ACL login).
    pub fn send_as(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<&str>,
        timeout: Duration,
        token: Option<&Secret>,
    ) -> Result<Response> {
        let credential = match token {
            Some(t) => Credential::ConsulToken(t.clone()),
            None => Credential::None,
        };
        let body = body.map(|b| (b, "application/json"));
        self.exchange(method, path_and_query, body, timeout, &credential)
    }

    fn exchange(
        &self,
        method: &str,
        path_and_query: &str,
        body: Option<(&str, &str)>,
        timeout: Duration,
        credential: &Credential,
    ) -> Result<Response> {
        let url = format!("{}{}", self.base, path_and_query);
        let what = || format!("{method} {} at {}", path_and_query, self.endpoint);
        let mut req = ureq::http::Request::builder().method(method).uri(&url);
        match credential {
            Credential::None => {}
            Credential::ConsulToken(t) => req = req.header("X-Consul-Token", t.expose()),
            Credential::Basic { user, password } => {
                let raw = format!("{user}:{}", password.expose());
                req = req.header("Authorization", format!("Basic {}", base64(raw.as_bytes())));
            }
        }
        let result = if let Some((body, content_type)) = body {
            let req = req
                .header("Content-Type", content_type)
                .body(body.to_string())
                .with_context(what)?;
            let req = self
                .agent
                .configure_request(req)
                .timeout_global(Some(timeout))
                .build();
            self.agent.run(req)
        } else {
            let req = req.body(()).with_context(what)?;
            let req = self
                .agent
                .configure_request(req)
                .timeout_global(Some(timeout))
                .build();
            self.agent.run(req)
        };
        let mut resp = result.with_context(what)?;
        let status = resp.status().as_u16();
        let headers = resp
            .headers()
            .iter()
            .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
            .collect();
        let body = resp
            .body_mut()
            .with_config()
            .limit(64 * 1024 * 1024)
            .read_to_string()
            .with_context(|| format!("reading the body of {}", what()))?;
        Ok(Response {
            status,
            body,
            headers,
        })
    }
}

fn tls_config(files: &TlsFiles) -> Result<ureq::tls::TlsConfig> {
    use ureq::tls::{Certificate, ClientCert, PemItem, PrivateKey, RootCerts, TlsConfig};
    let mut builder = TlsConfig::builder().disable_verification(!files.verify);
    if let Some(path) = &files.ca_cert {
        let pem = std::fs::read(path)
            .with_context(|| format!("reading the Consul CA file {}", path.display()))?;
        let mut roots = Vec::new();
        for item in ureq::tls::parse_pem(&pem) {
            if let PemItem::Certificate(c) =
                item.with_context(|| format!("parsing the Consul CA file {}", path.display()))?
            {
                roots.push(c);
            }
        }
        if roots.is_empty() {
            return Err(Error::msg(format!(
                "the Consul CA file {} holds no certificate",
                path.display()
            )));
        }
        builder = builder.root_certs(RootCerts::new_with_certs(&roots));
    }
    match (&files.client_cert, &files.client_key) {
        (Some(cert), Some(key)) => {
            let cert_pem = std::fs::read(cert)
                .with_context(|| format!("reading the Consul client cert {}", cert.display()))?;
            let chain = ureq::tls::parse_pem(&cert_pem)
                .filter_map(|i| match i {
                    Ok(PemItem::Certificate(c)) => Some(c),
                    _ => None,
                })
                .collect::<Vec<Certificate<'static>>>();
            if chain.is_empty() {
                return Err(Error::msg(format!(
                    "the Consul client cert {} holds no certificate",
                    cert.display()
                )));
            }
            let key_pem = std::fs::read(key)
                .with_context(|| format!("reading the Consul client key {}", key.display()))?;
            let key = PrivateKey::from_pem(&key_pem)
                .with_context(|| format!("parsing the Consul client key {}", key.display()))?;
            builder = builder.client_cert(Some(ClientCert::new_with_certs(&chain, key)));
        }
        (None, None) => {}
        _ => {
            return Err(Error::msg(
                "CONSUL_CLIENT_CERT and CONSUL_CLIENT_KEY must be given together",
            ))
        }
    }
    Ok(builder.build())
}

/// Standard base64 with padding, for HTTP basic auth (one header, not worth a dependency).
pub fn base64(input: &[u8]) -> String {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(input.len().div_ceil(3) * 4);
    for chunk in input.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for (i, shift) in [18, 12, 6, 0].iter().enumerate() {
            if i <= chunk.len() {
                out.push(ALPHABET[((n >> shift) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Connects every request to one unix socket, whatever the URL's host says.
#[derive(Debug)]
struct UnixConnector {
    path: PathBuf,
}

impl Connector<()> for UnixConnector {
    type Out = StreamTransport<UnixStream>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> std::result::Result<Option<Self::Out>, ureq::Error> {
        let stream = UnixStream::connect(&self.path)?;
        Ok(Some(StreamTransport::new(stream, details)))
    }
}

/// Connects over TCP to the resolved addresses in turn, each connect bounded by
/// `CONNECT_TIMEOUT`, and arms the dead-peer detection (`DEAD_PEER_AFTER`) on the connection.
#[derive(Debug)]
struct TcpLivenessConnector;

impl Connector<()> for TcpLivenessConnector {
    type Out = StreamTransport<TcpStream>;

    fn connect(
        &self,
        details: &ConnectionDetails,
        _chained: Option<()>,
    ) -> std::result::Result<Option<Self::Out>, ureq::Error> {
        // The request's own remaining time still bounds the connect.
        let budget = details
            .timeout
            .not_zero()
            .map_or(CONNECT_TIMEOUT, |t| (*t).min(CONNECT_TIMEOUT));
        let mut last: Option<io::Error> = None;
        for addr in &details.addrs {
            match TcpStream::connect_timeout(addr, budget) {
                Ok(stream) => {
                    watch_liveness(&stream)?;
                    if details.config.no_delay() {
                        stream.set_nodelay(true)?;
                    }
                    return Ok(Some(StreamTransport::new(stream, details)));
                }
                Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                    last = Some(io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!("no answer from {addr} to a connect within {budget:?}"),
                    ));
                }
                Err(e) => last = Some(e),
            }
        }
        Err(ureq::Error::Io(last.unwrap_or_else(|| {
            io::Error::new(io::ErrorKind::AddrNotAvailable, "no address to connect to")
        })))
    }
}

/// Arms keepalive probes and `TCP_USER_TIMEOUT` on `stream` (see `DEAD_PEER_AFTER`).
fn watch_liveness(stream: &TcpStream) -> io::Result<()> {
    let socket = socket2::SockRef::from(stream);
    socket.set_tcp_keepalive(
        &socket2::TcpKeepalive::new()
            .with_time(KEEPALIVE_IDLE)
            .with_interval(KEEPALIVE_INTERVAL)
            .with_retries(KEEPALIVE_PROBES),
    )?;
    socket.set_tcp_user_timeout(Some(DEAD_PEER_AFTER))
}

/// What `StreamTransport` needs of a connected socket; all I/O goes through `&self`.
trait Stream: Send + Sync + 'static {
    fn read_into(&self, buf: &mut [u8]) -> io::Result<usize>;
    fn write_out(&self, buf: &[u8]) -> io::Result<()>;
    fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()>;
    fn set_nonblocking(&self, on: bool) -> io::Result<()>;
}

macro_rules! stream_impl {
    ($t:ty) => {
        impl Stream for $t {
            fn read_into(&self, buf: &mut [u8]) -> io::Result<usize> {
                (&*self).read(buf)
            }
            fn write_out(&self, buf: &[u8]) -> io::Result<()> {
                (&*self).write_all(buf)
            }
            fn set_read_timeout(&self, d: Option<Duration>) -> io::Result<()> {
                <$t>::set_read_timeout(self, d)
            }
            fn set_write_timeout(&self, d: Option<Duration>) -> io::Result<()> {
                <$t>::set_write_timeout(self, d)
            }
            fn set_nonblocking(&self, on: bool) -> io::Result<()> {
                <$t>::set_nonblocking(self, on)
            }
        }
    };
}
stream_impl!(UnixStream);
stream_impl!(TcpStream);

/// One connection for ureq: a unix or TCP socket and its buffers.
struct StreamTransport<S> {
    stream: S,
    buffers: LazyBuffers,
}

impl<S> StreamTransport<S> {
    fn new(stream: S, details: &ConnectionDetails) -> StreamTransport<S> {
        StreamTransport {
            stream,
            buffers: LazyBuffers::new(
                details.config.input_buffer_size(),
                details.config.output_buffer_size(),
            ),
        }
    }
}

impl<S> fmt::Debug for StreamTransport<S> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("StreamTransport")
    }
}

/// A socket timeout (`EAGAIN`) is the request's own time running out; `ETIMEDOUT` is the
/// kernel giving up on a peer that stopped answering (`DEAD_PEER_AFTER`), a failure of that
/// server, said so.
fn io_failure(e: io::Error, reason: ureq::Timeout) -> ureq::Error {
    match e.kind() {
        io::ErrorKind::WouldBlock => ureq::Error::Timeout(reason),
        io::ErrorKind::TimedOut => ureq::Error::Io(io::Error::new(
            io::ErrorKind::TimedOut,
            format!(
                "the peer answered nothing for {}s (cut off or down): {e}",
                DEAD_PEER_AFTER.as_secs()
            ),
        )),
        _ => ureq::Error::Io(e),
    }
}

impl<S: Stream> Transport for StreamTransport<S> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        &mut self.buffers
    }

    fn transmit_output(
        &mut self,
        amount: usize,
        timeout: NextTimeout,
    ) -> std::result::Result<(), ureq::Error> {
        let timeout = timeout.for_write();
        self.stream
            .set_write_timeout(timeout.not_zero().map(|d| *d))?;
        let output = &self.buffers.output()[..amount];
        self.stream
            .write_out(output)
            .map_err(|e| io_failure(e, timeout.reason))
    }

    fn await_input(&mut self, timeout: NextTimeout) -> std::result::Result<bool, ureq::Error> {
        let timeout = timeout.for_read();
        self.stream
            .set_read_timeout(timeout.not_zero().map(|d| *d))?;
        let input = self.buffers.input_append_buf();
        let amount = loop {
            match self.stream.read_into(input) {
                Ok(n) => break n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(io_failure(e, timeout.reason)),
            }
        };
        self.buffers.input_appended(amount);
        Ok(amount > 0)
    }

    fn is_open(&mut self) -> bool {
        // A pooled connection is probed before reuse: any byte or error means the peer closed
        // (or, over TCP, was given up on as dead).
        if self.stream.set_nonblocking(true).is_err() {
            return false;
        }
        let mut buf = [0u8; 1];
        let open = matches!(self.stream.read_into(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock);
        open && self.stream.set_nonblocking(false).is_ok()
    }
}

/// Percent-encodes one path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_consul_address_form() {
        assert_eq!(
            Endpoint::parse("127.0.0.1:8500"),
            Ok(Endpoint::Http {
                authority: "127.0.0.1:8500".into()
            })
        );
        assert_eq!(
            Endpoint::parse("https://consul.local:8501/"),
            Ok(Endpoint::Https {
                authority: "consul.local:8501".into()
            })
        );
        assert_eq!(
            Endpoint::parse("unix:///run/consul.sock"),
            Ok(Endpoint::Unix {
                path: "/run/consul.sock".into()
            })
        );
        assert!(Endpoint::parse("ftp://x:1").is_err());
        assert!(Endpoint::parse("unix://").is_err());
        assert!(Endpoint::parse("").is_err());
    }

    /// A client pinned to an address connects there, whatever its name resolves to (here:
    /// nothing), and still names the host it was given in the request.
    #[test]
    fn a_pinned_client_connects_to_its_address_and_keeps_the_name() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = server.local_addr().unwrap();
        let answer = std::thread::spawn(move || {
            let (mut conn, _) = server.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            conn.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nConnection: close\r\n\r\nok")
                .unwrap();
            String::from_utf8_lossy(&head).to_ascii_lowercase()
        });
        let endpoint = Endpoint::parse("consul.invalid:8500").unwrap();
        let client =
            Client::pinned(endpoint, Some(addr), &TlsFiles::default(), Credential::None).unwrap();
        let resp = client
            .get("/v1/status/leader", Duration::from_secs(5))
            .unwrap();
        assert_eq!((resp.status, resp.body.as_str()), (200, "ok"));
        let head = answer.join().unwrap();
        assert!(head.contains("host: consul.invalid:8500"), "{head}");
    }

    /// Every TCP connection is armed to notice a dead peer: keepalive after 5 s of silence,
    /// and the kernel giving up after `DEAD_PEER_AFTER` without an answer.
    #[test]
    fn a_tcp_connection_watches_its_peer() {
        let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let stream = TcpStream::connect(server.local_addr().unwrap()).unwrap();
        watch_liveness(&stream).unwrap();
        let socket = socket2::SockRef::from(&stream);
        assert!(socket.keepalive().unwrap());
        assert_eq!(socket.tcp_keepalive_time().unwrap(), KEEPALIVE_IDLE);
        assert_eq!(socket.tcp_keepalive_interval().unwrap(), KEEPALIVE_INTERVAL);
        assert_eq!(socket.tcp_keepalive_retries().unwrap(), KEEPALIVE_PROBES);
        assert_eq!(socket.tcp_user_timeout().unwrap(), Some(DEAD_PEER_AFTER));
        assert_eq!(
            KEEPALIVE_IDLE + KEEPALIVE_INTERVAL * KEEPALIVE_PROBES,
            DEAD_PEER_AFTER
        );
    }

    #[test]
    fn base64_matches_rfc4648_vectors() {
        for (raw, enc) in [
            ("", ""),
            ("f", "Zg=="),
            ("fo", "Zm8="),
            ("foo", "Zm9v"),
            ("foob", "Zm9vYg=="),
            ("fooba", "Zm9vYmE="),
            ("foobar", "Zm9vYmFy"),
        ] {
            assert_eq!(base64(raw.as_bytes()), enc);
        }
    }

    #[test]
    fn secrets_never_print() {
        let s = Secret::new("hunter2");
        assert!(!format!("{s:?}").contains("hunter2"));
    }
}
