//! What the operator configures, as values: filled by `cli` from flags and environment, read by
//! everyone else. Nothing here parses a command line or touches the network.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use crate::value::Name;

/// Which local service the sidecar serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    /// `-sidecar-for ID`: the service ID of the local application.
    ServiceId(String),
    /// `-sidecar-for-tag TAG`: the one local service carrying this tag.
    Tag(String),
    /// `-proxy-service-id ID` (consul-dataplane's name): the proxy's own service ID.
    ProxyId(String),
    /// `-gateway mesh`: a mesh gateway, not a sidecar.
    MeshGateway(MeshGateway),
}

/// A mesh gateway as Consul's `consul connect envoy -gateway mesh` takes it: the service it is
/// registered as, and where it listens. Each value typed at the command line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MeshGateway {
    /// `-service`: the gateway's service name, also its service ID.
    pub service: crate::value::Name,
    /// `-register`: register the service at start and deregister it at exit.
    pub register: bool,
    /// `-address`: the LAN address, where local sidecars and the local gateway's peers reach it.
    pub lan: Listen,
    /// `-wan-address`: the address other clusters dial, when it differs from the LAN one.
    pub wan: Option<Listen>,
}

/// An IP address and port to listen on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Listen {
    pub ip: std::net::IpAddr,
    pub port: u16,
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", std::net::SocketAddr::new(self.ip, self.port))
    }
}

/// How to reach Consul: a local agent, or (agentless, with `catalog_node`) the servers.
#[derive(Clone, Debug)]
pub struct ConsulSettings {
    /// Tried in this order, the next one when a request to the current one fails; never empty.
    pub endpoints: Vec<Endpoint>,
    pub token: Option<Secret>,
    pub tls: TlsFiles,
    /// `-service-node-name`: the catalog node the proxy is registered on, which no agent
    /// runs. Set, the sidecar reads the catalog and writes nothing to an agent.
    pub catalog_node: Option<Name>,
    /// `-login-*`: the token comes from an ACL auth method instead of `-token`.
    pub login: Option<Login>,
}

/// An ACL login (`/v1/acl/login`) as consul-dataplane's `-login-*` flags describe it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Login {
    pub auth_method: Name,
    /// Read again at every login: Kubernetes rotates the projected token.
    pub bearer_token_path: PathBuf,
    /// `-login-meta k=v`, sent as the login's `Meta`.
    pub meta: BTreeMap<String, String>,
    pub namespace: Option<Name>,
    pub partition: Option<Name>,
    pub datacenter: Option<Name>,
}

/// One `-haproxy-param section.key=value`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct HaproxyParam {
    pub section: String,
    pub key: String,
    pub value: String,
}

/// Algorithms HAProxy applies to servers changed at runtime; the static ones (static-rr,
/// hashes without consistent) would turn every instance change into a reload.
pub const BALANCE_ALGORITHMS: &[&str] = &["roundrobin", "leastconn", "first", "random"];

/// The operator's HAProxy knobs: they shape the rendered file and the objects the Dataplane API
/// creates alike, and reach both through `model::Desired`.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Knobs {
    /// How long a graceful stop lets in-flight work finish (also HAProxy's `hard-stop-after`).
    #[serde(skip)]
    pub grace_period: Duration,
    /// Extra HAProxy `global`/`defaults` settings, in order, last one per key wins.
    pub haproxy_params: Vec<HaproxyParam>,
    /// The load-balancing algorithm of upstream backends.
    pub balance: String,
    /// HAProxy `log-format` of every listener's access log, already quoted as one HAProxy
    /// argument; `None` keeps httplog/tcplog.
    pub log_format: Option<String>,
    /// The least severe HAProxy log level the sidecar prints (see [`haproxy_log_level`]).
    pub haproxy_log_level: &'static str,
}

impl Default for Knobs {
    fn default() -> Self {
        Knobs {
            grace_period: Duration::from_secs(30),
            haproxy_params: Vec::new(),
            balance: "roundrobin".into(),
            log_format: None,
            haproxy_log_level: "info",
        }
    }
}

/// HAProxy's syslog severity for the sidecar's `-log-level`: HAProxy then writes only lines
/// the sidecar would print (access logs are `info`), instead of a line per connection that
/// the sidecar reads and throws away. (HAProxy still formats a line its level then drops;
/// [`haproxy_logs_access`] tells the template when to stop that too.)
pub fn haproxy_log_level(level: log::LevelFilter) -> &'static str {
    match level {
        log::LevelFilter::Trace => "debug",
        log::LevelFilter::Debug | log::LevelFilter::Info => "info",
        log::LevelFilter::Warn => "warning",
        log::LevelFilter::Error | log::LevelFilter::Off => "err",
    }
}

/// Whether HAProxy's access lines, logged at `info`, pass this HAProxy log level.
pub fn haproxy_logs_access(haproxy_log_level: &str) -> bool {
    matches!(haproxy_log_level, "info" | "debug")
}

/// Where a server listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Endpoint {
    Http { authority: String },
    Https { authority: String },
    Unix { path: PathBuf },
}

impl Endpoint {
    /// Parses the address forms the consul CLI accepts: `host:port`, `http://host:port`,
    /// `https://host:port` and `unix:///path/to.sock`.
    pub fn parse(addr: &str) -> std::result::Result<Endpoint, String> {
        let addr = addr.trim();
        if let Some(path) = addr.strip_prefix("unix://") {
            if path.is_empty() {
                return Err(format!("unix address {addr:?} names no socket path"));
            }
            return Ok(Endpoint::Unix { path: path.into() });
        }
        let (https, rest) = if let Some(rest) = addr.strip_prefix("https://") {
            (true, rest)
        } else if let Some(rest) = addr.strip_prefix("http://") {
            (false, rest)
        } else if addr.contains("://") {
            return Err(format!(
                "address {addr:?} has an unknown scheme (expected http, https or unix)"
            ));
        } else {
            (false, addr)
        };
        let authority = rest.trim_end_matches('/');
        if authority.is_empty()
            || authority.contains('/')
            || authority.contains(char::is_whitespace)
        {
            return Err(format!("address {addr:?} is not host:port"));
        }
        let authority = authority.to_string();
        Ok(if https {
            Endpoint::Https { authority }
        } else {
            Endpoint::Http { authority }
        })
    }

    pub(crate) fn base_url(&self) -> String {
        match self {
            Endpoint::Http { authority } => format!("http://{authority}"),
            Endpoint::Https { authority } => format!("https://{authority}"),
            // The URL must parse, and ureq resolves its host before our unix connector runs: an
            // IP literal needs no resolver, so a container without /etc/hosts works too.
            Endpoint::Unix { .. } => "http://127.0.0.1".to_string(),
        }
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Unix { path } => write!(f, "unix://{}", path.display()),
            other => f.write_str(&other.base_url()),
        }
    }
}

/// A value that must never be printed: ACL tokens, passwords.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// TLS settings for an https endpoint, as the consul CLI takes them from CONSUL_CACERT etc.
#[derive(Clone, Debug, Default)]
pub struct TlsFiles {
    pub ca_cert: Option<PathBuf>,
    pub client_cert: Option<PathBuf>,
    pub client_key: Option<PathBuf>,
    pub verify: bool,
}
