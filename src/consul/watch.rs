//! Blocking-query watchers, one OS thread each. A watcher sends an `Update` only when the content
//! it watches really changed (an index that moved over the same content sends nothing), survives
//! an unreachable agent by backing off with jitter, and follows Consul's index rules: an index
//! that goes backwards resets to 0, and an index of 0 after the first answer is clamped to 1.
//! Which watches run is the caller's (`Watchers::follow` takes the wanted set); what each reads
//! is its kind's (`kinds`).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::api::JwtProviders;
use super::client::Consul;
use super::kinds::{Call, How, Spec, Watch, WatchMode};
use super::{DestinationKind, Update};
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

/// The watchers of one sidecar: one thread per wanted watch, started and stopped as the wanted
/// set changes, and the fetchers of the remote JWKS the `jwt-provider` entries name.
pub struct Watchers {
    consul: Consul,
    sink: Arc<dyn Sink>,
    timing: Timing,
    running: BTreeMap<Watch, WatchHandle>,
    jwks: super::jwks::Fetchers,
}

impl Watchers {
    /// Watchers that watch nothing until `follow` says what.
    pub fn start(consul: Consul, sink: Arc<dyn Sink>, timing: Timing) -> Self {
        Watchers {
            consul,
            sink,
            timing,
            running: BTreeMap::new(),
            jwks: super::jwks::Fetchers::default(),
        }
    }

    /// Brings the running watches in line with `wanted`: those no longer wanted stop at their
    /// next return, the new ones start. A watch that ended by itself (read once, or a kind the
    /// agent does not have) stays counted as running, so it is not started again.
    pub fn follow(&mut self, wanted: &BTreeSet<Watch>) {
        self.running.retain(|w, _| wanted.contains(w));
        for w in wanted {
            if !self.running.contains_key(w) {
                let h = self.spawn(w);
                self.running.insert(w.clone(), h);
            }
        }
    }

    /// Starts a fetcher for each remote JWKS the `jwt-provider` entries name, and stops those
    /// they no longer name.
    pub fn follow_jwt_providers(&mut self, providers: &JwtProviders) {
        self.jwks.follow(&providers.entries, &self.sink);
    }

    fn spawn(&self, watch: &Watch) -> WatchHandle {
        let Spec { what, how } = watch.spec(
            &self.consul,
            self.timing.query_poll,
            self.timing.checks_poll,
        );
        let (path, mode, unknown) = match &how {
            How::Get {
                path,
                mode,
                unknown,
                ..
            } => (path.clone(), *mode, *unknown),
            // A call reads no path itself: `path` only names its failures, and `mode` is unused.
            How::Call { path, .. } => (path.to_string(), WatchMode::Index, None),
        };
        if let (Watch::Instances(key, _), WatchMode::Poll(every)) = (watch, mode) {
            if key.kind == DestinationKind::PreparedQuery {
                // Once per start: a new poll_interval restarts the watch, and says so.
                log::info!("polling {key} every {} ms", every.as_millis());
            }
        }
        let stop = Arc::new(AtomicBool::new(false));
        let runner = Runner {
            consul: self.consul.clone(),
            sink: self.sink.clone(),
            timing: self.timing,
            what,
            path: path.clone(),
            mode,
            unknown,
            stop: stop.clone(),
        };
        let body: Box<dyn FnOnce() + Send> = match how {
            How::Get { parse, .. } => Box::new(move || runner.run(parse)),
            How::Call { every, read, .. } => Box::new(move || runner.call(every, read)),
        };
        let name = format!("watch {path}");
        let spawned = std::thread::Builder::new()
            .name(name.chars().take(15).collect())
            .stack_size(256 * 1024)
            .spawn(body);
        if let Err(e) = spawned {
            log::error!("cannot start a watcher thread for {name}: {e}");
        }
        WatchHandle { stop }
    }
}

/// One watch's thread.
struct Runner {
    consul: Consul,
    sink: Arc<dyn Sink>,
    timing: Timing,
    what: String,
    path: String,
    mode: WatchMode,
    /// See `How::Get`.
    unknown: Option<&'static str>,
    stop: Arc<AtomicBool>,
}

impl Runner {
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
                let delay = self.timing.backoff(failures);
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

    /// Runs `read` until it succeeds, then again every `every` (or never): a change is sent,
    /// a failure backs off and is logged when its text is new.
    fn call(self, every: Option<Duration>, read: Call) {
        let mut failures: u32 = 0;
        let mut last: Option<String> = None;
        let mut last_error = String::new();
        while !self.stopped() {
            let pause = match read(&self.consul) {
                Ok(update) => {
                    failures = 0;
                    let Some(update) = update else { return };
                    // Updates are not comparable; their printed form is, and is small here.
                    let seen = format!("{update:?}");
                    if last.as_ref() != Some(&seen) {
                        last = Some(seen);
                        self.sink.update(update);
                    }
                    match every {
                        Some(every) => every,
                        None => return,
                    }
                }
                Err(e) => {
                    failures = failures.saturating_add(1);
                    let e = e.to_string();
                    if e != last_error {
                        log::warn!("cannot learn {}: {e}", self.what);
                        last_error = e;
                    }
                    self.sink.watch_error(&self.path);
                    self.timing.backoff(failures)
                }
            };
            self.pause(pause);
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

impl Timing {
    /// The crate's retry schedule (`crate::backoff::jittered`) between this timing's bounds.
    pub fn backoff(&self, failures: u32) -> Duration {
        crate::backoff::jittered(self.backoff_min, self.backoff_max, failures)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Nowhere;

    impl Sink for Nowhere {
        fn update(&self, _: Update) {}
    }

    /// The running watches are the wanted set: one no longer wanted is stopped (its thread
    /// ends at its next return), a new one is started, one still wanted keeps its thread.
    #[test]
    fn the_running_watches_follow_the_wanted_set() {
        let settings = crate::config::ConsulSettings {
            // Nothing answers: the threads back off until stopped.
            endpoints: vec![crate::config::Endpoint::parse("127.0.0.1:9").unwrap()],
            token: None,
            tls: crate::config::TlsFiles::default(),
            catalog_node: None,
            login: None,
        };
        let consul = Consul::new(&settings).unwrap();
        let mut w = Watchers::start(consul, Arc::new(Nowhere), Timing::default());
        w.follow(&BTreeSet::from([Watch::Roots, Watch::Mesh]));
        let roots = w.running[&Watch::Roots].stop.clone();
        let mesh = w.running[&Watch::Mesh].stop.clone();
        w.follow(&BTreeSet::from([Watch::Roots, Watch::Intentions]));
        let running: Vec<&Watch> = w.running.keys().collect();
        assert_eq!(running, [&Watch::Roots, &Watch::Intentions]);
        assert!(mesh.load(Ordering::SeqCst), "no longer wanted: stopped");
        assert!(
            Arc::ptr_eq(&w.running[&Watch::Roots].stop, &roots) && !roots.load(Ordering::SeqCst),
            "still wanted: the same thread, running"
        );
        drop(w);
        assert!(roots.load(Ordering::SeqCst), "dropped watchers stop theirs");
    }

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
    fn the_timing_backs_off_between_its_bounds() {
        let t = Timing::default();
        assert!(t.backoff(1) <= t.backoff_min && t.backoff(1) >= t.backoff_min / 2);
        assert!(t.backoff(30) <= t.backoff_max && t.backoff(30) >= t.backoff_max / 2);
    }
}
