//! The applier: one thread that takes the newest `Desired` (a mailbox of one, so a burst of
//! Consul changes collapses into the last one) and brings HAProxy to it: certificates and maps
//! through files and the runtime API, slot changes through the runtime API, everything else
//! through one Dataplane API transaction (or a full render where that cannot describe it).
//! What HAProxy has is held as one slice per step (`Applied`), each replaced only once its
//! step went through, so a failure leaves HAProxy serving the last good configuration and the
//! retry redoes exactly what did not go through.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::error::{Context, Error, Result};
use crate::files::write_atomic;
use crate::haproxy::dataplane::{Committed, Dataplane};
use crate::haproxy::diff::{plan, Plan};
use crate::haproxy::{live, runtime};
use crate::model::gateway::Gateway;
use crate::model::transparent::Outbound;
use crate::model::{Desired, Tls, UpstreamListener};
use crate::render::DataplaneCredentials;

mod quarantine;
use quarantine::Quarantine;

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
pub type ConfigCheck = Box<dyn Fn(&std::path::Path) -> Result<()> + Send>;

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

/// What HAProxy has, one slice per step of `apply`. A slice is replaced only once its step
/// went through (as Consul's xDS delta records a version only once Envoy acknowledged it), so a
/// failed step leaves its slice as it was and the next plan still holds that step's work, while
/// the steps that went through are not redone.
struct Applied {
    /// The listeners, backends and servers, which the transaction, the live slot changes or
    /// the live pool resize bring HAProxy to (one of them per plan: `Plan::live` is empty when
    /// `Plan::ops` is not); and every field no slice below holds.
    objects: Desired,
    /// The CA roots and the leaf HAProxy has loaded.
    tls: Tls,
    /// The intentions fast map HAProxy has loaded.
    intentions_map: Vec<(String, String)>,
    /// The upstreams whose split thresholds HAProxy's splits map holds.
    splits: Vec<UpstreamListener>,
    /// Transparent mode's outbound listener whose routes HAProxy's map holds.
    transparent: Option<Outbound>,
    /// The mesh gateway whose SNI map HAProxy has loaded.
    gateway: Option<Gateway>,
}

impl Applied {
    /// `d` applied whole: every slice from it.
    fn from(d: Desired) -> Applied {
        Applied {
            tls: d.tls.clone(),
            intentions_map: d.intentions_map.clone(),
            splits: d.upstreams.clone(),
            transparent: d.transparent.clone(),
            gateway: d.gateway.clone(),
            objects: d,
        }
    }

    /// The plan from what HAProxy has to `desired`. `diff::plan` reads each step's part from
    /// a field of one `Desired`: that is built from the slices (a copy only while a failed
    /// step left one apart). Split thresholds and the gateway's SNI map are read from the same
    /// fields as the objects (upstreams, gateway): should their slices differ from the
    /// objects', their part of the plan comes from a second plan against them.
    fn plan(&self, desired: &Desired) -> Plan {
        let alike = self.tls == self.objects.tls
            && self.intentions_map == self.objects.intentions_map
            && self.transparent.as_ref().map(|o| &o.routes)
                == self.objects.transparent.as_ref().map(|o| &o.routes);
        let mut base = Cow::Borrowed(&self.objects);
        if !alike {
            let b = base.to_mut();
            b.tls = self.tls.clone();
            b.intentions_map = self.intentions_map.clone();
            if let (Some(b), Some(t)) = (&mut b.transparent, &self.transparent) {
                // Its listener (port, mesh-only) is an object; only a full render changes it.
                b.routes = t.routes.clone();
            }
        }
        let mut p = plan(&base, desired);
        if self.splits != base.upstreams || self.gateway != base.gateway {
            let b = base.to_mut();
            b.upstreams = self.splits.clone();
            b.gateway = self.gateway.clone();
            let maps = plan(b, desired);
            p.live_splits = maps.live_splits;
            p.gateway_map_changed = maps.gateway_map_changed;
        }
        p
    }
}

/// What the applier loop carries from one state to the next.
struct Work {
    /// A state not yet applied: a new one, or one that failed and waits for its retry.
    pending: Option<Desired>,
    /// The pending state is to be applied whole (SIGHUP).
    reconcile: bool,
    /// Failures in a row of the pending state, for the backoff.
    failures: u32,
}

/// Waits for work: a new state, or the retry of the pending one once its backoff passed (a
/// newer state replaces it meanwhile). `false` once the applier is to stop.
fn wait_for_work(mailbox: &(Mutex<Mailbox>, Condvar), work: &mut Work) -> bool {
    let (lock, cv) = mailbox;
    let wait = if work.pending.is_some() {
        retry_delay(work.failures)
    } else {
        Duration::from_secs(3600)
    };
    let deadline = Instant::now() + wait;
    let Ok(mut s) = lock.lock() else { return false };
    loop {
        if s.stop {
            return false;
        }
        if let Some(d) = s.next.take() {
            work.pending = Some(d);
            work.reconcile |= std::mem::take(&mut s.reconcile);
            work.failures = 0;
            return true;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() && work.pending.is_some() {
            return true;
        }
        let Ok((guard, _)) = cv.wait_timeout(s, left.max(Duration::from_millis(1))) else {
            return false;
        };
        s = guard;
    }
}

/// The applier thread: each state, with the refused listeners set aside, is planned against
/// the slices and applied whole or step by step; success and failure are handled alike for
/// both.
fn run(
    mailbox: Arc<(Mutex<Mailbox>, Condvar)>,
    applied: Desired,
    tools: Tools,
    report: impl Fn(Outcome),
) {
    let mut applied = Applied::from(applied);
    let mut quarantine = Quarantine::default();
    let mut work = Work {
        pending: None,
        reconcile: false,
        failures: 0,
    };
    while wait_for_work(&mailbox, &mut work) {
        let Some(wanted) = work.pending.take() else {
            continue;
        };
        let started = Instant::now();
        // What is applied, and what a retry starts from again (Consul's state, unfiltered).
        let (desired, wanted) = match quarantine.admit(&applied.objects, &wanted) {
            Some(d) => (d, Some(wanted)),
            None => (wanted, None),
        };
        let p = applied.plan(&desired);
        if let Some(why) = p.full_render_reason() {
            log::info!("{why}; rendering the whole configuration instead");
        }
        let whole = work.reconcile || p.needs_full_render();
        if !whole && p.is_empty() {
            applied = Applied::from(desired);
            continue;
        }
        let done = if whole {
            apply_whole(&desired, &tools, work.reconcile).map(|()| (1, true))
        } else {
            apply(&mut applied, &desired, &p, &tools)
                .map(|reloaded| (p.ops.len() + p.live.len(), reloaded))
        };
        match done {
            Ok((ops, reloaded)) => {
                applied = Applied::from(desired);
                work.reconcile = false;
                work.failures = 0;
                report(Outcome::Applied {
                    ops,
                    reloaded,
                    took: started.elapsed(),
                    live: applied.objects.live_instances(),
                });
            }
            Err(e) => {
                report(Outcome::Failed(e.to_string()));
                if !quarantine.refuse_culprits(&applied.objects, &desired, &tools) {
                    work.failures = work.failures.saturating_add(1);
                }
                work.pending = Some(wanted.unwrap_or(desired));
            }
        }
    }
}

fn retry_delay(failures: u32) -> Duration {
    crate::backoff::exponential(RETRY_MIN, RETRY_MAX, failures)
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
fn apply_whole(desired: &Desired, tools: &Tools, reconcile: bool) -> Result<()> {
    let (cfg, rest) = rendered(desired, &tools.creds, &tools.templates)?;
    for f in rest {
        write_atomic(&f.path, f.contents.as_bytes())?;
    }
    tools
        .dataplane
        .replace_raw(&cfg.contents)
        .context(if reconcile {
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

/// Applies one plan, step by step. Each step that goes through records its slice in
/// `applied` before the next one runs; the first that fails ends the attempt, and its slice
/// (and those of the steps after it) stays as it was, so the retry's plan holds its work
/// again. Whether HAProxy reloaded.
fn apply(applied: &mut Applied, desired: &Desired, p: &Plan, tools: &Tools) -> Result<bool> {
    let mut reloaded = false;
    if p.roots_changed {
        reloaded |= roots(&applied.tls, desired)?;
        applied.tls = desired.tls.clone();
    } else if p.leaf_changed {
        leaf(desired)?;
        reloaded = true;
        applied.tls.leaf_pem = desired.tls.leaf_pem.clone();
    }
    if p.gateway_map_changed {
        // The file first, so that the reload of the transaction below (if any) reads it; the
        // loaded copy is replaced once the backends it names exist (`gateway_map_live`).
        if let Some(g) = &desired.gateway {
            write_atomic(
                &desired.paths.gateway_map,
                crate::render::gateway_map(&g.map_entries()).as_bytes(),
            )?;
        }
    }
    if p.intentions_map_changed {
        intentions_map(desired)?;
        applied.intentions_map = desired.intentions_map.clone();
    }
    if p.transparent_map_changed {
        transparent_map(desired)?;
        applied.transparent = desired.transparent.clone();
    }
    if !p.live_splits.is_empty() {
        split_weights(desired, p)?;
        applied.splits = desired.upstreams.clone();
    }
    // One of the two at most: the plan has no live slot changes when it has operations.
    let objects = if !p.live.is_empty() {
        reloaded |= slots_live(desired, p, tools)?;
        true
    } else if !p.ops.is_empty() {
        reloaded |= operations(desired, p, tools)?;
        true
    } else {
        false
    };
    if objects && p.gateway_map_changed {
        // Recorded (a copy of the whole state) only where a step follows: otherwise the attempt
        // ends here, and the whole state is recorded as applied.
        applied.objects = desired.clone();
    }
    if p.gateway_map_changed {
        gateway_map_live(desired)?;
        applied.gateway = desired.gateway.clone();
    }
    Ok(reloaded)
}

/// New CA roots or peer CAs (and the leaf with them): the files, then the runtime API, or a
/// reload when that cannot keep them (`roots_live`). Whether HAProxy reloaded.
fn roots(tls: &Tls, desired: &Desired) -> Result<bool> {
    let paths = &desired.paths;
    // Files first: a reload, now or after a crash, must load the new roots and leaf.
    write_atomic(&paths.roots, desired.tls.own_roots_pem.as_bytes())?;
    write_atomic(&paths.public_roots, desired.tls.roots_pem.as_bytes())?;
    write_atomic(&paths.leaf, desired.tls.leaf_pem.as_bytes())?;
    match roots_live(tls, desired) {
        Ok(()) => {
            log::info!("CA roots updated live");
            Ok(false)
        }
        Err(why) => {
            // HAProxy 2.6 and 3.0 detach certificates from their listeners on `commit ssl
            // ca-file` (`show ssl cert` then says Unused, and a later leaf commit reaches
            // nothing); a reload of the files just written attaches everything again.
            runtime::reload(&paths.master_socket, Duration::from_secs(20))
                .context("reloading HAProxy for new CA roots")?;
            log::info!("CA roots (and leaf) updated with one reload: {why}");
            Ok(true)
        }
    }
}

/// The new roots (and the leaf, if it changed too) through the runtime API, kept only if the
/// leaf is still attached afterwards; otherwise why not, for the reload that follows.
fn roots_live(tls: &Tls, desired: &Desired) -> Result<()> {
    let paths = &desired.paths;
    // Each file only when it changed: a peer's CA changes the public listener's alone.
    let files = [
        (&paths.roots, &tls.own_roots_pem, &desired.tls.own_roots_pem),
        (&paths.public_roots, &tls.roots_pem, &desired.tls.roots_pem),
    ];
    for (path, _, pem) in files.into_iter().filter(|(_, old, new)| old != new) {
        runtime::set_ssl(&paths.stats_socket, "ca-file", path, pem)
            .context("the runtime API refused the roots")?;
    }
    if !runtime::cert_in_use(&paths.stats_socket, &paths.leaf)? {
        return Err(Error::msg(
            "this HAProxy detached its certificates on commit ssl ca-file",
        ));
    }
    if tls.leaf_pem != desired.tls.leaf_pem {
        // See `leaf`: a live commit of it loses `verify required`.
        return Err(Error::msg(
            "a new leaf is loaded by a reload, never committed live",
        ));
    }
    Ok(())
}

/// A new leaf: its file, loaded by one reload.
fn leaf(desired: &Desired) -> Result<()> {
    // Never `set/commit ssl cert`: HAProxy 2.6.12, committing a certificate with no subject
    // name (Consul's leaves carry only a URI SAN), leaves the listener's new context without
    // `verify required`, so the public listener stops asking clients for a certificate. A
    // reload of the file loads it with the listener's settings.
    let paths = &desired.paths;
    write_atomic(&paths.leaf, desired.tls.leaf_pem.as_bytes())?;
    runtime::reload(&paths.master_socket, Duration::from_secs(20))
        .context("reloading HAProxy for a new leaf certificate")?;
    log::info!("leaf certificate updated with one reload");
    Ok(())
}

/// A new intentions fast map, replaced whole in HAProxy.
fn intentions_map(desired: &Desired) -> Result<()> {
    let paths = &desired.paths;
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
    log::info!(
        "intentions fast map replaced live ({} entries)",
        desired.intentions_map.len()
    );
    Ok(())
}

/// Transparent mode's new routes, each map replaced whole in HAProxy.
fn transparent_map(desired: &Desired) -> Result<()> {
    let Some(o) = &desired.transparent else {
        return Ok(());
    };
    let paths = &desired.paths;
    for m in o.maps(paths) {
        // The file first, so that a reload from here on loads the new routes too.
        write_atomic(&m.path, crate::render::transparent_map(o, &m).as_bytes())?;
        live::replace_map(&paths.stats_socket, &m.path, &m.pairs())
            .with_context(|| format!("replacing the transparent proxy's routes by {}", m.by))?;
    }
    log::info!(
        "transparent proxy routes replaced live ({} virtual IPs, {} host names, {} direct addresses)",
        o.routes.len(),
        o.hosts.len(),
        o.direct.len()
    );
    Ok(())
}

/// New split weights, set one by one in HAProxy's loaded splits map.
fn split_weights(desired: &Desired, p: &Plan) -> Result<()> {
    let paths = &desired.paths;
    // The file first, so that a reload from here on reads the new weights too.
    write_atomic(
        &paths.splits_map,
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
    Ok(())
}

/// Slot changes, live through the runtime API, then the file written once for the whole
/// batch (crate::haproxy::live says why not through the Dataplane API). Whether HAProxy
/// reloaded.
fn slots_live(desired: &Desired, p: &Plan, tools: &Tools) -> Result<bool> {
    let mut reloaded = false;
    for spec in &p.live {
        if let Err(e) = live::set_server(&desired.paths.stats_socket, spec) {
            // The Dataplane API's path still works (a reload if it must); the file written
            // below holds the change either way.
            log::warn!("{e}; applying it through the Dataplane API instead");
            if tools.dataplane.replace_server_live(spec)? {
                log::warn!("the Dataplane API reloaded HAProxy for a server change it could not apply live");
                reloaded = true;
            }
        }
    }
    write_config(desired, tools).context("writing the configuration after live server changes")?;
    Ok(reloaded)
}

/// The plan's operations: a slot pool resized through the runtime API where it can be, one
/// Dataplane API transaction otherwise. Whether HAProxy reloaded.
fn operations(desired: &Desired, p: &Plan, tools: &Tools) -> Result<bool> {
    if p.only_servers() {
        // Dynamic servers through the runtime API, then the file once, as for slot changes.
        // Should HAProxy refuse a step, the transaction below does it all (its reload starts
        // from the file, so what was half done at runtime does not matter).
        match servers_live(&desired.paths.stats_socket, &p.ops) {
            Ok(()) => {
                write_config(desired, tools)
                    .context("writing the configuration after a slot pool resize")?;
                log::info!("slot pools resized live ({} server change(s))", p.ops.len());
                return Ok(false);
            }
            Err(e) => log::warn!("{e}; resizing through the Dataplane API instead"),
        }
    }
    let committed = tools.dataplane.apply(&p.ops).with_context(|| {
        format!(
            "applying {} change(s) through the Dataplane API",
            p.ops.len()
        )
    })?;
    Ok(matches!(committed, Committed::Reloaded(_)))
}

/// A mesh gateway's new SNI map, replaced whole in HAProxy's loaded copy (its file is already
/// written): a connection sees the old routes or the new ones.
fn gateway_map_live(desired: &Desired) -> Result<()> {
    let Some(g) = &desired.gateway else {
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
fn write_config(desired: &Desired, tools: &Tools) -> Result<()> {
    let (cfg, _) = rendered(desired, &tools.creds, &tools.templates)?;
    let version = tools
        .dataplane
        .version()
        .context("reading the configuration version")?;
    let text = format!("# _version={version}\n{}", cfg.contents);
    write_atomic(&desired.paths.haproxy_cfg, text.as_bytes())
}

#[cfg(test)]
mod tests;
