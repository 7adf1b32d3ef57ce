//! The supervisor: one event loop on the main thread owns the lifecycle. Signals, child exits,
//! Consul updates and apply results arrive as messages on one channel; only this loop changes
//! the phase or starts and stops children. Slow work (Dataplane API calls) runs on the applier
//! thread, so a signal is never stuck behind HTTP.

pub mod process;
pub mod signals;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};

use crate::apply::{Applier, Outcome};
use crate::cli::{Options, EXIT_USAGE};
use crate::consul::client::{Consul, LookupError};
use crate::consul::watch::{Sink, Timing, Update, Watchers};
use crate::error::{Error, Result};
use crate::files::{check_socket_paths, create_workdir, write_atomic};
use crate::haproxy::dataplane::Dataplane;
use crate::haproxy::runtime;
use crate::haproxy::version::HaproxyVersion;
use crate::metrics::Registry;
use crate::model::{self, Desired, Paths, Settings};
use crate::render::{self, DataplaneCredentials};
use crate::snapshot::Snapshot;
use process::{Child, Exit};

/// How long the first render waits for upstream instances once the rest is known.
const ENDPOINTS_GRACE: Duration = Duration::from_secs(3);
/// A burst of Consul changes is applied as one, this long after its last change...
const DEBOUNCE: Duration = Duration::from_millis(30);
/// ...but never later than this after its first.
const DEBOUNCE_MAX: Duration = Duration::from_millis(200);
const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A crashed child is restarted after a pause that starts here and doubles...
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(200);
/// ...up to this;
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// and after this many crashes within `RESTART_WINDOW` the supervisor gives up and exits with
/// the child's code: a child that cannot stay up is a problem restarts will not solve.
const RESTART_BUDGET: usize = 5;
const RESTART_WINDOW: Duration = Duration::from_secs(60);

pub enum Event {
    Signal(i32),
    Consul(Box<Update>),
    Applied(Outcome),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    Starting,
    WaitingForConsul,
    Ready,
    Draining,
    Stopped,
}

struct Lifecycle {
    phase: Phase,
    /// What the stats endpoint's /ready reports.
    published: crate::stats::PhaseCell,
}

impl Lifecycle {
    fn set(&mut self, next: Phase, reason: &str) {
        if self.phase != next {
            log::info!("phase: {:?} -> {:?} ({reason})", self.phase, next);
            self.phase = next;
            self.published.set(match next {
                Phase::Starting => crate::stats::STARTING,
                Phase::WaitingForConsul => crate::stats::WAITING_FOR_CONSUL,
                Phase::Ready => crate::stats::READY,
                Phase::Draining => crate::stats::DRAINING,
                Phase::Stopped => crate::stats::STOPPED,
            });
        }
    }
}

/// Why the run ended early: an exit code and the error to log.
pub struct Fatal {
    pub code: i32,
    pub error: Error,
}

impl From<Error> for Fatal {
    fn from(error: Error) -> Self {
        Fatal { code: 1, error }
    }
}

/// What the model takes from the command line and the HAProxy binary, for a run or a dry run.
fn settings_from(opts: &Options, paths: Paths) -> Result<Settings, Fatal> {
    let haproxy = HaproxyVersion::detect(&opts.haproxy_bin).map_err(usage)?;
    log::info!("HAProxy {haproxy} ({})", opts.haproxy_bin.display());
    Ok(Settings {
        paths,
        intentions: opts.enable_intentions,
        grace_period_ms: opts.grace_period.as_millis() as u64,
        haproxy_params: opts.haproxy_params.clone(),
        balance: opts.balance.clone(),
        log_format: opts.log_format.clone(),
        haproxy_log_level: model::haproxy_log_level(opts.log_level),
        haproxy,
    })
}

fn usage(error: Error) -> Fatal {
    Fatal {
        code: EXIT_USAGE,
        error,
    }
}

struct ChannelSink(Mutex<Sender<Event>>, Arc<Registry>);

impl Sink for ChannelSink {
    fn update(&self, update: Update) {
        if let Ok(tx) = self.0.lock() {
            let _ = tx.send(Event::Consul(Box::new(update)));
        }
    }
    fn watch_error(&self, endpoint: &str) {
        self.1.watch_error(endpoint);
    }
}

/// The Consul service that advertises the stats endpoint: named after the sidecar's service,
/// tagged for what it is, checked through `/ready` at the address it really listens on.
fn stats_registration(
    consul: &Consul,
    proxy_id: &str,
    desired: &Desired,
    registration_address: &str,
    stats: std::net::SocketAddr,
) -> Result<(String, String)> {
    // An unspecified listen address is reached at the proxy's own address, else the node's.
    let address = if stats.ip().is_unspecified() {
        if registration_address.is_empty() {
            let me: serde_json::Value = consul.get_json("/v1/agent/self")?;
            me.pointer("/Member/Addr")
                .and_then(serde_json::Value::as_str)
                .map(str::to_string)
                .ok_or_else(|| Error::msg("the agent did not say its address (Member.Addr)"))?
        } else {
            registration_address.to_string()
        }
    } else {
        stats.ip().to_string()
    };
    let host = if address.contains(':') {
        format!("[{address}]")
    } else {
        address.clone()
    };
    let id = format!("{proxy_id}-stats");
    let body = serde_json::json!({
        "ID": id,
        "Name": format!("{}-sidecar-stats", desired.service),
        "Tags": ["haproxy-consul-connect", "stats", "metrics"],
        "Meta": {"proxy": proxy_id, "metrics_path": "/metrics"},
        "Address": address,
        "Port": stats.port(),
        "Check": {
            "Name": "sidecar ready",
            "HTTP": format!("http://{host}:{}/ready", stats.port()),
            "Interval": "10s",
            "Timeout": "2s",
            "DeregisterCriticalServiceAfter": "10m"
        }
    });
    Ok((id, body.to_string()))
}

/// The /metrics body: our registry plus HAProxy's exporter, both read at scrape time.
fn scrape(registry: &Registry, phase: &crate::stats::PhaseCell) -> String {
    let desired = registry.desired.read().ok().and_then(|d| d.clone());
    let (reloads, haproxy) = match &desired {
        Some(d) => {
            let reloads = runtime::show_proc(&d.paths.master_socket)
                .ok()
                .map(|p| u64::from(p.master_reloads));
            let text = crate::http::Client::new(
                crate::http::Endpoint::Unix {
                    path: d.paths.metrics_socket.clone(),
                },
                &crate::http::TlsFiles::default(),
                crate::http::Credential::None,
            )
            .and_then(|c| c.get("/metrics", Duration::from_secs(5)))
            .map(|r| r.body)
            .unwrap_or_else(|e| {
                log::debug!("scraping HAProxy's exporter: {e}");
                String::new()
            });
            (reloads, text)
        }
        None => (None, String::new()),
    };
    let now = crate::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    registry.render(
        &crate::metrics::Live {
            reloads,
            ready: phase.get() == crate::stats::READY,
        },
        &haproxy,
        now,
    )
}

/// Removes the working directory when the run ends, however it ends.
struct Workdir(PathBuf);

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::env::var_os("HCC_KEEP_WORKDIR").is_none() {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}

/// Finds the proxy, waiting for the agent and for a registration that is not there yet.
/// Returns `None` when a stop signal came first.
fn find_proxy(
    consul: &Consul,
    opts: &Options,
    rx: &Receiver<Event>,
) -> Result<Option<String>, Fatal> {
    let timing = Timing::default();
    let mut failures = 0;
    let mut last = String::new();
    loop {
        let problem = match consul.find_proxy(&opts.target) {
            Ok(id) => {
                log::info!(
                    "serving proxy {id:?} via the agent at {}",
                    consul.endpoint()
                );
                return Ok(Some(id));
            }
            Err(LookupError::Ambiguous(m)) => return Err(usage(Error::msg(m))),
            Err(LookupError::Missing(m)) => m,
            Err(LookupError::Consul(e)) => format!("waiting for the Consul agent: {e}"),
        };
        failures += 1;
        let delay = crate::consul::watch::backoff(&timing, failures);
        if problem != last {
            log::warn!("{problem}; retrying in {:.1}s", delay.as_secs_f64());
            last = problem;
        }
        let until = Instant::now() + delay;
        while let Some(left) = until.checked_duration_since(Instant::now()) {
            match rx.recv_timeout(left) {
                Ok(Event::Signal(SIGTERM | SIGINT)) => return Ok(None),
                Ok(Event::Signal(SIGCHLD)) => {
                    process::reap();
                }
                Ok(_) => {}
                Err(RecvTimeoutError::Timeout) => break,
                Err(RecvTimeoutError::Disconnected) => return Ok(None),
            }
        }
    }
}

pub fn run(opts: Options) -> Result<i32, Fatal> {
    let mut life = Lifecycle {
        phase: Phase::Starting,
        published: crate::stats::PhaseCell::default(),
    };
    let registry = Arc::new(Registry::default());
    if let Some(addr) = opts.stats_addr {
        let (reg, phase) = (registry.clone(), life.published.clone());
        let metrics: crate::stats::MetricsFn = Arc::new(move || scrape(&reg, &phase));
        crate::stats::serve(addr, life.published.clone(), Some(metrics)).map_err(usage)?;
    }
    process::become_subreaper();
    let (tx, rx) = channel::<Event>();
    signals::forward(tx.clone(), Event::Signal)?;
    let consul = Consul::new(&opts.consul).map_err(usage)?;
    let templates = load_templates(&opts)?;
    let reload_exe = std::env::current_exe()
        .map_err(|e| Error::with_source("finding the path of this executable", e))?;

    let Some(proxy_id) = find_proxy(&consul, &opts, &rx)? else {
        life.set(Phase::Stopped, "stop signal before start");
        return Ok(0);
    };
    let workdir = Workdir(create_workdir(&opts.base_path, &proxy_id).map_err(usage)?);
    let paths = Paths::new(&workdir.0);
    check_socket_paths(&[
        &paths.stats_socket,
        &paths.master_socket,
        &paths.dataplane_socket,
        &paths.spoe_socket,
        &paths.metrics_socket,
    ])
    .map_err(usage)?;
    // The Dataplane API splits its reload command on spaces, without a shell.
    for p in [reload_exe.as_path(), paths.master_socket.as_path()] {
        if p.to_string_lossy().contains(char::is_whitespace) {
            return Err(usage(Error::msg(format!(
                "{} contains white space, which the Dataplane API's reload command cannot carry",
                p.display()
            ))));
        }
    }
    let settings = settings_from(&opts, paths.clone())?;

    let sink = Arc::new(ChannelSink(Mutex::new(tx.clone()), registry.clone()));
    // Intentions are watched even when not enforced, so that ignoring a deny is never silent.
    let mut watchers = Watchers::start(consul.clone(), &proxy_id, sink, Timing::default(), true);
    let mut snapshot = Snapshot::default();
    // With intentions on, the agent runs before HAProxy exists and denies until it knows the
    // intentions, the default policy and the roots.
    let mut authz = if opts.enable_intentions {
        let a = Authz::start(&paths, opts.spoe_threads)?;
        if let Ok(mut slot) = registry.agent.write() {
            *slot = Some(a.agent.stats().clone());
        }
        Some(a)
    } else {
        None
    };
    let mut ignored_warning = String::new();
    life.set(
        Phase::WaitingForConsul,
        "watching the registration, leaf, roots and upstreams",
    );

    // --- wait for a complete snapshot ---------------------------------------------------------
    let mut complete_since: Option<Instant> = None;
    let mut last_problem = String::new();
    let desired = loop {
        match rx.recv_timeout(Duration::from_millis(100)) {
            Ok(Event::Consul(update)) => {
                absorb(
                    *update,
                    &mut watchers,
                    &mut snapshot,
                    authz.as_mut(),
                    &mut ignored_warning,
                );
            }
            Ok(Event::Signal(SIGTERM | SIGINT)) => {
                life.set(Phase::Stopped, "stop signal while waiting for Consul");
                return Ok(0);
            }
            Ok(Event::Signal(SIGCHLD)) => {
                process::reap();
            }
            Ok(_) | Err(RecvTimeoutError::Timeout) => {}
            Err(RecvTimeoutError::Disconnected) => return Ok(0),
        }
        if !snapshot.is_complete() {
            continue;
        }
        let since = *complete_since.get_or_insert_with(Instant::now);
        if !snapshot.endpoints_known() && since.elapsed() < ENDPOINTS_GRACE {
            continue;
        }
        match model::build(&snapshot, &settings, None) {
            Ok(d) => break d,
            Err(e) => {
                let problem = e.to_string();
                if problem != last_problem {
                    log::error!("cannot configure HAProxy yet: {problem}");
                    last_problem = problem;
                }
            }
        }
    };

    // --- start HAProxy and the Dataplane API ---------------------------------------------------
    registry.publish(&desired);
    let creds = DataplaneCredentials::generate()?;
    for file in render::render(&desired, &creds, &templates)? {
        write_atomic(&file.path, file.contents.as_bytes())?;
    }
    if !templates.overridden.is_empty() {
        check_override(&opts, &paths, &templates)?;
    }
    let mut children: BTreeMap<i32, Child> = BTreeMap::new();
    let mut haproxy = start_haproxy(&opts, &paths, &mut children)?;
    let dataplane = start_dataplane(&opts, &paths, &creds, &reload_exe, &mut children)?;
    // Each child leads its own process group; what it forks stays in it, even once orphaned.
    let mut groups: Vec<i32> = children.keys().copied().collect();
    let mut crashes = Crashes::default();
    let mut restart_due: Vec<(Instant, &'static str)> = Vec::new();
    let mut applier = Some(Applier::start(
        desired.clone(),
        dataplane,
        creds.clone(),
        templates.clone(),
        {
            let tx = Mutex::new(tx.clone());
            move |o| {
                if let Ok(tx) = tx.lock() {
                    let _ = tx.send(Event::Applied(o));
                }
            }
        },
    )?);
    life.set(
        Phase::Ready,
        &format!(
            "HAProxy serves {} on {}:{} with {} upstream listener(s)",
            desired.service,
            desired.public.bind_address,
            desired.public.bind_port,
            desired.upstreams.len()
        ),
    );

    let mut stats_service: Option<String> = None;
    if let (true, Some(addr)) = (opts.stats_service_register, opts.stats_addr) {
        let reg_address = snapshot
            .registration
            .as_ref()
            .map(|r| r.address.clone())
            .unwrap_or_default();
        match stats_registration(&consul, &proxy_id, &desired, &reg_address, addr).and_then(
            |(id, body)| {
                let answer = consul.send("PUT", "/v1/agent/service/register", Some(&body))?;
                if answer.status == 200 {
                    Ok(id)
                } else {
                    Err(Error::msg(format!(
                        "status {}: {}",
                        answer.status,
                        answer.body.trim()
                    )))
                }
            },
        ) {
            Ok(id) => {
                log::info!("registered the stats endpoint in Consul as {id}");
                stats_service = Some(id);
            }
            Err(e) => log::error!("cannot register the stats endpoint in Consul: {e}"),
        }
    }

    // --- serve -----------------------------------------------------------------------------------
    let mut dirty_since: Option<(Instant, Instant)> = None;
    let mut last_submitted = desired;
    let mut drain_deadline: Option<Instant> = None;
    loop {
        let mut timeout = match (dirty_since, drain_deadline) {
            (Some((first, last)), _) => {
                let due = (last + DEBOUNCE).min(first + DEBOUNCE_MAX);
                due.saturating_duration_since(Instant::now())
            }
            (None, Some(d)) => d.saturating_duration_since(Instant::now()),
            (None, None) => Duration::from_secs(3600),
        };
        if let Some((due, _)) = restart_due.iter().min() {
            timeout = timeout.min(due.saturating_duration_since(Instant::now()));
        }
        let event = match rx.recv_timeout(timeout) {
            Ok(e) => Some(e),
            Err(RecvTimeoutError::Timeout) => None,
            Err(RecvTimeoutError::Disconnected) => break,
        };
        match event {
            Some(Event::Consul(update)) => {
                let changed = absorb(
                    *update,
                    &mut watchers,
                    &mut snapshot,
                    authz.as_mut(),
                    &mut ignored_warning,
                );
                if changed && life.phase == Phase::Ready {
                    let now = Instant::now();
                    dirty_since = Some((dirty_since.map_or(now, |(f, _)| f), now));
                }
            }
            Some(Event::Signal(SIGHUP)) if life.phase == Phase::Ready => {
                log::info!("SIGHUP: full reconcile with the current Consul state");
                match model::build(&snapshot, &settings, Some(&last_submitted)) {
                    Ok(d) => {
                        if let Some(a) = &applier {
                            a.reconcile(d.clone());
                        }
                        registry.publish(&d);
                        last_submitted = d;
                    }
                    Err(e) => log::error!("SIGHUP: cannot build the configuration: {e}"),
                }
            }
            Some(Event::Signal(SIGTERM | SIGINT)) => {
                if life.phase == Phase::Draining {
                    life.set(Phase::Draining, "second stop signal: fast stop");
                    log::warn!("second stop signal: stopping HAProxy now");
                    for c in children.values() {
                        c.signal(Signal::SIGTERM);
                    }
                } else {
                    life.set(Phase::Draining, "stop signal: finishing in-flight work");
                    if let Some(id) = stats_service.take() {
                        let path = format!(
                            "/v1/agent/service/deregister/{}",
                            crate::consul::encode(&id)
                        );
                        match consul.send("PUT", &path, None) {
                            Ok(a) if a.status == 200 => log::info!("deregistered {id} from Consul"),
                            Ok(a) => log::warn!("deregistering {id}: status {}", a.status),
                            Err(e) => log::warn!("deregistering {id}: {e}"),
                        }
                    }
                    if let Some(a) = applier.take() {
                        a.stop();
                    }
                    // SIGUSR1 is HAProxy's soft stop: listeners close, live connections finish.
                    haproxy.signal(Signal::SIGUSR1);
                    // The Dataplane API's whole group: a reload command it is running would
                    // otherwise wait for a verdict a stopping HAProxy never gives.
                    for c in children.values().filter(|c| c.pid != haproxy.pid) {
                        let _ = nix::sys::signal::killpg(
                            nix::unistd::Pid::from_raw(c.pid),
                            Signal::SIGTERM,
                        );
                    }
                    drain_deadline = Some(Instant::now() + opts.grace_period);
                }
            }
            Some(Event::Signal(SIGCHLD)) => {
                for exit in process::reap() {
                    let Some(child) = children.remove(&exit.pid) else {
                        continue;
                    };
                    if life.phase == Phase::Draining {
                        log::info!("{} (pid {}) {exit}", child.name, child.pid);
                        continue;
                    }
                    let Some(pause) = crashes.record() else {
                        log::error!(
                            "{} (pid {}) {exit} unexpectedly, crash {} within {}s: giving up",
                            child.name,
                            child.pid,
                            crashes.count(),
                            RESTART_WINDOW.as_secs()
                        );
                        stop_all(&mut children);
                        process::drain_orphans(&groups, Instant::now() + Duration::from_secs(5));
                        life.set(Phase::Stopped, &format!("{} keeps dying", child.name));
                        return Ok(exit_code(&exit));
                    };
                    log::error!(
                        "{} (pid {}) {exit} unexpectedly; restarting it in {} ms ({} of {} restarts allowed within {}s)",
                        child.name,
                        child.pid,
                        pause.as_millis(),
                        crashes.count(),
                        RESTART_BUDGET,
                        RESTART_WINDOW.as_secs()
                    );
                    registry.restart(child.name);
                    restart_due.push((Instant::now() + pause, child.name));
                }
                if life.phase == Phase::Draining && children.is_empty() {
                    break;
                }
            }
            Some(Event::Applied(Outcome::Applied {
                ops,
                reloaded,
                took,
            })) => {
                registry.applied(true, took);
                log::info!(
                    "{ops} change(s) applied in {} ms{}",
                    took.as_millis(),
                    if reloaded { " (HAProxy reloaded)" } else { "" }
                )
            }
            Some(Event::Applied(Outcome::Failed(e))) => {
                registry.applied(false, Duration::ZERO);
                log::error!("{e}; HAProxy keeps its last good configuration, retrying")
            }
            Some(Event::Signal(_)) => {}
            None => {}
        }
        if life.phase == Phase::Ready {
            let now = Instant::now();
            let (due, later): (Vec<_>, Vec<_>) =
                restart_due.drain(..).partition(|(t, _)| *t <= now);
            restart_due = later;
            for (_, name) in due {
                // The file on disk is the last applied state (the Dataplane API keeps it in step,
                // certificates are written before HAProxy hears of them), so a restarted HAProxy
                // serves exactly what was served before it died.
                let restarted = if name == "haproxy" {
                    start_haproxy(&opts, &paths, &mut children).map(|c| {
                        haproxy = c;
                    })
                } else {
                    start_dataplane(&opts, &paths, &creds, &reload_exe, &mut children).map(|_| ())
                };
                match restarted {
                    Ok(()) => {
                        groups = children.keys().copied().collect();
                        log::info!("{name} restarted; serving the last applied state");
                    }
                    Err(f) => {
                        // Dying while starting is one more crash: same backoff, same budget.
                        let Some(pause) = crashes.record() else {
                            log::error!(
                                "restarting {name}: {}; crash {} within {}s: giving up",
                                f.error,
                                crashes.count(),
                                RESTART_WINDOW.as_secs()
                            );
                            stop_all(&mut children);
                            process::drain_orphans(
                                &groups,
                                Instant::now() + Duration::from_secs(5),
                            );
                            life.set(Phase::Stopped, &format!("{name} could not be restarted"));
                            return Ok(f.code);
                        };
                        log::error!(
                            "restarting {name}: {}; trying again in {} ms",
                            f.error,
                            pause.as_millis()
                        );
                        restart_due.push((Instant::now() + pause, name));
                    }
                }
            }
        }
        if let Some(deadline) = drain_deadline {
            if Instant::now() >= deadline && !children.is_empty() {
                log::warn!(
                    "drain grace of {:?} is over; stopping what is left",
                    opts.grace_period
                );
                stop_all(&mut children);
                break;
            }
        }
        if let Some((first, last)) = dirty_since {
            let now = Instant::now();
            if now >= last + DEBOUNCE || now >= first + DEBOUNCE_MAX {
                dirty_since = None;
                match model::build(&snapshot, &settings, Some(&last_submitted)) {
                    Ok(d) if d != last_submitted => {
                        if let Some(a) = &applier {
                            a.submit(d.clone());
                        }
                        registry.publish(&d);
                        last_submitted = d;
                    }
                    Ok(_) => log::debug!("Consul changed nothing HAProxy serves"),
                    Err(e) => log::error!(
                        "ignoring a Consul state HAProxy cannot be given ({e}); the last good configuration keeps serving"
                    ),
                }
            }
        }
    }
    process::drain_orphans(
        &groups,
        drain_deadline.unwrap_or_else(Instant::now) + Duration::from_secs(1),
    );
    // The agent goes last: HAProxy asked it until its last connection was done.
    drop(authz);
    life.set(Phase::Stopped, "all children stopped");
    Ok(0)
}

/// Logs, once per change, the denials Consul holds that this sidecar does not enforce.
fn warn_ignored(snapshot: &Snapshot, last: &mut String) {
    if let Some(warning) = crate::intentions::ignored_denials(snapshot) {
        if warning != *last {
            if !warning.is_empty() {
                log::warn!("{warning}");
            }
            *last = warning;
        }
    }
}

/// The intentions agent and the inputs its table was last built from.
struct Authz {
    agent: crate::spoe::server::AgentHandle,
    table: crate::spoe::server::SharedTable,
    built_from: Option<AuthzInputs>,
}

/// Intentions, ACL default policy, roots, and the service with its listener mode (an L7
/// denial's reason depends on the mode).
type AuthzInputs = (
    Option<Vec<crate::consul::api::IntentionEntry>>,
    Option<String>,
    Option<crate::consul::api::CaRoots>,
    Option<(String, crate::model::Mode)>,
);

impl Authz {
    fn start(paths: &Paths, threads: usize) -> Result<Authz, Fatal> {
        use crate::spoe::authz::AuthzTable;
        use crate::spoe::server::{spawn, AgentConfig, SharedTable};
        let table = SharedTable::new(AuthzTable::deny_all("intentions not known yet"));
        let agent = spawn(
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
        Ok(Authz {
            agent,
            table,
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
        let unchanged = self.built_from.as_ref().is_some_and(|(i, d, r, s)| {
            *i == snapshot.intentions
                && *d == snapshot.acl_default_policy
                && *r == snapshot.roots
                && *s == service
        });
        if unchanged {
            return;
        }
        let inputs: AuthzInputs = (
            snapshot.intentions.clone(),
            snapshot.acl_default_policy.clone(),
            snapshot.roots.clone(),
            service,
        );
        let table = crate::intentions::table(snapshot);
        log::info!(
            "intentions table updated: {} intention(s) for this service [{}], default {}",
            table.intentions().len(),
            crate::intentions::summary(table.intentions()),
            table.default_policy()
        );
        self.table.replace(table);
        self.built_from = Some(inputs);
    }
}

impl Drop for Authz {
    fn drop(&mut self) {
        self.agent.shutdown();
        let stats = self.agent.stats();
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

/// Merges one Consul update; says whether anything the sidecar acts on changed. The intentions
/// agent's table (or, with enforcement off, the warning about ignored denials) follows at once.
fn absorb(
    update: Update,
    watchers: &mut Watchers,
    snapshot: &mut Snapshot,
    authz: Option<&mut Authz>,
    ignored_warning: &mut String,
) -> bool {
    if let Update::Registration(reg) = &update {
        watchers.follow(reg);
    }
    if !snapshot.apply(update) {
        return false;
    }
    match authz {
        Some(a) => a.refresh(snapshot),
        None => warn_ignored(snapshot, ignored_warning),
    }
    true
}

/// Crashes of children within the restart window.
#[derive(Default)]
struct Crashes(Vec<Instant>);

impl Crashes {
    /// Records a crash: the pause before the restart, or `None` once over the budget.
    fn record(&mut self) -> Option<Duration> {
        let now = Instant::now();
        self.0.retain(|t| now.duration_since(*t) < RESTART_WINDOW);
        self.0.push(now);
        (self.0.len() <= RESTART_BUDGET).then(|| {
            RESTART_BACKOFF_MIN
                .saturating_mul(1 << (self.0.len() - 1))
                .min(RESTART_BACKOFF_MAX)
        })
    }

    fn count(&self) -> usize {
        self.0.len()
    }
}

fn load_templates(opts: &Options) -> Result<render::Templates, Fatal> {
    match &opts.template_dir {
        Some(dir) => {
            let t = render::Templates::load(dir).map_err(usage)?;
            log::info!("templates overridden by {}", t.overridden_list());
            Ok(t)
        }
        None => Ok(render::Templates::builtin()),
    }
}

/// An operator's templates must give a configuration HAProxy accepts before HAProxy sees it.
fn check_override(
    opts: &Options,
    paths: &Paths,
    templates: &render::Templates,
) -> Result<(), Fatal> {
    let out = process::clean_command(&opts.haproxy_bin)
        .args(["-W", "-c", "-f"])
        .arg(&paths.haproxy_cfg)
        .output()
        .map_err(|e| Error::with_source("running haproxy -c on the overridden templates", e))?;
    if out.status.success() {
        return Ok(());
    }
    let why: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains("ALERT"))
        .map(|l| l.trim().to_string())
        .collect();
    Err(usage(Error::msg(format!(
        "the configuration rendered from {} is refused by haproxy -c: {}",
        templates.overridden_list(),
        why.join(" | ")
    ))))
}

fn exit_code(exit: &Exit) -> i32 {
    // A child that ended with 0 still ended the run unexpectedly: never report success for it.
    if exit.code == 0 {
        1
    } else {
        exit.code
    }
}

/// Stops every child: SIGTERM, then SIGKILL for what is left after 5 seconds, reaping all.
fn stop_all(children: &mut BTreeMap<i32, Child>) {
    for c in children.values() {
        c.signal(Signal::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while !children.is_empty() && Instant::now() < deadline {
        for exit in process::reap() {
            children.remove(&exit.pid);
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    for c in children.values() {
        c.signal(Signal::SIGKILL);
        // The group takes HAProxy's workers too.
        let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(c.pid), Signal::SIGKILL);
    }
    let deadline = Instant::now() + Duration::from_secs(2);
    while !children.is_empty() && Instant::now() < deadline {
        for exit in process::reap() {
            children.remove(&exit.pid);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Polls `probe` until it answers, failing early if one of our children dies meanwhile.
fn wait_ready<T>(
    what: &str,
    children: &mut BTreeMap<i32, Child>,
    mut probe: impl FnMut() -> Result<T>,
) -> Result<T, Fatal> {
    let deadline = Instant::now() + CHILD_READY_TIMEOUT;
    loop {
        for exit in process::reap() {
            if let Some(c) = children.remove(&exit.pid) {
                stop_all(children);
                return Err(Fatal {
                    code: exit_code(&exit),
                    error: Error::msg(format!(
                        "{} (pid {}) {exit} while waiting for {what}; its output is above",
                        c.name, c.pid
                    )),
                });
            }
        }
        match probe() {
            Ok(v) => return Ok(v),
            Err(e) if Instant::now() >= deadline => {
                stop_all(children);
                return Err(e
                    .context(format!(
                        "{what} not ready after {}s",
                        CHILD_READY_TIMEOUT.as_secs()
                    ))
                    .into());
            }
            Err(_) => std::thread::sleep(Duration::from_millis(50)),
        }
    }
}

fn start_haproxy(
    opts: &Options,
    paths: &Paths,
    children: &mut BTreeMap<i32, Child>,
) -> Result<Child, Fatal> {
    let args = vec![
        "-W".to_string(),
        "-db".into(),
        "-S".into(),
        format!("{},mode,600", paths.master_socket.display()),
        "-f".into(),
        paths.haproxy_cfg.display().to_string(),
    ];
    let child = process::spawn("haproxy", &opts.haproxy_bin, &args, &[], "haproxy")?;
    children.insert(child.pid, child.clone());
    wait_ready("HAProxy", children, || {
        runtime::wait_ready(&paths.master_socket, Duration::from_millis(1))
    })?;
    Ok(child)
}

/// The Dataplane API's Go runtime settings. It allocates only while applying a change, so a
/// tighter GC target (`GOGC=50`) keeps it at 30 MB of RSS instead of 32 (v1.2.5, same config
/// and API calls) with no idle CPU. A soft heap limit saved more (27 MB at `GOMEMLIMIT=16MiB`)
/// but made its idle garbage collector burn 1% of a core, measured with
/// `BENCH_BREAKDOWN=1 scripts/bench`. An operator's own `GOMEMLIMIT` or `GOGC` in the
/// sidecar's environment (which no Rust code reads) is passed on instead.
fn dataplane_env(var: impl Fn(&str) -> Option<String>) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = ["GOMEMLIMIT", "GOGC"]
        .into_iter()
        .filter_map(|k| var(k).map(|v| (k.to_owned(), v)))
        .collect();
    if env.is_empty() {
        env.push(("GOGC".into(), "50".into()));
    }
    env
}

fn start_dataplane(
    opts: &Options,
    paths: &Paths,
    creds: &DataplaneCredentials,
    reload_exe: &Path,
    children: &mut BTreeMap<i32, Child>,
) -> Result<Dataplane, Fatal> {
    let reload = format!(
        "{} {} {}",
        reload_exe.display(),
        crate::RELOAD_SUBCOMMAND,
        paths.master_socket.display()
    );
    let level = match opts.log_level {
        log::LevelFilter::Trace | log::LevelFilter::Debug => "info",
        _ => "warning",
    };
    let args = vec![
        "--scheme".to_string(),
        "unix".into(),
        "--socket-path".into(),
        paths.dataplane_socket.display().to_string(),
        "--config-file".into(),
        paths.haproxy_cfg.display().to_string(),
        "--userlist".into(),
        render::DATAPLANE_USERLIST.into(),
        "--haproxy-bin".into(),
        opts.haproxy_bin.display().to_string(),
        "--reload-cmd".into(),
        reload.clone(),
        "--restart-cmd".into(),
        reload,
        "--reload-delay".into(),
        "1".into(),
        "--transaction-dir".into(),
        paths.transactions.display().to_string(),
        "--log-to".into(),
        "stdout".into(),
        "--log-level".into(),
        level.into(),
    ];
    // A killed predecessor leaves its socket file behind, and the API refuses to bind over it.
    match std::fs::remove_file(&paths.dataplane_socket) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            return Err(Error::with_source(
                format!(
                    "removing the stale socket {}",
                    paths.dataplane_socket.display()
                ),
                e,
            )
            .into())
        }
    }
    let child = process::spawn(
        "dataplaneapi",
        &opts.dataplane_bin,
        &args,
        &dataplane_env(|k| std::env::var(k).ok()),
        "dataplaneapi",
    )?;
    children.insert(child.pid, child);
    let dataplane = Dataplane::new(&paths.dataplane_socket, creds)?;
    wait_ready("the Dataplane API", children, || dataplane.version())?;
    Ok(dataplane)
}

/// Builds the desired state once, from one-shot reads, for `--dry-run`.
pub fn dry_run(opts: &Options) -> Result<Vec<render::File>, Fatal> {
    let consul = Consul::new(&opts.consul).map_err(usage)?;
    let templates = load_templates(opts)?;
    let proxy_id = match consul.find_proxy(&opts.target) {
        Ok(id) => id,
        Err(LookupError::Consul(e)) => return Err(e.into()),
        Err(e) => return Err(usage(Error::msg(e.to_string()))),
    };
    let mut snapshot = Snapshot::default();
    let reg: crate::consul::api::AgentService =
        consul.get_json(&crate::consul::client::registration_path(&proxy_id))?;
    for key in crate::consul::watch::destinations(&reg) {
        let dc = if key.datacenter.is_empty() {
            String::new()
        } else {
            format!("&dc={}", crate::consul::encode(&key.datacenter))
        };
        let entries = match key.kind {
            crate::consul::DestinationKind::Service => consul.get_json(&format!(
                "/v1/health/connect/{}?passing=1{dc}",
                crate::consul::encode(&key.name)
            ))?,
            crate::consul::DestinationKind::PreparedQuery => {
                consul
                    .get_json::<crate::consul::api::QueryResult>(&format!(
                        "/v1/query/{}/execute?connect=true{dc}",
                        crate::consul::encode(&key.name)
                    ))?
                    .nodes
            }
        };
        snapshot.apply(Update::Endpoints(key, entries));
    }
    let service = reg
        .proxy
        .as_ref()
        .map(|p| p.destination_service_name.clone())
        .unwrap_or_default();
    snapshot.apply(Update::Registration(reg));
    snapshot.apply(Update::Leaf(consul.get_json(&format!(
        "/v1/agent/connect/ca/leaf/{}",
        crate::consul::encode(&service)
    ))?));
    snapshot.apply(Update::Roots(
        consul.get_json("/v1/agent/connect/ca/roots")?,
    ));
    let workdir = opts
        .base_path
        .join(format!("hcc-{}-dry-run", model::sanitize(&proxy_id)));
    let settings = settings_from(opts, Paths::new(&workdir))?;
    let desired: Desired = model::build(&snapshot, &settings, None)?;
    Ok(render::render(
        &desired,
        &DataplaneCredentials::generate()?,
        &templates,
    )?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dataplane_gets_a_gc_target_unless_the_operator_set_one() {
        let pairs = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        };
        assert_eq!(dataplane_env(|_| None), pairs(&[("GOGC", "50")]));
        assert_eq!(
            dataplane_env(|k| (k == "GOGC").then(|| "off".to_string())),
            pairs(&[("GOGC", "off")])
        );
        assert_eq!(
            dataplane_env(|k| Some(format!("{k}-value"))),
            pairs(&[("GOMEMLIMIT", "GOMEMLIMIT-value"), ("GOGC", "GOGC-value")])
        );
    }
}
