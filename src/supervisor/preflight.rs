//! Checks made before the sidecar contacts Consul, so a broken setup ends the run at once with
//! one line naming the flag (exit 64) instead of surfacing once a registration appears.

use std::path::Path;
use std::time::Duration;

use super::process;
use crate::cli::Options;
use crate::error::{usage, Error, Fatal};
use crate::haproxy_version::HaproxyVersion;

/// The binaries run, the base path is a writable directory (made if missing); the version of
/// the HAProxy that will run.
pub fn check(opts: &Options) -> Result<HaproxyVersion, Fatal> {
    let haproxy = haproxy_version(&opts.haproxy_bin)?;
    runs("-dataplane", &opts.dataplane_bin, "--version")?;
    writable_dir("-haproxy-cfg-base-path", &opts.base_path)?;
    Ok(haproxy)
}

/// `haproxy -v`, read once: every version-dependent choice follows from it.
pub fn haproxy_version(bin: &Path) -> Result<HaproxyVersion, Fatal> {
    runs("-haproxy", bin, "-v")?;
    let out = process::clean_command(bin)
        .arg("-v")
        .output()
        .map_err(|e| {
            usage(Error::with_source(
                format!("-haproxy {}: cannot run it", bin.display()),
                e,
            ))
        })?;
    let version = HaproxyVersion::parse(&String::from_utf8_lossy(&out.stdout)).map_err(|e| {
        usage(e.context(format!("-haproxy {}: reading its version", bin.display())))
    })?;
    log::info!("HAProxy {version} ({})", bin.display());
    Ok(version)
}

/// `flag`'s program starts and answers `arg` with success within a few seconds.
fn runs(flag: &str, bin: &Path, arg: &str) -> Result<(), Fatal> {
    let mut child = process::clean_command(bin)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| {
            usage(Error::with_source(
                format!("{flag} {}: cannot run it", bin.display()),
                e,
            ))
        })?;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        match child.try_wait() {
            Ok(Some(status)) if status.success() => return Ok(()),
            Ok(Some(status)) => {
                return Err(usage(Error::msg(format!(
                    "{flag} {}: `{} {arg}` failed ({status}); is it the right program?",
                    bin.display(),
                    bin.display()
                ))))
            }
            Ok(None) if std::time::Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20));
            }
            Ok(None) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(usage(Error::msg(format!(
                    "{flag} {}: `{arg}` did not answer within 10s",
                    bin.display()
                ))));
            }
            Err(e) => {
                return Err(usage(Error::with_source(
                    format!("{flag} {}: waiting for `{arg}`", bin.display()),
                    e,
                )))
            }
        }
    }
}

/// `dir` exists (or is created) as a directory the sidecar can create files in.
fn writable_dir(flag: &str, dir: &Path) -> Result<(), Fatal> {
    let fail = |what: &str, e: std::io::Error| {
        usage(Error::with_source(
            format!("{flag} {}: {what}", dir.display()),
            e,
        ))
    };
    if !dir.exists() {
        std::fs::create_dir_all(dir).map_err(|e| fail("cannot create it", e))?;
        log::info!("created {flag} {}", dir.display());
    }
    if !dir.is_dir() {
        return Err(usage(Error::msg(format!(
            "{flag} {} is not a directory",
            dir.display()
        ))));
    }
    let probe = dir.join(format!(".hcc-probe-{}", std::process::id()));
    std::fs::write(&probe, b"").map_err(|e| fail("cannot write in it", e))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_failing_programs_are_named() {
        let e = runs("-haproxy", Path::new("/no/such/haproxy"), "-v").unwrap_err();
        assert_eq!(e.code, crate::error::EXIT_USAGE);
        assert!(e
            .error
            .to_string()
            .starts_with("-haproxy /no/such/haproxy: cannot run it"));
        let e = runs("-dataplane", Path::new("false"), "--version").unwrap_err();
        assert!(e.error.to_string().contains("failed"), "{}", e.error);
        runs("-haproxy", Path::new("true"), "-v").unwrap();
    }

    #[test]
    fn base_paths_are_made_and_checked() {
        let base = std::env::temp_dir().join(format!("hcc-preflight-{}", std::process::id()));
        let nested = base.join("a/b");
        writable_dir("-haproxy-cfg-base-path", &nested).unwrap();
        assert!(nested.is_dir());
        let file = base.join("file");
        std::fs::write(&file, b"x").unwrap();
        let e = writable_dir("-haproxy-cfg-base-path", &file).unwrap_err();
        assert!(
            e.error.to_string().contains("is not a directory"),
            "{}",
            e.error
        );
        let e = writable_dir("-haproxy-cfg-base-path", Path::new("/proc/nope")).unwrap_err();
        assert!(
            e.error.to_string().contains("cannot create it"),
            "{}",
            e.error
        );
        let _ = std::fs::remove_dir_all(&base);
    }
}
