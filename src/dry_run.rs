//! `--dry-run`: the configuration the sidecar would write now, from one-shot reads of the same
//! watches a run follows (`Snapshot::watches`), read until the answers want nothing new.
//! Nothing is started or written.

use std::collections::BTreeSet;

use crate::cli::Options;

use crate::consul::client::{Consul, LogoutOnDrop, LookupError};
use crate::consul::kinds::{read_once, Role, Watch};
use crate::consul::Update;
use crate::error::{usage, Error, Fatal};
use crate::model::{self, Desired, Paths};
use crate::render::{self, DataplaneCredentials};
use crate::snapshot::Snapshot;

/// The files a run would write, in write order.
pub fn dry_run(opts: &Options) -> Result<Vec<render::File>, Fatal> {
    let gateway = match &opts.target {
        crate::config::Target::MeshGateway(g) => Some(g.clone()),
        _ => None,
    };
    let consul = Consul::new(&opts.consul).map_err(usage)?;
    // A login's token is destroyed however the dry run ends.
    let _logout = LogoutOnDrop(consul.clone());
    let templates = render::Templates::chosen(opts.template_dir.as_deref()).map_err(usage)?;
    let proxy_id = match consul.find_proxy(&opts.target) {
        Ok(id) => id,
        Err(LookupError::Consul(e)) => return Err(e.into()),
        Err(e) => return Err(usage(Error::msg(e.to_string()))),
    };
    let mut snapshot = Snapshot {
        agentless: consul.source().is_agentless(),
        ..Snapshot::default()
    };
    // A gateway registers nothing here: a dry run of `-register` needs the gateway
    // registered already.
    let role = Role {
        proxy_id: proxy_id.clone(),
        gateway: gateway.is_some(),
        agentless: consul.source().is_agentless(),
        // Only what the output shows: a run reads the intentions even when not enforcing, to
        // warn of a deny it ignores, which a dry run has no use for.
        intentions: opts.enable_intentions && gateway.is_none(),
    };
    read_all(&consul, &role, &mut snapshot)?;
    let workdir = opts
        .base_path
        .join(format!("hcc-{}-dry-run", crate::names::sanitize(&proxy_id)));
    let settings = model::Settings {
        paths: Paths::new(&workdir),
        intentions: opts.enable_intentions,
        knobs: opts.knobs.clone(),
        haproxy: crate::supervisor::preflight::haproxy_version(&opts.haproxy_bin)?,
        identity_check: opts.identity_recheck.is_some() && gateway.is_none(),
        gateway,
    };
    let mut desired: Desired = model::build(&snapshot, &settings, None)?;
    // What a run admits at start: each endpoint checked once, as the run's first render waits
    // for (an endpoint whose check cannot complete is printed in maintenance).
    let wanted = desired.identity_checks();
    if !wanted.endpoints.is_empty() {
        snapshot.admit(crate::admission::checker::check_once(&wanted)?);
        desired = model::build(&snapshot, &settings, None)?;
    }
    for w in &desired.warnings {
        log::warn!("{w}");
    }
    if settings.intentions {
        // What the running agent's first complete table would give HAProxy.
        desired.intentions_map = crate::intentions::table(&snapshot).fast_map();
    }
    Ok(render::render(
        &desired,
        &DataplaneCredentials::from_secret(&crate::random::bytes()?),
        &templates,
    )?)
}

/// Reads every watch the snapshot wants, once, until the answers want nothing new: what a
/// run's watchers would have read by the time it first renders.
fn read_all(consul: &Consul, role: &Role, snapshot: &mut Snapshot) -> crate::error::Result<()> {
    let mut read = BTreeSet::new();
    loop {
        let new: Vec<_> = snapshot.watches(role).difference(&read).cloned().collect();
        if new.is_empty() {
            return Ok(());
        }
        for watch in new {
            let answer = match read_once(consul, &watch) {
                // What a run does not wait for, nor an earlier dry run read strictly: the
                // mesh entry (a token may not read it) and the agent's address (exposed
                // checks' listeners then admit loopback and the sidecar's own addresses).
                Err(e) if matches!(watch, Watch::Mesh | Watch::AgentAddress) => {
                    log::warn!("{e}; going on without it");
                    match watch {
                        Watch::Mesh => Some(Update::Mesh(Vec::new())),
                        _ => None,
                    }
                }
                other => other?,
            };
            match answer {
                Some(Update::RegistrationGone) => {
                    return Err(Error::msg(format!(
                        "the proxy {:?} was deregistered",
                        role.proxy_id
                    )))
                }
                Some(update) => {
                    snapshot.apply(update);
                }
                None => {}
            }
            read.insert(watch);
        }
    }
}

/// A file as `--dry-run` prints it: private keys and the Dataplane API password replaced by a
/// line that says where the real value would be written, since dry-run output gets pasted into
/// tickets and chats.
pub fn redacted(file: &render::File) -> String {
    let mut out = String::with_capacity(file.contents.len());
    let mut in_key = false;
    for line in file.contents.lines() {
        if line.starts_with("-----BEGIN") && line.contains("PRIVATE KEY-----") {
            in_key = true;
            out.push_str(&format!(
                "# (private key redacted: a run writes it to {}; -dry-run-show-secrets prints it)\n",
                file.path.display()
            ));
            continue;
        }
        if in_key {
            in_key = !(line.starts_with("-----END") && line.contains("PRIVATE KEY-----"));
            continue;
        }
        match line.split_once(" insecure-password ") {
            Some((user, _)) => out.push_str(&format!(
                "{user} insecure-password <redacted: generated at each start>\n"
            )),
            None => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_and_passwords_are_redacted_and_the_rest_kept() {
        let file = render::File {
            path: "/run/x/certs/leaf.pem".into(),
            contents: "-----BEGIN CERTIFICATE-----\nQUJD\n-----END CERTIFICATE-----\n-----BEGIN EC PRIVATE KEY-----\nc2VjcmV0\n-----END EC PRIVATE KEY-----\n".into(),
        };
        let r = redacted(&file);
        assert!(r.contains("QUJD") && r.contains("END CERTIFICATE"), "{r}");
        assert!(
            !r.contains("c2VjcmV0") && !r.contains("BEGIN EC PRIVATE KEY"),
            "{r}"
        );
        assert!(
            r.contains("a run writes it to /run/x/certs/leaf.pem"),
            "{r}"
        );
        let cfg = render::File {
            path: "/run/x/haproxy.cfg".into(),
            contents: "userlist u\n    user hcc insecure-password 0123abcd\nglobal\n".into(),
        };
        let r = redacted(&cfg);
        assert!(
            !r.contains("0123abcd") && r.contains("user hcc insecure-password <redacted"),
            "{r}"
        );
        assert!(r.ends_with("global\n"), "{r}");
    }
}
