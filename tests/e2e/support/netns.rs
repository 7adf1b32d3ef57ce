//! Test hosts on one machine: network namespaces joined by veth pairs to a bridge that lives in
//! a namespace of its own, with private addresses (10.203.0.0/24) that exist only inside them.
//! Nothing is added to the namespace the tests run in, so no traffic leaves these hosts.
//!
//! `Net` owns every namespace it made and deletes them on drop (also when a test panics),
//! after killing by PID whatever still runs inside them; deleting a namespace deletes its veth
//! ends and the bridge with it. Needs root (`ip netns add`).

use std::fs::File;
use std::net::TcpStream;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::Duration;

use nix::sched::{setns, CloneFlags};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use super::wait_until;

/// The subnet every `Net` uses; it exists only inside that net's namespaces, so two nets (two
/// test processes) never see each other.
pub const SUBNET_PREFIX: &str = "10.203.0";

/// Whether this process may create network namespaces.
pub fn can_create_namespaces() -> bool {
    nix::unistd::geteuid().is_root()
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip {}: {e}", args.join(" ")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

fn must(args: &[&str]) {
    ip(args).unwrap_or_else(|e| panic!("{e}"));
}

/// One test host: a namespace with `lo` and `eth0` (its address on the shared bridge).
#[derive(Clone)]
pub struct Host {
    pub name: String,
    pub ns: String,
    pub addr: String,
    /// The bridge's end of this host's veth pair, in the bridge namespace: its link state is
    /// the host's cable.
    port: String,
}

impl Host {
    /// A command that runs `program` inside this host (`ip netns exec`, which execs the program
    /// in place, so the PID a `Child` holds is the program's own).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &self.ns]).arg(program);
        cmd
    }

    /// Runs `f` on a thread that has entered this host's network namespace: every socket it
    /// opens (a listener too, which then outlives the thread) belongs to the host.
    pub fn run<T: Send>(&self, f: impl FnOnce() -> T + Send) -> T {
        let path = format!("/run/netns/{}", self.ns);
        std::thread::scope(|s| {
            s.spawn(|| {
                enter(&path);
                f()
            })
            .join()
            .unwrap_or_else(|_| panic!("a thread in namespace {} panicked", self.ns))
        })
    }

    /// `addr:port` on this host.
    pub fn at(&self, port: u16) -> String {
        format!("{}:{port}", self.addr)
    }
}

/// Moves the calling thread (only it) into the network namespace at `path`.
pub fn enter(path: &str) {
    let f = File::open(path).unwrap_or_else(|e| panic!("{path}: {e}"));
    setns(f, CloneFlags::CLONE_NEWNET).unwrap_or_else(|e| panic!("setns {path}: {e}"));
}

pub struct Net {
    bridge_ns: String,
    pub hosts: Vec<Host>,
}

impl Net {
    /// Hosts named `names`, addressed `10.203.0.1`, `.2`, … in that order, all on one bridge.
    pub fn new(names: &[&str]) -> Net {
        static COUNTER: AtomicU32 = AtomicU32::new(0);
        let tag = format!(
            "hcc{}x{}",
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed)
        );
        let bridge_ns = format!("{tag}-br");
        // Constructed before anything exists, so a failure half-way deletes what was made.
        let mut net = Net {
            bridge_ns: bridge_ns.clone(),
            hosts: Vec::new(),
        };
        must(&["netns", "add", &bridge_ns]);
        must(&["-n", &bridge_ns, "link", "add", "br0", "type", "bridge"]);
        must(&["-n", &bridge_ns, "link", "set", "br0", "up"]);
        for (i, name) in names.iter().enumerate() {
            let ns = format!("{tag}-{name}");
            let port = format!("p{i}");
            let addr = format!("{SUBNET_PREFIX}.{}", i + 1);
            must(&["netns", "add", &ns]);
            net.hosts.push(Host {
                name: name.to_string(),
                ns: ns.clone(),
                addr: addr.clone(),
                port: port.clone(),
            });
            must(&[
                "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &port,
                "netns", &bridge_ns,
            ]);
            must(&["-n", &bridge_ns, "link", "set", &port, "master", "br0"]);
            must(&["-n", &bridge_ns, "link", "set", &port, "up"]);
            must(&["-n", &ns, "link", "set", "lo", "up"]);
            must(&[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("{addr}/24"),
                "dev",
                "eth0",
            ]);
            must(&["-n", &ns, "link", "set", "eth0", "up"]);
        }
        // The bridge forwards within a second or two of its ports coming up.
        let (first, last) = (&net.hosts[0], &net.hosts[net.hosts.len() - 1]);
        let listener = last
            .run(|| std::net::TcpListener::bind((last.addr.as_str(), 0)))
            .unwrap_or_else(|e| panic!("listen on {}: {e}", last.addr));
        let target = listener.local_addr().expect("local_addr");
        wait_until(
            Duration::from_secs(10),
            "the hosts to reach each other",
            || {
                first
                    .run(|| TcpStream::connect_timeout(&target, Duration::from_millis(500)).is_ok())
            },
        )
        .unwrap_or_else(|e| panic!("{e}"));
        net
    }

    pub fn host(&self, name: &str) -> &Host {
        self.hosts
            .iter()
            .find(|h| h.name == name)
            .unwrap_or_else(|| panic!("no host {name}"))
    }

    /// Pulls `host`'s cable: its bridge port goes down, so every packet to or from it is lost
    /// (nothing is refused: connections time out, as with a dead machine).
    pub fn cut(&self, name: &str) {
        let port = &self.host(name).port;
        must(&["-n", &self.bridge_ns, "link", "set", port, "down"]);
    }

    /// Plugs `host` back in.
    pub fn restore(&self, name: &str) {
        let port = &self.host(name).port;
        must(&["-n", &self.bridge_ns, "link", "set", port, "up"]);
    }

    /// Every namespace this net made (to check that they are gone after a test).
    pub fn namespaces(&self) -> Vec<String> {
        let mut all: Vec<String> = self.hosts.iter().map(|h| h.ns.clone()).collect();
        all.push(self.bridge_ns.clone());
        all
    }
}

/// The PIDs of processes in namespace `ns` (`ip netns pids`).
fn pids_in(ns: &str) -> Vec<i32> {
    Command::new("ip")
        .args(["netns", "pids", ns])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .split_whitespace()
                .filter_map(|p| p.parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

/// Names of the network namespaces that exist now (`ip netns list`).
pub fn existing_namespaces() -> Vec<String> {
    Command::new("ip")
        .args(["netns", "list"])
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stdout)
                .lines()
                .filter_map(|l| l.split_whitespace().next().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

impl Net {
    /// Deletes the net now and checks that none of its namespaces is left (a test's last step;
    /// on a panic before it, `Drop` still deletes them).
    pub fn remove_and_check(self) {
        let ours = self.namespaces();
        drop(self);
        let left: Vec<String> = existing_namespaces()
            .into_iter()
            .filter(|n| ours.contains(n))
            .collect();
        assert!(left.is_empty(), "namespaces left behind: {left:?}");
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        for ns in self.namespaces() {
            // The guards of the test's children normally stopped everything already; whatever
            // is still inside a namespace of ours was started by this test.
            for _ in 0..50 {
                let pids = pids_in(&ns);
                if pids.is_empty() {
                    break;
                }
                for pid in pids {
                    let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            if let Err(e) = ip(&["netns", "del", &ns]) {
                eprintln!("netns cleanup: {e}");
            }
        }
    }
}
