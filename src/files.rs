//! The sidecar's own directory and atomic, private file writes.

use std::fs::{self, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use crate::error::{Context, Error, Result};

use crate::model::MAX_SOCKET_PATH;

/// Creates `<base>/hcc-<label>-<random>` with mode 0700, so two sidecars on one host never share
/// a file or socket. The name is short because socket paths inside it are limited.
pub fn create_workdir(base: &Path, label: &str) -> Result<PathBuf> {
    let meta = fs::metadata(base)
        .with_context(|| format!("-haproxy-cfg-base-path {} is not usable", base.display()))?;
    if !meta.is_dir() {
        return Err(Error::msg(format!(
            "-haproxy-cfg-base-path {} is not a directory",
            base.display()
        )));
    }
    let label: String = crate::names::sanitize(label).chars().take(40).collect();
    for _ in 0..16 {
        let dir = base.join(format!("hcc-{label}-{:08x}", crate::random::random_u32()?));
        match fs::DirBuilder::new().mode(0o700).create(&dir) {
            Ok(()) => {
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dir.join("certs"))
                    .with_context(|| format!("creating {}/certs", dir.display()))?;
                fs::DirBuilder::new()
                    .mode(0o700)
                    .create(dir.join("dataplane-tx"))
                    .with_context(|| format!("creating {}/dataplane-tx", dir.display()))?;
                return Ok(dir);
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
        assert_ne!(a, b);
        assert_eq!(fs::metadata(&a).unwrap().mode() & 0o777, 0o700);
        let f = a.join("certs").join("leaf.pem");
        write_atomic(&f, b"one").unwrap();
        write_atomic(&f, b"two").unwrap();
        assert_eq!(fs::read_to_string(&f).unwrap(), "two");
        assert_eq!(fs::metadata(&f).unwrap().mode() & 0o777, 0o600);
        fs::remove_dir_all(&a).unwrap();
        fs::remove_dir_all(&b).unwrap();
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
