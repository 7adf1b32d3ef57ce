//! Later Consul changes reach HAProxy as Dataplane API deltas, and the configuration those
//! deltas produce describes the same HAProxy objects as a from-scratch render of the same state.

mod support;

use std::collections::{BTreeSet, HashMap};
use std::time::Duration;

use support::mesh::{sidecar, Mesh, MeshOptions, APP_BODY};
use support::*;

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
fn objects(cfg: &str, workdir: &str) -> BTreeSet<String> {
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

fn fresh_render(mesh: &Mesh, service: &str) -> (String, String) {
    // The same flags as the running sidecars (see Mesh::start).
    let text = dry_run(
        &mesh.consul.http_addr(),
        mesh.base.path(),
        service,
        &["-enable-intentions"],
    );
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
    let (fresh, fresh_dir) = fresh_render(&mesh, "client");
    let a = objects(&applied, &workdir.display().to_string());
    let b = objects(&fresh, &fresh_dir);
    let only_applied: Vec<_> = a.difference(&b).collect();
    let only_fresh: Vec<_> = b.difference(&a).collect();
    assert!(
        only_applied.is_empty() && only_fresh.is_empty(),
        "deltas and a fresh render differ\nonly after deltas: {only_applied:#?}\nonly in a fresh render: {only_fresh:#?}"
    );
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
    let (fresh, fresh_dir) = fresh_render(&mesh, "client");
    let a = objects(&applied, &workdir.display().to_string());
    let b = objects(&fresh, &fresh_dir);
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
