//! The invariants the fuzz targets check, in the library so that `fuzz/` (libFuzzer, nightly)
//! and `tests/fuzz_corpus.rs` (a normal test on stable, replaying the committed corpus) run
//! the same code: a crash the fuzzer found and minimised stays a failing test once its input
//! is added to the corpus. Each function panics when an invariant does not hold.
//!
//! Not part of the sidecar's API.

use std::sync::OnceLock;
use std::time::{Duration, SystemTime};

use x509_parser::prelude::FromDer;

use super::authz::{l7, Action, AuthzTable, Decision, DefaultPolicy, Intention};
use super::frame::{
    self, AgentHello, Disconnect, Frame, FrameError, HaproxyHello, Notify, TypedData,
    AGENT_MAX_FRAME_SIZE,
};

/// How far one input got, so a replay can tell its inputs reach the code the invariants are
/// about rather than returning early.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Reached {
    /// Frames the read loop decoded.
    pub frames: usize,
    /// Per-request NOTIFYs that reached `decide_request` and were allowed.
    pub l7_allowed: usize,
    /// Per-request NOTIFYs that reached `decide_request` and were denied.
    pub l7_denied: usize,
}

impl std::ops::AddAssign for Reached {
    fn add_assign(&mut self, o: Reached) {
        self.frames += o.frames;
        self.l7_allowed += o.l7_allowed;
        self.l7_denied += o.l7_denied;
    }
}

/// Any bytes from the SPOE socket: the decoder must return, never panic, and whatever it
/// accepts must survive an encode/decode round trip unchanged. Returns how far it got.
pub fn spop_frame(data: &[u8]) -> Reached {
    let mut reached = Reached::default();
    // As the agent's read loop does: frame after frame until more bytes are needed or an
    // error ends the connection.
    let mut buf = data;
    loop {
        match frame::decode(buf, AGENT_MAX_FRAME_SIZE as usize) {
            Ok(Some((f, used))) => {
                reached.frames += 1;
                assert!(used >= frame::LENGTH_PREFIX && used <= buf.len());
                match &f {
                    Frame::HaproxyHello(kv) => {
                        if let Ok(h) = HaproxyHello::from_kv(kv) {
                            let size = h.negotiate_frame_size(AGENT_MAX_FRAME_SIZE);
                            assert!((frame::MIN_FRAME_SIZE..=AGENT_MAX_FRAME_SIZE).contains(&size));
                        }
                    }
                    Frame::AgentHello(kv) => {
                        let _ = AgentHello::from_kv(kv);
                    }
                    Frame::HaproxyDisconnect(kv) | Frame::AgentDisconnect(kv) => {
                        let _ = Disconnect::from_kv(kv);
                    }
                    Frame::Notify(n) => {
                        let _ = n.find_arg(Some("check-client"), "cert");
                        match l7_request(n) {
                            Some(true) => reached.l7_allowed += 1,
                            Some(false) => reached.l7_denied += 1,
                            None => {}
                        }
                    }
                    Frame::Ack(_) => {}
                }
                let mut out = Vec::new();
                match f.encode(usize::MAX, &mut out) {
                    Ok(()) => {
                        let (again, n) = frame::decode(&out, usize::MAX)
                            .expect("re-encoded frame decodes")
                            .expect("re-encoded frame is complete");
                        assert_eq!(n, out.len());
                        assert_eq!(again, f);
                    }
                    // The only frames we refuse to write: an ACK with no action.
                    Err(e) => assert_eq!(e, FrameError::EmptyAck),
                }
                buf = &buf[used..];
            }
            Ok(None) => break,
            Err(e) => {
                let _ = e.status_code().code();
                let _ = e.to_string();
                break;
            }
        }
    }

    // The varint encoding is a bijection: whatever decodes re-encodes to the same bytes.
    if let Ok((v, n)) = frame::decode_varint(data, "fuzz") {
        let mut out = Vec::new();
        frame::encode_varint(v, &mut out);
        assert_eq!(&out[..], &data[..n]);
    }
    reached
}

/// A per-request NOTIFY (`check-request`, as HAProxy sends it for an L7 connection): its
/// `req.hdrs_bin` must decode or fail cleanly, and the decision from the fuzzing L7 table
/// (client: deny `/api/admin…`, allow GET on `/api`, default deny) must return, give a reason,
/// and only ever allow what those permissions allow, checked here without the matcher.
/// `Some(allowed)` when the request reached the decision, `None` when an argument was missing
/// or unreadable (the replay counts both, so a corpus that never gets that far fails).
fn l7_request(n: &Notify) -> Option<bool> {
    let arg = |k: &str| n.find_arg(Some("check-request"), k);
    let text = |k: &str| match arg(k) {
        Some(TypedData::String(b)) => std::str::from_utf8(b).ok(),
        _ => None,
    };
    let Some(TypedData::Binary(h)) = arg("headers") else {
        return None;
    };
    let fields = frame::decode_hdrs_bin(h).ok()?;
    let (src, method, path) = (text("src")?, text("method")?, text("path")?);
    let req = l7::SimpleRequest {
        method: method.into(),
        path: l7::url_path(path).into(),
        headers: fields
            .iter()
            .map(|(k, v)| {
                (
                    String::from_utf8_lossy(k).into_owned(),
                    String::from_utf8_lossy(v).into_owned(),
                )
            })
            .collect(),
        query: text("query").map(str::to_string),
    };
    let d = l7_fixture().decide_request(src, &req);
    assert!(!d.reason.is_empty());
    if d.allow {
        // Intentions match a source by trust domain, partition, namespace and service, as
        // Consul's authorize does (a name's case aside): its datacenter is not part of it.
        let who = |uri: &str| {
            crate::pki::SpiffeId::parse(uri).map(|id| {
                let lower = |s: String| s.to_ascii_lowercase();
                (
                    lower(id.trust_domain),
                    id.partition.map(lower),
                    lower(id.namespace),
                    lower(id.service),
                )
            })
        };
        assert_eq!(who(src), who(ALLOWED), "{src}: {}", d.reason);
        assert!(
            method == "GET" && req.path.starts_with("/api") && !req.path.starts_with("/api/admin"),
            "{method} {}: {}",
            req.path,
            d.reason
        );
    }
    Some(d.allow)
}

fn l7_fixture() -> &'static AuthzTable {
    static T: OnceLock<AuthzTable> = OnceLock::new();
    T.get_or_init(|| {
        let permissions = serde_json::json!([
            {"Action": "deny", "HTTP": {"PathRegex": "/api/admin.*"}},
            {"Action": "allow", "HTTP": {"PathPrefix": "/api", "Methods": ["GET"]}}
        ]);
        let client = Intention {
            permissions: l7::parse_all(permissions.as_array().expect("a list")),
            ..Intention::new("client", Action::L7 { permissions: 2 }, 9)
        };
        AuthzTable::new(TD, CA_PEM, vec![client], DefaultPolicy::Deny)
            .expect("fixture CA parses")
            .for_http_listener(true)
    })
}

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";
const CA_PEM: &str = include_str!("../../fixtures/spop/certs/ca.crt");
const CA_DER: &[u8] = include_bytes!("../../fixtures/spop/certs/ca.der");
/// The one identity the fuzzing table allows.
pub const ALLOWED: &str =
    "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client";

struct Fixture {
    table: AuthzTable,
    /// When every decision is judged: a day after the fixture CA's notBefore (the leaves were
    /// issued a second after it), so a verdict depends on the input only, never on the date the
    /// fuzzer or the test runs.
    at: SystemTime,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let ixns = vec![
            Intention::new("client", Action::Allow, 9),
            Intention::new("*", Action::Deny, 8),
        ];
        let table =
            AuthzTable::new(TD, CA_PEM, ixns, DefaultPolicy::Deny).expect("fixture CA parses");
        let (_, ca) = x509_parser::parse_x509_certificate(CA_DER).expect("fixture CA parses");
        let secs = u64::try_from(ca.validity().not_before.timestamp() + 86_400)
            .expect("fixture CA starts after 1970");
        Fixture {
            table,
            at: SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        }
    })
}

/// Any bytes as a client certificate: the decision must return, never panic, give a reason,
/// and agree with itself when asked again (the second answer comes from the table's memory of
/// signers, which must never change a verdict). Anything allowed must be the one allowed
/// SPIFFE identity, a whole certificate valid at that moment and really signed by the fixture
/// CA, checked here without the table's code. Returns the decision.
pub fn authz_decide(data: &[u8]) -> Decision {
    let f = fixture();
    let d = f.table.decide_at(Some(data), f.at);
    assert!(!d.reason.is_empty());
    assert_eq!(
        f.table.decide_at(Some(data), f.at),
        d,
        "a remembered signer changed the verdict"
    );
    if d.allow {
        assert_eq!(d.source.as_deref(), Some(ALLOWED), "{}", d.reason);
        let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(data)
            .expect("an allowed certificate parses");
        assert!(
            rest.is_empty(),
            "an allowed certificate has no trailing bytes"
        );
        let (_, ca) = x509_parser::parse_x509_certificate(CA_DER).expect("fixture CA parses");
        cert.verify_signature(Some(ca.public_key()))
            .expect("an allowed certificate is signed by the fixture CA");
        let at = x509_parser::time::ASN1Time::from_timestamp(
            f.at.duration_since(SystemTime::UNIX_EPOCH)
                .expect("after 1970")
                .as_secs() as i64,
        )
        .expect("a representable time");
        assert!(
            cert.validity().is_valid_at(at),
            "an allowed certificate is valid"
        );
    }
    d
}

/// How far one input of the `jwt` target got.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct JwtReached {
    /// A jwt-provider entry (the input was JSON) that parsed into a provider.
    pub providers: usize,
    /// A token that split and decoded (header, payload, signature).
    pub tokens: usize,
}

/// Any bytes as a `jwt-provider` entry (input starting with `{`) or as a bearer token: the
/// parsers return, never panic; a token is never longer than `jwt::MAX_TOKEN` once parsed,
/// and never accepted by a provider whose key was made for this run (nobody else holds it).
pub fn jwt(data: &[u8]) -> JwtReached {
    use super::authz::jwt;
    let mut reached = JwtReached::default();
    if data.first() == Some(&b'{') {
        if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
            let p = jwt::Provider::from_consul(&v, &|f: &str| Ok(f.to_string()));
            reached.providers += usize::from(p.is_ok());
        }
        return reached;
    }
    let token = String::from_utf8_lossy(data);
    if jwt::parse(&token).is_ok() {
        assert!(token.len() <= jwt::MAX_TOKEN);
        reached.tokens += 1;
    }
    let (providers, needed) = jwt_fixture();
    let req = l7::SimpleRequest {
        method: "GET".into(),
        path: "/".into(),
        headers: vec![("authorization".into(), format!("Bearer {token}"))],
        query: Some(format!("access_token={token}")),
    };
    assert!(needed.check(providers, &req, 1_700_000_000).is_err());
    reached
}

fn jwt_fixture() -> &'static (super::authz::jwt::Providers, super::authz::jwt::Requirement) {
    use super::authz::jwt;
    use base64::Engine;
    use ring::signature::KeyPair;
    static F: OnceLock<(jwt::Providers, jwt::Requirement)> = OnceLock::new();
    F.get_or_init(|| {
        let alg = &ring::signature::ECDSA_P256_SHA256_FIXED_SIGNING;
        let rng = ring::rand::SystemRandom::new();
        let pk8 = ring::signature::EcdsaKeyPair::generate_pkcs8(alg, &rng).expect("a key");
        let pair =
            ring::signature::EcdsaKeyPair::from_pkcs8(alg, pk8.as_ref(), &rng).expect("a key");
        let p = pair.public_key().as_ref();
        let b64 = |b: &[u8]| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b);
        let jwks = serde_json::json!({"keys": [
            {"kty": "EC", "crv": "P-256", "x": b64(&p[1..33]), "y": b64(&p[33..])}]});
        let entry = serde_json::json!({"Name": "fuzz", "Issuer": "fuzz",
            "JSONWebKeySet": {"Local": {"JWKS":
                base64::engine::general_purpose::STANDARD.encode(jwks.to_string())}}});
        let provider = jwt::Provider::from_consul(&entry, &|_| Err("no files".into()))
            .expect("the fixture provider parses");
        let needed =
            jwt::Requirement::from_consul(&serde_json::json!({"Providers": [{"Name": "fuzz"}]}))
                .expect("the fixture requirement parses")
                .expect("it names a provider");
        (jwt::Providers::known([provider]), needed)
    })
}
