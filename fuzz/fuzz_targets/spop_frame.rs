//! Any bytes from the SPOE socket; the invariants are in the library
//! (`spoe::fuzzing::spop_frame`) so that `tests/fuzz_corpus.rs` replays the corpus through them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    haproxy_consul_connect::spoe::fuzzing::spop_frame(data);
});
