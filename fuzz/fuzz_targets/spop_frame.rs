//! Any bytes from the SPOE socket: the decoder must return, never panic, and whatever it
//! accepts must survive an encode/decode round trip unchanged.
#![no_main]

use haproxy_consul_connect::spoe::frame::{
    self, AgentHello, Disconnect, Frame, HaproxyHello, AGENT_MAX_FRAME_SIZE,
};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    // As the agent's read loop does: frame after frame until more bytes are needed or an
    // error ends the connection.
    let mut buf = data;
    loop {
        match frame::decode(buf, AGENT_MAX_FRAME_SIZE as usize) {
            Ok(Some((f, used))) => {
                assert!(used >= frame::LENGTH_PREFIX && used <= buf.len());
                match &f {
                    Frame::HaproxyHello(kv) => {
                        if let Ok(h) = HaproxyHello::from_kv(kv) {
                            let size = h.negotiate_frame_size(AGENT_MAX_FRAME_SIZE);
                            assert!((frame::MIN_FRAME_SIZE..=AGENT_MAX_FRAME_SIZE).contains(&size));
                        }
                    }
                    Frame::AgentHello(kv) => {
                        let _ = AgentHello::from_kv(kv);
                    }
                    Frame::HaproxyDisconnect(kv) | Frame::AgentDisconnect(kv) => {
                        let _ = Disconnect::from_kv(kv);
                    }
                    Frame::Notify(n) => {
                        let _ = n.find_arg(Some("check-client"), "cert");
                    }
                    Frame::Ack(_) => {}
                }
                let mut out = Vec::new();
                match f.encode(usize::MAX, &mut out) {
                    Ok(()) => {
                        let (again, n) = frame::decode(&out, usize::MAX)
                            .expect("re-encoded frame decodes")
                            .expect("re-encoded frame is complete");
                        assert_eq!(n, out.len());
                        assert_eq!(again, f);
                    }
                    // The only frames we refuse to write: an ACK with no action.
                    Err(e) => assert_eq!(e, frame::FrameError::EmptyAck),
                }
                buf = &buf[used..];
            }
            Ok(None) => break,
            Err(e) => {
                let _ = e.status_code().code();
                let _ = e.to_string();
                break;
            }
        }
    }

    // The varint encoding is a bijection: whatever decodes re-encodes to the same bytes.
    if let Ok((v, n)) = frame::decode_varint(data, "fuzz") {
        let mut out = Vec::new();
        frame::encode_varint(v, &mut out);
        assert_eq!(&out[..], &data[..n]);
    }
});
