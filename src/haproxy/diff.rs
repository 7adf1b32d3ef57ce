//! The Dataplane API operations that turn one `Desired` into another. Pure; the objects are
//! those of `crate::objects`, which also renders them into the file, so a config built by
//! deltas and one rendered from scratch describe the same HAProxy objects.

use crate::model::gateway::{Gateway, GatewayRoute};
use crate::model::{Desired, ExposedListener, UpstreamListener};
use crate::objects::{
    exposed_backend, exposed_bind, exposed_frontend, exposed_server, gateway_backend, gateway_bind,
    gateway_frontend, gateway_server, local_backend, local_server, public_bind, public_frontend,
    target_backend, target_server, upstream_backend, upstream_bind, upstream_frontend,
    upstream_server,
};
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
    /// In an order the Dataplane API accepts inside one transaction: deletions first (frontends
    /// before the backends they use), then creations (backends before the frontends that use them).
    /// Committing them reloads HAProxy.
    pub ops: Vec<Op>,
    /// Slot changes (address, port, weight, maintenance) the applier sends over HAProxy's
    /// runtime API (`haproxy::live`, the stats socket) without a reload, one by one, outside any
    /// transaction. Empty when `ops` is
    /// not: a reload is coming anyway, and one transaction keeps the change atomic.
    pub live: Vec<ServerSpec>,
    /// Split thresholds that changed (key, new value): new splitter weights, applied live with
    /// `set map` after the splits map file is written. Their rules are the same either way.
    pub live_splits: Vec<(String, u32)>,
    /// The intentions fast map changed: replaced whole and atomically through the runtime API
    /// (`prepare map`, `add map`, `commit map`) after its file is written. No rule changes.
    pub intentions_map_changed: bool,
    pub roots_changed: bool,
    pub leaf_changed: bool,
    /// The public frontend's `appname_header` rules changed (added, renamed or removed): they
    /// are rendered only, and a frontend PUT keeps the rules the file had, so it takes a full
    /// render (`full_render_reason`).
    pub app_header_changed: bool,
    /// The public frontend's mode changed: its rules (paths refused and normalized in http
    /// mode, the intentions rules of either mode) are rendered only, and a Dataplane API
    /// replacement would keep the old mode's, so it takes a full render.
    pub public_mode_changed: bool,
    /// A mesh gateway's SNI map changed: its file is written before the operations (so a
    /// reload reads it) and HAProxy's loaded copy replaced whole after them, once the
    /// backends it names exist.
    pub gateway_map_changed: bool,
    /// Transparent mode's outbound listener appeared, went or changed (port, mesh-only): it
    /// is rendered only, so it takes a full render.
    pub transparent_changed: bool,
    /// Only its routes changed: the map is replaced live, like the intentions map.
    pub transparent_map_changed: bool,
    /// A pool resize changed its slots' check interval: the servers are replaced by the
    /// transaction, not live (`only_servers`).
    pub check_interval_changed: bool,
    /// The `mesh` entry's TLS versions or ciphers changed: HAProxy cannot change them on a
    /// running bind or server (`set ssl` has no such knob), so it takes a full render.
    pub mesh_tls_changed: bool,
    /// The headers accepted JWTs change: the public listener's rules for them are rendered
    /// only, so it takes a full render.
    pub jwt_headers_changed: bool,
}

impl Plan {
    pub fn is_empty(&self) -> bool {
        self.ops.is_empty()
            && self.live.is_empty()
            && self.live_splits.is_empty()
            && !self.intentions_map_changed
            && !self.gateway_map_changed
            && !self.transparent_changed
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

    /// Whether the plan creates an object the Dataplane API's v1.2.5 models cannot describe:
    /// then the whole configuration is rendered and replaced in one validated reload instead.
    pub fn needs_full_render(&self) -> bool {
        self.full_render_reason().is_some()
    }

    /// Why the plan needs a full render (see `needs_full_render`), for the log.
    pub fn full_render_reason(&self) -> Option<&'static str> {
        if self.app_header_changed {
            return Some(
                "the public listener's appname_header rules change, which a Dataplane API frontend replace would keep as they were",
            );
        }
        if self.jwt_headers_changed {
            return Some(
                "the headers accepted JWTs change are new, and their rules are rendered only",
            );
        }
        if self.mesh_tls_changed {
            return Some(
                "the mesh entry's TLS versions or ciphers change, which only a reload applies",
            );
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
        if self.public_mode_changed {
            return Some(
                "the public listener's mode changes, and its rules for either mode are rendered only",
            );
        }
        if self.transparent_changed {
            return Some("the transparent outbound listener changes, and it is rendered only");
        }
        self.ops.iter().find_map(|op| match op {
            Op::CreateBind(b) | Op::ReplaceBind(b) if b.unix_mode.is_some() => Some(
                "a new unix socket listener has permissions the Dataplane API cannot set",
            ),
            Op::CreateFrontend(f) | Op::ReplaceFrontend(f) if f.only_path.is_some() => Some(
                "an exposed path's listener needs an `http-request return` rule the Dataplane API cannot create",
            ),
            Op::CreateBind(b) | Op::ReplaceBind(b) if b.h2 => {
                Some("an http2 exposed path needs `proto h2`, which the Dataplane API cannot set")
            }
            Op::CreateServer(s) | Op::ReplaceServer(s) if s.h2 => Some(
                "an HTTP/2 app or exposed path needs `proto h2`, which the Dataplane API cannot set",
            ),
            Op::CreateServer(s) | Op::ReplaceServer(s) if s.alpn.is_some() => Some(
                "an HTTP/2 upstream's servers need `alpn h2`, which the Dataplane API cannot set",
            ),
            Op::CreateBackend(b) | Op::ReplaceBackend(b) if b.verifyhost.is_some() => Some(
                "an upstream's servers get a certificate name to check (verifyhost), which the Dataplane API cannot set",
            ),
            Op::CreateFrontend(f) | Op::ReplaceFrontend(f) if !f.routing.is_empty() => Some(
                "an upstream's discovery-chain routing changes, and the Dataplane API cannot write its rules in order",
            ),
            Op::CreateFrontend(f) | Op::ReplaceFrontend(f) if f.sni_map.is_some() => Some(
                "a mesh gateway's listener changes, and the Dataplane API cannot write its SNI routing rules",
            ),
            Op::CreateBackend(b) | Op::ReplaceBackend(b) if !b.queue.is_empty() => Some(
                "an upstream's limits bound its queue with rules the Dataplane API cannot write",
            ),
            Op::CreateBackend(b) | Op::ReplaceBackend(b) if !b.target.is_empty() => Some(
                "a discovery-chain target's settings (hashing, timeouts, retries) are not in the Dataplane API's models",
            ),
            _ => None,
        })
    }
}

/// Every operation that builds `d` from an empty configuration; the listeners the template
/// renders, expressed as Dataplane API objects.
#[cfg(test)]
pub fn from_scratch(d: &Desired) -> Vec<Op> {
    let mut ops = Vec::new();
    if let Some(p) = &d.public {
        ops.extend([
            Op::CreateBackend(local_backend(p)),
            Op::CreateServer(local_server(p)),
            Op::CreateFrontend(public_frontend(d, p)),
            Op::CreateBind(public_bind(d, p)),
        ]);
    }
    if let Some(g) = &d.gateway {
        for r in &g.routes {
            ops.extend(create_route(d, r));
        }
        for l in &g.listeners {
            ops.push(Op::CreateFrontend(gateway_frontend(d, l)));
            ops.push(Op::CreateBind(gateway_bind(l)));
        }
    }
    for u in &d.upstreams {
        ops.extend(create_upstream(d, u));
    }
    for e in &d.exposed {
        ops.extend(create_exposed(d, e));
    }
    ops
}

fn create_exposed(d: &Desired, e: &ExposedListener) -> Vec<Op> {
    vec![
        Op::CreateBackend(exposed_backend(e)),
        Op::CreateServer(exposed_server(e)),
        Op::CreateFrontend(exposed_frontend(d, e)),
        Op::CreateBind(exposed_bind(e)),
    ]
}

/// Exposed listeners: removed ones deleted (the Dataplane API can), new and changed ones
/// (re)created, which `Plan::needs_full_render` turns into one full render.
fn plan_exposed(
    applied: &Desired,
    desired: &Desired,
    deletes: &mut Vec<Op>,
    creates: &mut Vec<Op>,
) {
    for old in &applied.exposed {
        match desired.exposed_listener(&old.name) {
            Some(new) if create_exposed(applied, old) == create_exposed(desired, new) => {}
            new => {
                deletes.push(Op::DeleteFrontend(old.name.clone()));
                deletes.push(Op::DeleteBackend(old.backend.clone()));
                if let Some(new) = new {
                    creates.extend(create_exposed(desired, new));
                }
            }
        }
    }
    for new in &desired.exposed {
        if applied.exposed_listener(&new.name).is_none() {
            creates.extend(create_exposed(desired, new));
        }
    }
}

fn create_route(d: &Desired, r: &GatewayRoute) -> Vec<Op> {
    let mut ops = vec![Op::CreateBackend(gateway_backend(d, r))];
    ops.extend(
        r.slots
            .iter()
            .map(|s| Op::CreateServer(gateway_server(r, s))),
    );
    ops
}

/// A mesh gateway's changes: its listeners replaced when they change (a full render, their
/// rules are rendered only), routes' backends created and deleted as services are exported
/// and withdrawn, and their slots changed live as instances come and go.
fn plan_gateway(
    applied: &Desired,
    desired: &Desired,
    deletes: &mut Vec<Op>,
    creates: &mut Vec<Op>,
    live: &mut Vec<ServerSpec>,
) {
    let (old, new) = match (&applied.gateway, &desired.gateway) {
        (None, None) => return,
        (Some(o), Some(n)) => (o.clone(), n.clone()),
        (Some(o), None) => (o.clone(), Gateway::default()),
        (None, Some(n)) => (Gateway::default(), n.clone()),
    };
    for l in &old.listeners {
        if !new.listeners.iter().any(|n| n.name == l.name) {
            deletes.push(Op::DeleteFrontend(l.name.into()));
        }
    }
    for l in &new.listeners {
        match old.listeners.iter().find(|o| o.name == l.name) {
            None => {
                creates.push(Op::CreateFrontend(gateway_frontend(desired, l)));
                creates.push(Op::CreateBind(gateway_bind(l)));
            }
            Some(o) => {
                if gateway_frontend(applied, o) != gateway_frontend(desired, l) {
                    creates.push(Op::ReplaceFrontend(gateway_frontend(desired, l)));
                }
                if gateway_bind(o) != gateway_bind(l) {
                    creates.push(Op::ReplaceBind(gateway_bind(l)));
                }
            }
        }
    }
    for o in &old.routes {
        let Some(n) = new.route(&o.backend) else {
            deletes.push(Op::DeleteBackend(o.backend.clone()));
            continue;
        };
        if gateway_backend(applied, o) != gateway_backend(desired, n) {
            deletes.push(Op::DeleteBackend(o.backend.clone()));
            creates.extend(create_route(desired, n));
            continue;
        }
        plan_slots(
            (&o.backend, &o.slots),
            &n.slots,
            (&|s| gateway_server(o, s), &|s| gateway_server(n, s)),
            deletes,
            creates,
            live,
        );
    }
    // New backends before the listeners that may name them: `creates` is in order.
    let mut fresh: Vec<Op> = Vec::new();
    for n in &new.routes {
        if old.route(&n.backend).is_none() {
            fresh.extend(create_route(desired, n));
        }
    }
    creates.splice(0..0, fresh);
}

fn create_upstream(d: &Desired, u: &UpstreamListener) -> Vec<Op> {
    let mut ops = vec![Op::CreateBackend(upstream_backend(d, u))];
    ops.extend(
        u.slots
            .iter()
            .map(|s| Op::CreateServer(upstream_server(d, u, s))),
    );
    for t in targets(u) {
        ops.push(Op::CreateBackend(target_backend(u, t)));
        ops.extend(
            t.slots
                .iter()
                .map(|s| Op::CreateServer(target_server(d, u, t, s))),
        );
    }
    if !u.implicit {
        ops.push(Op::CreateFrontend(upstream_frontend(d, u)));
        ops.push(Op::CreateBind(upstream_bind(u)));
    }
    ops
}

fn targets(u: &UpstreamListener) -> impl Iterator<Item = &crate::model::chain::TargetBackend> {
    u.routing.iter().flat_map(|r| r.targets.iter())
}

fn delete_upstream(u: &UpstreamListener, deletes: &mut Vec<Op>) {
    if !u.implicit {
        deletes.push(Op::DeleteFrontend(u.name.clone()));
    }
    deletes.push(Op::DeleteBackend(u.backend.clone()));
    deletes.extend(targets(u).map(|t| Op::DeleteBackend(t.backend.clone())));
}

/// How a slot reads as a server on one side of the plan.
type SlotSpec<'a> = &'a dyn Fn(&crate::model::Slot) -> ServerSpec;

/// Slot changes of one backend: servers added or removed when its pool was resized, the rest
/// changed in place (live). Whether the resize changed the slots' check interval.
fn plan_slots(
    old: (&str, &[crate::model::Slot]),
    new: &[crate::model::Slot],
    spec: (SlotSpec<'_>, SlotSpec<'_>),
    deletes: &mut Vec<Op>,
    creates: &mut Vec<Op>,
    live: &mut Vec<ServerSpec>,
) -> bool {
    let (backend, old_slots) = old;
    let mut check_interval_changed = false;
    let (old_spec, new_spec) = spec;
    for s in old_slots {
        if !new.iter().any(|n| n.name == s.name) {
            deletes.push(Op::DeleteServer {
                backend: backend.to_string(),
                name: s.name.clone(),
            });
        }
    }
    for s in new {
        let spec = new_spec(s);
        let Some(before) = old_slots.iter().find(|o| o.name == s.name).map(old_spec) else {
            creates.push(Op::CreateServer(spec));
            continue;
        };
        if before == spec {
            continue;
        }
        if before.check_inter_ms != spec.check_inter_ms {
            // The runtime API cannot change a check's interval: the transaction does.
            creates.push(Op::ReplaceServer(spec));
            check_interval_changed = true;
            continue;
        }
        let moved = (&before.address, before.port) != (&spec.address, spec.port);
        if moved && !before.maintenance && !spec.maintenance {
            // Another instance in a slot that stays in service: through maintenance, so that
            // it starts as up and checked at once, not with the check state of the instance
            // it replaces (down, if that one's host vanished).
            live.push(ServerSpec {
                maintenance: true,
                ..spec.clone()
            });
        }
        live.push(spec);
    }
    check_interval_changed
}

pub fn plan(applied: &Desired, desired: &Desired) -> Plan {
    let mut deletes = Vec::new();
    let mut creates = Vec::new();
    let mut live = Vec::new();
    let mut check_interval_changed = false;

    // The public listener and the local app: replaced field by field, never removed (a
    // process is a sidecar or a gateway for its whole run).
    if let (Some(a), Some(p)) = (&applied.public, &desired.public) {
        if public_frontend(applied, a) != public_frontend(desired, p) {
            creates.push(Op::ReplaceFrontend(public_frontend(desired, p)));
        }
        if public_bind(applied, a) != public_bind(desired, p) {
            creates.push(Op::ReplaceBind(public_bind(desired, p)));
        }
        if local_backend(a) != local_backend(p) {
            creates.push(Op::ReplaceBackend(local_backend(p)));
        }
        if local_server(a) != local_server(p) {
            creates.push(Op::ReplaceServer(local_server(p)));
        }
    }
    plan_gateway(applied, desired, &mut deletes, &mut creates, &mut live);

    for old in &applied.upstreams {
        let Some(new) = desired.upstream(&old.name) else {
            delete_upstream(old, &mut deletes);
            continue;
        };
        let target_specs = |u: &UpstreamListener| -> Vec<BackendSpec> {
            targets(u).map(|t| target_backend(u, t)).collect()
        };
        let listener_changed = upstream_frontend(applied, old) != upstream_frontend(desired, new)
            || upstream_bind(old) != upstream_bind(new)
            || upstream_backend(applied, old) != upstream_backend(desired, new)
            || target_specs(old) != target_specs(new);
        if listener_changed {
            // Rare (a protocol, timeout or routing edit): rebuild the listener rather than
            // patch it.
            delete_upstream(old, &mut deletes);
            creates.extend(create_upstream(desired, new));
            continue;
        }
        check_interval_changed |= plan_slots(
            (&old.backend, &old.slots),
            &new.slots,
            (&|s| upstream_server(applied, old, s), &|s| {
                upstream_server(desired, new, s)
            }),
            &mut deletes,
            &mut creates,
            &mut live,
        );
        // Same routing: each target's backend exists on both sides.
        for (ot, nt) in targets(old).zip(targets(new)) {
            check_interval_changed |= plan_slots(
                (&ot.backend, &ot.slots),
                &nt.slots,
                (&|s| target_server(applied, old, ot, s), &|s| {
                    target_server(desired, new, nt, s)
                }),
                &mut deletes,
                &mut creates,
                &mut live,
            );
        }
    }
    for new in &desired.upstreams {
        if applied.upstream(&new.name).is_none() {
            creates.extend(create_upstream(desired, new));
        }
    }

    plan_exposed(applied, desired, &mut deletes, &mut creates);

    deletes.extend(creates);
    if !deletes.is_empty() {
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
        deletes.extend(last.into_iter().map(Op::ReplaceServer));
    }
    let before = crate::objects::split_thresholds(applied);
    let live_splits = crate::objects::split_thresholds(desired)
        .into_iter()
        // A key new to the map comes with new rules, and so with a full render that writes it.
        .filter(|(k, v)| before.iter().any(|(bk, bv)| bk == k && bv != v))
        .collect();
    Plan {
        ops: deletes,
        live,
        live_splits,
        intentions_map_changed: applied.intentions_map != desired.intentions_map,
        roots_changed: applied.tls.roots_pem != desired.tls.roots_pem,
        leaf_changed: applied.tls.leaf_pem != desired.tls.leaf_pem,
        app_header_changed: applied.public.as_ref().map(|p| &p.app_header)
            != desired.public.as_ref().map(|p| &p.app_header),
        public_mode_changed: applied.public.as_ref().map(|p| p.mode)
            != desired.public.as_ref().map(|p| p.mode),
        gateway_map_changed: applied.gateway.as_ref().map(Gateway::map_entries)
            != desired.gateway.as_ref().map(Gateway::map_entries),
        transparent_changed: outbound_listener(applied) != outbound_listener(desired),
        transparent_map_changed: applied.transparent.as_ref().map(|o| &o.routes)
            != desired.transparent.as_ref().map(|o| &o.routes),
        check_interval_changed,
        mesh_tls_changed: applied.mesh_tls != desired.mesh_tls,
        jwt_headers_changed: applied.jwt_headers != desired.jwt_headers,
    }
}

/// What of the outbound listener is rendered into its lines (the routes live in the map).
fn outbound_listener(d: &Desired) -> Option<(u16, bool)> {
    d.transparent.as_ref().map(|o| (o.port, o.mesh_only))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fixtures::{settings, snapshot, ANY};
    use crate::model::{build, place, Server, MIN_SLOTS};

    fn client() -> Desired {
        crate::model::fixtures::client_desired()
    }

    fn instances(u: &UpstreamListener) -> Vec<Server> {
        u.instances().cloned().collect()
    }

    fn server(id: &str, port: u16) -> Server {
        Server {
            id: id.into(),
            address: "127.0.0.9".into(),
            port,
            weight: 1,
            identity: crate::admission::Identity::service("server", "dc1"),
            admission: crate::model::Admission::Unchecked,
        }
    }

    /// A change of the mesh entry's TLS settings is a reload; a slot pool resized while they
    /// are set still goes through the runtime API, whose `add server` takes them.
    #[test]
    fn mesh_tls_changes_take_a_full_render() {
        let a = client();
        let mut b = a.clone();
        b.mesh_tls.incoming.min = Some(crate::value::TlsVersion::V1_3);
        let p = plan(&a, &b);
        assert!(p.mesh_tls_changed && p.needs_full_render());
        assert!(p.ops.iter().any(|o| matches!(o, Op::ReplaceBind(_))));
        let mut c = b.clone();
        c.mesh_tls.outgoing.min = Some(crate::value::TlsVersion::V1_3);
        assert!(plan(&b, &c).needs_full_render());

        let mut d = c.clone();
        let many: Vec<Server> = (0..MIN_SLOTS + 1)
            .map(|i| server(&format!("i{i}.n"), 22000 + i as u16))
            .collect();
        d.upstreams[0].slots = place(many, &d.upstreams[0].slots);
        let p = plan(&c, &d);
        assert!(p.only_servers() && !p.needs_full_render(), "{p:#?}");
        let added = p.ops.iter().find_map(|o| match o {
            Op::CreateServer(s) => Some(s.line()),
            _ => None,
        });
        assert!(added.is_some_and(|l| l.contains("ssl-min-ver TLSv1.3")));
    }

    #[test]
    fn same_state_plans_nothing() {
        assert!(plan(&client(), &client()).is_empty());
    }

    #[test]
    fn instance_churn_within_capacity_is_live_only() {
        let a = client();
        let mut b = a.clone();
        let up = &mut b.upstreams[0];
        let mut now = instances(up);
        now.remove(0);
        now[0].weight = 7;
        now.push(server("server-3-sidecar-proxy.node2", 21009));
        up.slots = place(now, &up.slots);
        let p = plan(&a, &b);
        assert!(p.ops.is_empty(), "no transaction, no reload: {:#?}", p.ops);
        assert!(!p.roots_changed && !p.leaf_changed);
        // The newcomer takes the slot just freed, through maintenance (so it starts up and
        // checked, not with the check state of the instance it replaces); the weight changes in
        // place.
        assert_eq!(p.live.len(), 3, "{:#?}", p.live);
        assert!(p.live.iter().any(|s| s.weight == Some(7) && !s.maintenance));
        let newcomer: Vec<bool> = p
            .live
            .iter()
            .filter(|s| s.port == 21009)
            .map(|s| s.maintenance)
            .collect();
        assert_eq!(newcomer, [true, false]);

        // An instance that leaves puts its slot in maintenance, live too.
        let mut c = b.clone();
        let mut fewer = instances(&c.upstreams[0]);
        fewer.retain(|s| s.port != 21009);
        c.upstreams[0].slots = place(fewer, &c.upstreams[0].slots);
        let p = plan(&b, &c);
        assert!(p.ops.is_empty());
        assert_eq!(p.live.len(), 1);
        assert!(p.live[0].maintenance && p.live[0].address == "127.0.0.1");
    }

    #[test]
    fn growing_past_capacity_is_one_transaction() {
        let a = client();
        let mut b = a.clone();
        let up = &mut b.upstreams[0];
        let many: Vec<Server> = (0..MIN_SLOTS + 1)
            .map(|i| server(&format!("i{i}.n"), 22000 + i as u16))
            .collect();
        up.slots = place(many, &up.slots);
        assert_eq!(up.slots.len(), 2 * MIN_SLOTS);
        let p = plan(&a, &b);
        assert!(p.live.is_empty(), "everything rides the transaction");
        let creates = p
            .ops
            .iter()
            .filter(|o| matches!(o, Op::CreateServer(_)))
            .count();
        let replaces = p
            .ops
            .iter()
            .filter(|o| matches!(o, Op::ReplaceServer(_)))
            .count();
        assert_eq!(creates, MIN_SLOTS);
        assert_eq!(replaces, MIN_SLOTS, "the old slots all changed instance");
    }

    /// Every slot is checked; a resize within the shortest interval stays live (the runtime
    /// API adds the slots), one that lengthens it replaces every slot in a transaction.
    #[test]
    fn a_resize_that_changes_the_check_interval_is_a_transaction() {
        let a = client();
        let grow = |from: &Desired, n: usize| {
            let mut b = from.clone();
            let up = &mut b.upstreams[0];
            let many: Vec<Server> = (0..n)
                .map(|i| server(&format!("i{i}.n"), 22000 + i as u16))
                .collect();
            up.slots = place(many, &up.slots);
            b
        };
        let inter = |d: &Desired| {
            let u = &d.upstreams[0];
            let all: Vec<_> = u
                .slots
                .iter()
                .map(|s| upstream_server(d, u, s).check_inter_ms)
                .collect();
            assert!(all.iter().all(|i| *i == all[0]), "{all:?}");
            all[0]
        };
        assert_eq!(inter(&a), Some(crate::model::CHECK_MIN_INTERVAL_MS));
        let b = grow(&a, 40);
        assert_eq!(b.upstreams[0].slots.len(), 64);
        assert_eq!(inter(&b), inter(&a));
        let p = plan(&a, &b);
        assert!(p.only_servers() && !p.check_interval_changed);

        let c = grow(&b, 100);
        assert_eq!(c.upstreams[0].slots.len(), 128);
        assert_eq!(inter(&c), Some(512));
        let p = plan(&b, &c);
        assert!(p.check_interval_changed && !p.only_servers());
        let replaced = p
            .ops
            .iter()
            .filter(|o| matches!(o, Op::ReplaceServer(s) if s.check_inter_ms == Some(512)))
            .count();
        assert_eq!(replaced, 64, "every old slot, at the new interval");
        assert!(p.live.is_empty());
    }

    #[test]
    fn instances_keep_their_slots_and_the_pool_shrinks_lazily() {
        let five: Vec<Server> = (0..5)
            .map(|i| server(&format!("i{i}.n"), 100 + i))
            .collect();
        let slots = place(five.clone(), &[]);
        assert_eq!(slots.len(), MIN_SLOTS);
        // i1 and i3 leave, i9 arrives: survivors stay put, the newcomer takes the lowest hole.
        let next: Vec<Server> = vec![
            five[0].clone(),
            five[2].clone(),
            five[4].clone(),
            server("i9.n", 109),
        ];
        let slots2 = place(next, &slots);
        let at = |s: &[crate::model::Slot], i: usize| s[i].instance.as_ref().map(|x| x.id.clone());
        assert_eq!(at(&slots2, 0).as_deref(), Some("i0.n"));
        assert_eq!(at(&slots2, 1).as_deref(), Some("i9.n"));
        assert_eq!(at(&slots2, 2).as_deref(), Some("i2.n"));
        assert_eq!(at(&slots2, 4).as_deref(), Some("i4.n"));
        // 20 instances need 32 slots; back to 9 keeps 32 (more than a quarter); to 3 shrinks.
        let twenty: Vec<Server> = (0..20)
            .map(|i| server(&format!("j{i}.n"), 200 + i))
            .collect();
        let big = place(twenty.clone(), &slots2);
        assert_eq!(big.len(), 32);
        assert_eq!(place(twenty[..9].to_vec(), &big).len(), 32);
        let small = place(twenty[..3].to_vec(), &big);
        assert_eq!(small.len(), MIN_SLOTS);
        assert_eq!(small.iter().filter(|s| s.instance.is_some()).count(), 3);
    }

    #[test]
    fn upstream_added_and_removed_in_transaction_order() {
        let a = client();
        let mut b = a.clone();
        let mut extra = b.upstreams[0].clone();
        extra.name = "up_svc_other_local_127.0.0.1_9292".into();
        extra.backend = "be_up_svc_other_local_127.0.0.1_9292".into();
        extra.bind_port = 9292;
        b.upstreams.push(extra);
        let p = plan(&a, &b);
        let kinds: Vec<&str> = p
            .ops
            .iter()
            .map(|o| match o {
                Op::CreateBackend(_) => "backend",
                Op::CreateServer(_) => "server",
                Op::CreateFrontend(_) => "frontend",
                Op::CreateBind(_) => "bind",
                _ => "other",
            })
            .collect();
        let mut want = vec!["backend"];
        want.extend(std::iter::repeat_n("server", MIN_SLOTS));
        want.extend(["frontend", "bind"]);
        assert_eq!(kinds, want);

        let back = plan(&b, &a);
        assert_eq!(
            back.ops,
            [
                Op::DeleteFrontend("up_svc_other_local_127.0.0.1_9292".into()),
                Op::DeleteBackend("be_up_svc_other_local_127.0.0.1_9292".into())
            ]
        );
    }

    /// `client` with its upstream following the recorded chain `name`.
    fn chained(name: &str) -> Desired {
        let mut s = snapshot(ANY, "client-sidecar-proxy", "ca-leaf-client.json");
        let key = crate::consul::destinations(s.registration.as_ref().unwrap(), &[])[0].clone();
        let chain = crate::consul::chain::parse_chain(&crate::model::fixtures::fixture(
            ANY,
            &format!("discovery-chain-{name}.json"),
        ))
        .unwrap();
        s.apply(crate::consul::Update::Chain(key, chain));
        build(&s, &settings(), None).unwrap()
    }

    /// A new intentions fast map is one live replacement: no operation, no full render.
    #[test]
    fn a_new_intentions_fast_map_is_applied_live() {
        let a = client();
        let mut b = a.clone();
        b.intentions_map = vec![("^k_0:".into(), "allow".into())];
        let p = plan(&a, &b);
        assert!(p.intentions_map_changed && !p.is_empty(), "{p:#?}");
        assert!(p.ops.is_empty() && p.live.is_empty() && !p.needs_full_render());
        assert!(!plan(&b, &b).intentions_map_changed);
    }

    #[test]
    fn new_split_weights_are_live_and_new_routes_a_full_render() {
        let a = chained("split");
        let mut b = a.clone();
        let r = b.upstreams[0].routing.as_mut().unwrap();
        r.routes[0].splits[0].upto = 5000;
        let p = plan(&a, &b);
        assert!(p.ops.is_empty() && p.live.is_empty(), "{p:#?}");
        assert_eq!(p.live_splits.len(), 1);
        assert_eq!(p.live_splits[0].1, 5000);

        let p = plan(&client(), &a);
        assert!(p.needs_full_render(), "{:#?}", p.ops);
        assert!(p.full_render_reason().unwrap().contains("discovery-chain"));
        // Back to the plain upstream: routing rules go, so the frontend is rebuilt.
        let back = plan(&a, &client());
        assert!(back
            .ops
            .iter()
            .any(|o| matches!(o, Op::DeleteBackend(n) if n.contains(".t."))));
        assert!(plan(&a, &a.clone()).is_empty());
    }

    #[test]
    fn instance_churn_of_a_chain_target_is_live() {
        let a = chained("old");
        let mut b = a.clone();
        let t = &mut b.upstreams[0].routing.as_mut().unwrap().targets[0];
        t.slots = place(vec![server("web-v1-sidecar-proxy.node1", 21444)], &t.slots);
        let backend = t.backend.clone();
        let p = plan(&a, &b);
        assert!(p.ops.is_empty(), "{:#?}", p.ops);
        assert_eq!(p.live.len(), 1);
        assert_eq!(p.live[0].backend, backend);
    }

    fn paths() -> Desired {
        build(
            &snapshot(ANY, "paths-sidecar-proxy", "ca-leaf-paths.json"),
            &settings(),
            None,
        )
        .unwrap()
    }

    #[test]
    fn a_new_exposed_path_is_a_full_render_and_a_removed_one_a_transaction() {
        let with = paths();
        let mut without = with.clone();
        let gone = without.exposed.remove(0);
        let p = plan(&without, &with);
        assert!(p.needs_full_render(), "{:#?}", p.ops);
        assert!(p.full_render_reason().unwrap().contains("exposed path"));

        let back = plan(&with, &without);
        assert!(!back.needs_full_render());
        assert_eq!(
            back.ops,
            [
                Op::DeleteFrontend(gone.name.clone()),
                Op::DeleteBackend(gone.backend.clone())
            ]
        );
        // A changed path rebuilds its listener, through a full render too.
        let mut moved = with.clone();
        moved.exposed[0].path = "/stats".into();
        let p = plan(&with, &moved);
        assert!(p.needs_full_render());
        assert_eq!(p.ops[0], Op::DeleteFrontend(gone.name));
        assert!(plan(&with, &with.clone()).is_empty());
    }

    /// The public listener's rules are rendered only and differ by mode (paths refused and
    /// normalized in http): a Dataplane API replacement would keep the old mode's, so a mode
    /// change either way is a full render.
    #[test]
    fn a_public_listener_mode_change_is_a_full_render() {
        let tcp = client();
        let mut http = tcp.clone();
        http.sidecar_mut().mode = crate::model::Mode::Http;
        for (a, b) in [(&tcp, &http), (&http, &tcp)] {
            let p = plan(a, b);
            assert!(
                p.full_render_reason()
                    .is_some_and(|r| r.contains("public listener")),
                "{:#?}",
                p.ops
            );
        }
    }

    #[test]
    fn local_app_and_certificates_changes_are_seen() {
        let a = client();
        let mut b = a.clone();
        b.sidecar_mut().app_port = 9999;
        b.tls.leaf_pem.push_str("# rotated\n");
        let p = plan(&a, &b);
        assert_eq!(p.ops.len(), 1);
        assert!(matches!(&p.ops[0], Op::ReplaceServer(s) if s.port == 9999 && s.name == "app"));
        assert!(p.leaf_changed && !p.roots_changed);
    }

    #[test]
    fn applying_a_plan_to_from_scratch_ops_lands_on_the_target() {
        // Model the Dataplane API as a set of objects: deltas on top of `a` must give exactly the
        // objects `b` would have from scratch.
        let a = client();
        let mut b = a.clone();
        let mut now = instances(&b.upstreams[0]);
        now.pop();
        now[0].weight = 3;
        b.upstreams[0].slots = place(now, &b.upstreams[0].slots);
        let mut extra = b.upstreams[0].clone();
        extra.name = "up_svc_x_local_127.0.0.1_9300".into();
        extra.backend = "be_up_svc_x_local_127.0.0.1_9300".into();
        extra.bind_port = 9300;
        b.upstreams.push(extra);
        b.sidecar_mut().connect_timeout_ms = crate::value::Millis::constant(1234);
        b.sidecar_mut().server_timeout_ms = Some(crate::value::Millis::constant(700));
        b.sidecar_mut().client_timeout_ms = Some(crate::value::Millis::constant(9000));
        b.sidecar_mut().max_connections = crate::value::Limit::new("t", 2).ok();
        b.sidecar_mut().forwardfor = true;
        b.upstreams[0].read_timeout_ms = Some(crate::value::Millis::constant(7000));

        let mut objects = objects_of(&from_scratch(&a));
        let p = plan(&a, &b);
        for op in p
            .ops
            .into_iter()
            .chain(p.live.into_iter().map(Op::ReplaceServer))
        {
            apply_to_objects(&mut objects, op);
        }
        assert_eq!(objects, objects_of(&from_scratch(&b)));
    }

    /// The local settings' changes: timeouts, the connection cap and `option forwardfor` are
    /// fields of v1.2.5's models, so one transaction; `appname_header` rules are not, so any
    /// change of them (removal included) is a full render.
    #[test]
    fn local_settings_ride_a_transaction_and_app_header_rules_a_full_render() {
        let s = crate::model::fixtures::rich_with_settings(ANY);
        let with = build(&s, &settings(), None).unwrap();
        let mut faster = s.clone();
        crate::model::fixtures::proxy_config(&mut faster)
            .insert("local_request_timeout_ms".into(), 300.into());
        let faster = build(&faster, &settings(), Some(&with)).unwrap();
        let p = plan(&with, &faster);
        assert!(!p.needs_full_render(), "{p:#?}");
        assert!(
            matches!(&p.ops[..], [Op::ReplaceBackend(b)] if b.server_timeout_ms == Some(crate::value::Millis::constant(300))),
            "{:#?}",
            p.ops
        );
        let mut capped = s.clone();
        crate::model::fixtures::proxy_config(&mut capped)
            .insert("max_inbound_connections".into(), 1.into());
        let capped = build(&capped, &settings(), Some(&with)).unwrap();
        let p = plan(&with, &capped);
        assert!(!p.needs_full_render(), "{p:#?}");
        assert!(
            matches!(&p.ops[..], [Op::ReplaceFrontend(f)] if f.maxconn.map(crate::value::Limit::get) == Some(1)),
            "{:#?}",
            p.ops
        );
        let mut without = s.clone();
        crate::model::fixtures::proxy_config(&mut without).remove("appname_header");
        let without = build(&without, &settings(), Some(&with)).unwrap();
        for (a, b) in [(&with, &without), (&without, &with)] {
            let p = plan(a, b);
            assert!(
                p.full_render_reason()
                    .is_some_and(|r| r.contains("appname_header")),
                "{p:#?}"
            );
        }
        assert!(plan(&with, &with.clone()).is_empty());
    }

    type Objects = std::collections::BTreeMap<String, String>;

    fn objects_of(ops: &[Op]) -> Objects {
        let mut o = Objects::new();
        for op in ops {
            apply_to_objects(&mut o, op.clone());
        }
        o
    }

    fn apply_to_objects(o: &mut Objects, op: Op) {
        match op {
            Op::CreateBackend(b) | Op::ReplaceBackend(b) => {
                o.insert(format!("backend/{}", b.name), format!("{b:?}"));
            }
            Op::CreateFrontend(f) | Op::ReplaceFrontend(f) => {
                o.insert(format!("frontend/{}", f.name), format!("{f:?}"));
            }
            Op::CreateBind(b) | Op::ReplaceBind(b) => {
                o.insert(
                    format!("frontend/{}/bind/{}", b.frontend, b.name),
                    format!("{b:?}"),
                );
            }
            Op::CreateServer(s) | Op::ReplaceServer(s) => {
                o.insert(
                    format!("backend/{}/server/{}", s.backend, s.name),
                    format!("{s:?}"),
                );
            }
            Op::DeleteServer { backend, name } => {
                o.remove(&format!("backend/{backend}/server/{name}"));
            }
            Op::DeleteFrontend(n) => remove_section(o, &format!("frontend/{n}")),
            Op::DeleteBackend(n) => remove_section(o, &format!("backend/{n}")),
        }
    }

    fn remove_section(o: &mut Objects, key: &str) {
        let children = format!("{key}/");
        o.retain(|k, _| k != key && !k.starts_with(&children));
    }
}
