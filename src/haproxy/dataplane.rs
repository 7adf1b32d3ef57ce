//! The Dataplane API client (the `/v1` API of dataplaneapi v1.2.5, the version the Go module
//! proxy serves here). Every change goes through one transaction that is either committed or
//! deleted: a failed change leaves no transaction behind and HAProxy on its last good state.

use std::path::Path;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::diff::{BackendSpec, BindSpec, FrontendSpec, Op, ServerSpec};
use crate::error::{Context, Error, Result};
use crate::http::encode;
use crate::http::{self, Credential, Endpoint, TlsFiles};
use crate::objects::mode;
use crate::render::DataplaneCredentials;

const BASE: &str = "/v1/services/haproxy";
const TIMEOUT: Duration = Duration::from_secs(30);

pub struct Dataplane {
    http: http::Client,
}

/// How a committed transaction ended.
#[derive(Debug, PartialEq, Eq)]
pub enum Committed {
    /// HAProxy reloaded with the new configuration (reload id).
    Reloaded(String),
    /// Committed without a reload.
    Applied,
}

impl Dataplane {
    pub fn new(socket: &Path, creds: &DataplaneCredentials) -> Result<Dataplane> {
        let http = http::Client::new(
            Endpoint::Unix {
                path: socket.to_path_buf(),
            },
            &TlsFiles::default(),
            Credential::Basic {
                user: creds.user.clone(),
                password: creds.password.clone(),
            },
        )?;
        Ok(Dataplane { http })
    }

    fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<&Value>,
    ) -> Result<(u16, Value, Option<String>)> {
        // The API wants a JSON content type on every write, even a bodiless one.
        let body = match body {
            Some(v) => Some(v.to_string()),
            None if method != "GET" && method != "DELETE" => Some(String::new()),
            None => None,
        };
        let resp = self
            .http
            .send(method, path, body.as_deref(), TIMEOUT)
            .with_context(|| format!("calling the Dataplane API: {method} {path}"))?;
        let value = if resp.body.trim().is_empty() {
            Value::Null
        } else {
            serde_json::from_str(&resp.body).unwrap_or(Value::String(resp.body.clone()))
        };
        if !resp.is_success() {
            let message = value
                .get("message")
                .and_then(Value::as_str)
                .map(str::to_string)
                .unwrap_or_else(|| resp.body.trim().to_string());
            return Err(Error::msg(format!(
                "the Dataplane API refused {method} {path} with status {}: {message}",
                resp.status
            )));
        }
        Ok((
            resp.status,
            value,
            resp.header("Reload-ID").map(str::to_string),
        ))
    }

    /// The configuration version; also serves as the readiness probe.
    pub fn version(&self) -> Result<u64> {
        let (_, v, _) = self.call("GET", &format!("{BASE}/configuration/frontends"), None)?;
        v.get("_version")
            .and_then(Value::as_u64)
            .ok_or_else(|| Error::msg("the Dataplane API's answer carries no _version"))
    }

    /// Applies `ops` in one transaction. On any error the transaction is deleted.
    pub fn apply(&self, ops: &[Op]) -> Result<Committed> {
        let version = self
            .version()
            .context("reading the configuration version")?;
        let (_, tx, _) = self
            .call(
                "POST",
                &format!("{BASE}/transactions?version={version}"),
                None,
            )
            .context("opening a transaction")?;
        let id = tx
            .get("id")
            .and_then(Value::as_str)
            .ok_or_else(|| Error::msg("the Dataplane API opened a transaction without an id"))?
            .to_string();
        let result = self.fill_and_commit(&id, ops);
        if result.is_err() {
            // A transaction left open would count against the API's limit and confuse the next
            // change; it is deleted whatever went wrong. It may already be gone after a failed
            // commit, hence the ignored result.
            let _ = self.call(
                "DELETE",
                &format!("{BASE}/transactions/{}", encode(&id)),
                None,
            );
        }
        result
    }

    fn fill_and_commit(&self, id: &str, ops: &[Op]) -> Result<Committed> {
        for op in ops {
            let (method, path, body) = request(op, id);
            self.call(method, &path, body.as_ref())
                .with_context(|| format!("applying {}", describe(op)))?;
        }
        let (status, _, reload) = self
            .call("PUT", &format!("{BASE}/transactions/{}", encode(id)), None)
            .context("committing the transaction")?;
        match reload {
            Some(reload_id) => {
                self.wait_reload(&reload_id)?;
                Ok(Committed::Reloaded(reload_id))
            }
            None if status == 202 => Ok(Committed::Reloaded(String::new())),
            None => Ok(Committed::Applied),
        }
    }

    /// Waits for the API's reload to succeed; our reload command tells it HAProxy's verdict.
    fn wait_reload(&self, id: &str) -> Result<()> {
        let deadline = Instant::now() + TIMEOUT;
        loop {
            let (_, r, _) = self.call("GET", &format!("{BASE}/reloads/{}", encode(id)), None)?;
            match r.get("status").and_then(Value::as_str) {
                Some("succeeded") => return Ok(()),
                Some("failed") => {
                    return Err(Error::msg(format!(
                        "HAProxy failed to reload (reload {id}): {}",
                        r.get("response")
                            .and_then(Value::as_str)
                            .unwrap_or("no detail")
                    )))
                }
                _ if Instant::now() >= deadline => {
                    return Err(Error::msg(format!("reload {id} did not finish in time")))
                }
                _ => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    /// Replaces one server outside any transaction, which the API applies through HAProxy's
    /// runtime API when only address, port, weight or maintenance change. Returns whether the
    /// API had to schedule a reload instead.
    pub fn replace_server_live(&self, s: &ServerSpec) -> Result<bool> {
        let version = self
            .version()
            .context("reading the configuration version")?;
        let path = format!(
            "{BASE}/configuration/servers/{}?backend={}&version={version}",
            encode(&s.name),
            encode(&s.backend)
        );
        let (status, _, _) = self
            .call("PUT", &path, Some(&server(s)))
            .with_context(|| format!("replacing server {}/{} live", s.backend, s.name))?;
        Ok(status == 202)
    }

    /// Replaces the whole configuration in one validated step, with a reload: the full
    /// reconcile an operator asks for with SIGHUP, never used for Consul's changes.
    pub fn replace_raw(&self, cfg: &str) -> Result<Committed> {
        let version = self
            .version()
            .context("reading the configuration version")?;
        let path = format!("{BASE}/configuration/raw?version={version}");
        let resp = self
            .http
            .send_typed("POST", &path, Some((cfg, "text/plain")), TIMEOUT)
            .with_context(|| format!("calling the Dataplane API: POST {path}"))?;
        if !resp.is_success() {
            return Err(Error::msg(format!(
                "the Dataplane API refused the full configuration with status {}: {}",
                resp.status,
                resp.body.trim()
            )));
        }
        match resp.header("Reload-ID") {
            Some(id) => {
                let id = id.to_string();
                self.wait_reload(&id)?;
                Ok(Committed::Reloaded(id))
            }
            None => Ok(Committed::Applied),
        }
    }
}

fn describe(op: &Op) -> String {
    match op {
        Op::DeleteFrontend(n) => format!("delete frontend {n}"),
        Op::DeleteBackend(n) => format!("delete backend {n}"),
        Op::DeleteServer { backend, name } => format!("delete server {backend}/{name}"),
        Op::CreateBackend(b) => format!("create backend {}", b.name),
        Op::ReplaceBackend(b) => format!("replace backend {}", b.name),
        Op::CreateServer(s) => format!("create server {}/{}", s.backend, s.name),
        Op::ReplaceServer(s) => format!("replace server {}/{}", s.backend, s.name),
        Op::CreateFrontend(f) => format!("create frontend {}", f.name),
        Op::ReplaceFrontend(f) => format!("replace frontend {}", f.name),
        Op::CreateBind(b) => format!("create bind {}/{}", b.frontend, b.name),
        Op::ReplaceBind(b) => format!("replace bind {}/{}", b.frontend, b.name),
    }
}

/// The v1 request for one operation inside transaction `tx`.
fn request(op: &Op, tx: &str) -> (&'static str, String, Option<Value>) {
    let cfg = format!("{BASE}/configuration");
    let tx = format!("transaction_id={}", encode(tx));
    match op {
        Op::DeleteFrontend(n) => (
            "DELETE",
            format!("{cfg}/frontends/{}?{tx}", encode(n)),
            None,
        ),
        Op::DeleteBackend(n) => ("DELETE", format!("{cfg}/backends/{}?{tx}", encode(n)), None),
        Op::DeleteServer { backend, name } => (
            "DELETE",
            format!(
                "{cfg}/servers/{}?backend={}&{tx}",
                encode(name),
                encode(backend)
            ),
            None,
        ),
        Op::CreateBackend(b) => ("POST", format!("{cfg}/backends?{tx}"), Some(backend(b))),
        Op::ReplaceBackend(b) => (
            "PUT",
            format!("{cfg}/backends/{}?{tx}", encode(&b.name)),
            Some(backend(b)),
        ),
        Op::CreateServer(s) => (
            "POST",
            format!("{cfg}/servers?backend={}&{tx}", encode(&s.backend)),
            Some(server(s)),
        ),
        Op::ReplaceServer(s) => (
            "PUT",
            format!(
                "{cfg}/servers/{}?backend={}&{tx}",
                encode(&s.name),
                encode(&s.backend)
            ),
            Some(server(s)),
        ),
        Op::CreateFrontend(f) => ("POST", format!("{cfg}/frontends?{tx}"), Some(frontend(f))),
        Op::ReplaceFrontend(f) => (
            "PUT",
            format!("{cfg}/frontends/{}?{tx}", encode(&f.name)),
            Some(frontend(f)),
        ),
        Op::CreateBind(b) => (
            "POST",
            format!("{cfg}/binds?frontend={}&{tx}", encode(&b.frontend)),
            Some(bind(b)),
        ),
        Op::ReplaceBind(b) => (
            "PUT",
            format!(
                "{cfg}/binds/{}?frontend={}&{tx}",
                encode(&b.name),
                encode(&b.frontend)
            ),
            Some(bind(b)),
        ),
    }
}

fn backend(b: &BackendSpec) -> Value {
    let mut v = json!({
        "name": b.name,
        "mode": mode(b.mode),
        "connect_timeout": b.connect_timeout_ms,
    });
    if let Some(algorithm) = &b.balance {
        v["balance"] = json!({ "algorithm": algorithm });
    }
    if let Some(ms) = b.server_timeout_ms {
        v["server_timeout"] = json!(ms);
    }
    if b.forwardfor {
        v["forwardfor"] = json!({ "enabled": "enabled" });
    }
    v
}

/// The frontend's own fields; its intentions filter and rule are child objects the file holds
/// from the first render on, which a frontend PUT leaves in place.
fn frontend(f: &FrontendSpec) -> Value {
    let mut v =
        json!({ "name": f.name, "mode": mode(f.mode), "default_backend": f.default_backend });
    match (&f.log_format, f.mode) {
        (Some(format), _) => v["log_format"] = json!(format),
        (None, crate::model::Mode::Http) => v["httplog"] = json!(true),
        (None, crate::model::Mode::Tcp) => v["tcplog"] = json!(true),
    }
    if let Some(ms) = f.client_timeout_ms {
        v["client_timeout"] = json!(ms);
    }
    if let Some(n) = f.maxconn {
        v["maxconn"] = json!(n);
    }
    v
}

fn bind(b: &BindSpec) -> Value {
    let mut v = json!({ "name": b.name, "address": b.address });
    if let Some(port) = b.port {
        v["port"] = json!(port);
    }
    if let Some(tls) = &b.tls {
        v["ssl"] = json!(true);
        v["ssl_certificate"] = json!(tls.crt);
        v["ssl_cafile"] = json!(tls.ca_file);
        v["verify"] = json!("required");
    }
    if let Some(alpn) = &b.alpn {
        v["alpn"] = json!(alpn);
    }
    v
}

fn server(s: &ServerSpec) -> Value {
    let mut v = json!({ "name": s.name, "address": s.address, "port": s.port });
    if s.maintenance {
        v["maintenance"] = json!("enabled");
    }
    if let Some(w) = s.weight {
        v["weight"] = json!(w);
    }
    if let Some(n) = s.maxconn {
        v["maxconn"] = json!(n);
    }
    if let Some(tls) = &s.tls {
        v["ssl"] = json!("enabled");
        v["ssl_certificate"] = json!(tls.crt);
        v["ssl_cafile"] = json!(tls.ca_file);
        v["verify"] = json!("required");
    }
    if let Some(ms) = s.check_inter_ms {
        // The rest of the check (fall, rise, no TLS) is the defaults' `default-server` line.
        v["check"] = json!("enabled");
        v["inter"] = json!(ms);
    }
    v
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::objects::{local_backend, public_frontend, upstream_backend, upstream_frontend};

    /// The local settings travel in v1.2.5's own fields, as numbers and an enabled flag,
    /// never as raw text; unset, the fields are absent (a PUT then removes them).
    #[test]
    fn local_settings_are_fields_of_the_v1_models() {
        let s = crate::model::fixtures::rich_with_settings(crate::model::fixtures::ANY);
        let d = crate::model::build(&s, &crate::model::fixtures::settings(), None).unwrap();
        let fe = frontend(&public_frontend(&d, d.sidecar()));
        assert_eq!(fe["client_timeout"], json!(9000));
        assert_eq!(fe["maxconn"], json!(64));
        let be = backend(&local_backend(d.sidecar()));
        assert_eq!(be["server_timeout"], json!(700));
        assert_eq!(be["connect_timeout"], json!(2000));
        assert_eq!(be["forwardfor"], json!({ "enabled": "enabled" }));
        let u = &d.upstreams[0];
        assert_eq!(
            frontend(&upstream_frontend(&d, u))["client_timeout"],
            json!(7000)
        );
        assert_eq!(
            backend(&upstream_backend(&d, u))["server_timeout"],
            json!(7000)
        );
        let plain = crate::model::fixtures::client_desired();
        let fe = frontend(&public_frontend(&plain, plain.sidecar()));
        let be = backend(&local_backend(plain.sidecar()));
        for (v, k) in [
            (&fe, "client_timeout"),
            (&fe, "maxconn"),
            (&be, "server_timeout"),
            (&be, "forwardfor"),
        ] {
            assert!(v.get(k).is_none(), "{k} in {v}");
        }
    }
}
