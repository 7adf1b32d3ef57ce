//! A whole mesh on loopback: Consul, the `server` app, and the sidecars of `server` and
//! `client` (upstream `server` on a local port), all real programs, all stopped on drop.

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{
    dry_run, free_port, http_get, sidecar_command, sidecar_registration, wait_until, Child, Consul,
    HttpApp, TempDir,
};

pub const APP_BODY: &str = "hello from the server app";

pub struct Mesh {
    // Field order is drop order: sidecars stop before the app and Consul they depend on.
    pub client_sidecar: Child,
    pub server_sidecar: Child,
    pub app: HttpApp,
    pub consul: Consul,
    pub base: TempDir,
    pub server_port: u16,
    pub client_port: u16,
    pub upstream_port: u16,
    /// Time from starting the sidecars to the first answer through the upstream.
    pub first_answer: Duration,
    /// `-stats-addr` of each sidecar, when asked for.
    pub server_stats: Option<String>,
    pub client_stats: Option<String>,
}

#[derive(Default)]
pub struct MeshOptions {
    pub intentions: bool,
    /// Extra upstreams of `client`: (destination, local port).
    pub extra_upstreams: Vec<(String, u16)>,
    /// Give both sidecars a `-stats-addr`.
    pub stats: bool,
    /// More arguments for the client's sidecar.
    pub client_args: Vec<String>,
    /// The protocol of `server` and `client` (service-defaults), when not Consul's tcp.
    pub protocol: Option<&'static str>,
}

impl Mesh {
    pub fn start(opts: MeshOptions) -> Mesh {
        let base = TempDir::new("mesh");
        let consul = Consul::start();
        if let Some(protocol) = opts.protocol {
            consul.set_protocol("server", protocol);
            consul.set_protocol("client", protocol);
        }
        let app = HttpApp::start(APP_BODY);
        let server_port = free_port();
        let client_port = free_port();
        let upstream_port = free_port();
        let mut server_reg: serde_json::Value = serde_json::from_str(&sidecar_registration(
            "server",
            app.port(),
            server_port,
            &[],
        ))
        .expect("a registration");
        if let Some(protocol) = opts.protocol {
            // Consul 1.8 does not fill a registration's protocol from service-defaults (the
            // client's discovery chain does take it from there).
            server_reg["Connect"]["SidecarService"]["Proxy"]["Config"] =
                serde_json::json!({ "protocol": protocol });
        }
        consul.register(&server_reg.to_string());
        let mut upstreams: Vec<(&str, u16)> = vec![("server", upstream_port)];
        upstreams.extend(opts.extra_upstreams.iter().map(|(d, p)| (d.as_str(), *p)));
        consul.register(&sidecar_registration(
            "client",
            free_port(),
            client_port,
            &upstreams,
        ));

        let started = Instant::now();
        let stats = |on: bool| on.then(|| format!("127.0.0.1:{}", free_port()));
        let (server_stats, client_stats) = (stats(opts.stats), stats(opts.stats));
        let args = |s: &Option<String>| match s {
            Some(a) => vec!["-stats-addr".to_string(), a.clone()],
            None => Vec::new(),
        };
        let (sa, mut ca) = (args(&server_stats), args(&client_stats));
        ca.extend(opts.client_args.iter().cloned());
        let sa: Vec<&str> = sa.iter().map(String::as_str).collect();
        let ca: Vec<&str> = ca.iter().map(String::as_str).collect();
        let server_sidecar = sidecar(&consul, &base, "server", opts.intentions, &sa);
        let client_sidecar = sidecar(&consul, &base, "client", opts.intentions, &ca);
        let addr = format!("127.0.0.1:{upstream_port}");
        let ok = wait_until(
            Duration::from_secs(60),
            "an answer through the mesh",
            || matches!(http_get(&addr, "/", Duration::from_secs(2)), Ok((200, body)) if body == APP_BODY),
        );
        if let Err(e) = ok {
            panic!(
                "{e}\n--- server sidecar ---\n{}\n--- client sidecar ---\n{}",
                server_sidecar.logs(),
                client_sidecar.logs()
            );
        }
        Mesh {
            first_answer: started.elapsed(),
            client_sidecar,
            server_sidecar,
            app,
            consul,
            base,
            server_port,
            client_port,
            upstream_port,
            server_stats,
            client_stats,
        }
    }

    pub fn upstream_addr(&self) -> String {
        format!("127.0.0.1:{}", self.upstream_port)
    }

    /// Re-registers `client` with one more upstream to `server` (named with its datacenter,
    /// so current Consul does not see a duplicate) and waits until its new listener answers;
    /// returns the listener's port.
    pub fn add_upstream(&self) -> u16 {
        let extra = free_port();
        self.consul.register(&sidecar_registration(
            "client",
            free_port(),
            self.client_port,
            &[("server", self.upstream_port), ("server@dc1", extra)],
        ));
        let addr = format!("127.0.0.1:{extra}");
        wait_until(
            Duration::from_secs(30),
            "the added upstream to answer",
            || matches!(http_get(&addr, "/", Duration::from_secs(2)), Ok((200, _))),
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.client_sidecar.logs()));
        extra
    }

    /// The working directory a running sidecar made under the base path: the short directory
    /// its readable `hcc-<proxy id>-…` link points to, as the paths in its files name it.
    pub fn workdir(&self, service: &str) -> PathBuf {
        workdir(&self.base, service)
    }
}

/// Another instance `id` of the service `server` registered in `consul`: its own app
/// (answering `body`) and its own sidecar, which stops when the returned `Child` drops.
pub fn another_server_instance(
    consul: &Consul,
    base: &TempDir,
    id: &str,
    body: &str,
) -> (Child, HttpApp) {
    let app = HttpApp::start(body);
    let mut reg: serde_json::Value =
        serde_json::from_str(&sidecar_registration(id, app.port(), free_port(), &[]))
            .expect("a registration");
    reg["Name"] = "server".into();
    consul.register(&reg.to_string());
    (sidecar(consul, base, id, false, &[]), app)
}

/// Starts the sidecar of `service` with the given extra arguments.
pub fn sidecar(
    consul: &Consul,
    base: &TempDir,
    service: &str,
    intentions: bool,
    extra: &[&str],
) -> Child {
    let mut cmd = sidecar_command();
    cmd.args(["-sidecar-for", service, "-http-addr", &consul.http_addr()])
        .arg("-haproxy-cfg-base-path")
        .arg(base.path())
        .args(["-log-level", "debug"])
        .args(extra);
    if intentions {
        cmd.arg("-enable-intentions");
    }
    Child::spawn(&format!("sidecar-{service}"), &mut cmd, base.path())
}

/// The working directory a running sidecar of `service` made under `base`: the short directory
/// its readable `hcc-<proxy id>-…` link points to, as the paths in its files name it.
pub fn workdir(base: &TempDir, service: &str) -> PathBuf {
    super::sidecar_workdir(base.path(), service)
}

/// Keywords whose lines HAProxy evaluates in the order written, each keyword's list on its own
/// (so `tcp-request` before `http-request` or the reverse is the same configuration, but two
/// `http-request` lines swapped are not).
const ORDERED: &[&str] = &[
    "acl",
    "default_backend",
    "filter",
    "http-after-response",
    "http-check",
    "http-request",
    "http-response",
    "redirect",
    "tcp-check",
    "tcp-request",
    "tcp-response",
    "use-server",
    "use_backend",
];

/// The proxies of a configuration (frontends and backends), one entry per line, so two
/// configurations can be compared as sets whatever the order of their sections. Rule lines (see
/// `ORDERED`) keep their words in order and carry their position among their keyword's lines;
/// every other line has its words sorted, so option order and the Dataplane API's own formatting
/// do not matter, and carries its count, so free slots count too. The workdir is replaced by a
/// placeholder.
pub fn config_objects(cfg: &str, workdir: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut seen: HashMap<String, usize> = HashMap::new();
    let mut section: Option<String> = None;
    for line in cfg.lines() {
        let line = line
            .split('#')
            .next()
            .unwrap_or("")
            .replace(workdir, "<dir>");
        if line.trim().is_empty() {
            continue;
        }
        if !line.starts_with(char::is_whitespace) {
            let head = line.trim().to_string();
            section =
                (head.starts_with("frontend ") || head.starts_with("backend ")).then_some(head);
            if let Some(s) = &section {
                out.insert(s.clone());
            }
            continue;
        }
        let Some(s) = &section else { continue };
        let mut words: Vec<&str> = line.split_whitespace().collect();
        let keyword = words[0];
        let line = if ORDERED.contains(&keyword) {
            let n = seen.entry(format!("{s} | {keyword}")).or_default();
            *n += 1;
            format!("{s} | {keyword} #{n}: {}", words.join(" "))
        } else {
            // Which slot an instance sits in depends on history (it keeps its slot; a fresh
            // render sorts): compare server lines without the slot name.
            if keyword == "server" && words.get(1).is_some_and(|n| n.starts_with('s')) {
                words.remove(1);
            }
            words.sort();
            let line = format!("{s} | {}", words.join(" "));
            let n = seen.entry(line.clone()).or_default();
            *n += 1;
            format!("{line} (x{n})")
        };
        out.insert(line);
    }
    out
}

/// `service`'s haproxy.cfg rendered from scratch by a dry run against the mesh's Consul, with
/// `flags` (those of the running sidecar), and the working directory its paths name.
/// Asserts that `applied` (the haproxy.cfg the deltas left in `workdir`) and a fresh render of
/// `service`'s current state (`--dry-run` with `flags`) describe the same HAProxy objects;
/// those objects (`config_objects`), for more checks.
pub fn same_as_fresh_render(
    mesh: &Mesh,
    service: &str,
    flags: &[&str],
    applied: &str,
    workdir: &Path,
) -> BTreeSet<String> {
    let (fresh, fresh_dir) = fresh_render(mesh, service, flags);
    let a = config_objects(applied, &workdir.display().to_string());
    let b = config_objects(&fresh, &fresh_dir);
    let only_applied: Vec<_> = a.difference(&b).collect();
    let only_fresh: Vec<_> = b.difference(&a).collect();
    assert!(
        only_applied.is_empty() && only_fresh.is_empty(),
        "deltas and a fresh render differ\nonly after deltas: {only_applied:#?}\nonly in a fresh render: {only_fresh:#?}"
    );
    a
}

pub fn fresh_render(mesh: &Mesh, service: &str, flags: &[&str]) -> (String, String) {
    let text = dry_run(&mesh.consul.http_addr(), mesh.base.path(), service, flags);
    let start = text
        .find("haproxy.cfg <==")
        .expect("haproxy.cfg in the dry run");
    let cfg = text[start..].split_once('\n').unwrap().1.to_string();
    let dir = mesh
        .base
        .path()
        .join(format!("hcc-{service}-sidecar-proxy-dry-run"));
    (cfg, dir.display().to_string())
}
