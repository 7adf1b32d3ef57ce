//! Certificates of the mesh: Consul service identities (SPIFFE IDs) and the chain from a
//! certificate to the current CA roots. Pure, no I/O; a leaf module below `spoe` (the inbound
//! decision), `admission` (upstream identities) and `peering` (a peer's servers).
//!
//! Checking a signature is an ECDSA verification, the most expensive step of a decision when
//! done every time, and its answer for a given certificate and root set never changes. So
//! [`Roots`] remembers, per exact certificate (the whole DER, never a digest or a part an
//! attacker could vary), which of its roots signed it. The memory dies with the value, which
//! is rebuilt whenever the roots change.

mod memo;
mod spiffe;
#[cfg(test)]
mod tests;

pub(crate) use memo::ForgetfulMap;
pub use spiffe::SpiffeId;

use std::fmt;
use std::time::{SystemTime, UNIX_EPOCH};

use x509_parser::certificate::X509Certificate;
use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;
use x509_parser::prelude::FromDer;
use x509_parser::time::ASN1Time;

/// Why a set of CA roots could not be built.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootsError {
    /// The PEM text is malformed.
    Pem(String),
    /// A PEM block holds something other than a certificate (a key pasted by mistake…).
    NotCertificate { label: String },
    /// Root number `index` (0-based) is not a DER X.509 certificate.
    BadRoot { index: usize, detail: String },
    /// A table without roots could only deny; nothing could ever be certified.
    NoRoots,
}

impl fmt::Display for RootsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            RootsError::Pem(e) => write!(f, "CA roots: bad PEM: {e}"),
            RootsError::NotCertificate { label } => {
                write!(f, "CA roots: PEM block \"{label}\" is not a CERTIFICATE")
            }
            RootsError::BadRoot { index, detail } => {
                write!(f, "CA root #{index} is not an X.509 certificate: {detail}")
            }
            RootsError::NoRoots => f.write_str("no CA roots"),
        }
    }
}

impl std::error::Error for RootsError {}

#[derive(Debug, Clone)]
struct Root {
    der: Vec<u8>,
    not_before: ASN1Time,
    not_after: ASN1Time,
}

/// Distinct client certificates a sidecar sees are its callers' leaves, a few per calling
/// instance; this bounds the remembered signers (about 1 MB of DER) should something else arrive.
const SIGNER_MEMORY: usize = 1024;

/// A set of CA roots and what they certify. A clone starts with nothing remembered.
#[derive(Debug, Clone)]
pub struct Roots {
    roots: Vec<Root>,
    /// Which roots' keys verified each certificate seen (see the module comment).
    signers: ForgetfulMap<Vec<u8>, Vec<usize>>,
}

impl Roots {
    /// Roots from PEM (Consul's `RootCert` values, any number of certificates concatenated).
    pub fn from_pem(pem: &str) -> Result<Roots, RootsError> {
        let mut roots = Vec::new();
        for block in Pem::iter_from_buffer(pem.as_bytes()) {
            let pem = block.map_err(|e| RootsError::Pem(e.to_string()))?;
            if pem.label != "CERTIFICATE" {
                return Err(RootsError::NotCertificate { label: pem.label });
            }
            roots.push(pem.contents);
        }
        Self::from_der(roots)
    }

    /// Roots from DER, at least one.
    pub fn from_der(roots_der: Vec<Vec<u8>>) -> Result<Roots, RootsError> {
        if roots_der.is_empty() {
            return Err(RootsError::NoRoots);
        }
        let mut roots = Vec::with_capacity(roots_der.len());
        for (index, der) in roots_der.into_iter().enumerate() {
            let validity = match X509Certificate::from_der(&der) {
                Ok((_, cert)) => cert.validity().clone(),
                Err(e) => {
                    return Err(RootsError::BadRoot {
                        index,
                        detail: e.to_string(),
                    })
                }
            };
            roots.push(Root {
                der,
                not_before: validity.not_before,
                not_after: validity.not_after,
            });
        }
        Ok(Roots {
            roots,
            signers: ForgetfulMap::new(SIGNER_MEMORY),
        })
    }

    /// No roots: certifies nothing (a table that denies everything holds these).
    pub(crate) fn none() -> Roots {
        Roots {
            roots: Vec::new(),
            signers: ForgetfulMap::new(SIGNER_MEMORY),
        }
    }

    /// DER of each root, in the order given.
    pub fn ders(&self) -> impl Iterator<Item = &[u8]> {
        self.roots.iter().map(|r| r.der.as_slice())
    }

    /// How many certificates have their signers remembered.
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> usize {
        self.signers.len()
    }

    /// The service identity a server presented (`der`, its end-entity certificate, and the
    /// `intermediates` it sent with it), as `(URI SAN, parsed)`, if the certificate is valid
    /// now, is for server authentication and was signed by a current root, or by one of those
    /// intermediates that a current root signed (leaves of a secondary datacenter); else why
    /// not, with the URI it carried if any. The trust domain is not compared: a server is
    /// judged by its path (the upstream identity check).
    pub fn certify_server(
        &self,
        der: &[u8],
        intermediates: &[&[u8]],
        now: SystemTime,
    ) -> Result<(String, SpiffeId), (String, Option<String>)> {
        self.certified(der, now, Role::Server, intermediates, |_| Ok(()))
            .map(|(uri, id)| (uri.to_owned(), id))
            .map_err(|(why, uri)| (why, uri.map(str::to_owned)))
    }

    /// What both sides of a mesh connection check of the other's certificate, in the order a
    /// denial names the first problem: it parses, its first URI SAN is a service identity that
    /// `check_id` accepts, it is valid at `now`, it is for `role`'s usage, a current root
    /// signed it (or one of `intermediates` that a current root signed).
    pub fn certified<'a>(
        &self,
        der: &'a [u8],
        now: SystemTime,
        role: Role,
        intermediates: &[&[u8]],
        check_id: impl Fn(&SpiffeId) -> crate::error::Result<()>,
    ) -> Result<(&'a str, SpiffeId), (String, Option<&'a str>)> {
        let word = role.word();
        let cert = match X509Certificate::from_der(der) {
            Ok(([], cert)) => cert,
            Ok((rest, _)) => {
                return Err((
                    format!("{word} certificate has {} trailing bytes", rest.len()),
                    None,
                ))
            }
            Err(e) => return Err((format!("{word} certificate does not parse: {e}"), None)),
        };

        // Consul's own proxies identify a peer by the first URI SAN and nothing else (not
        // the CN, which newer leaves do not even have).
        let uri = match cert.subject_alternative_name() {
            Err(e) => return Err((format!("{word} certificate SAN is invalid: {e}"), None)),
            Ok(None) => return Err((format!("{word} certificate has no SAN"), None)),
            Ok(Some(san)) => san.value.general_names.iter().find_map(|n| match n {
                GeneralName::URI(u) => Some(*u),
                _ => None,
            }),
        };
        let Some(uri) = uri else {
            return Err((format!("{word} certificate has no URI SAN"), None));
        };
        let src = Some(uri);
        let id = SpiffeId::parse(uri).map_err(|e| {
            (
                format!("URI SAN is not a Consul service identity: {e}"),
                src,
            )
        })?;
        check_id(&id).map_err(|why| (why.to_string(), src))?;

        let now = to_asn1(now).ok_or_else(|| ("system clock is out of range".to_string(), src))?;
        let validity = cert.validity();
        if now < validity.not_before {
            return Err((
                format!(
                    "{word} certificate not valid before {}",
                    validity.not_before
                ),
                src,
            ));
        }
        if now > validity.not_after {
            return Err((
                format!("{word} certificate expired at {}", validity.not_after),
                src,
            ));
        }
        // Consul's verifier requires the usage of the side; an absent extension means any.
        match cert.extended_key_usage() {
            Err(e) => {
                return Err((
                    format!("{word} certificate extended key usage is invalid: {e}"),
                    src,
                ))
            }
            Ok(Some(eku)) if !eku.value.any && !role.usage_in(eku.value) => {
                return Err((
                    format!("{word} certificate is not for {word} authentication"),
                    src,
                ))
            }
            Ok(_) => {}
        }
        if let Err(why) = self.check_issuer(der, &cert, now, word) {
            let via = intermediates
                .iter()
                .any(|i| self.signed_via(&cert, i, now).is_ok());
            if !via {
                return Err((why, src));
            }
        }
        Ok((uri, id))
    }
    /// Whether `intermediate` is a CA valid at `now`, signed by a current root, that signed
    /// `cert`.
    fn signed_via(
        &self,
        cert: &X509Certificate<'_>,
        intermediate: &[u8],
        now: ASN1Time,
    ) -> Result<(), String> {
        let inter = match X509Certificate::from_der(intermediate) {
            Ok(([], c)) => c,
            _ => return Err("the intermediate does not parse".into()),
        };
        let v = inter.validity();
        if now < v.not_before || now > v.not_after {
            return Err("the intermediate is not valid at this time".into());
        }
        if !inter.is_ca() {
            return Err("the intermediate is not a CA".into());
        }
        cert.verify_signature(Some(inter.public_key()))
            .map_err(|e| format!("the intermediate did not sign it: {e}"))?;
        self.check_issuer(intermediate, &inter, now, "intermediate")
    }

    /// Accepts the certificate only if one of the current roots signed it directly.
    fn check_issuer(
        &self,
        der: &[u8],
        cert: &X509Certificate<'_>,
        now: ASN1Time,
        role: &str,
    ) -> Result<(), String> {
        let valid = |r: &Root| r.not_before <= now && now <= r.not_after;
        // Ok, or whether the certificate was signed by a root at all.
        let judge = |signers: &Vec<usize>| {
            if signers
                .iter()
                .any(|&i| self.roots.get(i).is_some_and(valid))
            {
                Ok(())
            } else {
                Err(!signers.is_empty())
            }
        };
        let verdict = match self.signers.read(der, judge) {
            Some(verdict) => verdict,
            None => {
                let found = self.signers_of(cert);
                let verdict = judge(&found);
                self.signers.insert(der.to_vec(), found);
                verdict
            }
        };
        verdict.map_err(|signed| {
            if signed {
                format!("{role} certificate's CA root is not valid at this time")
            } else {
                format!(
                    "{role} certificate (issuer {}) is not signed by a current CA root",
                    cert.issuer()
                )
            }
        })
    }

    /// Indexes of the roots whose key verifies the certificate's signature. Every root is
    /// tried: after a rotation the old and new roots may share a key (cross-signing), and
    /// validity is checked per decision, not here.
    fn signers_of(&self, cert: &X509Certificate<'_>) -> Vec<usize> {
        self.roots
            .iter()
            .enumerate()
            .filter(|(_, root)| {
                X509Certificate::from_der(&root.der).is_ok_and(|(_, root_cert)| {
                    cert.verify_signature(Some(root_cert.public_key())).is_ok()
                })
            })
            .map(|(i, _)| i)
            .collect()
    }
}

/// Which side of a connection presented the certificate being checked.
#[derive(Clone, Copy)]
pub enum Role {
    Client,
    Server,
}

impl Role {
    fn word(self) -> &'static str {
        match self {
            Role::Client => "client",
            Role::Server => "server",
        }
    }

    fn usage_in(self, eku: &x509_parser::extensions::ExtendedKeyUsage<'_>) -> bool {
        match self {
            Role::Client => eku.client_auth,
            Role::Server => eku.server_auth,
        }
    }
}

fn to_asn1(t: SystemTime) -> Option<ASN1Time> {
    let secs = match t.duration_since(UNIX_EPOCH) {
        Ok(d) => i64::try_from(d.as_secs()).ok()?,
        Err(e) => i64::try_from(e.duration().as_secs()).ok()?.checked_neg()?,
    };
    ASN1Time::from_timestamp(secs).ok()
}
