//! `Desired` → file contents, through the Tera templates in templates/. It decides nothing
//! (names and defaults come from `model`) and writes nothing (`supervisor` and `apply` do).
//! Rendering is a function of `Desired`, the loaded templates and the credentials it is given;
//! the only I/O here is loading the templates (`Templates::load`).

use std::path::PathBuf;

use tera::{Context, Tera};

use crate::error::{Error, Result};
use crate::model::Desired;

mod view;
use view::{DesiredView, View};

/// Names of the fixed HAProxy objects; the upstream ones come from `model`.
pub use crate::objects::{SPOE_BACKEND, SPOE_SERVER};
pub const DATAPLANE_USERLIST: &str = "dataplaneapi";

const HAPROXY_CFG: &str = include_str!("../templates/haproxy.cfg.tera");
const SPOE_CONF: &str = include_str!("../templates/spoe.conf.tera");

/// The templates in use: the built-in ones, or those an operator's `-template-dir` overrides.
#[derive(Clone, Debug)]
pub struct Templates {
    haproxy_cfg: String,
    spoe_conf: String,
    /// Which files came from the override directory.
    pub overridden: Vec<PathBuf>,
}

impl Templates {
    pub fn builtin() -> Templates {
        Templates {
            haproxy_cfg: HAPROXY_CFG.to_string(),
            spoe_conf: SPOE_CONF.to_string(),
            overridden: Vec::new(),
        }
    }

    /// Takes `haproxy.cfg.tera` and `spoe.conf.tera` from `dir` where present, built-in ones
    /// otherwise, and checks that they compile.
    pub fn load(dir: &std::path::Path) -> Result<Templates> {
        if !dir.is_dir() {
            return Err(Error::msg(format!(
                "-template-dir {} is not a directory",
                dir.display()
            )));
        }
        let mut t = Templates::builtin();
        for (name, slot) in [
            ("haproxy.cfg.tera", &mut t.haproxy_cfg),
            ("spoe.conf.tera", &mut t.spoe_conf),
        ] {
            let path = dir.join(name);
            if path.exists() {
                *slot = std::fs::read_to_string(&path).map_err(|e| {
                    Error::with_source(format!("reading the template {}", path.display()), e)
                })?;
                t.overridden.push(path);
            }
        }
        if t.overridden.is_empty() {
            return Err(Error::msg(format!(
                "-template-dir {} holds neither haproxy.cfg.tera nor spoe.conf.tera",
                dir.display()
            )));
        }
        t.engine()?;
        Ok(t)
    }

    /// The built-in templates, or those of an operator's `-template-dir`.
    pub fn chosen(dir: Option<&std::path::Path>) -> Result<Templates> {
        let Some(dir) = dir else {
            return Ok(Templates::builtin());
        };
        let t = Templates::load(dir)?;
        log::info!("templates overridden by {}", t.overridden_list());
        Ok(t)
    }

    /// The overriding files, comma-separated, for messages.
    pub fn overridden_list(&self) -> String {
        self.overridden
            .iter()
            .map(|p| p.display().to_string())
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn engine(&self) -> Result<Tera> {
        let mut tera = Tera::default();
        tera.add_raw_templates([
            ("haproxy.cfg", self.haproxy_cfg.as_str()),
            ("spoe.conf", self.spoe_conf.as_str()),
        ])
        .map_err(|e| {
            let which = if self.overridden.is_empty() {
                "the built-in templates".to_string()
            } else {
                format!("the templates ({})", self.overridden_list())
            };
            Error::msg(format!("loading {which}: {}", tera_error(&e)))
        })?;
        Ok(tera)
    }
}

/// The Dataplane API account, generated per run; it lives only in the 0600 haproxy.cfg.
#[derive(Clone)]
pub struct DataplaneCredentials {
    pub user: String,
    pub password: crate::config::Secret,
}

impl DataplaneCredentials {
    /// The account whose password is `secret` in hex; the caller draws it (`random::bytes`).
    pub fn from_secret(secret: &[u8; 24]) -> DataplaneCredentials {
        let password = secret
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect::<String>();
        DataplaneCredentials {
            user: "hcc".into(),
            password: crate::config::Secret::new(password),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct File {
    pub path: PathBuf,
    pub contents: String,
}

/// Every file one sidecar writes, in the order they must be written: certificates before the
/// configuration that names them, and roots before the leaf they vouch for.
pub fn render(
    d: &Desired,
    creds: &DataplaneCredentials,
    templates: &Templates,
) -> Result<Vec<File>> {
    let tera = templates.engine()?;
    let view = View {
        d: DesiredView::of(d),
        version: env!("CARGO_PKG_VERSION"),
        hard_stop_after: format!("{}ms", d.knobs.grace_period.as_millis()),
        check_defaults: crate::objects::CHECK_DEFAULTS,
        sections: crate::objects::sections(d),
        spoe_backend: SPOE_BACKEND,
        spoe_server: SPOE_SERVER,
        dataplane_userlist: DATAPLANE_USERLIST,
        dataplane_user: &creds.user,
        dataplane_password: creds.password.expose(),
    };
    let ctx = Context::from_serialize(&view).map_err(|e| {
        Error::msg(format!(
            "preparing the template context: {}",
            tera_error(&e)
        ))
    })?;
    let render = |name: &str| {
        tera.render(name, &ctx)
            .map(|mut s| {
                if !s.ends_with('\n') {
                    s.push('\n');
                }
                s
            })
            .map_err(|e| Error::msg(format!("rendering {name}: {}", tera_error(&e))))
    };
    let mut files = vec![
        File {
            path: d.paths.roots.clone(),
            contents: d.tls.own_roots_pem.clone(),
        },
        File {
            path: d.paths.public_roots.clone(),
            contents: d.tls.roots_pem.clone(),
        },
        File {
            path: d.paths.leaf.clone(),
            contents: d.tls.leaf_pem.clone(),
        },
    ];
    if d.intentions {
        files.push(File {
            path: d.paths.spoe_conf.clone(),
            contents: render("spoe.conf")?,
        });
        // Written even when empty: the public frontend names it, and HAProxy refuses to load a
        // configuration whose map file is missing.
        files.push(File {
            path: d.paths.intentions_map.clone(),
            contents: intentions_map(&d.intentions_map),
        });
    }
    if let Some(g) = &d.gateway {
        // Written even when empty: the gateway's listeners name it.
        files.push(File {
            path: d.paths.gateway_map.clone(),
            contents: gateway_map(&g.map_entries()),
        });
    }
    if let Some(o) = &d.transparent {
        // Written even when empty: the outbound listener names each.
        for m in o.maps(&d.paths) {
            files.push(File {
                contents: transparent_map(o, &m),
                path: m.path,
            });
        }
    }
    let splits = crate::objects::split_thresholds(d);
    if !splits.is_empty() {
        files.push(File {
            path: d.paths.splits_map.clone(),
            contents: splits_map(&splits),
        });
    }
    files.push(File {
        path: d.paths.haproxy_cfg.clone(),
        contents: render("haproxy.cfg")?,
    });
    Ok(files)
}

/// The splits map's contents: one `key threshold` line per split.
pub fn splits_map(splits: &[(String, u32)]) -> String {
    splits.iter().map(|(k, v)| format!("{k} {v}\n")).collect()
}

/// The intentions fast map's contents: one `regex value` line per entry, in lookup order
/// (HAProxy's `map_reg` takes the first that matches). The regexes hold no space or backslash
/// (`spoe::authz::l7::FastPattern`).
pub fn intentions_map(entries: &[(String, String)]) -> String {
    entries.iter().map(|(k, v)| format!("{k} {v}\n")).collect()
}

/// A mesh gateway's SNI map: one `sni backend` line per entry. Both sides are typed (`Sni`
/// and a sanitized backend name): no space, no line break.
pub fn gateway_map(entries: &[(crate::model::gateway::Sni, String)]) -> String {
    entries.iter().map(|(k, v)| format!("{k} {v}\n")).collect()
}

/// One of the outbound listener's maps: one `key backend` line per route, under a comment
/// naming the service and what a destination outside the mesh gets: `--dry-run`'s outbound
/// routing table. Keys are typed values or made of them (an IP address, a Consul name).
pub fn transparent_map(
    o: &crate::model::transparent::Outbound,
    m: &crate::model::transparent::OutboundMap,
) -> String {
    let mut out = crate::value::comment(&format!(
        "# outbound routes of {}:{} by {}; any other destination is {}",
        o.bind_address,
        o.port,
        m.by,
        if o.mesh_only {
            "refused (MeshDestinationsOnly)"
        } else {
            "passed through"
        }
    ));
    out.push('\n');
    for (service, key, backend) in &m.entries {
        out.push_str(&crate::value::comment(&format!("# service {service}")));
        out.push('\n');
        out.push_str(&format!("{key} {backend}\n"));
    }
    out
}

/// Tera hides the useful part of an error in its source chain.
fn tera_error(e: &tera::Error) -> String {
    let mut msg = e.to_string();
    let mut next = std::error::Error::source(e);
    while let Some(cause) = next {
        msg.push_str(": ");
        msg.push_str(&cause.to_string());
        next = cause.source();
    }
    msg
}

#[cfg(test)]
mod tests;
