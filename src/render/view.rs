//! What the templates see: a view of `Desired` with the names the built-in templates (and so
//! operators' `-template-dir` copies of them) use, made here field by field, so that renaming
//! or reshaping a model field changes this file, not the operators' templates.

use serde::Serialize;

use crate::model::{Desired, Mode};
use crate::objects::Section;

/// The template context: `d` and the values around it.
#[derive(Serialize)]
pub(super) struct View<'a> {
    pub d: DesiredView<'a>,
    pub version: &'static str,
    pub hard_stop_after: String,
    pub check_defaults: &'static str,
    pub sections: Vec<Section>,
    pub spoe_backend: &'static str,
    pub spoe_server: &'static str,
    pub dataplane_userlist: &'static str,
    pub dataplane_user: &'a str,
    pub dataplane_password: &'a str,
}

/// `d`: what of the process's desired state a template may read.
#[derive(Serialize)]
pub(super) struct DesiredView<'a> {
    pub service: &'a str,
    /// Whether intentions are enforced: the SPOE agent's backend and spoe.conf exist.
    pub intentions: bool,
    /// `mode` of the SPOE agent's backend (`spop` from HAProxy 3.1, `tcp` before).
    pub spoe_backend_mode: &'a str,
    pub paths: PathsView,
    pub knobs: KnobsView<'a>,
    /// A sidecar's public listener; absent for a mesh gateway.
    pub public: Option<PublicView>,
}

/// `d.paths`: the files and sockets the configuration names.
#[derive(Serialize)]
pub(super) struct PathsView {
    pub haproxy_cfg: String,
    pub stats_socket: String,
    pub metrics_socket: String,
    pub spoe_conf: String,
    pub spoe_socket: String,
    pub leaf: String,
    pub roots: String,
    pub splits_map: String,
    pub intentions_map: String,
    pub gateway_map: String,
    pub transparent_map: String,
}

/// `d.knobs`: the operator's settings a template places itself.
#[derive(Serialize)]
pub(super) struct KnobsView<'a> {
    pub haproxy_log_level: &'a str,
    /// Whether HAProxy's access lines (`info`) pass `haproxy_log_level`. When they do not,
    /// the template turns them off at the source (`option dontlog-normal`): HAProxy builds
    /// a stream's line, and calls getpid(2) for it, before its level filter drops it.
    pub access_logs: bool,
    /// `-haproxy-param section.key=value`, in the order given.
    pub haproxy_params: Vec<ParamView<'a>>,
}

#[derive(Serialize)]
pub(super) struct ParamView<'a> {
    pub section: &'a str,
    pub key: &'a str,
    pub value: &'a str,
}

/// `d.public`.
#[derive(Serialize)]
pub(super) struct PublicView {
    /// `tcp` or `http`.
    pub mode: Mode,
}

impl<'a> DesiredView<'a> {
    pub fn of(d: &'a Desired) -> DesiredView<'a> {
        let p = &d.paths;
        let path = |p: &std::path::Path| p.display().to_string();
        DesiredView {
            service: &d.service,
            intentions: d.intentions,
            spoe_backend_mode: d.spoe_backend_mode,
            paths: PathsView {
                haproxy_cfg: path(&p.haproxy_cfg),
                stats_socket: path(&p.stats_socket),
                metrics_socket: path(&p.metrics_socket),
                spoe_conf: path(&p.spoe_conf),
                spoe_socket: path(&p.spoe_socket),
                leaf: path(&p.leaf),
                roots: path(&p.roots),
                splits_map: path(&p.splits_map),
                intentions_map: path(&p.intentions_map),
                gateway_map: path(&p.gateway_map),
                transparent_map: path(&p.transparent_map),
            },
            knobs: KnobsView {
                haproxy_log_level: d.knobs.haproxy_log_level,
                access_logs: crate::config::haproxy_logs_access(d.knobs.haproxy_log_level),
                haproxy_params: d
                    .knobs
                    .haproxy_params
                    .iter()
                    .map(|p| ParamView {
                        section: &p.section,
                        key: &p.key,
                        value: &p.value,
                    })
                    .collect(),
            },
            public: d.public.as_ref().map(|p| PublicView { mode: p.mode }),
        }
    }
}
