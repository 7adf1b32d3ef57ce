//! haproxy-consul-connect: a Consul Connect sidecar that runs HAProxy as its data plane.
//! See ARCHITECTURE.md for the map.
//!
//! The binary (`src/main.rs`) uses `cli`, `supervisor`, `dry_run` and `reload_haproxy`; fuzz
//! targets and tests use `spoe`. Everything else is internal to the crate.

pub mod cli;
pub mod dry_run;
pub mod error;
pub mod pki;
pub mod spoe;
pub mod supervisor;
pub mod value;

pub(crate) mod admission;
pub(crate) mod apply;
pub(crate) mod backoff;
pub(crate) mod clock;
pub(crate) mod config;
pub(crate) mod consul;
pub(crate) mod files;
pub(crate) mod haproxy;
pub(crate) mod haproxy_version;
pub(crate) mod http;
pub(crate) mod intentions;
pub(crate) mod metrics;
pub(crate) mod model;
pub(crate) mod names;
pub(crate) mod objects;
pub(crate) mod peering;
pub(crate) mod phase;
pub(crate) mod random;
pub(crate) mod render;
pub(crate) mod snapshot;
pub(crate) mod stats;

/// The hidden subcommand the Dataplane API runs to reload HAProxy and learn the verdict.
pub const RELOAD_SUBCOMMAND: &str = "internal-reload-haproxy";

/// The reload subcommand: reloads the HAProxy behind `master_socket` and waits for the verdict;
/// the number of the new worker's reload.
pub fn reload_haproxy(
    master_socket: &std::path::Path,
    timeout: std::time::Duration,
) -> error::Result<u32> {
    haproxy::runtime::reload(master_socket, timeout)
}
