//! One identity check: an mTLS handshake with an endpoint, with the sidecar's own leaf (a
//! destination's public listener requires a client certificate), judged by `super::judge`.
//! No application data is ever sent: the handshake is completed and closed.

use std::io;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::{ClientConfig, ClientConnection, DigitallySignedStruct, SignatureScheme};

use super::{judge, Endpoint, Verdict};
use crate::error::{Error, Result};
use crate::pki::Roots;

/// What one check found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    Conclusive(Verdict),
    /// The check could not complete (no answer, connection refused or reset, timeout): it
    /// proves nothing either way, so the slot stays as it was.
    Inconclusive(String),
}

/// The sidecar's own certificate chain and key, as rustls takes them.
#[derive(Clone)]
pub struct Credentials {
    chain: Vec<CertificateDer<'static>>,
    key: Arc<PrivateKeyDer<'static>>,
}

impl std::fmt::Debug for Credentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Credentials({} certificate(s), key)", self.chain.len())
    }
}

impl Credentials {
    /// From the leaf PEM the model holds (chain then key, as HAProxy's `crt` wants it).
    pub fn from_pem(leaf_pem: &str) -> Result<Credentials> {
        let mut chain = Vec::new();
        let mut key = None;
        for block in x509_parser::pem::Pem::iter_from_buffer(leaf_pem.as_bytes()) {
            let pem = block.map_err(|e| Error::msg(format!("the leaf PEM does not parse: {e}")))?;
            match pem.label.as_str() {
                "CERTIFICATE" => chain.push(CertificateDer::from(pem.contents)),
                "EC PRIVATE KEY" => key = Some(PrivateKeyDer::Sec1(pem.contents.into())),
                "PRIVATE KEY" => key = Some(PrivateKeyDer::Pkcs8(pem.contents.into())),
                "RSA PRIVATE KEY" => key = Some(PrivateKeyDer::Pkcs1(pem.contents.into())),
                other => {
                    return Err(Error::msg(format!(
                        "the leaf PEM holds a {other:?} block, neither a certificate nor a key"
                    )))
                }
            }
        }
        match (chain.is_empty(), key) {
            (false, Some(key)) => Ok(Credentials {
                chain,
                key: Arc::new(key),
            }),
            _ => Err(Error::msg(
                "the leaf PEM lacks its certificate or its private key",
            )),
        }
    }
}

impl Credentials {
    /// A TLS client that presents this leaf and lets `verifier` alone judge the server's
    /// certificate (the identity check's and `peering`'s: a SPIFFE ID, no host name).
    pub fn client_config(
        &self,
        provider: Arc<CryptoProvider>,
        verifier: Arc<dyn ServerCertVerifier>,
    ) -> std::result::Result<ClientConfig, rustls::Error> {
        ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(verifier)
            .with_client_auth_cert(self.chain.clone(), self.key.clone_key())
    }
}

/// Checks one endpoint: connect (within `timeout`), handshake, judge, close.
pub fn check(
    endpoint: &Endpoint,
    creds: &Credentials,
    roots: &Arc<Roots>,
    timeout: Duration,
) -> Outcome {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let judge = Arc::new(Judge {
        roots: roots.clone(),
        endpoint: endpoint.clone(),
        provider: provider.clone(),
        seen: Mutex::new(Seen::default()),
    });
    match handshake(endpoint, creds, provider, judge.clone(), timeout) {
        Ok(()) => {}
        Err(Failure::Setup(e)) => return Outcome::Inconclusive(e.to_string()),
        Err(Failure::Io(e)) => {
            // A refusal of ours aborts the handshake, and a server may refuse our certificate
            // after it proved its own (TLS 1.2): either way the verdict is what the judge saw.
            match judge.seen() {
                Seen {
                    certificate: Some(Err(presented)),
                    ..
                } => return Outcome::Conclusive(Verdict::Refused { presented }),
                Seen {
                    certificate: Some(Ok(common_name)),
                    signed: true,
                } => return Outcome::Conclusive(Verdict::Proven { common_name }),
                _ => {}
            }
            return match e.kind() {
                // Spoke, but not TLS as a sidecar speaks it.
                io::ErrorKind::InvalidData => Outcome::Conclusive(Verdict::Refused {
                    presented: format!("no mesh TLS handshake ({e})"),
                }),
                _ => Outcome::Inconclusive(e.to_string()),
            };
        }
    }
    let seen = judge.seen();
    match (seen.certificate, seen.signed) {
        (Some(Ok(common_name)), true) => Outcome::Conclusive(Verdict::Proven { common_name }),
        (Some(Err(presented)), _) => Outcome::Conclusive(Verdict::Refused { presented }),
        // rustls calls both before it lets a handshake complete; never reached in practice.
        _ => Outcome::Inconclusive("the handshake completed unjudged".into()),
    }
}

enum Failure {
    Setup(Error),
    Io(io::Error),
}

fn handshake(
    endpoint: &Endpoint,
    creds: &Credentials,
    provider: Arc<CryptoProvider>,
    judge: Arc<Judge>,
    timeout: Duration,
) -> std::result::Result<(), Failure> {
    let setup = |what: &str, e: &dyn std::fmt::Display| {
        Failure::Setup(Error::msg(format!(
            "{what} for the check of {endpoint}: {e}"
        )))
    };
    let config = creds
        .client_config(provider, judge)
        .map_err(|e| setup("the TLS client", &e))?;
    // An IP address sends no SNI, as HAProxy's servers do.
    let name = ServerName::try_from(endpoint.address.clone())
        .map_err(|e| setup("the endpoint's address", &e))?;
    let mut conn =
        ClientConnection::new(Arc::new(config), name).map_err(|e| setup("TLS client", &e))?;
    let deadline = Instant::now() + timeout;
    let addr = (endpoint.address.as_str(), endpoint.port)
        .to_socket_addrs()
        .map_err(Failure::Io)?
        .next()
        .ok_or_else(|| Failure::Io(io::Error::other("the address resolves to nothing")))?;
    let mut sock = TcpStream::connect_timeout(&addr, timeout).map_err(Failure::Io)?;
    while conn.is_handshaking() {
        let left = deadline
            .checked_duration_since(Instant::now())
            .filter(|d| !d.is_zero())
            .ok_or_else(|| Failure::Io(io::Error::new(io::ErrorKind::TimedOut, "timed out")))?;
        sock.set_read_timeout(Some(left)).map_err(Failure::Io)?;
        sock.set_write_timeout(Some(left)).map_err(Failure::Io)?;
        conn.complete_io(&mut sock).map_err(Failure::Io)?;
    }
    conn.send_close_notify();
    // The close is a courtesy: the verdict is already in.
    let _ = conn.complete_io(&mut sock);
    Ok(())
}

#[derive(Clone, Debug, Default)]
struct Seen {
    /// The judge's verdict on the end-entity certificate: its CN, or what it presented.
    certificate: Option<std::result::Result<Option<String>, String>>,
    /// Whether the endpoint proved it holds that certificate's key (handshake signature).
    signed: bool,
}

/// rustls's verifier for one check: the certificate is judged by `super::judge` (chain to the
/// current roots, SPIFFE path), the handshake signature by rustls's own algorithms.
#[derive(Debug)]
struct Judge {
    roots: Arc<Roots>,
    endpoint: Endpoint,
    provider: Arc<CryptoProvider>,
    seen: Mutex<Seen>,
}

impl Judge {
    fn seen(&self) -> Seen {
        self.seen.lock().map(|s| s.clone()).unwrap_or_default()
    }

    fn record(&self, f: impl FnOnce(&mut Seen)) {
        if let Ok(mut s) = self.seen.lock() {
            f(&mut s);
        }
    }

    fn signature(
        &self,
        ok: std::result::Result<HandshakeSignatureValid, rustls::Error>,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        if ok.is_ok() {
            self.record(|s| s.signed = true);
        }
        ok
    }
}

impl ServerCertVerifier for Judge {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        let intermediates: Vec<&[u8]> = intermediates.iter().map(|c| c.as_ref()).collect();
        let verdict = judge(
            &self.roots,
            end_entity.as_ref(),
            &intermediates,
            &self.endpoint.identity,
            crate::clock::now(),
        );
        let refused = verdict.as_ref().err().cloned();
        self.record(|s| s.certificate = Some(verdict));
        match refused {
            None => Ok(ServerCertVerified::assertion()),
            Some(presented) => Err(rustls::Error::General(format!(
                "the endpoint presented {presented}"
            ))),
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        ))
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
        self.signature(rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        ))
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}
