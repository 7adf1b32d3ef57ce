//! The authorisation decision for one inbound connection: pure, no I/O.
//!
//! Input is the DER client certificate HAProxy saw (`ssl_c_der`); output is allow or deny with
//! a reason. The table holds everything the decision needs (trust domain, CA roots, the
//! intentions whose destination is our service, the default policy) and is swapped whole when
//! Consul sends new data, so a decision never sees half an update.
//!
//! HAProxy already verified the chain during the handshake, but the agent checks the issuer
//! again against the *current* roots (`pki::Roots`, which remembers signers per certificate):
//! a TLS session resumed after a root rotation skips HAProxy's CA check and still hands us the
//! old certificate.

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use crate::error::Error;
pub use crate::pki::RootsError as AuthzError;
use crate::pki::{Role, Roots, SpiffeId};

mod intention;
pub mod jwt;
pub mod l7;

pub use intention::{Action, DefaultPolicy, Intention};

/// The key whose fast-map entry is the table's generation (`AuthzTable::generation`): HAProxy
/// looks it up per request of an http listener and asks the agent about the connection again
/// only when it differs from the one the agent gave the connection. Made of characters no
/// generation key (`<hex>_…`) starts with.
pub const GENERATION_PROBE: &str = "generation";

/// The outcome for one connection.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allow: bool,
    /// Names the rule or check that decided, for logs.
    pub reason: String,
    /// The identity the client claimed: its first URI SAN, when it had one.
    pub source: Option<String>,
    /// An allowed connection whose requests are each judged by HTTP permissions.
    pub per_request: bool,
    /// For such a connection: the key of the rule that now governs its source in this table's
    /// fast map (`AuthzTable::fast_map`), which HAProxy looks its requests up under.
    pub fast_key: Option<String>,
    /// An allowed request's accepted token: what its rules change (`Forwarded`).
    pub forwarded: Forwarded,
}

/// What an accepted token changes on its request, by the numbers the public listener's rules
/// give the headers (`AuthzTable::jwt_headers`): the token's header removed, the payload set.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Forwarded {
    pub strip: Option<usize>,
    pub payload: Option<(usize, String)>,
}

/// The request headers accepted tokens may change, each list sorted: the providers'
/// `Forwarding` headers and the header locations a token is removed from. The public
/// listener's rules (`objects`) number them by position, as `Forwarded` does.
#[derive(Clone, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct JwtHeaders {
    pub forward: Vec<crate::value::HeaderName>,
    pub strip: Vec<crate::value::HeaderName>,
}

impl Decision {
    pub fn deny(reason: impl Into<String>, source: Option<&str>) -> Self {
        Decision {
            allow: false,
            reason: reason.into(),
            source: source.map(str::to_owned),
            per_request: false,
            fast_key: None,
            forwarded: Forwarded::default(),
        }
    }
}

/// Everything one decision needs. Immutable once built; replace it to change policy.
#[derive(Debug, Clone)]
pub struct AuthzTable {
    trust_domain: String,
    roots: Roots,
    /// Kept in evaluation order, so a decision is a linear scan for the first match.
    intentions: Vec<Intention>,
    default_policy: DefaultPolicy,
    /// Whether the public listener is in http mode; only changes what an L7 denial says.
    http_listener: bool,
    /// Set by [`AuthzTable::deny_all`]: nothing is known yet, so nothing is allowed.
    unavailable: Option<String>,
    /// Names this table's content in fast-map keys (`fast_map`): a digest of everything a
    /// request decision reads, so that a connection keyed by an older table misses the map and
    /// asks the agent, which answers with a key of the current one.
    generation: String,
    /// The `jwt-provider` config entries the intentions' `JWT` requirements name.
    jwt_providers: jwt::Providers,
    /// The headers their accepted tokens may change.
    jwt_headers: JwtHeaders,
    /// Cluster peers whose services may connect (the public listener of a service exported to
    /// them): each peer's name and a table of its own trust domain and CA roots. A client
    /// certificate that one of them certifies is that peer's identity and nothing else.
    peers: Vec<(String, AuthzTable)>,
    /// Tests that drive [`decide`](Self::decide) through the agent pin its clock here, so
    /// their verdicts on recorded certificates never depend on the date they run.
    #[cfg(test)]
    judged_at: Option<SystemTime>,
}

impl AuthzTable {
    /// Builds a table from the roots as PEM (Consul's `RootCert` values, any number of
    /// certificates concatenated).
    pub fn new(
        trust_domain: impl Into<String>,
        roots_pem: &str,
        intentions: Vec<Intention>,
        default_policy: DefaultPolicy,
    ) -> Result<Self, AuthzError> {
        let roots = Roots::from_pem(roots_pem)?;
        Ok(Self::with_roots(
            trust_domain,
            roots,
            intentions,
            default_policy,
        ))
    }

    /// Builds a table from DER roots.
    pub fn from_der_roots(
        trust_domain: impl Into<String>,
        roots_der: Vec<Vec<u8>>,
        intentions: Vec<Intention>,
        default_policy: DefaultPolicy,
    ) -> Result<Self, AuthzError> {
        let roots = Roots::from_der(roots_der)?;
        Ok(Self::with_roots(
            trust_domain,
            roots,
            intentions,
            default_policy,
        ))
    }

    fn with_roots(
        trust_domain: impl Into<String>,
        roots: Roots,
        mut intentions: Vec<Intention>,
        default_policy: DefaultPolicy,
    ) -> Self {
        // Evaluation order: highest precedence; then an exact source before `*`; then deny
        // before allow, so a tie can only ever err on the closed side. Consul derives
        // precedence from how exact source and destination are, so real ties only arise between
        // sources that cannot both match one client (a peer's `web` and ours); sorting here
        // keeps the table correct whatever order the caller had.
        intentions.sort_by_key(|i| {
            (
                std::cmp::Reverse(i.precedence),
                i.source == "*",
                i.action == Action::Allow,
            )
        });
        let mut table = AuthzTable {
            trust_domain: trust_domain.into(),
            roots,
            intentions,
            default_policy,
            http_listener: false,
            unavailable: None,
            generation: String::new(),
            jwt_providers: jwt::Providers::unknown(),
            jwt_headers: JwtHeaders::default(),
            peers: Vec::new(),
            #[cfg(test)]
            judged_at: None,
        };
        table.generation = table.digest();
        table
    }

    /// A table that denies everything, for before the first complete data from Consul (or
    /// when it can no longer be trusted). `reason` ends up in each decision's reason.
    pub fn deny_all(reason: impl Into<String>) -> Self {
        AuthzTable {
            trust_domain: String::new(),
            roots: Roots::none(),
            intentions: Vec::new(),
            default_policy: DefaultPolicy::Deny,
            http_listener: false,
            unavailable: Some(reason.into()),
            generation: String::new(),
            jwt_providers: jwt::Providers::unknown(),
            jwt_headers: JwtHeaders::default(),
            peers: Vec::new(),
            #[cfg(test)]
            judged_at: None,
        }
    }

    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// DER of each CA root, in the order given.
    pub fn roots(&self) -> impl Iterator<Item = &[u8]> {
        self.roots.ders()
    }

    /// The intentions in the order they are evaluated.
    pub fn intentions(&self) -> &[Intention] {
        &self.intentions
    }

    pub fn default_policy(&self) -> &DefaultPolicy {
        &self.default_policy
    }

    pub fn http_listener(&self) -> bool {
        self.http_listener
    }

    /// This table with the `jwt-provider` entries its intentions' `JWT` requirements name.
    pub fn with_jwt_providers(mut self, providers: jwt::Providers) -> AuthzTable {
        // Every provider's, usable yet or not (a remote JWKS fetched later changes no rule);
        // a name that is not a header token was refused with its provider and is left out.
        let mut headers = JwtHeaders::default();
        let name = |h: &str| crate::value::HeaderName::parse("JWT header", h).ok();
        for p in providers.iter() {
            let (forward, strip) = p.headers();
            headers.forward.extend(forward.and_then(name));
            headers.strip.extend(strip.into_iter().filter_map(name));
        }
        for list in [&mut headers.forward, &mut headers.strip] {
            list.sort();
            list.dedup();
        }
        self.jwt_headers = headers;
        self.jwt_providers = providers;
        self.generation = self.digest();
        self
    }

    /// This table with the cluster peers whose clients it accepts (see `peers`); a peer's
    /// table needs only its trust domain and roots.
    pub fn with_peers(mut self, peers: Vec<(String, AuthzTable)>) -> AuthzTable {
        self.peers = peers;
        self.generation = self.digest();
        self
    }

    pub fn jwt_providers(&self) -> &jwt::Providers {
        &self.jwt_providers
    }

    /// The headers accepted tokens of this table may change (see `JwtHeaders`).
    pub fn jwt_headers(&self) -> &JwtHeaders {
        &self.jwt_headers
    }

    fn forwarded(&self, p: jwt::Passing) -> Forwarded {
        let at = |list: &[crate::value::HeaderName], name: &str| {
            list.iter().position(|h| h.as_str() == name)
        };
        Forwarded {
            strip: p.strip.and_then(|h| at(&self.jwt_headers.strip, &h)),
            payload: p
                .payload
                .and_then(|(h, v)| at(&self.jwt_headers.forward, &h).map(|i| (i, v))),
        }
    }

    /// This table for a public listener in http (`true`) or tcp mode.
    pub fn for_http_listener(mut self, http: bool) -> AuthzTable {
        self.http_listener = http;
        self.generation = self.digest();
        self
    }

    /// FNV-1a over a canonical description of what `decide` and `decide_request` read: the
    /// intentions, the policy, the listener's mode and the roots.
    /// Only this process compares two of these, so the hash need not be a standard one.
    fn digest(&self) -> String {
        let mut text = format!(
            "{}|{}|{}",
            self.trust_domain, self.default_policy, self.http_listener
        );
        for i in &self.intentions {
            text.push_str(&format!(
                "|{}/{}/{}/{}/{}/{}",
                i.source, i.source_ns, i.source_partition, i.source_peer, i.action, i.precedence
            ));
            match &i.permissions {
                Ok(perms) => perms.iter().for_each(|p| text.push_str(&format!("/{p}"))),
                Err(e) => text.push_str(&format!("/error {e}")),
            }
            if let Some(j) = &i.jwt {
                text.push_str(&format!("/jwt {j:?}"));
            }
        }
        text.push_str(&self.jwt_providers.describe());
        for (name, p) in &self.peers {
            text.push_str(&format!("|peer {name} {} {}", p.trust_domain, p.generation));
        }
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        // The roots too: a connection's verdict (see `GENERATION_PROBE`) was made under them.
        let roots = self.roots.ders().flat_map(|der| der.iter().copied());
        for b in text.bytes().chain(roots) {
            h ^= u64::from(b);
            h = h.wrapping_mul(0x0100_0000_01b3);
        }
        format!("{h:016x}")
    }

    /// The table's content digest: what a connection's verdict was made under.
    pub fn generation(&self) -> &str {
        &self.generation
    }

    /// The fast-map key of the rule that governs a source: intention `index` of the evaluation
    /// order, or the default policy (`None`).
    pub fn fast_key(&self, index: Option<usize>) -> String {
        match index {
            Some(i) => format!("{}_{i}", self.generation),
            None => format!("{}_d", self.generation),
        }
    }

    /// What HAProxy may decide about a request of an L7 connection without asking the agent:
    /// `(regex, value)` pairs for HAProxy's `map_reg` over `<key>:<method>:<path>`, where
    /// `<key>` is the connection's `fast_key` (set by the agent's answers). HAProxy takes the
    /// first entry that matches, which is the first permission that could match, as the
    /// agent's own order; `allow` lets the request through, anything else (a permission that
    /// denies or names headers, one HAProxy cannot match exactly, a default that denies, or no
    /// entry at all because the key is from an older table) sends it to the agent, which judges
    /// it in full. So every denial is the agent's (logged and counted), and the map only ever
    /// says yes where the agent would. Empty while nothing is known or the listener is tcp.
    pub fn fast_map(&self) -> Vec<(String, String)> {
        const ALLOW: &str = "allow";
        const AGENT: &str = "agent";
        if self.unavailable.is_some() || !self.http_listener {
            return Vec::new();
        }
        let verdict = |allow: bool| if allow { ALLOW } else { AGENT }.to_string();
        // First, the generation: an http listener asks the agent about a connection again only
        // once this differs from the one the connection's verdict was made under.
        let mut map = vec![(format!("^{GENERATION_PROBE}$"), self.generation.clone())];
        for (index, i) in self.intentions.iter().enumerate() {
            let key = self.fast_key(Some(index));
            if i.jwt.is_some() {
                // Only the agent verifies tokens.
                map.push((format!("^{key}:"), verdict(false)));
                continue;
            }
            match (&i.action, &i.permissions) {
                (Action::Allow, _) => map.push((format!("^{key}:"), verdict(true))),
                (Action::Deny, _) | (Action::L7 { .. }, Err(_)) => {
                    map.push((format!("^{key}:"), verdict(false)))
                }
                (Action::L7 { .. }, Ok(perms)) => {
                    for p in perms {
                        match p.fast_pattern() {
                            l7::FastPattern::Match { pattern, allow } => {
                                map.push((format!("^{key}:{pattern}"), verdict(allow)))
                            }
                            l7::FastPattern::Never => {}
                            l7::FastPattern::Unknown => {
                                // Which requests it matches is the agent's to say, so every
                                // request that gets this far asks.
                                map.push((format!("^{key}:"), verdict(false)));
                                break;
                            }
                        }
                    }
                    map.push((format!("^{key}:"), verdict(self.default_policy.allows())));
                }
            }
        }
        map.push((
            format!("^{}:", self.fast_key(None)),
            verdict(self.default_policy.allows()),
        ));
        map
    }

    /// Decides for a client certificate (`None` when HAProxy had none: `ssl_c_der` was NULL).
    pub fn decide(&self, client_cert_der: Option<&[u8]>) -> Decision {
        #[cfg(test)]
        if let Some(t) = self.judged_at {
            return self.decide_at(client_cert_der, t);
        }
        self.decide_at(client_cert_der, crate::clock::now())
    }

    /// This table with its clock stopped at `t` (tests of code that calls `decide`).
    #[cfg(test)]
    pub(crate) fn judged_at(mut self, t: SystemTime) -> AuthzTable {
        self.judged_at = Some(t);
        self
    }

    /// [`decide`](Self::decide) at a given time, so validity checks can be tested.
    pub fn decide_at(&self, client_cert_der: Option<&[u8]>, now: SystemTime) -> Decision {
        if let Some(why) = &self.unavailable {
            return Decision::deny(format!("no authorization data: {why}"), None);
        }
        let Some(der) = client_cert_der else {
            return Decision::deny("no client certificate", None);
        };
        let local = self.roots.certified(der, now, Role::Client, &[], |id| {
            self.check_trust_domain(id)?;
            // Only the default admin partition exists outside Consul Enterprise, and Consul's
            // own authorize refuses a source from another partition than the target's.
            match &id.partition {
                Some(p) if p != "default" => Err(Error::msg(format!(
                    "admin partition {p} is not ours (default)"
                ))),
                _ => Ok(()),
            }
        });
        // Not ours: a peer's client only if that peer's own roots certify it in its own trust
        // domain (a peer's CA vouches for its trust domain, never for ours or another peer's).
        let (uri, id, peer) = match local {
            Ok((uri, id)) => (uri, id, None),
            Err((why, src)) => {
                let by_peer = self.peers.iter().find_map(|(name, p)| {
                    p.roots
                        .certified(der, now, Role::Client, &[], |id| p.check_trust_domain(id))
                        .ok()
                        .map(|(uri, id)| (uri, id, Some(name.as_str())))
                });
                match by_peer {
                    Some(found) => found,
                    None => return Decision::deny(why, src),
                }
            }
        };
        let src = Some(uri);
        let service = &id.service;
        let source = src.map(str::to_owned);
        let Some(index) = self
            .intentions
            .iter()
            .position(|i| i.matches_from(&id, peer))
        else {
            return Decision {
                allow: self.default_policy.allows(),
                reason: format!(
                    "no intention matches {service}; default {}",
                    self.default_policy
                ),
                source,
                per_request: false,
                fast_key: None,
                forwarded: Forwarded::default(),
            };
        };
        let i = &self.intentions[index];
        let rule = format!(
            "intention {} => {} (precedence {})",
            i.source_label(),
            i.action,
            i.precedence
        );
        let (allow, per_request, reason) = match i.action {
            Action::Allow | Action::Deny => (
                i.action == Action::Allow,
                false,
                format!("{rule} for {service}"),
            ),
            Action::L7 { .. } if self.http_listener => (
                true,
                true,
                format!("{rule} for {service}: each request is judged by its HTTP permissions"),
            ),
            Action::L7 { .. } => (
                false,
                false,
                format!(
                    "{rule} for {service} denies the connection: HTTP permissions need the \
                     destination's protocol to be http (service-defaults), and this listener is tcp"
                ),
            ),
        };
        Decision {
            allow,
            reason,
            source,
            per_request,
            fast_key: per_request.then(|| self.fast_key(Some(index))),
            forwarded: Forwarded::default(),
        }
    }

    /// Decides one HTTP request on a connection whose certificate `decide` accepted as
    /// `source_uri` (the SPIFFE ID it returned) with `per_request`. Judged against this table,
    /// which may be newer than the one that let the connection in: the source's first matching
    /// intention now decides, its permissions in order when it is L7, the default policy when
    /// none of them (or no intention) matches.
    pub fn decide_request(&self, source_uri: &str, req: &dyn l7::Request) -> Decision {
        #[cfg(test)]
        if let Some(t) = self.judged_at {
            return self.decide_request_at(source_uri, req, t);
        }
        self.decide_request_at(source_uri, req, crate::clock::now())
    }

    /// [`decide_request`](Self::decide_request) at a given time (a token's expiry).
    pub fn decide_request_at(
        &self,
        source_uri: &str,
        req: &dyn l7::Request,
        now: SystemTime,
    ) -> Decision {
        let src = Some(source_uri);
        let now_secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        if let Some(why) = &self.unavailable {
            return Decision::deny(format!("no authorization data: {why}"), src);
        }
        let id = match SpiffeId::parse(source_uri) {
            Ok(id) => id,
            Err(e) => return Decision::deny(format!("request source: {e}"), src),
        };
        if let Err(why) = self.check_trust_domain(&id) {
            return Decision::deny(why.to_string(), src);
        }
        // Judged in the form the app is given (the public listener forwards the path
        // normalized), whatever form HAProxy sent: a path it could not be judged in is denied,
        // as the listener refuses it with 400 before asking.
        let sent = req.path();
        let normalized = match l7::Normalized::new(req) {
            Ok(n) => n,
            Err(why) => {
                return Decision::deny(format!("{} {sent}: {why}", req.method()), src);
            }
        };
        let req: &dyn l7::Request = &normalized;
        let what = if req.path() == sent {
            format!("{} {sent}", req.method())
        } else {
            format!("{} {sent} (as {})", req.method(), req.path())
        };
        let service = &id.service;
        let default = |why: String, key: String| Decision {
            allow: self.default_policy.allows(),
            reason: format!("{why}; default {} for {what}", self.default_policy),
            source: src.map(str::to_owned),
            per_request: true,
            fast_key: Some(key),
            forwarded: Forwarded::default(),
        };
        let Some(index) = self.intentions.iter().position(|i| i.matches(&id)) else {
            return default(
                format!("no intention matches {service}"),
                self.fast_key(None),
            );
        };
        let i = &self.intentions[index];
        let key = self.fast_key(Some(index));
        let rule = format!(
            "intention {} => {} (precedence {})",
            i.source_label(),
            i.action,
            i.precedence
        );
        // The entry's own requirement: its accepted token is what reaches the app changed
        // (a permission's requirement is only one more condition of that permission).
        let mut passing = jwt::Passing::default();
        if let (Action::L7 { .. }, Some(needed)) = (&i.action, &i.jwt) {
            match needed.check(&self.jwt_providers, req, now_secs) {
                Ok((_, p)) => passing = p,
                Err(why) => {
                    return Decision {
                        allow: false,
                        reason: format!("{rule} requires {needed}, so {what} is denied: {why}"),
                        source: src.map(str::to_owned),
                        per_request: true,
                        fast_key: Some(key),
                        forwarded: Forwarded::default(),
                    }
                }
            }
        }
        let token = |r: &jwt::Requirement| r.check(&self.jwt_providers, req, now_secs).is_ok();
        let (allow, reason) = match (&i.action, &i.permissions) {
            (Action::Allow | Action::Deny, _) => {
                (i.action == Action::Allow, format!("{rule} for {what}"))
            }
            // An allow whose entry requires a JWT, and the token was accepted above.
            (Action::L7 { .. }, Ok(perms)) if perms.is_empty() && i.jwt.is_some() => (
                true,
                format!(
                    "{rule} with {} for {what}",
                    i.jwt.as_ref().map_or(String::new(), |j| j.to_string())
                ),
            ),
            (Action::L7 { .. }, Err(e)) => (
                false,
                format!("{rule}: its permissions cannot be judged ({e}), so {what} is denied"),
            ),
            (Action::L7 { .. }, Ok(perms)) => match l7::first_match(perms, req, &token) {
                Some((allow, n)) => (
                    allow,
                    format!(
                        "{rule}: permission #{n} {} {what}",
                        if allow { "allows" } else { "denies" }
                    ),
                ),
                None => return default(format!("{rule}: no permission matches"), key),
            },
        };
        Decision {
            allow,
            reason,
            source: src.map(str::to_owned),
            per_request: true,
            fast_key: Some(key),
            forwarded: if allow {
                self.forwarded(passing)
            } else {
                Forwarded::default()
            },
        }
    }

    /// Trust domains are DNS names, hence case-insensitive (Consul compares them so too).
    fn check_trust_domain(&self, id: &SpiffeId) -> crate::error::Result<()> {
        if id.trust_domain.eq_ignore_ascii_case(&self.trust_domain) {
            return Ok(());
        }
        Err(Error::msg(format!(
            "trust domain {} is not ours ({})",
            id.trust_domain, self.trust_domain
        )))
    }
}

#[cfg(test)]
mod tests;
