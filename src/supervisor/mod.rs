//! The supervisor: one event loop on the main thread owns the lifecycle. Signals, child exits,
//! Consul updates and apply results arrive as messages on one channel; only this loop changes
//! the phase or starts and stops children. Slow work (Dataplane API calls) runs on the applier
//! thread, so a signal is never stuck behind HTTP.
//!
//! A run has three stretches: finding the proxy and waiting for a complete snapshot, starting
//! HAProxy and the Dataplane API on the first rendered file, and serving, where `serve` is a
//! match over events with one handler each (`on_*`) and the timers after every event.

pub mod children;
pub mod preflight;
pub mod process;
pub mod redirect;
mod serving;
pub mod signals;

use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::admission::checker::{Checker, Report};
use crate::admission::Verdicts;
use crate::apply::{Applier, Outcome};
use crate::cli::Options;
use crate::config::{MeshGateway, Target};
use crate::consul::client::{deregister_path, Consul, LogoutOnDrop, LookupError, REGISTER_PATH};
use crate::consul::kinds::Role;
use crate::consul::watch::{Sink, Timing, Watchers};
use crate::consul::Update;
use crate::error::{usage, Error, Fatal, Result};
use crate::files::{check_socket_paths, create_workdir, write_atomic};
use crate::intentions::agent::Intentions;
use crate::metrics::Registry;
use crate::model::{self, Desired, Paths, Settings};
use crate::phase::{Phase, PhaseCell};
use crate::render::{self, DataplaneCredentials, Templates};
use crate::snapshot::Snapshot;
use crate::stats::StatsService;
use children::{Children, Ended, Launch};
use signals::Sig;

/// How long the first render waits for upstream instances once the rest is known.
const ENDPOINTS_GRACE: Duration = Duration::from_secs(3);
/// How long the first render then waits for the identity checks of those instances, so that
/// HAProxy starts with its proven servers in service rather than reloading or changing them.
const ADMISSION_GRACE: Duration = Duration::from_secs(2);
/// A burst of Consul changes is applied as one, this long after its last change...
const DEBOUNCE: Duration = Duration::from_millis(30);
/// ...but never later than this after its first.
const DEBOUNCE_MAX: Duration = Duration::from_millis(200);

pub enum Event {
    Signal(Sig),
    Consul(Box<Update>),
    Applied(Outcome),
    /// The identity checker's verdicts changed.
    Admission(Verdicts),
}

/// The phase, logged on every change and published for `/ready`.
struct Lifecycle {
    phase: Phase,
    published: PhaseCell,
}

impl Lifecycle {
    fn set(&mut self, next: Phase, reason: &str) {
        if self.phase != next {
            log::info!("phase: {:?} -> {:?} ({reason})", self.phase, next);
            self.phase = next;
            self.published.set(next);
        }
    }
}

// `Sender` is `Sync` (Rust 1.72+): watcher and checker threads share it without a lock.
struct ChannelSink(Sender<Event>, Arc<Registry>);

impl Sink for ChannelSink {
    fn update(&self, update: Update) {
        let _ = self.0.send(Event::Consul(Box::new(update)));
    }
    fn watch_error(&self, endpoint: &str) {
        self.1.watch_error(endpoint);
    }
}

struct CheckerSink(Sender<Event>, Arc<Registry>);

impl Report for CheckerSink {
    fn verdicts(&self, verdicts: Verdicts) {
        let _ = self.0.send(Event::Admission(verdicts));
    }
    fn checked(&self, result: &'static str) {
        self.1.identity_checked(result);
    }
}

/// What the supervisor holds for the whole run.
struct Supervisor {
    opts: Options,
    life: Lifecycle,
    registry: Arc<Registry>,
    consul: Consul,
    rx: Receiver<Event>,
    tx: Sender<Event>,
    settings: Settings,
    watchers: Watchers,
    /// What `watchers` follow the snapshot's wanted watches for.
    role: Role,
    snapshot: Snapshot,
    intentions: Intentions,
    /// `None` with `-upstream-identity-check=false`.
    checker: Option<Checker>,
    /// Why the last Consul state could not be built, so that a state that stays unusable is
    /// reported once, not on every change.
    last_build_error: Option<String>,
    /// Whether the last `build` failed for a reason other than the one before it.
    build_error_new: bool,
    /// The warnings of the last state built, each logged when it first appeared (however
    /// often the state is rebuilt while it holds).
    warned: Vec<String>,
    /// A mesh gateway this run registered (`-register`): deregistered when the drain starts,
    /// or when the run ends however it ends.
    registered: Option<GatewayRegistration>,
    /// One forwarder per peered upstream's service (`crate::peering`), as the last state
    /// built asks.
    forwarders: crate::peering::Forwarders,
}

/// A mesh gateway's registration, deregistered on drop.
struct GatewayRegistration {
    consul: Consul,
    id: String,
}

impl GatewayRegistration {
    fn register(consul: &Consul, g: &MeshGateway) -> Result<GatewayRegistration> {
        let (id, body) = crate::consul::gateway_registration(g);
        let answer = consul.send("PUT", REGISTER_PATH, Some(&body))?;
        if answer.status != 200 {
            return Err(Error::msg(format!(
                "registering the mesh gateway {id}: status {}: {}",
                answer.status,
                answer.body.trim()
            )));
        }
        log::info!(
            "registered the mesh gateway {id} (LAN {}, WAN {})",
            g.lan,
            g.wan.unwrap_or(g.lan)
        );
        Ok(GatewayRegistration {
            consul: consul.clone(),
            id,
        })
    }
}

impl Drop for GatewayRegistration {
    fn drop(&mut self) {
        match self.consul.send("PUT", &deregister_path(&self.id), None) {
            Ok(a) if a.status == 200 => log::info!("deregistered the mesh gateway {}", self.id),
            Ok(a) => log::warn!(
                "deregistering the mesh gateway {}: status {}",
                self.id,
                a.status
            ),
            Err(e) => log::warn!("deregistering the mesh gateway {}: {e}", self.id),
        }
    }
}

/// What exists only once HAProxy runs.
struct Serving {
    children: Children,
    /// `None` once the drain began: nothing is applied any more.
    applier: Option<Applier>,
    /// The applier's thread, waited for (`Serving::wait_for_applier`) before the working
    /// directory it writes into is removed.
    applier_thread: Option<std::thread::JoinHandle<()>>,
    last_submitted: Desired,
    /// First and last Consul change not yet handed to the applier.
    dirty: Option<(Instant, Instant)>,
    drain_deadline: Option<Instant>,
    stats_service: Option<StatsService>,
    /// Instances live in HAProxy per upstream, as the applier last reported.
    live: std::collections::BTreeMap<String, usize>,
}

/// What a handler tells the loop.
enum Flow {
    Continue,
    /// The drain is over (or the channel closed): clean up and exit 0.
    Finish,
    /// The run ends now with this code; the handler already stopped the children.
    Exit(i32),
}

pub fn run(opts: Options) -> Result<i32, Fatal> {
    let haproxy = preflight::check(&opts)?;
    let mut life = Lifecycle {
        phase: Phase::Starting,
        published: PhaseCell::default(),
    };
    let registry = Arc::new(Registry::default());
    if let Some(addr) = opts.stats_addr {
        let (reg, phase) = (registry.clone(), life.published.clone());
        let metrics: crate::stats::MetricsFn =
            Arc::new(move || crate::metrics::scrape(&reg, &phase));
        crate::stats::serve(addr, life.published.clone(), Some(metrics)).map_err(usage)?;
    }
    process::become_subreaper();
    let (tx, rx) = channel::<Event>();
    signals::forward(tx.clone(), Event::Signal)?;
    let consul = Consul::new(&opts.consul).map_err(usage)?;
    // Dropped last: a login's token is destroyed however the run ends (stop signal, fatal
    // error), after the stats service is deregistered with it.
    let _logout = LogoutOnDrop(consul.clone());
    let templates = Templates::chosen(opts.template_dir.as_deref()).map_err(usage)?;
    let reload_exe = std::env::current_exe()
        .map_err(|e| Error::with_source("finding the path of this executable", e))?;

    let gateway = match &opts.target {
        Target::MeshGateway(g) => Some(g.clone()),
        _ => None,
    };
    // Deregisters the gateway however the run ends (dropped last).
    let mut registered: Option<GatewayRegistration> = None;
    let Some(proxy_id) = find_proxy(&consul, &opts, &rx, &mut registered)? else {
        life.set(Phase::Stopped, "stop signal before start");
        return Ok(0);
    };
    // Removed when the run ends, however it ends.
    let workdir = create_workdir(&opts.base_path, &proxy_id).map_err(usage)?;
    let paths = Paths::new(&workdir.dir);
    check_paths(&paths, &reload_exe)?;
    let settings = Settings {
        paths: paths.clone(),
        intentions: opts.enable_intentions,
        knobs: opts.knobs.clone(),
        haproxy,
        // A gateway checks no identity: the sidecars at either end do, through it.
        identity_check: opts.identity_recheck.is_some() && gateway.is_none(),
        gateway: gateway.clone(),
    };
    let sink = Arc::new(ChannelSink(tx.clone(), registry.clone()));
    // Intentions are watched even when not enforced, so that ignoring a deny is never silent;
    // a gateway has none of its own (the destination's sidecar enforces them).
    let role = Role {
        proxy_id: proxy_id.clone(),
        gateway: gateway.is_some(),
        agentless: consul.source().is_agentless(),
        intentions: gateway.is_none(),
    };
    let mut watchers = Watchers::start(consul.clone(), sink, Timing::default());
    watchers.follow(&Snapshot::default().watches(&role));
    if gateway.is_some() && opts.enable_intentions {
        log::warn!("-enable-intentions has no effect on a mesh gateway: the destination's sidecar enforces intentions");
    }
    let intentions = Intentions::start(
        opts.enable_intentions && gateway.is_none(),
        &paths,
        opts.spoe_threads,
        &registry,
    )?;
    let checker = match opts.identity_recheck.filter(|_| gateway.is_none()) {
        Some(every) => Some(Checker::start(
            every,
            Arc::new(CheckerSink(tx.clone(), registry.clone())),
        )?),
        None => None,
    };
    life.set(
        Phase::WaitingForConsul,
        "watching the registration, leaf, roots and upstreams",
    );
    let agentless = consul.source().is_agentless();
    let mut s = Supervisor {
        opts,
        life,
        registry,
        consul,
        rx,
        tx,
        settings,
        watchers,
        role,
        snapshot: Snapshot {
            agentless,
            enforcing: matches!(intentions, Intentions::Enforced(_)),
            ..Snapshot::default()
        },
        intentions,
        last_build_error: None,
        build_error_new: false,
        warned: Vec::new(),
        checker,
        registered,
        forwarders: Default::default(),
    };
    let Some(desired) = s.wait_for_snapshot()? else {
        return Ok(0);
    };
    let mut serving = s.start(desired, templates, reload_exe, &proxy_id)?;
    let code = s.serve(&mut serving);
    serving.wait_for_applier();
    drop(workdir);
    Ok(code)
}

/// Socket paths fit HAProxy's limit, and what the Dataplane API's reload command carries has no
/// white space (it splits the command on spaces, without a shell).
fn check_paths(paths: &Paths, reload_exe: &Path) -> Result<(), Fatal> {
    check_socket_paths(&[
        &paths.stats_socket,
        &paths.master_socket,
        &paths.dataplane_socket,
        &paths.spoe_socket,
        &paths.metrics_socket,
    ])
    .map_err(usage)?;
    for p in [reload_exe, paths.master_socket.as_path()] {
        if p.to_string_lossy().contains(char::is_whitespace) {
            return Err(usage(Error::msg(format!(
                "{} contains white space, which the Dataplane API's reload command cannot carry",
                p.display()
            ))));
        }
    }
    Ok(())
}

/// Finds the proxy, waiting for the agent and for a registration that is not there yet.
/// Returns `None` when a stop signal came first.
fn find_proxy(
    consul: &Consul,
    opts: &Options,
    rx: &Receiver<Event>,
    registered: &mut Option<GatewayRegistration>,
) -> Result<Option<String>, Fatal> {
    let timing = Timing::default();
    let mut failures = 0;
    let mut last = String::new();
    loop {
        let registration = match &opts.target {
            Target::MeshGateway(g) if g.register && registered.is_none() => {
                GatewayRegistration::register(consul, g).map(|r| *registered = Some(r))
            }
            _ => Ok(()),
        };
        let found = match registration {
            Ok(()) => consul.find_proxy(&opts.target),
            Err(e) => Err(LookupError::Consul(e)),
        };
        let problem = match found {
            Ok(id) => {
                log::info!(
                    "serving proxy {id:?} of {} via Consul at {}",
                    consul.source().describe(),
                    consul.endpoint()
                );
                return Ok(Some(id));
            }
            Err(LookupError::Ambiguous(m)) => return Err(usage(Error::msg(m))),
            Err(LookupError::Missing(m)) => m,
            Err(LookupError::Consul(e)) => format!("waiting for the Consul agent: {e}"),
        };
        failures += 1;
        let delay = timing.backoff(failures);
        if problem != last {
            log::warn!("{problem}; retrying in {:.1}s", delay.as_secs_f64());
            last = problem;
        }
        let until = Instant::now() + delay;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Event::Signal(Sig::Stop)) => return Ok(None),
                Ok(Event::Signal(Sig::ChildExited)) => {
                    process::reap();
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }
}

impl Supervisor {
    /// Merges one Consul update; says whether anything the sidecar acts on changed. The
    /// intentions (agent table or warning) follow at once.
    fn absorb(&mut self, update: Update) -> bool {
        if let Update::JwtProviders(p) = &update {
            self.watchers.follow_jwt_providers(p);
        }
        if !self.snapshot.apply(update) {
            return false;
        }
        self.watchers.follow(&self.snapshot.watches(&self.role));
        self.intentions.follow(&self.snapshot);
        true
    }

    /// The desired state of the current snapshot, with the fast map of the intentions table
    /// the agent decides from now (the model knows no intentions; `absorb` has already given
    /// the agent this snapshot).
    fn build(&mut self, previous: Option<&Desired>) -> crate::error::Result<Desired> {
        let mut built = model::build(&self.snapshot, &self.settings, previous);
        // The forwarders the state asks for, each with its target; a forwarder just started
        // has an address the state could not know yet: build once more with it.
        if let Ok(d) = &built {
            let addresses = self.forwarders.sync(&d.peered(), &d.tls.leaf_pem);
            if self.snapshot.forwarding(addresses) {
                built = model::build(&self.snapshot, &self.settings, previous);
            }
        }
        let mut d = match built {
            Ok(d) => d,
            Err(e) => {
                let why = e.to_string();
                self.build_error_new = self.last_build_error.as_ref() != Some(&why);
                if self.build_error_new && crate::value::is_refusal(&why) {
                    self.registry.refused_values(1);
                }
                self.last_build_error = Some(why);
                return Err(e);
            }
        };
        self.last_build_error = None;
        // Each warning is logged, and each value refused from Consul's data counted, once:
        // when it first shows.
        let mut refused = 0;
        for w in d.warnings.iter().filter(|w| !self.warned.contains(w)) {
            log::warn!("{w}");
            refused += u64::from(crate::value::is_refusal(w));
        }
        self.registry.refused_values(refused);
        self.warned = d.warnings.clone();
        d.intentions_map = self.intentions.fast_map();
        d.jwt_headers = self.intentions.jwt_headers();
        Ok(d)
    }

    /// Hands the identity checker what `d` needs checked.
    fn want_checked(&self, d: &Desired) {
        if let Some(c) = &self.checker {
            c.want(d.identity_checks());
        }
    }

    /// Waits until the snapshot has everything HAProxy needs (upstream instances and their
    /// identity checks get a short grace each) and builds the first desired state; `None` when
    /// a stop signal came first.
    fn wait_for_snapshot(&mut self) -> Result<Option<Desired>, Fatal> {
        let mut complete_since: Option<Instant> = None;
        let mut built_since: Option<Instant> = None;
        let mut last_problem = String::new();
        let mut last_missing = String::new();
        loop {
            match self.rx.recv_timeout(Duration::from_millis(100)) {
                Ok(Event::Consul(update)) => {
                    self.absorb(*update);
                }
                Ok(Event::Admission(verdicts)) => {
                    self.snapshot.admit(verdicts);
                }
                Ok(Event::Signal(Sig::Stop)) => {
                    self.life
                        .set(Phase::Stopped, "stop signal while waiting for Consul");
                    return Ok(None);
                }
                Ok(Event::Signal(Sig::ChildExited)) => {
                    process::reap();
                }
                Ok(_) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
            let missing = self.snapshot.missing().join(", ");
            if !missing.is_empty() {
                if missing != last_missing {
                    log::debug!("before HAProxy starts, waiting for {missing}");
                    last_missing = missing;
                }
                continue;
            }
            let since = *complete_since.get_or_insert_with(Instant::now);
            // The mesh entry too, so the public listener starts with the TLS versions it asks
            // for (Ready does not wait for it: an agent that cannot say keeps the default).
            let known = self.snapshot.endpoints_known()
                && self.snapshot.exports_known()
                && self.snapshot.mesh.is_some();
            if !known && since.elapsed() < ENDPOINTS_GRACE {
                continue;
            }
            match self.build(None) {
                Ok(d) => {
                    let wanted = d.identity_checks();
                    let unchecked = wanted
                        .endpoints
                        .iter()
                        .any(|e| !self.snapshot.admission.contains_key(e));
                    let since = *built_since.get_or_insert_with(Instant::now);
                    if unchecked && since.elapsed() < ADMISSION_GRACE {
                        self.want_checked(&d);
                        continue;
                    }
                    return Ok(Some(d));
                }
                Err(e) => {
                    let problem = e.to_string();
                    if problem != last_problem {
                        log::error!("cannot configure HAProxy yet: {problem}");
                        last_problem = problem;
                    }
                }
            }
        }
    }

    /// Writes the first files, starts HAProxy then the Dataplane API and the applier, and
    /// registers the stats endpoint when asked to.
    fn start(
        &mut self,
        desired: Desired,
        templates: Templates,
        reload_exe: PathBuf,
        proxy_id: &str,
    ) -> Result<Serving, Fatal> {
        let paths = &self.settings.paths;
        self.registry.publish(&desired);
        let creds = DataplaneCredentials::from_secret(&crate::random::bytes()?);
        for file in render::render(&desired, &creds, &templates)? {
            write_atomic(&file.path, file.contents.as_bytes())?;
        }
        if !templates.overridden.is_empty() {
            children::check_config(&self.opts.haproxy_bin, &paths.haproxy_cfg).map_err(|why| {
                usage(Error::msg(format!(
                    "the configuration rendered from {} is refused by haproxy -c: {why}",
                    templates.overridden_list()
                )))
            })?;
        }
        let mut children = Children::new(Launch {
            haproxy_bin: self.opts.haproxy_bin.clone(),
            dataplane_bin: self.opts.dataplane_bin.clone(),
            log_level: self.opts.log_level,
            paths: paths.clone(),
            creds: creds.clone(),
            reload_exe,
        });
        children.start_haproxy()?;
        let dataplane = children.start_dataplane()?;
        let tx = self.tx.clone();
        let haproxy_bin = self.opts.haproxy_bin.clone();
        let check: crate::apply::ConfigCheck =
            Box::new(move |cfg| children::check_config(&haproxy_bin, cfg));
        let (applier, applier_thread) = Applier::start(
            desired.clone(),
            dataplane,
            creds,
            templates,
            check,
            move |o| {
                let _ = tx.send(Event::Applied(o));
            },
        )?;
        let stats_service = match (self.opts.stats_service_register, self.opts.stats_addr) {
            (true, Some(addr)) => {
                let address = self
                    .snapshot
                    .registration
                    .as_ref()
                    .map(|r| r.address.clone())
                    .unwrap_or_default();
                let phase = self.life.published.clone();
                let ready = Box::new(move || phase.get() == Phase::Ready);
                StatsService::register(
                    &self.consul,
                    proxy_id,
                    &desired.service,
                    &address,
                    addr,
                    ready,
                )
                .map_err(|e| log::error!("cannot register the stats endpoint in Consul: {e}"))
                .ok()
            }
            _ => None,
        };
        self.want_checked(&desired);
        let live = desired.live_instances();
        let mut serving = Serving {
            children,
            applier: Some(applier),
            applier_thread: Some(applier_thread),
            last_submitted: desired,
            dirty: None,
            drain_deadline: None,
            stats_service,
            live,
        };
        self.ready_if_serving(&mut serving);
        Ok(serving)
    }
}
