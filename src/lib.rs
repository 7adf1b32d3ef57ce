//! haproxy-consul-connect: a Consul Connect sidecar that runs HAProxy as its data plane.
//! See ARCHITECTURE.md for the map.

pub mod apply;
pub mod cli;
pub mod clock;
pub mod consul;
pub mod error;
pub mod files;
pub mod haproxy;
pub mod http;
pub mod model;
pub mod render;
pub mod snapshot;
pub mod spoe;
pub mod supervisor;

/// The hidden subcommand the Dataplane API runs to reload HAProxy and learn the verdict.
pub const RELOAD_SUBCOMMAND: &str = "internal-reload-haproxy";
pub mod intentions;
pub mod metrics;
pub mod stats;
