//! The `mesh` config entry's TLS settings (Consul 1.10+): `TLS.Incoming` for the public
//! listener, `TLS.Outgoing` for the connections to upstream instances, each a minimum and
//! maximum TLS version and a list of TLS 1.2 cipher suites. Every value is parsed into a
//! `crate::value` type here; a value that cannot be honoured is dropped with one warning naming
//! it, and what it would have changed keeps HAProxy's default (TLS 1.2 and later, HAProxy's
//! cipher list), which is also Envoy's.
//!
//! A change of these is a full render (`Plan::mesh_tls_changed`): neither the Dataplane API's
//! v1.2.5 models nor HAProxy's runtime API can change them on a running bind or server (only
//! `add server` takes them).

use serde::Serialize;
use serde_json::Value;

use crate::value::{CipherSuite, TlsVersion};

/// What one direction's TLS may negotiate; the default asks for nothing.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct TlsParams {
    pub min: Option<TlsVersion>,
    pub max: Option<TlsVersion>,
    /// OpenSSL names, in the entry's order; empty keeps HAProxy's list. TLS 1.3's suites are
    /// not configurable in Consul, and `ciphers` does not touch them.
    pub ciphers: Vec<CipherSuite>,
}

impl TlsParams {
    /// The bind or server options that ask for these settings, each with a leading space;
    /// empty for the default.
    pub fn options(&self) -> String {
        let mut s = String::new();
        if let Some(v) = self.min {
            s.push_str(&format!(" ssl-min-ver {v}"));
        }
        if let Some(v) = self.max {
            s.push_str(&format!(" ssl-max-ver {v}"));
        }
        if !self.ciphers.is_empty() {
            let names: Vec<String> = self.ciphers.iter().map(ToString::to_string).collect();
            s.push_str(&format!(" ciphers {}", names.join(":")));
        }
        s
    }

    pub fn is_default(&self) -> bool {
        *self == TlsParams::default()
    }
}

/// The mesh's TLS settings, both directions.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct MeshTlsParams {
    /// The public listener (`TLS.Incoming`).
    pub incoming: TlsParams,
    /// Every upstream and chain target server (`TLS.Outgoing`).
    pub outgoing: TlsParams,
}

/// The TLS settings of the `mesh` entry among `entries` (the `/v1/config/mesh` list: at most
/// one, which Consul prints without a name); the default without one.
pub fn tls(entries: &[Value], warnings: &mut Vec<String>) -> MeshTlsParams {
    let Some(entry) = entries
        .iter()
        .find(|e| e.get("Kind").and_then(Value::as_str) == Some("mesh"))
    else {
        return MeshTlsParams::default();
    };
    let tls = entry.get("TLS");
    MeshTlsParams {
        incoming: direction(tls.and_then(|t| t.get("Incoming")), "Incoming", warnings),
        outgoing: direction(tls.and_then(|t| t.get("Outgoing")), "Outgoing", warnings),
    }
}

fn direction(v: Option<&Value>, name: &str, warnings: &mut Vec<String>) -> TlsParams {
    let Some(v) = v.filter(|v| !v.is_null()) else {
        return TlsParams::default();
    };
    let version = |key: &str, field: &'static str, warnings: &mut Vec<String>| match v.get(key) {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) => match TlsVersion::parse(field, s) {
            Ok(version) => version,
            Err(e) => {
                warnings.push(format!("mesh config entry: {e}; HAProxy's default applies"));
                None
            }
        },
        Some(other) => {
            warnings.push(format!(
                "mesh config entry: {}; HAProxy's default applies",
                super::keys::not_a(field, Some(other), "not a TLS version")
            ));
            None
        }
    };
    let (min_field, max_field, cipher_field) = if name == "Incoming" {
        (
            "TLS.Incoming.TLSMinVersion",
            "TLS.Incoming.TLSMaxVersion",
            "TLS.Incoming.CipherSuites",
        )
    } else {
        (
            "TLS.Outgoing.TLSMinVersion",
            "TLS.Outgoing.TLSMaxVersion",
            "TLS.Outgoing.CipherSuites",
        )
    };
    let min = version("TLSMinVersion", min_field, warnings);
    let mut max = version("TLSMaxVersion", max_field, warnings);
    if let (Some(lo), Some(hi)) = (min, max) {
        if hi < lo {
            // Consul refuses such an entry when it is written; never render what HAProxy
            // would refuse to start with.
            warnings.push(format!(
                "mesh config entry: TLS.{name}.TLSMaxVersion {hi} is below TLSMinVersion {lo}; the maximum is ignored"
            ));
            max = None;
        }
    }
    let mut ciphers = Vec::new();
    match v.get("CipherSuites") {
        None | Some(Value::Null) => {}
        Some(Value::Array(list)) => {
            for c in list {
                match c.as_str().map(|s| CipherSuite::parse(cipher_field, s)) {
                    Some(Ok(suite)) if !ciphers.contains(&suite) => ciphers.push(suite),
                    Some(Ok(_)) => {}
                    Some(Err(e)) => warnings.push(format!(
                        "mesh config entry: {e}; left out of the cipher list"
                    )),
                    None => warnings.push(format!(
                        "mesh config entry: {}; left out of the cipher list",
                        super::keys::not_a(cipher_field, Some(c), "not a cipher suite name")
                    )),
                }
            }
            if ciphers.is_empty() && !list.is_empty() {
                warnings.push(format!(
                    "mesh config entry: none of TLS.{name}.CipherSuites is known; HAProxy's cipher list applies"
                ));
            }
        }
        Some(other) => warnings.push(format!(
            "mesh config entry: {}; HAProxy's cipher list applies",
            super::keys::not_a(cipher_field, Some(other), "not a list")
        )),
    }
    TlsParams { min, max, ciphers }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn entry(tls: Value) -> Vec<Value> {
        // As Consul 1.16 lists it: no Name.
        vec![json!({"Kind": "mesh", "TLS": tls, "CreateIndex": 12})]
    }

    #[test]
    fn no_entry_or_no_tls_asks_for_nothing() {
        let mut w = Vec::new();
        assert!(tls(&[], &mut w).incoming.is_default());
        let t = tls(&entry(Value::Null), &mut w);
        assert_eq!(t, MeshTlsParams::default());
        let t = tls(
            &entry(json!({"Incoming": {"TLSMinVersion": "TLS_AUTO", "CipherSuites": null}})),
            &mut w,
        );
        assert_eq!(t, MeshTlsParams::default());
        assert!(w.is_empty(), "{w:?}");
    }

    #[test]
    fn versions_and_ciphers_become_haproxy_options() {
        let mut w = Vec::new();
        let t = tls(
            &entry(json!({
                "Incoming": {"TLSMinVersion": "TLSv1_3"},
                "Outgoing": {"TLSMinVersion": "TLSv1_2", "TLSMaxVersion": "TLSv1_2",
                             "CipherSuites": ["TLS_ECDHE_RSA_WITH_AES_128_GCM_SHA256",
                                              "TLS_ECDHE_ECDSA_WITH_CHACHA20_POLY1305_SHA256"]}
            })),
            &mut w,
        );
        assert!(w.is_empty(), "{w:?}");
        assert_eq!(t.incoming.options(), " ssl-min-ver TLSv1.3");
        assert_eq!(
            t.outgoing.options(),
            " ssl-min-ver TLSv1.2 ssl-max-ver TLSv1.2 ciphers ECDHE-RSA-AES128-GCM-SHA256:ECDHE-ECDSA-CHACHA20-POLY1305"
        );
    }

    /// Each value that cannot be honoured is named once and dropped alone; nothing raw
    /// reaches an option.
    #[test]
    fn bad_values_are_named_and_dropped_alone() {
        let mut w = Vec::new();
        let t = tls(
            &entry(json!({
                "Incoming": {"TLSMinVersion": "TLSv1_3 ciphers ALL", "TLSMaxVersion": "TLSv1_2",
                             "CipherSuites": ["RC4-MD5", 7, "TLS_RSA_WITH_AES_256_CBC_SHA"]},
                "Outgoing": {"TLSMinVersion": "TLSv1_3", "TLSMaxVersion": "TLSv1_2",
                             "CipherSuites": "TLS_RSA_WITH_AES_256_CBC_SHA"}
            })),
            &mut w,
        );
        assert_eq!(
            t.incoming.options(),
            " ssl-max-ver TLSv1.2 ciphers AES256-SHA"
        );
        assert_eq!(t.outgoing.options(), " ssl-min-ver TLSv1.3");
        assert_eq!(w.len(), 5, "{w:#?}");
        assert!(w.iter().all(|l| !l.contains('\n')));
        assert!(w[0].contains("TLS.Incoming.TLSMinVersion") && w[0].contains("refused"));
        assert!(w.iter().any(|l| l.contains("RC4-MD5")));
        assert!(w
            .iter()
            .any(|l| l.contains("TLS.Outgoing.TLSMaxVersion TLSv1.2 is below")));
        assert!(w.iter().any(|l| l.contains("TLS.Outgoing.CipherSuites")));
    }
}
