//! The applier: one thread that takes the newest `Desired` (a mailbox of one, so a burst of
//! Consul changes collapses into the last one) and brings HAProxy to it: certificates through
//! the runtime API and files, everything else through one Dataplane API transaction.
//! The state it holds as applied is only ever replaced by a complete desired state that went
//! through, so a failure leaves HAProxy serving the last good configuration, retried later.

use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Context, Result};
use crate::files::write_atomic;
use crate::haproxy::dataplane::{Committed, Dataplane};
use crate::haproxy::diff::{plan, Plan};
use crate::haproxy::{live, runtime};
use crate::model::{Desired, UpstreamListener};
use crate::render::DataplaneCredentials;

const RETRY_MIN: Duration = Duration::from_millis(500);
const RETRY_MAX: Duration = Duration::from_secs(30);

#[derive(Default)]
struct Mailbox {
    next: Option<Desired>,
    /// The next state is to be applied whole, not as a delta (SIGHUP).
    reconcile: bool,
    stop: bool,
}

/// What the applier did, for the event loop's phase and the logs.
#[derive(Debug)]
pub enum Outcome {
    Applied {
        ops: usize,
        reloaded: bool,
        took: Duration,
        /// Instances now live in HAProxy, per upstream listener: what readiness is judged on.
        live: BTreeMap<String, usize>,
    },
    Failed(String),
}

/// Checks a configuration file as HAProxy would load it (`haproxy -c`); the reason on refusal.
pub type ConfigCheck = Box<dyn Fn(&std::path::Path) -> std::result::Result<(), String> + Send>;

#[derive(Clone)]
pub struct Applier {
    mailbox: Arc<(Mutex<Mailbox>, Condvar)>,
}

impl Applier {
    /// Starts the thread with `applied` as what HAProxy serves now; the handle lets the run
    /// wait for its last write before the working directory goes.
    pub fn start(
        applied: Desired,
        dataplane: Dataplane,
        creds: DataplaneCredentials,
        templates: crate::render::Templates,
        check: ConfigCheck,
        report: impl Fn(Outcome) + Send + 'static,
    ) -> Result<(Applier, std::thread::JoinHandle<()>)> {
        let mailbox = Arc::new((Mutex::new(Mailbox::default()), Condvar::new()));
        let shared = mailbox.clone();
        let tools = Tools {
            dataplane,
            creds,
            templates,
            check,
        };
        let thread = std::thread::Builder::new()
            .name("applier".into())
            .spawn(move || run(shared, applied, tools, report))
            .context("starting the applier thread")?;
        Ok((Applier { mailbox }, thread))
    }

    /// Hands over a new desired state; an older one not yet taken is dropped.
    pub fn submit(&self, desired: Desired) {
        self.hand_over(desired, false);
    }

    /// Hands over a state to be applied whole: every file rendered anew and the complete
    /// configuration replaced through the Dataplane API, undoing any drift.
    pub fn reconcile(&self, desired: Desired) {
        self.hand_over(desired, true);
    }

    fn hand_over(&self, desired: Desired, reconcile: bool) {
        let (lock, cv) = &*self.mailbox;
        if let Ok(mut s) = lock.lock() {
            s.next = Some(desired);
            s.reconcile |= reconcile;
            cv.notify_one();
        }
    }

    pub fn stop(&self) {
        let (lock, cv) = &*self.mailbox;
        if let Ok(mut s) = lock.lock() {
            s.stop = true;
            cv.notify_one();
        }
    }
}

/// What the applier thread works with.
struct Tools {
    dataplane: Dataplane,
    creds: DataplaneCredentials,
    templates: crate::render::Templates,
    check: ConfigCheck,
}

/// Upstream listeners whose configuration HAProxy refused, each as the version refused (its
/// configuration without its instances: `shape`). While Consul still asks for that version,
/// the listener keeps serving as it was applied (or stays absent, if it is new), so that one
/// object HAProxy cannot load never holds back every other change (Envoy likewise rejects one
/// resource and keeps the rest). A change of its configuration lifts it.
#[derive(Default)]
struct Quarantine {
    refused: BTreeMap<String, UpstreamListener>,
}

/// A listener's configuration without its instances, which come and go without changing what
/// HAProxy might refuse.
fn shape(u: &UpstreamListener) -> UpstreamListener {
    let mut s = u.clone();
    s.slots.clear();
    if let Some(r) = &mut s.routing {
        for t in &mut r.targets {
            t.slots.clear();
        }
    }
    s
}

impl Quarantine {
    /// `desired` as the applier will apply it, each refused listener as `applied` has it;
    /// `None` when nothing is refused (then `desired` is applied as it is, with no copy).
    fn filter(&mut self, applied: &Desired, desired: &Desired) -> Option<Desired> {
        self.refused.retain(|name, bad| {
            let still = desired
                .upstream(name)
                .is_some_and(|u| shape(u) == *bad);
            if !still {
                log::info!("upstream listener {name}: its refused configuration is no longer asked for; applying it again");
            }
            still
        });
        if self.refused.is_empty() {
            return None;
        }
        let mut out = desired.clone();
        out.upstreams.retain_mut(|u| {
            match (
                self.refused.contains_key(&u.name),
                applied.upstream(&u.name),
            ) {
                (false, _) => true,
                (true, Some(served)) => {
                    *u = served.clone();
                    true
                }
                (true, None) => false,
            }
        });
        Some(out)
    }
}

/// The upstream listeners of `desired` that HAProxy refuses: each one that differs from
/// `applied` is put alone into the applied configuration and checked with `haproxy -c`.
/// Empty when the applied configuration itself does not pass or no single listener is to blame
/// (then the failure is not an object's, and the whole state is retried).
fn isolate(applied: &Desired, desired: &Desired, tools: &Tools) -> Vec<(UpstreamListener, String)> {
    let dir = desired.paths.workdir.join("isolate");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        log::warn!("cannot look for the refused object: {e}");
        return Vec::new();
    }
    let file = dir.join("candidate.cfg");
    let check = |d: &Desired| -> std::result::Result<(), String> {
        let (cfg, _) = rendered(d, &tools.creds, &tools.templates).map_err(|e| e.to_string())?;
        write_atomic(&file, cfg.contents.as_bytes()).map_err(|e| e.to_string())?;
        (tools.check)(&file)
    };
    if let Err(why) = check(applied) {
        log::warn!("the applied configuration itself does not pass haproxy -c here: {why}");
        return Vec::new();
    }
    let mut bad = unbindable(applied, desired);
    for u in &desired.upstreams {
        if applied.upstream(&u.name) == Some(u) || bad.iter().any(|(b, _)| b.name == u.name) {
            continue;
        }
        let mut candidate = applied.clone();
        match candidate.upstreams.iter_mut().find(|x| x.name == u.name) {
            Some(x) => *x = u.clone(),
            None => {
                candidate.upstreams.push(u.clone());
                candidate.upstreams.sort_by(|a, b| a.name.cmp(&b.name));
            }
        }
        if let Err(why) = check(&candidate) {
            bad.push((u.clone(), why));
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    bad
}

/// The new listeners of `desired` on a port another process holds. `haproxy -c` binds
/// nothing, so such a listener passes it, and the reload then fails after HAProxy 2.6 paused
/// every listener for about 2 s waiting for the port (every new connection refused meanwhile):
/// the port is tried here, before HAProxy is asked, by binding it for a moment.
fn unbindable(applied: &Desired, desired: &Desired) -> Vec<(UpstreamListener, String)> {
    desired
        .upstreams
        .iter()
        .filter(|u| u.socket.is_none() && applied.upstream(&u.name).is_none())
        .filter(|u| {
            // A listener of the applied state on the same address is HAProxy's own.
            !applied
                .upstreams
                .iter()
                .any(|a| a.bind_address == u.bind_address && a.bind_port == u.bind_port)
        })
        .filter_map(|u| {
            std::net::TcpListener::bind((u.bind_address.as_str(), u.bind_port))
                .err()
                .map(|e| {
                    (
                        u.clone(),
                        format!("cannot listen on {}:{}: {e}", u.bind_address, u.bind_port),
                    )
                })
        })
        .collect()
}

fn run(
    mailbox: Arc<(Mutex<Mailbox>, Condvar)>,
    mut applied: Desired,
    tools: Tools,
    report: impl Fn(Outcome),
) {
    let Tools {
        dataplane,
        creds,
        templates,
        ..
    } = &tools;
    let (lock, cv) = &*mailbox;
    let mut quarantine = Quarantine::default();
    let mut pending: Option<Desired> = None;
    let mut reconcile = false;
    let mut failures: u32 = 0;
    loop {
        // Wait for work; while a failed state waits for its retry, a newer one replaces it.
        let wait = if pending.is_some() {
            retry_delay(failures)
        } else {
            Duration::from_secs(3600)
        };
        let deadline = Instant::now() + wait;
        {
            let Ok(mut s) = lock.lock() else { return };
            loop {
                if s.stop {
                    return;
                }
                if let Some(d) = s.next.take() {
                    pending = Some(d);
                    reconcile |= std::mem::take(&mut s.reconcile);
                    failures = 0;
                    break;
                }
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() && pending.is_some() {
                    break;
                }
                let Ok((guard, _)) = cv.wait_timeout(s, left.max(Duration::from_millis(1))) else {
                    return;
                };
                s = guard;
            }
        }
        let Some(wanted) = pending.take() else {
            continue;
        };
        let started = Instant::now();
        let mut filtered = quarantine.filter(&applied, &wanted);
        let taken = unbindable(&applied, filtered.as_ref().unwrap_or(&wanted));
        if !taken.is_empty() {
            set_aside(&taken, &mut quarantine);
            filtered = quarantine.filter(&applied, &wanted);
        }
        // What is applied, and what a retry starts from again (Consul's state, unfiltered).
        let (desired, wanted) = match filtered {
            Some(d) => (d, Some(wanted)),
            None => (wanted, None),
        };
        let p = plan(&applied, &desired);
        if let Some(why) = p.full_render_reason() {
            log::info!("{why}; rendering the whole configuration instead");
        }
        if reconcile || p.needs_full_render() {
            match apply_whole(&desired, dataplane, creds, templates, reconcile) {
                Ok(()) => {
                    applied = desired;
                    reconcile = false;
                    failures = 0;
                    report(Outcome::Applied {
                        ops: 1,
                        reloaded: true,
                        took: started.elapsed(),
                        live: applied.live_instances(),
                    });
                }
                Err(e) => {
                    report(Outcome::Failed(e.to_string()));
                    if !refuse_culprits(&applied, &desired, &tools, &mut quarantine) {
                        failures = failures.saturating_add(1);
                    }
                    pending = Some(wanted.unwrap_or(desired));
                }
            }
            continue;
        }
        if p.is_empty() {
            applied = desired;
            continue;
        }
        match apply(&mut applied, &desired, &p, dataplane, creds, templates) {
            Ok(reloaded) => {
                applied = desired;
                failures = 0;
                report(Outcome::Applied {
                    ops: p.ops.len() + p.live.len(),
                    reloaded,
                    took: started.elapsed(),
                    live: applied.live_instances(),
                });
            }
            Err(e) => {
                report(Outcome::Failed(e.to_string()));
                if !refuse_culprits(&applied, &desired, &tools, &mut quarantine) {
                    failures = failures.saturating_add(1);
                }
                pending = Some(wanted.unwrap_or(desired));
            }
        }
    }
}

/// After a failed change: finds the listeners HAProxy refuses and quarantines them, with one
/// warning each; whether any was found (then the rest is retried at once).
fn refuse_culprits(
    applied: &Desired,
    desired: &Desired,
    tools: &Tools,
    quarantine: &mut Quarantine,
) -> bool {
    let bad = isolate(applied, desired, tools);
    set_aside(&bad, quarantine);
    !bad.is_empty()
}

/// Quarantines each refused listener, with one warning.
fn set_aside(bad: &[(UpstreamListener, String)], quarantine: &mut Quarantine) {
    for (u, why) in bad {
        log::warn!(
            "upstream {} (listener {}): HAProxy refuses its new configuration, so it keeps serving as it was and every other change is applied; until Consul's data for it changes: {}",
            u.destination,
            u.name,
            crate::value::comment(why.lines().find(|l| l.contains("ALERT")).unwrap_or(why))
        );
        quarantine.refused.insert(u.name.clone(), shape(u));
    }
}

fn retry_delay(failures: u32) -> Duration {
    RETRY_MIN
        .saturating_mul(1 << failures.saturating_sub(1).min(8))
        .min(RETRY_MAX)
}

/// Every file rendered from `desired`: haproxy.cfg, and the others (certificates, SPOE) in
/// write order.
fn rendered(
    desired: &Desired,
    creds: &DataplaneCredentials,
    templates: &crate::render::Templates,
) -> Result<(crate::render::File, Vec<crate::render::File>)> {
    let (cfg, rest): (Vec<_>, Vec<_>) = crate::render::render(desired, creds, templates)?
        .into_iter()
        .partition(|f| f.path == desired.paths.haproxy_cfg);
    let cfg = cfg
        .into_iter()
        .next()
        .ok_or_else(|| crate::error::Error::msg("the render produced no haproxy.cfg"))?;
    Ok((cfg, rest))
}

/// A full render: every file rendered from `desired`, certificates written first, the
/// configuration replaced whole through the Dataplane API (validated, then one reload). For a
/// SIGHUP `reconcile`, HAProxy is also reloaded through its master socket in any case.
fn apply_whole(
    desired: &Desired,
    dataplane: &Dataplane,
    creds: &DataplaneCredentials,
    templates: &crate::render::Templates,
    reconcile: bool,
) -> Result<()> {
    let (cfg, rest) = rendered(desired, creds, templates)?;
    for f in rest {
        write_atomic(&f.path, f.contents.as_bytes())?;
    }
    dataplane.replace_raw(&cfg.contents).context(if reconcile {
        "replacing the whole configuration (SIGHUP reconcile)"
    } else {
        "replacing the whole configuration"
    })?;
    if !reconcile {
        log::info!("configuration rendered anew and reloaded");
        return Ok(());
    }
    // What a reconcile repairs is also the running state (a server put in maintenance by
    // hand), which only a reload resets, and the Dataplane API may not reload: not for a file
    // equal to the one on disk (the last full render wrote exactly this), and a reload it has
    // already scheduled answers for ours too. SIGHUP is rare; one sure reload is worth it.
    runtime::reload(&desired.paths.master_socket, Duration::from_secs(20))
        .context("reloading HAProxy for the full reconcile")?;
    log::info!("full reconcile applied: configuration rendered anew and reloaded");
    Ok(())
}

/// The new roots (and the leaf, if it changed too) through the runtime API, kept only if the
/// leaf is still attached afterwards; otherwise why not, for the reload that follows.
fn roots_live(applied: &Desired, desired: &Desired) -> std::result::Result<(), String> {
    let paths = &desired.paths;
    runtime::set_ssl(
        &paths.stats_socket,
        "ca-file",
        &paths.roots,
        &desired.tls.roots_pem,
    )
    .map_err(|e| format!("the runtime API refused the roots ({e})"))?;
    match runtime::cert_in_use(&paths.stats_socket, &paths.leaf) {
        Ok(true) => {}
        Ok(false) => {
            return Err("this HAProxy detached its certificates on commit ssl ca-file".into())
        }
        Err(e) => return Err(e.to_string()),
    }
    if applied.tls.leaf_pem != desired.tls.leaf_pem {
        // See the leaf's own step in `apply`: a live commit of it loses `verify required`.
        return Err("a new leaf is loaded by a reload, never committed live".into());
    }
    Ok(())
}

/// Applies one plan. Certificate steps that succeed are recorded in `applied` at once, so a
/// failure later in the plan does not redo them.
fn apply(
    applied: &mut Desired,
    desired: &Desired,
    p: &Plan,
    dataplane: &Dataplane,
    creds: &DataplaneCredentials,
    templates: &crate::render::Templates,
) -> Result<bool> {
    let paths = &desired.paths;
    let mut reloaded = false;
    let upstreams_before = applied.upstreams.clone();
    if p.roots_changed {
        // Files first: a reload, now or after a crash, must load the new roots and leaf.
        write_atomic(&paths.roots, desired.tls.roots_pem.as_bytes())?;
        write_atomic(&paths.leaf, desired.tls.leaf_pem.as_bytes())?;
        match roots_live(applied, desired) {
            Ok(()) => log::info!("CA roots updated live"),
            Err(why) => {
                // HAProxy 2.6 and 3.0 detach certificates from their listeners on `commit ssl
                // ca-file` (`show ssl cert` then says Unused, and a later leaf commit reaches
                // nothing); a reload of the files just written attaches everything again.
                runtime::reload(&paths.master_socket, Duration::from_secs(20))
                    .context("reloading HAProxy for new CA roots")?;
                reloaded = true;
                log::info!("CA roots (and leaf) updated with one reload: {why}");
            }
        }
        applied.tls = desired.tls.clone();
    } else if p.leaf_changed {
        // Never `set/commit ssl cert`: HAProxy 2.6.12, committing a certificate with no
        // subject name (Consul's leaves carry only a URI SAN), leaves the listener's new
        // context without `verify required`, so the public listener stops asking clients for
        // a certificate. A reload of the file loads it with the listener's settings.
        write_atomic(&paths.leaf, desired.tls.leaf_pem.as_bytes())?;
        runtime::reload(&paths.master_socket, Duration::from_secs(20))
            .context("reloading HAProxy for a new leaf certificate")?;
        reloaded = true;
        applied.tls.leaf_pem = desired.tls.leaf_pem.clone();
        log::info!("leaf certificate updated with one reload");
    }
    if p.gateway_map_changed {
        // The file first, so that the reload of the transaction below (if any) reads it; the
        // loaded copy is replaced once the backends it names exist (`gateway_map_live`).
        if let Some(g) = &desired.gateway {
            write_atomic(
                &paths.gateway_map,
                crate::render::gateway_map(&g.map_entries()).as_bytes(),
            )?;
        }
    }
    if p.intentions_map_changed {
        // The file first, so that a reload from here on loads the new entries too.
        write_atomic(
            &paths.intentions_map,
            crate::render::intentions_map(&desired.intentions_map).as_bytes(),
        )?;
        live::replace_map(
            &paths.stats_socket,
            &paths.intentions_map,
            &desired.intentions_map,
        )
        .context("replacing the intentions fast map")?;
        applied.intentions_map = desired.intentions_map.clone();
        log::info!(
            "intentions fast map replaced live ({} entries)",
            desired.intentions_map.len()
        );
    }
    if p.transparent_map_changed {
        if let Some(o) = &desired.transparent {
            // The file first, so that a reload from here on loads the new routes too.
            write_atomic(
                &paths.transparent_map,
                crate::render::transparent_map(o).as_bytes(),
            )?;
            live::replace_map(
                &paths.stats_socket,
                &paths.transparent_map,
                &o.map_entries(),
            )
            .context("replacing the transparent proxy's routes")?;
            log::info!(
                "transparent proxy routes replaced live ({} virtual IPs)",
                o.routes.len()
            );
        }
        applied.transparent = desired.transparent.clone();
    }
    if !p.live_splits.is_empty() {
        // The file first, so that a reload from here on reads the new weights too.
        write_atomic(
            &desired.paths.splits_map,
            crate::render::splits_map(&crate::objects::split_thresholds(desired)).as_bytes(),
        )?;
        for (key, value) in &p.live_splits {
            live::set_map(
                &paths.stats_socket,
                &paths.splits_map,
                key,
                &value.to_string(),
            )
            .context("changing a split's weight")?;
        }
        log::info!("{} split weight(s) changed live", p.live_splits.len());
        applied.upstreams = desired.upstreams.clone();
    }
    if !p.live.is_empty() {
        // Slot changes go live through the runtime API, then the file is written once for the
        // whole batch (crate::haproxy::live says why not through the Dataplane API).
        for spec in &p.live {
            if let Err(e) = live::set_server(&paths.stats_socket, spec) {
                // The Dataplane API's path still works (a reload if it must); the file written
                // below holds the change either way.
                log::warn!("{e}; applying it through the Dataplane API instead");
                if dataplane.replace_server_live(spec)? {
                    log::warn!("the Dataplane API reloaded HAProxy for a server change it could not apply live");
                    reloaded = true;
                }
            }
        }
        write_config(desired, dataplane, creds, templates)
            .context("writing the configuration after live server changes")?;
        applied.upstreams = desired.upstreams.clone();
    }
    if p.ops.is_empty() {
        gateway_map_live(desired, p)?;
        return Ok(reloaded);
    }
    if p.only_servers() {
        // A slot pool resized: dynamic servers through the runtime API, then the file once, as
        // for slot changes. Should HAProxy refuse a step, the transaction below does it all
        // (its reload starts from the file, so what was half done at runtime does not matter).
        match servers_live(&paths.stats_socket, &p.ops) {
            Ok(()) => {
                write_config(desired, dataplane, creds, templates)
                    .context("writing the configuration after a slot pool resize")?;
                applied.upstreams = desired.upstreams.clone();
                log::info!("slot pools resized live ({} server change(s))", p.ops.len());
                gateway_map_live(desired, p)?;
                return Ok(reloaded);
            }
            Err(e) => log::warn!("{e}; resizing through the Dataplane API instead"),
        }
    }
    let committed = match dataplane.apply(&p.ops) {
        Ok(c) => c,
        Err(e) => {
            // The live steps above recorded the upstreams as applied; the transaction's part
            // of them was not, so the retry must plan against what HAProxy has: the live
            // changes are redone (they are idempotent) along with the transaction's.
            applied.upstreams = upstreams_before;
            return Err(e).with_context(|| {
                format!(
                    "applying {} change(s) through the Dataplane API",
                    p.ops.len()
                )
            });
        }
    };
    gateway_map_live(desired, p)?;
    Ok(reloaded || matches!(committed, Committed::Reloaded(_)))
}

/// A mesh gateway's new SNI map, replaced whole in HAProxy's loaded copy (its file is already
/// written): a connection sees the old routes or the new ones.
fn gateway_map_live(desired: &Desired, p: &Plan) -> Result<()> {
    let Some(g) = desired.gateway.as_ref().filter(|_| p.gateway_map_changed) else {
        return Ok(());
    };
    let entries: Vec<(String, String)> = g
        .map_entries()
        .into_iter()
        .map(|(sni, backend)| (sni.to_string(), backend))
        .collect();
    live::replace_map(
        &desired.paths.stats_socket,
        &desired.paths.gateway_map,
        &entries,
    )
    .context("replacing the mesh gateway's SNI map")?;
    log::info!("mesh gateway routes: {} SNI(s) live", entries.len());
    Ok(())
}

/// Server operations over the runtime API: new slots first, then changed ones (an instance
/// moving to a lower slot when a pool shrinks), then removals, so a slot is deleted only once
/// nothing needs it.
fn servers_live(stats: &std::path::Path, ops: &[crate::haproxy::diff::Op]) -> Result<()> {
    use crate::haproxy::diff::Op;
    for op in ops {
        if let Op::CreateServer(s) = op {
            live::add_server(stats, s)?;
        }
    }
    for op in ops {
        if let Op::ReplaceServer(s) = op {
            live::set_server(stats, s)?;
        }
    }
    for op in ops {
        if let Op::DeleteServer { backend, name } = op {
            live::del_server(stats, backend, name)?;
        }
    }
    Ok(())
}

/// Writes `haproxy.cfg` as rendered from `desired`, under the version the Dataplane API holds,
/// so its next transaction (which starts from the file on disk) builds on exactly what HAProxy
/// runs now. Only called once the runtime API brought HAProxy to `desired` (slot changes, or
/// slots added and removed): then HAProxy's objects are what rendering `desired` says (the
/// invariant `tests/e2e/mesh_deltas.rs` checks). No reload: HAProxy already runs it.
fn write_config(
    desired: &Desired,
    dataplane: &Dataplane,
    creds: &DataplaneCredentials,
    templates: &crate::render::Templates,
) -> Result<()> {
    let (cfg, _) = rendered(desired, creds, templates)?;
    let version = dataplane
        .version()
        .context("reading the configuration version")?;
    let text = format!("# _version={version}\n{}", cfg.contents);
    write_atomic(&desired.paths.haproxy_cfg, text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Slot;

    fn client() -> Desired {
        crate::model::fixtures::client_desired()
    }

    #[test]
    fn a_refused_listener_serves_as_applied_and_a_change_of_it_lifts_the_refusal() {
        let applied = client();
        let mut refused = applied.clone();
        let name = refused.upstreams[0].name.clone();
        refused.upstreams[0].connect_timeout_ms = crate::value::Millis::constant(4321);
        let mut q = Quarantine::default();
        q.refused.insert(name.clone(), shape(&refused.upstreams[0]));

        // Its instances may churn: the refused configuration is still refused.
        let mut churned = refused.clone();
        churned.upstreams[0].slots.push(Slot {
            name: "s99".into(),
            instance: None,
        });
        let effective = q.filter(&applied, &churned).expect("a refused listener");
        assert_eq!(effective.upstream(&name), applied.upstream(&name));
        assert_eq!(q.refused.len(), 1);

        // A new listener that is refused stays out; one Consul changes again is applied.
        let mut changed = refused.clone();
        changed.upstreams[0].connect_timeout_ms = crate::value::Millis::constant(1234);
        let effective = q
            .filter(&applied, &changed)
            .unwrap_or_else(|| changed.clone());
        assert_eq!(effective.upstream(&name), changed.upstream(&name));
        assert!(q.refused.is_empty());
    }

    #[test]
    fn a_new_listener_on_a_port_another_process_holds_is_found_before_haproxy_is_asked() {
        let applied = client();
        let held = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let mut desired = applied.clone();
        let mut extra = desired.upstreams[0].clone();
        extra.name = "up_extra".into();
        extra.bind_address = "127.0.0.1".into();
        extra.bind_port = held.local_addr().unwrap().port();
        desired.upstreams.push(extra);
        let found = unbindable(&applied, &desired);
        assert_eq!(found.len(), 1, "{found:?}");
        assert_eq!(found[0].0.name, "up_extra");
        drop(held);
        assert!(unbindable(&applied, &desired).is_empty());
    }
}
