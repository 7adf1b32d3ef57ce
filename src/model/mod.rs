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

    let mut tls = tls(leaf, roots)?;
    let mut warnings = Vec::new();
    tls.roots_pem.push_str(&peered::exported_peer_cas(
        snapshot,
        &service,
        &mut warnings,
    ));

    let app_port = proxy.local_service_port;
    if app_port == 0 {
        return Err(Error::msg(format!(
            "proxy {:?} has no Proxy.LocalServicePort: there is no local app to forward to",
            reg.id
        )));
    }
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
        xfcc: keys::xfcc(
            mode,
            settings.intentions,
            &leaf.service_uri,
            &whose,
            &mut warnings,
        ),
        // Read with the mesh entry, below.
        permissive: false,
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
        let outbound = transparent::outbound(
            port,
            snapshot,
            &mut implicit,
            &here.datacenter,
            &settings.paths,
            &mut warnings,
        );
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
    let permissive = keys::mutual_tls_permissive(
        &snapshot.mutual_tls_mode(),
        snapshot.permissive_allowed(),
        &whose,
        &mut warnings,
    );
    let public = Public {
        permissive,
        ..public
    };
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
        own_roots_pem: roots_pem.clone(),
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

fn parse_cert(pem_block: &str) -> Result<()> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(pem_block.as_bytes())
        .map_err(|e| Error::msg(e.to_string()))?;
    pem.parse_x509().map_err(|e| Error::msg(e.to_string()))?;
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
mod desired;
mod expose;
pub mod gateway;
pub mod keys;
pub mod mesh;
mod peered;
pub mod transparent;
mod upstream;
pub use chain::Routing;
pub use desired::*;
pub use expose::ExposedListener;
pub(crate) use upstream::*;

#[cfg(test)]
pub(crate) mod fixtures;
#[cfg(test)]
mod tests;
