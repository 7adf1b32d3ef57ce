//! The route compiler: a discovery chain's routes, splits and failover groups as the rules of
//! an upstream's frontend, and the split thresholds the splits map holds (weights change
//! there, live, never in the rules).

use crate::model::chain::{Match, Route, ValueMatch, SPLIT_SCALE};
use crate::model::{Desired, Mode};
use crate::value::{comment, Word};

/// The rules that follow a chain: the route is decided once (the first whose matchers all
/// match), then the split leg by one random draw against thresholds read from the splits map,
/// then the first backend of the leg's group that has a usable server (`nbsrv`): failover in
/// order, decided per request, so a target that loses its last instance stops getting requests
/// as soon as its slot leaves service. A group whose every backend is empty still goes to its
/// first one, which answers 503.
pub fn routing_lines(frontend: &str, mode: Mode, routes: &[Route], map: &str) -> Vec<String> {
    let mut l = Vec::new();
    // Per request in http mode, per connection in tcp mode (a tcp stream is one connection).
    let rule = match mode {
        Mode::Http => "http-request",
        Mode::Tcp => "tcp-request content",
    };
    for (i, r) in routes.iter().enumerate() {
        l.push(format!("# route {i}: {}", comment(&describe(r))));
    }
    let http = mode == Mode::Http;
    let has_headers = |r: &Route| {
        !r.request_headers.is_empty()
            || !r.response_headers.is_empty()
            || r.splits
                .iter()
                .any(|s| !s.request_headers.is_empty() || !s.response_headers.is_empty())
    };
    let routed = routes.len() > 1
        || routes
            .iter()
            .any(|r| !r.matches.is_empty() || (http && has_headers(r)));
    if routed {
        for (i, r) in routes.iter().enumerate() {
            let mut cond = String::from("!{ var(txn.hcc_route) -m found }");
            for m in &r.matches {
                cond.push(' ');
                cond.push_str(&acl(m));
            }
            l.push(format!("{rule} set-var(txn.hcc_route) int({i}) if {cond}"));
        }
    }
    let route_cond = |i: usize| {
        if routed {
            format!(" {{ var(txn.hcc_route) -m int {i} }}")
        } else {
            String::new()
        }
    };
    if routes.iter().any(|r| r.splits.len() > 1) {
        l.push(format!("{rule} set-var(txn.hcc_split) rand({SPLIT_SCALE})"));
    }
    for (i, r) in routes.iter().enumerate() {
        let last = r.splits.len().saturating_sub(1);
        if last == 0 {
            continue;
        }
        // Each leg's threshold comes from the map, by key, so new weights need no new rules.
        for j in 0..last {
            l.push(format!(
                "{rule} set-var(txn.hcc_t{i}_{j}) str({}),map_str_int({map},{SPLIT_SCALE})",
                split_key(frontend, i, j)
            ));
        }
        // The first leg whose threshold is above the draw; the last takes what is left, so a
        // draw always lands.
        for j in 0..=last {
            let below = if j < last {
                format!(" {{ var(txn.hcc_split),sub(txn.hcc_t{i}_{j}) -m int lt 0 }}")
            } else {
                String::new()
            };
            l.push(format!(
                "{rule} set-var(txn.hcc_leg) int({j}) if{} !{{ var(txn.hcc_leg) -m found }}{below}",
                route_cond(i)
            ));
        }
    }
    if http {
        for (i, r) in routes.iter().enumerate() {
            if let Some((prefix, with)) = &r.prefix_rewrite {
                l.push(format!(
                    "http-request set-path {}%[path,bytes({})]{}",
                    log_format_literal(with.as_str()),
                    prefix.as_str().len(),
                    when(&route_cond(i))
                ));
            }
            header_lines(
                &mut l,
                &r.request_headers,
                &r.response_headers,
                &route_cond(i),
            );
            if r.splits.len() > 1 {
                for (j, s) in r.splits.iter().enumerate() {
                    let cond = format!("{} {{ var(txn.hcc_leg) -m int {j} }}", route_cond(i));
                    header_lines(&mut l, &s.request_headers, &s.response_headers, &cond);
                }
            }
        }
    }
    for (i, r) in routes.iter().enumerate() {
        for (j, s) in r.splits.iter().enumerate() {
            let mut cond = route_cond(i);
            if r.splits.len() > 1 {
                cond.push_str(&format!(" {{ var(txn.hcc_leg) -m int {j} }}"));
            }
            let Some(first) = s.group.first() else {
                continue;
            };
            if s.group.len() > 1 {
                for b in &s.group {
                    l.push(format!("use_backend {b} if{cond} {{ nbsrv({b}) gt 0 }}"));
                }
            }
            l.push(format!("use_backend {first}{}", when(&cond)));
        }
    }
    l
}

/// ` if <cond>` for a condition that starts with a space, nothing for none.
fn when(cond: &str) -> String {
    if cond.is_empty() {
        String::new()
    } else {
        format!(" if{cond}")
    }
}

/// A literal in a log-format argument (`set-path`, `set-header`): `%` starts a sample there.
fn log_format_literal(s: &str) -> String {
    s.replace('%', "%%")
}

/// A route's or leg's header changes, removals first, as Envoy applies them.
fn header_lines(
    l: &mut Vec<String>,
    request: &crate::model::chain::Headers,
    response: &crate::model::chain::Headers,
    cond: &str,
) {
    for (side, h) in [("http-request", request), ("http-response", response)] {
        for name in &h.remove {
            l.push(format!("{side} del-header {name}{}", when(cond)));
        }
        for (verb, list) in [("set-header", &h.set), ("add-header", &h.add)] {
            for (name, value) in list {
                l.push(format!(
                    "{side} {verb} {name} {}{}",
                    log_format_literal(value.as_str()),
                    when(cond)
                ));
            }
        }
    }
}

fn split_key(frontend: &str, route: usize, split: usize) -> String {
    format!("{frontend}/{route}/{split}")
}

/// Every split threshold `d` asks for, as the splits map holds it: key, then the draw
/// (`rand(SPLIT_SCALE)`) below which the split takes a request. Empty without splitters.
pub fn split_thresholds(d: &Desired) -> Vec<(String, u32)> {
    let mut out = Vec::new();
    for u in &d.upstreams {
        for (i, r) in u.routing.iter().flat_map(|r| r.routes.iter()).enumerate() {
            for (j, s) in r
                .splits
                .iter()
                .enumerate()
                .take(r.splits.len().saturating_sub(1))
            {
                out.push((split_key(&u.name, i, j), s.upto));
            }
        }
    }
    out
}

/// A route as `--dry-run` readers want it: what it matches and where it goes, failover
/// included.
fn describe(r: &Route) -> String {
    let matches = if r.matches.is_empty() {
        "everything".to_string()
    } else {
        r.matches.iter().map(acl).collect::<Vec<_>>().join(" ")
    };
    let to: Vec<String> = r
        .splits
        .iter()
        .map(|s| {
            s.group
                .iter()
                .map(|b| b.rsplit_once(".t.").map_or(b.as_str(), |(_, t)| t))
                .collect::<Vec<_>>()
                .join(", failover ")
        })
        .collect();
    // Weights stay out of the rules (and so out of this comment): they live in the splits
    // map, which changes without a reload.
    let to = if to.len() > 1 {
        format!("split by the splits map between {}", to.join("; "))
    } else {
        to.concat()
    };
    let rewrite = match &r.prefix_rewrite {
        Some((p, w)) => format!(", {p} rewritten to {w}"),
        None => String::new(),
    };
    format!("{matches} -> {to}{rewrite}")
}

/// One matcher as an HAProxy condition. Envoy matches whole header values and whole paths
/// for regexes, so regexes are anchored and headers read as full lines (`req.fhdr`).
fn acl(m: &Match) -> String {
    let value = |fetch: &str, v: &ValueMatch| match v {
        ValueMatch::Present => format!("{{ {fetch} -m found }}"),
        ValueMatch::Exact(x) => format!("{{ {fetch} -m str {x} }}"),
        ValueMatch::Prefix(x) => format!("{{ {fetch} -m beg {x} }}"),
        ValueMatch::Suffix(x) => format!("{{ {fetch} -m end {x} }}"),
        ValueMatch::Regex(x) => format!("{{ {fetch} -m reg ^(?:{x})$ }}"),
    };
    match m {
        Match::PathExact(p) => format!("{{ path -m str {p} }}"),
        Match::PathPrefix(p) => format!("{{ path -m beg {p} }}"),
        Match::PathRegex(p) => format!("{{ path -m reg ^(?:{p})$ }}"),
        Match::Methods(ms) => {
            let ms: Vec<&str> = ms.iter().map(Word::as_str).collect();
            format!("{{ method {} }}", ms.join(" "))
        }
        Match::Header {
            name,
            value: v,
            invert,
        } => {
            let fetch = match v {
                ValueMatch::Present => format!("req.hdr({name})"),
                _ => format!("req.fhdr({name})"),
            };
            let c = value(&fetch, v);
            if *invert {
                format!("!{c}")
            } else {
                c
            }
        }
        Match::Query { name, value: v } => value(&format!("url_param({name})"), v),
    }
}
