//! Typed values for what comes from outside the process (Consul's answers, the registration,
//! flags) and ends up in something HAProxy reads: haproxy.cfg, a map file, a runtime-API line,
//! a Dataplane API body. Each type can only be made by parsing, and parsing refuses every
//! character that could end a word, a line, a command or an argument in any of those sinks
//! (white space, control characters, quotes, `#`, `;`, braces, backslashes), so a value of
//! one of these types can be written into them as it is.
//!
//! `model::build` parses each value where it enters the model: a refusal drops only what
//! carries the value (that instance, that route, that header rule), with a warning that names
//! the field and the value escaped (`Refused`'s Display), and everything else keeps serving.
//! No I/O here; `fuzz/fuzz_targets/values.rs` feeds arbitrary strings to every parser.

use std::fmt;
use std::net::IpAddr;

/// Why a value was refused: which field, the value as received (shown escaped), and the rule.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Refused {
    pub field: &'static str,
    pub value: String,
    pub reason: &'static str,
}

impl fmt::Display for Refused {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // At most 120 characters of the value, escaped, so a hostile value can neither break
        // the log line nor flood it.
        let shown: String = self.value.chars().take(120).collect();
        let more = if self.value.chars().count() > 120 {
            "…"
        } else {
            ""
        };
        write!(
            f,
            "{} {:?}{more}{REFUSED} {}",
            self.field,
            shown.escape_debug().to_string(),
            self.reason
        )
    }
}

impl std::error::Error for Refused {}

/// What every `Refused` says between the value and the reason, and nothing else says: the
/// supervisor counts the warnings that carry it (`hcc_refused_values_total`).
const REFUSED: &str = " refused by the sidecar:";

/// Whether a warning or error line reports a refused value.
pub fn is_refusal(line: &str) -> bool {
    line.contains(REFUSED)
}

fn refuse<T>(field: &'static str, value: &str, reason: &'static str) -> Result<T, Refused> {
    Err(Refused {
        field,
        value: value.to_string(),
        reason,
    })
}

/// An address HAProxy connects to or binds: an IP address, or where Consul allows one a
/// hostname made of DNS labels (letters, digits, `-`; at most 253 bytes).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(into = "String")]
pub enum Address {
    Ip(IpAddr),
    Host(String),
}

impl Address {
    pub fn parse(field: &'static str, s: &str) -> Result<Address, Refused> {
        if let Ok(ip) = s.parse::<IpAddr>() {
            return Ok(Address::Ip(ip));
        }
        if s.is_empty() || s.len() > 253 {
            return refuse(field, s, "not an IP address or a hostname");
        }
        let label_ok = |l: &str| {
            !l.is_empty()
                && l.len() <= 63
                && !l.starts_with('-')
                && !l.ends_with('-')
                && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
        };
        if !s.split('.').all(label_ok) {
            return refuse(field, s, "not an IP address or a hostname");
        }
        // All digits and dots is an IPv4 address that did not parse, not a name.
        if s.bytes().all(|b| b.is_ascii_digit() || b == b'.') {
            return refuse(field, s, "not a valid IP address");
        }
        Ok(Address::Host(s.to_ascii_lowercase()))
    }

    /// An IP address only: what HAProxy's runtime API (`set server … addr`) and a bind take.
    pub fn parse_ip(field: &'static str, s: &str) -> Result<Address, Refused> {
        match s.parse::<IpAddr>() {
            Ok(ip) => Ok(Address::Ip(ip)),
            Err(_) => refuse(field, s, "not an IP address"),
        }
    }

    pub fn is_ip(&self) -> bool {
        matches!(self, Address::Ip(_))
    }
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Address::Ip(ip) => write!(f, "{ip}"),
            Address::Host(h) => f.write_str(h),
        }
    }
}

impl From<Address> for String {
    fn from(a: Address) -> String {
        a.to_string()
    }
}

/// A name Consul gives something (service, instance ID, node, datacenter, namespace,
/// partition, subset, peer, chain target id): letters, digits and `._:-`, at most 255 bytes.
/// Consul documents DNS-label names and checks few; this is the set every real name uses.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Name(String);

impl Name {
    pub fn parse(field: &'static str, s: &str) -> Result<Name, Refused> {
        if s.is_empty() || s.len() > 255 {
            return refuse(field, s, "a name must be 1 to 255 characters");
        }
        if !s
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b':' | b'-'))
        {
            return refuse(field, s, "a name takes only letters, digits and . _ : -");
        }
        Ok(Name(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Name {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// HAProxy's largest timeout: it keeps milliseconds in a signed 32-bit integer.
pub const MAX_MILLIS: u64 = i32::MAX as u64;

/// A duration HAProxy can take as a timeout: 1 ms to `MAX_MILLIS`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Millis(u32);

impl Millis {
    pub fn new(field: &'static str, ms: u64) -> Result<Millis, Refused> {
        if ms == 0 {
            return refuse(field, "0", "a timeout of 0 means none to HAProxy");
        }
        if ms > MAX_MILLIS {
            return refuse(
                field,
                &format!("{ms} ms"),
                "above HAProxy's largest timeout (2147483647 ms, about 24.8 days)",
            );
        }
        u32::try_from(ms).map(Millis).or_else(|_| {
            refuse(
                field,
                &format!("{ms} ms"),
                "above HAProxy's largest timeout",
            )
        })
    }

    /// A Go duration string (`"5s"`, `"1m30s"`, `"250ms"`), as the Go original's
    /// `connect_timeout`, `read_timeout` and `poll_interval` take them.
    pub fn parse_go(field: &'static str, s: &str) -> Result<Millis, Refused> {
        let Some(ms) = go_duration_ms(s) else {
            return refuse(field, s, "not a Go duration such as \"5s\" or \"1m30s\"");
        };
        // The refusal names the value as the operator wrote it, not its milliseconds.
        Millis::new(field, ms).map_err(|e| Refused {
            value: s.to_string(),
            ..e
        })
    }

    /// A Go duration as a JSON config value (`"5s"`): `None` for `null` (unset), a refusal for
    /// anything but a string that `parse_go` takes.
    pub fn from_go_json(
        field: &'static str,
        v: &serde_json::Value,
    ) -> Option<Result<Millis, Refused>> {
        match v {
            serde_json::Value::Null => None,
            serde_json::Value::String(s) => Some(Millis::parse_go(field, s.trim())),
            other => Some(Err(Refused {
                field,
                value: other.to_string(),
                reason: "not a Go duration string such as \"5s\"",
            })),
        }
    }

    /// A value that is ours, not Consul's (a default): checked all the same.
    pub const fn constant(ms: u32) -> Millis {
        Millis(ms)
    }

    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

impl fmt::Display for Millis {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A connection count HAProxy can take as a `maxconn`: 1 to `i32::MAX` (HAProxy keeps it in an
/// `int`, and 0 would mean "no limit" to some of its keywords and "nothing" to others).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Limit(u32);

impl Limit {
    pub fn new(field: &'static str, n: u64) -> Result<Limit, Refused> {
        if n == 0 {
            return refuse(field, "0", "a limit of 0 would refuse every connection");
        }
        match u32::try_from(n) {
            Ok(v) if u64::from(v) <= MAX_MILLIS => Ok(Limit(v)),
            _ => refuse(
                field,
                &n.to_string(),
                "above HAProxy's largest (2147483647)",
            ),
        }
    }

    pub fn get(self) -> u64 {
        u64::from(self.0)
    }
}

impl fmt::Display for Limit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A Go duration as Consul prints it (`5s`, `1m30s`, `250ms`, `1.5s`) in milliseconds.
pub fn go_duration_ms(s: &str) -> Option<u64> {
    let mut total = 0f64;
    let mut rest = s.trim();
    if rest.is_empty() {
        return None;
    }
    while !rest.is_empty() {
        let num_end = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let n: f64 = rest[..num_end].parse().ok()?;
        rest = &rest[num_end..];
        let unit_end = rest
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(rest.len());
        let factor = match &rest[..unit_end] {
            "h" => 3_600_000.0,
            "m" => 60_000.0,
            "s" => 1000.0,
            "ms" => 1.0,
            "us" | "µs" => 0.001,
            "ns" => 0.000_001,
            _ => return None,
        };
        total += n * factor;
        rest = &rest[unit_end..];
    }
    Some(total.round() as u64)
}

/// Whether `b` can stand in an HAProxy configuration word, a map line, a runtime-API command
/// and a Dataplane API rule as it is: printable ASCII without white space, quotes, `#`
/// (comment), `;` (the runtime API's command separator), `\` (escape). Braces are bytes of a
/// word too (a regex's `{2}`), but only balanced: see `balanced`.
fn word_byte(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b'"' | b'\'' | b'#' | b';' | b'\\')
}

/// Whether every `}` closes a `{` before it and none is left open: an anonymous ACL block is
/// a `{` word and a `}` word, so a value that is one of them (or could be read as one after a
/// split) must not reach a rule, while a regex's `[a-z]{2}` is harmless.
fn balanced(s: &str) -> bool {
    let mut depth = 0usize;
    for b in s.bytes() {
        match b {
            b'{' => depth += 1,
            b'}' => match depth.checked_sub(1) {
                Some(d) => depth = d,
                None => return false,
            },
            _ => {}
        }
    }
    depth == 0
}

/// One word of HAProxy configuration taken from Consul: a header or query value to match or
/// set, an HTTP method, a regex.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct Word(String);

impl Word {
    pub fn parse(field: &'static str, s: &str) -> Result<Word, Refused> {
        if s.is_empty() {
            return refuse(field, s, "empty");
        }
        if s.len() > 1024 {
            return refuse(field, s, "longer than 1024 bytes");
        }
        if !s.bytes().all(word_byte) {
            return refuse(
                field,
                s,
                "holds white space, a control or non-ASCII character, a quote, '#', ';' or a backslash, which HAProxy's configuration cannot carry as one word",
            );
        }
        if !balanced(s) {
            return refuse(
                field,
                s,
                "holds an unbalanced brace, which HAProxy's configuration would read as the end or start of a rule's condition",
            );
        }
        Ok(Word(s.to_string()))
    }

    /// A regular expression in the syntax Consul documents (RE2, which the `regex` crate
    /// follows): refused when it does not compile, before HAProxy is asked.
    pub fn regex(field: &'static str, s: &str) -> Result<Word, Refused> {
        let w = Word::parse(field, s)?;
        match regex::Regex::new(s) {
            Ok(_) => Ok(w),
            Err(_) => refuse(field, s, "not a regular expression that compiles"),
        }
    }

    /// A URL path to match or rewrite to: a word that starts with `/`.
    pub fn path(field: &'static str, s: &str) -> Result<Word, Refused> {
        let w = Word::parse(field, s)?;
        if !s.starts_with('/') {
            return refuse(field, s, "a path must start with '/'");
        }
        Ok(w)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Word {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// An HTTP header or query parameter name, as it stands inside a sample fetch's parentheses
/// (`req.fhdr(name)`, `url_param(name)`): an RFC 9110 token without the characters that end
/// or quote an argument there (`,` `)` `'` `"` `#`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct HeaderName(String);

impl HeaderName {
    pub fn parse(field: &'static str, s: &str) -> Result<HeaderName, Refused> {
        if s.is_empty() || s.len() > 256 {
            return refuse(field, s, "a header name must be 1 to 256 characters");
        }
        if !s.bytes().all(|b| {
            b.is_ascii_alphanumeric()
                || matches!(
                    b,
                    b'!' | b'$'
                        | b'%'
                        | b'&'
                        | b'*'
                        | b'+'
                        | b'-'
                        | b'.'
                        | b'^'
                        | b'_'
                        | b'`'
                        | b'|'
                        | b'~'
                )
        }) {
            return refuse(
                field,
                s,
                "a header name takes only letters, digits and !$%&*+-.^_`|~",
            );
        }
        Ok(HeaderName(s.to_string()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for HeaderName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A TLS protocol version as Consul's `mesh` entry names it (`TLSv1_2`), printed as HAProxy's
/// `ssl-min-ver`/`ssl-max-ver` take it (`TLSv1.2`). Ordered oldest first.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub enum TlsVersion {
    V1_0,
    V1_1,
    V1_2,
    V1_3,
}

impl TlsVersion {
    /// `None` for Consul's "no preference" (`TLS_AUTO`, or empty): HAProxy's default applies.
    pub fn parse(field: &'static str, s: &str) -> Result<Option<TlsVersion>, Refused> {
        Ok(Some(match s {
            "" | "TLS_AUTO" => return Ok(None),
            "TLSv1_0" => TlsVersion::V1_0,
            "TLSv1_1" => TlsVersion::V1_1,
            "TLSv1_2" => TlsVersion::V1_2,
            "TLSv1_3" => TlsVersion::V1_3,
            _ => {
                return refuse(
                    field,
                    s,
                    "not a TLS version Consul knows (TLS_AUTO, TLSv1_0 to TLSv1_3)",
                )
            }
        }))
    }
}

impl fmt::Display for TlsVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            TlsVersion::V1_0 => "TLSv1.0",
            TlsVersion::V1_1 => "TLSv1.1",
            TlsVersion::V1_2 => "TLSv1.2",
            TlsVersion::V1_3 => "TLSv1.3",
        })
    }
}

/// The TLS 1.2 cipher suites Consul accepts for its proxies (IANA names, as the `mesh` entry
/// takes them), each with the name OpenSSL (and so HAProxy's `ciphers`) gives it.
const CIPHER_SUITES: &[(&str, &str)] = &[
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-ECDSA-AES128-GCM-SHA256",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
        "ECDHE-RSA-AES128-GCM-SHA256",
    ),
    (
        "TLS_ECDHE_RSA_WITH_CHACHA20_POLY1305_SHA256",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_128_CBC_SHA",
        "ECDHE-ECDSA-AES128-SHA",
    ),
    ("TLS_ECDHE_RSA_WITH_AES_128_CBC_SHA", "ECDHE-RSA-AES128-SHA"),
    ("TLS_RSA_WITH_AES_128_GCM_SHA256", "AES128-GCM-SHA256"),
    ("TLS_RSA_WITH_AES_128_CBC_SHA", "AES128-SHA"),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-ECDSA-AES256-GCM-SHA384",
    ),
    (
        "TLS_ECDHE_RSA_WITH_AES_256_GCM_SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
    ),
    (
        "TLS_ECDHE_ECDSA_WITH_AES_256_CBC_SHA",
        "ECDHE-ECDSA-AES256-SHA",
    ),
    ("TLS_ECDHE_RSA_WITH_AES_256_CBC_SHA", "ECDHE-RSA-AES256-SHA"),
    ("TLS_RSA_WITH_AES_256_GCM_SHA384", "AES256-GCM-SHA384"),
    ("TLS_RSA_WITH_AES_256_CBC_SHA", "AES256-SHA"),
];

/// One of `CIPHER_SUITES`, printed by its OpenSSL name.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize)]
#[serde(transparent)]
pub struct CipherSuite(&'static str);

impl CipherSuite {
    pub fn parse(field: &'static str, s: &str) -> Result<CipherSuite, Refused> {
        match CIPHER_SUITES.iter().find(|(iana, _)| *iana == s) {
            Some((_, openssl)) => Ok(CipherSuite(openssl)),
            None => refuse(field, s, "not a TLS 1.2 cipher suite Consul knows"),
        }
    }
}

impl fmt::Display for CipherSuite {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.0)
    }
}

/// Text for a comment line of haproxy.cfg: printable ASCII only, anything else (a line break
/// above all) shown as `?`, so that a comment can never end early and start a directive.
pub fn comment(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_graphic() || c == ' ' {
                c
            } else {
                '?'
            }
        })
        .collect()
}

/// The fuzz target's invariants (`fuzz/fuzz_targets/values.rs`; `tests/fuzz_corpus.rs` replays
/// its corpus on stable): whatever string goes in, every value a parser accepts prints as one
/// word with no line break, `;`, `#`, quote, backslash or unbalanced brace, and a comment as
/// one line.
/// Returns how many parsers accepted the input.
pub fn fuzz_check(data: &[u8]) -> usize {
    let s = String::from_utf8_lossy(data);
    let word_ok = |out: &str| {
        assert!(!out.is_empty(), "an empty value was accepted from {s:?}");
        assert!(
            out.bytes().all(word_byte) && balanced(out),
            "{out:?} (from {s:?}) cannot stand as one word"
        );
    };
    let mut accepted = 0;
    let mut check = |out: Option<String>| {
        if let Some(out) = out {
            word_ok(&out);
            accepted += 1;
        }
    };
    check(Address::parse("f", &s).ok().map(|v| v.to_string()));
    check(Address::parse_ip("f", &s).ok().map(|v| v.to_string()));
    check(Name::parse("f", &s).ok().map(|v| v.to_string()));
    check(Word::parse("f", &s).ok().map(|v| v.to_string()));
    check(Word::path("f", &s).ok().map(|v| v.to_string()));
    check(Word::regex("f", &s).ok().map(|v| v.to_string()));
    check(HeaderName::parse("f", &s).ok().map(|v| v.to_string()));
    check(
        TlsVersion::parse("f", &s)
            .ok()
            .flatten()
            .map(|v| v.to_string()),
    );
    check(CipherSuite::parse("f", &s).ok().map(|v| v.to_string()));
    if let Some(n) = data.get(..8).and_then(|b| b.try_into().ok()) {
        if let Ok(m) = Millis::new("f", u64::from_le_bytes(n)) {
            assert!((1..=MAX_MILLIS).contains(&m.get()));
            check(Some(m.to_string()));
        }
    }
    if let Ok(m) = Millis::parse_go("f", &s) {
        assert!((1..=MAX_MILLIS).contains(&m.get()));
        check(Some(m.to_string()));
    }
    if let Some(n) = data.get(..8).and_then(|b| b.try_into().ok()) {
        if let Ok(l) = Limit::new("f", u64::from_le_bytes(n)) {
            assert!((1..=MAX_MILLIS).contains(&l.get()));
            check(Some(l.to_string()));
        }
    }
    let c = comment(&s);
    assert!(
        c.chars().all(|ch| ch == ' ' || ch.is_ascii_graphic()),
        "comment {c:?} is not one line of printable ASCII"
    );
    // What every refusal prints stays on one line too.
    if let Err(e) = Name::parse("f", &s) {
        assert!(!e.to_string().contains(['\n', '\r']), "{e}");
    }
    accepted
}

// Comparisons with plain values, for the places (tests, mostly) that check what a value holds.
impl PartialEq<u64> for Millis {
    fn eq(&self, other: &u64) -> bool {
        self.get() == *other
    }
}

impl PartialEq<&str> for Address {
    fn eq(&self, other: &&str) -> bool {
        match self {
            Address::Ip(ip) => other.parse::<IpAddr>().is_ok_and(|o| o == *ip),
            Address::Host(h) => h == other,
        }
    }
}

macro_rules! text_eq {
    ($t:ty) => {
        impl PartialEq<&str> for $t {
            fn eq(&self, other: &&str) -> bool {
                self.0 == *other
            }
        }
        impl PartialEq<str> for $t {
            fn eq(&self, other: &str) -> bool {
                self.0 == other
            }
        }
    };
}
text_eq!(Name);
text_eq!(Word);
text_eq!(HeaderName);

// Tests write literals; a literal that does not parse is a broken test, so it panics there.
#[cfg(test)]
mod literals {
    use super::*;

    impl From<&str> for Address {
        fn from(s: &str) -> Address {
            Address::parse("test literal", s).expect("a valid address literal")
        }
    }

    impl From<&str> for Word {
        fn from(s: &str) -> Word {
            Word::parse("test literal", s).expect("a valid word literal")
        }
    }

    impl From<&str> for HeaderName {
        fn from(s: &str) -> HeaderName {
            HeaderName::parse("test literal", s).expect("a valid header name literal")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_are_ips_or_dns_names() {
        assert_eq!(
            Address::parse("a", "10.0.0.9").map(|a| a.to_string()),
            Ok("10.0.0.9".into())
        );
        assert_eq!(
            Address::parse("a", "::1").map(|a| a.to_string()),
            Ok("::1".into())
        );
        assert_eq!(
            Address::parse("a", "Web-1.Example.com").map(|a| a.to_string()),
            Ok("web-1.example.com".into())
        );
        for bad in [
            "10.0.0.9\nlisten pwn\n bind 127.0.0.1:18081\n server s 127.0.0.1:8080\n#",
            "10.0.0.9;shutdown sessions",
            "10.0.0.9 ",
            "",
            "-a.b",
            "a..b",
            "300.1.1.1",
            "fe80::1%eth0",
            "a_b",
            "[::1]",
        ] {
            let e = Address::parse("Service.Address", bad).unwrap_err();
            assert_eq!(e.field, "Service.Address");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        assert!(Address::parse_ip("a", "localhost").is_err());
    }

    #[test]
    fn names_refuse_what_could_break_a_line() {
        assert!(Name::parse("n", "web-1.sidecar_proxy:x").is_ok());
        for bad in ["dc9\nglobal", "a b", "a;b", "a#b", "", "a/b", "a{b", "é"] {
            assert!(Name::parse("n", bad).is_err(), "{bad:?}");
        }
        assert!(Name::parse("n", &"a".repeat(256)).is_err());
    }

    #[test]
    fn millis_fit_haproxys_timeouts() {
        assert_eq!(Millis::new("t", 1).map(Millis::get), Ok(1));
        assert_eq!(
            Millis::new("t", MAX_MILLIS).map(Millis::get),
            Ok(2_147_483_647)
        );
        // 720h, which Consul accepts as a RequestTimeout.
        let e = Millis::new("RequestTimeout", 2_592_000_000).unwrap_err();
        assert!(e.to_string().contains("2592000000 ms"), "{e}");
        assert!(Millis::new("t", 0).is_err());
    }

    #[test]
    fn go_durations_and_limits_fit_haproxy() {
        assert_eq!(Millis::parse_go("t", "5s").map(Millis::get), Ok(5000));
        assert_eq!(Millis::parse_go("t", "1m30s").map(Millis::get), Ok(90_000));
        assert_eq!(Millis::parse_go("t", "250ms").map(Millis::get), Ok(250));
        for bad in [
            "0s",
            "5",
            "-5s",
            "5x",
            "",
            "5s;",
            "1000h",
            "100us",
            "5s\nlisten x",
        ] {
            let e = Millis::parse_go("read_timeout", bad).unwrap_err();
            assert_eq!(e.value, bad, "the refusal shows what was written");
            assert!(!e.to_string().contains('\n'), "{e}");
        }
        assert_eq!(Limit::new("m", 1).map(Limit::get), Ok(1));
        assert!(Limit::new("m", 0).is_err());
        assert!(Limit::new("m", MAX_MILLIS + 1).is_err());
        assert_eq!(Limit::new("m", MAX_MILLIS).map(Limit::get), Ok(MAX_MILLIS));
    }

    #[test]
    fn words_and_header_names() {
        assert!(Word::parse("v", "a,b)c$d%e").is_ok());
        assert!(Word::regex("r", "/deb[ug]{2}").is_ok(), "a regex's braces");
        for bad in [
            "{", "}", "}{", "a{", "a b", "a#", "a;b", "a'b", "a\"b", "a\\b", "a\nb", "é", "",
        ] {
            assert!(Word::parse("v", bad).is_err(), "{bad:?}");
        }
        assert!(Word::regex("r", "^/api/v[0-9]+$").is_ok());
        assert!(Word::regex("r", "(unclosed").is_err());
        assert!(Word::path("p", "/admin").is_ok());
        assert!(Word::path("p", "admin").is_err());
        assert!(HeaderName::parse("h", "x-debug_1").is_ok());
        for bad in ["x)", "a,b", "a b", "a#", "a'", "", "a:b", "a(b"] {
            assert!(HeaderName::parse("h", bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn comments_stay_on_one_line() {
        assert_eq!(
            comment("dc9\nglobal\n stats socket ipv4@127.0.0.1:19999 level admin\n#"),
            "dc9?global? stats socket ipv4@127.0.0.1:19999 level admin?#"
        );
        assert_eq!(comment("café\r"), "caf??");
    }
}
