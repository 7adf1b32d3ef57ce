use super::*;
use crate::model::fixtures::{settings_in, snapshot, ANY};
use crate::model::{Desired, Mode};

/// The public frontend with intentions: in http mode the per-request rules (fast map
/// lookup while the agent is up, the agent for the rest, 403 for what neither allowed); in
/// tcp mode an L7-marked connection is refused, since nothing there can judge its requests.
#[test]
fn the_public_frontend_judges_l7_requests_in_http_and_refuses_them_in_tcp() {
    let dir = std::path::Path::new("/hcc-test");
    let s = snapshot(ANY, "server-sidecar-proxy", "ca-leaf-server.json");
    let mut d = crate::model::build(&s, &settings_in(dir, true), None).unwrap();
    let lines = |d: &Desired| {
        public_frontend(d, d.sidecar())
            .lines(&public_bind(d, d.sidecar()))
            .join("\n")
    };
    d.sidecar_mut().mode = Mode::Tcp;
    let tcp = lines(&d);
    assert!(
        tcp.contains("tcp-request content reject if { var(sess.hcc.l7) -m bool }"),
        "{tcp}"
    );
    assert!(!tcp.contains("http-request"), "{tcp}");
    assert!(
        tcp.contains("tcp-request content reject unless { var(sess.hcc.allow) -m bool }"),
        "{tcp}"
    );
    d.sidecar_mut().mode = Mode::Http;
    let http = lines(&d);
    assert!(!http.contains("tcp-request content reject"), "{http}");
    for want in [
        // The connection's verdict: asked for while the table's generation is not the one
        // it was made under, then every request refused without it.
        "http-request set-var(txn.hcc_gen) str(generation),map_reg(/hcc-test/intentions.map)",
        "http-request send-spoe-group intentions l4-check if !{ var(sess.hcc.l7) -m bool } !{ var(sess.hcc.gen),strcmp(txn.hcc_gen) eq 0 }",
        "http-request deny deny_status 403 unless { var(sess.hcc.allow) -m bool }",
        "map_reg(/hcc-test/intentions.map,agent)",
        "srv_is_up(intentions_agent/agent)",
        "http-request send-spoe-group intentions l7-request if hcc_l7 !hcc_fast",
        "http-request deny deny_status 403 if hcc_l7 !hcc_fast !{ var(txn.hcc.req_allow) -m bool }",
    ] {
        assert!(http.contains(want), "{want} missing:\n{http}");
    }
    assert!(!http.contains("reject if { var(sess.hcc.l7)"), "{http}");
}

/// An http public listener, with intentions or without: paths that cannot be judged in
/// one form are refused before any other rule, and the normalizers come after every rule
/// that reads the path (where Dataplane API v1.2.5's transactions move them anyway); the
/// fast map is looked up only for a path already in normal form. A tcp listener has none
/// of it.
#[test]
fn an_http_public_listener_refuses_odd_paths_first_and_normalizes_last() {
    let dir = std::path::Path::new("/hcc-test");
    let s = snapshot(ANY, "server-sidecar-proxy", "ca-leaf-server.json");
    for intentions in [true, false] {
        let mut d = crate::model::build(&s, &settings_in(dir, intentions), None).unwrap();
        d.sidecar_mut().mode = Mode::Http;
        let lines = public_frontend(&d, d.sidecar()).lines(&public_bind(&d, d.sidecar()));
        let at = |want: &str| {
            lines
                .iter()
                .position(|l| l == want)
                .unwrap_or_else(|| panic!("{want} missing:\n{}", lines.join("\n")))
        };
        let first_http = lines
            .iter()
            .position(|l| l.starts_with("http-request"))
            .unwrap();
        // Before the refusals only the connection's verdict (with intentions), which
        // reads no path.
        let first_refusal = at(PATH_REFUSALS[0]);
        assert_eq!(first_refusal - first_http, if intentions { 3 } else { 0 });
        assert!(lines[first_http..first_refusal]
            .iter()
            .all(|l| !l.contains("path")));
        for (i, r) in PATH_REFUSALS.iter().enumerate() {
            assert_eq!(at(r), first_refusal + i, "{}", lines.join("\n"));
        }
        let first_normalizer = at(NORMALIZE[0]);
        assert_eq!(
            &lines[first_normalizer..first_normalizer + NORMALIZE.len()],
            NORMALIZE.as_slice()
        );
        let reads_path = lines
            .iter()
            .rposition(|l| l.contains("path") && !l.contains("normalize-uri"))
            .unwrap();
        assert!(reads_path < first_normalizer, "{}", lines.join("\n"));
        assert_eq!(lines.last().unwrap(), "default_backend local_app");
        let key = lines.iter().find(|l| l.contains("set-var(txn.hcc_l7key)"));
        assert_eq!(key.is_some(), intentions);
        if let Some(key) = key {
            assert!(key.ends_with(" !hcc_odd_path"), "{key}");
        }
        d.sidecar_mut().mode = Mode::Tcp;
        let tcp = public_frontend(&d, d.sidecar())
            .lines(&public_bind(&d, d.sidecar()))
            .join("\n");
        assert!(!tcp.contains("http-request"), "{tcp}");
    }
}

/// A path HAProxy's fast map may look up (one no `hcc_odd_path` test matches) is its own
/// normal form, so the map and the agent judge the same path.
#[test]
fn a_path_the_fast_map_sees_is_its_own_normal_form() {
    use crate::spoe::authz::l7::normalize_path;
    let parts: Vec<&str> = ODD_PATH_PARTS.split(' ').collect();
    let ends: Vec<&str> = ODD_PATH_ENDS.split(' ').collect();
    let mut seen = 0;
    for p in sample_paths(50_000) {
        let odd = parts.iter().any(|x| p.contains(x)) || ends.iter().any(|x| p.ends_with(x));
        if odd {
            continue;
        }
        if let Ok(n) = normalize_path(&p) {
            seen += 1;
            assert_eq!(n, p, "the fast map would judge {p:?}, the agent {n:?}");
        }
    }
    assert!(seen > 1_000, "only {seen} plain paths");
}

/// Paths made of the characters normalization cares about, `/`-first, deterministic.
fn sample_paths(n: usize) -> Vec<String> {
    let alphabet = [
        '/', '/', '.', '.', '%', '2', 'e', 'E', 'f', 'F', '6', '1', 'a', '5', 'c', '\\',
    ];
    let mut x: u64 = 0x2545_f491_4f6c_dd1d;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let mut y = x;
            let mut p = String::from("/");
            for _ in 0..1 + (x % 10) {
                p.push(alphabet[(y % alphabet.len() as u64) as usize]);
                y /= alphabet.len() as u64;
            }
            p
        })
        .collect()
}

/// Stops the HAProxy a test started, by its PID.
struct Haproxy(std::process::Child);
impl Drop for Haproxy {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The agent's `normalize_path` is what a real HAProxy running the public listener's path
/// rules does: the same refusals (400) and the same normal form forwarded, over the
/// issue's paths, `l7`'s table and a few hundred made-up ones.
#[test]
fn haproxy_normalizes_paths_as_the_agent_does() {
    use crate::spoe::authz::l7::normalize_path;
    use std::io::{Read, Write};
    let dir = std::env::temp_dir().join(format!("hcc-normalize-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let f = FrontendSpec {
        name: "t".into(),
        mode: Mode::Http,
        default_backend: Some("be".into()),
        log_format: None,
        client_timeout_ms: None,
        maxconn: None,
        kind: FrontendKind::Public {
            app_header: None,
            xfcc: None,
            plain_socket: None,
            intentions: None,
            path_rules: true,
        },
    };
    let bind = BindSpec {
        frontend: "t".into(),
        name: "t".into(),
        address: "127.0.0.1".into(),
        port: Some(port),
        unix_mode: None,
        tls: None,
        h2: false,
        alpn: None,
        accept_proxy: false,
    };
    let mut lines = f.lines(&bind);
    // What the app would be sent: the path after every rule, echoed.
    lines.insert(
        lines.len() - 1,
        "http-request return status 200 content-type text/plain lf-string \"[%[path]]\"".into(),
    );
    let cfg = format!(
        "global\n    expose-experimental-directives\ndefaults\n    timeout connect 5s\n    \
         timeout client 5s\n    timeout server 5s\nfrontend t\n    {}\nbackend be\n    mode http\n",
        lines.join("\n    ")
    );
    let path = dir.join("haproxy.cfg");
    std::fs::write(&path, &cfg).unwrap();
    let _haproxy = Haproxy(
        std::process::Command::new("haproxy")
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("haproxy must be installed (scripts/install-deps)"),
    );
    let ask = |target: &str| -> Option<(u16, String)> {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
        c.set_read_timeout(Some(std::time::Duration::from_secs(5)))
            .ok()?;
        // One write: pieces would wait on Nagle and the delayed ACK, 40 ms each request.
        c.write_all(format!("GET {target} HTTP/1.1\r\nConnection: close\r\n\r\n").as_bytes())
            .ok()?;
        let mut out = String::new();
        c.read_to_string(&mut out).ok()?;
        let status = out.get(9..12)?.parse().ok()?;
        let body = out.split("\r\n\r\n").nth(1).unwrap_or("").to_string();
        Some((status, body))
    };
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while ask("/").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "haproxy never answered\n{cfg}"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let mut targets: Vec<String> = [
        "//admin",
        "/./admin",
        "/x/../admin",
        "/%61dmin",
        "/x/%2e%2e/admin",
        "/admin%2Fx",
        "/admin%5c",
        "/a\\b",
        "/%zz",
        "/a%",
        "http://host",
        "*",
        "http://h/x/../admin",
        "/a//../b",
        "/a/..//b",
        "/.../a/..",
        "/%c3%a9",
        "/%2561dmin",
        "//ok",
        "/%6Fk",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    targets.extend(sample_paths(400));
    let mut wrong = Vec::new();
    for t in &targets {
        let got = ask(t);
        // An absolute-form target's path is the part after the authority.
        let p = t.strip_prefix("http://h").unwrap_or(t);
        let want = match normalize_path(p) {
            Ok(n) => Some((200, format!("[{n}]"))),
            Err(_) => Some((400, String::new())),
        };
        let same = match (&got, &want) {
            (Some((400, _)), Some((400, _))) => true,
            _ => got == want,
        };
        if !same {
            wrong.push(format!("{t:?}: haproxy {got:?}, agent {want:?}"));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    assert!(wrong.is_empty(), "{}\n{cfg}", wrong.join("\n"));
}
