//! The end-to-end tests: real Consul, HAProxy, Dataplane API and sidecar processes on loopback
//! (and, for a few, in network namespaces), one module per area. They are one test binary so the
//! harness (`support`) is compiled once, and dead harness code is a warning like anywhere else.
//!
//! A test is named `<module>::<test>`: `cargo test --test e2e mesh_basic::` runs one area,
//! `cargo test --test e2e -- --exact intentions::a_stalled_agent_fails_closed` one test.
//! Tests run on the default test threads; every test starts its own processes on ports from
//! `support::free_port`, which remembers what it handed out across the whole binary.

mod support;

mod agentless;
mod convergence;
mod current_consul;
mod discovery_chain;
mod expose;
mod grpc;
mod harness_selftest;
mod hostile_input;
mod intentions;
mod intentions_vs_consul;
mod jwt;
mod l7_intentions;
mod mesh_basic;
mod mesh_deltas;
mod mesh_gateway;
mod metrics;
mod multi_host;
mod operator;
mod proxy_settings;
mod spoe_haproxy;
mod supervision;
mod transparent_proxy;
mod upstream_identity;
