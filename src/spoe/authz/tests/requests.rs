//! Request decisions of L7 intentions, and the fast map that takes some of them off the agent.

use super::*;

#[test]
fn l7_denials_say_why_for_the_listener_mode() {
    let l7 = vec![ixn("client", Action::L7 { permissions: 1 }, 9)];
    let d = decide(&table(l7.clone(), true), Some(CLIENT));
    assert!(!d.allow);
    assert!(
        d.reason
            .starts_with("intention client => L7 (1 HTTP permission(s)) (precedence 9)")
            && d.reason.contains("protocol to be http")
            && d.reason.contains("this listener is tcp"),
        "{}",
        d.reason
    );
    let d = decide(&table(l7, true).for_http_listener(true), Some(CLIENT));
    assert!(d.allow && d.per_request, "{d:?}");
    assert!(d.reason.contains("each request is judged"), "{}", d.reason);
}

fn l7_ixn(source: &str, permissions: serde_json::Value, precedence: i64) -> Intention {
    let p = l7::parse_all(permissions.as_array().unwrap());
    Intention {
        permissions: p,
        ..ixn(source, Action::L7 { permissions: 2 }, precedence)
    }
}

fn get(path: &str) -> l7::SimpleRequest {
    l7::SimpleRequest {
        method: "GET".into(),
        path: path.into(),
        headers: vec![],
        query: None,
    }
}

/// Requests on a connection the L7 intention let in: the permissions in order, then the
/// default policy, never a lower-precedence wildcard; a table that changed since the
/// connection was let in decides by its own rules.
#[test]
fn requests_are_judged_by_the_permissions_then_the_default_policy() {
    let perms = serde_json::json!([
        {"Action": "allow", "HTTP": {"PathPrefix": "/api", "Methods": ["GET"]}},
        {"Action": "deny", "HTTP": {"PathExact": "/admin"}}
    ]);
    let l7_over_wildcard = |default_allow| {
        table(
            vec![
                l7_ixn("client", perms.clone(), 9),
                ixn("*", Action::Allow, 8),
            ],
            default_allow,
        )
        .for_http_listener(true)
    };
    let t = l7_over_wildcard(false);
    let conn = decide(&t, Some(CLIENT));
    assert!(conn.allow && conn.per_request, "{conn:?}");
    let src = conn.source.clone().unwrap();
    let d = t.decide_request(&src, &get("/api/x"));
    assert!(
        d.allow && d.reason.contains("permission #0 allows GET /api/x"),
        "{d:?}"
    );
    let d = t.decide_request(&src, &get("/admin"));
    assert!(
        !d.allow && d.reason.contains("permission #1 denies"),
        "{d:?}"
    );
    // No permission matches: the default policy, not the wildcard allow below.
    let d = t.decide_request(&src, &get("/other"));
    assert!(
        !d.allow && d.reason.contains("no permission matches; default deny"),
        "{d:?}"
    );
    let d = l7_over_wildcard(true).decide_request(&src, &get("/other"));
    assert!(d.allow, "{d:?}");

    // The intention became an L4 deny, or vanished, since the connection was let in.
    let t = table(vec![ixn("client", Action::Deny, 9)], true);
    assert!(!t.decide_request(&src, &get("/api/x")).allow);
    let t = table(vec![], false);
    assert!(!t.decide_request(&src, &get("/api/x")).allow);
    // Permissions that cannot be judged deny; so do no data, and a foreign identity.
    let bad = l7_ixn(
        "client",
        serde_json::json!([{"Action": "allow", "JWT": {"x": 1}}]),
        9,
    );
    let t = table(vec![bad], true).for_http_listener(true);
    let d = t.decide_request(&src, &get("/api/x"));
    assert!(!d.allow && d.reason.contains("cannot be judged"), "{d:?}");
    assert!(
        !AuthzTable::deny_all("x")
            .decide_request(&src, &get("/api/x"))
            .allow
    );
    let foreign = "spiffe://other.consul/ns/default/dc/dc1/svc/client";
    assert!(
        !l7_over_wildcard(true)
            .decide_request(foreign, &get("/api/x"))
            .allow
    );
    assert!(
        !l7_over_wildcard(true)
            .decide_request("nonsense", &get("/api/x"))
            .allow
    );
}

/// HAProxy's `map_reg` lookup, emulated: the value of the first entry whose regex matches
/// `<key>:<method>:<path>`, `agent` when none does (the frontend's default). The map's regexes
/// use only what PCRE and the `regex` crate read alike: literals, one-character classes,
/// `[^:]*`, a group of alternatives and `($|#)`.
fn fast_lookup(map: &[(String, String)], key: &str, method: &str, path: &str) -> String {
    let sample = format!("{key}:{method}:{path}");
    map.iter()
        .find(|(re, _)| regex::Regex::new(re).unwrap().is_match(&sample))
        .map_or("agent".to_string(), |(_, v)| v.clone())
}

/// The fast map never allows a request the agent would refuse, and takes every request it can
/// judge exactly (no header, no path regex) off the agent when the agent would allow it.
#[test]
fn the_fast_map_allows_only_what_the_agent_allows() {
    let perm =
        |action: &str, http: serde_json::Value| serde_json::json!({"Action": action, "HTTP": http});
    // (name, whether HAProxy can match every permission exactly, permissions)
    let lists: Vec<(&str, bool, serde_json::Value)> = vec![
        (
            "issue example",
            true,
            serde_json::json!([
                perm(
                    "allow",
                    serde_json::json!({"PathPrefix": "/api", "Methods": ["GET"]})
                ),
                perm("deny", serde_json::json!({"PathExact": "/admin"}))
            ]),
        ),
        (
            "deny first",
            true,
            serde_json::json!([
                perm("deny", serde_json::json!({"PathPrefix": "/api/private"})),
                perm("allow", serde_json::json!({"PathPrefix": "/api"}))
            ]),
        ),
        (
            "regex in the middle",
            false,
            serde_json::json!([
                perm("allow", serde_json::json!({"PathExact": "/a.b"})),
                perm("deny", serde_json::json!({"PathRegex": "/v[0-9]+/.*"})),
                perm("allow", serde_json::json!({"PathPrefix": "/v"}))
            ]),
        ),
        (
            "header in the middle",
            false,
            serde_json::json!([
                perm(
                    "deny",
                    serde_json::json!({"PathPrefix": "/h", "Header": [{"Name": "x-a", "Present": true}]})
                ),
                perm("allow", serde_json::json!({"PathPrefix": "/"}))
            ]),
        ),
        (
            "metacharacters",
            true,
            serde_json::json!([
                perm("allow", serde_json::json!({"PathExact": "/a+b(c)$d*e.f"})),
                perm(
                    "allow",
                    serde_json::json!({"PathPrefix": "/x:y,z;w=1&k@l~m'n!o%2F"})
                )
            ]),
        ),
        (
            "unplain path and method",
            false,
            serde_json::json!([
                perm("allow", serde_json::json!({"PathPrefix": "/[ok]"})),
                perm(
                    "allow",
                    serde_json::json!({"PathPrefix": "/m", "Methods": ["M.X"]})
                ),
                perm("allow", serde_json::json!({"PathPrefix": "/"}))
            ]),
        ),
        (
            "query and fragment in a permission",
            true,
            serde_json::json!([
                perm("allow", serde_json::json!({"PathExact": "/q?x=1"})),
                perm("allow", serde_json::json!({"PathPrefix": "/f#"}))
            ]),
        ),
        (
            "any request",
            true,
            serde_json::json!([perm("allow", serde_json::json!({}))]),
        ),
        (
            "deny a prefix, allow the rest",
            true,
            serde_json::json!([
                perm("deny", serde_json::json!({"PathPrefix": "/admin"})),
                perm("allow", serde_json::json!({"PathPrefix": "/"}))
            ]),
        ),
    ];
    let requests = [
        ("GET", "/api/x"),
        ("POST", "/api/x"),
        ("GET", "/api"),
        ("GET", "/admin"),
        ("GET", "/admin/"),
        ("GET", "/api/private/k"),
        ("GET", "/a.b"),
        ("GET", "/aXb"),
        ("GET", "/v2/x"),
        ("GET", "/vx"),
        ("GET", "/h/1"),
        ("GET", "/other"),
        ("GET", "/a+b(c)$d*e.f"),
        ("GET", "/a+b(c)$d*e.f#frag"),
        ("GET", "/aab(c)$d*e.f"),
        ("GET", "/a+b(c)$d*e.fg"),
        ("GET", "/x:y,z;w=1&k@l~m'n!o%2F/p"),
        ("GET", "/[ok]"),
        ("M.X", "/m"),
        ("MAX", "/m"),
        ("GET", "/q"),
        ("GET", "/f"),
        ("DELETE", "/"),
        ("get", "/api/x"),
        // Paths not in normal form: HAProxy forwards their normal form, so that is what both
        // judge; or refuses them with 400 (the agent denies them).
        ("GET", "//admin"),
        ("GET", "/./admin"),
        ("GET", "/x/../admin"),
        ("GET", "/%61dmin"),
        ("GET", "/x/%2e%2e/admin"),
        ("GET", "/api/../admin"),
        ("GET", "//api/x"),
        ("GET", "/%61pi/x"),
        ("GET", "/api/./x"),
        ("GET", "/api/x/.."),
        ("GET", "/a%2Eb"),
        ("GET", "/v2/../vx"),
        ("GET", "/q/."),
        ("GET", "/admin%2Fx"),
        ("GET", "/api%5cx"),
        ("GET", "/api\\x"),
        ("GET", "/api/%zz"),
        ("GET", "*"),
        ("GET", ""),
    ];
    // What HAProxy does before it looks the map up (`objects::FrontendSpec::lines`): paths
    // that cannot be judged in one form get 400; one that may not be in normal form skips the
    // map (`hcc_odd_path`), so the map only ever sees a path equal to its normal form.
    let odd = |p: &str| {
        use crate::objects::{ODD_PATH_ENDS, ODD_PATH_PARTS};
        ODD_PATH_PARTS.split(' ').any(|x| p.contains(x))
            || ODD_PATH_ENDS.split(' ').any(|x| p.ends_with(x))
    };
    let client =
        "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client";
    let mut wrong = Vec::new();
    let mut taken = 0;
    for (name, exact, perms) in &lists {
        for default_allow in [false, true] {
            let t = table(vec![l7_ixn("client", perms.clone(), 9)], default_allow)
                .for_http_listener(true);
            let map = t.fast_map();
            let conn = decide(&t, Some(CLIENT));
            let key = conn.fast_key.clone().expect("an L7 connection has a key");
            for (method, path) in requests {
                let agent = t.decide_request(
                    client,
                    &l7::SimpleRequest {
                        method: method.into(),
                        path: l7::url_path(path).into(),
                        headers: vec![],
                        query: None,
                    },
                );
                let normal = l7::normalize_path(l7::url_path(path));
                let Ok(normal) = normal else {
                    // Refused with 400 by HAProxy; the agent must not allow it either.
                    if agent.allow {
                        wrong.push(format!("{name}: {method} {path:?}: refused by HAProxy, allowed by the agent: {}", agent.reason));
                    }
                    continue;
                };
                // The decision never depends on the form the path came in.
                let as_forwarded = t.decide_request(
                    client,
                    &l7::SimpleRequest {
                        method: method.into(),
                        path: normal.clone(),
                        headers: vec![],
                        query: None,
                    },
                );
                if as_forwarded.allow != agent.allow {
                    wrong.push(format!("{name}: {method} {path:?}: the agent allows it {} and its normal form {normal:?} {}", agent.allow, as_forwarded.allow));
                }
                let fast = if odd(path) {
                    "agent".to_string()
                } else {
                    fast_lookup(&map, &key, method, path)
                };
                if fast == "allow" {
                    taken += 1;
                    if !agent.allow {
                        wrong.push(format!("{name} (default allow {default_allow}): {method} {path}: map allows, agent: {}", agent.reason));
                    }
                }
                if *exact && agent.allow && fast != "allow" && !odd(path) {
                    wrong.push(format!("{name} (default allow {default_allow}): {method} {path}: agent allows, map says {fast}"));
                }
            }
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
    assert!(taken > 50, "the map took only {taken} requests");
}

/// The connection's key names the table's content: a new table with other rules gives other
/// keys (old keys miss the map and ask the agent), the same rules the same keys; an L4 rule
/// and the default policy have keys too (a source whose intention changed kind), and what
/// cannot be known yet has no map at all.
#[test]
fn fast_keys_follow_the_table_content() {
    let perms = serde_json::json!([{"Action": "allow", "HTTP": {"PathPrefix": "/api"}}]);
    let t = |p: serde_json::Value, default_allow| {
        table(vec![l7_ixn("client", p, 9)], default_allow).for_http_listener(true)
    };
    assert_eq!(
        t(perms.clone(), false).fast_key(Some(0)),
        t(perms.clone(), false).fast_key(Some(0))
    );
    assert_ne!(
        t(perms.clone(), false).fast_key(Some(0)),
        t(perms.clone(), true).fast_key(Some(0))
    );
    let other = serde_json::json!([{"Action": "allow", "HTTP": {"PathPrefix": "/ap"}}]);
    assert_ne!(
        t(perms.clone(), false).fast_key(Some(0)),
        t(other, false).fast_key(Some(0))
    );
    let stale = t(perms.clone(), false).fast_key(Some(0));
    let new = table(vec![l7_ixn("client", perms, 9)], false).for_http_listener(true);
    let newer = table(vec![ixn("client", Action::Allow, 9)], false).for_http_listener(true);
    assert_eq!(
        fast_lookup(&newer.fast_map(), &stale, "GET", "/api/x"),
        "agent"
    );
    assert_eq!(
        fast_lookup(&new.fast_map(), &stale, "GET", "/api/x"),
        "allow"
    );
    let d = newer.decide_request(
        "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client",
        &get("/x"),
    );
    let key = d.fast_key.expect("an L4 rule's key");
    assert_eq!(fast_lookup(&newer.fast_map(), &key, "POST", "/x"), "allow");
    assert!(AuthzTable::deny_all("x").fast_map().is_empty());
    assert!(
        table(vec![], true).fast_map().is_empty(),
        "a tcp listener has no map"
    );
}
