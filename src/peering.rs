//! Dialing a cluster peer's service: the sidecar originates the mesh TLS itself.
//!
//! HAProxy (2.6, 3.0 and 3.2 alike) checks a server certificate's names against the SNI it
//! sends, and a peer's mesh gateway needs an SNI that a Consul 1.16 leaf (SPIFFE URI SAN only)
//! never carries, so HAProxy cannot both send that SNI and verify the peer. For an upstream with
//! `DestinationPeer`, HAProxy's listener and backend stay as for any upstream, but its server is
//! a plain TCP address on loopback where a `Forwarder` of this module listens: for each
//! connection it picks a gateway instance Consul lists for the peer, completes the mTLS
//! handshake with the sidecar's leaf and the peer's SNI, and pipes bytes both ways.
//!
//! The pure part is `Target` (what one peered upstream must reach and prove, parsed from
//! `/v1/peering/<peer>` and `/v1/health/connect/<service>?peer=<peer>`); the effects are the
//! `Forwarder` (a thread accepting, a thread per connection up to a cap).
//! **Invariant:** a connection's bytes reach the peer only after the server proved, in this
//! handshake, a certificate chaining to one of that peer's CAs (and no other root) whose first URI
//! SAN is exactly the exported service's SPIFFE ID, trust domain included; any failure closes the
//! client connection (fails closed).
//!
//! Why threads, not a tokio runtime: no async TLS crate is in the tree (tokio-rustls would be a
//! new download), rustls's blocking API with one `poll(2)` over both sockets keeps a connection
//! to one thread, and peered upstreams carry a sidecar's own outbound calls, so the cap
//! (`MAX_CONNECTIONS` per upstream) bounds the threads.
//!
//! Wiring: `consul::kinds` reads the two answers (`Watch::Peering`, `Watch::PeerInstances`),
//! the model builds each peered upstream's `Target` and points its server at the forwarder of
//! its `PeerKey`, and the supervisor keeps one `Forwarder` per key (`Forwarders::sync`),
//! whose addresses it hands back to the snapshot.

use std::collections::BTreeMap;
use std::io::{self, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{ClientConnection, DigitallySignedStruct, SignatureScheme};
use serde::Deserialize;

use crate::admission::probe::Credentials;
use crate::error::{Context, Error, Result};
use crate::pki::{Roots, SpiffeId};
use crate::value::Address;

/// Connections one peered upstream carries at once; the next is closed at accept.
pub const MAX_CONNECTIONS: usize = 512;
/// How long a gateway may take to accept the TCP connection and complete the handshake.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(5);

/// One service of one cluster peer: what a peered upstream dials, and the key of its watch
/// and of its forwarder.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct PeerKey {
    pub peer: String,
    pub service: String,
}

impl std::fmt::Display for PeerKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "service {} of peer {}", self.service, self.peer)
    }
}

/// `/v1/peering/<peer>`: what the dialing and the exporting side need of it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Peering {
    #[serde(default, rename = "PeerCAPems")]
    pub peer_ca_pems: Option<Vec<String>>,
    #[serde(default)]
    pub state: Option<String>,
    /// `server.<datacenter>.peering.<trust domain>`, on the side that dialed the peering only.
    #[serde(default)]
    pub peer_server_name: Option<String>,
}

impl Peering {
    /// The peer's trust domain: the URI SAN (`spiffe://<trust domain>`) of its first CA that
    /// has one, which both sides of a peering hold, else `PeerServerName`'s tail, which only
    /// the dialing side has.
    pub fn trust_domain(&self) -> Option<String> {
        let from_ca = self.peer_ca_pems.iter().flatten().find_map(|pem| {
            let (_, pem) = x509_parser::pem::parse_x509_pem(pem.as_bytes()).ok()?;
            let cert = pem.parse_x509().ok()?;
            let san = cert.subject_alternative_name().ok()??;
            san.value.general_names.iter().find_map(|n| match n {
                x509_parser::extensions::GeneralName::URI(u) => u
                    .strip_prefix("spiffe://")
                    .map(|td| td.trim_end_matches('/').to_string())
                    .filter(|td| !td.is_empty() && !td.contains('/')),
                _ => None,
            })
        });
        from_ca.or_else(|| {
            let name = self.peer_server_name.as_deref()?;
            let (_, td) = name.split_once(".peering.")?;
            (!td.is_empty()).then(|| td.to_string())
        })
    }

    /// The peer's CA roots as one PEM text; empty when it lists none.
    pub fn ca_pem(&self) -> String {
        let pems = self.peer_ca_pems.as_deref().unwrap_or_default();
        pems.iter().map(|p| format!("{}\n", p.trim())).collect()
    }
}

/// One entry of `/v1/health/connect/<service>?peer=<peer>`: a gateway of the peer, carrying the
/// exported service's SNI and SPIFFE ID in `Service.Connect.PeerMeta`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct PeerInstance {
    #[serde(default)]
    pub service: PeerService,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct PeerService {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub connect: Option<PeerConnect>,
    #[serde(default)]
    pub tagged_addresses: Option<std::collections::BTreeMap<String, Tagged>>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Tagged {
    #[serde(default)]
    pub address: Option<String>,
    #[serde(default)]
    pub port: u16,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct PeerConnect {
    #[serde(default)]
    pub peer_meta: Option<PeerMeta>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct PeerMeta {
    #[serde(default, rename = "SNI")]
    pub sni: Option<Vec<String>>,
    #[serde(default, rename = "SpiffeID")]
    pub spiffe_id: Option<Vec<String>>,
}

/// What one peered upstream must reach and prove. Made only by `Target::from_consul`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The SNI the peer's gateway routes by (`<svc>.<ns>.<partition>.<peer>.external.<td>`).
    pub sni: String,
    /// The exported service's identity in the peer's trust domain; compared whole.
    pub identity: SpiffeId,
    /// The peer's CA roots, PEM: the only roots this upstream trusts.
    pub ca_pem: String,
    /// The gateways Consul lists for the service (IP and port), in Consul's order.
    pub gateways: Vec<(Address, u16)>,
    /// What the forwarder offers in ALPN; the model sets it from the upstream's protocol.
    pub alpn: Alpn,
}

/// The application protocol HAProxy speaks over the plain hop to the forwarder, offered to
/// the peer's sidecar in ALPN so that its public listener speaks the same (HTTP/2 for gRPC).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Alpn {
    /// Opaque TCP: nothing offered, as HAProxy offers nothing on a tcp upstream's server.
    #[default]
    None,
    Http1,
    H2,
}

impl Alpn {
    fn protocols(self) -> Vec<Vec<u8>> {
        match self {
            Alpn::None => Vec::new(),
            Alpn::Http1 => vec![b"http/1.1".to_vec()],
            Alpn::H2 => vec![b"h2".to_vec()],
        }
    }
}

impl Target {
    /// From the peering and the peered service's instances. Refuses (with why) what cannot be
    /// dialed safely: no CA, no active peering, no SNI or SPIFFE ID, an identity that is not
    /// `service`'s, or instances that disagree. An instance with a bad address is dropped
    /// with a warning; none left is a refusal.
    pub fn from_consul(
        service: &str,
        peering: &Peering,
        instances: &[PeerInstance],
        warnings: &mut Vec<String>,
    ) -> Result<Target> {
        let pems = peering.peer_ca_pems.as_deref().unwrap_or_default();
        if pems.is_empty() {
            return Err(Error::msg("the peering lists no CA (PeerCAPems)"));
        }
        if let Some(state) = peering.state.as_deref().filter(|s| *s != "ACTIVE") {
            return Err(Error::msg(format!("the peering is {state:?}, not ACTIVE")));
        }
        let ca_pem = peering.ca_pem();
        Roots::from_pem(&ca_pem).context("the peer's CA does not parse")?;
        let mut meta: Option<(String, String)> = None;
        let mut gateways = Vec::new();
        for i in instances {
            let s = &i.service;
            let Some(m) = s.connect.as_ref().and_then(|c| c.peer_meta.as_ref()) else {
                return Err(Error::msg("a peered instance has no PeerMeta"));
            };
            let sni = m.sni.as_ref().and_then(|v| v.first()).cloned();
            // Consul lists the service's ID and the exporting gateway's; only the service's is
            // accepted (the gateway never terminates the mesh TLS).
            let id = m.spiffe_id.iter().flatten().find(|id| {
                SpiffeId::parse(id).is_ok_and(|i| i.service.eq_ignore_ascii_case(service))
            });
            let (Some(sni), Some(id)) = (sni, id.cloned()) else {
                return Err(Error::msg(format!(
                    "a peered instance's PeerMeta lacks its SNI or a SpiffeID of service {service:?}"
                )));
            };
            match &meta {
                None => meta = Some((sni, id)),
                Some(seen) if *seen != (sni.clone(), id.clone()) => {
                    return Err(Error::msg(format!(
                        "the peered instances disagree on SNI and identity ({seen:?} and {:?})",
                        (sni, id)
                    )))
                }
                Some(_) => {}
            }
            // The gateway's WAN address when it has one, as Consul's own proxies dial a peer
            // (`BestAddress(true)`: the service's `wan` tagged address first).
            let wan = s.tagged_addresses.as_ref().and_then(|t| t.get("wan"));
            let (address, port) = match wan {
                Some(t) if t.address.as_deref().is_some_and(|a| !a.is_empty()) => {
                    (t.address.as_deref().unwrap_or_default(), t.port)
                }
                _ => (s.address.as_deref().unwrap_or_default(), s.port),
            };
            match Address::parse_ip("peered instance address", address) {
                Ok(a) if port != 0 => gateways.push((a, port)),
                Ok(_) => warnings.push(format!("peered instance {address}: port 0; dropping it")),
                Err(e) => warnings.push(format!("{e}; dropping that instance")),
            }
        }
        let Some((sni, id)) = meta else {
            return Err(Error::msg(
                "the peer lists no instance (no mesh gateway there?)",
            ));
        };
        ServerName::try_from(sni.clone())
            .ok()
            .filter(|n| matches!(n, ServerName::DnsName(_)))
            .ok_or_else(|| Error::msg(format!("SNI {sni:?} is no DNS name")))?;
        let identity =
            SpiffeId::parse(&id).map_err(|e| Error::msg(format!("SpiffeID {id:?}: {e}")))?;
        if !identity.service.eq_ignore_ascii_case(service) {
            return Err(Error::msg(format!(
                "SpiffeID {id:?} is not service {service:?}'s"
            )));
        }
        if gateways.is_empty() {
            return Err(Error::msg("no peered instance has a usable address"));
        }
        Ok(Target {
            sni,
            identity,
            ca_pem,
            gateways,
            alpn: Alpn::None,
        })
    }
}

/// Judges the server of one handshake: chain to the peer's CA, then the exact identity.
#[derive(Debug)]
struct PeerVerifier {
    roots: Roots,
    expected: SpiffeId,
    provider: Arc<CryptoProvider>,
}

impl PeerVerifier {
    fn judge(&self, der: &[u8], intermediates: &[&[u8]], now: std::time::SystemTime) -> Result<()> {
        let (uri, id) = self
            .roots
            .certify_server(der, intermediates, now)
            .map_err(|(why, uri)| Error::msg(format!("{} ({why})", uri.unwrap_or_default())))?;
        // The SPIFFE path as the identity checker compares it, and the trust domain too: a
        // peer's leaves carry its own, which our CA never signs for.
        let e = &self.expected;
        let same = e.trust_domain.eq_ignore_ascii_case(&id.trust_domain)
            && crate::admission::Identity::of(e).matches(&id);
        if same {
            Ok(())
        } else {
            Err(Error::msg(uri))
        }
    }
}

impl ServerCertVerifier for PeerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        let intermediates: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
        self.judge(end_entity.as_ref(), &intermediates, crate::clock::now())
            .map(|()| ServerCertVerified::assertion())
            .map_err(|presented| {
                rustls::Error::General(format!("the peer's server presented {presented}"))
            })
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls12_signature(message, cert, dss, algs)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        let algs = &self.provider.signature_verification_algorithms;
        rustls::crypto::verify_tls13_signature(message, cert, dss, algs)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

/// What a connection needs, swapped whole when the target or the leaf changes.
pub struct Dial {
    pub target: Target,
    pub credentials: Credentials,
}

/// The dial of a forwarder with no target (peering not active, no gateway listed): none, so
/// every connection is closed at accept.
type Current = Arc<RwLock<Option<Arc<Dial>>>>;

/// One peered upstream's local forwarder. Dropping it stops accepting; connections in flight
/// finish on their own threads.
pub struct Forwarder {
    address: SocketAddr,
    dial: Current,
    stop: Arc<AtomicBool>,
}

impl Forwarder {
    /// Listens on `listen` (a loopback address; port 0 picks one) and serves `dial`; with none,
    /// it closes every connection until `update` gives one.
    pub fn start(listen: SocketAddr, dial: Option<Dial>) -> io::Result<Forwarder> {
        let listener = TcpListener::bind(listen)?;
        let address = listener.local_addr()?;
        let dial = Arc::new(RwLock::new(dial.map(Arc::new)));
        let stop = Arc::new(AtomicBool::new(false));
        let (d, s) = (dial.clone(), stop.clone());
        std::thread::Builder::new()
            .name(format!("peer-fwd-{}", address.port()))
            .spawn(move || accept_loop(listener, d, s))?;
        Ok(Forwarder {
            address,
            dial,
            stop,
        })
    }

    /// Where HAProxy's server for this upstream points.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// New connections use `dial` (none: closed); connections in flight keep the one they
    /// started with.
    pub fn update(&self, dial: Option<Dial>) {
        if let Ok(mut d) = self.dial.write() {
            *d = dial.map(Arc::new);
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wake the accept loop so that it sees the flag.
        let _ = TcpStream::connect_timeout(&self.address, Duration::from_millis(200));
    }
}

/// The supervisor's forwarders, one per peered service the desired state dials.
#[derive(Default)]
pub struct Forwarders {
    running: BTreeMap<PeerKey, (Forwarder, Option<Target>, String)>,
}

impl Forwarders {
    /// Makes the running forwarders those `wanted` names: starts the new ones on loopback,
    /// stops the gone ones, and gives each its target and `leaf_pem` (the sidecar's leaf, the
    /// client certificate) when either changed. Returns every forwarder's address.
    pub fn sync(
        &mut self,
        wanted: &BTreeMap<PeerKey, Option<Target>>,
        leaf_pem: &str,
    ) -> BTreeMap<PeerKey, SocketAddr> {
        self.running.retain(|k, _| {
            let keep = wanted.contains_key(k);
            if !keep {
                log::info!("peered upstream {k}: forwarder stopped");
            }
            keep
        });
        for (key, target) in wanted {
            let dial = || -> Option<Dial> {
                let target = target.clone()?;
                match Credentials::from_pem(leaf_pem) {
                    Ok(credentials) => Some(Dial {
                        target,
                        credentials,
                    }),
                    Err(e) => {
                        log::error!("peered upstream {key}: the leaf cannot be used ({e}); its connections are closed");
                        None
                    }
                }
            };
            match self.running.get_mut(key) {
                Some((f, t, leaf)) => {
                    if t != target || leaf != leaf_pem {
                        f.update(dial());
                        *t = target.clone();
                        *leaf = leaf_pem.to_string();
                        log::info!("peered upstream {key}: forwarder updated");
                    }
                }
                None => {
                    let loopback = SocketAddr::from((std::net::Ipv4Addr::LOCALHOST, 0));
                    match Forwarder::start(loopback, dial()) {
                        Ok(f) => {
                            log::info!(
                                "peered upstream {key}: forwarder listening on {}",
                                f.address()
                            );
                            self.running
                                .insert(key.clone(), (f, target.clone(), leaf_pem.to_string()));
                        }
                        Err(e) => log::error!(
                            "peered upstream {key}: cannot start its forwarder ({e}); its listener refuses connections"
                        ),
                    }
                }
            }
        }
        self.running
            .iter()
            .map(|(k, (f, _, _))| (k.clone(), f.address()))
            .collect()
    }
}

fn accept_loop(listener: TcpListener, dial: Current, stop: Arc<AtomicBool>) {
    let live = Arc::new(AtomicUsize::new(0));
    let next = Arc::new(AtomicUsize::new(0));
    // A client retrying against a failing peer would log each failure: a warning only when
    // the reason differs from the last one, the repeats at debug.
    let last_failure = Arc::new(std::sync::Mutex::new(String::new()));
    for client in listener.incoming() {
        if stop.load(Ordering::SeqCst) {
            return;
        }
        let Ok(client) = client else { continue };
        if live.fetch_add(1, Ordering::SeqCst) >= MAX_CONNECTIONS {
            live.fetch_sub(1, Ordering::SeqCst);
            log::warn!(
                "peered upstream: {MAX_CONNECTIONS} connections already open; closing a new one"
            );
            continue;
        }
        // No target: the client is closed (dropped) here, fail closed.
        let Some(current) = dial.read().ok().and_then(|d| d.clone()) else {
            live.fetch_sub(1, Ordering::SeqCst);
            continue;
        };
        let (live2, pick) = (live.clone(), next.fetch_add(1, Ordering::Relaxed));
        let last = last_failure.clone();
        let spawned = std::thread::Builder::new()
            .name("peer-conn".into())
            .spawn(move || {
                if let Err(e) = serve(client, &current, pick) {
                    let line = format!("peered upstream {}: {e}", current.target.identity_uri());
                    match last.lock() {
                        Ok(l) if *l == line => log::debug!("{line}"),
                        Ok(mut l) => {
                            log::warn!("{line}");
                            *l = line;
                        }
                        Err(_) => log::warn!("{line}"),
                    }
                }
                live2.fetch_sub(1, Ordering::SeqCst);
            });
        if spawned.is_err() {
            live.fetch_sub(1, Ordering::SeqCst);
        }
    }
}

impl Target {
    fn identity_uri(&self) -> String {
        let i = &self.identity;
        let ap = match i.partition.as_deref() {
            Some(p) if p != crate::admission::DEFAULT => format!("/ap/{p}"),
            _ => String::new(),
        };
        format!(
            "spiffe://{}{ap}/ns/{}/dc/{}/svc/{}",
            i.trust_domain, i.namespace, i.datacenter, i.service
        )
    }
}

/// One connection: connect to a gateway (starting at `pick`, round robin), handshake, pipe.
/// Any error closes `client` (it is dropped).
fn serve(client: TcpStream, dial: &Dial, pick: usize) -> Result<()> {
    let t = &dial.target;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let roots = Roots::from_pem(&t.ca_pem).map_err(|e| Error::with_source("the peer's CA", e))?;
    let verifier = Arc::new(PeerVerifier {
        roots,
        expected: t.identity.clone(),
        provider: provider.clone(),
    });
    let mut config = dial
        .credentials
        .client_config(provider, verifier)
        .context("the TLS client")?;
    config.alpn_protocols = t.alpn.protocols();
    let name = ServerName::try_from(t.sni.clone()).context("SNI")?;
    let mut tls = ClientConnection::new(Arc::new(config), name).context("the TLS client")?;
    let n = t.gateways.len();
    let mut last = String::from("no gateway");
    let mut sock = None;
    for k in 0..n {
        let (a, port) = &t.gateways[(pick + k) % n];
        let ip: std::net::IpAddr = a
            .to_string()
            .parse()
            .map_err(|_| Error::msg(format!("gateway address {a} is no IP")))?;
        let addr = SocketAddr::new(ip, *port);
        match TcpStream::connect_timeout(&addr, HANDSHAKE_TIMEOUT) {
            Ok(s) => {
                sock = Some(s);
                break;
            }
            Err(e) => last = format!("{addr}: {e}"),
        }
    }
    let mut sock = sock.ok_or_else(|| Error::msg(format!("no gateway answers ({last})")))?;
    let deadline = Instant::now() + HANDSHAKE_TIMEOUT;
    while tls.is_handshaking() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Error::msg("the handshake timed out"))?;
        sock.set_read_timeout(Some(left)).context("the handshake")?;
        sock.set_write_timeout(Some(left))
            .context("the handshake")?;
        tls.complete_io(&mut sock).context("handshake refused")?;
    }
    sock.set_read_timeout(None).context("after the handshake")?;
    sock.set_write_timeout(None)
        .context("after the handshake")?;
    pipe(client, sock, tls).context("piping")
}

/// Bytes both ways until either side ends: `poll(2)` over both sockets, so that neither read
/// ever blocks while the other side has data.
fn pipe(mut client: TcpStream, mut sock: TcpStream, mut tls: ClientConnection) -> io::Result<()> {
    use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
    let mut buf = vec![0u8; 16 * 1024];
    let mut client_open = true;
    loop {
        while tls.wants_write() {
            tls.write_tls(&mut sock)?;
        }
        let (client_ready, sock_ready) = {
            let mut fds = vec![PollFd::new(sock.as_fd(), PollFlags::POLLIN)];
            if client_open {
                fds.push(PollFd::new(client.as_fd(), PollFlags::POLLIN));
            }
            poll(&mut fds, PollTimeout::NONE).map_err(io::Error::from)?;
            let ready = |f: &PollFd| f.revents().is_some_and(|r| !r.is_empty());
            (fds.get(1).is_some_and(ready), ready(&fds[0]))
        };
        if client_ready {
            let n = client.read(&mut buf)?;
            if n == 0 {
                client_open = false;
                tls.send_close_notify();
            } else {
                tls.writer().write_all(&buf[..n])?;
            }
        }
        if sock_ready {
            if tls.read_tls(&mut sock)? == 0 {
                return Ok(());
            }
            let state = tls
                .process_new_packets()
                .map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))?;
            let mut plain = state.plaintext_bytes_to_read();
            while plain > 0 {
                let want = plain.min(buf.len());
                let n = tls.reader().read(&mut buf[..want])?;
                client.write_all(&buf[..n])?;
                plain -= n;
            }
            if state.peer_has_closed() {
                let _ = client.shutdown(Shutdown::Write);
                if !client_open {
                    return Ok(());
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
