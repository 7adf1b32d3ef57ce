//! `--dry-run`: the configuration the sidecar would write now, from one-shot reads of the same
//! Consul endpoints the watchers follow. Nothing is started or written.

use crate::cli::Options;
use crate::consul::api::{AgentService, QueryResult};
use crate::consul::client::{
    endpoints_path, leaf_path, registration_path, Consul, LookupError, ROOTS_PATH,
};
use crate::consul::{destinations, DestinationKind, Update};
use crate::error::{usage, Error, Fatal};
use crate::model::{self, Desired, Paths};
use crate::render::{self, DataplaneCredentials};
use crate::snapshot::Snapshot;

/// The files a run would write, in write order.
pub fn dry_run(opts: &Options) -> Result<Vec<render::File>, Fatal> {
    let consul = Consul::new(&opts.consul).map_err(usage)?;
    let templates = render::Templates::chosen(opts.template_dir.as_deref()).map_err(usage)?;
    let proxy_id = match consul.find_proxy(&opts.target) {
        Ok(id) => id,
        Err(LookupError::Consul(e)) => return Err(e.into()),
        Err(e) => return Err(usage(Error::msg(e.to_string()))),
    };
    let mut snapshot = Snapshot::default();
    let reg: AgentService = consul.get_json(&registration_path(&proxy_id))?;
    for key in destinations(&reg) {
        let path = endpoints_path(&key);
        let entries = match key.kind {
            DestinationKind::Service => consul.get_json(&path)?,
            DestinationKind::PreparedQuery => consul.get_json::<QueryResult>(&path)?.nodes,
        };
        snapshot.apply(Update::Endpoints(key, entries));
    }
    let service = reg
        .proxy
        .as_ref()
        .map(|p| p.destination_service_name.clone())
        .unwrap_or_default();
    snapshot.apply(Update::Registration(reg));
    snapshot.apply(Update::Leaf(consul.get_json(&leaf_path(&service))?));
    snapshot.apply(Update::Roots(consul.get_json(ROOTS_PATH)?));
    let workdir = opts
        .base_path
        .join(format!("hcc-{}-dry-run", crate::names::sanitize(&proxy_id)));
    let settings = model::Settings {
        paths: Paths::new(&workdir),
        intentions: opts.enable_intentions,
        knobs: opts.knobs.clone(),
    };
    let desired: Desired = model::build(&snapshot, &settings, None)?;
    Ok(render::render(
        &desired,
        &DataplaneCredentials::generate()?,
        &templates,
    )?)
}
