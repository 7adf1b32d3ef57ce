//! Any string into every value parser of `value`; the invariants are in the library
//! (`value::fuzz_check`) so that `tests/fuzz_corpus.rs` replays the corpus through them.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    haproxy_consul_connect::value::fuzz_check(data);
});
