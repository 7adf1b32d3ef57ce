//! `hcc-run-rootfs ROOTFS [--bind SRC[:DST]]... -- PROGRAM [ARGS...]`
//!
//! Runs PROGRAM as PID 1 of a new PID and mount namespace, chrooted into ROOTFS (a directory
//! made by `scripts/rootfs`): a container without a container runtime. The network namespace
//! stays the caller's, so the program reaches a Consul agent on the host's loopback.
//!
//! Inside: `/proc` of the new PID namespace, `/dev/{null,zero,random,urandom}` of the host, and
//! each `--bind` (a directory or a file, at DST inside the rootfs, SRC's own path when DST is
//! left out). All mounts belong to the new mount namespace and vanish with it. There is no init:
//! PROGRAM itself is PID 1, so it must reap orphans and handle SIGTERM (the sidecar does both).
//!
//! This process stays outside as the namespace's parent: it forwards SIGTERM, SIGINT, SIGHUP,
//! SIGQUIT, SIGUSR1 and SIGUSR2 to PID 1 and exits with its code (128+signal if it was killed).
//! If it is killed itself, PID 1 gets SIGKILL (parent-death signal) and the kernel ends
//! everything else in the namespace.
//!
//! Test and benchmark tooling, not part of the sidecar: the end-to-end tests, scripts/test-rootfs,
//! scripts/bench and scripts/capture-spop run HAProxy 3.0 and 3.2 (and the sidecar as PID 1)
//! from their Debian root filesystems through it.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use nix::mount::{mount, MsFlags};
use nix::sched::{unshare, CloneFlags};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitStatus};
use nix::unistd::{chdir, chroot, execve, fork, ForkResult, Pid};

use haproxy_consul_connect::error::{Context, Error, Result};

const FORWARDED: [Signal; 6] = [
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
];
const DEVICES: [&str; 4] = ["/dev/null", "/dev/zero", "/dev/random", "/dev/urandom"];
const PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

struct Args {
    rootfs: PathBuf,
    binds: Vec<(PathBuf, PathBuf)>,
    program: Vec<OsString>,
}

const USAGE: &str = "usage: hcc-run-rootfs ROOTFS [--bind SRC[:DST]]... -- PROGRAM [ARGS...]";

fn parse(mut argv: impl Iterator<Item = OsString>) -> Result<Args> {
    let usage = || Error::msg(USAGE);
    let rootfs = PathBuf::from(argv.next().ok_or_else(usage)?);
    let mut binds = Vec::new();
    loop {
        let arg = argv.next().ok_or_else(usage)?;
        match arg.to_str() {
            Some("--") => break,
            Some("--bind") => {
                let spec = argv.next().ok_or_else(usage)?;
                let spec = spec
                    .to_str()
                    .ok_or_else(|| Error::msg(format!("the --bind path {spec:?} is not UTF-8")))?;
                let (src, dst) = spec.split_once(':').unwrap_or((spec, spec));
                binds.push((PathBuf::from(src), PathBuf::from(dst)));
            }
            _ => return Err(Error::msg(format!("unexpected {arg:?}; {USAGE}"))),
        }
    }
    let program: Vec<OsString> = argv.collect();
    if program.is_empty() {
        return Err(usage());
    }
    Ok(Args {
        rootfs,
        binds,
        program,
    })
}

fn inside(rootfs: &Path, dst: &Path) -> PathBuf {
    rootfs.join(dst.strip_prefix("/").unwrap_or(dst))
}

/// Bind-mounts `src` at `dst` (inside the rootfs), creating the mount point like `src`.
fn bind(src: &Path, dst: &Path) -> Result<()> {
    if src.is_dir() {
        std::fs::create_dir_all(dst).with_context(|| format!("mkdir {}", dst.display()))?;
    } else if !dst.exists() {
        if let Some(parent) = dst.parent() {
            std::fs::create_dir_all(parent)
                .with_context(|| format!("mkdir {}", parent.display()))?;
        }
        std::fs::File::create(dst).with_context(|| format!("create {}", dst.display()))?;
    }
    mount(
        Some(src),
        dst,
        None::<&str>,
        MsFlags::MS_BIND | MsFlags::MS_REC,
        None::<&str>,
    )
    .with_context(|| format!("bind {} at {}", src.display(), dst.display()))
}

/// In the child, PID 1 of the new namespace: mounts, chroot, exec. Returns only on failure.
fn become_pid1(args: &Args) -> Error {
    let setup = || -> Result<()> {
        // Nothing mounted here may leak back to the host's mount namespace.
        mount(
            None::<&str>,
            "/",
            None::<&str>,
            MsFlags::MS_REC | MsFlags::MS_PRIVATE,
            None::<&str>,
        )
        .context("making / private")?;
        let proc_dir = inside(&args.rootfs, Path::new("/proc"));
        std::fs::create_dir_all(&proc_dir).context("mkdir /proc")?;
        mount(
            Some("proc"),
            &proc_dir,
            Some("proc"),
            MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC,
            None::<&str>,
        )
        .context("mounting /proc")?;
        for dev in DEVICES {
            let dev = Path::new(dev);
            // debootstrap leaves a regular node there at times; a bind covers either.
            bind(dev, &inside(&args.rootfs, dev))?;
        }
        for (src, dst) in &args.binds {
            bind(src, &inside(&args.rootfs, dst))?;
        }
        chroot(&args.rootfs).with_context(|| format!("chroot {}", args.rootfs.display()))?;
        chdir("/").context("chdir /")?;
        // Die with the parent outside, so nothing in here outlives a killed launcher.
        nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)
            .context("setting the parent-death signal")?;
        SigSet::all()
            .thread_unblock()
            .context("unblocking signals")?;
        Ok(())
    };
    if let Err(e) = setup() {
        return e;
    }
    let cstr = |s: &[u8]| CString::new(s).unwrap_or_default();
    let argv: Vec<CString> = args.program.iter().map(|a| cstr(a.as_bytes())).collect();
    // The caller's environment, with a PATH that names the rootfs's own directories.
    let env: Vec<CString> = std::env::vars_os()
        .filter(|(k, _)| k != "PATH")
        .map(|(k, v)| {
            let mut kv = k.as_bytes().to_vec();
            kv.push(b'=');
            kv.extend_from_slice(v.as_bytes());
            cstr(&kv)
        })
        .chain(std::iter::once(cstr(format!("PATH={PATH}").as_bytes())))
        .collect();
    let program = if args.program[0].as_bytes().contains(&b'/') {
        argv[0].clone()
    } else {
        match PATH
            .split(':')
            .map(|d| Path::new(d).join(&args.program[0]))
            .find(|p| p.is_file())
        {
            Some(p) => cstr(p.as_os_str().as_bytes()),
            None => return Error::msg(format!("{:?} not found in the rootfs", args.program[0])),
        }
    };
    match execve(&program, &argv, &env) {
        Err(e) => Error::with_source(format!("exec {:?}", args.program[0]), e),
        Ok(never) => match never {},
    }
}

fn code_of(status: WaitStatus) -> Option<u8> {
    match status {
        WaitStatus::Exited(_, code) => Some(u8::try_from(code).unwrap_or(1)),
        WaitStatus::Signaled(_, sig, _) => Some(128u8.saturating_add(sig as u8)),
        _ => None,
    }
}

fn main() -> ExitCode {
    let args = match parse(std::env::args_os().skip(1)) {
        Ok(a) => a,
        Err(e) => {
            eprintln!("hcc-run-rootfs: {e}");
            return ExitCode::from(64);
        }
    };
    // Blocked before the fork so no signal is lost between fork and the wait loop; the child
    // unblocks them just before exec.
    let mut waited = SigSet::empty();
    for s in FORWARDED {
        waited.add(s);
    }
    waited.add(Signal::SIGCHLD);
    if let Err(e) = nix::sys::signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), None) {
        eprintln!("hcc-run-rootfs: blocking signals: {e}");
        return ExitCode::from(1);
    }
    if let Err(e) = unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWPID) {
        eprintln!("hcc-run-rootfs: unshare (needs root): {e}");
        return ExitCode::from(1);
    }
    // SAFETY: single-threaded here; the child only mounts, chroots and execs.
    let child = match unsafe { fork() } {
        Ok(ForkResult::Child) => {
            let why = become_pid1(&args);
            eprintln!("hcc-run-rootfs: {why}");
            std::process::exit(127);
        }
        Ok(ForkResult::Parent { child }) => child,
        Err(e) => {
            eprintln!("hcc-run-rootfs: fork: {e}");
            return ExitCode::from(1);
        }
    };
    loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => {
                match waitpid(child, Some(nix::sys::wait::WaitPidFlag::WNOHANG)) {
                    Ok(status) => {
                        if let Some(code) = code_of(status) {
                            return ExitCode::from(code);
                        }
                    }
                    Err(e) => {
                        eprintln!("hcc-run-rootfs: waitpid: {e}");
                        return ExitCode::from(1);
                    }
                }
            }
            Ok(sig) => {
                let _ = kill(Pid::from_raw(child.as_raw()), sig);
            }
            Err(e) => {
                eprintln!("hcc-run-rootfs: sigwait: {e}");
                return ExitCode::from(1);
            }
        }
    }
}
