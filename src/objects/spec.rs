//! The `*Spec` types, one per kind of HAProxy object the sidecar manages, and the
//! constructors that describe each object from a `Desired`. Nothing here knows how a spec is
//! written into haproxy.cfg (`lines`) or sent (`haproxy::dataplane`).

use crate::model::chain::TargetBackend;
use crate::model::gateway::{GatewayListener, GatewayRoute};
use crate::model::mesh::TlsParams;
use crate::model::transparent::Dialer;
use crate::model::{
    AppHeader, Desired, ExposedListener, Mode, Public, Server, Slot, UpstreamListener, Xfcc,
    FREE_SLOT_ADDRESS, FREE_SLOT_PORT,
};
use crate::value::{Limit, Millis};

use super::routing::routing_lines;

pub const PUBLIC_FRONTEND: &str = "public_listener";
pub const LOCAL_BACKEND: &str = "local_app";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshTls {
    pub crt: String,
    pub ca_file: String,
    /// The `mesh` entry's versions and ciphers for this direction. Not in Dataplane API
    /// v1.2.5's bind and server models: an object with them is only ever created or replaced
    /// by a full render or the runtime API (`add server` takes them); see
    /// `Plan::full_render_reason`.
    pub params: TlsParams,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BackendSpec {
    pub name: String,
    pub mode: Mode,
    /// `balance <algorithm>`; `None` keeps HAProxy's default (the local app's single server).
    pub balance: Option<String>,
    pub connect_timeout_ms: Millis,
    /// `timeout server`; `None` keeps the defaults section's. Dataplane API v1.2.5 carries
    /// it (`server_timeout`).
    pub server_timeout_ms: Option<Millis>,
    /// `option forwardfor` (the local app's backend in http mode, `enable_forwardfor`); v1.2.5
    /// carries it (`forwardfor`).
    pub forwardfor: bool,
    /// `default-server verifyhost <name>`: every server's certificate must carry this name.
    /// Dataplane API v1.2.5 cannot set it, so a backend with it is only ever created by a full
    /// render (see `Plan::full_render_reason`); later server edits through the API keep it.
    pub verifyhost: Option<String>,
    /// A chain target's settings (hashing, request timeout, retries). Rendered only: a target
    /// backend is only ever created by a full render (see `Plan::needs_full_render`).
    pub target: Vec<String>,
    /// The upstream's `limits` queue bound (`Limits::backend_lines`). Rendered only, like
    /// `target`: a backend with it is only ever created by a full render.
    pub queue: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub name: String,
    pub mode: Mode,
    /// `None` for a mesh gateway's listener: a connection no route takes is closed.
    pub default_backend: Option<String>,
    /// Access logs: `option httplog`/`option tcplog` by mode, or a `log-format`.
    pub log_format: Option<String>,
    /// `timeout client`; `None` keeps the defaults section's. v1.2.5 carries it
    /// (`client_timeout`).
    pub client_timeout_ms: Option<Millis>,
    /// `maxconn` (`max_inbound_connections`); v1.2.5 carries it.
    pub maxconn: Option<Limit>,
    /// What the frontend is for, with the rules only a full render writes.
    pub kind: FrontendKind,
}

/// The kinds of frontend, each with its own rules. Every rule here is rendered only: the
/// Dataplane API keeps a frontend's filters and rules as the file had them when it replaces
/// the frontend, and v1.2.5's rule models cannot carry most of them, so a frontend whose
/// kind carries rules is only ever created or changed by a full render
/// (`Plan::full_render_reason`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrontendKind {
    Public {
        /// The `appname_header` rules.
        app_header: Option<AppHeader>,
        /// The `X-Forwarded-Client-Cert` rules (http mode).
        xfcc: Option<Xfcc>,
        /// `MutualTLSMode: permissive`: the plaintext socket's bind, and intentions judged on
        /// TLS connections only.
        plain_socket: Option<String>,
        /// The intentions filter, the rule that rejects what the agent did not allow and, in
        /// http mode, the per-request rules of L7 intentions. The sidecar never turns
        /// intentions on or off while it runs; the per-request rules depend on the mode.
        intentions: Option<IntentionsFilter>,
        /// In http mode: a request whose path cannot be judged in one form is refused with 400
        /// (`PATH_REFUSALS`), every other goes on with its path in normal form (`NORMALIZE`),
        /// whether or not intentions are enforced.
        path_rules: bool,
    },
    /// An upstream's listener; with a discovery chain, `routing` holds the rules that pick a
    /// target's backend per request or connection (`routing::routing_lines`).
    Upstream { routing: Vec<String> },
    /// An exposed path's listener: the one path it serves (`path` matches it with any query
    /// string, every other request gets 404 from HAProxy: `http-request return`), and the
    /// only sources a connection may come from (an exposed check's listener; empty admits
    /// any).
    Exposed { path: String, sources: Vec<String> },
    /// A mesh gateway's listener: the SNI map its connections are routed by (`sni backend`
    /// per line).
    Gateway { sni_map: String },
}

/// The files the public frontend's intentions rules name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntentionsFilter {
    /// The SPOE configuration (`filter spoe … config`).
    pub spoe_config: String,
    /// The fast map of L7 decisions (`AuthzTable::fast_map`), looked up per request of an L7
    /// connection before asking the agent (http mode).
    pub fast_map: String,
    /// The headers accepted JWTs change (http mode): each `Forwarding` header removed from
    /// what the client sent and set from the agent's word, each token header removed when the
    /// agent says the token came in it.
    pub jwt_headers: crate::spoe::authz::JwtHeaders,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BindSpec {
    pub frontend: String,
    pub name: String,
    /// An IP address, or a unix socket's path (then `port` is `None`).
    pub address: String,
    pub port: Option<u16>,
    /// A unix socket's permissions. Dataplane API v1.2.5's bind model cannot carry them, so a
    /// bind with a mode is only ever created by a full render (see `Plan::needs_full_render`).
    pub unix_mode: Option<String>,
    /// `ssl crt … ca-file … verify required` on the public listener.
    pub tls: Option<MeshTls>,
    /// `proto h2`: HTTP/2 without TLS (h2c), for an exposed `http2` path. Not in v1.2.5's bind
    /// model either; full render only.
    pub h2: bool,
    /// `alpn h2,http/1.1` on an http public listener: a peer sidecar may speak HTTP/2 (gRPC
    /// over the mesh), any other HTTP/1.1. In v1.2.5's bind model.
    pub alpn: Option<String>,
    /// `accept-proxy`: the permissive public listener's own socket, which only the listener in
    /// front of it connects to, with the client's address in a PROXY header. Full render only.
    pub accept_proxy: bool,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServerSpec {
    pub backend: String,
    pub name: String,
    pub address: String,
    pub port: u16,
    pub weight: Option<u32>,
    /// `ssl crt … ca-file … verify required` towards another sidecar.
    pub tls: Option<MeshTls>,
    /// A free slot: in maintenance (`disabled`), never sent traffic.
    pub maintenance: bool,
    /// `proto h2` towards the app (h2c), for an exposed `http2` path; full render only.
    pub h2: bool,
    /// The backend's `verifyhost`, which a server of the file inherits from its
    /// `default-server` line but a dynamic server (`add server`) must be given itself.
    pub verifyhost: Option<String>,
    /// `alpn h2` towards a peer sidecar of an HTTP/2 destination. Not in v1.2.5's server
    /// model: a server with it is only ever created or replaced by a full render or the
    /// runtime API (`add server` takes it).
    pub alpn: Option<String>,
    /// HAProxy's own health check of an upstream slot: `check inter <ms>` (both in v1.2.5's
    /// server model); the rest of it (`CHECK_DEFAULTS`) is the `default-server` line of the
    /// template's `defaults`, which a server of the file inherits and a dynamic server is
    /// given itself (`haproxy::live::add_server`). A slot in maintenance is never checked.
    pub check_inter_ms: Option<u64>,
    /// The upstream's per-server cap (`limits`); v1.2.5's server model and `add server` carry
    /// it. A change of it changes the backend too (`queue`), so it never goes live alone.
    pub maxconn: Option<Limit>,
    /// The upstream's passive check (`PassiveCheck::server_options`): HAProxy's error
    /// tracking and the `rise` that holds an ejected server out. Last on the line, after the
    /// check options, so that `add server` (`haproxy::live`) can put them after the
    /// `default-server` options it repeats; beyond v1.2.5's server model (full render).
    pub passive: Option<String>,
}

/// What of an object Dataplane API v1.2.5's models cannot carry: a plan that creates or
/// replaces such an object is applied by a full render instead, and this is why
/// (`Plan::full_render_reason`). `None` where the models carry the whole object.
impl FrontendSpec {
    pub fn beyond_dataplane(&self) -> Option<&'static str> {
        match &self.kind {
            FrontendKind::Exposed { .. } => Some(
                "an exposed path's listener needs an `http-request return` rule the Dataplane API cannot create",
            ),
            FrontendKind::Upstream { routing } if !routing.is_empty() => Some(
                "an upstream's discovery-chain routing changes, and the Dataplane API cannot write its rules in order",
            ),
            FrontendKind::Gateway { .. } => Some(
                "a mesh gateway's listener changes, and the Dataplane API cannot write its SNI routing rules",
            ),
            // The public listener's rules, and its mode, are the index's rendered-only parts.
            FrontendKind::Public { .. } | FrontendKind::Upstream { .. } => None,
        }
    }
}

impl BindSpec {
    pub fn beyond_dataplane(&self) -> Option<&'static str> {
        if self.accept_proxy {
            return Some(
                "the permissive public listener's socket takes PROXY headers, which the Dataplane API cannot set",
            );
        }
        if self.unix_mode.is_some() {
            return Some("a new unix socket listener has permissions the Dataplane API cannot set");
        }
        self.h2
            .then_some("an http2 exposed path needs `proto h2`, which the Dataplane API cannot set")
    }
}

impl BackendSpec {
    pub fn beyond_dataplane(&self) -> Option<&'static str> {
        if self.verifyhost.is_some() {
            return Some(
                "an upstream's servers get a certificate name to check (verifyhost), which the Dataplane API cannot set",
            );
        }
        if !self.queue.is_empty() {
            return Some(
                "an upstream's limits bound its queue with rules the Dataplane API cannot write",
            );
        }
        (!self.target.is_empty()).then_some(
            "a discovery-chain target's settings (hashing, timeouts, retries) are not in the Dataplane API's models",
        )
    }
}

impl ServerSpec {
    pub fn beyond_dataplane(&self) -> Option<&'static str> {
        if self.h2 {
            return Some(
                "an HTTP/2 app or exposed path needs `proto h2`, which the Dataplane API cannot set",
            );
        }
        if self.passive.is_some() {
            return Some(
                "an upstream's passive health check needs server options (observe, error-limit, on-error) the Dataplane API cannot set",
            );
        }
        self.alpn.as_ref().map(|_| {
            "an HTTP/2 upstream's servers need `alpn h2`, which the Dataplane API cannot set"
        })
    }
}

/// The template's `default-server` options for every checked server: down after two failed
/// checks, up again after one good one, and a check that is a plain TCP connect to the
/// instance's sidecar (no TLS handshake: the sidecar's port refuses until its HAProxy serves,
/// which is what the check needs to know, and it costs the peer no handshake).
pub const CHECK_DEFAULTS: &str = "fall 2 rise 1 no-check-ssl";
/// What a dynamic server gets instead, since `add server` inherits no `default-server` and
/// refuses `no-check-ssl`: an explicit check port (the server's own) makes the check a plain
/// TCP connect too (`haproxy::live` keeps it equal to the server's port).
pub const CHECK_DYNAMIC: &str = "fall 2 rise 1";

/// A listener's access-log format: `-log-format`'s, else `Proxy.AccessLogs`' for its mode,
/// else none (HAProxy's `httplog`/`tcplog`).
fn log_format(d: &Desired, mode: Mode) -> Option<String> {
    d.knobs.log_format.clone().or_else(|| {
        d.access_log.as_ref().map(|f| match mode {
            Mode::Http => f.http.clone(),
            Mode::Tcp => f.tcp.clone(),
        })
    })
}

/// The mesh TLS of the public listener (`incoming`) or of a connection to another sidecar.
/// Only the public listener trusts the peers' CAs: a server line trusts our own roots alone,
/// so a certificate a peer's CA signed never passes for one of our upstreams.
fn mesh_tls(d: &Desired, incoming: bool) -> MeshTls {
    let ca = if incoming {
        &d.paths.public_roots
    } else {
        &d.paths.roots
    };
    MeshTls {
        crt: d.paths.leaf.display().to_string(),
        ca_file: ca.display().to_string(),
        params: if incoming {
            d.mesh_tls.incoming.clone()
        } else {
            d.mesh_tls.outgoing.clone()
        },
    }
}

pub fn public_frontend(d: &Desired, p: &Public) -> FrontendSpec {
    FrontendSpec {
        name: PUBLIC_FRONTEND.into(),
        mode: p.mode,
        default_backend: Some(LOCAL_BACKEND.into()),
        log_format: log_format(d, p.mode),
        client_timeout_ms: p.client_timeout_ms,
        maxconn: p.max_connections,
        kind: FrontendKind::Public {
            app_header: p.app_header.clone(),
            xfcc: p.xfcc.clone(),
            plain_socket: p
                .permissive
                .then(|| d.paths.public_plain_socket.display().to_string()),
            intentions: d.intentions.then(|| IntentionsFilter {
                spoe_config: d.paths.spoe_conf.display().to_string(),
                fast_map: d.paths.intentions_map.display().to_string(),
                jwt_headers: d.jwt_headers.clone(),
            }),
            path_rules: p.mode == Mode::Http,
        },
    }
}

pub fn public_bind(d: &Desired, p: &Public) -> BindSpec {
    let bind = BindSpec {
        frontend: PUBLIC_FRONTEND.into(),
        name: "public".into(),
        address: p.bind_address.to_string(),
        port: Some(p.bind_port),
        unix_mode: None,
        tls: Some(mesh_tls(d, true)),
        h2: false,
        alpn: (p.mode == Mode::Http).then(|| "h2,http/1.1".to_string()),
        accept_proxy: false,
    };
    if p.permissive {
        // The public port is the front listener's (`permissive_sections`); this one takes
        // the connections it found a TLS hello on.
        BindSpec {
            address: d.paths.public_tls_socket.display().to_string(),
            port: None,
            accept_proxy: true,
            ..bind
        }
    } else {
        bind
    }
}

/// One listener of a mesh gateway: tcp, routed by SNI through the map, no default.
pub fn gateway_frontend(d: &Desired, l: &GatewayListener) -> FrontendSpec {
    FrontendSpec {
        name: l.name.into(),
        mode: Mode::Tcp,
        default_backend: None,
        log_format: d.knobs.log_format.clone(),
        client_timeout_ms: None,
        maxconn: None,
        kind: FrontendKind::Gateway {
            sni_map: d.paths.gateway_map.display().to_string(),
        },
    }
}

/// A gateway listener's address: no TLS, it is passed through.
pub fn gateway_bind(l: &GatewayListener) -> BindSpec {
    BindSpec {
        frontend: l.name.into(),
        name: l.name.into(),
        address: l.address.to_string(),
        port: Some(l.port),
        unix_mode: None,
        tls: None,
        h2: false,
        alpn: None,
        accept_proxy: false,
    }
}

/// A gateway route's backend: the exported service's local sidecars, in plain TCP (the mTLS
/// inside is the dialing sidecar's, passed through).
pub fn gateway_backend(d: &Desired, r: &GatewayRoute) -> BackendSpec {
    BackendSpec {
        name: r.backend.clone(),
        mode: Mode::Tcp,
        balance: Some(d.knobs.balance.clone()),
        connect_timeout_ms: GATEWAY_CONNECT_TIMEOUT,
        server_timeout_ms: None,
        forwardfor: false,
        verifyhost: None,
        target: Vec::new(),
        queue: Vec::new(),
    }
}

pub fn gateway_server(r: &GatewayRoute, slot: &Slot) -> ServerSpec {
    slot_spec((r.backend.as_str(), r.slots.len()), slot)
}

/// Consul's default connect timeout of a gateway's clusters.
pub const GATEWAY_CONNECT_TIMEOUT: Millis = Millis::constant(5000);

/// How long a gateway listener waits for a TLS hello before closing the connection.
pub const GATEWAY_INSPECT_DELAY: Millis = Millis::constant(5000);

pub fn local_backend(p: &Public) -> BackendSpec {
    BackendSpec {
        name: LOCAL_BACKEND.into(),
        mode: p.mode,
        balance: None,
        connect_timeout_ms: p.connect_timeout_ms,
        server_timeout_ms: p.server_timeout_ms,
        forwardfor: p.forwardfor,
        verifyhost: None,
        target: Vec::new(),
        queue: Vec::new(),
    }
}

pub fn local_server(p: &Public) -> ServerSpec {
    ServerSpec {
        backend: LOCAL_BACKEND.into(),
        name: "app".into(),
        address: p.app_address.to_string(),
        port: p.app_port,
        weight: None,
        tls: None,
        maintenance: false,
        // gRPC servers speak HTTP/2 in clear text only (h2c with prior knowledge).
        h2: p.h2,
        verifyhost: None,
        alpn: None,
        check_inter_ms: None,
        maxconn: None,
        passive: None,
    }
}

pub fn upstream_backend(d: &Desired, u: &UpstreamListener) -> BackendSpec {
    BackendSpec {
        name: u.backend.clone(),
        mode: u.mode,
        balance: Some(d.knobs.balance.clone()),
        connect_timeout_ms: u.connect_timeout_ms,
        server_timeout_ms: u.read_timeout_ms,
        forwardfor: false,
        verifyhost: u.verifyhost.clone(),
        target: Vec::new(),
        queue: u.limits.backend_lines(u.mode),
    }
}

pub fn upstream_frontend(d: &Desired, u: &UpstreamListener) -> FrontendSpec {
    FrontendSpec {
        name: u.name.clone(),
        mode: u.mode,
        default_backend: Some(u.backend.clone()),
        log_format: log_format(d, u.mode),
        client_timeout_ms: u.read_timeout_ms,
        maxconn: None,
        kind: FrontendKind::Upstream {
            routing: u.routing.as_ref().map_or_else(Vec::new, |r| {
                routing_lines(
                    &u.name,
                    u.mode,
                    &r.routes,
                    &d.paths.splits_map.display().to_string(),
                )
            }),
        },
    }
}

pub fn upstream_bind(u: &UpstreamListener) -> BindSpec {
    BindSpec {
        frontend: u.name.clone(),
        name: u.name.clone(),
        address: u.bind_address.clone(),
        port: u.socket.is_none().then_some(u.bind_port),
        unix_mode: u.socket.as_ref().and_then(|s| s.mode.clone()),
        tls: None,
        // A local gRPC client's h2c preface is recognised by HAProxy's http mode by itself,
        // and HTTP/1.1 clients keep working on the same port.
        h2: false,
        alpn: None,
        accept_proxy: false,
    }
}

/// Transparent mode's `DialedDirectly` backend of a service: one server that dials the
/// connection's original destination (`0.0.0.0:0`) with the mesh's mTLS, as the service's
/// own servers do. Rendered only (`objects::lines::outbound_sections`).
pub fn dialer_backend(d: &Desired, t: &Dialer) -> (BackendSpec, ServerSpec) {
    let backend = BackendSpec {
        name: t.backend.clone(),
        mode: t.mode,
        balance: None,
        connect_timeout_ms: t.connect_timeout_ms,
        server_timeout_ms: None,
        forwardfor: false,
        verifyhost: t.verifyhost.clone(),
        target: Vec::new(),
        queue: Vec::new(),
    };
    let server = ServerSpec {
        backend: t.backend.clone(),
        name: "direct".to_string(),
        address: "0.0.0.0".to_string(),
        port: 0,
        weight: None,
        tls: Some(mesh_tls(d, false)),
        maintenance: false,
        h2: false,
        verifyhost: None,
        alpn: t.h2.then(|| "h2".to_string()),
        check_inter_ms: None,
        maxconn: None,
        // No check runs on the original destination, and a passive check needs one.
        passive: None,
    };
    (backend, server)
}

/// The backend of one discovery-chain target.
pub fn target_backend(u: &UpstreamListener, t: &TargetBackend) -> BackendSpec {
    let mut target = Vec::new();
    if t.hash_consistent {
        target.push("hash-type consistent".to_string());
    }
    // The route's request timeout, else the upstream's read_timeout, as on its own backend.
    if let Some(ms) = t.request_timeout_ms.or(u.read_timeout_ms) {
        target.push(format!("timeout server {ms}"));
    }
    if let Some(r) = &t.retries {
        target.push(format!("retries {}", r.count));
        target.push(format!("retry-on {}", r.on.join(" ")));
    }
    BackendSpec {
        name: t.backend.clone(),
        mode: u.mode,
        balance: Some(t.balance.clone()),
        connect_timeout_ms: t.connect_timeout_ms,
        server_timeout_ms: None,
        forwardfor: false,
        verifyhost: t.verifyhost.clone(),
        target,
        queue: u.limits.backend_lines(u.mode),
    }
}

pub fn target_server(
    d: &Desired,
    u: &UpstreamListener,
    t: &TargetBackend,
    slot: &Slot,
) -> ServerSpec {
    let pool = (t.backend.as_str(), t.slots.len());
    slot_server(d, u, pool, slot, t.verifyhost.as_ref())
}

pub fn upstream_server(d: &Desired, u: &UpstreamListener, slot: &Slot) -> ServerSpec {
    let pool = (u.backend.as_str(), u.slots.len());
    slot_server(d, u, pool, slot, u.verifyhost.as_ref())
}

/// A slot of the backend named `pool.0`, which has `pool.1` slots.
fn slot_server(
    d: &Desired,
    u: &UpstreamListener,
    pool: (&str, usize),
    slot: &Slot,
    verifyhost: Option<&String>,
) -> ServerSpec {
    let spec = slot_spec(pool, slot);
    // A peered upstream's server is its forwarder on loopback, which originates the mesh TLS
    // and proves the peer on each connection; HAProxy's check would make a handshake with the
    // peer's gateway every interval, for nothing.
    if u.peer.is_some() {
        return ServerSpec {
            // The plain hop to the forwarder: HTTP/2 with prior knowledge (h2c).
            h2: u.h2,
            maxconn: u.limits.per_server,
            check_inter_ms: None,
            ..spec
        };
    }
    ServerSpec {
        tls: Some(mesh_tls(d, false)),
        verifyhost: verifyhost.cloned(),
        alpn: u.h2.then(|| "h2".to_string()),
        maxconn: u.limits.per_server,
        passive: u
            .passive
            .zip(spec.check_inter_ms)
            .map(|(p, inter)| p.server_options(u.mode, inter)),
        ..spec
    }
}

/// A slot of the backend named `pool.0`, which has `pool.1` slots, as a server without TLS:
/// its instance's address, or a free slot's; checked at the interval the pool's size gives.
fn slot_spec(pool: (&str, usize), slot: &Slot) -> ServerSpec {
    let (backend, slots) = pool;
    let (address, port, weight) = match &slot.instance {
        Some(s) => (s.address.to_string(), s.port, s.weight),
        None => (FREE_SLOT_ADDRESS.to_string(), FREE_SLOT_PORT, 1),
    };
    // An instance that has not proven its identity keeps its slot, in maintenance: it enters
    // service the moment it does, with no slot change.
    ServerSpec {
        backend: backend.to_string(),
        name: slot.name.clone(),
        address,
        port,
        weight: Some(weight),
        tls: None,
        maintenance: !slot.instance.as_ref().is_some_and(Server::in_service),
        h2: false,
        verifyhost: None,
        alpn: None,
        check_inter_ms: Some(crate::model::check_interval_ms(slots)),
        maxconn: None,
        passive: None,
    }
}

pub fn exposed_frontend(d: &Desired, e: &ExposedListener) -> FrontendSpec {
    FrontendSpec {
        name: e.name.clone(),
        mode: Mode::Http,
        default_backend: Some(e.backend.clone()),
        log_format: log_format(d, Mode::Http),
        client_timeout_ms: None,
        maxconn: None,
        kind: FrontendKind::Exposed {
            path: e.path.clone(),
            sources: e.sources.clone(),
        },
    }
}

pub fn exposed_bind(e: &ExposedListener) -> BindSpec {
    BindSpec {
        frontend: e.name.clone(),
        name: e.name.clone(),
        address: e.bind_address.to_string(),
        port: Some(e.bind_port),
        unix_mode: None,
        tls: None,
        h2: e.http2,
        alpn: None,
        accept_proxy: false,
    }
}

pub fn exposed_backend(e: &ExposedListener) -> BackendSpec {
    BackendSpec {
        name: e.backend.clone(),
        mode: Mode::Http,
        balance: None,
        connect_timeout_ms: e.connect_timeout_ms,
        server_timeout_ms: None,
        forwardfor: false,
        verifyhost: None,
        target: Vec::new(),
        queue: Vec::new(),
    }
}

pub fn exposed_server(e: &ExposedListener) -> ServerSpec {
    ServerSpec {
        backend: e.backend.clone(),
        name: "app".into(),
        address: e.app_address.to_string(),
        port: e.app_port,
        weight: None,
        tls: None,
        maintenance: false,
        h2: e.http2,
        verifyhost: None,
        alpn: None,
        check_inter_ms: None,
        maxconn: None,
        passive: None,
    }
}
