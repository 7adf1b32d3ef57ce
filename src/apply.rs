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
use crate::model::Desired;
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

#[derive(Clone)]
pub struct Applier {
    mailbox: Arc<(Mutex<Mailbox>, Condvar)>,
}

impl Applier {
    /// Starts the thread with `applied` as what HAProxy serves now.
    pub fn start(
        applied: Desired,
        dataplane: Dataplane,
        creds: DataplaneCredentials,
        templates: crate::render::Templates,
        report: impl Fn(Outcome) + Send + 'static,
    ) -> Result<Applier> {
        let mailbox = Arc::new((Mutex::new(Mailbox::default()), Condvar::new()));
        let shared = mailbox.clone();
        std::thread::Builder::new()
            .name("applier".into())
            .spawn(move || run(shared, applied, dataplane, creds, templates, report))
            .context("starting the applier thread")?;
        Ok(Applier { mailbox })
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

fn run(
    mailbox: Arc<(Mutex<Mailbox>, Condvar)>,
    mut applied: Desired,
    dataplane: Dataplane,
    creds: DataplaneCredentials,
    templates: crate::render::Templates,
    report: impl Fn(Outcome),
) {
    let (lock, cv) = &*mailbox;
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
        let Some(desired) = pending.take() else {
            continue;
        };
        let started = Instant::now();
        let p = plan(&applied, &desired);
        if let Some(why) = p.full_render_reason() {
            log::info!("{why}; rendering the whole configuration instead");
        }
        if reconcile || p.needs_full_render() {
            match apply_whole(&desired, &dataplane, &creds, &templates, reconcile) {
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
                    failures = failures.saturating_add(1);
                    report(Outcome::Failed(e.to_string()));
                    pending = Some(desired);
                }
            }
            continue;
        }
        if p.is_empty() {
            applied = desired;
            continue;
        }
        match apply(&mut applied, &desired, &p, &dataplane, &creds, &templates) {
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
                failures = failures.saturating_add(1);
                report(Outcome::Failed(e.to_string()));
                pending = Some(desired);
            }
        }
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
    dataplane
        .replace_raw(&cfg.contents)
        .context("replacing the whole configuration (SIGHUP reconcile)")?;
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
        runtime::set_ssl(
            &paths.stats_socket,
            "cert",
            &paths.leaf,
            &desired.tls.leaf_pem,
        )
        .map_err(|e| format!("the leaf did not follow the roots live ({e})"))?;
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
        write_atomic(&paths.leaf, desired.tls.leaf_pem.as_bytes())?;
        runtime::set_ssl(
            &paths.stats_socket,
            "cert",
            &paths.leaf,
            &desired.tls.leaf_pem,
        )
        .context("updating the leaf certificate in HAProxy")?;
        applied.tls.leaf_pem = desired.tls.leaf_pem.clone();
        log::info!("leaf certificate updated live");
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
                return Ok(reloaded);
            }
            Err(e) => log::warn!("{e}; resizing through the Dataplane API instead"),
        }
    }
    let committed = dataplane.apply(&p.ops).with_context(|| {
        format!(
            "applying {} change(s) through the Dataplane API",
            p.ops.len()
        )
    })?;
    Ok(reloaded || matches!(committed, Committed::Reloaded(_)))
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
/// invariant `tests/mesh_deltas.rs` checks). No reload: HAProxy already runs it.
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
