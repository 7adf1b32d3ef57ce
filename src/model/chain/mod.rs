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

/// A Go duration as Consul prints it, in milliseconds: the one parser, shared with the
/// watchers (`poll_interval`), lives with the other typed values.
pub use crate::value::go_duration_ms as duration_ms;

mod settings;
use settings::*;

#[cfg(test)]
mod tests;
