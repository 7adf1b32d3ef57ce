use super::*;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, Ed25519KeyPair, KeyPair, RsaKeyPair};
use serde_json::json;

const NOW: u64 = 1_700_000_000;

/// A key the test signs with, and its public JWK.
enum Signer {
    Ec(EcdsaKeyPair, &'static str),
    Ed(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

fn b64(b: &[u8]) -> String {
    base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(b)
}

fn ec(alg: &'static str) -> Signer {
    let rng = SystemRandom::new();
    let a = if alg == "ES256" {
        &signature::ECDSA_P256_SHA256_FIXED_SIGNING
    } else {
        &signature::ECDSA_P384_SHA384_FIXED_SIGNING
    };
    let pk8 = EcdsaKeyPair::generate_pkcs8(a, &rng).unwrap();
    Signer::Ec(
        EcdsaKeyPair::from_pkcs8(a, pk8.as_ref(), &rng).unwrap(),
        alg,
    )
}

fn ed() -> Signer {
    let pk8 = Ed25519KeyPair::generate_pkcs8(&SystemRandom::new()).unwrap();
    Signer::Ed(Ed25519KeyPair::from_pkcs8(pk8.as_ref()).unwrap())
}

/// The RSA keys `fixtures/jwt/make` made (ring cannot generate RSA keys).
fn rsa(other: bool) -> Signer {
    let name = if other { "rsa2048-other" } else { "rsa2048" };
    let path = format!("{}/fixtures/jwt/{name}.der", env!("CARGO_MANIFEST_DIR"));
    Signer::Rsa(RsaKeyPair::from_der(&std::fs::read(path).unwrap()).unwrap())
}

impl Signer {
    fn jwk(&self, kid: &str) -> Value {
        match self {
            Signer::Ec(k, alg) => {
                let p = k.public_key().as_ref();
                let n = (p.len() - 1) / 2;
                let crv = if *alg == "ES256" { "P-256" } else { "P-384" };
                json!({"kty": "EC", "crv": crv, "kid": kid, "x": b64(&p[1..1 + n]), "y": b64(&p[1 + n..])})
            }
            Signer::Ed(k) => {
                json!({"kty": "OKP", "crv": "Ed25519", "kid": kid, "x": b64(k.public_key().as_ref())})
            }
            Signer::Rsa(k) => {
                let c: RsaPublicKeyComponents<Vec<u8>> = k.public().into();
                json!({"kty": "RSA", "kid": kid, "n": b64(&c.n), "e": b64(&c.e)})
            }
        }
    }

    fn sign(&self, alg: &str, kid: &str, payload: &Value) -> String {
        let header = json!({"alg": alg, "typ": "JWT", "kid": kid});
        let input = format!(
            "{}.{}",
            b64(header.to_string().as_bytes()),
            b64(payload.to_string().as_bytes())
        );
        let rng = SystemRandom::new();
        let sig = match self {
            Signer::Ec(k, _) => k.sign(&rng, input.as_bytes()).unwrap().as_ref().to_vec(),
            Signer::Ed(k) => k.sign(input.as_bytes()).as_ref().to_vec(),
            Signer::Rsa(k) => {
                let pad: &dyn signature::RsaEncoding = match alg {
                    "RS256" => &signature::RSA_PKCS1_SHA256,
                    "RS384" => &signature::RSA_PKCS1_SHA384,
                    "RS512" => &signature::RSA_PKCS1_SHA512,
                    "PS256" => &signature::RSA_PSS_SHA256,
                    "PS384" => &signature::RSA_PSS_SHA384,
                    _ => &signature::RSA_PSS_SHA512,
                };
                let mut sig = vec![0; k.public().modulus_len()];
                k.sign(pad, &rng, input.as_bytes(), &mut sig).unwrap();
                sig
            }
        };
        format!("{input}.{}", b64(&sig))
    }
}

fn no_files(_: &str) -> Result<String, String> {
    Err("no files in this test".into())
}

/// A provider entry as `/v1/config/jwt-provider` lists it, with `keys` inline.
fn entry(keys: &[Value], extra: Value) -> Value {
    let jwks = json!({"keys": keys}).to_string();
    let mut e = json!({
        "Kind": "jwt-provider", "Name": "okta", "Issuer": "test-issuer",
        "JSONWebKeySet": {"Local": {"JWKS": STANDARD.encode(jwks)}},
    });
    for (k, v) in extra.as_object().unwrap() {
        e[k] = v.clone();
    }
    e
}

fn providers(e: Value) -> Providers {
    Providers::known([Provider::from_consul(&e, &no_files).unwrap()])
}

fn requirement(v: Value) -> Requirement {
    Requirement::from_consul(&v).unwrap().unwrap()
}

fn okta() -> Requirement {
    requirement(json!({"Providers": [{"Name": "okta"}]}))
}

fn header(name: &str, token: &str) -> l7::SimpleRequest {
    l7::SimpleRequest {
        method: "GET".into(),
        path: "/".into(),
        headers: vec![(name.into(), token.into())],
        query: None,
    }
}

fn bearer(token: &str) -> l7::SimpleRequest {
    l7::SimpleRequest {
        method: "GET".into(),
        path: "/".into(),
        headers: vec![("Authorization".into(), format!("Bearer {token}"))],
        query: None,
    }
}

fn claims() -> Value {
    json!({"iss": "test-issuer", "sub": "alice", "exp": NOW + 600, "perms": {"role": "admin"}})
}

#[test]
fn every_accepted_algorithm_verifies_and_a_key_of_another_signer_does_not() {
    let cases: Vec<(&str, Signer, Signer)> = vec![
        ("ES256", ec("ES256"), ec("ES256")),
        ("ES384", ec("ES384"), ec("ES384")),
        ("EdDSA", ed(), ed()),
        ("RS256", rsa(false), rsa(true)),
        ("RS384", rsa(false), rsa(true)),
        ("RS512", rsa(false), rsa(true)),
        ("PS256", rsa(false), rsa(true)),
        ("PS384", rsa(false), rsa(true)),
        ("PS512", rsa(false), rsa(true)),
    ];
    for (alg, key, other) in cases {
        let p = providers(entry(&[key.jwk("k1")], json!({})));
        let good = key.sign(alg, "k1", &claims());
        assert_eq!(
            okta().check(&p, &bearer(&good), NOW).map(|(name, _)| name),
            Ok("okta".into()),
            "{alg}"
        );
        let forged = other.sign(alg, "k1", &claims());
        let why = okta().check(&p, &bearer(&forged), NOW).unwrap_err();
        assert!(why.contains("bad signature"), "{alg}: {why}");
        // A good signature on another payload.
        let mut mallory = claims();
        mallory["sub"] = json!("mallory");
        let other_body = other.sign(alg, "k1", &mallory);
        let (body, _) = other_body.rsplit_once('.').unwrap();
        let (_, sig) = good.rsplit_once('.').unwrap();
        let spliced = format!("{body}.{sig}");
        assert!(okta().check(&p, &bearer(&spliced), NOW).is_err(), "{alg}");
    }
}

/// `none` and HS256 (whose "key" would be the public JWKS) never verify, whatever the JWKS
/// holds; a key whose `alg` names another algorithm is not used.
#[test]
fn none_hmac_and_algorithm_confusion_are_refused() {
    let key = ec("ES256");
    let p = providers(entry(&[key.jwk("k1")], json!({})));
    let body = format!(
        "{}.{}",
        b64(br#"{"alg":"none"}"#),
        b64(claims().to_string().as_bytes())
    );
    for token in [format!("{body}."), format!("{body}.AAAA")] {
        let why = okta().check(&p, &bearer(&token), NOW).unwrap_err();
        assert!(why.contains("not accepted"), "{why}");
    }
    let hs = format!(
        "{}.{}.AAAA",
        b64(br#"{"alg":"HS256"}"#),
        b64(claims().to_string().as_bytes())
    );
    assert!(okta()
        .check(&p, &bearer(&hs), NOW)
        .unwrap_err()
        .contains("not accepted"));
    let mut jwk = key.jwk("k1");
    jwk["alg"] = json!("ES384");
    let p = providers(entry(&[jwk], json!({})));
    let why = okta()
        .check(&p, &bearer(&key.sign("ES256", "k1", &claims())), NOW)
        .unwrap_err();
    assert!(why.contains("no key for ES256"), "{why}");
}

#[test]
fn expiry_not_before_and_clock_skew() {
    let key = ec("ES256");
    let p = providers(entry(&[key.jwk("k1")], json!({"ClockSkewSeconds": 10})));
    let at = |exp: Option<u64>, nbf: Option<u64>| {
        let mut c = claims();
        c.as_object_mut().unwrap().remove("exp");
        if let Some(e) = exp {
            c["exp"] = json!(e);
        }
        if let Some(n) = nbf {
            c["nbf"] = json!(n);
        }
        okta().check(&p, &bearer(&key.sign("ES256", "k1", &c)), NOW)
    };
    assert!(at(Some(NOW - 10), None).is_ok(), "inside the skew");
    assert!(at(Some(NOW - 11), None).unwrap_err().contains("expired"));
    assert!(at(None, None).is_ok(), "exp is optional, as in Envoy");
    assert!(at(None, Some(NOW + 10)).is_ok(), "inside the skew");
    assert!(at(None, Some(NOW + 11))
        .unwrap_err()
        .contains("not valid before"));
    // Consul's default skew is 30 s.
    let p = providers(entry(&[key.jwk("k1")], json!({})));
    let mut c = claims();
    c["exp"] = json!(NOW - 30);
    assert!(okta()
        .check(&p, &bearer(&key.sign("ES256", "k1", &c)), NOW)
        .is_ok());
    c["exp"] = json!(NOW - 31);
    assert!(okta()
        .check(&p, &bearer(&key.sign("ES256", "k1", &c)), NOW)
        .is_err());
}

#[test]
fn issuer_audiences_and_verify_claims() {
    let key = ec("ES256");
    let p = providers(entry(&[key.jwk("k1")], json!({"Audiences": ["a1", "a2"]})));
    let with = |f: &dyn Fn(&mut Value)| {
        let mut c = claims();
        c["aud"] = json!(["x", "a2"]);
        f(&mut c);
        bearer(&key.sign("ES256", "k1", &c))
    };
    assert!(okta().check(&p, &with(&|_| {}), NOW).is_ok());
    assert!(okta()
        .check(&p, &with(&|c| c["aud"] = json!("a1")), NOW)
        .is_ok());
    let why = okta()
        .check(&p, &with(&|c| c["aud"] = json!("b")), NOW)
        .unwrap_err();
    assert!(why.contains("audience"), "{why}");
    let why = okta()
        .check(&p, &with(&|c| c["iss"] = json!("other")), NOW)
        .unwrap_err();
    assert!(why.contains("issuer"), "{why}");
    let why = okta()
        .check(
            &p,
            &with(&|c| drop(c.as_object_mut().unwrap().remove("iss"))),
            NOW,
        )
        .unwrap_err();
    assert!(why.contains("issuer"), "{why}");

    let admin = requirement(json!({"Providers": [{"Name": "okta",
        "VerifyClaims": [{"Path": ["perms", "role"], "Value": "admin"}]}]}));
    assert!(admin.check(&p, &with(&|_| {}), NOW).is_ok());
    for bad in [
        json!({"role": "user"}),
        json!({"role": ["admin"]}),
        json!("admin"),
        json!(null),
    ] {
        let why = admin
            .check(&p, &with(&|c| c["perms"] = bad.clone()), NOW)
            .unwrap_err();
        assert!(why.contains("claim perms.role"), "{bad}: {why}");
    }
}

/// Providers of a requirement are alternatives; a provider that is not known, or that this
/// sidecar cannot honour (remote JWKS, Forwarding), never accepts, and says why.
#[test]
fn providers_are_alternatives_and_unusable_ones_never_accept() {
    let key = ec("ES256");
    let mut remote = json!({"Kind": "jwt-provider", "Name": "remote", "Issuer": "test-issuer",
        "JSONWebKeySet": {"Remote": {"URI": "https://idp.example/jwks", "CacheDuration": "5m"}}});
    let remote_p = Provider::from_consul(&remote, &no_files).unwrap();
    assert!(remote_p.unusable().unwrap().contains("Remote"));
    remote["Name"] = json!("fwd");
    let fwd = entry(
        &[key.jwk("k1")],
        json!({"Name": "fwd", "Forwarding": {"HeaderName": "x jwt"}}),
    );
    let fwd_p = Provider::from_consul(&fwd, &no_files).unwrap();
    assert!(fwd_p.unusable().unwrap().contains("Forwarding.HeaderName"));
    let okta_p = Provider::from_consul(&entry(&[key.jwk("k1")], json!({})), &no_files).unwrap();
    let all = Providers::known([remote_p, fwd_p, okta_p]);
    let token = bearer(&key.sign("ES256", "k1", &claims()));
    let either = requirement(json!({"Providers": [{"Name": "remote"}, {"Name": "okta"}]}));
    assert_eq!(
        either.check(&all, &token, NOW).map(|(name, _)| name),
        Ok("okta".into())
    );
    let why =
        requirement(json!({"Providers": [{"Name": "remote"}, {"Name": "fwd"}, {"Name": "gone"}]}))
            .check(&all, &token, NOW)
            .unwrap_err();
    assert!(
        why.contains("remote: unusable")
            && why.contains("fwd: unusable")
            && why.contains("gone: no jwt-provider"),
        "{why}"
    );
    let why = okta()
        .check(&Providers::unknown(), &token, NOW)
        .unwrap_err();
    assert!(why.contains("not known yet"), "{why}");
}

#[test]
fn tokens_are_found_where_the_provider_says() {
    let key = ec("ES256");
    let token = key.sign("ES256", "k1", &claims());
    let req = |headers: Vec<(&str, String)>, query: Option<&str>| l7::SimpleRequest {
        method: "GET".into(),
        path: "/".into(),
        headers: headers
            .into_iter()
            .map(|(n, v)| (n.to_string(), v))
            .collect(),
        query: query.map(str::to_string),
    };
    // The defaults: Authorization Bearer (any case) and access_token.
    let p = providers(entry(&[key.jwk("k1")], json!({})));
    assert!(okta()
        .check(
            &p,
            &req(vec![("authorization", format!("bearer {token}"))], None),
            NOW
        )
        .is_ok());
    let q = format!("a=1&access_token={token}");
    assert!(okta().check(&p, &req(vec![], Some(&q)), NOW).is_ok());
    assert!(okta()
        .check(&p, &req(vec![], None), NOW)
        .unwrap_err()
        .contains("no token"));
    assert!(okta()
        .check(
            &p,
            &req(vec![("authorization", format!("Basic {token}"))], None),
            NOW
        )
        .unwrap_err()
        .contains("no token"));

    let p = providers(entry(
        &[key.jwk("k1")],
        json!({"Locations": [
            {"Header": {"Name": "X-Token", "ValuePrefix": "JWT "}},
            {"QueryParam": {"Name": "t"}},
            {"Cookie": {"Name": "session"}}]}),
    ));
    assert!(okta()
        .check(
            &p,
            &req(vec![("x-token", format!("JWT {token}"))], None),
            NOW
        )
        .is_ok());
    let q = format!("t={token}");
    assert!(okta().check(&p, &req(vec![], Some(&q)), NOW).is_ok());
    let c = format!("a=b; session={token}");
    assert!(okta()
        .check(&p, &req(vec![("Cookie", c)], None), NOW)
        .is_ok());
    // Not the defaults any more.
    assert!(okta()
        .check(
            &p,
            &req(vec![("authorization", format!("Bearer {token}"))], None),
            NOW
        )
        .is_err());
}

#[test]
fn a_jwks_from_a_file_and_bad_jwks_documents() {
    let key = ed();
    let doc = json!({"keys": [key.jwk("k1")]}).to_string();
    let e = json!({"Name": "okta", "Issuer": "test-issuer",
        "JSONWebKeySet": {"Local": {"Filename": "/keys.json"}}});
    let p = Provider::from_consul(&e, &|f: &str| {
        assert_eq!(f, "/keys.json");
        Ok(doc.clone())
    })
    .unwrap();
    let all = Providers::known([p]);
    assert!(okta()
        .check(&all, &bearer(&key.sign("EdDSA", "k1", &claims())), NOW)
        .is_ok());
    let bad = |jwks: &str| {
        let e =
            json!({"Name": "okta", "JSONWebKeySet": {"Local": {"JWKS": STANDARD.encode(jwks)}}});
        Provider::from_consul(&e, &no_files)
            .unwrap()
            .unusable()
            .unwrap()
            .to_string()
    };
    assert!(bad("not json").contains("not JSON"));
    assert!(bad(r#"{"keys": [{"kty": "oct", "k": "c2VjcmV0"}]}"#).contains("no RSA"));
    assert!(bad(r#"{"nokeys": 1}"#).contains("no keys"));
    let e = json!({"Name": "okta", "JSONWebKeySet": {"Local": {"Filename": "/x"}}});
    assert!(Provider::from_consul(&e, &no_files)
        .unwrap()
        .unusable()
        .unwrap()
        .contains("/x"));
    let e = json!({"Name": "okta", "JSONWebKeySet": {"Local": {"JWKS": "%%%"}}});
    assert!(Provider::from_consul(&e, &no_files)
        .unwrap()
        .unusable()
        .unwrap()
        .contains("base64"));
    let e = json!({"Name": "okta", "JSONWebKeySet": {"Local": {"JWKS": STANDARD.encode(&doc)}},
        "CacheConfig": {"Size": 10}});
    assert_eq!(
        Provider::from_consul(&e, &no_files).unwrap().ignored,
        vec!["CacheConfig"]
    );
}

#[test]
fn requirements_parse_as_consul_sends_them() {
    assert_eq!(Requirement::from_consul(&Value::Null).ok(), Some(None));
    assert_eq!(
        Requirement::from_consul(&json!({"Providers": null})).ok(),
        Some(None)
    );
    assert_eq!(
        Requirement::from_consul(&json!({"Providers": []})).ok(),
        Some(None)
    );
    let r = requirement(json!({"Providers": [{"Name": "a", "VerifyClaims": null}, {"Name": "b"}]}));
    assert_eq!(r.to_string(), "a JWT from a or b");
    assert!(Requirement::from_consul(&json!({"Providers": [{}]})).is_err());
    assert!(Requirement::from_consul(
        &json!({"Providers": [{"Name": "a", "VerifyClaims": [{"Path": [1]}]}]})
    )
    .is_err());
    assert!(Requirement::from_consul(&json!({"Other": 1})).is_err());
    assert!(Requirement::from_consul(&json!("x")).is_err());
}

#[test]
fn malformed_tokens_are_refused_without_panicking() {
    for t in [
        "", ".", "..", "...", "a.b", "a.b.c.d", "!!.!!.!!", "e30.e30.", // {} {}: no alg
        "W10.e30.", // [] header
    ] {
        assert!(parse(t).is_err(), "{t:?}");
    }
    let long = "a".repeat(MAX_TOKEN + 1);
    assert!(parse(&long).unwrap_err().to_string().contains("longer"));
    let crit = format!(
        "{}.{}.",
        b64(br#"{"alg":"ES256","crit":["x"]}"#),
        b64(b"{}")
    );
    assert!(parse(&crit).unwrap_err().to_string().contains("crit"));
}

/// The table around it: an allow whose entry requires a JWT lets a request through only with
/// an accepted token (and its claims); without one it is denied whatever the default policy,
/// never passed to a lower rule; HAProxy's fast map sends every request of that source to the
/// agent; a rotated key set (a new table) refuses tokens of the old key.
#[test]
fn the_table_judges_a_top_level_jwt_per_request() {
    use super::super::{Action, AuthzTable, DefaultPolicy, Intention};
    const TD: &str = "11111111-2222-3333-4444-555555555555.consul";
    const CA: &str = include_str!("../../../../fixtures/spop/certs/ca.crt");
    let src = format!("spiffe://{TD}/ns/default/dc/dc1/svc/client");
    let key = ec("ES256");
    let needed = requirement(json!({"Providers": [{"Name": "okta",
        "VerifyClaims": [{"Path": ["perms", "role"], "Value": "admin"}]}]}));
    let table = |key: &Signer| {
        let client = Intention {
            jwt: Some(needed.clone()),
            ..Intention::new("client", Action::L7 { permissions: 0 }, 9)
        };
        AuthzTable::new(TD, CA, vec![client], DefaultPolicy::Allow)
            .unwrap()
            .with_jwt_providers(providers(entry(&[key.jwk("k1")], json!({}))))
            .for_http_listener(true)
    };
    let t = table(&key);
    let at = std::time::UNIX_EPOCH + std::time::Duration::from_secs(NOW);
    let good = bearer(&key.sign("ES256", "k1", &claims()));
    let d = t.decide_request_at(&src, &good, at);
    assert!(d.allow, "{}", d.reason);
    let mut user = claims();
    user["perms"]["role"] = json!("user");
    for (what, req) in [
        ("no token", bearer("")),
        ("claim", bearer(&key.sign("ES256", "k1", &user))),
        (
            "bad signature",
            bearer(&ec("ES256").sign("ES256", "k1", &claims())),
        ),
    ] {
        let d = t.decide_request_at(&src, &req, at);
        assert!(
            !d.allow && d.reason.contains("requires a JWT from okta"),
            "{what}: {}",
            d.reason
        );
    }
    let map = t.fast_map();
    assert!(
        map.iter()
            .any(|(k, v)| k == &format!("^{}:", t.fast_key(Some(0))) && v == "agent"),
        "{map:?}"
    );
    assert!(!map
        .iter()
        .any(|(k, v)| k.starts_with(&format!("^{}", t.fast_key(Some(0)))) && v == "allow"));
    let rotated = table(&ec("ES256"));
    assert_ne!(rotated.generation(), t.generation());
    assert!(!rotated.decide_request_at(&src, &good, at).allow);
}

/// A remote JWKS verifies with the key set the watch side fetched for its URI (handed in by
/// the reader, like a local file's text), and with nothing before a fetch.
#[test]
fn a_remote_jwks_verifies_with_the_fetched_set() {
    let key = ed();
    let doc = json!({"keys": [key.jwk("k1")]}).to_string();
    let e = json!({"Name": "okta", "Issuer": "test-issuer",
        "JSONWebKeySet": {"Remote": {"URI": "http://127.0.0.1:1/jwks", "CacheDuration": "1s"}}});
    let p = Provider::from_consul(&e, &|u: &str| {
        assert_eq!(u, "http://127.0.0.1:1/jwks");
        Ok(doc.clone())
    })
    .unwrap();
    let all = Providers::known([p]);
    assert!(okta()
        .check(&all, &bearer(&key.sign("EdDSA", "k1", &claims())), NOW)
        .is_ok());
    let p = Provider::from_consul(&e, &|_: &str| Err("not fetched yet".into())).unwrap();
    assert!(p.unusable().unwrap().contains("not fetched yet"));
}

/// An accepted token's way to the app, as Envoy's: the header it came in is removed unless its
/// location says `Forward`; a query parameter stays; the payload goes in the `Forwarding`
/// header, padded only when asked.
#[test]
fn an_accepted_token_is_stripped_and_its_payload_forwarded() {
    let key = ec("ES256");
    let token = key.sign("ES256", "k1", &claims());
    let segment = token.split('.').nth(1).unwrap().to_string();
    let pass = |extra: Value, req: &dyn l7::Request| {
        let p = Provider::from_consul(&entry(&[key.jwk("k1")], extra), &no_files).unwrap();
        okta()
            .check(&Providers::known([p]), req, NOW)
            .map(|(_, passing)| passing)
            .unwrap()
    };
    let p = pass(json!({}), &bearer(&token));
    assert_eq!(p.strip.as_deref(), Some("authorization"));
    assert_eq!(p.payload, None);
    let p = pass(
        json!({"Locations": [{"Header": {"Name": "X-Token", "Forward": true}}],
               "Forwarding": {"HeaderName": "X-Jwt-Payload", "PadForwardPayloadHeader": true}}),
        &header("x-token", &token),
    );
    assert_eq!(p.strip, None);
    let (h, v) = p.payload.unwrap();
    assert_eq!(h, "x-jwt-payload");
    assert!(v.starts_with(&segment) && v.len() % 4 == 0, "{v}");
    let p = pass(
        json!({"Forwarding": {"HeaderName": "x-jwt-payload"}}),
        &bearer(&token),
    );
    assert_eq!(p.payload.unwrap().1, segment);
}
