//! The two children, `haproxy` and `dataplaneapi`: how each is started and found ready, how a
//! crashed one is restarted (backoff and budget), and how all are stopped.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;

use super::process::{self, Child, Exit};
use super::Fatal;
use crate::error::{Error, Result};
use crate::haproxy::dataplane::Dataplane;
use crate::haproxy::runtime;
use crate::model::Paths;
use crate::render::{self, DataplaneCredentials};

const CHILD_READY_TIMEOUT: Duration = Duration::from_secs(30);
/// A crashed child is restarted after a pause that starts here and doubles...
const RESTART_BACKOFF_MIN: Duration = Duration::from_millis(200);
/// ...up to this;
const RESTART_BACKOFF_MAX: Duration = Duration::from_secs(5);
/// and after this many crashes within `RESTART_WINDOW` the supervisor gives up and exits with
/// the child's code: a child that cannot stay up is a problem restarts will not solve.
pub const RESTART_BUDGET: usize = 5;
pub const RESTART_WINDOW: Duration = Duration::from_secs(60);

/// What starting a child needs, fixed for the whole run.
pub struct Launch {
    pub haproxy_bin: PathBuf,
    pub dataplane_bin: PathBuf,
    pub log_level: log::LevelFilter,
    pub paths: Paths,
    pub creds: DataplaneCredentials,
    /// This executable: the Dataplane API's reload command runs it.
    pub reload_exe: PathBuf,
}

/// The running children, by PID, and what is due to be restarted.
pub struct Children {
    launch: Launch,
    by_pid: BTreeMap<i32, Child>,
    haproxy: Option<Child>,
    /// Each child leads its own process group; what it forks stays in it, even once orphaned.
    groups: Vec<i32>,
    crashes: Crashes,
    restart_due: Vec<(Instant, &'static str)>,
}

/// What a reaped child's end means for the run.
pub enum Ended {
    /// Not one of ours (an adopted orphan), or ours while draining.
    Expected,
    /// Restart of this child scheduled.
    Restarting(&'static str),
    /// This child is over the restart budget: the run ends with this code.
    GiveUp(&'static str, i32),
}

impl Children {
    pub fn new(launch: Launch) -> Children {
        Children {
            launch,
            by_pid: BTreeMap::new(),
            haproxy: None,
            groups: Vec::new(),
            crashes: Crashes::default(),
            restart_due: Vec::new(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.by_pid.is_empty()
    }

    /// Starts HAProxy (master-worker) on the rendered file and waits for its master CLI.
    pub fn start_haproxy(&mut self) -> Result<(), Fatal> {
        let paths = &self.launch.paths;
        let args = vec![
            "-W".to_string(),
            "-db".into(),
            "-S".into(),
            format!("{},mode,600", paths.master_socket.display()),
            "-f".into(),
            paths.haproxy_cfg.display().to_string(),
        ];
        let child = process::spawn("haproxy", &self.launch.haproxy_bin, &args, &[], "haproxy")?;
        self.by_pid.insert(child.pid, child.clone());
        let master = paths.master_socket.clone();
        self.wait_ready("HAProxy", || {
            runtime::wait_ready(&master, Duration::from_millis(1))
        })?;
        self.haproxy = Some(child);
        self.groups = self.by_pid.keys().copied().collect();
        Ok(())
    }

    /// Starts the Dataplane API on HAProxy's file and returns a client once it answers.
    pub fn start_dataplane(&mut self) -> Result<Dataplane, Fatal> {
        let l = &self.launch;
        let paths = &l.paths;
        let reload = format!(
            "{} {} {}",
            l.reload_exe.display(),
            crate::RELOAD_SUBCOMMAND,
            paths.master_socket.display()
        );
        let level = match l.log_level {
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
            l.haproxy_bin.display().to_string(),
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
            &l.dataplane_bin,
            &args,
            &dataplane_env(|k| std::env::var(k).ok()),
            "dataplaneapi",
        )?;
        self.by_pid.insert(child.pid, child);
        let dataplane = Dataplane::new(&paths.dataplane_socket, &l.creds)?;
        self.wait_ready("the Dataplane API", || dataplane.version())?;
        self.groups = self.by_pid.keys().copied().collect();
        Ok(dataplane)
    }

    /// Polls `probe` until it answers, failing early if one of our children dies meanwhile.
    fn wait_ready<T>(
        &mut self,
        what: &str,
        mut probe: impl FnMut() -> Result<T>,
    ) -> Result<T, Fatal> {
        let deadline = Instant::now() + CHILD_READY_TIMEOUT;
        loop {
            for exit in process::reap() {
                if let Some(c) = self.by_pid.remove(&exit.pid) {
                    self.stop_all();
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
                    self.stop_all();
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

    /// Judges a reaped process: an orphan, a child ending during a drain, or a crash to restart
    /// (or give up on, over the budget).
    pub fn ended(&mut self, exit: &Exit, draining: bool) -> Ended {
        let Some(child) = self.by_pid.remove(&exit.pid) else {
            return Ended::Expected;
        };
        if draining {
            log::info!("{} (pid {}) {exit}", child.name, child.pid);
            return Ended::Expected;
        }
        let Some(pause) = self.crashes.record() else {
            log::error!(
                "{} (pid {}) {exit} unexpectedly, crash {} within {}s: giving up",
                child.name,
                child.pid,
                self.crashes.count(),
                RESTART_WINDOW.as_secs()
            );
            self.give_up();
            return Ended::GiveUp(child.name, exit_code(exit));
        };
        log::error!(
            "{} (pid {}) {exit} unexpectedly; restarting it in {} ms ({} of {RESTART_BUDGET} restarts allowed within {}s)",
            child.name,
            child.pid,
            pause.as_millis(),
            self.crashes.count(),
            RESTART_WINDOW.as_secs()
        );
        self.restart_due.push((Instant::now() + pause, child.name));
        Ended::Restarting(child.name)
    }

    /// When the next restart is due, if one is.
    pub fn next_restart(&self) -> Option<Instant> {
        self.restart_due.iter().map(|(t, _)| *t).min()
    }

    /// Restarts what is due. The file on disk is the last applied state (the Dataplane API keeps
    /// it in step, certificates are written before HAProxy hears of them), so a restarted
    /// HAProxy serves exactly what was served before it died. `Err` names the child whose
    /// restart failed over the budget, with the run's exit code.
    pub fn restart_due(&mut self) -> Result<(), (&'static str, i32)> {
        let now = Instant::now();
        let (due, later): (Vec<_>, Vec<_>) =
            self.restart_due.drain(..).partition(|(t, _)| *t <= now);
        self.restart_due = later;
        for (_, name) in due {
            let result = if name == "haproxy" {
                self.start_haproxy()
            } else {
                self.start_dataplane().map(|_| ())
            };
            match result {
                Ok(()) => {
                    log::info!("{name} restarted; serving the last applied state");
                }
                Err(f) => {
                    // Dying while starting is one more crash: same backoff, same budget.
                    let Some(pause) = self.crashes.record() else {
                        log::error!(
                            "restarting {name}: {}; crash {} within {}s: giving up",
                            f.error,
                            self.crashes.count(),
                            RESTART_WINDOW.as_secs()
                        );
                        self.give_up();
                        return Err((name, f.code));
                    };
                    log::error!(
                        "restarting {name}: {}; trying again in {} ms",
                        f.error,
                        pause.as_millis()
                    );
                    self.restart_due.push((Instant::now() + pause, name));
                }
            }
        }
        Ok(())
    }

    fn give_up(&mut self) {
        self.stop_all();
        self.drain_orphans(Instant::now() + Duration::from_secs(5));
    }

    /// The start of a drain: HAProxy soft-stops (listeners close, live connections finish) and
    /// the Dataplane API's whole group stops, since a reload command it is running would
    /// otherwise wait for a verdict a stopping HAProxy never gives.
    pub fn soft_stop(&self) {
        if let Some(h) = &self.haproxy {
            h.signal(Signal::SIGUSR1);
        }
        let haproxy_pid = self.haproxy.as_ref().map(|h| h.pid);
        for c in self.by_pid.values().filter(|c| Some(c.pid) != haproxy_pid) {
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(c.pid), Signal::SIGTERM);
        }
    }

    /// A second stop signal: everything is told to stop now.
    pub fn terminate(&self) {
        for c in self.by_pid.values() {
            c.signal(Signal::SIGTERM);
        }
    }

    /// Stops every child: SIGTERM, then SIGKILL for what is left after 5 seconds, reaping all.
    pub fn stop_all(&mut self) {
        self.terminate();
        let deadline = Instant::now() + Duration::from_secs(5);
        while !self.by_pid.is_empty() && Instant::now() < deadline {
            for exit in process::reap() {
                self.by_pid.remove(&exit.pid);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for c in self.by_pid.values() {
            c.signal(Signal::SIGKILL);
            // The group takes HAProxy's workers too.
            let _ = nix::sys::signal::killpg(nix::unistd::Pid::from_raw(c.pid), Signal::SIGKILL);
        }
        let deadline = Instant::now() + Duration::from_secs(2);
        while !self.by_pid.is_empty() && Instant::now() < deadline {
            for exit in process::reap() {
                self.by_pid.remove(&exit.pid);
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for what the children's process groups left behind (old HAProxy workers).
    pub fn drain_orphans(&self, deadline: Instant) {
        process::drain_orphans(&self.groups, deadline);
    }
}

/// Has HAProxy check a configuration file (`haproxy -c`); the error holds its alerts.
pub fn check_config(haproxy_bin: &std::path::Path, cfg: &std::path::Path) -> Result<()> {
    let out = process::clean_command(haproxy_bin)
        .args(["-W", "-c", "-f"])
        .arg(cfg)
        .output()
        .map_err(|e| Error::with_source(format!("running {} -c", haproxy_bin.display()), e))?;
    if out.status.success() {
        return Ok(());
    }
    let why: Vec<String> = String::from_utf8_lossy(&out.stderr)
        .lines()
        .chain(String::from_utf8_lossy(&out.stdout).lines())
        .filter(|l| l.contains("ALERT"))
        .map(|l| l.trim().to_string())
        .collect();
    Err(Error::msg(why.join(" | ")))
}

/// The run's exit code for a child's end. A child that ended with 0 still ended the run
/// unexpectedly: never report success for it.
pub fn exit_code(exit: &Exit) -> i32 {
    if exit.code == 0 {
        1
    } else {
        exit.code
    }
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
        let crashes = u32::try_from(self.0.len()).unwrap_or(u32::MAX);
        (self.0.len() <= RESTART_BUDGET)
            .then(|| crate::backoff::exponential(RESTART_BACKOFF_MIN, RESTART_BACKOFF_MAX, crashes))
    }

    fn count(&self) -> usize {
        self.0.len()
    }
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

    #[test]
    fn crashes_back_off_and_run_out() {
        let mut c = Crashes::default();
        let pauses: Vec<Option<Duration>> = (0..=RESTART_BUDGET).map(|_| c.record()).collect();
        assert_eq!(pauses[0], Some(RESTART_BACKOFF_MIN));
        assert_eq!(pauses[1], Some(RESTART_BACKOFF_MIN * 2));
        assert!(pauses[..RESTART_BUDGET].iter().all(Option::is_some));
        assert_eq!(pauses[RESTART_BUDGET], None, "over the budget");
    }
}
