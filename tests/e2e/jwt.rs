//! JWT requirements of intentions (Consul 1.16) verified per request by the sidecar's SPOE
//! agent, on real programs: Consul 1.16.3 with ACLs on and default deny (as in Consul's own
//! L7 case), a `jwt-provider` entry with a local JWKS the test makes, a service-intentions
//! entry whose top-level `JWT` names it with a `VerifyClaims`, the server sidecar in http mode
//! with `-enable-intentions`, and curl with the real leaf of `client`. Consul 1.8.7 has no JWT
//! requirements: the test says it was skipped.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::support::mesh::sidecar;
use crate::support::*;
use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SystemRandom;
use ring::signature::{EcdsaKeyPair, KeyPair, ECDSA_P256_SHA256_FIXED_SIGNING};
use serde_json::{json, Value};

/// An ES256 key made for this run, and the tokens it signs.
struct Key {
    pair: EcdsaKeyPair,
    kid: &'static str,
}

impl Key {
    fn new(kid: &'static str) -> Key {
        let rng = SystemRandom::new();
        let pk8 = EcdsaKeyPair::generate_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, &rng).unwrap();
        let pair =
            EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, pk8.as_ref(), &rng).unwrap();
        Key { pair, kid }
    }

    fn jwk(&self) -> Value {
        let p = self.pair.public_key().as_ref();
        json!({"kty": "EC", "crv": "P-256", "use": "sig", "kid": self.kid,
               "x": URL_SAFE_NO_PAD.encode(&p[1..33]), "y": URL_SAFE_NO_PAD.encode(&p[33..])})
    }

    fn sign(&self, claims: &Value) -> String {
        let header = json!({"alg": "ES256", "typ": "JWT", "kid": self.kid});
        let input = format!(
            "{}.{}",
            URL_SAFE_NO_PAD.encode(header.to_string()),
            URL_SAFE_NO_PAD.encode(claims.to_string())
        );
        let sig = self
            .pair
            .sign(&SystemRandom::new(), input.as_bytes())
            .unwrap();
        format!("{input}.{}", URL_SAFE_NO_PAD.encode(sig.as_ref()))
    }
}

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

/// Claims that the provider and the intention accept, changed by `f`.
fn claims(f: impl FnOnce(&mut Value)) -> Value {
    let mut c = json!({"iss": "https://idp.test", "sub": "alice", "exp": now() + 600,
                       "perms": {"role": "admin"}});
    f(&mut c);
    c
}

fn put_provider(consul: &Consul, keys: &[&Key]) {
    let jwks = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
    let entry = json!({
        "Kind": "jwt-provider", "Name": "okta", "Issuer": "https://idp.test",
        "JSONWebKeySet": {"Local": {"JWKS": STANDARD.encode(jwks.to_string())}},
        "ClockSkewSeconds": 5,
        "Forwarding": {"HeaderName": "X-Jwt-Payload"},
    });
    let (status, body) = consul.put("/v1/config", &entry.to_string());
    assert_eq!(status, 200, "jwt-provider: {body}");
}

/// The status of one GET / from `client` with `token` as a bearer token (none when empty).
fn status(consul: &Consul, base: &TempDir, ca: &std::path::Path, port: u16, token: &str) -> u16 {
    let (cert, key, _) = consul.leaf_files("client", base.path());
    let mut cmd = curl_for_status();
    cmd.arg("--cacert")
        .arg(ca)
        .arg("--cert")
        .arg(cert)
        .arg("--key")
        .arg(key);
    if !token.is_empty() {
        cmd.arg("-H").arg(format!("Authorization: Bearer {token}"));
    }
    cmd.arg(format!("https://127.0.0.1:{port}/"));
    http_status(&mut cmd)
}

/// Waits until `fresh` (a token of the rotated key) is served, then checks that `old` (the
/// old key's) is refused.
fn rotated(get: &dyn Fn(&str) -> u16, fresh: &str, old: &str, sc: &Child) {
    let mut last = 0;
    wait_until(
        Duration::from_secs(30),
        "the rotated key's token to get 200",
        || {
            last = get(fresh);
            last == 200
        },
    )
    .unwrap_or_else(|e| panic!("{e} (last {last})\n{}", sc.logs()));
    assert_eq!(get(old), 403, "the old key is gone\n{}", sc.logs());
}

/// `server` in http mode behind its sidecar with intentions enforced, on Consul 1.16 with ACLs
/// on and default deny; fields in drop order (the sidecar before Consul).
struct JwtServer {
    sc: Child,
    app: HttpApp,
    consul: Consul,
    base: TempDir,
    port: u16,
    ca: std::path::PathBuf,
}

impl JwtServer {
    /// `None` on a Consul without JWT requirements (before 1.16): the test says it skipped.
    fn start(name: &str) -> Option<JwtServer> {
        if !consul_is_current() {
            eprintln!(
                "skipped on Consul {}: JWT requirements exist from Consul 1.16",
                consul_version()
            );
            return None;
        }
        let consul = Consul::start_acl_deny();
        consul.set_protocol("server", "http");
        let app = HttpApp::start("hello from the jwt app");
        let port = free_port();
        consul.register(&sidecar_registration("server", app.port(), port, &[]));
        let base = TempDir::new(name);
        let sc = sidecar(
            &consul,
            &base,
            "server",
            true,
            &["-token", ACL_MASTER_TOKEN],
        );
        let ca = ready_with_ca(&sc, &consul, base.path());
        Some(JwtServer {
            sc,
            app,
            consul,
            base,
            port,
            ca,
        })
    }
}

/// The cases: `client` is allowed only with a token of the provider's key, issuer and
/// `perms.role = admin` (the token's header removed, its payload forwarded in `X-Jwt-Payload`);
/// no token, a token signed by another key, an expired one, another
/// issuer, another role: 403, never at the app. Then the provider's key set is rotated live:
/// the new key's tokens pass and the old key's are refused, without a restart.
#[test]
fn tokens_are_verified_per_request_and_a_rotated_key_set_converges() {
    let Some(JwtServer {
        sc,
        app,
        consul,
        base,
        port,
        ca,
    }) = JwtServer::start("jwt")
    else {
        return;
    };

    let k1 = Key::new("k1");
    put_provider(&consul, &[&k1]);
    let intentions = json!({
        "Kind": "service-intentions", "Name": "server",
        "JWT": {"Providers": [{"Name": "okta",
            "VerifyClaims": [{"Path": ["perms", "role"], "Value": "admin"}]}]},
        "Sources": [{"Name": "client", "Action": "allow"}],
    });
    let (code, body) = consul.put("/v1/config", &intentions.to_string());
    assert_eq!(code, 200, "service-intentions: {body}");

    let get = |token: &str| status(&consul, &base, &ca, port, token);
    let good = k1.sign(&claims(|_| {}));
    let mut last = 0;
    wait_until(Duration::from_secs(30), "a valid token to get 200", || {
        last = get(&good);
        last == 200
    })
    .unwrap_or_else(|e| panic!("{e} (last {last})\n{}", sc.logs()));
    // As Envoy: the token's header does not reach the app, its payload does, in the
    // provider's Forwarding header (the rules come with a reload once the provider is read).
    // (The test app keeps the head in lower case.)
    let payload = good.split('.').nth(1).unwrap().to_ascii_lowercase();
    wait_until(
        Duration::from_secs(30),
        "the payload header at the app",
        || {
            get(&good) == 200
                && app
                    .last_request_head()
                    .contains(&format!("x-jwt-payload: {payload}\r\n"))
        },
    )
    .unwrap_or_else(|e| panic!("{e}\n{}\n{}", app.last_request_head(), sc.logs()));
    let head = app.last_request_head().to_ascii_lowercase();
    assert!(!head.contains("authorization"), "{head}");
    let served = app.requests();

    let other = Key::new("k1");
    for (what, token) in [
        ("no token", String::new()),
        ("another key", other.sign(&claims(|_| {}))),
        (
            "expired",
            k1.sign(&claims(|c| c["exp"] = json!(now() - 60))),
        ),
        (
            "another issuer",
            k1.sign(&claims(|c| c["iss"] = json!("https://evil.test"))),
        ),
        (
            "another role",
            k1.sign(&claims(|c| c["perms"]["role"] = json!("user"))),
        ),
        ("not a token", "a.b.c".to_string()),
    ] {
        assert_eq!(get(&token), 403, "{what}\n{}", sc.logs());
    }
    assert_eq!(app.requests(), served, "a refused request reached the app");
    let logs = sc.logs();
    assert!(
        logs.contains("requires a JWT from okta") && logs.contains("bad signature"),
        "each denial names the requirement and why:\n{logs}"
    );

    // Key rotation at the provider: the agent's table follows the entry.
    let k2 = Key::new("k2");
    put_provider(&consul, &[&k2]);
    let fresh = k2.sign(&claims(|_| {}));
    rotated(&get, &fresh, &good, &sc);
}

/// A JWKS server on loopback for one test: serves whatever `set` last gave (503 while
/// nothing), and is gone (its port refusing connections) once dropped.
struct JwksServer {
    port: u16,
    body: std::sync::Arc<std::sync::Mutex<Option<String>>>,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl JwksServer {
    fn start() -> JwksServer {
        use std::io::{Read, Write};
        use std::sync::atomic::Ordering;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        listener.set_nonblocking(true).unwrap();
        let port = listener.local_addr().unwrap().port();
        let body = std::sync::Arc::new(std::sync::Mutex::new(None::<String>));
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (b, s) = (body.clone(), stop.clone());
        let thread = std::thread::spawn(move || {
            while !s.load(Ordering::SeqCst) {
                let Ok((mut conn, _)) = listener.accept() else {
                    std::thread::sleep(Duration::from_millis(20));
                    continue;
                };
                let _ = conn.set_nonblocking(false);
                let _ = conn.set_read_timeout(Some(Duration::from_secs(2)));
                let mut head = Vec::new();
                let mut buf = [0u8; 1024];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match conn.read(&mut buf) {
                        Ok(0) | Err(_) => break,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let answer = match b.lock().unwrap().clone() {
                    Some(text) => format!(
                        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{text}",
                        text.len()
                    ),
                    None => "HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
                };
                let _ = conn.write_all(answer.as_bytes());
            }
        });
        JwksServer {
            port,
            body,
            stop,
            thread: Some(thread),
        }
    }

    fn set(&self, keys: &[&Key]) {
        let jwks = json!({"keys": keys.iter().map(|k| k.jwk()).collect::<Vec<_>>()});
        *self.body.lock().unwrap() = Some(jwks.to_string());
    }
}

impl Drop for JwksServer {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::SeqCst);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A provider with a remote JWKS (`JSONWebKeySet.Remote`) served by a test server on
/// loopback, fetched by the sidecar's watch side: until a first fetch succeeds, a valid token
/// is refused; then it passes; a key rotated at the server converges at the next fetch
/// (`CacheDuration` 1 s); with the server gone, the last good keys keep verifying.
#[test]
fn a_remote_jwks_is_fetched_rotated_and_kept_when_its_server_is_down() {
    let Some(JwtServer {
        sc,
        app,
        consul,
        base,
        port,
        ca,
    }) = JwtServer::start("jwks")
    else {
        return;
    };

    let server = JwksServer::start();
    let uri = format!("http://127.0.0.1:{}/jwks", server.port);
    let entry = json!({
        "Kind": "jwt-provider", "Name": "okta", "Issuer": "https://idp.test",
        "JSONWebKeySet": {"Remote": {"URI": uri, "CacheDuration": "1s",
            "RetryPolicy": {"NumRetries": 1}}},
    });
    let (code, body) = consul.put("/v1/config", &entry.to_string());
    assert_eq!(code, 200, "jwt-provider: {body}");
    let intentions = json!({
        "Kind": "service-intentions", "Name": "server",
        "JWT": {"Providers": [{"Name": "okta"}]},
        "Sources": [{"Name": "client", "Action": "allow"}],
    });
    let (code, body) = consul.put("/v1/config", &intentions.to_string());
    assert_eq!(code, 200, "service-intentions: {body}");

    let get = |token: &str| status(&consul, &base, &ca, port, token);
    let k1 = Key::new("k1");
    let good = k1.sign(&claims(|_| {}));
    // The server answers 503: nothing fetched yet, so the valid token is refused.
    wait_until(Duration::from_secs(30), "the fetch failure logged", || {
        sc.logs()
            .contains("requests that need it are denied until a fetch succeeds")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.logs()));
    assert_eq!(get(&good), 403, "{}", sc.logs());
    assert_eq!(app.requests(), 0);

    server.set(&[&k1]);
    let mut last = 0;
    wait_until(
        Duration::from_secs(30),
        "the fetched key's token to get 200",
        || {
            last = get(&good);
            last == 200
        },
    )
    .unwrap_or_else(|e| panic!("{e} (last {last})\n{}", sc.logs()));

    let k2 = Key::new("k2");
    server.set(&[&k2]);
    let fresh = k2.sign(&claims(|_| {}));
    rotated(&get, &fresh, &good, &sc);

    drop(server);
    wait_until(Duration::from_secs(30), "the failed fetch logged", || {
        sc.logs().contains("its last key set stays in use")
    })
    .unwrap_or_else(|e| panic!("{e}\n{}", sc.logs()));
    assert_eq!(get(&fresh), 200, "the last good keys verify\n{}", sc.logs());
    assert_eq!(get(&good), 403);
}
