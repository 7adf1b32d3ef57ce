//! The matcher over Consul's documented examples, Consul's own Envoy case
//! `case-l7-intentions`, and the edge cases of each matcher kind.

use serde_json::{json, Value};

use super::*;

fn req(method: &str, path: &str, headers: &[(&str, &str)]) -> SimpleRequest {
    SimpleRequest {
        method: method.into(),
        path: url_path(path).into(),
        headers: headers
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_string()))
            .collect(),
    }
}

/// `Some(true)` allow, `Some(false)` deny, `None` no permission matched (default policy).
fn judge(permissions: &Value, r: &SimpleRequest) -> Option<bool> {
    let p = parse_all(permissions.as_array().unwrap()).unwrap();
    first_match(&p, r).map(|(allow, _)| allow)
}

fn allow(http: Value) -> Value {
    json!([{"Action": "allow", "HTTP": http}])
}

#[test]
fn table_of_cases() {
    let api_get = json!([
        {"Action": "allow", "HTTP": {"PathPrefix": "/api", "Methods": ["GET"]}},
        {"Action": "deny", "HTTP": {"PathExact": "/admin"}}
    ]);
    let first_wins = json!([
        {"Action": "deny", "HTTP": {"PathPrefix": "/api/private"}},
        {"Action": "allow", "HTTP": {"PathPrefix": "/api"}}
    ]);
    let hdr = |m: Value| allow(json!({"Header": [m]}));
    #[rustfmt::skip]
    let cases: Vec<(&str, Value, SimpleRequest, Option<bool>)> = vec![
        // Paths.
        ("exact matches itself", allow(json!({"PathExact": "/exact"})), req("GET", "/exact", &[]), Some(true)),
        ("exact is not a prefix", allow(json!({"PathExact": "/exact"})), req("GET", "/exact-nope", &[]), None),
        ("exact and a trailing slash differ", allow(json!({"PathExact": "/exact"})), req("GET", "/exact/", &[]), None),
        ("exact ignores the query string", allow(json!({"PathExact": "/exact"})), req("GET", "/exact?x=1", &[]), Some(true)),
        ("exact is case-sensitive", allow(json!({"PathExact": "/exact"})), req("GET", "/EXACT", &[]), None),
        ("prefix matches itself", allow(json!({"PathPrefix": "/prefix"})), req("GET", "/prefix", &[]), Some(true)),
        ("prefix matches below", allow(json!({"PathPrefix": "/prefix"})), req("GET", "/prefix/a/b", &[]), Some(true)),
        ("prefix is a string prefix, not a segment", allow(json!({"PathPrefix": "/prefix"})), req("GET", "/prefixes", &[]), Some(true)),
        ("prefix anchors at the start", allow(json!({"PathPrefix": "/prefix"})), req("GET", "/nope-prefix", &[]), None),
        ("prefix with a trailing slash needs it", allow(json!({"PathPrefix": "/api/"})), req("GET", "/api", &[]), None),
        ("prefix / matches everything", allow(json!({"PathPrefix": "/"})), req("DELETE", "/anything", &[]), Some(true)),
        ("regex matches", allow(json!({"PathRegex": "/reg[ex]{2}"})), req("GET", "/regex", &[]), Some(true)),
        ("regex is anchored at the end", allow(json!({"PathRegex": "/reg[ex]{2}"})), req("GET", "/regexx", &[]), None),
        ("regex is anchored at the start", allow(json!({"PathRegex": "reg[ex]{2}"})), req("GET", "/regex", &[]), None),
        ("regex does not match a near miss", allow(json!({"PathRegex": "/reg[ex]{2}"})), req("GET", "/reggex", &[]), None),
        ("regex alternation is grouped", allow(json!({"PathRegex": "/a|/b"})), req("GET", "/b", &[]), Some(true)),
        ("regex alternation stays anchored", allow(json!({"PathRegex": "/a|/b"})), req("GET", "/bc", &[]), None),
        ("regex .* spans slashes", allow(json!({"PathRegex": "/v[0-9]+/.*"})), req("GET", "/v2/a/b", &[]), Some(true)),
        // Methods.
        ("a listed method", allow(json!({"PathExact": "/m", "Methods": ["GET", "PUT"]})), req("PUT", "/m", &[]), Some(true)),
        ("an unlisted method", allow(json!({"PathExact": "/m", "Methods": ["GET", "PUT"]})), req("POST", "/m", &[]), None),
        ("HEAD is not GET", allow(json!({"PathExact": "/m", "Methods": ["GET", "PUT"]})), req("HEAD", "/m", &[]), None),
        ("methods are case-sensitive", allow(json!({"Methods": ["GET"]})), req("get", "/", &[]), None),
        ("no methods: any method", allow(json!({"PathExact": "/m"})), req("PATCH", "/m", &[]), Some(true)),
        // Headers.
        ("present header", hdr(json!({"Name": "x-test-debug", "Present": true})), req("GET", "/", &[("x-test-debug", "anything")]), Some(true)),
        ("present header, absent", hdr(json!({"Name": "x-test-debug", "Present": true})), req("GET", "/", &[]), None),
        ("present with an empty value", hdr(json!({"Name": "x-test-debug", "Present": true})), req("GET", "/", &[("x-test-debug", "")]), Some(true)),
        ("header names are case-insensitive", hdr(json!({"Name": "X-Test-Debug", "Exact": "exact"})), req("GET", "/", &[("x-TEST-debug", "exact")]), Some(true)),
        ("exact header value", hdr(json!({"Name": "x-test-debug", "Exact": "exact"})), req("GET", "/", &[("x-test-debug", "exact")]), Some(true)),
        ("exact header value is case-sensitive", hdr(json!({"Name": "x-test-debug", "Exact": "exact"})), req("GET", "/", &[("x-test-debug", "Exact")]), None),
        ("exact header near miss", hdr(json!({"Name": "x-test-debug", "Exact": "exact"})), req("GET", "/", &[("x-test-debug", "exact-nope")]), None),
        ("prefix header", hdr(json!({"Name": "x-test-debug", "Prefix": "prefi"})), req("GET", "/", &[("x-test-debug", "prefix")]), Some(true)),
        ("prefix header miss", hdr(json!({"Name": "x-test-debug", "Prefix": "prefi"})), req("GET", "/", &[("x-test-debug", "nope-prefix")]), None),
        ("suffix header", hdr(json!({"Name": "x-test-debug", "Suffix": "uffix"})), req("GET", "/", &[("x-test-debug", "suffix")]), Some(true)),
        ("suffix header miss", hdr(json!({"Name": "x-test-debug", "Suffix": "uffix"})), req("GET", "/", &[("x-test-debug", "suffix-nope")]), None),
        ("regex header", hdr(json!({"Name": "x-test-debug", "Regex": "reg[ex]{2}"})), req("GET", "/", &[("x-test-debug", "regex")]), Some(true)),
        ("regex header is a full match", hdr(json!({"Name": "x-test-debug", "Regex": "reg[ex]{2}"})), req("GET", "/", &[("x-test-debug", "regexes")]), None),
        ("regex header miss", hdr(json!({"Name": "x-test-debug", "Regex": "reg[ex]{2}"})), req("GET", "/", &[("x-test-debug", "reggex")]), None),
        ("repeated fields are joined with a comma", hdr(json!({"Name": "x-a", "Exact": "1,2"})), req("GET", "/", &[("x-a", "1"), ("X-A", "2")]), Some(true)),
        // Invert.
        ("inverted exact, other value", hdr(json!({"Name": "x-env", "Exact": "prod", "Invert": true})), req("GET", "/", &[("x-env", "dev")]), Some(true)),
        ("inverted exact, same value", hdr(json!({"Name": "x-env", "Exact": "prod", "Invert": true})), req("GET", "/", &[("x-env", "prod")]), None),
        ("inverted exact never matches an absent header", hdr(json!({"Name": "x-env", "Exact": "prod", "Invert": true})), req("GET", "/", &[]), None),
        ("inverted present matches an absent header", hdr(json!({"Name": "x-env", "Present": true, "Invert": true})), req("GET", "/", &[]), Some(true)),
        ("inverted present, header there", hdr(json!({"Name": "x-env", "Present": true, "Invert": true})), req("GET", "/", &[("x-env", "")]), None),
        ("inverted regex", hdr(json!({"Name": "x-v", "Regex": "[0-9]{3}", "Invert": true})), req("GET", "/", &[("x-v", "1234")]), Some(true)),
        // Every condition of one permission must hold.
        ("path and header both needed", allow(json!({"PathExact": "/hdr", "Header": [{"Name": "x-a", "Present": true}]})), req("GET", "/other", &[("x-a", "1")]), None),
        ("two headers both needed", allow(json!({"Header": [{"Name": "x-a", "Present": true}, {"Name": "x-b", "Exact": "2"}]})), req("GET", "/", &[("x-a", "1"), ("x-b", "3")]), None),
        ("two headers both there", allow(json!({"Header": [{"Name": "x-a", "Present": true}, {"Name": "x-b", "Exact": "2"}]})), req("GET", "/", &[("x-a", "1"), ("x-b", "2")]), Some(true)),
        ("an empty HTTP matches every request", allow(json!({})), req("OPTIONS", "/x", &[]), Some(true)),
        // Order and fall-through (the example).
        ("GET /api/x allowed", api_get.clone(), req("GET", "/api/x", &[]), Some(true)),
        ("POST /api/x matches nothing", api_get.clone(), req("POST", "/api/x", &[]), None),
        ("/admin denied", api_get.clone(), req("GET", "/admin", &[]), Some(false)),
        ("/other matches nothing", api_get, req("GET", "/other", &[]), None),
        ("first match wins: deny before allow", first_wins.clone(), req("GET", "/api/private/k", &[]), Some(false)),
        ("first match wins: the allow below", first_wins, req("GET", "/api/public", &[]), Some(true)),
    ];
    assert!(cases.len() >= 30);
    let mut failures = Vec::new();
    for (name, perms, r, want) in &cases {
        let got = judge(perms, r);
        if got != *want {
            failures.push(format!("{name}: want {want:?}, got {got:?}"));
        }
    }
    assert!(failures.is_empty(), "{}", failures.join("\n"));
}

#[test]
fn what_cannot_be_judged_is_refused() {
    for (bad, why) in [
        (
            json!({"Action": "allow", "HTTP": {"PathExact": "/a", "PathPrefix": "/b"}}),
            "more than one",
        ),
        (
            json!({"Action": "allow", "HTTP": {"PathRegex": "(unclosed"}}),
            "regex",
        ),
        (
            json!({"Action": "allow", "JWT": {"Providers": [{"Name": "okta"}]}}),
            "unsupported permission field JWT",
        ),
        (
            json!({"Action": "allow", "HTTP": {"Header": [{"Name": "x"}]}}),
            "no matcher",
        ),
        (
            json!({"Action": "allow", "HTTP": {"Header": [{"Present": true}]}}),
            "no Name",
        ),
        (
            json!({"Action": "allow", "HTTP": {"Header": [{"Name": "x", "Exact": "a", "Prefix": "b"}]}}),
            "more than one matcher",
        ),
        (
            json!({"Action": "maybe", "HTTP": {}}),
            "neither allow nor deny",
        ),
        (
            json!({"Action": "allow", "HTTP": {"PathContains": "/x"}}),
            "unsupported HTTP field",
        ),
    ] {
        let e = Permission::from_consul(&bad).unwrap_err();
        assert!(e.contains(why), "{bad}: {e}");
    }
    // Zero values, as an older encoder might write them, are no conditions.
    let p = Permission::from_consul(&json!({
        "Action": "allow", "JWT": null,
        "HTTP": {"PathExact": "", "PathPrefix": "/a", "Methods": [], "Header": []}
    }))
    .unwrap();
    assert!(p.matches(&req("GET", "/ab", &[])));
}

#[test]
fn url_path_drops_the_query() {
    assert_eq!(url_path("/a?b=c"), "/a");
    assert_eq!(url_path("/a#f"), "/a");
    assert_eq!(url_path("/a"), "/a");
}
