//! The kinds of watch: every thing the sidecar reads from Consul, named by a `Watch` value
//! that says what it is of, so that two wanted sets can be diffed. Each kind knows how it is
//! read (the path, blocking or polled, how its answer becomes an `Update`); which kinds a
//! registration needs is decided elsewhere, from the snapshot (`Snapshot::watches`). The
//! watchers and the dry run read through the same `Spec`, so they cannot drift apart.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use super::api::{
    self, AgentSelf, CaRoots, ExportedServicesEntry, HealthEntry, IntentionEntry, JwtProviders,
    LeafCert, QueryResult, ServiceTopology,
};
use super::chain::{chain_path, parse_chain, serving, target_health_path, TargetKey};
use super::client::{
    endpoints_path, leaf_path, peer_instances_path, peering_path, topology_path, Consul,
    AGENT_SELF_PATH, AUTHORIZE_PATH, EXPORTED_SERVICES_PATH, INTENTIONS_PATH, JWT_PROVIDERS_PATH,
    MESH_PATH, PROXY_DEFAULTS_PATH, ROOTS_PATH, SERVICE_DEFAULTS_PATH,
};
use super::{DestinationKey, DestinationKind, Update};
use crate::error::{Error, Result};
use crate::peering::{PeerInstance, PeerKey, Peering};
use crate::value::Millis;

/// What the sidecar is, as far as what it must watch goes. Whether a sidecar is transparent
/// is its registration's to say, so it is read from the snapshot, not set here.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Role {
    pub proxy_id: String,
    /// A mesh gateway: its routes are the exported services; it has no upstreams of its own.
    pub gateway: bool,
    /// No local agent: the central config entries are read to be merged into the
    /// registration, and the address checks come from is the catalog node's.
    pub agentless: bool,
    /// Whether the intentions, the ACL default policy and (once an intention names one) the
    /// JWT providers are read.
    pub intentions: bool,
}

/// One thing to read from Consul. Equal values are the same watch; a changed key (another
/// service, another poll interval) is another watch.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Watch {
    /// The proxy's own registration, by its ID.
    Registration(String),
    Roots,
    /// The `mesh` config entries (TLS settings, transparent mode's `MeshDestinationsOnly`).
    Mesh,
    /// The leaf certificate of a service.
    Leaf(String),
    /// Every intention of the cluster.
    Intentions,
    /// What a connection no intention names gets, as seen for this service.
    AclDefaultPolicy(String),
    /// The `jwt-provider` config entries (with the local JWKS files they name).
    JwtProviders,
    /// A mesh gateway's `exported-services` config entries.
    ExportedServices,
    /// The agent's checks of a service instance (`Expose.Checks`).
    Checks(String),
    /// The address checks come from: the local agent's, read once; agentless, the catalog
    /// node's, blocking.
    AgentAddress,
    /// Agentless: every `proxy-defaults` config entry (only `global` is read).
    ProxyDefaults,
    /// Every `service-defaults` config entry: agentless, the service's own and its upstreams'
    /// (merged as an agent would); transparent mode, those naming a `Destination`. One
    /// kind-wide watch, not one per service.
    ServiceDefaults,
    /// Transparent mode: the services intentions let a service reach.
    Topology(String),
    /// The instances of a destination; a prepared query's with the poll interval its
    /// upstreams ask for (`None`: the default).
    Instances(DestinationKey, Option<Millis>),
    /// The discovery chain of a service destination.
    Chain(DestinationKey),
    /// The serving instances of a chain target that is not a destination itself.
    TargetInstances(TargetKey),
    /// A cluster peering: dialed by a peered upstream, or a consumer of this service's exports.
    Peering(String),
    /// The instances of a peer's service (its gateways), for a peered upstream.
    PeerInstances(PeerKey),
}

/// How a blocking read follows the content.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum WatchMode {
    Index,
    Hash,
    /// Read again after this pause: the endpoint cannot block.
    Poll(Duration),
}

pub(super) type Parse = Box<dyn Fn(&str) -> Result<Update> + Send>;

/// A read that is not one GET of one path: `None` means there is nothing to report, for good.
pub(super) type Call = Box<dyn Fn(&Consul) -> Result<Option<Update>> + Send>;

pub(super) enum How {
    Get {
        path: String,
        mode: WatchMode,
        /// An error answer containing this means the agent has no such thing: the watch
        /// reports `parse("[]")` once and ends.
        unknown: Option<&'static str>,
        parse: Parse,
    },
    Call {
        /// Where failures are counted (`Sink::watch_error`).
        path: &'static str,
        /// How often to read again after a success; `None`: once.
        every: Option<Duration>,
        read: Call,
    },
}

/// What a watch reads, and how.
pub(super) struct Spec {
    pub what: String,
    pub how: How,
}

/// How often the default policy is read again: it changes only with the agent's configuration
/// or a `*` intention, which the intentions watch covers.
const DEFAULT_POLICY_EVERY: Duration = Duration::from_secs(30);

/// How often a peering is read again: Consul's `/v1/peering/<peer>` does not block. What it
/// gives (the peer's CA roots and server name) changes only with a peering or a CA rotation,
/// and a rotation does not wait for it: the peer's new leaves carry the intermediate its old
/// root cross-signed, which the roots already held verify. Ten seconds keeps a sidecar at rest
/// within issue 30's bound of one read per ten seconds per endpoint that cannot block, which
/// matters against the servers when thousands of agentless sidecars each watch a peer.
const PEERING_EVERY: Duration = Duration::from_secs(10);

impl Watch {
    /// How this watch reads: `query_poll` and `checks_poll` are the poll intervals of
    /// endpoints that cannot block.
    pub(super) fn spec(
        &self,
        consul: &Consul,
        query_poll: Duration,
        checks_poll: Duration,
    ) -> Spec {
        let get = |what: String, path: String, mode: WatchMode, parse: Parse| Spec {
            what,
            how: How::Get {
                path,
                mode,
                unknown: None,
                parse,
            },
        };
        match self {
            Watch::Registration(id) => {
                let source = consul.source().clone();
                let mode = if source.registration_by_hash() {
                    WatchMode::Hash
                } else {
                    WatchMode::Index
                };
                let i = id.clone();
                get(
                    format!("registration of {id}"),
                    source.registration_path(id),
                    mode,
                    Box::new(move |body| source.parse_registration(&i, body)),
                )
            }
            Watch::Roots => get(
                "CA roots".into(),
                ROOTS_PATH.into(),
                WatchMode::Index,
                Box::new(|body| api::parse::<CaRoots>("the CA roots", body).map(Update::Roots)),
            ),
            // Consul before 1.10 has no `mesh` kind and says so: then there is none, for good.
            Watch::Mesh => Spec {
                what: "mesh config entries".into(),
                how: How::Get {
                    path: MESH_PATH.into(),
                    mode: WatchMode::Index,
                    unknown: Some("invalid config entry kind"),
                    parse: Box::new(|body| {
                        api::parse::<Vec<serde_json::Value>>("the mesh entries", body)
                            .map(Update::Mesh)
                    }),
                },
            },
            Watch::Leaf(service) => get(
                format!("leaf certificate of {service}"),
                leaf_path(service),
                WatchMode::Index,
                Box::new(|body| {
                    api::parse::<LeafCert>("the leaf certificate", body).map(Update::Leaf)
                }),
            ),
            Watch::Intentions => get(
                "intentions".into(),
                INTENTIONS_PATH.into(),
                WatchMode::Index,
                Box::new(|body| {
                    api::parse::<Vec<IntentionEntry>>("the intentions list", body)
                        .map(Update::Intentions)
                }),
            ),
            Watch::AclDefaultPolicy(service) => {
                let service = service.clone();
                // Warn of a policy this sidecar does not know once per value, not every read.
                let warned: Mutex<Option<String>> = Mutex::new(None);
                Spec {
                    what: "the default intention policy".into(),
                    how: How::Call {
                        path: AGENT_SELF_PATH,
                        every: Some(DEFAULT_POLICY_EVERY),
                        read: Box::new(move |consul| {
                            let policy = default_policy(consul, &service)?;
                            let known =
                                matches!(policy.to_ascii_lowercase().as_str(), "allow" | "deny");
                            if let Ok(mut w) = warned.lock() {
                                if !known && w.as_ref() != Some(&policy) {
                                    log::warn!(
                                        "the Consul agent reports the ACL default policy {policy:?}, which this sidecar does not know; connections that no intention matches are denied"
                                    );
                                    *w = Some(policy.clone());
                                }
                            }
                            Ok(Some(Update::AclDefaultPolicy(policy)))
                        }),
                    },
                }
            }
            Watch::JwtProviders => get(
                "jwt-provider config entries".into(),
                JWT_PROVIDERS_PATH.into(),
                WatchMode::Index,
                Box::new(|body| {
                    let entries =
                        api::parse::<Vec<serde_json::Value>>("the jwt-provider list", body)?;
                    let files = read_jwks_files(&entries);
                    Ok(Update::JwtProviders(JwtProviders {
                        entries,
                        files,
                        remote: BTreeMap::new(),
                    }))
                }),
            ),
            // Consul before 1.11 has no `exported-services` kind: then nothing is exported.
            Watch::ExportedServices => Spec {
                what: "exported services".into(),
                how: How::Get {
                    path: EXPORTED_SERVICES_PATH.into(),
                    mode: WatchMode::Index,
                    unknown: Some("invalid config entry kind"),
                    parse: Box::new(|body| {
                        api::parse::<Vec<ExportedServicesEntry>>(
                            "the exported-services entries",
                            body,
                        )
                        .map(Update::ExportedServices)
                    }),
                },
            },
            Watch::Peering(peer) => {
                let p = peer.clone();
                Spec {
                    what: format!("cluster peering {peer}"),
                    // A peering Consul does not know (yet) is a failing read, retried: until it
                    // reads, nothing is trusted or dialed for it.
                    how: How::Get {
                        path: peering_path(peer),
                        mode: WatchMode::Poll(PEERING_EVERY),
                        unknown: None,
                        parse: Box::new(move |body| {
                            api::parse::<Peering>("a peering", body)
                                .map(|peering| Update::Peering(p.clone(), peering))
                        }),
                    },
                }
            }
            Watch::PeerInstances(key) => {
                let k = key.clone();
                get(
                    format!("instances of {key}"),
                    peer_instances_path(key),
                    WatchMode::Index,
                    Box::new(move |body| {
                        api::parse::<Vec<PeerInstance>>("a peered health/connect query", body)
                            .map(|entries| Update::PeerInstances(k.clone(), entries))
                    }),
                )
            }
            Watch::Checks(id) => {
                let source = consul.source().clone();
                let mode = if source.checks_block() {
                    WatchMode::Index
                } else {
                    WatchMode::Poll(checks_poll)
                };
                get(
                    format!("checks of {id}"),
                    source.checks_path(id),
                    mode,
                    Box::new(move |body| source.parse_checks(body)),
                )
            }
            // It changes only when the agent restarts with another address, and a check
            // listener that does not know it still admits loopback and this sidecar's own
            // addresses.
            // Agentless, no agent runs the checks: whoever does for the node (such as
            // consul-esm) dials from the node's address, a blocking read of the catalog.
            Watch::AgentAddress if consul.source().is_agentless() => {
                let source = consul.source().clone();
                get(
                    format!("the address of {}", source.describe()),
                    source.node_address_path().unwrap_or_default(),
                    WatchMode::Index,
                    Box::new(move |body| source.parse_node_address(body)),
                )
            }
            Watch::AgentAddress => Spec {
                what: "the agent's address".into(),
                how: How::Call {
                    path: AGENT_SELF_PATH,
                    every: None,
                    read: Box::new(|consul| match consul.agent_address()? {
                        Some(a) => Ok(Some(Update::AgentAddress(a))),
                        None => {
                            log::info!(
                                "the token may not read /v1/agent/self: exposed check listeners admit loopback and this sidecar's own addresses only"
                            );
                            Ok(None)
                        }
                    }),
                },
            },
            Watch::ProxyDefaults => get(
                "proxy-defaults config entries".into(),
                PROXY_DEFAULTS_PATH.into(),
                WatchMode::Index,
                Box::new(|body| {
                    api::parse::<Vec<serde_json::Value>>("the proxy-defaults entries", body)
                        .map(Update::ProxyDefaults)
                }),
            ),
            Watch::ServiceDefaults => get(
                "service-defaults config entries".into(),
                SERVICE_DEFAULTS_PATH.into(),
                WatchMode::Index,
                Box::new(|body| {
                    api::parse::<Vec<serde_json::Value>>("the service-defaults entries", body)
                        .map(Update::ServiceDefaults)
                }),
            ),
            Watch::Topology(service) => get(
                format!("intention upstreams of {service}"),
                topology_path(service),
                WatchMode::Index,
                Box::new(|body| {
                    api::parse::<ServiceTopology>("the service topology", body)
                        .map(|t| Update::IntentionUpstreams(t.allowed()))
                }),
            ),
            Watch::Instances(key, poll) => {
                let k = key.clone();
                match key.kind {
                    DestinationKind::Service => get(
                        format!("healthy instances of {key}"),
                        endpoints_path(key),
                        WatchMode::Index,
                        Box::new(move |body| {
                            api::parse::<Vec<HealthEntry>>("a health/connect query", body)
                                .map(|entries| Update::Endpoints(k.clone(), entries))
                        }),
                    ),
                    DestinationKind::PreparedQuery => {
                        let every = poll.map_or(query_poll, |ms| Duration::from_millis(ms.get()));
                        get(
                            format!("instances of {key}"),
                            endpoints_path(key),
                            WatchMode::Poll(every),
                            Box::new(move |body| {
                                api::parse::<QueryResult>("a prepared query", body)
                                    .map(|r| Update::Endpoints(k.clone(), r.nodes))
                            }),
                        )
                    }
                }
            }
            Watch::Chain(key) => {
                let k = key.clone();
                get(
                    format!("discovery chain of {key}"),
                    chain_path(key),
                    WatchMode::Index,
                    Box::new(move |body| parse_chain(body).map(|c| Update::Chain(k.clone(), c))),
                )
            }
            Watch::TargetInstances(key) => {
                let k = key.clone();
                get(
                    format!("instances of chain target {key}"),
                    target_health_path(key),
                    WatchMode::Index,
                    Box::new(move |body| {
                        api::parse::<Vec<HealthEntry>>("a chain target's health query", body)
                            .map(|entries| Update::TargetEndpoints(k.clone(), serving(entries)))
                    }),
                )
            }
        }
    }
}

/// One read of `watch` now, as the dry run makes it: the update it gives, or `None` when there
/// is nothing to report (an agent without the kind says so with `[]`).
pub fn read_once(consul: &Consul, watch: &Watch) -> Result<Option<Update>> {
    let spec = watch.spec(consul, Duration::ZERO, Duration::ZERO);
    match spec.how {
        How::Call { read, .. } => {
            read(consul).map_err(|e| e.context(format!("reading {}", spec.what)))
        }
        How::Get {
            path,
            mode,
            unknown,
            parse,
        } => {
            let answer = consul.get(&path, None).map_err(|e| {
                e.context(format!("asking Consul at {} for {path}", consul.endpoint()))
            })?;
            if answer.status == 200 {
                return parse(&answer.body).map(Some);
            }
            if mode == WatchMode::Hash && answer.status == 404 {
                return Ok(Some(Update::RegistrationGone));
            }
            if unknown.is_some_and(|u| answer.body.contains(u)) {
                return parse("[]").map(Some);
            }
            Err(Error::msg(format!(
                "status {} for {path} from Consul at {}: {}",
                answer.status,
                consul.endpoint(),
                answer.body.trim()
            )))
        }
    }
}

/// The ACL default policy from the first place that has it: the `X-Consul-Default-Acl-Policy`
/// header (Consul 1.10+, on any status), `/v1/agent/self` (1.8's or 1.11's key), and, for a
/// token that may not read the agent (a service identity has no `agent:read`) on a Consul
/// without the header, Consul's own authorize answer for a source no intention can name.
fn default_policy(consul: &Consul, service: &str) -> Result<String> {
    let answer = consul.get(AGENT_SELF_PATH, None)?;
    if let Some(policy) = &answer.default_acl_policy {
        return Ok(policy.clone());
    }
    if answer.status == 200 {
        let me = api::parse::<AgentSelf>("the agent's configuration", &answer.body)?;
        return me.default_policy().ok_or_else(|| {
            Error::msg(
                "/v1/agent/self says ACLs are enabled but has no ACL default policy (neither DebugConfig.ACLDefaultPolicy nor DebugConfig.ACLResolverSettings.ACLDefaultPolicy)",
            )
        });
    }
    if answer.status != 403 {
        return Err(Error::msg(format!(
            "status {} for /v1/agent/self: {}",
            answer.status,
            answer.body.trim()
        )));
    }
    // A name no intention can match exactly; a `*` intention, if any, applies to it as it
    // would to any unnamed source, which is all the default is used for.
    let probe = format!(
        "hcc-default-policy-probe-{:08x}",
        crate::random::random_u32()?
    );
    let body = serde_json::json!({
        "Target": service,
        "ClientCertURI": format!("spiffe://probe.consul/ns/default/dc/probe/svc/{probe}"),
        "ClientCertSerial": "00",
    })
    .to_string();
    let answer = consul.send("POST", AUTHORIZE_PATH, Some(&body))?;
    if answer.status != 200 {
        return Err(Error::msg(format!(
            "status {} for /v1/agent/connect/authorize (and 403 for /v1/agent/self): {}",
            answer.status,
            answer.body.trim()
        )));
    }
    let v: serde_json::Value = api::parse("the authorize answer", &answer.body)?;
    let allowed = v
        .get("Authorized")
        .and_then(serde_json::Value::as_bool)
        .ok_or_else(|| Error::msg("the authorize answer has no Authorized"))?;
    Ok(if allowed { "allow" } else { "deny" }.to_string())
}

/// The largest local JWKS file read (bytes).
const MAX_JWKS_FILE: u64 = 256 * 1024;

/// Each local JWKS file the `jwt-provider` entries name (`JSONWebKeySet.Local.Filename`),
/// read now: its text, or why not (then that provider verifies nothing). The reason is kept
/// as text: it is part of the snapshot, compared and shown, not handled.
fn read_jwks_files(
    entries: &[serde_json::Value],
) -> BTreeMap<String, std::result::Result<String, String>> {
    entries
        .iter()
        .filter_map(|e| e.pointer("/JSONWebKeySet/Local/Filename")?.as_str())
        .filter(|f| !f.is_empty())
        .map(|f| {
            let read = std::fs::metadata(f)
                .and_then(|m| {
                    if m.len() > MAX_JWKS_FILE {
                        Err(std::io::Error::other(format!(
                            "larger than {MAX_JWKS_FILE} bytes"
                        )))
                    } else {
                        std::fs::read_to_string(f)
                    }
                })
                .map_err(|e| e.to_string());
            (f.to_string(), read)
        })
        .collect()
}
