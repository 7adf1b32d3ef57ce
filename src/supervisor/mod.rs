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
        let built = model::build(&self.snapshot, &self.settings, previous);
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
            let known = self.snapshot.endpoints_known() && self.snapshot.mesh.is_some();
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
        let check: crate::apply::ConfigCheck = Box::new(move |cfg| {
            children::check_config(&haproxy_bin, cfg).map_err(crate::error::Error::msg)
        });
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
                StatsService::register(&self.consul, proxy_id, &desired.service, &address, addr)
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

    /// The event loop while HAProxy runs; returns the run's exit code.
    fn serve(&mut self, srv: &mut Serving) -> i32 {
        loop {
            let flow = match self.rx.recv_timeout(srv.timeout()) {
                Ok(Event::Consul(update)) => self.on_consul(srv, *update),
                Ok(Event::Signal(Sig::Reconcile)) => self.on_reconcile(srv),
                Ok(Event::Signal(Sig::Stop)) => self.on_stop(srv),
                Ok(Event::Signal(Sig::ChildExited)) => self.on_child_exited(srv),
                Ok(Event::Applied(outcome)) => self.on_applied(srv, outcome),
                Ok(Event::Admission(verdicts)) => self.on_admission(srv, verdicts),
                Err(RecvTimeoutError::Timeout) => Flow::Continue,
                Err(RecvTimeoutError::Disconnected) => Flow::Finish,
            };
            let flow = match flow {
                Flow::Continue => self.on_timers(srv),
                other => other,
            };
            match flow {
                Flow::Continue => {}
                Flow::Exit(code) => return code,
                Flow::Finish => break,
            }
        }
        srv.children.drain_orphans(
            srv.drain_deadline.unwrap_or_else(Instant::now) + Duration::from_secs(1),
        );
        // The agent goes last: HAProxy asked it until its last connection was done.
        self.intentions = Intentions::Warned(String::new());
        self.life.set(Phase::Stopped, "all children stopped");
        0
    }

    fn on_consul(&mut self, srv: &mut Serving, update: Update) -> Flow {
        if self.absorb(update) && self.life.phase != Phase::Draining {
            let now = Instant::now();
            srv.dirty = Some((srv.dirty.map_or(now, |(first, _)| first), now));
        }
        Flow::Continue
    }

    /// New identity verdicts: applied like a Consul change (debounced with them).
    fn on_admission(&mut self, srv: &mut Serving, verdicts: Verdicts) -> Flow {
        if self.snapshot.admit(verdicts) && self.life.phase != Phase::Draining {
            let now = Instant::now();
            srv.dirty = Some((srv.dirty.map_or(now, |(first, _)| first), now));
        }
        Flow::Continue
    }

    /// SIGHUP: every file rendered anew from the current snapshot and replaced whole.
    fn on_reconcile(&mut self, srv: &mut Serving) -> Flow {
        if self.life.phase == Phase::Draining {
            return Flow::Continue;
        }
        log::info!("SIGHUP: full reconcile with the current Consul state");
        match self.build(Some(&srv.last_submitted)) {
            Ok(d) => {
                if let Some(a) = &srv.applier {
                    a.reconcile(d.clone());
                }
                self.want_checked(&d);
                self.registry.publish(&d);
                srv.last_submitted = d;
            }
            Err(e) => log::error!("SIGHUP: cannot build the configuration: {e}"),
        }
        Flow::Continue
    }

    /// SIGTERM/SIGINT: the first starts the drain, a second stops everything at once.
    fn on_stop(&mut self, srv: &mut Serving) -> Flow {
        if self.life.phase == Phase::Draining {
            log::warn!("second stop signal: stopping HAProxy now");
            srv.children.terminate();
            return Flow::Continue;
        }
        self.life
            .set(Phase::Draining, "stop signal: finishing in-flight work");
        if let Some(service) = srv.stats_service.take() {
            service.deregister(&self.consul);
        }
        // Peers stop being sent here while the connections in flight finish.
        drop(self.registered.take());
        if let Some(a) = srv.applier.take() {
            a.stop();
        }
        srv.children.soft_stop();
        srv.drain_deadline = Some(Instant::now() + self.opts.knobs.grace_period);
        Flow::Continue
    }

    fn on_child_exited(&mut self, srv: &mut Serving) -> Flow {
        let draining = self.life.phase == Phase::Draining;
        for exit in process::reap() {
            match srv.children.ended(&exit, draining) {
                Ended::Expected => {}
                Ended::Restarting(name) => self.registry.restart(name),
                Ended::GiveUp(name, code) => {
                    self.life
                        .set(Phase::Stopped, &format!("{name} keeps dying"));
                    return Flow::Exit(code);
                }
            }
        }
        if draining && srv.children.is_empty() {
            return Flow::Finish;
        }
        Flow::Continue
    }

    fn on_applied(&mut self, srv: &mut Serving, outcome: Outcome) -> Flow {
        match outcome {
            Outcome::Applied {
                ops,
                reloaded,
                took,
                live,
            } => {
                srv.live = live;
                self.registry.applied(true, took);
                log::info!(
                    "{ops} change(s) applied in {} ms{}",
                    took.as_millis(),
                    if reloaded { " (HAProxy reloaded)" } else { "" }
                );
            }
            Outcome::Failed(e) => {
                self.registry.applied(false, Duration::ZERO);
                log::error!("{e}; HAProxy keeps its last good configuration, retrying");
            }
        }
        Flow::Continue
    }

    /// After every event: restarts that are due, the end of the drain's grace, and a debounced
    /// burst of Consul changes handed to the applier.
    fn on_timers(&mut self, srv: &mut Serving) -> Flow {
        if self.life.phase != Phase::Draining {
            if let Err((name, code)) = srv.children.restart_due() {
                self.life
                    .set(Phase::Stopped, &format!("{name} could not be restarted"));
                return Flow::Exit(code);
            }
        }
        if let Some(deadline) = srv.drain_deadline {
            if Instant::now() >= deadline && !srv.children.is_empty() {
                log::warn!(
                    "drain grace of {:?} is over; stopping what is left",
                    self.opts.knobs.grace_period
                );
                srv.children.stop_all();
                return Flow::Finish;
            }
        }
        if let Some((first, last)) = srv.dirty {
            let now = Instant::now();
            if now >= last + DEBOUNCE || now >= first + DEBOUNCE_MAX {
                srv.dirty = None;
                self.submit(srv);
            }
        }
        self.ready_if_serving(srv);
        Flow::Continue
    }

    /// Ready means serving: every listener bound (HAProxy runs the file that has them), the
    /// instances of every upstream read from Consul, and every upstream Consul lists healthy
    /// instances for with at least one of them live in HAProxy. Once Ready, the phase stays
    /// (an upstream losing its instances later is the destination's problem, not this sidecar's).
    fn ready_if_serving(&mut self, srv: &mut Serving) {
        if self.life.phase != Phase::WaitingForConsul
            || srv.dirty.is_some()
            || !self.snapshot.endpoints_known()
            || !srv.last_submitted.served_by(&srv.live)
        {
            return;
        }
        let d = &srv.last_submitted;
        let instances: usize = srv.live.values().sum();
        let why = match (&d.public, &d.gateway) {
            (Some(p), _) => format!(
                "HAProxy serves {} on {}:{} with {} upstream listener(s), {instances} upstream instance(s) live",
                d.service,
                p.bind_address,
                p.bind_port,
                d.upstreams.len()
            ),
            (None, Some(g)) => format!(
                "HAProxy serves the mesh gateway {} with {} route(s), {instances} instance(s) live",
                d.service,
                g.routes.len()
            ),
            (None, None) => format!("HAProxy serves {}", d.service),
        };
        self.life.set(Phase::Ready, &why);
        if let Some(o) = &d.transparent {
            redirect::check_in_background(o.port);
        }
    }

    /// Builds the desired state from the snapshot and hands it to the applier if it changed.
    fn submit(&mut self, srv: &mut Serving) {
        match self.build(Some(&srv.last_submitted)) {
            Ok(d) if d != srv.last_submitted => {
                if let Some(a) = &srv.applier {
                    a.submit(d.clone());
                }
                self.want_checked(&d);
                self.registry.publish(&d);
                srv.last_submitted = d;
            }
            Ok(_) => log::debug!("Consul changed nothing HAProxy serves"),
            // Logged once per distinct reason (`build` forgets it when a state builds again).
            Err(e) if self.build_error_new => log::error!(
                "ignoring a Consul state HAProxy cannot be given ({e}); the last good configuration keeps serving"
            ),
            Err(_) => {}
        }
    }
}

impl Serving {
    /// Waits, at most a few seconds, for the applier's thread to end: it was told to stop when
    /// the drain began and its children are gone, so a step it was in fails fast; a write it
    /// was finishing must not land while the working directory is being removed.
    fn wait_for_applier(&mut self) {
        if let Some(a) = self.applier.take() {
            a.stop();
        }
        let Some(thread) = self.applier_thread.take() else {
            return;
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while !thread.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        if thread.is_finished() {
            let _ = thread.join();
        } else {
            log::warn!(
                "the applier is still busy after 5 s; removing the working directory anyway"
            );
        }
    }

    /// How long the loop may wait for an event before a timer is due.
    fn timeout(&self) -> Duration {
        let now = Instant::now();
        let mut timeout = match (self.dirty, self.drain_deadline) {
            (Some((first, last)), _) => {
                ((last + DEBOUNCE).min(first + DEBOUNCE_MAX)).saturating_duration_since(now)
            }
            (None, Some(d)) => d.saturating_duration_since(now),
            (None, None) => Duration::from_secs(3600),
        };
        if let Some(due) = self.children.next_restart() {
            timeout = timeout.min(due.saturating_duration_since(now));
        }
        timeout
    }
}
