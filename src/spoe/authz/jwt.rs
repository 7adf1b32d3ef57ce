//! JSON Web Tokens as Consul 1.16's intentions require them (`JWT` on a service-intentions
//! entry or on one of its permissions) and its `jwt-provider` config entries describe them.
//! Pure: parsing, signature checks with ring, claims.
//!
//! Semantics are those Consul gives Envoy (`agent/xds/jwt_authn.go` for the providers,
//! `agent/xds/rbac.go` for the requirements):
//! - a requirement names providers; it holds when one of them (any) verifies a token of the
//!   request and that token's `iss` is exactly the provider's `Issuer` and every one of the
//!   provider reference's `VerifyClaims` holds: the payload's value at `Path` (object keys) is
//!   a string equal to `Value` (Envoy's metadata matcher with an exact string matcher);
//! - a provider takes its token from its `Locations` (a header with an optional value prefix,
//!   a query parameter, a cookie), or by default from `Authorization: Bearer …` and the
//!   `access_token` query parameter; its keys are its local JWKS (inline, base64, or a file)
//!   or the last key set fetched from its remote JWKS (by the watch side, `consul::jwks`;
//!   until a first fetch succeeds, the provider verifies nothing);
//!   `Audiences`, when given, must share one value with the token's `aud`; `exp` and `nbf`
//!   are judged with the provider's `ClockSkewSeconds` (Consul's default 30);
//! - signatures: RS256/384/512, PS256/384/512, ES256, ES384, EdDSA (Ed25519). `none`, HS*
//!   and anything else are refused: a key set is public, so a symmetric algorithm would let
//!   anyone sign.
//!
//! What this sidecar cannot honour makes the provider unusable, named in its error, so every
//! requirement naming only it denies: a remote JWKS not fetched yet, a header name that is
//! not a token (`Forwarding.HeaderName`, a header location's), a JWKS that does not parse.
//! An accepted token's `Passing` says what the request loses and gains on its way (its header
//! removed unless `Forward`, the payload in the `Forwarding` header): the agent tells HAProxy,
//! whose rules name the headers (`AuthzTable::jwt_headers`). `CacheConfig` only tunes Envoy's cache of verified tokens and is ignored.
//!
//! A token is untrusted input: its size is bounded (`MAX_TOKEN`) before anything is decoded,
//! and `parse` never panics (`fuzz/fuzz_targets/jwt.rs`).

use std::collections::BTreeMap;
use std::fmt;

use base64::engine::general_purpose::{GeneralPurpose, GeneralPurposeConfig, STANDARD};
use base64::engine::DecodePaddingMode;
use base64::Engine;
use ring::signature::{self, RsaPublicKeyComponents, UnparsedPublicKey};
use serde_json::{Map, Value};

use super::l7;
use crate::error::{Error, Result};

/// The longest token looked at (bytes). Real tokens are a few hundred bytes to a few KiB.
pub const MAX_TOKEN: usize = 8 * 1024;
/// The most keys one JWKS may hold, and the longest JWKS text (bytes).
const MAX_KEYS: usize = 64;
const MAX_JWKS: usize = 256 * 1024;
/// Consul's default `ClockSkewSeconds`.
const DEFAULT_CLOCK_SKEW: u64 = 30;

/// base64url as JWTs use it: no padding, tolerated if present (some signers add it).
const B64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Where a provider looks for its token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Location {
    /// A header (name in lower case); the token is what follows `prefix` in its value.
    Header {
        name: String,
        prefix: String,
        /// `Forward`: the header reaches the app; without it, it is removed once the token
        /// in it was accepted, as Envoy does.
        forward: bool,
    },
    QueryParam(String),
    Cookie(String),
}

/// One key of a JWKS that this sidecar can verify with.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Jwk {
    kid: Option<String>,
    /// The key's `alg`, when it names one: then only that algorithm may use it.
    alg: Option<String>,
    key: Key,
}

#[derive(Clone, Debug, PartialEq, Eq)]
enum Key {
    Rsa {
        n: Vec<u8>,
        e: Vec<u8>,
    },
    /// An uncompressed point (0x04 ‖ x ‖ y).
    P256(Vec<u8>),
    P384(Vec<u8>),
    Ed25519(Vec<u8>),
}

/// A `jwt-provider` config entry as far as verification goes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Provider {
    pub name: String,
    issuer: String,
    audiences: Vec<String>,
    locations: Vec<Location>,
    clock_skew: u64,
    /// The keys, or why this provider cannot verify anything (then it never does).
    keys: Result<Vec<Jwk>, String>,
    /// `Forwarding`: the header (lower case) that carries an accepted token's payload to the
    /// app, and whether it is padded (`PadForwardPayloadHeader`).
    forwarding: Option<(String, bool)>,
    /// What was ignored, for one warning.
    pub ignored: Vec<String>,
}

/// The providers a table knows, by name; `None` while the entries are not known yet.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Providers(Option<BTreeMap<String, Provider>>);

impl Providers {
    pub fn unknown() -> Providers {
        Providers(None)
    }

    pub fn known(providers: impl IntoIterator<Item = Provider>) -> Providers {
        Providers(Some(
            providers.into_iter().map(|p| (p.name.clone(), p)).collect(),
        ))
    }

    /// For the table's digest: every provider with what it verifies with.
    pub fn describe(&self) -> String {
        format!("{:?}", self.0)
    }

    pub fn iter(&self) -> impl Iterator<Item = &Provider> {
        self.0.iter().flat_map(|m| m.values())
    }
}

/// What an accepted token asks of its request on the way to the app, as Envoy's `jwt_authn`
/// does: the header it came in removed (unless the location says `Forward`), and its payload
/// in the provider's `Forwarding` header.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Passing {
    /// The header (lower case) to remove.
    pub strip: Option<String>,
    /// (header in lower case, base64url payload).
    pub payload: Option<(String, String)>,
}

/// One reference to a provider in a requirement, with the claims it demands.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ProviderRef {
    pub name: String,
    claims: Vec<(Vec<String>, String)>,
}

/// An intention's or a permission's `JWT`: one of its providers must accept the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Requirement {
    pub providers: Vec<ProviderRef>,
}

impl fmt::Display for Requirement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let names: Vec<&str> = self.providers.iter().map(|p| p.name.as_str()).collect();
        write!(f, "a JWT from {}", names.join(" or "))
    }
}

impl Requirement {
    /// An intention's or permission's `JWT` as Consul's API returns it: `None` when it is
    /// absent, null or names no provider (Consul's Envoy then checks nothing either).
    pub fn from_consul(v: &Value) -> crate::error::Result<Option<Requirement>> {
        let obj = match v {
            Value::Null => return Ok(None),
            Value::Object(o) => o,
            _ => return Err(Error::msg("JWT is not an object")),
        };
        for k in obj.keys() {
            if k != "Providers" && !obj[k].is_null() {
                return Err(Error::msg(format!("unsupported JWT field {k}")));
            }
        }
        let mut providers = Vec::new();
        for p in obj
            .get("Providers")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let p = p
                .as_object()
                .ok_or_else(|| Error::msg("a JWT provider is not an object"))?;
            let name = p
                .get("Name")
                .and_then(Value::as_str)
                .filter(|n| !n.is_empty())
                .ok_or_else(|| Error::msg("a JWT provider has no Name"))?
                .to_string();
            let mut claims = Vec::new();
            for c in p
                .get("VerifyClaims")
                .and_then(Value::as_array)
                .into_iter()
                .flatten()
            {
                let path: Vec<String> = c
                    .get("Path")
                    .and_then(Value::as_array)
                    .into_iter()
                    .flatten()
                    .map(|s| s.as_str().map(str::to_string))
                    .collect::<Option<_>>()
                    .ok_or_else(|| {
                        Error::msg(format!(
                            "provider {name}: a VerifyClaims Path is not strings"
                        ))
                    })?;
                if path.is_empty() {
                    return Err(Error::msg(format!(
                        "provider {name}: a VerifyClaims has no Path"
                    )));
                }
                let value = c
                    .get("Value")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                claims.push((path, value));
            }
            for k in p.keys() {
                if !matches!(k.as_str(), "Name" | "VerifyClaims") && !p[k].is_null() {
                    return Err(Error::msg(format!(
                        "provider {name}: unsupported field {k}"
                    )));
                }
            }
            providers.push(ProviderRef { name, claims });
        }
        Ok((!providers.is_empty()).then_some(Requirement { providers }))
    }

    /// Whether the request carries a token that one of the providers accepts, with its claims;
    /// `Ok(provider)` or why not (every provider's reason). `now` is in Unix seconds.
    pub fn check(
        &self,
        providers: &Providers,
        req: &dyn l7::Request,
        now: u64,
    ) -> Result<(String, Passing), String> {
        let Some(known) = &providers.0 else {
            return Err("the jwt-provider config entries are not known yet".into());
        };
        let mut why = Vec::new();
        for r in &self.providers {
            let Some(p) = known.get(&r.name) else {
                why.push(format!(
                    "{}: no jwt-provider config entry of that name",
                    r.name
                ));
                continue;
            };
            match p.accepts(req, now).and_then(|(payload, passing)| {
                r.claims_hold(&payload)
                    .map(|()| passing)
                    .map_err(|e| e.to_string())
            }) {
                Ok(passing) => return Ok((r.name.clone(), passing)),
                Err(e) => why.push(format!("{}: {e}", r.name)),
            }
        }
        Err(why.join("; "))
    }
}

impl ProviderRef {
    fn claims_hold(&self, payload: &Map<String, Value>) -> Result<()> {
        for (path, want) in &self.claims {
            let mut at: Option<&Value> = payload.get(&path[0]);
            for key in &path[1..] {
                at = at.and_then(Value::as_object).and_then(|o| o.get(key));
            }
            if at.and_then(Value::as_str) != Some(want.as_str()) {
                return Err(Error::msg(format!(
                    "claim {} is not {want:?}",
                    path.join(".")
                )));
            }
        }
        Ok(())
    }
}

impl Provider {
    /// A `jwt-provider` entry as `/v1/config/jwt-provider` returns it. `read_file` gives the
    /// text of a local JWKS's `Filename` or the last key set fetched from a remote JWKS's `URI`
    /// (the caller's I/O; its error makes the provider unusable).
    /// Refuses only an entry without a name; anything else it cannot honour is kept as the
    /// provider's error.
    pub fn from_consul(
        v: &Value,
        read_file: &dyn Fn(&str) -> Result<String, String>,
    ) -> Result<Provider, String> {
        let obj = v
            .as_object()
            .ok_or("a jwt-provider entry is not an object")?;
        let name = obj
            .get("Name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or("a jwt-provider entry has no Name")?
            .to_string();
        let text = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("").to_string();
        let mut ignored = Vec::new();
        let mut problems = Vec::new();
        let audiences: Vec<String> = obj
            .get("Audiences")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
            .filter_map(|a| a.as_str().map(str::to_string))
            .collect();
        let clock_skew = match obj.get("ClockSkewSeconds").and_then(Value::as_i64) {
            None | Some(0) => DEFAULT_CLOCK_SKEW,
            Some(s) if s > 0 => s as u64,
            Some(s) => {
                problems.push(format!("ClockSkewSeconds {s} is negative"));
                0
            }
        };
        let mut locations = Vec::new();
        for l in obj
            .get("Locations")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            let named = |k: &str| {
                l.get(k).filter(|v| !v.is_null()).map(|o| {
                    o.get("Name")
                        .and_then(Value::as_str)
                        .unwrap_or("")
                        .to_string()
                })
            };
            if let Some(h) = named("Header") {
                let prefix = l["Header"]
                    .get("ValuePrefix")
                    .and_then(Value::as_str)
                    .unwrap_or("")
                    .to_string();
                let forward = l["Header"].get("Forward").and_then(Value::as_bool) == Some(true);
                locations.push(Location::Header {
                    name: h.to_ascii_lowercase(),
                    prefix,
                    forward,
                });
            } else if let Some(q) = named("QueryParam") {
                locations.push(Location::QueryParam(q));
            } else if let Some(c) = named("Cookie") {
                locations.push(Location::Cookie(c));
            } else {
                problems.push(format!(
                    "a Location that is none of Header, QueryParam, Cookie: {l}"
                ));
            }
        }
        if locations.iter().any(|l| match l {
            Location::Header { name, .. } | Location::QueryParam(name) | Location::Cookie(name) => {
                name.is_empty()
            }
        }) {
            problems.push("a Location without a Name".into());
        }
        // A header location's name reaches haproxy.cfg (its removal rule): only a token.
        for l in &locations {
            if let Location::Header { name, .. } = l {
                if let Err(e) = crate::value::HeaderName::parse("Locations.Header.Name", name) {
                    problems.push(e.to_string());
                }
            }
        }
        if locations.is_empty() {
            locations = vec![
                Location::Header {
                    name: "authorization".into(),
                    prefix: "Bearer ".into(),
                    forward: false,
                },
                Location::QueryParam("access_token".into()),
            ];
        }
        let forwarding = match obj.get("Forwarding").filter(|f| !is_empty(f)) {
            None => None,
            Some(f) => {
                let name = f.get("HeaderName").and_then(Value::as_str).unwrap_or("");
                let pad = f.get("PadForwardPayloadHeader").and_then(Value::as_bool) == Some(true);
                match crate::value::HeaderName::parse("Forwarding.HeaderName", name) {
                    Ok(h) => Some((h.as_str().to_ascii_lowercase(), pad)),
                    Err(e) => {
                        problems.push(e.to_string());
                        None
                    }
                }
            }
        };
        if obj.get("CacheConfig").is_some_and(|c| !is_empty(c)) {
            ignored.push("CacheConfig".into());
        }
        let jwks = obj.get("JSONWebKeySet").cloned().unwrap_or(Value::Null);
        let keys = if let Some(local) = jwks.get("Local").filter(|l| !l.is_null()) {
            let inline = local.get("JWKS").and_then(Value::as_str).unwrap_or("");
            let file = local.get("Filename").and_then(Value::as_str).unwrap_or("");
            let doc = if !inline.is_empty() {
                STANDARD
                    .decode(inline.trim())
                    .map_err(|e| format!("JSONWebKeySet.Local.JWKS is not base64: {e}"))
                    .and_then(|b| {
                        String::from_utf8(b)
                            .map_err(|_| "JSONWebKeySet.Local.JWKS is not UTF-8".to_string())
                    })
            } else if !file.is_empty() {
                read_file(file).map_err(|e| format!("JSONWebKeySet.Local.Filename {file}: {e}"))
            } else {
                Err("JSONWebKeySet.Local has neither JWKS nor Filename".into())
            };
            doc.and_then(|d| parse_jwks(&d).map_err(|e| e.to_string()))
        } else if let Some(remote) = jwks.get("Remote").filter(|r| !r.is_null()) {
            // Fetched by the watch side (`consul::jwks`), never by the agent's threads.
            match remote
                .get("URI")
                .and_then(Value::as_str)
                .filter(|u| !u.is_empty())
            {
                Some(uri) => read_file(uri)
                    .map_err(|e| format!("JSONWebKeySet.Remote.URI {uri}: {e}"))
                    .and_then(|d| parse_jwks(&d).map_err(|e| e.to_string())),
                None => Err("JSONWebKeySet.Remote has no URI".into()),
            }
        } else {
            Err("no JSONWebKeySet".into())
        };
        let keys = match (keys, problems.is_empty()) {
            (Ok(k), true) => Ok(k),
            (Ok(_), false) => Err(problems.join("; ")),
            (Err(e), _) => Err(std::iter::once(e)
                .chain(problems)
                .collect::<Vec<_>>()
                .join("; ")),
        };
        Ok(Provider {
            name,
            issuer: text("Issuer"),
            audiences,
            locations,
            clock_skew,
            keys,
            forwarding,
            ignored,
        })
    }

    /// Why this provider verifies nothing, if so.
    pub fn unusable(&self) -> Option<&str> {
        self.keys.as_ref().err().map(String::as_str)
    }

    /// The payload of the first token found where this provider looks, if this provider
    /// verifies it and its registered claims hold at `now`.
    fn accepts(
        &self,
        req: &dyn l7::Request,
        now: u64,
    ) -> Result<(Map<String, Value>, Passing), String> {
        let keys = self
            .keys
            .as_ref()
            .map_err(|e| format!("unusable provider: {e}"))?;
        let (location, token) = self
            .locations
            .iter()
            .find_map(|l| find_token(l, req).map(|t| (l, t)))
            .ok_or("no token")?;
        let t = parse(&token).map_err(|e| e.to_string())?;
        t.verify(keys).map_err(|e| e.to_string())?;
        self.check_claims(&t.payload, now)
            .map_err(|e| e.to_string())?;
        let strip = match location {
            Location::Header {
                name,
                forward: false,
                ..
            } => Some(name.clone()),
            _ => None,
        };
        let payload = self.forwarding.as_ref().map(|(header, pad)| {
            // The token's own base64url payload, without padding unless asked.
            let mut b64 = token
                .split('.')
                .nth(1)
                .unwrap_or_default()
                .trim_end_matches('=')
                .to_string();
            if *pad {
                while b64.len() % 4 != 0 {
                    b64.push('=');
                }
            }
            (header.clone(), b64)
        });
        Ok((t.payload, Passing { strip, payload }))
    }

    /// The headers of requests this provider may change: (`Forwarding.HeaderName`, the header
    /// locations it removes a token from).
    pub fn headers(&self) -> (Option<&str>, Vec<&str>) {
        let strip = self
            .locations
            .iter()
            .filter_map(|l| match l {
                Location::Header {
                    name,
                    forward: false,
                    ..
                } => Some(name.as_str()),
                _ => None,
            })
            .collect();
        (self.forwarding.as_ref().map(|(h, _)| h.as_str()), strip)
    }

    fn check_claims(&self, p: &Map<String, Value>, now: u64) -> Result<()> {
        let time = |k: &str| -> Result<Option<u64>> {
            match p.get(k) {
                None => Ok(None),
                Some(v) => v
                    .as_f64()
                    .filter(|t| *t >= 0.0)
                    .map(|t| Some(t as u64))
                    .ok_or_else(|| Error::msg(format!("{k} is not a time"))),
            }
        };
        if let Some(exp) = time("exp")? {
            if now > exp.saturating_add(self.clock_skew) {
                return Err(Error::msg(format!("expired at {exp}")));
            }
        }
        if let Some(nbf) = time("nbf")? {
            if now.saturating_add(self.clock_skew) < nbf {
                return Err(Error::msg(format!("not valid before {nbf}")));
            }
        }
        // Consul's RBAC compares the payload's `iss` with the provider's `Issuer` exactly.
        if p.get("iss").and_then(Value::as_str) != Some(self.issuer.as_str()) {
            return Err(Error::msg(format!("issuer is not {:?}", self.issuer)));
        }
        if !self.audiences.is_empty() {
            let aud: Vec<&str> = match p.get("aud") {
                Some(Value::String(s)) => vec![s.as_str()],
                Some(Value::Array(a)) => a.iter().filter_map(Value::as_str).collect(),
                _ => Vec::new(),
            };
            if !aud.iter().any(|a| self.audiences.iter().any(|w| w == a)) {
                return Err(Error::msg("audience is not one of the provider's"));
            }
        }
        Ok(())
    }
}

/// The token at one location of the request, if there is one there.
fn find_token(l: &Location, req: &dyn l7::Request) -> Option<String> {
    match l {
        Location::Header { name, prefix, .. } => {
            let v = req.header(name)?;
            let v = v.trim();
            let rest = if prefix.is_empty() {
                v
            } else if v.len() >= prefix.len()
                && v.is_char_boundary(prefix.len())
                && v[..prefix.len()].eq_ignore_ascii_case(prefix)
            {
                &v[prefix.len()..]
            } else {
                return None;
            };
            Some(rest.trim().to_string()).filter(|t| !t.is_empty())
        }
        Location::QueryParam(name) => req
            .query()?
            .split('&')
            .find_map(|kv| kv.strip_prefix(name.as_str())?.strip_prefix('='))
            .filter(|t| !t.is_empty())
            .map(str::to_string),
        Location::Cookie(name) => {
            let cookies = req.header("cookie")?;
            cookies
                .split([';', ','])
                .find_map(|c| c.trim().strip_prefix(name.as_str())?.strip_prefix('='))
                .map(|t| t.trim().trim_matches('"').to_string())
                .filter(|t| !t.is_empty())
        }
    }
}

fn is_empty(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Object(o) => o.values().all(is_empty),
        Value::String(s) => s.is_empty(),
        Value::Bool(b) => !b,
        Value::Number(n) => n.as_f64() == Some(0.0),
        Value::Array(a) => a.is_empty(),
    }
}

mod token;
use token::parse_jwks;
pub use token::{parse, Token};

#[cfg(test)]
mod tests;
