//! The authorisation table the SPOE agent decides from, built from a snapshot by a pure function.
//! Anything unknown (intentions, default policy, roots) makes a table that denies everything,
//! with the reason: intentions fail closed. `agent` runs it.

pub mod agent;

use crate::consul::api::IntentionEntry;
use crate::model::{public_mode, Mode};
use crate::snapshot::Snapshot;
use crate::spoe::authz::{jwt, l7, Action, AuthzTable, DefaultPolicy, Intention};

/// The intentions whose destination is `service` (or `*`) in the default namespace and
/// partition, the only ones Consul CE has. Sources keep their namespace, partition and peer:
/// the table matches them as Consul does.
pub fn for_destination(all: &[IntentionEntry], service: &str) -> Vec<Intention> {
    let default = |s: &str| s.is_empty() || s == "default" || s == "*";
    all.iter()
        .filter(|i| i.destination_name == service || i.destination_name == "*")
        .filter(|i| default(&i.destination_ns) && default(&i.destination_partition))
        .map(|i| {
            // The entry's JWT applies to an allow (judged per request) or an L7 source; a
            // deny stays a deny. One that cannot be read denies every request of the source.
            let (jwt, bad_jwt) = match action(i) {
                Action::Deny | Action::Allow => (None, None),
                Action::L7 { .. } => match jwt::Requirement::from_consul(&i.jwt) {
                    Ok(r) => (r, None),
                    Err(e) => (None, Some(format!("the intention's JWT: {e}"))),
                },
            };
            Intention {
                source: i.source_name.clone(),
                source_ns: i.source_ns.clone(),
                source_partition: i.source_partition.clone(),
                source_peer: i.source_peer.clone(),
                action: action(i),
                permissions: match bad_jwt {
                    Some(e) => Err(e),
                    None => l7::parse_all(&i.permissions),
                },
                precedence: i.precedence,
                jwt,
            }
        })
        .collect()
}

/// The `jwt-provider` entries as the table judges them, with what each cannot honour; the
/// warnings name every provider an intention of `service` needs that verifies nothing, and
/// what was ignored, for the log.
pub fn jwt_providers(snapshot: &Snapshot) -> (jwt::Providers, Vec<String>) {
    let Some(known) = &snapshot.jwt_providers else {
        return (jwt::Providers::unknown(), Vec::new());
    };
    // A local file's text, or a remote URI's last fetched key set.
    let read = |f: &str| match (known.files.get(f), known.remote.get(f)) {
        (Some(r), _) => r.clone(),
        (None, Some(text)) => Ok(text.clone()),
        (None, None) if f.starts_with("http") => Err("not fetched yet".to_string()),
        (None, None) => Err("not read".to_string()),
    };
    let mut warnings = Vec::new();
    let mut providers = Vec::new();
    for e in &known.entries {
        match jwt::Provider::from_consul(e, &read) {
            Ok(p) => {
                if let Some(why) = p.unusable() {
                    warnings.push(format!(
                        "jwt-provider {}: {why}; requests that need its tokens are denied",
                        p.name
                    ));
                }
                if !p.ignored.is_empty() {
                    warnings.push(format!(
                        "jwt-provider {}: ignored {}",
                        p.name,
                        p.ignored.join(", ")
                    ));
                }
                providers.push(p);
            }
            Err(e) => warnings.push(format!("a jwt-provider entry is refused: {e}")),
        }
    }
    (jwt::Providers::known(providers), warnings)
}

/// Whether the intention's entry requires a JWT for every request (its top-level `JWT`).
fn requires_jwt(i: &IntentionEntry) -> bool {
    match &i.jwt {
        serde_json::Value::Null => false,
        serde_json::Value::Object(o) => o.values().any(|v| !v.is_null()),
        _ => true,
    }
}

fn action(i: &IntentionEntry) -> Action {
    // An allow that needs a JWT is judged per request (on an http listener, where each is
    // denied with the reason) and denied on a tcp one: never let through unverified.
    if requires_jwt(i) && i.action.eq_ignore_ascii_case("allow") {
        return Action::L7 {
            permissions: i.permissions.len(),
        };
    }
    if !i.permissions.is_empty() {
        return Action::L7 {
            permissions: i.permissions.len(),
        };
    }
    if i.action.eq_ignore_ascii_case("allow") {
        Action::Allow
    } else {
        // Anything but an explicit allow denies, as Consul's own authorize does.
        Action::Deny
    }
}

/// With enforcement off: what Consul would refuse that this sidecar lets through, for a
/// warning. `None` while the intentions or the default policy are unknown.
pub fn ignored_denials(snapshot: &Snapshot) -> Option<String> {
    let service = snapshot
        .registration
        .as_ref()
        .and_then(|r| r.proxy.as_ref())
        .map(|p| p.destination_service_name.as_str())?;
    let intentions = for_destination(snapshot.intentions.as_ref()?, service);
    let policy = DefaultPolicy::parse(snapshot.acl_default_policy.as_ref()?);
    let sources = |keep: fn(&Action) -> bool| -> Vec<String> {
        intentions
            .iter()
            .filter(|i| keep(&i.action))
            .map(Intention::source_label)
            .collect()
    };
    let denied = sources(|a| *a == Action::Deny);
    let l7 = sources(|a| matches!(a, Action::L7 { .. }));
    let mut what = Vec::new();
    if !denied.is_empty() {
        what.push(format!(
            "deny intentions from {} to {service}",
            denied.join(", ")
        ));
    }
    if !l7.is_empty() {
        what.push(format!(
            "L7 intentions (HTTP permissions) from {} to {service}",
            l7.join(", ")
        ));
    }
    match &policy {
        DefaultPolicy::Allow => {}
        DefaultPolicy::Deny => what.push("the ACL default policy deny".to_string()),
        DefaultPolicy::Unknown(v) => what.push(format!("the ACL default policy {v:?}")),
    }
    if what.is_empty() {
        return Some(String::new());
    }
    Some(format!(
        "intentions are NOT enforced (-enable-intentions is off), so {} are ignored: every client with a mesh certificate gets through",
        what.join(" and ")
    ))
}

/// The rules in evaluation order, for the log line that announces a new table: at most
/// `SUMMARY_RULES` of them, then how many more.
pub fn summary(intentions: &[Intention]) -> String {
    const SUMMARY_RULES: usize = 12;
    let mut parts: Vec<String> = intentions
        .iter()
        .take(SUMMARY_RULES)
        .map(|i| format!("{} => {} ({})", i.source_label(), i.action, i.precedence))
        .collect();
    if intentions.len() > SUMMARY_RULES {
        parts.push(format!("and {} more", intentions.len() - SUMMARY_RULES));
    }
    parts.join(", ")
}

pub fn table(snapshot: &Snapshot) -> AuthzTable {
    let proxy = snapshot
        .registration
        .as_ref()
        .and_then(|r| r.proxy.as_ref());
    let service = proxy
        .map(|p| p.destination_service_name.as_str())
        .unwrap_or("");
    let (Some(intentions), Some(policy), Some(roots)) = (
        &snapshot.intentions,
        &snapshot.acl_default_policy,
        &snapshot.roots,
    ) else {
        let mut missing = Vec::new();
        if snapshot.intentions.is_none() {
            missing.push("the intentions");
        }
        if snapshot.acl_default_policy.is_none() {
            missing.push("the ACL default policy");
        }
        if snapshot.roots.is_none() {
            missing.push("the CA roots");
        }
        return AuthzTable::deny_all(format!("not yet known: {}", missing.join(", ")));
    };
    let Some(proxy) = proxy.filter(|_| !service.is_empty()) else {
        return AuthzTable::deny_all("the proxy registration is not known yet");
    };
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
        DefaultPolicy::parse(policy),
    ) {
        Ok(t) => t
            .with_jwt_providers(jwt_providers(snapshot).0)
            .with_peers(peers(snapshot, service))
            .for_http_listener(public_mode(proxy) == Mode::Http),
        Err(e) => AuthzTable::deny_all(format!("the CA roots cannot be used: {e}")),
    }
}

/// The cluster peers `service` is exported to whose peering is read and active, each with a
/// table of its own trust domain and CAs: a client those certify is that peer's, and only
/// intentions naming the peer (`SourcePeer`) decide for it. A peer that cannot be used is
/// left out, so its clients are refused (the model names it in a warning: its CA is left out
/// of the public listener's too).
fn peers(snapshot: &Snapshot, service: &str) -> Vec<(String, AuthzTable)> {
    let exported = snapshot.exported.as_deref().unwrap_or_default();
    crate::consul::exported_to(exported, service)
        .into_iter()
        .filter_map(|name| {
            let p = snapshot.peerings.get(&name)?;
            if p.state.as_deref().is_some_and(|s| s != "ACTIVE") {
                return None;
            }
            let td = p.trust_domain()?;
            let table = AuthzTable::new(&td, &p.ca_pem(), vec![], DefaultPolicy::Deny).ok()?;
            Some((name, table))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::test_support::inside_validity;
    use crate::consul::api::{AgentSelf, LeafCert};
    use crate::model::fixtures::{json, snapshot, CONSUL_VERSIONS};
    use crate::spoe::authz::Decision;

    fn der(leaf: &LeafCert) -> Vec<u8> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(leaf.cert_pem.as_bytes()).unwrap();
        pem.contents
    }

    /// Judges a recorded leaf an hour into its own validity: Consul's leaves live 72 hours,
    /// so the wall clock would turn these verdicts by the calendar.
    fn decide(t: &AuthzTable, der: &[u8]) -> Decision {
        t.decide_at(Some(der), inside_validity(der))
    }

    /// The recorded sidecar of `server` with the intentions list exactly as the watch reads it
    /// (`/v1/connect/intentions`), renamed to `destination` when the test needs another one.
    fn snapshot_for(version: &str, destination: &str, default_policy: Option<&str>) -> Snapshot {
        let mut s = snapshot(version, "server-sidecar-proxy", "ca-leaf-server.json");
        s.intentions = Some(json(version, "intentions.json"));
        s.acl_default_policy = default_policy.map(str::to_string);
        if let Some(p) = s.registration.as_mut().and_then(|r| r.proxy.as_mut()) {
            p.destination_service_name = destination.into();
        }
        s
    }

    #[test]
    fn unknown_inputs_deny_everything() {
        for v in CONSUL_VERSIONS {
            let client: LeafCert = json(v, "ca-leaf-client.json");
            let t = table(&snapshot_for(v, "server", None));
            let d = decide(&t, &der(&client));
            assert!(!d.allow);
            assert!(d.reason.contains("ACL default policy"), "{v}: {}", d.reason);
        }
    }

    /// Agreement with Consul's own answers, recorded from the same agent as the certificates:
    /// client → server is denied by an exact intention, rich → server allowed by `*`.
    #[test]
    fn decisions_agree_with_consul_authorize() {
        for v in CONSUL_VERSIONS {
            let t = table(&snapshot_for(v, "server", Some("allow")));
            for (leaf, authorize) in [
                ("ca-leaf-client.json", "authorize-client-to-server.json"),
                ("ca-leaf-rich.json", "authorize-rich-to-server.json"),
            ] {
                let leaf: LeafCert = json(v, leaf);
                let consul: serde_json::Value = json(v, authorize);
                let want = consul["Authorized"].as_bool().unwrap();
                let d = decide(&t, &der(&leaf));
                assert_eq!(
                    d.allow, want,
                    "{v} {}: ours {:?}, Consul {consul}",
                    leaf.service, d.reason
                );
            }
        }
    }

    /// Consul 1.16.3's `web`: a peer's `client` allowed, `l7c` with HTTP permissions, `*` denied.
    /// Its authorize refused the local `client` (the peer source is not it) and `l7c` (L7).
    #[test]
    fn peer_and_l7_sources_agree_with_consul_1_16() {
        let v = "1.16.3";
        let t = table(&snapshot_for(v, "web", Some("allow")));
        let client: LeafCert = json(v, "ca-leaf-client.json");
        let id = crate::pki::SpiffeId::parse(&client.service_uri).unwrap();
        for (source, authorize) in [
            ("client", "authorize-client-to-web.json"),
            ("l7c", "authorize-l7c-to-web.json"),
            ("other", "authorize-other-to-web.json"),
        ] {
            let consul: serde_json::Value = json(v, authorize);
            let who = crate::pki::SpiffeId {
                service: source.into(),
                ..id.clone()
            };
            let theirs = consul["Authorized"].as_bool().unwrap();
            let ours = t.intentions().iter().find(|i| i.matches(&who));
            let allowed = ours.map_or(t.default_policy().allows(), |i| i.action == Action::Allow);
            assert_eq!(allowed, theirs, "{source}: ours {ours:?}, Consul {consul}");
        }
        // The local client itself, through the whole decision (certificate and all).
        let d = decide(&t, &der(&client));
        assert!(
            !d.allow && d.reason.contains("intention * => deny"),
            "{}",
            d.reason
        );
        let l7 = t.intentions().iter().find(|i| i.source == "l7c").unwrap();
        assert_eq!(l7.action, Action::L7 { permissions: 2 });
        let peer = t
            .intentions()
            .iter()
            .find(|i| i.source == "client")
            .unwrap();
        assert_eq!(peer.source_peer, "peer1");
    }

    /// The exporting side (Consul 1.16.3's `web`, its intention from `peer1` made to name
    /// dc2's recorded `server`): a client that the CA of a peer `web` is exported to certifies
    /// is that peer's, and only an intention naming that peer lets it in. Not exported to the
    /// peer, or the peering not active: refused.
    #[test]
    fn a_peer_exported_to_is_judged_by_its_peer_intentions() {
        let v = "1.16.3";
        let fixture = |name: &str| {
            let path = format!(
                "{}/fixtures/peering/consul-1.16.3/{name}",
                env!("CARGO_MANIFEST_DIR")
            );
            std::fs::read_to_string(&path).unwrap()
        };
        let theirs: LeafCert = serde_json::from_str(&fixture("dc2-ca-leaf-server.json")).unwrap();
        // As the side that accepted the peering holds it: no PeerServerName.
        let peering = crate::peering::Peering {
            peer_server_name: None,
            ..serde_json::from_str(&fixture("peering-dc2.json")).unwrap()
        };
        let base = |action: &str, exported: &str| {
            let mut s = snapshot_for(v, "web", Some("deny"));
            for i in s.intentions.iter_mut().flatten() {
                if i.source_peer == "peer1" {
                    i.source_name = "server".into();
                    i.action = action.into();
                }
            }
            s.exported = Some(
                serde_json::from_str(&format!(
                    r#"[{{"Name":"default","Services":[{{"Name":"{exported}","Consumers":[{{"Peer":"peer1"}}]}}]}}]"#
                ))
                .unwrap(),
            );
            s.peerings.insert("peer1".into(), peering.clone());
            s
        };
        let judged = |s: &Snapshot| decide(&table(s), &der(&theirs));
        let allowed = judged(&base("allow", "web"));
        assert!(allowed.allow, "{}", allowed.reason);
        assert!(!judged(&base("deny", "web")).allow);
        assert!(
            !judged(&base("allow", "other")).allow,
            "web is not exported to peer1"
        );
        let mut pending = base("allow", "web");
        if let Some(p) = pending.peerings.get_mut("peer1") {
            p.state = Some("DELETING".into());
        }
        assert!(!judged(&pending).allow);
    }

    #[test]
    fn the_acl_default_policy_is_read_where_each_version_keeps_it() {
        for v in CONSUL_VERSIONS {
            let me: AgentSelf = json(v, "agent-self.json");
            assert_eq!(
                me.default_policy().as_deref(),
                Some("allow"),
                "{v}: ACLs off"
            );
        }
        // ACLs on: 1.8's key and 1.11+'s nested one; 1.16's wins when both are there.
        let old: AgentSelf = serde_json::from_str(
            r#"{"DebugConfig": {"ACLsEnabled": true, "ACLDefaultPolicy": "deny"}}"#,
        )
        .unwrap();
        assert_eq!(old.default_policy().as_deref(), Some("deny"));
        let new: AgentSelf = serde_json::from_str(
            r#"{"DebugConfig": {"ACLsEnabled": true, "ACLResolverSettings": {"ACLDefaultPolicy": "allow"}}}"#,
        )
        .unwrap();
        assert_eq!(new.default_policy().as_deref(), Some("allow"));
        let neither: AgentSelf =
            serde_json::from_str(r#"{"DebugConfig": {"ACLsEnabled": true}}"#).unwrap();
        assert_eq!(
            neither.default_policy(),
            None,
            "a missing key is unknown, never deny"
        );
        let headers: serde_json::Value = json("1.16.3", "headers.json");
        assert_eq!(
            headers["intentions.json"]["X-Consul-Default-Acl-Policy"], "allow",
            "1.16 sends the policy with every answer"
        );
    }

    #[test]
    fn an_unknown_policy_is_named_not_guessed() {
        let v = "1.16.3";
        let t = table(&snapshot_for(v, "server", Some("maybe")));
        assert_eq!(t.default_policy(), &DefaultPolicy::Unknown("maybe".into()));
        let warning = ignored_denials(&snapshot_for(v, "server", Some("maybe"))).unwrap();
        assert!(
            warning.contains("the ACL default policy \"maybe\""),
            "{warning}"
        );
    }

    #[test]
    fn ignored_denials_name_what_is_configured_when_enforcement_is_off() {
        for v in CONSUL_VERSIONS {
            let warning = ignored_denials(&snapshot_for(v, "server", Some("allow"))).unwrap();
            assert!(
                warning.contains("deny intentions from client to server"),
                "{v}: {warning}"
            );
            assert!(!warning.contains("L7"), "{v}: {warning}");
            let mut s = snapshot_for(v, "server", Some("allow"));
            s.intentions = Some(Vec::new());
            assert_eq!(ignored_denials(&s).as_deref(), Some(""));
            s.acl_default_policy = Some("deny".into());
            assert!(ignored_denials(&s).unwrap().contains("default policy deny"));
            s.acl_default_policy = None;
            assert!(ignored_denials(&s).is_none());
        }
        let warning = ignored_denials(&snapshot_for("1.16.3", "web", Some("allow"))).unwrap();
        assert!(
            warning.contains("deny intentions from * to web")
                && warning.contains("L7 intentions (HTTP permissions) from l7c to web")
                && !warning.contains("peer:peer1/client to web"),
            "{warning}"
        );
    }

    #[test]
    fn the_table_knows_the_listener_mode_its_l7_denials_describe() {
        for v in CONSUL_VERSIONS {
            let mut s = snapshot_for(v, "web", Some("allow"));
            assert!(!table(&s).http_listener(), "{v}: tcp by default");
            if let Some(p) = s.registration.as_mut().and_then(|r| r.proxy.as_mut()) {
                p.config
                    .insert("protocol".into(), serde_json::Value::String("HTTP".into()));
            }
            assert!(table(&s).http_listener(), "{v}: protocol http");
        }
    }

    #[test]
    fn the_summary_lists_rules_in_evaluation_order_and_stays_short() {
        let t = table(&snapshot_for("1.16.3", "web", Some("allow")));
        assert_eq!(
            summary(t.intentions()),
            "l7c => L7 (2 HTTP permission(s)) (9), peer:peer1/client => allow (9), * => deny (8)"
        );
        let many: Vec<Intention> = (0..20)
            .map(|i| Intention::new(format!("s{i}"), Action::Deny, 9))
            .collect();
        let s = summary(&many);
        assert!(
            s.ends_with(", and 8 more") && s.starts_with("s0 => deny (9), s1"),
            "{s}"
        );
    }

    #[test]
    fn other_destinations_partitions_and_namespaces_are_ignored() {
        let entry = |dest: &str, dest_ns: &str, dest_ap: &str| IntentionEntry {
            source_name: "a".into(),
            destination_name: dest.into(),
            destination_ns: dest_ns.into(),
            destination_partition: dest_ap.into(),
            action: "deny".into(),
            precedence: 9,
            ..Default::default()
        };
        let all = vec![
            entry("server", "", ""),
            entry("server", "default", "default"),
            entry("other", "", ""),
            entry("*", "", ""),
            entry("server", "team-a", ""),
            entry("server", "", "part1"),
        ];
        let mine = for_destination(&all, "server");
        assert_eq!(mine.len(), 3, "{mine:?}");
    }

    /// Consul 1.16's `/v1/connect/intentions` copies a service-intentions entry's top-level
    /// `JWT` onto each intention (as recorded from 1.16.3): an allow that needs a token is never
    /// let through unverified. On an http listener each request is judged (here denied, the
    /// providers not being known), on a tcp one the connection denied; a deny stays a deny; an
    /// entry without JWT is unchanged.
    #[test]
    fn an_intention_that_requires_a_jwt_is_judged_per_request() {
        let listed: Vec<IntentionEntry> = serde_json::from_str(
            r#"[{"SourceNS": "default", "SourceName": "client", "DestinationNS": "default",
                 "DestinationName": "server", "SourceType": "consul", "Action": "allow",
                 "JWT": {"Providers": [{"Name": "okta"}]}, "Precedence": 9},
                {"SourceNS": "default", "SourceName": "other", "DestinationNS": "default",
                 "DestinationName": "server", "SourceType": "consul", "Action": "deny",
                 "JWT": {"Providers": [{"Name": "okta"}]}, "Precedence": 9},
                {"SourceNS": "default", "SourceName": "plain", "DestinationNS": "default",
                 "DestinationName": "server", "SourceType": "consul", "Action": "allow",
                 "JWT": null, "Precedence": 9}]"#,
        )
        .unwrap();
        let intentions = for_destination(&listed, "server");
        assert_eq!(intentions[0].action, Action::L7 { permissions: 0 });
        assert_eq!(
            intentions[0]
                .jwt
                .as_ref()
                .map(ToString::to_string)
                .as_deref(),
            Some("a JWT from okta")
        );
        assert_eq!(intentions[1].action, Action::Deny);
        assert_eq!(intentions[2].action, Action::Allow);

        let mut s = snapshot_for("1.16.3", "server", Some("allow"));
        s.intentions = Some(listed);
        let client: LeafCert = json("1.16.3", "ca-leaf-client.json");
        let tcp = table(&s);
        let d = decide(&tcp, &der(&client));
        assert!(!d.allow, "{}", d.reason);
        let http = tcp.for_http_listener(true);
        let d = decide(&http, &der(&client));
        assert!(d.allow && d.per_request, "{}", d.reason);
        let req = crate::spoe::authz::l7::SimpleRequest {
            method: "GET".into(),
            path: "/".into(),
            headers: Vec::new(),
            query: None,
        };
        let r = http.decide_request(&client.service_uri, &req);
        assert!(!r.allow && r.reason.contains("JWT"), "{}", r.reason);
    }
}
