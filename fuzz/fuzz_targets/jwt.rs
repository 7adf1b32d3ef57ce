//! Any bytes as a JWT (or, starting with `{`, a jwt-provider entry); the invariants are in the
//! library (`spoe::fuzzing::jwt`) so that `tests/fuzz_corpus.rs` replays the corpus through them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    haproxy_consul_connect::spoe::fuzzing::jwt(data);
});
