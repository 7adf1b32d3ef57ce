//! What an operator meets first: bad setup refused at once, Ready meaning serving, each HAProxy
//! event logged once, versions that say what runs, the package mirror taken from the machine,
//! long service IDs, and a dry run that keeps secrets out of tickets.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support;
use crate::support::mesh::{sidecar, APP_BODY};
use crate::support::*;

/// Runs the sidecar against a Consul address nothing listens on; returns its exit code, how long
/// it took and its output. A sidecar that reached for Consul would wait, not exit.
fn refused(args: &[&str]) -> (Option<i32>, Duration, String) {
    let base = TempDir::new("preflight");
    let nobody = format!("127.0.0.1:{}", free_port());
    let mut cmd = Command::new(bin_path());
    cmd.args(["-sidecar-for", "server", "-http-addr", &nobody])
        .arg("-haproxy-cfg-base-path")
        .arg(base.path())
        .args(args);
    let started = Instant::now();
    let mut child = Child::spawn("sidecar", &mut cmd, base.path());
    let status = child.wait_timeout(Duration::from_secs(15));
    (
        status.and_then(|s| s.code()),
        started.elapsed(),
        child.logs(),
    )
}

#[test]
fn bad_setup_exits_64_naming_the_flag_before_contacting_consul() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let taken = taken.local_addr().unwrap().to_string();
    for (args, flag) in [
        (
            vec!["-haproxy", "/no/such/haproxy"],
            "-haproxy /no/such/haproxy",
        ),
        (
            vec!["-dataplane", "/no/such/dataplaneapi"],
            "-dataplane /no/such/dataplaneapi",
        ),
        (vec!["-dataplane", "false"], "-dataplane false"),
        (
            vec!["-haproxy-cfg-base-path", "/proc/nope"],
            "-haproxy-cfg-base-path /proc/nope",
        ),
        (
            vec!["-template-dir", "/no/such/templates"],
            "-template-dir /no/such/templates",
        ),
        (vec!["-stats-addr", taken.as_str()], "-stats-addr"),
    ] {
        let (code, took, logs) = refused(&args);
        assert_eq!(code, Some(64), "{args:?}: {logs}");
        assert!(logs.contains(flag), "{args:?} should name {flag:?}: {logs}");
        assert!(
            !logs.contains("waiting for the Consul agent"),
            "{args:?} reached for Consul first: {logs}"
        );
        eprintln!("measured: {args:?} refused in {} ms", took.as_millis());
    }
}

#[test]
fn a_missing_base_path_is_created() {
    let consul = Consul::start();
    let app = HttpApp::start(APP_BODY);
    let port = free_port();
    consul.register(&sidecar_registration("server", app.port(), port, &[]));
    let base = TempDir::new("mkbase");
    let nested = base.join("made/by/the/sidecar");
    let mut cmd = Command::new(bin_path());
    cmd.args(["-sidecar-for", "server", "-http-addr", &consul.http_addr()])
        .arg("-haproxy-cfg-base-path")
        .arg(&nested);
    let s = Child::spawn("sidecar", &mut cmd, base.path());
    wait_until(Duration::from_secs(30), "Ready", || {
        s.log_contains("-> Ready")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    assert!(nested.is_dir());
}

/// The client's sidecar starts once Consul lists the server's instance as passing: the first
/// request made the moment `/ready` turns 200 must get the app's answer.
#[test]
fn the_first_request_after_ready_succeeds() {
    let consul = Consul::start();
    let app = HttpApp::start(APP_BODY);
    let base = TempDir::new("ready");
    let (server_port, upstream_port) = (free_port(), free_port());
    consul.register(&sidecar_registration(
        "server",
        app.port(),
        server_port,
        &[],
    ));
    consul.register(&sidecar_registration(
        "client",
        free_port(),
        free_port(),
        &[("server", upstream_port)],
    ));
    let _server = sidecar(&consul, &base, "server", false, &[]);
    wait_until(
        Duration::from_secs(30),
        "the server instance to pass",
        || consul.passing_connect_instances("server") == 1,
    )
    .unwrap();
    let stats = format!("127.0.0.1:{}", free_port());
    let client = sidecar(&consul, &base, "client", false, &["-stats-addr", &stats]);
    let upstream = format!("127.0.0.1:{upstream_port}");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        assert!(Instant::now() < deadline, "never ready:\n{}", client.logs());
        if matches!(
            http_get(&stats, "/ready", Duration::from_secs(1)),
            Ok((200, _))
        ) {
            break;
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    let first = http_get(&upstream, "/", Duration::from_secs(5));
    assert!(
        matches!(&first, Ok((200, b)) if b == APP_BODY),
        "first request after Ready: {first:?}\n{}",
        client.logs()
    );
    assert!(
        client.log_contains("1 upstream instance(s) live"),
        "{}",
        client.logs()
    );
}

/// A server slot leaving maintenance is an event HAProxy writes to stderr and to its log; the
/// sidecar prints it once, at the log's severity.
#[test]
fn each_haproxy_event_is_logged_once() {
    let mesh = support::mesh::Mesh::start(support::mesh::MeshOptions::default());
    let second = HttpApp::start(APP_BODY);
    let port = free_port();
    let mut reg: serde_json::Value =
        serde_json::from_str(&sidecar_registration("server-2", second.port(), port, &[])).unwrap();
    reg["Name"] = "server".into();
    mesh.consul.register(&reg.to_string());
    let _second_sidecar = sidecar(&mesh.consul, &mesh.base, "server-2", false, &[]);
    let is_up = |l: &&str| l.contains("Server be_up_") && l.contains(" is UP");
    wait_until(Duration::from_secs(30), "a server UP event", || {
        mesh.client_sidecar.logs().lines().any(|l| is_up(&l))
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    // A duplicate would be the stderr copy, which HAProxy writes before the log copy seen
    // above. A marker written into the same stderr pipe after it, once the sidecar prints it,
    // shows that everything before it on that pipe has been read.
    let master = mesh.workdir("client").join("master.sock");
    let worker = current_workers(&master)
        .into_iter()
        .next()
        .expect("a current HAProxy worker");
    let marker = format!("hcc-test-marker-{}", free_port());
    let mut stderr = std::fs::OpenOptions::new()
        .write(true)
        .open(format!("/proc/{worker}/fd/2"))
        .expect("HAProxy's stderr");
    std::io::Write::write_all(&mut stderr, format!("{marker}\n").as_bytes())
        .expect("a marker into HAProxy's stderr");
    wait_until(Duration::from_secs(30), "the marker forwarded", || {
        mesh.client_sidecar.log_contains(&marker)
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", mesh.client_sidecar.logs()));
    let logs = mesh.client_sidecar.logs();
    let events: Vec<&str> = logs.lines().filter(is_up).collect();
    for e in &events {
        let text = e.split("Server ").nth(1).unwrap();
        assert_eq!(
            events.iter().filter(|o| o.contains(text)).count(),
            1,
            "printed more than once: {text}\n{logs}"
        );
        assert!(e.contains("INFO"), "at the log's severity (notice): {e}");
    }
}

#[test]
fn version_says_what_runs() {
    let out = Command::new(bin_path()).arg("-version").output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    let dpapi = text
        .lines()
        .find(|l| l.starts_with("dataplaneapi:"))
        .unwrap();
    assert!(
        dpapi.contains("v1.2.5") && !dpapi.contains("dirty"),
        "{text}"
    );
    let haproxy = text.lines().find(|l| l.starts_with("haproxy:")).unwrap();
    assert!(haproxy.contains("HAProxy version"), "{text}");
}

/// scripts/debian-mirror, which install-deps uses for Consul's suite, reads the machine's own
/// apt sources in both forms and names no host of its own.
#[test]
fn the_package_mirror_comes_from_the_machine() {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/debian-mirror");
    let root = TempDir::new("apt");
    let etc = root.join("etc");
    std::fs::create_dir_all(etc.join("apt/sources.list.d")).unwrap();
    std::fs::write(
        etc.join("os-release"),
        "ID=debian\nVERSION_CODENAME=bookworm\n",
    )
    .unwrap();
    let run = || {
        let out = Command::new(script)
            .env("HCC_APT_ROOT", root.path())
            .output()
            .unwrap();
        assert!(out.status.success());
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(run(), "", "no source: nothing");
    std::fs::write(
        etc.join("apt/sources.list"),
        "# deb http://ignored.example/debian bookworm main\ndeb-src http://src.example/debian bookworm main\ndeb [arch=amd64 signed-by=/k.gpg] http://mirror.local:3142/debian bookworm main\n",
    )
    .unwrap();
    assert_eq!(
        run(),
        "http://mirror.local:3142/debian\t\n",
        "one-line form"
    );
    std::fs::remove_file(etc.join("apt/sources.list")).unwrap();
    std::fs::write(
        etc.join("apt/sources.list.d/debian.sources"),
        "Types: deb\nURIs: http://proxy.internal/debian-security\nSuites: bookworm-security\nComponents: main\n\nTypes: deb\nURIs: http://proxy.internal/debian\nSuites: bookworm bookworm-updates\nComponents: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n",
    )
    .unwrap();
    std::fs::create_dir_all(root.join("usr/share/keyrings")).unwrap();
    std::fs::write(
        root.join("usr/share/keyrings/debian-archive-keyring.gpg"),
        "",
    )
    .unwrap();
    assert_eq!(
        run(),
        "http://proxy.internal/debian\t/usr/share/keyrings/debian-archive-keyring.gpg\n",
        "deb822 form, the release's own suite"
    );
}

/// A scheduler-style 60-character instance ID under a 60-character base path.
#[test]
fn long_service_ids_and_base_paths_start() {
    let consul = Consul::start();
    let app = HttpApp::start(APP_BODY);
    let root = TempDir::new("long");
    let base = root.join(format!(
        "{:b<width$}",
        "b",
        width = 60 - root.path().as_os_str().len() - 1
    ));
    std::fs::create_dir_all(&base).unwrap();
    assert_eq!(base.as_os_str().len(), 60);
    let id = format!("{:x<60}", "checkout-api-7d9f8b6c5-x2x9q-");
    let port = free_port();
    let mut reg: serde_json::Value =
        serde_json::from_str(&sidecar_registration("server", app.port(), port, &[])).unwrap();
    reg["ID"] = id.clone().into();
    consul.register(&reg.to_string());
    let mut cmd = Command::new(bin_path());
    cmd.args(["-sidecar-for", &id, "-http-addr", &consul.http_addr()])
        .arg("-haproxy-cfg-base-path")
        .arg(&base);
    let s = Child::spawn("sidecar", &mut cmd, root.path());
    wait_until(Duration::from_secs(30), "Ready", || {
        s.log_contains("-> Ready")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", s.logs()));
    let link = std::fs::read_dir(&base)
        .unwrap()
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .unwrap()
                .to_string_lossy()
                .contains("checkout-api")
        })
        .expect("a readable link named after the proxy");
    let proxy_id = std::fs::read_to_string(link.join("proxy-id")).unwrap();
    assert_eq!(proxy_id.trim(), format!("{id}-sidecar-proxy"));
}

/// `--dry-run -template-dir DIR` prints what that override renders.
#[test]
fn a_dry_run_renders_the_override() {
    let consul = Consul::start();
    consul.register(&sidecar_registration(
        "server",
        free_port(),
        free_port(),
        &[],
    ));
    let base = TempDir::new("dry-override");
    let dir = base.join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    let builtin = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/templates/haproxy.cfg.tera"
    ))
    .unwrap();
    std::fs::write(
        dir.join("haproxy.cfg.tera"),
        builtin.replacen("global\n", "global\n    # override-marker\n", 1),
    )
    .unwrap();
    let text = dry_run(
        &consul.http_addr(),
        base.path(),
        "server",
        &["-template-dir", dir.to_str().unwrap()],
    );
    assert!(text.contains("# override-marker"), "{text}");
    assert!(!text.contains("PRIVATE KEY-----"), "{text}");
}

/// `--dry-run -enable-intentions` reads what a run's intentions agent starts from (the
/// intentions and the ACL default policy), so the intentions map it prints is the one a run
/// would write first: the deny sends its connections to the agent, and the default (a dev
/// agent's ACLs allow) lets the rest through.
#[test]
fn a_dry_run_with_intentions_prints_the_intentions_map() {
    let consul = Consul::start();
    let mut reg: serde_json::Value = serde_json::from_str(&sidecar_registration(
        "server",
        free_port(),
        free_port(),
        &[],
    ))
    .unwrap();
    // The map is an http listener's: a tcp one asks the agent once per connection.
    reg["Connect"]["SidecarService"]["Proxy"]["Config"] = serde_json::json!({"protocol": "http"});
    consul.register(&reg.to_string());
    consul.create_intention("client", "server", "deny");
    let base = TempDir::new("dry-intentions");
    let text = dry_run(
        &consul.http_addr(),
        base.path(),
        "server",
        &["-enable-intentions"],
    );
    let map = text
        .split("==> ")
        .find(|f| {
            f.starts_with(&format!("{}", base.path().display())) && f.contains("intentions.map <==")
        })
        .unwrap_or_else(|| panic!("no intentions.map in:\n{text}"));
    let entries: Vec<&str> = map
        .lines()
        .skip(1)
        .filter(|l| !l.trim().is_empty())
        .collect();
    assert!(
        entries.iter().any(|l| l.ends_with("_0: agent")),
        "the deny is the agent's to judge: {entries:?}"
    );
    assert!(
        entries.iter().any(|l| l.ends_with("_d: allow")),
        "the default policy is read: {entries:?}"
    );
}
