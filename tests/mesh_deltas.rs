//! Later Consul changes reach HAProxy as Dataplane API deltas, and the configuration those
//! deltas produce describes the same HAProxy objects as a from-scratch render of the same state.

mod support;

use std::collections::BTreeSet;
use std::time::Duration;

use support::mesh::{sidecar, Mesh, MeshOptions, APP_BODY};
use support::*;

/// The proxies of a configuration (frontends and backends) with each line's words as a set, so
/// option order and the Dataplane API's own formatting do not matter; the workdir is replaced by
/// a placeholder. Lines are kept with their count, so free slots count too.
fn objects(cfg: &str, workdir: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut seen: std::collections::HashMap<String, usize> = std::collections::HashMap::new();
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
        if let Some(s) = &section {
            let mut words: Vec<&str> = line.split_whitespace().collect();
            // Which slot an instance sits in depends on history (it keeps its slot; a fresh
            // render sorts): compare server lines without the slot name.
            if words.first() == Some(&"server") && words.get(1).is_some_and(|n| n.starts_with('s'))
            {
                words.remove(1);
            }
            words.sort();
            let line = format!("{s} | {}", words.join(" "));
            let n = seen.entry(line.clone()).or_default();
            *n += 1;
            out.insert(format!("{line} #{n}"));
        }
    }
    out
}

fn fresh_render(mesh: &Mesh, service: &str) -> (String, String) {
    let text = dry_run(&mesh.consul.http_addr(), mesh.base.path(), service, &[]);
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

#[test]
fn deltas_and_a_fresh_render_describe_the_same_haproxy() {
    let mesh = Mesh::start(MeshOptions::default());

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
        &[("server", mesh.upstream_port), ("server", extra_port)],
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
    // The comparison must see the servers and the weight, or it proves nothing.
    assert!(a
        .iter()
        .any(|l| l.contains(&format!("127.0.0.1:{second_port}"))));
    assert!(a.iter().any(|l| l.contains(&format!(":{extra_port}"))));

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
}
