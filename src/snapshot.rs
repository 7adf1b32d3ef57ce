//! The merged view of everything the sidecar needs from Consul. It changes only by whole
//! `Update`s from the watchers, and says whether it is complete enough to act on.

use std::collections::BTreeMap;

use crate::admission::Verdicts;
use crate::consul::api::{
    AgentCheck, AgentService, CaRoots, ExportedServicesEntry, HealthEntry, IntentionEntry,
    JwtProviders, LeafCert,
};
use crate::consul::chain::{DiscoveryChain, TargetKey};
use crate::consul::{
    destinations, exported_destinations, is_mesh_gateway, is_transparent, with_service_protocol,
    Update,
};
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
    /// Agentless: the registration as the catalog holds it, and the service's resolved
    /// protocol; `registration` is the two merged (`consul::with_service_protocol`).
    pub catalog_registration: Option<AgentService>,
    pub service_protocol: Option<String>,
    /// Set once by the supervisor: agentless, the first render also waits for
    /// `service_protocol`, so the public listener starts in its mode.
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
}

impl Snapshot {
    /// Merges one update; says whether anything the sidecar acts on changed.
    pub fn apply(&mut self, update: Update) -> bool {
        match update {
            Update::Registration(r) => {
                self.catalog_registration = Some(r.clone());
                let merged = with_service_protocol(r, self.service_protocol.as_deref());
                replace(&mut self.registration, Some(merged))
            }
            Update::ServiceProtocol(p) => {
                self.service_protocol = Some(p);
                match self.catalog_registration.clone() {
                    Some(r) => {
                        let merged = with_service_protocol(r, self.service_protocol.as_deref());
                        replace(&mut self.registration, Some(merged))
                    }
                    None => false,
                }
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
        if self.agentless && self.service_protocol.is_none() {
            missing.push("the service's protocol (its discovery chain)");
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

    /// The implicit upstreams read so far (transparent mode), empty until read.
    pub fn implicit_upstreams(&self) -> &[String] {
        self.intention_upstreams.as_deref().unwrap_or_default()
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
            let transparent_known =
                !is_transparent(r) || (self.intention_upstreams.is_some() && self.mesh.is_some());
            transparent_known
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
mod tests {
    use super::*;

    fn registration(config: &str) -> AgentService {
        serde_json::from_str(&format!(
            r#"{{"ID":"web-1-sidecar-proxy","Service":"web-sidecar-proxy","Kind":"connect-proxy",
               "Proxy":{{"DestinationServiceName":"web","Config":{config}}}}}"#
        ))
        .unwrap()
    }

    fn protocol(s: &Snapshot) -> Option<&str> {
        s.registration
            .as_ref()?
            .proxy
            .as_ref()?
            .config
            .get("protocol")?
            .as_str()
    }

    /// Agentless: the service's resolved protocol fills in what the catalog's registration does
    /// not say, whichever comes first; a protocol of the registration's own wins.
    #[test]
    fn the_service_protocol_fills_in_the_catalog_registration() {
        let mut s = Snapshot::default();
        assert!(!s.apply(Update::ServiceProtocol("http".into())));
        assert!(s.apply(Update::Registration(registration("{}"))));
        assert_eq!(protocol(&s), Some("http"));
        assert!(s.apply(Update::ServiceProtocol("grpc".into())));
        assert_eq!(protocol(&s), Some("grpc"));
        assert!(
            !s.apply(Update::ServiceProtocol("grpc".into())),
            "no change"
        );
        assert!(s.apply(Update::Registration(registration(r#"{"protocol":"tcp"}"#))));
        assert_eq!(protocol(&s), Some("tcp"));
    }

    /// With intentions enforced, nothing is complete before the agent's first real table:
    /// a listener started earlier would deny what the intentions allow.
    #[test]
    fn enforcing_waits_for_the_intentions_table() {
        let roots: CaRoots = serde_json::from_str(
            r#"{"TrustDomain":"t.consul","Roots":[{"ID":"r","RootCert":"x","Active":true}]}"#,
        )
        .unwrap();
        let leaf: LeafCert =
            serde_json::from_str(r#"{"CertPEM":"c","PrivateKeyPEM":"k","Service":"web"}"#).unwrap();
        let mut s = Snapshot::default();
        s.apply(Update::Registration(registration("{}")));
        s.apply(Update::Leaf(leaf));
        s.apply(Update::Roots(roots));
        assert!(
            s.missing().is_empty(),
            "without enforcement: {:?}",
            s.missing()
        );
        s.enforcing = true;
        assert_eq!(s.missing(), ["the intentions", "the ACL default policy"]);
        let jwt: IntentionEntry = serde_json::from_str(
            r#"{"SourceName":"api","DestinationName":"web","Action":"allow","JWT":{"Providers":[{"Name":"okta"}]}}"#,
        )
        .unwrap();
        s.apply(Update::Intentions(vec![jwt]));
        s.apply(Update::AclDefaultPolicy("deny".into()));
        assert_eq!(s.missing(), ["the jwt-provider config entries"]);
        s.apply(Update::JwtProviders(JwtProviders::default()));
        assert!(s.missing().is_empty(), "{:?}", s.missing());
        s.apply(Update::Intentions(Vec::new()));
        s.jwt_providers = None;
        assert!(s.missing().is_empty(), "no intention names a provider");
    }
}
