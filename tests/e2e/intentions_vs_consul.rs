//! The sidecar's verdict on real mTLS connections against Consul's own
//! `/v1/agent/connect/authorize`, over a table of intentions and sources, with ACLs off, on with
//! default deny, and on with default allow, on whichever Consul `CONSUL_BIN` is (scripts/test
//! runs it on 1.8.7 and 1.16.3). Each case takes a real leaf for the source from the agent, makes
//! a real connection through the sidecar's public listener, and asks Consul about the same leaf.
//!
//! Scenarios that need current Consul (cluster-peer sources, L7 permissions) run only there;
//! the table printed at the end says which ran.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

use crate::support::*;
use serde_json::Value;

/// One scenario: the intentions for `server` and the sources to try against them.
struct Scenario {
    name: &'static str,
    intentions: Vec<IntentionSpec>,
    sources: &'static [&'static str],
    /// Cluster peers and L7 permissions exist from Consul 1.13 and 1.9 on.
    current_consul_only: bool,
    /// L7 permissions need the destination's protocol to be http (service-defaults).
    http: bool,
}

fn l4(source: &str, action: &str) -> IntentionSpec {
    IntentionSpec::l4(source, action)
}

fn scenarios() -> Vec<Scenario> {
    vec![
        Scenario {
            name: "no intentions",
            intentions: vec![],
            sources: &["client"],
            current_consul_only: false,
            http: false,
        },
        Scenario {
            name: "exact deny over wildcard allow",
            intentions: vec![l4("client", "deny"), l4("*", "allow")],
            sources: &["client", "web", "other"],
            current_consul_only: false,
            http: false,
        },
        Scenario {
            name: "exact allow over wildcard deny",
            intentions: vec![l4("client", "allow"), l4("*", "deny")],
            sources: &["client", "web"],
            current_consul_only: false,
            http: false,
        },
        Scenario {
            name: "names are case-sensitive",
            intentions: vec![l4("Web", "allow"), l4("*", "deny")],
            sources: &["web", "Web"],
            current_consul_only: false,
            http: false,
        },
        Scenario {
            name: "wildcard deny alone",
            intentions: vec![l4("*", "deny")],
            sources: &["client"],
            current_consul_only: false,
            http: false,
        },
        Scenario {
            name: "exact deny alone, others by default",
            intentions: vec![l4("web", "deny")],
            sources: &["web", "client"],
            current_consul_only: false,
            http: false,
        },
        Scenario {
            name: "a peer's client allowed, everyone else denied",
            intentions: vec![
                IntentionSpec {
                    peer: Some("peer1".into()),
                    ..l4("client", "allow")
                },
                l4("*", "deny"),
            ],
            sources: &["client", "web"],
            current_consul_only: true,
            http: false,
        },
        Scenario {
            name: "a peer's wildcard allowed",
            intentions: vec![IntentionSpec {
                peer: Some("peer1".into()),
                ..l4("*", "allow")
            }],
            sources: &["client"],
            current_consul_only: true,
            http: false,
        },
        Scenario {
            name: "an L7 source over a wildcard allow",
            intentions: vec![
                IntentionSpec {
                    action: None,
                    permissions: Some(serde_json::json!([
                        {"Action": "allow", "HTTP": {"PathPrefix": "/api"}}
                    ])),
                    ..l4("client", "")
                },
                l4("*", "allow"),
            ],
            sources: &["client", "web"],
            current_consul_only: true,
            http: true,
        },
    ]
}

struct Row {
    acl: &'static str,
    scenario: &'static str,
    source: String,
    sidecar: bool,
    consul: bool,
    consul_reason: String,
}

/// The rules of the sidecar's newest table, from its log line
/// `intentions table updated: N intention(s) for this service [a => allow (9), …], default P,
/// generation G`,
/// as (source, action) pairs; `None` before the first table.
fn newest_table(logs: &str) -> Option<(BTreeSet<(String, String)>, String)> {
    let line = logs
        .lines()
        .rev()
        .find(|l| l.contains("intentions table updated:"))?;
    let rules = line.split_once("for this service [")?.1;
    let (rules, default) = rules.rsplit_once("], default ")?;
    let set = rules
        .split(", ")
        .filter(|r| !r.is_empty())
        .filter_map(|r| {
            let (source, rest) = r.split_once(" => ")?;
            // "allow (9)", "L7 (1 HTTP permission(s)) (9)": the precedence is the last group.
            let action = rest.rsplit_once(" (")?.0;
            Some((source.to_string(), action.to_string()))
        })
        .collect();
    let default = default
        .split_once(", generation ")
        .map_or(default, |(d, _)| d);
    Some((set, default.trim().to_string()))
}

fn expected_rules(intentions: &[IntentionSpec]) -> BTreeSet<(String, String)> {
    intentions
        .iter()
        .map(|i| {
            let source = match &i.peer {
                Some(p) => format!("peer:{p}/{}", i.source),
                None => i.source.clone(),
            };
            let action = match (&i.action, &i.permissions) {
                (_, Some(Value::Array(p))) => format!("L7 ({} HTTP permission(s))", p.len()),
                (Some(a), _) => a.clone(),
                _ => unreachable!("a scenario's intention has an action or permissions"),
            };
            (source, action)
        })
        .collect()
}

/// Whether `source`'s own intention (not a wildcard) in `intentions` has HTTP permissions.
fn l7_source(intentions: &[IntentionSpec], source: &str) -> bool {
    intentions
        .iter()
        .any(|i| i.source == source && i.peer.is_none() && i.permissions.is_some())
}

/// Runs every scenario this Consul supports against one server sidecar with intentions on.
fn compare(acl: &'static str) -> Vec<Row> {
    let consul = match acl {
        "off" => Consul::start(),
        policy => Consul::start_acl(policy),
    };
    let app = HttpApp::start("app");
    let port = free_port();
    consul.register(&sidecar_registration("server", app.port(), port, &[]));
    let base = TempDir::new("ixn-vs-consul");
    let mut cmd = std::process::Command::new(bin_path());
    cmd.args(["-sidecar-for", "server", "-enable-intentions", "-http-addr"])
        .arg(consul.http_addr())
        .arg("-haproxy-cfg-base-path")
        .arg(base.path());
    if acl != "off" {
        cmd.args(["-token", ACL_MASTER_TOKEN]);
    }
    let sidecar = Child::spawn("sidecar-server", &mut cmd, base.path());
    let ca = ready_with_ca(&sidecar, &consul, base.path());
    let want_default = if acl == "deny" { "deny" } else { "allow" };

    let mut rows = Vec::new();
    for s in scenarios() {
        if s.current_consul_only && !consul.is_current() {
            continue;
        }
        if s.http {
            consul.set_protocol("server", "http");
            wait_public_mode(base.path(), "server", "http");
        }
        consul.set_intentions("server", &s.intentions);
        let want = expected_rules(&s.intentions);
        // On Consul 1.8 the legacy intentions are deleted and created one by one, so the table
        // may pass through the wanted set on its way (the old wildcard deny left alone before
        // it is deleted too): wanted, and no newer table for a second.
        let tables = |logs: &str| logs.matches("intentions table updated:").count();
        let mut seen = (usize::MAX, Instant::now());
        wait_until(
            Duration::from_secs(20),
            &format!("the sidecar's table for {:?}", s.name),
            || {
                let logs = sidecar.logs();
                if newest_table(&logs) != Some((want.clone(), want_default.to_string())) {
                    return false;
                }
                let n = tables(&logs);
                if n != seen.0 {
                    seen = (n, Instant::now());
                }
                seen.1.elapsed() >= Duration::from_secs(1)
            },
        )
        .unwrap_or_else(|e| {
            panic!(
                "{e}: want {want:?}, default {want_default}; newest {:?}\n{}",
                newest_table(&sidecar.logs()),
                sidecar.logs()
            )
        });
        for source in s.sources {
            let (cert, key, leaf) = consul.leaf_files(source, base.path());
            let sidecar_allows = curl_mtls(port, Some((&cert, &key)), &ca).is_ok();
            let theirs = consul.authorize("server", &leaf);
            let (consul_verdict, consul_reason) = if l7_source(&s.intentions, source) {
                // Consul's authorize refuses every L7 intention (it judges connections); its
                // proxies judge each request. `GET /` matches no permission of the scenario,
                // so Consul's Envoy lets the default policy decide, and so must we.
                (
                    want_default == "allow",
                    format!("per request (authorize says {}): GET / matches no permission, default {want_default}", theirs["Authorized"]),
                )
            } else {
                (
                    theirs["Authorized"].as_bool().unwrap(),
                    theirs["Reason"].as_str().unwrap_or_default().to_string(),
                )
            };
            rows.push(Row {
                acl,
                scenario: s.name,
                source: source.to_string(),
                sidecar: sidecar_allows,
                consul: consul_verdict,
                consul_reason,
            });
        }
        if s.http {
            consul.set_intentions("server", &[]);
            consul.set_protocol("server", "tcp");
            wait_public_mode(base.path(), "server", "tcp");
        }
    }
    rows
}

fn report(rows: &[Row]) -> usize {
    let version = consul_version();
    eprintln!(
        "| Consul | ACLs | intentions | source | sidecar | Consul authorize | Consul's reason |"
    );
    eprintln!("|---|---|---|---|---|---|---|");
    let verdict = |b: bool| if b { "allow" } else { "deny" };
    let mut disagreements = 0;
    for r in rows {
        if r.sidecar != r.consul {
            disagreements += 1;
        }
        eprintln!(
            "| {version} | {} | {} | {} | {} | {}{} | {} |",
            r.acl,
            r.scenario,
            r.source,
            verdict(r.sidecar),
            verdict(r.consul),
            if r.sidecar == r.consul {
                ""
            } else {
                " **DIFFERS**"
            },
            r.consul_reason
        );
    }
    disagreements
}

/// One test, so the three agents run one after the other and the table prints whole.
#[test]
fn the_sidecar_decides_every_case_as_consul_authorize_does() {
    let mut rows = compare("off");
    rows.extend(compare("deny"));
    rows.extend(compare("allow"));
    let disagreements = report(&rows);
    assert!(
        rows.len() >= 20,
        "only {} cases compared; the issue asks for at least 20",
        rows.len()
    );
    assert_eq!(disagreements, 0, "see the table above");
    // The table must show both verdicts, or it proves nothing about either.
    assert!(rows.iter().any(|r| r.consul) && rows.iter().any(|r| !r.consul));
}

#[test]
fn the_table_log_line_parses() {
    let logs = "x\nINFO [supervisor] intentions table updated: 2 intention(s) for this service [peer:p1/client => allow (9), l7 => L7 (1 HTTP permission(s)) (9)], default allow, generation 5f3a09c2e1d4b7a8\n";
    let (set, default) = newest_table(logs).unwrap();
    assert_eq!(default, "allow");
    assert_eq!(
        set,
        BTreeSet::from([
            ("peer:p1/client".to_string(), "allow".to_string()),
            ("l7".to_string(), "L7 (1 HTTP permission(s))".to_string()),
        ])
    );
    let empty = "intentions table updated: 0 intention(s) for this service [], default deny";
    assert_eq!(newest_table(empty), Some((BTreeSet::new(), "deny".into())));
}
