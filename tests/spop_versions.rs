//! The SPOP codec against frames captured from each supported HAProxy (scripts/capture-spop):
//! 2.6 in `fixtures/spop/`, 3.0 and 3.2 in `fixtures/spop/<version>/`. Every frame decodes,
//! re-encodes to the same bytes, and says what the agent relies on.

use haproxy_consul_connect::spoe::frame::{
    decode, decode_hdrs_bin, Frame, HaproxyHello, TypedData,
};

const CLIENT_DER: &[u8] = include_bytes!("../fixtures/spop/certs/client.der");

struct Capture {
    version: &'static str,
    hello: &'static [u8],
    hello_healthcheck: &'static [u8],
    notify_cert: &'static [u8],
    notify_nocert: &'static [u8],
    /// 3.2 closes on soft-stop without a HAPROXY-DISCONNECT.
    disconnect: Option<&'static [u8]>,
}

macro_rules! capture {
    ($version:literal, $dir:literal, $disconnect:expr) => {
        Capture {
            version: $version,
            hello: include_bytes!(concat!("../fixtures/spop/", $dir, "haproxy-hello.bin")),
            hello_healthcheck: include_bytes!(concat!(
                "../fixtures/spop/",
                $dir,
                "haproxy-hello-healthcheck.bin"
            )),
            notify_cert: include_bytes!(concat!("../fixtures/spop/", $dir, "notify-cert.bin")),
            notify_nocert: include_bytes!(concat!("../fixtures/spop/", $dir, "notify-nocert.bin")),
            disconnect: $disconnect,
        }
    };
}

fn captures() -> [Capture; 3] {
    [
        capture!(
            "2.6",
            "",
            Some(include_bytes!("../fixtures/spop/haproxy-disconnect.bin"))
        ),
        capture!(
            "3.0",
            "3.0/",
            Some(include_bytes!(
                "../fixtures/spop/3.0/haproxy-disconnect.bin"
            ))
        ),
        capture!("3.2", "3.2/", None),
    ]
}

fn one_frame(version: &str, what: &str, buf: &[u8]) -> Frame {
    let (frame, used) = decode(buf, 16380)
        .unwrap_or_else(|e| panic!("{version} {what}: {e}"))
        .unwrap_or_else(|| panic!("{version} {what}: incomplete"));
    assert_eq!(used, buf.len(), "{version} {what}: one whole frame");
    let mut again = Vec::new();
    frame.encode(usize::MAX, &mut again).unwrap();
    assert_eq!(
        again, buf,
        "{version} {what}: re-encodes to the captured bytes"
    );
    frame
}

fn hello(version: &str, what: &str, buf: &[u8]) -> HaproxyHello {
    match one_frame(version, what, buf) {
        Frame::HaproxyHello(kv) => {
            HaproxyHello::from_kv(&kv).unwrap_or_else(|e| panic!("{version} {what}: {e}"))
        }
        other => panic!("{version} {what}: {other:?}"),
    }
}

#[test]
fn hellos_of_every_version_are_accepted() {
    for c in captures() {
        let h = hello(c.version, "hello", c.hello);
        assert!(
            h.supported_versions.iter().any(|v| v == "2.0"),
            "{}: {h:?}",
            c.version
        );
        assert_eq!(h.max_frame_size, 16380, "{}", c.version);
        assert!(
            h.engine_id.is_some() && !h.healthcheck,
            "{}: {h:?}",
            c.version
        );
        assert!(
            h.capabilities.iter().any(|c| c == "pipelining"),
            "{}: {h:?}",
            c.version
        );
        // `async` went with the multiplexer of 3.1.
        let has_async = h.capabilities.iter().any(|c| c == "async");
        assert_eq!(has_async, c.version != "3.2", "{}: {h:?}", c.version);

        let hc = hello(c.version, "healthcheck hello", c.hello_healthcheck);
        assert!(
            hc.healthcheck && hc.engine_id.is_none(),
            "{}: {hc:?}",
            c.version
        );
    }
}

#[test]
fn notifies_of_every_version_carry_the_client_certificate_or_null() {
    for c in captures() {
        for (what, buf, want) in [
            (
                "notify-cert",
                c.notify_cert,
                TypedData::Binary(CLIENT_DER.to_vec()),
            ),
            ("notify-nocert", c.notify_nocert, TypedData::Null),
        ] {
            let Frame::Notify(n) = one_frame(c.version, what, buf) else {
                panic!("{} {what}: not a NOTIFY", c.version);
            };
            assert_eq!(
                n.find_arg(Some("check-client"), "cert"),
                Some(&want),
                "{} {what}",
                c.version
            );
        }
    }
}

#[test]
fn disconnects_say_normal_where_haproxy_sends_them() {
    for c in captures() {
        let Some(buf) = c.disconnect else { continue };
        let Frame::HaproxyDisconnect(kv) = one_frame(c.version, "disconnect", buf) else {
            panic!("{}: not a HAPROXY-DISCONNECT", c.version);
        };
        assert_eq!(kv.get("status-code").and_then(TypedData::as_u64), Some(0));
    }
}

/// The per-request NOTIFY of L7 intentions (`check-request` on on-frontend-http-request) and
/// the http listener's connection NOTIFY, as 2.6, 3.0 and 3.2 send them for
/// `POST /api/x?q=1` with `X-Test-Debug: a` and `x-test-debug: b`.
#[test]
fn per_request_notifies_of_every_version_carry_method_path_and_headers() {
    let captured: [(&str, &[u8], &[u8]); 3] = [
        (
            "2.6",
            include_bytes!("../fixtures/spop/notify-l7-connection.bin"),
            include_bytes!("../fixtures/spop/notify-request.bin"),
        ),
        (
            "3.0",
            include_bytes!("../fixtures/spop/3.0/notify-l7-connection.bin"),
            include_bytes!("../fixtures/spop/3.0/notify-request.bin"),
        ),
        (
            "3.2",
            include_bytes!("../fixtures/spop/3.2/notify-l7-connection.bin"),
            include_bytes!("../fixtures/spop/3.2/notify-request.bin"),
        ),
    ];
    for (version, connection, request) in captured {
        let Frame::Notify(n) = one_frame(version, "notify-l7-connection", connection) else {
            panic!("{version}: not a NOTIFY");
        };
        assert_eq!(
            n.find_arg(Some("check-client"), "cert"),
            Some(&TypedData::Binary(CLIENT_DER.to_vec())),
            "{version}"
        );
        let Frame::Notify(n) = one_frame(version, "notify-request", request) else {
            panic!("{version}: not a NOTIFY");
        };
        let m = &n.messages[0];
        assert_eq!(
            (n.messages.len(), m.name.as_str()),
            (1, "check-request"),
            "{version}"
        );
        let names: Vec<&str> = m.args.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["src", "method", "path", "headers"], "{version}");
        assert!(
            m.arg("src")
                .and_then(TypedData::as_str)
                .is_some_and(|s| s.ends_with("/svc/client")),
            "{version}: {m:?}"
        );
        assert_eq!(
            m.arg("method").and_then(TypedData::as_str),
            Some("POST"),
            "{version}"
        );
        assert_eq!(
            m.arg("path").and_then(TypedData::as_str),
            Some("/api/x"),
            "{version}"
        );
        let Some(TypedData::Binary(h)) = m.arg("headers") else {
            panic!("{version}: headers is not BINARY: {:?}", m.arg("headers"));
        };
        let fields = decode_hdrs_bin(h).unwrap_or_else(|e| panic!("{version}: {e}"));
        let debug: Vec<&[u8]> = fields
            .iter()
            .filter(|(k, _)| k.eq_ignore_ascii_case(b"x-test-debug"))
            .map(|(_, v)| *v)
            .collect();
        assert_eq!(debug, [&b"a"[..], &b"b"[..]], "{version}");
    }
}
