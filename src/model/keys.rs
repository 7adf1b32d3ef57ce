//! The keys the sidecar reads from a registration's `Proxy.Config` and from each upstream's
//! `Config`: which ones exist (the README's table lists the same), what each becomes, and the
//! one warning per key the sidecar does not read. Every value is parsed into a `crate::value`
//! type here; a value HAProxy cannot take is dropped with one warning naming key and value.

use std::collections::BTreeMap;

use serde_json::Value;

use super::{timeout_setting, AppHeader, Mode};
use crate::consul::DestinationKind;
use crate::value::{comment, HeaderName, Limit, Millis, Refused};

/// Every `Proxy.Config` key the sidecar reads, and how warnings name that level.
pub const PROXY: (&[&str], &str) = (PROXY_KEYS, "Proxy.Config");
/// Every upstream `Config` key the sidecar reads, and how warnings name that level.
pub const UPSTREAM: (&[&str], &str) = (UPSTREAM_KEYS, "upstream Config");

const PROXY_KEYS: &[&str] = &[
    "protocol",
    "bind_address",
    "bind_port",
    "local_connect_timeout_ms",
    "local_request_timeout_ms",
    "local_idle_timeout_ms",
    "max_inbound_connections",
    // The Go original's own keys.
    "connect_timeout",
    "read_timeout",
    "enable_forwardfor",
    "appname_header",
];

const UPSTREAM_KEYS: &[&str] = &[
    "protocol",
    "connect_timeout_ms",
    // The Go original's own keys.
    "connect_timeout",
    "read_timeout",
    "poll_interval",
];

/// Keys Consul documents that the sidecar knows and does not serve, with why.
const NOT_SERVED: &[(&str, &str)] = &[
    (
        "local_service_address",
        "the Go original's key; this sidecar reads Proxy.LocalServiceAddress, which Consul fills in",
    ),
    ("handshake_timeout_ms", "not supported by this sidecar"),
    ("balance_inbound_connections", "not supported by this sidecar"),
    ("balance_outbound_connections", "not supported by this sidecar"),
    ("limits", "not supported by this sidecar yet"),
    ("passive_health_check", "not supported by this sidecar yet"),
];

/// At most this many keys of one config are named one by one: a registration with thousands
/// of keys gets a bounded number of lines.
const MAX_NAMED: usize = 16;

/// One warning per key of `config` that is not in `known`, each naming its key: Envoy's own
/// keys (`envoy_*`) as Envoy's, Consul's keys this sidecar does not serve with why, anything
/// else as unknown. `Desired::warnings` are logged when they first appear, so each key is
/// named once per appearance, not per rebuild.
pub(crate) fn warn_unknown(
    config: &BTreeMap<String, Value>,
    (known, level): (&[&str], &str),
    whose: &str,
    warnings: &mut Vec<String>,
) {
    let unknown: Vec<&String> = config
        .keys()
        .filter(|k| !known.contains(&k.as_str()))
        .collect();
    for k in unknown.iter().take(MAX_NAMED) {
        let why = if k.starts_with("envoy_") {
            "is Envoy's; ignored"
        } else if let Some((_, why)) = NOT_SERVED.iter().find(|(n, _)| n == k) {
            why
        } else {
            "is not a key this sidecar reads; ignored"
        };
        warnings.push(format!("{whose}: {level} key {} {why}", shown(k)));
    }
    if unknown.len() > MAX_NAMED {
        warnings.push(format!(
            "{whose}: {level} has {} more keys this sidecar does not read; ignored",
            unknown.len() - MAX_NAMED
        ));
    }
}

/// A key or value from Consul as a log line shows it: quoted, escaped, at most 64 characters.
fn shown(s: &str) -> String {
    let short: String = s.chars().take(64).collect();
    let more = if s.chars().count() > 64 { "…" } else { "" };
    format!("{:?}{more}", comment(&short))
}

/// The refusal of a value of the wrong JSON type or form.
pub(crate) fn not_a(key: &'static str, v: Option<&Value>, reason: &'static str) -> Refused {
    Refused {
        field: key,
        value: v.map(Value::to_string).unwrap_or_default(),
        reason,
    }
}

/// What the registration asks of the public listener and the local app's backend.
#[derive(Debug, Default)]
pub(crate) struct LocalApp {
    pub connect_timeout_ms: Option<Millis>,
    pub client_timeout_ms: Option<Millis>,
    pub server_timeout_ms: Option<Millis>,
    pub max_connections: Option<Limit>,
    pub forwardfor: bool,
    pub app_header: Option<AppHeader>,
}

/// Consul's keys win over the Go original's where both say the same thing
/// (`local_connect_timeout_ms` over `connect_timeout`; `local_request_timeout_ms` and
/// `local_idle_timeout_ms` over `read_timeout`), as an operator moving from Envoy expects.
pub(crate) fn local_app(
    config: &BTreeMap<String, Value>,
    mode: Mode,
    intentions: bool,
    whose: &str,
    warnings: &mut Vec<String>,
) -> LocalApp {
    // Each key is parsed even when another wins, so a bad value is named all the same.
    let consul_connect = timeout_setting(config, "local_connect_timeout_ms", whose, warnings);
    let go_connect = go_timeout(config, "connect_timeout", whose, warnings);
    let read = go_timeout(config, "read_timeout", whose, warnings);
    let idle = timeout_setting(config, "local_idle_timeout_ms", whose, warnings);
    // Consul documents 0 as "no request timeout": the idle and read timeouts (or the
    // defaults section's) are then all the backend has.
    let request = match super::config_u64(config, "local_request_timeout_ms") {
        Some(0) => None,
        _ => timeout_setting(config, "local_request_timeout_ms", whose, warnings),
    };
    let http_only = |key: &str, warnings: &mut Vec<String>| {
        if config.contains_key(key) {
            warnings.push(format!(
                "{whose}: Proxy.Config key {key} applies to http only and the public listener is tcp; ignored"
            ));
        }
    };
    let server_timeout = match mode {
        Mode::Http => request.or(idle).or(read),
        Mode::Tcp => {
            http_only("local_request_timeout_ms", warnings);
            idle.or(read)
        }
    };
    let max_connections = match super::config_u64(config, "max_inbound_connections") {
        Some(n) => match Limit::new("max_inbound_connections", n) {
            Ok(l) => Some(l),
            Err(e) => {
                warnings.push(format!("{whose}: {e}; no limit of its own applies"));
                None
            }
        },
        None => {
            if config.contains_key("max_inbound_connections") {
                warnings.push(format!(
                    "{whose}: {}; no limit of its own applies",
                    not_a(
                        "max_inbound_connections",
                        config.get("max_inbound_connections"),
                        "not a number"
                    )
                ));
            }
            None
        }
    };
    let forwardfor = match config.get("enable_forwardfor") {
        None | Some(Value::Null) => false,
        Some(Value::Bool(b)) => *b,
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("true") => true,
        Some(Value::String(s)) if s.trim().eq_ignore_ascii_case("false") => false,
        v => {
            warnings.push(format!(
                "{whose}: {}; X-Forwarded-For is not added",
                not_a("enable_forwardfor", v, "not a boolean")
            ));
            false
        }
    };
    if forwardfor && mode == Mode::Tcp {
        http_only("enable_forwardfor", warnings);
    }
    let app_header = match config.get("appname_header") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match HeaderName::parse("appname_header", s.trim()) {
            Ok(name) => Some(name),
            Err(e) => {
                warnings.push(format!("{whose}: {e}; no header is set"));
                None
            }
        },
        v => {
            warnings.push(format!(
                "{whose}: {}; no header is set",
                not_a("appname_header", v, "not a header name")
            ));
            None
        }
    };
    let app_header = match (app_header, mode) {
        (Some(_), Mode::Tcp) => {
            http_only("appname_header", warnings);
            None
        }
        (Some(name), Mode::Http) => {
            if !intentions {
                warnings.push(format!(
                    "{whose}: appname_header {name}: the caller's name comes from the intentions agent, which runs only with -enable-intentions; the header is removed from every request and never set"
                ));
            }
            Some(AppHeader {
                name,
                from_agent: intentions,
            })
        }
        (None, _) => None,
    };
    LocalApp {
        connect_timeout_ms: consul_connect.or(go_connect),
        client_timeout_ms: idle.or(read),
        server_timeout_ms: server_timeout,
        max_connections,
        forwardfor: forwardfor && mode == Mode::Http,
        app_header,
    }
}

/// A Go duration setting (`connect_timeout`, `read_timeout`: `"5s"`), as the Go original
/// reads them: `None` when unset, and with a warning when not a duration HAProxy can take.
pub(crate) fn go_timeout(
    config: &BTreeMap<String, Value>,
    key: &'static str,
    whose: &str,
    warnings: &mut Vec<String>,
) -> Option<Millis> {
    match Millis::from_go_json(key, config.get(key)?)? {
        Ok(ms) => Some(ms),
        Err(e) => {
            warnings.push(format!("{whose}: {e}; the default applies"));
            None
        }
    }
}

/// `poll_interval`: read by the prepared-query watcher (`consul::poll_interval`), checked here
/// so a bad value, or one on a service upstream, is named in the warnings.
pub(crate) fn check_poll_interval(
    config: &BTreeMap<String, Value>,
    kind: DestinationKind,
    whose: &str,
    warnings: &mut Vec<String>,
) {
    match (crate::consul::poll_interval(config), kind) {
        (None, _) => {}
        (Some(_), DestinationKind::Service) => warnings.push(format!(
            "{whose}: upstream Config key poll_interval applies to prepared queries only (a service's instances are watched, not polled); ignored"
        )),
        (Some(Ok(_)), DestinationKind::PreparedQuery) => {}
        (Some(Err(e)), DestinationKind::PreparedQuery) => {
            warnings.push(format!("{whose}: {e}; the default poll interval applies"))
        }
    }
}
