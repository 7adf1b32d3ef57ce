//! The sidecar's metrics in Prometheus text format: its own counters and gauges, and HAProxy's
//! built-in exporter relabelled so that upstream series name the destination and the instance
//! instead of a slot number (free slots are left out). Rendering is pure and tested here;
//! `scrape` reads HAProxy's exporter and the master CLI when `/metrics` is asked for.

use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};

use crate::model::Desired;

/// What the sidecar counts; shared by the supervisor, watchers and applier, read by a scrape.
#[derive(Default)]
pub struct Registry {
    watch_errors: Mutex<BTreeMap<String, u64>>,
    restarts: Mutex<BTreeMap<String, u64>>,
    identity_checks: Mutex<BTreeMap<String, u64>>,
    applies: AtomicU64,
    apply_failures: AtomicU64,
    refused_values: AtomicU64,
    /// f64 bits: seconds since the epoch, and seconds.
    last_apply_time: AtomicU64,
    last_apply_duration: AtomicU64,
    /// The state last handed to HAProxy: slot → instance names, certificates for expiry.
    pub desired: RwLock<Option<Desired>>,
    pub agent: RwLock<Option<Arc<crate::spoe::server::AgentStats>>>,
}

/// Values read live at scrape time (they come from other processes).
#[derive(Default)]
pub struct Live {
    pub reloads: Option<u64>,
    pub ready: bool,
}

impl Registry {
    pub fn watch_error(&self, endpoint: &str) {
        // The query string carries indexes; the path is the endpoint.
        let path = endpoint.split('?').next().unwrap_or(endpoint).to_string();
        count(&self.watch_errors, path);
    }

    /// The state handed to HAProxy, for slot names and certificate expiry.
    pub fn publish(&self, desired: &Desired) {
        if let Ok(mut slot) = self.desired.write() {
            *slot = Some(desired.clone());
        }
    }

    /// One upstream identity check done, by result (`proven`, `refused`, `inconclusive`).
    pub fn identity_checked(&self, result: &str) {
        count(&self.identity_checks, result.to_string());
    }

    /// Values from Consul or the registration refused at the model's boundary (`value`).
    pub fn refused_values(&self, n: u64) {
        self.refused_values.fetch_add(n, Ordering::Relaxed);
    }

    pub fn restart(&self, child: &str) {
        count(&self.restarts, child.to_string());
    }

    pub fn applied(&self, ok: bool, took: std::time::Duration) {
        if ok {
            self.applies.fetch_add(1, Ordering::Relaxed);
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            self.last_apply_time.store(now.to_bits(), Ordering::Relaxed);
            self.last_apply_duration
                .store(took.as_secs_f64().to_bits(), Ordering::Relaxed);
        } else {
            self.apply_failures.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// The whole exposition: ours, then HAProxy's relabelled.
    pub fn render(&self, live: &Live, haproxy: &str, now_unix: f64) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "# HELP hcc_ready 1 while HAProxy serves the full configuration.\n# TYPE hcc_ready gauge\nhcc_ready {}",
            u8::from(live.ready)
        );
        if let Some(r) = live.reloads {
            let _ = writeln!(out, "# HELP hcc_haproxy_reloads_total HAProxy reloads since its master started.\n# TYPE hcc_haproxy_reloads_total counter\nhcc_haproxy_reloads_total {r}");
        }
        let _ = writeln!(
            out,
            "# HELP hcc_applies_total Changes applied to HAProxy.\n# TYPE hcc_applies_total counter\nhcc_applies_total {}",
            self.applies.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP hcc_apply_failures_total Changes HAProxy or the Dataplane API refused (retried).\n# TYPE hcc_apply_failures_total counter\nhcc_apply_failures_total {}",
            self.apply_failures.load(Ordering::Relaxed)
        );
        let _ = writeln!(
            out,
            "# HELP hcc_refused_values_total Values from Consul or the registration refused before they reached HAProxy (each logged once, naming it).\n# TYPE hcc_refused_values_total counter\nhcc_refused_values_total {}",
            self.refused_values.load(Ordering::Relaxed)
        );
        let t = f64::from_bits(self.last_apply_time.load(Ordering::Relaxed));
        let d = f64::from_bits(self.last_apply_duration.load(Ordering::Relaxed));
        let _ = writeln!(
            out,
            "# HELP hcc_last_apply_timestamp_seconds When the last change was applied.\n# TYPE hcc_last_apply_timestamp_seconds gauge\nhcc_last_apply_timestamp_seconds {t}\n# HELP hcc_last_apply_duration_seconds How long the last change took to apply.\n# TYPE hcc_last_apply_duration_seconds gauge\nhcc_last_apply_duration_seconds {d}"
        );
        counters_by(
            &mut out,
            "hcc_consul_watch_errors_total",
            "Failed or unusable Consul reads, by endpoint.",
            "endpoint",
            &self.watch_errors,
        );
        counters_by(
            &mut out,
            "hcc_child_restarts_total",
            "Restarts of a crashed child.",
            "child",
            &self.restarts,
        );
        counters_by(
            &mut out,
            "hcc_upstream_identity_checks_total",
            "Identity checks of upstream endpoints (an mTLS handshake each), by result.",
            "result",
            &self.identity_checks,
        );
        if let Ok(agent) = self.agent.read() {
            if let Some(a) = agent.as_ref() {
                let _ = writeln!(
                    out,
                    "# HELP hcc_intentions_decisions_total Decisions of the intentions agent: kind l4 per inbound connection, l7 per HTTP request it judged by an L7 intention's permissions (HAProxy's fast map allows the others without asking it).\n# TYPE hcc_intentions_decisions_total counter"
                );
                for (result, kind, n) in [
                    ("allow", "l4", &a.allowed),
                    ("deny", "l4", &a.denied),
                    ("allow", "l7", &a.requests_allowed),
                    ("deny", "l7", &a.requests_denied),
                ] {
                    let _ = writeln!(
                        out,
                        "hcc_intentions_decisions_total{{result=\"{result}\",kind=\"{kind}\"}} {}",
                        n.load(Ordering::Relaxed)
                    );
                }
            }
        }
        let desired = self.desired.read().ok().and_then(|d| d.clone());
        if let Some(d) = &desired {
            endpoints_by_identity(&mut out, d);
            let _ = writeln!(out, "# HELP hcc_certificate_expiry_seconds Seconds until a certificate in use expires.\n# TYPE hcc_certificate_expiry_seconds gauge");
            for (kind, pem) in [("leaf", &d.tls.leaf_pem), ("root", &d.tls.roots_pem)] {
                for (i, not_after) in not_afters(pem).into_iter().enumerate() {
                    let _ = writeln!(
                        out,
                        "hcc_certificate_expiry_seconds{{cert=\"{kind}\",index=\"{i}\"}} {}",
                        not_after - now_unix
                    );
                }
            }
        }
        out.push_str(&relabel(haproxy, desired.as_ref()));
        out
    }
}

/// How many instances of each upstream stand where with the identity check: a refused one is
/// an endpoint at an address Consul lists for the destination that is someone else.
fn endpoints_by_identity(out: &mut String, d: &Desired) {
    use crate::model::Admission;
    let _ = writeln!(out, "# HELP hcc_upstream_endpoints Upstream instances by identity check state (proven, unproven, refused; unchecked with the check off).\n# TYPE hcc_upstream_endpoints gauge");
    for (u, backend, slots) in d.server_pools() {
        let mut n: BTreeMap<&str, usize> = [("proven", 0), ("unproven", 0), ("refused", 0)]
            .into_iter()
            .collect();
        for i in slots.iter().filter_map(|s| s.instance.as_ref()) {
            let state = match i.admission {
                Admission::Unchecked => "unchecked",
                Admission::Unproven => "unproven",
                Admission::Proven { .. } => "proven",
                Admission::Refused => "refused",
            };
            *n.entry(state).or_default() += 1;
        }
        for (state, count) in n {
            let _ = writeln!(
                out,
                "hcc_upstream_endpoints{{service=\"{}\",proxy=\"{}\",state=\"{state}\"}} {count}",
                escape(&u.destination),
                escape(backend)
            );
        }
    }
}

/// The `notAfter` of every certificate in a PEM bundle, in seconds since the epoch.
fn not_afters(pem: &str) -> Vec<f64> {
    crate::model::pem_blocks(pem, "CERTIFICATE")
        .iter()
        .filter_map(|b| {
            let (_, p) = x509_parser::pem::parse_x509_pem(b.as_bytes()).ok()?;
            let c = p.parse_x509().ok()?;
            Some(c.validity().not_after.timestamp() as f64)
        })
        .collect()
}

/// One counter family with a series per key of `counts`, labelled `label`.
fn counters_by(
    out: &mut String,
    name: &str,
    help: &str,
    label: &str,
    counts: &Mutex<BTreeMap<String, u64>>,
) {
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} counter");
    if let Ok(m) = counts.lock() {
        for (key, n) in m.iter() {
            let _ = writeln!(out, "{name}{{{label}=\"{}\"}} {n}", escape(key));
        }
    }
}

/// Counts one more for `key`.
fn count(counts: &Mutex<BTreeMap<String, u64>>, key: String) {
    if let Ok(mut m) = counts.lock() {
        *m.entry(key).or_default() += 1;
    }
}

fn escape(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('"', "\\\"")
        .replace('\n', "\\n")
}

/// Rewrites HAProxy's upstream series: `server="sN"` becomes the instance id, a `service`
/// label names the destination, and series of free slots are dropped. Series of an exposed
/// path's listener get an `exposed_path` label.
pub fn relabel(text: &str, desired: Option<&Desired>) -> String {
    let mut out = String::with_capacity(text.len());
    for line in text.lines() {
        if line.starts_with('#') {
            out.push_str(line);
            out.push('\n');
            continue;
        }
        let proxy = label(line, "proxy");
        if let Some(e) = proxy.as_deref().and_then(|p| desired?.exposed_of_proxy(p)) {
            let path = format!("exposed_path=\"{}\"", escape(&e.path));
            out.push_str(&line.replacen('{', &format!("{{{path},"), 1));
            out.push('\n');
            continue;
        }
        // A chain target's series say which target (service, subset, datacenter) they are.
        let target = proxy
            .as_deref()
            .and_then(|p| desired?.target_of_proxy(p))
            .map(|(u, t)| {
                let i = &t.identity;
                let labels = format!(
                    "service=\"{}\",target=\"{}\",target_service=\"{}\",target_subset=\"{}\",target_datacenter=\"{}\"",
                    escape(&u.destination),
                    escape(&t.id),
                    escape(&i.service),
                    escape(&t.subset),
                    escape(&i.datacenter)
                );
                (labels, t.slots.clone())
            });
        // A mesh gateway's route: the exported service it carries.
        let route = proxy
            .as_deref()
            .and_then(|p| desired?.gateway.as_ref()?.route(p))
            .map(|r| {
                (
                    format!("service=\"{}\"", escape(r.service.as_str())),
                    r.slots.clone(),
                )
            });
        let upstream = proxy.and_then(|p| desired?.upstream_of_proxy(&p).cloned());
        let (service, slots) = match (target.or(route), upstream) {
            (Some(t), _) => t,
            (None, Some(u)) => (format!("service=\"{}\"", escape(&u.destination)), u.slots),
            (None, None) => {
                out.push_str(line);
                out.push('\n');
                continue;
            }
        };
        match label(line, "server") {
            Some(slot) => {
                let Some(inst) = slots
                    .iter()
                    .find(|s| s.name == slot)
                    .and_then(|s| s.instance.as_ref())
                else {
                    continue;
                };
                let from = format!("server=\"{slot}\"");
                let to = format!("server=\"{}\",{service}", escape(&inst.id));
                out.push_str(&line.replacen(&from, &to, 1));
            }
            None => out.push_str(&line.replacen('{', &format!("{{{service},"), 1)),
        }
        out.push('\n');
    }
    out
}

fn label(line: &str, name: &str) -> Option<String> {
    let key = format!("{name}=\"");
    let start = line.find(&key)? + key.len();
    let end = line[start..].find('"')?;
    Some(line[start..start + end].to_string())
}

/// The /metrics body: our registry plus HAProxy's exporter, both read at scrape time.
pub fn scrape(registry: &Registry, phase: &crate::phase::PhaseCell) -> String {
    let desired = registry.desired.read().ok().and_then(|d| d.clone());
    let (reloads, haproxy) = match &desired {
        Some(d) => {
            let reloads = crate::haproxy::runtime::show_proc(&d.paths.master_socket)
                .ok()
                .map(|p| u64::from(p.master_reloads));
            let text = crate::http::Client::new(
                crate::http::Endpoint::Unix {
                    path: d.paths.metrics_socket.clone(),
                },
                &crate::http::TlsFiles::default(),
                crate::http::Credential::None,
            )
            .and_then(|c| c.get("/metrics", std::time::Duration::from_secs(5)))
            .map(|r| r.body)
            .unwrap_or_else(|e| {
                log::debug!("scraping HAProxy's exporter: {e}");
                String::new()
            });
            (reloads, text)
        }
        None => (None, String::new()),
    };
    let now = crate::clock::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64());
    registry.render(
        &Live {
            reloads,
            ready: phase.get() == crate::phase::Phase::Ready,
        },
        &haproxy,
        now,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::build;
    use crate::model::fixtures::{settings, snapshot, ANY};

    #[test]
    fn upstream_series_name_instances_and_free_slots_are_dropped() {
        let d = build(
            &snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json"),
            &settings(),
            None,
        )
        .unwrap();
        // Server and backend series carry the backend's name, frontend series the frontend's.
        let (up, be) = (&d.upstreams[0].name, &d.upstreams[0].backend);
        assert_ne!(up, be);
        let text = format!(
            "# HELP haproxy_server_bytes_in_total x\n# TYPE haproxy_server_bytes_in_total counter\n\
             haproxy_server_bytes_in_total{{proxy=\"{be}\",server=\"s0\"}} 10\n\
             haproxy_server_bytes_in_total{{proxy=\"{be}\",server=\"s5\"}} 0\n\
             haproxy_backend_bytes_in_total{{proxy=\"{be}\"}} 10\n\
             haproxy_frontend_bytes_in_total{{proxy=\"{up}\"}} 4\n\
             haproxy_frontend_bytes_in_total{{proxy=\"public_listener\"}} 3\n"
        );
        let out = relabel(&text, Some(&d));
        let inst = d.upstreams[0].slots[0]
            .instance
            .as_ref()
            .unwrap()
            .id
            .clone();
        assert!(
            out.contains(&format!("server=\"{inst}\",service=\"service server\"")),
            "{out}"
        );
        assert!(!out.contains("server=\"s5\""), "a free slot leaked: {out}");
        assert!(
            out.contains(&format!(
                "haproxy_backend_bytes_in_total{{service=\"service server\",proxy=\"{be}\"}} 10"
            )),
            "{out}"
        );
        assert!(
            out.contains(&format!(
                "haproxy_frontend_bytes_in_total{{service=\"service server\",proxy=\"{up}\"}} 4"
            )),
            "{out}"
        );
        assert!(out.contains("proxy=\"public_listener\"} 3"));
        assert!(out.contains("# TYPE haproxy_server_bytes_in_total counter"));
    }

    #[test]
    fn a_gateway_route_series_name_the_exported_service_and_its_instances() {
        let (s, settings) = crate::model::fixtures::gateway_snapshot(ANY, "/run/t".as_ref());
        let d = build(&s, &settings, None).unwrap();
        let r = &d.gateway.as_ref().unwrap().routes[0];
        let inst = r.slots[0].instance.as_ref().unwrap().id.clone();
        let text = "haproxy_server_bytes_in_total{proxy=\"be_gw_server\",server=\"s0\"} 10\n\
             haproxy_server_bytes_in_total{proxy=\"be_gw_server\",server=\"s7\"} 0\n\
             haproxy_backend_bytes_in_total{proxy=\"be_gw_server\"} 10\n";
        let out = relabel(text, Some(&d));
        assert!(
            out.contains(&format!("server=\"{inst}\",service=\"server\"")),
            "{out}"
        );
        assert!(
            out.contains(
                "haproxy_backend_bytes_in_total{service=\"server\",proxy=\"be_gw_server\"} 10"
            ),
            "{out}"
        );
        assert!(!out.contains("server=\"s7\""), "a free slot leaked: {out}");
    }

    #[test]
    fn chain_target_series_name_the_target() {
        for version in crate::model::fixtures::CONSUL_VERSIONS {
            let mut s = snapshot(version, "client-sidecar-proxy", "ca-leaf-client.json");
            let key = crate::consul::destinations(s.registration.as_ref().unwrap(), &[])[0].clone();
            let chain = crate::consul::chain::parse_chain(&crate::model::fixtures::fixture(
                version,
                "discovery-chain-old.json",
            ))
            .unwrap();
            let instances: Vec<crate::consul::api::HealthEntry> =
                crate::model::fixtures::json(version, "health-connect-server.json");
            for t in crate::consul::chain::targets_to_watch(&chain, &key) {
                s.apply(crate::consul::Update::TargetEndpoints(t, instances.clone()));
            }
            s.apply(crate::consul::Update::Chain(key, chain));
            let d = build(&s, &settings(), None).unwrap();
            let t = &d.upstreams[0].routing.as_ref().unwrap().targets[0];
            let be = &t.backend;
            let text = format!(
                "haproxy_backend_bytes_in_total{{proxy=\"{be}\"}} 10\n\
                 haproxy_server_bytes_in_total{{proxy=\"{be}\",server=\"s0\"}} 7\n"
            );
            let out = relabel(&text, Some(&d));
            assert!(
                out.contains(&format!(
                    "haproxy_backend_bytes_in_total{{service=\"service server\",target=\"{}\",target_service=\"web\",target_subset=\"v1\",target_datacenter=\"dc1\",proxy=\"{be}\"}} 10",
                    t.id
                )),
                "{version}: {out}"
            );
            let inst = t.slots[0].instance.as_ref().unwrap().id.clone();
            assert!(
                out.contains(&format!("server=\"{inst}\",service=")),
                "{out}"
            );
        }
    }

    #[test]
    fn exposed_path_series_name_the_path() {
        let d = build(
            &snapshot(ANY, "paths-sidecar-proxy", "ca-leaf-paths.json"),
            &settings(),
            None,
        )
        .unwrap();
        let text = "haproxy_frontend_http_requests_total{proxy=\"exp_21600\"} 4\n\
                    haproxy_server_bytes_in_total{proxy=\"be_exp_21600\",server=\"app\"} 9\n";
        let out = relabel(text, Some(&d));
        assert!(out.contains("haproxy_frontend_http_requests_total{exposed_path=\"/metrics\",proxy=\"exp_21600\"} 4"), "{out}");
        assert!(
            out.contains("{exposed_path=\"/metrics\",proxy=\"be_exp_21600\",server=\"app\"} 9"),
            "{out}"
        );
    }

    #[test]
    fn our_metrics_are_typed_and_counters_count() {
        let r = Registry::default();
        r.watch_error("/v1/health/connect/server?passing=1&index=5");
        r.watch_error("/v1/health/connect/server?passing=1&index=9");
        r.restart("haproxy");
        r.applied(true, std::time::Duration::from_millis(20));
        let out = r.render(
            &Live {
                reloads: Some(3),
                ready: true,
            },
            "",
            0.0,
        );
        assert!(
            out.contains("hcc_consul_watch_errors_total{endpoint=\"/v1/health/connect/server\"} 2")
        );
        assert!(out.contains("# TYPE hcc_child_restarts_total counter"));
        assert!(out.contains("hcc_child_restarts_total{child=\"haproxy\"} 1"));
        assert!(out.contains("hcc_haproxy_reloads_total 3"));
        assert!(out.contains("hcc_ready 1"));
        assert!(out.contains("hcc_last_apply_duration_seconds 0.02"));
    }
}
