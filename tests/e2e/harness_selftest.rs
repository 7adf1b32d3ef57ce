//! Checks the shared harness itself against the real programs, so a broken harness fails here
//! with a clear message rather than as a mysterious failure in every end-to-end test.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::time::Duration;

use crate::support::*;

const T: Duration = Duration::from_secs(5);

/// A pair of ports for a range a program allocates from itself: both free, both reserved.
#[test]
fn a_port_pair_is_reserved_whole() {
    let p = free_port_pair();
    for port in [p, p + 1] {
        assert!(
            was_handed_out(port),
            "{port} of the pair {p} is not reserved"
        );
        assert!(
            TcpListener::bind(("127.0.0.1", port)).is_ok(),
            "{port} of the pair {p} is taken"
        );
    }
}

/// scripts/test names the Consul of each leg twice, as a binary (`CONSUL_BIN`) and as a version
/// (`HCC_EXPECT_CONSUL_VERSION`): the agent the harness starts must be that version.
#[test]
fn the_consul_under_test_is_the_one_asked_for() {
    let consul = Consul::start();
    let (status, body) = consul.get("/v1/agent/self");
    assert_eq!(status, 200, "{body}");
    let me: serde_json::Value = serde_json::from_str(&body).expect("agent/self is JSON");
    let running = me["Config"]["Version"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    assert_eq!(running, consul_version(), "{body}");
    match expected_consul_version() {
        Some(want) => assert_eq!(running, want),
        None => eprintln!("HCC_EXPECT_CONSUL_VERSION unset: running Consul {running}"),
    }
}

#[test]
fn consul_starts_registers_and_stops() {
    let consul = Consul::start();
    assert_eq!(consul.trust_domain(), TRUST_DOMAIN);
    assert!(
        consul.logs().contains("Consul agent running!"),
        "{}",
        consul.logs()
    );

    let sidecar_port = free_port();
    consul.register(&sidecar_registration("server", 8181, sidecar_port, &[]));
    consul.register(&sidecar_registration(
        "client",
        8080,
        free_port(),
        &[("server", 9191)],
    ));
    let services = consul.get_json("/v1/agent/services");
    let proxy = &services["server-sidecar-proxy"];
    assert_eq!(proxy["Kind"], "connect-proxy", "{services:#}");
    assert_eq!(proxy["Port"], sidecar_port);
    assert_eq!(proxy["Proxy"]["DestinationServiceID"], "server");
    let upstreams = &services["client-sidecar-proxy"]["Proxy"]["Upstreams"];
    assert_eq!(upstreams[0]["LocalBindPort"], 9191, "{services:#}");

    // The 1 s checks of sidecar_registration: listening on the sidecar port makes it pass soon.
    assert_eq!(consul.passing_connect_instances("server"), 0);
    let _listener = TcpListener::bind(("127.0.0.1", sidecar_port)).unwrap();
    // 60 s as the other health waits: CI's 1.16.3 run once took over 10 s on a loaded machine.
    if let Err(e) = wait_until(Duration::from_secs(60), "server sidecar passing", || {
        consul.passing_connect_instances("server") == 1
    }) {
        panic!("{e}; checks: {:#}", consul.get_json("/v1/agent/checks"));
    }

    let leaf = consul.get_json("/v1/agent/connect/ca/leaf/server");
    assert_eq!(
        leaf["ServiceURI"],
        format!("spiffe://{TRUST_DOMAIN}/ns/default/dc/dc1/svc/server")
    );
    let r = consul
        .request("GET", "/v1/agent/service/server-sidecar-proxy", None, T)
        .unwrap();
    assert_eq!(
        r.header("X-Consul-ContentHash"),
        Some(
            serde_json::from_str::<serde_json::Value>(&r.body).unwrap()["ContentHash"]
                .as_str()
                .unwrap()
        )
    );

    let (status, _) = consul.get("/v1/agent/service/nope");
    assert_eq!(status, 404);
    consul.deregister("client");
    assert!(consul.get_json("/v1/agent/services")["client-sidecar-proxy"].is_null());

    let pid = consul.pid();
    assert!(is_running(pid));
    drop(consul);
    assert!(
        still_running(&[pid]).is_empty(),
        "consul {pid} survived drop"
    );
}

#[test]
fn http_app_answers_counts_and_delays() {
    let app = HttpApp::start("hello");
    let (status, body) = http_get(&app.addr(), "/x", T).unwrap();
    assert_eq!((status, body.as_str()), (200, "hello"));
    assert_eq!(app.requests(), 1);
    let after_get = app.bytes_received();
    assert!(after_get > 0);

    let r = http_request(&app.addr(), "POST", "/upload", Some(&[b'a'; 1000]), T).unwrap();
    assert_eq!(r.status, 200);
    assert_eq!(app.requests(), 2);
    assert!(app.bytes_received() >= after_get + 1000);

    // Two requests on one keep-alive connection.
    let mut s = std::net::TcpStream::connect(app.addr()).unwrap();
    s.write_all(b"GET /a HTTP/1.1\r\nHost: x\r\n\r\nGET /b HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    assert_eq!(raw.matches("HTTP/1.1 200 OK").count(), 2, "{raw}");
    assert_eq!(app.requests(), 4);

    app.set_delay(Duration::from_millis(1500));
    let err = http_get(&app.addr(), "/slow", Duration::from_millis(300)).unwrap_err();
    assert!(err.contains("timed out"), "{err}");
    let (status, _) = http_get(&app.addr(), "/slow", T).unwrap();
    assert_eq!(status, 200);

    let addr = app.addr();
    drop(app);
    assert!(http_get(&addr, "/", Duration::from_secs(1)).is_err());
}

#[test]
fn http_client_decodes_chunked() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (mut s, _) = listener.accept().unwrap();
        let mut buf = [0u8; 1024];
        let _ = s.read(&mut buf).unwrap();
        // Sent in pieces and left open: the client must stop at the final chunk, not at EOF.
        for part in [
            "HTTP/1.1 201 Created\r\nTransfer-Encoding: chunked\r\nX-Consul-Index: 7\r\n\r\n",
            "5;ext=1\r\nhello\r\n",
            "7\r\n, world\r\n0\r\n\r\n",
        ] {
            s.write_all(part.as_bytes()).unwrap();
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
    });
    let r = http_request(&addr, "GET", "/", None, T).unwrap();
    assert_eq!((r.status, r.body.as_str()), (201, "hello, world"));
    assert_eq!(r.header("x-consul-index"), Some("7"));
    server.join().unwrap();
}

#[test]
fn child_guard_stops_the_whole_tree() {
    let dir = TempDir::new("selftest");
    let path = dir.path().to_path_buf();
    // One grandchild in the group, one that escaped it with setsid, and SIGTERM-proof
    // children would otherwise survive the test.
    let mut child = Child::spawn(
        "tree",
        Command::new("sh").args(["-c", "echo started; setsid sleep 1000 & sleep 1000 & wait"]),
        dir.path(),
    );
    wait_until(T, "two sleeps", || {
        descendants_named(child.pid(), "sleep").len() == 2
    })
    .unwrap();
    wait_until(T, "output", || child.log_contains("started")).unwrap();
    assert!(child.logs().contains("started"));
    let mut all = descendants(child.pid());
    all.push(child.pid());
    assert!(child.is_running());
    child.stop();
    assert!(
        still_running(&all).is_empty(),
        "left: {:?}",
        still_running(&all)
    );
    drop(child);

    let mut stubborn = Child::spawn(
        "stubborn",
        Command::new("sh").args([
            "-c",
            "trap '' TERM; echo ready; while :; do sleep 0.1; done",
        ]),
        dir.path(),
    );
    let pid = stubborn.pid();
    // Before the trap is set, SIGTERM would still kill it.
    wait_until(T, "trap set", || stubborn.log_contains("ready")).unwrap();
    stubborn.signal(nix::sys::signal::Signal::SIGTERM);
    assert!(stubborn.wait_timeout(Duration::from_millis(300)).is_none());
    let status = stubborn.stop();
    assert!(status.is_some());
    assert!(!is_running(pid));
    drop(stubborn);

    assert!(path.exists());
    drop(dir);
    assert!(std::env::var_os("KEEP_TEST_DIRS").is_some() || !path.exists());
}

#[test]
fn free_ports_can_all_be_bound_at_once_and_bin_path_is_set() {
    // Handed out first, bound after: a port handed out twice, or one still taken, fails to bind
    // (binding while handing out would let the kernel, not free_port, keep them apart).
    let ports: Vec<u16> = (0..200).map(|_| free_port()).collect();
    let _held: Vec<TcpListener> = ports
        .iter()
        .map(|p| TcpListener::bind(("127.0.0.1", *p)).unwrap_or_else(|e| panic!("port {p}: {e}")))
        .collect();
    assert!(bin_path().is_file(), "{}", bin_path().display());
    assert!(bin_path().ends_with("haproxy-consul-connect"));
}
