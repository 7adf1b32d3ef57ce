//! Intentions at run time: with `-enable-intentions`, the SPOE agent and the table it decides
//! from, rebuilt whenever one of its inputs changes; without it, the warning that names what
//! Consul would refuse and this sidecar lets through.

use std::collections::BTreeMap;

use crate::consul::api::{CaRoots, ExportedServicesEntry, IntentionEntry, JwtProviders};
use crate::error::Error;
use crate::metrics::Registry;
use crate::model::{Mode, Paths};
use crate::peering::Peering;
use crate::snapshot::Snapshot;
use crate::spoe::authz::AuthzTable;
use crate::spoe::server::{spawn, AgentConfig, AgentHandle, SharedTable};

/// Follows the snapshot for intentions, enforcing or warning.
pub enum Intentions {
    /// Boxed: the agent is much larger than a warning, and there is one of these per run.
    Enforced(Box<Agent>),
    /// The last warning logged, so each is logged once per change.
    Warned(String),
}

impl Intentions {
    /// Starts the agent when enforcement is on: it runs before HAProxy exists and denies until
    /// it knows the intentions, the default policy and the roots.
    pub fn start(
        enforce: bool,
        paths: &Paths,
        threads: usize,
        registry: &Registry,
    ) -> Result<Intentions, Error> {
        if !enforce {
            return Ok(Intentions::Warned(String::new()));
        }
        let agent = Agent::start(paths, threads)?;
        if let Ok(mut slot) = registry.agent.write() {
            *slot = Some(agent.handle.stats().clone());
        }
        Ok(Intentions::Enforced(Box::new(agent)))
    }

    /// The fast map of the table the agent decides from now (`AuthzTable::fast_map`); empty
    /// without enforcement.
    pub fn fast_map(&self) -> Vec<(String, String)> {
        match self {
            Intentions::Enforced(agent) => agent.fast_map.clone(),
            Intentions::Warned(_) => Vec::new(),
        }
    }

    /// The request headers the current table's accepted tokens may change; none without
    /// enforcement.
    pub fn jwt_headers(&self) -> crate::spoe::authz::JwtHeaders {
        match self {
            Intentions::Enforced(agent) => agent.jwt_headers.clone(),
            Intentions::Warned(_) => Default::default(),
        }
    }

    /// Called after every snapshot change.
    pub fn follow(&mut self, snapshot: &Snapshot) {
        match self {
            Intentions::Enforced(agent) => agent.refresh(snapshot),
            Intentions::Warned(last) => {
                if let Some(warning) = super::ignored_denials(snapshot) {
                    if warning != *last {
                        if !warning.is_empty() {
                            log::warn!("{warning}");
                        }
                        *last = warning;
                    }
                }
            }
        }
    }
}

/// The intentions agent and the inputs its table was last built from.
pub struct Agent {
    handle: AgentHandle,
    table: SharedTable,
    /// The current table's fast map, made once per table: every desired state carries it.
    fast_map: Vec<(String, String)>,
    jwt_headers: crate::spoe::authz::JwtHeaders,
    built_from: Option<Inputs>,
}

/// What a table is built from: intentions, ACL default policy, roots, and the service with its
/// listener mode (an L7 denial's reason depends on the mode).
#[derive(PartialEq)]
struct Inputs {
    intentions: Option<Vec<IntentionEntry>>,
    default_policy: Option<String>,
    roots: Option<CaRoots>,
    service: Option<(String, Mode)>,
    jwt_providers: Option<JwtProviders>,
    /// The exports and peerings: which peers' clients the table accepts.
    exported: Option<Vec<ExportedServicesEntry>>,
    peerings: BTreeMap<String, Peering>,
}

impl Agent {
    fn start(paths: &Paths, threads: usize) -> Result<Agent, Error> {
        let table = SharedTable::new(AuthzTable::deny_all("intentions not known yet"));
        let handle = spawn(
            AgentConfig {
                socket_path: paths.spoe_socket.clone(),
                worker_threads: threads,
                var_name: "allow".into(),
            },
            table.clone(),
        )
        .map_err(|e| Error::msg(format!("starting the intentions agent: {e}")))?;
        log::info!(
            "intentions agent listening on {} with {threads} thread(s)",
            paths.spoe_socket.display()
        );
        Ok(Agent {
            handle,
            table,
            fast_map: Vec::new(),
            jwt_headers: Default::default(),
            built_from: None,
        })
    }

    /// Rebuilds the table when one of its inputs changed; endpoint churn costs nothing here.
    fn refresh(&mut self, snapshot: &Snapshot) {
        let service = snapshot
            .registration
            .as_ref()
            .and_then(|r| r.proxy.as_ref())
            .map(|p| {
                (
                    p.destination_service_name.clone(),
                    crate::model::public_mode(p),
                )
            });
        // Compared in place: most snapshot changes are endpoint churn, which must cost nothing.
        let unchanged = self.built_from.as_ref().is_some_and(|b| {
            b.intentions == snapshot.intentions
                && b.default_policy == snapshot.acl_default_policy
                && b.roots == snapshot.roots
                && b.service == service
                && b.jwt_providers == snapshot.jwt_providers
                && b.exported == snapshot.exported
                && b.peerings == snapshot.peerings
        });
        if unchanged {
            return;
        }
        let inputs = Inputs {
            intentions: snapshot.intentions.clone(),
            default_policy: snapshot.acl_default_policy.clone(),
            roots: snapshot.roots.clone(),
            service,
            jwt_providers: snapshot.jwt_providers.clone(),
            exported: snapshot.exported.clone(),
            peerings: snapshot.peerings.clone(),
        };
        if self.built_from.as_ref().map(|b| &b.jwt_providers) != Some(&snapshot.jwt_providers) {
            // Once per change of the entries (or their files).
            for w in super::jwt_providers(snapshot).1 {
                log::warn!("{w}");
            }
        }
        let table = super::table(snapshot);
        let line = format!(
            "intentions table updated: {} intention(s) for this service [{}], default {}, generation {}",
            table.intentions().len(),
            super::summary(table.intentions()),
            table.default_policy(),
            // The key HAProxy's fast map carries once the applier loaded this table's map:
            // until then, connections judged by the agent are asked again on each request.
            table.generation()
        );
        self.fast_map = table.fast_map();
        self.jwt_headers = table.jwt_headers().clone();
        self.table.replace(table);
        // Said once the agent decides by it: whoever reads the line (an operator, a test) may
        // count on the next connection being judged by this table, not the one before.
        log::info!("{line}");
        self.built_from = Some(inputs);
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.handle.shutdown();
        let stats = self.handle.stats();
        let t = &stats.decision_time;
        let ms = |q: f64| t.quantile(q).map_or(0.0, |d| d.as_secs_f64() * 1000.0);
        log::info!(
            "intentions agent: {} allowed, {} denied, {} connection errors; decision time p50 <= {:.3} ms, p99 <= {:.3} ms over {} decisions",
            stats.allowed.load(std::sync::atomic::Ordering::Relaxed),
            stats.denied.load(std::sync::atomic::Ordering::Relaxed),
            stats.errors.load(std::sync::atomic::Ordering::Relaxed),
            ms(0.5),
            ms(0.99),
            t.count()
        );
    }
}
