//! Upstream listeners HAProxy refuses, set aside so that one object it cannot load never holds
//! back every other change.

use std::collections::BTreeMap;

use super::{rendered, Tools};
use crate::error::{Error, Result};
use crate::files::write_atomic;
use crate::model::{Desired, UpstreamListener};

/// Upstream listeners whose configuration HAProxy refused, each as the version refused (its
/// configuration without its instances: `shape`). While Consul still asks for that version,
/// the listener keeps serving as it was applied (or stays absent, if it is new), so that one
/// object HAProxy cannot load never holds back every other change (Envoy likewise rejects one
/// resource and keeps the rest). A change of its configuration lifts it.
#[derive(Default)]
pub(super) struct Quarantine {
    pub(super) refused: BTreeMap<String, UpstreamListener>,
}

/// A listener's configuration without its instances, which come and go without changing what
/// HAProxy might refuse.
pub(super) fn shape(u: &UpstreamListener) -> UpstreamListener {
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
    pub(super) fn filter(&mut self, applied: &Desired, desired: &Desired) -> Option<Desired> {
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

    /// Sets the new listeners of `desired` that cannot bind their port aside, before HAProxy
    /// is asked (see `unbindable`); `desired` as the applier will apply it, as `filter` says.
    pub(super) fn admit(&mut self, applied: &Desired, desired: &Desired) -> Option<Desired> {
        let filtered = self.filter(applied, desired);
        let taken = unbindable(applied, filtered.as_ref().unwrap_or(desired));
        if taken.is_empty() {
            return filtered;
        }
        self.set_aside(&taken);
        self.filter(applied, desired)
    }

    /// After a failed change: finds the listeners HAProxy refuses and quarantines them, with
    /// one warning each; whether any was found (then the rest is retried at once).
    pub(super) fn refuse_culprits(
        &mut self,
        applied: &Desired,
        desired: &Desired,
        tools: &Tools,
    ) -> bool {
        let bad = isolate(applied, desired, tools);
        self.set_aside(&bad);
        !bad.is_empty()
    }

    /// Quarantines each refused listener, with one warning.
    fn set_aside(&mut self, bad: &[(UpstreamListener, Error)]) {
        for (u, why) in bad {
            let why = why.to_string();
            log::warn!(
                "upstream {} (listener {}): HAProxy refuses its new configuration, so it keeps serving as it was and every other change is applied; until Consul's data for it changes: {}",
                u.destination,
                u.name,
                crate::value::comment(why.lines().find(|l| l.contains("ALERT")).unwrap_or(&why))
            );
            self.refused.insert(u.name.clone(), shape(u));
        }
    }
}

/// The upstream listeners of `desired` that HAProxy refuses: each one that differs from
/// `applied` is put alone into the applied configuration and checked with `haproxy -c`.
/// Empty when the applied configuration itself does not pass or no single listener is to blame
/// (then the failure is not an object's, and the whole state is retried).
fn isolate(applied: &Desired, desired: &Desired, tools: &Tools) -> Vec<(UpstreamListener, Error)> {
    let dir = desired.paths.workdir.join("isolate");
    if let Err(e) = std::fs::create_dir_all(&dir) {
        log::warn!("cannot look for the refused object: {e}");
        return Vec::new();
    }
    let file = dir.join("candidate.cfg");
    let check = |d: &Desired| -> Result<()> {
        let (cfg, _) = rendered(d, &tools.creds, &tools.templates)?;
        write_atomic(&file, cfg.contents.as_bytes())?;
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
pub(super) fn unbindable(applied: &Desired, desired: &Desired) -> Vec<(UpstreamListener, Error)> {
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
                    let at = format!("cannot listen on {}:{}", u.bind_address, u.bind_port);
                    (u.clone(), Error::with_source(at, e))
                })
        })
        .collect()
}
