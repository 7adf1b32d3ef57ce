//! Unit tests of `spoe::authz`, on the certificates in fixtures/spop/certs.
use super::*;
use crate::clock::test_support::{inside_validity, validity};
use std::time::Duration;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";
const CA: &str = include_str!("../../../../fixtures/spop/certs/ca.crt");
const CA2: &str = include_str!("../../../../fixtures/spop/certs/ca2.crt");
const CLIENT: &[u8] = include_bytes!("../../../../fixtures/spop/certs/client.der");
const WEB: &[u8] = include_bytes!("../../../../fixtures/spop/certs/web.der");
const SERVER: &[u8] = include_bytes!("../../../../fixtures/spop/certs/server.der");
const PARTITION: &[u8] = include_bytes!("../../../../fixtures/spop/certs/partition.der");
const OTHER_TD: &[u8] = include_bytes!("../../../../fixtures/spop/certs/other-td.der");
const NO_URI: &[u8] = include_bytes!("../../../../fixtures/spop/certs/no-uri.der");
const NOT_SERVICE: &[u8] = include_bytes!("../../../../fixtures/spop/certs/not-service.der");
const CLIENT_CA2: &[u8] = include_bytes!("../../../../fixtures/spop/certs/client-ca2.der");
const CLIENT_ROGUE: &[u8] = include_bytes!("../../../../fixtures/spop/certs/client-rogue.der");
const EXPIRED: &[u8] = include_bytes!("../../../../fixtures/spop/certs/expired.der");
const CA_DER: &[u8] = include_bytes!("../../../../fixtures/spop/certs/ca.der");

fn ixn(source: &str, action: Action, precedence: i64) -> Intention {
    Intention::new(source, action, precedence)
}

fn policy(allow: bool) -> DefaultPolicy {
    if allow {
        DefaultPolicy::Allow
    } else {
        DefaultPolicy::Deny
    }
}

fn table(intentions: Vec<Intention>, default_allow: bool) -> AuthzTable {
    AuthzTable::new(TD, CA, intentions, policy(default_allow)).unwrap()
}

fn peer(source: &str, peer: &str, action: Action) -> Intention {
    Intention {
        source_peer: peer.into(),
        ..ixn(source, action, 9)
    }
}

fn in_ns(source: &str, ns: &str, partition: &str, action: Action) -> Intention {
    Intention {
        source_ns: ns.into(),
        source_partition: partition.into(),
        ..ixn(source, action, 9)
    }
}

/// Decides an hour after the fixture CA and its leaves were made (they were made together),
/// never at today's date: `expired.crt` has expired then, every other leaf is valid.
fn decide(t: &AuthzTable, cert: Option<&[u8]>) -> Decision {
    t.decide_at(cert, inside_validity(CLIENT))
}

fn allowed(t: &AuthzTable, cert: &[u8]) -> bool {
    let d = decide(t, Some(cert));
    assert!(!d.reason.is_empty());
    d.allow
}

mod connections;
mod requests;
