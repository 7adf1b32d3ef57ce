//! The HAProxy objects the sidecar manages from Consul's data (the public listener and its
//! local backend, one listener and backend per upstream), each described once from a
//! `Desired`. `render` writes them into haproxy.cfg as configuration lines (`lines`), and
//! `haproxy::{diff, dataplane}` send the same descriptions through the Dataplane API, so the
//! file and the deltas cannot drift apart. Pure.

use serde::Serialize;

use crate::model::chain::{Match, Route, TargetBackend, ValueMatch, SPLIT_SCALE};
use crate::model::gateway::{GatewayListener, GatewayRoute};
use crate::model::mesh::TlsParams;
use crate::model::transparent::{Outbound, PROBE_ADDRESS};
use crate::model::{
    AppHeader, Desired, ExposedListener, Mode, Public, Server, Slot, UpstreamListener,
    FREE_SLOT_ADDRESS, FREE_SLOT_PORT,
};
use crate::spoe::authz::GENERATION_PROBE;
use crate::value::{comment, Limit, Millis, Word};

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
    /// The public listener's `appname_header` rules. Rendered only, like `intentions`: the
    /// Dataplane API keeps a frontend's rules when it replaces the frontend, so a change of
    /// them goes through a full render (`Plan::full_render_reason`).
    pub app_header: Option<AppHeader>,
    /// The intentions filter, the rule that rejects what the agent did not allow and, in http
    /// mode, the per-request rules of L7 intentions. Rendered only: the Dataplane API keeps a
    /// frontend's filters and rules when it replaces the frontend, and the sidecar never turns
    /// intentions on or off while it runs; since the per-request rules depend on the mode,
    /// replacing this frontend goes through a full render (`Plan::needs_full_render`).
    pub intentions: Option<IntentionsFilter>,
    /// An exposed path's listener: the one path it serves (`path` matches it with any query
    /// string); every other request gets 404 from HAProxy. Dataplane API v1.2.5's rule models
    /// cannot carry `http-request return`, so such a frontend is only ever created by a full
    /// render (see `Plan::needs_full_render`).
    pub only_path: Option<String>,
    /// The only sources a connection may come from (an exposed check's listener); empty admits
    /// any. Rendered only, like `only_path`, on the frontends that carry `only_path`.
    pub only_sources: Vec<String>,
    /// An upstream's discovery-chain routing (`model::chain`): rules that pick a target's
    /// backend per request or connection. Rendered only, like `intentions`: a frontend with
    /// routing is only ever created by a full render (see `Plan::needs_full_render`).
    pub routing: Vec<String>,
    /// The public listener in http mode: a request whose path cannot be judged in one form is
    /// refused with 400 (`PATH_REFUSALS`), every other goes on with its path in normal form
    /// (`NORMALIZE`), whether or not intentions are enforced. Rendered only, like
    /// `intentions`: replacing the public frontend is a full render.
    pub path_rules: bool,
    /// A mesh gateway's listener: the SNI map its connections are routed by (`sni backend`
    /// per line). Rendered only: a gateway frontend is only ever created or replaced by a
    /// full render (`Plan::full_render_reason`).
    pub sni_map: Option<String>,
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
fn mesh_tls(d: &Desired, incoming: bool) -> MeshTls {
    MeshTls {
        crt: d.paths.leaf.display().to_string(),
        ca_file: d.paths.roots.display().to_string(),
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
        app_header: p.app_header.clone(),
        intentions: d.intentions.then(|| IntentionsFilter {
            spoe_config: d.paths.spoe_conf.display().to_string(),
            fast_map: d.paths.intentions_map.display().to_string(),
            jwt_headers: d.jwt_headers.clone(),
        }),
        only_path: None,
        only_sources: Vec::new(),
        routing: Vec::new(),
        path_rules: p.mode == Mode::Http,
        sni_map: None,
    }
}

pub fn public_bind(d: &Desired, p: &Public) -> BindSpec {
    BindSpec {
        frontend: PUBLIC_FRONTEND.into(),
        name: "public".into(),
        address: p.bind_address.to_string(),
        port: Some(p.bind_port),
        unix_mode: None,
        tls: Some(mesh_tls(d, true)),
        h2: false,
        alpn: (p.mode == Mode::Http).then(|| "h2,http/1.1".to_string()),
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
        app_header: None,
        intentions: None,
        only_path: None,
        only_sources: Vec::new(),
        routing: Vec::new(),
        path_rules: false,
        sni_map: Some(d.paths.gateway_map.display().to_string()),
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
        app_header: None,
        intentions: None,
        only_path: None,
        only_sources: Vec::new(),
        routing: u.routing.as_ref().map_or_else(Vec::new, |r| {
            routing_lines(
                &u.name,
                u.mode,
                &r.routes,
                &d.paths.splits_map.display().to_string(),
            )
        }),
        path_rules: false,
        sni_map: None,
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
    }
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
    ServerSpec {
        tls: Some(mesh_tls(d, false)),
        verifyhost: verifyhost.cloned(),
        alpn: u.h2.then(|| "h2".to_string()),
        maxconn: u.limits.per_server,
        ..slot_spec(pool, slot)
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
        app_header: None,
        intentions: None,
        only_path: Some(e.path.clone()),
        only_sources: e.sources.clone(),
        routing: Vec::new(),
        path_rules: false,
        sni_map: None,
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
    }
}

/// The SPOE filter's engine id (`[intentions]` in spoe.conf) and the group of the per-request
/// message (`spoe-group` there), as `send-spoe-group` names them.
pub const SPOE_ENGINE: &str = "intentions";
/// The backend of the intentions agent (rendered by the template) and its one server.
pub const SPOE_BACKEND: &str = "intentions_agent";
pub const SPOE_SERVER: &str = "agent";
pub const SPOE_REQUEST_GROUP: &str = "l7-request";
/// The group of the per-connection message on an http listener, sent by the frontend
/// (`FrontendSpec::lines`), as the spoe.conf template names it.
pub const SPOE_CONNECTION_GROUP: &str = "l4-check";

/// The public http listener's first rules: a request whose path cannot be judged in one form
/// gets 400 before anything else looks at it. No path starting with `/` (`GET *`, an
/// absolute-form target with no path, `http:/x`: HAProxy's `path` is then absent, which no
/// `-m beg` matches); an encoded slash or backslash, or a raw backslash (servers disagree on
/// whether they separate segments); a `%` not followed by two hex digits (the normalizers'
/// `strict` would refuse it too, but only after the intentions rules, which would send it to
/// the agent first). `l7::normalize_path` refuses the same paths. Actions Dataplane API
/// v1.2.5 knows, so its transactions keep them in place. (`\\` is one backslash to HAProxy.)
pub const PATH_REFUSALS: [&str; 3] = [
    "http-request deny deny_status 400 unless { path -m beg / }",
    r"http-request deny deny_status 400 if { path -m sub -i %2F %5C \\ }",
    "http-request deny deny_status 400 if { path -m reg %([0-9A-Fa-f]?[^0-9A-Fa-f]|[0-9A-Fa-f]?$) }",
];

/// The public http listener's last rules: the request goes on with its path in normal form
/// (RFC 3986 §6.2.2: unreserved characters decoded, escapes upper-cased, dot segments
/// removed; then slashes merged), so the app serves the path the intentions judged. Last,
/// because Dataplane API v1.2.5 does not know `normalize-uri` and moves the lines it does not
/// know to the end of their section in every transaction: rendered anywhere else, the file
/// would mean something else after the first transaction. So the rules before them see the
/// path as sent, and whatever judges it normalizes it the same way first (the fast map takes
/// only paths already in normal form, `ODD_PATH_PARTS`; the agent runs `l7::normalize_path`).
/// HAProxy marks `normalize-uri` experimental: the template's global section allows it.
pub const NORMALIZE: [&str; 5] = [
    "http-request normalize-uri percent-decode-unreserved strict",
    "http-request normalize-uri percent-to-uppercase strict",
    "http-request normalize-uri path-strip-dot",
    "http-request normalize-uri path-strip-dotdot full",
    "http-request normalize-uri path-merge-slashes",
];

/// A path that starts with `/` and holds none of these, nor ends with one of `ODD_PATH_ENDS`,
/// is its own normal form (`NORMALIZE` leaves it as it is): every `.` or `..` segment is
/// followed by `/` or ends the path, merging needs `//`, decoding needs `%`.
pub const ODD_PATH_PARTS: &str = "// /./ /../ %";
pub const ODD_PATH_ENDS: &str = "/. /..";

/// One `frontend` or `backend` section of haproxy.cfg.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Section {
    /// A comment line above the section, if any: always made by `value::comment`, so it is
    /// one line of printable ASCII whatever names it quotes.
    pub comment: Option<String>,
    /// `frontend <name>` or `backend <name>`.
    pub header: String,
    pub lines: Vec<String>,
}

impl FrontendSpec {
    pub fn lines(&self, bind: &BindSpec) -> Vec<String> {
        let mut l = vec![format!("mode {}", mode(self.mode))];
        if let Some(n) = self.maxconn {
            // Past it HAProxy stops accepting on this listener: further connections wait in
            // the kernel's backlog until one ends.
            l.push(format!("maxconn {n}"));
        }
        l.push(match &self.log_format {
            Some(f) => format!("log-format {f}"),
            None => format!("option {}log", mode(self.mode)),
        });
        if let Some(ms) = self.client_timeout_ms {
            l.push(format!("timeout client {ms}"));
        }
        l.push(bind.line());
        if !self.only_sources.is_empty() {
            // At connection time, before a byte is read: a refused source learns nothing.
            l.push(format!(
                "tcp-request connection reject unless {{ src {} }}",
                self.only_sources.join(" ")
            ));
        }
        if let Some(p) = &self.only_path {
            l.push(format!(
                "http-request return status 404 unless {{ path {p} }}"
            ));
        }
        if let Some(intentions) = &self.intentions {
            l.push(format!(
                "filter spoe engine {SPOE_ENGINE} config {}",
                intentions.spoe_config
            ));
            if self.mode == Mode::Http {
                // The connection's verdict is asked for once, and again only when the table's
                // generation (the fast map's `GENERATION_PROBE` entry) is not the one the
                // verdict was made under: one agent round trip per connection while nothing
                // changes, and a revoked intention or a new root reaches the next request.
                // No generation (no map, agent answered nothing) asks every time.
                l.push(format!(
                    "http-request set-var(txn.hcc_gen) str({GENERATION_PROBE}),map_reg({})",
                    intentions.fast_map
                ));
                l.push(format!(
                    "http-request send-spoe-group {SPOE_ENGINE} {SPOE_CONNECTION_GROUP} if !{{ var(sess.hcc.l7) -m bool }} !{{ var(sess.hcc.gen),strcmp(txn.hcc_gen) eq 0 }}"
                ));
                // SPOE never rejects by itself: a request the agent did not explicitly allow
                // the connection of (denied, agent down, timeout) is refused here, as Envoy's
                // RBAC answers on an http listener. This is what fails closed; it comes before
                // anything else reads the request, so a refused client learns nothing more.
                l.push(
                    "http-request deny deny_status 403 unless { var(sess.hcc.allow) -m bool }"
                        .into(),
                );
            } else {
                // SPOE never rejects by itself: a connection the agent did not explicitly allow
                // (denied, agent down, timeout) is rejected here. This is what fails closed.
                l.push("tcp-request content reject unless { var(sess.hcc.allow) -m bool }".into());
            }
        }
        // After the tcp-request rules, which HAProxy runs first wherever they are written
        // (and warns of one written after an http-request rule).
        if self.path_rules {
            l.extend(PATH_REFUSALS.iter().map(|r| r.to_string()));
        }
        if let Some(intentions) = &self.intentions {
            if self.mode == Mode::Http {
                // A connection let in for its HTTP permissions (sess.hcc.l7) has each request
                // judged: first by the fast map, under the key the agent gave the connection
                // (sess.hcc.l7key), which says `allow` only where the agent would; any other
                // request is sent to the agent. What neither allowed (denied, agent stalled,
                // timeout, no map) gets 403.
                //
                // The map is HAProxy's copy of the agent's table, so it is trusted only while the
                // agent answers its health checks (`srv_is_up`): a stalled agent fails them
                // within about 2 s, and from then on every request asks it and is refused
                // (fail closed), as when every request asked it.
                l.push("acl hcc_l7 var(sess.hcc.l7) -m bool".into());
                l.push("acl hcc_fast var(txn.hcc_l7) -m str allow".into());
                // `<key>:<method>:<path>`; set-var and concat, which Dataplane API v1.2.5's
                // parser knows (set-var-fmt came later), so its transactions keep the rules.
                let up = format!("{{ srv_is_up({SPOE_BACKEND}/{SPOE_SERVER}) }}");
                l.push(format!(
                    "http-request set-var(txn.hcc_l7m) method if hcc_l7 {up}"
                ));
                l.push(format!(
                    "http-request set-var(txn.hcc_l7p) path if hcc_l7 {up}"
                ));
                // Only a path already in normal form is looked up: the map's patterns are
                // for the normal form, which the path here is not yet when it could change
                // (see `NORMALIZE`); any other request asks the agent, which normalizes it
                // exactly as HAProxy will (`l7::normalize_path`).
                l.push(format!("acl hcc_odd_path path -m sub {ODD_PATH_PARTS}"));
                l.push(format!("acl hcc_odd_path path -m end {ODD_PATH_ENDS}"));
                l.push(format!(
                    "http-request set-var(txn.hcc_l7key) var(sess.hcc.l7key),concat(:,txn.hcc_l7m,:),concat(,txn.hcc_l7p,) if hcc_l7 {up} !hcc_odd_path"
                ));
                l.push(format!(
                    "http-request set-var(txn.hcc_l7) var(txn.hcc_l7key),map_reg({},agent) if {{ var(txn.hcc_l7key) -m found }}",
                    intentions.fast_map
                ));
                l.push(format!(
                    "http-request send-spoe-group {SPOE_ENGINE} {SPOE_REQUEST_GROUP} if hcc_l7 !hcc_fast"
                ));
                l.push(
                    "http-request deny deny_status 403 if hcc_l7 !hcc_fast !{ var(txn.hcc.req_allow) -m bool }"
                        .into(),
                );
                let h = &intentions.jwt_headers;
                for (i, name) in h.forward.iter().enumerate() {
                    l.push(format!("http-request del-header {name}"));
                    l.push(format!(
                        "http-request set-header {name} %[var(txn.hcc.jwt_payload)] if {{ var(txn.hcc.jwt_fwd) -m int {i} }}"
                    ));
                }
                for (i, name) in h.strip.iter().enumerate() {
                    l.push(format!(
                        "http-request del-header {name} if {{ var(txn.hcc.jwt_strip) -m int {i} }}"
                    ));
                }
            } else {
                // A tcp frontend cannot judge requests, so a connection the agent let in for
                // HTTP permissions is refused here whatever the agent's table believed the
                // mode to be (the table and this file change mode at different moments).
                l.push("tcp-request content reject if { var(sess.hcc.l7) -m bool }".into());
            }
        }
        if let Some(h) = &self.app_header {
            // Whatever the client sent under this name is dropped: only the agent's word
            // (the caller's service, from its certificate) reaches the app.
            l.push(format!("http-request del-header {}", h.name));
            if h.from_agent {
                l.push(format!(
                    "http-request set-header {} %[var(sess.hcc.app)] if {{ var(sess.hcc.app) -m found }}",
                    h.name
                ));
            }
        }
        if self.path_rules {
            l.extend(NORMALIZE.iter().map(|r| r.to_string()));
        }
        l.extend(self.routing.iter().cloned());
        if let Some(map) = &self.sni_map {
            // A mesh gateway never reads the traffic: it waits for the TLS hello, closes a
            // connection that sends none (at the delay, the hello fetch fails) or names no
            // exported service, and sends the rest to the route its SNI names. No default.
            l.push(format!("tcp-request inspect-delay {GATEWAY_INSPECT_DELAY}"));
            l.push("tcp-request content reject unless { req.ssl_hello_type 1 }".into());
            l.push(format!(
                "tcp-request content reject unless {{ req.ssl_sni,lower,map({map}) -m found }}"
            ));
            l.push("tcp-request content accept".into());
            l.push(format!("use_backend %[req.ssl_sni,lower,map({map})]"));
        }
        if let Some(b) = &self.default_backend {
            l.push(format!("default_backend {b}"));
        }
        l
    }
}

/// The rules that follow a chain: the route is decided once (the first whose matchers all
/// match), then the split leg by one random draw against thresholds read from the splits map,
/// then the first backend of the leg's group that has a usable server (`nbsrv`): failover in
/// order, decided per request, so a target that loses its last instance stops getting requests
/// as soon as its slot leaves service. A group whose every backend is empty still goes to its
/// first one, which answers 503.
pub fn routing_lines(frontend: &str, mode: Mode, routes: &[Route], map: &str) -> Vec<String> {
    let mut l = Vec::new();
    // Per request in http mode, per connection in tcp mode (a tcp stream is one connection).
    let rule = match mode {
        Mode::Http => "http-request",
        Mode::Tcp => "tcp-request content",
    };
    for (i, r) in routes.iter().enumerate() {
        l.push(format!("# route {i}: {}", comment(&describe(r))));
    }
    let http = mode == Mode::Http;
    let has_headers = |r: &Route| {
        !r.request_headers.is_empty()
            || !r.response_headers.is_empty()
            || r.splits
                .iter()
                .any(|s| !s.request_headers.is_empty() || !s.response_headers.is_empty())
    };
    let routed = routes.len() > 1
        || routes
            .iter()
            .any(|r| !r.matches.is_empty() || (http && has_headers(r)));
    if routed {
        for (i, r) in routes.iter().enumerate() {
            let mut cond = String::from("!{ var(txn.hcc_route) -m found }");
            for m in &r.matches {
                cond.push(' ');
                cond.push_str(&acl(m));
            }
            l.push(format!("{rule} set-var(txn.hcc_route) int({i}) if {cond}"));
        }
    }
    let route_cond = |i: usize| {
        if routed {
            format!(" {{ var(txn.hcc_route) -m int {i} }}")
        } else {
            String::new()
        }
    };
    if routes.iter().any(|r| r.splits.len() > 1) {
        l.push(format!("{rule} set-var(txn.hcc_split) rand({SPLIT_SCALE})"));
    }
    for (i, r) in routes.iter().enumerate() {
        let last = r.splits.len().saturating_sub(1);
        if last == 0 {
            continue;
        }
        // Each leg's threshold comes from the map, by key, so new weights need no new rules.
        for j in 0..last {
            l.push(format!(
                "{rule} set-var(txn.hcc_t{i}_{j}) str({}),map_str_int({map},{SPLIT_SCALE})",
                split_key(frontend, i, j)
            ));
        }
        // The first leg whose threshold is above the draw; the last takes what is left, so a
        // draw always lands.
        for j in 0..=last {
            let below = if j < last {
                format!(" {{ var(txn.hcc_split),sub(txn.hcc_t{i}_{j}) -m int lt 0 }}")
            } else {
                String::new()
            };
            l.push(format!(
                "{rule} set-var(txn.hcc_leg) int({j}) if{} !{{ var(txn.hcc_leg) -m found }}{below}",
                route_cond(i)
            ));
        }
    }
    if http {
        for (i, r) in routes.iter().enumerate() {
            if let Some((prefix, with)) = &r.prefix_rewrite {
                l.push(format!(
                    "http-request set-path {}%[path,bytes({})]{}",
                    log_format_literal(with.as_str()),
                    prefix.as_str().len(),
                    when(&route_cond(i))
                ));
            }
            header_lines(
                &mut l,
                &r.request_headers,
                &r.response_headers,
                &route_cond(i),
            );
            if r.splits.len() > 1 {
                for (j, s) in r.splits.iter().enumerate() {
                    let cond = format!("{} {{ var(txn.hcc_leg) -m int {j} }}", route_cond(i));
                    header_lines(&mut l, &s.request_headers, &s.response_headers, &cond);
                }
            }
        }
    }
    for (i, r) in routes.iter().enumerate() {
        for (j, s) in r.splits.iter().enumerate() {
            let mut cond = route_cond(i);
            if r.splits.len() > 1 {
                cond.push_str(&format!(" {{ var(txn.hcc_leg) -m int {j} }}"));
            }
            let Some(first) = s.group.first() else {
                continue;
            };
            if s.group.len() > 1 {
                for b in &s.group {
                    l.push(format!("use_backend {b} if{cond} {{ nbsrv({b}) gt 0 }}"));
                }
            }
            l.push(format!("use_backend {first}{}", when(&cond)));
        }
    }
    l
}

/// ` if <cond>` for a condition that starts with a space, nothing for none.
fn when(cond: &str) -> String {
    if cond.is_empty() {
        String::new()
    } else {
        format!(" if{cond}")
    }
}

/// A literal in a log-format argument (`set-path`, `set-header`): `%` starts a sample there.
fn log_format_literal(s: &str) -> String {
    s.replace('%', "%%")
}

/// A route's or leg's header changes, removals first, as Envoy applies them.
fn header_lines(
    l: &mut Vec<String>,
    request: &crate::model::chain::Headers,
    response: &crate::model::chain::Headers,
    cond: &str,
) {
    for (side, h) in [("http-request", request), ("http-response", response)] {
        for name in &h.remove {
            l.push(format!("{side} del-header {name}{}", when(cond)));
        }
        for (verb, list) in [("set-header", &h.set), ("add-header", &h.add)] {
            for (name, value) in list {
                l.push(format!(
                    "{side} {verb} {name} {}{}",
                    log_format_literal(value.as_str()),
                    when(cond)
                ));
            }
        }
    }
}

fn split_key(frontend: &str, route: usize, split: usize) -> String {
    format!("{frontend}/{route}/{split}")
}

/// Every split threshold `d` asks for, as the splits map holds it: key, then the draw
/// (`rand(SPLIT_SCALE)`) below which the split takes a request. Empty without splitters.
pub fn split_thresholds(d: &Desired) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for u in &d.upstreams {
        for (i, r) in u.routing.iter().flat_map(|r| r.routes.iter()).enumerate() {
            for (j, s) in r
                .splits
                .iter()
                .enumerate()
                .take(r.splits.len().saturating_sub(1))
            {
                out.push((split_key(&u.name, i, j), s.upto));
            }
        }
    }
    out
}

/// A route as `--dry-run` readers want it: what it matches and where it goes, failover
/// included.
fn describe(r: &Route) -> String {
    let matches = if r.matches.is_empty() {
        "everything".to_string()
    } else {
        r.matches.iter().map(acl).collect::<Vec<_>>().join(" ")
    };
    let to: Vec<String> = r
        .splits
        .iter()
        .map(|s| {
            s.group
                .iter()
                .map(|b| b.rsplit_once(".t.").map_or(b.as_str(), |(_, t)| t))
                .collect::<Vec<_>>()
                .join(", failover ")
        })
        .collect();
    // Weights stay out of the rules (and so out of this comment): they live in the splits
    // map, which changes without a reload.
    let to = if to.len() > 1 {
        format!("split by the splits map between {}", to.join("; "))
    } else {
        to.concat()
    };
    let rewrite = match &r.prefix_rewrite {
        Some((p, w)) => format!(", {p} rewritten to {w}"),
        None => String::new(),
    };
    format!("{matches} -> {to}{rewrite}")
}

/// One matcher as an HAProxy condition. Envoy matches whole header values and whole paths
/// for regexes, so regexes are anchored and headers read as full lines (`req.fhdr`).
fn acl(m: &Match) -> String {
    let value = |fetch: &str, v: &ValueMatch| match v {
        ValueMatch::Present => format!("{{ {fetch} -m found }}"),
        ValueMatch::Exact(x) => format!("{{ {fetch} -m str {x} }}"),
        ValueMatch::Prefix(x) => format!("{{ {fetch} -m beg {x} }}"),
        ValueMatch::Suffix(x) => format!("{{ {fetch} -m end {x} }}"),
        ValueMatch::Regex(x) => format!("{{ {fetch} -m reg ^(?:{x})$ }}"),
    };
    match m {
        Match::PathExact(p) => format!("{{ path -m str {p} }}"),
        Match::PathPrefix(p) => format!("{{ path -m beg {p} }}"),
        Match::PathRegex(p) => format!("{{ path -m reg ^(?:{p})$ }}"),
        Match::Methods(ms) => {
            let ms: Vec<&str> = ms.iter().map(Word::as_str).collect();
            format!("{{ method {} }}", ms.join(" "))
        }
        Match::Header {
            name,
            value: v,
            invert,
        } => {
            let fetch = match v {
                ValueMatch::Present => format!("req.hdr({name})"),
                _ => format!("req.fhdr({name})"),
            };
            let c = value(&fetch, v);
            if *invert {
                format!("!{c}")
            } else {
                c
            }
        }
        Match::Query { name, value: v } => value(&format!("url_param({name})"), v),
    }
}

impl BindSpec {
    pub fn line(&self) -> String {
        let mut s = match self.port {
            Some(p) => format!("bind {}:{p} name {}", self.address, self.name),
            None => format!("bind {} name {}", self.address, self.name),
        };
        if let Some(m) = &self.unix_mode {
            s.push_str(&format!(" mode {m}"));
        }
        if let Some(t) = &self.tls {
            s.push_str(&format!(" ssl {}", t.options()));
        }
        if let Some(a) = &self.alpn {
            s.push_str(&format!(" alpn {a}"));
        }
        if self.h2 {
            s.push_str(" proto h2");
        }
        s
    }
}

impl MeshTls {
    /// The certificate options of a mesh connection, either side.
    pub fn options(&self) -> String {
        format!(
            "crt {} ca-file {} verify required{}",
            self.crt,
            self.ca_file,
            self.params.options()
        )
    }
}

impl BackendSpec {
    pub fn lines(&self, servers: &[ServerSpec]) -> Vec<String> {
        let mut l = vec![format!("mode {}", mode(self.mode))];
        if let Some(b) = &self.balance {
            l.push(format!("balance {b}"));
        }
        // Milliseconds, written bare as the Dataplane API writes them.
        l.push(format!("timeout connect {}", self.connect_timeout_ms));
        if let Some(ms) = self.server_timeout_ms {
            l.push(format!("timeout server {ms}"));
        }
        if self.forwardfor {
            l.push("option forwardfor".into());
        }
        if let Some(name) = &self.verifyhost {
            // No `sni` on the servers: without SNI, HAProxy checks the certificate against
            // this name (its DNS SANs, then its CN).
            l.push(format!("default-server verifyhost {name}"));
        }
        l.extend(self.target.iter().cloned());
        l.extend(self.queue.iter().cloned());
        l.extend(servers.iter().map(ServerSpec::line));
        l
    }
}

impl ServerSpec {
    pub fn line(&self) -> String {
        let mut s = format!("server {} {}:{}", self.name, self.address, self.port);
        if self.maintenance {
            s.push_str(" disabled");
        }
        if let Some(t) = &self.tls {
            s.push_str(" ssl");
            if let Some(w) = self.weight {
                s.push_str(&format!(" weight {w}"));
            }
            s.push_str(&format!(" {}", t.options()));
            if let Some(a) = &self.alpn {
                s.push_str(&format!(" alpn {a}"));
            }
        } else if let Some(w) = self.weight {
            s.push_str(&format!(" weight {w}"));
        }
        if let Some(n) = self.maxconn {
            s.push_str(&format!(" maxconn {n}"));
        }
        if self.h2 {
            s.push_str(" proto h2");
        }
        if let Some(ms) = self.check_inter_ms {
            // Milliseconds, bare, as the Dataplane API writes them.
            s.push_str(&format!(" check inter {ms}"));
        }
        s
    }
}

pub fn mode(m: Mode) -> &'static str {
    match m {
        Mode::Tcp => "tcp",
        Mode::Http => "http",
    }
}

/// The sections `d` asks for, in file order: the public listener, its local backend, each
/// upstream's listener and backend, then each exposed path's.
pub fn sections(d: &Desired) -> Vec<Section> {
    let mut out = Vec::new();
    if let Some(p) = &d.public {
        out.push(Section {
            comment: None,
            header: format!("frontend {PUBLIC_FRONTEND}"),
            lines: public_frontend(d, p).lines(&public_bind(d, p)),
        });
        out.push(Section {
            comment: None,
            header: format!("backend {LOCAL_BACKEND}"),
            lines: local_backend(p).lines(&[local_server(p)]),
        });
    }
    if let Some(g) = &d.gateway {
        for l in &g.listeners {
            out.push(Section {
                comment: Some(comment(&format!("mesh gateway {}: {}", d.service, l.name))),
                header: format!("frontend {}", l.name),
                lines: gateway_frontend(d, l).lines(&gateway_bind(l)),
            });
        }
        for r in &g.routes {
            let servers: Vec<ServerSpec> = r.slots.iter().map(|s| gateway_server(r, s)).collect();
            let snis: Vec<&str> = r.snis.iter().map(|s| s.as_str()).collect();
            out.push(Section {
                comment: Some(comment(&format!(
                    "exported service {} (SNI {})",
                    r.service,
                    snis.join(", ")
                ))),
                header: format!("backend {}", r.backend),
                lines: gateway_backend(d, r).lines(&servers),
            });
        }
    }
    for u in &d.upstreams {
        let servers: Vec<ServerSpec> = u.slots.iter().map(|s| upstream_server(d, u, s)).collect();
        if !u.implicit {
            out.push(Section {
                comment: Some(comment(&format!("upstream: {}", u.destination))),
                header: format!("frontend {}", u.name),
                lines: upstream_frontend(d, u).lines(&upstream_bind(u)),
            });
        }
        out.push(Section {
            comment: u
                .implicit
                .then(|| comment(&format!("implicit upstream: {}", u.destination))),
            header: format!("backend {}", u.backend),
            lines: upstream_backend(d, u).lines(&servers),
        });
        for t in u.routing.iter().flat_map(|r| r.targets.iter()) {
            let servers: Vec<ServerSpec> =
                t.slots.iter().map(|s| target_server(d, u, t, s)).collect();
            out.push(Section {
                comment: Some(comment(&target_comment(t))),
                header: format!("backend {}", t.backend),
                lines: target_backend(u, t).lines(&servers),
            });
        }
    }
    if let Some(o) = &d.transparent {
        out.extend(outbound_sections(d, o));
    }
    for e in &d.exposed {
        out.push(Section {
            comment: Some(comment(&exposed_comment(e))),
            header: format!("frontend {}", e.name),
            lines: exposed_frontend(d, e).lines(&exposed_bind(e)),
        });
        out.push(Section {
            comment: None,
            header: format!("backend {}", e.backend),
            lines: exposed_backend(e).lines(&[exposed_server(e)]),
        });
    }
    out
}

/// Transparent mode's outbound listener.
pub const OUTBOUND_FRONTEND: &str = "hcc_outbound";
/// Where a connection to no mesh service goes: its original destination (`0.0.0.0:0`: the
/// address and port the client dialed, as HAProxy reads them from the redirected socket).
pub const PASSTHROUGH_BACKEND: &str = "be_hcc_passthrough";

/// The outbound listener (tcp: a connection is routed by the address it was sent to before
/// the redirect, `dst`, looked up in the transparent map) and its passthrough backend.
/// Rendered only: a change of either takes a full render (`diff::Plan::transparent_changed`),
/// while the routes change live through the map.
pub fn outbound_sections(d: &Desired, o: &Outbound) -> Vec<Section> {
    let map = d.paths.transparent_map.display().to_string();
    let found = format!("{{ dst,map_ip({map}) -m found }}");
    let mut lines = vec![
        "mode tcp".to_string(),
        format!("bind {}:{}", o.bind_address, o.port),
        // A connection dialed to the listener itself (not redirected) would come back to it.
        format!(
            "tcp-request connection reject if {{ dst {} }} {{ dst_port {} }}",
            o.bind_address, o.port
        ),
        // The sidecar's own probe (`supervisor::redirect`), should its traffic be redirected.
        format!("tcp-request connection reject if {{ dst {PROBE_ADDRESS} }}"),
    ];
    if o.mesh_only {
        lines.push(format!("tcp-request connection reject unless {found}"));
    }
    lines.push(format!("use_backend %[dst,map_ip({map})] if {found}"));
    lines.push(format!("default_backend {PASSTHROUGH_BACKEND}"));
    vec![
        Section {
            comment: Some(comment(&format!(
                "transparent proxy: outbound listener, {} route(s){}",
                o.routes.len(),
                if o.mesh_only {
                    ", mesh destinations only"
                } else {
                    ", others passed through"
                }
            ))),
            header: format!("frontend {OUTBOUND_FRONTEND}"),
            lines,
        },
        Section {
            comment: None,
            header: format!("backend {PASSTHROUGH_BACKEND}"),
            lines: vec![
                "mode tcp".to_string(),
                "server passthrough 0.0.0.0:0".to_string(),
            ],
        },
    ]
}

/// The comment above a chain target's backend: the target and whom its servers must be.
pub fn target_comment(t: &TargetBackend) -> String {
    let i = &t.identity;
    format!(
        "chain target {}: service {}{} in {} (namespace {}, partition {})",
        t.id,
        i.service,
        if t.subset.is_empty() {
            String::new()
        } else {
            format!(" subset {}", t.subset)
        },
        i.datacenter,
        i.namespace,
        i.partition
    )
}

/// The comment above an exposed path's listener: the path, and the check it serves.
pub fn exposed_comment(e: &ExposedListener) -> String {
    let proto = if e.http2 { "http2" } else { "http" };
    match &e.check {
        Some(c) => format!("exposed path: {} ({proto}, check {c})", e.path),
        None => format!("exposed path: {} ({proto})", e.path),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{settings_in, snapshot, ANY};

    /// The public frontend with intentions: in http mode the per-request rules (fast map
    /// lookup while the agent is up, the agent for the rest, 403 for what neither allowed); in
    /// tcp mode an L7-marked connection is refused, since nothing there can judge its requests.
    #[test]
    fn the_public_frontend_judges_l7_requests_in_http_and_refuses_them_in_tcp() {
        let dir = std::path::Path::new("/hcc-test");
        let s = snapshot(ANY, "server-sidecar-proxy", "ca-leaf-server.json");
        let mut d = crate::model::build(&s, &settings_in(dir, true), None).unwrap();
        let lines = |d: &Desired| {
            public_frontend(d, d.sidecar())
                .lines(&public_bind(d, d.sidecar()))
                .join("\n")
        };
        d.sidecar_mut().mode = Mode::Tcp;
        let tcp = lines(&d);
        assert!(
            tcp.contains("tcp-request content reject if { var(sess.hcc.l7) -m bool }"),
            "{tcp}"
        );
        assert!(!tcp.contains("http-request"), "{tcp}");
        assert!(
            tcp.contains("tcp-request content reject unless { var(sess.hcc.allow) -m bool }"),
            "{tcp}"
        );
        d.sidecar_mut().mode = Mode::Http;
        let http = lines(&d);
        assert!(!http.contains("tcp-request content reject"), "{http}");
        for want in [
            // The connection's verdict: asked for while the table's generation is not the one
            // it was made under, then every request refused without it.
            "http-request set-var(txn.hcc_gen) str(generation),map_reg(/hcc-test/intentions.map)",
            "http-request send-spoe-group intentions l4-check if !{ var(sess.hcc.l7) -m bool } !{ var(sess.hcc.gen),strcmp(txn.hcc_gen) eq 0 }",
            "http-request deny deny_status 403 unless { var(sess.hcc.allow) -m bool }",
            "map_reg(/hcc-test/intentions.map,agent)",
            "srv_is_up(intentions_agent/agent)",
            "http-request send-spoe-group intentions l7-request if hcc_l7 !hcc_fast",
            "http-request deny deny_status 403 if hcc_l7 !hcc_fast !{ var(txn.hcc.req_allow) -m bool }",
        ] {
            assert!(http.contains(want), "{want} missing:\n{http}");
        }
        assert!(!http.contains("reject if { var(sess.hcc.l7)"), "{http}");
    }

    /// An http public listener, with intentions or without: paths that cannot be judged in
    /// one form are refused before any other rule, and the normalizers come after every rule
    /// that reads the path (where Dataplane API v1.2.5's transactions move them anyway); the
    /// fast map is looked up only for a path already in normal form. A tcp listener has none
    /// of it.
    #[test]
    fn an_http_public_listener_refuses_odd_paths_first_and_normalizes_last() {
        let dir = std::path::Path::new("/hcc-test");
        let s = snapshot(ANY, "server-sidecar-proxy", "ca-leaf-server.json");
        for intentions in [true, false] {
            let mut d = crate::model::build(&s, &settings_in(dir, intentions), None).unwrap();
            d.sidecar_mut().mode = Mode::Http;
            let lines = public_frontend(&d, d.sidecar()).lines(&public_bind(&d, d.sidecar()));
            let at = |want: &str| {
                lines
                    .iter()
                    .position(|l| l == want)
                    .unwrap_or_else(|| panic!("{want} missing:\n{}", lines.join("\n")))
            };
            let first_http = lines
                .iter()
                .position(|l| l.starts_with("http-request"))
                .unwrap();
            // Before the refusals only the connection's verdict (with intentions), which
            // reads no path.
            let first_refusal = at(PATH_REFUSALS[0]);
            assert_eq!(first_refusal - first_http, if intentions { 3 } else { 0 });
            assert!(lines[first_http..first_refusal]
                .iter()
                .all(|l| !l.contains("path")));
            for (i, r) in PATH_REFUSALS.iter().enumerate() {
                assert_eq!(at(r), first_refusal + i, "{}", lines.join("\n"));
            }
            let first_normalizer = at(NORMALIZE[0]);
            assert_eq!(
                &lines[first_normalizer..first_normalizer + NORMALIZE.len()],
                NORMALIZE.as_slice()
            );
            let reads_path = lines
                .iter()
                .rposition(|l| l.contains("path") && !l.contains("normalize-uri"))
                .unwrap();
            assert!(reads_path < first_normalizer, "{}", lines.join("\n"));
            assert_eq!(lines.last().unwrap(), "default_backend local_app");
            let key = lines.iter().find(|l| l.contains("set-var(txn.hcc_l7key)"));
            assert_eq!(key.is_some(), intentions);
            if let Some(key) = key {
                assert!(key.ends_with(" !hcc_odd_path"), "{key}");
            }
            d.sidecar_mut().mode = Mode::Tcp;
            let tcp = public_frontend(&d, d.sidecar())
                .lines(&public_bind(&d, d.sidecar()))
                .join("\n");
            assert!(!tcp.contains("http-request"), "{tcp}");
        }
    }

    /// A path HAProxy's fast map may look up (one no `hcc_odd_path` test matches) is its own
    /// normal form, so the map and the agent judge the same path.
    #[test]
    fn a_path_the_fast_map_sees_is_its_own_normal_form() {
        use crate::spoe::authz::l7::normalize_path;
        let parts: Vec<&str> = ODD_PATH_PARTS.split(' ').collect();
        let ends: Vec<&str> = ODD_PATH_ENDS.split(' ').collect();
        let mut seen = 0;
        for p in sample_paths(50_000) {
            let odd = parts.iter().any(|x| p.contains(x)) || ends.iter().any(|x| p.ends_with(x));
            if odd {
                continue;
            }
            if let Ok(n) = normalize_path(&p) {
                seen += 1;
                assert_eq!(n, p, "the fast map would judge {p:?}, the agent {n:?}");
            }
        }
        assert!(seen > 1_000, "only {seen} plain paths");
    }

    /// Paths made of the characters normalization cares about, `/`-first, deterministic.
    fn sample_paths(n: usize) -> Vec<String> {
        let alphabet = [
            '/', '/', '.', '.', '%', '2', 'e', 'E', 'f', 'F', '6', '1', 'a', '5', 'c', '\\',
        ];
        let mut x: u64 = 0x2545_f491_4f6c_dd1d;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                let mut y = x;
                let mut p = String::from("/");
                for _ in 0..1 + (x % 10) {
                    p.push(alphabet[(y % alphabet.len() as u64) as usize]);
                    y /= alphabet.len() as u64;
                }
                p
            })
            .collect()
    }

    /// Stops the HAProxy a test started, by its PID.
    struct Haproxy(std::process::Child);
    impl Drop for Haproxy {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    /// The agent's `normalize_path` is what a real HAProxy running the public listener's path
    /// rules does: the same refusals (400) and the same normal form forwarded, over the
    /// issue's paths, `l7`'s table and a few hundred made-up ones.
    #[test]
    fn haproxy_normalizes_paths_as_the_agent_does() {
        use crate::spoe::authz::l7::normalize_path;
        use std::io::{Read, Write};
        let dir = std::env::temp_dir().join(format!("hcc-normalize-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let f = FrontendSpec {
            name: "t".into(),
            mode: Mode::Http,
            default_backend: Some("be".into()),
            sni_map: None,
            log_format: None,
            intentions: None,
            only_path: None,
            only_sources: Vec::new(),
            routing: Vec::new(),
            path_rules: true,
            app_header: None,
            client_timeout_ms: None,
            maxconn: None,
        };
        let bind = BindSpec {
            frontend: "t".into(),
            name: "t".into(),
            address: "127.0.0.1".into(),
            port: Some(port),
            unix_mode: None,
            tls: None,
            h2: false,
            alpn: None,
        };
        let mut lines = f.lines(&bind);
        // What the app would be sent: the path after every rule, echoed.
        lines.insert(
            lines.len() - 1,
            "http-request return status 200 content-type text/plain lf-string \"[%[path]]\"".into(),
        );
        let cfg = format!(
            "global\n    expose-experimental-directives\ndefaults\n    timeout connect 5s\n    \
             timeout client 5s\n    timeout server 5s\nfrontend t\n    {}\nbackend be\n    mode http\n",
            lines.join("\n    ")
        );
        let path = dir.join("haproxy.cfg");
        std::fs::write(&path, &cfg).unwrap();
        let _haproxy = Haproxy(
            std::process::Command::new("haproxy")
                .args(["-db", "-f"])
                .arg(&path)
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .expect("haproxy must be installed (scripts/install-deps)"),
        );
        let ask = |target: &str| -> Option<(u16, String)> {
            let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
            c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
                .ok()?;
            // One write: pieces would wait on Nagle and the delayed ACK, 40 ms each request.
            c.write_all(format!("GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())
                .ok()?;
            let mut out = String::new();
            c.read_to_string(&mut out).ok()?;
            let status = out.get(9..12)?.parse().ok()?;
            let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
            Some((status, body))
        };
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while ask("/").is_none() {
            assert!(
                std::time::Instant::now() < deadline,
                "haproxy never answered\n{cfg}"
            );
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
        let mut targets: Vec<String> = [
            "//admin",
            "/./admin",
            "/x/../admin",
            "/%61dmin",
            "/x/%2e%2e/admin",
            "/admin%2Fx",
            "/admin%5c",
            "/a\\b",
            "/%zz",
            "/a%",
            "http://host",
            "*",
            "http://h/x/../admin",
            "/a//../b",
            "/a/..//b",
            "/.../a/..",
            "/%c3%a9",
            "/%2561dmin",
            "//ok",
            "/%6Fk",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        targets.extend(sample_paths(400));
        let mut wrong = Vec::new();
        for t in &targets {
            let got = ask(t);
            // An absolute-form target's path is the part after the authority.
            let p = t.strip_prefix("http://h").unwrap_or(t);
            let want = match normalize_path(p) {
                Ok(n) => Some((200, format!("[{n}]"))),
                Err(_) => Some((400, String::new())),
            };
            let same = match (&got, &want) {
                (Some((400, _)), Some((400, _))) => true,
                _ => got == want,
            };
            if !same {
                wrong.push(format!("{t:?}: haproxy {got:?}, agent {want:?}"));
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
        assert!(wrong.is_empty(), "{}\n{cfg}", wrong.join("\n"));
    }
}
