//! `Desired`: the HAProxy objects one sidecar wants, built from a complete `Snapshot` by a pure
//! function. Everything policy-like (names, defaults, which Consul field wins) is decided here
//! and nowhere else; `render` only formats and `haproxy::diff` only compares.

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};

use serde::Serialize;
use serde_json::Value;

use crate::admission::{self, Endpoint, Identity, Verdict};
use crate::config::{Knobs, MeshGateway};
use crate::consul::api::{HealthEntry, Upstream};
use crate::consul::{DestinationKey, DestinationKind};
use crate::error::{Error, Result};
use crate::haproxy_version::HaproxyVersion;
use crate::names::sanitize;
use crate::snapshot::Snapshot;
use crate::value::{Address, HeaderName, Limit, Millis, Name, Refused, Word};

/// Consul's defaults for the proxy config keys the sidecar honours.
const DEFAULT_CONNECT_TIMEOUT: Millis = Millis::constant(5000);
const DEFAULT_PUBLIC_BIND: Address =
    Address::Ip(std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED));
const DEFAULT_UPSTREAM_BIND: Address =
    Address::Ip(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));
const DEFAULT_LOCAL_APP: Address = Address::Ip(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

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
    pub roots: PathBuf,
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
            spoe_conf: workdir.join("spoe.conf"),
            spoe_socket: workdir.join("spoe.sock"),
            metrics_socket: workdir.join("metrics.sock"),
            splits_map: workdir.join("splits.map"),
            intentions_map: workdir.join("intentions.map"),
            gateway_map: workdir.join("gateway.map"),
            transparent_map: workdir.join("transparent.map"),
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
/// within about three intervals, long before Consul notices (`tests/multi_host.rs`). The
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
    /// Every CA root, active or not, so that peers on either side of a rotation are trusted.
    pub roots_pem: String,
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

    pub fn exposed_listener(&self, name: &str) -> Option<&ExposedListener> {
        self.exposed.iter().find(|e| e.name == name)
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
            roots_pem: self.tls.roots_pem.clone(),
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

/// Builds the desired state. Fails, naming the problem, when the snapshot is incomplete or holds
/// something HAProxy cannot be given (no local port, a certificate that does not parse).
/// Problems confined to one upstream drop that upstream only, with a warning, so one bad
/// upstream cannot take the others down.
///
/// `previous` is the state built before this one, if any: instances keep the slots they had.
pub fn build(
    snapshot: &Snapshot,
    settings: &Settings,
    previous: Option<&Desired>,
) -> Result<Desired> {
    let missing = snapshot.missing();
    if !missing.is_empty() {
        return Err(Error::msg(format!(
            "waiting for {} from Consul",
            missing.join(", ")
        )));
    }
    if let Some(gw) = &settings.gateway {
        return gateway::build(snapshot, settings, gw, previous);
    }
    let (Some(reg), Some(leaf), Some(roots)) =
        (&snapshot.registration, &snapshot.leaf, &snapshot.roots)
    else {
        return Err(Error::msg("the Consul snapshot is incomplete"));
    };
    let proxy = reg.proxy.as_ref().ok_or_else(|| {
        Error::msg(format!(
            "service {:?} is registered without a Proxy block; is it a connect-proxy?",
            reg.id
        ))
    })?;
    let service = proxy.destination_service_name.clone();
    if service.is_empty() {
        return Err(Error::msg(format!(
            "proxy {:?} names no Proxy.DestinationServiceName",
            reg.id
        )));
    }
    // The sidecar's own registration: a value that cannot be served refuses the whole state,
    // so the last good one keeps serving (there is nothing smaller to drop).
    let refused = |e: Refused| {
        Error::msg(format!(
            "proxy {:?}: {e}",
            reg.id.escape_debug().to_string()
        ))
    };
    Name::parse("Proxy.DestinationServiceName", &service).map_err(refused)?;
    if !leaf.service.is_empty() && leaf.service != service {
        return Err(Error::msg(format!(
            "waiting for the leaf certificate of {service:?} (the one held is for {:?})",
            leaf.service
        )));
    }

    let tls = tls(leaf, roots)?;

    let app_port = proxy.local_service_port;
    if app_port == 0 {
        return Err(Error::msg(format!(
            "proxy {:?} has no Proxy.LocalServicePort: there is no local app to forward to",
            reg.id
        )));
    }
    let mut warnings = Vec::new();
    let whose = format!("proxy {:?}", reg.id.escape_debug().to_string());
    keys::warn_unknown(&proxy.config, keys::PROXY, &whose, &mut warnings);
    let mode = public_mode(proxy);
    let local = keys::local_app(
        &proxy.config,
        mode,
        settings.intentions,
        &whose,
        &mut warnings,
    );
    let public = Public {
        bind_address: match config_str(&proxy.config, "bind_address") {
            Some(a) => Address::parse_ip("Proxy.Config.bind_address", &a).map_err(refused)?,
            None => DEFAULT_PUBLIC_BIND,
        },
        bind_port: match config_u64(&proxy.config, "bind_port") {
            Some(p) => port("bind_port", p)?,
            None => reg.port,
        },
        mode,
        h2: protocol_of(&proxy.config).h2(),
        app_address: match non_empty(&proxy.local_service_address) {
            Some(a) => Address::parse("Proxy.LocalServiceAddress", &a).map_err(refused)?,
            None => DEFAULT_LOCAL_APP,
        },
        app_port,
        connect_timeout_ms: local.connect_timeout_ms.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        client_timeout_ms: local.client_timeout_ms,
        server_timeout_ms: local.server_timeout_ms,
        max_connections: local.max_connections,
        forwardfor: local.forwardfor,
        app_header: local.app_header,
    };
    if public.bind_port == 0 {
        return Err(Error::msg(format!(
            "proxy {:?} has no port to listen on (neither Port nor config bind_port)",
            reg.id
        )));
    }

    let mut upstreams: Vec<UpstreamListener> = Vec::new();
    let mut taken: BTreeSet<(String, u16)> = BTreeSet::new();
    taken.insert((public.bind_address.to_string(), public.bind_port));
    let outbound_port = crate::consul::is_transparent(reg).then(|| {
        let port = transparent::outbound_port(proxy);
        taken.insert((transparent::OUTBOUND_BIND.to_string(), port));
        port
    });
    let here = Here {
        datacenter: Name::parse(
            "Datacenter",
            &local_datacenter(&leaf.service_uri, &reg.datacenter),
        )
        .map_err(refused)?
        .to_string(),
        trust_domain: &tls.trust_domain,
        identity_check: settings.identity_check,
        balance: &settings.knobs.balance,
    };
    for u in &proxy.upstreams {
        match upstream(u, snapshot, previous, &here, &mut warnings) {
            Ok(listener) => {
                let at = (listener.bind_address.clone(), listener.bind_port);
                if !taken.insert(at) || upstreams.iter().any(|l| l.name == listener.name) {
                    warnings.push(format!(
                        "upstream {} wants {}, which another listener of this sidecar already has; skipping it",
                        listener.destination,
                        listener_address(&listener)
                    ));
                    continue;
                }
                upstreams.push(listener);
            }
            Err(e) => warnings.push(format!("skipping upstream {:?}: {e}", u.destination_name)),
        }
    }
    let transparent = outbound_port.map(|port| {
        let mut implicit = Vec::new();
        for name in snapshot.implicit_upstreams() {
            let u = transparent::as_upstream(name, port);
            match upstream(&u, snapshot, previous, &here, &mut warnings) {
                Ok(l) => implicit.push((
                    name.clone(),
                    UpstreamListener {
                        implicit: true,
                        ..l
                    },
                )),
                Err(e) => warnings.push(format!("skipping implicit upstream {name:?}: {e}")),
            }
        }
        let outbound = transparent::outbound(port, snapshot, &implicit, &mut warnings);
        upstreams.extend(implicit.into_iter().map(|(_, l)| l));
        outbound
    });
    upstreams.sort_by(|a, b| a.name.cmp(&b.name));
    for u in upstreams.iter().filter(|u| !u.implicit) {
        taken.insert((u.bind_address.clone(), u.bind_port));
    }
    let mut exposed: Vec<ExposedListener> = Vec::new();
    for w in expose::wanted(proxy, snapshot.checks.as_deref(), &public, &mut warnings) {
        let sources = expose::local_sources(
            snapshot.agent_address.as_deref(),
            &reg.address,
            &public,
            w.check_host.as_deref(),
        );
        let l = expose::listener(&w, &public, sources);
        if !taken.insert((l.bind_address.to_string(), l.bind_port)) {
            warnings.push(format!(
                "exposed path {} wants port {}, which another listener of this sidecar already has; skipping it",
                l.path, l.bind_port
            ));
            continue;
        }
        exposed.push(l);
    }
    exposed.sort_by_key(|l| l.bind_port);
    let mesh_tls = mesh::tls(snapshot.mesh.as_deref().unwrap_or_default(), &mut warnings);
    let mut access_log = access_logs::formats(&proxy.access_logs, &whose, &mut warnings);
    if access_log.is_some() && settings.knobs.log_format.is_some() {
        warnings.push(format!(
            "{whose}: -log-format wins over the AccessLogs format of Consul"
        ));
        access_log = None;
    }

    Ok(Desired {
        service,
        public: Some(public),
        upstreams,
        exposed,
        transparent,
        tls,
        mesh_tls,
        intentions: settings.intentions,
        intentions_map: Vec::new(),
        jwt_headers: Default::default(),
        knobs: settings.knobs.clone(),
        access_log,
        spoe_backend_mode: settings.haproxy.spoe_backend_mode(),
        paths: settings.paths.clone(),
        warnings,
        gateway: None,
    })
}

/// What every upstream's backends depend on besides the snapshot.
pub(crate) struct Here<'a> {
    /// Our own datacenter: the default of a destination's.
    pub datacenter: String,
    pub trust_domain: &'a str,
    pub identity_check: bool,
    /// `-balance`: every backend's algorithm unless a resolver asks for another.
    pub balance: &'a str,
}

/// The datacenter of our own leaf's SPIFFE ID, or else of the registration.
pub(crate) fn local_datacenter(leaf_uri: &str, registration_dc: &str) -> String {
    crate::pki::SpiffeId::parse(leaf_uri)
        .map(|id| id.datacenter)
        .unwrap_or_else(|_| registration_dc.to_string())
}

fn upstream(
    u: &Upstream,
    snapshot: &Snapshot,
    previous: Option<&Desired>,
    here: &Here<'_>,
    warnings: &mut Vec<String>,
) -> Result<UpstreamListener> {
    if u.destination_name.is_empty() {
        return Err(Error::msg("it has no DestinationName"));
    }
    // Each value below reaches a name, a comment or a bind line: a bad one skips this upstream.
    Name::parse("DestinationName", &u.destination_name)?;
    for (field, v) in [
        ("Datacenter", &u.datacenter),
        ("DestinationNamespace", &u.destination_namespace),
    ] {
        if !v.is_empty() {
            Name::parse(field, v)?;
        }
    }
    if !u.destination_peer.is_empty() {
        return Err(Error::msg(format!(
            "its destination is in cluster peer {:?}, and this sidecar cannot dial a peer yet (HAProxy checks a server certificate's names against the SNI the peer's mesh gateway needs, and a peer's leaf has none)",
            u.destination_peer
        )));
    }
    let socket = unix_socket(u)?;
    if socket.is_none() && u.local_bind_port == 0 {
        return Err(Error::msg(
            "it has neither LocalBindPort nor LocalBindSocketPath",
        ));
    }
    let kind = match u.destination_type.as_str() {
        "" | "service" => DestinationKind::Service,
        "prepared_query" => DestinationKind::PreparedQuery,
        other => return Err(Error::msg(format!("unknown DestinationType {other:?}"))),
    };
    let key = DestinationKey {
        kind,
        name: u.destination_name.clone(),
        datacenter: u.datacenter.clone(),
    };
    let (bind_address, bind_port) = match &socket {
        Some(s) => (s.path.clone(), 0),
        None => (
            match non_empty(&u.local_bind_address) {
                Some(a) => Address::parse_ip("LocalBindAddress", &a)?.to_string(),
                None => DEFAULT_UPSTREAM_BIND.to_string(),
            },
            u.local_bind_port,
        ),
    };
    // Address and port make a listener unique, and the datacenter keeps two watches of one
    // destination apart in names and metrics.
    let name = sanitize(&format!(
        "up_{}_{}_{}_{}_{}",
        match kind {
            DestinationKind::Service => "svc",
            DestinationKind::PreparedQuery => "pq",
        },
        u.destination_name,
        if u.datacenter.is_empty() {
            "local"
        } else {
            &u.datacenter
        },
        if socket.is_some() {
            "unix"
        } else {
            &bind_address
        },
        if socket.is_some() {
            sanitize(&bind_address)
        } else {
            bind_port.to_string()
        }
    ));
    let entries = snapshot
        .endpoints
        .get(&key)
        .map_or(&[][..], |v| v.as_slice());
    let previous_listener = previous.and_then(|p| p.upstream(&name));
    let before = previous_listener.map_or(&[][..], |l| l.slots.as_slice());
    let identity = (kind == DestinationKind::Service).then(|| Identity {
        namespace: non_empty(&u.destination_namespace)
            .unwrap_or_else(|| admission::DEFAULT.to_string()),
        ..Identity::service(
            &u.destination_name,
            if u.datacenter.is_empty() {
                &here.datacenter
            } else {
                &u.datacenter
            },
        )
    });
    let (slots, verifyhost) = pool(
        entries,
        &u.destination_name,
        identity.as_ref(),
        here,
        snapshot,
        before,
        previous_listener.and_then(|p| p.verifyhost.as_ref()),
        warnings,
    );
    let backend = format!("{BACKEND_PREFIX}{name}");
    let chain = snapshot.chains.get(&key);
    // The upstream's own protocol wins; without one, the chain's (service-defaults) applies.
    let protocol = config_str(&u.config, "protocol")
        .or_else(|| chain.map(|c| c.protocol.clone()).filter(|p| !p.is_empty()));
    let listener_protocol = Protocol::parse(protocol.as_deref());
    let listener_mode = listener_protocol.mode();
    let whose = format!("upstream {key}");
    keys::warn_unknown(&u.config, keys::UPSTREAM, &whose, warnings);
    let connect_timeout = timeout_setting(&u.config, "connect_timeout_ms", &whose, warnings)
        .or_else(|| keys::go_timeout(&u.config, "connect_timeout", &whose, warnings));
    let read_timeout = keys::go_timeout(&u.config, "read_timeout", &whose, warnings);
    keys::check_poll_interval(&u.config, kind, &whose, warnings);
    let limits = keys::upstream_limits(&u.config, listener_mode, &whose, warnings);
    let routing = match chain {
        Some(c) => {
            let before = previous_listener.and_then(|l| l.routing.as_ref());
            let mut chain_warnings = Vec::new();
            match chain::routing(
                c,
                &key,
                &backend,
                listener_mode,
                connect_timeout,
                here,
                snapshot,
                before,
                &mut chain_warnings,
            ) {
                Ok(r) => {
                    warnings.extend(chain_warnings);
                    r
                }
                // The routing that served before keeps serving (or the destination itself).
                Err(e) => {
                    warnings.push(format!(
                        "upstream {key}: its discovery chain cannot be followed, keeping the routing it had: {e}"
                    ));
                    before.cloned()
                }
            }
        }
        None => None,
    };
    Ok(UpstreamListener {
        backend,
        name,
        destination: key.to_string(),
        bind_address,
        bind_port,
        socket,
        mode: listener_mode,
        h2: listener_protocol.h2(),
        connect_timeout_ms: connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        read_timeout_ms: read_timeout,
        slots,
        identity,
        verifyhost,
        routing,
        implicit: false,
        limits,
    })
}

/// A backend's slots and the certificate name its servers are pinned to (`verifyhost`): the
/// instances in `entries`, each admitted as the identity checker judged it, placed in the
/// slots they had (`before`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool(
    entries: &[HealthEntry],
    destination: &str,
    identity: Option<&Identity>,
    here: &Here<'_>,
    snapshot: &Snapshot,
    before: &[Slot],
    pinned_before: Option<&String>,
    warnings: &mut Vec<String>,
) -> (Vec<Slot>, Option<String>) {
    let mut instances = servers(entries, destination, identity, &here.datacenter, warnings);
    for i in &mut instances {
        i.admission = admission_of(i, snapshot, here.identity_check);
    }
    let slots = place(instances, before);
    let verifyhost =
        pinned_name(&slots, here.trust_domain).unwrap_or_else(|| pinned_before.cloned());
    (slots, verifyhost)
}

fn admission_of(i: &Server, snapshot: &Snapshot, check: bool) -> Admission {
    if !check {
        return Admission::Unchecked;
    }
    match snapshot.admission.get(&i.endpoint()) {
        None => Admission::Unproven,
        Some(Verdict::Proven { common_name }) => Admission::Proven {
            common_name: common_name.clone(),
        },
        Some(Verdict::Refused { .. }) => Admission::Refused,
    }
}

/// The name HAProxy can check on every connection of a backend: the legacy CN, when every
/// admitted instance presented exactly the CN its identity has in leaves before Consul 1.11.
/// `Some(None)`: never pin (one instance's leaf has no such CN, or the check is off);
/// `None`: nothing admitted to judge by, so the backend keeps what it had.
fn pinned_name(slots: &[Slot], trust_domain: &str) -> Option<Option<String>> {
    let mut pinned: Option<String> = None;
    for i in slots.iter().filter_map(|s| s.instance.as_ref()) {
        let cn = match &i.admission {
            Admission::Unchecked => return Some(None),
            Admission::Proven { common_name } => common_name,
            Admission::Unproven | Admission::Refused => continue,
        };
        let legacy = i.identity.legacy_common_name(trust_domain);
        match (cn, &pinned) {
            (Some(cn), _) if legacy.as_ref() != Some(cn) => return Some(None),
            (None, _) => return Some(None),
            (Some(cn), Some(p)) if p != cn => return Some(None),
            (Some(cn), _) => pinned = Some(cn.clone()),
        }
    }
    pinned.map(Some)
}

/// `LocalBindSocketPath` and `LocalBindSocketMode`, checked: an absolute path short enough for
/// HAProxy, and an octal mode.
fn unix_socket(u: &Upstream) -> Result<Option<UnixSocket>> {
    let path = u.local_bind_socket_path.trim();
    if path.is_empty() {
        return Ok(None);
    }
    if !path.starts_with('/') {
        return Err(Error::msg(format!(
            "LocalBindSocketPath {path:?} is not an absolute path"
        )));
    }
    Word::parse("LocalBindSocketPath", path)?;
    if path.len() > MAX_SOCKET_PATH {
        return Err(Error::msg(format!(
            "LocalBindSocketPath {path:?} is {} bytes, more than the {} HAProxy can bind",
            path.len(),
            MAX_SOCKET_PATH
        )));
    }
    let mode = match u.local_bind_socket_mode.trim() {
        "" => None,
        m if (3..=4).contains(&m.len()) && m.chars().all(|c| ('0'..='7').contains(&c)) => {
            Some(m.to_string())
        }
        m => {
            return Err(Error::msg(format!(
                "LocalBindSocketMode {m:?} is not an octal mode such as 0660"
            )))
        }
    };
    Ok(Some(UnixSocket {
        path: path.to_string(),
        mode,
    }))
}

/// How a listener's address reads in a message.
pub fn listener_address(u: &UpstreamListener) -> String {
    match &u.socket {
        Some(s) => format!("unix socket {}", s.path),
        None => format!("{}:{}", u.bind_address, u.bind_port),
    }
}

/// The instances of a destination. A service's instances must all be `identity`; a prepared
/// query's each the service its answer lists it as (the service a sidecar fronts), in the
/// datacenter of its node.
fn servers(
    entries: &[HealthEntry],
    destination: &str,
    identity: Option<&Identity>,
    local_dc: &str,
    warnings: &mut Vec<String>,
) -> Vec<Server> {
    let mut by_name: BTreeMap<String, Server> = BTreeMap::new();
    for e in entries {
        let (address, field) = match non_empty(&e.service.address) {
            Some(a) => (a, "Service.Address"),
            None => (e.node.address.trim().to_string(), "Node.Address"),
        };
        if address.is_empty() || e.service.port == 0 {
            warnings.push(format!(
                "instance {:?} on node {:?} of {destination} has no address or port; skipping it",
                e.service.id, e.node.node
            ));
            continue;
        }
        // Everything of an instance that reaches HAProxy: its address (a server line, a
        // runtime-API command) and the names that make its slot's identity. A refused value
        // drops this instance only.
        let fronted = e
            .service
            .proxy
            .as_ref()
            .and_then(|p| non_empty(&p.destination_service_name))
            .unwrap_or_else(|| e.service.service.clone());
        let typed = Name::parse("Service.ID", &e.service.id).and_then(|_| {
            Name::parse("Node.Node", &e.node.node)?;
            if identity.is_none() {
                Name::parse("Service.Proxy.DestinationServiceName", &fronted)?;
                if !e.node.datacenter.is_empty() {
                    Name::parse("Node.Datacenter", &e.node.datacenter)?;
                }
            }
            Address::parse(field, &address)
        });
        let address = match typed {
            Ok(a) => a,
            Err(e2) => {
                warnings.push(format!(
                    "instance {:?} on node {:?} of {destination}: {e2}; skipping it",
                    e.service.id.escape_debug().to_string(),
                    e.node.node.escape_debug().to_string()
                ));
                continue;
            }
        };
        let id = format!("{}.{}", e.service.id, e.node.node);
        let weight = e.service.weights.map_or(1, |w| w.passing).clamp(1, 256);
        let identity = identity.cloned().unwrap_or_else(|| {
            let dc = non_empty(&e.node.datacenter).unwrap_or_else(|| local_dc.to_string());
            Identity::service(&fronted, &dc)
        });
        by_name.insert(
            id.clone(),
            Server {
                id,
                address,
                port: e.service.port,
                weight,
                identity,
                admission: Admission::Unproven,
            },
        );
    }
    by_name.into_values().collect()
}

/// Places instances in slots: each keeps its previous slot; newcomers take the lowest free one.
/// The pool grows (doubling) when full and shrinks only when at most a quarter is used, so a
/// flapping instance count never resizes it back and forth.
pub fn place(instances: Vec<Server>, before: &[Slot]) -> Vec<Slot> {
    let n = instances.len();
    let fit = |k: usize| k.next_power_of_two().max(MIN_SLOTS);
    let capacity = match before.len() {
        0 => fit(n),
        c if n > c => fit(n),
        c if c > MIN_SLOTS && n <= c / 4 => fit(2 * n),
        c => c,
    };
    let mut slots: Vec<Option<Server>> = vec![None; capacity];
    let mut newcomers = Vec::new();
    for inst in instances {
        let had = before
            .iter()
            .position(|s| s.instance.as_ref().is_some_and(|i| i.id == inst.id))
            .filter(|i| *i < capacity && slots[*i].is_none());
        match had {
            Some(i) => slots[i] = Some(inst),
            None => newcomers.push(inst),
        }
    }
    let mut free = (0..capacity)
        .filter(|i| slots[*i].is_none())
        .collect::<Vec<_>>()
        .into_iter();
    for inst in newcomers {
        if let Some(i) = free.next() {
            slots[i] = Some(inst);
        }
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, instance)| Slot {
            name: format!("s{i}"),
            instance,
        })
        .collect()
}

pub(crate) fn tls(
    leaf: &crate::consul::api::LeafCert,
    roots: &crate::consul::api::CaRoots,
) -> Result<Tls> {
    let chain = pem_blocks(&leaf.cert_pem, "CERTIFICATE");
    if chain.is_empty() {
        return Err(Error::msg(format!(
            "the leaf certificate for {:?} (serial {}) holds no PEM certificate",
            leaf.service, leaf.serial_number
        )));
    }
    for block in &chain {
        parse_cert(block).map_err(|e| {
            Error::msg(format!(
                "the leaf certificate for {:?} (serial {}) does not parse: {e}",
                leaf.service, leaf.serial_number
            ))
        })?;
    }
    let key = pem_blocks(&leaf.private_key_pem, "PRIVATE KEY");
    if key.len() != 1 {
        return Err(Error::msg(format!(
            "the leaf certificate for {:?} (serial {}) comes with {} private keys, expected 1",
            leaf.service,
            leaf.serial_number,
            key.len()
        )));
    }
    let mut roots_pem = String::new();
    for root in &roots.roots {
        for block in pem_blocks(&root.root_cert, "CERTIFICATE") {
            parse_cert(&block).map_err(|e| {
                Error::msg(format!(
                    "CA root {:?} ({}) does not parse: {e}",
                    root.name, root.id
                ))
            })?;
            roots_pem.push_str(&block);
        }
    }
    if roots_pem.is_empty() {
        return Err(Error::msg("Consul's CA roots hold no certificate"));
    }
    // It makes the legacy CN a backend pins (`verifyhost`).
    Name::parse("CARoots.TrustDomain", &roots.trust_domain)?;
    let mut leaf_pem: String = chain.concat();
    leaf_pem.push_str(&key[0]);
    Ok(Tls {
        leaf_pem,
        roots_pem,
        trust_domain: roots.trust_domain.clone(),
    })
}

/// The PEM blocks of one label (`CERTIFICATE`, or any `… PRIVATE KEY`), each normalised to end
/// with a newline and to hold no blank line: HAProxy's runtime API ends a payload at the first
/// blank line.
pub fn pem_blocks(text: &str, label_suffix: &str) -> Vec<String> {
    let mut blocks = Vec::new();
    let mut current: Option<String> = None;
    for line in text.lines() {
        let line = line.trim_end();
        if line.is_empty() {
            continue;
        }
        if let Some(label) = line
            .strip_prefix("-----BEGIN ")
            .and_then(|l| l.strip_suffix("-----"))
        {
            current = label.ends_with(label_suffix).then(|| format!("{line}\n"));
            continue;
        }
        if let Some(block) = current.as_mut() {
            block.push_str(line);
            block.push('\n');
            if line.starts_with("-----END ") {
                blocks.push(std::mem::take(block));
                current = None;
            }
        }
    }
    blocks
}

fn parse_cert(pem_block: &str) -> std::result::Result<(), String> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem_block.as_bytes()).map_err(|e| e.to_string())?;
    pem.parse_x509().map_err(|e| e.to_string())?;
    Ok(())
}

/// The mode of the public listener a proxy registration asks for (its `protocol`, which current
/// Consul fills in from service-defaults).
pub fn public_mode(proxy: &crate::consul::api::ProxyConfig) -> Mode {
    protocol_of(&proxy.config).mode()
}

fn protocol_of(config: &BTreeMap<String, Value>) -> Protocol {
    Protocol::parse(config_str(config, "protocol").as_deref())
}

/// What Consul says a service speaks (`protocol` of the proxy, the upstream or the chain).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Protocol {
    Tcp,
    Http,
    Http2,
    Grpc,
}

impl Protocol {
    /// Consul's names; anything else is carried as opaque TCP, as Consul's default.
    pub fn parse(protocol: Option<&str>) -> Protocol {
        match protocol.map(str::to_ascii_lowercase).as_deref() {
            Some("http") => Protocol::Http,
            Some("http2") => Protocol::Http2,
            Some("grpc") => Protocol::Grpc,
            _ => Protocol::Tcp,
        }
    }

    /// HTTP/2 and gRPC are HTTP to HAProxy: requests balanced, routed and judged one by one.
    pub fn mode(self) -> Mode {
        match self {
            Protocol::Tcp => Mode::Tcp,
            Protocol::Http | Protocol::Http2 | Protocol::Grpc => Mode::Http,
        }
    }

    /// Whether the service speaks HTTP/2 only (h2c towards a local app, h2 between sidecars).
    pub fn h2(self) -> bool {
        matches!(self, Protocol::Http2 | Protocol::Grpc)
    }
}

fn config_str(config: &BTreeMap<String, Value>, key: &str) -> Option<String> {
    match config.get(key)? {
        Value::String(s) if !s.trim().is_empty() => Some(s.trim().to_string()),
        _ => None,
    }
}

/// Consul passes opaque config through as JSON, so numbers may arrive as numbers or strings.
fn config_u64(config: &BTreeMap<String, Value>, key: &str) -> Option<u64> {
    match config.get(key)? {
        Value::Number(n) => n
            .as_u64()
            .or_else(|| n.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64)),
        Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}

/// A timeout setting of a proxy or upstream config (`*_timeout_ms`): `None` when unset, and
/// when HAProxy cannot take it (0, or above its largest), with a warning naming it.
fn timeout_setting(
    config: &BTreeMap<String, Value>,
    key: &'static str,
    whose: &str,
    warnings: &mut Vec<String>,
) -> Option<Millis> {
    let Some(ms) = config_u64(config, key) else {
        if config.get(key).is_some_and(|v| !v.is_null()) {
            warnings.push(format!(
                "{whose}: {}; Consul's default applies",
                keys::not_a(key, config.get(key), "not a number of milliseconds")
            ));
        }
        return None;
    };
    match Millis::new(key, ms) {
        Ok(t) => Some(t),
        Err(e) => {
            warnings.push(format!("{whose}: {e}; Consul's default applies"));
            None
        }
    }
}

fn port(key: &str, v: u64) -> Result<u16> {
    u16::try_from(v)
        .ok()
        .filter(|p| *p > 0)
        .ok_or_else(|| Error::msg(format!("proxy config {key} = {v} is not a port")))
}

fn non_empty(s: &str) -> Option<String> {
    let s = s.trim();
    (!s.is_empty()).then(|| s.to_string())
}

pub mod access_logs;
pub mod chain;
mod expose;
pub mod gateway;
pub mod keys;
pub mod mesh;
pub mod transparent;
pub use chain::Routing;
pub use expose::ExposedListener;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
