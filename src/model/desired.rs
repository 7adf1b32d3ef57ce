//! What `Desired` is: the listeners, slots, servers and TLS material one sidecar wants, and
//! the questions the rest of the crate asks of it. Built by `model::build`.

use super::*;

/// Where one sidecar keeps its files and sockets: a directory of its own.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Paths {
    pub workdir: PathBuf,
    pub haproxy_cfg: PathBuf,
    pub stats_socket: PathBuf,
    pub master_socket: PathBuf,
    pub dataplane_socket: PathBuf,
    pub transactions: PathBuf,
    pub leaf: PathBuf,
    /// Our own cluster's CA roots: the `ca-file` of every connection this sidecar makes.
    pub roots: PathBuf,
    /// The public listener's `ca-file`: our roots and the CAs of the peers our service is
    /// exported to. A file of its own, so that a peer's CA never vouches for a local upstream.
    pub public_roots: PathBuf,
    pub spoe_conf: PathBuf,
    pub spoe_socket: PathBuf,
    /// HAProxy's Prometheus exporter, reached only by the sidecar's /metrics.
    pub metrics_socket: PathBuf,
    /// The splitters' thresholds (`objects::split_thresholds`), a map HAProxy reads per
    /// request, so that new weights go live through `set map` without a reload.
    pub splits_map: PathBuf,
    /// The intentions agent's fast map of L7 decisions (`AuthzTable::fast_map`), replaced live
    /// through `prepare map`/`commit map` when the intentions change.
    pub intentions_map: PathBuf,
    /// A mesh gateway's SNI map (`sni backend` per line), which its listeners route by.
    pub gateway_map: PathBuf,
    /// Transparent mode's outbound routes (virtual IP → backend), replaced live through
    /// `prepare map`/`commit map` when services come and go.
    pub transparent_map: PathBuf,
    /// `MutualTLSMode: permissive`: the public listener's own sockets, behind the listener
    /// that tells a TLS hello from plaintext on the public port (`objects::permissive_sections`).
    pub public_tls_socket: PathBuf,
    pub public_plain_socket: PathBuf,
}

impl Paths {
    pub fn new(workdir: &Path) -> Paths {
        Paths {
            workdir: workdir.to_path_buf(),
            haproxy_cfg: workdir.join("haproxy.cfg"),
            stats_socket: workdir.join("haproxy.sock"),
            master_socket: workdir.join("master.sock"),
            dataplane_socket: workdir.join("dataplane.sock"),
            transactions: workdir.join("dataplane-tx"),
            leaf: workdir.join("certs").join("leaf.pem"),
            roots: workdir.join("certs").join("roots.pem"),
            public_roots: workdir.join("certs").join("public-roots.pem"),
            spoe_conf: workdir.join("spoe.conf"),
            spoe_socket: workdir.join("spoe.sock"),
            metrics_socket: workdir.join("metrics.sock"),
            splits_map: workdir.join("splits.map"),
            intentions_map: workdir.join("intentions.map"),
            gateway_map: workdir.join("gateway.map"),
            transparent_map: workdir.join("transparent.map"),
            public_tls_socket: workdir.join("public-tls.sock"),
            public_plain_socket: workdir.join("public-plain.sock"),
        }
    }
}

/// Settings that come from the command line, not from Consul.
#[derive(Clone, Debug)]
pub struct Settings {
    pub paths: Paths,
    pub intentions: bool,
    pub knobs: Knobs,
    /// The HAProxy that will run, read from `haproxy -v` at start.
    pub haproxy: HaproxyVersion,
    /// Whether upstream endpoints must prove their identity (`crate::admission`) before their
    /// slot takes traffic.
    pub identity_check: bool,
    /// `-gateway mesh`: this process is a mesh gateway, not a sidecar.
    pub gateway: Option<MeshGateway>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mode {
    Tcp,
    Http,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Desired {
    /// The service this process serves: the sidecar's destination, or the gateway itself.
    pub service: String,
    /// A sidecar's public listener and local app; `None` for a mesh gateway, which has
    /// neither (only `gateway`).
    pub public: Option<Public>,
    /// Sorted by name.
    pub upstreams: Vec<UpstreamListener>,
    /// Plain listeners that each serve one path of the local app (`Proxy.Expose`); sorted by
    /// port.
    pub exposed: Vec<ExposedListener>,
    /// Transparent mode's outbound listener and its routes; `None` in the default mode.
    pub transparent: Option<transparent::Outbound>,
    pub tls: Tls,
    /// The `mesh` entry's TLS versions and ciphers, for the public listener and the upstream
    /// servers.
    pub mesh_tls: mesh::MeshTlsParams,
    pub intentions: bool,
    /// The fast map's entries (`(regex, value)` in lookup order) of the table the intentions
    /// agent decides from. Not built here (the model knows no intentions): the supervisor
    /// sets it from the agent's current table.
    pub intentions_map: Vec<(String, String)>,
    /// The headers accepted JWTs may change (`AuthzTable::jwt_headers`), which the public
    /// listener's rules name; set by the supervisor from the agent's table, like
    /// `intentions_map`.
    pub jwt_headers: crate::spoe::authz::JwtHeaders,
    pub knobs: Knobs,
    /// The listeners' `log-format` from `Proxy.AccessLogs`, when `-log-format` gives none.
    pub access_log: Option<access_logs::Formats>,
    /// `mode` of the SPOE agent's backend: `spop` from HAProxy 3.1, `tcp` before.
    pub spoe_backend_mode: &'static str,
    pub paths: Paths,
    /// What of the registration this sidecar does not serve, one line each; logged when a
    /// line first appears, not on every rebuild.
    pub warnings: Vec<String>,
    /// A mesh gateway's listeners and routes (`gateway`); `None` for a sidecar.
    pub gateway: Option<gateway::Gateway>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Public {
    pub bind_address: Address,
    pub bind_port: u16,
    pub mode: Mode,
    /// The app speaks HTTP/2 in clear text (h2c), as gRPC servers do: `protocol` http2 or grpc.
    pub h2: bool,
    pub app_address: Address,
    pub app_port: u16,
    pub connect_timeout_ms: Millis,
    /// The public frontend's `timeout client`; `None` keeps the defaults section's.
    pub client_timeout_ms: Option<Millis>,
    /// The local app's backend's `timeout server`; `None` keeps the defaults section's.
    pub server_timeout_ms: Option<Millis>,
    /// The public frontend's `maxconn` (`max_inbound_connections`).
    pub max_connections: Option<Limit>,
    /// `option forwardfor` on the local app's backend (http only).
    pub forwardfor: bool,
    /// The request header naming the calling service (`appname_header`, http only).
    pub app_header: Option<AppHeader>,
    /// `X-Forwarded-Client-Cert`, as Consul's Envoy sets it on an http public listener;
    /// `None` in tcp mode.
    pub xfcc: Option<Xfcc>,
    /// `MutualTLSMode: permissive`, allowed by the mesh entry: plaintext is accepted on the
    /// public port beside mTLS, and no intention applies to it.
    pub permissive: bool,
}

/// What an http public listener does with `X-Forwarded-Client-Cert`: whatever the client sent
/// is always removed; the header is set only from the client certificate HAProxy verified
/// (the hash) and the intentions agent read (the rest).
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Xfcc {
    /// This sidecar's own SPIFFE ID (`By`). `None`: the header is only removed, since no
    /// agent reads the certificate (no `-enable-intentions`) or our ID cannot be written.
    pub by: Option<Word>,
}

/// `appname_header`: the header the local app reads the calling service's name from.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct AppHeader {
    pub name: HeaderName,
    /// Whether the intentions agent tells HAProxy the caller's name (`sess.hcc.app`); without
    /// it the header is only removed, so a client can never set it itself.
    pub from_agent: bool,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UpstreamListener {
    /// The frontend's name; unique per listener address.
    pub name: String,
    /// The backend's name: `name` with `BACKEND_PREFIX`. HAProxy 3.2 warns, and 3.3 refuses, a
    /// backend named like a frontend.
    pub backend: String,
    pub destination: String,
    /// For a unix socket listener: its path, and `bind_port` is 0.
    pub bind_address: String,
    pub bind_port: u16,
    /// Set when the listener is a unix socket (`LocalBindSocketPath`).
    pub socket: Option<UnixSocket>,
    pub mode: Mode,
    /// The destination speaks HTTP/2 (`protocol` http2 or grpc): its servers are asked for h2
    /// by ALPN, so one client connection's requests go each to an instance of their own.
    pub h2: bool,
    pub connect_timeout_ms: Millis,
    /// `read_timeout`: the frontend's `timeout client` and the backend's (and, without a
    /// request timeout of their own, every chain target's) `timeout server`.
    pub read_timeout_ms: Option<Millis>,
    /// The backend's server slots, `s0`, `s1`, …: an instance keeps its slot while it lives,
    /// so churn changes slots in place (live, through the runtime API) instead of adding and
    /// removing servers (a reload).
    pub slots: Vec<Slot>,
    /// Who the backend's servers must prove to be: the destination service. `None` for a
    /// prepared query, whose instances each must be the service the query's answer lists them
    /// as (`Server::identity`).
    pub identity: Option<Identity>,
    /// The CN every server certificate must carry, checked by HAProxy on each connection
    /// (`verifyhost`): set only while every admitted instance presented its legacy CN (Consul
    /// before 1.11), since pinning a name a leaf does not carry would refuse it.
    pub verifyhost: Option<String>,
    /// The destination's discovery chain when it does more than reach the destination itself
    /// (see `chain`); `None` serves `slots` alone, as before chains were read.
    pub routing: Option<Routing>,
    /// An implicit upstream of transparent mode: no frontend of its own (the outbound
    /// listener routes to its backend by virtual IP); `bind_*` name the outbound listener.
    pub implicit: bool,
    /// `limits` of the upstream's config: each server's cap and the queue of every backend of
    /// this upstream (its own and each chain target's).
    pub limits: keys::Limits,
    /// `passive_health_check`: the errors that eject a server of this upstream's backends
    /// (its own and each chain target's) and for how long.
    pub passive: Option<keys::PassiveCheck>,
    /// A peered upstream (`DestinationPeer`): its server is the forwarder this names, in
    /// plain TCP (`peered`).
    #[serde(skip)]
    pub peer: Option<peered::PeerDial>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct UnixSocket {
    pub path: String,
    /// Octal permissions as HAProxy's `mode` takes them; `None` leaves HAProxy's default.
    pub mode: Option<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Slot {
    pub name: String,
    /// `None`: the slot is free and in maintenance.
    pub instance: Option<Server>,
}

/// One healthy instance of a destination: its sidecar's address.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Server {
    /// `<service instance id>.<node>`, unique in a datacenter.
    pub id: String,
    pub address: Address,
    pub port: u16,
    pub weight: u32,
    /// The identity the instance must prove.
    pub identity: Identity,
    pub admission: Admission,
}

/// Where an instance stands with the identity check; only an admitted one takes traffic.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Admission {
    /// The check is off (`-upstream-identity-check=false`).
    Unchecked,
    /// No check has completed yet.
    Unproven,
    /// It proved its identity; with the CN its certificate carried, if any.
    Proven { common_name: Option<String> },
    /// It presented another identity (or none); kept out of service.
    Refused,
}

impl Admission {
    pub fn admits(&self) -> bool {
        matches!(self, Admission::Unchecked | Admission::Proven { .. })
    }
}

impl Server {
    /// Whether the slot holding this instance may take traffic.
    pub fn in_service(&self) -> bool {
        self.admission.admits()
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint {
            address: self.address.to_string(),
            port: self.port,
            identity: self.identity.clone(),
        }
    }
}

/// Longest unix socket path HAProxy takes: `sun_path` is 108 bytes and HAProxy keeps room for
/// the `.<pid>.tmp` suffix it binds under before renaming.
pub const MAX_SOCKET_PATH: usize = 97;

/// What sets an upstream's backend name apart from its frontend's.
pub const BACKEND_PREFIX: &str = "be_";

/// Every backend starts with this many slots; most upstreams never need more.
pub const MIN_SLOTS: usize = 8;
/// A free slot's address: never used, HAProxy only needs a valid one.
pub const FREE_SLOT_ADDRESS: &str = "127.0.0.1";
pub const FREE_SLOT_PORT: u16 = 1;

/// HAProxy checks each upstream slot in service itself (a plain TCP connect to the instance's
/// sidecar, every `check_interval_ms`), so an instance whose host vanished leaves the rotation
/// within about three intervals, long before Consul notices (`tests/e2e/multi_host.rs`). The
/// shortest interval: a slot in service is checked at most this often.
pub const CHECK_MIN_INTERVAL_MS: u64 = 400;
/// The bound on checks per second per backend (steady state: a failing or down server is
/// checked at the same interval, so nothing adds to it), whatever its size.
pub const CHECKS_PER_SECOND: u64 = 250;

/// The check interval of every slot of a backend with `slots` slots: the shortest one while the
/// pool is small (up to 100 slots), then longer in proportion, so the backend never starts
/// more than `CHECKS_PER_SECOND` checks a second (slots in maintenance are not checked, so this
/// counts more than it must). It depends on the pool's size only, which changes in doublings,
/// so a slot's instance coming and going never changes it.
pub fn check_interval_ms(slots: usize) -> u64 {
    let slots = u64::try_from(slots).unwrap_or(u64::MAX);
    CHECK_MIN_INTERVAL_MS.max(slots.saturating_mul(1000).div_ceil(CHECKS_PER_SECOND))
}

impl UpstreamListener {
    #[cfg(test)]
    pub fn instances(&self) -> impl Iterator<Item = &Server> {
        self.slots.iter().filter_map(|s| s.instance.as_ref())
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Tls {
    /// Leaf chain then private key, as HAProxy's `crt` wants it.
    pub leaf_pem: String,
    /// What the public listener trusts (`Paths::public_roots`): every CA root of ours, active
    /// or not, so that clients on either side of a rotation are trusted, and for a sidecar
    /// whose service is exported to cluster peers, their CAs too.
    pub roots_pem: String,
    /// Our own cluster's roots only (`Paths::roots`): what every upstream, chain target and
    /// dialer server is checked against, by HAProxy and by the identity checker alike.
    pub own_roots_pem: String,
    pub trust_domain: String,
}

#[cfg(test)]
impl Desired {
    /// A sidecar's public listener, for tests that know they built one.
    pub fn sidecar(&self) -> &Public {
        self.public.as_ref().expect("a sidecar's desired state")
    }

    pub fn sidecar_mut(&mut self) -> &mut Public {
        self.public.as_mut().expect("a sidecar's desired state")
    }
}

impl Desired {
    /// How many instances each upstream listener (or a gateway's route) has in its slots.
    pub fn live_instances(&self) -> std::collections::BTreeMap<String, usize> {
        let in_service = |slots: &[Slot]| {
            slots
                .iter()
                .filter(|s| s.instance.as_ref().is_some_and(Server::in_service))
                .count()
        };
        let routes = self.gateway.iter().flat_map(|g| g.routes.iter());
        self.upstreams
            .iter()
            .map(|u| {
                let targets = u.routing.iter().flat_map(|r| r.targets.iter());
                let n = in_service(&u.slots) + targets.map(|t| in_service(&t.slots)).sum::<usize>();
                (u.name.clone(), n)
            })
            .chain(routes.map(|r| (r.backend.clone(), in_service(&r.slots))))
            .collect()
    }

    /// Whether HAProxy, holding `live` instances per upstream, serves every upstream this state
    /// has instances for; upstreams Consul lists none for ask for nothing.
    pub fn served_by(&self, live: &std::collections::BTreeMap<String, usize>) -> bool {
        self.live_instances()
            .iter()
            .all(|(name, n)| *n == 0 || live.get(name).is_some_and(|l| *l > 0))
    }

    /// The exposed listener whose frontend or backend is the HAProxy proxy `proxy`.
    pub fn exposed_of_proxy(&self, proxy: &str) -> Option<&ExposedListener> {
        self.exposed
            .iter()
            .find(|e| e.name == proxy || e.backend == proxy)
    }

    /// What the identity checker must check: the endpoint of every instance in a slot (none
    /// when the check is off), with this state's leaf and roots.
    pub fn identity_checks(&self) -> admission::Wanted {
        admission::Wanted {
            endpoints: self
                .server_pools()
                .flat_map(|(_, _, slots)| slots.iter().filter_map(|s| s.instance.as_ref()))
                .filter(|i| i.admission != Admission::Unchecked)
                .map(Server::endpoint)
                .collect(),
            leaf_pem: self.tls.leaf_pem.clone(),
            roots_pem: self.tls.own_roots_pem.clone(),
        }
    }

    /// Every backend of upstream servers, as (its upstream, its name, its slots): each
    /// upstream's own and each of its discovery-chain targets'.
    pub fn server_pools(&self) -> impl Iterator<Item = (&UpstreamListener, &str, &[Slot])> {
        self.upstreams.iter().flat_map(|u| {
            let targets = u.routing.iter().flat_map(|r| r.targets.iter());
            std::iter::once((u, u.backend.as_str(), u.slots.as_slice()))
                .chain(targets.map(move |t| (u, t.backend.as_str(), t.slots.as_slice())))
        })
    }

    /// The forwarders the peered upstreams need, one per peer's service, with their targets.
    pub fn peered(&self) -> BTreeMap<crate::peering::PeerKey, Option<crate::peering::Target>> {
        self.upstreams
            .iter()
            .filter_map(|u| u.peer.as_ref())
            .map(|p| (p.key.clone(), p.target.clone()))
            .collect()
    }

    pub fn upstream(&self, name: &str) -> Option<&UpstreamListener> {
        self.upstreams.iter().find(|u| u.name == name)
    }

    /// The chain target whose backend is the HAProxy proxy `proxy`, with its upstream.
    pub fn target_of_proxy(
        &self,
        proxy: &str,
    ) -> Option<(&UpstreamListener, &chain::TargetBackend)> {
        self.upstreams.iter().find_map(|u| {
            u.routing
                .as_ref()?
                .targets
                .iter()
                .find(|t| t.backend == proxy)
                .map(|t| (u, t))
        })
    }

    /// The upstream whose frontend or backend is the HAProxy proxy `proxy`.
    pub fn upstream_of_proxy(&self, proxy: &str) -> Option<&UpstreamListener> {
        self.upstreams
            .iter()
            .find(|u| u.name == proxy || u.backend == proxy)
    }
}
