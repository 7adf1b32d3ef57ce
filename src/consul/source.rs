//! Where the sidecar's own registration and the checks of its service come from: the local
//! agent (`/v1/agent/...`), or, agentless, the catalog node the proxy is registered on, read
//! from the Consul servers as consul-dataplane does. Pure: paths and the reading of answers.

use std::collections::BTreeMap;

use super::api::{self, AgentCheck, AgentService, NodeServices};
use super::{checks_update, Update};
use crate::error::Result;
use crate::http::encode;
use crate::value::Name;

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Source {
    /// The local agent's own endpoints.
    Agent,
    /// The catalog of one node, which no agent runs (`-service-node-name`).
    Catalog { node: Name },
}

impl Source {
    pub fn new(catalog_node: Option<&Name>) -> Source {
        match catalog_node {
            Some(node) => Source::Catalog { node: node.clone() },
            None => Source::Agent,
        }
    }

    pub fn is_agentless(&self) -> bool {
        matches!(self, Source::Catalog { .. })
    }

    /// Where the services the proxy is chosen among are listed.
    pub fn services_path(&self) -> String {
        match self {
            Source::Agent => "/v1/agent/services".into(),
            Source::Catalog { node } => node_services_path(node),
        }
    }

    /// The listing by service ID, whichever shape it came in.
    pub fn parse_services(&self, body: &str) -> Result<BTreeMap<String, AgentService>> {
        match self {
            Source::Agent => api::parse("the agent's services", body),
            Source::Catalog { node } => {
                let list: NodeServices = api::parse(&format!("node {node}'s services"), body)?;
                Ok(list
                    .services
                    .into_iter()
                    .map(|s| (s.id.clone(), s))
                    .collect())
            }
        }
    }

    /// The blocking read of the proxy's registration; the agent's blocks on a content hash,
    /// the catalog's on an index.
    pub fn registration_path(&self, proxy_id: &str) -> String {
        match self {
            Source::Agent => format!("/v1/agent/service/{}", encode(proxy_id)),
            Source::Catalog { node } => node_services_path(node),
        }
    }

    pub fn registration_by_hash(&self) -> bool {
        !self.is_agentless()
    }

    /// The registration (or its absence) in a registration answer.
    pub fn parse_registration(&self, proxy_id: &str, body: &str) -> Result<Update> {
        match self {
            Source::Agent => {
                api::parse::<AgentService>("the proxy registration", body).map(Update::Registration)
            }
            Source::Catalog { .. } => Ok(self
                .parse_services(body)?
                .remove(proxy_id)
                .map_or(Update::RegistrationGone, Update::Registration)),
        }
    }

    /// The checks of one service instance (`Expose.Checks`): polled from the agent, a blocking
    /// read of the node's health from the servers.
    pub fn checks_path(&self, service_id: &str) -> String {
        let filter = format!("ServiceID == \"{service_id}\"");
        match self {
            Source::Agent => format!("/v1/agent/checks?filter={}", encode(&filter)),
            Source::Catalog { node } => format!(
                "/v1/health/node/{}?filter={}",
                encode(node.as_str()),
                encode(&filter)
            ),
        }
    }

    pub fn checks_block(&self) -> bool {
        self.is_agentless()
    }

    pub fn parse_checks(&self, body: &str) -> Result<Update> {
        match self {
            Source::Agent => api::parse::<BTreeMap<String, AgentCheck>>("the agent's checks", body)
                .map(checks_update),
            Source::Catalog { node } => {
                let list: Vec<AgentCheck> = api::parse(&format!("node {node}'s checks"), body)?;
                Ok(checks_update(
                    list.into_iter().map(|c| (c.check_id.clone(), c)).collect(),
                ))
            }
        }
    }

    /// How logs name where the registration is read.
    pub fn describe(&self) -> String {
        match self {
            Source::Agent => "the agent".into(),
            Source::Catalog { node } => format!("the catalog node {node}"),
        }
    }
}

fn node_services_path(node: &Name) -> String {
    format!("/v1/catalog/node-services/{}", encode(node.as_str()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn catalog() -> Source {
        Source::new(Some(&Name::parse("node", "pod-node").unwrap()))
    }

    /// The catalog's answer as Consul 1.16.3 gives it, for a node that holds the proxy, one
    /// that does not, and a node the catalog does not know (both fields null).
    #[test]
    fn the_catalog_registration_is_found_by_id_or_is_gone() {
        let body = r#"{"Node":{"Node":"pod-node","Address":"10.1.0.7"},"Services":[
            {"Kind":"connect-proxy","ID":"web-1-sidecar-proxy","Service":"web-sidecar-proxy",
             "Port":21000,"Address":"","Proxy":{"DestinationServiceName":"web",
             "DestinationServiceID":"web-1","LocalServicePort":8080},"CreateIndex":22},
            {"Kind":"","ID":"web-1","Service":"web","Port":8080}]}"#;
        let s = catalog();
        assert_eq!(
            s.registration_path("x"),
            "/v1/catalog/node-services/pod-node"
        );
        assert!(!s.registration_by_hash());
        match s.parse_registration("web-1-sidecar-proxy", body).unwrap() {
            Update::Registration(r) => {
                assert_eq!(r.port, 21000);
                assert_eq!(r.proxy.unwrap().destination_service_id, "web-1");
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            s.parse_registration("other", body).unwrap(),
            Update::RegistrationGone
        ));
        let unknown = r#"{"Node":null,"Services":null}"#;
        assert!(matches!(
            s.parse_registration("web-1-sidecar-proxy", unknown)
                .unwrap(),
            Update::RegistrationGone
        ));
        assert_eq!(s.parse_services(body).unwrap().len(), 2);
    }

    #[test]
    fn the_agent_source_keeps_the_agent_paths() {
        let s = Source::Agent;
        assert_eq!(s.registration_path("a/b"), "/v1/agent/service/a%2Fb");
        assert!(s.registration_by_hash() && !s.checks_block());
        assert!(s
            .checks_path("web-1")
            .starts_with("/v1/agent/checks?filter="));
        assert!(catalog()
            .checks_path("web-1")
            .starts_with("/v1/health/node/pod-node?filter="));
    }

    #[test]
    fn catalog_checks_are_sorted_by_id() {
        let body = r#"[{"CheckID":"b","ServiceID":"web-1","Status":"passing"},
                       {"CheckID":"a","ServiceID":"web-1","Status":"critical"}]"#;
        match catalog().parse_checks(body).unwrap() {
            Update::Checks(c) => {
                let ids: Vec<&str> = c.iter().map(|c| c.check_id.as_str()).collect();
                assert_eq!(ids, ["a", "b"]);
            }
            other => panic!("{other:?}"),
        }
    }
}
