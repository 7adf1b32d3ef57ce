//! gRPC through the mesh (issue 27), with a real gRPC server and client (grpcio, from the venv
//! `scripts/install-deps` makes; `tests/e2e/support/grpc_app.py`): `protocol grpc` makes both
//! sidecars HTTP listeners speaking HTTP/2 on each hop, so the calls of one client channel are
//! balanced one by one over the instances, and L7 intentions and routes apply per method.

use std::path::PathBuf;
use std::process::Command;
use std::time::Duration;

use crate::support::mesh::sidecar;
use crate::support::*;
use serde_json::Value;

fn grpc_python() -> PathBuf {
    let tools = std::env::var("HCC_TOOLS_DIR")
        .unwrap_or_else(|_| "/usr/local/lib/haproxy-consul-connect".into());
    let p = PathBuf::from(tools).join("grpc-venv/bin/python");
    assert!(
        p.exists(),
        "{} is missing: run scripts/install-deps",
        p.display()
    );
    p
}

fn grpc_app() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e/support/grpc_app.py")
}

/// A gRPC server answering `name`, on a free port.
struct GrpcServer {
    // Held for its Drop: the server stops with it.
    _child: Child,
    port: u16,
}

impl GrpcServer {
    fn start(base: &TempDir, name: &str) -> GrpcServer {
        let port = free_port();
        let mut cmd = Command::new(grpc_python());
        cmd.arg(grpc_app()).args(["serve", &port.to_string(), name]);
        let child = Child::spawn(&format!("grpc-{name}"), &mut cmd, base.path());
        wait_until(Duration::from_secs(30), "the gRPC server to serve", || {
            child.stdout().contains("ready")
        })
        .unwrap_or_else(|e| panic!("{e}\n{}", child.logs()));
        GrpcServer {
            _child: child,
            port,
        }
    }
}

/// `n` unary calls of `method` on one channel through `addr`: answers per body, errors per
/// gRPC status code name.
/// (what, how many), sorted.
type Counts = Vec<(String, u64)>;

fn calls(addr: &str, method: &str, n: u32) -> (Counts, Counts) {
    let out = Command::new(grpc_python())
        .arg(grpc_app())
        .args(["call", addr, method, &n.to_string()])
        .output()
        .expect("the gRPC client runs");
    let text = String::from_utf8_lossy(&out.stdout);
    let v: Value = serde_json::from_str(text.trim())
        .unwrap_or_else(|e| panic!("{e}: {text}\n{}", String::from_utf8_lossy(&out.stderr)));
    let counts = |k: &str| {
        let mut c: Counts = v[k]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, n)| (k.clone(), n.as_u64().unwrap_or(0)))
            .collect();
        c.sort();
        c
    };
    (counts("answers"), counts("errors"))
}

/// Consul, two instances of `server` speaking gRPC (bodies `one`, `two`; `two` has
/// `Meta.version = 2`), their sidecars, and `client`'s sidecar with an upstream to `server`.
struct GrpcMesh {
    // Field order is drop order: sidecars before the apps and Consul.
    client: Child,
    _sidecars: Vec<Child>,
    _servers: Vec<GrpcServer>,
    consul: Consul,
    base: TempDir,
    upstream: String,
}

fn register_instance(consul: &Consul, id: &str, app_port: u16, version: &str) {
    let mut reg: Value =
        serde_json::from_str(&sidecar_registration(id, app_port, free_port(), &[])).unwrap();
    reg["Name"] = "server".into();
    reg["Meta"] = serde_json::json!({ "version": version });
    // Consul 1.8 does not fill the proxy's protocol from service-defaults.
    reg["Connect"]["SidecarService"]["Proxy"]["Config"] = serde_json::json!({"protocol": "grpc"});
    consul.register(&reg.to_string());
}

impl GrpcMesh {
    fn start(intentions: bool) -> GrpcMesh {
        let base = TempDir::new("grpc");
        let consul = Consul::start();
        consul.set_protocol("server", "grpc");
        let mut servers = Vec::new();
        let mut sidecars = Vec::new();
        for (id, name, version) in [("server-1", "one", "1"), ("server-2", "two", "2")] {
            let app = GrpcServer::start(&base, name);
            register_instance(&consul, id, app.port, version);
            sidecars.push(sidecar(&consul, &base, id, intentions, &[]));
            servers.push(app);
        }
        let upstream_port = free_port();
        let mut reg: Value = serde_json::from_str(&sidecar_registration(
            "client",
            free_port(),
            free_port(),
            &[("server", upstream_port)],
        ))
        .unwrap();
        reg["Connect"]["SidecarService"]["Proxy"]["Upstreams"][0]["Config"] =
            serde_json::json!({"protocol": "grpc"});
        consul.register(&reg.to_string());
        let client = sidecar(&consul, &base, "client", false, &[]);
        let upstream = format!("127.0.0.1:{upstream_port}");
        let mesh = GrpcMesh {
            client,
            _sidecars: sidecars,
            _servers: servers,
            consul,
            base,
            upstream,
        };
        wait_until(
            Duration::from_secs(60),
            "both instances to answer through the mesh",
            || calls(&mesh.upstream, "/hcc.Test/Echo", 8).0.len() == 2,
        )
        .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client.logs()));
        mesh
    }
}

/// An L7 intention from `client` to `server` that allows `methods` and denies every other.
fn allow_only(consul: &Consul, methods: &[&str]) {
    let mut permissions: Vec<Value> = methods
        .iter()
        .map(|m| serde_json::json!({"Action": "allow", "HTTP": {"PathExact": m}}))
        .collect();
    permissions.push(serde_json::json!({"Action": "deny", "HTTP": {"PathPrefix": "/"}}));
    consul.set_intentions(
        "server",
        &[IntentionSpec {
            source: "client".into(),
            action: None,
            peer: None,
            permissions: Some(Value::Array(permissions)),
        }],
    );
}

#[test]
fn the_calls_of_one_channel_are_balanced_over_every_instance() {
    let mesh = GrpcMesh::start(false);
    let (answers, errors) = calls(&mesh.upstream, "/hcc.Test/Echo", 40);
    assert_eq!(errors, vec![], "every call answered");
    // One channel is one HTTP/2 connection: in tcp mode all 40 reach one instance.
    assert_eq!(answers.len(), 2, "both instances answered: {answers:?}");
    assert!(
        answers.iter().all(|(_, n)| *n >= 10),
        "round robin per call: {answers:?}"
    );
    // The listeners are HTTP on both hops.
    let workdir = sidecar_workdir(mesh.base.path(), "client");
    let cfg = std::fs::read_to_string(workdir.join("haproxy.cfg")).unwrap();
    assert!(cfg.contains(" alpn h2"), "{cfg}");
}

#[test]
fn a_router_sends_one_method_to_a_subset() {
    let mesh = GrpcMesh::start(false);
    let resolver = serde_json::json!({
        "Kind": "service-resolver", "Name": "server",
        "Subsets": {"v2": {"Filter": "Service.Meta.version == 2"}},
    });
    let router = serde_json::json!({
        "Kind": "service-router", "Name": "server",
        "Routes": [{"Match": {"HTTP": {"PathExact": "/hcc.Test/Other"}},
                    "Destination": {"ServiceSubset": "v2"}}],
    });
    for entry in [resolver, router] {
        let (status, body) = mesh.consul.put("/v1/config", &entry.to_string());
        assert!(status == 200 && body.trim() == "true", "{status} {body}");
    }
    wait_until(
        Duration::from_secs(60),
        "Other to be routed to v2 only",
        || {
            let (answers, errors) = calls(&mesh.upstream, "/hcc.Test/Other", 12);
            errors.is_empty() && answers == vec![("two".to_string(), 12)]
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client.logs()));
    // Echo still goes to both.
    let (answers, errors) = calls(&mesh.upstream, "/hcc.Test/Echo", 20);
    assert!(
        errors.is_empty() && answers.len() == 2,
        "{answers:?} {errors:?}"
    );
}

#[test]
fn l7_intentions_allow_one_method_deny_another_and_streams_survive_churn() {
    if !consul_is_current() {
        eprintln!(
            "skipped on Consul {}: L7 intentions exist from Consul 1.9",
            consul_version()
        );
        return;
    }
    let mesh = GrpcMesh::start(true);
    allow_only(&mesh.consul, &["/hcc.Test/Echo", "/hcc.Test/Stream"]);
    wait_until(Duration::from_secs(30), "Other to be denied", || {
        calls(&mesh.upstream, "/hcc.Test/Other", 2).1 == vec![("PERMISSION_DENIED".to_string(), 2)]
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client.logs()));
    let (answers, errors) = calls(&mesh.upstream, "/hcc.Test/Echo", 10);
    assert!(
        errors.is_empty() && answers.len() == 2,
        "{answers:?} {errors:?}"
    );

    // A server stream of 15 s (300 messages) across instance churn (a third instance comes
    // and goes), a change of permissions that still allows it, and a reload of the client's
    // HAProxy (a router written for `server`: its old worker keeps the stream).
    let mut cmd = Command::new(grpc_python());
    cmd.arg(grpc_app()).args(["stream", &mesh.upstream, "300"]);
    let mut stream = Child::spawn("grpc-stream", &mut cmd, mesh.base.path());
    wait_until(Duration::from_secs(10), "the stream to start", || {
        stream.stdout().contains("msg ")
    })
    .unwrap();
    let running = |stream: &Child, after: &str| {
        let out = stream.stdout();
        assert!(
            !out.contains("end "),
            "the stream ended before {after} was done, so it proves nothing: {out}"
        );
    };
    let third = GrpcServer::start(&mesh.base, "three");
    register_instance(&mesh.consul, "server-3", third.port, "3");
    let third_sidecar = sidecar(&mesh.consul, &mesh.base, "server-3", true, &[]);
    wait_until(
        Duration::from_secs(30),
        "the third instance to answer",
        || {
            calls(&mesh.upstream, "/hcc.Test/Echo", 6)
                .0
                .iter()
                .any(|(b, _)| b == "three")
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client.logs()));
    mesh.consul.deregister("server-3");
    drop(third_sidecar);
    running(&stream, "the churn");

    allow_only(
        &mesh.consul,
        &["/hcc.Test/Echo", "/hcc.Test/Stream", "/hcc.Test/Other"],
    );
    wait_until(Duration::from_secs(30), "Other to be allowed", || {
        calls(&mesh.upstream, "/hcc.Test/Other", 2).1.is_empty()
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client.logs()));
    running(&stream, "the change of permissions");

    let master = sidecar_workdir(mesh.base.path(), "client").join("master.sock");
    let reloads_before = reloads(&master);
    let router = serde_json::json!({
        "Kind": "service-router", "Name": "server",
        "Routes": [{"Match": {"HTTP": {"PathExact": "/hcc.Test/Other"}},
                    "Destination": {"Service": "server"}}],
    });
    let (status, body) = mesh.consul.put("/v1/config", &router.to_string());
    assert!(status == 200 && body.trim() == "true", "{status} {body}");
    wait_until(
        Duration::from_secs(30),
        "the client's HAProxy to reload",
        || reloads(&master) > reloads_before,
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client.logs()));
    running(&stream, "the reload");

    stream.wait_timeout(Duration::from_secs(60));
    let out = stream.stdout();
    assert!(
        out.contains("end OK") && out.matches("msg ").count() == 300,
        "the stream survived churn, a permission change and a reload: {out}"
    );

    // A change that denies the stream's method: a new stream ends with PERMISSION_DENIED.
    allow_only(&mesh.consul, &["/hcc.Test/Echo"]);
    wait_until(Duration::from_secs(30), "a new stream to be denied", || {
        let out = Command::new(grpc_python())
            .arg(grpc_app())
            .args(["stream", &mesh.upstream, "2"])
            .output()
            .expect("the gRPC client runs");
        String::from_utf8_lossy(&out.stdout).contains("end PERMISSION_DENIED")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client.logs()));
}
