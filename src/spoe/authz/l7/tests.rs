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
        query: None,
    }
}

/// `Some(true)` allow, `Some(false)` deny, `None` no permission matched (default policy).
fn judge(permissions: &Value, r: &SimpleRequest) -> Option<bool> {
    let p = parse_all(permissions.as_array().unwrap()).unwrap();
    first_match(&p, r, &|_| false).map(|(allow, _)| allow)
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
            json!({"Action": "allow", "JWT": {"Providers": [{"Name": "okta", "Other": 1}]}}),
            "provider okta: unsupported field Other",
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
        let e = Permission::from_consul(&bad).unwrap_err().to_string();
        assert!(e.contains(why), "{bad}: {e}");
    }
    // Zero values, as an older encoder might write them, are no conditions.
    let p = Permission::from_consul(&json!({
        "Action": "allow", "JWT": null,
        "HTTP": {"PathExact": "", "PathPrefix": "/a", "Methods": [], "Header": []}
    }))
    .unwrap();
    assert!(p.matches(&req("GET", "/ab", &[]), &|_| false));
}

#[test]
fn url_path_drops_the_query() {
    assert_eq!(url_path("/a?b=c"), "/a");
    assert_eq!(url_path("/a#f"), "/a");
    assert_eq!(url_path("/a"), "/a");
}

/// Each path and the normal form HAProxy 2.6's `normalize-uri` chain (`objects::NORMALIZE`)
/// gave it on a real HAProxy (and `objects::tests::haproxy_normalizes_paths_as_the_agent_does`
/// keeps checking).
#[test]
fn normal_forms() {
    #[rustfmt::skip]
    let cases = [
        ("/", "/"),
        ("/admin", "/admin"),
        ("//admin", "/admin"),
        ("/./admin", "/admin"),
        ("/x/../admin", "/admin"),
        ("/%61dmin", "/admin"),
        ("/x/%2e%2e/admin", "/admin"),
        ("/x/%2E./admin", "/admin"),
        ("/.%2e/admin", "/admin"),
        ("/../../admin", "/admin"),
        ("/a/b/./../c/./d/..", "/a/c/"),
        ("/./../.", "/"),
        ("//../a", "/a"),
        // A `..` takes the empty segment before it, then slashes merge.
        ("/a//../b", "/a/b"),
        ("/a/..//b", "/b"),
        ("/a/.//..", "/a/"),
        ("/a//b/../c", "/a/c"),
        ("/a/./", "/a/"),
        ("/a/.", "/a/"),
        ("/a/..", "/"),
        ("/..", "/"),
        ("/./", "/"),
        ("//", "/"),
        ("/a//", "/a/"),
        ("/a/b/c/../../..", "/"),
        ("/a/b/c/../../../..", "/"),
        // Dots that are not whole segments stay.
        ("/...", "/..."),
        ("/.../a/..", "/.../"),
        ("/a/.b/..", "/a/"),
        ("/a.", "/a."),
        ("/.a", "/.a"),
        ("/a/%2e.%2E", "/a/..."),
        ("/~user/..%2e/x", "/~user/.../x"),
        ("/%2E", "/"),
        ("/%2e%2E", "/"),
        ("/%2e/%2e%2e/", "/"),
        // Unreserved characters decoded, other escapes upper-cased and kept.
        ("/%41%5a%7a%30", "/AZz0"),
        ("/%7e%7E%2d%5F", "/~~-_"),
        ("/a/%7Eb", "/a/~b"),
        ("/a%3a%3A", "/a%3A%3A"),
        ("/%c3%a9", "/%C3%A9"),
        ("/%7F", "/%7F"),
        ("/a%00b", "/a%00b"),
        ("/a%20b", "/a%20b"),
        // Not decoded twice: `%25` is `%`, reserved.
        ("/%2561dmin", "/%2561dmin"),
        ("/a%252F", "/a%252F"),
        ("/a/'b'", "/a/'b'"),
        ("/a;b=c/d", "/a;b=c/d"),
    ];
    let mut wrong = Vec::new();
    for (path, want) in cases {
        match normalize_path(path) {
            Ok(got) if got == want => {}
            other => wrong.push(format!("{path:?}: {other:?}, want {want:?}")),
        }
    }
    assert!(wrong.is_empty(), "{}", wrong.join("\n"));
}

#[test]
fn paths_that_cannot_be_judged_in_one_form_are_refused() {
    use PathRefusal::*;
    #[rustfmt::skip]
    let cases = [
        ("", NotAbsolute),
        ("*", NotAbsolute),
        ("admin", NotAbsolute),
        ("http://host", NotAbsolute),
        ("http:/admin", NotAbsolute),
        ("/admin%2Fx", EscapedSlash),
        ("/admin%2fx", EscapedSlash),
        ("/a/..%2F..%2Fadmin", EscapedSlash),
        ("/admin%5Cx", EscapedSlash),
        ("/admin%5cx", EscapedSlash),
        ("/a\\..\\admin", Backslash),
        ("/%zz", BadEscape),
        ("/a%", BadEscape),
        ("/a%2", BadEscape),
        ("/a%2g", BadEscape),
        ("/a%g2", BadEscape),
        ("/%u0061", BadEscape),
        ("/%+1", BadEscape),
    ];
    for (path, want) in cases {
        assert_eq!(normalize_path(path), Err(want), "{path:?}");
    }
}

/// The normal form is a fixed point, so judging a path HAProxy already normalized changes
/// nothing; over the table and over paths made of the characters that matter.
#[test]
fn a_normal_form_is_its_own_normal_form() {
    let alphabet = [
        '/', '/', '.', '.', '%', '2', 'e', 'E', 'f', 'F', '6', '1', 'a', '5', 'c',
    ];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut normalized = 0;
    for _ in 0..20_000 {
        let mut p = String::from("/");
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let len = 1 + (x % 12) as usize;
        let mut y = x;
        for _ in 0..len {
            p.push(alphabet[(y % alphabet.len() as u64) as usize]);
            y /= alphabet.len() as u64;
        }
        if let Ok(n) = normalize_path(&p) {
            normalized += 1;
            assert_eq!(normalize_path(&n), Ok(n.clone()), "{p:?} gave {n:?}");
            assert!(n.starts_with('/'), "{p:?} gave {n:?}");
        }
    }
    assert!(normalized > 5_000, "only {normalized} paths were normal");
}

/// A permission's `JWT` is one more condition (Consul's Envoy ANDs it in): without an accepted
/// token the permission does not match and the next one (or the default) decides; HAProxy's
/// fast map never allows what it would match, since only the agent verifies tokens.
#[test]
fn a_permission_with_a_jwt_matches_only_with_an_accepted_token() {
    let perms = json!([
        {"Action": "allow", "HTTP": {"PathPrefix": "/admin"},
         "JWT": {"Providers": [{"Name": "okta"}]}},
        {"Action": "deny", "HTTP": {"PathPrefix": "/admin"}},
    ]);
    let p = parse_all(perms.as_array().unwrap()).unwrap();
    let r = req("GET", "/admin/x", &[]);
    assert_eq!(first_match(&p, &r, &|_| true), Some((true, 0)));
    assert_eq!(first_match(&p, &r, &|_| false), Some((false, 1)));
    let other = req("GET", "/other", &[]);
    assert_eq!(first_match(&p, &other, &|_| panic!("not asked")), None);
    assert_eq!(
        p[0].fast_pattern(),
        FastPattern::Match {
            pattern: "[^:]*:/admin".into(),
            allow: false
        }
    );
}
