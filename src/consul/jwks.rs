//! Remote JWKS of the `jwt-provider` entries (`JSONWebKeySet.Remote`), fetched on the watch
//! side: one thread per URI fetches the key set at once, then every `CacheDuration` (Envoy's
//! 10 minutes by default), retrying a failed fetch `RetryPolicy.NumRetries` times with
//! jittered exponential backoff (`RetryPolicyBackOff`, Envoy's 1 s to 10 s). A fetched set
//! that differs from the last is sent as `Update::RemoteJwks`; a failed round keeps the last
//! good one (nothing is sent) and is tried again after the backoff's largest pause, at most
//! `CacheDuration`. The SPOE agent never touches the network: it verifies with what the
//! snapshot holds, and denies what needs a set not fetched yet.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::watch::{Sink, WatchHandle};
use super::Update;
use crate::config::{Endpoint, TlsFiles};
use crate::error::{Error, Result};
use crate::http::{Client, Credential};

/// Envoy's defaults, which Consul leaves in place.
const DEFAULT_CACHE: Duration = Duration::from_secs(600);
const DEFAULT_TIMEOUT: Duration = Duration::from_secs(1);
const DEFAULT_BASE: Duration = Duration::from_secs(1);
/// The longest key set accepted (bytes), as for a local one.
const MAX_JWKS: usize = 256 * 1024;
/// The shortest `CacheDuration` honoured, so a typo cannot make a fetch loop.
const MIN_CACHE: Duration = Duration::from_millis(500);

/// How one remote JWKS is fetched.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Remote {
    pub uri: String,
    /// `scheme://authority` of `uri`, and its path with the query.
    endpoint: String,
    path: String,
    timeout: Duration,
    cache: Duration,
    retries: u32,
    base: Duration,
    max: Duration,
    /// `JWKSCluster.TLSCertificates.TrustedCA.Filename`, for an https URI.
    ca_file: Option<PathBuf>,
}

/// Every remote JWKS the entries name, or why one cannot be fetched (URI, reason): then its
/// provider verifies nothing and the requests that need it are denied.
/// A URI that cannot be fetched comes with why, as text: it is compared to log a change once.
pub fn remotes(entries: &[Value]) -> Vec<std::result::Result<Remote, (String, String)>> {
    entries
        .iter()
        .filter_map(|e| e.pointer("/JSONWebKeySet/Remote").filter(|r| !r.is_null()))
        .filter_map(|r| {
            let uri = r.get("URI").and_then(Value::as_str)?.to_string();
            Some(remote(r, &uri).map_err(|why| (uri, why.to_string())))
        })
        .collect()
}

fn remote(r: &Value, uri: &str) -> Result<Remote> {
    let (endpoint, path) = split_uri(uri)?;
    let duration = |v: Option<&Value>, what: &str| -> Result<Option<Duration>> {
        match v {
            None | Some(Value::Null) => Ok(None),
            // Consul prints a Go duration as nanoseconds; a written entry may hold "5m".
            Some(Value::Number(n)) => match n.as_u64() {
                Some(0) => Ok(None),
                Some(ns) => Ok(Some(Duration::from_nanos(ns))),
                None => Err(Error::msg(format!("{what} {n} is not a duration"))),
            },
            Some(Value::String(s)) => crate::value::go_duration_ms(s)
                .map(|ms| (ms > 0).then(|| Duration::from_millis(ms)))
                .ok_or_else(|| Error::msg(format!("{what} {s:?} is not a duration"))),
            Some(v) => Err(Error::msg(format!("{what} {v} is not a duration"))),
        }
    };
    let timeout = match r.get("RequestTimeoutMs").and_then(Value::as_u64) {
        None | Some(0) => DEFAULT_TIMEOUT,
        Some(ms) => Duration::from_millis(ms.min(60_000)),
    };
    let cache = duration(r.get("CacheDuration"), "CacheDuration")?
        .unwrap_or(DEFAULT_CACHE)
        .max(MIN_CACHE);
    let policy = r.get("RetryPolicy").filter(|p| !p.is_null());
    let retries = policy
        .and_then(|p| p.get("NumRetries"))
        .and_then(Value::as_u64)
        .unwrap_or(0)
        .min(10) as u32;
    let backoff = policy.and_then(|p| p.get("RetryPolicyBackOff"));
    let base = duration(backoff.and_then(|b| b.get("BaseInterval")), "BaseInterval")?
        .unwrap_or(DEFAULT_BASE);
    let max = duration(backoff.and_then(|b| b.get("MaxInterval")), "MaxInterval")?
        .unwrap_or(base * 10)
        .max(base);
    let trusted = r
        .pointer("/JWKSCluster/TLSCertificates")
        .filter(|t| !t.is_null());
    let ca_file =
        match trusted {
            None => None,
            Some(t) => match t
                .pointer("/TrustedCA/Filename")
                .and_then(Value::as_str)
                .filter(|f| !f.is_empty())
            {
                Some(f) => Some(PathBuf::from(f)),
                None => return Err(Error::msg(
                    "JWKSCluster.TLSCertificates other than TrustedCA.Filename are not supported",
                )),
            },
        };
    Ok(Remote {
        uri: uri.to_string(),
        endpoint,
        path,
        timeout,
        cache,
        retries,
        base,
        max,
        ca_file,
    })
}

/// `http(s)://authority/path?query` → (`http(s)://authority`, `/path?query`).
fn split_uri(uri: &str) -> Result<(String, String)> {
    let rest = uri
        .strip_prefix("https://")
        .or_else(|| uri.strip_prefix("http://"))
        .ok_or_else(|| Error::msg("not an http or https URI"))?;
    let scheme = &uri[..uri.len() - rest.len()];
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    if authority.is_empty() || path.contains(char::is_whitespace) {
        return Err(Error::msg("not a URI this sidecar can fetch"));
    }
    Ok((format!("{scheme}{authority}"), path))
}

/// The fetchers of the remote key sets the entries name, started and stopped with them.
#[derive(Default)]
pub struct Fetchers {
    running: BTreeMap<Remote, WatchHandle>,
    /// Why a URI cannot be fetched, logged once per change.
    refused: Vec<(String, String)>,
}

impl Fetchers {
    pub fn follow(&mut self, entries: &[Value], sink: &Arc<dyn Sink>) {
        let mut wanted = Vec::new();
        let mut refused = Vec::new();
        for r in remotes(entries) {
            match r {
                Ok(r) => wanted.push(r),
                Err(e) => refused.push(e),
            }
        }
        if refused != self.refused {
            for (uri, why) in &refused {
                log::warn!(
                    "the remote JWKS {uri:?} cannot be fetched: {why}; requests that need it are denied"
                );
            }
            self.refused = refused;
        }
        self.running.retain(|r, _| wanted.contains(r));
        for r in wanted {
            if let std::collections::btree_map::Entry::Vacant(slot) = self.running.entry(r) {
                let h = spawn(slot.key().clone(), sink.clone());
                slot.insert(h);
            }
        }
    }
}

fn spawn(r: Remote, sink: Arc<dyn Sink>) -> WatchHandle {
    let stop = Arc::new(AtomicBool::new(false));
    let halt = stop.clone();
    let spawned = std::thread::Builder::new()
        .name("fetch jwks".into())
        .stack_size(256 * 1024)
        .spawn(move || run(&r, sink.as_ref(), &halt));
    if let Err(e) = spawned {
        log::error!("cannot start a JWKS fetcher thread: {e}");
    }
    WatchHandle::new(stop)
}

fn run(r: &Remote, sink: &dyn Sink, stop: &AtomicBool) {
    let tls = TlsFiles {
        ca_cert: r.ca_file.clone(),
        client_cert: None,
        client_key: None,
        verify: true,
    };
    let client = match Endpoint::parse(&r.endpoint)
        .map_err(crate::error::Error::msg)
        .and_then(|e| Client::new(e, &tls, Credential::None))
    {
        Ok(c) => c,
        Err(e) => {
            log::warn!("the remote JWKS {:?} cannot be fetched: {e}", r.uri);
            return;
        }
    };
    let mut last: Option<String> = None;
    let mut last_error = String::new();
    while !stop.load(Ordering::SeqCst) {
        let mut outcome = fetch(&client, r);
        let mut attempt = 0;
        while outcome.is_err() && attempt < r.retries && !stop.load(Ordering::SeqCst) {
            attempt += 1;
            pause(crate::backoff::jittered(r.base, r.max, attempt), stop);
            outcome = fetch(&client, r);
        }
        let next = match outcome {
            Ok(text) => {
                if !last_error.is_empty() {
                    log::info!("the remote JWKS {:?} is fetched again", r.uri);
                    last_error.clear();
                }
                if last.as_ref() != Some(&text) {
                    log::info!("fetched the remote JWKS {:?}", r.uri);
                    last = Some(text.clone());
                    sink.update(Update::RemoteJwks(r.uri.clone(), text));
                }
                r.cache
            }
            Err(e) => {
                let e = e.to_string();
                if e != last_error {
                    log::warn!(
                        "cannot fetch the remote JWKS {:?}: {e}; {}",
                        r.uri,
                        if last.is_some() {
                            "its last key set stays in use"
                        } else {
                            "requests that need it are denied until a fetch succeeds"
                        }
                    );
                    last_error = e;
                }
                r.max.min(r.cache)
            }
        };
        pause(next, stop);
    }
}

/// One GET of the key set: its text, when the answer is a 200 with a JSON object of at most
/// `MAX_JWKS` bytes (the agent's table parses the keys themselves).
fn fetch(client: &Client, r: &Remote) -> Result<String> {
    let answer = client.get(&r.path, r.timeout)?;
    if answer.status != 200 {
        return Err(Error::msg(format!("status {}", answer.status)));
    }
    if answer.body.len() > MAX_JWKS {
        return Err(Error::msg(format!("larger than {MAX_JWKS} bytes")));
    }
    match serde_json::from_str::<Value>(&answer.body) {
        Ok(Value::Object(_)) => Ok(answer.body),
        _ => Err(Error::msg("the answer is not a JSON object")),
    }
}

fn pause(d: Duration, stop: &AtomicBool) {
    let until = Instant::now() + d;
    while !stop.load(Ordering::SeqCst) {
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return;
        }
        std::thread::sleep(left.min(Duration::from_millis(100)));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn one(remote: Value) -> Result<Remote, (String, String)> {
        let e = json!({"Kind": "jwt-provider", "Name": "p", "JSONWebKeySet": {"Remote": remote}});
        remotes(&[
            e,
            json!({"Name": "local", "JSONWebKeySet": {"Local": {"JWKS": "e30="}}}),
        ])
        .pop()
        .unwrap()
    }

    #[test]
    fn settings_and_envoys_defaults() {
        let r = one(json!({"URI": "http://127.0.0.1:8080/jwks?x=1"})).unwrap();
        assert_eq!(
            (r.endpoint.as_str(), r.path.as_str()),
            ("http://127.0.0.1:8080", "/jwks?x=1")
        );
        assert_eq!(
            (r.cache, r.timeout, r.retries),
            (DEFAULT_CACHE, DEFAULT_TIMEOUT, 0)
        );
        assert_eq!((r.base, r.max), (DEFAULT_BASE, DEFAULT_BASE * 10));
        // As Consul prints them (nanoseconds) and as an entry may be written ("2s").
        let r = one(
            json!({"URI": "https://idp.test", "CacheDuration": 2_000_000_000u64,
            "RequestTimeoutMs": 300, "RetryPolicy": {"NumRetries": 3,
            "RetryPolicyBackOff": {"BaseInterval": "200ms", "MaxInterval": "1s"}},
            "JWKSCluster": {"TLSCertificates": {"TrustedCA": {"Filename": "/ca.pem"}}}}),
        )
        .unwrap();
        assert_eq!(r.path, "/");
        assert_eq!(r.cache, Duration::from_secs(2));
        assert_eq!(r.timeout, Duration::from_millis(300));
        assert_eq!(r.retries, 3);
        assert_eq!(
            (r.base, r.max),
            (Duration::from_millis(200), Duration::from_secs(1))
        );
        assert_eq!(r.ca_file, Some(PathBuf::from("/ca.pem")));
    }

    #[test]
    fn what_cannot_be_fetched_says_why() {
        for (remote, why) in [
            (json!({"URI": "ftp://idp/jwks"}), "not an http"),
            (json!({"URI": "http:///jwks"}), "can fetch"),
            (json!({"URI": "http://idp/a b"}), "can fetch"),
            (
                json!({"URI": "http://idp/", "CacheDuration": "soon"}),
                "CacheDuration",
            ),
            (
                json!({"URI": "https://idp/", "JWKSCluster": {"TLSCertificates":
                    {"TrustedCA": {"InlineString": "-----BEGIN"}}}}),
                "TrustedCA.Filename",
            ),
        ] {
            let (uri, e) = one(remote.clone()).unwrap_err();
            assert_eq!(uri, remote["URI"].as_str().unwrap());
            assert!(e.contains(why), "{remote}: {e}");
        }
    }
}
