//! The compiled discovery chain of an upstream (`/v1/discovery-chain/<service>`): the graph the
//! agent makes of the `service-router`, `service-splitter` and `service-resolver` config
//! entries, and the targets at its leaves. Shapes only, lenient like `api`: 1.8.7 and 1.16.3
//! differ in target ids (`web.default.dc1` vs `web.default.default.dc1`), in `Partition` and in
//! where a splitter keeps its definition, and the model reads only what both send.

use std::collections::BTreeMap;

use serde::Deserialize;

use super::api::{self, null_as_default, HealthEntry};
use super::DestinationKey;
use crate::error::Result;
use crate::http::encode;

/// The body of `/v1/discovery-chain/<service>`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ChainAnswer {
    pub chain: DiscoveryChain,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct DiscoveryChain {
    pub service_name: String,
    #[serde(flatten)]
    pub tenancy: Tenancy,
    pub datacenter: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub protocol: String,
    pub start_node: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: BTreeMap<String, ChainNode>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub targets: BTreeMap<String, ChainTarget>,
}

/// Where a chain or target lives besides its datacenter; both are `default` (or absent) outside
/// Consul Enterprise.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Tenancy {
    #[serde(default, deserialize_with = "null_as_default")]
    pub namespace: String,
    /// 1.16.3 only.
    #[serde(default, deserialize_with = "null_as_default")]
    pub partition: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ChainNode {
    /// `router`, `splitter` or `resolver`.
    #[serde(rename = "Type")]
    pub kind: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub routes: Vec<ChainRoute>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub splits: Vec<ChainSplit>,
    #[serde(default)]
    pub resolver: Option<ChainResolver>,
    /// Consul 1.9+; on the resolver node.
    #[serde(default)]
    pub load_balancer: Option<LoadBalancer>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ChainRoute {
    pub definition: RouteDefinition,
    pub next_node: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct RouteDefinition {
    #[serde(default)]
    pub r#match: Option<RouteMatch>,
    #[serde(default)]
    pub destination: Option<RouteDestination>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct RouteMatch {
    #[serde(rename = "HTTP", default)]
    pub http: Option<HttpMatch>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HttpMatch {
    #[serde(default, deserialize_with = "null_as_default")]
    pub path_exact: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub path_prefix: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub path_regex: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub header: Vec<ParamMatch>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub query_param: Vec<ParamMatch>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub methods: Vec<String>,
}

/// A header or query parameter matcher (the query one has no `Prefix`/`Suffix`/`Invert`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ParamMatch {
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub present: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub exact: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub prefix: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub suffix: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub regex: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub invert: bool,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct RouteDestination {
    #[serde(default, deserialize_with = "null_as_default")]
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_subset: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub prefix_rewrite: String,
    /// A Go duration (`2s`, `1m30s`); empty when unset.
    #[serde(default, deserialize_with = "null_as_default")]
    pub request_timeout: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub num_retries: u32,
    #[serde(default, deserialize_with = "null_as_default")]
    pub retry_on_connect_failure: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub retry_on_status_codes: Vec<u32>,
    /// Envoy's retry conditions by name (Consul 1.15+): `reset`, `gateway-error`, the gRPC
    /// statuses `unavailable`, `cancelled`, ….
    #[serde(default, deserialize_with = "null_as_default")]
    pub retry_on: Vec<String>,
    /// Consul 1.10+.
    #[serde(flatten)]
    pub headers: HeaderChanges,
}

/// A route's or split's header changes (Consul 1.10+).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HeaderModifiers {
    #[serde(default, deserialize_with = "null_as_default")]
    pub add: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub set: BTreeMap<String, String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub remove: Vec<String>,
}

/// The header changes of a route's destination or a split: what 1.16.3 keeps of a split's
/// config entry beside its weight (1.8.7 sends none).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HeaderChanges {
    #[serde(default, deserialize_with = "null_as_default")]
    pub request_headers: HeaderModifiers,
    #[serde(default, deserialize_with = "null_as_default")]
    pub response_headers: HeaderModifiers,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ChainSplit {
    /// Percent, with up to two decimals (Consul keeps it as a float32).
    pub weight: f64,
    pub next_node: String,
    #[serde(default)]
    pub definition: Option<HeaderChanges>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ChainResolver {
    /// A Go duration; Consul fills in 5s.
    #[serde(default, deserialize_with = "null_as_default")]
    pub connect_timeout: String,
    /// True when no resolver config entry exists for the service.
    #[serde(default, deserialize_with = "null_as_default")]
    pub default: bool,
    pub target: String,
    #[serde(default)]
    pub failover: Option<ChainFailover>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ChainFailover {
    #[serde(default, deserialize_with = "null_as_default")]
    pub targets: Vec<String>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct LoadBalancer {
    #[serde(default, deserialize_with = "null_as_default")]
    pub policy: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub hash_policies: Vec<HashPolicy>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HashPolicy {
    /// `header`, `cookie` or `query_parameter`; empty with `SourceIP`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub field: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub field_value: String,
    #[serde(rename = "SourceIP", default, deserialize_with = "null_as_default")]
    pub source_ip: bool,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ChainTarget {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub service_subset: String,
    #[serde(flatten)]
    pub tenancy: Tenancy,
    pub datacenter: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub subset: TargetSubset,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq, PartialOrd, Ord, Hash)]
#[serde(rename_all = "PascalCase")]
pub struct TargetSubset {
    #[serde(default, deserialize_with = "null_as_default")]
    pub filter: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub only_passing: bool,
}

/// The instances one chain target stands for: what its health watch asks the agent.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct TargetKey {
    pub service: String,
    /// The target's datacenter as the chain names it.
    pub datacenter: String,
    pub subset: TargetSubset,
}

impl TargetKey {
    pub fn of(t: &ChainTarget) -> TargetKey {
        TargetKey {
            service: t.service.clone(),
            datacenter: t.datacenter.clone(),
            subset: t.subset.clone(),
        }
    }
}

impl std::fmt::Display for TargetKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "service {} in {}", self.service, self.datacenter)?;
        if !self.subset.filter.is_empty() {
            write!(f, " where {}", self.subset.filter)?;
        }
        Ok(())
    }
}

/// The target a chain's destination is when nothing reshapes it: the destination's own
/// service, unfiltered, in the datacenter the upstream names (the agent's own when empty).
/// Its instances are the destination's existing health watch, so a plain upstream keeps
/// exactly the watch, backend and behaviour it had before chains were read.
pub fn is_destination_itself(
    chain: &DiscoveryChain,
    dest: &DestinationKey,
    t: &ChainTarget,
) -> bool {
    let dc = if dest.datacenter.is_empty() {
        &chain.datacenter
    } else {
        &dest.datacenter
    };
    t.service == dest.name && &t.datacenter == dc && t.subset == TargetSubset::default()
}

/// The targets of `chain` that need a health watch of their own.
pub fn targets_to_watch(chain: &DiscoveryChain, dest: &DestinationKey) -> Vec<TargetKey> {
    let mut keys: Vec<TargetKey> = chain
        .targets
        .values()
        .filter(|t| !is_destination_itself(chain, dest, t))
        .map(TargetKey::of)
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

/// Where a destination's chain is read: compiled for the upstream's datacenter, as Consul's
/// own proxies ask for it.
pub fn chain_path(dest: &DestinationKey) -> String {
    let mut p = format!("/v1/discovery-chain/{}", encode(&dest.name));
    if !dest.datacenter.is_empty() {
        p.push_str(&format!("?compile-dc={}", encode(&dest.datacenter)));
    }
    p
}

/// Where a target's instances are read. The subset's filter goes to the agent as `filter`:
/// Consul's own proxies (proxycfg) hand it to the same health query, so the agent's filter
/// engine decides membership exactly as it does for Envoy, bexpr syntax and all, and no second
/// evaluator here can disagree with it. `OnlyPassing` asks for passing instances only;
/// otherwise warning instances are served and critical ones dropped (`serving`), as Envoy does.
pub fn target_health_path(key: &TargetKey) -> String {
    let mut p = format!(
        "/v1/health/connect/{}?dc={}",
        encode(&key.service),
        encode(&key.datacenter)
    );
    if key.subset.only_passing {
        p.push_str("&passing=1");
    }
    if !key.subset.filter.is_empty() {
        p.push_str(&format!("&filter={}", encode(&key.subset.filter)));
    }
    p
}

/// The instances of a target answer that may take traffic: none of its checks critical.
pub fn serving(entries: Vec<HealthEntry>) -> Vec<HealthEntry> {
    entries
        .into_iter()
        .filter(|e| !e.checks.iter().any(|c| c.status == "critical"))
        .collect()
}

pub fn parse_chain(body: &str) -> Result<DiscoveryChain> {
    let answer: ChainAnswer = api::parse("a discovery chain", body)?;
    let chain = answer.chain;
    // What the model walks must be there; a chain that does not hold together is refused
    // whole, so the last good one keeps serving.
    if !chain.nodes.contains_key(&chain.start_node) {
        return Err(crate::error::Error::msg(format!(
            "the discovery chain of {:?} starts at {:?}, which it does not define",
            chain.service_name, chain.start_node
        )));
    }
    Ok(chain)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::DestinationKind;

    fn fixture(version: &str, name: &str) -> DiscoveryChain {
        let path = format!(
            "{}/fixtures/consul/{version}/discovery-chain-{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        let body = std::fs::read_to_string(&path).unwrap();
        parse_chain(&body).unwrap()
    }

    fn dest(name: &str) -> DestinationKey {
        DestinationKey {
            kind: DestinationKind::Service,
            name: name.into(),
            datacenter: String::new(),
        }
    }

    #[test]
    fn every_recorded_chain_parses_on_both_versions() {
        for v in ["1.8.7", "1.16.3"] {
            for n in ["plain", "web", "old", "dcweb", "tcpold", "split", "front"] {
                let c = fixture(v, n);
                assert!(c.nodes.contains_key(&c.start_node), "{v} {n}");
                for t in c.targets.values() {
                    assert!(!t.service.is_empty() && !t.datacenter.is_empty(), "{v} {n}");
                }
            }
        }
    }

    #[test]
    fn a_plain_chain_needs_no_watch_of_its_own() {
        for v in ["1.8.7", "1.16.3"] {
            let c = fixture(v, "plain");
            assert!(targets_to_watch(&c, &dest("plain")).is_empty(), "{v}");
        }
    }

    #[test]
    fn target_ids_differ_by_version_and_keys_do_not() {
        let old = fixture("1.8.7", "web");
        let new = fixture("1.16.3", "web");
        assert!(old.targets.contains_key("v2.web.default.dc1"));
        assert!(new.targets.contains_key("v2.web.default.default.dc1"));
        assert_eq!(
            targets_to_watch(&old, &dest("web")),
            targets_to_watch(&new, &dest("web"))
        );
        let keys = targets_to_watch(&new, &dest("web"));
        assert_eq!(keys.len(), 2, "{keys:?}");
        let v2 = keys.iter().find(|k| k.service == "web").unwrap();
        assert!(v2.subset.only_passing);
        let p = target_health_path(v2);
        assert!(
            p.starts_with("/v1/health/connect/web?dc=dc1&passing=1&filter=Service.Meta.version")
        );
    }

    #[test]
    fn a_chain_without_its_start_node_is_refused() {
        let body = r#"{"Chain": {"ServiceName": "x", "Datacenter": "dc1", "StartNode": "resolver:x", "Nodes": {}}}"#;
        let e = parse_chain(body).unwrap_err().to_string();
        assert!(e.contains("does not define"), "{e}");
        assert!(parse_chain("{\"Chain\": 3}").is_err());
    }

    #[test]
    fn a_chain_compiled_for_another_datacenter_is_asked_for_it() {
        let mut d = dest("web");
        d.datacenter = "dc2".into();
        assert_eq!(chain_path(&d), "/v1/discovery-chain/web?compile-dc=dc2");
        assert_eq!(chain_path(&dest("web")), "/v1/discovery-chain/web");
    }
}
