//! The Dataplane API operations that turn one `Desired` into another. Pure. Both sides are
//! read through `objects::index`, which also renders the file, so a config built by deltas
//! and one rendered from scratch describe the same HAProxy objects; the plan is one pass over
//! the indexes' units (added, removed, changed, by key) with one ordering rule, and knows no
//! object kind by name: a new kind of listener or backend needs an index entry, not diff code.

use crate::model::gateway::Gateway;
use crate::model::Desired;
use crate::objects::{index, Change, Index, Pool, Unit};
pub use crate::objects::{BackendSpec, BindSpec, FrontendSpec, ServerSpec};

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Op {
    DeleteFrontend(String),
    DeleteBackend(String),
    DeleteServer { backend: String, name: String },
    CreateBackend(BackendSpec),
    ReplaceBackend(BackendSpec),
    CreateServer(ServerSpec),
    ReplaceServer(ServerSpec),
    CreateFrontend(FrontendSpec),
    ReplaceFrontend(FrontendSpec),
    CreateBind(BindSpec),
    ReplaceBind(BindSpec),
}

/// What changes between the applied state and the desired one.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// In an order the Dataplane API accepts inside one transaction: deletions first
    /// (frontends, then servers, then backends, so nothing deleted is still named), then
    /// creations and replacements (each backend followed by its servers, then each frontend
    /// followed by its bind, so everything a frontend names exists). Committing them reloads
    /// HAProxy.
    pub ops: Vec<Op>,
    /// Slot changes (address, port, weight, maintenance) for HAProxy's runtime API
    /// (`haproxy::live`, the stats socket), applied without a reload, one by one, outside any
    /// transaction. Empty when `ops` is not: a reload is coming anyway, and one transaction
    /// keeps the change atomic (the slots' last states are then in `ops`).
    pub live: Vec<ServerSpec>,
    /// Split thresholds that changed (key, new value): new splitter weights, applied live with
    /// `set map` after the splits map file is written. Their rules are the same either way.
    pub live_splits: Vec<(String, u32)>,
    /// The intentions fast map changed: replaced whole and atomically through the runtime API
    /// (`prepare map`, `add map`, `commit map`) after its file is written. No rule changes.
    pub intentions_map_changed: bool,
    pub roots_changed: bool,
    pub leaf_changed: bool,
    /// A mesh gateway's SNI map changed: its file is written before the operations (so a
    /// reload reads it) and HAProxy's loaded copy replaced whole after them, once the
    /// backends it names exist.
    pub gateway_map_changed: bool,
    /// Only transparent mode's routes changed: the map is replaced live, like the intentions
    /// map.
    pub transparent_map_changed: bool,
    /// A pool resize changed its slots' check interval: the servers are replaced by the
    /// transaction, not live (`only_servers`).
    pub check_interval_changed: bool,
    /// Why, for each rendered-only part of the configuration that changed
    /// (`objects::RenderedOnly`: rules the Dataplane API cannot write or would keep as they
    /// were), the plan takes a full render.
    pub rendered_only: Vec<&'static str>,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
            && self.live.is_empty()
            && self.live_splits.is_empty()
            && self.rendered_only.is_empty()
            && !self.intentions_map_changed
            && !self.gateway_map_changed
            && !self.transparent_map_changed
            && !self.roots_changed
            && !self.leaf_changed
    }

    /// Whether every operation is a server of an existing backend added, removed or changed (a
    /// slot pool resized): what HAProxy's runtime API can do without a reload, unless the
    /// resize changed the pool's check interval (`check_interval_ms`), which only a
    /// transaction can.
    pub fn only_servers(&self) -> bool {
        !self.ops.is_empty()
            && !self.check_interval_changed
            && self.ops.iter().all(|op| {
                matches!(
                    op,
                    Op::CreateServer(_) | Op::DeleteServer { .. } | Op::ReplaceServer(_)
                )
            })
    }

    /// Whether the plan changes what the Dataplane API's v1.2.5 models cannot describe: then
    /// the whole configuration is rendered and replaced in one validated reload instead.
    pub fn needs_full_render(&self) -> bool {
        self.full_render_reason().is_some()
    }

    /// Why the plan needs a full render (see `needs_full_render`), for the log.
    pub fn full_render_reason(&self) -> Option<&'static str> {
        if let Some(r) = self.rendered_only.first() {
            return Some(r);
        }
        // A slot pool resized goes through the runtime API, whose `add server` takes them.
        let tls_params = |t: &Option<crate::objects::MeshTls>| {
            t.as_ref().is_some_and(|t| !t.params.is_default())
        };
        if !self.only_servers()
            && self.ops.iter().any(|op| match op {
                Op::CreateBind(b) | Op::ReplaceBind(b) => tls_params(&b.tls),
                Op::CreateServer(s) | Op::ReplaceServer(s) => tls_params(&s.tls),
                _ => false,
            })
        {
            return Some(
                "a listener or server gets the mesh entry's TLS versions or ciphers, which the Dataplane API cannot set",
            );
        }
        self.ops.iter().find_map(|op| match op {
            Op::CreateFrontend(f) | Op::ReplaceFrontend(f) => f.beyond_dataplane(),
            Op::CreateBind(b) | Op::ReplaceBind(b) => b.beyond_dataplane(),
            Op::CreateBackend(b) | Op::ReplaceBackend(b) => b.beyond_dataplane(),
            Op::CreateServer(s) | Op::ReplaceServer(s) => s.beyond_dataplane(),
            Op::DeleteFrontend(_) | Op::DeleteBackend(_) | Op::DeleteServer { .. } => None,
        })
    }
}

/// The operations of one plan, kept apart by phase until `Steps::ops` orders them.
#[derive(Default)]
struct Steps {
    delete_frontends: Vec<Op>,
    delete_servers: Vec<Op>,
    delete_backends: Vec<Op>,
    /// Each backend's operation followed by its servers'.
    backends: Vec<Op>,
    /// Each frontend's operation followed by its bind's.
    frontends: Vec<Op>,
    live: Vec<ServerSpec>,
    check_interval_changed: bool,
}

impl Steps {
    /// The one ordering rule: deletions before creations; frontends deleted before the
    /// backends they name, backends created (servers after their backend) before the
    /// frontends that name them.
    fn ops(self) -> Vec<Op> {
        [
            self.delete_frontends,
            self.delete_servers,
            self.delete_backends,
            self.backends,
            self.frontends,
        ]
        .concat()
    }

    fn delete(&mut self, u: &Unit) {
        for l in &u.listeners {
            self.delete_frontends
                .push(Op::DeleteFrontend(l.frontend.name.clone()));
        }
        for p in &u.pools {
            self.delete_backends
                .push(Op::DeleteBackend(p.backend.name.clone()));
        }
    }

    fn create(&mut self, u: &Unit) {
        for p in &u.pools {
            self.create_pool(p);
        }
        for l in &u.listeners {
            self.frontends.push(Op::CreateFrontend(l.frontend.clone()));
            self.frontends.push(Op::CreateBind(l.bind.clone()));
        }
    }

    fn create_pool(&mut self, p: &Pool) {
        self.backends.push(Op::CreateBackend(p.backend.clone()));
        self.backends
            .extend(p.servers.iter().cloned().map(Op::CreateServer));
    }

    /// A unit on both sides.
    fn change(&mut self, old: &Unit, new: &Unit) {
        match new.change {
            Change::Rebuild if !old.same_but_slots(new) => {
                self.delete(old);
                self.create(new);
            }
            // Same objects but the slots: the pools pair up by position.
            Change::Rebuild => {
                for (o, n) in old.pools.iter().zip(&new.pools) {
                    if n.slots {
                        self.slots(o, n);
                    }
                }
            }
            Change::Replace => self.replace(old, new),
        }
    }

    /// Each object of `new` replaced where it changed, created where it is new; each object
    /// of `old` gone from `new` deleted.
    fn replace(&mut self, old: &Unit, new: &Unit) {
        for o in &old.listeners {
            if !new
                .listeners
                .iter()
                .any(|n| n.frontend.name == o.frontend.name)
            {
                self.delete_frontends
                    .push(Op::DeleteFrontend(o.frontend.name.clone()));
            }
        }
        for n in &new.listeners {
            let Some(o) = old
                .listeners
                .iter()
                .find(|o| o.frontend.name == n.frontend.name)
            else {
                self.frontends.push(Op::CreateFrontend(n.frontend.clone()));
                self.frontends.push(Op::CreateBind(n.bind.clone()));
                continue;
            };
            if o.frontend != n.frontend {
                self.frontends.push(Op::ReplaceFrontend(n.frontend.clone()));
            }
            if o.bind != n.bind {
                self.frontends.push(Op::ReplaceBind(n.bind.clone()));
            }
        }
        for o in &old.pools {
            if !new.pools.iter().any(|n| n.backend.name == o.backend.name) {
                self.delete_backends
                    .push(Op::DeleteBackend(o.backend.name.clone()));
            }
        }
        for n in &new.pools {
            let Some(o) = old.pools.iter().find(|o| o.backend.name == n.backend.name) else {
                self.create_pool(n);
                continue;
            };
            if o.backend != n.backend {
                self.backends.push(Op::ReplaceBackend(n.backend.clone()));
            }
            if n.slots && o.slots {
                self.slots(o, n);
                continue;
            }
            for s in &o.servers {
                if !n.servers.iter().any(|x| x.name == s.name) {
                    self.delete_servers.push(Op::DeleteServer {
                        backend: s.backend.clone(),
                        name: s.name.clone(),
                    });
                }
            }
            for s in &n.servers {
                match o.servers.iter().find(|x| x.name == s.name) {
                    None => self.backends.push(Op::CreateServer(s.clone())),
                    Some(x) if x != s => self.backends.push(Op::ReplaceServer(s.clone())),
                    Some(_) => {}
                }
            }
        }
    }

    /// Slot changes of one backend: servers added or removed when its pool was resized, the
    /// rest changed in place (live).
    fn slots(&mut self, old: &Pool, new: &Pool) {
        for s in &old.servers {
            if !new.servers.iter().any(|n| n.name == s.name) {
                self.delete_servers.push(Op::DeleteServer {
                    backend: old.backend.name.clone(),
                    name: s.name.clone(),
                });
            }
        }
        for spec in &new.servers {
            let Some(before) = old.servers.iter().find(|o| o.name == spec.name) else {
                self.backends.push(Op::CreateServer(spec.clone()));
                continue;
            };
            if before == spec {
                continue;
            }
            if before.check_inter_ms != spec.check_inter_ms || before.passive != spec.passive {
                // The runtime API cannot change a check's interval (nor the passive check's
                // options, which follow it): the transaction does.
                self.backends.push(Op::ReplaceServer(spec.clone()));
                self.check_interval_changed = true;
                continue;
            }
            let moved = (&before.address, before.port) != (&spec.address, spec.port);
            if moved && !before.maintenance && !spec.maintenance {
                // Another instance in a slot that stays in service: through maintenance, so
                // that it starts as up and checked at once, not with the check state of the
                // instance it replaces (down, if that one's host vanished).
                self.live.push(ServerSpec {
                    maintenance: true,
                    ..spec.clone()
                });
            }
            self.live.push(spec.clone());
        }
    }
}

/// Every operation that builds `d` from an empty configuration, in the plan's order.
#[cfg(test)]
pub fn from_scratch(d: &Desired) -> Vec<Op> {
    let mut steps = Steps::default();
    for u in &index(d).units {
        steps.create(u);
    }
    steps.ops()
}

pub fn plan(applied: &Desired, desired: &Desired) -> Plan {
    let (old, new) = (index(applied), index(desired));
    let mut steps = Steps::default();
    for o in &old.units {
        if new.unit(&o.key).is_none() {
            steps.delete(o);
        }
    }
    for n in &new.units {
        match old.unit(&n.key) {
            None => steps.create(n),
            Some(o) => steps.change(o, n),
        }
    }
    let check_interval_changed = steps.check_interval_changed;
    let mut live = std::mem::take(&mut steps.live);
    let transaction = [
        &steps.delete_frontends,
        &steps.delete_servers,
        &steps.delete_backends,
        &steps.backends,
        &steps.frontends,
    ]
    .iter()
    .any(|v| !v.is_empty());
    if transaction {
        // A transaction's reload starts every server afresh: a slot's last step is enough.
        let last: Vec<ServerSpec> = live
            .iter()
            .enumerate()
            .filter(|(i, s)| {
                !live[i + 1..]
                    .iter()
                    .any(|n| (&n.backend, &n.name) == (&s.backend, &s.name))
            })
            .map(|(_, s)| s.clone())
            .collect();
        live.clear();
        steps
            .backends
            .extend(last.into_iter().map(Op::ReplaceServer));
    }
    let ops = steps.ops();
    let before = crate::objects::split_thresholds(applied);
    let live_splits = crate::objects::split_thresholds(desired)
        .into_iter()
        // A key new to the map comes with new rules, and so with a full render that writes it.
        .filter(|(k, v)| before.iter().any(|(bk, bv)| bk == k && bv != v))
        .collect();
    Plan {
        ops,
        live,
        live_splits,
        intentions_map_changed: applied.intentions_map != desired.intentions_map,
        roots_changed: applied.tls.roots_pem != desired.tls.roots_pem,
        leaf_changed: applied.tls.leaf_pem != desired.tls.leaf_pem,
        gateway_map_changed: applied.gateway.as_ref().map(Gateway::map_entries)
            != desired.gateway.as_ref().map(Gateway::map_entries),
        transparent_map_changed: applied.transparent.as_ref().map(|o| o.maps(&applied.paths))
            != desired.transparent.as_ref().map(|o| o.maps(&desired.paths)),
        check_interval_changed,
        rendered_only: rendered_only_changes(&old, &new),
    }
}

/// The reasons of the rendered-only parts added, removed or changed, desired order first.
fn rendered_only_changes(old: &Index, new: &Index) -> Vec<&'static str> {
    let mut out: Vec<&'static str> = Vec::new();
    let mut note = |r: &'static str| {
        if !out.contains(&r) {
            out.push(r);
        }
    };
    for n in &new.rendered_only {
        if old.rendered_only(&n.key) != Some(n) {
            note(n.reason);
        }
    }
    for o in &old.rendered_only {
        if new.rendered_only(&o.key).is_none() {
            note(o.reason);
        }
    }
    out
}

#[cfg(test)]
mod tests;
