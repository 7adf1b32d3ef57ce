//! The walking skeleton end to end: real Consul 1.8.7, HAProxy 2.6 and the Dataplane API on
//! loopback, two sidecars, the original's `case-basic` and more.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::support::mesh::{sidecar, Mesh, MeshOptions, APP_BODY};
use crate::support::*;
use nix::sys::signal::Signal;

fn rss_kb(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// The secrets a running sidecar keeps in its working directory: the Dataplane API password
/// (from the userlist of haproxy.cfg) and the first line of its leaf's private key.
fn sidecar_secrets(workdir: &std::path::Path) -> Vec<(&'static str, String)> {
    let cfg = std::fs::read_to_string(workdir.join("haproxy.cfg")).unwrap();
    let password = cfg
        .lines()
        .find_map(|l| {
            let mut words = l.split_whitespace();
            words.find(|w| *w == "insecure-password")?;
            words.next()
        })
        .unwrap_or_else(|| panic!("no Dataplane API password in\n{cfg}"))
        .to_string();
    // Short or guessable, it would match by accident or not be worth hiding.
    assert!(
        password.len() >= 32 && password.chars().all(|c| c.is_ascii_hexdigit()),
        "{password:?}"
    );
    let leaf = std::fs::read_to_string(workdir.join("certs").join("leaf.pem")).unwrap();
    let key_line = leaf
        .lines()
        .skip_while(|l| !l.contains("PRIVATE KEY-----"))
        .nth(1)
        .unwrap_or_else(|| panic!("no private key in the leaf file"))
        .to_string();
    assert!(key_line.len() >= 40, "{key_line:?}");
    vec![
        ("the Dataplane API password", password),
        ("the leaf's private key", key_line),
    ]
}

#[test]
fn traffic_identity_and_refusals_through_two_sidecars() {
    let nobody_port = free_port();
    let mesh = Mesh::start(MeshOptions {
        extra_upstreams: vec![("nobody".into(), nobody_port)],
        ..Default::default()
    });
    eprintln!(
        "measured: sidecar start to first answer through the mesh: {} ms",
        mesh.first_answer.as_millis()
    );

    // 1. A request through the client's upstream port reaches the app and returns its body.
    let before = mesh.app.requests();
    let (status, body) = http_get(&mesh.upstream_addr(), "/hello", Duration::from_secs(5)).unwrap();
    assert_eq!((status, body.as_str()), (200, APP_BODY));
    assert!(mesh.app.requests() > before, "the app saw the request");

    // 2. The server sidecar's public port presents its SPIFFE identity.
    let sans = presented_sans(mesh.server_port);
    let want = format!("URI:spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/server");
    assert!(sans.contains(&want), "SANs {sans:?} lack {want}");

    // 3. The public port requires a client certificate from the mesh CA.
    let dir = TempDir::new("certs");
    let roots = mesh.consul.get_json("/v1/agent/connect/ca/roots");
    let root_pem = roots["Roots"][0]["RootCert"].as_str().unwrap().to_string();
    std::fs::write(dir.join("roots.pem"), &root_pem).unwrap();
    let leaf = mesh.consul.get_json("/v1/agent/connect/ca/leaf/client");
    std::fs::write(dir.join("client.pem"), leaf["CertPEM"].as_str().unwrap()).unwrap();
    std::fs::write(
        dir.join("client.key"),
        leaf["PrivateKeyPEM"].as_str().unwrap(),
    )
    .unwrap();
    // Positive control: a mesh leaf gets through, so the refusals below are the sidecar's doing.
    let ok = curl_mtls(
        mesh.server_port,
        Some((&dir.join("client.pem"), &dir.join("client.key"))),
        &dir.join("roots.pem"),
    );
    assert_eq!(ok.as_deref(), Ok(APP_BODY));
    let seen = mesh.app.requests();
    let no_cert = curl_mtls(mesh.server_port, None, &dir.join("roots.pem"));
    assert!(
        no_cert.is_err(),
        "a client without a certificate got {no_cert:?}"
    );
    let gen = openssl(
        &[
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=rogue",
            "-addext",
            &format!("subjectAltName=URI:spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/client"),
            "-keyout",
            dir.join("rogue.key").to_str().unwrap(),
            "-out",
            dir.join("rogue.pem").to_str().unwrap(),
        ],
        b"",
    );
    assert!(
        gen.status.success(),
        "{}",
        String::from_utf8_lossy(&gen.stderr)
    );
    let rogue = curl_mtls(
        mesh.server_port,
        Some((&dir.join("rogue.pem"), &dir.join("rogue.key"))),
        &dir.join("roots.pem"),
    );
    assert!(
        rogue.is_err(),
        "a certificate from another CA got {rogue:?}"
    );
    assert_eq!(mesh.app.requests(), seen, "refused clients reached the app");

    // 4. An upstream whose destination has no healthy instance fails fast instead of hanging.
    let t = Instant::now();
    let nobody = http_get(
        &format!("127.0.0.1:{nobody_port}"),
        "/",
        Duration::from_secs(10),
    );
    assert!(nobody.is_err(), "no instance, yet {nobody:?}");
    assert!(
        t.elapsed() < Duration::from_secs(9),
        "the request hung until the client gave up: {nobody:?}"
    );

    // 5. Secrets never reach a log, a child's command line or its environment: the Dataplane
    // API password each sidecar generated and its leaf's private key, read back from the files
    // that alone should hold them.
    for (service, sidecar) in [
        ("server", &mesh.server_sidecar),
        ("client", &mesh.client_sidecar),
    ] {
        let secrets = sidecar_secrets(&mesh.workdir(service));
        let logs = sidecar.logs();
        for (what, secret) in &secrets {
            assert!(
                !logs.contains(secret.as_str()),
                "{service}: {what} in the log"
            );
        }
        let mut looked_at = Vec::new();
        for pid in descendants(sidecar.pid()) {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
            if !cmdline.is_empty() {
                looked_at.push(process_name(pid).unwrap_or_default());
            }
            for (what, secret) in &secrets {
                for (place, hay) in [("argv", &cmdline), ("environment", &environ)] {
                    assert!(
                        !String::from_utf8_lossy(hay).contains(secret.as_str()),
                        "{service}: {what} in the {place} of {pid}"
                    );
                }
            }
            // HAProxy sets HAPROXY_* on itself; the Dataplane API must not inherit them, or it
            // believes it runs as an HAProxy program.
            if process_name(pid).as_deref() == Some("dataplaneapi") {
                let text = String::from_utf8_lossy(&environ);
                assert!(
                    !text.contains("HAPROXY_"),
                    "dataplaneapi {pid} inherited: {text}"
                );
                // Its GC target (the test runs without GOMEMLIMIT/GOGC of its own).
                assert!(
                    environ.split(|b| *b == 0).any(|v| v == b"GOGC=50"),
                    "dataplaneapi {pid}: {text}"
                );
            }
        }
        // A search of nothing proves nothing.
        assert!(
            ["dataplaneapi", "haproxy"]
                .iter()
                .all(|n| looked_at.iter().any(|l| l == n)),
            "{service}: searched only {looked_at:?}"
        );
    }

    // Numbers for the closing note.
    for sidecar in [&mesh.server_sidecar, &mesh.client_sidecar] {
        let kids: Vec<String> = descendants(sidecar.pid())
            .into_iter()
            .map(|p| format!("{}={} kB", process_name(p).unwrap_or_default(), rss_kb(p)))
            .collect();
        eprintln!(
            "measured: {} RSS {} kB; children: {}",
            sidecar.name(),
            rss_kb(sidecar_pid(sidecar.pid())),
            kids.join(", ")
        );
    }
}

#[test]
fn sigterm_stops_everything_the_sidecar_started() {
    let mut mesh = Mesh::start(MeshOptions::default());
    let workdir = mesh.workdir("client");
    let started: Vec<u32> = descendants(mesh.client_sidecar.pid());
    let names: Vec<String> = started.iter().filter_map(|p| process_name(*p)).collect();
    assert!(names.iter().any(|n| n == "haproxy"), "{names:?}");
    assert!(names.iter().any(|n| n == "dataplaneapi"), "{names:?}");

    let t = Instant::now();
    mesh.client_sidecar.signal(Signal::SIGTERM);
    let status = mesh
        .client_sidecar
        .wait_timeout(Duration::from_secs(40))
        .expect("the sidecar stops after SIGTERM");
    eprintln!("measured: drain took {} ms", t.elapsed().as_millis());
    assert_eq!(status.code(), Some(0), "{}", mesh.client_sidecar.logs());
    assert!(
        still_running(&started).is_empty(),
        "left running: {:?}",
        still_running(&started)
    );
    assert!(!workdir.exists(), "{} was not removed", workdir.display());
    let logs = mesh.client_sidecar.logs();
    let order: Vec<usize> = [
        "-> WaitingForConsul",
        "-> Ready",
        "-> Draining",
        "-> Stopped",
    ]
    .iter()
    .map(|p| {
        logs.find(p)
            .unwrap_or_else(|| panic!("no phase {p} in\n{logs}"))
    })
    .collect();
    assert!(
        order.windows(2).all(|w| w[0] < w[1]),
        "phases out of order:\n{logs}"
    );
}

#[test]
fn dry_run_prints_files_that_haproxy_accepts() {
    dry_run_check(&[], &[]);
}

#[test]
fn with_intentions_the_dry_run_passes_haproxy_check() {
    dry_run_check(&["-enable-intentions"], &["filter spoe", "use-backend"]);
}

#[test]
fn knobs_change_the_rendered_config_and_haproxy_accepts_it() {
    dry_run_check(
        &[
            "-haproxy-param",
            "global.maxconn=4096",
            "-haproxy-param",
            "defaults.timeout client=45s",
            "-haproxy-param",
            "global.maxconn=8192",
            "-balance",
            "leastconn",
            "-log-format",
            "%ci:%cp %ft %b/%s %Tt %B %ts",
        ],
        &[
            "maxconn 8192",
            "timeout client 45s",
            "balance leastconn",
            "log-format \"%ci:%cp %ft %b/%s %Tt %B %ts\"",
        ],
    );
}

/// Runs --dry-run with `args`, checks the output holds `wants`, writes the files it names and
/// has HAProxy check them.
fn dry_run_check(args: &[&str], wants: &[&str]) {
    let consul = Consul::start();
    consul.register(&sidecar_registration(
        "client",
        free_port(),
        free_port(),
        &[("server", free_port())],
    ));
    let base = TempDir::new("dry");
    // What an operator pastes into a ticket: no key, no password.
    let redacted = dry_run(&consul.http_addr(), base.path(), "client", args);
    assert!(
        !redacted.contains("PRIVATE KEY-----") && redacted.contains("(private key redacted"),
        "{redacted}"
    );
    assert!(
        redacted.contains("insecure-password <redacted"),
        "{redacted}"
    );
    let mut with_secrets = args.to_vec();
    with_secrets.push("-dry-run-show-secrets");
    let text = dry_run(&consul.http_addr(), base.path(), "client", &with_secrets);
    assert!(text.contains("PRIVATE KEY-----"), "{text}");
    for want in wants {
        assert!(text.contains(want), "the dry run lacks {want:?}:\n{text}");
    }
    assert!(
        !text.contains("maxconn 4096"),
        "an overridden value survived"
    );
    let mut files: Vec<(String, String)> = Vec::new();
    for line in text.split_inclusive('\n') {
        if let Some(path) = line
            .strip_prefix("==> ")
            .and_then(|l| l.trim_end().strip_suffix(" <=="))
        {
            files.push((path.to_string(), String::new()));
        } else if let Some((_, body)) = files.last_mut() {
            body.push_str(line);
        }
    }
    let names: Vec<&str> = files
        .iter()
        .map(|(p, _)| p.rsplit('/').next().unwrap())
        .collect();
    if args.contains(&"-enable-intentions") {
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
    } else {
        // The public listener's CA file is its own (our roots and the CAs of peers the
        // service is exported to); upstream servers keep our roots only.
        assert_eq!(
            names,
            ["roots.pem", "public-roots.pem", "leaf.pem", "haproxy.cfg"]
        );
    }
    assert!(
        std::fs::read_dir(base.path()).unwrap().next().is_none(),
        "dry run wrote files"
    );
    for (path, body) in &files {
        let p = std::path::Path::new(path);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(p, body).unwrap();
    }
    let cfg = &files.last().unwrap().0;
    let check = haproxy_command()
        .args(["-W", "-c", "-f", cfg])
        .output()
        .unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&check.stdout),
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(
        check.status.success(),
        "haproxy -c rejected the dry-run config: {said}"
    );
    // A warning today is an error in a later HAProxy (3.2 warns of what 3.3 refuses).
    let warnings: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("[WARNING]") || l.contains("[ALERT]"))
        .collect();
    assert!(warnings.is_empty(), "haproxy -c warned: {warnings:#?}");
}

#[test]
fn consul_over_a_unix_socket_and_token_from_the_environment() {
    // ACLs on with default deny: without the token from the environment the sidecar cannot even
    // see its registration, so being ready proves the token was used.
    let consul = Consul::start_acl_deny();
    let app = HttpApp::start(APP_BODY);
    let port = free_port();
    consul.register(&sidecar_registration("server", app.port(), port, &[]));
    // What an operator would hand the sidecar: a service identity, nothing more.
    let (status, body) = consul.put(
        "/v1/acl/token",
        r#"{"Description": "server sidecar", "ServiceIdentities": [{"ServiceName": "server"}]}"#,
    );
    assert_eq!(status, 200, "{body}");
    let token: serde_json::Value = serde_json::from_str(&body).unwrap();
    let token = token["SecretID"].as_str().unwrap().to_string();
    // A relay gives the real agent a unix socket address, as CONSUL_HTTP_ADDR=unix:// users have.
    let base = TempDir::new("unix");
    let sock = base.join("consul.sock");
    let _relay = Child::spawn(
        "relay",
        Command::new("socat")
            .arg(format!("UNIX-LISTEN:{},fork,mode=600", sock.display()))
            .arg(format!("TCP:{}", consul.http_addr())),
        base.path(),
    );
    wait_until(Duration::from_secs(5), "the relay socket", || sock.exists()).unwrap();
    let start = |name: &str, token: Option<&str>| {
        let dir = base.join(name);
        std::fs::create_dir(&dir).unwrap();
        let mut cmd = Command::new(bin_path());
        cmd.args(["-sidecar-for", "server", "-log-level", "trace"])
            .arg("-haproxy-cfg-base-path")
            .arg(&dir)
            .env("CONSUL_HTTP_ADDR", format!("unix://{}", sock.display()))
            .env_remove("CONSUL_HTTP_TOKEN")
            .env_remove("CONSUL_HTTP_TOKEN_FILE");
        if let Some(t) = token {
            cmd.env("CONSUL_HTTP_TOKEN", t);
        }
        Child::spawn(name, &mut cmd, &dir)
    };
    // Negative control first, so it has had at least as long as the other to get ready.
    let tokenless = start("sidecar-no-token", None);
    let sidecar = start("sidecar", Some(&token));
    wait_until(Duration::from_secs(30), "the sidecar to be ready", || {
        sidecar.log_contains("-> Ready")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.logs()));
    let leaf = consul.get_json("/v1/agent/connect/ca/leaf/client");
    let roots = consul.get_json("/v1/agent/connect/ca/roots");
    let (cert, key, ca) = (base.join("c.pem"), base.join("c.key"), base.join("r.pem"));
    std::fs::write(&cert, leaf["CertPEM"].as_str().unwrap()).unwrap();
    std::fs::write(&key, leaf["PrivateKeyPEM"].as_str().unwrap()).unwrap();
    std::fs::write(&ca, roots["Roots"][0]["RootCert"].as_str().unwrap()).unwrap();
    assert_eq!(
        curl_mtls(port, Some((&cert, &key)), &ca).as_deref(),
        Ok(APP_BODY),
        "{}",
        sidecar.logs()
    );
    // Without a token Consul filters the registration out of what the sidecar may see.
    wait_until(
        Duration::from_secs(10),
        "the tokenless sidecar to find no registration",
        || tokenless.log_contains("connect-proxy services here: none"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", tokenless.logs()));
    assert!(
        !tokenless.log_contains("-> Ready"),
        "ready without a token, so the token proves nothing\n{}",
        tokenless.logs()
    );
    assert!(
        !sidecar.logs().contains(&token),
        "the token reached the log"
    );
    let children = descendants(sidecar.pid());
    assert!(
        children.len() >= 3,
        "haproxy and dataplaneapi: {children:?}"
    );
    for pid in children {
        let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
        assert!(
            !String::from_utf8_lossy(&cmdline).contains(&token),
            "token in argv of {pid}"
        );
        assert!(
            !String::from_utf8_lossy(&environ).contains(&token),
            "token in env of {pid}"
        );
    }
}

#[test]
fn bad_usage_exits_64_with_one_line() {
    for args in [
        &["-bogus"][..],
        &["-sidecar-for", "x", "-log-level", "chatty"],
        &[],
        &["-sidecar-for", "x", "-http-addr", "gopher://x"],
        &["-sidecar-for", "x", "-haproxy-param", "global.maxconn"],
        &["-sidecar-for", "x", "-balance", "source"],
    ] {
        let out = Command::new(bin_path()).args(args).output().unwrap();
        assert_eq!(out.status.code(), Some(64), "{args:?}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(err.trim().lines().count(), 1, "{args:?}: {err}");
    }
}

/// An override directory holding the built-in template with `line` added to `global`.
fn override_dir(base: &TempDir, line: &str) -> std::path::PathBuf {
    let builtin = std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/templates/haproxy.cfg.tera"
    ))
    .unwrap();
    let dir = base.join("templates");
    std::fs::create_dir_all(&dir).unwrap();
    let custom = builtin.replacen("global\n", &format!("global\n    {line}\n"), 1);
    assert_ne!(custom, builtin, "the template has a global section");
    std::fs::write(dir.join("haproxy.cfg.tera"), custom).unwrap();
    dir
}

#[test]
fn a_template_override_is_used_and_a_broken_one_is_refused_at_start() {
    let base = TempDir::new("tpl");
    let good = override_dir(&base, "maxconn 4321");
    dry_run_check(
        &["-template-dir", good.to_str().unwrap()],
        &["maxconn 4321"],
    );

    let consul = Consul::start();
    consul.register(&sidecar_registration(
        "server",
        free_port(),
        free_port(),
        &[],
    ));
    for (name, line, needle) in [
        (
            "haproxy-refuses",
            "no-such-keyword 1",
            "refused by haproxy -c",
        ),
        ("tera-refuses", "{% if %}", "loading the templates"),
    ] {
        let dir_base = TempDir::new(name);
        let dir = override_dir(&dir_base, line);
        let mut sc = sidecar(
            &consul,
            &dir_base,
            "server",
            false,
            &["-template-dir", dir.to_str().unwrap()],
        );
        let status = sc.wait_timeout(Duration::from_secs(20)).expect("exits");
        assert_eq!(status.code(), Some(64), "{name}: {}", sc.logs());
        assert!(sc.log_contains(needle), "{name}: {}", sc.logs());
        assert!(
            sc.log_contains("haproxy.cfg.tera"),
            "{name} names the template: {}",
            sc.logs()
        );
        assert!(
            !sc.log_contains("started haproxy"),
            "{name}: HAProxy was started"
        );
    }
}
