//! A Consul dev agent of its own per test, and what the tests ask of it.

use super::*;

/// The Consul binary every test runs: `CONSUL_BIN`, or `consul` on the PATH. scripts/test runs
/// the whole suite once per supported version by setting it.
pub fn consul_bin() -> std::ffi::OsString {
    std::env::var_os("CONSUL_BIN").unwrap_or_else(|| "consul".into())
}

/// The version of `consul_bin()` as `(major, minor, patch)`, asked once. When
/// `HCC_EXPECT_CONSUL_VERSION` is set (scripts/test sets it per leg) and the binary is another
/// version, this panics: a leg must not silently test the Consul the environment happened to
/// name instead of the one it was told to.
pub fn consul_version() -> String {
    static VERSION: OnceLock<String> = OnceLock::new();
    VERSION
        .get_or_init(|| {
            let out = Command::new(consul_bin())
                .arg("version")
                .output()
                .expect("consul installed by scripts/install-deps (or CONSUL_BIN)");
            let text = String::from_utf8_lossy(&out.stdout);
            let version = text
                .lines()
                .next()
                .and_then(|l| l.strip_prefix("Consul v"))
                .map(|v| v.split(['-', '+', ' ']).next().unwrap_or(v).to_string())
                .unwrap_or_else(|| panic!("cannot tell the Consul version from {text:?}"));
            if let Some(want) = expected_consul_version() {
                assert_eq!(
                    version,
                    want,
                    "{:?} is Consul {version}, but HCC_EXPECT_CONSUL_VERSION asks for {want}",
                    consul_bin()
                );
            }
            version
        })
        .clone()
}

/// The Consul version this run was told to test (`HCC_EXPECT_CONSUL_VERSION`), if any.
pub fn expected_consul_version() -> Option<String> {
    std::env::var("HCC_EXPECT_CONSUL_VERSION")
        .ok()
        .filter(|v| !v.is_empty())
}

/// Consul 1.10 or later: config-entry intentions, the gRPC TLS port, no duplicate upstreams.
pub fn consul_is_current() -> bool {
    let v: Vec<u32> = consul_version()
        .split('.')
        .map(|p| p.parse().unwrap_or(0))
        .collect();
    v.as_slice() >= [1, 10].as_slice()
}

/// One intention as a test wants it, written as Consul's version expects (see
/// `Consul::set_intentions`).
#[derive(Clone, Debug)]
pub struct IntentionSpec {
    pub source: String,
    /// `allow` or `deny`; `None` with `permissions` for an L7 intention.
    pub action: Option<String>,
    /// A cluster peer's source (Consul 1.13+).
    pub peer: Option<String>,
    /// HTTP permissions, as the config entry takes them (Consul 1.9+).
    pub permissions: Option<Value>,
}

impl IntentionSpec {
    pub fn l4(source: &str, action: &str) -> IntentionSpec {
        IntentionSpec {
            source: source.into(),
            action: Some(action.into()),
            peer: None,
            permissions: None,
        }
    }
}

/// A `consul agent -dev` of its own: free loopback ports (DNS and WAN off), the fixed
/// `CLUSTER_ID`, in-memory state in a temp dir, from `consul_bin()`.
pub struct Consul {
    // Declared before `_dir`: the process must stop before its directory is removed.
    child: Child,
    http_addr: String,
    trust_domain: String,
    /// The management token when ACLs are on; the harness's own calls carry it.
    token: Option<String>,
    /// Held only to be removed at drop, after the agent stopped.
    _dir: TempDir,
}

/// The bootstrap ("master" in 1.8) token of `Consul::start_acl_deny`.
pub const ACL_MASTER_TOKEN: &str = "a1b2c3d4-0000-4000-8000-00000000feed";

impl Consul {
    pub fn start() -> Consul {
        Consul::start_with(serde_json::json!({}), None)
    }

    /// An agent that allocates the listeners of exposed checks from `min_port` (so that agents
    /// of parallel tests do not all take Consul's default 21500). Consul's range ends at
    /// `min_port + 1`, so `min_port` must come from `free_port_pair`, which reserves both.
    pub fn start_expose_from(min_port: u16) -> Consul {
        assert!(
            was_handed_out(min_port) && min_port.checked_add(1).is_some_and(was_handed_out),
            "start_expose_from({min_port}): take the port from free_port_pair()"
        );
        Consul::start_with(
            serde_json::json!({"ports": {
                "expose_min_port": min_port, "expose_max_port": min_port + 1
            }}),
            None,
        )
    }

    /// Two datacenters on loopback, each one dev agent: `dc1` (the primary) and `dc2`, joined
    /// over the WAN, so that `dc2` signs its leaves under `dc1`'s roots.
    pub fn start_federated() -> (Consul, Consul) {
        let wan = free_port();
        let dc1 = Consul::start_with(
            serde_json::json!({"primary_datacenter": "dc1", "ports": {"serf_wan": wan}}),
            None,
        );
        let dc2 = Consul::start_with(
            serde_json::json!({
                "datacenter": "dc2", "primary_datacenter": "dc1",
                "ports": {"serf_wan": free_port()},
                "retry_join_wan": [format!("127.0.0.1:{wan}")]
            }),
            None,
        );
        (dc1, dc2)
    }

    /// Two clusters on loopback (Consul 1.14+), each one dev agent with a trust domain of its
    /// own, peered over the HTTP API: `dc2` generated the token for a peer it calls `dc1`, and
    /// `dc1` established it as `dc2`; both sides are ACTIVE on return. Peering needs gRPC with
    /// TLS, which a dev agent serves with its own certificate on the port given here.
    pub fn start_peered() -> (Consul, Consul) {
        let cluster = |dc: &str, cluster_id: &str| {
            Consul::start_with(
                serde_json::json!({
                    "datacenter": dc,
                    "ports": {"grpc_tls": free_port()},
                    "connect": {"enabled": true, "ca_config": {"cluster_id": cluster_id}},
                }),
                None,
            )
        };
        let dc1 = cluster("dc1", CLUSTER_ID);
        let dc2 = cluster("dc2", PEER_CLUSTER_ID);
        let (status, body) = dc2.post("/v1/peering/token", r#"{"PeerName":"dc1"}"#);
        assert_eq!(status, 200, "peering token: {body}");
        let token: Value = serde_json::from_str(&body).expect("a peering token answer");
        let establish = serde_json::json!({
            "PeerName": "dc2", "PeeringToken": token["PeeringToken"],
        });
        // dc2's gRPC server may not take the dial-back yet right after the token was made (seen
        // once under a parallel run): establishing is tried again until it is accepted.
        let mut last = String::new();
        wait_until(
            Duration::from_secs(30),
            "the peering to be established",
            || {
                let (status, body) = dc1.post("/v1/peering/establish", &establish.to_string());
                last = body;
                status == 200
            },
        )
        .unwrap_or_else(|e| panic!("{e}: peering establish: {last}"));
        for (c, peer) in [(&dc1, "dc2"), (&dc2, "dc1")] {
            wait_until(Duration::from_secs(30), "the peering to be active", || {
                let (_, body) = c.get(&format!("/v1/peering/{peer}"));
                serde_json::from_str::<Value>(&body).is_ok_and(|v| v["State"] == "ACTIVE")
            })
            .unwrap_or_else(|e| panic!("{e}\n{}", c.logs()));
        }
        (dc1, dc2)
    }

    /// An agent with ACLs on and default policy deny; the harness uses `ACL_MASTER_TOKEN`.
    pub fn start_acl_deny() -> Consul {
        Consul::start_acl("deny")
    }

    /// An agent with ACLs on and the given default policy (`allow` or `deny`).
    pub fn start_acl(default_policy: &str) -> Consul {
        Consul::start_with(
            serde_json::json!({"acl": {
                "enabled": true,
                "default_policy": default_policy,
                "down_policy": "extend-cache",
                "tokens": {"master": ACL_MASTER_TOKEN, "agent": ACL_MASTER_TOKEN}
            }}),
            Some(ACL_MASTER_TOKEN.to_string()),
        )
    }

    fn start_with(extra: Value, token: Option<String>) -> Consul {
        // `free_port` releases the port before Consul binds it, so a parallel test can take it
        // in between: an agent that exits on a port already taken is started again on new ones.
        for _ in 0..3 {
            if let Some(consul) = Consul::try_start_with(&extra, token.clone()) {
                return consul;
            }
        }
        panic!("consul could not bind free ports three times in a row");
    }

    fn try_start_with(extra: &Value, token: Option<String>) -> Option<Consul> {
        let dir = TempDir::new("consul");
        let http_port = free_port();
        let config = serde_json::json!({
            "node_name": "node1",
            "datacenter": "dc1",
            "bind_addr": "127.0.0.1",
            "client_addr": "127.0.0.1",
            "advertise_addr": "127.0.0.1",
            "data_dir": dir.join("data"),
            "log_level": "info",
            // No checkpoint calls to hashicorp.com: tests stay on loopback.
            "disable_update_check": true,
            "disable_anonymous_signature": true,
            // Every port explicit: -dev defaults (8500, 8502, 8600, …) would collide between
            // agents of parallel tests.
            "ports": {
                "http": http_port,
                "dns": -1,
                "serf_lan": free_port(),
                "serf_wan": -1,
                "server": free_port(),
                "grpc": free_port(),
            },
            "connect": { "enabled": true, "ca_config": { "cluster_id": CLUSTER_ID } },
        });
        let mut config = config;
        if consul_is_current() {
            // 1.14+ opens a gRPC TLS port (8503) unless told not to; 1.8 rejects the key.
            config["ports"]["grpc_tls"] = (-1).into();
        }
        if let (Some(c), Some(e)) = (config.as_object_mut(), extra.as_object()) {
            for (k, v) in e {
                // One level deep: `ports` from `extra` adds to the free ports above.
                match (c.get_mut(k).and_then(Value::as_object_mut), v.as_object()) {
                    (Some(mine), Some(theirs)) => {
                        mine.extend(theirs.iter().map(|(k, v)| (k.clone(), v.clone())))
                    }
                    _ => {
                        c.insert(k.clone(), v.clone());
                    }
                }
            }
        }
        let config_path = dir.join("consul.json");
        fs::write(&config_path, config.to_string()).expect("write consul.json");
        let mut cmd = Command::new(consul_bin());
        cmd.arg("agent")
            .arg("-dev")
            .arg("-config-file")
            .arg(&config_path);
        let child = Child::spawn("consul", &mut cmd, dir.path());
        let mut consul = Consul {
            child,
            http_addr: format!("127.0.0.1:{http_port}"),
            trust_domain: String::new(),
            token,
            _dir: dir,
        };
        consul.wait_ready().then_some(consul)
    }

    // Ready means what a sidecar needs: a leader, our node in the catalog (so health queries
    // see registered services) and a CA root (so leaf certificates can be signed).
    /// False when the agent exited because a port it was given was taken meanwhile.
    fn wait_ready(&mut self) -> bool {
        let timeout = Duration::from_secs(30);
        let addr = self.http_addr.clone();
        let token = self.token.clone();
        let with_token = |p: &str| match &token {
            Some(t) => format!("{p}?token={t}"),
            None => p.to_string(),
        };
        let mut trust_domain = String::new();
        let ready = wait_until(timeout, "consul leader, catalog node and CA root", || {
            if !self.child.is_running() {
                return true;
            }
            let leader = json_at(&addr, "/v1/status/leader");
            if leader
                .as_ref()
                .and_then(Value::as_str)
                .unwrap_or_default()
                .is_empty()
            {
                return false;
            }
            let nodes = json_at(&addr, &with_token("/v1/catalog/nodes"));
            if nodes
                .as_ref()
                .and_then(Value::as_array)
                .is_none_or(Vec::is_empty)
            {
                return false;
            }
            let Some(roots) = json_at(&addr, "/v1/agent/connect/ca/roots") else {
                return false;
            };
            if roots["ActiveRootID"]
                .as_str()
                .unwrap_or_default()
                .is_empty()
            {
                return false;
            }
            trust_domain = roots["TrustDomain"]
                .as_str()
                .unwrap_or_default()
                .to_string();
            true
        });
        if let Some(status) = self.child.try_wait() {
            let logs = self.logs();
            if logs.contains("address already in use")
                || logs.contains("failed to obtain an address")
            {
                eprintln!(
                    "consul exited on a port taken meanwhile; starting it again on new ports"
                );
                return false;
            }
            panic!("consul exited ({status}) while starting\n{logs}");
        }
        if let Err(e) = ready {
            panic!("{e}\n{}", self.logs());
        }
        self.trust_domain = trust_domain;
        true
    }

    /// "127.0.0.1:PORT", the value for `CONSUL_HTTP_ADDR` / `-http-addr`.
    pub fn http_addr(&self) -> String {
        self.http_addr.clone()
    }

    /// `<cluster id>.consul` as the agent reports it; equals `TRUST_DOMAIN`.
    pub fn trust_domain(&self) -> String {
        self.trust_domain.clone()
    }

    pub fn pid(&self) -> u32 {
        self.child.pid()
    }

    pub fn logs(&self) -> String {
        self.child.logs()
    }

    /// Any request, with headers; use for blocking queries (pass a timeout above `wait`).
    pub fn request(
        &self,
        method: &str,
        path: &str,
        body: Option<&str>,
        timeout: Duration,
    ) -> Result<HttpResponse, String> {
        // A query parameter keeps the tiny client header-free; fine for a throwaway test token.
        let path = match &self.token {
            Some(t) => format!(
                "{path}{}token={t}",
                if path.contains('?') { '&' } else { '?' }
            ),
            None => path.to_string(),
        };
        http_request(
            &self.http_addr,
            method,
            &path,
            body.map(str::as_bytes),
            timeout,
        )
    }

    fn call(&self, method: &str, path: &str, body: Option<&str>) -> (u16, String) {
        match self.request(method, path, body, Duration::from_secs(10)) {
            Ok(r) => (r.status, r.body),
            Err(e) => panic!("{e}\n{}", self.logs()),
        }
    }

    pub fn get(&self, path: &str) -> (u16, String) {
        self.call("GET", path, None)
    }

    pub fn put(&self, path: &str, body: &str) -> (u16, String) {
        self.call("PUT", path, Some(body))
    }

    pub fn post(&self, path: &str, body: &str) -> (u16, String) {
        self.call("POST", path, Some(body))
    }

    pub fn delete(&self, path: &str) -> (u16, String) {
        self.call("DELETE", path, None)
    }

    /// GET that must answer 200 with JSON.
    pub fn get_json(&self, path: &str) -> Value {
        let (status, body) = self.get(path);
        assert_eq!(status, 200, "GET {path}: {body}");
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: {e}: {body}"))
    }

    pub fn is_current(&self) -> bool {
        consul_is_current()
    }

    /// Creates (or replaces) one intention as an operator of this Consul version would: a
    /// `service-intentions` config entry on current Consul, `POST /v1/connect/intentions` on
    /// 1.8. Asserts Consul took it; returns a handle for `delete_intention`.
    pub fn create_intention(&self, source: &str, destination: &str, action: &str) -> String {
        if !self.is_current() {
            let body = serde_json::json!({
                "SourceName": source, "DestinationName": destination, "Action": action
            });
            let (status, body) = self.post("/v1/connect/intentions", &body.to_string());
            assert_eq!(status, 200, "{body}");
            return serde_json::from_str::<Value>(&body)
                .ok()
                .and_then(|v| v["ID"].as_str().map(str::to_string))
                .unwrap_or_else(|| panic!("no ID in {body}"));
        }
        self.edit_intentions(destination, |sources| {
            sources.retain(|s| s["Name"] != source || s.get("Peer").is_some());
            sources.push(serde_json::json!({"Name": source, "Action": action}));
        });
        format!("config-entry {destination} {source}")
    }

    /// Deletes what `create_intention` made.
    pub fn delete_intention(&self, handle: &str) {
        match handle.strip_prefix("config-entry ") {
            Some(rest) => {
                let (destination, source) = rest.split_once(' ').expect("a handle of ours");
                self.edit_intentions(destination, |sources| {
                    sources.retain(|s| s["Name"] != source || s.get("Peer").is_some());
                });
            }
            None => {
                let (status, body) = self.delete(&format!("/v1/connect/intentions/{handle}"));
                assert_eq!(status, 200, "{body}");
            }
        }
    }

    /// Makes `intentions` the whole set for `destination`: one config entry written at once on
    /// current Consul, or the legacy intentions deleted and created one by one on 1.8.
    pub fn set_intentions(&self, destination: &str, intentions: &[IntentionSpec]) {
        if self.is_current() {
            if intentions.is_empty() {
                let (status, body) =
                    self.delete(&format!("/v1/config/service-intentions/{destination}"));
                assert_eq!(status, 200, "{body}");
                return;
            }
            let sources: Vec<Value> = intentions
                .iter()
                .map(|i| {
                    let mut s = serde_json::json!({"Name": i.source});
                    if let Some(a) = &i.action {
                        s["Action"] = a.as_str().into();
                    }
                    if let Some(p) = &i.peer {
                        s["Peer"] = p.as_str().into();
                    }
                    if let Some(p) = &i.permissions {
                        s["Permissions"] = p.clone();
                    }
                    s
                })
                .collect();
            let entry = serde_json::json!({
                "Kind": "service-intentions", "Name": destination, "Sources": sources
            });
            let (status, body) = self.put("/v1/config", &entry.to_string());
            assert!(status == 200 && body.trim() == "true", "{status} {body}");
            return;
        }
        let all = self.get_json("/v1/connect/intentions");
        for old in all.as_array().into_iter().flatten() {
            if old["DestinationName"] == destination {
                let id = old["ID"].as_str().expect("1.8 intentions have an ID");
                self.delete_intention(id);
            }
        }
        for i in intentions {
            assert!(
                i.peer.is_none() && i.permissions.is_none(),
                "Consul {} has no peers or L7 intentions",
                consul_version()
            );
            self.create_intention(&i.source, destination, i.action.as_deref().unwrap_or(""));
        }
    }

    /// Reads, changes and writes back (check-and-set) the `service-intentions` entry of
    /// `destination`, deleting it when no source is left.
    fn edit_intentions(&self, destination: &str, change: impl Fn(&mut Vec<Value>)) {
        let path = format!("/v1/config/service-intentions/{destination}");
        for _ in 0..10 {
            let (status, body) = self.get(&path);
            let (mut sources, index) = match status {
                200 => {
                    let v: Value = serde_json::from_str(&body).unwrap();
                    let sources = v["Sources"].as_array().cloned().unwrap_or_default();
                    (sources, v["ModifyIndex"].as_u64().unwrap_or(0))
                }
                404 => (Vec::new(), 0),
                _ => panic!("GET {path}: {status} {body}"),
            };
            change(&mut sources);
            let (status, body) = if sources.is_empty() {
                self.delete(&format!("{path}?cas={index}"))
            } else {
                // Consul computes these; sending back what it returned is refused.
                for s in &mut sources {
                    if let Some(o) = s.as_object_mut() {
                        for k in [
                            "Precedence",
                            "Type",
                            "LegacyID",
                            "LegacyMeta",
                            "LegacyCreateTime",
                            "LegacyUpdateTime",
                        ] {
                            o.remove(k);
                        }
                    }
                }
                let entry = serde_json::json!({
                    "Kind": "service-intentions", "Name": destination, "Sources": sources
                });
                self.put(&format!("/v1/config?cas={index}"), &entry.to_string())
            };
            assert_eq!(status, 200, "{body}");
            if body.trim() == "true" {
                return;
            }
        }
        panic!("the intentions of {destination} kept changing under the test");
    }

    /// Sets `protocol` in the service-defaults config entry of `service` (Consul 1.5+).
    pub fn set_protocol(&self, service: &str, protocol: &str) {
        let entry = serde_json::json!({
            "Kind": "service-defaults", "Name": service, "Protocol": protocol
        });
        let (status, body) = self.put("/v1/config", &entry.to_string());
        assert!(status == 200 && body.trim() == "true", "{status} {body}");
    }

    /// An app answering `body` as the service `server`, registered with its sidecar on a free
    /// public port: the app and that port.
    pub fn register_server(&self, body: &str) -> (HttpApp, u16) {
        let app = HttpApp::start(body);
        let port = free_port();
        self.register(&sidecar_registration("server", app.port(), port, &[]));
        (app, port)
    }

    /// Consul's first CA root written to `<dir>/roots.pem` for clients such as curl; its path.
    pub fn root_ca_file(&self, dir: &Path) -> PathBuf {
        let roots = self.get_json("/v1/agent/connect/ca/roots");
        let ca = dir.join("roots.pem");
        fs::write(&ca, roots["Roots"][0]["RootCert"].as_str().expect("a root"))
            .expect("write the roots");
        ca
    }

    /// A leaf certificate for `service` from the agent, written to `<dir>/<service>.pem` and
    /// `.key` for a client such as curl; returns the paths and Consul's whole answer.
    pub fn leaf_files(&self, service: &str, dir: &Path) -> (PathBuf, PathBuf, Value) {
        let leaf = self.get_json(&format!("/v1/agent/connect/ca/leaf/{service}"));
        let (cert, key) = (
            dir.join(format!("{service}.pem")),
            dir.join(format!("{service}.key")),
        );
        fs::write(&cert, leaf["CertPEM"].as_str().expect("CertPEM")).expect("write the leaf");
        fs::write(&key, leaf["PrivateKeyPEM"].as_str().expect("PrivateKeyPEM"))
            .expect("write the key");
        (cert, key, leaf)
    }

    /// Consul's own verdict on the holder of `leaf` (a `/v1/agent/connect/ca/leaf` answer)
    /// connecting to `target`: the whole `/v1/agent/connect/authorize` answer.
    pub fn authorize(&self, target: &str, leaf: &Value) -> Value {
        let body = serde_json::json!({
            "Target": target,
            "ClientCertURI": leaf["ServiceURI"],
            "ClientCertSerial": leaf["SerialNumber"],
        });
        let (status, body) = self.post("/v1/agent/connect/authorize", &body.to_string());
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).unwrap()
    }

    pub fn register(&self, service_json: &str) {
        let (status, body) = self.put("/v1/agent/service/register", service_json);
        assert_eq!(status, 200, "register {service_json}: {body}");
    }

    pub fn deregister(&self, service_id: &str) {
        let (status, body) = self.put(&format!("/v1/agent/service/deregister/{service_id}"), "");
        assert_eq!(status, 200, "deregister {service_id}: {body}");
    }

    /// How many instances `/v1/health/connect/<service>?passing` lists right now.
    pub fn passing_connect_instances(&self, service: &str) -> usize {
        let (status, body) = self.get(&format!("/v1/health/connect/{service}?passing"));
        if status != 200 {
            return 0;
        }
        serde_json::from_str::<Value>(&body)
            .ok()
            .and_then(|v| v.as_array().map(Vec::len))
            .unwrap_or(0)
    }
}

/// The JSON a 200 answer carries, or None for anything else (not up yet, still electing, …).
fn json_at(addr: &str, path: &str) -> Option<Value> {
    match http_request(addr, "GET", path, None, Duration::from_secs(2)) {
        Ok(r) if r.status == 200 => serde_json::from_str(&r.body).ok(),
        _ => None,
    }
}

/// Registration for service `name` (ID `name`) on 127.0.0.1:`port` with a sidecar pinned to
/// `sidecar_port` and plain service upstreams `(destination, local_bind_port)`.
///
/// Pinning matters: auto-assigned sidecar ports start at 21000 in every agent, so concurrent
/// tests would collide. The sidecar's checks mirror Consul's defaults (TCP on the public port,
/// alias of the app) but run every second instead of every 10 s, so `?passing` turns true fast.
pub fn sidecar_registration(
    name: &str,
    port: u16,
    sidecar_port: u16,
    upstreams: &[(&str, u16)],
) -> String {
    // `name@dc` names a datacenter: Consul 1.10+ refuses two upstreams of one name and
    // datacenter, and `server@dc1` is a second upstream to the local `server`.
    let upstreams: Vec<Value> = upstreams
        .iter()
        .map(|(dest, bind)| match dest.split_once('@') {
            Some((name, dc)) => serde_json::json!({
                "DestinationName": name, "Datacenter": dc, "LocalBindPort": bind
            }),
            None => serde_json::json!({ "DestinationName": dest, "LocalBindPort": bind }),
        })
        .collect();
    serde_json::json!({
        "Name": name,
        "ID": name,
        "Address": "127.0.0.1",
        "Port": port,
        "Connect": { "SidecarService": {
            "Port": sidecar_port,
            "Proxy": { "Upstreams": upstreams },
            "Checks": [
                {
                    "Name": "Connect Sidecar Listening",
                    "TCP": format!("127.0.0.1:{sidecar_port}"),
                    "Interval": "1s",
                },
                { "Name": format!("Connect Sidecar Aliasing {name}"), "AliasService": name },
            ],
        } },
    })
    .to_string()
}
