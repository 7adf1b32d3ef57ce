//! The merged view of everything the sidecar needs from Consul. It changes only by whole
//! `Update`s from the watchers, and says whether it is complete enough to act on.

use std::collections::BTreeMap;

use crate::admission::Verdicts;
use crate::consul::api::{
    AgentCheck, AgentService, CaRoots, HealthEntry, IntentionEntry, JwtProviders, LeafCert,
};
use crate::consul::chain::{DiscoveryChain, TargetKey};
use crate::consul::{destinations, Update};
use crate::consul::{DestinationKey, DestinationKind};

#[derive(Clone, Debug, Default, PartialEq)]
pub struct Snapshot {
    pub registration: Option<AgentService>,
    pub leaf: Option<LeafCert>,
    pub roots: Option<CaRoots>,
    pub endpoints: BTreeMap<DestinationKey, Vec<HealthEntry>>,
    pub intentions: Option<Vec<IntentionEntry>>,
    /// The `jwt-provider` config entries, read only once an intention requires a JWT.
    pub jwt_providers: Option<JwtProviders>,
    /// The `mesh` config entries (its TLS settings), once read.
    pub mesh: Option<Vec<serde_json::Value>>,
    /// The ACL default policy as Consul spells it (see `Update::AclDefaultPolicy`).
    pub acl_default_policy: Option<String>,
    /// The agent's checks of the proxied service, read only when the registration asks for
    /// `Expose.Checks`; `None` until first read.
    pub checks: Option<Vec<AgentCheck>>,
    /// The local agent's own address (`/v1/agent/self` Member.Addr), read only for
    /// `Expose.Checks`: a check's listener admits it.
    pub agent_address: Option<String>,
    /// Not Consul's: the identity checker's verdicts on upstream endpoints (`admission`),
    /// merged here so that the model is built from one input.
    pub admission: Verdicts,
    /// The discovery chain of each service destination, once read.
    pub chains: BTreeMap<DestinationKey, DiscoveryChain>,
    /// The instances of chain targets other than a destination itself (that one is in
    /// `endpoints`).
    pub targets: BTreeMap<TargetKey, Vec<HealthEntry>>,
}

impl Snapshot {
    /// Merges one update; says whether anything the sidecar acts on changed.
    pub fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Registration(r) => replace(&mut self.registration, Some(r)),
            // A deregistered proxy keeps its last configuration serving: removing the listeners
            // would cut live traffic over what may be a re-registration in progress.
            Update::RegistrationGone => false,
            Update::Leaf(l) => replace(&mut self.leaf, Some(l)),
            Update::Roots(r) => replace(&mut self.roots, Some(r)),
            Update::Intentions(i) => replace(&mut self.intentions, Some(i)),
            Update::JwtProviders(mut p) => {
                // The entries' watcher knows nothing of fetched key sets: keep them.
                if let Some(old) = &self.jwt_providers {
                    p.remote = old.remote.clone();
                }
                replace(&mut self.jwt_providers, Some(p))
            }
            Update::RemoteJwks(uri, text) => match &mut self.jwt_providers {
                Some(p) if p.remote.get(&uri) != Some(&text) => {
                    p.remote.insert(uri, text);
                    true
                }
                _ => false,
            },
            Update::Mesh(m) => replace(&mut self.mesh, Some(m)),
            Update::AclDefaultPolicy(p) => replace(&mut self.acl_default_policy, Some(p)),
            Update::Checks(c) => replace(&mut self.checks, Some(c)),
            Update::AgentAddress(a) => replace(&mut self.agent_address, Some(a)),
            Update::Endpoints(k, e) => insert(&mut self.endpoints, k, e),
            Update::Chain(k, c) => insert(&mut self.chains, k, c),
            Update::TargetEndpoints(k, e) => insert(&mut self.targets, k, e),
        }
    }

    /// Takes the identity checker's verdicts; says whether they changed.
    pub fn admit(&mut self, verdicts: Verdicts) -> bool {
        if self.admission == verdicts {
            false
        } else {
            self.admission = verdicts;
            true
        }
    }

    /// What is still unknown before anything may be applied (registration, leaf, roots).
    pub fn missing(&self) -> Vec<&'static str> {
        let mut missing = Vec::new();
        if self.registration.is_none() {
            missing.push("the proxy registration");
        }
        if self.leaf.is_none() {
            missing.push("the leaf certificate");
        }
        if self.roots.as_ref().is_none_or(|r| r.roots.is_empty()) {
            missing.push("the CA roots");
        }
        missing
    }

    pub fn is_complete(&self) -> bool {
        self.missing().is_empty()
    }

    /// Whether every upstream destination has answered at least once, and every service
    /// destination's discovery chain; the first render waits briefly for this so that HAProxy
    /// starts with its servers and routes instead of reloading for them. A chain target's
    /// instances are not waited for: they fill their backend's slots live, and a failover
    /// target in an unreachable datacenter must not hold back the rest.
    pub fn endpoints_known(&self) -> bool {
        self.registration.as_ref().is_some_and(|r| {
            destinations(r).iter().all(|k| {
                self.endpoints.contains_key(k)
                    && (k.kind != DestinationKind::Service || self.chains.contains_key(k))
            })
        })
    }
}

fn insert<K: Ord, V: PartialEq>(map: &mut BTreeMap<K, V>, k: K, v: V) -> bool {
    if map.get(&k) == Some(&v) {
        false
    } else {
        map.insert(k, v);
        true
    }
}

fn replace<T: PartialEq>(slot: &mut Option<T>, value: Option<T>) -> bool {
    if *slot == value {
        false
    } else {
        *slot = value;
        true
    }
}
