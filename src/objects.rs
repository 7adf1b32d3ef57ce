//! The HAProxy objects the sidecar manages from Consul's data (the public listener and its
//! local backend, one listener and backend per upstream), each described once from a
//! `Desired`. `render` writes them into haproxy.cfg as configuration lines (`lines`), and
//! `haproxy::{diff, dataplane}` send the same descriptions through the Dataplane API, so the
//! file and the deltas cannot drift apart. Pure.

use serde::Serialize;

use crate::model::chain::{Match, Route, TargetBackend, ValueMatch, SPLIT_SCALE};
use crate::model::{
    AppHeader, Desired, ExposedListener, Mode, Public, Server, Slot, UpstreamListener,
    FREE_SLOT_ADDRESS, FREE_SLOT_PORT,
};
use crate::value::{comment, Limit, Millis, Word};

pub const PUBLIC_FRONTEND: &str = "public_listener";
pub const LOCAL_BACKEND: &str = "local_app";

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshTls {
    pub crt: String,
    pub ca_file: String,
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
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FrontendSpec {
    pub name: String,
    pub mode: Mode,
    pub default_backend: String,
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
}

/// The files the public frontend's intentions rules name.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct IntentionsFilter {
    /// The SPOE configuration (`filter spoe … config`).
    pub spoe_config: String,
    /// The fast map of L7 decisions (`AuthzTable::fast_map`), looked up per request of an L7
    /// connection before asking the agent (http mode).
    pub fast_map: String,
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
}

fn mesh_tls(d: &Desired) -> MeshTls {
    MeshTls {
        crt: d.paths.leaf.display().to_string(),
        ca_file: d.paths.roots.display().to_string(),
    }
}

pub fn public_frontend(d: &Desired) -> FrontendSpec {
    FrontendSpec {
        name: PUBLIC_FRONTEND.into(),
        mode: d.public.mode,
        default_backend: LOCAL_BACKEND.into(),
        log_format: d.knobs.log_format.clone(),
        client_timeout_ms: d.public.client_timeout_ms,
        maxconn: d.public.max_connections,
        app_header: d.public.app_header.clone(),
        intentions: d.intentions.then(|| IntentionsFilter {
            spoe_config: d.paths.spoe_conf.display().to_string(),
            fast_map: d.paths.intentions_map.display().to_string(),
        }),
        only_path: None,
        only_sources: Vec::new(),
        routing: Vec::new(),
    }
}

pub fn public_bind(d: &Desired) -> BindSpec {
    BindSpec {
        frontend: PUBLIC_FRONTEND.into(),
        name: "public".into(),
        address: d.public.bind_address.to_string(),
        port: Some(d.public.bind_port),
        unix_mode: None,
        tls: Some(mesh_tls(d)),
        h2: false,
    }
}

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
        h2: false,
        verifyhost: None,
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
    }
}

pub fn upstream_frontend(d: &Desired, u: &UpstreamListener) -> FrontendSpec {
    FrontendSpec {
        name: u.name.clone(),
        mode: u.mode,
        default_backend: u.backend.clone(),
        log_format: d.knobs.log_format.clone(),
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
        h2: false,
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
    }
}

pub fn target_server(d: &Desired, t: &TargetBackend, slot: &Slot) -> ServerSpec {
    slot_server(d, &t.backend, slot, t.verifyhost.as_ref())
}

pub fn upstream_server(d: &Desired, u: &UpstreamListener, slot: &Slot) -> ServerSpec {
    slot_server(d, &u.backend, slot, u.verifyhost.as_ref())
}

fn slot_server(d: &Desired, backend: &str, slot: &Slot, verifyhost: Option<&String>) -> ServerSpec {
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
        tls: Some(mesh_tls(d)),
        maintenance: !slot.instance.as_ref().is_some_and(Server::in_service),
        h2: false,
        verifyhost: verifyhost.cloned(),
    }
}

pub fn exposed_frontend(d: &Desired, e: &ExposedListener) -> FrontendSpec {
    FrontendSpec {
        name: e.name.clone(),
        mode: Mode::Http,
        default_backend: e.backend.clone(),
        log_format: d.knobs.log_format.clone(),
        client_timeout_ms: None,
        maxconn: None,
        app_header: None,
        intentions: None,
        only_path: Some(e.path.clone()),
        only_sources: e.sources.clone(),
        routing: Vec::new(),
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
    }
}

/// The SPOE filter's engine id (`[intentions]` in spoe.conf) and the group of the per-request
/// message (`spoe-group` there), as `send-spoe-group` names them.
pub const SPOE_ENGINE: &str = "intentions";
/// The backend of the intentions agent (rendered by the template) and its one server.
pub const SPOE_BACKEND: &str = "intentions_agent";
pub const SPOE_SERVER: &str = "agent";
pub const SPOE_REQUEST_GROUP: &str = "l7-request";

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
            // SPOE never rejects by itself: a connection the agent did not explicitly allow
            // (denied, agent down, timeout) is rejected here. This is what fails closed.
            l.push("tcp-request content reject unless { var(sess.hcc.allow) -m bool }".into());
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
                l.push(format!(
                    "http-request set-var(txn.hcc_l7key) var(sess.hcc.l7key),concat(:,txn.hcc_l7m,:),concat(,txn.hcc_l7p,) if hcc_l7 {up}"
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
        l.extend(self.routing.iter().cloned());
        l.push(format!("default_backend {}", self.default_backend));
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
        if self.h2 {
            s.push_str(" proto h2");
        }
        s
    }
}

impl MeshTls {
    /// The certificate options of a mesh connection, either side.
    pub fn options(&self) -> String {
        format!("crt {} ca-file {} verify required", self.crt, self.ca_file)
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
        } else if let Some(w) = self.weight {
            s.push_str(&format!(" weight {w}"));
        }
        if self.h2 {
            s.push_str(" proto h2");
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
    let mut out = vec![
        Section {
            comment: None,
            header: format!("frontend {PUBLIC_FRONTEND}"),
            lines: public_frontend(d).lines(&public_bind(d)),
        },
        Section {
            comment: None,
            header: format!("backend {LOCAL_BACKEND}"),
            lines: local_backend(&d.public).lines(&[local_server(&d.public)]),
        },
    ];
    for u in &d.upstreams {
        let servers: Vec<ServerSpec> = u.slots.iter().map(|s| upstream_server(d, u, s)).collect();
        out.push(Section {
            comment: Some(comment(&format!("upstream: {}", u.destination))),
            header: format!("frontend {}", u.name),
            lines: upstream_frontend(d, u).lines(&upstream_bind(u)),
        });
        out.push(Section {
            comment: None,
            header: format!("backend {}", u.backend),
            lines: upstream_backend(d, u).lines(&servers),
        });
        for t in u.routing.iter().flat_map(|r| r.targets.iter()) {
            let servers: Vec<ServerSpec> = t.slots.iter().map(|s| target_server(d, t, s)).collect();
            out.push(Section {
                comment: Some(comment(&target_comment(t))),
                header: format!("backend {}", t.backend),
                lines: target_backend(u, t).lines(&servers),
            });
        }
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
        let lines = |d: &Desired| public_frontend(d).lines(&public_bind(d)).join("\n");
        d.public.mode = Mode::Tcp;
        let tcp = lines(&d);
        assert!(
            tcp.contains("tcp-request content reject if { var(sess.hcc.l7) -m bool }"),
            "{tcp}"
        );
        assert!(!tcp.contains("http-request"), "{tcp}");
        d.public.mode = Mode::Http;
        let http = lines(&d);
        for want in [
            "tcp-request content reject unless { var(sess.hcc.allow) -m bool }",
            "map_reg(/hcc-test/intentions.map,agent)",
            "srv_is_up(intentions_agent/agent)",
            "http-request send-spoe-group intentions l7-request if hcc_l7 !hcc_fast",
            "http-request deny deny_status 403 if hcc_l7 !hcc_fast !{ var(txn.hcc.req_allow) -m bool }",
        ] {
            assert!(http.contains(want), "{want} missing:\n{http}");
        }
        assert!(!http.contains("reject if { var(sess.hcc.l7)"), "{http}");
    }
}
