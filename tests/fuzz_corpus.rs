//! Replays the fuzz seeds and the committed, minimised fuzz corpus (`fuzz/corpus/<target>`)
//! through the same invariants the fuzz targets check (`spoe::fuzzing`), on stable and without
//! libFuzzer: what the fuzzer once found keeps being checked by every `cargo test`, and an
//! empty or missing corpus fails here rather than silently fuzzing nothing.

use std::fs;
use std::path::{Path, PathBuf};

use haproxy_consul_connect::spoe::fuzzing;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

/// The regular files in `dir` and below (as libFuzzer reads a corpus directory) whose name
/// passes `keep`, sorted so a failure names the same file every run.
fn files(dir: &Path, keep: &dyn Fn(&Path) -> bool) -> Vec<PathBuf> {
    let entries = fs::read_dir(dir).unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let mut out = Vec::new();
    for e in entries {
        let p = e.expect("directory entry").path();
        if p.is_dir() {
            out.extend(files(&p, keep));
        } else if p.is_file() && keep(&p) {
            out.push(p);
        }
    }
    out.sort();
    out
}

/// Runs `check` on every file, naming the file if it panics; returns how many ran.
fn replay<R>(paths: &[PathBuf], check: impl Fn(&[u8]) -> R) -> usize {
    for p in paths {
        let data = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| check(&data)));
        if let Err(e) = run {
            eprintln!("invariant violated by {}", p.display());
            std::panic::resume_unwind(e);
        }
    }
    paths.len()
}

#[test]
fn spop_frame_seeds_and_corpus() {
    let seeds = files(&root().join("fixtures/spop"), &|_| true);
    let corpus = files(&root().join("fuzz/corpus/spop_frame"), &|_| true);
    assert!(
        replay(&seeds, fuzzing::spop_frame) > 0,
        "no seeds in fixtures/spop"
    );
    assert!(
        replay(&corpus, fuzzing::spop_frame) > 0,
        "fuzz/corpus/spop_frame is empty or missing"
    );
    // The captured frames are whole frames: the replay reached past the decoder's first check.
    let notify = fs::read(root().join("fixtures/spop/notify-cert.bin")).expect("fixture");
    assert_eq!(fuzzing::spop_frame(&notify).frames, 1);
    let request = fs::read(root().join("fixtures/spop/notify-request.bin")).expect("fixture");
    let reached = fuzzing::spop_frame(&request);
    assert_eq!(
        (reached.frames, reached.l7_allowed + reached.l7_denied),
        (1, 1)
    );
    // The committed corpus reaches the L7 decision and both its outcomes, so the invariant on
    // allowed requests runs, not only the early returns on missing arguments.
    let mut total = fuzzing::Reached::default();
    for p in &corpus {
        total += fuzzing::spop_frame(&fs::read(p).expect("corpus file"));
    }
    assert!(
        total.l7_allowed > 0 && total.l7_denied > 0,
        "fuzz/corpus/spop_frame never reaches both L7 outcomes: {total:?}"
    );
}

#[test]
fn authz_decide_seeds_and_corpus() {
    let certs = root().join("fixtures/spop/certs");
    let seeds = files(&certs, &|p| p.extension().is_some_and(|e| e == "der"));
    let corpus = files(&root().join("fuzz/corpus/authz_decide"), &|_| true);
    assert!(
        replay(&seeds, fuzzing::authz_decide) > 0,
        "no *.der in fixtures/spop/certs"
    );
    assert!(
        replay(&corpus, fuzzing::authz_decide) > 0,
        "fuzz/corpus/authz_decide is empty or missing"
    );
    // The invariant's fixed clock sits inside the fixture PKI's validity, so the fuzzer can
    // reach the allow path; were it outside, everything would be denied and the check on
    // allowed certificates would never run.
    let client = fs::read(certs.join("client.der")).expect("fixture");
    let d = fuzzing::authz_decide(&client);
    assert!(d.allow, "{}", d.reason);
    for denied in [
        "web.der",
        "expired.der",
        "client-rogue.der",
        "client-ca2.der",
    ] {
        let d = fuzzing::authz_decide(&fs::read(certs.join(denied)).expect("fixture"));
        assert!(!d.allow, "{denied}: {}", d.reason);
    }
}

#[test]
fn values_corpus() {
    let corpus = files(&root().join("fuzz/corpus/values"), &|_| true);
    let accepted: usize = corpus
        .iter()
        .map(|p| {
            let data = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
            haproxy_consul_connect::value::fuzz_check(&data)
        })
        .sum();
    assert!(!corpus.is_empty(), "fuzz/corpus/values is empty or missing");
    // The corpus holds values each parser takes, not only refusals.
    assert!(accepted >= 5, "only {accepted} values accepted");
    // The payloads of issue 24 are refused by every parser.
    for hostile in [
        "newline-address",
        "semicolon-address",
        "redirect-datacenter",
    ] {
        let data = fs::read(root().join("fuzz/corpus/values").join(hostile)).expect("seed");
        assert_eq!(
            haproxy_consul_connect::value::fuzz_check(&data),
            0,
            "{hostile} was accepted by a parser"
        );
    }
}

#[test]
fn jwt_corpus() {
    let corpus = files(&root().join("fuzz/corpus/jwt"), &|_| true);
    assert!(!corpus.is_empty(), "fuzz/corpus/jwt is empty or missing");
    let mut providers = 0;
    let mut tokens = 0;
    for p in &corpus {
        let data = fs::read(p).unwrap_or_else(|e| panic!("{}: {e}", p.display()));
        let run = std::panic::catch_unwind(|| fuzzing::jwt(&data));
        let r = run.unwrap_or_else(|e| {
            eprintln!("invariant violated by {}", p.display());
            std::panic::resume_unwind(e)
        });
        providers += r.providers;
        tokens += r.tokens;
    }
    // The corpus reaches both parsers' success paths, not only their refusals.
    assert!(
        providers >= 2 && tokens >= 5,
        "{providers} providers, {tokens} tokens"
    );
}
