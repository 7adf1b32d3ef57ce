//! Connection decisions: identities, roots, validity, intentions in order, peers.

use super::*;

#[test]
fn decision_table() {
    use Action::{Allow, Deny};
    // (intentions, default_allow, client allowed?, web allowed?, what it shows)
    let cases: Vec<(Vec<Intention>, bool, bool, bool, &str)> = vec![
        (
            vec![ixn("client", Allow, 9)],
            false,
            true,
            false,
            "exact allow, default deny",
        ),
        (
            vec![ixn("client", Deny, 9)],
            true,
            false,
            true,
            "exact deny, default allow",
        ),
        (vec![ixn("*", Deny, 8)], true, false, false, "wildcard deny"),
        (
            vec![ixn("*", Action::Allow, 8)],
            false,
            true,
            true,
            "wildcard allow",
        ),
        (
            vec![ixn("*", Deny, 8), ixn("client", Allow, 9)],
            true,
            true,
            false,
            "exact beats wildcard by precedence",
        ),
        (
            vec![ixn("*", Deny, 9), ixn("client", Allow, 9)],
            true,
            true,
            false,
            "exact beats wildcard at equal precedence",
        ),
        (
            vec![ixn("client", Allow, 9), ixn("client", Deny, 9)],
            true,
            false,
            true,
            "deny wins a tie",
        ),
        (
            vec![ixn("client", Deny, 9), ixn("client", Allow, 9)],
            true,
            false,
            true,
            "deny wins a tie whatever the input order",
        ),
        (
            vec![ixn("*", Allow, 9), ixn("*", Deny, 9)],
            true,
            false,
            false,
            "deny wins a wildcard tie",
        ),
        (
            vec![ixn("client", Deny, 3), ixn("*", Action::Allow, 8)],
            false,
            true,
            true,
            "higher precedence first, even a wildcard",
        ),
        (
            vec![ixn("CLIENT", Allow, 9)],
            false,
            false,
            false,
            "names match case-sensitively, as Consul 1.8.7 and 1.16.3 do",
        ),
        (
            vec![peer("client", "peer1", Allow), ixn("*", Deny, 8)],
            true,
            false,
            false,
            "a peer's client is not our client",
        ),
        (
            vec![peer("*", "peer1", Allow)],
            false,
            false,
            false,
            "a peer wildcard matches no local client",
        ),
        (
            vec![peer("client", "peer1", Deny)],
            true,
            true,
            true,
            "a peer's deny does not touch our client",
        ),
        (
            vec![in_ns("client", "team-a", "", Allow)],
            false,
            false,
            false,
            "another namespace's client is not ours",
        ),
        (
            vec![in_ns("client", "*", "", Allow)],
            false,
            true,
            false,
            "a wildcard namespace matches the default one",
        ),
        (
            vec![in_ns("client", "default", "default", Allow)],
            false,
            true,
            false,
            "default spelled out equals default left empty",
        ),
        (
            vec![in_ns("client", "", "part1", Allow)],
            false,
            false,
            false,
            "another partition's client is not ours",
        ),
        (
            vec![in_ns("client", "", "*", Allow)],
            false,
            true,
            false,
            "a wildcard partition matches the default one",
        ),
        (
            vec![ixn("client", Action::L7 { permissions: 2 }, 9)],
            true,
            false,
            true,
            "an L7 intention denies per connection, as Consul's authorize",
        ),
        (
            vec![
                ixn("client", Action::L7 { permissions: 1 }, 9),
                ixn("*", Allow, 8),
            ],
            true,
            false,
            true,
            "an L7 intention is a match: the wildcard below it does not apply",
        ),
        (
            vec![ixn("other", Deny, 9)],
            true,
            true,
            true,
            "no match: default allow",
        ),
        (
            vec![ixn("other", Allow, 9)],
            false,
            false,
            false,
            "no match: default deny",
        ),
        (vec![], true, true, true, "no intentions: default allow"),
        (vec![], false, false, false, "no intentions: default deny"),
    ];
    for (ixns, default_allow, client, web, what) in cases {
        let t = table(ixns, default_allow);
        assert_eq!(allowed(&t, CLIENT), client, "client: {what}");
        assert_eq!(allowed(&t, WEB), web, "web: {what}");
    }
}

#[test]
fn an_unknown_default_policy_denies_and_says_so() {
    let t = AuthzTable::new(
        TD,
        CA,
        vec![ixn("web", Action::Allow, 9)],
        DefaultPolicy::parse("extend-cache"),
    )
    .unwrap();
    let d = decide(&t, Some(CLIENT));
    assert!(!d.allow);
    assert_eq!(
        d.reason,
        "no intention matches client; default unknown (\"extend-cache\", so deny)"
    );
    assert!(allowed(&t, WEB), "explicit intentions still apply");
    assert_eq!(DefaultPolicy::parse(" Allow "), DefaultPolicy::Allow);
    assert_eq!(DefaultPolicy::parse("DENY"), DefaultPolicy::Deny);
    assert_eq!(
        DefaultPolicy::parse(""),
        DefaultPolicy::Unknown(String::new())
    );
}

#[test]
fn source_labels_name_peer_partition_and_namespace() {
    assert_eq!(ixn("web", Action::Allow, 9).source_label(), "web");
    assert_eq!(
        peer("web", "p1", Action::Allow).source_label(),
        "peer:p1/web"
    );
    assert_eq!(
        in_ns("*", "ns1", "ap1", Action::Deny).source_label(),
        "ap:ap1/ns1/*"
    );
    assert_eq!(
        in_ns("web", "default", "default", Action::Deny).source_label(),
        "web"
    );
}

#[test]
fn reasons_and_source_name_what_happened() {
    let t = table(vec![ixn("client", Action::Deny, 9)], true);
    let d = decide(&t, Some(CLIENT));
    assert!(!d.allow);
    assert_eq!(
        d.reason,
        "intention client => deny (precedence 9) for client"
    );
    assert_eq!(
        d.source.as_deref(),
        Some("spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client")
    );
    let d = decide(&t, Some(SERVER));
    assert!(d.allow);
    assert_eq!(d.reason, "no intention matches server; default allow");
}

#[test]
fn identity_checks_deny() {
    let t = table(vec![], true);
    let cases: Vec<(Option<&[u8]>, &str)> = vec![
        (None, "no client certificate"),
        (
            Some(OTHER_TD),
            "trust domain 99999999-8888-7777-6666-555555555555.consul is not ours",
        ),
        (Some(NO_URI), "no URI SAN"),
        (Some(NOT_SERVICE), "not a service identity"),
        (Some(PARTITION), "admin partition part1 is not ours"),
        (Some(CLIENT_CA2), "not signed by a current CA root"),
        (Some(CLIENT_ROGUE), "not signed by a current CA root"),
        (Some(EXPIRED), "expired at"),
        (Some(b""), "does not parse"),
        (Some(b"\x30\x03\x02\x01\x00"), "does not parse"),
        (Some(&[0xff; 64]), "does not parse"),
    ];
    for (cert, want) in cases {
        let d = decide(&t, cert);
        assert!(!d.allow, "{want}");
        assert!(
            d.reason.contains(want),
            "{:?} should contain {want:?}",
            d.reason
        );
    }
    // Trailing garbage after a good certificate is refused too.
    let mut padded = CLIENT.to_vec();
    padded.push(0);
    let d = decide(&t, Some(&padded));
    assert!(!d.allow && d.reason.contains("trailing"), "{}", d.reason);
}

#[test]
fn source_is_reported_when_identity_is_refused() {
    let d = decide(&table(vec![], true), Some(OTHER_TD));
    assert_eq!(
        d.source.as_deref(),
        Some("spiffe://99999999-8888-7777-6666-555555555555.consul/ns/default/dc/dc1/svc/client")
    );
    assert_eq!(decide(&table(vec![], true), Some(NO_URI)).source, None);
}

#[test]
fn trust_domain_is_case_insensitive() {
    let t = AuthzTable::new(TD.to_uppercase(), CA, vec![], DefaultPolicy::Allow).unwrap();
    assert!(allowed(&t, CLIENT));
}

#[test]
fn every_current_root_is_trusted() {
    let both = format!("{CA}\n{CA2}");
    let t = AuthzTable::new(TD, &both, vec![], DefaultPolicy::Allow).unwrap();
    assert!(allowed(&t, CLIENT));
    assert!(allowed(&t, CLIENT_CA2));
    assert!(!allowed(&t, CLIENT_ROGUE), "same issuer name, other key");
    // After rotation drops the first root, its leaves are refused.
    let t = AuthzTable::new(TD, CA2, vec![], DefaultPolicy::Allow).unwrap();
    assert!(!allowed(&t, CLIENT));
    assert!(allowed(&t, CLIENT_CA2));
}

#[test]
fn validity_is_checked_at_decision_time() {
    let t = table(vec![], true);
    let second = Duration::from_secs(1);
    // Times come from the certificate's own validity, never from the wall clock.
    let (not_before, not_after) = validity(CLIENT);
    assert!(t.decide_at(Some(CLIENT), not_before).allow);
    assert!(t.decide_at(Some(CLIENT), not_after).allow);
    let d = t.decide_at(Some(CLIENT), not_after + second);
    assert!(!d.allow && d.reason.contains("expired"), "{}", d.reason);
    let d = t.decide_at(Some(CLIENT), not_before - second);
    assert!(
        !d.allow && d.reason.contains("not valid before"),
        "{}",
        d.reason
    );
    // In 2000 expired.crt itself was valid, but the root that signed it did not exist yet.
    let (expired_from, _) = validity(EXPIRED);
    let d = t.decide_at(
        Some(EXPIRED),
        expired_from + Duration::from_secs(180 * 86_400),
    );
    assert!(
        !d.allow && d.reason.contains("CA root is not valid"),
        "{}",
        d.reason
    );
}

#[test]
fn remembered_signers_give_the_same_decisions() {
    let both = format!("{CA}\n{CA2}");
    let t = AuthzTable::new(TD, &both, vec![], DefaultPolicy::Allow).unwrap();
    for _ in 0..3 {
        assert!(allowed(&t, CLIENT));
        assert!(allowed(&t, CLIENT_CA2));
        assert!(!allowed(&t, CLIENT_ROGUE), "same issuer name, other key");
    }
    assert_eq!(
        t.roots.remembered(),
        3,
        "one entry per distinct certificate"
    );

    // The same to-be-signed part with another signature is another certificate: it must
    // be verified, not answered from what was remembered for the genuine one.
    let mut forged = CLIENT.to_vec();
    let last = forged.len() - 1;
    forged[last] ^= 0x01;
    let d = decide(&t, Some(&forged));
    assert!(
        !d.allow && d.reason.contains("not signed by a current CA root"),
        "{}",
        d.reason
    );
    assert!(allowed(&t, CLIENT));

    // Root validity is judged at each decision, also for a remembered certificate.
    let t = table(vec![], true);
    let when = validity(EXPIRED).0 + Duration::from_secs(180 * 86_400);
    for _ in 0..2 {
        let d = t.decide_at(Some(EXPIRED), when);
        assert!(d.reason.contains("CA root is not valid"), "{}", d.reason);
    }
    // A clone (a new table) starts with nothing remembered.
    assert_eq!(t.clone().roots.remembered(), 0);
}

#[test]
fn deny_all_denies_everything() {
    let t = AuthzTable::deny_all("waiting for Consul");
    let d = decide(&t, Some(CLIENT));
    assert!(!d.allow);
    assert_eq!(d.reason, "no authorization data: waiting for Consul");
    assert!(!decide(&t, None).allow);
}

#[test]
fn constructors_validate_roots() {
    assert_eq!(
        AuthzTable::new(TD, "", vec![], DefaultPolicy::Allow).unwrap_err(),
        AuthzError::NoRoots
    );
    let key = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
    assert!(matches!(
        AuthzTable::new(TD, key, vec![], DefaultPolicy::Allow),
        Err(AuthzError::NotCertificate { .. })
    ));
    let bad = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
    assert!(matches!(
        AuthzTable::new(TD, bad, vec![], DefaultPolicy::Allow),
        Err(AuthzError::BadRoot { index: 0, .. })
    ));
    let t =
        AuthzTable::from_der_roots(TD, vec![CA_DER.to_vec()], vec![], DefaultPolicy::Deny).unwrap();
    assert_eq!(t.roots().collect::<Vec<_>>(), vec![CA_DER]);
    assert_eq!(t.trust_domain(), TD);
    assert_eq!(t.default_policy(), &DefaultPolicy::Deny);
}

#[test]
fn intentions_are_kept_in_evaluation_order() {
    let t = table(
        vec![
            ixn("*", Action::Allow, 8),
            ixn("a", Action::Allow, 9),
            ixn("*", Action::Deny, 8),
            ixn("b", Action::Deny, 9),
            ixn("x", Action::Deny, 1),
        ],
        true,
    );
    let order: Vec<(&str, Action)> = t
        .intentions()
        .iter()
        .map(|i| (i.source.as_str(), i.action))
        .collect();
    assert_eq!(
        order,
        vec![
            ("b", Action::Deny),
            ("a", Action::Allow),
            ("*", Action::Deny),
            ("*", Action::Allow),
            ("x", Action::Deny),
        ]
    );
}

/// A client of a cluster peer (issue 33): certified only by that peer's own roots in that
/// peer's trust domain (fixtures/peering), and then only intentions naming that peer decide.
#[test]
fn a_peers_client_is_that_peers_identity_and_nothing_else() {
    let read = |name: &str| {
        let path = format!("{}/fixtures/peering/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
    };
    let der = |name: &str| {
        x509_parser::pem::parse_x509_pem(read(name).as_bytes())
            .unwrap()
            .1
            .contents
    };
    // `server` of peer dc2 (spiffe://peer2.consul/...) and our own `client` (local1.consul).
    let (theirs, ours) = (der("server.bundle.pem"), der("client.bundle.pem"));
    let at = inside_validity(&theirs);
    let peer_roots = |td: &str| AuthzTable::new(td, &read("peer-ca.pem"), vec![], policy(false));
    let with = |ixns: Vec<Intention>, peers: Vec<(String, AuthzTable)>| {
        AuthzTable::new("local1.consul", &read("local-ca.pem"), ixns, policy(false))
            .unwrap()
            .with_peers(peers)
    };
    let dc2 = || vec![("dc2".to_string(), peer_roots("peer2.consul").unwrap())];
    let allow = |t: &AuthzTable, cert: &[u8]| t.decide_at(Some(cert), at).allow;
    assert!(allow(
        &with(vec![peer("server", "dc2", Action::Allow)], dc2()),
        &theirs
    ));
    assert!(allow(
        &with(vec![peer("*", "dc2", Action::Allow)], dc2()),
        &theirs
    ));
    // A local intention of the same name, or one naming another peer, does not admit it.
    assert!(!allow(
        &with(vec![ixn("server", Action::Allow, 9)], dc2()),
        &theirs
    ));
    assert!(!allow(
        &with(vec![ixn("*", Action::Allow, 9)], dc2()),
        &theirs
    ));
    assert!(!allow(
        &with(vec![peer("server", "dc3", Action::Allow)], dc2()),
        &theirs
    ));
    // Not a peer of this table (its service is not exported there): refused, as before.
    assert!(!allow(
        &with(vec![peer("server", "dc2", Action::Allow)], vec![]),
        &theirs
    ));
    // A peer's CA vouches for its own trust domain only.
    let confused = vec![("dc2".to_string(), peer_roots("local1.consul").unwrap())];
    assert!(!allow(
        &with(vec![peer("server", "dc2", Action::Allow)], confused),
        &theirs
    ));
    // Our own client never matches an intention naming a peer, and still matches its own.
    let ours_at = |t: &AuthzTable| t.decide_at(Some(&ours), inside_validity(&ours)).allow;
    assert!(!ours_at(&with(
        vec![peer("client", "dc2", Action::Allow)],
        dc2()
    )));
    assert!(ours_at(&with(vec![ixn("client", Action::Allow, 9)], dc2())));
    // The peers are part of what a verdict was made under.
    assert_ne!(
        with(vec![], dc2()).generation(),
        with(vec![], vec![]).generation()
    );
}
