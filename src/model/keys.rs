//! The keys the sidecar reads from a registration's `Proxy.Config` and from each upstream's
//! `Config`: which ones exist (the README's table lists the same), what each becomes, and the
//! one warning per key the sidecar does not read. Every value is parsed into a `crate::value`
//! type here; a value HAProxy cannot take is dropped with one warning naming key and value.

use std::collections::BTreeMap;

use serde::Serialize;
use serde_json::Value;

use super::{timeout_setting, AppHeader, Mode, Xfcc};
use crate::consul::DestinationKind;
use crate::value::{comment, HeaderName, Limit, Millis, Refused, Word};

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
    "limits",
    "passive_health_check",
];

/// Keys Consul documents that the sidecar knows and does not serve, with why.
const NOT_SERVED: &[(&str, &str)] = &[
    (
        "local_service_address",
        "the Go original's key; this sidecar reads Proxy.LocalServiceAddress, which Consul fills in",
    ),
    ("handshake_timeout_ms", "not supported by this sidecar"),
    (
        "balance_inbound_connections",
        "not supported: HAProxy spreads a listener's connections over its threads itself (tune.listener.multi-queue: the less loaded of two), with no exact balance per listener; ignored",
    ),
    ("balance_outbound_connections", "not supported by this sidecar"),
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

/// `X-Forwarded-Client-Cert` on an http public listener: set as Consul's Envoy sets it when
/// the intentions agent runs (it reads the client certificate), else only removed, with one
/// warning saying so, since a header the app trusts must never be the client's.
pub(crate) fn xfcc(
    mode: Mode,
    intentions: bool,
    leaf_uri: &str,
    whose: &str,
    warnings: &mut Vec<String>,
) -> Option<Xfcc> {
    if mode == Mode::Tcp {
        return None;
    }
    if !intentions {
        warnings.push(format!(
            "{whose}: X-Forwarded-Client-Cert is set from the client certificate by the intentions agent, which runs only with -enable-intentions; the header is removed from every request and never set"
        ));
        return Some(Xfcc { by: None });
    }
    match Word::parse("leaf certificate ServiceURI", leaf_uri) {
        Ok(by) => Some(Xfcc { by: Some(by) }),
        Err(e) => {
            warnings.push(format!(
                "{whose}: {e}; X-Forwarded-Client-Cert is removed from every request and never set"
            ));
            Some(Xfcc { by: None })
        }
    }
}

/// `MutualTLSMode` (`Snapshot::mutual_tls_mode`): whether the public listener also takes
/// plaintext. Only with the mesh entry's `AllowEnablingPermissiveMutualTLS`, as Consul's own
/// proxies check it: without it, or for a value Consul does not name, the listener stays
/// mTLS-only (the safe side) and the operator is told, once.
pub(crate) fn mutual_tls_permissive(
    mode: &str,
    allowed: bool,
    whose: &str,
    warnings: &mut Vec<String>,
) -> bool {
    match mode.trim() {
        "" | "strict" | "default" => false,
        "permissive" => {
            if !allowed {
                warnings.push(format!(
                    "{whose}: MutualTLSMode permissive needs the mesh entry's AllowEnablingPermissiveMutualTLS; the public listener accepts mTLS only, as in strict mode"
                ));
            }
            allowed
        }
        other => {
            warnings.push(format!(
                "{whose}: MutualTLSMode {} is unknown; the public listener accepts mTLS only",
                shown(other)
            ));
            false
        }
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

/// An upstream's `limits` (Consul's `UpstreamLimits`, from the registration or merged from
/// service-defaults' `UpstreamConfig`), as HAProxy enforces them. Envoy's circuit breakers count
/// per cluster (all instances of the upstream together); HAProxy's `maxconn` counts per server,
/// so `per_server` caps each instance: the same as Envoy's with one instance, N times it with N.
/// The queue is per backend, as Envoy's pending requests are per cluster.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Limits {
    /// Each server's `maxconn`: `MaxConnections`, and in http mode the smaller of it and
    /// `MaxConcurrentRequests` (HAProxy's `maxconn` counts requests in flight in http mode).
    pub per_server: Option<Limit>,
    /// How many requests may wait for a server with a free slot; past it the request gets 503
    /// from HAProxy (http) or its connection is closed (tcp). `Some(0)`: none waits.
    pub pending: Option<u32>,
}

/// Envoy's default `max_pending_requests`, which Consul leaves in place when only
/// `MaxConnections` is set.
const ENVOY_PENDING: u32 = 1024;

/// Reads `limits` of an upstream's `Config`. Consul prints the merged form with Go's field
/// names (`MaxConnections`) and a registration may use the documented ones
/// (`max_connections`): both are read, as Consul's decoder does.
pub(crate) fn upstream_limits(
    config: &BTreeMap<String, Value>,
    mode: Mode,
    whose: &str,
    warnings: &mut Vec<String>,
) -> Limits {
    let limits = match config.get("limits") {
        None | Some(Value::Null) => return Limits::default(),
        Some(Value::Object(m)) => m,
        v => {
            warnings.push(format!(
                "{whose}: {}; no limits apply",
                not_a("limits", v, "not an object")
            ));
            return Limits::default();
        }
    };
    let mut read = |field: &'static str, canonical: &str| -> Option<u64> {
        let (_, v) = limits
            .iter()
            .find(|(k, _)| k.replace('_', "").eq_ignore_ascii_case(canonical))?;
        match v {
            Value::Null => None,
            Value::Number(n) if n.as_u64().is_some() => n.as_u64(),
            v => {
                warnings.push(format!(
                    "{whose}: {}; ignored",
                    not_a(field, Some(v), "not a whole number")
                ));
                None
            }
        }
    };
    let connections = read("limits.MaxConnections", "maxconnections");
    let pending = read("limits.MaxPendingRequests", "maxpendingrequests");
    let concurrent = read("limits.MaxConcurrentRequests", "maxconcurrentrequests");
    let cap = match mode {
        Mode::Http => match (connections, concurrent) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        },
        Mode::Tcp => {
            if concurrent.is_some() {
                warnings.push(format!(
                    "{whose}: limits.MaxConcurrentRequests applies to http upstreams only (a tcp connection is one request); ignored"
                ));
            }
            connections
        }
    };
    let per_server = match cap.map(|n| Limit::new("limits.MaxConnections", n)) {
        None => None,
        Some(Ok(l)) => Some(l),
        Some(Err(e)) => {
            warnings.push(format!("{whose}: {e}; no limit applies"));
            None
        }
    };
    if per_server.is_none() {
        if pending.is_some() {
            warnings.push(format!(
                "{whose}: limits.MaxPendingRequests without MaxConnections or MaxConcurrentRequests: HAProxy queues only for a server at its cap; ignored"
            ));
        }
        return Limits::default();
    }
    let pending = match mode {
        // Envoy's tcp proxy never queues: a connection past the cap is closed at once.
        Mode::Tcp => {
            if pending.is_some() {
                warnings.push(format!(
                    "{whose}: limits.MaxPendingRequests applies to http upstreams only (a tcp connection past MaxConnections is closed, as Envoy's is); ignored"
                ));
            }
            0
        }
        Mode::Http => pending.map_or(ENVOY_PENDING, |p| {
            u32::try_from(p).unwrap_or(u32::MAX).min(i32::MAX as u32)
        }),
    };
    Limits {
        per_server,
        pending: Some(pending),
    }
}

impl Limits {
    /// The backend lines that bound its queue: none waits (`timeout queue 1`: a request that
    /// finds every server at its cap gets 503 or a closed connection within a millisecond), or
    /// at most `pending` wait (a rule answering 503 before the queue grows past it).
    pub fn backend_lines(&self, mode: Mode) -> Vec<String> {
        match (self.per_server, self.pending) {
            (None, _) | (_, None) => Vec::new(),
            (Some(_), Some(0)) => vec!["timeout queue 1".to_string()],
            (Some(_), Some(n)) => vec![match mode {
                Mode::Http => format!("http-request return status 503 if {{ queue ge {n} }}"),
                Mode::Tcp => format!("tcp-request content reject if {{ queue ge {n} }}"),
            }],
        }
    }
}

/// An upstream's `passive_health_check` (Consul's `PassiveHealthCheck`), as HAProxy's own
/// error tracking on each server of its backends enforces it: `MaxFailures` consecutive errors
/// (5xx answers in http, failed connections in both modes) mark the server down at once
/// (`observe`, `error-limit`, `on-error mark-down`), and it comes back only after enough
/// passing checks to fill `BaseEjectionTime` (`rise`), so the plain TCP check every slot
/// already runs cannot bring it back earlier.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
pub struct PassiveCheck {
    pub max_failures: u32,
    pub ejection_ms: u64,
}

/// Envoy's defaults, which Consul leaves in place for a field it is not given.
const ENVOY_MAX_FAILURES: u32 = 5;
const ENVOY_BASE_EJECTION_MS: u64 = 30_000;

impl PassiveCheck {
    /// The server options for a slot checked every `check_inter_ms`: the first passing check
    /// after the mark-down comes within one interval, so the server is out between
    /// `(rise - 1)` and `rise` intervals, never less than `BaseEjectionTime` minus one.
    pub fn server_options(&self, mode: Mode, check_inter_ms: u64) -> String {
        let rise = self
            .ejection_ms
            .div_ceil(check_inter_ms.max(1))
            .clamp(1, 100_000);
        let layer = match mode {
            Mode::Http => 7,
            Mode::Tcp => 4,
        };
        format!(
            "observe layer{layer} error-limit {} on-error mark-down rise {rise}",
            self.max_failures
        )
    }
}

/// Reads `passive_health_check` of an upstream's `Config`: Consul's merged form (Go's field
/// names, durations in nanoseconds) or a registration's (`max_failures`, `"30s"`). `None`
/// when unset, when `EnforcingConsecutive5xx` is 0 (Envoy then ejects nothing) or when a
/// value cannot be read (with a warning naming it).
pub(crate) fn passive_check(
    config: &BTreeMap<String, Value>,
    whose: &str,
    warnings: &mut Vec<String>,
) -> Option<PassiveCheck> {
    let fields = match config.get("passive_health_check") {
        None | Some(Value::Null) => return None,
        Some(Value::Object(m)) => m,
        v => {
            warnings.push(format!(
                "{whose}: {}; no instance is ejected on errors",
                not_a("passive_health_check", v, "not an object")
            ));
            return None;
        }
    };
    let find = |canonical: &str| {
        fields
            .iter()
            .find(|(k, _)| k.replace('_', "").eq_ignore_ascii_case(canonical))
            .map(|(_, v)| v)
            .filter(|v| !v.is_null())
    };
    let mut bad = Vec::new();
    let mut whole = |field: &'static str, canonical: &str| -> Option<u64> {
        match find(canonical)? {
            Value::Number(n) if n.as_u64().is_some() => n.as_u64(),
            v => {
                bad.push(not_a(field, Some(v), "not a whole number"));
                None
            }
        }
    };
    let max_failures = whole("passive_health_check.MaxFailures", "maxfailures");
    let enforcing = whole(
        "passive_health_check.EnforcingConsecutive5xx",
        "enforcingconsecutive5xx",
    );
    let max_ejection = whole(
        "passive_health_check.MaxEjectionPercent",
        "maxejectionpercent",
    );
    let ejection = match find("baseejectiontime") {
        None => None,
        // Consul's merged form: a Go `time.Duration`, nanoseconds.
        Some(Value::Number(n)) if n.as_u64().is_some() => {
            match Millis::new(
                "passive_health_check.BaseEjectionTime",
                n.as_u64().unwrap_or(0) / 1_000_000,
            ) {
                Ok(ms) => Some(ms),
                Err(e) => {
                    bad.push(e);
                    None
                }
            }
        }
        Some(v) => match Millis::from_go_json("passive_health_check.BaseEjectionTime", v) {
            Some(Ok(ms)) => Some(ms),
            Some(Err(e)) => {
                bad.push(e);
                None
            }
            None => None,
        },
    };
    if !bad.is_empty() {
        for e in bad {
            warnings.push(format!("{whose}: {e}; no instance is ejected on errors"));
        }
        return None;
    }
    if enforcing == Some(0) {
        return None;
    }
    if let Some(p) = enforcing.filter(|p| *p != 100) {
        warnings.push(format!(
            "{whose}: passive_health_check.EnforcingConsecutive5xx {p}: HAProxy ejects on every detection, not a share of them; enforced as 100"
        ));
    }
    if !matches!(max_ejection, Some(p) if p >= 100) {
        warnings.push(format!(
            "{whose}: passive_health_check.MaxEjectionPercent ({}) is not enforced: HAProxy may eject every instance that fails, and then answers 503 where Envoy would keep some in rotation",
            max_ejection.map_or_else(|| "Envoy's default 10".to_string(), |p| p.to_string())
        ));
    }
    let max_failures = match max_failures {
        None | Some(0) => ENVOY_MAX_FAILURES,
        Some(n) => u32::try_from(n).unwrap_or(u32::MAX).min(i32::MAX as u32),
    };
    Some(PassiveCheck {
        max_failures,
        ejection_ms: ejection.map_or(ENVOY_BASE_EJECTION_MS, Millis::get),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn limits(v: Value, mode: Mode) -> (Limits, Vec<String>) {
        let config = BTreeMap::from([("limits".to_string(), v)]);
        let mut w = Vec::new();
        (upstream_limits(&config, mode, "upstream x", &mut w), w)
    }

    /// Both spellings Consul's decoder reads; in http the smaller cap wins and the queue is
    /// Envoy's 1024 unless set; in tcp nothing waits.
    #[test]
    fn limits_become_a_server_cap_and_a_queue_bound() {
        let (l, w) = limits(
            json!({"MaxConnections": 4, "MaxConcurrentRequests": 2}),
            Mode::Http,
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(l.per_server.map(Limit::get), Some(2));
        assert_eq!(
            l.backend_lines(Mode::Http),
            ["http-request return status 503 if { queue ge 1024 }"]
        );
        let (l, _) = limits(
            json!({"max_connections": 1, "max_pending_requests": 0}),
            Mode::Http,
        );
        assert_eq!(l.per_server.map(Limit::get), Some(1));
        assert_eq!(l.backend_lines(Mode::Http), ["timeout queue 1"]);
        let (l, w) = limits(
            json!({"MaxConnections": 3, "MaxPendingRequests": 5, "MaxConcurrentRequests": 9}),
            Mode::Tcp,
        );
        assert_eq!(l.per_server.map(Limit::get), Some(3));
        assert_eq!(l.backend_lines(Mode::Tcp), ["timeout queue 1"]);
        assert_eq!(w.len(), 2, "both http-only keys named: {w:#?}");
    }

    #[test]
    fn bad_or_lone_values_are_named_and_cap_nothing() {
        let (l, w) = limits(
            json!({"MaxConnections": "1; x", "MaxPendingRequests": 3}),
            Mode::Http,
        );
        assert_eq!(l, Limits::default());
        assert_eq!(w.len(), 2, "{w:#?}");
        assert!(w[0].contains("limits.MaxConnections") && w[0].contains("refused"));
        let (l, w) = limits(json!({"MaxConnections": 0}), Mode::Tcp);
        assert_eq!(l, Limits::default());
        assert!(w[0].contains("refused"), "{w:?}");
        let (l, w) = limits(json!("lots"), Mode::Tcp);
        assert_eq!(l, Limits::default());
        assert_eq!(w.len(), 1);
        assert!(limits(Value::Null, Mode::Http).1.is_empty());
        assert!(Limits::default().backend_lines(Mode::Http).is_empty());
    }

    fn passive(v: Value) -> (Option<PassiveCheck>, Vec<String>) {
        let config = BTreeMap::from([("passive_health_check".to_string(), v)]);
        let mut w = Vec::new();
        (passive_check(&config, "upstream x", &mut w), w)
    }

    /// Both forms Consul hands over; Envoy's defaults for what is unset; the ejection time
    /// becomes enough passing checks to fill it.
    #[test]
    fn passive_checks_become_error_limits_and_a_rise() {
        let (p, w) = passive(
            json!({"MaxFailures": 3, "BaseEjectionTime": 10_000_000_000u64,
            "Interval": 1_000_000_000u64, "MaxEjectionPercent": 100}),
        );
        assert!(w.is_empty(), "{w:?}");
        let p = p.unwrap();
        assert_eq!((p.max_failures, p.ejection_ms), (3, 10_000));
        assert_eq!(
            p.server_options(Mode::Http, 1000),
            "observe layer7 error-limit 3 on-error mark-down rise 10"
        );
        assert_eq!(
            p.server_options(Mode::Tcp, 3000),
            "observe layer4 error-limit 3 on-error mark-down rise 4"
        );
        let (p, w) = passive(json!({"max_failures": 2, "base_ejection_time": "5s"}));
        assert_eq!(p.map(|p| (p.max_failures, p.ejection_ms)), Some((2, 5000)));
        assert!(w[0].contains("MaxEjectionPercent"), "{w:?}");
        let (p, _) = passive(json!({}));
        assert_eq!(
            p.map(|p| (p.max_failures, p.ejection_ms)),
            Some((5, 30_000))
        );
    }

    #[test]
    fn a_bad_or_disabled_passive_check_ejects_nothing() {
        let (p, w) = passive(json!({"MaxFailures": "3; x", "BaseEjectionTime": "soon"}));
        assert_eq!(p, None);
        assert_eq!(w.len(), 2, "{w:#?}");
        let (p, w) = passive(json!({"EnforcingConsecutive5xx": 0}));
        assert_eq!((p, w.len()), (None, 0));
        let (p, w) = passive(json!({"EnforcingConsecutive5xx": 50, "MaxEjectionPercent": 100}));
        assert!(
            p.is_some() && w.len() == 1 && w[0].contains("enforced as 100"),
            "{w:?}"
        );
        assert_eq!(passive(json!([1])).0, None);
        assert!(passive(Value::Null).1.is_empty());
    }
}
