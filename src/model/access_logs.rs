//! `Proxy.AccessLogs` (Consul 1.15+: proxy-defaults' or the registration's): what of it HAProxy
//! can honour. HAProxy's access lines always reach the sidecar's stdout (tagged `[haproxy]`),
//! so `Enabled` with `Type` stdout is what runs anyway; a `TextFormat` or `JSONFormat` becomes
//! the listeners' `log-format`, Envoy's `%…%` operators mapped to HAProxy's variables where
//! HAProxy has one. What cannot be honoured is named in one warning each: `Type` stderr or
//! file, `DisableListenerLogs`, an operator without an equivalent (logged as `-`), a format
//! with characters this sidecar does not write into haproxy.cfg (then HAProxy's own format).

use serde_json::Value;

use crate::error::{Error, Result};

/// Envoy's operators and HAProxy's log-format variables for the same field.
const OPERATORS: &[(&str, &str)] = &[
    ("START_TIME", "%t"),
    ("REQ(:METHOD)", "%HM"),
    ("REQ(:PATH)", "%HU"),
    ("REQ(X-ENVOY-ORIGINAL-PATH?:PATH)", "%HU"),
    ("REQ(:AUTHORITY)", "%[req.hdr(host)]"),
    ("PROTOCOL", "%HV"),
    ("RESPONSE_CODE", "%ST"),
    ("RESPONSE_FLAGS", "%tsc"),
    ("BYTES_RECEIVED", "%U"),
    ("BYTES_SENT", "%B"),
    ("DURATION", "%Ta"),
    ("REQUEST_DURATION", "%TR"),
    ("RESPONSE_DURATION", "%Tr"),
    ("UPSTREAM_HOST", "%si:%sp"),
    ("UPSTREAM_CLUSTER", "%b"),
    ("DOWNSTREAM_REMOTE_ADDRESS", "%ci:%cp"),
    ("DOWNSTREAM_REMOTE_ADDRESS_WITHOUT_PORT", "%ci"),
    ("DOWNSTREAM_LOCAL_ADDRESS", "%fi:%fp"),
    ("DOWNSTREAM_LOCAL_ADDRESS_WITHOUT_PORT", "%fi"),
];

/// The literal characters a format may hold: what needs no quoting or escaping in a
/// haproxy.cfg argument or a Dataplane API field.
fn literal_ok(c: char) -> bool {
    c.is_ascii_alphanumeric() || " -_.:/=,[]()|<>@+*!?".contains(c)
}

/// HAProxy's variables that only an http listener may log, and what a tcp listener logs
/// instead (the whole session's duration for the request's, the termination state without the
/// cookie's).
const HTTP_ONLY: &[(&str, &str)] = &[
    ("%[req.hdr(host)]", "-"),
    ("%tsc", "%ts"),
    ("%HM", "-"),
    ("%HU", "-"),
    ("%HV", "-"),
    ("%ST", "-"),
    ("%TR", "-"),
    ("%Tr", "-"),
    ("%Ta", "%Tt"),
];

/// The `log-format` arguments (quoted, as `-log-format` gives them) of the http and the tcp
/// listeners; a tcp listener logs `-` for what only HTTP has (HAProxy refuses those there).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub struct Formats {
    pub http: String,
    pub tcp: String,
}

/// The formats `Proxy.AccessLogs` asks for, if any; every part it cannot honour is named in
/// `warnings`.
pub fn formats(v: &Value, whose: &str, warnings: &mut Vec<String>) -> Option<Formats> {
    let http = format(v, whose, warnings)?;
    // No variable of the list starts another, so the order does not matter.
    let tcp = HTTP_ONLY
        .iter()
        .fold(http.clone(), |f, (var, instead)| f.replace(var, instead));
    Some(Formats { http, tcp })
}

fn format(v: &Value, whose: &str, warnings: &mut Vec<String>) -> Option<String> {
    let obj = v.as_object()?;
    if obj.get("Enabled").and_then(Value::as_bool) != Some(true) {
        return None;
    }
    let text = |k: &str| obj.get(k).and_then(Value::as_str).unwrap_or("");
    match text("Type") {
        "" | "stdout" => {}
        t => warnings.push(format!(
            "{whose}: AccessLogs Type {:?}{} is not honoured: HAProxy's access lines are printed on the sidecar's stdout, tagged [haproxy]",
            crate::value::comment(t),
            match text("Path") {
                "" => String::new(),
                p => format!(" (Path {:?})", crate::value::comment(p)),
            }
        )),
    }
    if obj.get("DisableListenerLogs").and_then(Value::as_bool) == Some(true) {
        warnings.push(format!(
            "{whose}: AccessLogs DisableListenerLogs is ignored: there are no Envoy listener logs here"
        ));
    }
    let (json, text_format) = (text("JSONFormat"), text("TextFormat"));
    let built = if !json.is_empty() {
        json_format(json)
    } else if !text_format.is_empty() {
        line(text_format.trim_end_matches('\n'))
            .map(|(f, unknown)| (f.replace('"', "\\\""), unknown))
    } else {
        // Envoy's default line is not reproduced: HAProxy's httplog/tcplog serve.
        return None;
    };
    match built {
        Ok((f, unknown)) => {
            for op in unknown {
                warnings.push(format!(
                    "{whose}: AccessLogs operator %{op}% has no HAProxy equivalent; logged as -"
                ));
            }
            Some(format!("\"{f}\""))
        }
        Err(why) => {
            warnings.push(format!(
                "{whose}: AccessLogs format is not used ({why}); HAProxy's own format applies"
            ));
            None
        }
    }
}

/// A text format as HAProxy's: operators mapped, literals checked. The operators without an
/// equivalent, as a second value.
fn line(s: &str) -> Result<(String, Vec<String>)> {
    let mut out = String::new();
    let mut unknown = Vec::new();
    let mut rest = s;
    while let Some(i) = rest.find('%') {
        literal(&rest[..i], &mut out)?;
        let after = &rest[i + 1..];
        let end = after
            .find('%')
            .ok_or_else(|| Error::msg("a % without its closing %"))?;
        let op = &after[..end];
        match OPERATORS.iter().find(|(envoy, _)| *envoy == op) {
            Some((_, haproxy)) => out.push_str(haproxy),
            None => {
                let shown = crate::value::comment(&op.chars().take(40).collect::<String>());
                if !unknown.contains(&shown) {
                    unknown.push(shown);
                }
                out.push('-');
            }
        }
        rest = &after[end + 1..];
    }
    literal(rest, &mut out)?;
    Ok((out, unknown))
}

fn literal(s: &str, out: &mut String) -> Result<()> {
    match s.chars().find(|c| !literal_ok(*c)) {
        None => {
            out.push_str(s);
            Ok(())
        }
        Some(c) => Err(Error::msg(format!(
            "it holds {:?}",
            c.escape_debug().to_string()
        ))),
    }
}

/// A JSON format (`{"key": "%OPERATOR%", …}` as text): one JSON object per line, every value a
/// string, with HAProxy's `+E` escaping quotes and backslashes in what the variables print.
fn json_format(s: &str) -> Result<(String, Vec<String>)> {
    let map: serde_json::Map<String, Value> =
        serde_json::from_str(s).map_err(|_| Error::msg("JSONFormat is not a JSON object"))?;
    let mut parts = Vec::new();
    let mut unknown = Vec::new();
    for (k, v) in &map {
        if k.is_empty()
            || !k
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
        {
            return Err(Error::msg(format!(
                "the key {:?} is not a plain name",
                crate::value::comment(k)
            )));
        }
        let v = v
            .as_str()
            .ok_or_else(|| Error::msg("a JSONFormat value is not a string"))?;
        let (f, u) = line(v)?;
        unknown.extend(
            u.into_iter()
                .filter(|o| !unknown.contains(o))
                .collect::<Vec<_>>(),
        );
        parts.push(format!("\\\"{k}\\\":\\\"{f}\\\""));
    }
    Ok((format!("%{{+E}}o {{{}}}", parts.join(",")), unknown))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn run(v: Value) -> (Option<String>, Vec<String>) {
        let mut w = Vec::new();
        (format(&v, "proxy p", &mut w), w)
    }

    #[test]
    fn text_and_json_formats_become_log_formats() {
        let (f, w) = run(json!({"Enabled": true, "Type": "stdout",
            "TextFormat": "[%START_TIME%] %REQ(:METHOD)% %REQ(:PATH)% %RESPONSE_CODE% %X-HDR% end\n"}));
        assert_eq!(f.as_deref(), Some("\"[%t] %HM %HU %ST - end\""));
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].contains("%X-HDR%"));
        let (f, w) = run(json!({"Enabled": true,
            "JSONFormat": "{\"status\": \"%RESPONSE_CODE%\", \"up\": \"%UPSTREAM_HOST%\"}"}));
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(
            f.as_deref(),
            Some("\"%{+E}o {\\\"status\\\":\\\"%ST\\\",\\\"up\\\":\\\"%si:%sp\\\"}\"")
        );
    }

    #[test]
    fn what_cannot_be_honoured_is_named() {
        assert_eq!(
            run(json!({"Enabled": false, "TextFormat": "%DURATION%"})).0,
            None
        );
        assert_eq!(run(Value::Null), (None, vec![]));
        let (f, w) = run(
            json!({"Enabled": true, "Type": "file", "Path": "/var/log/a.log",
            "DisableListenerLogs": true}),
        );
        assert_eq!(f, None);
        assert_eq!(w.len(), 2, "{w:?}");
        assert!(w[0].contains("file") && w[0].contains("/var/log/a.log"));
        for bad in [
            "%DURATION% \"x\"",
            "a\nlog-format x",
            "%DURATION",
            "x # y",
            "{z}",
        ] {
            let (f, w) = run(json!({"Enabled": true, "TextFormat": bad}));
            assert_eq!(f, None, "{bad}");
            assert!(w[0].contains("not used"), "{bad}: {w:?}");
        }
        let (f, _) = run(json!({"Enabled": true, "JSONFormat": "{\"a b\": \"%DURATION%\"}"}));
        assert_eq!(f, None);
    }
}
