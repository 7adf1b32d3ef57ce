//! The part of `X-Forwarded-Client-Cert` read from the client certificate: what Consul's Envoy
//! sets on its public listener after `By` (which the public frontend writes itself: its own
//! SPIFFE ID). Fields in Envoy's order: `Hash` (hex SHA-256 of the certificate's DER), `Cert`
//! and `Chain` (URL-encoded PEM), `Subject` (RFC 2253), `URI` (the first URI SAN, present even
//! when empty), then one `DNS` per DNS SAN. Made once per connection, when the agent judges
//! it: HAProxy hashing the certificate on every request cost a SHA-256 per request.
//!
//! The value reaches a request header, so it is printable ASCII without a line break or
//! anything else a header could be split at: a SAN that is not gives no value at all.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use x509_parser::extensions::GeneralName;
use x509_parser::objects::{oid2abbrev, oid_registry};
use x509_parser::prelude::{FromDer, X509Certificate};
use x509_parser::x509::X509Name;

/// `sess.<prefix>.xfcc`: set (STRING) on an allowed connection of an http public listener.
pub const XFCC_VAR: &str = "xfcc";
/// The argument of the connection check that carries the rest of the client's chain
/// (`ssl_c_chain_der`); only an http listener's configuration sends it, and only then is the
/// value made.
pub const CHAIN_ARG: &str = "chain";

/// Past this the value is not set: the answer must fit the frame HAProxy accepts, and a header
/// this large would not be useful to the app either.
const MAX_LEN: usize = 12 * 1024;

/// The fields after `By` for the client certificate `leaf` (DER) and the rest of its chain
/// as sent (`chain`: DER certificates one after another, empty when none). `None` when the
/// leaf does not parse, a SAN cannot be carried in a header, or the value would be too large.
pub fn details(leaf: &[u8], chain: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(leaf).ok()?;
    let leaf_pem = url_encoded_pem(leaf);
    // Envoy's chain starts with the leaf itself.
    let mut chain_pem = leaf_pem.clone();
    let mut rest = chain;
    while !rest.is_empty() {
        let (next, _) = X509Certificate::from_der(rest).ok()?;
        let len = rest.len() - next.len();
        chain_pem.push_str(&url_encoded_pem(&rest[..len]));
        rest = next;
    }
    let (mut uri, mut dns) = (None, Vec::new());
    if let Ok(Some(san)) = cert.subject_alternative_name() {
        for n in &san.value.general_names {
            match n {
                GeneralName::URI(u) if uri.is_none() => uri = Some(*u),
                GeneralName::DNSName(d) => dns.push(*d),
                _ => {}
            }
        }
    }
    let uri = uri.unwrap_or("");
    if !uri.bytes().all(plain) || !dns.iter().all(|d| d.bytes().all(plain)) {
        return None;
    }
    let hash = hex(ring::digest::digest(&ring::digest::SHA256, leaf).as_ref());
    let mut v = format!(
        "Hash={hash};Cert=\"{leaf_pem}\";Chain=\"{chain_pem}\";Subject=\"{}\";URI={uri}",
        rfc2253(cert.subject())
    );
    for d in dns {
        v.push_str(";DNS=");
        v.push_str(d);
    }
    (v.len() <= MAX_LEN).then_some(v)
}

/// A byte a SAN may hold in the header: printable ASCII that does not separate its fields
/// (`;`, `,`), quote or escape.
fn plain(b: u8) -> bool {
    b.is_ascii_graphic() && !matches!(b, b';' | b',' | b'"' | b'\\')
}

/// PEM as OpenSSL writes it (64 characters a line), with the characters Envoy encodes
/// (line break, space, `+`, `/`, `=`) percent-encoded.
fn url_encoded_pem(der: &[u8]) -> String {
    let b64 = STANDARD.encode(der);
    let mut pem = String::from("-----BEGIN%20CERTIFICATE-----%0A");
    for line in b64.as_bytes().chunks(64) {
        for &c in line {
            match c {
                b'+' => pem.push_str("%2B"),
                b'/' => pem.push_str("%2F"),
                b'=' => pem.push_str("%3D"),
                c => pem.push(char::from(c)),
            }
        }
        pem.push_str("%0A");
    }
    pem.push_str("-----END%20CERTIFICATE-----%0A");
    pem
}

/// The subject as RFC 2253 writes it (last RDN first, `,` between RDNs, `+` within one), with
/// the special characters escaped and anything outside printable ASCII as `\XX`, so the
/// quoted field can never end early. Empty for an empty subject (Consul 1.16's leaves).
fn rfc2253(name: &X509Name<'_>) -> String {
    let rdns: Vec<String> = name
        .iter_rdn()
        .map(|rdn| {
            rdn.iter()
                .map(|a| {
                    let key = oid2abbrev(a.attr_type(), oid_registry())
                        .map(str::to_string)
                        .unwrap_or_else(|_| a.attr_type().to_id_string());
                    let value = match a.as_str() {
                        Ok(s) => escape(s.as_bytes()),
                        Err(_) => format!("#{}", hex(a.attr_value().data)),
                    };
                    format!("{key}={value}")
                })
                .collect::<Vec<_>>()
                .join("+")
        })
        .collect();
    rdns.into_iter().rev().collect::<Vec<_>>().join(",")
}

fn escape(v: &[u8]) -> String {
    let mut out = String::new();
    for (i, &b) in v.iter().enumerate() {
        let edge = (i == 0 && matches!(b, b'#' | b' ')) || (i + 1 == v.len() && b == b' ');
        if edge || matches!(b, b',' | b'+' | b'"' | b'\\' | b'<' | b'>' | b';') {
            out.push('\\');
            out.push(char::from(b));
        } else if b.is_ascii_graphic() || b == b' ' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("\\{b:02X}"));
        }
    }
    out
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const LEAF: &str = include_str!("../../../fixtures/identity/leaf.pem");
    const INTERMEDIATE: &str = include_str!("../../../fixtures/identity/intermediate.pem");

    fn der(pem: &str) -> Vec<u8> {
        let b64: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
        STANDARD.decode(b64).expect("the fixture is base64")
    }

    /// Envoy's encoding of the PEM file OpenSSL wrote.
    fn envoy_encoded(pem: &str) -> String {
        let mut out = String::new();
        for c in pem.chars() {
            match c {
                '\n' => out.push_str("%0A"),
                ' ' => out.push_str("%20"),
                '+' => out.push_str("%2B"),
                '/' => out.push_str("%2F"),
                '=' => out.push_str("%3D"),
                c => out.push(c),
            }
        }
        out
    }

    /// A leaf as Consul's are (no subject, one URI SAN) with its intermediate as the rest of
    /// its chain.
    #[test]
    fn details_are_envoys_fields_in_envoys_order() {
        let (leaf, inter) = (der(LEAF), der(INTERMEDIATE));
        let pem = url_encoded_pem(&leaf);
        assert_eq!(pem, envoy_encoded(LEAF));
        let v = details(&leaf, &[]).expect("the fixture parses");
        assert_eq!(
            v,
            format!(
                // The hash as `openssl x509 -fingerprint -sha256` prints it for the fixture.
                "Hash=4942c8e743fcab0f76ea63664a4edebe8923d24d8bda89172d7bce7a2d264913;Cert=\"{pem}\";Chain=\"{pem}\";Subject=\"\";URI=spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc2/svc/server"
            )
        );
        let chained = details(&leaf, &inter).unwrap();
        let chain = format!("{pem}{}", envoy_encoded(INTERMEDIATE));
        assert!(
            chained.contains(&format!(";Chain=\"{chain}\";")),
            "{chained}"
        );
        assert!(chained.bytes().all(|b| b.is_ascii_graphic()));
        // What is not a certificate gives no value at all.
        assert_eq!(details(b"nope", &[]), None);
        assert_eq!(details(&leaf, b"junk"), None);
    }

    #[test]
    fn subjects_are_escaped_so_the_quoted_field_cannot_end() {
        assert_eq!(escape(b"web"), "web");
        assert_eq!(escape(b"a\"b;c,d"), "a\\\"b\\;c\\,d");
        assert_eq!(escape(b"x\r\ny"), "x\\0D\\0Ay");
        assert_eq!(escape(b" #lead"), "\\ #lead");
        assert!(!plain(b';') && !plain(b'\n') && plain(b':'));
    }
}
