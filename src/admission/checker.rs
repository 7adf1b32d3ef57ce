//! The identity checker: one thread that checks every wanted endpoint (`probe::check`) when it
//! first appears, whenever the CA roots change, and again every interval, and reports the
//! verdicts of the endpoints still wanted as a whole table whenever one changed.

use std::collections::BTreeMap;
use std::sync::mpsc::{channel, Receiver, RecvTimeoutError, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use super::probe::{self, Credentials, Outcome};
use super::{Endpoint, Verdict, Verdicts, Wanted};
use crate::error::{Error, Result};
use crate::pki::Roots;

/// How long one check may take, connection and handshake together.
const CHECK_TIMEOUT: Duration = Duration::from_secs(3);
/// A check that could not complete is tried again this soon (or at the interval, if shorter):
/// an endpoint not listening yet should not wait a whole interval once it is.
const RETRY: Duration = Duration::from_secs(2);
/// Checks run this many at a time, so a thousand new endpoints take seconds, not minutes.
const PARALLEL: usize = 8;

/// Where the checker's results go.
pub trait Report: Send + Sync + 'static {
    /// The verdicts of every endpoint still wanted, after one of them changed.
    fn verdicts(&self, verdicts: Verdicts);
    /// One check done: `proven`, `refused` or `inconclusive`.
    fn checked(&self, result: &'static str);
}

pub struct Checker {
    tx: Option<Sender<Wanted>>,
    thread: Option<JoinHandle<()>>,
}

impl Checker {
    /// Starts the thread; each endpoint is checked again every `interval`.
    pub fn start(interval: Duration, report: Arc<dyn Report>) -> Result<Checker> {
        let (tx, rx) = channel();
        let thread = std::thread::Builder::new()
            .name("identity-checker".into())
            .spawn(move || run(&rx, interval, &*report))
            .map_err(|e| Error::with_source("starting the upstream identity checker", e))?;
        Ok(Checker {
            tx: Some(tx),
            thread: Some(thread),
        })
    }

    /// Replaces what is checked; new endpoints (and all of them, when the roots changed) are
    /// checked at once.
    pub fn want(&self, wanted: Wanted) {
        if let Some(tx) = &self.tx {
            let _ = tx.send(wanted);
        }
    }
}

impl Drop for Checker {
    fn drop(&mut self) {
        // Closing the channel ends the thread after the checks under way (a few seconds at
        // most); nothing waits for it, as nothing needs its last verdicts.
        self.tx.take();
        self.thread.take();
    }
}

/// What the thread knows.
#[derive(Default)]
struct State {
    leaf_pem: String,
    roots_pem: String,
    creds: Option<Credentials>,
    roots: Option<Arc<Roots>>,
    due: BTreeMap<Endpoint, Instant>,
    verdicts: Verdicts,
    /// What was last logged of each endpoint, so that a state is logged once, not per check.
    logged: BTreeMap<Endpoint, String>,
}

fn run(rx: &Receiver<Wanted>, interval: Duration, report: &dyn Report) {
    let mut st = State::default();
    loop {
        let now = Instant::now();
        let wait = st
            .due
            .values()
            .min()
            .map_or(Duration::from_secs(3600), |d| {
                d.saturating_duration_since(now)
            });
        let mut changed = match rx.recv_timeout(wait) {
            Ok(mut w) => {
                // Only the newest state matters.
                while let Ok(newer) = rx.try_recv() {
                    w = newer;
                }
                st.follow(w)
            }
            Err(RecvTimeoutError::Timeout) => false,
            Err(RecvTimeoutError::Disconnected) => return,
        };
        changed |= st.check_due(interval, report);
        if changed {
            report.verdicts(st.verdicts.clone());
        }
    }
}

impl State {
    /// Takes a new wanted set; says whether verdicts were dropped.
    fn follow(&mut self, w: Wanted) -> bool {
        let now = Instant::now();
        if w.leaf_pem != self.leaf_pem {
            self.creds = Credentials::from_pem(&w.leaf_pem)
                .map_err(|e| log::error!("cannot check upstream identities: {e}"))
                .ok();
            self.leaf_pem = w.leaf_pem;
        }
        if w.roots_pem != self.roots_pem {
            self.roots = Roots::from_pem(&w.roots_pem)
                .map(Arc::new)
                .map_err(|e| log::error!("cannot check upstream identities: {e}"))
                .ok();
            self.roots_pem = w.roots_pem;
            // A verdict holds for the roots it was reached under; keep it until the new check.
            for d in self.due.values_mut() {
                *d = now;
            }
        }
        let before = self.verdicts.len();
        self.due.retain(|e, _| w.endpoints.contains(e));
        self.verdicts.retain(|e, _| w.endpoints.contains(e));
        self.logged.retain(|e, _| w.endpoints.contains(e));
        for e in &w.endpoints {
            self.due.entry(e.clone()).or_insert(now);
        }
        self.verdicts.len() != before
    }

    /// Checks every endpoint that is due; says whether a verdict changed.
    fn check_due(&mut self, interval: Duration, report: &dyn Report) -> bool {
        let now = Instant::now();
        let due: Vec<Endpoint> = self
            .due
            .iter()
            .filter(|(_, at)| **at <= now)
            .map(|(e, _)| e.clone())
            .collect();
        if due.is_empty() {
            return false;
        }
        let (Some(creds), Some(roots)) = (&self.creds, &self.roots) else {
            // Logged when the leaf or roots were refused; try again with the next ones.
            for e in &due {
                self.due.insert(e.clone(), now + interval);
            }
            return false;
        };
        let outcomes = check_all(&due, creds, roots);
        let mut changed = false;
        let done = Instant::now();
        for (e, outcome) in due.into_iter().zip(outcomes) {
            let (next, result) = match &outcome {
                Outcome::Conclusive(Verdict::Proven { .. }) => (interval, "proven"),
                Outcome::Conclusive(Verdict::Refused { .. }) => (interval, "refused"),
                Outcome::Inconclusive(_) => (interval.min(RETRY), "inconclusive"),
            };
            report.checked(result);
            self.due.insert(e.clone(), done + next);
            self.log_once(&e, &outcome, next);
            if let Outcome::Conclusive(v) = outcome {
                if self.verdicts.get(&e) != Some(&v) {
                    self.verdicts.insert(e, v);
                    changed = true;
                }
            }
        }
        changed
    }

    fn log_once(&mut self, e: &Endpoint, outcome: &Outcome, next: Duration) {
        let state = match outcome {
            Outcome::Conclusive(Verdict::Proven { common_name }) => format!(
                "proven{}",
                common_name
                    .as_deref()
                    .map(|cn| format!(" (CN {cn})"))
                    .unwrap_or_default()
            ),
            Outcome::Conclusive(Verdict::Refused { presented }) => format!("refused {presented}"),
            Outcome::Inconclusive(why) => format!("inconclusive {why}"),
        };
        if self.logged.get(e) == Some(&state) {
            return;
        }
        match outcome {
            Outcome::Conclusive(Verdict::Proven { .. }) => {
                log::info!("upstream endpoint {e} proved its identity")
            }
            Outcome::Conclusive(Verdict::Refused { presented }) => log::warn!(
                "upstream endpoint {e} presented {presented}: it is not the destination and gets no traffic"
            ),
            Outcome::Inconclusive(why) => log::info!(
                "cannot check the identity of upstream endpoint {e} ({why}); it stays as it was, next check in {}s",
                next.as_secs()
            ),
        }
        self.logged.insert(e.clone(), state);
    }
}

/// Checks endpoints `PARALLEL` at a time; outcomes in the order given.
fn check_all(due: &[Endpoint], creds: &Credentials, roots: &Arc<Roots>) -> Vec<Outcome> {
    let mut out = Vec::with_capacity(due.len());
    for chunk in due.chunks(PARALLEL) {
        std::thread::scope(|s| {
            let running: Vec<_> = chunk
                .iter()
                .map(|e| s.spawn(move || probe::check(e, creds, roots, CHECK_TIMEOUT)))
                .collect();
            for r in running {
                out.push(
                    r.join()
                        .unwrap_or_else(|_| Outcome::Inconclusive("the check panicked".into())),
                );
            }
        });
    }
    out
}

/// The endpoints of `wanted` checked once, for `--dry-run`: what a run would admit at start.
pub fn check_once(wanted: &Wanted) -> Result<Verdicts> {
    let creds = Credentials::from_pem(&wanted.leaf_pem)?;
    let roots = Arc::new(
        Roots::from_pem(&wanted.roots_pem)
            .map_err(|e| Error::msg(format!("cannot check upstream identities: {e}")))?,
    );
    let due: Vec<Endpoint> = wanted.endpoints.iter().cloned().collect();
    let outcomes = check_all(&due, &creds, &roots);
    Ok(due
        .into_iter()
        .zip(outcomes)
        .filter_map(|(e, o)| match o {
            Outcome::Conclusive(v) => Some((e, v)),
            Outcome::Inconclusive(_) => None,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::admission::Identity;
    use crate::consul::api::{CaRoots, LeafCert};
    use crate::model::fixtures::{json, CONSUL_VERSIONS};
    use std::net::TcpListener;
    use std::sync::Mutex;

    #[derive(Default)]
    struct Counted(Mutex<Vec<&'static str>>);

    impl Report for Counted {
        fn verdicts(&self, _: Verdicts) {}
        fn checked(&self, result: &'static str) {
            self.0.lock().unwrap().push(result);
        }
    }

    fn endpoint(port: u16) -> Endpoint {
        Endpoint {
            address: "127.0.0.1".into(),
            port,
            identity: Identity::service("server", "dc1"),
        }
    }

    #[test]
    fn a_check_that_cannot_complete_changes_no_verdict() {
        for v in CONSUL_VERSIONS {
            // Fault injection: FakeStalledEndpoint accepts and never answers (a check times
            // out); the other port has nothing listening (refused).
            let fake_stalled_endpoint = TcpListener::bind("127.0.0.1:0").unwrap();
            let stalled = endpoint(fake_stalled_endpoint.local_addr().unwrap().port());
            let closed = {
                let l = TcpListener::bind("127.0.0.1:0").unwrap();
                endpoint(l.local_addr().unwrap().port())
            };
            let leaf: LeafCert = json(v, "ca-leaf-client.json");
            let roots: CaRoots = json(v, "ca-roots.json");
            let mut st = State::default();
            st.follow(Wanted {
                endpoints: [stalled.clone(), closed.clone()].into_iter().collect(),
                leaf_pem: format!("{}{}", leaf.cert_pem, leaf.private_key_pem),
                roots_pem: roots.roots.iter().map(|r| r.root_cert.clone()).collect(),
            });
            assert!(st.creds.is_some() && st.roots.is_some(), "{v}");
            let proven = Verdict::Proven { common_name: None };
            st.verdicts.insert(stalled.clone(), proven.clone());
            st.verdicts.insert(closed.clone(), proven.clone());
            let report = Counted::default();
            let before = Instant::now();
            assert!(!st.check_due(Duration::from_secs(30), &report), "{v}");
            assert_eq!(st.verdicts.get(&stalled), Some(&proven));
            assert_eq!(st.verdicts.get(&closed), Some(&proven));
            assert_eq!(*report.0.lock().unwrap(), ["inconclusive", "inconclusive"]);
            // Retried soon, not a whole interval later.
            for e in [&stalled, &closed] {
                assert!(st.due[e] <= Instant::now() + RETRY, "{v}");
            }
            assert!(
                before.elapsed() >= CHECK_TIMEOUT,
                "the stalled check waited"
            );

            // An endpoint no longer wanted loses its verdict.
            assert!(st.follow(Wanted {
                endpoints: [stalled.clone()].into_iter().collect(),
                leaf_pem: st.leaf_pem.clone(),
                roots_pem: st.roots_pem.clone(),
            }));
            assert_eq!(st.verdicts.len(), 1);

            // New roots: every endpoint is due at once, and keeps its verdict until checked.
            let later = Instant::now() + Duration::from_secs(1);
            st.due
                .insert(stalled.clone(), Instant::now() + Duration::from_secs(600));
            let mut rotated = roots.clone();
            rotated.roots.reverse();
            rotated.roots.push(rotated.roots[0].clone());
            st.follow(Wanted {
                endpoints: [stalled.clone()].into_iter().collect(),
                leaf_pem: st.leaf_pem.clone(),
                roots_pem: rotated.roots.iter().map(|r| r.root_cert.clone()).collect(),
            });
            assert!(
                st.due[&stalled] < later,
                "{v}: re-checked when the roots change"
            );
            assert_eq!(st.verdicts.get(&stalled), Some(&proven));
            drop(fake_stalled_endpoint);
        }
    }
}
