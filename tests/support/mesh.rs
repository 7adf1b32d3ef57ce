//! A whole mesh on loopback: Consul, the `server` app, and the sidecars of `server` and
//! `client` (upstream `server` on a local port), all real programs, all stopped on drop.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use super::{
    free_port, http_get, sidecar_command, sidecar_registration, wait_until, Child, Consul, HttpApp,
    TempDir,
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
}

impl Mesh {
    pub fn start(opts: MeshOptions) -> Mesh {
        let base = TempDir::new("mesh");
        let consul = Consul::start();
        let app = HttpApp::start(APP_BODY);
        let server_port = free_port();
        let client_port = free_port();
        let upstream_port = free_port();
        consul.register(&sidecar_registration(
            "server",
            app.port(),
            server_port,
            &[],
        ));
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
