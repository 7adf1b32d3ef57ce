//! Any bytes as a client certificate: the decision must return, never panic, and only a
//! certificate really signed by the table's root for the one allowed identity may pass.
#![no_main]

use std::sync::OnceLock;

use haproxy_consul_connect::spoe::authz::{Action, AuthzTable, Intention};
use libfuzzer_sys::fuzz_target;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";
const CA: &str = include_str!("../../fixtures/spop/certs/ca.crt");
const CLIENT: &str =
    "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client";

fn table() -> &'static AuthzTable {
    static T: OnceLock<AuthzTable> = OnceLock::new();
    T.get_or_init(|| {
        let ixns = vec![
            Intention {
                source: "client".into(),
                action: Action::Allow,
                precedence: 9,
            },
            Intention {
                source: "*".into(),
                action: Action::Deny,
                precedence: 8,
            },
        ];
        AuthzTable::new(TD, CA, ixns, false).expect("fixture CA parses")
    })
}

fuzz_target!(|data: &[u8]| {
    let d = table().decide(Some(data));
    assert!(!d.reason.is_empty());
    if d.allow {
        assert_eq!(d.source.as_deref(), Some(CLIENT), "{}", d.reason);
    }
});
