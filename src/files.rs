//! The sidecar's own directory and atomic, private file writes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

use crate::model::MAX_SOCKET_PATH;

/// The sidecar's private working directory, removed (with its symlink) when dropped unless
/// `HCC_KEEP_WORKDIR` is set.
#[derive(Debug)]
pub struct Workdir {
    /// `<base>/hcc-<random>`: short whatever the proxy ID, so the sockets inside fit
    /// HAProxy's limit.
    pub dir: PathBuf,
    /// `<base>/hcc-<proxy id>-<random>` → `dir`, for people (and tests) looking for a proxy's
    /// directory; the full ID is also in `<dir>/proxy-id`.
    pub link: PathBuf,
}

impl Drop for Workdir {
    fn drop(&mut self) {
        if std::env::var_os("HCC_KEEP_WORKDIR").is_none() {
            let _ = fs::remove_file(&self.link);
            let _ = fs::remove_dir_all(&self.dir);
        }
    }
}

/// Creates `<base>/hcc-<random>` with mode 0700, so two sidecars on one host never share a file
/// or socket, and the readable symlink beside it.
pub fn create_workdir(base: &Path, proxy_id: &str) -> Result<Workdir> {
    let meta = fs::metadata(base)
        .with_context(|| format!("-haproxy-cfg-base-path {} is not usable", base.display()))?;
    if !meta.is_dir() {
        return Err(Error::msg(format!(
            "-haproxy-cfg-base-path {} is not a directory",
            base.display()
        )));
    }
    let label: String = crate::names::sanitize(proxy_id).chars().take(60).collect();
    for _ in 0..16 {
        let id = format!("{:08x}", crate::random::random_u32()?);
        let dir = base.join(format!("hcc-{id}"));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                for sub in ["certs", "dataplane-tx"] {
                    fs::DirBuilder::new()
                        .mode(0o700)
                        .create(dir.join(sub))
                        .with_context(|| format!("creating {}/{sub}", dir.display()))?;
                }
                let link = base.join(format!("hcc-{label}-{id}"));
                let workdir = Workdir {
                    dir: dir.clone(),
                    link: link.clone(),
                };
                write_atomic(&dir.join("proxy-id"), format!("{proxy_id}\n").as_bytes())?;
                std::os::unix::fs::symlink(format!("hcc-{id}"), &link)
                    .with_context(|| format!("linking {} to {}", link.display(), dir.display()))?;
                return Ok(workdir);
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
            Err(e) => {
                return Err(Error::with_source(
                    format!("creating the working directory {}", dir.display()),
                    e,
                ))
            }
        }
    }
    Err(Error::msg(format!(
        "could not create a fresh working directory under {}",
        base.display()
    )))
}

/// Socket paths must fit in `sun_path`; a deep base path is a configuration error.
pub fn check_socket_paths(paths: &[&Path]) -> Result<()> {
    for p in paths {
        let len = p.as_os_str().len();
        if len > MAX_SOCKET_PATH {
            return Err(Error::msg(format!(
                "socket path {} is {len} bytes, more than the {MAX_SOCKET_PATH} a unix socket allows; choose a shorter -haproxy-cfg-base-path",
                p.display()
            )));
        }
    }
    Ok(())
}

/// Writes `contents` to `path` so that readers see either the old file or the new one, never a
/// half: temp file (0600) → fsync → rename → fsync of the directory.
pub fn write_atomic(path: &Path, contents: &[u8]) -> Result<()> {
    let dir = path
        .parent()
        .ok_or_else(|| Error::msg(format!("{} has no parent directory", path.display())))?;
    let tmp = path.with_extension(format!("tmp{}", std::process::id()));
    let result = (|| -> std::io::Result<()> {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        // An existing temp file keeps its old mode through open(); make sure.
        f.set_permissions(fs::Permissions::from_mode(0o600))?;
        f.write_all(contents)?;
        f.sync_all()?;
        fs::rename(&tmp, path)?;
        fs::File::open(dir)?.sync_all()
    })();
    if result.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    result.with_context(|| format!("writing {}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn workdir_is_private_and_fresh_and_writes_are_0600() {
        let base = std::env::temp_dir();
        let a = create_workdir(&base, "web/1").unwrap();
        let b = create_workdir(&base, "web/1").unwrap();
        assert_ne!(a.dir, b.dir);
        assert_eq!(fs::metadata(&a.dir).unwrap().mode() & 0o777, 0o700);
        let f = a.dir.join("certs").join("leaf.pem");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "two");
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        let (dir, link) = (a.dir.clone(), a.link.clone());
        drop(a);
        assert!(!dir.exists() && fs::symlink_metadata(&link).is_err());
    }

    #[test]
    fn a_long_proxy_id_keeps_socket_paths_short() {
        // A 60-character base path and a scheduler-style 60-character ID.
        let base =
            std::env::temp_dir().join(format!("{:0<52}", format!("hcc-{}-", std::process::id())));
        fs::create_dir_all(&base).unwrap();
        let id = format!("{:x<60}", "checkout-7d9f8b6c5-x2x9q-sidecar-proxy-");
        let w = create_workdir(&base, &id).unwrap();
        let sock = w.dir.join("dataplane.sock");
        assert!(
            sock.as_os_str().len() <= MAX_SOCKET_PATH,
            "{} is {} bytes",
            sock.display(),
            sock.as_os_str().len()
        );
        check_socket_paths(&[&sock]).unwrap();
        assert_eq!(
            fs::read_to_string(w.link.join("proxy-id")).unwrap().trim(),
            id
        );
        assert!(w
            .link
            .file_name()
            .unwrap()
            .to_string_lossy()
            .contains("checkout-7d9f8b6c5"));
        drop(w);
        let _ = fs::remove_dir_all(&base);
    }

    #[test]
    fn bad_base_paths_are_named() {
        let err = create_workdir(Path::new("/nonexistent/base"), "x").unwrap_err();
        assert!(err.to_string().contains("/nonexistent/base"), "{err}");
        let long = PathBuf::from(format!("/{}", "d".repeat(120)));
        assert!(check_socket_paths(&[&long]).is_err());
        assert!(check_socket_paths(&[Path::new("/tmp/x.sock")]).is_ok());
    }
}
