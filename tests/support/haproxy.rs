//! Reaching HAProxy and the sidecar the way an operator would: mTLS with curl, the master and stats CLIs, a dry run.

use super::*;

/// An HTTPS request with the given client certificate files; Ok(body) or Err(curl's complaint).
pub fn curl_mtls(
    port: u16,
    cert: Option<(&std::path::Path, &std::path::Path)>,
    ca: &std::path::Path,
) -> Result<String, String> {
    let mut cmd = Command::new("curl");
    cmd.args(["-sS", "--max-time", "5", "-k"])
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

/// The HAProxy master's reload count, from its CLI.
pub fn reloads(master: &Path) -> u32 {
    // The master re-executes itself on a reload and its socket is briefly gone.
    let deadline = Instant::now() + Duration::from_secs(5);
    let mut s = loop {
        match std::os::unix::net::UnixStream::connect(master) {
            Ok(s) => break s,
            Err(e) if Instant::now() >= deadline => {
                panic!("master socket {}: {e}", master.display())
            }
            Err(_) => std::thread::sleep(Duration::from_millis(20)),
        }
    };
    s.write_all(b"show proc\n").unwrap();
    s.shutdown(std::net::Shutdown::Write).unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find(|l| l.split_whitespace().nth(1) == Some("master"))
        .and_then(|l| l.split_whitespace().nth(2))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no master line in {out}"))
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
