use super::quarantine::{shape, unbindable};
use super::*;
use crate::model::Slot;

fn client() -> Desired {
    crate::model::fixtures::client_desired()
}

#[test]
fn a_refused_listener_serves_as_applied_and_a_change_of_it_lifts_the_refusal() {
    let applied = client();
    let mut refused = applied.clone();
    let name = refused.upstreams[0].name.clone();
    refused.upstreams[0].connect_timeout_ms = crate::value::Millis::constant(4321);
    let mut q = Quarantine::default();
    q.refused.insert(name.clone(), shape(&refused.upstreams[0]));

    // Its instances may churn: the refused configuration is still refused.
    let mut churned = refused.clone();
    churned.upstreams[0].slots.push(Slot {
        name: "s99".into(),
        instance: None,
    });
    let effective = q.filter(&applied, &churned).expect("a refused listener");
    assert_eq!(effective.upstream(&name), applied.upstream(&name));
    assert_eq!(q.refused.len(), 1);

    // A new listener that is refused stays out; one Consul changes again is applied.
    let mut changed = refused.clone();
    changed.upstreams[0].connect_timeout_ms = crate::value::Millis::constant(1234);
    let effective = q
        .filter(&applied, &changed)
        .unwrap_or_else(|| changed.clone());
    assert_eq!(effective.upstream(&name), changed.upstream(&name));
    assert!(q.refused.is_empty());
}

#[test]
fn a_new_listener_on_a_port_another_process_holds_is_found_before_haproxy_is_asked() {
    let applied = client();
    let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let mut desired = applied.clone();
    let mut extra = desired.upstreams[0].clone();
    extra.name = "up_extra".into();
    extra.bind_address = "127.0.0.1".into();
    extra.bind_port = held.local_addr().unwrap().port();
    desired.upstreams.push(extra);
    let found = unbindable(&applied, &desired);
    assert_eq!(found.len(), 1, "{found:?}");
    assert_eq!(found[0].0.name, "up_extra");
    drop(held);
    assert!(unbindable(&applied, &desired).is_empty());
}

/// A working directory of its own for a test that writes files and listens on sockets.
fn workdir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("hcc-apply-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A stand-in for HAProxy's stats socket at `path`, answering each command line as `answer`
/// says. It serves until the test process ends.
fn fake_stats_socket(path: &std::path::Path, answer: fn(&str) -> &'static str) {
    use std::io::{Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { return };
            let mut line = String::new();
            let _ = conn.read_to_string(&mut line);
            let _ = conn.write_all(answer(&line).as_bytes());
        }
    });
}

/// A stand-in for the Dataplane API at `path` that accepts every request: the version is 1,
/// a transaction opens as `t1` and commits without a reload.
fn fake_dataplane(path: &std::path::Path) {
    use std::io::{BufRead, BufReader, Read, Write};
    let listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(conn) = conn else { return };
            let mut reader = BufReader::new(conn);
            let mut request = String::new();
            let mut length = 0;
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                if request.is_empty() {
                    request = line.trim().to_string();
                }
                let lower = line.to_ascii_lowercase();
                if let Some(v) = lower.strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap_or(0);
                }
                if line == "\r\n" {
                    break;
                }
                line.clear();
            }
            let mut body = vec![0; length];
            let _ = reader.read_exact(&mut body);
            let answer = if request.starts_with("GET") {
                r#"{"_version":1,"data":[]}"#
            } else if request.starts_with("POST") && request.contains("/transactions?") {
                r#"{"id":"t1","_version":1,"status":"in_progress"}"#
            } else {
                "{}"
            };
            let _ = reader.get_mut().write_all(
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{answer}",
                    answer.len()
                )
                .as_bytes(),
            );
        }
    });
}

fn tools(d: &Desired) -> Tools {
    let creds = crate::render::DataplaneCredentials::from_secret(&[7; 24]);
    Tools {
        dataplane: Dataplane::new(&d.paths.dataplane_socket, &creds).unwrap(),
        creds,
        templates: crate::render::Templates::builtin(),
        check: Box::new(|_| Ok(())),
    }
}

/// The split weights go live, then a live server change fails (the runtime API and the
/// Dataplane API both refuse it): the retry's plan must still hold that server change.
#[test]
fn a_step_that_fails_after_the_split_weights_leaves_its_work_in_the_next_plan() {
    use crate::model::fixtures::{settings_in, with_chain, ANY};
    let dir = workdir("splits");
    let before = crate::model::build(
        &with_chain(ANY, "split", false),
        &settings_in(&dir, false),
        None,
    )
    .unwrap();
    let mut after = before.clone();
    let r = after.upstreams[0].routing.as_mut().unwrap();
    r.routes[0].splits[0].upto = 5000;
    let t = &mut r.targets[0];
    let newcomer = crate::model::Server {
        id: "web-v9-sidecar-proxy.node9".into(),
        address: "127.0.0.9".into(),
        port: 21999,
        weight: 1,
        identity: crate::admission::Identity::service("web", "dc1"),
        admission: crate::model::Admission::Unchecked,
    };
    t.slots = crate::model::place(vec![newcomer], &t.slots);
    let p = plan(&before, &after);
    assert!(
        p.ops.is_empty() && !p.live.is_empty() && !p.live_splits.is_empty(),
        "{p:#?}"
    );

    // A server change is refused (HAProxy's answer for a server it does not have), and
    // nothing listens on the Dataplane API's socket: its fallback fails as well.
    fake_stats_socket(&after.paths.stats_socket, |line| {
        if line.starts_with("set map") {
            ""
        } else {
            "No such server.\n"
        }
    });
    let tools = tools(&after);
    let mut applied = Applied::from(before);
    let result = apply(&mut applied, &after, &p, &tools);
    assert!(
        result.is_err(),
        "the server change cannot have gone through"
    );

    let retry = applied.plan(&after);
    assert!(
        !retry.live.is_empty(),
        "the server change never reached HAProxy, yet the retry's plan holds none: {retry:#?}"
    );
    // The weights went through: the retry does not set them again.
    assert!(retry.live_splits.is_empty(), "{retry:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// The transaction creates a gateway route's backend, then HAProxy refuses the new SNI map:
/// the retry replaces the map and does not create the backend again.
#[test]
fn a_failed_gateway_map_after_a_committed_transaction_is_retried_alone() {
    let dir = workdir("gateway");
    let (s, settings) = crate::model::fixtures::gateway_snapshot(crate::model::fixtures::ANY, &dir);
    let after = crate::model::build(&s, &settings, None).unwrap();
    let mut before = after.clone();
    before.gateway.as_mut().unwrap().routes.clear();
    let p = plan(&before, &after);
    assert!(
        !p.ops.is_empty() && p.gateway_map_changed && !p.needs_full_render(),
        "{p:#?}"
    );

    fake_stats_socket(&after.paths.stats_socket, |_| "Unknown map.\n");
    fake_dataplane(&after.paths.dataplane_socket);
    let mut applied = Applied::from(before);
    let result = apply(&mut applied, &after, &p, &tools(&after));
    assert!(
        result
            .as_ref()
            .is_err_and(|e| e.to_string().contains("SNI map")),
        "{result:?}"
    );

    let retry = applied.plan(&after);
    assert!(retry.gateway_map_changed, "{retry:#?}");
    assert!(retry.ops.is_empty() && retry.live.is_empty(), "{retry:#?}");
    let _ = std::fs::remove_dir_all(&dir);
}

/// With every slice alike (every state applied whole), the plan is `diff::plan`'s own.
#[test]
fn slices_that_agree_plan_as_the_state_they_hold() {
    let a = client();
    let mut b = a.clone();
    b.intentions_map = vec![("^k_0:".into(), "allow".into())];
    b.tls.leaf_pem.push_str("# rotated\n");
    assert_eq!(Applied::from(a.clone()).plan(&b), plan(&a, &b));
    assert!(Applied::from(b.clone()).plan(&b).is_empty());
}
