//! Key sets and tokens: a JWKS parsed into the signing keys the agent can use, and a compact
//! JWT parsed (bounded to `MAX_TOKEN`) and its signature verified against those keys.

use super::*;

/// A JWKS document's keys that this sidecar can use; the others (symmetric, unknown curves,
/// encryption keys) are skipped. No usable key at all is an error.
pub(super) fn parse_jwks(doc: &str) -> Result<Vec<Jwk>> {
    if doc.len() > MAX_JWKS {
        return Err(Error::msg(format!(
            "the JWKS is larger than {MAX_JWKS} bytes"
        )));
    }
    let v: Value =
        serde_json::from_str(doc).map_err(|e| Error::msg(format!("the JWKS is not JSON: {e}")))?;
    let list = v
        .get("keys")
        .and_then(Value::as_array)
        .ok_or_else(|| Error::msg("the JWKS has no keys array"))?;
    if list.len() > MAX_KEYS {
        return Err(Error::msg(format!(
            "the JWKS has more than {MAX_KEYS} keys"
        )));
    }
    let keys: Vec<Jwk> = list.iter().filter_map(|k| parse_jwk(k).ok()).collect();
    if keys.is_empty() {
        return Err(Error::msg(
            "the JWKS has no RSA, EC P-256/P-384 or Ed25519 signing key",
        ));
    }
    Ok(keys)
}

pub(super) fn parse_jwk(k: &Value) -> Result<Jwk> {
    let s = |f: &str| k.get(f).and_then(Value::as_str);
    let b = |f: &str| -> Result<Vec<u8>> {
        B64URL
            .decode(s(f).ok_or_else(|| Error::msg(format!("no {f}")))?)
            .map_err(|e| Error::msg(format!("{f}: {e}")))
    };
    if s("use").is_some_and(|u| u != "sig") {
        return Err(Error::msg("not a signing key"));
    }
    let key = match (s("kty"), s("crv")) {
        (Some("RSA"), _) => Key::Rsa {
            n: strip_zeros(b("n")?),
            e: strip_zeros(b("e")?),
        },
        (Some("EC"), Some(crv @ ("P-256" | "P-384"))) => {
            let (x, y) = (b("x")?, b("y")?);
            let len = if crv == "P-256" { 32 } else { 48 };
            if x.len() != len || y.len() != len {
                return Err(Error::msg("bad EC coordinates"));
            }
            let mut point = vec![4u8];
            point.extend_from_slice(&x);
            point.extend_from_slice(&y);
            if crv == "P-256" {
                Key::P256(point)
            } else {
                Key::P384(point)
            }
        }
        (Some("OKP"), Some("Ed25519")) => Key::Ed25519(b("x")?),
        _ => return Err(Error::msg("unsupported key type")),
    };
    Ok(Jwk {
        kid: s("kid").map(str::to_string),
        alg: s("alg").map(str::to_string),
        key,
    })
}

pub(super) fn strip_zeros(mut v: Vec<u8>) -> Vec<u8> {
    let zeros = v.iter().take_while(|b| **b == 0).count();
    v.drain(..zeros.min(v.len().saturating_sub(1)));
    v
}

/// A token split and decoded, not yet verified.
#[derive(Debug)]
pub struct Token {
    pub alg: String,
    pub kid: Option<String>,
    pub payload: Map<String, Value>,
    signing_input: Vec<u8>,
    signature: Vec<u8>,
}

/// Splits and decodes a compact JWS (`header.payload.signature`); refuses anything larger
/// than `MAX_TOKEN`, a header or payload that is not a JSON object, an unknown `crit`.
pub fn parse(token: &str) -> Result<Token> {
    if token.len() > MAX_TOKEN {
        return Err(Error::msg(format!("token longer than {MAX_TOKEN} bytes")));
    }
    let mut parts = token.split('.');
    let (Some(h), Some(p), Some(s), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(Error::msg("token is not three base64url parts"));
    };
    let object = |part: &str, what: &str| -> Result<Map<String, Value>> {
        let raw = B64URL
            .decode(part)
            .map_err(|_| Error::msg(format!("token {what} is not base64url")))?;
        match serde_json::from_slice(&raw) {
            Ok(Value::Object(o)) => Ok(o),
            _ => Err(Error::msg(format!("token {what} is not a JSON object"))),
        }
    };
    let header = object(h, "header")?;
    let payload = object(p, "payload")?;
    let signature = B64URL
        .decode(s)
        .map_err(|_| Error::msg("token signature is not base64url"))?;
    if header.get("crit").is_some() {
        return Err(Error::msg("token header has crit"));
    }
    let alg = header
        .get("alg")
        .and_then(Value::as_str)
        .ok_or_else(|| Error::msg("token header has no alg"))?
        .to_string();
    let kid = header
        .get("kid")
        .and_then(Value::as_str)
        .map(str::to_string);
    Ok(Token {
        alg,
        kid,
        payload,
        signing_input: token.as_bytes()[..h.len() + 1 + p.len()].to_vec(),
        signature,
    })
}

impl Token {
    /// Whether one of `keys` (those with the token's `kid`, if it names one) signed it with
    /// its `alg`.
    pub(super) fn verify(&self, keys: &[Jwk]) -> Result<()> {
        let alg = self.alg.as_str();
        if !matches!(
            alg,
            "RS256" | "RS384" | "RS512" | "PS256" | "PS384" | "PS512" | "ES256" | "ES384" | "EdDSA"
        ) {
            return Err(Error::msg(format!("algorithm {alg:?} is not accepted")));
        }
        let mut tried = 0;
        for k in keys {
            if self.kid.is_some() && k.kid.is_some() && self.kid != k.kid {
                continue;
            }
            if k.alg.as_deref().is_some_and(|a| a != alg) {
                continue;
            }
            let msg = self.signing_input.as_slice();
            let sig = self.signature.as_slice();
            let ok = match (&k.key, alg) {
                (Key::Rsa { n, e }, _) if alg.starts_with("RS") || alg.starts_with("PS") => {
                    let params = match alg {
                        "RS256" => &signature::RSA_PKCS1_2048_8192_SHA256,
                        "RS384" => &signature::RSA_PKCS1_2048_8192_SHA384,
                        "RS512" => &signature::RSA_PKCS1_2048_8192_SHA512,
                        "PS256" => &signature::RSA_PSS_2048_8192_SHA256,
                        "PS384" => &signature::RSA_PSS_2048_8192_SHA384,
                        _ => &signature::RSA_PSS_2048_8192_SHA512,
                    };
                    RsaPublicKeyComponents { n, e }
                        .verify(params, msg, sig)
                        .is_ok()
                }
                (Key::P256(pt), "ES256") => {
                    UnparsedPublicKey::new(&signature::ECDSA_P256_SHA256_FIXED, pt)
                        .verify(msg, sig)
                        .is_ok()
                }
                (Key::P384(pt), "ES384") => {
                    UnparsedPublicKey::new(&signature::ECDSA_P384_SHA384_FIXED, pt)
                        .verify(msg, sig)
                        .is_ok()
                }
                (Key::Ed25519(x), "EdDSA") => UnparsedPublicKey::new(&signature::ED25519, x)
                    .verify(msg, sig)
                    .is_ok(),
                _ => continue,
            };
            tried += 1;
            if ok {
                return Ok(());
            }
        }
        if tried == 0 {
            Err(Error::msg(format!(
                "no key for {alg}{}",
                self.kid
                    .as_deref()
                    .map(|k| format!(" with kid {k:?}"))
                    .unwrap_or_default()
            )))
        } else {
            Err(Error::msg("bad signature"))
        }
    }
}
