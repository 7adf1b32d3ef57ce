//! Agentless: a service the sidecar registers itself in the catalog, on the node its proxy is
//! registered on (the stats endpoint of `-stats-service-register`). No agent runs that node,
//! so none would run a check of the service, nor remove it once its owner is gone. So the
//! service carries one catalog check whose status the sidecar writes itself (passing while it
//! is ready, critical otherwise: starting, draining), as consul-k8s writes a pod's readiness
//! into its catalog check, and it is deregistered when dropped, which the run does on every way
//! out (stop signal, fatal error, a child that keeps dying), before the login's logout.

use std::sync::mpsc::{channel, RecvTimeoutError, Sender};
use std::thread::JoinHandle;
use std::time::Duration;

use serde_json::{json, Value};

use super::client::Consul;
use crate::error::{Error, Result};
use crate::value::Name;

pub const CATALOG_REGISTER_PATH: &str = "/v1/catalog/register";
pub const CATALOG_DEREGISTER_PATH: &str = "/v1/catalog/deregister";

/// How soon a change of readiness reaches the check: reading it costs nothing (a shared
/// cell), and a write happens only when the status changes, so at rest Consul sees none.
const READINESS_EVERY: Duration = Duration::from_secs(1);

/// Whether the sidecar serves (its check's status).
pub type Ready = Box<dyn Fn() -> bool + Send>;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Status {
    Passing,
    Critical,
}

impl Status {
    pub fn of(ready: bool) -> Status {
        if ready {
            Status::Passing
        } else {
            Status::Critical
        }
    }

    fn as_str(self) -> &'static str {
        match self {
            Status::Passing => "passing",
            Status::Critical => "critical",
        }
    }
}

/// The check's ID: per node in Consul, so named after the service ID it belongs to.
pub fn check_id(service_id: &str) -> String {
    format!("{service_id}:ready")
}

/// The register body: the service (its `ID` set) and its check with `status`. The node must
/// exist already (the proxy is on it), and is not rewritten: `SkipNodeUpdate` needs no
/// `node:write`, only `service:write` on the service's name.
pub fn register_body(node: &Name, service: &Value, status: Status) -> Result<String> {
    let id = service_id(service)?;
    let body = json!({
        "Node": node.as_str(),
        "SkipNodeUpdate": true,
        "Service": service,
        "Check": {
            "CheckID": check_id(id),
            "Name": "sidecar ready",
            "ServiceID": id,
            "Status": status.as_str(),
            "Output": format!("written by haproxy-consul-connect: {}", status.as_str()),
        },
    });
    Ok(body.to_string())
}

/// The deregister body: the service and, with it, its check.
pub fn deregister_body(node: &Name, service_id: &str) -> String {
    json!({"Node": node.as_str(), "ServiceID": service_id}).to_string()
}

fn service_id(service: &Value) -> Result<&str> {
    service
        .get("ID")
        .and_then(Value::as_str)
        .filter(|id| !id.is_empty())
        .ok_or_else(|| Error::msg("a catalog service to register has no ID"))
}

fn write(consul: &Consul, path: &str, body: &str) -> Result<()> {
    let answer = consul.send("PUT", path, Some(body))?;
    if answer.status != 200 {
        return Err(Error::msg(format!(
            "PUT {path}: status {}: {}",
            answer.status,
            answer.body.trim()
        )));
    }
    Ok(())
}

/// A registered service whose check follows `ready`; deregistered when dropped.
pub struct CatalogService {
    id: String,
    node: Name,
    consul: Consul,
    wake: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CatalogService {
    /// Registers `service` on `node` with its check as `ready` says now, then keeps the check
    /// current from a thread of its own.
    pub fn register(
        consul: &Consul,
        node: &Name,
        service: Value,
        ready: Ready,
    ) -> Result<CatalogService> {
        let id = service_id(&service)?.to_string();
        let mut written = Status::of(ready());
        write(
            consul,
            CATALOG_REGISTER_PATH,
            &register_body(node, &service, written)?,
        )
        .map_err(|e| Error::msg(format!("registering {id} on node {node}: {e}")))?;
        let (wake, woken) = channel::<()>();
        let (c, n, what) = (consul.clone(), node.clone(), id.clone());
        let thread = std::thread::Builder::new()
            .name("catalog-check".into())
            .spawn(move || {
                let mut last_error: Option<String> = None;
                // A message asks for a look now; the sender gone ends the thread.
                while !matches!(
                    woken.recv_timeout(READINESS_EVERY),
                    Err(RecvTimeoutError::Disconnected)
                ) {
                    let want = Status::of(ready());
                    if want == written {
                        continue;
                    }
                    let done = register_body(&n, &service, want)
                        .and_then(|body| write(&c, CATALOG_REGISTER_PATH, &body));
                    match done {
                        Ok(()) => {
                            log::info!("the catalog check of {what} is {}", want.as_str());
                            written = want;
                            last_error = None;
                        }
                        // Tried again at the next tick; said once per distinct error.
                        Err(e) => {
                            let e = e.to_string();
                            if last_error.as_ref() != Some(&e) {
                                log::warn!("writing the catalog check of {what}: {e}");
                                last_error = Some(e);
                            }
                        }
                    }
                }
            })
            .map_err(|e| Error::with_source("starting the catalog check's thread", e))?;
        Ok(CatalogService {
            id,
            node: node.clone(),
            consul: consul.clone(),
            wake: Some(wake),
            thread: Some(thread),
        })
    }

    /// Has the check follow a change of readiness now (the drain's start), not at the next
    /// tick: a drain shorter than the tick still writes it, before the deregistration.
    pub fn look_now(&self) {
        if let Some(tx) = &self.wake {
            let _ = tx.send(());
        }
    }
}

impl Drop for CatalogService {
    fn drop(&mut self) {
        // The check's thread ends first, so no write of it can bring the service back.
        drop(self.wake.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        let (id, node) = (&self.id, &self.node);
        match write(
            &self.consul,
            CATALOG_DEREGISTER_PATH,
            &deregister_body(node, id),
        ) {
            Ok(()) => log::info!("deregistered {id} from the catalog node {node}"),
            Err(e) => log::warn!("deregistering {id} from the catalog node {node}: {e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node() -> Name {
        Name::parse("node", "pod-node").unwrap()
    }

    #[test]
    fn the_register_body_carries_the_service_and_its_check_without_touching_the_node() {
        let service = json!({"ID": "web-1-sidecar-proxy-stats", "Service": "web-sidecar-stats",
                             "Port": 9102, "Address": "10.1.0.7"});
        let body: Value =
            serde_json::from_str(&register_body(&node(), &service, Status::of(false)).unwrap())
                .unwrap();
        assert_eq!(body["Node"], "pod-node");
        assert_eq!(body["SkipNodeUpdate"], true);
        assert!(body.get("Address").is_none(), "the node is not rewritten");
        assert_eq!(body["Service"], service);
        assert_eq!(body["Check"]["CheckID"], "web-1-sidecar-proxy-stats:ready");
        assert_eq!(body["Check"]["ServiceID"], "web-1-sidecar-proxy-stats");
        assert_eq!(body["Check"]["Status"], "critical");
        let ready: Value =
            serde_json::from_str(&register_body(&node(), &service, Status::of(true)).unwrap())
                .unwrap();
        assert_eq!(ready["Check"]["Status"], "passing");
    }

    #[test]
    fn a_service_without_an_id_is_refused_and_deregistering_names_node_and_id() {
        assert!(register_body(&node(), &json!({"Service": "x"}), Status::Passing).is_err());
        assert!(register_body(&node(), &json!({"ID": ""}), Status::Passing).is_err());
        let body: Value = serde_json::from_str(&deregister_body(&node(), "s-1")).unwrap();
        assert_eq!(body, json!({"Node": "pod-node", "ServiceID": "s-1"}));
    }
}
