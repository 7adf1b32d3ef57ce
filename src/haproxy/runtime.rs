//! HAProxy's own sockets: the master CLI (process list, reload) and the worker's runtime API
//! (certificates). One command per connection, as HAProxy's non-interactive mode expects.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};

const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// How long the master CLI may stay unreachable during a reload before the master counts as gone.
const MASTER_GONE: Duration = Duration::from_secs(3);

/// Sends one command line (and an optional `<<` payload) and returns everything HAProxy answers.
pub fn command(socket: &Path, line: &str, payload: Option<&str>) -> Result<String> {
    let what = || {
        format!(
            "sending {:?} to HAProxy at {}",
            first_word(line),
            socket.display()
        )
    };
    let mut s = UnixStream::connect(socket).with_context(what)?;
    s.set_read_timeout(Some(IO_TIMEOUT)).with_context(what)?;
    s.set_write_timeout(Some(IO_TIMEOUT)).with_context(what)?;
    let mut msg = String::with_capacity(line.len() + payload.map_or(0, str::len) + 8);
    msg.push_str(line);
    if let Some(p) = payload {
        // The payload ends at the first blank line, so it must hold none.
        msg.push_str(" <<\n");
        for l in p.lines().filter(|l| !l.trim().is_empty()) {
            msg.push_str(l);
            msg.push('\n');
        }
    }
    msg.push('\n');
    s.write_all(msg.as_bytes()).with_context(what)?;
    // The master CLI answers only once it sees the end of the input.
    s.shutdown(std::net::Shutdown::Write).with_context(what)?;
    let mut out = String::new();
    s.read_to_string(&mut out).with_context(what)?;
    Ok(out)
}

fn first_word(line: &str) -> &str {
    // Only the verb goes into errors: the rest may be a path or, for payloads, key material.
    line.split_whitespace().next().unwrap_or("")
}

/// One line of the master's `show proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Proc {
    pub pid: u32,
    pub kind: String,
    pub reloads: u32,
}

#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ProcList {
    pub master_reloads: u32,
    pub master_failed: u32,
    /// Current workers only (not old ones still draining).
    pub workers: Vec<Proc>,
    pub old_workers: Vec<Proc>,
}

/// Parses `show proc` of HAProxy 2.6's master CLI.
pub fn parse_show_proc(text: &str) -> Result<ProcList> {
    let mut list = ProcList::default();
    let mut section = "master";
    let mut saw_master = false;
    for line in text.lines() {
        let line = line.trim();
        if line.is_empty() {
            continue;
        }
        if let Some(header) = line.strip_prefix('#') {
            let header = header.trim();
            if header.starts_with("workers") {
                section = "workers";
            } else if header.starts_with("old workers") {
                section = "old";
            } else if header.starts_with("programs") {
                section = "programs";
            }
            continue;
        }
        let mut fields = line.split_whitespace();
        let (Some(pid), Some(kind), Some(reloads)) = (fields.next(), fields.next(), fields.next())
        else {
            continue;
        };
        let (Ok(pid), Ok(reloads)) = (pid.parse::<u32>(), reloads.parse::<u32>()) else {
            continue;
        };
        let proc = Proc {
            pid,
            kind: kind.to_string(),
            reloads,
        };
        match (section, kind) {
            ("master", "master") => {
                saw_master = true;
                list.master_reloads = reloads;
                // `2 [failed: 1]`
                if let Some(rest) = line.split("[failed:").nth(1) {
                    list.master_failed = rest
                        .trim()
                        .trim_end_matches(|c: char| !c.is_ascii_digit())
                        .split(']')
                        .next()
                        .and_then(|n| n.trim().parse().ok())
                        .unwrap_or(0);
                }
            }
            ("workers", _) => list.workers.push(proc),
            ("old", _) => list.old_workers.push(proc),
            _ => {}
        }
    }
    if !saw_master {
        return Err(Error::msg(format!(
            "the master CLI's `show proc` has no master line: {:?}",
            text.chars().take(200).collect::<String>()
        )));
    }
    Ok(list)
}

pub fn show_proc(master: &Path) -> Result<ProcList> {
    parse_show_proc(&command(master, "show proc", None)?)
}

/// Waits until the master CLI answers with at least one worker.
pub fn wait_ready(master: &Path, timeout: Duration) -> Result<ProcList> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match show_proc(master) {
            Ok(list) if !list.workers.is_empty() => return Ok(list),
            Ok(_) => "no worker yet".to_string(),
            Err(e) => e.to_string(),
        };
        if Instant::now() >= deadline {
            return Err(Error::msg(format!(
                "HAProxy did not become ready within {}s: {last}",
                timeout.as_secs()
            )));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Reloads HAProxy and reports whether the new configuration was taken. HAProxy 2.6 answers a
/// reload with nothing, so success is read from `show proc`: a new worker that was not there
/// before and no new failure. This is what the Dataplane API's reload command runs.
pub fn reload(master: &Path, timeout: Duration) -> Result<u32> {
    let before = show_proc(master).context("reading the process list before the reload")?;
    // The master closes the CLI connection when it re-executes; no answer is expected.
    let _ = command(master, "reload", None);
    let deadline = Instant::now() + timeout;
    let mut last_error = String::new();
    let mut unreachable_since: Option<Instant> = None;
    while Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        let answer = show_proc(master);
        if answer.is_ok() {
            unreachable_since = None;
        } else if unreachable_since.get_or_insert_with(Instant::now).elapsed() > MASTER_GONE {
            // A re-exec takes milliseconds; this long without a master means it is gone.
            return Err(Error::msg(format!(
                "HAProxy's master CLI at {} stopped answering during the reload",
                master.display()
            )));
        }
        match answer {
            Ok(now) => {
                if now.master_failed > before.master_failed
                    || (now.master_reloads > before.master_reloads && now.master_failed > 0)
                {
                    return Err(Error::msg(format!(
                        "HAProxy rejected the new configuration (master reports {} failed reload(s)); the previous workers keep serving",
                        now.master_failed
                    )));
                }
                let fresh = now
                    .workers
                    .iter()
                    .any(|w| !before.workers.iter().any(|b| b.pid == w.pid));
                if now.master_reloads > before.master_reloads && fresh {
                    return Ok(now.master_reloads);
                }
            }
            // The master socket is briefly gone while the master re-executes itself.
            Err(e) => last_error = e.to_string(),
        }
    }
    Err(Error::msg(format!(
        "HAProxy did not finish reloading within {}s{}",
        timeout.as_secs(),
        if last_error.is_empty() {
            String::new()
        } else {
            format!(" (last error: {last_error})")
        }
    )))
}

/// Replaces a certificate (or CA file, `kind = "ca-file"`) HAProxy has loaded from `path`, live:
/// new handshakes use it at once, established connections keep theirs.
pub fn set_ssl(stats: &Path, kind: &str, path: &Path, pem: &str) -> Result<()> {
    let p = path.display();
    let answer = command(stats, &format!("set ssl {kind} {p}"), Some(pem))?;
    // "Transaction created for certificate …" but "transaction created for CA …".
    let lower = answer.to_ascii_lowercase();
    if !lower.contains("transaction created") && !lower.contains("transaction updated") {
        let _ = command(stats, &format!("abort ssl {kind} {p}"), None);
        return Err(Error::msg(format!(
            "HAProxy refused the new {kind} for {p}: {}",
            answer.trim()
        )));
    }
    let answer = command(stats, &format!("commit ssl {kind} {p}"), None)?;
    if !answer.contains("Success") {
        let _ = command(stats, &format!("abort ssl {kind} {p}"), None);
        return Err(Error::msg(format!(
            "HAProxy could not commit the new {kind} for {p}: {}",
            answer.trim()
        )));
    }
    Ok(())
}

/// Whether the certificate loaded from `path` is still attached to a listener or server
/// (`show ssl cert`'s `Status: Used`). HAProxy 2.6 and 3.0 detach certificates on
/// `commit ssl ca-file`; 3.2 does not. Asked after each such commit, never assumed by version.
pub fn cert_in_use(stats: &Path, path: &Path) -> Result<bool> {
    let answer = command(stats, &format!("show ssl cert {}", path.display()), None)?;
    status_used(&answer).ok_or_else(|| {
        Error::msg(format!(
            "HAProxy's `show ssl cert {}` has no Status line: {}",
            path.display(),
            answer.trim()
        ))
    })
}

fn status_used(show_ssl_cert: &str) -> Option<bool> {
    show_ssl_cert.lines().find_map(|l| {
        let status = l.trim().strip_prefix("Status:")?.trim();
        Some(status.eq_ignore_ascii_case("used"))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `show ssl cert` after `commit ssl ca-file`: 2.6.12 and 3.0.11 detach, 3.2.26 does not.
    #[test]
    fn certificate_status_is_read() {
        let detached = "Filename: /x/certs/leaf.pem\nStatus: Unused\nSerial: 1A\n";
        let attached = "Filename: /x/certs/leaf.pem\nStatus: Used\nSerial: 1A\n";
        assert_eq!(status_used(detached), Some(false));
        assert_eq!(status_used(attached), Some(true));
        assert_eq!(status_used("Can't display the certificate"), None);
    }

    const SHOW_PROC: &str =
        "#<PID>          <type>          <reloads>       <uptime>        <version>
9734            master          2 [failed: 1]   0d00h00m31s     2.6.12-1+deb12u4
# workers
9937            worker          1               0d00h00m14s     2.6.12-1+deb12u4
# old workers
9801            worker          2               0d00h00m20s     2.6.12-1+deb12u4
# programs

";

    #[test]
    fn parses_show_proc_of_haproxy_2_6() {
        let l = parse_show_proc(SHOW_PROC).unwrap();
        assert_eq!(l.master_reloads, 2);
        assert_eq!(l.master_failed, 1);
        assert_eq!(l.workers.len(), 1);
        assert_eq!(l.workers[0].pid, 9937);
        assert_eq!(l.old_workers[0].pid, 9801);
    }

    #[test]
    fn show_proc_without_failures_and_garbage_are_handled() {
        let l = parse_show_proc(
            "#<PID> <type> <reloads> <uptime> <version>\n1 master 0 0d 2.6\n# workers\n2 worker 0 0d 2.6\n",
        )
        .unwrap();
        assert_eq!((l.master_reloads, l.master_failed), (0, 0));
        assert!(parse_show_proc("Unknown command.\n").is_err());
    }
}
