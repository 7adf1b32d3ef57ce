//! Child processes the tests start and guard, and what /proc says about processes.

use super::*;

/// A spawned program in its own process group, with stdout/stderr in files. Dropping it stops
/// the whole group (SIGTERM, then SIGKILL after 5 s) and any descendant that left the group, so
/// a failing test leaks no HAProxy or Consul; if the test is panicking the logs are printed.
pub struct Child {
    name: String,
    child: std::process::Child,
    stdout: PathBuf,
    stderr: PathBuf,
    stopped: bool,
}

impl Child {
    /// Spawns `cmd` with stdin closed and output in `<log_dir>/<name>[.N].stdout|stderr`.
    pub fn spawn(name: &str, cmd: &mut Command, log_dir: &Path) -> Child {
        let (stdout, stderr) = log_paths(log_dir, name);
        let out = File::create(&stdout).unwrap_or_else(|e| panic!("{}: {e}", stdout.display()));
        let err = File::create(&stderr).unwrap_or_else(|e| panic!("{}: {e}", stderr.display()));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own group: stopping it reaches the grandchildren without touching the test runner.
            .process_group(0)
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {name} ({:?}): {e}", cmd.get_program()));
        Child {
            name: name.to_string(),
            child,
            stdout,
            stderr,
            stopped: false,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    /// Both output files, labelled, for assertion messages.
    pub fn logs(&self) -> String {
        format!(
            "==== {} stdout ====\n{}\n==== {} stderr ====\n{}",
            self.name,
            read_lossy(&self.stdout),
            self.name,
            read_lossy(&self.stderr)
        )
    }

    /// True once `needle` appears in stdout or stderr; for readiness via `wait_until`.
    pub fn log_contains(&self, needle: &str) -> bool {
        read_lossy(&self.stdout).contains(needle) || read_lossy(&self.stderr).contains(needle)
    }

    /// Everything written to stdout so far; its length marks a point that later output can be
    /// told apart from.
    pub fn stdout(&self) -> String {
        read_lossy(&self.stdout)
    }

    /// Reaps the process if it has exited; later calls return the same status.
    pub fn try_wait(&mut self) -> Option<ExitStatus> {
        self.child
            .try_wait()
            .unwrap_or_else(|e| panic!("wait for {}: {e}", self.name))
    }

    pub fn is_running(&mut self) -> bool {
        self.try_wait().is_none()
    }

    pub fn wait_timeout(&mut self, timeout: Duration) -> Option<ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(20));
        }
    }

    /// Signals the process alone (not its group), as an init system or a user would, so tests
    /// can check how the program itself shuts its children down.
    pub fn signal(&mut self, signal: Signal) {
        // A reaped PID may already belong to someone else.
        if self.try_wait().is_none() {
            let _ = kill(pid_of(self.pid()), signal);
        }
    }

    /// Stops the process group and leftover descendants, reaps the process, returns its exit
    /// status. Idempotent.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        if self.stopped {
            return self.try_wait();
        }
        self.stopped = true;
        // Taken before signalling: once the parent is gone, orphans are reparented and can no
        // longer be found from its PID.
        let tree: Vec<ProcRef> = if self.try_wait().is_none() {
            descendants(self.pid())
                .into_iter()
                .filter_map(ProcRef::new)
                .collect()
        } else {
            Vec::new()
        };
        let group = pid_of(self.pid());
        let _ = killpg(group, Signal::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        let mut status = None;
        loop {
            if status.is_none() {
                status = self.try_wait();
            }
            if status.is_some() && tree.iter().all(|p| !p.is_running()) {
                break;
            }
            if Instant::now() >= deadline {
                break;
            }
            thread::sleep(Duration::from_millis(20));
        }
        let _ = killpg(group, Signal::SIGKILL);
        for p in tree.iter().filter(|p| p.is_running()) {
            let _ = kill(pid_of(p.pid), Signal::SIGKILL);
        }
        // SIGKILL is delivered asynchronously; callers assert on "gone" right after stop().
        let deadline = Instant::now() + Duration::from_secs(2);
        while tree.iter().any(ProcRef::is_running) && Instant::now() < deadline {
            thread::sleep(Duration::from_millis(10));
        }
        match status {
            Some(status) => Some(status),
            None => self.child.wait().ok(),
        }
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        self.stop();
        if thread::panicking() {
            eprintln!(
                "==== {} (pid {}) last output ====\n-- stdout --\n{}\n-- stderr --\n{}",
                self.name,
                self.pid(),
                tail(&read_lossy(&self.stdout), 80),
                tail(&read_lossy(&self.stderr), 80)
            );
        }
    }
}

fn log_paths(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    // A restarted program gets new files, so the first run's output survives for diagnosis.
    for n in 0.. {
        let stem = if n == 0 {
            name.to_string()
        } else {
            format!("{name}.{n}")
        };
        let stdout = dir.join(format!("{stem}.stdout"));
        if !stdout.exists() {
            return (stdout, dir.join(format!("{stem}.stderr")));
        }
    }
    unreachable!()
}

fn read_lossy(path: &Path) -> String {
    fs::read(path)
        .map(|b| String::from_utf8_lossy(&b).into_owned())
        .unwrap_or_default()
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

fn pid_of(pid: u32) -> Pid {
    Pid::from_raw(i32::try_from(pid).expect("pid fits in i32"))
}

// ---------------------------------------------------------------------------------------------
// /proc inspection

struct ProcStat {
    state: char,
    ppid: u32,
    start_time: u64,
}

fn proc_stat(pid: u32) -> Option<ProcStat> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may itself contain spaces or ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    Some(ProcStat {
        state: fields.first()?.chars().next()?,
        ppid: fields.get(1)?.parse().ok()?,
        start_time: fields.get(19)?.parse().ok()?,
    })
}

/// A PID plus its start time, so a PID the kernel reused for another process is not mistaken
/// for ours (pid_max is often only 32768 in containers).
struct ProcRef {
    pid: u32,
    start_time: u64,
}

impl ProcRef {
    fn new(pid: u32) -> Option<ProcRef> {
        proc_stat(pid).map(|s| ProcRef {
            pid,
            start_time: s.start_time,
        })
    }

    fn is_running(&self) -> bool {
        proc_stat(self.pid)
            .is_some_and(|s| s.start_time == self.start_time && !matches!(s.state, 'Z' | 'X'))
    }
}

/// True if `pid` exists and is not a zombie (an orphan reparented to a PID 1 that does not reap
/// stays a zombie forever, and that still counts as stopped).
pub fn is_running(pid: u32) -> bool {
    proc_stat(pid).is_some_and(|s| !matches!(s.state, 'Z' | 'X'))
}

/// The PIDs from `pids` that are still running; empty means everything we started is gone.
pub fn still_running(pids: &[u32]) -> Vec<u32> {
    pids.iter().copied().filter(|&p| is_running(p)).collect()
}

/// The process's short name (`/proc/<pid>/comm`, at most 15 bytes), e.g. "haproxy".
pub fn process_name(pid: u32) -> Option<String> {
    fs::read_to_string(format!("/proc/{pid}/comm"))
        .ok()
        .map(|s| s.trim_end().to_string())
}

/// All live descendants of `pid` (children, grandchildren, …), found through the parent PIDs
/// in /proc; used to find the HAProxy and Dataplane API processes a sidecar started.
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut children: HashMap<u32, Vec<u32>> = HashMap::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(stat) = proc_stat(p) {
            if !matches!(stat.state, 'Z' | 'X') {
                children.entry(stat.ppid).or_default().push(p);
            }
        }
    }
    let mut found = Vec::new();
    let mut queue = vec![pid];
    while let Some(p) = queue.pop() {
        for &c in children.get(&p).map(Vec::as_slice).unwrap_or(&[]) {
            found.push(c);
            queue.push(c);
        }
    }
    found.sort_unstable();
    found
}

/// Descendants of `pid` whose name is `name`, e.g. `descendants_named(sidecar, "haproxy")`.
pub fn descendants_named(pid: u32, name: &str) -> Vec<u32> {
    descendants(pid)
        .into_iter()
        .filter(|&p| process_name(p).as_deref() == Some(name))
        .collect()
}

/// The parent PID, as seen from this process's PID namespace; None once `pid` is gone.
pub fn parent_of(pid: u32) -> Option<u32> {
    proc_stat(pid).map(|s| s.ppid)
}

/// Processes a test did not spawn itself (say, orphans some child left behind): SIGKILLed on
/// drop while they still run, so a failing test leaks none of them. Start times are recorded so
/// a PID the kernel has since reused is left alone.
pub struct PidGuard {
    procs: Vec<ProcRef>,
}

impl PidGuard {
    pub fn new(pids: &[u32]) -> PidGuard {
        PidGuard {
            procs: pids.iter().copied().filter_map(ProcRef::new).collect(),
        }
    }

    pub fn pids(&self) -> Vec<u32> {
        self.procs.iter().map(|p| p.pid).collect()
    }

    /// The guarded processes that were reaped: gone from /proc, or their PID now names another
    /// process. A zombie has not been reaped.
    pub fn reaped(&self) -> Vec<u32> {
        self.procs
            .iter()
            .filter(|p| proc_stat(p.pid).is_none_or(|s| s.start_time != p.start_time))
            .map(|p| p.pid)
            .collect()
    }
}

impl Drop for PidGuard {
    fn drop(&mut self) {
        for p in self.procs.iter().filter(|p| p.is_running()) {
            let _ = kill(pid_of(p.pid), Signal::SIGKILL);
        }
    }
}
