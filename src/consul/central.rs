//! Agentless: central configuration merged into the catalog's registration, as an agent merges
//! it into the registrations it serves (Consul 1.16's `agent/configentry`: the resolved
//! service config computed from `proxy-defaults/global` and the service's `service-defaults`,
//! then merged into the registration). The catalog holds the registration as written, so
//! without an agent the sidecar does the same merge from the servers' config entries. Pure.
//!
//! Precedence, as Consul's: the registration wins over `service-defaults`, which wins over
//! `proxy-defaults`. What is merged, and how:
//! - `Proxy.Config`: `proxy-defaults`' `Config`, over which `service-defaults` sets `protocol`,
//!   `balance_inbound_connections`, `max_inbound_connections`, `local_connect_timeout_ms` and
//!   `local_request_timeout_ms`; a key the registration has keeps its value.
//! - `Mode`, `TransparentProxy.OutboundListenerPort`: the first that is set;
//!   `TransparentProxy.DialedDirectly`: any that says so.
//! - `Expose`: `Checks` if any says so; `Paths` from the first that has some.
//! - `AccessLogs`: `proxy-defaults`' fields where the registration has none.
//! - Each service upstream's `Config` (keys it has keep their value): the `protocol` of
//!   `proxy-defaults`, then of the upstream service's own `service-defaults`, then this
//!   service's `UpstreamConfig.Defaults`, then its override for that upstream; a peer's
//!   upstream takes no `protocol`, and `mesh_gateway` is not kept in the config (Consul too
//!   removes it there).
//!
//! Not merged: `MeshGateway` modes (this sidecar dials no mesh gateway by mode), Envoy
//! extensions, and `Destination` (terminating gateways).

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use super::api::AgentService;

/// The config entries read so far: every `proxy-defaults` entry (only `global` counts) and
/// every `service-defaults` entry (the service's own, and its upstreams').
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Central<'a> {
    pub proxy_defaults: &'a [Value],
    pub service_defaults: &'a [Value],
}

impl Central<'_> {
    fn proxy_defaults(&self) -> Option<&Value> {
        self.proxy_defaults
            .iter()
            .find(|e| e.get("Name").and_then(Value::as_str) == Some("global"))
    }

    fn service_defaults(&self, service: &str) -> Option<&Value> {
        self.service_defaults
            .iter()
            .find(|e| e.get("Name").and_then(Value::as_str) == Some(service))
    }
}

fn str_at<'v>(v: Option<&'v Value>, key: &str) -> Option<&'v str> {
    v?.get(key)?.as_str().filter(|s| !s.is_empty())
}

fn positive_at<'v>(v: Option<&'v Value>, key: &str) -> Option<&'v Value> {
    v?.get(key).filter(|n| n.as_f64().is_some_and(|n| n > 0.0))
}

/// A mode that says something: Consul spells "not set" both empty and `default`.
fn mode_at(v: Option<&Value>) -> Option<&str> {
    str_at(v, "Mode").filter(|m| *m != "default")
}

/// The registration with the central defaults merged in; anything but a sidecar's
/// registration is returned as it came.
pub fn merge(mut registration: AgentService, central: &Central) -> AgentService {
    let Some(proxy) = registration.proxy.as_mut() else {
        return registration;
    };
    if registration.kind != "connect-proxy" || proxy.destination_service_name.is_empty() {
        return registration;
    }
    let pd = central.proxy_defaults();
    let sd = central.service_defaults(&proxy.destination_service_name);

    for (k, v) in proxy_config_defaults(pd, sd) {
        proxy.config.entry(k).or_insert(v);
    }
    if proxy.mode.is_empty() || proxy.mode == "default" {
        if let Some(m) = mode_at(sd).or(mode_at(pd)) {
            proxy.mode = m.to_string();
        }
    }
    let tproxy = |v: Option<&Value>| v.and_then(|v| v.get("TransparentProxy")).cloned();
    let (sd_t, pd_t) = (tproxy(sd), tproxy(pd));
    if proxy.transparent_proxy.outbound_listener_port == 0 {
        proxy.transparent_proxy.outbound_listener_port = [&sd_t, &pd_t]
            .into_iter()
            .filter_map(|t| t.as_ref()?.get("OutboundListenerPort")?.as_u64())
            .filter_map(|p| u16::try_from(p).ok())
            .find(|p| *p != 0)
            .unwrap_or(0);
    }
    proxy.transparent_proxy.dialed_directly |= [&sd_t, &pd_t].into_iter().any(|t| {
        t.as_ref()
            .and_then(|t| t.get("DialedDirectly"))
            .and_then(Value::as_bool)
            == Some(true)
    });
    merge_expose(&mut proxy.expose, pd, sd);
    merge_access_logs(&mut proxy.access_logs, pd);

    let upstream_defaults = sd
        .and_then(|s| s.get("UpstreamConfig"))
        .and_then(|u| u.get("Defaults"));
    let overrides: &[Value] = sd
        .and_then(|s| s.get("UpstreamConfig"))
        .and_then(|u| u.get("Overrides"))
        .and_then(Value::as_array)
        .map_or(&[], Vec::as_slice);
    for us in &mut proxy.upstreams {
        if !(us.destination_type.is_empty() || us.destination_type == "service") {
            continue;
        }
        let mut resolved = Map::new();
        if let Some(p) = pd
            .and_then(|p| p.get("Config"))
            .and_then(|c| c.get("protocol"))
        {
            resolved.insert("protocol".into(), p.clone());
        }
        if let Some(p) = str_at(central.service_defaults(&us.destination_name), "Protocol") {
            resolved.insert("protocol".into(), Value::String(p.into()));
        }
        if let Some(d) = upstream_defaults {
            upstream_config_into(d, &mut resolved);
        }
        let local_peer = us.destination_peer.as_str();
        if let Some(o) = overrides.iter().find(|o| {
            str_at(Some(o), "Name") == Some(us.destination_name.as_str())
                && str_at(Some(o), "Peer").unwrap_or_default() == local_peer
        }) {
            upstream_config_into(o, &mut resolved);
        }
        // A peer's protocol is its own cluster's to say, not this one's defaults'.
        if !local_peer.is_empty() {
            resolved.remove("protocol");
        }
        resolved.remove("mesh_gateway");
        for (k, v) in resolved {
            us.config.entry(k).or_insert(v);
        }
    }
    registration
}

/// `Proxy.Config` as the defaults give it: `proxy-defaults`' map, then `service-defaults`'
/// fields.
fn proxy_config_defaults(pd: Option<&Value>, sd: Option<&Value>) -> BTreeMap<String, Value> {
    let mut out: BTreeMap<String, Value> = pd
        .and_then(|p| p.get("Config"))
        .and_then(Value::as_object)
        .map(|m| m.iter().map(|(k, v)| (k.clone(), v.clone())).collect())
        .unwrap_or_default();
    for (field, key) in [
        ("Protocol", "protocol"),
        ("BalanceInboundConnections", "balance_inbound_connections"),
    ] {
        if let Some(v) = str_at(sd, field) {
            out.insert(key.into(), Value::String(v.into()));
        }
    }
    for (field, key) in [
        ("MaxInboundConnections", "max_inbound_connections"),
        ("LocalConnectTimeoutMs", "local_connect_timeout_ms"),
        ("LocalRequestTimeoutMs", "local_request_timeout_ms"),
    ] {
        if let Some(v) = positive_at(sd, field) {
            out.insert(key.into(), v.clone());
        }
    }
    out
}

fn merge_expose(expose: &mut super::api::Expose, pd: Option<&Value>, sd: Option<&Value>) {
    let of = |v: Option<&Value>| v.and_then(|v| v.get("Expose")).cloned();
    let (sd_e, pd_e) = (of(sd), of(pd));
    let checks = |e: &Option<Value>| {
        e.as_ref()
            .and_then(|e| e.get("Checks"))
            .and_then(Value::as_bool)
            == Some(true)
    };
    expose.checks |= checks(&sd_e) || checks(&pd_e);
    if expose.paths.is_empty() {
        let paths = [&sd_e, &pd_e].into_iter().find_map(|e| {
            let p = e.as_ref()?.get("Paths")?;
            p.as_array().filter(|a| !a.is_empty())?;
            serde_json::from_value::<Vec<super::api::ExposePath>>(p.clone()).ok()
        });
        if let Some(p) = paths {
            expose.paths = p;
        }
    }
}

fn merge_access_logs(logs: &mut Value, pd: Option<&Value>) {
    let Some(Value::Object(defaults)) = pd.and_then(|p| p.get("AccessLogs")) else {
        return;
    };
    if !logs.is_object() {
        *logs = Value::Object(Map::new());
    }
    if let Value::Object(mine) = logs {
        for (k, v) in defaults {
            let unset = mine.get(k).is_none_or(is_zero);
            if unset && !is_zero(v) {
                mine.insert(k.clone(), v.clone());
            }
        }
    }
}

/// Go's zero value, as Consul's merge sees a field left unset.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
    }
}

/// One `UpstreamConfig` (its defaults or an override) written into an upstream's config map
/// under the keys an agent writes, for what it sets.
fn upstream_config_into(u: &Value, out: &mut Map<String, Value>) {
    for (field, key) in [
        ("Protocol", "protocol"),
        ("BalanceOutboundConnections", "balance_outbound_connections"),
        ("EnvoyListenerJSON", "envoy_listener_json"),
        ("EnvoyClusterJSON", "envoy_cluster_json"),
    ] {
        if let Some(v) = str_at(Some(u), field) {
            out.insert(key.into(), Value::String(v.into()));
        }
    }
    if let Some(v) = positive_at(Some(u), "ConnectTimeoutMs") {
        out.insert("connect_timeout_ms".into(), v.clone());
    }
    for (field, key) in [
        ("Limits", "limits"),
        ("PassiveHealthCheck", "passive_health_check"),
    ] {
        if let Some(v) = u.get(field).filter(|v| !is_zero(v)) {
            out.insert(key.into(), v.clone());
        }
    }
    if mode_at(u.get("MeshGateway")).is_some() {
        if let Some(m) = u.get("MeshGateway") {
            out.insert("mesh_gateway".into(), m.clone());
        }
    }
}

#[cfg(test)]
#[path = "central/tests.rs"]
mod tests;
