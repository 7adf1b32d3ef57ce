//! `--dry-run`: the configuration the sidecar would write now, from one-shot reads of the same
//! Consul endpoints the watchers follow. Nothing is started or written.

use crate::cli::Options;

use crate::consul::api::{AgentService, QueryResult, ServiceTopology};
use crate::consul::chain::{
    chain_path, parse_chain, serving, target_health_path, targets_to_watch,
};
use crate::consul::client::{
    endpoints_path, leaf_path, topology_path, Consul, LogoutOnDrop, LookupError,
    EXPORTED_SERVICES_PATH, MESH_PATH, ROOTS_PATH,
};
use crate::consul::{
    destinations, exported_destinations, exposed_checks_of, is_transparent, DestinationKey,
    DestinationKind, Update,
};
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
    let source = consul.source();
    let reg: AgentService = match source.parse_registration(
        &proxy_id,
        &consul.get_ok(&source.registration_path(&proxy_id))?,
    )? {
        Update::Registration(reg) => reg,
        _ => return Err(Error::msg(format!("the proxy {proxy_id:?} was deregistered")).into()),
    };
    let service = if gateway.is_some() {
        reg.service.clone()
    } else {
        reg.proxy
            .as_ref()
            .map(|p| p.destination_service_name.clone())
            .unwrap_or_default()
    };
    if is_transparent(&reg) {
        let topology: ServiceTopology = consul.get_json(&topology_path(&service))?;
        snapshot.apply(Update::IntentionUpstreams(topology.allowed()));
    }
    // A gateway's destinations are the services exported (it registers nothing here: a
    // dry run of `-register` needs the gateway registered already).
    let keys = if gateway.is_some() {
        let entries: Vec<crate::consul::api::ExportedServicesEntry> =
            consul.get_json(EXPORTED_SERVICES_PATH)?;
        let keys = exported_destinations(&entries);
        snapshot.apply(Update::ExportedServices(entries));
        keys
    } else {
        destinations(&reg, snapshot.implicit_upstreams())
    };
    for key in keys {
        let path = endpoints_path(&key);
        let entries = match key.kind {
            DestinationKind::Service => consul.get_json(&path)?,
            DestinationKind::PreparedQuery => consul.get_json::<QueryResult>(&path)?.nodes,
        };
        if key.kind == DestinationKind::Service && gateway.is_none() {
            let chain = parse_chain(&consul.get_ok(&chain_path(&key))?)?;
            for target in targets_to_watch(&chain, &key) {
                let entries = consul.get_json(&target_health_path(&target))?;
                snapshot.apply(Update::TargetEndpoints(target, serving(entries)));
            }
            snapshot.apply(Update::Chain(key.clone(), chain));
        }
        snapshot.apply(Update::Endpoints(key, entries));
    }
    if let Some(id) = exposed_checks_of(&reg) {
        snapshot.apply(source.parse_checks(&consul.get_ok(&source.checks_path(&id))?)?);
    }
    if source.is_agentless() && !service.is_empty() {
        let own = DestinationKey {
            kind: DestinationKind::Service,
            name: service.clone(),
            datacenter: String::new(),
        };
        let chain = parse_chain(&consul.get_ok(&chain_path(&own))?)?;
        snapshot.apply(Update::ServiceProtocol(chain.protocol));
    }
    snapshot.apply(Update::Registration(reg));
    snapshot.apply(Update::Leaf(consul.get_json(&leaf_path(&service))?));
    snapshot.apply(Update::Roots(consul.get_json(ROOTS_PATH)?));
    // The mesh entry's TLS settings, as a run reads them; a Consul before 1.10 has no such
    // kind and says so with an error status: none.
    let mesh = consul.get(MESH_PATH, None)?;
    let entries = if mesh.status == 200 {
        crate::consul::api::parse(MESH_PATH, &mesh.body)?
    } else {
        Vec::new()
    };
    snapshot.apply(Update::Mesh(entries));
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
