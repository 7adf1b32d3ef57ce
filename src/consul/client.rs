//! The Consul agent client: one-shot reads, blocking reads, and finding the proxy to serve.

use std::collections::BTreeMap;
use std::time::Duration;

use super::api::{self, AgentService};
use super::{DestinationKey, DestinationKind};
use crate::config::{ConsulSettings, Target};
use crate::error::{Context, Error, Result};
use crate::http::encode;
use crate::http::{self, Credential};

const ONE_SHOT_TIMEOUT: Duration = Duration::from_secs(15);

#[derive(Clone, Debug)]
pub struct Consul {
    http: http::Client,
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

impl Consul {
    pub fn new(settings: &ConsulSettings) -> Result<Consul> {
        let credential = match &settings.token {
            Some(t) => Credential::ConsulToken(t.clone()),
            None => Credential::None,
        };
        let http = http::Client::new(settings.endpoint.clone(), &settings.tls, credential)
            .context("setting up the Consul client")?;
        Ok(Consul { http })
    }

    pub fn endpoint(&self) -> String {
        self.http.endpoint().to_string()
    }

    /// A GET that may block: Consul holds it until the content changes or `wait` passes.
    pub fn get(&self, path: &str, wait: Option<Duration>) -> Result<Answer> {
        // Consul adds up to wait/16 of jitter before answering; the client must outwait it.
        let timeout = match wait {
            Some(w) => w + w / 16 + Duration::from_secs(10),
            None => ONE_SHOT_TIMEOUT,
        };
        let resp = self.http.get(path, timeout)?;
        Ok(Answer {
            status: resp.status,
            index: resp
                .header("X-Consul-Index")
                .and_then(|v| v.trim().parse().ok()),
            content_hash: resp.header("X-Consul-ContentHash").map(str::to_string),
            default_acl_policy: resp
                .header("X-Consul-Default-Acl-Policy")
                .map(str::to_string),
            body: resp.body,
        })
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

    /// A one-shot GET that must answer 200 with JSON of type `T`.
    pub fn get_json<T: serde::de::DeserializeOwned>(&self, path: &str) -> Result<T> {
        api::parse(path, &self.get_ok(path)?)
    }

    /// A one-shot GET that must answer 200; its body.
    pub fn get_ok(&self, path: &str) -> Result<String> {
        let answer = self.get(path, None).with_context(|| {
            format!("asking the Consul agent at {} for {path}", self.endpoint())
        })?;
        if answer.status != 200 {
            return Err(Error::msg(format!(
                "the Consul agent at {} answered {path} with status {}: {}",
                self.endpoint(),
                answer.status,
                answer.body.trim()
            )));
        }
        Ok(answer.body)
    }

    /// Finds the ID of the `connect-proxy` to serve, as `consul connect proxy -sidecar-for` does.
    pub fn find_proxy(&self, target: &Target) -> std::result::Result<String, LookupError> {
        let services: BTreeMap<String, AgentService> =
            self.get_json(SERVICES_PATH).map_err(LookupError::Consul)?;
        choose_proxy(&services, target)
    }

    pub fn send(&self, method: &str, path: &str, body: Option<&str>) -> Result<Answer> {
        let resp = self
            .http
            .send(method, path, body, ONE_SHOT_TIMEOUT)
            .with_context(|| format!("{method} {path} on the Consul agent"))?;
        Ok(Answer {
            status: resp.status,
            index: None,
            content_hash: None,
            default_acl_policy: resp
                .header("X-Consul-Default-Acl-Policy")
                .map(str::to_string),
            body: resp.body,
        })
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
            "no connect-proxy on this agent has Proxy.DestinationServiceID {service_id:?}; connect-proxy services here: {}",
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

pub const SERVICES_PATH: &str = "/v1/agent/services";
pub const ROOTS_PATH: &str = "/v1/agent/connect/ca/roots";
/// Every intention; blocks on an index.
pub const INTENTIONS_PATH: &str = "/v1/connect/intentions";
/// The `mesh` config entry, as a list (empty when none is written; Consul 1.10+).
pub const MESH_PATH: &str = "/v1/config/mesh";

/// Every `jwt-provider` config entry (Consul 1.16+), for the intentions' `JWT` requirements.
pub const JWT_PROVIDERS_PATH: &str = "/v1/config/jwt-provider";
pub const AGENT_SELF_PATH: &str = "/v1/agent/self";
pub const AUTHORIZE_PATH: &str = "/v1/agent/connect/authorize";
pub const REGISTER_PATH: &str = "/v1/agent/service/register";

/// Path of the blocking registration read for a proxy ID.
pub fn registration_path(proxy_id: &str) -> String {
    format!("/v1/agent/service/{}", encode(proxy_id))
}

pub fn deregister_path(service_id: &str) -> String {
    format!("/v1/agent/service/deregister/{}", encode(service_id))
}

/// The agent's checks of one service instance (`Expose.Checks`); not a blocking endpoint.
pub fn checks_path(service_id: &str) -> String {
    let filter = format!("ServiceID == \"{service_id}\"");
    format!("/v1/agent/checks?filter={}", encode(&filter))
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
