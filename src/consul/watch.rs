//! Blocking-query watchers, one OS thread each. A watcher sends an `Update` only when the content
//! it watches really changed (an index that moved over the same content sends nothing), survives
//! an unreachable agent by backing off with jitter, and follows Consul's index rules: an index
//! that goes backwards resets to 0, and an index of 0 after the first answer is clamped to 1.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::api::{
    self, AgentSelf, AgentService, CaRoots, ExportedServicesEntry, HealthEntry, IntentionEntry,
    JwtProviders, LeafCert, QueryResult, ServiceTopology,
};
use super::chain::{
    chain_path, parse_chain, serving, target_health_path, targets_to_watch, DiscoveryChain,
    TargetKey,
};
use super::client::{
    endpoints_path, leaf_path, topology_path, Consul, AGENT_SELF_PATH, AUTHORIZE_PATH,
    EXPORTED_SERVICES_PATH, INTENTIONS_PATH, JWT_PROVIDERS_PATH, MESH_PATH, ROOTS_PATH,
};
use super::{
    destinations, exported_destinations, exposed_checks_of, is_mesh_gateway, is_transparent,
    poll_intervals, DestinationKey, DestinationKind, Update,
};
use crate::http::encode;

/// Where watchers deliver updates and report their health (for metrics and logs).
pub trait Sink: Send + Sync + 'static {
    fn update(&self, update: Update);
    fn watch_error(&self, _endpoint: &str) {}
}

#[derive(Clone, Copy, Debug)]
pub struct Timing {
    /// The `wait` of blocking queries.
    pub wait: Duration,
    /// How often prepared queries, which cannot block, are executed again.
    pub query_poll: Duration,
    /// How often the agent's checks (`Expose.Checks`), which cannot block, are read again.
    pub checks_poll: Duration,
    /// First and largest pause after a failed request.
    pub backoff_min: Duration,
    pub backoff_max: Duration,
}

/// How long a blocking read waits while a watch is failing: short, so that the first one to
/// return (the proof the agent reaches its servers again) comes soon after they are back.
const RECOVERY_WAIT: Duration = Duration::from_secs(2);

impl Default for Timing {
    fn default() -> Self {
        Timing {
            wait: Duration::from_secs(300),
            query_poll: Duration::from_secs(10),
            checks_poll: Duration::from_secs(2),
            backoff_min: Duration::from_millis(250),
            backoff_max: Duration::from_secs(15),
        }
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum WatchMode {
    Index,
    Hash,
    /// Read again after this pause: the endpoint cannot block.
    Poll(Duration),
}

/// A handle that stops its watcher thread at the next return of its query.
pub struct WatchHandle {
    stop: Arc<AtomicBool>,
}

impl WatchHandle {
    /// The handle of a thread that ends once `stop` is set.
    pub(super) fn new(stop: Arc<AtomicBool>) -> WatchHandle {
        WatchHandle { stop }
    }
}

impl Drop for WatchHandle {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// The watchers of one sidecar: the fixed ones (registration, leaf, roots) and one per upstream
/// destination, started and stopped as the registration changes.
pub struct Watchers {
    consul: Consul,
    sink: Arc<dyn Sink>,
    timing: Timing,
    fixed: Vec<WatchHandle>,
    leaf_for: Option<(String, WatchHandle)>,
    /// Each destination's watch, with the poll interval it was started with (prepared
    /// queries; a new `poll_interval` restarts the watch).
    destinations: BTreeMap<DestinationKey, (WatchHandle, Duration)>,
    /// The discovery chain of each service destination.
    chains: BTreeMap<DestinationKey, WatchHandle>,
    /// The instances of each chain target that is not a destination itself.
    targets: BTreeMap<TargetKey, WatchHandle>,
    /// The agent's checks of this service instance, while `Expose.Checks` asks for them.
    checks_for: Option<(String, WatchHandle)>,
    /// Whether the agent's address was asked for (once, for `Expose.Checks`).
    agent_address_started: bool,
    /// Agentless: the proxied service's own discovery chain, for the protocol an agent would
    /// have merged into the registration.
    protocol_for: Option<(String, WatchHandle)>,
    /// Transparent mode's watch (intention upstreams of the service; the mesh entry is
    /// watched for every sidecar).
    transparent_for: Option<(String, WatchHandle)>,
    /// Whether to watch intentions; started once the service name is known.
    intentions: bool,
    intentions_started: bool,
    /// Whether the `jwt-provider` entries are watched: from the first intention that names a
    /// JWT provider on (Consul 1.8 has no such entries, and no such intentions).
    jwt_started: bool,
    /// The fetchers of the remote JWKS the `jwt-provider` entries name.
    jwks: super::jwks::Fetchers,
}

impl Watchers {
    /// Starts the registration and roots watches.
    pub fn start(
        consul: Consul,
        proxy_id: &str,
        sink: Arc<dyn Sink>,
        timing: Timing,
        intentions: bool,
    ) -> Self {
        let mut w = Watchers {
            consul,
            sink,
            timing,
            fixed: Vec::new(),
            leaf_for: None,
            destinations: BTreeMap::new(),
            chains: BTreeMap::new(),
            targets: BTreeMap::new(),
            checks_for: None,
            protocol_for: None,
            agent_address_started: false,
            transparent_for: None,
            intentions,
            intentions_started: false,
            jwt_started: false,
            jwks: super::jwks::Fetchers::default(),
        };
        let source = w.consul.source().clone();
        let id = proxy_id.to_string();
        let h = w.spawn(
            format!("registration of {proxy_id}"),
            source.registration_path(proxy_id),
            if source.registration_by_hash() {
                WatchMode::Hash
            } else {
                WatchMode::Index
            },
            move |body| source.parse_registration(&id, body),
        );
        w.fixed.push(h);
        let h = w.spawn(
            "CA roots".into(),
            ROOTS_PATH.into(),
            WatchMode::Index,
            |body| api::parse::<CaRoots>("the CA roots", body).map(Update::Roots),
        );
        w.fixed.push(h);
        // Consul before 1.10 has no `mesh` kind and says so: then there is none, for good.
        let h = w.spawn_with(
            "mesh config entries".into(),
            MESH_PATH.into(),
            WatchMode::Index,
            Some("invalid config entry kind"),
            |body| api::parse::<Vec<serde_json::Value>>("the mesh entries", body).map(Update::Mesh),
        );
        w.fixed.push(h);
        w
    }

    /// Starts the intentions list watch (blocking) and the default-policy watch for `service`.
    fn watch_intentions(&mut self, service: &str) {
        let h = self.spawn(
            "intentions".into(),
            INTENTIONS_PATH.into(),
            WatchMode::Index,
            |body| {
                api::parse::<Vec<IntentionEntry>>("the intentions list", body)
                    .map(Update::Intentions)
            },
        );
        self.fixed.push(h);
        let stop = Arc::new(AtomicBool::new(false));
        let watch = DefaultPolicyWatch {
            consul: self.consul.clone(),
            sink: self.sink.clone(),
            timing: self.timing,
            service: service.to_string(),
            stop: stop.clone(),
        };
        let spawned = std::thread::Builder::new()
            .name("watch default".into())
            .stack_size(256 * 1024)
            .spawn(move || watch.run());
        if let Err(e) = spawned {
            log::error!("cannot start the default-policy watcher: {e}");
        }
        self.fixed.push(WatchHandle { stop });
    }

    /// Starts the `jwt-provider` watch the first time an intention of the cluster names a JWT
    /// provider; it then runs for the rest of the run.
    pub fn follow_intentions(&mut self, intentions: &[IntentionEntry]) {
        if self.jwt_started || !intentions.iter().any(IntentionEntry::needs_jwt) {
            return;
        }
        self.jwt_started = true;
        let h = self.spawn(
            "jwt-provider config entries".into(),
            JWT_PROVIDERS_PATH.into(),
            WatchMode::Index,
            |body| {
                let entries = api::parse::<Vec<serde_json::Value>>("the jwt-provider list", body)?;
                let files = read_jwks_files(&entries);
                Ok(Update::JwtProviders(JwtProviders {
                    entries,
                    files,
                    remote: BTreeMap::new(),
                }))
            },
        );
        self.fixed.push(h);
    }

    /// Starts a fetcher for each remote JWKS the `jwt-provider` entries name, and stops those
    /// they no longer name.
    pub fn follow_jwt_providers(&mut self, providers: &JwtProviders) {
        self.jwks.follow(&providers.entries, &self.sink);
    }

    /// Starts the watch of the `exported-services` config entries: a mesh gateway's routes.
    pub fn watch_exports(&mut self) {
        let h = self.spawn(
            "exported services".into(),
            EXPORTED_SERVICES_PATH.into(),
            WatchMode::Index,
            |body| {
                api::parse::<Vec<ExportedServicesEntry>>("the exported-services entries", body)
                    .map(Update::ExportedServices)
            },
        );
        self.fixed.push(h);
    }

    /// Brings a mesh gateway's instance watches in line with what is exported: one health
    /// watch per exported service, stopped when no entry names it any more.
    pub fn follow_exports(&mut self, entries: &[ExportedServicesEntry]) {
        let wanted = exported_destinations(entries);
        self.destinations.retain(|k, _| wanted.contains(k));
        for key in wanted {
            if !self.destinations.contains_key(&key) {
                let h = self.spawn_destination(key.clone(), self.timing.query_poll);
                self.destinations.insert(key, (h, self.timing.query_poll));
            }
        }
    }

    /// Brings the leaf and destination watches in line with a (new) registration and, in
    /// transparent mode, the implicit upstreams read so far.
    pub fn follow(&mut self, registration: &AgentService, implicit: &[String]) {
        // A gateway's leaf is its own service's; a sidecar's, the service it fronts.
        let service = if is_mesh_gateway(registration) {
            registration.service.clone()
        } else {
            registration
                .proxy
                .as_ref()
                .map(|p| p.destination_service_name.clone())
                .unwrap_or_default()
        };
        if !service.is_empty() && self.leaf_for.as_ref().map(|(s, _)| s) != Some(&service) {
            let h = self.spawn(
                format!("leaf certificate of {service}"),
                leaf_path(&service),
                WatchMode::Index,
                |body| api::parse::<LeafCert>("the leaf certificate", body).map(Update::Leaf),
            );
            self.leaf_for = Some((service.clone(), h));
        }
        if self.consul.source().is_agentless()
            && !service.is_empty()
            && self.protocol_for.as_ref().map(|(s, _)| s) != Some(&service)
        {
            let key = DestinationKey {
                kind: DestinationKind::Service,
                name: service.clone(),
                datacenter: String::new(),
            };
            let h = self.spawn(
                format!("protocol of {service}"),
                chain_path(&key),
                WatchMode::Index,
                |body| parse_chain(body).map(|c| Update::ServiceProtocol(c.protocol)),
            );
            self.protocol_for = Some((service.clone(), h));
        }
        if self.intentions && !self.intentions_started && !service.is_empty() {
            self.intentions_started = true;
            self.watch_intentions(&service);
        }

        if is_mesh_gateway(registration) {
            // Its instance watches follow the exported services (`follow_exports`).
            return;
        }
        match exposed_checks_of(registration) {
            None => self.checks_for = None,
            Some(id) if self.checks_for.as_ref().map(|(s, _)| s) != Some(&id) => {
                let source = self.consul.source().clone();
                let h = self.spawn(
                    format!("checks of {id}"),
                    source.checks_path(&id),
                    if source.checks_block() {
                        WatchMode::Index
                    } else {
                        WatchMode::Poll(self.timing.checks_poll)
                    },
                    move |body| source.parse_checks(body),
                );
                self.checks_for = Some((id, h));
                // Agentless, no agent runs the checks: nothing to learn the address of.
                if !self.agent_address_started && !self.consul.source().is_agentless() {
                    self.agent_address_started = true;
                    self.read_agent_address();
                }
            }
            Some(_) => {}
        }

        if !is_transparent(registration) || service.is_empty() {
            self.transparent_for = None;
        } else if self.transparent_for.as_ref().map(|(s, _)| s) != Some(&service) {
            let topology = self.spawn(
                format!("intention upstreams of {service}"),
                topology_path(&service),
                WatchMode::Index,
                |body| {
                    api::parse::<ServiceTopology>("the service topology", body)
                        .map(|t| Update::IntentionUpstreams(t.allowed()))
                },
            );
            // The mesh entry (MeshDestinationsOnly) is watched for every sidecar (`start`).
            self.transparent_for = Some((service.clone(), topology));
        }

        let wanted = destinations(registration, implicit);
        let intervals = poll_intervals(registration);
        self.destinations.retain(|k, _| wanted.contains(k));
        self.chains.retain(|k, _| wanted.contains(k));
        for key in wanted {
            if key.kind == DestinationKind::Service && !self.chains.contains_key(&key) {
                let k = key.clone();
                let h = self.spawn(
                    format!("discovery chain of {key}"),
                    chain_path(&key),
                    WatchMode::Index,
                    move |body| parse_chain(body).map(|c| Update::Chain(k.clone(), c)),
                );
                self.chains.insert(key.clone(), h);
            }
            let every = intervals
                .get(&key)
                .map_or(self.timing.query_poll, |ms| Duration::from_millis(ms.get()));
            if self
                .destinations
                .get(&key)
                .is_some_and(|(_, was)| key.kind == DestinationKind::Service || *was == every)
            {
                continue;
            }
            // Dropping the old handle (if any) stops that watch at its next return.
            let h = self.spawn_destination(key.clone(), every);
            self.destinations.insert(key, (h, every));
        }
    }

    /// Brings the target watches in line with the chains read so far: one blocking health
    /// watch per target that is not a destination itself, stopped when no chain names it.
    pub fn follow_chains(&mut self, chains: &BTreeMap<DestinationKey, DiscoveryChain>) {
        let wanted: Vec<TargetKey> = chains
            .iter()
            .filter(|(k, _)| self.chains.contains_key(k))
            .flat_map(|(k, c)| targets_to_watch(c, k))
            .collect();
        self.targets.retain(|k, _| wanted.contains(k));
        for key in wanted {
            if self.targets.contains_key(&key) {
                continue;
            }
            let k = key.clone();
            let h = self.spawn(
                format!("instances of chain target {key}"),
                target_health_path(&key),
                WatchMode::Index,
                move |body| {
                    api::parse::<Vec<HealthEntry>>("a chain target's health query", body)
                        .map(|entries| Update::TargetEndpoints(k.clone(), serving(entries)))
                },
            );
            self.targets.insert(key, h);
        }
    }

    fn spawn_destination(&self, key: DestinationKey, poll: Duration) -> WatchHandle {
        let name = key.to_string();
        let path = endpoints_path(&key);
        match key.kind {
            DestinationKind::Service => {
                let k = key.clone();
                self.spawn(
                    format!("healthy instances of {name}"),
                    path,
                    WatchMode::Index,
                    move |body| {
                        api::parse::<Vec<HealthEntry>>("a health/connect query", body)
                            .map(|entries| Update::Endpoints(k.clone(), entries))
                    },
                )
            }
            DestinationKind::PreparedQuery => {
                let k = key.clone();
                // Once per start: a new poll_interval restarts the watch, and says so.
                log::info!("polling {name} every {} ms", poll.as_millis());
                self.spawn(
                    format!("instances of {name}"),
                    path,
                    WatchMode::Poll(poll),
                    move |body| {
                        api::parse::<QueryResult>("a prepared query", body)
                            .map(|r| Update::Endpoints(k.clone(), r.nodes))
                    },
                )
            }
        }
    }

    fn spawn(
        &self,
        what: String,
        path: String,
        mode: WatchMode,
        parse: impl Fn(&str) -> crate::error::Result<Update> + Send + 'static,
    ) -> WatchHandle {
        self.spawn_with(what, path, mode, None, parse)
    }

    /// `spawn`, for a path this agent may not know: an error answer containing `unknown`
    /// means so, and the watch then reports an empty list (`parse` of `[]`) once and ends.
    fn spawn_with(
        &self,
        what: String,
        path: String,
        mode: WatchMode,
        unknown: Option<&'static str>,
        parse: impl Fn(&str) -> crate::error::Result<Update> + Send + 'static,
    ) -> WatchHandle {
        let stop = Arc::new(AtomicBool::new(false));
        let watch = Watch {
            consul: self.consul.clone(),
            sink: self.sink.clone(),
            timing: self.timing,
            what,
            path,
            mode,
            unknown,
            stop: stop.clone(),
        };
        let name = format!("watch {}", watch.path);
        let spawned = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .stack_size(256 * 1024)
            .spawn(move || watch.run(parse));
        if let Err(e) = spawned {
            log::error!("cannot start a watcher thread for {name}: {e}");
        }
        WatchHandle { stop }
    }
}

impl Watchers {
    /// Reads the agent's address once, on its own thread, retrying until the agent answers:
    /// it changes only when the agent restarts with another address, and a check listener that
    /// does not know it still admits loopback and this sidecar's own addresses.
    fn read_agent_address(&mut self) {
        let stop = Arc::new(AtomicBool::new(false));
        let (consul, sink, timing, halt) = (
            self.consul.clone(),
            self.sink.clone(),
            self.timing,
            stop.clone(),
        );
        let spawned = std::thread::Builder::new()
            .name("watch agent".into())
            .stack_size(256 * 1024)
            .spawn(move || {
                let mut failures = 0;
                while !halt.load(Ordering::SeqCst) {
                    match consul.agent_address() {
                        Ok(Some(a)) => {
                            sink.update(Update::AgentAddress(a));
                            return;
                        }
                        Ok(None) => {
                            log::info!(
                                "the token may not read /v1/agent/self: exposed check listeners admit loopback and this sidecar's own addresses only"
                            );
                            return;
                        }
                        Err(e) => {
                            failures += 1;
                            if failures == 1 {
                                log::warn!("cannot learn the agent's address: {e}");
                            }
                            let until = Instant::now() + backoff(&timing, failures);
                            while Instant::now() < until && !halt.load(Ordering::SeqCst) {
                                std::thread::sleep(Duration::from_millis(200));
                            }
                        }
                    }
                }
            });
        if let Err(e) = spawned {
            log::error!("cannot start the agent address reader: {e}");
        }
        self.fixed.push(WatchHandle { stop });
    }
}

/// Learns what a connection that no intention names gets: the ACL default policy from
/// `/v1/agent/self`, or, when the token may not read it (a service identity has no
/// `agent:read`), Consul's own answer for a source no exact intention can name.
struct DefaultPolicyWatch {
    consul: Consul,
    sink: Arc<dyn Sink>,
    timing: Timing,
    service: String,
    stop: Arc<AtomicBool>,
}

impl DefaultPolicyWatch {
    fn run(self) {
        let mut failures = 0;
        let mut last: Option<String> = None;
        let mut last_error = String::new();
        while !self.stop.load(Ordering::SeqCst) {
            let pause = match self.read() {
                Ok(policy) => {
                    failures = 0;
                    if last.as_ref() != Some(&policy) {
                        if !matches!(policy.to_ascii_lowercase().as_str(), "allow" | "deny") {
                            log::warn!(
                                "the Consul agent reports the ACL default policy {policy:?}, which this sidecar does not know; connections that no intention matches are denied"
                            );
                        }
                        last = Some(policy.clone());
                        self.sink.update(Update::AclDefaultPolicy(policy));
                    }
                    // It changes only with the agent's configuration or a `*` intention; the
                    // intentions watch covers the latter.
                    Duration::from_secs(30)
                }
                Err(e) => {
                    failures += 1;
                    let e = e.to_string();
                    if e != last_error {
                        log::warn!("cannot learn the default intention policy: {e}");
                        last_error = e;
                    }
                    self.sink.watch_error(AGENT_SELF_PATH);
                    backoff(&self.timing, failures)
                }
            };
            let until = Instant::now() + pause;
            while Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    }

    /// The policy from the first place that has it: the `X-Consul-Default-Acl-Policy` header
    /// (Consul 1.10+, on any status), `/v1/agent/self` (1.8's or 1.11's key), and, for a token
    /// that may not read the agent on a Consul without the header, Consul's own authorize
    /// answer for a source no intention can name.
    fn read(&self) -> crate::error::Result<String> {
        let answer = self.consul.get(AGENT_SELF_PATH, None)?;
        if let Some(policy) = &answer.default_acl_policy {
            return Ok(policy.clone());
        }
        if answer.status == 200 {
            let me = api::parse::<AgentSelf>("the agent's configuration", &answer.body)?;
            return me.default_policy().ok_or_else(|| {
                crate::error::Error::msg(
                    "/v1/agent/self says ACLs are enabled but has no ACL default policy (neither DebugConfig.ACLDefaultPolicy nor DebugConfig.ACLResolverSettings.ACLDefaultPolicy)",
                )
            });
        }
        if answer.status != 403 {
            return Err(crate::error::Error::msg(format!(
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
            "Target": self.service,
            "ClientCertURI": format!("spiffe://probe.consul/ns/default/dc/probe/svc/{probe}"),
            "ClientCertSerial": "00",
        })
        .to_string();
        let answer = self.consul.send("POST", AUTHORIZE_PATH, Some(&body))?;
        if answer.status != 200 {
            return Err(crate::error::Error::msg(format!(
                "status {} for /v1/agent/connect/authorize (and 403 for /v1/agent/self): {}",
                answer.status,
                answer.body.trim()
            )));
        }
        let v: serde_json::Value = api::parse("the authorize answer", &answer.body)?;
        let allowed = v
            .get("Authorized")
            .and_then(serde_json::Value::as_bool)
            .ok_or_else(|| crate::error::Error::msg("the authorize answer has no Authorized"))?;
        Ok(if allowed { "allow" } else { "deny" }.to_string())
    }
}

struct Watch {
    consul: Consul,
    sink: Arc<dyn Sink>,
    timing: Timing,
    what: String,
    path: String,
    mode: WatchMode,
    /// See `Watchers::spawn_with`.
    unknown: Option<&'static str>,
    stop: Arc<AtomicBool>,
}

impl Watch {
    fn stopped(&self) -> bool {
        self.stop.load(Ordering::SeqCst)
    }

    /// Sleeps in short steps so that a stopped watch ends promptly.
    fn pause(&self, d: Duration) {
        let until = Instant::now() + d;
        while !self.stopped() {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return;
            }
            std::thread::sleep(left.min(Duration::from_millis(200)));
        }
    }

    fn run(self, parse: impl Fn(&str) -> crate::error::Result<Update>) {
        let mut index: u64 = 0;
        let mut hash: Option<String> = None;
        let mut last_body: Option<String> = None;
        let mut failures: u32 = 0;
        let mut last_error: Option<String> = None;
        let sep = if self.path.contains('?') { '&' } else { '?' };
        while !self.stopped() {
            let started = Instant::now();
            // After a failure only a blocking read that returns proves the path works again (see
            // below); it blocks briefly so that the recovery is noticed within seconds, not after
            // a whole `wait` with nothing changing.
            let block = if failures > 0 {
                self.timing.wait.min(RECOVERY_WAIT)
            } else {
                self.timing.wait
            };
            let (url, wait) = match self.mode {
                WatchMode::Index if index > 0 => (
                    format!("{}{sep}index={index}&wait={}s", self.path, block.as_secs()),
                    Some(block),
                ),
                WatchMode::Hash if hash.is_some() => (
                    format!(
                        "{}{sep}hash={}&wait={}s",
                        self.path,
                        encode(hash.as_deref().unwrap_or_default()),
                        block.as_secs()
                    ),
                    Some(block),
                ),
                _ => (self.path.clone(), None),
            };
            let result = self.consul.get(&url, wait);
            if self.stopped() {
                return;
            }
            let failure = match result {
                Ok(answer) if answer.status == 200 => {
                    // After a failure the read starts over without an index, and the agent may
                    // answer that from its cache while its servers are gone; only a blocking read
                    // (or a poll) proves the path works again. Counting the cached answer as a
                    // recovery would reset the backoff and log a warning and a recovery every
                    // 0.2 s for as long as the outage lasts.
                    let recovered = wait.is_some() || matches!(self.mode, WatchMode::Poll(_));
                    if failures > 0 && recovered {
                        log::info!(
                            "{} readable again after {failures} failed attempt(s)",
                            self.what
                        );
                    }
                    if recovered {
                        failures = 0;
                        last_error = None;
                    }
                    match self.mode {
                        WatchMode::Index => index = next_index(index, answer.index),
                        WatchMode::Hash => hash = answer.content_hash.clone(),
                        WatchMode::Poll(_) => {}
                    }
                    if last_body.as_deref() != Some(answer.body.as_str()) {
                        match parse(&answer.body) {
                            Ok(update) => {
                                last_body = Some(answer.body);
                                self.sink.update(update);
                            }
                            Err(e) => {
                                // Keep serving the last good content; the next change may be good.
                                log::error!("ignoring a bad answer for {}: {e}", self.what);
                                self.sink.watch_error(&self.path);
                            }
                        }
                    }
                    None
                }
                Ok(answer) if answer.status == 404 && self.mode == WatchMode::Hash => {
                    if last_body.is_some() {
                        last_body = None;
                        self.sink.update(Update::RegistrationGone);
                    }
                    hash = None;
                    Some(format!("{} not found (404)", self.path))
                }
                Ok(answer) if self.unknown.is_some_and(|u| answer.body.contains(u)) => {
                    log::info!(
                        "this Consul agent has no {} ({:?}); none applies",
                        self.what,
                        answer.body.trim().chars().take(80).collect::<String>()
                    );
                    match parse("[]") {
                        Ok(update) => self.sink.update(update),
                        Err(e) => log::error!("{e}"),
                    }
                    return;
                }
                Ok(answer) => Some(format!(
                    "status {} for {}: {}",
                    answer.status,
                    self.path,
                    answer.body.trim().chars().take(200).collect::<String>()
                )),
                Err(e) => Some(e.to_string()),
            };
            if let Some(error) = failure {
                failures = failures.saturating_add(1);
                self.sink.watch_error(&self.path);
                // A failed blocking query starts over without an index, as Consul's watcher does.
                index = 0;
                let delay = backoff(&self.timing, failures);
                if last_error.as_deref() != Some(error.as_str()) {
                    log::warn!(
                        "cannot read {} from Consul at {}: {error}; retrying in {:.1}s",
                        self.what,
                        self.consul.endpoint(),
                        delay.as_secs_f64()
                    );
                    last_error = Some(error);
                } else {
                    log::debug!("{} still failing (attempt {failures})", self.what);
                }
                self.pause(delay);
                continue;
            }
            match self.mode {
                WatchMode::Poll(every) => self.pause(every),
                // A blocking query that returns at once with nothing new would spin; keep a floor.
                _ => {
                    let floor = Duration::from_millis(50);
                    let took = started.elapsed();
                    if took < floor {
                        self.pause(floor - took);
                    }
                }
            }
        }
    }
}

/// Consul's index rules: backwards resets to 0 (the next read does not block), 0 is clamped to 1.
pub fn next_index(previous: u64, returned: Option<u64>) -> u64 {
    match returned {
        None => 0,
        Some(i) if i < previous => 0,
        Some(0) => 1,
        Some(i) => i,
    }
}

/// Exponential backoff with full jitter in [d/2, d].
pub fn backoff(timing: &Timing, failures: u32) -> Duration {
    let exp = timing
        .backoff_min
        .saturating_mul(1u32 << failures.saturating_sub(1).min(16));
    let d = exp.min(timing.backoff_max);
    let half = d / 2;
    half + half.mul_f64(crate::random::jitter_fraction())
}

/// The largest local JWKS file read (bytes).
const MAX_JWKS_FILE: u64 = 256 * 1024;

/// Each local JWKS file the `jwt-provider` entries name (`JSONWebKeySet.Local.Filename`),
/// read now: its text, or why not (then that provider verifies nothing).
fn read_jwks_files(entries: &[serde_json::Value]) -> BTreeMap<String, Result<String, String>> {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn index_rules() {
        assert_eq!(next_index(0, Some(12)), 12);
        assert_eq!(next_index(12, Some(15)), 15);
        assert_eq!(next_index(15, Some(15)), 15);
        assert_eq!(next_index(15, Some(3)), 0, "backwards resets");
        assert_eq!(next_index(0, Some(0)), 1, "zero is clamped");
        assert_eq!(next_index(7, None), 0, "no index header: do not block");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let t = Timing::default();
        for failures in 1..40 {
            let d = backoff(&t, failures);
            let cap = t
                .backoff_min
                .saturating_mul(1 << (failures - 1).min(16))
                .min(t.backoff_max);
            assert!(d >= cap / 2 && d <= cap, "{failures}: {d:?} vs {cap:?}");
        }
        assert!(backoff(&t, 30) <= t.backoff_max);
    }

    /// A prepared query is polled at the shortest valid `poll_interval` of the upstreams that
    /// name it; a bad one, or one on a service upstream, asks for nothing (the default).
    #[test]
    fn poll_intervals_take_the_shortest_valid_one_per_query() {
        let reg: AgentService = serde_json::from_str(
            r#"{"ID":"c-sidecar-proxy","Service":"c-sidecar-proxy","Kind":"connect-proxy",
               "Proxy":{"DestinationServiceName":"c","Upstreams":[
                 {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindPort":1,
                  "Config":{"poll_interval":"2s"}},
                 {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindPort":2,
                  "Config":{"poll_interval":"500ms"}},
                 {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindPort":3,
                  "Config":{"poll_interval":"1ms"}},
                 {"DestinationType":"prepared_query","DestinationName":"other","LocalBindPort":4,
                  "Config":{"poll_interval":30}},
                 {"DestinationName":"server","LocalBindPort":5,
                  "Config":{"poll_interval":"1s"}}]}}"#,
        )
        .unwrap();
        let polls = poll_intervals(&reg);
        let got: Vec<(String, u64)> = polls
            .iter()
            .map(|(k, v)| (k.name.clone(), v.get()))
            .collect();
        assert_eq!(got, [("pq".to_string(), 500)]);
        let bad = |v: serde_json::Value| {
            let c = BTreeMap::from([("poll_interval".to_string(), v)]);
            super::super::poll_interval(&c).map(|r| r.is_err())
        };
        assert_eq!(bad("99ms".into()), Some(true));
        assert_eq!(bad("1000h".into()), Some(true));
        assert_eq!(bad("30s\nx".into()), Some(true));
        assert_eq!(bad("30s".into()), Some(false));
        assert_eq!(bad(serde_json::Value::Null), None);
    }

    #[test]
    fn destinations_are_deduplicated_and_keep_datacenters_apart() {
        let reg: AgentService = serde_json::from_str(
            r#"{"ID":"c-sidecar-proxy","Service":"c-sidecar-proxy","Kind":"connect-proxy",
               "Proxy":{"DestinationServiceName":"c","Upstreams":[
                 {"DestinationName":"server","LocalBindPort":9191},
                 {"DestinationName":"server","LocalBindPort":9192},
                 {"DestinationName":"server","Datacenter":"dc2","LocalBindPort":9193},
                 {"DestinationType":"prepared_query","DestinationName":"pq","LocalBindPort":9194}]}}"#,
        )
        .unwrap();
        let keys = destinations(&reg, &[]);
        assert_eq!(keys.len(), 3, "{keys:?}");
        assert!(keys.iter().any(|k| k.datacenter == "dc2"));
        assert!(keys
            .iter()
            .any(|k| k.kind == DestinationKind::PreparedQuery && k.name == "pq"));
    }
}
