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

    /// Agentless: where the node's own entry is read (`Node.Address`), blocking on the
    /// nodes' index, which node registrations alone move; `None` with an agent, whose address
    /// is its `/v1/agent/self`.
    pub fn node_address_path(&self) -> Option<String> {
        match self {
            Source::Agent => None,
            Source::Catalog { node } => Some(format!(
                "/v1/catalog/nodes?filter={}",
                encode(&format!("Node == \"{node}\""))
            )),
        }
    }

    /// The node's address as an IP literal, the form an exposed check listener's source list
    /// takes; empty (nothing beyond loopback and the sidecar's own addresses is admitted) when
    /// the node is not in the catalog or its address is a host name.
    pub fn parse_node_address(&self, body: &str) -> Result<Update> {
        let nodes: Vec<CatalogNode> = api::parse(&self.describe(), body)?;
        let address = nodes
            .first()
            .map(|n| n.address.as_str())
            .unwrap_or_default();
        match address.parse::<std::net::IpAddr>() {
            Ok(ip) => Ok(Update::AgentAddress(ip.to_string())),
            Err(_) => {
                log::info!(
                    "{} has no IP address ({address:?}): exposed check listeners admit loopback and this sidecar's own addresses only",
                    self.describe()
                );
                Ok(Update::AgentAddress(String::new()))
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

/// A node as `/v1/catalog/nodes` lists it: only its address is read.
#[derive(serde::Deserialize)]
struct CatalogNode {
    #[serde(rename = "Address", default)]
    address: String,
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

    /// `/v1/catalog/nodes?filter=...` as Consul 1.16.3 answers it; a host name or no node
    /// teaches no address.
    #[test]
    fn the_node_address_is_read_as_an_ip_from_the_catalog() {
        let s = catalog();
        assert_eq!(
            s.node_address_path().unwrap(),
            "/v1/catalog/nodes?filter=Node%20%3D%3D%20%22pod-node%22"
        );
        assert_eq!(Source::Agent.node_address_path(), None);
        let address = |body: &str| match s.parse_node_address(body).unwrap() {
            Update::AgentAddress(a) => a,
            other => panic!("{other:?}"),
        };
        let one = r#"[{"ID":"","Node":"pod-node","Address":"10.1.0.7","Datacenter":"dc1",
            "TaggedAddresses":null,"Meta":null,"CreateIndex":14,"ModifyIndex":14}]"#;
        assert_eq!(address(one), "10.1.0.7");
        assert_eq!(address(&one.replace("10.1.0.7", "fd00:0:0::7")), "fd00::7");
        assert_eq!(address(&one.replace("10.1.0.7", "node.example")), "");
        assert_eq!(address(&one.replace("10.1.0.7", "10.1.0.7 ; x")), "");
        assert_eq!(address("[]"), "");
        assert!(s.parse_node_address("{").is_err());
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
