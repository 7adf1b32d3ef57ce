//! Everything the sidecar reads from the local Consul agent: the response types (`api`), the
//! client with its proxy lookup (`client`) and the blocking-query watchers (`watch`).
//! This module knows nothing about HAProxy.

pub mod api;
pub mod chain;
pub mod client;
pub mod jwks;
pub mod watch;

use std::collections::BTreeMap;

use api::{AgentService, CaRoots, HealthEntry, IntentionEntry, LeafCert};
use serde_json::Value;

use crate::value::{Millis, Refused};

/// One upstream destination as Consul resolves it. Two upstreams that name the same destination
/// in the same datacenter share one watch; the listeners stay apart (see `model`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestinationKey {
    pub kind: DestinationKind,
    pub name: String,
    /// Empty for the agent's own datacenter.
    pub datacenter: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DestinationKind {
    Service,
    PreparedQuery,
}

impl std::fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            DestinationKind::Service => "service",
            DestinationKind::PreparedQuery => "prepared query",
        };
        write!(f, "{kind} {}", self.name)?;
        if !self.datacenter.is_empty() {
            write!(f, " in {}", self.datacenter)?;
        }
        Ok(())
    }
}

/// What changed in Consul.
#[derive(Clone, Debug)]
pub enum Update {
    Registration(AgentService),
    /// The registration is gone (404): the service was deregistered.
    RegistrationGone,
    Leaf(LeafCert),
    Roots(CaRoots),
    Endpoints(DestinationKey, Vec<HealthEntry>),
    /// Every intention in the cluster; the sidecar keeps those for its own service.
    Intentions(Vec<IntentionEntry>),
    /// Every `jwt-provider` config entry, with the local JWKS files they name, as read.
    JwtProviders(api::JwtProviders),
    /// A remote JWKS URI's key set as just fetched (`jwks`), when it differs from the last.
    RemoteJwks(String, String),
    /// The `mesh` config entries as read (`/v1/config/mesh`: none or one); empty on a Consul
    /// that has no such kind (before 1.10).
    Mesh(Vec<serde_json::Value>),
    /// The ACL default policy as the agent spells it (`allow`/`deny`; anything else is kept
    /// as it came): what a connection that no intention matches gets.
    AclDefaultPolicy(String),
    /// The agent's checks of the proxied service (`Expose.Checks`), sorted by check ID.
    Checks(Vec<api::AgentCheck>),
    /// The local agent's address (`/v1/agent/self` Member.Addr).
    AgentAddress(String),
    /// The compiled discovery chain of a service destination.
    Chain(DestinationKey, chain::DiscoveryChain),
    /// The serving instances of one chain target other than the destination itself.
    TargetEndpoints(chain::TargetKey, Vec<HealthEntry>),
}

/// The service instance whose agent checks the registration asks to expose
/// (`Proxy.Expose.Checks`), if any.
pub fn exposed_checks_of(registration: &AgentService) -> Option<String> {
    registration
        .proxy
        .as_ref()
        .filter(|p| p.expose.checks && !p.destination_service_id.is_empty())
        .map(|p| p.destination_service_id.clone())
}

/// The agent's checks as an update: sorted by check ID, so that their order in the answer
/// (a JSON object) never reads as a change.
pub fn checks_update(checks: BTreeMap<String, api::AgentCheck>) -> Update {
    Update::Checks(checks.into_values().collect())
}

/// The destinations a registration's upstreams need watched.
pub fn destinations(registration: &AgentService) -> Vec<DestinationKey> {
    let mut keys: Vec<DestinationKey> = registration
        .proxy
        .iter()
        .flat_map(|p| p.upstreams.iter())
        // A peer's service is not ours of the same name; the model refuses such upstreams.
        .filter(|u| u.destination_peer.is_empty())
        .map(|u| DestinationKey {
            kind: if u.destination_type == "prepared_query" {
                DestinationKind::PreparedQuery
            } else {
                DestinationKind::Service
            },
            name: u.destination_name.clone(),
            datacenter: u.datacenter.clone(),
        })
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Polling a prepared query more often than this would load the agent for nothing.
pub const MIN_POLL_INTERVAL_MS: u64 = 100;

/// An upstream's `poll_interval` (the Go original's key: a Go duration such as `"30s"`), how
/// often its prepared query is executed again: `None` when unset, an error when it is not a
/// duration from `MIN_POLL_INTERVAL_MS` up to HAProxy's largest timeout (the model names it in
/// a warning, the watcher then polls at its default).
pub fn poll_interval(config: &BTreeMap<String, Value>) -> Option<Result<Millis, Refused>> {
    const KEY: &str = "poll_interval";
    let parsed = Millis::from_go_json(KEY, config.get(KEY)?)?;
    Some(parsed.and_then(|ms| {
        if ms.get() < MIN_POLL_INTERVAL_MS {
            Err(Refused {
                field: KEY,
                value: format!("{} ms", ms.get()),
                reason: "below 100 ms, which would poll the agent for nothing",
            })
        } else {
            Ok(ms)
        }
    }))
}

/// The poll interval each prepared-query destination asks for: the shortest of the valid
/// `poll_interval`s of the upstreams that name it; absent when none sets one.
pub fn poll_intervals(registration: &AgentService) -> BTreeMap<DestinationKey, Millis> {
    let mut out: BTreeMap<DestinationKey, Millis> = BTreeMap::new();
    for u in registration.proxy.iter().flat_map(|p| p.upstreams.iter()) {
        if u.destination_type != "prepared_query" || !u.destination_peer.is_empty() {
            continue;
        }
        let Some(Ok(every)) = poll_interval(&u.config) else {
            continue;
        };
        let key = DestinationKey {
            kind: DestinationKind::PreparedQuery,
            name: u.destination_name.clone(),
            datacenter: u.datacenter.clone(),
        };
        out.entry(key)
            .and_modify(|m| *m = (*m).min(every))
            .or_insert(every);
    }
    out
}
