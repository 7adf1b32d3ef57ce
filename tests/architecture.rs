//! The import rules of ARCHITECTURE.md, checked on the source: which top-level module may refer
//! to which, and no cycle between them. A reference is any `crate::<module>` in a module's
//! non-test code (its files up to a `#[cfg(test)] mod`, and never `tests.rs`/`fixtures.rs`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::path::{Path, PathBuf};

/// (module, modules it must never refer to, why).
const FORBIDDEN: &[(&str, &[&str], &str)] = &[
    (
        "consul",
        &[
            "haproxy",
            "model",
            "render",
            "apply",
            "supervisor",
            "spoe",
            "intentions",
            "metrics",
            "stats",
            "snapshot",
        ],
        "consul knows nothing about HAProxy or what is built from Consul's answers",
    ),
    (
        "haproxy",
        &["consul", "snapshot", "intentions", "supervisor", "spoe"],
        "haproxy never reads Consul",
    ),
    (
        "spoe",
        &[
            "consul",
            "http",
            "haproxy",
            "supervisor",
            "model",
            "snapshot",
            "apply",
            "files",
            "metrics",
            "stats",
        ],
        "the SPOE agent never calls Consul or does I/O beyond its socket",
    ),
    (
        "model",
        &[
            "http",
            "files",
            "apply",
            "supervisor",
            "haproxy",
            "render",
            "metrics",
            "stats",
            "random",
        ],
        "the model is pure",
    ),
    (
        "render",
        &[
            "http",
            "files",
            "apply",
            "supervisor",
            "consul",
            "haproxy",
            "random",
        ],
        "render decides nothing and writes nothing",
    ),
    (
        "snapshot",
        &[
            "http",
            "files",
            "apply",
            "supervisor",
            "haproxy",
            "model",
            "render",
        ],
        "the snapshot is Consul's answers merged, no I/O",
    ),
    (
        "cli",
        &[
            "consul",
            "haproxy",
            "supervisor",
            "apply",
            "model",
            "render",
            "files",
        ],
        "cli parses; it touches no network and builds nothing",
    ),
    (
        "config",
        &[
            "consul",
            "haproxy",
            "supervisor",
            "apply",
            "model",
            "render",
            "files",
            "cli",
        ],
        "config holds values",
    ),
    (
        "admission",
        &[
            "haproxy",
            "model",
            "objects",
            "render",
            "apply",
            "supervisor",
            "snapshot",
            "consul",
            "intentions",
            "metrics",
            "stats",
        ],
        "the identity checker probes endpoints and reports verdicts; it knows nothing of HAProxy, Consul or the model",
    ),
    (
        "stats",
        &["supervisor", "apply", "model", "render"],
        "stats owns no state anyone else needs",
    ),
    (
        "value",
        &[
            "admission",
            "apply",
            "cli",
            "config",
            "consul",
            "haproxy",
            "http",
            "intentions",
            "metrics",
            "model",
            "objects",
            "render",
            "snapshot",
            "spoe",
            "stats",
            "supervisor",
        ],
        "value is the typed vocabulary of the trust boundary: it depends on nothing of the crate",
    ),
];

fn src() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("src")
}

/// Non-test source text of each top-level module.
fn modules() -> BTreeMap<String, String> {
    let mut out: BTreeMap<String, String> = BTreeMap::new();
    fn walk(dir: &Path, files: &mut Vec<PathBuf>) {
        for e in fs::read_dir(dir).unwrap() {
            let p = e.unwrap().path();
            if p.is_dir() {
                walk(&p, files);
            } else if p.extension().is_some_and(|x| x == "rs") {
                files.push(p);
            }
        }
    }
    let mut files = Vec::new();
    walk(&src(), &mut files);
    for f in files {
        let rel = f.strip_prefix(src()).unwrap();
        let name = rel.file_name().unwrap().to_string_lossy();
        if name == "tests.rs" || name == "fixtures.rs" {
            continue;
        }
        let top = rel
            .components()
            .next()
            .unwrap()
            .as_os_str()
            .to_string_lossy()
            .trim_end_matches(".rs")
            .to_string();
        if top == "lib" || top == "main" {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        let code = match text.find("#[cfg(test)]\nmod tests {") {
            Some(i) => &text[..i],
            None => &text[..],
        };
        out.entry(top).or_default().push_str(code);
    }
    out
}

fn references(code: &str, known: &BTreeSet<String>) -> BTreeSet<String> {
    let mut refs = BTreeSet::new();
    let mut rest = code;
    while let Some(i) = rest.find("crate::") {
        rest = &rest[i + "crate::".len()..];
        let name: String = rest
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if known.contains(&name) {
            refs.insert(name);
        }
    }
    refs
}

fn graph() -> BTreeMap<String, BTreeSet<String>> {
    let mods = modules();
    let known: BTreeSet<String> = mods.keys().cloned().collect();
    mods.iter()
        .map(|(m, code)| {
            let mut refs = references(code, &known);
            refs.remove(m);
            (m.clone(), refs)
        })
        .collect()
}

#[test]
fn no_module_refers_to_what_it_must_not() {
    let g = graph();
    let mut broken = Vec::new();
    for (module, never, why) in FORBIDDEN {
        let refs = g
            .get(*module)
            .unwrap_or_else(|| panic!("module {module} not found under src/"));
        for bad in refs.iter().filter(|r| never.contains(&r.as_str())) {
            broken.push(format!("{module} refers to {bad}: {why}"));
        }
    }
    assert!(broken.is_empty(), "{}", broken.join("\n"));
}

#[test]
fn the_module_graph_has_no_cycle() {
    let g = graph();
    // Depth-first search with colours; the first back edge found names the cycle.
    fn visit(
        n: &str,
        g: &BTreeMap<String, BTreeSet<String>>,
        state: &mut BTreeMap<String, u8>,
        path: &mut Vec<String>,
    ) -> Option<Vec<String>> {
        state.insert(n.to_string(), 1);
        path.push(n.to_string());
        for m in g.get(n).into_iter().flatten() {
            match state.get(m).copied().unwrap_or(0) {
                1 => {
                    let start = path.iter().position(|p| p == m).unwrap();
                    let mut cycle = path[start..].to_vec();
                    cycle.push(m.clone());
                    return Some(cycle);
                }
                0 => {
                    if let Some(c) = visit(m, g, state, path) {
                        return Some(c);
                    }
                }
                _ => {}
            }
        }
        path.pop();
        state.insert(n.to_string(), 2);
        None
    }
    let mut state = BTreeMap::new();
    for n in g.keys() {
        if state.get(n).copied().unwrap_or(0) == 0 {
            if let Some(cycle) = visit(n, &g, &mut state, &mut Vec::new()) {
                panic!("import cycle: {}", cycle.join(" -> "));
            }
        }
    }
}

#[test]
fn the_checks_see_real_references() {
    // Guards the tests above: the scan must find edges that certainly exist.
    let g = graph();
    assert!(g["supervisor"].contains("apply"), "{g:?}");
    assert!(g["model"].contains("consul"), "{g:?}");
    assert!(g.len() > 15, "{g:?}");
}
