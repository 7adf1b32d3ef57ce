//! The sidecar's lifecycle phase: written by the supervisor alone, read by the stats endpoint
//! (`/ready`) and the metrics (`hcc_ready`).

use std::fmt;
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Phase {
    Starting = 0,
    WaitingForConsul = 1,
    Ready = 2,
    Draining = 3,
    Stopped = 4,
}

impl Phase {
    const ALL: [Phase; 5] = [
        Phase::Starting,
        Phase::WaitingForConsul,
        Phase::Ready,
        Phase::Draining,
        Phase::Stopped,
    ];
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Starting => "starting",
            Phase::WaitingForConsul => "waiting for consul",
            Phase::Ready => "ready",
            Phase::Draining => "draining",
            Phase::Stopped => "stopped",
        })
    }
}

/// The current phase, shared between threads; a new cell reads `Starting`.
#[derive(Clone, Default)]
pub struct PhaseCell(Arc<AtomicU8>);

impl PhaseCell {
    pub fn set(&self, phase: Phase) {
        self.0.store(phase as u8, Ordering::SeqCst);
    }

    pub fn get(&self) -> Phase {
        let v = self.0.load(Ordering::SeqCst);
        Phase::ALL
            .into_iter()
            .find(|p| *p as u8 == v)
            .unwrap_or(Phase::Stopped)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_phase_reads_back_as_written() {
        let cell = PhaseCell::default();
        assert_eq!(cell.get(), Phase::Starting);
        for p in Phase::ALL {
            cell.set(p);
            assert_eq!(cell.get(), p);
        }
    }
}
