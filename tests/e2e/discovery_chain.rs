//! Traffic management from Consul's config entries (service-resolver, -splitter, -router) on
//! real programs: Consul (the version `CONSUL_BIN` names), our sidecars with HAProxy and the
//! Dataplane API, and one app per instance whose body names it. Ports the assertions of
//! Consul's Envoy integration cases (test/integration/connect/envoy/case-cfg-*) that HAProxy
//! can honour; the README's "Traffic management" section lists those it cannot.

use std::time::{Duration, Instant};

use crate::support::load::Load;
use crate::support::mesh::{sidecar, workdir};
use crate::support::*;
use serde_json::{json, Value};

/// One instance of a service with its app and sidecar.
struct Instance {
    // Owned so that it stops with the mesh; never read.
    _sidecar: Child,
    app: HttpApp,
}

/// `client` with upstreams `web` and `old`, and three instances behind them: `web-v1` and
/// `web-v2` (service `web`, `Meta.version` v1 and v2) and `backup` (service `web-backup`).
struct ChainMesh {
    // Field order is drop order: sidecars before apps and Consul.
    client: Child,
    instances: Vec<(String, Instance)>,
    consul: Consul,
    base: TempDir,
    web: String,
    old: String,
    web_port: u16,
    old_port: u16,
    client_port: u16,
    /// The client sidecar's `-stats-addr`.
    stats: String,
}

/// A registration of instance `id` of `service` with a TTL check (so a test can turn it
/// critical) that the sidecar's alias check follows.
fn instance_registration(id: &str, service: &str, version: &str, app: u16, port: u16) -> String {
    let mut reg: Value =
        serde_json::from_str(&sidecar_registration(service, app, port, &[])).expect("our own JSON");
    reg["ID"] = id.into();
    reg["Meta"] = json!({ "version": version });
    reg["Check"] = json!({ "CheckID": format!("ttl-{id}"), "TTL": "10m", "Status": "passing" });
    reg["Connect"]["SidecarService"]["Checks"][1] =
        json!({ "Name": format!("Connect Sidecar Aliasing {id}"), "AliasService": id });
    reg.to_string()
}

impl ChainMesh {
    fn start() -> ChainMesh {
        let base = TempDir::new("chain");
        let consul = Consul::start();
        let mut instances = Vec::new();
        for (id, service, version) in [
            ("web-v1", "web", "v1"),
            ("web-v2", "web", "v2"),
            ("backup", "web-backup", "v1"),
        ] {
            let app = HttpApp::start(id);
            consul.register(&instance_registration(
                id,
                service,
                version,
                app.port(),
                free_port(),
            ));
            let sidecar = sidecar(&consul, &base, id, false, &[]);
            instances.push((
                id.to_string(),
                Instance {
                    _sidecar: sidecar,
                    app,
                },
            ));
        }
        let (web, old, client_port) = (free_port(), free_port(), free_port());
        consul.register(&sidecar_registration(
            "client",
            free_port(),
            client_port,
            &[("web", web), ("old", old)],
        ));
        let stats = format!("127.0.0.1:{}", free_port());
        let client = sidecar(&consul, &base, "client", false, &["-stats-addr", &stats]);
        let mesh = ChainMesh {
            client,
            instances,
            consul,
            base,
            web: format!("127.0.0.1:{web}"),
            old: format!("127.0.0.1:{old}"),
            web_port: web,
            old_port: old,
            client_port,
            stats,
        };
        mesh.eventually(
            &mesh.web.clone(),
            "/",
            &[],
            &["web-v1", "web-v2"],
            "a plain upstream",
        );
        mesh
    }

    fn app(&self, id: &str) -> &HttpApp {
        &self
            .instances
            .iter()
            .find(|(i, _)| i == id)
            .expect("one of our instances")
            .1
            .app
    }

    fn put_entry(&self, entry: Value) {
        let (status, body) = self.consul.put("/v1/config", &entry.to_string());
        assert!(
            status == 200 && body.trim() == "true",
            "{entry}: {status} {body}"
        );
    }

    fn delete_entry(&self, kind: &str, name: &str) {
        let (status, body) = self.consul.delete(&format!("/v1/config/{kind}/{name}"));
        assert_eq!(status, 200, "delete {kind}/{name}: {body}");
    }

    /// Waits until 6 requests in a row are answered by one of `want` (and, with several, all
    /// of `want` answered at least once among the last ones), or panics with the sidecar's log.
    fn eventually(
        &self,
        addr: &str,
        path: &str,
        headers: &[(&str, &str)],
        want: &[&str],
        what: &str,
    ) {
        self.eventually_method(addr, "GET", path, headers, want, what);
    }

    fn eventually_method(
        &self,
        addr: &str,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        want: &[&str],
        what: &str,
    ) {
        let deadline = Instant::now() + Duration::from_secs(60);
        let mut last = String::new();
        while Instant::now() < deadline {
            let mut seen = Vec::new();
            let mut ok = true;
            for _ in 0..6 {
                match http_request_with(addr, method, path, headers, None, Duration::from_secs(5)) {
                    Ok(r) if r.status == 200 && want.contains(&r.body.as_str()) => {
                        seen.push(r.body)
                    }
                    Ok(r) => {
                        last = format!("{} {}", r.status, r.body);
                        ok = false;
                        break;
                    }
                    Err(e) => {
                        last = e;
                        ok = false;
                        break;
                    }
                }
            }
            if ok && want.iter().all(|w| seen.iter().any(|s| s == w)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        panic!(
            "{what}: {method} {path} {headers:?} never answered by {want:?} (last: {last})\n--- client sidecar ---\n{}",
            self.client.logs()
        );
    }

    /// How many full renders (validated reloads) the client sidecar has logged.
    fn full_renders(&self) -> usize {
        self.client
            .logs()
            .matches("rendering the whole configuration")
            .count()
    }

    fn client_cfg(&self) -> String {
        std::fs::read_to_string(workdir(&self.base, "client").join("haproxy.cfg"))
            .expect("the client sidecar's haproxy.cfg")
    }

    fn master(&self) -> std::path::PathBuf {
        workdir(&self.base, "client").join("master.sock")
    }

    /// The client's current HAProxy workers, before a change that reloads (`wait_reloaded`).
    fn workers(&self) -> Vec<u32> {
        current_workers(&self.master())
    }

    /// Waits until the client's haproxy.cfg holds `needle` and HAProxy runs a worker that was
    /// not among `before`: the reload that goes with the file has completed.
    fn wait_reloaded(&self, before: &[u32], needle: &str, what: &str) {
        wait_until(Duration::from_secs(60), what, || {
            self.client_cfg().contains(needle)
                && self.workers().iter().any(|w| !before.contains(w))
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}: haproxy.cfg holds {needle:?}: {}; workers {before:?} then {:?}\n--- client sidecar ---\n{}",
                self.client_cfg().contains(needle),
                self.workers(),
                self.client.logs()
            )
        });
    }

    /// Waits until the running HAProxy's splits map (`show map`, not the file) has a key
    /// ending with `key` (after the listener's name) at `value`.
    fn wait_split(&self, key: &str, value: &str, what: &str) {
        let dir = workdir(&self.base, "client");
        let has = || {
            map_entries(&dir, "splits.map")
                .iter()
                .any(|(k, v)| k.ends_with(key) && v == value)
        };
        wait_until(Duration::from_secs(60), what, has).unwrap_or_else(|e| {
            panic!(
                "{e}: HAProxy's splits map is {:?}\n--- client sidecar ---\n{}",
                map_entries(&dir, "splits.map"),
                self.client.logs()
            )
        });
    }

    /// Waits until HAProxy runs the upstream listener on `port` in `mode` (`show stat`).
    fn wait_listener_mode(&self, port: u16, mode: &str, what: &str) {
        let dir = workdir(&self.base, "client");
        wait_until(Duration::from_secs(60), what, || {
            frontend_mode(&dir, port).as_deref() == Some(mode)
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}: the listener on {port} runs in mode {:?}\n--- client sidecar ---\n{}",
                frontend_mode(&dir, port),
                self.client.logs()
            )
        });
    }

    /// Answers of `n` requests to `addr` by body.
    fn tally(&self, addr: &str, n: usize) -> std::collections::BTreeMap<String, usize> {
        let mut t = std::collections::BTreeMap::new();
        for _ in 0..n {
            let r = http_request(addr, "GET", "/", None, Duration::from_secs(5))
                .unwrap_or_else(|e| panic!("{e}\n{}", self.client.logs()));
            assert_eq!(r.status, 200, "{}", r.body);
            *t.entry(r.body).or_default() += 1;
        }
        t
    }
}

fn subsets() -> Value {
    json!({
        "v1": { "Filter": "Service.Meta.version == v1" },
        "v2": { "Filter": "Service.Meta.version == v2" }
    })
}

/// A fresh `ChainMesh` whose services all speak http (proxy-defaults, as the Envoy cases set
/// it), with `web`'s listener already in http mode, so a later count of renders or reloads
/// sees none left over from the protocol change.
fn http_mesh() -> ChainMesh {
    let m = ChainMesh::start();
    m.put_entry(json!({"Kind": "proxy-defaults", "Name": "global",
        "Config": {"protocol": "http"}}));
    for s in ["web", "web-backup", "old"] {
        m.consul.set_protocol(s, "http");
    }
    m.wait_listener_mode(
        m.web_port,
        "http",
        "the chain's protocol makes web's listener http",
    );
    m
}

/// The resolver's redirects, in tcp mode (no service-defaults yet) and then in http: each step
/// is a config entry change the running sidecar follows.
#[test]
fn resolver_redirects_a_service_in_tcp_and_in_http() {
    let m = ChainMesh::start();
    let old = m.old.clone();

    // case-cfg-resolver-svc-redirect-tcp: `old` has no instance; its resolver redirects to
    // web-backup, over a tcp listener.
    let r = http_request(&old, "GET", "/", None, Duration::from_secs(5));
    assert!(
        !matches!(&r, Ok(r) if r.status == 200),
        "nothing serves old yet: {r:?}"
    );
    m.put_entry(json!({"Kind": "service-resolver", "Name": "old",
        "Redirect": {"Service": "web-backup"}}));
    m.eventually(&old, "/", &[], &["backup"], "svc-redirect-tcp");
    // HAProxy's own answer for that listener (the file holds `mode tcp` and `mode http`
    // elsewhere: the defaults section, the metrics frontend).
    m.wait_listener_mode(m.old_port, "tcp", "old's listener in tcp mode");

    // From here on every service speaks http (proxy-defaults, as the Envoy cases set it).
    m.put_entry(json!({"Kind": "proxy-defaults", "Name": "global",
        "Config": {"protocol": "http"}}));
    for s in ["web", "web-backup", "old"] {
        m.consul.set_protocol(s, "http");
    }
    // case-cfg-resolver-svc-redirect-http
    m.eventually(&old, "/", &[], &["backup"], "svc-redirect-http");
    m.wait_listener_mode(
        m.old_port,
        "http",
        "the chain's protocol makes old's listener http",
    );
}

/// The resolver's default subset and its features, a redirect to a subset, and OnlyPassing.
#[test]
fn resolver_default_subset_subset_redirect_and_only_passing() {
    let m = http_mesh();
    let web = m.web.clone();
    let old = m.old.clone();

    // case-cfg-resolver-defaultsubset and -features: the default subset v2 only, with the
    // resolver's connect timeout on its backend.
    m.put_entry(json!({"Kind": "service-resolver", "Name": "web",
        "DefaultSubset": "v2", "ConnectTimeout": "30s", "Subsets": subsets()}));
    m.eventually(&web, "/", &[], &["web-v2"], "defaultsubset");
    let cfg = m.client_cfg();
    assert!(
        cfg.contains("timeout connect 30000"),
        "ConnectTimeout 30s on the v2 target:\n{cfg}"
    );
    assert!(
        cfg.contains("subset v2 in dc1"),
        "the target is named in the file:\n{cfg}"
    );

    // case-cfg-resolver-subset-redirect: old redirects to web's subset v1.
    m.put_entry(json!({"Kind": "service-resolver", "Name": "old",
        "Redirect": {"Service": "web", "ServiceSubset": "v1"}}));
    m.eventually(&old, "/", &[], &["web-v1"], "subset-redirect");
    // Consul refuses a web resolver without v1 while old redirects there.
    m.put_entry(json!({"Kind": "service-resolver", "Name": "old",
        "Redirect": {"Service": "web-backup"}}));

    // case-cfg-resolver-subset-onlypassing: with OnlyPassing, an instance whose check warns
    // leaves the subset; a subset without it keeps serving a warning instance.
    m.put_entry(json!({"Kind": "service-resolver", "Name": "web",
        "DefaultSubset": "test", "Subsets": {"test": {"OnlyPassing": true}}}));
    m.eventually(
        &web,
        "/",
        &[],
        &["web-v1", "web-v2"],
        "onlypassing, all passing",
    );
    let (s, b) = m.consul.put("/v1/agent/check/warn/ttl-web-v1", "");
    assert_eq!(s, 200, "{b}");
    m.eventually(
        &web,
        "/",
        &[],
        &["web-v2"],
        "onlypassing drops the warning instance",
    );
    m.put_entry(json!({"Kind": "service-resolver", "Name": "web",
        "DefaultSubset": "v1", "Subsets": subsets()}));
    m.eventually(
        &web,
        "/",
        &[],
        &["web-v1"],
        "without onlypassing a warning instance serves",
    );
    let (s, b) = m.consul.put("/v1/agent/check/pass/ttl-web-v1", "");
    assert_eq!(s, 200, "{b}");
}

/// The resolver's LoadBalancer (Consul 1.9+).
#[test]
fn resolver_load_balancer_ring_hash_and_least_request() {
    if !consul_is_current() {
        eprintln!("skipped: LoadBalancer needs Consul 1.9+");
        return;
    }
    let m = http_mesh();
    let web = m.web.clone();

    // LoadBalancer (Consul 1.9+): ring_hash on a header is HAProxy's consistent hashing on
    // it, so one user sticks to one instance; least_request is leastconn.
    let workers = m.workers();
    m.put_entry(json!({"Kind": "service-resolver", "Name": "web",
        "LoadBalancer": {"Policy": "ring_hash",
            "HashPolicies": [{"Field": "header", "FieldValue": "x-user"}]}}));
    m.wait_reloaded(&workers, "balance hdr(x-user)", "ring_hash");
    // The file and a new worker can be seen while the sidecar is still finishing the change
    // (seen once: a Dataplane API reload that failed under load, then a full render), so the
    // users' requests start once web answers again. Without the header HAProxy balances round
    // robin: both instances answer.
    m.eventually(&web, "/", &[], &["web-v1", "web-v2"], "ring_hash serves");
    let mut seen = std::collections::BTreeSet::new();
    for user in ["alice", "bob", "carol", "dave", "erin", "frank"] {
        let bodies: std::collections::BTreeSet<String> = (0..10)
            .map(|_| {
                let r = http_request_with(
                    &web,
                    "GET",
                    "/",
                    &[("x-user", user)],
                    None,
                    Duration::from_secs(5),
                )
                .expect("request");
                assert_eq!(r.status, 200);
                r.body
            })
            .collect();
        assert_eq!(bodies.len(), 1, "{user} went to {bodies:?}");
        seen.extend(bodies);
    }
    assert_eq!(
        seen.len(),
        2,
        "six users all hashed to one instance: {seen:?}"
    );
    let workers = m.workers();
    m.put_entry(json!({"Kind": "service-resolver", "Name": "web",
        "LoadBalancer": {"Policy": "least_request"}}));
    m.wait_reloaded(&workers, "balance leastconn", "least_request");
}

/// The resolver's failover to another service, under continuous load.
#[test]
fn resolver_failover_under_load_fails_no_request() {
    let m = http_mesh();
    let web = m.web.clone();

    // case-cfg-resolver-svc-failover, under continuous load: web fails over to web-backup when
    // its last instance turns critical, with no failed request during the switch.
    m.put_entry(json!({"Kind": "service-resolver", "Name": "web",
        "Failover": {"*": {"Service": "web-backup"}}}));
    m.eventually(
        &web,
        "/",
        &[],
        &["web-v1", "web-v2"],
        "failover configured, primary up",
    );
    let load = Load::start(web.clone());
    std::thread::sleep(Duration::from_secs(1));
    let backup_before = m.app("backup").requests();
    for id in ["web-v1", "web-v2"] {
        let (s, b) = m.consul.put(&format!("/v1/agent/check/fail/ttl-{id}"), "");
        assert_eq!(s, 200, "{b}");
    }
    m.eventually(&web, "/", &[], &["backup"], "failover to web-backup");
    std::thread::sleep(Duration::from_secs(1));
    for id in ["web-v1", "web-v2"] {
        let (s, b) = m.consul.put(&format!("/v1/agent/check/pass/ttl-{id}"), "");
        assert_eq!(s, 200, "{b}");
    }
    m.eventually(&web, "/", &[], &["web-v1", "web-v2"], "back to the primary");
    std::thread::sleep(Duration::from_secs(1));
    let (ok, failed, errors) = load.finish();
    eprintln!("failover under load: {ok} ok, {failed} failed");
    assert!(m.app("backup").requests() > backup_before);
    assert_eq!(
        failed,
        0,
        "failed requests during failover and back: {:?}",
        &errors[..errors.len().min(5)]
    );
    assert!(ok > 100, "the load ran ({ok} requests)");
}

/// The splitter's weights, changed live, and its header changes per leg.
#[test]
fn splitter_weights_hold_change_live_and_set_headers_per_leg() {
    let m = http_mesh();
    let web = m.web.clone();

    // The splitter: 90/10 over 2,000 requests within ±3 points, then 50/50 live, and
    // case-cfg-splitter-features' header changes per leg (Consul 1.10+).
    let current = m.consul.is_current();
    let leg = |weight: u32, subset: &str| {
        let mut l = json!({"Weight": weight, "ServiceSubset": subset});
        if current {
            l["RequestHeaders"] = json!({"Set": {"x-split-leg": subset}, "Remove": ["x-bad-req"]});
            l["ResponseHeaders"] =
                json!({"Add": {"x-svc-version": subset}, "Remove": ["x-bad-resp"]});
        }
        l
    };
    m.put_entry(json!({"Kind": "service-resolver", "Name": "web", "Subsets": subsets()}));
    m.put_entry(json!({"Kind": "service-splitter", "Name": "web",
        "Splits": [leg(90, "v1"), leg(10, "v2")]}));
    m.wait_split("/0/0", "9000", "the 90/10 split");
    m.eventually(&web, "/", &[], &["web-v1", "web-v2"], "split 90/10");
    let t = m.tally(&web, 2000);
    let v1 = *t.get("web-v1").unwrap_or(&0) as f64 / 20.0;
    eprintln!("split 90/10 over 2000 requests: {t:?} ({v1:.1}% to v1)");
    assert!((87.0..=93.0).contains(&v1), "{t:?}");
    // New weights, same subsets: live, through the splits map, no reload.
    let renders = m.full_renders();
    let reloads_before = reloads(&m.master());
    m.put_entry(json!({"Kind": "service-splitter", "Name": "web",
        "Splits": [leg(50, "v1"), leg(50, "v2")]}));
    m.wait_split("/0/0", "5000", "the 50/50 split");
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let t = m.tally(&web, 400);
        let v1 = *t.get("web-v1").unwrap_or(&0) as f64 / 4.0;
        if (40.0..=60.0).contains(&v1) {
            eprintln!("split 50/50 over 400 requests: {t:?}");
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the split never became 50/50: {t:?}"
        );
    }
    assert!(m.client.logs().contains("split weight(s) changed live"));
    assert_eq!(m.full_renders(), renders, "new weights cost no full render");
    // Nor a reload of any kind (a Dataplane API transaction reloads too): HAProxy's own count.
    assert_eq!(
        reloads(&m.master()),
        reloads_before,
        "new weights cost no reload (the master's reload count)\n--- client sidecar ---\n{}",
        m.client.logs()
    );
    if current {
        for id in ["web-v1", "web-v2"] {
            m.app(id).set_response_header("X-Bad-Resp", "true");
        }
        for _ in 0..10 {
            let r = http_request_with(
                &web,
                "GET",
                "/",
                &[("X-Bad-Req", "true")],
                None,
                Duration::from_secs(5),
            )
            .expect("a request through the split");
            let subset = r.body.trim_start_matches("web-");
            assert_eq!(r.header("x-svc-version"), Some(subset), "{r:?}");
            assert_eq!(r.header("x-bad-resp"), None, "{r:?}");
            let head = m.app(&r.body).last_request_head();
            assert!(head.contains(&format!("x-split-leg: {subset}")), "{head}");
            assert!(!head.contains("x-bad-req"), "{head}");
        }
    }
    m.delete_entry("service-splitter", "web");
}

/// Requests to `web` (path, headers) and the instance that answers each once `put_router`'s
/// router is in place.
type RouterCases = Vec<(&'static str, Headers, &'static str)>;

/// Writes the router of Consul's case-cfg-router-features (with the resolver's default
/// subset v1) and returns its verify.bats requests.
fn put_router(m: &ChainMesh) -> RouterCases {
    let current = m.consul.is_current();
    // case-cfg-router-features (resolver default subset v1, routes to v2 by every matcher).
    m.put_entry(json!({"Kind": "service-resolver", "Name": "web",
        "DefaultSubset": "v1", "Subsets": subsets()}));
    let to =
        |subset: &str, rewrite: &str| json!({"ServiceSubset": subset, "PrefixRewrite": rewrite});
    let hdr = |h: Value| json!({"Header": [h]});
    let mut routes = json!([
        {"Match": {"HTTP": {"PathExact": "/exact/debug"}}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": {"PathExact": "/exact-alt/debug"}}, "Destination": to("v1", "/debug")},
        {"Match": {"HTTP": {"PathPrefix": "/prefix/"}}, "Destination": to("v2", "/")},
        {"Match": {"HTTP": {"PathPrefix": "/prefix-alt/"}}, "Destination": to("v1", "/")},
        {"Match": {"HTTP": {"PathRegex": "/deb[ug]{2}",
            "Header": [{"Name": "x-test-debug", "Exact": "regex-path"}]}},
         "Destination": {"ServiceSubset": "v2", "RetryOnConnectFailure": true,
            "RetryOnStatusCodes": [500, 512]}},
        {"Match": {"HTTP": {"PathExact": "/hdr-present/debug",
            "Header": [{"Name": "x-test-debug", "Present": true}]}}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": {"PathExact": "/hdr-present/debug",
            "Header": [{"Name": "x-test-debug", "Present": true, "Invert": true}]}}, "Destination": to("v1", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-exact/debug"}), hdr(json!({"Name": "x-test-debug", "Exact": "exact"})))}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-exact/debug"}), hdr(json!({"Name": "x-test-debug", "Exact": "exact-alt"})))}, "Destination": to("v1", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-prefix/debug"}), hdr(json!({"Name": "x-test-debug", "Prefix": "prefi"})))}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-prefix/debug"}), hdr(json!({"Name": "x-test-debug", "Prefix": "alt-prefi"})))}, "Destination": to("v1", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-suffix/debug"}), hdr(json!({"Name": "x-test-debug", "Suffix": "uffix"})))}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-suffix/debug"}), hdr(json!({"Name": "x-test-debug", "Suffix": "uffix-alt"})))}, "Destination": to("v1", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-regex/debug"}), hdr(json!({"Name": "x-test-debug", "Regex": "reg[ex]{2}"})))}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-regex/debug"}), hdr(json!({"Name": "x-test-debug", "Regex": "reg[ex]{3}"})))}, "Destination": to("v1", "/debug")},
        {"Match": {"HTTP": merge(json!({"PathExact": "/hdr-invert/debug"}), hdr(json!({"Name": "x-test-debug", "Exact": "not-this", "Invert": true})))}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": {"PathExact": "/qp-present/debug", "QueryParam": [{"Name": "env", "Present": true}]}}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": {"PathExact": "/qp-exact/debug", "QueryParam": [{"Name": "env", "Exact": "dump"}]}}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": {"PathExact": "/qp-regex/debug", "QueryParam": [{"Name": "env", "Regex": "du[mp]{2}"}]}}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": {"PathExact": "/method-match/debug", "Methods": ["GET", "PUT"]}}, "Destination": to("v2", "/debug")},
        {"Match": {"HTTP": {"PathPrefix": "/timeout/"}}, "Destination": {"ServiceSubset": "v2", "RequestTimeout": "2s", "NumRetries": 2}}
    ]);
    if current {
        // Header changes are Consul 1.10+; 1.8.7 refuses the keys.
        if let Some(r) = routes.as_array_mut() {
            r.push(
                json!({"Match": {"HTTP": {"PathExact": "/header-manip/debug"}},
                "Destination": merge(to("v2", "/debug"), json!({"RequestHeaders":
                    {"Set": {"x-foo": "request-bar"}, "Remove": ["x-bad-req"]}}))}),
            );
            r.push(
                json!({"Match": {"HTTP": {"PathExact": "/header-manip/echo"}},
                "Destination": merge(to("v2", "/"), json!({"ResponseHeaders":
                    {"Add": {"x-foo": "response-bar"}, "Remove": ["x-bad-resp"]}}))}),
            );
        }
    }
    m.put_entry(json!({"Kind": "service-router", "Name": "web", "Routes": routes}));
    let h = |v: &'static str| vec![("x-test-debug", v)];
    let none: Vec<(&str, &str)> = Vec::new();
    // The verify.bats requests: path, then the x-test-debug header (if any), want.
    let cases: RouterCases = vec![
        ("/exact/debug", none.clone(), "web-v2"),
        ("/exact-alt/debug", none.clone(), "web-v1"),
        ("/prefix/debug", none.clone(), "web-v2"),
        ("/prefix-alt/debug", none.clone(), "web-v1"),
        ("/debug", h("regex-path"), "web-v2"),
        ("/hdr-present/debug", h("anything"), "web-v2"),
        ("/hdr-present/debug", none.clone(), "web-v1"),
        ("/hdr-exact/debug", h("exact"), "web-v2"),
        ("/hdr-exact/debug", h("exact-alt"), "web-v1"),
        ("/hdr-prefix/debug", h("prefix"), "web-v2"),
        ("/hdr-prefix/debug", h("alt-prefix"), "web-v1"),
        ("/hdr-suffix/debug", h("suffix"), "web-v2"),
        ("/hdr-suffix/debug", h("suffix-alt"), "web-v1"),
        ("/hdr-regex/debug", h("regex"), "web-v2"),
        ("/hdr-regex/debug", h("regexx"), "web-v1"),
        ("/hdr-invert/debug", h("something-else"), "web-v2"),
        ("/qp-present/debug?env=dump", none.clone(), "web-v2"),
        ("/qp-exact/debug?env=dump", none.clone(), "web-v2"),
        ("/qp-regex/debug?env=dump", none.clone(), "web-v2"),
        ("/method-match/debug", none.clone(), "web-v2"),
        // Falls through every route: the default subset.
        ("/qp-exact/debug?env=other", none.clone(), "web-v1"),
        ("/elsewhere", none.clone(), "web-v1"),
    ];
    cases
}

/// Waits until each request of `cases` is answered by its subset.
fn router_answers(m: &ChainMesh, cases: &RouterCases, what: &str) {
    for (path, headers, want) in cases {
        m.eventually(
            &m.web,
            path,
            headers,
            &[want],
            &format!("{what}: {path} {headers:?}"),
        );
    }
}

/// case-cfg-router-features: every matcher, the methods, header changes, prefix rewrite,
/// request timeout and retries.
#[test]
fn router_matches_rewrites_times_out_and_retries() {
    let m = http_mesh();
    let web = m.web.clone();
    let current = m.consul.is_current();
    let cases = put_router(&m);
    router_answers(&m, &cases, "router");
    m.eventually_method(
        &web,
        "PUT",
        "/method-match/debug",
        &[],
        &["web-v2"],
        "router PUT",
    );
    m.eventually_method(
        &web,
        "POST",
        "/method-match/debug",
        &[],
        &["web-v1"],
        "router POST falls through",
    );
    if current {
        // The router's request and response header changes (Consul 1.10+).
        m.eventually(
            &web,
            "/header-manip/debug",
            &[("X-Bad-Req", "true")],
            &["web-v2"],
            "header-manip",
        );
        let head = m.app("web-v2").last_request_head();
        assert!(head.starts_with("get /debug "), "{head}");
        assert!(
            head.contains("x-foo: request-bar") && !head.contains("x-bad-req"),
            "{head}"
        );
        let r = http_request(
            &web,
            "PUT",
            "/header-manip/echo",
            None,
            Duration::from_secs(5),
        )
        .expect("header-manip/echo");
        assert_eq!(r.body, "web-v2");
        assert_eq!(r.header("x-foo"), Some("response-bar"), "{r:?}");
        assert_eq!(r.header("x-bad-resp"), None, "{r:?}");
    }
    // PrefixRewrite: what the app saw.
    assert!(m.app("web-v2").requests_for("/debug") > 0);
    let before = m.app("web-v2").requests_for("/");
    m.eventually(&web, "/prefix/", &[], &["web-v2"], "prefix rewrite to /");
    assert!(
        m.app("web-v2").requests_for("/") > before,
        "/prefix/ reached the app as /"
    );
    assert_eq!(m.app("web-v2").requests_for("/prefix/debug"), 0);
    // RequestTimeout and NumRetries: a slow v2 answers 504 after the route's 2 s.
    m.app("web-v2").set_delay(Duration::from_secs(4));
    let started = Instant::now();
    let r = http_request(&web, "GET", "/timeout/x", None, Duration::from_secs(20)).unwrap();
    let took = started.elapsed();
    m.app("web-v2").set_delay(Duration::ZERO);
    assert_eq!(r.status, 504, "{}", r.body);
    assert!(took < Duration::from_secs(4), "timed out after {took:?}");
    let cfg = m.client_cfg();
    assert!(cfg.contains("retry-on conn-failure 500"), "{cfg}");
    // RetryOnStatusCodes: v2's backend retries a 500 (from the regex route's policy, which
    // every route to v2 shares); v1's has no such policy and passes it on.
    let before = m.app("web-v2").requests();
    m.app("web-v2").fail_next(1, 500);
    let r = http_request(&web, "GET", "/exact/debug", None, Duration::from_secs(10)).unwrap();
    assert_eq!((r.status, r.body.as_str()), (200, "web-v2"), "{r:?}");
    assert_eq!(m.app("web-v2").requests() - before, 2, "one retry");
    m.app("web-v1").fail_next(1, 500);
    let r = http_request(
        &web,
        "GET",
        "/exact-alt/debug",
        None,
        Duration::from_secs(10),
    )
    .unwrap();
    assert_eq!(r.status, 500, "{r:?}");
}

/// The router's rules after a Dataplane API transaction rewrote the file, the dry run's and
/// the metrics' names of the chain's targets, and the plain upstream again once every entry is
/// gone.
#[test]
fn routing_survives_a_transaction_shows_in_dry_run_and_metrics_and_goes_with_its_entries() {
    let m = http_mesh();
    let web = m.web.clone();
    // `old` redirected too, so that removing every entry below includes a resolver of another
    // service.
    m.put_entry(json!({"Kind": "service-resolver", "Name": "old",
        "Redirect": {"Service": "web-backup"}}));
    let cases = put_router(&m);
    router_answers(&m, &cases, "router");

    // A Dataplane API transaction (a new plain upstream) rewrites the file from its own model
    // of it: the routing rules must come through it in order.
    let rules = |c: &str| -> Vec<String> {
        c.lines()
            .map(str::trim)
            .filter(|l| l.starts_with("http-request set-") || l.starts_with("use_backend"))
            .map(str::to_string)
            .collect()
    };
    // The rules as the full render wrote them, before the transaction rewrites the file.
    let before = m.client_cfg();
    assert!(!rules(&before).is_empty(), "no routing rules:\n{before}");
    let extra = free_port();
    let renders = m.full_renders();
    m.consul.register(&sidecar_registration(
        "client",
        free_port(),
        m.client_port,
        &[
            ("web", m.web_port),
            ("old", m.old_port),
            ("web-backup", extra),
        ],
    ));
    m.eventually(
        &format!("127.0.0.1:{extra}"),
        "/",
        &[],
        &["backup"],
        "a new upstream",
    );
    assert_eq!(
        m.full_renders(),
        renders,
        "a plain upstream is added by a transaction, not a full render"
    );
    let after = m.client_cfg();
    assert!(
        after.contains(&format!(":{extra}")),
        "the transaction's new listener is in the file:\n{after}"
    );
    assert_eq!(
        rules(&before),
        rules(&after),
        "the routing rules after the transaction rewrote the file"
    );
    router_answers(&m, &cases, "after a transaction");

    // --dry-run shows the routing, and /metrics names the target of each backend's series.
    let dry = dry_run(&m.consul.http_addr(), m.base.path(), "client", &[]);
    assert!(
        dry.contains("# route 0: { path -m str /exact/debug } -> v2.web.dc1, /exact/debug rewritten to /debug"),
        "{dry}"
    );
    assert!(dry.contains("# chain target v2.web."), "{dry}");
    let (status, metrics) = http_get(&m.stats, "/metrics", Duration::from_secs(5)).expect("scrape");
    assert_eq!(status, 200);
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("haproxy_backend_http_requests_total{")
                && l.contains(
                    "target_service=\"web\",target_subset=\"v2\",target_datacenter=\"dc1\""
                )),
        "{metrics}"
    );

    // Back to no entries: the plain upstream again.
    m.delete_entry("service-router", "web");
    m.delete_entry("service-resolver", "web");
    m.delete_entry("service-resolver", "old");
    m.eventually(&web, "/", &[], &["web-v1", "web-v2"], "no entries left");
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.client_cfg().contains(".t.") {
        assert!(
            Instant::now() < deadline,
            "no target backend is left:\n{}",
            m.client_cfg()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Extra request headers of one request.
type Headers = Vec<(&'static str, &'static str)>;

fn merge(mut a: Value, b: Value) -> Value {
    if let (Some(a), Some(b)) = (a.as_object_mut(), b.as_object()) {
        for (k, v) in b {
            a.insert(k.clone(), v.clone());
        }
    }
    a
}

/// case-cfg-resolver-dc-failover-gateways-none: `web` fails over to its instance in the other
/// datacenter (no mesh gateway: the client's sidecar connects to it directly) when the local
/// one turns critical, under continuous load, and comes back.
#[test]
fn datacenter_failover() {
    let (dc1, dc2) = Consul::start_federated();
    let base = TempDir::new("chain-dc");
    let mut instances = Vec::new();
    for (consul, id) in [(&dc1, "web-dc1"), (&dc2, "web-dc2")] {
        let app = HttpApp::start(id);
        consul.register(&instance_registration(
            id,
            "web",
            "v1",
            app.port(),
            free_port(),
        ));
        let sidecar = sidecar(consul, &base, id, false, &[]);
        instances.push((sidecar, app));
    }
    let port = free_port();
    dc1.register(&sidecar_registration(
        "client",
        free_port(),
        free_port(),
        &[("web", port)],
    ));
    let client = sidecar(&dc1, &base, "client", false, &[]);
    let web = format!("127.0.0.1:{port}");
    let (s, b) = dc1.put(
        "/v1/config",
        &json!({"Kind": "service-resolver", "Name": "web",
            "Failover": {"*": {"Datacenters": ["dc2"]}}})
        .to_string(),
    );
    assert!(s == 200 && b.trim() == "true", "{s} {b}");
    let answers = |want: &str| {
        wait_until(Duration::from_secs(60), want, || {
            (0..4).all(|_| {
                matches!(http_get(&web, "/", Duration::from_secs(5)), Ok((200, body)) if body == want)
            })
        })
        .unwrap_or_else(|e| {
            panic!(
                "{e}\n--- client ---\n{}\n--- dc2 sidecar ---\n{}",
                client.logs(),
                instances[1].0.logs()
            )
        })
    };
    answers("web-dc1");
    let workdir_cfg = std::fs::read_to_string(workdir(&base, "client").join("haproxy.cfg"))
        .expect("the client's haproxy.cfg");
    assert!(workdir_cfg.contains("service web in dc2"), "{workdir_cfg}");

    // The failover target must be ready before the switch is measured: its instances come
    // from a cross-datacenter query, which a WAN federation formed seconds ago may refuse
    // ("No path to datacenter") until gossip converges, and the watch then backs off.
    let client_dir = workdir(&base, "client");
    wait_until(
        Duration::from_secs(60),
        "dc2's instance up in the client's HAProxy",
        || servers_up(&client_dir, ".web.dc2") > 0,
    )
    .unwrap_or_else(|e| panic!("{e}\n--- client ---\n{}", client.logs()));
    let load = Load::start(web.clone());
    std::thread::sleep(Duration::from_secs(1));
    let (s, b) = dc1.put("/v1/agent/check/fail/ttl-web-dc1", "");
    assert_eq!(s, 200, "{b}");
    answers("web-dc2");
    assert_eq!(
        servers_up(&client_dir, ".web.dc1"),
        0,
        "dc2 answers only once dc1's backend has no server left"
    );
    std::thread::sleep(Duration::from_secs(1));
    let (s, b) = dc1.put("/v1/agent/check/pass/ttl-web-dc1", "");
    assert_eq!(s, 200, "{b}");
    answers("web-dc1");
    let (ok, failed, errors) = load.finish();
    eprintln!("datacenter failover under load: {ok} ok, {failed} failed");
    assert_eq!(
        failed,
        0,
        "{:?}\n--- client ---\n{}",
        &errors[..errors.len().min(5)],
        client.logs()
    );
    assert!(instances[1].1.requests() > 0);
}
