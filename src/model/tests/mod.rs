//! The model built from responses recorded from real Consul agents (fixtures/consul/<version>),
//! each test on every supported version.

use super::fixtures::{first_upstream as up, settings, snapshot, with_chain, ANY, CONSUL_VERSIONS};
use super::*;

mod admission;
mod build;
mod config_keys;
mod peered;
