//! Spawning the children (haproxy, dataplaneapi) and reaping them. Children get a clean
//! environment (no ACL token, no HAPROXY_* variables), their own process group (so a terminal's
//! Ctrl-C reaches only the supervisor, which then drains them in order) and a parent-death
//! signal (so none outlives a killed supervisor). Their output is forwarded to our log, tagged.

use std::io::{BufRead, BufReader, Read};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::sys::signal::{kill, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;

use crate::error::{Context, Result};

/// A running child, known by PID only: reaping is done for every child at once by `reap`.
#[derive(Debug, Clone)]
pub struct Child {
    pub name: &'static str,
    pub pid: i32,
}

impl Child {
    pub fn signal(&self, sig: Signal) {
        if let Err(e) = kill(Pid::from_raw(self.pid), sig) {
            log::debug!("{} {} {sig}: {e}", self.name, self.pid);
        }
    }
}

/// How a process ended, as an exit code for our own exit: its code, or 128+signal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exit {
    pub pid: i32,
    pub code: i32,
    pub signal: Option<i32>,
}

impl std::fmt::Display for Exit {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.signal {
            Some(s) => write!(f, "killed by signal {s}"),
            None => write!(f, "exited with code {}", self.code),
        }
    }
}

/// A command for one of our programs with nothing of our environment but `PATH`: no token, no
/// `HAPROXY_*` a parent HAProxy may have set.
pub fn clean_command(program: &Path) -> Command {
    let mut cmd = Command::new(program);
    cmd.env_clear().env(
        "PATH",
        std::env::var_os("PATH").unwrap_or_else(|| {
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into()
        }),
    );
    cmd
}

pub fn spawn(
    name: &'static str,
    program: &Path,
    args: &[String],
    env: &[(String, String)],
    log_target: &'static str,
) -> Result<Child> {
    let mut cmd = clean_command(program);
    cmd.args(args)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    // SAFETY: only async-signal-safe calls between fork and exec (prctl via nix).
    unsafe {
        cmd.pre_exec(|| {
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM).map_err(std::io::Error::from)
        });
    }
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {name} ({})", program.display()))?;
    let pid = child.id() as i32;
    if let Some(out) = child.stdout.take() {
        forward(out, name, log_target, |_| false);
    }
    if let Some(err) = child.stderr.take() {
        // HAProxy writes its runtime events both to stderr and to its log (stdout), where they
        // carry their real severity and follow -log-level: print them once, from the log.
        let skip = if name == "haproxy" {
            also_in_haproxy_log
        } else {
            |_: &str| false
        };
        forward(err, name, log_target, skip);
    }
    // The std handle is dropped unreaped on purpose: `reap` collects every child by PID.
    drop(child);
    log::info!("started {name} (pid {pid})");
    Ok(Child { name, pid })
}

fn forward(
    stream: impl Read + Send + 'static,
    name: &'static str,
    target: &'static str,
    skip: fn(&str) -> bool,
) {
    let spawned = std::thread::Builder::new()
        .name(format!("{name}-log"))
        .stack_size(64 * 1024)
        .spawn(move || {
            for line in BufReader::new(stream).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end();
                if line.is_empty() || skip(line) {
                    continue;
                }
                let (level, line) = level_of(line);
                log::log!(target: target, level, "{line}");
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot forward the output of {name}: {e}");
    }
}

/// The level to print a child's line at, and the line without what said so. HAProxy's log
/// lines (`format short`) start with a syslog priority such as `<134>`; its own start-up
/// messages carry `[ALERT]`/`[WARNING]`, and the Dataplane API's `level=…`.
fn level_of(line: &str) -> (log::Level, &str) {
    if let Some((severity, rest)) = syslog_priority(line) {
        let level = match severity {
            0..=3 => log::Level::Error,
            4 => log::Level::Warn,
            5 | 6 => log::Level::Info,
            _ => log::Level::Debug,
        };
        return (level, rest);
    }
    (marked_level(line), line)
}

/// Whether a line of HAProxy's stderr is one of the runtime events its worker also sends to the
/// log: server state changes, an empty backend, a proxy stopping. Seen on HAProxy 2.6.12.
fn also_in_haproxy_log(line: &str) -> bool {
    // `[WARNING]  (1234) : message`
    let Some((_, msg)) = line.split_once(") : ") else {
        return false;
    };
    (msg.starts_with("Server ") && msg.contains(" is "))
        || (msg.starts_with("backend ") && msg.ends_with("has no server available!"))
        || (msg.starts_with("Proxy ") && msg.contains(" stopped ("))
        || msg.starts_with("Stopping frontend ")
        || msg.starts_with("Stopping backend ")
        || msg.starts_with("Stopping proxy ")
}

/// `<N>rest` with N a syslog priority (facility * 8 + severity): the severity and the rest.
fn syslog_priority(line: &str) -> Option<(u8, &str)> {
    let (digits, rest) = line.strip_prefix('<')?.split_once('>')?;
    if digits.is_empty() || digits.len() > 3 || !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let priority: u16 = digits.parse().ok()?;
    (priority < 192).then_some(((priority % 8) as u8, rest))
}

fn marked_level(line: &str) -> log::Level {
    let l = line.to_ascii_lowercase();
    if l.contains("[alert]") || l.contains("level=error") || l.contains("level=fatal") {
        log::Level::Error
    } else if l.contains("[warning]") || l.contains("level=warn") {
        log::Level::Warn
    } else if l.contains("level=debug") || l.contains("level=trace") {
        log::Level::Debug
    } else {
        log::Level::Info
    }
}

/// Reaps every child that has ended, ours and (as PID 1 or subreaper) orphans alike.
pub fn reap() -> Vec<Exit> {
    let mut exits = Vec::new();
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::Exited(pid, code)) => exits.push(Exit {
                pid: pid.as_raw(),
                code,
                signal: None,
            }),
            Ok(WaitStatus::Signaled(pid, sig, _)) => exits.push(Exit {
                pid: pid.as_raw(),
                code: 128 + sig as i32,
                signal: Some(sig as i32),
            }),
            Ok(WaitStatus::StillAlive) | Err(_) => return exits,
            Ok(_) => continue,
        }
    }
}

/// Whether any child process (ours or an adopted orphan) is still there to be reaped.
pub fn has_children() -> bool {
    matches!(
        waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)),
        Ok(WaitStatus::StillAlive)
    )
}

/// After the direct children have exited, waits for what they left behind (an HAProxy worker
/// still finishing its connections, a validation run of the Dataplane API), which as subreaper
/// or PID 1 we have adopted; past `deadline` their process groups are killed.
pub fn drain_orphans(groups: &[i32], deadline: std::time::Instant) {
    use std::time::{Duration, Instant};
    loop {
        reap();
        if !has_children() {
            return;
        }
        if Instant::now() >= deadline {
            for g in groups {
                let _ = nix::sys::signal::killpg(Pid::from_raw(*g), Signal::SIGKILL);
            }
            let until = Instant::now() + Duration::from_secs(2);
            while has_children() && Instant::now() < until {
                reap();
                std::thread::sleep(Duration::from_millis(10));
            }
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// As PID 1 the kernel already gives us orphans; otherwise ask for them, so that no
/// grandchild (an HAProxy worker whose master died) is left a zombie of init.
pub fn become_subreaper() {
    if std::process::id() != 1 {
        if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
            log::warn!("cannot become a child subreaper: {e}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn levels_follow_the_children_s_own_markers() {
        let level = |l| level_of(l).0;
        assert_eq!(
            level("[ALERT]    (1) : config : parsing"),
            log::Level::Error
        );
        assert_eq!(level("[WARNING]  (1) : Former worker"), log::Level::Warn);
        assert_eq!(level("time=x level=warning msg=y"), log::Level::Warn);
        assert_eq!(level("[NOTICE]   (1) : haproxy version"), log::Level::Info);
    }

    /// Lines HAProxy 2.6.12 wrote to stderr for a server going down and up and a soft stop.
    #[test]
    fn events_that_haproxy_also_logs_are_dropped_from_its_stderr() {
        for dup in [
            "[WARNING]  (6472) : Server b/s0 is DOWN, reason: Layer4 connection problem, info: \"Connection refused\", check duration: 0ms. 0 active and 0 backup servers left.",
            "[ALERT]    (6472) : backend 'b' has no server available!",
            "[WARNING]  (6472) : Server b/s0 is UP, reason: Layer4 check passed, check duration: 0ms.",
            "[WARNING]  (6472) : Proxy f stopped (cumulated conns: FE: 0, BE: 0).",
        ] {
            assert!(also_in_haproxy_log(dup), "{dup}");
        }
        for own in [
            "[NOTICE]   (6468) : New worker (6472) forked",
            "[NOTICE]   (6468) : Loading success.",
            "[WARNING]  (6468) : Current worker (6472) exited with code 0 (Exit)",
            "[ALERT]    (6468) : config : parsing [/x/haproxy.cfg:12] : unknown keyword 'Server'",
            "[WARNING]  (6468) : Exiting Master process...",
        ] {
            assert!(!also_in_haproxy_log(own), "{own}");
        }
    }

    #[test]
    fn haproxy_log_lines_are_printed_at_their_syslog_severity() {
        // local0 (16 * 8 = 128) plus the severity, as `log stdout format short local0` writes.
        let cases = [
            ("<129>Server up/s0 is DOWN", log::Level::Error),
            ("<132>Proxy stopped", log::Level::Warn),
            ("<133>Server up/s0 is UP", log::Level::Info),
            (
                "<134>127.0.0.1:1 [26/Nov/2026] public local_app/app 1/0/5 220 -- 1/1/0/0/0 0/0",
                log::Level::Info,
            ),
            ("<135>debug", log::Level::Debug),
        ];
        for (line, want) in cases {
            let (level, rest) = level_of(line);
            assert_eq!(level, want, "{line}");
            assert!(!rest.starts_with('<') && line.ends_with(rest), "{rest}");
        }
        // Not a priority: printed whole, at the level its markers give.
        for line in ["<>x", "<1234>x", "<200>x", "<12x", "<a>[WARNING] y"] {
            assert_eq!(level_of(line).1, line);
        }
        assert_eq!(level_of("<a>[WARNING] y").0, log::Level::Warn);
    }
}
