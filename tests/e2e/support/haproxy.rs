//! Reaching HAProxy and the sidecar the way an operator would: mTLS with curl, the master and stats CLIs, a dry run.

use super::*;

/// An HTTPS request with the given client certificate files; Ok(body) or Err(curl's complaint),
/// which includes an HTTP error status (a request an L7 intention refused gets 403).
pub fn curl_mtls(
    port: u16,
    cert: Option<(&std::path::Path, &std::path::Path)>,
    ca: &std::path::Path,
) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--fail", "--max-time", "5", "-k"])
        .arg("--cacert")
        .arg(ca)
        .arg(format!("https://127.0.0.1:{port}/"));
    if let Some((c, k)) = cert {
        cmd.arg("--cert").arg(c).arg("--key").arg(k);
    }
    let out = cmd
        .output()
        .expect("curl installed by scripts/install-deps");
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(String::from_utf8_lossy(&out.stderr).into_owned())
    }
}

/// curl set up for one HTTPS request whose answer is read by `http_status` (the body
/// discarded, the server's certificate not checked); the caller adds certificates, headers and
/// the URL.
pub fn curl_for_status() -> Command {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sS",
        "-k",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ]);
    cmd
}

/// Runs a `curl_for_status` command: the HTTP status, 0 when no answer came back (the
/// connection was refused or closed).
pub fn http_status(cmd: &mut Command) -> u16 {
    let out = cmd
        .stderr(Stdio::null())
        .output()
        .expect("curl installed by scripts/install-deps");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

/// Waits until the server `sidecar` is Ready, then writes Consul's first CA root to
/// `<dir>/roots.pem` for clients such as curl, and returns that path.
pub fn ready_with_ca(sidecar: &Child, consul: &Consul, dir: &Path) -> PathBuf {
    wait_until(
        Duration::from_secs(30),
        "the server sidecar to be ready",
        || sidecar.log_contains("-> Ready"),
    )
    .unwrap_or_else(|e| panic!("{e}\n{}", sidecar.logs()));
    consul.root_ca_file(dir)
}

/// The working directory the sidecar of `service` made under `base` (its master socket,
/// rendered files): the short directory its readable `hcc-<proxy id>-…` link points to, as the
/// paths in its files name it.
pub fn sidecar_workdir(base: &Path, service: &str) -> PathBuf {
    let prefix = format!("hcc-{service}-sidecar-proxy-");
    let link = std::fs::read_dir(base)
        .expect("base path readable")
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .find(|p| {
            let name = p
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            name.starts_with(&prefix) && !name.ends_with("-dry-run")
        })
        .unwrap_or_else(|| panic!("no working directory for {service}"));
    std::fs::canonicalize(&link).unwrap_or(link)
}

/// `show stat` on the stats socket under `workdir`: each row as `(column, value)` pairs.
fn show_stat(workdir: &Path) -> Vec<Vec<(String, String)>> {
    let out = haproxy_cli(&workdir.join("haproxy.sock"), "show stat");
    let mut lines = out.lines();
    let Some(header) = lines.next() else {
        return Vec::new();
    };
    let header: Vec<&str> = header.trim_start_matches("# ").split(',').collect();
    lines
        .map(|l| {
            header
                .iter()
                .zip(l.split(','))
                .map(|(h, v)| (h.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// One column of a `show_stat` row.
fn column<'a>(row: &'a [(String, String)], name: &str) -> Option<&'a str> {
    row.iter().find(|(h, _)| h == name).map(|(_, v)| v.as_str())
}

/// The connections a stream of the upstream listening on `port` opened to its instances
/// (`connect` of the backend row in `show stat`) in the HAProxy under `workdir`. HAProxy's own
/// health checks are not streams and are not counted here, whereas they do count in the
/// instance's `conn_tot`.
pub fn upstream_connects(workdir: &Path, port: u16) -> u64 {
    let suffix = format!("_{port}");
    show_stat(workdir)
        .iter()
        .find(|r| {
            column(r, "pxname").is_some_and(|p| p.starts_with("be_up_") && p.ends_with(&suffix))
                && column(r, "svname") == Some("BACKEND")
        })
        .and_then(|r| column(r, "connect"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no connect count for the upstream on port {port}"))
}

/// The mode (`tcp`, `http`) HAProxy runs the public listener of the sidecar whose working
/// directory is `workdir` in, from `show stat` on its stats socket.
pub fn public_listener_mode(workdir: &Path) -> Option<String> {
    show_stat(workdir)
        .iter()
        .find(|r| {
            column(r, "pxname") == Some("public_listener")
                && column(r, "svname") == Some("FRONTEND")
        })
        .and_then(|r| column(r, "mode").map(str::to_string))
}

/// How many servers of the backends whose name ends with `suffix` take traffic in HAProxy (UP,
/// or `no check`: the sidecar's slots have no health check of their own; a slot in maintenance
/// is `MAINT`), from `show stat` on the stats socket under `workdir`.
pub fn servers_up(workdir: &Path, suffix: &str) -> usize {
    show_stat(workdir)
        .iter()
        .filter(|r| {
            column(r, "pxname").is_some_and(|b| b.ends_with(suffix))
                && column(r, "svname").is_some_and(|s| s != "FRONTEND" && s != "BACKEND")
                && column(r, "status").is_some_and(|s| s.starts_with("UP") || s == "no check")
        })
        .count()
}

/// The status HAProxy gives the server slot whose address is `addr` (`UP`, `MAINT`, `no check`,
/// …), from `show stat` on the stats socket under `workdir`; `None` when no slot has it.
pub fn server_status(workdir: &Path, addr: &str) -> Option<String> {
    show_stat(workdir)
        .iter()
        .find(|r| {
            column(r, "addr") == Some(addr)
                && column(r, "svname").is_some_and(|s| s != "FRONTEND" && s != "BACKEND")
        })
        .and_then(|r| column(r, "status").map(str::to_string))
}

/// The time of day, in seconds, of the first line of a sidecar's log holding `needle` (lines
/// start with an RFC 3339 UTC time, `2026-12-07T09:47:07.163Z`).
pub fn log_time(logs: &str, needle: &str) -> Option<f64> {
    let line = logs.lines().find(|l| l.contains(needle))?;
    let time = line.split_whitespace().next()?.split_once('T')?.1;
    let mut parts = time.trim_end_matches('Z').split(':');
    let (h, m, s) = (parts.next()?, parts.next()?, parts.next()?);
    Some(h.parse::<f64>().ok()? * 3600.0 + m.parse::<f64>().ok()? * 60.0 + s.parse::<f64>().ok()?)
}

/// Waits until the public listener under `base` of `service` runs in `mode`: a protocol
/// change reaches HAProxy by a reload, after the intentions table already knows it.
pub fn wait_public_mode(base: &Path, service: &str, mode: &str) {
    let dir = sidecar_workdir(base, service);
    wait_until(
        Duration::from_secs(20),
        &format!("the public listener of {service} in {mode} mode"),
        || public_listener_mode(&dir).as_deref() == Some(mode),
    )
    .unwrap_or_else(|e| panic!("{e}: {:?}", public_listener_mode(&dir)));
}

/// `show proc` on the HAProxy master CLI socket, its whole answer.
fn show_proc(master: &Path) -> String {
    // The master re-executes itself on a reload: its socket is briefly gone, and a connection
    // made just before may be reset mid-answer (seen on HAProxy 3.0). The whole exchange is
    // tried again until an answer has the master's line.
    let deadline = Instant::now() + Duration::from_secs(10);
    let ask = || -> std::io::Result<String> {
        let mut s = std::os::unix::net::UnixStream::connect(master)?;
        s.write_all(b"show proc\n")?;
        s.shutdown(std::net::Shutdown::Write)?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    };
    loop {
        let answer = ask();
        match &answer {
            Ok(out)
                if out
                    .lines()
                    .any(|l| l.split_whitespace().nth(1) == Some("master")) =>
            {
                return out.clone();
            }
            _ if Instant::now() >= deadline => {
                panic!("master socket {}: {answer:?}", master.display())
            }
            _ => std::thread::sleep(Duration::from_millis(20)),
        }
    }
}

/// The HAProxy master's reload count, from its CLI.
pub fn reloads(master: &Path) -> u32 {
    let out = show_proc(master);
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some("master"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no master line in {out}"))
}

/// The pids of HAProxy's current workers (not old ones still draining), from the master CLI:
/// a reload has completed once a worker not in an earlier answer is current.
pub fn current_workers(master: &Path) -> Vec<u32> {
    let out = show_proc(master);
    let mut section = "";
    let mut pids = Vec::new();
    for line in out.lines() {
        if let Some(header) = line.trim().strip_prefix('#') {
            section = if header.trim().starts_with("workers") {
                "workers"
            } else {
                ""
            };
            continue;
        }
        if section == "workers" {
            if let Some(pid) = line.split_whitespace().next().and_then(|p| p.parse().ok()) {
                pids.push(pid);
            }
        }
    }
    pids
}

/// The pids of every HAProxy worker, current and old (still draining after a reload).
pub fn all_workers(master: &Path) -> Vec<u32> {
    show_proc(master)
        .lines()
        .filter(|l| l.split_whitespace().nth(1) == Some("worker"))
        .filter_map(|l| l.split_whitespace().next().and_then(|p| p.parse().ok()))
        .collect()
}

/// The mode (`tcp`, `http`) HAProxy runs the frontend listening on `port` in (the upstream
/// listeners are named `up_…_<port>`), from `show stat` on the stats socket under `workdir`.
pub fn frontend_mode(workdir: &Path, port: u16) -> Option<String> {
    let suffix = format!("_{port}");
    show_stat(workdir)
        .iter()
        .find(|r| {
            column(r, "pxname").is_some_and(|p| p.starts_with("up_") && p.ends_with(&suffix))
                && column(r, "svname") == Some("FRONTEND")
        })
        .and_then(|r| column(r, "mode").map(str::to_string))
}

/// The entries HAProxy holds in memory for the map loaded from a file whose path ends with
/// `file_name` (`show map` on the stats socket under `workdir`), as (key, value); empty when
/// no such map is loaded.
pub fn map_entries(workdir: &Path, file_name: &str) -> Vec<(String, String)> {
    let socket = workdir.join("haproxy.sock");
    // `show map` lists the maps as `<id> (<file>) pattern loaded from file '<file>' …`.
    let listing = haproxy_cli(&socket, "show map");
    let Some(file) = listing.split_whitespace().find_map(|w| {
        let w = w.trim_matches(|c| c == '(' || c == ')' || c == '\'');
        w.ends_with(file_name).then(|| w.to_string())
    }) else {
        return Vec::new();
    };
    haproxy_cli(&socket, &format!("show map {file}"))
        .lines()
        .filter_map(|l| {
            // `<entry id> <key> <value>`
            let mut f = l.split_whitespace().skip(1);
            Some((f.next()?.to_string(), f.next()?.to_string()))
        })
        .collect()
}

/// One command on an HAProxy CLI socket (stats or master), its whole answer.
pub fn haproxy_cli(socket: &Path, command: &str) -> String {
    let mut s = std::os::unix::net::UnixStream::connect(socket).expect("HAProxy socket");
    s.write_all(format!("{command}\n").as_bytes()).unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out
}

/// Runs the sidecar's `--dry-run` for `service`; asserts it succeeded and returns its output.
pub fn dry_run(consul_addr: &str, base: &Path, service: &str, args: &[&str]) -> String {
    // In the rootfs too: the rendered configuration depends on the HAProxy version.
    let out = sidecar_command()
        .args([
            "--dry-run",
            "-sidecar-for",
            service,
            "-http-addr",
            consul_addr,
        ])
        .arg("-haproxy-cfg-base-path")
        .arg(base)
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs `openssl` with `stdin`, for what the tests check of certificates.
pub fn openssl(args: &[&str], stdin: &[u8]) -> std::process::Output {
    let mut child = Command::new("openssl")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("openssl installed by scripts/install-deps");
    if let Some(mut s) = child.stdin.take() {
        let _ = s.write_all(stdin);
    }
    child.wait_with_output().expect("openssl ran")
}

/// Whether the TLS listener on `port` asks a client for its certificate (mTLS), as openssl's
/// trace of the handshake shows.
pub fn asks_for_client_certificate(port: u16) -> bool {
    let addr = format!("127.0.0.1:{port}");
    let out = openssl(&["s_client", "-connect", &addr, "-state"], b"Q");
    [&out.stdout, &out.stderr].iter().any(|o| {
        String::from_utf8_lossy(o)
            .to_lowercase()
            .contains("certificate request")
    })
}

/// The certificate a TLS server presents, as openssl prints its SANs.
pub fn presented_sans(port: u16) -> String {
    let out = openssl(
        &[
            "s_client",
            "-connect",
            &format!("127.0.0.1:{port}"),
            "-showcerts",
        ],
        b"",
    );
    let pem = String::from_utf8_lossy(&out.stdout).into_owned();
    let out = openssl(
        &["x509", "-noout", "-ext", "subjectAltName"],
        pem.as_bytes(),
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}
