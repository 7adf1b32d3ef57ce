//! HTTP permissions of L7 intentions (Consul 1.9+) and how one request is matched against
//! them. Pure.
//!
//! Semantics are those Consul gives Envoy (`agent/xds/rbac.go`) and documents for the
//! `service-intentions` config entry:
//! - permissions are evaluated in order and the first that matches decides (its `Action`);
//!   a request that matches none is decided by the ACL default policy, never by an intention of
//!   lower precedence (the source's intention already matched: a wildcard source does not
//!   apply);
//! - within one permission every given condition must hold: the path matcher (at most one of
//!   `PathExact`, `PathPrefix`, `PathRegex`), one of the `Methods` if any, and every `Header`;
//! - paths are compared without the query string (Envoy's `url_path`), case-sensitively;
//!   `PathRegex` must match the whole path (RE2 full match);
//! - header names are case-insensitive; several fields of one name are joined with `,`; a
//!   header matcher other than `Present` never matches an absent header, inverted or not, and
//!   `Present` + `Invert` matches exactly when the header is absent (Envoy's `matchHeaders`);
//!   `Regex` must match the whole value.
//!
//! - a permission's `JWT` (Consul 1.16) is one more condition: the permission matches only a
//!   request that also carries a token one of its providers accepts (`jwt::Requirement`), as
//!   Consul's Envoy ANDs the token's claims into the permission.
//!
//! A permission with a field this sidecar does not know cannot be judged;
//! `Permission::from_consul` refuses it and the table denies that source's requests.

use std::fmt;

use regex::Regex;
use serde_json::Value;

use super::jwt;
use crate::error::{Error, Result};

/// One permission of an L7 intention.
#[derive(Clone, Debug)]
pub struct Permission {
    pub allow: bool,
    path: Option<PathMatch>,
    /// Empty: any method.
    methods: Vec<String>,
    headers: Vec<HeaderMatch>,
    /// The token the request must also carry (the permission's `JWT`).
    pub jwt: Option<jwt::Requirement>,
    /// Consul's JSON, compact: what `PartialEq` and log lines use.
    source: String,
}

#[derive(Clone, Debug)]
enum PathMatch {
    Exact(String),
    Prefix(String),
    Regex(Regex),
}

#[derive(Clone, Debug)]
struct HeaderMatch {
    /// Lower case.
    name: String,
    kind: HeaderKind,
    invert: bool,
}

#[derive(Clone, Debug)]
enum HeaderKind {
    Present,
    Exact(String),
    Prefix(String),
    Suffix(String),
    Regex(Regex),
}

impl PartialEq for Permission {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}
impl Eq for Permission {}

impl fmt::Display for Permission {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.source)
    }
}

/// The parts of a request the permissions look at.
pub trait Request {
    fn method(&self) -> &str;
    /// Without the query string.
    fn path(&self) -> &str;
    /// Every field named `lower_name` (already lower case), joined with `,`; `None` if absent.
    fn header(&self, lower_name: &str) -> Option<String>;
    /// The query string (after `?`), where a token may be; `None` when there is none.
    fn query(&self) -> Option<&str> {
        None
    }
}

/// A request held as plain values (tests, fuzzing).
#[derive(Clone, Debug, Default)]
pub struct SimpleRequest {
    pub method: String,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub query: Option<String>,
}

impl Request for SimpleRequest {
    fn method(&self) -> &str {
        &self.method
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn header(&self, lower_name: &str) -> Option<String> {
        join_fields(
            self.headers
                .iter()
                .map(|(n, v)| (n.as_bytes(), v.as_bytes())),
            lower_name,
        )
    }
    fn query(&self) -> Option<&str> {
        self.query.as_deref()
    }
}

/// The fields named `lower_name` (compared case-insensitively) joined with `,`, as Envoy's
/// `getAllOfHeaderAsString` does; bytes that are not UTF-8 are replaced.
pub fn join_fields<'a>(
    fields: impl Iterator<Item = (&'a [u8], &'a [u8])>,
    lower_name: &str,
) -> Option<String> {
    let mut out: Option<String> = None;
    for (n, v) in fields {
        if n.eq_ignore_ascii_case(lower_name.as_bytes()) {
            let v = String::from_utf8_lossy(v);
            match &mut out {
                None => out = Some(v.into_owned()),
                Some(s) => {
                    s.push(',');
                    s.push_str(&v);
                }
            }
        }
    }
    out
}

/// Strips the query string (and a fragment, which a client should not send) from a path.
pub fn url_path(path: &str) -> &str {
    path.find(['?', '#']).map_or(path, |i| &path[..i])
}

/// Why a request's path is refused (HTTP 400 in HAProxy, a denial in the agent) before any
/// permission is looked at.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PathRefusal {
    /// It does not start with `/`: an absolute-form request with no path, `*`, `http:/x`.
    NotAbsolute,
    /// A `%` not followed by two hexadecimal digits.
    BadEscape,
    /// An encoded `/` or `\` (`%2F`, `%5C`, any case): servers disagree on whether it
    /// separates segments, so no single form can be judged. Consul 1.20.1+ rejects it too
    /// (`PathWithEscapedSlashesAction`: REJECT).
    EscapedSlash,
    /// A raw `\`, which some servers (WHATWG URL parsers, Windows ones) read as `/`.
    Backslash,
}

impl fmt::Display for PathRefusal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            PathRefusal::NotAbsolute => "the path does not start with /",
            PathRefusal::BadEscape => "the path has a % not followed by two hex digits",
            PathRefusal::EscapedSlash => "the path has an encoded slash or backslash (%2F, %5C)",
            PathRefusal::Backslash => "the path has a backslash",
        })
    }
}

/// The normal form a path is judged and served in, as the public listener's rules make it
/// (`objects::FrontendSpec::lines`, HAProxy's `normalize-uri`, in this order): percent-encoded
/// unreserved characters decoded and the other encodings' hex digits upper-cased (RFC 3986
/// §6.2.2.1-2), `.` and `..` segments removed (§5.2.4, a `..` above the root dropped, a `..`
/// taking an empty segment as any other), then runs of `/` merged into one, as Envoy does
/// after `normalize_path` with `merge_slashes`. The result is its own normal form. Input is
/// the path without the query string.
pub fn normalize_path(path: &str) -> Result<String, PathRefusal> {
    if !path.starts_with('/') {
        return Err(PathRefusal::NotAbsolute);
    }
    // Percent-encoding: every `%` begins a valid escape (else refused), so after this pass a
    // `%` in the output is always one the input had, and `%2F`/`%5C` cannot be made up.
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'%' => {
                let hex = |j: usize| b.get(j).and_then(|c| (*c as char).to_digit(16));
                let (Some(hi), Some(lo)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(PathRefusal::BadEscape);
                };
                let c = (hi * 16 + lo) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c as char);
                } else if c == b'/' || c == b'\\' {
                    return Err(PathRefusal::EscapedSlash);
                } else {
                    decoded.push('%');
                    decoded.push_str(&format!("{c:02X}"));
                }
                i += 3;
            }
            b'\\' => return Err(PathRefusal::Backslash),
            _ => {
                // Copy the run up to the next byte of interest whole: `path` is UTF-8 and
                // both stops are ASCII, so the run is too.
                let end = b[i..]
                    .iter()
                    .position(|c| matches!(c, b'%' | b'\\'))
                    .map_or(b.len(), |n| i + n);
                decoded.push_str(&path[i..end]);
                i = end;
            }
        }
    }
    // Dot segments: a stack of the segments after the leading `/`. A final `.` or `..` leaves
    // a trailing slash (`/a/b/..` is `/a/`).
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing = false;
    let segments: Vec<&str> = decoded[1..].split('/').collect();
    let last = segments.len() - 1;
    for (n, seg) in segments.into_iter().enumerate() {
        match seg {
            "." => trailing = n == last,
            ".." => {
                kept.pop();
                trailing = n == last;
            }
            s => kept.push(s),
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &kept {
        // Merging slashes: an empty segment adds nothing.
        if !seg.is_empty() {
            out.push('/');
            out.push_str(seg);
        }
    }
    // A path that ended in `/` (its last segment empty), or in a dot segment, keeps one.
    if out.is_empty() || trailing || kept.last().is_some_and(|s| s.is_empty()) {
        out.push('/');
    }
    Ok(out)
}

/// A request as the permissions judge it: its path in normal form (`normalize_path`), the
/// rest as it came.
pub struct Normalized<'a> {
    req: &'a dyn Request,
    path: String,
}

impl<'a> Normalized<'a> {
    pub fn new(req: &'a dyn Request) -> Result<Normalized<'a>, PathRefusal> {
        Ok(Normalized {
            path: normalize_path(req.path())?,
            req,
        })
    }
}

impl Request for Normalized<'_> {
    fn method(&self) -> &str {
        self.req.method()
    }
    fn path(&self) -> &str {
        &self.path
    }
    fn header(&self, lower_name: &str) -> Option<String> {
        self.req.header(lower_name)
    }
    fn query(&self) -> Option<&str> {
        self.req.query()
    }
}

/// A regex that must match the whole subject, as RE2's FullMatch in Envoy's `safe_regex`.
fn full_regex(pattern: &str) -> Result<Regex> {
    Regex::new(&format!("^(?:{pattern})$"))
        .map_err(|e| Error::msg(format!("regex {pattern:?}: {e}")))
}

impl Permission {
    /// Parses one element of an intention's `Permissions` as Consul's API returns it (zero
    /// values omitted). Anything it cannot judge exactly is an error.
    pub fn from_consul(v: &Value) -> Result<Permission> {
        let source = v.to_string();
        let obj = v
            .as_object()
            .ok_or_else(|| Error::msg("a permission is not an object"))?;
        for k in obj.keys() {
            if !matches!(k.as_str(), "Action" | "HTTP" | "JWT") && !is_zero(&obj[k]) {
                return Err(Error::msg(format!("unsupported permission field {k}")));
            }
        }
        let allow = match obj.get("Action").and_then(Value::as_str) {
            Some(a) if a.eq_ignore_ascii_case("allow") => true,
            Some(a) if a.eq_ignore_ascii_case("deny") => false,
            other => {
                return Err(Error::msg(format!(
                    "permission Action {other:?} is neither allow nor deny"
                )))
            }
        };
        let empty = serde_json::Map::new();
        let http = match obj.get("HTTP") {
            None | Some(Value::Null) => &empty,
            Some(Value::Object(h)) => h,
            Some(_) => return Err(Error::msg("permission HTTP is not an object")),
        };
        let text = |k: &str| -> Result<Option<String>> {
            match http.get(k) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if s.is_empty() => Ok(None),
                Some(Value::String(s)) => Ok(Some(s.clone())),
                Some(_) => Err(Error::msg(format!("HTTP.{k} is not a string"))),
            }
        };
        let mut path = None;
        let mut paths = 0;
        if let Some(p) = text("PathExact")? {
            path = Some(PathMatch::Exact(p));
            paths += 1;
        }
        if let Some(p) = text("PathPrefix")? {
            path = Some(PathMatch::Prefix(p));
            paths += 1;
        }
        if let Some(p) = text("PathRegex")? {
            path = Some(PathMatch::Regex(full_regex(&p)?));
            paths += 1;
        }
        if paths > 1 {
            return Err(Error::msg(
                "more than one of PathExact, PathPrefix, PathRegex",
            ));
        }
        let mut methods = Vec::new();
        let mut headers = Vec::new();
        for (k, val) in http {
            match k.as_str() {
                "PathExact" | "PathPrefix" | "PathRegex" => {}
                "Methods" => {
                    for m in val.as_array().into_iter().flatten() {
                        let m = m
                            .as_str()
                            .ok_or_else(|| Error::msg("HTTP.Methods holds a non-string"))?;
                        methods.push(m.to_string());
                    }
                }
                "Header" => {
                    for h in val.as_array().into_iter().flatten() {
                        headers.push(HeaderMatch::from_consul(h)?);
                    }
                }
                other if is_zero(val) => log::trace!("ignoring empty HTTP.{other}"),
                other => return Err(Error::msg(format!("unsupported HTTP field {other}"))),
            }
        }
        let jwt = jwt::Requirement::from_consul(obj.get("JWT").unwrap_or(&Value::Null))?;
        Ok(Permission {
            allow,
            path,
            methods,
            headers,
            jwt,
            source,
        })
    }

    /// Whether every condition of this permission holds for `req`; `token` judges its `JWT`.
    pub fn matches(&self, req: &dyn Request, token: &dyn Fn(&jwt::Requirement) -> bool) -> bool {
        let path_ok = match &self.path {
            None => true,
            Some(PathMatch::Exact(p)) => req.path() == p,
            Some(PathMatch::Prefix(p)) => req.path().starts_with(p.as_str()),
            Some(PathMatch::Regex(r)) => r.is_match(req.path()),
        };
        path_ok
            && (self.methods.is_empty() || self.methods.iter().any(|m| m == req.method()))
            && self.headers.iter().all(|h| h.matches(req))
            && self.jwt.as_ref().is_none_or(token)
    }
}

/// How HAProxy can judge one permission without asking the agent, for the fast map
/// (`AuthzTable::fast_map`, a `map_reg` over `<key>:<method>:<path>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FastPattern {
    /// The pattern over `<method>:<path>` of the requests the permission may match, and
    /// whether such a request is allowed right there. A permission with header conditions or
    /// a JWT, or one that denies, is not (`allow: false`): a request it may match asks the agent, which
    /// judges it in full and logs a denial.
    Match { pattern: String, allow: bool },
    /// It matches no request the agent could see: a path with `?` or `#` (the agent compares
    /// the path without them).
    Never,
    /// HAProxy cannot tell which requests it matches: a path regex (HAProxy's PCRE is not
    /// RE2), a method or a path with a character outside the plain set of `literal`. Every
    /// request from here on must ask the agent.
    Unknown,
}

impl Permission {
    pub fn fast_pattern(&self) -> FastPattern {
        let methods = if self.methods.is_empty() {
            "[^:]*".to_string()
        } else if self.methods.iter().all(|m| {
            !m.is_empty()
                && m.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        }) {
            format!("({})", self.methods.join("|"))
        } else {
            return FastPattern::Unknown;
        };
        let path = match &self.path {
            None => String::new(),
            Some(PathMatch::Exact(p) | PathMatch::Prefix(p)) if p.contains(['?', '#']) => {
                return FastPattern::Never
            }
            // The agent compares the path before any `#` (`url_path`); HAProxy's `path` stops
            // at `?` only.
            Some(PathMatch::Exact(p)) => match literal(p) {
                Some(l) => format!("{l}($|#)"),
                None => return FastPattern::Unknown,
            },
            Some(PathMatch::Prefix(p)) => match literal(p) {
                Some(l) => l,
                None => return FastPattern::Unknown,
            },
            Some(PathMatch::Regex(_)) => return FastPattern::Unknown,
        };
        FastPattern::Match {
            pattern: format!("{methods}:{path}"),
            allow: self.allow && self.headers.is_empty() && self.jwt.is_none(),
        }
    }
}

/// `s` as a PCRE literal made of plain characters and one-character classes, or `None` if it
/// holds anything else. No backslash is ever written (HAProxy's CLI would read it as an escape),
/// and no space (it ends a map key).
fn literal(s: &str) -> Option<String> {
    let mut out = String::with_capacity(s.len() + 8);
    for c in s.chars() {
        match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' => out.push(c),
            '-' | '_' | '~' | '/' | '%' | ':' | '@' | '!' | '&' | '\'' | '=' | ',' | ';' => {
                out.push(c)
            }
            '.' | '+' | '*' | '(' | ')' | '$' => {
                out.push('[');
                out.push(c);
                out.push(']');
            }
            _ => return None,
        }
    }
    Some(out)
}

/// What Consul's omitempty would have left out anyway.
fn is_zero(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Bool(b) => !b,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.values().all(is_zero),
        Value::Number(n) => n.as_f64() == Some(0.0),
    }
}

impl HeaderMatch {
    fn from_consul(v: &Value) -> Result<HeaderMatch> {
        let obj = v
            .as_object()
            .ok_or_else(|| Error::msg("a Header entry is not an object"))?;
        let name = obj
            .get("Name")
            .and_then(Value::as_str)
            .filter(|n| !n.is_empty())
            .ok_or_else(|| Error::msg("a Header entry has no Name"))?
            .to_ascii_lowercase();
        let mut kinds = Vec::new();
        let mut invert = false;
        for (k, val) in obj {
            let s = || {
                val.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| Error::msg(format!("Header.{k} is not a string")))
            };
            match k.as_str() {
                "Name" => {}
                "Invert" => {
                    invert = val
                        .as_bool()
                        .ok_or_else(|| Error::msg("Header.Invert is not a boolean"))?
                }
                "Present" => {
                    if val
                        .as_bool()
                        .ok_or_else(|| Error::msg("Header.Present is not a boolean"))?
                    {
                        kinds.push(HeaderKind::Present);
                    }
                }
                _ if is_zero(val) => {}
                "Exact" => kinds.push(HeaderKind::Exact(s()?)),
                "Prefix" => kinds.push(HeaderKind::Prefix(s()?)),
                "Suffix" => kinds.push(HeaderKind::Suffix(s()?)),
                "Regex" => kinds.push(HeaderKind::Regex(full_regex(&s()?)?)),
                other => return Err(Error::msg(format!("unsupported Header field {other}"))),
            }
        }
        let kind = match kinds.len() {
            1 => kinds.remove(0),
            0 => return Err(Error::msg(format!("Header {name} has no matcher"))),
            _ => {
                return Err(Error::msg(format!(
                    "Header {name} has more than one matcher"
                )))
            }
        };
        Ok(HeaderMatch { name, kind, invert })
    }

    fn matches(&self, req: &dyn Request) -> bool {
        let Some(value) = req.header(&self.name) else {
            return matches!(self.kind, HeaderKind::Present) && self.invert;
        };
        let hit = match &self.kind {
            HeaderKind::Present => true,
            HeaderKind::Exact(s) => value == *s,
            HeaderKind::Prefix(s) => value.starts_with(s.as_str()),
            HeaderKind::Suffix(s) => value.ends_with(s.as_str()),
            HeaderKind::Regex(r) => r.is_match(&value),
        };
        hit != self.invert
    }
}

/// The outcome of an L7 source's permissions for one request: `Some((allow, index))` of the
/// first permission that matched, `None` when none did (the default policy decides). `token`
/// judges a permission's `JWT`.
pub fn first_match(
    permissions: &[Permission],
    req: &dyn Request,
    token: &dyn Fn(&jwt::Requirement) -> bool,
) -> Option<(bool, usize)> {
    permissions
        .iter()
        .position(|p| p.matches(req, token))
        .map(|i| (permissions[i].allow, i))
}

/// Parses an intention's whole `Permissions` list; the error is the reason as the table
/// keeps it (`Intention::permissions`), which every request of that source is denied with.
pub fn parse_all(values: &[Value]) -> Result<Vec<Permission>, String> {
    values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            Permission::from_consul(v)
                .map_err(|e| e.context(format!("permission #{i}")).to_string())
        })
        .collect()
}

#[cfg(test)]
mod tests;
