//! The client's tests: server failover, logins, choosing the proxy.

use super::*;
use crate::value::Name;

fn login() -> Login {
    Login {
        auth_method: Name::parse("m", "k8s").unwrap(),
        bearer_token_path: "/t".into(),
        meta: BTreeMap::from([("pod".to_string(), "web-0".to_string())]),
        namespace: None,
        partition: None,
        datacenter: None,
    }
}

/// A server on loopback that gives each of `answers` (raw HTTP responses) to one
/// connection, in order, then stops.
fn answering(answers: Vec<&'static str>) -> (SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let server = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = server.local_addr().unwrap();
    let thread = std::thread::spawn(move || {
        for answer in answers {
            let (mut conn, _) = server.accept().unwrap();
            let mut head = Vec::new();
            let mut byte = [0u8; 1];
            while !head.ends_with(b"\r\n\r\n") && conn.read(&mut byte).unwrap() == 1 {
                head.push(byte[0]);
            }
            conn.write_all(answer.as_bytes()).unwrap();
        }
    });
    (addr, thread)
}

const LIVE: &str = "HTTP/1.1 200 OK\r\nContent-Length: 4\r\nConnection: close\r\n\r\nlive";
/// What a Consul 1.16.3 server whose cluster has no leader answers a catalog read.
const FAKE_LEADERLESS: &str = "HTTP/1.1 500 Internal Server Error\r\nX-Consul-Knownleader: false\r\nContent-Length: 17\r\nConnection: close\r\n\r\nNo cluster leader";

fn settings(endpoints: &[String]) -> ConsulSettings {
    ConsulSettings {
        endpoints: endpoints
            .iter()
            .map(|e| Endpoint::parse(e).unwrap())
            .collect(),
        token: None,
        tls: TlsFiles::default(),
        catalog_node: None,
        login: None,
    }
}

/// A name's servers all fail: it is resolved again, and the request goes to the address it
/// resolves to now, which stays in use.
#[test]
fn when_every_address_of_a_name_failed_it_is_resolved_again() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let dead = closed.local_addr().unwrap();
    drop(closed);
    let (live, answers) = answering(vec![LIVE, LIVE]);
    let asked = Arc::new(AtomicUsize::new(0));
    let counter = asked.clone();
    let resolver = Resolve(Arc::new(move |name| {
        assert_eq!(name, "servers.invalid:8500");
        // The first answer names only the dead address; every later one the live one too.
        Ok(match counter.fetch_add(1, Ordering::SeqCst) {
            0 => vec![dead],
            _ => vec![dead, live],
        })
    }));
    let settings = settings(&["servers.invalid:8500".into()]);
    let consul = Consul::with_resolver(&settings, resolver).unwrap();
    assert_eq!(
        consul.endpoint(),
        format!("http://servers.invalid:8500 ({dead})")
    );
    for _ in 0..2 {
        let a = consul.get("/v1/status/leader", None).unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "live"));
    }
    answers.join().unwrap();
    assert_eq!(
        asked.load(Ordering::SeqCst),
        2,
        "resolved at start and once again"
    );
    assert_eq!(
        consul.endpoint(),
        format!("http://servers.invalid:8500 ({live})")
    );
}

/// A server that lost its cluster is left for the next, which stays in use; alone, its
/// answer is given back as it is.
#[test]
fn a_server_with_no_cluster_leader_is_left_for_the_next() {
    let (leaderless, first) = answering(vec![FAKE_LEADERLESS, FAKE_LEADERLESS]);
    let (live, second) = answering(vec![LIVE, LIVE]);
    let consul = Consul::new(&settings(&[leaderless.to_string(), live.to_string()])).unwrap();
    for _ in 0..2 {
        let a = consul.get("/v1/catalog/services", None).unwrap();
        assert_eq!((a.status, a.body.as_str()), (200, "live"));
    }
    second.join().unwrap();
    assert_eq!(consul.endpoint(), format!("http://{live}"));
    let alone = Consul::new(&settings(&[leaderless.to_string()])).unwrap();
    let a = alone.get("/v1/catalog/services", None).unwrap();
    assert_eq!((a.status, a.body.as_str()), (500, "No cluster leader"));
    first.join().unwrap();
}

#[test]
fn the_login_says_its_method_token_meta_and_place() {
    let l = login();
    let body: serde_json::Value = serde_json::from_str(&login_body(&l, "jwt")).unwrap();
    assert_eq!(body["AuthMethod"], "k8s");
    assert_eq!(body["BearerToken"], "jwt");
    assert_eq!(body["Meta"]["pod"], "web-0");
    assert_eq!(login_query(&l), "");
    let l = Login {
        datacenter: Some(Name::parse("dc", "dc2").unwrap()),
        partition: Some(Name::parse("p", "part").unwrap()),
        meta: BTreeMap::new(),
        ..login()
    };
    assert_eq!(login_query(&l), "?dc=dc2&partition=part");
    let body: serde_json::Value = serde_json::from_str(&login_body(&l, "jwt")).unwrap();
    assert!(body.get("Meta").is_none());
}

#[test]
fn only_an_unknown_token_calls_for_a_new_login() {
    assert!(token_unknown(403, "ACL not found"));
    assert!(token_unknown(403, "rpc error making call: ACL not found"));
    assert!(!token_unknown(
        403,
        "Permission denied: token lacks service:write"
    ));
    assert!(!token_unknown(500, "ACL not found"));
}

#[test]
fn a_proxy_is_chosen_by_its_own_id() {
    let services: BTreeMap<String, AgentService> = serde_json::from_str(
        r#"{"web-1-sidecar-proxy":{"ID":"web-1-sidecar-proxy","Service":"web-sidecar-proxy",
             "Kind":"connect-proxy","Proxy":{"DestinationServiceID":"web-1"}},
            "web-1":{"ID":"web-1","Service":"web"}}"#,
    )
    .unwrap();
    let pick = |id: &str| choose_proxy(&services, &Target::ProxyId(id.into()));
    assert_eq!(pick("web-1-sidecar-proxy").unwrap(), "web-1-sidecar-proxy");
    assert!(matches!(pick("web-1"), Err(LookupError::Ambiguous(_))));
    assert!(matches!(pick("nope"), Err(LookupError::Missing(_))));
}
