//! The mesh gateway mode (issue 33) on Consul 1.16.3, with two real clusters peered over the
//! HTTP API: `dc2` exports `server` to `dc1` and runs this program as its mesh gateway
//! (`-gateway mesh -register`). What `dc1` is told about `server` (`?peer=dc2`: the gateway's
//! address and the SNI to send) reaches `dc2`'s server through the gateway, which never
//! terminates the TLS; an SNI that names no exported service is closed; exports change live;
//! the gateway deregisters at exit. And the whole peered path of our own: `dc1`'s sidecar
//! dials `server` of peer `dc2` through that gateway to `dc2`'s sidecar, which lets it in as
//! `dc2`'s intentions for the peer `dc1` say. Skipped on Consul 1.8.7, which has no peering.

use std::time::Duration;

use crate::support;
use crate::support::load::Load;
use crate::support::mesh::{another_server_instance, sidecar, workdir};
use crate::support::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

/// `dc2` with `server` (app, sidecar) exported to `dc1`, and the gateway.
struct Peered {
    // Field order is drop order: the gateway and the sidecar stop (printing their last output
    // when a test failed) before the clusters they use and the directory their logs are in.
    gateway: Child,
    server: Child,
    app: HttpApp,
    dc1: Consul,
    dc2: Consul,
    base: TempDir,
    lan: u16,
    wan: u16,
    stats: String,
}

fn export(dc2: &Consul, services: &[&str]) {
    let services: Vec<Value> = services
        .iter()
        .map(|s| serde_json::json!({"Name": s, "Consumers": [{"Peer": "dc1"}]}))
        .collect();
    let entry = serde_json::json!({
        "Kind": "exported-services", "Name": "default", "Services": services,
    });
    let (status, body) = dc2.put("/v1/config", &entry.to_string());
    assert!(status == 200 && body.trim() == "true", "{status} {body}");
}

/// The flags of `dc2`'s gateway `gw` (a run adds `-register`).
fn gateway_flags(dc2: &Consul, base: &TempDir, lan: u16, wan: u16) -> Vec<String> {
    [
        "-gateway",
        "mesh",
        "-service",
        "gw",
        "-address",
        &format!("127.0.0.1:{lan}"),
        "-wan-address",
        &format!("127.0.0.1:{wan}"),
        "-http-addr",
        &dc2.http_addr(),
        "-haproxy-cfg-base-path",
        &base.path().display().to_string(),
    ]
    .map(String::from)
    .to_vec()
}

/// `dc2`'s gateway, registering itself, with its stats endpoint at `stats`.
fn spawn_gateway(dc2: &Consul, base: &TempDir, lan: u16, wan: u16, stats: &str) -> Child {
    let mut cmd = sidecar_command();
    cmd.args(gateway_flags(dc2, base, lan, wan)).args([
        "-register",
        "-log-level",
        "debug",
        "-stats-addr",
        stats,
    ]);
    Child::spawn("gateway", &mut cmd, base.path())
}

impl Peered {
    /// The gateway stopped (deregistering) and started again at new addresses.
    fn move_gateway(&mut self) {
        self.gateway.signal(nix::sys::signal::Signal::SIGTERM);
        assert!(
            self.gateway.wait_timeout(WAIT).is_some(),
            "{}",
            self.gateway.logs()
        );
        (self.lan, self.wan) = (free_port(), free_port());
        self.stats = format!("127.0.0.1:{}", free_port());
        self.gateway = spawn_gateway(&self.dc2, &self.base, self.lan, self.wan, &self.stats);
    }

    /// `intentions`: whether `server`'s sidecar enforces them (`-enable-intentions`).
    fn start(intentions: bool) -> Peered {
        Peered::start_with(intentions, &[], &[])
    }

    /// `server`'s sidecar with `upstreams` (in `dc2`) and the `extra` flags.
    fn start_with(intentions: bool, upstreams: &[(&str, u16)], extra: &[&str]) -> Peered {
        let (dc1, dc2) = Consul::start_peered();
        let base = TempDir::new("gateway");
        let app = HttpApp::start("from dc2's server");
        let sidecar_port = free_port();
        dc2.register(&sidecar_registration(
            "server",
            app.port(),
            sidecar_port,
            upstreams,
        ));
        let server = sidecar(&dc2, &base, "server", intentions, extra);
        export(&dc2, &["server"]);
        let (lan, wan) = (free_port(), free_port());
        let stats = format!("127.0.0.1:{}", free_port());
        let gateway = spawn_gateway(&dc2, &base, lan, wan, &stats);
        Peered {
            dc1,
            dc2,
            base,
            app,
            server,
            gateway,
            lan,
            wan,
            stats,
        }
    }

    /// What `dc1` is told about `server` in `dc2`: its instances (`?peer=dc2`), once one is
    /// listed at the gateway.
    fn imported(&self) -> Vec<Value> {
        let mut listed = Vec::new();
        wait_until(WAIT, "dc1 to list server from dc2 at the gateway", || {
            let (status, body) = self.dc1.get("/v1/health/connect/server?passing=1&peer=dc2");
            listed = serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v.as_array().cloned())
                .unwrap_or_default();
            status == 200
                && listed.iter().any(|e| {
                    [self.lan, self.wan]
                        .contains(&(e["Service"]["Port"].as_u64().unwrap_or(0) as u16))
                })
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.gateway.logs()));
        listed
    }

    /// One HTTPS request through the gateway's WAN address with `sni`, as `client` of `dc2`
    /// (whose sidecar trusts only its own cluster's CA so far); the HTTP status, 0 when the
    /// connection was closed.
    fn through_gateway(&self, sni: &str) -> u16 {
        let (cert, key, _) = self.dc2.leaf_files("client", self.base.path());
        http_status(
            curl_for_status()
                .arg("--cert")
                .arg(cert)
                .arg("--key")
                .arg(key)
                .arg("--connect-to")
                .arg(format!("{sni}:443:127.0.0.1:{}", self.wan))
                .arg(format!("https://{sni}/")),
        )
    }
}

#[test]
fn a_peer_reaches_an_exported_service_through_the_gateway_and_nothing_else() {
    if !consul_is_current() {
        eprintln!("SKIPPED: cluster peering needs Consul 1.14+");
        return;
    }
    let mut p = Peered::start(false);

    // The gateway registered itself: dc1 learns server's instance at the gateway, with the
    // SNI its sidecars are to send, in dc2's trust domain.
    let listed = p.imported();
    let checks = p.dc2.get_json("/v1/health/checks/gw");
    assert_eq!(checks[0]["Name"], "mesh-gateway listening", "{checks}");
    assert_eq!(checks[0]["Status"], "passing", "{checks}");
    let meta = &listed[0]["Service"]["Connect"]["PeerMeta"];
    let sni = meta["SNI"][0].as_str().expect("PeerMeta.SNI").to_string();
    let dc2_domain = format!("{PEER_CLUSTER_ID}.consul");
    assert_eq!(
        sni,
        format!("server.default.default.dc1.external.{dc2_domain}")
    );

    // That SNI reaches server's sidecar (its mTLS ends there, not at the gateway).
    wait_until(WAIT, "a request through the gateway", || {
        p.through_gateway(&sni) == 200
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.gateway.logs()));
    let served = p.app.requests();

    // Ready (it serves every export it has instances for), with metrics per routed service.
    let ready = http_get(&p.stats, "/ready", Duration::from_secs(5));
    assert_eq!(ready.map(|r| r.0), Ok(200), "{}", p.gateway.logs());
    let (_, metrics) = http_get(&p.stats, "/metrics", Duration::from_secs(5)).expect("/metrics");
    assert!(
        metrics
            .contains("haproxy_backend_bytes_in_total{service=\"server\",proxy=\"be_gw_server\"}"),
        "{metrics}"
    );

    // An SNI that names no exported service, a service's SNI for another peer and a non-TLS
    // hello are closed by the gateway: nothing reaches the app.
    for other in [
        format!("other.default.default.dc1.external.{dc2_domain}"),
        format!("server.default.default.dc3.external.{dc2_domain}"),
    ] {
        assert_eq!(p.through_gateway(&other), 0, "{other}");
    }
    let plain = http_get(&format!("127.0.0.1:{}", p.lan), "/", Duration::from_secs(6));
    assert!(plain.is_err(), "plain HTTP through the gateway: {plain:?}");
    assert_eq!(
        p.app.requests(),
        served,
        "a refused connection reached the app"
    );

    // The exports change live: withdrawn, the SNI is closed; exported again, it is served.
    export(&p.dc2, &[]);
    wait_until(WAIT, "the withdrawn export to close", || {
        p.through_gateway(&sni) == 0
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.gateway.logs()));
    export(&p.dc2, &["server"]);
    wait_until(WAIT, "the export to be served again", || {
        p.through_gateway(&sni) == 200
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.gateway.logs()));

    // After those changes (transactions and live map replacements), the gateway's HAProxy is
    // what a fresh render (`-dry-run`) of the same state describes; its listeners have no
    // default route, and no TLS is terminated anywhere in it.
    let workdir = std::fs::read_dir(p.base.path())
        .expect("the base path")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|e| {
            let name = e.file_name().unwrap_or_default().to_string_lossy();
            name.starts_with("hcc-gw-") && !name.ends_with("-dry-run")
        })
        .expect("the gateway's working directory");
    let workdir = std::fs::canonicalize(&workdir).unwrap_or(workdir);
    let applied = std::fs::read_to_string(workdir.join("haproxy.cfg")).expect("haproxy.cfg");
    let out = sidecar_command()
        .arg("-dry-run")
        .args(gateway_flags(&p.dc2, &p.base, p.lan, p.wan))
        .output()
        .expect("a dry run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    let fresh = text
        .split_once("haproxy.cfg <==")
        .and_then(|(_, rest)| rest.split_once('\n'))
        .expect("haproxy.cfg in the dry run")
        .1;
    let fresh_dir = p.base.path().join("hcc-gw-dry-run").display().to_string();
    assert_eq!(
        support::mesh::config_objects(&applied, &workdir.display().to_string()),
        support::mesh::config_objects(fresh, &fresh_dir),
        "deltas and a fresh render differ:\n{applied}\n----\n{fresh}"
    );
    assert!(applied.contains("frontend mesh_gateway_wan"), "{applied}");
    assert!(!applied.contains("default_backend"), "{applied}");
    assert!(!applied.contains(" ssl crt"), "{applied}");

    // A stop deregisters the gateway.
    p.gateway.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(
        p.gateway.wait_timeout(WAIT).is_some(),
        "{}",
        p.gateway.logs()
    );
    let (_, services) = p.dc2.get("/v1/agent/services");
    assert!(!services.contains("\"gw\""), "{services}");
}

/// `client` in dc1, its upstream `server` of peer `dc2` on `bind` with `config`.
fn register_peered_client(dc1: &Consul, bind: u16, config: Value) {
    let registration = serde_json::json!({
        "Name": "client", "ID": "client", "Address": "127.0.0.1", "Port": free_port(),
        "Connect": {"SidecarService": {
            "Port": free_port(),
            "Proxy": {"Upstreams": [
                {"DestinationName": "server", "DestinationPeer": "dc2", "LocalBindPort": bind,
                 "Config": config},
            ]},
        }},
    });
    dc1.register(&registration.to_string());
}

/// `dc2`'s intention for `client` of the peer `dc1` to `server`: `allow` or `deny`.
fn peer_intention(dc2: &Consul, action: &str) {
    let entry = serde_json::json!({
        "Kind": "service-intentions", "Name": "server",
        "Sources": [{"Name": "client", "Peer": "dc1", "Action": action}],
    });
    let (status, body) = dc2.put("/v1/config", &entry.to_string());
    assert!(status == 200 && body.trim() == "true", "{status} {body}");
}

/// The whole peered path of our own: dc1's client app → our dc1 sidecar (its upstream
/// `server` of peer `dc2`, dialed by its forwarder) → dc2's gateway (ours, SNI routing only)
/// → dc2's server sidecar (ours, trusting dc1's CA since `server` is exported to dc1) → app.
/// Served while dc2's intention from the peer dc1 allows, again once dc2's gateway moved to
/// other addresses (the forwarder's target replaced live); closed once the intention denies.
#[test]
fn a_peered_upstream_reaches_the_peers_service_as_its_intentions_say() {
    if !consul_is_current() {
        eprintln!("SKIPPED: cluster peering needs Consul 1.14+");
        return;
    }
    let mut p = Peered::start(true);
    p.imported();
    peer_intention(&p.dc2, "allow");
    let bind = free_port();
    register_peered_client(&p.dc1, bind, serde_json::json!({}));
    let client = sidecar(&p.dc1, &p.base, "client", true, &[]);
    let through = || http_status(curl_for_status().arg(format!("http://127.0.0.1:{bind}/")));
    let logs = |p: &Peered| {
        format!(
            "{}\n{}\n{}",
            client.logs(),
            p.server.logs(),
            p.gateway.logs()
        )
    };
    wait_until(WAIT, "dc1's client to reach dc2's server", || {
        through() == 200
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&p)));
    assert!(p.app.requests() > 0);

    // The gateway moves to other addresses: dc1 learns them, and the forwarder's target
    // follows live (same listener, same forwarder).
    p.move_gateway();
    p.imported();
    wait_until(WAIT, "the client through the moved gateway", || {
        through() == 200
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&p)));
    assert!(
        client.log_contains("peered upstream service server of peer dc2: forwarder updated"),
        "{}",
        client.logs()
    );

    // Denied by dc2's intention for the peer: the connection is closed, the app sees nothing.
    peer_intention(&p.dc2, "deny");
    wait_until(WAIT, "the deny intention to refuse the peer", || {
        through() == 0
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&p)));
    let served = p.app.requests();
    for _ in 0..3 {
        assert_eq!(through(), 0, "{}", logs(&p));
    }
    assert_eq!(p.app.requests(), served, "a denied peer reached the app");
}

/// An endpoint of `backend` in `dc2` presenting `cert`: `openssl s_server`, answering any
/// request with 200 once the TLS handshake is done.
fn tls_endpoint(base: &TempDir, port: u16, cert: &std::path::Path, key: &std::path::Path) -> Child {
    let mut cmd = std::process::Command::new("openssl");
    cmd.args(["s_server", "-www", "-accept"])
        .arg(format!("127.0.0.1:{port}"))
        .arg("-cert")
        .arg(cert)
        .arg("-key")
        .arg(key);
    Child::spawn("backend-endpoint", &mut cmd, base.path())
}

/// The exporting side trusts the peer's CA on its public listener only: `server` (exported to
/// `dc1`) has a local upstream `backend`, whose endpoint first presents `dc2`'s own leaf for
/// `backend` (served: the path works) and then the real leaf `dc1` issues for `backend`,
/// signed by the peer's CA, which `server`'s public listener does trust. HAProxy's own
/// per-connection check of the upstream refuses it (the identity checker is off, so that
/// HAProxy alone decides). Broken once, with every `ca-file` naming the public listener's
/// file: the impostor was served.
#[test]
fn a_local_upstream_signed_by_the_peers_ca_is_refused_on_the_exporting_side() {
    if !consul_is_current() {
        eprintln!("SKIPPED: cluster peering needs Consul 1.14+");
        return;
    }
    let bind = free_port();
    let p = Peered::start_with(
        false,
        &[("backend", bind)],
        &["-upstream-identity-check=false"],
    );
    let endpoint_port = free_port();
    p.dc2.register(&sidecar_registration(
        "backend",
        free_port(),
        endpoint_port,
        &[],
    ));
    let through = || http_status(curl_for_status().arg(format!("http://127.0.0.1:{bind}/")));
    let genuine_dir = TempDir::new("genuine");
    let (cert, key, _) = p.dc2.leaf_files("backend", genuine_dir.path());
    let mut genuine = tls_endpoint(&p.base, endpoint_port, &cert, &key);
    wait_until(
        WAIT,
        "server's upstream backend to be served by dc2's leaf",
        || through() == 200,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", p.server.logs(), genuine.logs()));
    // The export is in effect: `server`'s public listener trusts dc1's CA.
    let dc1_ca = std::fs::read_to_string(p.dc1.root_ca_file(p.base.path())).unwrap();
    let public = workdir(&p.base, "server").join("certs");
    wait_until(WAIT, "server's public listener to trust dc1's CA", || {
        std::fs::read_to_string(public.join("public-roots.pem"))
            .is_ok_and(|pem| pem.contains(dc1_ca.trim()))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", p.server.logs()));
    let own = std::fs::read_to_string(public.join("roots.pem")).unwrap();
    assert!(
        !own.contains(dc1_ca.trim()),
        "the upstreams' ca-file holds dc1's CA"
    );

    genuine.stop();

    let impostor_dir = TempDir::new("impostor");
    let (cert, key, leaf) = p.dc1.leaf_files("backend", impostor_dir.path());
    assert!(
        leaf["ServiceURI"]
            .as_str()
            .is_some_and(|u| u.contains("/dc/dc1/")),
        "dc1's leaf: {leaf}"
    );
    let impostor = tls_endpoint(&p.base, endpoint_port, &cert, &key);
    wait_until(WAIT, "the impostor endpoint to listen", || {
        std::net::TcpStream::connect(("127.0.0.1", endpoint_port)).is_ok()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", impostor.logs()));
    // HAProxy's TCP check (every 400ms, up after one success) sees the endpoint up again, so
    // that a refusal below is the TLS check's, not a server marked down.
    std::thread::sleep(Duration::from_secs(3));
    for _ in 0..5 {
        assert_ne!(
            through(),
            200,
            "a leaf of the peer's CA passed for a local upstream\n{}",
            p.server.logs()
        );
    }
}

/// HTTP/2 to a peer: dc1's client upstream `server` of peer `dc2` declared `http2`, dc2's
/// `server` an `http` service (its public listener offers `h2,http/1.1`). A request with
/// HTTP/2 prior knowledge goes through dc1's sidecar (h2c to the forwarder), the forwarder
/// (ALPN `h2`), dc2's gateway and dc2's sidecar, which logs it as HTTP/2. Broken once (the
/// forwarder's server without `proto h2`): red. With no ALPN offered it stays green, since
/// HAProxy's public listener also takes an HTTP/2 preface without ALPN; the forwarder's own
/// test (`peering::tests`) is the one that sees the ALPN.
#[test]
fn an_http2_peered_upstream_speaks_http2_to_the_peer() {
    if !consul_is_current() {
        eprintln!("SKIPPED: cluster peering needs Consul 1.14+");
        return;
    }
    let p = Peered::start(false);
    let defaults = serde_json::json!({
        "Kind": "service-defaults", "Name": "server", "Protocol": "http",
    });
    let (status, body) = p.dc2.put("/v1/config", &defaults.to_string());
    assert!(status == 200 && body.trim() == "true", "{status} {body}");
    p.imported();
    let bind = free_port();
    register_peered_client(&p.dc1, bind, serde_json::json!({"protocol": "http2"}));
    let client = sidecar(&p.dc1, &p.base, "client", false, &[]);
    let through = || {
        http_status(
            curl_for_status()
                .arg("--http2-prior-knowledge")
                .arg(format!("http://127.0.0.1:{bind}/h2")),
        )
    };
    wait_until(
        WAIT,
        "dc1's client to reach dc2's server over HTTP/2",
        || through() == 200,
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e}\n{}\n{}\n{}",
            client.logs(),
            p.server.logs(),
            p.gateway.logs()
        )
    });
    assert!(p.app.requests() > 0);
    let logs = p.server.logs();
    assert!(
        logs.lines()
            .any(|l| l.contains("public_listener~") && l.contains("/h2 HTTP/2.0\"")),
        "dc2's public listener did not speak HTTP/2 with the forwarder\n{logs}"
    );
}

/// dc2's `server` instances replaced twice (a new one added, then the old one leaves Consul
/// and stops, as an orchestrator does) while dc1's client sends requests, a new connection
/// each, through its peered upstream, the forwarder and dc2's gateway: none fails.
#[test]
fn dc2_instance_churn_under_load_through_the_gateway_fails_no_request() {
    if !consul_is_current() {
        eprintln!("SKIPPED: cluster peering needs Consul 1.14+");
        return;
    }
    let mut p = Peered::start(false);
    p.imported();
    let bind = free_port();
    register_peered_client(&p.dc1, bind, serde_json::json!({}));
    let client = sidecar(&p.dc1, &p.base, "client", false, &[]);
    let addr = format!("127.0.0.1:{bind}");
    wait_until(WAIT, "dc1's client to reach dc2's server", || {
        http_status(curl_for_status().arg(format!("http://{addr}/"))) == 200
    })
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", client.logs(), p.gateway.logs()));
    let load = Load::start(addr);
    p.app.wait_serving("the first instance to serve");

    let (two_sidecar, two) = another_server_instance(&p.dc2, &p.base, "server-2", "two");
    two.wait_serving("instance 2 to serve through the gateway");
    p.dc2.deregister("server");
    p.app
        .wait_idle("instance 1 to stop receiving once deregistered");
    p.server.stop();

    let (_three_sidecar, three) = another_server_instance(&p.dc2, &p.base, "server-3", "three");
    three.wait_serving("instance 3 to serve through the gateway");
    p.dc2.deregister("server-2");
    two.wait_idle("instance 2 to stop receiving once deregistered");
    drop(two_sidecar);
    three.wait_serving("instance 3 serving alone");

    let (ok, failed, errors) = load.finish();
    eprintln!("measured: dc2 churn through the gateway: {ok} requests ok, {failed} failed");
    assert_eq!(
        failed,
        0,
        "failed requests during churn: {errors:?}\n{}",
        p.gateway.logs()
    );
    assert!(ok > 50, "the load generator barely ran: {ok}");
}
