//! Specs written as haproxy.cfg lines: one `frontend`/`backend` section per object, in the
//! form the Dataplane API writes them, plus the sections only a full render writes (transparent
//! mode's outbound listener).

use serde::Serialize;

use crate::model::chain::TargetBackend;
use crate::model::transparent::{direct_map_path, hosts_map_path, Outbound, PROBE_ADDRESS};
use crate::model::{AppHeader, Desired, ExposedListener, Mode, Public, Xfcc};
use crate::spoe::authz::GENERATION_PROBE;
use crate::spoe::server::XFCC_VAR;
use crate::value::comment;

use super::spec::{
    dialer_backend, BackendSpec, BindSpec, FrontendKind, FrontendSpec, IntentionsFilter, MeshTls,
    ServerSpec, GATEWAY_INSPECT_DELAY,
};

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

/// The header the public http listener sets from the client certificate, as Envoy names it.
pub const XFCC_HEADER: &str = "X-Forwarded-Client-Cert";

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

/// The http public listener's idle keep-alive connections (the pools of the peers' sidecars,
/// `http-reuse always` in ours) are what an old worker closes at a reload, racing with a
/// request a peer is just sending on one: that request is lost (a 502, or a close without an
/// answer, from the peer's HAProxy; seen in `tests/e2e/convergence.rs`). With this option the
/// old worker keeps them for one more request, answered with `Connection: close`, for at most
/// `hard-stop-after`. HAProxy refuses it outside http mode, so it is the frontend's line, not
/// the defaults section's. Upstream listeners go without it: Dataplane API v1.2.5 cannot set
/// it on the listeners it creates, and their clients are apps, whose HTTP clients retry an
/// idempotent request on a reused connection closed without an answer (RFC 9112 §9.3.1).
pub const IDLE_CLOSE_ON_RESPONSE: &str = "option idle-close-on-response";

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
        if self.mode == Mode::Http && matches!(self.kind, FrontendKind::Public { .. }) {
            l.push(IDLE_CLOSE_ON_RESPONSE.to_string());
        }
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
        match &self.kind {
            FrontendKind::Exposed { path, sources } => {
                if !sources.is_empty() {
                    // At connection time, before a byte is read: a refused source learns nothing.
                    l.push(format!(
                        "tcp-request connection reject unless {{ src {} }}",
                        sources.join(" ")
                    ));
                }
                l.push(format!(
                    "http-request return status 404 unless {{ path {path} }}"
                ));
            }
            FrontendKind::Public {
                app_header,
                xfcc,
                plain_socket,
                intentions,
                path_rules,
            } => {
                if let Some(path) = plain_socket {
                    // What the front listener found no TLS hello on (`permissive_sections`).
                    l.push(format!("bind {path} name public_plain accept-proxy"));
                }
                public_rules(
                    &mut l,
                    self.mode,
                    (app_header, xfcc),
                    (intentions.as_ref(), plain_socket.is_some()),
                    *path_rules,
                )
            }
            FrontendKind::Upstream { routing } => l.extend(routing.iter().cloned()),
            FrontendKind::Gateway { sni_map: map } => {
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
        }
        if let Some(b) = &self.default_backend {
            l.push(format!("default_backend {b}"));
        }
        l
    }
}

/// The public listener's rules, after its bind: the intentions filter and verdicts, the path
/// refusals and normalizers of http mode, and the `appname_header` rules.
fn public_rules(
    l: &mut Vec<String>,
    mode: Mode,
    (app_header, xfcc): (&Option<AppHeader>, &Option<Xfcc>),
    (intentions, permissive): (Option<&IntentionsFilter>, bool),
    path_rules: bool,
) {
    // Permissive: intentions judge TLS connections only, as Consul documents; a plaintext
    // one has no certificate to judge and is let through (no agent round trip either).
    let tls_only = if permissive { " { ssl_fc }" } else { "" };
    if let Some(intentions) = intentions {
        l.push(format!(
            "filter spoe engine {SPOE_ENGINE} config {}",
            intentions.spoe_config
        ));
        if mode == Mode::Http {
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
                "http-request send-spoe-group {SPOE_ENGINE} {SPOE_CONNECTION_GROUP} if !{{ var(sess.hcc.l7) -m bool }} !{{ var(sess.hcc.gen),strcmp(txn.hcc_gen) eq 0 }}{tls_only}"
            ));
            // SPOE never rejects by itself: a request the agent did not explicitly allow
            // the connection of (denied, agent down, timeout) is refused here, as Envoy's
            // RBAC answers on an http listener. This is what fails closed; it comes before
            // anything else reads the request, so a refused client learns nothing more.
            l.push(if permissive {
                "http-request deny deny_status 403 if !{ var(sess.hcc.allow) -m bool } { ssl_fc }"
                    .into()
            } else {
                "http-request deny deny_status 403 unless { var(sess.hcc.allow) -m bool }".into()
            });
        } else {
            // SPOE never rejects by itself: a connection the agent did not explicitly allow
            // (denied, agent down, timeout) is rejected here. This is what fails closed.
            l.push(if permissive {
                "tcp-request content reject if !{ var(sess.hcc.allow) -m bool } { ssl_fc }".into()
            } else {
                "tcp-request content reject unless { var(sess.hcc.allow) -m bool }".into()
            });
        }
    }
    // After the tcp-request rules, which HAProxy runs first wherever they are written
    // (and warns of one written after an http-request rule).
    if path_rules {
        l.extend(PATH_REFUSALS.iter().map(|r| r.to_string()));
    }
    if let Some(intentions) = intentions {
        if mode == Mode::Http {
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
    if let Some(x) = xfcc {
        // Never the client's: Consul's Envoy sanitizes the header and sets its own.
        l.push(format!("http-request del-header {XFCC_HEADER}"));
        if let Some(by) = &x.by {
            // The rest (`Hash`, `Cert`, `Chain`, `Subject`, `URI`, `DNS`) is the agent's
            // reading of the certificate HAProxy verified, made once when it allowed the
            // connection. A `%` of our ID is literal to HAProxy.
            l.push(format!(
                "http-request set-header {XFCC_HEADER} By={};%[var(sess.hcc.{XFCC_VAR})] if {{ var(sess.hcc.{XFCC_VAR}) -m found }}",
                by.as_str().replace('%', "%%")
            ));
        }
    }
    if let Some(h) = app_header {
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
    if path_rules {
        l.extend(NORMALIZE.iter().map(|r| r.to_string()));
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
        if self.accept_proxy {
            s.push_str(" accept-proxy");
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
        if let Some(p) = &self.passive {
            s.push_str(&format!(" {p}"));
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

/// Transparent mode's outbound listener.
pub const OUTBOUND_FRONTEND: &str = "hcc_outbound";
/// Where a connection to no mesh service goes: its original destination (`0.0.0.0:0`: the
/// address and port the client dialed, as HAProxy reads them from the redirected socket).
pub const PASSTHROUGH_BACKEND: &str = "be_hcc_passthrough";

/// The session variable holding a connection's original destination as the direct map keys
/// it (`transparent::direct_key`).
const DIRECT_VAR: &str = "sess.hcc_dst";

/// The outbound listener and its backends. tcp: a connection is routed by where it was sent
/// before the redirect: an instance's own address and port (`DialedDirectly`, the direct
/// map), else its virtual IP (the transparent map). A connection to an http service's virtual
/// IP is read as HTTP (`switch-mode http`) and each request routed by its `Host` (the hosts
/// map), falling back to that virtual IP's service; every other connection stays tcp, so a
/// tcp service's bytes are never parsed. Rendered only: a change of the lines, a hop or a
/// dialer takes a full render (`index`'s rendered-only part), while the routes change live
/// through the maps.
pub fn outbound_sections(d: &Desired, o: &Outbound) -> Vec<Section> {
    let map = d.paths.transparent_map.display().to_string();
    let hosts = hosts_map_path(&d.paths).display().to_string();
    let direct = direct_map_path(&d.paths).display().to_string();
    let found = format!("{{ dst,map_ip({map}) -m found }}");
    let direct_found = format!("{{ var({DIRECT_VAR}),map_str({direct}) -m found }}");
    let http = format!("{{ dst,map_str({hosts}) -m found }}");
    let host = format!("req.hdr(host),lower,field(1,:),map_str({hosts})");
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
        format!("tcp-request connection set-var-fmt({DIRECT_VAR}) %[dst]:%[dst_port]"),
    ];
    if o.mesh_only {
        lines.push(format!(
            "tcp-request connection reject unless {found} || {direct_found}"
        ));
    }
    lines.push(format!("tcp-request content switch-mode http if {http}"));
    lines.push(format!(
        "use_backend %[var({DIRECT_VAR}),map_str({direct})] if {direct_found}"
    ));
    lines.push(format!(
        "use_backend %[{host}] if {http} {{ {host} -m found }}"
    ));
    lines.push(format!("use_backend %[dst,map_ip({map})] if {found}"));
    lines.push(format!("default_backend {PASSTHROUGH_BACKEND}"));
    let mut sections = vec![
        Section {
            comment: Some(comment(&format!(
                "transparent proxy: outbound listener, {} route(s), {} host name(s), {} direct address(es){}",
                o.routes.len(),
                o.hosts.len(),
                o.direct.len(),
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
    ];
    for h in &o.hops {
        let mut server = format!("server hop unix@{}", h.socket);
        if h.h2 {
            server.push_str(" proto h2");
        }
        sections.push(Section {
            comment: Some(comment(&format!(
                "implicit upstream {}: to its own listener, which follows its discovery chain",
                h.service
            ))),
            header: format!("backend {}", h.backend),
            lines: vec![format!("mode {}", mode(h.mode)), server],
        });
    }
    for t in &o.dialers {
        let (backend, server) = dialer_backend(d, t);
        sections.push(Section {
            comment: Some(comment(&format!(
                "implicit upstream {}: its instances dialed directly, mTLS to the original destination",
                t.service
            ))),
            header: format!("backend {}", backend.name),
            lines: backend.lines(&[server]),
        });
    }
    sections
}

/// The front listener of a permissive public port and its two backends: a connection whose
/// first bytes are a TLS hello goes to the mTLS listener's socket; plaintext goes to its
/// plaintext socket only when its original destination (`dst_port`, which HAProxy reads through
/// the redirect's NAT) was the app's own port, as Consul's Envoy accepts plaintext only for the
/// service's port reached through the transparent-proxy redirect. Plaintext sent to the public
/// port itself is refused. Both hops carry a PROXY header so the listener sees the client's
/// address. A client that sends nothing first (a server-speaks-first protocol) is judged as
/// plaintext after the delay. Rendered only, like the outbound listener.
pub fn permissive_sections(d: &Desired, p: &Public) -> Vec<Section> {
    let backend = |name: &str, socket: &std::path::Path| Section {
        comment: None,
        header: format!("backend {name}"),
        lines: vec![
            "mode tcp".to_string(),
            format!("server listener {} send-proxy-v2", socket.display()),
        ],
    };
    let hello = "{ req.ssl_hello_type 1 }";
    vec![
        Section {
            comment: Some(comment(
                "MutualTLSMode permissive: mTLS and plaintext on the public port",
            )),
            header: format!("frontend {PERMISSIVE_FRONTEND}"),
            lines: vec![
                "mode tcp".to_string(),
                "option tcplog".to_string(),
                format!(
                    "bind {}:{} name {PERMISSIVE_FRONTEND}",
                    p.bind_address, p.bind_port
                ),
                format!("tcp-request inspect-delay {PERMISSIVE_INSPECT_DELAY}"),
                format!("tcp-request content accept if {hello}"),
                // Evaluated only once the hello rule above has given up (data or delay).
                format!(
                    "tcp-request content reject unless {{ dst_port {} }}",
                    p.app_port
                ),
                format!("use_backend {PERMISSIVE_TLS_BACKEND} if {hello}"),
                format!("default_backend {PERMISSIVE_PLAIN_BACKEND}"),
            ],
        },
        backend(PERMISSIVE_TLS_BACKEND, &d.paths.public_tls_socket),
        backend(PERMISSIVE_PLAIN_BACKEND, &d.paths.public_plain_socket),
    ]
}

/// The permissive public port's front listener and its backends.
pub const PERMISSIVE_FRONTEND: &str = "public_front";
pub const PERMISSIVE_TLS_BACKEND: &str = "public_front_tls";
pub const PERMISSIVE_PLAIN_BACKEND: &str = "public_front_plain";
/// How long the front listener waits for a client's first bytes.
pub const PERMISSIVE_INSPECT_DELAY: crate::value::Millis = crate::value::Millis::constant(5000);

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
