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
    let printed = runs("-haproxy", bin, "-v")?;
    let version = HaproxyVersion::parse(&printed).map_err(|e| {
        usage(e.context(format!("-haproxy {}: reading its version", bin.display())))
    })?;
    log::info!("HAProxy {version} ({})", bin.display());
    Ok(version)
}

/// `flag`'s program starts and answers `arg` with success within a few seconds; what it
/// printed. The output goes to a file, not a pipe: a wrapper script that leaves a process
/// behind (holding the pipe open) would otherwise keep the sidecar waiting for end of file.
fn runs(flag: &str, bin: &Path, arg: &str) -> Result<String, Fatal> {
    let out_path = std::env::temp_dir().join(format!(
        "hcc-preflight-{}-{:08x}",
        std::process::id(),
        crate::random::random_u32().map_err(Fatal::from)?
    ));
    let out = std::fs::File::create(&out_path).map_err(|e| {
        usage(Error::with_source(
            format!("{flag}: creating {} for its output", out_path.display()),
            e,
        ))
    })?;
    let result = wait_for(flag, bin, arg, out);
    let printed = std::fs::read_to_string(&out_path).unwrap_or_default();
    let _ = std::fs::remove_file(&out_path);
    result.map(|()| printed)
}

fn wait_for(flag: &str, bin: &Path, arg: &str, out: std::fs::File) -> Result<(), Fatal> {
    let mut child = process::clean_command(bin)
        .arg(arg)
        .stdin(std::process::Stdio::null())
        .stdout(out)
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

    /// A wrapper that leaves a process behind holding its output must not hold the start up.
    #[test]
    fn a_wrapper_leaving_a_process_behind_does_not_hang_the_check() {
        use std::os::unix::fs::PermissionsExt;
        let dir = std::env::temp_dir().join(format!("hcc-preflight-wrap-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let wrapper = dir.join("haproxy");
        std::fs::write(
            &wrapper,
            "#!/bin/sh\n( sleep 3 & )\necho 'HAProxy version 2.6.12-1 2026/10/17'\n",
        )
        .unwrap();
        std::fs::set_permissions(&wrapper, std::fs::Permissions::from_mode(0o755)).unwrap();
        let started = std::time::Instant::now();
        let v = haproxy_version(&wrapper).unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "{:?}",
            started.elapsed()
        );
        assert_eq!((v.major, v.minor), (2, 6));
        let _ = std::fs::remove_dir_all(&dir);
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
