//! Later Consul changes reach HAProxy as Dataplane API deltas, and the configuration those
//! deltas produce describes the same HAProxy objects as a from-scratch render of the same state.

use std::time::Duration;

use crate::support::mesh::{
    config_objects, fresh_render, same_as_fresh_render, sidecar, Mesh, MeshOptions, APP_BODY,
};
use crate::support::*;

/// `server-2`'s weight in Consul; any value but the default 1 shows it was carried.
const SECOND_WEIGHT: u32 = 7;

#[test]
fn deltas_and_a_fresh_render_describe_the_same_haproxy() {
    // Intentions on: the SPOE filter and the rule that fails closed are in the comparison too.
    let mesh = Mesh::start(MeshOptions {
        intentions: true,
        ..Default::default()
    });

    // A second instance of `server`, with its own sidecar.
    let second_port = free_port();
    let mut second: serde_json::Value = serde_json::from_str(&sidecar_registration(
        "server-2",
        mesh.app.port(),
        second_port,
        &[],
    ))
    .unwrap();
    second["Name"] = "server".into();
    // A weight of its own, which the deltas must carry to HAProxy.
    second["Connect"]["SidecarService"]["Weights"] =
        serde_json::json!({"Passing": SECOND_WEIGHT, "Warning": 1});
    mesh.consul.register(&second.to_string());
    let _second_sidecar = sidecar(&mesh.consul, &mesh.base, "server-2", false, &[]);
    wait_until(
        Duration::from_secs(120),
        "the catalog to list server-2 as passing",
        || mesh.consul.passing_connect_instances("server") == 2,
    )
    .unwrap();
    let workdir = mesh.workdir("client");
    let cfg_path = workdir.join("haproxy.cfg");
    wait_until(
        Duration::from_secs(30),
        "the new instance in the Dataplane API's file",
        || {
            std::fs::read_to_string(&cfg_path)
                .unwrap_or_default()
                .contains(&format!("127.0.0.1:{second_port}"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    // Made only now: Consul 1.8.7 stops syncing server-2's check to the catalog when `client` is
    // re-registered at the same moment.
    // A new upstream on the client: a listener added live.
    let extra_port = free_port();
    mesh.consul.register(&sidecar_registration(
        "client",
        free_port(),
        mesh.client_port,
        &[("server", mesh.upstream_port), ("server@dc1", extra_port)],
    ));

    wait_until(
        Duration::from_secs(30),
        "both deltas in the Dataplane API's file",
        || {
            let cfg = std::fs::read_to_string(&cfg_path).unwrap_or_default();
            cfg.contains(&format!(":{second_port}")) && cfg.contains(&format!(":{extra_port}"))
        },
    )
    .unwrap_or_else(|e| {
        panic!(
            "{e} (ports {second_port}, {extra_port})\n{}\nConsul: {}",
            std::fs::read_to_string(&cfg_path).unwrap_or_default(),
            mesh.consul.get("/v1/health/connect/server").1
        )
    });
    let extra = format!("127.0.0.1:{extra_port}");
    wait_until(Duration::from_secs(30), "the new upstream listener to answer", || {
        matches!(http_get(&extra, "/", Duration::from_secs(2)), Ok((200, body)) if body == APP_BODY)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));

    let applied = std::fs::read_to_string(&cfg_path).unwrap();
    assert!(
        applied.contains("# _version="),
        "the Dataplane API wrote this file"
    );
    let a = same_as_fresh_render(&mesh, "client", &["-enable-intentions"], &applied, &workdir);
    // The comparison must see the servers, their weights and the rules, or it proves nothing.
    for (port, weight) in [(mesh.server_port, 1), (second_port, SECOND_WEIGHT)] {
        let addr = format!("127.0.0.1:{port}");
        let weights: Vec<&str> = applied
            .lines()
            .filter_map(|l| {
                let w: Vec<&str> = l.split_whitespace().collect();
                if w.first() != Some(&"server") || w.get(2) != Some(&addr.as_str()) {
                    return None;
                }
                let at = w.iter().position(|x| *x == "weight")?;
                w.get(at + 1).copied()
            })
            .collect();
        // One server line in each of the two upstream backends.
        assert_eq!(
            weights,
            [weight.to_string(), weight.to_string()],
            "weights of {addr}:\n{applied}"
        );
    }
    assert!(a.iter().any(|l| l.contains(&format!(":{extra_port}"))));
    assert!(
        a.iter().any(|l| l.contains("http-request #2:")),
        "rule lines compared in order: {a:#?}"
    );
    assert!(
        a.iter().any(|l| l.contains("tcp-request #1:")),
        "the fail-closed rule compared: {a:#?}"
    );

    // The upstream removed again: its listener goes.
    mesh.consul.register(&sidecar_registration(
        "client",
        free_port(),
        mesh.client_port,
        &[("server", mesh.upstream_port)],
    ));
    wait_until(
        Duration::from_secs(30),
        "the extra listener to close",
        || std::net::TcpStream::connect(("127.0.0.1", extra_port)).is_err(),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let (status, _) = http_get(&mesh.upstream_addr(), "/", Duration::from_secs(5)).unwrap();
    assert_eq!(status, 200, "the remaining upstream still serves");

    // Exposed paths: two added (one full render: v1.2.5 cannot create their rules), then one
    // removed by a delta; the result is still what a fresh render describes.
    let (kept, removed) = (free_port(), free_port());
    let client_with = |paths: serde_json::Value| {
        let mut reg: serde_json::Value = serde_json::from_str(&sidecar_registration(
            "client",
            mesh.app.port(),
            mesh.client_port,
            &[("server", mesh.upstream_port)],
        ))
        .unwrap();
        reg["Connect"]["SidecarService"]["Proxy"]["Expose"] = serde_json::json!({ "Paths": paths });
        mesh.consul.register(&reg.to_string());
    };
    let path = |p: &str, port: u16, proto: &str| serde_json::json!({"Path": p, "LocalPathPort": mesh.app.port(), "ListenerPort": port, "Protocol": proto});
    client_with(serde_json::json!([
        path("/metrics", kept, "http"),
        path("/grpc.health.v1.Health/Check", removed, "http2")
    ]));
    let listening = |port: u16| std::net::TcpStream::connect(("127.0.0.1", port)).is_ok();
    wait_until(Duration::from_secs(30), "both exposed listeners", || {
        listening(kept) && listening(removed)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    client_with(serde_json::json!([path("/metrics", kept, "http")]));
    wait_until(
        Duration::from_secs(30),
        "the removed exposed listener to close",
        || !listening(removed),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let applied = std::fs::read_to_string(&cfg_path).unwrap();
    let (fresh, fresh_dir) = fresh_render(&mesh, "client", &["-enable-intentions"]);
    let a = config_objects(&applied, &workdir.display().to_string());
    let b = config_objects(&fresh, &fresh_dir);
    assert_eq!(a, b, "exposed paths: deltas and a fresh render differ");
    assert!(
        a.iter().any(|l| l
            .contains("http-request #1: http-request return status 404 unless { path /metrics }")),
        "{a:#?}"
    );
    assert_eq!(
        http_get(
            &format!("127.0.0.1:{kept}"),
            "/metrics",
            Duration::from_secs(5)
        )
        .unwrap(),
        (200, APP_BODY.to_string())
    );
}
