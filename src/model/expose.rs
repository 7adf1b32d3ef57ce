//! Exposed paths: the plain (non-mTLS) listeners that serve one path of the local app each, so
//! that Consul's HTTP/gRPC checks and scrapers reach an app bound to loopback. They come from
//! the registration's `Proxy.Expose.Paths` and, with `Proxy.Expose.Checks`, from the agent's
//! checks of the service (see `consul::api::AgentCheck` for what each Consul version tells).

use serde::Serialize;

use crate::consul::api::{AgentCheck, ExposePath, ProxyConfig};
use crate::error::{Error, Result};
use crate::names::sanitize;

use super::{Public, BACKEND_PREFIX};

/// What Consul's gRPC health check calls, whatever service it names: the standard health
/// service's method (Consul's Envoy exposes the same path for a gRPC check).
const GRPC_HEALTH_PATH: &str = "/grpc.health.v1.Health/Check";

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct ExposedListener {
    /// The frontend's name, `exp_<listener port>`.
    pub name: String,
    /// The backend's name, `be_exp_<listener port>`.
    pub backend: String,
    /// The only path served; every other path gets 404 from HAProxy.
    pub path: String,
    pub bind_address: crate::value::Address,
    pub bind_port: u16,
    pub app_address: crate::value::Address,
    pub app_port: u16,
    /// `http2`: h2c on both sides (gRPC health checks), else HTTP/1.1.
    pub http2: bool,
    /// The check this path was generated for (`Expose.Checks`), if any.
    pub check: Option<String>,
    /// The only sources a connection may come from (addresses or CIDR blocks); empty admits
    /// any. A check's listener admits this host only, as Envoy's does: the agent that runs the
    /// check is local, and anyone else reaching a health endpoint unauthenticated is what the
    /// mesh exists to prevent. An explicit `Expose.Paths` entry is open on purpose (scrapers).
    pub sources: Vec<String>,
    pub connect_timeout_ms: crate::value::Millis,
}

/// One exposed path as the model reads it, before it becomes a listener.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub path: String,
    pub listener_port: u16,
    pub local_port: u16,
    pub http2: bool,
    pub check: Option<String>,
    /// The address the agent's check requested, when its output tells it.
    pub check_host: Option<String>,
}

/// The exposed paths `proxy` asks for: its explicit `Expose.Paths`, then (with
/// `Expose.Checks`) one per HTTP/gRPC check of its service in `checks` whose listener is known.
/// Entries that cannot be served are reported in `warnings`.
pub fn wanted(
    proxy: &ProxyConfig,
    checks: Option<&[AgentCheck]>,
    public: &Public,
    warnings: &mut Vec<String>,
) -> Vec<Wanted> {
    let mut out = Vec::new();
    for p in &proxy.expose.paths {
        match explicit(p) {
            Ok(w) => out.push(w),
            Err(e) => warnings.push(format!("not exposing path {:?}: {e}", p.path)),
        }
    }
    if proxy.expose.checks {
        let service = &proxy.destination_service_id;
        for c in checks
            .unwrap_or_default()
            .iter()
            .filter(|c| !service.is_empty() && &c.service_id == service)
        {
            match from_check(c, public.app_port) {
                Ok(Some(w)) => out.push(w),
                Ok(None) => {}
                Err(e) => warnings.push(format!("not exposing check {:?}: {e}", c.check_id)),
            }
        }
    }
    out
}

fn explicit(p: &ExposePath) -> Result<Wanted> {
    check_path(&p.path)?;
    if p.listener_port == 0 {
        return Err(Error::msg("it has no ListenerPort"));
    }
    if p.local_path_port == 0 {
        return Err(Error::msg("it has no LocalPathPort"));
    }
    let http2 = match p.protocol.to_ascii_lowercase().as_str() {
        "" | "http" => false,
        "http2" => true,
        other => {
            return Err(Error::msg(format!(
                "protocol {other:?} is neither http nor http2"
            )))
        }
    };
    Ok(Wanted {
        path: p.path.clone(),
        listener_port: p.listener_port,
        local_port: p.local_path_port,
        http2,
        check: None,
        check_host: None,
    })
}

/// The exposed path of one agent check, or `None` for a check that is not HTTP/gRPC or whose
/// listener the agent has not told yet. The path of an HTTP check is only ever told by the
/// URL in its output (after its first run); the check's own target port is told nowhere, so
/// the path is served from the local service's port.
fn from_check(c: &AgentCheck, local_port: u16) -> Result<Option<Wanted>> {
    let (path, http2, port, host) = match c.kind.as_str() {
        "http" => {
            let Some(url) = check_url(&c.output) else {
                return Ok(None);
            };
            if !url.starts_with("http://") {
                return Err(Error::msg(format!(
                    "it requests {url}, and an exposed listener serves plain HTTP only"
                )));
            }
            let rest = &url["http://".len()..];
            let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
            let path = path.split('?').next().unwrap_or("");
            (
                if path.is_empty() { "/" } else { path }.to_string(),
                false,
                port_of(authority),
                host_of(authority),
            )
        }
        "grpc" => (
            GRPC_HEALTH_PATH.to_string(),
            true,
            grpc_target_port(&c.output),
            None,
        ),
        _ => return Ok(None),
    };
    let listener_port = match (c.exposed_port, port) {
        (p, _) if p > 0 => p,
        (_, Some(p)) => p,
        _ => return Ok(None),
    };
    check_path(&path)?;
    Ok(Some(Wanted {
        path,
        listener_port,
        local_port,
        http2,
        check: Some(c.check_id.clone()),
        check_host: host,
    }))
}

/// The URL an HTTP check requested, from its output: `Get "http://…/health": dial tcp …` when
/// it failed, `HTTP GET http://…/health: 200 OK Output: …` when it passed.
pub fn check_url(output: &str) -> Option<&str> {
    let start = output.find("http://").or_else(|| output.find("https://"))?;
    let rest = &output[start..];
    let end = rest
        .find(|c: char| c == '"' || c.is_whitespace())
        .unwrap_or(rest.len());
    Some(rest[..end].trim_end_matches(':'))
}

/// The listener port a gRPC check dialled, from its output (`… dial tcp 127.0.0.1:21501: …`
/// when it failed, `gRPC check 127.0.0.1:21501: success` when it passed).
fn grpc_target_port(output: &str) -> Option<u16> {
    let at = output
        .find("dial tcp ")
        .map(|i| i + "dial tcp ".len())
        .or_else(|| output.find("gRPC check ").map(|i| i + "gRPC check ".len()))?;
    let target = output[at..].split(|c: char| c.is_whitespace()).next()?;
    port_of(target.trim_end_matches(':').split('/').next()?)
}

/// The IP address of `host:port` or `[v6]:port`; a name is not an address a source can match.
fn host_of(authority: &str) -> Option<String> {
    let host = authority.rsplit_once(':')?.0;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    host.parse::<std::net::IpAddr>()
        .ok()
        .map(|ip| ip.to_string())
}

fn port_of(authority: &str) -> Option<u16> {
    authority
        .rsplit_once(':')?
        .1
        .parse()
        .ok()
        .filter(|p| *p > 0)
}

/// A path HAProxy's configuration can carry as one word: absolute, no query, nothing its
/// parser treats specially.
fn check_path(path: &str) -> Result<()> {
    if !path.starts_with('/') {
        return Err(Error::msg("it is not an absolute path"));
    }
    if let Some(c) = path
        .chars()
        .find(|c| c.is_whitespace() || c.is_control() || "\"'\\#?{}".contains(*c))
    {
        return Err(Error::msg(format!(
            "it holds {c:?}, which an exposed path cannot (no query, spaces or quotes)"
        )));
    }
    Ok(())
}

/// Where the local agent's checks can come from: loopback, and every address of this host the
/// sidecar knows (the agent's own, the proxy's registered address, the public listener's, the
/// one the check dialled). A connection to a local address leaves from a local address, so
/// these cover an agent on this host whichever address it dials; an agent in another network
/// namespace of the host dials from its advertised address, which Envoy admits for the same
/// reason.
pub fn local_sources(
    agent_address: Option<&str>,
    registration_address: &str,
    public: &Public,
    check_host: Option<&str>,
) -> Vec<String> {
    let mut out = vec!["127.0.0.0/8".to_string(), "::1".to_string()];
    let known = [
        agent_address,
        Some(registration_address),
        Some(&*public.bind_address.to_string()),
        check_host,
    ];
    for a in known.into_iter().flatten() {
        let Ok(ip) = a.parse::<std::net::IpAddr>() else {
            continue;
        };
        if ip.is_unspecified() || ip.is_loopback() {
            continue;
        }
        let ip = ip.to_string();
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out
}

/// The listener for one wanted path, bound where the public listener is. `sources` is what a
/// check's listener admits (see `local_sources`); explicit paths admit anyone.
pub fn listener(w: &Wanted, public: &Public, sources: Vec<String>) -> ExposedListener {
    let name = sanitize(&format!("exp_{}", w.listener_port));
    ExposedListener {
        backend: format!("{BACKEND_PREFIX}{name}"),
        name,
        path: w.path.clone(),
        bind_address: public.bind_address.clone(),
        bind_port: w.listener_port,
        app_address: public.app_address.clone(),
        app_port: w.local_port,
        http2: w.http2,
        check: w.check.clone(),
        sources: if w.check.is_some() {
            sources
        } else {
            Vec::new()
        },
        connect_timeout_ms: public.connect_timeout_ms,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn check_outputs_of_both_versions_give_url_and_port() {
        let failed = r#"Get "http://127.0.0.1:21500/health": dial tcp 127.0.0.1:21500: connect: connection refused"#;
        assert_eq!(check_url(failed), Some("http://127.0.0.1:21500/health"));
        let passed = "HTTP GET http://127.0.0.1:21500/health?x=1: 200 OK Output: ok";
        assert_eq!(check_url(passed), Some("http://127.0.0.1:21500/health?x=1"));
        assert_eq!(check_url(""), None);
        let grpc = r#"rpc error: code = Unavailable desc = connection error: desc = "transport: Error while dialing: dial tcp 127.0.0.1:21501: connect: connection refused""#;
        assert_eq!(grpc_target_port(grpc), Some(21501));
        assert_eq!(
            grpc_target_port("gRPC check 127.0.0.1:21502/svc: success"),
            Some(21502)
        );
    }

    #[test]
    fn an_http_check_is_exposed_from_its_output_and_the_exposed_port() {
        let mut c = AgentCheck {
            check_id: "service:web:1".into(),
            service_id: "web".into(),
            kind: "http".into(),
            ..Default::default()
        };
        // Not run yet, no ExposedPort (1.8.7): nothing to serve yet.
        assert_eq!(from_check(&c, 8080).ok(), Some(None));
        c.output = r#"Get "http://127.0.0.1:21500/health?full=1": dial tcp 127.0.0.1:21500: connect: connection refused"#.into();
        let w = from_check(&c, 8080).unwrap().unwrap();
        assert_eq!(
            (w.path.as_str(), w.listener_port, w.local_port, w.http2),
            ("/health", 21500, 8080, false)
        );
        // 1.16.3's ExposedPort wins over the output.
        c.exposed_port = 21510;
        assert_eq!(from_check(&c, 8080).unwrap().unwrap().listener_port, 21510);
        c.output = "Get \"https://127.0.0.1:21500/health\": x".into();
        assert!(from_check(&c, 8080).is_err());
    }

    #[test]
    fn check_sources_are_loopback_and_this_hosts_addresses() {
        let public = Public {
            bind_address: "0.0.0.0".into(),
            bind_port: 21000,
            mode: super::super::Mode::Tcp,
            h2: false,
            app_address: "127.0.0.1".into(),
            app_port: 8080,
            connect_timeout_ms: crate::value::Millis::constant(5000),
            client_timeout_ms: None,
            server_timeout_ms: None,
            max_connections: None,
            forwardfor: false,
            app_header: None,
            xfcc: None,
            permissive: false,
        };
        assert_eq!(
            local_sources(None, "", &public, None),
            ["127.0.0.0/8", "::1"]
        );
        // Unspecified and loopback addresses add nothing; names are not addresses; no repeats.
        assert_eq!(
            local_sources(
                Some("10.0.0.5"),
                "10.0.0.5",
                &Public {
                    bind_address: "10.0.0.6".into(),
                    ..public.clone()
                },
                Some("fd00::1")
            ),
            ["127.0.0.0/8", "::1", "10.0.0.5", "10.0.0.6", "fd00::1"]
        );
        assert_eq!(
            local_sources(Some("node.example"), "127.0.0.2", &public, Some("::")),
            ["127.0.0.0/8", "::1"]
        );
        assert_eq!(host_of("[fd00::1]:21500").as_deref(), Some("fd00::1"));
        assert_eq!(host_of("10.0.0.7:21500").as_deref(), Some("10.0.0.7"));
        assert_eq!(host_of("localhost:21500"), None);
    }

    #[test]
    fn paths_that_the_configuration_cannot_carry_are_refused() {
        for bad in ["health", "/a b", "/a#b", "/a?b", "/a\"b", "/{x}"] {
            assert!(check_path(bad).is_err(), "{bad}");
        }
        for good in [
            "/",
            "/metrics",
            "/grpc.health.v1.Health/Check",
            "/a%20b;c=d",
        ] {
            assert!(check_path(good).is_ok(), "{good}");
        }
    }
}
