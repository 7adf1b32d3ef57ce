//! Unit tests of `spoe::server`: a real agent on a socket, fed frames captured from HAProxy.
use super::*;
use crate::spoe::authz::{Action, DefaultPolicy, Intention};
use crate::spoe::frame::{Message, Notify};
use std::io::{Read, Write};
use std::os::unix::net::UnixStream as StdStream;

const TD: &str = "11111111-2222-3333-4444-555555555555.consul";
const CA: &str = include_str!("../../../fixtures/spop/certs/ca.crt");
const CLIENT: &[u8] = include_bytes!("../../../fixtures/spop/certs/client.der");
const WEB: &[u8] = include_bytes!("../../../fixtures/spop/certs/web.der");
const HELLO: &[u8] = include_bytes!("../../../fixtures/spop/haproxy-hello.bin");
const HELLO_HC: &[u8] = include_bytes!("../../../fixtures/spop/haproxy-hello-healthcheck.bin");
const NOTIFY_CERT: &[u8] = include_bytes!("../../../fixtures/spop/notify-cert.bin");
const NOTIFY_NOCERT: &[u8] = include_bytes!("../../../fixtures/spop/notify-nocert.bin");
const DISCONNECT: &[u8] = include_bytes!("../../../fixtures/spop/haproxy-disconnect.bin");
const NOTIFY_L7_CONN: &[u8] = include_bytes!("../../../fixtures/spop/notify-l7-connection.bin");
const NOTIFY_REQUEST: &[u8] = include_bytes!("../../../fixtures/spop/notify-request.bin");

struct TestAgent {
    dir: PathBuf,
    handle: AgentHandle,
    table: SharedTable,
}

impl Drop for TestAgent {
    fn drop(&mut self) {
        self.handle.shutdown();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn table(deny_web: bool) -> AuthzTable {
    let ixns = if deny_web {
        vec![Intention::new("web", Action::Deny, 9)]
    } else {
        vec![]
    };
    // The fixture leaves are judged an hour after they were made, not at today's date.
    let client = include_bytes!("../../../fixtures/spop/certs/client.der");
    AuthzTable::new(TD, CA, ixns, DefaultPolicy::Allow)
        .unwrap()
        .judged_at(crate::clock::test_support::inside_validity(client))
}

fn start(name: &str) -> TestAgent {
    let dir = std::env::temp_dir().join(format!("spoe-srv-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let shared = SharedTable::new(table(true));
    let handle = spawn(
        AgentConfig {
            socket_path: dir.join("agent.sock"),
            worker_threads: 2,
            var_name: "allow".into(),
        },
        shared.clone(),
    )
    .unwrap();
    TestAgent {
        dir,
        handle,
        table: shared,
    }
}

fn connect(a: &TestAgent) -> StdStream {
    let s = StdStream::connect(a.handle.socket_path()).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    s
}

/// Reads one frame (blocking) or None on EOF.
fn read_frame(s: &mut StdStream) -> Option<Frame> {
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some((f, used)) = frame::decode(&buf, usize::MAX).unwrap() {
            assert_eq!(used, buf.len(), "one frame at a time in these tests");
            return Some(f);
        }
        let n = s.read(&mut chunk).unwrap();
        if n == 0 {
            assert!(buf.is_empty(), "EOF mid-frame");
            return None;
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn notify(sid: u64, fid: u64, cert: TypedData) -> Vec<u8> {
    let f = Frame::Notify(Notify {
        stream_id: sid,
        frame_id: fid,
        messages: vec![Message {
            name: CHECK_MESSAGE.into(),
            args: vec![(CERT_ARG.into(), cert)],
        }],
    });
    let mut out = Vec::new();
    f.encode(16380, &mut out).unwrap();
    out
}

/// A connection's ACK: `allow`, then the generation of the table that judged it.
fn expect_ack(f: Option<Frame>, sid: u64, fid: u64, allow: bool) {
    let Some(Frame::Ack(ack)) = f else {
        panic!("expected an ACK, got {f:?}");
    };
    assert_eq!((ack.stream_id, ack.frame_id), (sid, fid));
    assert_eq!(
        ack.actions.first(),
        Some(&frame::Action::SetVar {
            scope: VarScope::Session,
            name: "allow".into(),
            value: TypedData::Bool(allow),
        }),
        "{:?}",
        ack.actions
    );
    // Then the generation of the table that judged it (none from a table that can only deny,
    // nothing known yet), and on an allowed connection its caller's service name (for
    // `appname_header`); a denied one learns nothing more.
    let mut generations = 0;
    let mut apps = Vec::new();
    for a in &ack.actions[1..] {
        match a {
            frame::Action::SetVar {
                scope: VarScope::Session,
                name,
                value: TypedData::String(g),
            } if name == GENERATION_VAR && g.len() == 16 => generations += 1,
            frame::Action::SetVar {
                scope: VarScope::Session,
                name,
                value: TypedData::String(v),
            } if name == APP_VAR => apps.push(String::from_utf8_lossy(v).into_owned()),
            other => panic!("unexpected action {other:?} in {:?}", ack.actions),
        }
    }
    assert!(generations <= 1, "{:?}", ack.actions);
    if allow {
        assert_eq!(apps.len(), 1, "{:?}", ack.actions);
        assert!(crate::value::Name::parse("t", &apps[0]).is_ok(), "{apps:?}");
    } else {
        assert!(apps.is_empty(), "{:?}", ack.actions);
    }
}

fn disconnect_status(f: Option<Frame>) -> u64 {
    match f {
        Some(Frame::AgentDisconnect(kv)) => Disconnect::from_kv(&kv).unwrap().status_code,
        other => panic!("expected AGENT-DISCONNECT, got {other:?}"),
    }
}

fn handshake(s: &mut StdStream) {
    s.write_all(HELLO).unwrap();
    match read_frame(s) {
        Some(Frame::AgentHello(kv)) => {
            let h = frame::AgentHello::from_kv(&kv).unwrap();
            assert_eq!(h.version, "2.0");
            assert_eq!(h.max_frame_size, 16380);
            assert_eq!(h.capabilities, vec!["pipelining"]);
        }
        other => panic!("expected AGENT-HELLO, got {other:?}"),
    }
}

#[test]
fn captured_session_allow_deny_disconnect() {
    let a = start("session");
    let mut s = connect(&a);
    handshake(&mut s);
    s.write_all(NOTIFY_CERT).unwrap();
    expect_ack(read_frame(&mut s), 0, 1, true);
    s.write_all(NOTIFY_NOCERT).unwrap();
    expect_ack(read_frame(&mut s), 2, 1, false);
    s.write_all(&notify(9, 4, TypedData::Binary(WEB.to_vec())))
        .unwrap();
    expect_ack(read_frame(&mut s), 9, 4, false);
    s.write_all(DISCONNECT).unwrap();
    assert_eq!(disconnect_status(read_frame(&mut s)), 0);
    assert_eq!(read_frame(&mut s), None, "closed after DISCONNECT");
    let st = a.handle.stats();
    assert_eq!(st.allowed.load(Ordering::Relaxed), 1);
    assert_eq!(st.denied.load(Ordering::Relaxed), 2);
    assert_eq!(st.errors.load(Ordering::Relaxed), 0);
}

#[test]
fn health_check_is_answered_then_closed() {
    let a = start("hc");
    let mut s = connect(&a);
    s.write_all(HELLO_HC).unwrap();
    assert!(matches!(read_frame(&mut s), Some(Frame::AgentHello(_))));
    assert_eq!(read_frame(&mut s), None);
    assert_eq!(a.handle.stats().health_checks.load(Ordering::Relaxed), 1);
}

#[test]
fn pipelined_notifies_are_answered_in_order() {
    let a = start("pipeline");
    let mut s = connect(&a);
    handshake(&mut s);
    let mut burst = Vec::new();
    for i in 0..20u64 {
        let cert = if i % 2 == 0 { CLIENT } else { WEB };
        burst.extend(notify(i * 2 + 1, 1, TypedData::Binary(cert.to_vec())));
    }
    s.write_all(&burst).unwrap();
    let mut buf = Vec::new();
    let mut acks = Vec::new();
    let mut chunk = [0u8; 4096];
    while acks.len() < 20 {
        while let Some((f, used)) = frame::decode(&buf, 16380).unwrap() {
            buf.drain(..used);
            acks.push(f);
        }
        if acks.len() < 20 {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0);
            buf.extend_from_slice(&chunk[..n]);
        }
    }
    for (i, f) in acks.into_iter().enumerate() {
        expect_ack(Some(f), i as u64 * 2 + 1, 1, i % 2 == 0);
    }
}

#[test]
fn table_replacement_applies_to_next_notify() {
    let a = start("replace");
    let mut s = connect(&a);
    handshake(&mut s);
    s.write_all(&notify(1, 1, TypedData::Binary(WEB.to_vec())))
        .unwrap();
    expect_ack(read_frame(&mut s), 1, 1, false);
    a.table.replace(table(false));
    s.write_all(&notify(3, 1, TypedData::Binary(WEB.to_vec())))
        .unwrap();
    expect_ack(read_frame(&mut s), 3, 1, true);
    a.table.replace(AuthzTable::deny_all("test"));
    s.write_all(&notify(5, 1, TypedData::Binary(CLIENT.to_vec())))
        .unwrap();
    expect_ack(read_frame(&mut s), 5, 1, false);
}

#[test]
fn malformed_frames_get_the_right_status() {
    let a = start("malformed");
    // (frame bytes after a good HELLO, expected status)
    let oversize = 16381u32.to_be_bytes().to_vec();
    let cases: Vec<(Vec<u8>, u64)> = vec![
        (
            vec![0, 0, 0, 12, 3, 0, 0, 0, 1, 1, 1, 1, b'm', 1, 0, 0x0a],
            4,
        ),
        (vec![0, 0, 0, 5, 3, 0, 0, 0, 1], 4),
        (oversize, 3),
        (vec![0, 0, 0, 7, 3, 0, 0, 0, 0, 1, 1], 10),
        (HELLO.to_vec(), 4),
        (notify(1, 1, TypedData::Int64(1))[..8].to_vec(), 99),
    ];
    for (bytes, status) in cases {
        let mut s = connect(&a);
        handshake(&mut s);
        if status == 99 {
            // A frame cut off by EOF is not an error to answer: just closed.
            s.write_all(&bytes).unwrap();
            s.shutdown(std::net::Shutdown::Write).unwrap();
            assert_eq!(read_frame(&mut s), None);
            continue;
        }
        s.write_all(&bytes).unwrap();
        assert_eq!(
            disconnect_status(read_frame(&mut s)),
            status,
            "{bytes:02x?}"
        );
        assert_eq!(read_frame(&mut s), None);
    }
    // Before HELLO: a NOTIFY is invalid, and a bad HELLO gets its own code.
    let mut s = connect(&a);
    s.write_all(NOTIFY_CERT).unwrap();
    assert_eq!(disconnect_status(read_frame(&mut s)), 4);
    let mut s = connect(&a);
    let bad_version = Frame::HaproxyHello(frame::KvList(vec![
        (
            "supported-versions".into(),
            TypedData::String(b"1.0".to_vec()),
        ),
        ("max-frame-size".into(), TypedData::Uint32(16380)),
        ("capabilities".into(), TypedData::String(vec![])),
    ]));
    let mut out = Vec::new();
    bad_version.encode(16380, &mut out).unwrap();
    s.write_all(&out).unwrap();
    assert_eq!(disconnect_status(read_frame(&mut s)), 8);
    assert!(a.handle.stats().errors.load(Ordering::Relaxed) >= 6);
}

#[test]
fn acks_before_a_bad_frame_still_go_out() {
    let a = start("ack-then-bad");
    let mut s = connect(&a);
    handshake(&mut s);
    let mut burst = notify(1, 1, TypedData::Binary(CLIENT.to_vec()));
    burst.extend_from_slice(&[0, 0, 0, 7, 3, 0, 0, 0, 0, 1, 1]); // no FIN
    s.write_all(&burst).unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).unwrap();
    let (first, used) = frame::decode(&buf, 16380).unwrap().unwrap();
    expect_ack(Some(first), 1, 1, true);
    let (second, rest) = frame::decode(&buf[used..], 16380).unwrap().unwrap();
    assert_eq!(disconnect_status(Some(second)), 10);
    assert_eq!(used + rest, buf.len());
}

#[test]
fn notify_without_cert_argument_is_denied_not_dropped() {
    let a = start("noarg");
    let mut s = connect(&a);
    handshake(&mut s);
    let f = Frame::Notify(Notify {
        stream_id: 1,
        frame_id: 1,
        messages: vec![],
    });
    let mut out = Vec::new();
    f.encode(16380, &mut out).unwrap();
    s.write_all(&out).unwrap();
    expect_ack(read_frame(&mut s), 1, 1, false);
    s.write_all(&notify(3, 1, TypedData::String(CLIENT.to_vec())))
        .unwrap();
    expect_ack(read_frame(&mut s), 3, 1, false);
}

#[test]
fn shutdown_disconnects_and_removes_socket() {
    let mut a = start("shutdown");
    let mut s = connect(&a);
    handshake(&mut s);
    let path = a.handle.socket_path().to_owned();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600);
    a.handle.shutdown();
    assert_eq!(disconnect_status(read_frame(&mut s)), 0);
    assert!(!path.exists(), "socket removed");
    assert!(StdStream::connect(&path).is_err());
    a.handle.shutdown(); // idempotent
}

#[test]
fn stale_socket_is_replaced_and_other_files_are_not() {
    let dir = std::env::temp_dir().join(format!("spoe-srv-{}-stale", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("agent.sock");
    let stale = std::os::unix::net::UnixListener::bind(&path).unwrap();
    drop(stale);
    let cfg = |p: &Path| AgentConfig {
        socket_path: p.to_owned(),
        worker_threads: 1,
        var_name: "allow".into(),
    };
    let mut h = spawn(cfg(&path), SharedTable::new(table(false))).unwrap();
    let mut s = StdStream::connect(&path).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    handshake(&mut s);
    h.shutdown();
    let file = dir.join("plain");
    std::fs::write(&file, b"x").unwrap();
    assert!(matches!(
        spawn(cfg(&file), SharedTable::new(table(false))),
        Err(AgentError::Socket { .. })
    ));
    assert_eq!(std::fs::read(&file).unwrap(), b"x");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn invalid_config_is_refused() {
    let cfg = |threads: usize, var: &str| AgentConfig {
        socket_path: std::env::temp_dir().join("never-bound.sock"),
        worker_threads: threads,
        var_name: var.into(),
    };
    let t = || SharedTable::new(AuthzTable::deny_all("test"));
    let long = "x".repeat(64);
    for (threads, var) in [(0, "allow"), (1, ""), (1, "a b"), (1, long.as_str())] {
        assert!(matches!(
            spawn(cfg(threads, var), t()),
            Err(AgentError::InvalidConfig(_))
        ));
    }
}

#[test]
fn latency_histogram_quantiles() {
    let h = LatencyHistogram::default();
    assert_eq!(h.quantile(0.5), None);
    for _ in 0..98 {
        h.record(std::time::Duration::from_micros(3));
    }
    h.record(std::time::Duration::from_micros(700));
    h.record(std::time::Duration::from_millis(5));
    assert_eq!(h.count(), 100);
    assert_eq!(h.quantile(0.5), Some(std::time::Duration::from_micros(4)));
    assert_eq!(
        h.quantile(0.99),
        Some(std::time::Duration::from_micros(1024))
    );
    assert_eq!(
        h.quantile(1.0),
        Some(std::time::Duration::from_micros(8192))
    );
}

/// A table where `client` has an L7 intention with `permissions`, on an http listener.
fn l7_table(permissions: serde_json::Value) -> AuthzTable {
    let client = include_bytes!("../../../fixtures/spop/certs/client.der");
    let ixn = Intention {
        permissions: super::l7::parse_all(permissions.as_array().unwrap()),
        ..Intention::new("client", Action::L7 { permissions: 1 }, 9)
    };
    AuthzTable::new(TD, CA, vec![ixn], DefaultPolicy::Deny)
        .unwrap()
        .for_http_listener(true)
        .judged_at(crate::clock::test_support::inside_validity(client))
}

/// The captured http connection and request: the connection's ACK marks it l7 with its
/// source, the request's ACK sets txn req_allow from the permissions, and a new table decides
/// the next request of the same connection.
#[test]
fn captured_l7_connection_then_request() {
    let a = start("l7");
    a.table.replace(l7_table(
        serde_json::json!([{"Action": "allow", "HTTP": {"PathPrefix": "/api", "Methods": ["POST"]}}]),
    ));
    let first_key = a.table.current().fast_key(Some(0));
    let mut s = connect(&a);
    handshake(&mut s);
    s.write_all(NOTIFY_L7_CONN).unwrap();
    let src = "spiffe://11111111-2222-3333-4444-555555555555.consul/ns/default/dc/dc1/svc/client";
    let set = |scope, name: &str, value| frame::Action::SetVar {
        scope,
        name: name.into(),
        value,
    };
    let key = |k: &str| set(VarScope::Session, FAST_KEY_VAR, TypedData::String(k.into()));
    match read_frame(&mut s) {
        Some(Frame::Ack(ack)) => assert_eq!(
            ack.actions,
            vec![
                set(VarScope::Session, "allow", TypedData::Bool(true)),
                set(
                    VarScope::Session,
                    GENERATION_VAR,
                    TypedData::String(a.table.current().generation().into())
                ),
                set(
                    VarScope::Session,
                    APP_VAR,
                    TypedData::String("client".into())
                ),
                set(VarScope::Session, L7_VAR, TypedData::Bool(true)),
                set(VarScope::Session, SRC_VAR, TypedData::String(src.into())),
                key(&first_key),
            ]
        ),
        other => panic!("expected an ACK, got {other:?}"),
    }
    let request_ack = |s: &mut StdStream| match read_frame(s) {
        Some(Frame::Ack(ack)) => ack.actions,
        other => panic!("expected an ACK, got {other:?}"),
    };
    s.write_all(NOTIFY_REQUEST).unwrap();
    assert_eq!(
        request_ack(&mut s),
        vec![
            set(VarScope::Transaction, REQUEST_VAR, TypedData::Bool(true)),
            key(&first_key)
        ]
    );
    // Only GET now: the same POST is refused (no permission matches, default deny), and the
    // connection is given the new table's key, so its next requests miss no change.
    a.table.replace(l7_table(
        serde_json::json!([{"Action": "allow", "HTTP": {"PathPrefix": "/api", "Methods": ["GET"]}}]),
    ));
    let second_key = a.table.current().fast_key(Some(0));
    assert_ne!(first_key, second_key, "a new table's keys are new");
    s.write_all(NOTIFY_REQUEST).unwrap();
    assert_eq!(
        request_ack(&mut s),
        vec![
            set(VarScope::Transaction, REQUEST_VAR, TypedData::Bool(false)),
            key(&second_key)
        ]
    );
    // A header permission sees the two captured fields joined.
    a.table
        .replace(l7_table(serde_json::json!([{"Action": "allow", "HTTP": {
            "Header": [{"Name": "X-TEST-DEBUG", "Exact": "a,b"}]
        }}])));
    s.write_all(NOTIFY_REQUEST).unwrap();
    assert_eq!(
        request_ack(&mut s)[0],
        set(VarScope::Transaction, REQUEST_VAR, TypedData::Bool(true))
    );
    let stats = a.handle.stats();
    assert_eq!(stats.requests_allowed.load(Ordering::Relaxed), 2);
    assert_eq!(stats.requests_denied.load(Ordering::Relaxed), 1);
}
