use super::*;
use std::sync::mpsc;

fn fixture(name: &str) -> String {
    let path = format!("{}/fixtures/peering/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
}

const SNI: &str = "server.default.default.dc1.external.peer2.consul";
const ID: &str = "spiffe://peer2.consul/ns/default/dc/dc2/svc/server";

/// The shapes Consul 1.16.3 answers (trimmed to the fields read).
fn consul_answers(ca: &str, port: u16) -> (Peering, Vec<PeerInstance>) {
    let peering = serde_json::json!({"Name":"dc2","State":"ACTIVE","PeerCAPems":[ca],
        "PeerServerName":"server.dc2.peering.peer2.consul"});
    let instances = serde_json::json!([{"Node":{"Node":"gw"},"Service":{
        "Kind":"","Service":"server","Address":"127.0.0.1","Port":port,
        "Connect":{"PeerMeta":{"SNI":[SNI],"SpiffeID":[ID],"Protocol":"tcp"}}}}]);
    (
        serde_json::from_value(peering).unwrap(),
        serde_json::from_value(instances).unwrap(),
    )
}

#[test]
fn a_target_is_read_from_the_peering_and_the_peered_instances() {
    let (peering, instances) = consul_answers(&fixture("peer-ca.pem"), 8443);
    let mut w = vec![];
    let t = Target::from_consul("server", &peering, &instances, &mut w).unwrap();
    assert_eq!(t.sni, SNI);
    assert_eq!(t.identity_uri(), ID);
    assert_eq!(t.gateways.len(), 1);
    assert!(w.is_empty());
    // Another service's identity, no CA, an inactive peering, no instance: refused.
    assert!(Target::from_consul("web", &peering, &instances, &mut w)
        .unwrap_err()
        .to_string()
        .contains("SpiffeID of service \"web\""));
    let none = Peering::default();
    assert!(Target::from_consul("server", &none, &instances, &mut w).is_err());
    let (mut pending, _) = consul_answers(&fixture("peer-ca.pem"), 1);
    pending.state = Some("PENDING".into());
    assert!(Target::from_consul("server", &pending, &instances, &mut w)
        .unwrap_err()
        .to_string()
        .contains("PENDING"));
    assert!(Target::from_consul("server", &peering, &[], &mut w).is_err());
    // A hostile address drops its instance, named once; none left is a refusal.
    let (_, mut bad) = consul_answers(&fixture("peer-ca.pem"), 8443);
    bad[0].service.address = Some("1.2.3.4;#".into());
    assert!(Target::from_consul("server", &peering, &bad, &mut w).is_err());
    assert_eq!(w.len(), 1, "{w:?}");
}

/// A TLS server standing in for the peer's gateway and sidecar (the gateway never terminates
/// TLS, so to the dialer they are one end): presents `leaf`, requires a client certificate of
/// `client_ca`, offers `h2` and `http/1.1` in ALPN as a sidecar's http public listener does,
/// answers `sni=<sni>;alpn=<negotiated>;` and echoes what it read. Sends whether application data
/// ever arrived.
fn peer_server(leaf: &str, client_ca: &str) -> (u16, mpsc::Receiver<bool>) {
    use rustls::pki_types::{pem::PemObject, PrivateKeyDer};
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(leaf.as_bytes())
        .collect::<Result<_, _>>()
        .unwrap();
    let key = PrivateKeyDer::from_pem_slice(leaf.as_bytes()).unwrap();
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_slice_iter(client_ca.as_bytes()) {
        roots.add(c.unwrap()).unwrap();
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let verifier =
        rustls::server::WebPkiClientVerifier::builder_with_provider(roots.into(), provider.clone())
            .build()
            .unwrap();
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .unwrap();
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let Ok((sock, _)) = listener.accept() else {
            return;
        };
        let conn = rustls::ServerConnection::new(config).unwrap();
        let mut s = rustls::StreamOwned::new(conn, sock);
        let mut buf = [0u8; 64];
        let got = match s.read(&mut buf) {
            Ok(n) if n > 0 => {
                let sni = s.conn.server_name().unwrap_or("").to_string();
                let alpn = String::from_utf8_lossy(s.conn.alpn_protocol().unwrap_or_default())
                    .into_owned();
                let _ = s.write_all(format!("sni={sni};alpn={alpn};").as_bytes());
                let _ = s.write_all(&buf[..n]);
                let _ = s.flush();
                true
            }
            _ => false,
        };
        let _ = tx.send(got);
    });
    (port, rx)
}

fn forwarder_to(port: u16) -> Forwarder {
    forwarder_offering(port, Alpn::None)
}

fn forwarder_offering(port: u16, alpn: Alpn) -> Forwarder {
    let (peering, instances) = consul_answers(&fixture("peer-ca.pem"), port);
    let target = Target {
        alpn,
        ..Target::from_consul("server", &peering, &instances, &mut vec![]).unwrap()
    };
    let credentials = Credentials::from_pem(&fixture("client.bundle.pem")).unwrap();
    Forwarder::start(
        "127.0.0.1:0".parse().unwrap(),
        Some(Dial {
            target,
            credentials,
        }),
    )
    .unwrap()
}

/// What a plain TCP client of the forwarder (HAProxy's server) reads after sending `hello`.
fn through(f: &Forwarder) -> String {
    let mut c = TcpStream::connect(f.address()).unwrap();
    c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    c.write_all(b"hello").unwrap();
    c.shutdown(Shutdown::Write).unwrap();
    let mut out = String::new();
    let _ = c.read_to_string(&mut out);
    out
}

#[test]
fn bytes_reach_the_peer_with_its_sni_after_it_proved_the_exported_services_identity() {
    let (port, arrived) = peer_server(&fixture("server.bundle.pem"), &fixture("local-ca.pem"));
    let f = forwarder_to(port);
    assert_eq!(through(&f), format!("sni={SNI};alpn=;hello"));
    assert_eq!(arrived.recv_timeout(Duration::from_secs(10)), Ok(true));
}

/// An http2/grpc peered upstream's forwarder offers `h2`, so that the peer's public listener
/// speaks HTTP/2 to it (gRPC); an http one offers `http/1.1`.
#[test]
fn the_forwarder_offers_the_upstreams_application_protocol_in_alpn() {
    for (alpn, negotiated) in [(Alpn::H2, "h2"), (Alpn::Http1, "http/1.1")] {
        let (port, arrived) = peer_server(&fixture("server.bundle.pem"), &fixture("local-ca.pem"));
        let f = forwarder_offering(port, alpn);
        assert_eq!(through(&f), format!("sni={SNI};alpn={negotiated};hello"));
        assert_eq!(arrived.recv_timeout(Duration::from_secs(10)), Ok(true));
    }
}

#[test]
fn another_service_of_the_peer_or_another_ca_gets_no_byte_and_the_client_is_closed() {
    for leaf in ["rogue.bundle.pem", "client.bundle.pem"] {
        let (port, arrived) = peer_server(&fixture(leaf), &fixture("local-ca.pem"));
        let f = forwarder_to(port);
        assert_eq!(through(&f), "", "{leaf}");
        assert_eq!(
            arrived.recv_timeout(Duration::from_secs(10)),
            Ok(false),
            "{leaf}: application data reached a server that proved nothing"
        );
    }
}

/// Real Consul 1.16.3's answers and leaves (fixtures/peering/consul-1.16.3): the target dc1
/// reads for `server` of peer dc2, and dc2's own leaves judged against it.
#[test]
fn recorded_consul_answers_give_the_target_and_only_the_exported_services_leaf_passes() {
    let json = |name: &str| -> serde_json::Value {
        serde_json::from_str(&fixture(&format!("consul-1.16.3/{name}"))).unwrap()
    };
    let peering: Peering = serde_json::from_value(json("peering-dc2.json")).unwrap();
    let instances: Vec<PeerInstance> =
        serde_json::from_value(json("health-connect-server-peer-dc2.json")).unwrap();
    let mut w = vec![];
    let t = Target::from_consul("server", &peering, &instances, &mut w).unwrap();
    let td = "11111111-2222-3333-4444-666666666666.consul";
    assert_eq!(t.sni, format!("server.default.default.dc1.external.{td}"));
    assert_eq!(
        t.identity_uri(),
        format!("spiffe://{td}/ns/default/dc/dc2/svc/server")
    );
    // The gateway's WAN address (tagged `wan`), not its LAN one (`Service.Port`).
    assert_eq!(t.gateways.len(), 1);
    assert_eq!(t.gateways[0].1, 34191);
    assert!(w.is_empty(), "{w:?}");
    let verifier = PeerVerifier {
        roots: Roots::from_pem(&t.ca_pem).unwrap(),
        expected: t.identity.clone(),
        provider: Arc::new(rustls::crypto::ring::default_provider()),
    };
    let leaf = |svc: &str| {
        let pem = json(&format!("dc2-ca-leaf-{svc}.json"))["CertPEM"]
            .as_str()
            .unwrap()
            .to_string();
        x509_parser::pem::parse_x509_pem(pem.as_bytes())
            .unwrap()
            .1
            .contents
    };
    let (server, web) = (leaf("server"), leaf("web"));
    let at = crate::clock::test_support::inside_validity(&server);
    assert!(verifier.judge(&server, &[], at).is_ok());
    let refused = verifier.judge(&web, &[], at).unwrap_err().to_string();
    assert!(refused.ends_with("/svc/web"), "{refused}");
    // The same leaf under another trust domain's expectation is refused.
    let mut elsewhere = t.identity.clone();
    elsewhere.trust_domain = "other.consul".into();
    let strict = PeerVerifier {
        expected: elsewhere,
        ..verifier
    };
    assert!(strict.judge(&server, &[], at).is_err());
}

/// The supervisor's set: a forwarder with no target closes what it accepts (fail closed), the
/// same forwarder serves once its target comes (same address, so HAProxy's server stays), and
/// one no longer wanted stops listening.
#[test]
fn forwarders_follow_the_wanted_targets_and_close_without_one() {
    let (port, arrived) = peer_server(&fixture("server.bundle.pem"), &fixture("local-ca.pem"));
    let (peering, instances) = consul_answers(&fixture("peer-ca.pem"), port);
    let target = Target::from_consul("server", &peering, &instances, &mut vec![]).unwrap();
    let key = PeerKey {
        peer: "dc2".into(),
        service: "server".into(),
    };
    let leaf = fixture("client.bundle.pem");
    let mut set = Forwarders::default();
    let none = BTreeMap::from([(key.clone(), None)]);
    let at = set.sync(&none, &leaf)[&key];
    let read = |at: SocketAddr| {
        let mut c = TcpStream::connect(at).unwrap();
        c.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let _ = c.write_all(b"hello");
        let _ = c.shutdown(Shutdown::Write);
        let mut out = String::new();
        let _ = c.read_to_string(&mut out);
        out
    };
    assert_eq!(read(at), "", "no target: closed");
    let some = BTreeMap::from([(key.clone(), Some(target))]);
    assert_eq!(set.sync(&some, &leaf)[&key], at, "the same forwarder");
    assert_eq!(read(at), format!("sni={SNI};alpn=;hello"));
    assert_eq!(arrived.recv_timeout(Duration::from_secs(10)), Ok(true));
    assert!(set.sync(&BTreeMap::new(), &leaf).is_empty());
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        TcpStream::connect_timeout(&at, Duration::from_secs(1)).is_err(),
        "a forwarder no longer wanted stops listening"
    );
}

/// The peer's trust domain is its CA's (the side that accepted a peering has no
/// `PeerServerName`), and `PeerServerName`'s tail when no CA names one.
#[test]
fn the_peers_trust_domain_is_read_from_its_ca_or_its_server_name() {
    let recorded: Peering =
        serde_json::from_str(&fixture("consul-1.16.3/peering-dc2.json")).unwrap();
    let td = "11111111-2222-3333-4444-666666666666.consul";
    let accepted = Peering {
        peer_server_name: None,
        ..recorded.clone()
    };
    assert_eq!(accepted.trust_domain().as_deref(), Some(td));
    let named = Peering {
        peer_ca_pems: None,
        peer_server_name: Some("server.dc2.peering.other.consul".into()),
        ..recorded
    };
    assert_eq!(named.trust_domain().as_deref(), Some("other.consul"));
    assert_eq!(Peering::default().trust_domain(), None);
}
