use super::*;
use crate::model::build;
use crate::model::fixtures::{settings_in, snapshot, ANY, CONSUL_VERSIONS};

fn creds() -> DataplaneCredentials {
    DataplaneCredentials {
        user: "hcc".into(),
        password: crate::config::Secret::new("pw"),
    }
}

/// Renders the recorded `proxy` into a fresh directory and returns it with the files.
fn render_into(version: &str, proxy: &str, leaf: &str, intentions: bool) -> (PathBuf, Vec<File>) {
    render_snapshot_into(version, proxy, &snapshot(version, proxy, leaf), intentions)
}

/// `snap` rendered into a fresh directory, files written; the directory and the files.
fn render_snapshot_into(
    version: &str,
    proxy: &str,
    snap: &crate::snapshot::Snapshot,
    intentions: bool,
) -> (PathBuf, Vec<File>) {
    static SEQ: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    let dir = std::env::temp_dir().join(format!(
        "hcc-render-{}-{seq}-{version}-{proxy}",
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("certs")).unwrap();
    let d = build(snap, &settings_in(&dir, intentions), None).unwrap();
    let files = render(&d, &creds(), &Templates::builtin()).unwrap();
    for f in &files {
        std::fs::write(&f.path, &f.contents).unwrap();
    }
    (dir, files)
}

fn haproxy_check(cfg: &std::path::Path) -> std::process::Output {
    std::process::Command::new("haproxy")
        .args(["-W", "-c", "-f"])
        .arg(cfg)
        .output()
        .expect("haproxy must be installed (scripts/install-deps)")
}

#[test]
fn rendered_configs_pass_haproxy_check() {
    // Consul 1.16's leaves have no CN and a critical URI SAN: HAProxy must load them too.
    for (version, (proxy, leaf, intentions)) in CONSUL_VERSIONS.iter().flat_map(|v| {
        [
            ("client-sidecar-proxy", "ca-leaf-client.json", false),
            ("rich-sidecar-proxy", "ca-leaf-rich.json", false),
            ("server-sidecar-proxy", "ca-leaf-server.json", true),
            ("paths-sidecar-proxy", "ca-leaf-paths.json", false),
            ("checked-sidecar-proxy", "ca-leaf-checked.json", true),
        ]
        .map(|c| (*v, c))
    }) {
        let (dir, files) = render_into(version, proxy, leaf, intentions);
        let out = haproxy_check(&dir.join("haproxy.cfg"));
        assert!(
            out.status.success(),
            "{version} {proxy}: haproxy -c failed:\n{}\n{}",
            String::from_utf8_lossy(&out.stderr),
            files.last().unwrap().contents
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// A mesh gateway's configuration: tcp listeners on both addresses that route by SNI
/// through the map and close what no route takes, backends without TLS; HAProxy takes it.
#[test]
fn a_mesh_gateway_config_passes_haproxy_check() {
    for version in CONSUL_VERSIONS {
        let dir =
            std::env::temp_dir().join(format!("hcc-render-gw-{}-{version}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("certs")).unwrap();
        let (snap, settings) = crate::model::fixtures::gateway_snapshot(version, &dir);
        let d = build(&snap, &settings, None).unwrap();
        let files = render(&d, &creds(), &Templates::builtin()).unwrap();
        for f in &files {
            std::fs::write(&f.path, &f.contents).unwrap();
        }
        let cfg = &files.last().unwrap().contents;
        let map = &files
            .iter()
            .find(|f| f.path == d.paths.gateway_map)
            .unwrap()
            .contents;
        assert!(
            map.starts_with("server.default.default.dc1.external.")
                && map.ends_with(" be_gw_server\n"),
            "{map}"
        );
        for frontend in ["frontend mesh_gateway_lan", "frontend mesh_gateway_wan"] {
            assert!(cfg.contains(frontend), "{cfg}");
        }
        assert!(
            cfg.contains("bind 127.0.0.2:8443 name mesh_gateway_wan\n"),
            "{cfg}"
        );
        assert!(!cfg.contains("default_backend"), "no default route:\n{cfg}");
        let tls = cfg
            .lines()
            .map(str::trim_start)
            .any(|l| (l.starts_with("server ") || l.starts_with("bind ")) && l.contains(" ssl"));
        assert!(!tls, "the gateway terminates no TLS:\n{cfg}");
        assert!(!cfg.contains("public_listener"), "{cfg}");
        let out = haproxy_check(&dir.join("haproxy.cfg"));
        assert!(
            out.status.success(),
            "haproxy -c failed:\n{}\n{cfg}",
            String::from_utf8_lossy(&out.stderr)
        );
        let said = String::from_utf8_lossy(&out.stderr);
        assert!(!said.contains("[WARNING]"), "{said}");
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// The recorded states the golden files are rendered from: (name, snapshot, intentions).
fn golden_cases(v: &str) -> Vec<(String, crate::snapshot::Snapshot, bool)> {
    use crate::model::fixtures::with_chain;
    let mut cases = vec![
        (
            "client",
            snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json"),
            false,
        ),
        (
            "rich",
            snapshot(v, "rich-sidecar-proxy", "ca-leaf-rich.json"),
            false,
        ),
        // An http public listener with intentions: the per-connection and per-request rules.
        (
            "rich-intentions",
            snapshot(v, "rich-sidecar-proxy", "ca-leaf-rich.json"),
            true,
        ),
        (
            "server-intentions",
            snapshot(v, "server-sidecar-proxy", "ca-leaf-server.json"),
            true,
        ),
        (
            "paths",
            snapshot(v, "paths-sidecar-proxy", "ca-leaf-paths.json"),
            false,
        ),
        (
            "checked-intentions",
            snapshot(v, "checked-sidecar-proxy", "ca-leaf-checked.json"),
            true,
        ),
    ];
    for chain in ["web", "split", "front", "dcweb"] {
        cases.push((chain, with_chain(v, chain, true), false));
    }
    cases
        .into_iter()
        .map(|(n, s, i)| (n.to_string(), s, i))
        .collect()
}

/// Every recorded state rendered per HAProxy line and compared with `fixtures/golden/`, so
/// that any change of what HAProxy is given shows as a reviewed diff of those files.
/// `UPDATE_GOLDEN=1 cargo test --lib golden` rewrites them.
#[test]
fn golden_configs_match_the_committed_renders() {
    use crate::haproxy_version::HaproxyVersion;
    let update = std::env::var_os("UPDATE_GOLDEN").is_some();
    use std::path::Path;
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/golden");
    let lines = [
        ("haproxy-2.6", HaproxyVersion::V2_6),
        (
            "haproxy-3.0",
            HaproxyVersion::parse("HAProxy version 3.0.11").unwrap(),
        ),
        (
            "haproxy-3.2",
            HaproxyVersion::parse("HAProxy version 3.2.26").unwrap(),
        ),
    ];
    let (mut compared, mut differ) = (0, Vec::new());
    for v in CONSUL_VERSIONS {
        for (case, snap, intentions) in golden_cases(v) {
            for (line, haproxy) in lines {
                let mut settings = settings_in(Path::new("/run/hcc"), intentions);
                settings.haproxy = haproxy;
                let mut d = build(&snap, &settings, None).unwrap();
                if intentions {
                    d.intentions_map = crate::intentions::table(&snap).fast_map();
                }
                let dir = root.join(v).join(line).join(&case);
                for f in render(&d, &creds(), &Templates::builtin()).unwrap() {
                    let Some(name) = f.path.file_name().and_then(|n| n.to_str()) else {
                        continue;
                    };
                    // The certificates are Consul's recorded answers already.
                    if name.ends_with(".pem") {
                        continue;
                    }
                    let golden = dir.join(name);
                    if update {
                        std::fs::create_dir_all(&dir).unwrap();
                        std::fs::write(&golden, &f.contents).unwrap();
                    } else if std::fs::read_to_string(&golden).ok().as_ref() != Some(&f.contents) {
                        differ.push(golden.display().to_string());
                    }
                    compared += 1;
                }
            }
        }
    }
    // At least haproxy.cfg for each state and HAProxy line.
    assert!(compared >= 54, "only {compared} files compared");
    assert!(
        differ.is_empty(),
        "rendered files differ from the golden ones (review, then UPDATE_GOLDEN=1 cargo test --lib golden):\n{}",
        differ.join("\n")
    );
}

/// gRPC on both sides (h2 offered on the public listener, h2c to the app, `alpn h2` to
/// the upstream's sidecars), with intentions: HAProxy loads it, without a warning.
#[test]
fn a_grpc_sidecar_passes_haproxy_check() {
    for v in CONSUL_VERSIONS {
        let mut snap = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
        let proxy = crate::model::fixtures::proxy(&mut snap);
        proxy.config.insert("protocol".into(), "grpc".into());
        proxy.upstreams[0]
            .config
            .insert("protocol".into(), "grpc".into());
        let (dir, files) = render_snapshot_into(v, "grpc-client", &snap, true);
        let cfg = &files.last().unwrap().contents;
        assert!(
            cfg.contains(" alpn h2 ") || cfg.contains(" alpn h2\n"),
            "{cfg}"
        );
        let out = haproxy_check(&dir.join("haproxy.cfg"));
        let said = String::from_utf8_lossy(&out.stderr).into_owned()
            + &String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success() && !said.contains("WARNING"),
            "{v}: {said}\n{cfg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

/// An http public listener with intentions: HAProxy loads the per-request rules and
/// compiles every regex of a fast map made from permissions full of metacharacters.
#[test]
fn the_intentions_fast_map_passes_haproxy_check() {
    use crate::spoe::authz::{l7, Action, AuthzTable, DefaultPolicy, Intention};
    let (dir, _) = render_into(ANY, "server-sidecar-proxy", "ca-leaf-server.json", true);
    let mut d = build(
        &snapshot(ANY, "server-sidecar-proxy", "ca-leaf-server.json"),
        &settings_in(&dir, true),
        None,
    )
    .unwrap();
    d.sidecar_mut().mode = crate::model::Mode::Http;
    let permissions = serde_json::json!([
        {"Action": "deny", "HTTP": {"PathExact": "/a+b(c)$d*e.f", "Methods": ["GET", "PUT"]}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/x:y,z;w=1&k@l~m'n!o%2F"}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/h", "Header": [{"Name": "x", "Present": true}]}},
        {"Action": "allow", "HTTP": {"PathRegex": "/v[0-9]+"}}
    ]);
    let ixn = Intention {
        permissions: l7::parse_all(permissions.as_array().unwrap()),
        ..Intention::new("client", Action::L7 { permissions: 4 }, 9)
    };
    let ca = include_str!("../../fixtures/spop/certs/ca.crt");
    let td = "11111111-2222-3333-4444-555555555555.consul";
    d.intentions_map = AuthzTable::new(td, ca, vec![ixn], DefaultPolicy::Allow)
        .unwrap()
        .for_http_listener(true)
        .fast_map();
    // The generation, then the permissions' entries.
    assert_eq!(d.intentions_map.len(), 7, "{:#?}", d.intentions_map);
    // Headers accepted JWTs change: a forwarded payload and two token headers.
    d.jwt_headers = crate::spoe::authz::JwtHeaders {
        forward: vec!["x-jwt-payload".into()],
        strip: vec!["authorization".into(), "x-token".into()],
    };
    let files = render(&d, &creds(), &Templates::builtin()).unwrap();
    for f in &files {
        std::fs::write(&f.path, &f.contents).unwrap();
    }
    let map = files
        .iter()
        .find(|f| f.path == d.paths.intentions_map)
        .unwrap();
    assert_eq!(map.contents.lines().count(), 7, "{}", map.contents);
    let cfg = &files.last().unwrap().contents;
    assert!(
        cfg.contains("send-spoe-group intentions l7-request"),
        "{cfg}"
    );
    for rule in [
        "http-request del-header x-jwt-payload\n",
        "http-request set-header x-jwt-payload %[var(txn.hcc.jwt_payload)] if { var(txn.hcc.jwt_fwd) -m int 0 }",
        "http-request del-header x-token if { var(txn.hcc.jwt_strip) -m int 1 }",
    ] {
        assert!(cfg.contains(rule), "{rule} missing:\n{cfg}");
    }
    // The http listener's spoe.conf: the connection check is a group the frontend sends.
    let spoe = &files
        .iter()
        .find(|f| f.path == d.paths.spoe_conf)
        .unwrap()
        .contents;
    assert!(spoe.contains("groups l4-check l7-request"), "{spoe}");
    assert!(!spoe.contains("event on-frontend-tcp-request"), "{spoe}");
    for rule in crate::objects::PATH_REFUSALS
        .iter()
        .chain(crate::objects::NORMALIZE.iter())
    {
        assert!(cfg.contains(rule), "{rule} missing:\n{cfg}");
    }
    let out = haproxy_check(&dir.join("haproxy.cfg"));
    assert!(
        out.status.success(),
        "haproxy -c failed:\n{}\n{}\n{cfg}",
        String::from_utf8_lossy(&out.stderr),
        map.contents
    );
    // `expose-experimental-directives` and the path rules cost no warning.
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(!said.contains("[WARNING]"), "{said}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The mesh entry's TLS settings land on the public bind (incoming) and on every upstream
/// server (outgoing), in a file HAProxy accepts.
#[test]
fn mesh_tls_settings_pass_haproxy_check() {
    let v = crate::model::fixtures::ANY;
    let mut snap = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
    snap.mesh = Some(vec![
        serde_json::json!({"Kind": "mesh", "Name": "mesh", "TLS": {
        "Incoming": {"TLSMinVersion": "TLSv1_3"},
        "Outgoing": {"TLSMinVersion": "TLSv1_2", "TLSMaxVersion": "TLSv1_3",
                     "CipherSuites": ["TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256"]}}}),
    ]);
    let (dir, files) = render_snapshot_into(v, "client-sidecar-proxy", &snap, false);
    let cfg = &files.last().unwrap().contents;
    let bind = cfg.lines().find(|l| l.contains("name public")).unwrap();
    assert!(
        bind.ends_with("verify required ssl-min-ver TLSv1.3"),
        "{bind}"
    );
    let servers: Vec<&str> = cfg.lines().filter(|l| l.contains("server s")).collect();
    assert!(!servers.is_empty());
    for s in servers {
        assert!(
            s.contains(
                "ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.3 ciphers ECDHE-ECDSA-AES128-GCM-SHA256"
            ),
            "{s}"
        );
    }
    accepted_then_removed(&dir, cfg);
}

/// Asserts that HAProxy accepts the file `cfg` written in `dir`, then removes `dir`.
fn accepted_then_removed(dir: &std::path::Path, cfg: &str) {
    let out = haproxy_check(&dir.join("haproxy.cfg"));
    assert!(
        out.status.success(),
        "haproxy -c failed:\n{}\n{cfg}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(dir);
}

/// `Proxy.AccessLogs` formats, text and JSON, on every listener in a file HAProxy accepts
/// (the client is tcp: HTTP variables log as `-` there).
#[test]
fn access_log_formats_pass_haproxy_check() {
    let v = crate::model::fixtures::ANY;
    for logs in [
        serde_json::json!({"Enabled": true, "TextFormat":
            "[%START_TIME%] %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %DURATION% %UPSTREAM_HOST%"}),
        serde_json::json!({"Enabled": true, "JSONFormat":
            "{\"method\": \"%REQ(:METHOD)%\", \"code\": \"%RESPONSE_CODE%\"}"}),
    ] {
        let mut snap = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
        crate::model::fixtures::proxy(&mut snap).access_logs = logs;
        let (dir, files) = render_snapshot_into(v, "client-sidecar-proxy", &snap, false);
        let cfg = &files.last().unwrap().contents;
        assert!(cfg.contains("log-format \""), "{cfg}");
        assert!(!cfg.contains("option tcplog"), "{cfg}");
        accepted_then_removed(&dir, cfg);
    }
}

/// Above `info`, HAProxy is told not to build the access lines its level would drop (they
/// cost a getpid(2) and a formatted line per request); at `info` they are logged.
#[test]
fn access_lines_below_the_log_level_are_not_built() {
    let v = crate::model::fixtures::ANY;
    for (level, built) in [
        ("info", true),
        ("debug", true),
        ("warning", false),
        ("err", false),
    ] {
        let snap = snapshot(v, "server-sidecar-proxy", "ca-leaf-server.json");
        let dir = std::env::temp_dir().join(format!(
            "hcc-render-{}-loglevel-{level}",
            std::process::id()
        ));
        let mut d = build(&snap, &settings_in(&dir, false), None).unwrap();
        d.knobs.haproxy_log_level = level;
        let files = render(&d, &creds(), &Templates::builtin()).unwrap();
        let cfg = &files.last().unwrap().contents;
        assert_eq!(
            !cfg.contains("option dontlog-normal"),
            built,
            "{level}: {cfg}"
        );
        assert!(cfg.contains(&format!("local0 {level}\n")), "{cfg}");
    }
}

/// An upstream's `limits` in http and in tcp: every server capped, the queue bounded, in
/// files HAProxy accepts.
#[test]
fn upstream_limits_pass_haproxy_check() {
    let v = crate::model::fixtures::ANY;
    for (protocol, queue) in [
        ("http", "http-request return status 503 if { queue ge 2 }"),
        ("tcp", "timeout queue 1"),
    ] {
        let mut snap = snapshot(v, "client-sidecar-proxy", "ca-leaf-client.json");
        let c = &mut crate::model::fixtures::first_upstream(&mut snap).config;
        c.insert("protocol".into(), protocol.into());
        c.insert(
            "limits".into(),
            serde_json::json!({"MaxConnections": 1, "MaxPendingRequests": 2}),
        );
        let (dir, files) = render_snapshot_into(v, "client-sidecar-proxy", &snap, false);
        let cfg = &files.last().unwrap().contents;
        assert!(cfg.contains(queue), "{cfg}");
        let servers: Vec<&str> = cfg.lines().filter(|l| l.contains("server s")).collect();
        assert!(!servers.is_empty());
        assert!(
            servers.iter().all(|s| s.contains(" maxconn 1")),
            "{servers:#?}"
        );
        accepted_then_removed(&dir, cfg);
    }
}

#[test]
fn a_unix_socket_upstream_passes_haproxy_check() {
    let (dir, _) = render_into(ANY, "client-sidecar-proxy", "ca-leaf-client.json", false);
    let mut s = snapshot("1.16.3", "client-sidecar-proxy", "ca-leaf-client.json");
    let u = crate::model::fixtures::first_upstream(&mut s);
    u.local_bind_socket_path = dir.join("up.sock").display().to_string();
    u.local_bind_socket_mode = "0660".into();
    let d = build(&s, &settings_in(&dir, false), None).unwrap();
    let files = render(&d, &creds(), &Templates::builtin()).unwrap();
    for f in &files {
        std::fs::write(&f.path, &f.contents).unwrap();
    }
    let cfg = &files.last().unwrap().contents;
    let want = format!("bind {}/up.sock name ", dir.display());
    assert!(cfg.contains(&want) && cfg.contains(" mode 0660"), "{cfg}");
    let out = haproxy_check(&dir.join("haproxy.cfg"));
    assert!(
        out.status.success(),
        "{}\n{cfg}",
        String::from_utf8_lossy(&out.stderr)
    );
    let _ = std::fs::remove_dir_all(&dir);
}

/// Every local setting, in http (with and without intentions) and tcp: HAProxy accepts
/// the lines, the appname rules included.
#[test]
fn local_settings_pass_haproxy_check() {
    let (dir, _) = render_into(ANY, "client-sidecar-proxy", "ca-leaf-client.json", false);
    for (protocol, intentions) in [("http", true), ("http", false), ("tcp", false)] {
        let mut s = crate::model::fixtures::rich_with_settings(ANY);
        crate::model::fixtures::proxy_config(&mut s).insert("protocol".into(), protocol.into());
        let d = build(&s, &settings_in(&dir, intentions), None).unwrap();
        let files = render(&d, &creds(), &Templates::builtin()).unwrap();
        for f in &files {
            std::fs::write(&f.path, &f.contents).unwrap();
        }
        let cfg = &files.last().unwrap().contents;
        assert!(
            cfg.contains("maxconn 64") && cfg.contains("timeout server"),
            "{cfg}"
        );
        let out = haproxy_check(&dir.join("haproxy.cfg"));
        assert!(
            out.status.success(),
            "{protocol} {intentions}: {}\n{cfg}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn every_recorded_chain_renders_a_config_haproxy_accepts() {
    for version in CONSUL_VERSIONS {
        for chain in ["web", "old", "dcweb", "tcpold", "split", "front"] {
            let (dir, _) = render_into(
                version,
                "client-sidecar-proxy",
                "ca-leaf-client.json",
                false,
            );
            let mut s = snapshot(version, "client-sidecar-proxy", "ca-leaf-client.json");
            let key = crate::consul::destinations(s.registration.as_ref().unwrap(), &[])[0].clone();
            let body =
                crate::model::fixtures::fixture(version, &format!("discovery-chain-{chain}.json"));
            let c = crate::consul::chain::parse_chain(&body).unwrap();
            s.apply(crate::consul::Update::Chain(key, c));
            let d = build(&s, &settings_in(&dir, false), None).unwrap();
            let files = render(&d, &creds(), &Templates::builtin()).unwrap();
            for f in &files {
                std::fs::write(&f.path, &f.contents).unwrap();
            }
            let cfg = &files.last().unwrap().contents;
            assert!(
                cfg.contains(".t."),
                "{version} {chain}: no target backend\n{cfg}"
            );
            let out = haproxy_check(&dir.join("haproxy.cfg"));
            assert!(
                out.status.success(),
                "{version} {chain}: {}\n{cfg}",
                String::from_utf8_lossy(&out.stderr)
            );
            if std::env::var_os("HCC_SHOW_CHAIN_CFG").is_some() {
                eprintln!("==> {version} {chain}\n{cfg}");
            }
            let _ = std::fs::remove_dir_all(&dir);
        }
    }
}

#[test]
fn exposed_paths_answer_their_path_only_and_speak_h2_where_asked() {
    for version in CONSUL_VERSIONS {
        let (dir, files) = render_into(version, "paths-sidecar-proxy", "ca-leaf-paths.json", false);
        let cfg = &files.last().unwrap().contents;
        let section = |name: &str| -> Vec<String> {
            let start = cfg
                .find(&format!("\n{name}"))
                .unwrap_or_else(|| panic!("{name}:\n{cfg}"));
            cfg[start + 1..]
                .lines()
                .skip(1)
                .take_while(|l| l.starts_with(char::is_whitespace))
                .map(|l| l.trim().to_string())
                .collect()
        };
        let fe = section("frontend exp_21600\n");
        assert!(fe.contains(&"mode http".to_string()), "{fe:?}");
        assert!(
            fe.contains(&"bind 0.0.0.0:21600 name exp_21600".to_string()),
            "{fe:?}"
        );
        assert!(
            fe.contains(&"http-request return status 404 unless { path /metrics }".to_string()),
            "{fe:?}"
        );
        assert!(
            fe.contains(&"default_backend be_exp_21600".to_string()),
            "{fe:?}"
        );
        assert!(
            section("backend be_exp_21600\n").contains(&"server app 127.0.0.1:8585".to_string())
        );
        let h2 = section("frontend exp_21601\n");
        assert!(
            h2.contains(&"bind 0.0.0.0:21601 name exp_21601 proto h2".to_string()),
            "{h2:?}"
        );
        assert!(section("backend be_exp_21601\n")
            .contains(&"server app 127.0.0.1:8586 proto h2".to_string()));
        assert!(cfg.contains("# exposed path: /metrics (http)"), "{cfg}");
        assert!(
            !cfg.contains("tcp-request connection reject"),
            "explicit paths admit any source: {cfg}"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn exposed_check_listeners_admit_local_sources_only_and_pass_haproxy_check() {
    for version in CONSUL_VERSIONS {
        let (dir, files) = render_into(
            version,
            "checked-sidecar-proxy",
            "ca-leaf-checked.json",
            false,
        );
        let cfg = &files.last().unwrap().contents;
        let rule = "tcp-request connection reject unless { src 127.0.0.0/8 ::1 }";
        assert_eq!(cfg.matches(rule).count(), 2, "{version}: {cfg}");
        let out = haproxy_check(&dir.join("haproxy.cfg"));
        assert!(
            out.status.success(),
            "{version}: {}\n{cfg}",
            String::from_utf8_lossy(&out.stderr)
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_broken_config_is_caught_by_the_check() {
    // Guards the test above: the check must be able to fail.
    let (dir, _) = render_into(ANY, "client-sidecar-proxy", "ca-leaf-client.json", false);
    let cfg = dir.join("haproxy.cfg");
    let text = std::fs::read_to_string(&cfg).unwrap();
    std::fs::write(
        &cfg,
        text.replace("balance roundrobin", "balance no-such-algo"),
    )
    .unwrap();
    assert!(!haproxy_check(&cfg).status.success());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn no_frontend_shares_its_name_with_a_backend() {
    // HAProxy 3.2 warns, and 3.3 refuses, a frontend and a backend of one name.
    let (dir, files) = render_into(ANY, "rich-sidecar-proxy", "ca-leaf-rich.json", true);
    let cfg = &files.last().unwrap().contents;
    let names = |kind: &str| -> Vec<String> {
        cfg.lines()
            .filter_map(|l| l.strip_prefix(kind))
            .map(|n| n.trim().to_string())
            .collect()
    };
    let (frontends, backends) = (names("frontend "), names("backend "));
    assert!(frontends.len() > 2 && backends.len() > 2, "{cfg}");
    for f in &frontends {
        assert!(
            !backends.contains(f),
            "{f} is a frontend and a backend:\n{cfg}"
        );
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn the_spoe_backend_follows_the_haproxy_version() {
    let dir = std::env::temp_dir().join(format!("hcc-render-spop-{}", std::process::id()));
    let mut settings = settings_in(&dir, true);
    for (v, mode) in [("3.0.11", "tcp"), ("3.2.26", "spop")] {
        settings.haproxy =
            crate::haproxy_version::HaproxyVersion::parse(&format!("HAProxy version {v}")).unwrap();
        let s = snapshot(ANY, "server-sidecar-proxy", "ca-leaf-server.json");
        let d = build(&s, &settings, None).unwrap();
        let files = render(&d, &creds(), &Templates::builtin()).unwrap();
        let cfg = &files.last().unwrap().contents;
        let want = format!("backend {SPOE_BACKEND}\n    mode {mode}\n");
        assert!(cfg.contains(&want), "{v}: {cfg}");
    }
}

#[test]
fn files_come_roots_first_and_config_last() {
    let (dir, files) = render_into(ANY, "client-sidecar-proxy", "ca-leaf-client.json", true);
    let names: Vec<String> = files
        .iter()
        .map(|f| f.path.file_name().unwrap().to_string_lossy().into_owned())
        .collect();
    assert_eq!(
        names,
        [
            "roots.pem",
            "public-roots.pem",
            "leaf.pem",
            "spoe.conf",
            "intentions.map",
            "haproxy.cfg"
        ]
    );
    let cfg = &files[5].contents;
    assert!(cfg.contains("reject unless { var(sess.hcc.allow) -m bool }"));
    assert!(cfg.contains("server s0 "), "{cfg}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// An operator's template may read every field the view documents (ARCHITECTURE.md's render
/// entry): each renders, under the name the built-in templates use.
#[test]
fn an_operator_template_reads_every_documented_field() {
    let dir = std::env::temp_dir().join(format!("hcc-view-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let fields = [
        "d.service",
        "d.intentions",
        "d.spoe_backend_mode",
        "d.public.mode",
        "d.paths.haproxy_cfg",
        "d.paths.stats_socket",
        "d.paths.metrics_socket",
        "d.paths.spoe_conf",
        "d.paths.spoe_socket",
        "d.paths.leaf",
        "d.paths.roots",
        "d.paths.splits_map",
        "d.paths.intentions_map",
        "d.paths.gateway_map",
        "d.paths.transparent_map",
        "d.knobs.haproxy_log_level",
        "version",
        "hard_stop_after",
        "check_defaults",
        "spoe_backend",
        "spoe_server",
        "dataplane_userlist",
        "dataplane_user",
        "dataplane_password",
    ];
    let mut t: String = fields
        .iter()
        .map(|f| format!("{f}={{{{ {f} }}}}\n"))
        .collect();
    t.push_str("{% for p in d.knobs.haproxy_params %}{{ p.section }}.{{ p.key }}={{ p.value }}\n{% endfor %}");
    t.push_str("{% for s in sections %}{{ s.comment }}|{{ s.header }}|{{ s.lines | length }}\n{% endfor %}");
    std::fs::write(dir.join("haproxy.cfg.tera"), t).unwrap();
    let templates = Templates::load(&dir).unwrap();
    let s = snapshot(ANY, "server-sidecar-proxy", "ca-leaf-server.json");
    let mut d = build(&s, &settings_in(&dir, true), None).unwrap();
    d.knobs.haproxy_params.push(crate::config::HaproxyParam {
        section: "global".into(),
        key: "maxconn".into(),
        value: "10".into(),
    });
    let files = render(&d, &creds(), &templates).unwrap();
    let cfg = &files.last().unwrap().contents;
    let _ = std::fs::remove_dir_all(&dir);
    for f in fields {
        assert!(cfg.contains(&format!("{f}=")), "{f} missing:\n{cfg}");
    }
    assert!(cfg.contains("d.service=server\n"), "{cfg}");
    assert!(cfg.contains("d.public.mode=tcp\n") || cfg.contains("d.public.mode=http\n"));
    assert!(cfg.contains("global.maxconn=10\n"), "{cfg}");
    assert!(cfg.contains("|frontend public_listener|"), "{cfg}");
}
