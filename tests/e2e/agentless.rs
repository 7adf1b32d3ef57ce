//! Agentless (issue 30): sidecars beside no Consul agent, as consul-dataplane runs in
//! Kubernetes. The services and proxies are registered in the catalog only, on a node no agent
//! runs (`/v1/catalog/register`), the Consul server has ACLs on with default deny, and each
//! sidecar logs in through a JWT auth method whose key and tokens the test makes with openssl.
//! Consul 1.16.3 only: catalog-only proxies and the login flow as consul-k8s uses them.

use std::path::Path;
use std::process::Command;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::load::Load;
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
    let rule = json!({
        "AuthMethod": METHOD, "BindType": "service", "BindName": "${value.service}",
    });
    let (status, body) = consul.put("/v1/acl/binding-rule", &rule.to_string());
    assert_eq!(status, 200, "{body}");
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
    cmd
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
        sidecars.push(agentless_sidecar(
            &base,
            &format!("{id}-sidecar-proxy"),
            &servers,
            Some(&bearer),
        ));
    }
    let upstream = format!("127.0.0.1:{upstream_port}");
    let logs = |sidecars: &[Child]| {
        sidecars
            .iter()
            .map(|s| s.logs())
            .collect::<Vec<_>>()
            .join("\n")
    };
    wait_until(
        Duration::from_secs(60),
        "both instances through the mesh",
        || answers(&upstream, 8).len() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", logs(&sidecars), consul.logs()));
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

    // A catalog check set critical takes the instance out, under load, failing nothing.
    let load = Load::start(upstream.clone());
    set_check(&consul, "server-1", "critical");
    wait_until(Duration::from_secs(10), "server-1 out", || {
        answers(&upstream, 8) == ["server-2"]
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&sidecars)));
    set_check(&consul, "server-1", "passing");
    wait_until(Duration::from_secs(10), "server-1 back", || {
        answers(&upstream, 8).len() == 2
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&sidecars)));
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
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&sidecars)));
    set_check(&consul, "server-2", "critical");
    wait_until(
        Duration::from_secs(10),
        "server-2 out after the new login",
        || answers(&upstream, 8) == ["server-1"],
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&sidecars)));
    set_check(&consul, "server-2", "passing");
    wait_until(
        Duration::from_secs(10),
        "server-2 back after the new login",
        || answers(&upstream, 8).len() == 2,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&sidecars)));
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
        logs(&sidecars)
    );
}

/// Three Consul servers on loopback, each on ports of its own, no agent beside them.
struct Cluster {
    // Declared before `dir`: the processes stop before their directories go.
    servers: Vec<Option<Child>>,
    http: Vec<String>,
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
        let cluster = Cluster { servers, http, dir };
        cluster.wait_for_roots();
        cluster
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

    /// The indices of the servers still running.
    fn up(&self) -> Vec<usize> {
        (0..3).filter(|i| self.servers[*i].is_some()).collect()
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        let mut last = String::new();
        for i in self.up() {
            match http_request(
                &self.http[i],
                method,
                path,
                body.map(str::as_bytes),
                Duration::from_secs(10),
            ) {
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
        wait_until(Duration::from_secs(60), "a leader and CA roots on every server", || {
            self.up().into_iter().all(|i| {
                matches!(
                    http_request(&self.http[i], "GET", "/v1/agent/connect/ca/roots", None, Duration::from_secs(2)),
                    Ok(r) if r.status == 200 && r.body.contains("RootCert")
                )
            })
        })
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
    /// Retried while the servers elect a new leader (a write then answers 500).
    fn put(&self, path: &str, body: &str) -> (u16, String) {
        let mut answer = (0, String::new());
        let _ = wait_until(Duration::from_secs(30), "a leader taking writes", || {
            answer = self.call("PUT", path, Some(body));
            answer.0 != 500
        });
        answer
    }
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
    let public = register_instance(
        &cluster,
        "server",
        "server-1",
        apps[0].port(),
        json!([]),
        "passing",
    );
    let upstream_port = free_port();
    register_instance(
        &cluster,
        "client",
        "client-1",
        free_port(),
        json!([{"DestinationName": "server", "LocalBindPort": upstream_port}]),
        "passing",
    );
    // Each sidecar is given a server that has no leader first, and leaves it for server 0.
    let (_lone, lone) = cluster.lone_server();
    let servers = format!("{lone},{}", cluster.http.join(","));
    let mut sidecars: Vec<Child> = ["server-1", "client-1"]
        .iter()
        .map(|id| agentless_sidecar(&base, &format!("{id}-sidecar-proxy"), &servers, None))
        .collect();
    let upstream = format!("127.0.0.1:{upstream_port}");
    let logs = |sidecars: &[Child]| {
        sidecars
            .iter()
            .map(Child::logs)
            .collect::<Vec<_>>()
            .join("\n")
    };
    wait_until(Duration::from_secs(60), "server-1 through the mesh", || {
        answers(&upstream, 4) == ["server-1"]
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", logs(&sidecars)));

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
    r.unwrap_or_else(|e| panic!("{e}\n{}\n{}", logs(&sidecars), cluster.logs()));
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
