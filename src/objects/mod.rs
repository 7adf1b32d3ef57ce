//! The HAProxy objects the sidecar manages from Consul's data, each described once from a
//! `Desired`: `index` lists every frontend, bind, backend and server by name, grouped in the
//! units that come and go together, with the parts of them only a full render can write.
//! `sections` renders haproxy.cfg's sections from that index, and `haproxy::diff` compares two
//! indexes to plan Dataplane API operations, so the file and the deltas cannot drift apart.
//! Pure.
//!
//! One job a file: `spec` (the object types and their constructors), `lines` (specs as
//! haproxy.cfg lines), `routing` (the discovery-chain route compiler).

mod lines;
mod routing;
mod spec;
#[cfg(test)]
mod tests;

pub use lines::*;
pub use routing::split_thresholds;
pub use spec::*;

use crate::model::Desired;
use crate::value::comment;

/// A listener: its frontend, its one bind and the comment above its section.
#[derive(Clone, Debug)]
pub struct Listener {
    pub frontend: FrontendSpec,
    pub bind: BindSpec,
    pub comment: Option<String>,
}

/// A backend, its servers and the comment above its section.
#[derive(Clone, Debug)]
pub struct Pool {
    pub backend: BackendSpec,
    pub servers: Vec<ServerSpec>,
    /// The servers are slots (`model::Slot`): the pool is resized by adding and removing
    /// servers, and a slot's other changes (instance, weight, maintenance) go live through
    /// the runtime API. Otherwise a server is part of its unit like the backend is.
    pub slots: bool,
    pub comment: Option<String>,
}

/// How a changed unit is brought up to date by the Dataplane API.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Each changed object is replaced, each new one created, each gone one deleted: objects
    /// that exist for the whole run (the public listener and its local app) or stand alone.
    Replace,
    /// Any change but its slots' deletes and re-creates the whole unit: the objects name
    /// each other (a listener, its backend, its chain targets' backends), and the change is
    /// rare (a protocol, timeout or routing edit).
    Rebuild,
}

/// Objects that come and go together, under one key (`kind/name`).
#[derive(Clone, Debug)]
pub struct Unit {
    pub key: String,
    pub change: Change,
    pub listeners: Vec<Listener>,
    pub pools: Vec<Pool>,
    /// Sections the Dataplane API never sees (transparent mode's outbound listener): their
    /// changes are told by the unit's `rendered_only` parts.
    pub rendered: Vec<Section>,
}

impl Unit {
    fn new(key: String, change: Change) -> Unit {
        Unit {
            key,
            change,
            listeners: Vec::new(),
            pools: Vec::new(),
            rendered: Vec::new(),
        }
    }

    /// Whether the two describe the same objects, slot servers aside.
    pub fn same_but_slots(&self, other: &Unit) -> bool {
        fn listeners(u: &Unit) -> Vec<(&FrontendSpec, &BindSpec)> {
            u.listeners.iter().map(|l| (&l.frontend, &l.bind)).collect()
        }
        type PoolView<'a> = (&'a BackendSpec, bool, Option<&'a [ServerSpec]>);
        fn pools(u: &Unit) -> Vec<PoolView<'_>> {
            u.pools
                .iter()
                .map(|p| (&p.backend, p.slots, (!p.slots).then_some(&p.servers[..])))
                .collect()
        }
        listeners(self) == listeners(other) && pools(self) == pools(other)
    }
}

/// A part of the configuration Dataplane API v1.2.5 cannot describe, so only a full render
/// writes it: when its `value` changes, the plan takes a full render for `reason`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RenderedOnly {
    /// What the part is, unique in an index (`<object>/<part>`).
    pub key: String,
    /// A fingerprint of what the rendered lines depend on.
    pub value: String,
    pub reason: &'static str,
}

/// Every object `d` asks for, in file order.
#[derive(Clone, Debug)]
pub struct Index {
    pub units: Vec<Unit>,
    pub rendered_only: Vec<RenderedOnly>,
}

impl Index {
    pub fn unit(&self, key: &str) -> Option<&Unit> {
        self.units.iter().find(|u| u.key == key)
    }

    pub fn rendered_only(&self, key: &str) -> Option<&RenderedOnly> {
        self.rendered_only.iter().find(|r| r.key == key)
    }
}

/// The reasons, as the log reads them, a rendered-only part's change takes a full render.
pub const APP_HEADER_REASON: &str =
    "the public listener's appname_header rules change, which a Dataplane API frontend replace would keep as they were";
pub const PERMISSIVE_REASON: &str =
    "the public listener's MutualTLSMode changes, and its front listener is rendered only";
pub const XFCC_REASON: &str =
    "the public listener's X-Forwarded-Client-Cert rules change, and they are rendered only";
pub const JWT_HEADERS_REASON: &str =
    "the headers accepted JWTs change are new, and their rules are rendered only";
pub const MESH_TLS_REASON: &str =
    "the mesh entry's TLS versions or ciphers change, which only a reload applies";
pub const PUBLIC_MODE_REASON: &str =
    "the public listener's mode changes, and its rules for either mode are rendered only";
pub const OUTBOUND_REASON: &str =
    "the transparent outbound listener changes, and it is rendered only";

/// The index of `d`: the public listener, a mesh gateway's listeners and routes, each
/// upstream (listener, backend, chain targets' backends), transparent mode's outbound
/// listener, then each exposed path's listener.
pub fn index(d: &Desired) -> Index {
    let mut units = Vec::new();
    let mut rendered_only = Vec::new();
    let mut part = |key: String, value: String, reason| {
        rendered_only.push(RenderedOnly { key, value, reason });
    };
    // Pushed after the mesh TLS part: the first reason found is the one logged.
    let mut mode = None;
    if let Some(p) = &d.public {
        let frontend = public_frontend(d, p);
        if let FrontendKind::Public {
            app_header,
            xfcc,
            plain_socket,
            intentions,
            path_rules,
        } = &frontend.kind
        {
            let at = |what: &str| format!("{PUBLIC_FRONTEND}/{what}");
            part(
                at("permissive"),
                format!("{plain_socket:?}"),
                PERMISSIVE_REASON,
            );
            part(
                at("appname_header"),
                format!("{app_header:?}"),
                APP_HEADER_REASON,
            );
            part(at("xfcc"), format!("{xfcc:?}"), XFCC_REASON);
            part(
                at("jwt_headers"),
                format!("{:?}", intentions.as_ref().map(|i| &i.jwt_headers)),
                JWT_HEADERS_REASON,
            );
            mode = Some((at("mode"), format!("{:?} {path_rules}", frontend.mode)));
        }
        let mut u = Unit::new("public".into(), Change::Replace);
        u.listeners.push(Listener {
            bind: public_bind(d, p),
            frontend,
            comment: None,
        });
        u.pools.push(Pool {
            backend: local_backend(p),
            servers: vec![local_server(p)],
            slots: false,
            comment: None,
        });
        if p.permissive {
            u.rendered = permissive_sections(d, p);
        }
        units.push(u);
    }
    // Binds and servers cannot change their TLS versions or ciphers on a running HAProxy.
    part(
        "mesh/tls".into(),
        format!("{:?}", d.mesh_tls),
        MESH_TLS_REASON,
    );
    if let Some((key, value)) = mode {
        part(key, value, PUBLIC_MODE_REASON);
    }
    if let Some(g) = &d.gateway {
        for l in &g.listeners {
            let mut u = Unit::new(format!("gateway-listener/{}", l.name), Change::Replace);
            u.listeners.push(Listener {
                frontend: gateway_frontend(d, l),
                bind: gateway_bind(l),
                comment: Some(comment(&format!("mesh gateway {}: {}", d.service, l.name))),
            });
            units.push(u);
        }
        for r in &g.routes {
            let snis: Vec<&str> = r.snis.iter().map(|s| s.as_str()).collect();
            let mut u = Unit::new(format!("gateway-route/{}", r.backend), Change::Rebuild);
            u.pools.push(Pool {
                backend: gateway_backend(d, r),
                servers: r.slots.iter().map(|s| gateway_server(r, s)).collect(),
                slots: true,
                comment: Some(comment(&format!(
                    "exported service {} (SNI {})",
                    r.service,
                    snis.join(", ")
                ))),
            });
            units.push(u);
        }
    }
    for up in &d.upstreams {
        let mut u = Unit::new(format!("upstream/{}", up.name), Change::Rebuild);
        // A routed implicit upstream's listener binds a unix socket its hop reaches.
        if !up.implicit || up.socket.is_some() {
            u.listeners.push(Listener {
                frontend: upstream_frontend(d, up),
                bind: upstream_bind(up),
                comment: Some(comment(&format!("upstream: {}", up.destination))),
            });
        }
        u.pools.push(Pool {
            backend: upstream_backend(d, up),
            servers: up.slots.iter().map(|s| upstream_server(d, up, s)).collect(),
            slots: true,
            comment: up
                .implicit
                .then(|| comment(&format!("implicit upstream: {}", up.destination))),
        });
        for t in up.routing.iter().flat_map(|r| r.targets.iter()) {
            u.pools.push(Pool {
                backend: target_backend(up, t),
                servers: t.slots.iter().map(|s| target_server(d, up, t, s)).collect(),
                slots: true,
                comment: Some(comment(&target_comment(t))),
            });
        }
        units.push(u);
    }
    if let Some(o) = &d.transparent {
        // The routes live in the map, which changes live: only what the lines say counts.
        part(
            format!("{OUTBOUND_FRONTEND}/listener"),
            format!("{} {} {:?} {:?}", o.port, o.mesh_only, o.hops, o.dialers),
            OUTBOUND_REASON,
        );
        let mut u = Unit::new(format!("outbound/{OUTBOUND_FRONTEND}"), Change::Replace);
        u.rendered = outbound_sections(d, o);
        units.push(u);
    }
    for e in &d.exposed {
        let mut u = Unit::new(format!("exposed/{}", e.name), Change::Rebuild);
        u.listeners.push(Listener {
            frontend: exposed_frontend(d, e),
            bind: exposed_bind(e),
            comment: Some(comment(&exposed_comment(e))),
        });
        u.pools.push(Pool {
            backend: exposed_backend(e),
            servers: vec![exposed_server(e)],
            slots: false,
            comment: None,
        });
        units.push(u);
    }
    Index {
        units,
        rendered_only,
    }
}

/// The sections `d` asks for, in file order: each unit's listeners, then its backends, then
/// what only a full render writes.
pub fn sections(d: &Desired) -> Vec<Section> {
    let mut out = Vec::new();
    for u in index(d).units {
        for l in u.listeners {
            out.push(Section {
                comment: l.comment,
                header: format!("frontend {}", l.frontend.name),
                lines: l.frontend.lines(&l.bind),
            });
        }
        for p in u.pools {
            out.push(Section {
                comment: p.comment,
                header: format!("backend {}", p.backend.name),
                lines: p.backend.lines(&p.servers),
            });
        }
        out.extend(u.rendered);
    }
    out
}
