//! What a route or resolver sets on its backend, mapped to what HAProxy can carry: header
//! changes, load balancing, retries and request matchers. What has no HAProxy equivalent is
//! named in a warning.

use super::*;

/// Header changes HAProxy's configuration can carry; the others are named in a warning.
pub(super) fn headers(h: &HeaderModifiers, what: &str, warnings: &mut Vec<String>) -> Headers {
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

pub(super) fn or_default(s: &str) -> String {
    if s.is_empty() {
        "default".into()
    } else {
        s.to_string()
    }
}

/// HAProxy's equivalent of a resolver's load balancer; what has none is named in a warning
/// and the sidecar's `-balance` applies.
pub(super) fn lb_policy(
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
pub(super) const RETRYABLE_STATUSES: [u32; 10] = [401, 403, 404, 408, 425, 500, 501, 502, 503, 504];

pub(super) fn retries(d: &RouteDestination, warnings: &mut Vec<String>) -> Option<Retries> {
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

pub(super) fn matches(m: &HttpMatch) -> std::result::Result<Vec<Match>, Refused> {
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
