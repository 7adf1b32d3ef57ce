//! Unit tests of `pki`, on the certificates in fixtures/spop/certs (the decisions built on
//! them are tested in `spoe::authz`).
use super::*;
use crate::clock::test_support::inside_validity;

const CA: &str = include_str!("../../fixtures/spop/certs/ca.crt");
const SERVER: &[u8] = include_bytes!("../../fixtures/spop/certs/server.der");

#[test]
fn signer_memory_is_bounded() {
    let m = ForgetfulMap::new(SIGNER_MEMORY);
    for i in 0..(SIGNER_MEMORY + 10) {
        m.insert(i.to_be_bytes().to_vec(), vec![0]);
    }
    assert!(m.len() <= SIGNER_MEMORY, "{}", m.len());
    assert_eq!(
        m.read(&(SIGNER_MEMORY + 9).to_be_bytes()[..], Vec::clone),
        Some(vec![0])
    );
}

#[test]
fn spiffe_parsing() {
    let ok = SpiffeId::parse("spiffe://td.consul/ns/default/dc/dc1/svc/web").unwrap();
    assert_eq!(
        ok,
        SpiffeId {
            trust_domain: "td.consul".into(),
            partition: None,
            namespace: "default".into(),
            datacenter: "dc1".into(),
            service: "web".into(),
        }
    );
    let ap = SpiffeId::parse("SPIFFE://td.consul/ap/p1/ns/n/dc/d/svc/my%2Dsvc").unwrap();
    assert_eq!(ap.partition.as_deref(), Some("p1"));
    assert_eq!(ap.service, "my-svc");
    for bad in [
        "",
        "spiffe:/",
        "https://td/ns/default/dc/dc1/svc/web",
        "spiffe:///ns/default/dc/dc1/svc/web",
        "spiffe://td",
        "spiffe://td/ns/default/dc/dc1/svc/",
        "spiffe://td/ns/default/dc/dc1/svc/web/extra",
        "spiffe://td/ns/default/dc/dc1/svc/web?x=1",
        "spiffe://td/agent/client/dc/dc1/id/node",
        "spiffe://td/ns/default/dc/dc1/svc/we%zzb",
        "spiffe://td/ns/default/dc/dc1/svc/we%",
        "spiffe://td/ns/default/dc/dc1/svc/%ff",
        "spiffe://td/ap//ns/default/dc/dc1/svc/web",
        "spiffé://td/ns/default/dc/dc1/svc/web",
    ] {
        assert!(SpiffeId::parse(bad).is_err(), "{bad:?} should be refused");
    }
}

#[test]
fn roots_are_validated() {
    assert_eq!(Roots::from_pem("").unwrap_err(), RootsError::NoRoots);
    let key = "-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n";
    assert!(matches!(
        Roots::from_pem(key),
        Err(RootsError::NotCertificate { .. })
    ));
    assert_eq!(Roots::none().ders().count(), 0);
}

#[test]
fn a_server_is_certified_by_current_roots_only() {
    let roots = Roots::from_pem(CA).unwrap();
    let (uri, id) = roots
        .certify_server(SERVER, &[], inside_validity(SERVER))
        .unwrap();
    assert!(uri.starts_with("spiffe://"), "{uri}");
    assert_eq!(id, SpiffeId::parse(&uri).unwrap());
    let (why, _) = Roots::none()
        .certify_server(SERVER, &[], inside_validity(SERVER))
        .unwrap_err();
    assert!(why.contains("not signed by a current CA root"), "{why}");
}
