//! Agentless (issue 30): sidecars beside no Consul agent, as consul-dataplane runs in
//! Kubernetes. The services and proxies are registered in the catalog only, on a node no agent
//! runs (`/v1/catalog/register`), the Consul server has ACLs on with default deny, and each
//! sidecar logs in through a JWT auth method whose key and tokens the test makes with openssl.
//! Consul 1.16.3 only: catalog-only proxies and the login flow as consul-k8s uses them.
//! The fail-over cases run three servers on loopback, and on hosts of their own (network
//! namespaces, `support::netns`; needs root, skipped loudly without).

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use crate::support::load::Load;
use crate::support::netns::{can_create_namespaces, Host, Net};
use crate::support::*;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

const NODE: &str = "pod-node";
const METHOD: &str = "hcc-jwt";

/// Base64url without padding, as JWTs write their parts.
fn b64url(data: &[u8]) -> String {
    const A: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    for chunk in data.chunks(3) {
        let b = [
            chunk[0],
            *chunk.get(1).unwrap_or(&0),
            *chunk.get(2).unwrap_or(&0),
        ];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..=chunk.len() {
            out.push(A[((n >> (18 - 6 * i)) & 63) as usize] as char);
        }
    }
    out
}

fn openssl(args: &[&str], dir: &Path) -> Vec<u8> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .expect("openssl runs");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// The issuer's RSA key (`key.pem`) and its public half, which the auth method trusts.
fn make_key(dir: &Path) -> String {
    openssl(&["genrsa", "-out", "key.pem", "2048"], dir);
    openssl(
        &["rsa", "-in", "key.pem", "-pubout", "-out", "pub.pem"],
        dir,
    );
    std::fs::read_to_string(dir.join("pub.pem")).unwrap()
}

/// An RS256 JWT for `service`, signed with `key.pem`, written to `file`.
fn write_jwt(dir: &Path, service: &str, file: &Path) {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs();
    let header = b64url(br#"{"alg":"RS256","typ":"JWT"}"#);
    let claims = json!({
        "iss": "hcc-test", "aud": "consul", "sub": service, "service": service,
        "iat": now, "nbf": now - 60, "exp": now + 3600,
        // Two tokens made in the same second differ.
        "jti": format!("{service}-{}", free_port()),
    });
    let signing_input = format!("{header}.{}", b64url(claims.to_string().as_bytes()));
    let input_file = dir.join(format!("{service}.input"));
    std::fs::write(&input_file, &signing_input).unwrap();
    let input = input_file.to_string_lossy().to_string();
    let signature = openssl(&["dgst", "-sha256", "-sign", "key.pem", &input], dir);
    let jwt = format!("{signing_input}.{}", b64url(&signature));
    // Written whole then renamed, as Kubernetes swaps a projected token.
    let tmp = file.with_extension("tmp");
    std::fs::write(&tmp, jwt).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

/// The JWT auth method and a binding rule giving each login the service identity its
/// `service` claim names.
/// With `replace`, only the method's key is replaced.
fn make_auth_method(consul: &Consul, public_key: &str, replace: bool) {
    let method = json!({
        "Name": METHOD, "Type": "jwt",
        "Config": {
            "JWTValidationPubKeys": [public_key],
            "BoundIssuer": "hcc-test",
            "BoundAudiences": ["consul"],
            "ClaimMappings": {"service": "service"},
        },
    });
    let path = if replace {
        format!("/v1/acl/auth-method/{METHOD}")
    } else {
        "/v1/acl/auth-method".to_string()
    };
    let (status, body) = consul.put(&path, &method.to_string());
    assert_eq!(status, 200, "{body}");
    if replace {
        return;
    }
    // The second identity lets a sidecar register its stats endpoint (`<service>-sidecar-stats`).
    for name in ["${value.service}", "${value.service}-sidecar-stats"] {
        let rule = json!({"AuthMethod": METHOD, "BindType": "service", "BindName": name});
        let (status, body) = consul.put("/v1/acl/binding-rule", &rule.to_string());
        assert_eq!(status, 200, "{body}");
    }
}

/// The catalog's stats service of `service` on `NODE` and its check's status, if registered.
fn stats_service(consul: &Consul, service: &str) -> Option<(String, String)> {
    let entries = consul.get_json(&format!("/v1/health/service/{service}-sidecar-stats"));
    let entry = entries.as_array()?.first()?;
    assert_eq!(entry["Node"]["Node"], NODE, "{entry}");
    let id = entry["Service"]["ID"].as_str()?.to_string();
    let status = entry["Checks"]
        .as_array()?
        .iter()
        .find(|c| c["ServiceID"] == id.as_str())?["Status"]
        .as_str()?
        .to_string();
    Some((id, status))
}

/// What the registration helpers need of Consul: the harness's dev server, or a server of
/// the three-server cluster below.
trait Put {
    fn put(&self, path: &str, body: &str) -> (u16, String);
}

impl Put for Consul {
    fn put(&self, path: &str, body: &str) -> (u16, String) {
        Consul::put(self, path, body)
    }
}

/// One catalog registration on `NODE`, which no agent runs.
fn catalog_register(consul: &dyn Put, service: Value, check: Option<Value>) {
    let mut reg = json!({
        "Node": NODE, "Address": "127.0.0.1", "Service": service,
    });
    if let Some(c) = check {
        reg["Check"] = c;
    }
    let (status, body) = consul.put("/v1/catalog/register", &reg.to_string());
    assert_eq!((status, body.trim()), (200, "true"));
}

/// The proxy of instance `id` of `service` and its app, with the check that says whether the
/// proxy is serving (as consul-k8s registers a pod's readiness), in `status`.
fn register_instance(
    consul: &dyn Put,
    service: &str,
    id: &str,
    app_port: u16,
    upstreams: Value,
    status: &str,
) -> u16 {
    let port = free_port();
    catalog_register(
        consul,
        json!({"ID": id, "Service": service, "Port": app_port, "Address": "127.0.0.1"}),
        None,
    );
    let proxy = json!({
        "ID": format!("{id}-sidecar-proxy"), "Service": format!("{service}-sidecar-proxy"),
        "Kind": "connect-proxy", "Port": port, "Address": "127.0.0.1",
        "Proxy": {
            "DestinationServiceName": service, "DestinationServiceID": id,
            "LocalServiceAddress": "127.0.0.1", "LocalServicePort": app_port,
            "Upstreams": upstreams,
        },
    });
    catalog_register(consul, proxy, Some(proxy_check(id, status)));
    port
}

fn proxy_check(id: &str, status: &str) -> Value {
    json!({
        "CheckID": format!("{id}-ready"), "Name": "pod ready", "Status": status,
        "ServiceID": format!("{id}-sidecar-proxy"),
    })
}

fn set_check(consul: &dyn Put, id: &str, status: &str) {
    let reg = json!({
        "Node": NODE, "Address": "127.0.0.1", "SkipNodeUpdate": true,
        "Check": proxy_check(id, status),
    });
    let (status, body) = consul.put("/v1/catalog/register", &reg.to_string());
    assert_eq!((status, body.trim()), (200, "true"));
}

/// The accessor IDs of the tokens the auth method made.
fn login_tokens(consul: &Consul) -> Vec<String> {
    consul
        .get_json(&format!("/v1/acl/tokens?authmethod={METHOD}"))
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|t| t["AccessorID"].as_str().map(str::to_string))
        .collect()
}

/// The sidecar's command with consul-dataplane's flags: the proxy by ID on `NODE`, the server
/// list, and a login with the bearer file when given.
fn agentless_command(
    base: &TempDir,
    proxy_id: &str,
    servers: &str,
    bearer: Option<&Path>,
) -> Command {
    let mut cmd = sidecar_command();
    agentless_args(&mut cmd, base, proxy_id, servers, bearer);
    cmd
}

fn agentless_args(
    cmd: &mut Command,
    base: &TempDir,
    proxy_id: &str,
    servers: &str,
    bearer: Option<&Path>,
) {
    cmd.args(["-proxy-service-id", proxy_id, "-service-node-name", NODE])
        .args(["-http-addr", servers])
        .arg("-haproxy-cfg-base-path")
        .arg(base.path())
        .args([
            "-log-level",
            "debug",
            "-enable-intentions",
            "-grace-period",
            "5s",
        ]);
    if let Some(bearer) = bearer {
        let meta = format!("pod={proxy_id}");
        cmd.args(["-login-auth-method", METHOD, "-login-meta", &meta])
            .arg("-login-bearer-token-path")
            .arg(bearer);
    }
}

fn agentless_sidecar(
    base: &TempDir,
    proxy_id: &str,
    servers: &str,
    bearer: Option<&Path>,
) -> Child {
    let mut cmd = agentless_command(base, proxy_id, servers, bearer);
    Child::spawn(&format!("sidecar-{proxy_id}"), &mut cmd, base.path())
}

fn answers(addr: &str, n: usize) -> Vec<String> {
    let mut seen: Vec<String> = (0..n)
        .filter_map(|_| match http_get(addr, "/", Duration::from_secs(5)) {
            Ok((200, body)) => Some(body),
            _ => None,
        })
        .collect();
    seen.sort();
    seen.dedup();
    seen
}

/// The logs of every sidecar, for a failure message.
fn all_logs(sidecars: &[Child]) -> String {
    sidecars
        .iter()
        .map(Child::logs)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Agentless is tested on current Consul only; says so on another.
fn skipped() -> bool {
    if consul_is_current() {
        return false;
    }
    eprintln!(
        "skipped on Consul {}: agentless runs against Consul 1.14+ servers",
        consul_version()
    );
    true
}

#[test]
fn catalog_only_sidecars_logged_in_through_jwt_serve_follow_checks_and_leave_no_token() {
    if skipped() {
        return;
    }
    let base = TempDir::new("agentless");
    let consul = Consul::start_acl_deny();
    let public_key = make_key(base.path());
    make_auth_method(&consul, &public_key, false);

    let apps = [HttpApp::start("server-1"), HttpApp::start("server-2")];
    for (i, app) in apps.iter().enumerate() {
        register_instance(
            &consul,
            "server",
            &format!("server-{}", i + 1),
            app.port(),
            json!([]),
            "passing",
        );
    }
    let upstream_port = free_port();
    register_instance(
        &consul,
        "client",
        "client-1",
        free_port(),
        json!([{"DestinationName": "server", "LocalBindPort": upstream_port}]),
        "passing",
    );
    consul.set_intentions("server", &[IntentionSpec::l4("client", "allow")]);
    // An agent merges this into the registration; agentless, the sidecar resolves it itself.
    let defaults = json!({"Kind": "service-defaults", "Name": "server", "Protocol": "http"});
    let (status, body) = consul.put("/v1/config", &defaults.to_string());
    assert_eq!((status, body.trim()), (200, "true"));

    // A dry run logs in, prints the configuration, and logs out.
    let bearer = base.join("dry-run.jwt");
    write_jwt(base.path(), "client", &bearer);
    let out = agentless_command(
        &base,
        "client-1-sidecar-proxy",
        &consul.http_addr(),
        Some(&bearer),
    )
    .arg("-dry-run")
    .output()
    .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("bind 127.0.0.1:{upstream_port}")),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        login_tokens(&consul),
        Vec::<String>::new(),
        "the dry run logged out"
    );

    let mut sidecars = Vec::new();
    let stats_port = free_port();
    for id in ["server-1", "server-2", "client-1"] {
        let service = id.split('-').next().unwrap();
        let bearer = base.join(format!("{id}.jwt"));
        write_jwt(base.path(), service, &bearer);
        // The client's list starts with an address nothing listens on: it moves to the next.
        let servers = if service == "client" {
            format!("127.0.0.1:{},{}", free_port(), consul.http_addr())
        } else {
            consul.http_addr()
        };
        let proxy_id = format!("{id}-sidecar-proxy");
        let mut cmd = agentless_command(&base, &proxy_id, &servers, Some(&bearer));
        // The client's stats endpoint goes into the catalog, on the proxy's node.
        if service == "client" {
            cmd.args(["-stats-addr", &format!("127.0.0.1:{stats_port}")])
                .arg("-stats-service-register");
        }
        sidecars.push(Child::spawn(
            &format!("sidecar-{proxy_id}"),
            &mut cmd,
            base.path(),
        ));
    }
    let upstream = format!("127.0.0.1:{upstream_port}");
    wait_until(
        Duration::from_secs(60),
        "both instances through the mesh",
        || answers(&upstream, 8).len() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", all_logs(&sidecars), consul.logs()));
    assert_eq!(login_tokens(&consul).len(), 3, "one login per sidecar");
    assert_eq!(
        public_listener_mode(&sidecar_workdir(base.path(), "server-1")).as_deref(),
        Some("http"),
        "service-defaults' protocol reached the catalog-registered proxy"
    );
    assert!(
        sidecars[2].log_contains("now using"),
        "the client moved past the dead address\n{}",
        sidecars[2].logs()
    );
    // Registered once serving; no agent runs its check, the sidecar writes it passing.
    wait_until(Duration::from_secs(10), "the stats service passing", || {
        stats_service(&consul, "client")
            == Some(("client-1-sidecar-proxy-stats".into(), "passing".into()))
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e}: {:?}\n{}",
            stats_service(&consul, "client"),
            sidecars[2].logs()
        )
    });

    // A catalog check set critical takes the instance out, under load, failing nothing.
    let load = Load::start(upstream.clone());
    set_check(&consul, "server-1", "critical");
    wait_until(Duration::from_secs(10), "server-1 out", || {
        answers(&upstream, 8) == ["server-2"]
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&sidecars)));
    set_check(&consul, "server-1", "passing");
    wait_until(Duration::from_secs(10), "server-1 back", || {
        answers(&upstream, 8).len() == 2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&sidecars)));
    let (ok, failed, errors) = load.finish();
    assert!(
        ok > 0 && failed == 0,
        "{ok} ok, {failed} failed: {errors:?}"
    );

    // The issuer's key rotated (so only a JWT read anew logs in), the bearer files replaced
    // and every login token revoked: the next request each sidecar makes is refused, and it
    // logs in again with the new file; changes keep being applied and no request fails.
    let load = Load::start(upstream.clone());
    let rotated = base.join("rotated");
    std::fs::create_dir(&rotated).unwrap();
    make_auth_method(&consul, &make_key(&rotated), true);
    for id in ["server-1", "server-2", "client-1"] {
        let service = id.split('-').next().unwrap();
        write_jwt(&rotated, service, &base.join(format!("{id}.jwt")));
    }
    let revoked = login_tokens(&consul);
    for accessor in &revoked {
        let (status, body) = consul.delete(&format!("/v1/acl/token/{accessor}"));
        assert_eq!(status, 200, "{body}");
    }
    // A change on the node wakes every sidecar's registration watch, whose next read is
    // refused.
    catalog_register(
        &consul,
        json!({"ID": "bystander", "Service": "bystander", "Port": free_port()}),
        None,
    );
    wait_until(Duration::from_secs(30), "three new logins", || {
        let now = login_tokens(&consul);
        now.len() == 3 && now.iter().all(|t| !revoked.contains(t))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&sidecars)));
    set_check(&consul, "server-2", "critical");
    wait_until(
        Duration::from_secs(10),
        "server-2 out after the new login",
        || answers(&upstream, 8) == ["server-1"],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&sidecars)));
    set_check(&consul, "server-2", "passing");
    wait_until(
        Duration::from_secs(10),
        "server-2 back after the new login",
        || answers(&upstream, 8).len() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&sidecars)));
    let (ok, failed, errors) = load.finish();
    assert!(
        ok > 0 && failed == 0,
        "{ok} ok, {failed} failed: {errors:?}"
    );
    for s in &sidecars {
        assert!(s.log_contains("logging in again"), "{}", s.logs());
    }

    // SIGTERM: every sidecar logs out, no token of the auth method is left.
    for s in &mut sidecars {
        s.signal(Signal::SIGTERM);
    }
    for s in &mut sidecars {
        let status = s.wait_timeout(Duration::from_secs(60));
        assert_eq!(status.and_then(|s| s.code()), Some(0), "{}", s.logs());
    }
    assert_eq!(
        login_tokens(&consul),
        Vec::<String>::new(),
        "tokens left behind\n{}",
        all_logs(&sidecars)
    );
    // Deregistered before the logout, with the token it was registered with.
    assert_eq!(
        stats_service(&consul, "client"),
        None,
        "stats service left behind\n{}",
        sidecars[2].logs()
    );
    assert!(
        sidecars[2].log_contains("the catalog check of client-1-sidecar-proxy-stats is critical"),
        "the drain wrote the check critical\n{}",
        sidecars[2].logs()
    );
}

/// No agent runs the checks of a catalog-only service, so an exposed check's listener admits
/// the catalog node's address in the agent's place (read from the catalog; the node here is
/// registered at a private address), besides loopback; the dry run shows the rule.
#[test]
fn an_exposed_check_listener_admits_the_catalog_nodes_address() {
    if skipped() {
        return;
    }
    let base = TempDir::new("agentless-expose");
    let consul = Consul::start();
    let app_port = free_port();
    let check_port = free_port();
    catalog_register(
        &consul,
        json!({"ID": "web-1", "Service": "web", "Port": app_port, "Address": "127.0.0.1"}),
        Some(json!({
            "CheckID": "web-1-http", "Name": "http", "ServiceID": "web-1", "Status": "passing",
            "Type": "http",
            "Definition": {"HTTP": format!("http://127.0.0.1:{check_port}/health"), "Interval": "10s"},
            "Output": format!("HTTP GET http://127.0.0.1:{check_port}/health: 200 OK Output: ok"),
        })),
    );
    let proxy = json!({
        "ID": "web-1-sidecar-proxy", "Service": "web-sidecar-proxy", "Kind": "connect-proxy",
        "Port": free_port(), "Address": "127.0.0.1",
        "Proxy": {
            "DestinationServiceName": "web", "DestinationServiceID": "web-1",
            "LocalServiceAddress": "127.0.0.1", "LocalServicePort": app_port,
            "Expose": {"Checks": true},
        },
    });
    catalog_register(&consul, proxy, None);
    let node = json!({"Node": NODE, "Address": "10.1.0.7"});
    let (status, body) = consul.put("/v1/catalog/register", &node.to_string());
    assert_eq!((status, body.trim()), (200, "true"));

    let out = agentless_command(&base, "web-1-sidecar-proxy", &consul.http_addr(), None)
        .arg("-dry-run")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains(&format!("frontend exp_{check_port}")),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("tcp-request connection reject unless { src 127.0.0.0/8 ::1 10.1.0.7 }"),
        "{stdout}"
    );
}

/// Three Consul servers on loopback, each on ports of its own, no agent beside them.
struct Cluster {
    // Declared before `dir`: the processes stop before their directories go.
    servers: Vec<Option<Child>>,
    /// Which servers' hosts are cut off (running, unreachable): the test's requests skip them.
    cut: Vec<bool>,
    http: Vec<String>,
    /// The host the test's own requests leave from, when the servers are on hosts of their
    /// own (`start_on_hosts`); `None`: this process's loopback.
    via: Option<Host>,
    dir: TempDir,
}

/// A Consul server named `name` in `dir`, expecting `expect` servers and joining those of
/// `join` (serf ports); its HTTP address.
fn spawn_server(
    dir: &TempDir,
    name: &str,
    expect: u32,
    serf: u16,
    join: &[u16],
) -> (Child, String) {
    let port = free_port();
    let config = json!({
        "node_name": name, "datacenter": "dc1", "server": true,
        "bootstrap_expect": expect, "bind_addr": "127.0.0.1", "client_addr": "127.0.0.1",
        "advertise_addr": "127.0.0.1",
        "data_dir": dir.join(format!("data-{name}")),
        "disable_update_check": true, "log_level": "info",
        "ports": {"http": port, "dns": -1, "serf_lan": serf, "serf_wan": -1,
                  "server": free_port(), "grpc": -1, "grpc_tls": -1},
        "retry_join": join.iter().map(|p| format!("127.0.0.1:{p}")).collect::<Vec<_>>(),
        "connect": {"enabled": true, "ca_config": {"cluster_id": CLUSTER_ID}},
        // Raft timings of a dev agent: a new leader within a second or two.
        "performance": {"raft_multiplier": 1},
    });
    let path = dir.join(format!("{name}.json"));
    std::fs::write(&path, config.to_string()).unwrap();
    let mut cmd = Command::new(consul_bin());
    cmd.arg("agent").arg("-config-file").arg(&path);
    let child = Child::spawn(&format!("consul-{name}"), &mut cmd, dir.path());
    (child, format!("127.0.0.1:{port}"))
}

impl Cluster {
    fn start() -> Cluster {
        let dir = TempDir::new("cluster");
        let serf: Vec<u16> = (0..3).map(|_| free_port()).collect();
        let mut servers = Vec::new();
        let mut http = Vec::new();
        for (i, port) in serf.iter().enumerate() {
            let (child, addr) = spawn_server(&dir, &format!("server{i}"), 3, *port, &serf);
            servers.push(Some(child));
            http.push(addr);
        }
        let cluster = Cluster {
            servers,
            cut: vec![false; 3],
            http,
            via: None,
            dir,
        };
        cluster.wait_for_roots();
        cluster
    }

    /// One server on each of the hosts `s0`, `s1`, `s2` of `net`, serving HTTP at its host's
    /// address; the test's requests leave from `pod`.
    fn start_on_hosts(net: &Net) -> Cluster {
        let dir = TempDir::new("host-cluster");
        let hosts: Vec<&Host> = ["s0", "s1", "s2"].iter().map(|h| net.host(h)).collect();
        let join: Vec<String> = hosts.iter().map(|h| h.addr.clone()).collect();
        let servers = hosts
            .iter()
            .map(|host| {
                let config = json!({
                    "node_name": host.name, "datacenter": "dc1", "server": true,
                    "bootstrap_expect": 3, "bind_addr": host.addr, "client_addr": host.addr,
                    "advertise_addr": host.addr,
                    "data_dir": dir.join(format!("data-{}", host.name)),
                    "disable_update_check": true, "log_level": "info",
                    "ports": {"http": 8500, "dns": -1, "serf_wan": -1, "grpc": -1, "grpc_tls": -1},
                    "retry_join": join,
                    "connect": {"enabled": true, "ca_config": {"cluster_id": CLUSTER_ID}},
                    "performance": {"raft_multiplier": 1},
                    // A server cut off stays a voter: removed as dead meanwhile, it would come
                    // back a non-voter, and stopping another server then would leave no quorum.
                    "autopilot": {"cleanup_dead_servers": false},
                });
                let path = dir.join(format!("{}.json", host.name));
                std::fs::write(&path, config.to_string()).unwrap();
                let mut cmd = host.command(consul_bin());
                cmd.arg("agent").arg("-config-file").arg(&path);
                Some(Child::spawn(
                    &format!("consul-{}", host.name),
                    &mut cmd,
                    dir.path(),
                ))
            })
            .collect();
        let cluster = Cluster {
            servers,
            cut: vec![false; 3],
            http: hosts.iter().map(|h| h.at(8500)).collect(),
            via: Some(net.host("pod").clone()),
            dir,
        };
        cluster.wait_for_roots();
        cluster
    }

    fn request(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, String> {
        let send = || http_request(addr, method, path, body.map(str::as_bytes), timeout);
        match &self.via {
            Some(host) => host.run(send),
            None => send(),
        }
    }

    /// A server of no cluster: it waits for a second server that never comes, so it never has
    /// a leader and answers reads as a server cut off from its cluster does.
    fn lone_server(&self) -> (Child, String) {
        let (child, addr) = spawn_server(&self.dir, "lone", 2, free_port(), &[]);
        wait_until(Duration::from_secs(30), "the lone server to say it has no leader", || {
            matches!(
                http_request(&addr, "GET", "/v1/catalog/services", None, Duration::from_secs(15)),
                Ok(r) if r.status == 500 && r.body.contains("No cluster leader")
            )
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", child.logs()));
        (child, addr)
    }

    /// The indices of the servers still running and reachable.
    fn up(&self) -> Vec<usize> {
        (0..3)
            .filter(|i| self.servers[*i].is_some() && !self.cut[*i])
            .collect()
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut last = String::new();
        for i in self.up() {
            match self.request(&self.http[i], method, path, body, Duration::from_secs(10)) {
                Ok(r) => return (r.status, r.body),
                Err(e) => last = e,
            }
        }
        panic!(
            "no server answered {method} {path}: {last}\n{}",
            self.logs()
        )
    }

    /// A leader on every running server and a CA root: what the sidecars need.
    fn wait_for_roots(&self) {
        wait_until(Duration::from_secs(90), "a leader and CA roots on every server", || {
            self.up().into_iter().all(|i| {
                matches!(
                    self.request(&self.http[i], "GET", "/v1/agent/connect/ca/roots", None, Duration::from_secs(2)),
                    Ok(r) if r.status == 200 && r.body.contains("RootCert")
                )
            })
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    /// Every running server counts all three as voters and knows a leader: a server back
    /// from a cut may have been removed as dead meanwhile (autopilot), and until it votes
    /// again, stopping another would leave no quorum.
    fn wait_for_three_voters(&self) {
        wait_until(
            Duration::from_secs(90),
            "three voters on every server",
            || {
                self.up().into_iter().all(|i| {
                    let ask = |path| {
                        self.request(&self.http[i], "GET", path, None, Duration::from_secs(2))
                            .ok()
                            .filter(|r| r.status == 200)
                            .and_then(|r| serde_json::from_str::<Value>(&r.body).ok())
                    };
                    let voters = ask("/v1/status/peers")
                        .and_then(|v| v.as_array().map(Vec::len))
                        .unwrap_or(0);
                    let leader = ask("/v1/status/leader")
                        .and_then(|v| v.as_str().map(|l| !l.is_empty()))
                        .unwrap_or(false);
                    // Gossip too: until every server sees the others alive again, one
                    // that does not cannot forward to a leader it has not re-joined.
                    let alive = ask("/v1/agent/members")
                        .and_then(|v| {
                            v.as_array()
                                .map(|m| m.iter().filter(|m| m["Status"] == 1).count())
                        })
                        .unwrap_or(0);
                    voters == 3 && leader && alive == 3
                })
            },
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", self.logs()));
    }

    fn leader(&self) -> String {
        self.call("GET", "/v1/status/leader", None).1
    }

    fn logs(&self) -> String {
        self.servers
            .iter()
            .flatten()
            .map(Child::logs)
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Put for Cluster {
    /// Retried on every reachable server while the servers elect a new leader (a write then
    /// answers 500). A server whose gossip has not yet seen a healed peer again answers 500
    /// "Raft leader not found in server lookup mapping" while the leader itself takes writes
    /// (serf retries a failed member only every 30 s), so each round asks every server.
    fn put(&self, path: &str, body: &str) -> (u16, String) {
        let mut answer = (0, String::new());
        let _ = wait_until(Duration::from_secs(90), "a leader taking writes", || {
            self.up().into_iter().any(|i| {
                match self.request(
                    &self.http[i],
                    "PUT",
                    path,
                    Some(body),
                    Duration::from_secs(10),
                ) {
                    Ok(r) => answer = (r.status, r.body),
                    Err(e) => answer = (0, e),
                }
                answer.0 != 500 && answer.0 != 0
            })
        });
        answer
    }
}

/// `server-1` (its app on `app_port`) and `client-1` with `server` as its upstream, both
/// passing: the public port of server-1's proxy and the client's upstream port.
fn register_server_and_client(cluster: &dyn Put, app_port: u16) -> (u16, u16) {
    let public = register_instance(
        cluster,
        "server",
        "server-1",
        app_port,
        json!([]),
        "passing",
    );
    let upstream_port = free_port();
    register_instance(
        cluster,
        "client",
        "client-1",
        free_port(),
        json!([{"DestinationName": "server", "LocalBindPort": upstream_port}]),
        "passing",
    );
    (public, upstream_port)
}

/// Three servers, the sidecars given all three after a server with no leader (which they
/// leave): the server they use is stopped (the leader too, when it is the one), and a change
/// made afterwards reaches them through another.
#[test]
fn the_sidecars_move_to_another_server_when_theirs_stops() {
    if skipped() {
        return;
    }
    let base = TempDir::new("agentless-failover");
    let mut cluster = Cluster::start();
    let apps = [HttpApp::start("server-1"), HttpApp::start("server-2")];
    let (public, upstream_port) = register_server_and_client(&cluster, apps[0].port());
    // Each sidecar is given a server that has no leader first, and leaves it for server 0.
    let (_lone, lone) = cluster.lone_server();
    let servers = format!("{lone},{}", cluster.http.join(","));
    let mut sidecars: Vec<Child> = ["server-1", "client-1"]
        .iter()
        .map(|id| agentless_sidecar(&base, &format!("{id}-sidecar-proxy"), &servers, None))
        .collect();
    let upstream = format!("127.0.0.1:{upstream_port}");
    wait_until(Duration::from_secs(60), "server-1 through the mesh", || {
        answers(&upstream, 4) == ["server-1"]
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&sidecars)));

    assert!(asks_for_client_certificate(public));
    let leader_before = cluster.leader();
    if let Some(mut first) = cluster.servers[0].take() {
        first.stop();
    }
    cluster.wait_for_roots();
    let load = Load::start(upstream.clone());
    // The second instance, registered through a server still up and passing before its
    // sidecar starts: its listener opens only once it knows whom to let in, so the client's
    // identity check admits it no earlier.
    register_instance(
        &cluster,
        "server",
        "server-2",
        apps[1].port(),
        json!([]),
        "passing",
    );
    sidecars.push(agentless_sidecar(
        &base,
        "server-2-sidecar-proxy",
        &cluster.http[1..].join(","),
        None,
    ));
    let r = wait_until(
        Duration::from_secs(60),
        "server-2 through the mesh after the stop",
        || answers(&upstream, 8).len() == 2,
    );
    r.unwrap_or_else(|e| panic!("{e}\n{}\n{}", all_logs(&sidecars), cluster.logs()));
    let (ok, failed, errors) = load.finish();
    assert!(
        ok > 0 && failed == 0,
        "{ok} ok, {failed} failed: {errors:?}"
    );
    for s in &sidecars[..2] {
        for left in [&lone, &cluster.http[0]] {
            assert!(
                s.log_contains(&format!("Consul server http://{left} failed")),
                "{left} not left\n{}",
                s.logs()
            );
        }
    }
    // The other server signed new leaves; the listener still demands a client certificate.
    assert!(
        sidecars[0].log_contains("leaf certificate updated"),
        "{}",
        sidecars[0].logs()
    );
    assert!(
        asks_for_client_certificate(public),
        "mTLS kept after the new leaf"
    );
    eprintln!(
        "the leader before the stop was {leader_before}; server 0 was {}",
        cluster.http[0]
    );
    for s in &mut sidecars {
        s.signal(Signal::SIGTERM);
        assert_eq!(
            s.wait_timeout(Duration::from_secs(60))
                .and_then(|s| s.code()),
            Some(0)
        );
    }
}

/// A test counter: a pass-through TCP proxy in front of the Consul server that notes each
/// HTTP request it forwards (when, method, path with query) and changes no byte. Bodies are
/// skipped by their `Content-Length` (the sidecar's client sends no chunked bodies).
struct RequestCounter {
    addr: String,
    seen: Arc<Mutex<Vec<(Instant, String, String)>>>,
}

impl RequestCounter {
    fn start(server: String) -> RequestCounter {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let seen: Arc<Mutex<Vec<(Instant, String, String)>>> = Arc::default();
        let notes = seen.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().flatten() {
                let Ok(upstream) = TcpStream::connect(&server) else {
                    continue;
                };
                let (mut from_server, mut to_client) =
                    (upstream.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || {
                    let _ = std::io::copy(&mut from_server, &mut to_client);
                    let _ = to_client.shutdown(Shutdown::Write);
                });
                let notes = notes.clone();
                std::thread::spawn(move || forward_noting(client, upstream, &notes));
            }
        });
        RequestCounter { addr, seen }
    }

    fn since(&self, t: Instant) -> Vec<(Instant, String, String)> {
        let seen = self.seen.lock().unwrap();
        seen.iter().filter(|(at, ..)| *at >= t).cloned().collect()
    }
}

fn forward_noting(
    mut client: TcpStream,
    mut server: TcpStream,
    notes: &Mutex<Vec<(Instant, String, String)>>,
) {
    let (mut pending, mut skip) = (Vec::<u8>::new(), 0usize);
    let mut buf = [0u8; 16384];
    loop {
        let n = match client.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if server.write_all(&buf[..n]).is_err() {
            break;
        }
        pending.extend_from_slice(&buf[..n]);
        loop {
            if skip > 0 {
                let k = skip.min(pending.len());
                pending.drain(..k);
                skip -= k;
                if skip > 0 {
                    break;
                }
            }
            let Some(end) = pending.windows(4).position(|w| w == b"\r\n\r\n") else {
                break;
            };
            let head = String::from_utf8_lossy(&pending[..end]).to_string();
            pending.drain(..end + 4);
            let mut words = head.lines().next().unwrap_or_default().split(' ');
            let (method, path) = (
                words.next().unwrap_or_default(),
                words.next().unwrap_or_default(),
            );
            assert!(
                !head
                    .to_ascii_lowercase()
                    .contains("transfer-encoding: chunked"),
                "the counter cannot follow a chunked body: {head}"
            );
            skip = head
                .lines()
                .filter_map(|l| l.split_once(':'))
                .find(|(k, _)| k.trim().eq_ignore_ascii_case("content-length"))
                .and_then(|(_, v)| v.trim().parse().ok())
                .unwrap_or(0);
            notes
                .lock()
                .unwrap()
                .push((Instant::now(), method.to_string(), path.to_string()));
        }
    }
    let _ = server.shutdown(Shutdown::Write);
}

/// The efficiency the issue asks for, counted: one agentless sidecar with 10 upstreams (and
/// its stats service in the catalog) at rest for 60 s, every request it makes to the server
/// counted by a pass-through counter. Every watch is a blocking query, so at rest nothing
/// is read again except what the sidecar schedules: the ACL default policy, every 30 s
/// (`consul::kinds`), and the stats service's check, written only when readiness changes.
/// So no endpoint may be asked twice within 10 s, and the minute holds at most the
/// scheduled reads (60 s / 30 s) and a few wake-ups.
#[test]
fn at_rest_every_watch_is_a_blocking_query() {
    if skipped() {
        return;
    }
    let begun = Instant::now();
    let base = TempDir::new("agentless-at-rest");
    let consul = Consul::start();
    let counter = RequestCounter::start(consul.http_addr());
    let upstreams: Vec<Value> = (0..10)
        .map(|i| json!({"DestinationName": format!("up-{i}"), "LocalBindPort": free_port()}))
        .collect();
    register_instance(
        &consul,
        "client",
        "client-1",
        free_port(),
        Value::Array(upstreams),
        "passing",
    );
    let stats = format!("127.0.0.1:{}", free_port());
    let mut cmd = agentless_command(&base, "client-1-sidecar-proxy", &counter.addr, None);
    cmd.args(["-stats-addr", &stats, "-stats-service-register"]);
    let mut sidecar = Child::spawn("sidecar-at-rest", &mut cmd, base.path());
    wait_until(Duration::from_secs(60), "the sidecar ready", || {
        matches!(
            http_get(&stats, "/ready", Duration::from_secs(2)),
            Ok((200, _))
        )
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.logs()));
    // The check's first write and the last first reads settle.
    std::thread::sleep(Duration::from_secs(5));
    let start = Instant::now();
    std::thread::sleep(Duration::from_secs(60));
    let seen = counter.since(start);
    let before = counter.since(begun);
    let mut by_endpoint: BTreeMap<String, Vec<Instant>> = BTreeMap::new();
    for (at, method, path) in &seen {
        let endpoint = path.split('?').next().unwrap_or_default();
        by_endpoint
            .entry(format!("{method} {endpoint}"))
            .or_default()
            .push(*at);
    }
    let summary: Vec<String> = by_endpoint
        .iter()
        .map(|(e, at)| format!("{e}: {}", at.len()))
        .collect();
    eprintln!(
        "at rest: {} requests in 60 s ({} since start): {summary:?}",
        seen.len(),
        before.len()
    );
    for (endpoint, at) in &by_endpoint {
        for pair in at.windows(2) {
            assert!(
                pair[1] - pair[0] >= Duration::from_secs(10),
                "{endpoint} asked twice within {:?} at rest: {summary:?}",
                pair[1] - pair[0]
            );
        }
    }
    assert!(
        seen.len() <= 6,
        "{} requests in a minute at rest: {summary:?}\n{}",
        seen.len(),
        sidecar.logs()
    );
    // The watches do run through the counter: it saw the blocking reads before the rest.
    assert!(
        before
            .iter()
            .filter(|(_, _, p)| p.contains("index="))
            .count()
            >= 10,
        "{before:?}"
    );
    sidecar.signal(Signal::SIGTERM);
    assert_eq!(
        sidecar
            .wait_timeout(Duration::from_secs(60))
            .and_then(|s| s.code()),
        Some(0)
    );
}

/// An app on the pod's loopback, dropped from inside that host, where its listener is.
struct PodApp {
    app: Option<HttpApp>,
    host: Host,
}

impl PodApp {
    fn start(host: &Host, body: &str) -> PodApp {
        PodApp {
            app: Some(host.run(|| HttpApp::start(body))),
            host: host.clone(),
        }
    }

    fn port(&self) -> u16 {
        self.app.as_ref().map_or(0, HttpApp::port)
    }
}

impl Drop for PodApp {
    fn drop(&mut self) {
        let app = self.app.take();
        self.host.run(move || drop(app));
    }
}

/// The fail-over cases across hosts, as the issue asks: each server is a host of its own,
/// reached at its own address, and the sidecars run on another.
///
/// First the server they use (the first of their list) is CUT off, not stopped: its host's
/// link goes down, so its connections get no answer and no reset, and the blocking queries
/// held there would wait out their 5 minutes. The sidecars' connections give it up within
/// `DEAD_PEER_AFTER` (TCP keepalive, `src/http.rs`), the queries resume on the next server
/// with their index, and a change made after the cut (a waiting instance's check set passing)
/// reaches the client within that bound and the time to apply it, no request failing.
///
/// Then, the cut host back, the server they use now is stopped; they move to the next, and an
/// instance registered and started afterwards reaches the client, no request failing.
#[test]
fn across_hosts_the_sidecars_move_to_another_server_when_theirs_stops() {
    if skipped() {
        return;
    }
    if !can_create_namespaces() {
        eprintln!("agentless across hosts: SKIPPED: network namespaces need root");
        return;
    }
    let net = Net::new(&["s0", "s1", "s2", "pod"]);
    across_hosts(&net);
    net.remove_and_check();
}

/// How long the sidecar's connections leave a silent server before giving it up
/// (`http::DEAD_PEER_AFTER`).
const DEAD_PEER_AFTER: Duration = Duration::from_secs(14);
/// From the cut to the change seen through the mesh, beyond `DEAD_PEER_AFTER`: the new
/// server's answer, the delta applied, the new instance's identity check, a few requests.
const APPLY_MARGIN: Duration = Duration::from_secs(10);

fn across_hosts(net: &Net) {
    let base = TempDir::new("agentless-hosts");
    let mut cluster = Cluster::start_on_hosts(net);
    let pod = net.host("pod").clone();
    let apps = [
        PodApp::start(&pod, "server-1"),
        PodApp::start(&pod, "server-2"),
        PodApp::start(&pod, "server-3"),
    ];
    let (_, upstream_port) = register_server_and_client(&cluster, apps[0].port());
    // The change to follow after the cut: an instance whose sidecar serves, held out of the
    // client's pool by its check until then.
    let public_2 = register_instance(
        &cluster,
        "server",
        "server-2",
        apps[1].port(),
        json!([]),
        "critical",
    );
    let servers = cluster.http.clone();
    let spawn = |id: &str, list: &str| {
        let proxy_id = format!("{id}-sidecar-proxy");
        let mut cmd = pod.command(bin_path());
        agentless_args(&mut cmd, &base, &proxy_id, list, None);
        Child::spawn(&format!("sidecar-{proxy_id}"), &mut cmd, base.path())
    };
    let mut sidecars = vec![
        spawn("server-1", &servers.join(",")),
        spawn("client-1", &servers.join(",")),
        spawn("server-2", &servers.join(",")),
    ];
    let upstream = format!("127.0.0.1:{upstream_port}");
    wait_until(Duration::from_secs(60), "server-1 through the mesh", || {
        pod.run(|| answers(&upstream, 4)) == ["server-1"]
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&sidecars)));
    wait_until(
        Duration::from_secs(60),
        "server-2's sidecar listening",
        || pod.run(|| asks_for_client_certificate(public_2)),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", all_logs(&sidecars)));
    // Every watch has settled into a blocking query on the first server.
    std::thread::sleep(Duration::from_secs(3));

    let load = pod.run(|| Load::start(upstream.clone()));
    net.cut("s0");
    let cut = Instant::now();
    cluster.cut[0] = true;
    // Written through the servers still reachable, once they have a leader again.
    set_check(&cluster, "server-2", "passing");
    let changed = cut.elapsed();
    wait_until(
        DEAD_PEER_AFTER + APPLY_MARGIN + Duration::from_secs(30),
        "server-2 through the mesh after the cut",
        || pod.run(|| answers(&upstream, 8)).len() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", all_logs(&sidecars), cluster.logs()));
    let seen = cut.elapsed();
    eprintln!("cut: the change written {changed:?} and seen {seen:?} after the cut");
    assert!(
        seen <= DEAD_PEER_AFTER.max(changed) + APPLY_MARGIN,
        "the change written {changed:?} after the cut was seen only {seen:?} after it\n{}",
        all_logs(&sidecars)
    );
    let (ok, failed, errors) = load.finish();
    assert!(
        ok > 0 && failed == 0,
        "across the cut: {ok} ok, {failed} failed: {errors:?}"
    );
    for s in &sidecars {
        assert!(
            s.log_contains(&format!("Consul server http://{} failed", servers[0])),
            "{} not left\n{}",
            servers[0],
            s.logs()
        );
    }

    // The cut host back, the server the client uses now (the next of the list, unless that
    // had no leader yet when the cut was noticed) is stopped.
    let moved_to =
        |s: &Child| (1..3).find(|i| s.log_contains(&format!("now using http://{}", servers[*i])));
    let moved: Vec<Option<usize>> = sidecars.iter().map(moved_to).collect();
    let in_use = moved[1].unwrap_or(1);
    let other = 3 - in_use;
    net.restore("s0");
    cluster.cut[0] = false;
    cluster.wait_for_roots();
    cluster.wait_for_three_voters();
    if let Some(mut second) = cluster.servers[in_use].take() {
        second.stop();
    }
    cluster.wait_for_roots();
    let load = pod.run(|| Load::start(upstream.clone()));
    register_instance(
        &cluster,
        "server",
        "server-3",
        apps[2].port(),
        json!([]),
        "passing",
    );
    sidecars.push(spawn(
        "server-3",
        &format!("{},{}", servers[other], servers[0]),
    ));
    wait_until(
        Duration::from_secs(60),
        "server-3 through the mesh after the stop",
        || pod.run(|| answers(&upstream, 12)).len() == 3,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", all_logs(&sidecars), cluster.logs()));
    let (ok, failed, errors) = load.finish();
    assert!(
        ok > 0 && failed == 0,
        "across the stop: {ok} ok, {failed} failed: {errors:?}"
    );
    for (s, _) in sidecars
        .iter()
        .zip(&moved)
        .filter(|(_, m)| **m == Some(in_use))
    {
        assert!(
            s.log_contains(&format!("Consul server http://{} failed", servers[in_use])),
            "{} not left\n{}",
            servers[in_use],
            s.logs()
        );
    }
    for s in &mut sidecars {
        s.signal(Signal::SIGTERM);
        assert_eq!(
            s.wait_timeout(Duration::from_secs(60))
                .and_then(|s| s.code()),
            Some(0),
            "{}",
            s.logs()
        );
    }
}
