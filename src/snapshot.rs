//! The merged view of everything the sidecar needs from Consul. It changes only by whole
//! `Update`s from the watchers, and says whether it is complete enough to act on.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;

use crate::admission::Verdicts;
use crate::consul::api::{
    AgentCheck, AgentService, CaRoots, ExportedServicesEntry, HealthEntry, IntentionEntry,
    JwtProviders, LeafCert,
};
use crate::consul::central::{self, Central};
use crate::consul::chain::{targets_to_watch, DiscoveryChain, TargetKey};
use crate::consul::kinds::{Role, Watch};
use crate::consul::{
    destinations, exported_destinations, exported_to, exposed_checks_of, is_mesh_gateway,
    is_transparent, peered_destinations, poll_intervals, Update,
};
use crate::consul::{DestinationKey, DestinationKind};
use crate::peering::{PeerInstance, PeerKey, Peering};

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
    /// Agentless: the registration as the catalog holds it, and the central config entries;
    /// `registration` is the three merged (`consul::central::merge`), as an agent would.
    pub catalog_registration: Option<AgentService>,
    pub proxy_defaults: Option<Vec<serde_json::Value>>,
    pub service_defaults: Option<Vec<serde_json::Value>>,
    /// Set once by the supervisor: agentless, the first render also waits for the central
    /// config entries, so the first configuration is the merged registration's.
    pub agentless: bool,
    /// Set once by the supervisor with `-enable-intentions`: nothing is applied before the
    /// intentions agent's first real table (intentions, ACL default policy, roots, and the
    /// `jwt-provider` entries once an intention names a provider), so a new public listener
    /// never denies what the intentions allow.
    pub enforcing: bool,
    /// A mesh gateway's `exported-services` entries; `None` until first read.
    pub exported: Option<Vec<ExportedServicesEntry>>,
    /// Transparent mode: the services intentions let this one reach, once read.
    pub intention_upstreams: Option<Vec<String>>,
    /// The cluster peerings read: those peered upstreams dial and those this service is
    /// exported to.
    pub peerings: BTreeMap<String, Peering>,
    /// The instances (gateways) Consul lists for each peered upstream's service.
    pub peer_instances: BTreeMap<PeerKey, Vec<PeerInstance>>,
    /// Not Consul's: where the supervisor's forwarder of each peered service listens
    /// (`peering::Forwarders`), so that the model points that upstream's server there.
    pub forwarders: BTreeMap<PeerKey, SocketAddr>,
}

impl Snapshot {
    /// Merges one update; says whether anything the sidecar acts on changed.
    pub fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Registration(r) => {
                self.catalog_registration = Some(r);
                self.merge_central()
            }
            // `MutualTLSMode` is read from the entries, not the merged registration (which
            // has no such field): its change counts by itself.
            Update::ProxyDefaults(e) => {
                let mode = self.mutual_tls_mode();
                self.proxy_defaults = Some(e);
                self.merge_central() || mode != self.mutual_tls_mode()
            }
            Update::ServiceDefaults(e) => {
                // Transparent mode also reads them (their `Destination`s), with or without
                // an agent: there a change counts even where nothing is merged.
                let read = self.service_defaults.as_ref() != Some(&e)
                    && self.registration.as_ref().is_some_and(is_transparent);
                let mode = self.mutual_tls_mode();
                self.service_defaults = Some(e);
                self.merge_central() || read || mode != self.mutual_tls_mode()
            }
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
            Update::ExportedServices(x) => replace(&mut self.exported, Some(x)),
            Update::IntentionUpstreams(u) => replace(&mut self.intention_upstreams, Some(u)),
            Update::Peering(name, p) => insert(&mut self.peerings, name, p),
            Update::PeerInstances(k, i) => insert(&mut self.peer_instances, k, i),
        }
    }

    /// Takes the forwarders' addresses; says whether they changed.
    pub fn forwarding(&mut self, addresses: BTreeMap<PeerKey, SocketAddr>) -> bool {
        if self.forwarders == addresses {
            false
        } else {
            self.forwarders = addresses;
            true
        }
    }

    /// The registration as an agent would serve it: the catalog's (or the agent's, which
    /// comes merged already, with no entries read) with the central config entries read so
    /// far merged in; says whether it changed.
    fn merge_central(&mut self) -> bool {
        let Some(r) = self.catalog_registration.clone() else {
            return false;
        };
        let central = Central {
            proxy_defaults: self.proxy_defaults.as_deref().unwrap_or_default(),
            service_defaults: self.service_defaults.as_deref().unwrap_or_default(),
        };
        replace(&mut self.registration, Some(central::merge(r, &central)))
    }

    /// `MutualTLSMode` as Consul 1.16 resolves it for the proxied service: its own
    /// `service-defaults`' when set, else `proxy-defaults` global's; empty (strict) when
    /// neither says. Neither agent API shows the merged value, so it is read from the entries
    /// in agent mode too. A value that is not a string comes as its JSON, for the model to
    /// name.
    pub fn mutual_tls_mode(&self) -> String {
        let service = self
            .registration
            .as_ref()
            .and_then(|r| r.proxy.as_ref())
            .map_or("", |p| p.destination_service_name.as_str());
        let of = |entries: &Option<Vec<serde_json::Value>>, name: &str| {
            entries
                .iter()
                .flatten()
                .find(|e| e.get("Name").and_then(serde_json::Value::as_str) == Some(name))
                .and_then(|e| e.get("MutualTLSMode"))
                .filter(|m| !m.is_null() && !matches!(m.as_str(), Some("" | "default")))
                .map(|m| m.as_str().map_or_else(|| m.to_string(), str::to_owned))
        };
        if service.is_empty() {
            return String::new();
        }
        of(&self.service_defaults, service)
            .or_else(|| of(&self.proxy_defaults, "global"))
            .unwrap_or_default()
    }

    /// Whether a mesh entry says `AllowEnablingPermissiveMutualTLS`: without it Consul's
    /// proxies serve `MutualTLSMode: permissive` as strict.
    pub fn permissive_allowed(&self) -> bool {
        self.mesh.iter().flatten().any(|e| {
            e.get("AllowEnablingPermissiveMutualTLS")
                .and_then(serde_json::Value::as_bool)
                == Some(true)
        })
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

    /// What is still unknown before anything may be applied (registration, leaf, roots, and
    /// what `agentless` and `enforcing` add).
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
        if self.agentless && self.proxy_defaults.is_none() {
            missing.push("the proxy-defaults config entries");
        }
        if self.agentless && self.service_defaults.is_none() {
            missing.push("the service-defaults config entries");
        }
        if self.enforcing {
            match &self.intentions {
                None => missing.push("the intentions"),
                Some(i)
                    if self.jwt_providers.is_none() && i.iter().any(IntentionEntry::needs_jwt) =>
                {
                    missing.push("the jwt-provider config entries")
                }
                Some(_) => {}
            }
            if self.acl_default_policy.is_none() {
                missing.push("the ACL default policy");
            }
        }
        missing
    }

    /// Everything that must be watched in Consul for what is known so far: the one list the
    /// watchers follow, the dry run reads until it stops growing and the fixtures answer.
    /// Each answer can only add what it names (a registration its upstreams, a chain its
    /// targets, the exports their services), so reading until nothing new is wanted ends.
    pub fn watches(&self, role: &Role) -> BTreeSet<Watch> {
        let mut w = BTreeSet::from([
            Watch::Registration(role.proxy_id.clone()),
            Watch::Roots,
            Watch::Mesh,
        ]);
        if role.gateway {
            w.insert(Watch::ExportedServices);
            for key in self.exported.iter().flat_map(|x| exported_destinations(x)) {
                w.insert(Watch::Instances(key, None));
            }
        }
        let Some(reg) = &self.registration else {
            return w;
        };
        // A gateway's leaf is its own service's; a sidecar's, the service it fronts.
        let service = if is_mesh_gateway(reg) {
            reg.service.clone()
        } else {
            reg.proxy
                .as_ref()
                .map(|p| p.destination_service_name.clone())
                .unwrap_or_default()
        };
        if !service.is_empty() {
            w.insert(Watch::Leaf(service.clone()));
            if role.agentless {
                w.insert(Watch::ProxyDefaults);
                w.insert(Watch::ServiceDefaults);
            }
            if role.intentions {
                w.insert(Watch::Intentions);
                w.insert(Watch::AclDefaultPolicy(service.clone()));
            }
        }
        // From the first intention that names a JWT provider on, for the rest of the run
        // (Consul 1.8 has no such entries, and no such intentions).
        let jwt = self.jwt_providers.is_some()
            || self
                .intentions
                .iter()
                .flatten()
                .any(IntentionEntry::needs_jwt);
        if role.intentions && jwt {
            w.insert(Watch::JwtProviders);
        }
        if is_mesh_gateway(reg) {
            return w;
        }
        // With an agent, `MutualTLSMode` is read from the entries themselves (the agent never
        // shows it): from the mesh entry's consent on, without which permissive cannot be
        // served, and then for the rest of the run, so that a withdrawn consent is named.
        if !role.agentless && (self.permissive_allowed() || self.proxy_defaults.is_some()) {
            w.insert(Watch::ProxyDefaults);
            w.insert(Watch::ServiceDefaults);
        }
        // The exports name the peers whose clients this service's public listener trusts.
        w.insert(Watch::ExportedServices);
        for peer in self.exported.iter().flat_map(|x| exported_to(x, &service)) {
            w.insert(Watch::Peering(peer));
        }
        for key in peered_destinations(reg) {
            w.insert(Watch::Peering(key.peer.clone()));
            w.insert(Watch::PeerInstances(key));
        }
        if let Some(id) = exposed_checks_of(reg) {
            w.insert(Watch::Checks(id));
            // Agentless, the node's address (`consul::kinds`).
            w.insert(Watch::AgentAddress);
        }
        if is_transparent(reg) && !service.is_empty() {
            w.insert(Watch::Topology(service));
            w.insert(Watch::ServiceDefaults);
        }
        let polls = poll_intervals(reg);
        for key in destinations(reg, self.implicit_upstreams()) {
            if key.kind == DestinationKind::Service {
                if let Some(chain) = self.chains.get(&key) {
                    w.extend(
                        targets_to_watch(chain, &key)
                            .into_iter()
                            .map(Watch::TargetInstances),
                    );
                }
                w.insert(Watch::Chain(key.clone()));
            }
            let poll = polls.get(&key).copied();
            w.insert(Watch::Instances(key, poll));
        }
        w
    }

    /// The implicit upstreams read so far (transparent mode), empty until read.
    pub fn implicit_upstreams(&self) -> &[String] {
        self.intention_upstreams.as_deref().unwrap_or_default()
    }

    /// Whether the exports and the peering (its CA) of every peer this sidecar's service is
    /// exported to are read. The first render waits briefly for it, as for the endpoints: a
    /// new instance whose public listener started without the peers' CAs refused the clients a
    /// gateway already sent it (churn through a gateway failed requests so). Ready does not
    /// wait for it: an export to a peer Consul does not know must not hold Ready back.
    pub fn exports_known(&self) -> bool {
        let Some(reg) = self.registration.as_ref().filter(|r| !is_mesh_gateway(r)) else {
            return true;
        };
        let service = reg
            .proxy
            .as_ref()
            .map(|p| p.destination_service_name.as_str());
        self.exported.as_ref().is_some_and(|x| {
            service.is_none_or(|s| {
                exported_to(x, s)
                    .iter()
                    .all(|peer| self.peerings.contains_key(peer))
            })
        })
    }

    /// Whether every upstream destination has answered at least once, and every service
    /// destination's discovery chain; the first render waits briefly for this so that HAProxy
    /// starts with its servers and routes instead of reloading for them. A chain target's
    /// instances are not waited for: they fill their backend's slots live, and a failover
    /// target in an unreachable datacenter must not hold back the rest.
    pub fn endpoints_known(&self) -> bool {
        if self.registration.as_ref().is_some_and(is_mesh_gateway) {
            // A gateway: the exports, then every exported service's instances.
            return self.exported.as_ref().is_some_and(|x| {
                exported_destinations(x)
                    .iter()
                    .all(|k| self.endpoints.contains_key(k))
            });
        }
        self.registration.as_ref().is_some_and(|r| {
            let peered_known = peered_destinations(r).iter().all(|k| {
                self.peer_instances.contains_key(k) && self.peerings.contains_key(&k.peer)
            });
            let transparent_known =
                !is_transparent(r) || (self.intention_upstreams.is_some() && self.mesh.is_some());
            transparent_known
                && peered_known
                && destinations(r, self.implicit_upstreams()).iter().all(|k| {
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

#[cfg(test)]
mod tests;
