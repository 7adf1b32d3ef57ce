//! The Consul agent client: one-shot reads, blocking reads, and finding the proxy to serve.

use std::collections::BTreeMap;
use std::net::{SocketAddr, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use super::api::{self, AgentService};
use super::servers::{self, Server};
use super::source::Source;
use super::{DestinationKey, DestinationKind};
use crate::config::{ConsulSettings, Endpoint, Login, Secret, Target, TlsFiles};
use crate::error::{Context, Error, Result};
use crate::http::encode;
use crate::http::{self, Credential};

const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(15);

/// The Consul client the whole run shares (clones share the server list, the current server
/// and the token): one local agent, or agentless, the servers of `-http-addr` in turn.
#[derive(Clone, Debug)]
pub struct Consul {
    servers: Arc<Servers>,
    auth: Arc<Auth>,
    source: Source,
}

#[derive(Debug)]
struct Servers {
    /// `-http-addr` as given, its TLS files and the resolver: what a new resolution starts
    /// from.
    endpoints: Vec<Endpoint>,
    tls: TlsFiles,
    resolver: Resolve,
    /// The servers as last resolved (`servers::expand`), replaced whole.
    list: RwLock<Arc<ServerList>>,
    /// The server requests go to first; moved on when a request to it fails.
    current: AtomicUsize,
}

/// Resolves `host:port` to addresses: the system's resolver, or a test's.
#[derive(Clone)]
struct Resolve(Arc<ResolveFn>);

type ResolveFn = dyn Fn(&str) -> Result<Vec<SocketAddr>> + Send + Sync;

impl Resolve {
    fn system() -> Resolve {
        Resolve(Arc::new(|name| {
            name.to_socket_addrs()
                .map(Iterator::collect)
                .map_err(|e| Error::with_source("the system resolver", e))
        }))
    }
}

impl std::fmt::Debug for Resolve {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Resolve")
    }
}

#[derive(Debug)]
struct ServerList {
    servers: Vec<Server>,
    clients: Vec<http::Client>,
}

impl ServerList {
    /// Resolves `endpoints` now; each resolution's outcome is logged at `level`.
    fn resolve(
        endpoints: &[Endpoint],
        tls: &TlsFiles,
        resolver: &Resolve,
        level: log::Level,
    ) -> Result<ServerList> {
        let (servers, notes) = servers::expand(endpoints, |name| (resolver.0)(name));
        for n in notes {
            log::log!(level, "{n}");
        }
        let clients = servers
            .iter()
            .map(|s| {
                http::Client::pinned(s.endpoint.clone(), s.pinned, tls, Credential::None)
                    .with_context(|| format!("setting up the Consul client for {s}"))
            })
            .collect::<Result<Vec<_>>>()?;
        if clients.is_empty() {
            return Err(Error::msg("no Consul address to talk to"));
        }
        Ok(ServerList { servers, clients })
    }
}

impl Servers {
    fn list(&self) -> Arc<ServerList> {
        match self.list.read() {
            Ok(l) => l.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Every server of `failed` failed: resolves the names again, and says whether that gave
    /// another list (then the one in use, from its first server).
    fn resolve_again(&self, failed: &Arc<ServerList>) -> bool {
        if !servers::any_named(&self.endpoints) {
            return false;
        }
        let Ok(mut slot) = self.list.write() else {
            return false;
        };
        if !Arc::ptr_eq(&slot, failed) {
            // Another thread resolved meanwhile: try its list.
            return true;
        }
        match ServerList::resolve(
            &self.endpoints,
            &self.tls,
            &self.resolver,
            log::Level::Debug,
        ) {
            Ok(fresh) if fresh.servers != failed.servers => {
                log::info!(
                    "every Consul server failed; resolved again: {}",
                    fresh
                        .servers
                        .iter()
                        .map(Server::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                *slot = Arc::new(fresh);
                self.current.store(0, Ordering::SeqCst);
                true
            }
            _ => false,
        }
    }
}

/// The token requests carry: fixed (`-token`), or an ACL login's, replaced when Consul no
/// longer knows it.
#[derive(Debug)]
struct Auth {
    token: RwLock<Option<Secret>>,
    login: Option<Login>,
    /// Held while logging in, so that threads whose token failed at once log in once.
    logging_in: Mutex<()>,
    /// Set by `logout`: a watcher still running then must not log in again.
    logged_out: AtomicBool,
}

/// Logs out (`Consul::logout`) when dropped: held for a whole run, so that every way out of
/// it, an error included, destroys the login's token.
pub struct LogoutOnDrop(pub Consul);

impl Drop for LogoutOnDrop {
    fn drop(&mut self) {
        self.0.logout();
    }
}

/// What a (blocking) read returned.
pub struct Answer {
    pub status: u16,
    pub body: String,
    pub index: Option<u64>,
    pub content_hash: Option<String>,
    /// `X-Consul-Default-Acl-Policy`, sent by Consul 1.10+ with every answer.
    pub default_acl_policy: Option<String>,
}

impl Answer {
    fn from(resp: http::Response) -> Answer {
        Answer {
            status: resp.status,
            index: resp
                .header("X-Consul-Index")
                .and_then(|v| v.trim().parse().ok()),
            content_hash: resp.header("X-Consul-ContentHash").map(str::to_string),
            default_acl_policy: resp
                .header("X-Consul-Default-Acl-Policy")
                .map(str::to_string),
            body: resp.body,
        }
    }
}

/// Why no proxy could be chosen. `Missing` may fix itself (the registration may come later);
/// `Ambiguous` is a configuration error.
#[derive(Debug)]
pub enum LookupError {
    Missing(String),
    Ambiguous(String),
    Consul(Error),
}

impl std::fmt::Display for LookupError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            LookupError::Missing(m) | LookupError::Ambiguous(m) => f.write_str(m),
            LookupError::Consul(e) => write!(f, "{e}"),
        }
    }
}

/// Consul's answer to a request whose token it does not know (revoked, expired, logged out).
pub fn token_unknown(status: u16, body: &str) -> bool {
    status == 403 && body.contains("ACL not found")
}

/// The body of `/v1/acl/login`.
pub fn login_body(login: &Login, bearer: &str) -> String {
    let mut body = serde_json::json!({
        "AuthMethod": login.auth_method.as_str(),
        "BearerToken": bearer,
    });
    if !login.meta.is_empty() {
        body["Meta"] = serde_json::json!(login.meta);
    }
    body.to_string()
}

/// The query of `/v1/acl/login` and `/v1/acl/logout`: the auth method's datacenter,
/// namespace and partition.
pub fn login_query(login: &Login) -> String {
    let params: Vec<String> = [
        ("dc", &login.datacenter),
        ("ns", &login.namespace),
        ("partition", &login.partition),
    ]
    .into_iter()
    .filter_map(|(k, v)| v.as_ref().map(|v| format!("{k}={}", encode(v.as_str()))))
    .collect();
    if params.is_empty() {
        String::new()
    } else {
        format!("?{}", params.join("&"))
    }
}

impl Consul {
    pub fn new(settings: &ConsulSettings) -> Result<Consul> {
        Consul::with_resolver(settings, Resolve::system())
    }

    fn with_resolver(settings: &ConsulSettings, resolver: Resolve) -> Result<Consul> {
        let list = ServerList::resolve(
            &settings.endpoints,
            &settings.tls,
            &resolver,
            log::Level::Info,
        )?;
        Ok(Consul {
            servers: Arc::new(Servers {
                endpoints: settings.endpoints.clone(),
                tls: settings.tls.clone(),
                resolver,
                list: RwLock::new(Arc::new(list)),
                current: AtomicUsize::new(0),
            }),
            auth: Arc::new(Auth {
                token: RwLock::new(settings.token.clone()),
                login: settings.login.clone(),
                logging_in: Mutex::new(()),
                logged_out: AtomicBool::new(false),
            }),
            source: Source::new(settings.catalog_node.as_ref()),
        })
    }

    /// Where the registration is read from, and which paths that takes.
    pub fn source(&self) -> &Source {
        &self.source
    }

    /// The server requests go to now.
    pub fn endpoint(&self) -> String {
        let list = self.servers.list();
        let i = self.servers.current.load(Ordering::SeqCst) % list.servers.len();
        list.servers[i].to_string()
    }

    /// A GET that may block: Consul holds it until the content changes or `wait` passes.
    pub fn get(&self, path: &str, wait: Option<Duration>) -> Result<Answer> {
        // Consul adds up to wait/16 of jitter before answering; the client must outwait it.
        let timeout = match wait {
            Some(w) => w + w / 16 + Duration::from_secs(10),
            None => ONE_SHOT_TIMEOUT,
        };
        self.request("GET", path, None, timeout).map(Answer::from)
    }

    pub fn send(&self, method: &str, path: &str, body: Option<&str>) -> Result<Answer> {
        self.request(method, path, body, ONE_SHOT_TIMEOUT)
            .with_context(|| format!("{method} {path} on Consul"))
            .map(Answer::from)
    }

    /// One request with the current token; with a login, a token Consul no longer knows is
    /// replaced by a new login and the request sent once more.
    fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<http::Response> {
        let token = self.token()?;
        let resp = self.exchange(method, path, body, timeout, token.as_ref())?;
        if self.auth.login.is_none() || !token_unknown(resp.status, &resp.body) {
            return Ok(resp);
        }
        let token = self.login(token.as_ref())?;
        self.exchange(method, path, body, timeout, Some(&token))
    }

    /// Sends to the current server, and on a transport error to each next one in turn; the
    /// first that answers becomes the current one. When every one failed and a name is among
    /// them, the names are resolved again and a new list tried once. A blocking query keeps its
    /// index: every server of a cluster counts the same Raft index.
    fn exchange(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
        token: Option<&Secret>,
    ) -> Result<http::Response> {
        let send = |c: &http::Client| c.send_as(method, path, body, timeout, token);
        let list = self.servers.list();
        match self.on_each_server(&list, &send) {
            Err(e) if self.servers.resolve_again(&list) => {
                let fresh = self.servers.list();
                self.on_each_server(&fresh, &send)
                    .map_err(|again| again.context(format!("and before that: {e}")))
            }
            other => other,
        }
    }

    /// `send` to the current server of `list`, then to each next one until one answers.
    fn on_each_server(
        &self,
        list: &ServerList,
        send: &dyn Fn(&http::Client) -> Result<http::Response>,
    ) -> Result<http::Response> {
        let n = list.clients.len();
        let first = self.servers.current.load(Ordering::SeqCst);
        let mut failed: Option<(usize, Error)> = None;
        // The last answer of a server without a cluster leader: given back when no server did
        // better (with one server, at once), so the caller judges it as before.
        let mut leaderless: Option<http::Response> = None;
        for k in 0..n {
            let i = servers::nth_after(first, k, n);
            match send(&list.clients[i]) {
                Ok(resp)
                    if n > 1
                        && servers::leaderless(
                            resp.status,
                            &resp.body,
                            resp.header("X-Consul-Knownleader"),
                        ) =>
                {
                    if failed.is_none() {
                        let why = format!("it answered {} with no cluster leader", resp.status);
                        failed = Some((i, Error::msg(why)));
                    }
                    leaderless = Some(resp);
                }
                Ok(resp) => {
                    if let Some((f, e)) = failed {
                        // Only the first thread to notice moves the list on, and logs it.
                        if self
                            .servers
                            .current
                            .compare_exchange(first, i, Ordering::SeqCst, Ordering::SeqCst)
                            .is_ok()
                        {
                            log::warn!(
                                "Consul server {} failed ({e}); now using {}",
                                list.servers[f],
                                list.servers[i]
                            );
                        }
                    }
                    return Ok(resp);
                }
                Err(e) => {
                    if failed.is_none() {
                        failed = Some((i, e));
                    }
                }
            }
        }
        if let Some(resp) = leaderless {
            return Ok(resp);
        }
        Err(failed.map_or_else(|| Error::msg("no Consul server"), |(_, e)| e))
    }

    /// The token to send: the fixed one, the login's, or a new login's when none is held.
    fn token(&self) -> Result<Option<Secret>> {
        let held = self.auth.token.read().map(|t| t.clone()).unwrap_or(None);
        if held.is_some() || self.auth.login.is_none() {
            return Ok(held);
        }
        self.login(None).map(Some)
    }

    /// Logs in, unless another thread already replaced `failed` (the token that did not work,
    /// or `None` before the first login). The bearer file is read each time: it is rotated.
    fn login(&self, failed: Option<&Secret>) -> Result<Secret> {
        let login = self
            .auth
            .login
            .as_ref()
            .ok_or_else(|| Error::msg("no -login-auth-method to log in with"))?;
        let _one = self
            .auth
            .logging_in
            .lock()
            .map_err(|_| Error::msg("the login lock is poisoned"))?;
        if self.auth.logged_out.load(Ordering::SeqCst) {
            return Err(Error::msg("logged out of Consul: the run is ending"));
        }
        let held = self.auth.token.read().map(|t| t.clone()).unwrap_or(None);
        if let Some(t) = held.filter(|t| Some(t) != failed) {
            return Ok(t);
        }
        if failed.is_some() {
            log::warn!(
                "Consul no longer knows the login token (revoked or expired); logging in again with {}",
                login.auth_method
            );
        }
        let path = &login.bearer_token_path;
        let bearer = std::fs::read_to_string(path)
            .with_context(|| format!("reading the bearer token {}", path.display()))?;
        let bearer = bearer.trim();
        if bearer.is_empty() {
            return Err(Error::msg(format!(
                "the bearer token file {} is empty",
                path.display()
            )));
        }
        let url = format!("/v1/acl/login{}", login_query(login));
        let resp = self.exchange(
            "POST",
            &url,
            Some(&login_body(login, bearer)),
            ONE_SHOT_TIMEOUT,
            None,
        )?;
        if resp.status != 200 {
            return Err(Error::msg(format!(
                "logging in with the auth method {}: status {}: {}",
                login.auth_method,
                resp.status,
                resp.body.trim().chars().take(200).collect::<String>()
            )));
        }
        let v: serde_json::Value = api::parse("the login's token", &resp.body)?;
        let secret = v
            .get("SecretID")
            .and_then(serde_json::Value::as_str)
            .filter(|s| !s.is_empty())
            .ok_or_else(|| Error::msg("the login's answer has no SecretID"))?;
        let accessor = v
            .get("AccessorID")
            .and_then(serde_json::Value::as_str)
            .unwrap_or("?");
        log::info!(
            "logged in to Consul with the auth method {} (token accessor {accessor})",
            login.auth_method
        );
        let token = Secret::new(secret);
        if let Ok(mut t) = self.auth.token.write() {
            *t = Some(token.clone());
        }
        Ok(token)
    }

    /// Destroys the login's token (`/v1/acl/logout`), so that no token outlives the run. Does
    /// nothing without a login or before one; a failure is logged, never fatal.
    pub fn logout(&self) {
        let Some(login) = &self.auth.login else {
            return;
        };
        // Under the login lock: a login under way finishes first, and none starts after.
        let _one = self.auth.logging_in.lock();
        self.auth.logged_out.store(true, Ordering::SeqCst);
        let Some(token) = self.auth.token.write().ok().and_then(|mut t| t.take()) else {
            return;
        };
        let url = format!("/v1/acl/logout{}", login_query(login));
        match self.exchange("POST", &url, None, ONE_SHOT_TIMEOUT, Some(&token)) {
            Ok(r) if r.status == 200 => log::info!("logged out of Consul"),
            Ok(r) => log::warn!(
                "logging out of Consul: status {}: {}",
                r.status,
                r.body.trim().chars().take(200).collect::<String>()
            ),
            Err(e) => log::warn!("logging out of Consul: {e}"),
        }
    }

    /// The agent's own address (`/v1/agent/self` `Member.Addr`); `None` when the token may
    /// not read the agent (403).
    pub fn agent_address(&self) -> Result<Option<String>> {
        let answer = self.get(AGENT_SELF_PATH, None)?;
        match answer.status {
            200 => {}
            403 => return Ok(None),
            s => {
                return Err(Error::msg(format!(
                    "status {s} for {AGENT_SELF_PATH}: {}",
                    answer.body.trim()
                )))
            }
        }
        let me: serde_json::Value = api::parse("the agent's configuration", &answer.body)?;
        me.pointer("/Member/Addr")
            .and_then(serde_json::Value::as_str)
            .filter(|a| !a.is_empty())
            .map(|a| Some(a.to_string()))
            .ok_or_else(|| Error::msg(format!("{AGENT_SELF_PATH} has no Member.Addr")))
    }

    /// A one-shot GET that must answer 200; its body.
    pub fn get_ok(&self, path: &str) -> Result<String> {
        let answer = self
            .get(path, None)
            .with_context(|| format!("asking Consul at {} for {path}", self.endpoint()))?;
        if answer.status != 200 {
            return Err(Error::msg(format!(
                "Consul at {} answered {path} with status {}: {}",
                self.endpoint(),
                answer.status,
                answer.body.trim()
            )));
        }
        Ok(answer.body)
    }

    /// Finds the ID of the `connect-proxy` to serve, as `consul connect proxy -sidecar-for`
    /// does, among the agent's services or, agentless, the catalog node's.
    pub fn find_proxy(&self, target: &Target) -> std::result::Result<String, LookupError> {
        let path = self.source.services_path();
        let body = self.get_ok(&path).map_err(LookupError::Consul)?;
        let services = self
            .source
            .parse_services(&body)
            .map_err(LookupError::Consul)?;
        choose_proxy(&services, target)
    }
}

/// The pure part of the proxy lookup, over the agent's `/v1/agent/services` map.
pub fn choose_proxy(
    services: &BTreeMap<String, AgentService>,
    target: &Target,
) -> std::result::Result<String, LookupError> {
    let proxies: Vec<&AgentService> = services
        .values()
        .filter(|s| s.kind == "connect-proxy")
        .collect();
    let describe = |list: &[&AgentService]| {
        if list.is_empty() {
            "none".to_string()
        } else {
            list.iter()
                .map(|p| {
                    let dest = p
                        .proxy
                        .as_ref()
                        .map_or("?", |c| c.destination_service_id.as_str());
                    format!("{} (for {dest})", p.id)
                })
                .collect::<Vec<_>>()
                .join(", ")
        }
    };
    let service_id = match target {
        Target::ProxyId(id) => {
            return match services.get(id) {
                Some(s) if s.kind == "connect-proxy" => Ok(s.id.clone()),
                Some(s) => Err(LookupError::Ambiguous(format!(
                    "the service {id:?} is not a connect-proxy (its kind is {:?})",
                    s.kind
                ))),
                None => Err(LookupError::Missing(format!(
                    "no service has the ID {id:?}; connect-proxy services here: {}",
                    describe(&proxies)
                ))),
            };
        }
        // A gateway is its own service: Consul's gateways take the service name as their ID.
        Target::MeshGateway(g) => {
            return match services.get(g.service.as_str()) {
                Some(s) if s.kind == "mesh-gateway" => Ok(s.id.clone()),
                Some(s) => Err(LookupError::Ambiguous(format!(
                    "the local service {:?} is of kind {:?}, not mesh-gateway",
                    s.id, s.kind
                ))),
                None => Err(LookupError::Missing(format!(
                "no mesh-gateway service {:?} on this agent (start with -register to register it)",
                g.service.as_str()
            ))),
            }
        }
        Target::ServiceId(id) => id.clone(),
        Target::Tag(tag) => {
            // BTreeMap order makes the listing, and so the error, deterministic.
            let tagged: Vec<&AgentService> = services
                .values()
                .filter(|s| s.kind.is_empty() && s.tags.iter().any(|t| t == tag))
                .collect();
            match tagged.as_slice() {
                [one] => one.id.clone(),
                [] => {
                    return Err(LookupError::Missing(format!(
                        "no local service carries the tag {tag:?}"
                    )))
                }
                many => {
                    return Err(LookupError::Ambiguous(format!(
                        "several local services carry the tag {tag:?}: {}; use -sidecar-for ID",
                        many.iter()
                            .map(|s| s.id.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    )))
                }
            }
        }
    };
    let matching: Vec<&AgentService> = proxies
        .iter()
        .copied()
        .filter(|p| {
            p.proxy
                .as_ref()
                .is_some_and(|c| c.destination_service_id.eq_ignore_ascii_case(&service_id))
        })
        .collect();
    match matching.as_slice() {
        [one] => Ok(one.id.clone()),
        [] => Err(LookupError::Missing(format!(
            "no connect-proxy here has Proxy.DestinationServiceID {service_id:?}; connect-proxy services here: {}",
            describe(&proxies)
        ))),
        many => Err(LookupError::Ambiguous(format!(
            "several connect-proxy services serve {service_id:?}: {}",
            describe(many)
        ))),
    }
}

// The agent endpoints the sidecar reads, in one place for the watchers, `--dry-run` and the
// stats registration.

pub const ROOTS_PATH: &str = "/v1/agent/connect/ca/roots";
/// Every intention; blocks on an index.
pub const INTENTIONS_PATH: &str = "/v1/connect/intentions";
/// The `mesh` config entry, as a list (empty when none is written; Consul 1.10+).
pub const MESH_PATH: &str = "/v1/config/mesh";

/// Every `jwt-provider` config entry (Consul 1.16+), for the intentions' `JWT` requirements.
pub const JWT_PROVIDERS_PATH: &str = "/v1/config/jwt-provider";
pub const AGENT_SELF_PATH: &str = "/v1/agent/self";
/// Every `proxy-defaults` / `service-defaults` entry, as lists (empty when none is
/// written, where the single entry's path answers 404); each blocks on an index.
pub const PROXY_DEFAULTS_PATH: &str = "/v1/config/proxy-defaults";
pub const SERVICE_DEFAULTS_PATH: &str = "/v1/config/service-defaults";
pub const AUTHORIZE_PATH: &str = "/v1/agent/connect/authorize";
pub const REGISTER_PATH: &str = "/v1/agent/service/register";
/// Every `exported-services` config entry (one per partition); blocks on an index.
pub const EXPORTED_SERVICES_PATH: &str = "/v1/config/exported-services";

/// What `service` may reach by intentions (transparent mode); blocks on an index.
pub fn topology_path(service: &str) -> String {
    format!("/v1/internal/ui/service-topology/{}?kind=", encode(service))
}

pub fn deregister_path(service_id: &str) -> String {
    format!("/v1/agent/service/deregister/{}", encode(service_id))
}

pub fn leaf_path(service: &str) -> String {
    format!("/v1/agent/connect/ca/leaf/{}", encode(service))
}

/// Where a destination's healthy instances are read: the health endpoint (blocking) for a
/// service, the prepared query's execution (polled) for a query.
pub fn endpoints_path(key: &DestinationKey) -> String {
    let dc = if key.datacenter.is_empty() {
        String::new()
    } else {
        format!("&dc={}", encode(&key.datacenter))
    };
    match key.kind {
        DestinationKind::Service => {
            format!("/v1/health/connect/{}?passing=1{dc}", encode(&key.name))
        }
        DestinationKind::PreparedQuery => {
            format!("/v1/query/{}/execute?connect=true{dc}", encode(&key.name))
        }
    }
}

/// A cluster peering (`/v1/peering/<peer>`): its state, CAs and server name.
pub fn peering_path(peer: &str) -> String {
    format!("/v1/peering/{}", encode(peer))
}

/// The passing instances of a peer's exported service: its mesh gateways, each carrying the
/// service's SNI and SPIFFE ID.
pub fn peer_instances_path(key: &crate::peering::PeerKey) -> String {
    format!(
        "/v1/health/connect/{}?passing=1&peer={}",
        encode(&key.service),
        encode(&key.peer)
    )
}

#[cfg(test)]
mod tests;
