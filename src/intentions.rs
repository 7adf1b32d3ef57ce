//! The authorisation table the SPOE agent decides from, built from a snapshot by a pure function.
//! Anything unknown (intentions, default policy, roots) makes a table that denies everything,
//! with the reason: intentions fail closed.

use crate::consul::api::IntentionEntry;
use crate::snapshot::Snapshot;
use crate::spoe::authz::{Action, AuthzTable, Intention};

/// The intentions whose destination is `service` (or `*`), in Consul's default namespace, the
/// only one Consul CE has.
pub fn for_destination(all: &[IntentionEntry], service: &str) -> Vec<Intention> {
    let default_ns = |ns: &str| ns.is_empty() || ns == "default" || ns == "*";
    all.iter()
        .filter(|i| i.destination_name == service || i.destination_name == "*")
        .filter(|i| default_ns(&i.destination_ns) && default_ns(&i.source_ns))
        .map(|i| Intention {
            source: i.source_name.clone(),
            action: if i.action.eq_ignore_ascii_case("allow") {
                Action::Allow
            } else {
                // Anything but an explicit allow (deny, or an L7 intention 1.8 cannot express
                // here) denies, as Consul's own authorize does.
                Action::Deny
            },
            precedence: i.precedence,
        })
        .collect()
}

/// With enforcement off: what Consul would deny that this sidecar lets through, for a warning.
/// `None` while the intentions or the default policy are unknown.
pub fn ignored_denials(snapshot: &Snapshot) -> Option<String> {
    let service = snapshot
        .registration
        .as_ref()
        .and_then(|r| r.proxy.as_ref())
        .map(|p| p.destination_service_name.as_str())?;
    let intentions = snapshot.intentions.as_ref()?;
    let default_allow = snapshot.default_allow?;
    let denied: Vec<String> = for_destination(intentions, service)
        .into_iter()
        .filter(|i| i.action == Action::Deny)
        .map(|i| i.source)
        .collect();
    if denied.is_empty() && default_allow {
        return Some(String::new());
    }
    let mut what = Vec::new();
    if !denied.is_empty() {
        what.push(format!(
            "deny intentions from {} to {service}",
            denied.join(", ")
        ));
    }
    if !default_allow {
        what.push("the ACL default policy deny".to_string());
    }
    Some(format!(
        "intentions are NOT enforced (-enable-intentions is off), so {} are ignored: every client with a mesh certificate gets through",
        what.join(" and ")
    ))
}

pub fn table(snapshot: &Snapshot) -> AuthzTable {
    let service = snapshot
        .registration
        .as_ref()
        .and_then(|r| r.proxy.as_ref())
        .map(|p| p.destination_service_name.as_str())
        .unwrap_or("");
    let (Some(intentions), Some(default_allow), Some(roots)) = (
        &snapshot.intentions,
        snapshot.default_allow,
        &snapshot.roots,
    ) else {
        let mut missing = Vec::new();
        if snapshot.intentions.is_none() {
            missing.push("the intentions");
        }
        if snapshot.default_allow.is_none() {
            missing.push("the ACL default policy");
        }
        if snapshot.roots.is_none() {
            missing.push("the CA roots");
        }
        return AuthzTable::deny_all(format!("not yet known: {}", missing.join(", ")));
    };
    if service.is_empty() {
        return AuthzTable::deny_all("the proxy registration is not known yet");
    }
    let roots_pem: String = roots
        .roots
        .iter()
        .map(|r| r.root_cert.as_str())
        .collect::<Vec<_>>()
        .join("\n");
    match AuthzTable::new(
        roots.trust_domain.clone(),
        &roots_pem,
        for_destination(intentions, service),
        default_allow,
    ) {
        Ok(t) => t,
        Err(e) => AuthzTable::deny_all(format!("the CA roots cannot be used: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::test_support::inside_validity;
    use crate::consul::api::{CaRoots, LeafCert};
    use crate::model::fixtures::{json, snapshot};

    fn der(leaf: &LeafCert) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).unwrap();
        pem.contents
    }

    /// Judges a recorded leaf an hour into its own validity: Consul's leaves live 72 hours,
    /// so the wall clock would turn these verdicts by the calendar.
    fn decide(t: &crate::spoe::authz::AuthzTable, der: &[u8]) -> crate::spoe::authz::Decision {
        t.decide_at(Some(der), inside_validity(der))
    }

    fn server_snapshot(default_allow: Option<bool>) -> Snapshot {
        let mut s = snapshot("server-sidecar-proxy", "ca-leaf-server.json");
        let matched: serde_json::Value = json("intentions-match-server.json");
        let list: Vec<IntentionEntry> = serde_json::from_value(matched["server"].clone()).unwrap();
        s.intentions = Some(list);
        s.default_allow = default_allow;
        s
    }

    #[test]
    fn unknown_inputs_deny_everything() {
        let client: LeafCert = json("ca-leaf-client.json");
        let t = table(&server_snapshot(None));
        let d = decide(&t, &der(&client));
        assert!(!d.allow);
        assert!(d.reason.contains("ACL default policy"), "{}", d.reason);
    }

    /// Agreement with Consul's own answers, recorded from the same agent as the certificates:
    /// client → server is denied by an exact intention, rich → server allowed by `*`.
    #[test]
    fn decisions_agree_with_consul_authorize() {
        let t = table(&server_snapshot(Some(true)));
        for (leaf, authorize) in [
            ("ca-leaf-client.json", "authorize-client-to-server.json"),
            ("ca-leaf-rich.json", "authorize-rich-to-server.json"),
        ] {
            let leaf: LeafCert = json(leaf);
            let consul: serde_json::Value = json(authorize);
            let want = consul["Authorized"].as_bool().unwrap();
            let d = decide(&t, &der(&leaf));
            assert_eq!(
                d.allow, want,
                "{}: ours {:?}, Consul {consul}",
                leaf.service, d.reason
            );
        }
    }

    #[test]
    fn ignored_denials_are_named_when_enforcement_is_off() {
        let s = server_snapshot(Some(true));
        let warning = ignored_denials(&s).unwrap();
        assert!(
            warning.contains("deny intentions from client to server"),
            "{warning}"
        );
        let mut s = server_snapshot(Some(true));
        s.intentions = Some(Vec::new());
        assert_eq!(ignored_denials(&s).as_deref(), Some(""));
        s.default_allow = Some(false);
        assert!(ignored_denials(&s).unwrap().contains("default policy deny"));
        s.default_allow = None;
        assert!(ignored_denials(&s).is_none());
    }

    #[test]
    fn other_destinations_are_ignored() {
        let all = vec![
            IntentionEntry {
                source_name: "a".into(),
                destination_name: "server".into(),
                action: "deny".into(),
                precedence: 9,
                ..Default::default()
            },
            IntentionEntry {
                source_name: "a".into(),
                destination_name: "other".into(),
                action: "allow".into(),
                precedence: 9,
                ..Default::default()
            },
            IntentionEntry {
                source_name: "*".into(),
                destination_name: "*".into(),
                action: "allow".into(),
                precedence: 5,
                ..Default::default()
            },
        ];
        let mine = for_destination(&all, "server");
        assert_eq!(mine.len(), 2);
        assert!(mine.iter().all(|i| i.source == "a" || i.source == "*"));
        let roots: CaRoots = json("ca-roots.json");
        assert!(!roots.roots.is_empty());
    }
}
