//! The import rules of ARCHITECTURE.md, checked on the source: which top-level module may refer
//! to which, and no cycle between them. Each file is parsed (syn); a reference is any path that
//! resolves to a top-level module: `crate::a`, the grouped `use crate::{a, b::c}`, `super::`
//! chains that climb out of the module, `self::`, and the same forms inside macro calls.
//! `#[cfg(test)]` items, `tests.rs`/`fixtures.rs` and the files of a `tests/` directory (a test
//! module split by area) are not scanned. A form the scanner cannot
//! resolve (a glob of or alias to the crate root, `super` past the root, a root name that is no
//! module nor lib.rs's own item, a re-export in lib.rs) fails the tests rather than being
//! skipped.

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
        "pki",
        &[
            "admission",
            "apply",
            "cli",
            "config",
            "consul",
            "files",
            "haproxy",
            "http",
            "intentions",
            "metrics",
            "model",
            "objects",
            "peering",
            "render",
            "snapshot",
            "spoe",
            "stats",
            "supervisor",
        ],
        "pki is a leaf below spoe, admission and peering: certificates in, identities out",
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
            "pki",
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

fn parse(path: &Path) -> syn::File {
    let text = fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    syn::parse_file(&text).unwrap_or_else(|e| panic!("{}: cannot parse: {e}", path.display()))
}

/// The names at the crate root: its modules and lib.rs's own items. A `pub use` in lib.rs
/// would let `crate::Name` stand for another module's item, so it is refused.
struct Root {
    modules: BTreeSet<String>,
    items: BTreeSet<String>,
}

fn root() -> Root {
    let lib = parse(&src().join("lib.rs"));
    let (mut modules, mut items) = (BTreeSet::new(), BTreeSet::new());
    for item in &lib.items {
        match item {
            syn::Item::Mod(m) => {
                modules.insert(m.ident.to_string());
            }
            syn::Item::Fn(f) => {
                items.insert(f.sig.ident.to_string());
            }
            syn::Item::Const(c) => {
                items.insert(c.ident.to_string());
            }
            syn::Item::Static(c) => {
                items.insert(c.ident.to_string());
            }
            syn::Item::Struct(c) => {
                items.insert(c.ident.to_string());
            }
            syn::Item::Enum(c) => {
                items.insert(c.ident.to_string());
            }
            syn::Item::Type(c) => {
                items.insert(c.ident.to_string());
            }
            other => panic!(
                "lib.rs: an item the scanner does not read: {}",
                quote_kind(other)
            ),
        }
    }
    Root { modules, items }
}

fn quote_kind(item: &syn::Item) -> &'static str {
    match item {
        syn::Item::Use(_) => "use (a re-export at the root hides which module a name is from)",
        syn::Item::Macro(_) => "macro",
        syn::Item::Impl(_) => "impl",
        syn::Item::Trait(_) => "trait",
        _ => "other",
    }
}

fn is_cfg_test(attrs: &[syn::Attribute]) -> bool {
    attrs.iter().any(|a| {
        a.path().is_ident("cfg")
            && matches!(&a.meta, syn::Meta::List(l) if l.tokens.to_string() == "test")
    })
}

fn item_attrs(item: &syn::Item) -> &[syn::Attribute] {
    use syn::Item::*;
    match item {
        Const(i) => &i.attrs,
        Enum(i) => &i.attrs,
        ExternCrate(i) => &i.attrs,
        Fn(i) => &i.attrs,
        ForeignMod(i) => &i.attrs,
        Impl(i) => &i.attrs,
        Macro(i) => &i.attrs,
        Mod(i) => &i.attrs,
        Static(i) => &i.attrs,
        Struct(i) => &i.attrs,
        Trait(i) => &i.attrs,
        TraitAlias(i) => &i.attrs,
        Type(i) => &i.attrs,
        Union(i) => &i.attrs,
        Use(i) => &i.attrs,
        _ => &[],
    }
}

/// Collects the top-level modules one file's non-test code refers to.
struct Scan<'r> {
    root: &'r Root,
    /// The module the visitor is in, from the crate root (inline `mod`s included).
    module: Vec<String>,
    refs: BTreeSet<String>,
    /// Forms that could not be resolved, with where they were.
    unreadable: Vec<String>,
}

impl Scan<'_> {
    fn here(&self) -> String {
        self.module.join("::")
    }

    /// Resolves a path that starts with `crate`, `self` or `super` (others are extern crates or
    /// names in scope, whose own `use` is scanned) and notes the top-level module it lands in.
    fn resolve(&mut self, segs: &[String]) {
        let (mut at, rest) = match segs.first().map(String::as_str) {
            Some("crate") => (Vec::new(), &segs[1..]),
            Some("self") | Some("super") => {
                let mut at = self.module.clone();
                let mut rest = segs;
                if rest.first().is_some_and(|s| s == "self") {
                    rest = &rest[1..];
                }
                while rest.first().is_some_and(|s| s == "super") {
                    if at.pop().is_none() {
                        self.unreadable
                            .push(format!("{}: `super` past the crate root", self.here()));
                        return;
                    }
                    rest = &rest[1..];
                }
                (at, rest)
            }
            _ => return,
        };
        at.extend(rest.iter().cloned());
        let Some(top) = at.first() else {
            self.unreadable.push(format!(
                "{}: the crate root itself is imported ({})",
                self.here(),
                segs.join("::")
            ));
            return;
        };
        if self.root.modules.contains(top) {
            self.refs.insert(top.clone());
        } else if !self.root.items.contains(top) {
            self.unreadable.push(format!(
                "{}: `{}` names nothing at the crate root the scanner knows",
                self.here(),
                segs.join("::")
            ));
        }
    }

    fn use_tree(&mut self, prefix: &mut Vec<String>, tree: &syn::UseTree) {
        // `a::{self}` and `a::{self as b}` name `a` itself.
        let leaf = |scan: &mut Self, prefix: &mut Vec<String>, ident: &syn::Ident| {
            if ident == "self" {
                scan.resolve(prefix);
            } else {
                prefix.push(ident.to_string());
                scan.resolve(prefix);
                prefix.pop();
            }
        };
        match tree {
            syn::UseTree::Path(p) => {
                prefix.push(p.ident.to_string());
                self.use_tree(prefix, &p.tree);
                prefix.pop();
            }
            syn::UseTree::Name(n) => leaf(self, prefix, &n.ident),
            syn::UseTree::Rename(r) => leaf(self, prefix, &r.ident),
            syn::UseTree::Glob(_) => self.resolve(prefix),
            syn::UseTree::Group(g) => {
                for t in &g.items {
                    self.use_tree(prefix, t);
                }
            }
        }
    }

    /// Macro arguments are tokens, not paths: finds `crate::a`, `self::a`, `super::…::a`
    /// runs in them, and refuses a brace group after `::`.
    fn tokens(&mut self, tokens: proc_macro2::TokenStream) {
        use proc_macro2::TokenTree;
        let tts: Vec<TokenTree> = tokens.into_iter().collect();
        let is_colons = |i: usize| {
            matches!((tts.get(i), tts.get(i + 1)),
                (Some(TokenTree::Punct(a)), Some(TokenTree::Punct(b)))
                    if a.as_char() == ':' && b.as_char() == ':')
        };
        let mut i = 0;
        while i < tts.len() {
            match &tts[i] {
                TokenTree::Group(g) => self.tokens(g.stream()),
                TokenTree::Ident(id)
                    if ["crate", "self", "super"].contains(&id.to_string().as_str())
                        && is_colons(i + 1)
                        && !matches!(i.checked_sub(1).and_then(|j| tts.get(j)),
                            Some(TokenTree::Punct(p)) if p.as_char() == '$') =>
                {
                    let mut segs = vec![id.to_string()];
                    let mut j = i + 1;
                    while is_colons(j) {
                        match tts.get(j + 2) {
                            Some(TokenTree::Ident(next)) => {
                                segs.push(next.to_string());
                                j += 3;
                            }
                            _ => {
                                self.unreadable.push(format!(
                                    "{}: `{}::` followed by something other than a name in a macro",
                                    self.here(),
                                    segs.join("::")
                                ));
                                break;
                            }
                        }
                    }
                    self.resolve(&segs);
                    i = j;
                    continue;
                }
                _ => {}
            }
            i += 1;
        }
    }
}

impl<'ast> syn::visit::Visit<'ast> for Scan<'_> {
    fn visit_item(&mut self, item: &'ast syn::Item) {
        if !is_cfg_test(item_attrs(item)) {
            syn::visit::visit_item(self, item);
        }
    }

    fn visit_impl_item(&mut self, item: &'ast syn::ImplItem) {
        let attrs = match item {
            syn::ImplItem::Const(i) => &i.attrs,
            syn::ImplItem::Fn(i) => &i.attrs,
            syn::ImplItem::Type(i) => &i.attrs,
            syn::ImplItem::Macro(i) => &i.attrs,
            _ => return syn::visit::visit_impl_item(self, item),
        };
        if !is_cfg_test(attrs) {
            syn::visit::visit_impl_item(self, item);
        }
    }

    fn visit_item_mod(&mut self, m: &'ast syn::ItemMod) {
        if let Some((_, items)) = &m.content {
            self.module.push(m.ident.to_string());
            for item in items {
                self.visit_item(item);
            }
            self.module.pop();
        }
    }

    fn visit_item_extern_crate(&mut self, e: &'ast syn::ItemExternCrate) {
        if e.ident == "self" {
            self.unreadable.push(format!(
                "{}: `extern crate self` aliases the root",
                self.here()
            ));
        }
    }

    fn visit_item_use(&mut self, u: &'ast syn::ItemUse) {
        self.use_tree(&mut Vec::new(), &u.tree);
    }

    // `pub(crate)`, `pub(super)`, `pub(in crate::a)` say who may see an item, not what it uses.
    fn visit_vis_restricted(&mut self, _: &'ast syn::VisRestricted) {}

    fn visit_path(&mut self, path: &'ast syn::Path) {
        let segs: Vec<String> = path.segments.iter().map(|s| s.ident.to_string()).collect();
        // `self` alone is the receiver, not a module.
        if segs.len() > 1 || segs.first().is_some_and(|s| s == "crate" || s == "super") {
            self.resolve(&segs);
        }
        syn::visit::visit_path(self, path);
    }

    fn visit_macro(&mut self, mac: &'ast syn::Macro) {
        self.visit_path(&mac.path);
        self.tokens(mac.tokens.clone());
    }
}

/// The module a file is, from its place under src/: `a.rs` and `a/mod.rs` are `a`.
fn module_of(rel: &Path) -> Vec<String> {
    let mut parts: Vec<String> = rel
        .components()
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    if let Some(last) = parts.pop() {
        let stem = last.trim_end_matches(".rs");
        if stem != "mod" {
            parts.push(stem.to_string());
        }
    }
    parts
}

/// Scans one file's text as module `module`: (top-level modules referred to, unreadable forms).
fn scan(text: &str, module: &[&str], root: &Root) -> (BTreeSet<String>, Vec<String>) {
    let file = syn::parse_file(text).unwrap_or_else(|e| panic!("cannot parse: {e}"));
    let mut scan = Scan {
        root,
        module: module.iter().map(|s| s.to_string()).collect(),
        refs: BTreeSet::new(),
        unreadable: Vec::new(),
    };
    syn::visit::Visit::visit_file(&mut scan, &file);
    (scan.refs, scan.unreadable)
}

/// Each top-level module and the top-level modules its non-test code refers to (itself
/// excluded). Panics listing every form the scanner could not resolve.
fn graph() -> BTreeMap<String, BTreeSet<String>> {
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
    let root = root();
    let mut files = Vec::new();
    walk(&src(), &mut files);
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for f in files {
        let rel = f.strip_prefix(src()).unwrap();
        let name = rel.file_name().unwrap().to_string_lossy();
        let in_tests_dir = rel.parent().is_some_and(|d| d.ends_with("tests"));
        if name == "tests.rs" || name == "fixtures.rs" || in_tests_dir {
            continue;
        }
        let module = module_of(rel);
        let top = module[0].clone();
        if top == "lib" || top == "main" || top == "bin" {
            continue;
        }
        let text = fs::read_to_string(&f).unwrap();
        let module: Vec<&str> = module.iter().map(String::as_str).collect();
        let (refs, bad) = scan(&text, &module, &root);
        unreadable.extend(bad.into_iter().map(|b| format!("{}: {b}", rel.display())));
        let entry = out.entry(top.clone()).or_default();
        entry.extend(refs);
        entry.remove(&top);
    }
    assert!(
        unreadable.is_empty(),
        "references the scanner cannot resolve:\n{}",
        unreadable.join("\n")
    );
    out
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
fn the_scanner_reads_every_form_of_reference() {
    let root = Root {
        modules: ["apply", "consul", "haproxy", "http", "model", "spoe"]
            .map(String::from)
            .into(),
        items: ["reload_haproxy"].map(String::from).into(),
    };
    let refs = |text: &str, module: &[&str]| {
        let (refs, bad) = scan(text, module, &root);
        assert!(bad.is_empty(), "{text}: {bad:?}");
        refs.into_iter().collect::<Vec<_>>()
    };
    let spoe = &["spoe", "authz"][..];
    assert_eq!(refs("use crate::apply::Applier;", spoe), ["apply"]);
    assert_eq!(
        refs("use crate::{apply, model::{Desired, Mode}};", spoe),
        ["apply", "model"]
    );
    assert_eq!(
        refs("fn f() { super::super::http::get(); }", spoe),
        ["http"]
    );
    assert_eq!(
        refs("use super::super::{consul, haproxy};", spoe),
        ["consul", "haproxy"]
    );
    assert_eq!(refs("use super::frame::Frame;", spoe), ["spoe"]);
    assert_eq!(
        refs("mod inner { use super::super::super::apply; }", spoe),
        ["apply"]
    );
    assert_eq!(
        refs("fn f() { println!(\"{}\", crate::model::x()); }", spoe),
        ["model"]
    );
    assert_eq!(refs("fn f() { crate::reload_haproxy(); }", spoe).len(), 0);
    assert!(refs("#[cfg(test)]\nmod tests { use crate::apply; }", spoe).is_empty());
    // What it cannot resolve fails, never passes silently.
    for text in [
        "use crate::*;",
        "use crate::{self as c, http};",
        "use super::super::*;",
        "use super::super::super::apply;",
        "extern crate self as me;",
        "fn f() { crate::Unknown::new(); }",
        "fn f() { m!(crate::{apply}); }",
    ] {
        let (_, bad) = scan(text, spoe, &root);
        assert!(!bad.is_empty(), "{text} passed the scanner unread");
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

/// Every module of the crate, as ARCHITECTURE.md's code map must name it: `a` for src/a.rs or
/// src/a/mod.rs, `a::b` for src/a/b.rs or src/a/b/mod.rs. Test-only files are not modules a
/// newcomer looks for.
fn modules() -> Vec<String> {
    let mut out = Vec::new();
    let mut entries: Vec<_> = fs::read_dir(src()).expect("src/ lists").flatten().collect();
    entries.sort_by_key(|e| e.path());
    for e in entries {
        let p = e.path();
        let name = p
            .file_stem()
            .and_then(|s| s.to_str())
            .unwrap_or("")
            .to_string();
        if p.is_dir() {
            if !p.join("mod.rs").exists() {
                continue; // src/bin: programs, not modules
            }
            out.push(name.clone());
            let mut subs: Vec<_> = fs::read_dir(&p)
                .expect("module dir lists")
                .flatten()
                .collect();
            subs.sort_by_key(|e| e.path());
            for s in subs {
                let sp = s.path();
                let sub = sp
                    .file_stem()
                    .and_then(|s| s.to_str())
                    .unwrap_or("")
                    .to_string();
                let is_module = sp.is_dir() && sp.join("mod.rs").exists()
                    || sp.extension().is_some_and(|x| x == "rs");
                if is_module && !["mod", "tests", "fixtures"].contains(&sub.as_str()) {
                    out.push(format!("{name}::{sub}"));
                }
            }
        } else if p.extension().is_some_and(|x| x == "rs")
            && !["lib", "main"].contains(&name.as_str())
        {
            out.push(name);
        }
    }
    out
}

/// The names ARCHITECTURE.md's code map gives in its `###` headings: `a`, `a::b`, and each of
/// `a::{b, c}` as `a::b`, `a::c`.
fn code_map_names(text: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in text.lines().filter(|l| l.starts_with("### ")) {
        for quoted in line.split('`').skip(1).step_by(2) {
            match quoted.split_once("::{") {
                Some((parent, rest)) => {
                    for child in rest.trim_end_matches('}').split(',') {
                        names.insert(format!("{parent}::{}", child.trim()));
                    }
                    names.insert(parent.to_string());
                }
                None => {
                    names.insert(quoted.trim_end_matches('/').to_string());
                }
            }
        }
    }
    names
}

#[test]
fn every_module_has_a_code_map_entry() {
    let path = src().join("../ARCHITECTURE.md");
    let text = fs::read_to_string(&path).expect("ARCHITECTURE.md reads");
    let named = code_map_names(&text);
    let missing: Vec<String> = modules()
        .into_iter()
        .filter(|m| !named.contains(m))
        .collect();
    assert!(
        missing.is_empty(),
        "modules without a `###` entry in ARCHITECTURE.md's code map: {missing:?}"
    );
}

#[test]
fn the_code_map_reader_expands_grouped_names() {
    let names = code_map_names("### `a::{b, c}` and `d`\ntext `e`\n### `render` + `templates/`\n");
    let want: BTreeSet<String> = ["a", "a::b", "a::c", "d", "render", "templates"]
        .iter()
        .map(|s| s.to_string())
        .collect();
    assert_eq!(names, want);
}
