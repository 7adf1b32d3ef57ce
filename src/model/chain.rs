//! Traffic management: an upstream's compiled discovery chain (router, splitter, resolvers,
//! targets) turned into what HAProxy does with it. Pure, like the rest of `model`.
//!
//! Each target of the chain is one backend of its own (`<upstream backend>.t.<subset.>service.dc`)
//! with its own slot pool, fed by that target's instances. The listener's frontend picks a
//! backend per request (http) or per connection (tcp): the first route whose matchers all
//! match, then the split by a random draw, then the first backend of the resolver's group
//! (target, then its failover targets in order) that has a usable server. The upstream's own
//! `be_up_…` backend stays as the frontend's default backend, so a chain that is just the
//! destination itself gives exactly the configuration the sidecar had before chains.

use serde::Serialize;

use super::{pool, Here, Mode, Slot};
use crate::admission::Identity;
use crate::consul::chain::{
    is_destination_itself, ChainNode, ChainTarget, DiscoveryChain, HeaderModifiers, HttpMatch,
    LoadBalancer, ParamMatch, RouteDestination, TargetKey,
};
use crate::consul::DestinationKey;
use crate::error::{Error, Result};
use crate::names::sanitize;
use crate::snapshot::Snapshot;
use crate::value::{HeaderName, Millis, Name, Refused, Word};

/// A split's draw is `rand(SPLIT_SCALE)`: Consul's weights are percents with two decimals.
pub const SPLIT_SCALE: u32 = 10_000;

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Routing {
    /// The chain's protocol as Consul compiled it.
    pub protocol: String,
    /// One per chain target the routes reach, sorted by backend name.
    pub targets: Vec<TargetBackend>,
    /// In order; the first that matches decides. Without a router, one route matching all.
    pub routes: Vec<Route>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct TargetBackend {
    /// The chain's target id (`v1.web.default.dc1`, `v1.web.default.default.dc1` on 1.16).
    pub id: String,
    pub backend: String,
    /// Whom its servers must prove to be: the target's own service, which for a redirect or
    /// failover is not the upstream's destination (see `crate::admission`).
    pub identity: Identity,
    /// `verifyhost` of its servers, as for a plain upstream (`super::pool`).
    pub verifyhost: Option<String>,
    /// Empty for the whole service.
    pub subset: String,
    pub connect_timeout_ms: Millis,
    /// `balance` and, for hashing, `hash-type consistent`.
    pub balance: String,
    pub hash_consistent: bool,
    /// `timeout server` from the route's `RequestTimeout`.
    pub request_timeout_ms: Option<Millis>,
    pub retries: Option<Retries>,
    pub slots: Vec<Slot>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Retries {
    pub count: u32,
    /// HAProxy's `retry-on` keywords.
    pub on: Vec<String>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    /// All must match; empty matches everything.
    pub matches: Vec<Match>,
    /// The path prefix matched (`PathPrefix` or `PathExact`) and what replaces it.
    pub prefix_rewrite: Option<(Word, Word)>,
    pub splits: Vec<Split>,
    /// The route's header changes, on requests and on their responses.
    pub request_headers: Headers,
    pub response_headers: Headers,
}

/// Header changes, applied in this order: removals, then values set, then values added.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct Headers {
    pub remove: Vec<HeaderName>,
    pub set: Vec<(HeaderName, Word)>,
    pub add: Vec<(HeaderName, Word)>,
}

impl Headers {
    pub fn is_empty(&self) -> bool {
        self.remove.is_empty() && self.set.is_empty() && self.add.is_empty()
    }
}

/// One share of a route: requests whose draw is below `upto` (and not below the previous
/// split's) go to the first backend of `group` that has a usable server.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Split {
    pub upto: u32,
    /// Backend names: the resolver's target, then its failover targets in order.
    pub group: Vec<String>,
    /// The split leg's header changes (Consul 1.10+).
    pub request_headers: Headers,
    pub response_headers: Headers,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum Match {
    PathExact(Word),
    PathPrefix(Word),
    PathRegex(Word),
    Methods(Vec<Word>),
    Header {
        name: HeaderName,
        value: ValueMatch,
        invert: bool,
    },
    Query {
        name: HeaderName,
        value: ValueMatch,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub enum ValueMatch {
    Present,
    Exact(Word),
    Prefix(Word),
    Suffix(Word),
    Regex(Word),
}

/// What the listener needs to follow `chain`; `None` when the chain is the destination itself
/// with Consul's defaults (no resolver entry, no failover), which the plain backend serves.
#[allow(clippy::too_many_arguments)]
pub fn routing(
    chain: &DiscoveryChain,
    dest: &DestinationKey,
    backend: &str,
    mode: Mode,
    connect_timeout_override: Option<Millis>,
    here: &Here<'_>,
    snapshot: &Snapshot,
    previous: Option<&Routing>,
    warnings: &mut Vec<String>,
) -> Result<Option<Routing>> {
    let start = node(chain, &chain.start_node)?;
    if let Some(r) = &start.resolver {
        let plain = r.default
            && r.failover.as_ref().is_none_or(|f| f.targets.is_empty())
            && start.load_balancer.is_none()
            && chain
                .targets
                .get(&r.target)
                .is_some_and(|t| is_destination_itself(chain, dest, t));
        if plain {
            return Ok(None);
        }
    }
    let mut b = Builder {
        chain,
        dest,
        backend,
        connect_timeout_override,
        here,
        snapshot,
        previous,
        warnings,
        targets: Vec::new(),
    };
    let mut routes = Vec::new();
    match start.kind.as_str() {
        "router" => {
            for (i, r) in start.routes.iter().enumerate() {
                let m = r
                    .definition
                    .r#match
                    .as_ref()
                    .and_then(|m| m.http.clone())
                    .unwrap_or_default();
                let matches = match matches(&m) {
                    Ok(m) => m,
                    Err(e) => {
                        b.warnings.push(format!(
                            "upstream {dest}: route {} of the service-router is skipped: {e}",
                            i + 1
                        ));
                        continue;
                    }
                };
                if mode == Mode::Tcp && !matches.is_empty() {
                    b.warnings.push(format!(
                        "upstream {dest}: route {} of the service-router matches HTTP, and the listener is tcp; it is skipped",
                        i + 1
                    ));
                    continue;
                }
                let d = r.definition.destination.clone().unwrap_or_default();
                let splits = b.splits(&r.next_node, Some(&d))?;
                let prefix_rewrite = if d.prefix_rewrite.is_empty() {
                    None
                } else {
                    let prefix = if !m.path_prefix.is_empty() {
                        Some(m.path_prefix.clone())
                    } else if !m.path_exact.is_empty() {
                        Some(m.path_exact.clone())
                    } else {
                        None
                    };
                    let rewrite = Word::path("PrefixRewrite", &d.prefix_rewrite);
                    match (prefix, rewrite) {
                        (Some(_), Err(e)) => {
                            b.warnings
                                .push(format!("upstream {dest}: route {}: {e}; ignored", i + 1));
                            None
                        }
                        // The prefix matched is already a checked matcher of this route.
                        (Some(p), Ok(w)) => match Word::path("PathPrefix", &p) {
                            Ok(p) => Some((p, w)),
                            Err(_) => None,
                        },
                        (None, _) => {
                            b.warnings.push(format!(
                                "upstream {dest}: route {} has PrefixRewrite without a path prefix or exact path to replace; ignored",
                                i + 1
                            ));
                            None
                        }
                    }
                };
                let what = format!("upstream {dest}: route {}", i + 1);
                routes.push(Route {
                    matches,
                    prefix_rewrite,
                    splits,
                    request_headers: headers(&d.headers.request_headers, &what, b.warnings),
                    response_headers: headers(&d.headers.response_headers, &what, b.warnings),
                });
            }
        }
        _ => {
            let splits = b.splits(&chain.start_node, None)?;
            routes.push(Route {
                matches: Vec::new(),
                prefix_rewrite: None,
                splits,
                request_headers: Headers::default(),
                response_headers: Headers::default(),
            });
        }
    }
    let mut targets = b.targets;
    targets.sort_by(|a, b| a.backend.cmp(&b.backend));
    Ok(Some(Routing {
        protocol: chain.protocol.clone(),
        targets,
        routes,
    }))
}

fn node<'a>(chain: &'a DiscoveryChain, name: &str) -> Result<&'a ChainNode> {
    chain.nodes.get(name).ok_or_else(|| {
        Error::msg(format!(
            "the discovery chain of {:?} refers to node {name:?}, which it does not define",
            chain.service_name
        ))
    })
}

struct Builder<'a> {
    chain: &'a DiscoveryChain,
    dest: &'a DestinationKey,
    backend: &'a str,
    connect_timeout_override: Option<Millis>,
    here: &'a Here<'a>,
    snapshot: &'a Snapshot,
    previous: Option<&'a Routing>,
    warnings: &'a mut Vec<String>,
    targets: Vec<TargetBackend>,
}

impl Builder<'_> {
    /// The splits a node leads to: one for a resolver, one per share for a splitter.
    fn splits(&mut self, name: &str, route: Option<&RouteDestination>) -> Result<Vec<Split>> {
        let n = node(self.chain, name)?;
        match n.kind.as_str() {
            "resolver" => Ok(vec![Split {
                upto: SPLIT_SCALE,
                group: self.group(n, route)?,
                request_headers: Headers::default(),
                response_headers: Headers::default(),
            }]),
            "splitter" => {
                let mut out = Vec::new();
                let mut sum = 0.0;
                for s in &n.splits {
                    if s.weight <= 0.0 {
                        continue;
                    }
                    sum += s.weight;
                    let upto = ((sum * 100.0).round() as u32).min(SPLIT_SCALE);
                    let inner = node(self.chain, &s.next_node)?;
                    if inner.kind != "resolver" {
                        return Err(Error::msg(format!(
                            "splitter {:?} leads to {:?}, not a resolver",
                            n.name, s.next_node
                        )));
                    }
                    let def = s.definition.clone().unwrap_or_default();
                    let what = format!("upstream {}: split to {}", self.dest, s.next_node);
                    out.push(Split {
                        upto,
                        group: self.group(inner, route)?,
                        request_headers: headers(&def.request_headers, &what, self.warnings),
                        response_headers: headers(&def.response_headers, &what, self.warnings),
                    });
                }
                // Float sums of two-decimal percents may miss 100 by a rounding step.
                if let Some(last) = out.last_mut() {
                    last.upto = SPLIT_SCALE;
                }
                Ok(out)
            }
            other => Err(Error::msg(format!(
                "node {name:?} of the discovery chain is a {other:?} where a resolver or splitter belongs"
            ))),
        }
    }

    /// The backends of a resolver node: its target, then its failover targets in order.
    fn group(&mut self, n: &ChainNode, route: Option<&RouteDestination>) -> Result<Vec<String>> {
        let r = n
            .resolver
            .as_ref()
            .ok_or_else(|| Error::msg(format!("resolver node {:?} has no Resolver", n.name)))?;
        let timeout = match self.connect_timeout_override {
            Some(t) => t,
            None => match duration_ms(&r.connect_timeout).filter(|ms| *ms > 0) {
                None => super::DEFAULT_CONNECT_TIMEOUT,
                Some(ms) => match Millis::new("ConnectTimeout", ms) {
                    Ok(t) => t,
                    Err(e) => {
                        self.warnings.push(format!(
                            "upstream {}: resolver {:?}: {e}; Consul's default applies",
                            self.dest, n.name
                        ));
                        super::DEFAULT_CONNECT_TIMEOUT
                    }
                },
            },
        };
        let mut ids = vec![r.target.clone()];
        ids.extend(r.failover.iter().flat_map(|f| f.targets.iter().cloned()));
        let mut group = Vec::new();
        for id in ids {
            let t = self.chain.targets.get(&id).ok_or_else(|| {
                Error::msg(format!(
                    "the discovery chain of {:?} names target {id:?}, which it does not define",
                    self.chain.service_name
                ))
            })?;
            group.push(self.target(t, timeout, n.load_balancer.as_ref(), route)?);
        }
        Ok(group)
    }

    /// The backend of one target, made on first use; later uses may add route settings.
    fn target(
        &mut self,
        t: &ChainTarget,
        connect_timeout_ms: Millis,
        lb: Option<&LoadBalancer>,
        route: Option<&RouteDestination>,
    ) -> Result<String> {
        // Every name of the target reaches a backend name, a comment and the identity its
        // servers must prove: one that is not a Consul name refuses the whole chain (the
        // routing it had keeps serving), since a route without its target means nothing.
        let refused =
            |e: Refused| Error::msg(format!("target {:?}: {e}", t.id.escape_debug().to_string()));
        Name::parse("Target.ID", &t.id).map_err(refused)?;
        Name::parse("Target.Service", &t.service).map_err(refused)?;
        for (field, v) in [
            ("Target.ServiceSubset", &t.service_subset),
            ("Target.Datacenter", &t.datacenter),
            ("Target.Namespace", &t.tenancy.namespace),
            ("Target.Partition", &t.tenancy.partition),
        ] {
            if !v.is_empty() {
                Name::parse(field, v).map_err(refused)?;
            }
        }
        let short = if t.service_subset.is_empty() {
            format!("{}.{}", t.service, t.datacenter)
        } else {
            format!("{}.{}.{}", t.service_subset, t.service, t.datacenter)
        };
        let backend = sanitize(&format!("{}.t.{short}", self.backend));
        // 0 is Consul's "unset"; HAProxy would read it as no timeout at all. One above
        // HAProxy's largest is dropped with a warning (the route keeps serving without it).
        let timeout = match route
            .and_then(|d| duration_ms(&d.request_timeout))
            .filter(|ms| *ms > 0)
        {
            None => None,
            Some(ms) => match Millis::new("RequestTimeout", ms) {
                Ok(t) => Some(t),
                Err(e) => {
                    self.warnings.push(format!(
                        "upstream {}: route to target {}: {e}; the route applies without it",
                        self.dest, t.id
                    ));
                    None
                }
            },
        };
        let retries = route.and_then(|d| retries(d, self.warnings));
        if let Some(existing) = self.targets.iter_mut().find(|x| x.backend == backend) {
            // Timeouts and retries are the backend's, so two routes to one target share them.
            match (existing.request_timeout_ms, timeout) {
                (None, Some(ms)) => existing.request_timeout_ms = Some(ms),
                (Some(a), Some(b)) if a != b => self.warnings.push(format!(
                    "upstream {}: routes to target {} ask for different RequestTimeouts; the first route's applies ({a} ms)",
                    self.dest, t.id
                )),
                _ => {}
            }
            match (&existing.retries, &retries) {
                (None, Some(_)) => existing.retries = retries,
                (Some(a), Some(b)) if a != b => self.warnings.push(format!(
                    "upstream {}: routes to target {} ask for different retries; the first route's apply",
                    self.dest, t.id
                )),
                _ => {}
            }
            return Ok(backend);
        }
        let (balance, hash_consistent) = match lb {
            Some(lb) => lb_policy(lb, self.here.balance, self.dest, self.warnings),
            None => (self.here.balance.to_string(), false),
        };
        let key = TargetKey::of(t);
        let entries = if is_destination_itself(self.chain, self.dest, t) {
            self.snapshot.endpoints.get(self.dest)
        } else {
            self.snapshot.targets.get(&key)
        }
        .map_or(&[][..], |v| v.as_slice());
        let previous = self
            .previous
            .and_then(|p| p.targets.iter().find(|x| x.backend == backend));
        let identity = Identity {
            service: t.service.clone(),
            namespace: or_default(&t.tenancy.namespace),
            partition: or_default(&t.tenancy.partition),
            datacenter: if t.datacenter.is_empty() {
                self.here.datacenter.clone()
            } else {
                t.datacenter.clone()
            },
        };
        let (slots, verifyhost) = pool(
            entries,
            &key.to_string(),
            Some(&identity),
            self.here,
            self.snapshot,
            previous.map_or(&[][..], |x| x.slots.as_slice()),
            previous.and_then(|x| x.verifyhost.as_ref()),
            self.warnings,
        );
        self.targets.push(TargetBackend {
            id: t.id.clone(),
            backend: backend.clone(),
            identity,
            verifyhost,
            subset: t.service_subset.clone(),
            connect_timeout_ms,
            balance,
            hash_consistent,
            request_timeout_ms: timeout,
            retries,
            slots,
        });
        Ok(backend)
    }
}

/// Header changes HAProxy's configuration can carry; the others are named in a warning.
fn headers(h: &HeaderModifiers, what: &str, warnings: &mut Vec<String>) -> Headers {
    let mut out = Headers::default();
    let mut refuse = |e: Refused| warnings.push(format!("{what}: header change skipped: {e}"));
    for name in &h.remove {
        match HeaderName::parse("RequestHeaders.Remove", name) {
            Ok(n) => out.remove.push(n),
            Err(e) => refuse(e),
        }
    }
    for (list, from) in [(&mut out.set, &h.set), (&mut out.add, &h.add)] {
        for (name, value) in from {
            match (
                HeaderName::parse("header name", name),
                Word::parse("header value", value),
            ) {
                (Ok(n), Ok(v)) => list.push((n, v)),
                (Err(e), _) | (_, Err(e)) => refuse(e),
            }
        }
    }
    out
}

fn or_default(s: &str) -> String {
    if s.is_empty() {
        "default".into()
    } else {
        s.to_string()
    }
}

/// HAProxy's equivalent of a resolver's load balancer; what has none is named in a warning
/// and the sidecar's `-balance` applies.
fn lb_policy(
    lb: &LoadBalancer,
    fallback: &str,
    dest: &DestinationKey,
    warnings: &mut Vec<String>,
) -> (String, bool) {
    match lb.policy.as_str() {
        "" => (fallback.to_string(), false),
        "round_robin" => ("roundrobin".into(), false),
        "least_request" => ("leastconn".into(), false),
        "random" => ("random".into(), false),
        "ring_hash" | "maglev" => {
            let first = lb.hash_policies.first();
            if lb.hash_policies.len() > 1 {
                warnings.push(format!(
                    "upstream {dest}: load balancer {} has {} hash policies; HAProxy hashes on one, the first",
                    lb.policy,
                    lb.hash_policies.len()
                ));
            }
            let on = match first {
                Some(h) if h.source_ip => Some("source".to_string()),
                Some(h) if h.field == "header" => {
                    HeaderName::parse("HashPolicies.FieldValue", &h.field_value)
                        .ok()
                        .map(|n| format!("hdr({n})"))
                }
                Some(h) if h.field == "query_parameter" => {
                    HeaderName::parse("HashPolicies.FieldValue", &h.field_value)
                        .ok()
                        .map(|n| format!("url_param {n}"))
                }
                _ => None,
            };
            match on {
                Some(on) => (on, true),
                None => {
                    warnings.push(format!(
                        "upstream {dest}: load balancer {} hashes on something HAProxy cannot hash on ({:?}); using {fallback}",
                        lb.policy, first
                    ));
                    (fallback.to_string(), false)
                }
            }
        }
        other => {
            warnings.push(format!(
                "upstream {dest}: load balancer policy {other:?} has no HAProxy equivalent; using {fallback}"
            ));
            (fallback.to_string(), false)
        }
    }
}

/// HAProxy's retry-on knows these statuses only.
const RETRYABLE_STATUSES: [u32; 10] = [401, 403, 404, 408, 425, 500, 501, 502, 503, 504];

fn retries(d: &RouteDestination, warnings: &mut Vec<String>) -> Option<Retries> {
    if d.num_retries == 0
        && !d.retry_on_connect_failure
        && d.retry_on_status_codes.is_empty()
        && d.retry_on.is_empty()
    {
        return None;
    }
    let mut on = Vec::new();
    if d.retry_on_connect_failure {
        on.push("conn-failure".to_string());
    }
    for condition in &d.retry_on {
        let keywords: &[&str] = match condition.as_str() {
            "connect-failure" => &["conn-failure"],
            // Envoy's reset: the connection failed, was reset or timed out before the
            // response began.
            "reset" => &["conn-failure", "empty-response", "response-timeout"],
            "gateway-error" => &["502", "503", "504"],
            // gRPC statuses travel in trailers, which HAProxy's retry-on cannot read; the
            // others have no HAProxy condition either.
            other => {
                warnings.push(format!(
                    "RetryOn {:?} has no HAProxy retry condition (gRPC statuses arrive in trailers HAProxy cannot retry on); ignored",
                    crate::value::comment(other)
                ));
                &[]
            }
        };
        for k in keywords {
            if !on.iter().any(|o| o == k) {
                on.push(k.to_string());
            }
        }
    }
    for s in &d.retry_on_status_codes {
        if on.contains(&s.to_string()) {
            continue;
        }
        if RETRYABLE_STATUSES.contains(s) {
            on.push(s.to_string());
        } else {
            warnings.push(format!(
                "RetryOnStatusCodes {s} is not a status HAProxy can retry on; ignored"
            ));
        }
    }
    if on.is_empty() {
        on.push("conn-failure".to_string());
    }
    Some(Retries {
        // Envoy's default when a retry policy names no count.
        count: if d.num_retries == 0 { 1 } else { d.num_retries },
        on,
    })
}

fn matches(m: &HttpMatch) -> std::result::Result<Vec<Match>, Refused> {
    let mut out = Vec::new();
    if !m.path_exact.is_empty() {
        out.push(Match::PathExact(Word::path("PathExact", &m.path_exact)?));
    }
    if !m.path_prefix.is_empty() && m.path_prefix != "/" {
        out.push(Match::PathPrefix(Word::path("PathPrefix", &m.path_prefix)?));
    }
    if !m.path_regex.is_empty() {
        out.push(Match::PathRegex(Word::regex("PathRegex", &m.path_regex)?));
    }
    if !m.methods.is_empty() {
        let mut ms = Vec::new();
        for x in &m.methods {
            ms.push(Word::parse("Methods", x)?);
        }
        out.push(Match::Methods(ms));
    }
    let value = |p: &ParamMatch| -> std::result::Result<ValueMatch, Refused> {
        Ok(if !p.exact.is_empty() {
            ValueMatch::Exact(Word::parse("Exact", &p.exact)?)
        } else if !p.prefix.is_empty() {
            ValueMatch::Prefix(Word::parse("Prefix", &p.prefix)?)
        } else if !p.suffix.is_empty() {
            ValueMatch::Suffix(Word::parse("Suffix", &p.suffix)?)
        } else if !p.regex.is_empty() {
            ValueMatch::Regex(Word::regex("Regex", &p.regex)?)
        } else {
            ValueMatch::Present
        })
    };
    for h in &m.header {
        out.push(Match::Header {
            name: HeaderName::parse("Header.Name", &h.name)?,
            value: value(h)?,
            invert: h.invert,
        });
    }
    for q in &m.query_param {
        out.push(Match::Query {
            name: HeaderName::parse("QueryParam.Name", &q.name)?,
            value: value(q)?,
        });
    }
    Ok(out)
}

/// A Go duration as Consul prints it, in milliseconds: the one parser, shared with the
/// watchers (`poll_interval`), lives with the other typed values.
pub use crate::value::go_duration_ms as duration_ms;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::consul::chain::parse_chain;
    use crate::consul::DestinationKind;

    fn chain(version: &str, name: &str) -> DiscoveryChain {
        let path = format!(
            "{}/fixtures/consul/{version}/discovery-chain-{name}.json",
            env!("CARGO_MANIFEST_DIR")
        );
        parse_chain(&std::fs::read_to_string(path).unwrap()).unwrap()
    }

    fn build(version: &str, name: &str, mode: Mode) -> (Option<Routing>, Vec<String>) {
        let dest = DestinationKey {
            kind: DestinationKind::Service,
            name: name.into(),
            datacenter: String::new(),
        };
        let mut w = Vec::new();
        let r = routing(
            &chain(version, name),
            &dest,
            "be_up_x",
            mode,
            None,
            &Here {
                datacenter: "dc1".into(),
                trust_domain: "11111111-2222-3333-4444-555555555555.consul",
                identity_check: true,
                balance: "roundrobin",
            },
            &Snapshot::default(),
            None,
            &mut w,
        )
        .unwrap();
        (r, w)
    }

    const VERSIONS: [&str; 2] = ["1.8.7", "1.16.3"];

    #[test]
    fn a_plain_chain_changes_nothing() {
        for v in VERSIONS {
            assert_eq!(build(v, "plain", Mode::Tcp).0, None, "{v}");
        }
    }

    #[test]
    fn a_resolver_gives_its_default_subset_then_its_failover() {
        for v in VERSIONS {
            let r = build(v, "web", Mode::Http).0.unwrap();
            assert_eq!(r.routes.len(), 1);
            assert_eq!(
                r.routes[0].splits[0].group,
                ["be_up_x.t.v2.web.dc1", "be_up_x.t.web-backup.dc1"],
                "{v}"
            );
            let v2 = r.targets.iter().find(|t| t.subset == "v2").unwrap();
            assert_eq!(v2.connect_timeout_ms, 3000);
            assert_eq!(v2.identity.service, "web");
            assert_eq!(v2.identity.datacenter, "dc1");
            assert_eq!(v2.identity.namespace, "default");
            let backup = r.targets.iter().find(|t| t.subset.is_empty()).unwrap();
            assert_eq!(backup.identity.service, "web-backup", "{v}");
            if v == "1.16.3" {
                assert_eq!(v2.balance, "hdr(x-user)");
                assert!(v2.hash_consistent);
            }
        }
    }

    #[test]
    fn a_redirect_goes_to_the_other_service_and_carries_its_identity() {
        for v in VERSIONS {
            let r = build(v, "old", Mode::Http).0.unwrap();
            // web's own resolver adds its failover to the redirected-to subset.
            assert_eq!(
                r.routes[0].splits[0].group,
                ["be_up_x.t.v1.web.dc1", "be_up_x.t.web-backup.dc1"],
                "{v}"
            );
            let first = r.targets.iter().find(|t| t.subset == "v1").unwrap();
            assert_eq!(first.identity.service, "web");
            let r = build(v, "tcpold", Mode::Tcp).0.unwrap();
            assert_eq!(r.targets[0].identity.service, "tcpweb", "{v}");
        }
    }

    #[test]
    fn datacenter_failover_is_in_order() {
        for v in VERSIONS {
            let r = build(v, "dcweb", Mode::Tcp).0.unwrap();
            assert_eq!(
                r.routes[0].splits[0].group,
                [
                    "be_up_x.t.dcweb.dc1",
                    "be_up_x.t.dcweb.dc2",
                    "be_up_x.t.dcweb.dc3"
                ],
                "{v}"
            );
        }
    }

    #[test]
    fn a_split_is_cumulative_over_ten_thousand() {
        for v in VERSIONS {
            let r = build(v, "split", Mode::Http).0.unwrap();
            let s = &r.routes[0].splits;
            assert_eq!(s.len(), 2);
            assert_eq!((s[0].upto, s[1].upto), (9000, SPLIT_SCALE), "{v}");
        }
    }

    #[test]
    fn router_routes_keep_their_order_and_settings() {
        for v in VERSIONS {
            let (r, w) = build(v, "front", Mode::Http);
            let r = r.unwrap();
            assert!(w.is_empty(), "{w:?}");
            assert_eq!(r.routes.len(), 6, "{v}");
            assert_eq!(
                r.routes[0].matches,
                [
                    Match::PathPrefix("/api/".into()),
                    Match::Methods(vec!["GET".into(), "PUT".into()])
                ]
            );
            assert_eq!(
                r.routes[0].prefix_rewrite,
                Some(("/api/".into(), "/".into()))
            );
            let v1 = r.targets.iter().find(|t| t.subset == "v1").unwrap();
            assert_eq!(
                v1.request_timeout_ms,
                Some(crate::value::Millis::constant(2000))
            );
            assert_eq!(
                v1.retries,
                Some(Retries {
                    count: 3,
                    on: vec!["conn-failure".into(), "503".into(), "502".into()]
                })
            );
            assert_eq!(r.routes[1].splits.len(), 2, "the split route");
            assert!(matches!(
                &r.routes[3].matches[1],
                Match::Header {
                    value: ValueMatch::Present,
                    ..
                }
            ));
            assert!(
                matches!(&r.routes[4].matches[0], Match::Query { value: ValueMatch::Exact(x), .. } if x == "yes")
            );
            // Consul's catch-all route to the service itself matches everything.
            assert!(r.routes[5].matches.is_empty());
            assert_eq!(r.routes[5].splits[0].group, ["be_up_x.t.front.dc1"]);
        }
    }

    #[test]
    fn http_routes_on_a_tcp_listener_are_skipped_with_a_warning() {
        let (r, w) = build("1.16.3", "front", Mode::Tcp);
        assert_eq!(r.unwrap().routes.len(), 1);
        assert_eq!(w.len(), 5, "{w:?}");
    }

    #[test]
    fn go_durations() {
        assert_eq!(duration_ms("5s"), Some(5000));
        assert_eq!(duration_ms("1m30s"), Some(90_000));
        assert_eq!(duration_ms("250ms"), Some(250));
        assert_eq!(duration_ms("1.5s"), Some(1500));
        assert_eq!(duration_ms(""), None);
        assert_eq!(duration_ms("5x"), None);
    }

    #[test]
    fn retry_conditions_map_to_haproxys_and_grpc_statuses_are_named() {
        let d = RouteDestination {
            num_retries: 2,
            retry_on: ["reset", "gateway-error", "unavailable", "cancelled"]
                .map(String::from)
                .to_vec(),
            retry_on_status_codes: vec![503, 418],
            ..RouteDestination::default()
        };
        let mut warnings = Vec::new();
        let r = retries(&d, &mut warnings).unwrap();
        assert_eq!(r.count, 2);
        assert_eq!(
            r.on,
            [
                "conn-failure",
                "empty-response",
                "response-timeout",
                "502",
                "503",
                "504"
            ]
        );
        assert_eq!(warnings.len(), 3, "{warnings:?}");
        assert!(warnings[0].contains("\"unavailable\""), "{warnings:?}");
        assert!(warnings[2].contains("418"), "{warnings:?}");
    }
}
