//! Upstream identity: whether the endpoint behind a server slot can prove it is the destination.
//!
//! HAProxy (up to 3.5-dev) cannot match a server certificate's SPIFFE URI SAN, so the sidecar
//! checks it itself, per endpoint and off the data path: `checker` completes an mTLS handshake
//! with each endpoint (`probe`), and its verdicts come back to the supervisor as a snapshot
//! input, so that `model::build` stays pure and keeps every slot whose endpoint has not proven
//! its identity in maintenance. This file is the pure part: what an endpoint must prove
//! (`Identity`), how a presented identity is compared (`Identity::matches`), and the verdicts.
//! **Invariant:** knows nothing of HAProxy or of the model.

pub mod checker;
pub mod probe;

use std::collections::BTreeMap;

use crate::pki::SpiffeId;

/// Consul's name for the namespace and partition of a service outside Consul Enterprise.
pub const DEFAULT: &str = "default";

/// The service identity an endpoint must present: the path of its SPIFFE ID. The trust
/// domain is not part of it: current Consul compares the path only (the chain to the current
/// roots is what makes the certificate ours), so that a trust domain migration keeps working.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Identity {
    pub service: String,
    pub namespace: String,
    pub partition: String,
    pub datacenter: String,
}

impl Identity {
    /// The identity of `service` in the default namespace and partition of `datacenter`.
    pub fn service(service: &str, datacenter: &str) -> Identity {
        Identity {
            service: service.to_string(),
            namespace: DEFAULT.to_string(),
            partition: DEFAULT.to_string(),
            datacenter: datacenter.to_string(),
        }
    }

    /// The identity a SPIFFE ID names (its trust domain aside).
    pub fn of(id: &SpiffeId) -> Identity {
        Identity {
            service: id.service.clone(),
            namespace: id.namespace.clone(),
            partition: id.partition.clone().unwrap_or_else(|| DEFAULT.to_string()),
            datacenter: id.datacenter.clone(),
        }
    }

    /// The path of the SPIFFE ID Consul issues for this identity (`/ap/…` only outside the
    /// default partition, as Consul writes it).
    pub fn path(&self) -> String {
        let base = format!(
            "/ns/{}/dc/{}/svc/{}",
            self.namespace, self.datacenter, self.service
        );
        if self.partition.is_empty() || self.partition == DEFAULT {
            base
        } else {
            format!("/ap/{}{base}", self.partition)
        }
    }

    /// Whether a presented identity is this one. Case-insensitive, as Consul's
    /// `verifyServerCertMatchesURI` compares (`strings.EqualFold` on the URI with the host
    /// replaced); a missing partition segment is the default partition.
    pub fn matches(&self, presented: &SpiffeId) -> bool {
        let partition = presented.partition.as_deref().unwrap_or(DEFAULT);
        let eq = |a: &str, b: &str| a.eq_ignore_ascii_case(b);
        eq(&presented.service, &self.service)
            && eq(&presented.namespace, or_default(&self.namespace))
            && eq(partition, or_default(&self.partition))
            && eq(&presented.datacenter, &self.datacenter)
    }

    /// The CN Consul before 1.11 put in this identity's leaves
    /// (`<svc>.svc.<ns>.<first 8 characters of the trust domain>.consul`), which HAProxy's
    /// `verifyhost` can check on every connection.
    pub fn legacy_common_name(&self, trust_domain: &str) -> Option<String> {
        let short = trust_domain.get(..8)?;
        Some(format!(
            "{}.svc.{}.{short}.consul",
            self.service,
            or_default(&self.namespace)
        ))
    }
}

fn or_default(s: &str) -> &str {
    if s.is_empty() {
        DEFAULT
    } else {
        s
    }
}

/// One endpoint as it must be checked: where it is and who it must be. Two upstreams that
/// reach the same endpoint expecting the same identity share one check.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize)]
pub struct Endpoint {
    pub address: String,
    pub port: u16,
    pub identity: Identity,
}

impl std::fmt::Display for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{}:{} (expected {})",
            self.address,
            self.port,
            self.identity.path()
        )
    }
}

/// What to check, and with what: the endpoints of every server slot, the sidecar's own leaf
/// (chain and key) and the CA roots.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Wanted {
    pub endpoints: std::collections::BTreeSet<Endpoint>,
    pub leaf_pem: String,
    pub roots_pem: String,
}

/// What the last check that completed found.
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize)]
pub enum Verdict {
    /// The endpoint completed the handshake with a certificate of the expected identity,
    /// signed by a current root. `common_name` is its subject CN, if it had one.
    Proven { common_name: Option<String> },
    /// The endpoint presented something else; `presented` says what (its URI SAN, or why its
    /// certificate or handshake was refused).
    Refused { presented: String },
}

/// The last conclusive verdict of every endpoint currently wanted. A check that could not
/// complete changes nothing here: the slot stays as it was.
pub type Verdicts = BTreeMap<Endpoint, Verdict>;

/// Judges a presented end-entity certificate (and the intermediates sent with it) against
/// `expected`; `Ok` with its CN, or `Err` with what it presented.
pub fn judge(
    roots: &crate::pki::Roots,
    der: &[u8],
    intermediates: &[&[u8]],
    expected: &Identity,
    now: std::time::SystemTime,
) -> Result<Option<String>, String> {
    let (uri, id) =
        roots
            .certify_server(der, intermediates, now)
            .map_err(|(why, uri)| match uri {
                Some(uri) => format!("{uri} ({why})"),
                None => why,
            })?;
    if !expected.matches(&id) {
        return Err(uri);
    }
    Ok(common_name(der))
}

/// The subject CN of a certificate, when it has exactly one readable.
pub fn common_name(der: &[u8]) -> Option<String> {
    use x509_parser::prelude::FromDer;
    let (_, cert) = x509_parser::certificate::X509Certificate::from_der(der).ok()?;
    let mut cns = cert.subject().iter_common_name();
    let cn = cns.next()?.as_str().ok()?.to_string();
    cns.next().is_none().then_some(cn)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::Roots;

    fn presented(uri: &str) -> SpiffeId {
        SpiffeId::parse(uri).unwrap()
    }

    const TD: &str = "spiffe://11111111-2222-3333-4444-555555555555.consul";

    #[test]
    fn the_service_namespace_and_datacenter_must_all_match() {
        let want = Identity::service("server", "dc1");
        assert!(want.matches(&presented(&format!("{TD}/ns/default/dc/dc1/svc/server"))));
        for wrong in [
            "/ns/default/dc/dc1/svc/rogue",
            "/ns/default/dc/dc2/svc/server",
            "/ns/other/dc/dc1/svc/server",
            "/ns/default/dc/dc1/svc/server-sidecar-proxy",
            "/ns/default/dc/dc1/svc/serve",
        ] {
            assert!(
                !want.matches(&presented(&format!("{TD}{wrong}"))),
                "{wrong}"
            );
        }
        let mut ns = want.clone();
        ns.namespace = "team-a".into();
        assert!(ns.matches(&presented(&format!("{TD}/ns/team-a/dc/dc1/svc/server"))));
        assert!(!ns.matches(&presented(&format!("{TD}/ns/default/dc/dc1/svc/server"))));
    }

    #[test]
    fn the_partition_segment_is_compared_and_absent_means_default() {
        let want = Identity::service("server", "dc1");
        // Consul 1.16 writes /ap/ only outside the default partition.
        assert!(want.matches(&presented(&format!(
            "{TD}/ap/default/ns/default/dc/dc1/svc/server"
        ))));
        assert!(!want.matches(&presented(&format!(
            "{TD}/ap/team/ns/default/dc/dc1/svc/server"
        ))));
        let mut team = want.clone();
        team.partition = "team".into();
        assert_eq!(team.path(), "/ap/team/ns/default/dc/dc1/svc/server");
        assert!(team.matches(&presented(&format!(
            "{TD}/ap/team/ns/default/dc/dc1/svc/server"
        ))));
        assert!(!team.matches(&presented(&format!("{TD}/ns/default/dc/dc1/svc/server"))));
        assert_eq!(want.path(), "/ns/default/dc/dc1/svc/server");
    }

    #[test]
    fn the_trust_domain_host_is_not_compared_and_case_does_not_matter() {
        let want = Identity::service("server", "dc1");
        assert!(want.matches(&presented(
            "spiffe://aaaaaaaa-0000-0000-0000-000000000000.consul/ns/default/dc/dc1/svc/server"
        )));
        assert!(want.matches(&presented(&format!("{TD}/ns/Default/dc/DC1/svc/Server"))));
    }

    #[test]
    fn the_legacy_common_name_is_consul_1_8s() {
        let want = Identity::service("server", "dc1");
        assert_eq!(
            want.legacy_common_name("11111111-2222-3333-4444-555555555555.consul")
                .as_deref(),
            Some("server.svc.default.11111111.consul")
        );
        assert_eq!(want.legacy_common_name("short"), None);
    }

    #[test]
    fn recorded_leaves_are_judged_by_their_path_and_chain() {
        use crate::model::fixtures::{json, CONSUL_VERSIONS};
        for v in CONSUL_VERSIONS {
            let roots: crate::consul::api::CaRoots = json(v, "ca-roots.json");
            let pem: String = roots.roots.iter().map(|r| r.root_cert.clone()).collect();
            let table = Roots::from_pem(&pem).unwrap();
            let leaf: crate::consul::api::LeafCert = json(v, "ca-leaf-server.json");
            let block = &crate::model::pem_blocks(&leaf.cert_pem, "CERTIFICATE")[0];
            let der = x509_parser::pem::parse_x509_pem(block.as_bytes())
                .unwrap()
                .1
                .contents;
            let at = crate::clock::test_support::inside_validity(&der);
            let cn = judge(&table, &der, &[], &Identity::service("server", "dc1"), at);
            match v {
                "1.8.7" => assert_eq!(
                    cn,
                    Ok(Some("server.svc.default.11111111.consul".into())),
                    "{v}"
                ),
                _ => assert_eq!(cn, Ok(None), "{v}: current leaves carry no CN"),
            }
            let wrong = judge(&table, &der, &[], &Identity::service("web", "dc1"), at).unwrap_err();
            assert!(wrong.ends_with("/ns/default/dc/dc1/svc/server"), "{wrong}");
            // A certificate no current root signed is refused, whatever it claims.
            let other =
                Roots::from_pem(&crate::model::pem_blocks(&leaf.cert_pem, "CERTIFICATE")[0])
                    .unwrap();
            let unsigned = judge(&other, &der, &[], &Identity::service("server", "dc1"), at);
            assert!(
                unsigned
                    .as_ref()
                    .is_err_and(|e| e.contains("not signed by a current CA root")),
                "{unsigned:?}"
            );
        }
    }

    #[test]
    fn a_leaf_signed_by_an_intermediate_of_a_current_root_is_judged_by_its_path() {
        // fixtures/identity: root -> intermediate -> leaf of server in dc2, as a secondary
        // datacenter's leaves are signed (see fixtures/identity/README.md).
        let read = |name: &str| {
            let path = format!("{}/fixtures/identity/{name}", env!("CARGO_MANIFEST_DIR"));
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{path}: {e}"))
        };
        let der = |pem: &str| {
            x509_parser::pem::parse_x509_pem(pem.as_bytes())
                .unwrap()
                .1
                .contents
        };
        let (root, inter, leaf) = (read("root.pem"), read("intermediate.pem"), read("leaf.pem"));
        let (inter_der, leaf_der) = (der(&inter), der(&leaf));
        let table = Roots::from_pem(&root).unwrap();
        let at = crate::clock::test_support::inside_validity(&leaf_der);
        let dc2 = Identity::service("server", "dc2");
        assert_eq!(judge(&table, &leaf_der, &[&inter_der], &dc2, at), Ok(None));
        let alone = judge(&table, &leaf_der, &[], &dc2, at).unwrap_err();
        assert!(alone.contains("not signed by a current CA root"), "{alone}");
        // The intermediate must itself come from a current root, and be a CA.
        let consul: crate::consul::api::CaRoots =
            crate::model::fixtures::json(crate::model::fixtures::ANY, "ca-roots.json");
        let unrelated = Roots::from_pem(&consul.roots[0].root_cert).unwrap();
        assert!(
            judge(&unrelated, &leaf_der, &[&inter_der], &dc2, at).is_err(),
            "an intermediate of another root"
        );
        // A certificate that is no CA, though signed by the root, really signed this leaf
        // (fixtures/identity/not-a-ca): only the CA check refuses it, not the signature.
        let (nc_root, nc_signer, nc_leaf) = (
            read("not-a-ca/root.pem"),
            read("not-a-ca/signer.pem"),
            read("not-a-ca/leaf.pem"),
        );
        let (nc_signer_der, nc_leaf_der) = (der(&nc_signer), der(&nc_leaf));
        let nc_table = Roots::from_pem(&nc_root).unwrap();
        let nc_at = crate::clock::test_support::inside_validity(&nc_leaf_der);
        assert!(
            judge(&nc_table, &nc_leaf_der, &[&nc_signer_der], &dc2, nc_at).is_err(),
            "a leaf signed by a certificate that is no CA"
        );
        let dc1 = Identity::service("server", "dc1");
        let wrong = judge(&table, &leaf_der, &[&inter_der], &dc1, at).unwrap_err();
        assert!(wrong.ends_with("/ns/default/dc/dc2/svc/server"), "{wrong}");
    }
}
