//! Signals as events: a signal-hook thread turns each delivery into a typed message for the
//! event loop, so no logic ever runs in a signal handler.

use std::sync::mpsc::Sender;

use signal_hook::consts::{SIGCHLD, SIGHUP, SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

use crate::error::{Context, Result};

/// The signals the supervisor acts on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Sig {
    /// SIGTERM or SIGINT: drain and stop; a second one stops at once.
    Stop,
    /// SIGHUP: a full reconcile.
    Reconcile,
    /// SIGCHLD: a child (or an adopted orphan) ended.
    ChildExited,
}

impl Sig {
    fn from_raw(n: i32) -> Option<Sig> {
        match n {
            SIGTERM | SIGINT => Some(Sig::Stop),
            SIGHUP => Some(Sig::Reconcile),
            SIGCHLD => Some(Sig::ChildExited),
            _ => None,
        }
    }
}

pub fn forward<E: Send + 'static>(tx: Sender<E>, wrap: fn(Sig) -> E) -> Result<()> {
    let mut signals =
        Signals::new([SIGTERM, SIGINT, SIGHUP, SIGCHLD]).context("installing signal handlers")?;
    std::thread::Builder::new()
        .name("signals".into())
        .stack_size(64 * 1024)
        .spawn(move || {
            for sig in signals.forever().filter_map(Sig::from_raw) {
                if tx.send(wrap(sig)).is_err() {
                    return;
                }
            }
        })
        .context("starting the signal thread")?;
    Ok(())
}
