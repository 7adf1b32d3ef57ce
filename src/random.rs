//! The sidecar's randomness: unpredictable values from the kernel (names of working
//! directories, probes) and cheap spread for retry jitter.

use std::fs;

use crate::error::{Context, Result};

/// `N` bytes from `/dev/urandom`: the kernel's randomness, fit for credentials.
pub fn bytes<const N: usize>() -> Result<[u8; N]> {
    let mut b = [0u8; N];
    let mut f = fs::File::open("/dev/urandom").context("opening /dev/urandom")?;
    std::io::Read::read_exact(&mut f, &mut b).context("reading /dev/urandom")?;
    Ok(b)
}

/// Four bytes from `/dev/urandom`.
pub fn random_u32() -> Result<u32> {
    Ok(u32::from_ne_bytes(bytes::<4>()?))
}

/// A fraction in [0, 1) from a per-thread xorshift; jitter needs spread, not cryptography.
pub fn jitter_fraction() -> f64 {
    use std::cell::Cell;
    thread_local! {
        static STATE: Cell<u64> = Cell::new({
            let t = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos() as u64)
                .unwrap_or(0x9E37_79B9_7F4A_7C15);
            (t ^ u64::from(std::process::id()).rotate_left(32)) | 1
        });
    }
    STATE.with(|s| {
        let mut x = s.get();
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        s.set(x);
        (x >> 11) as f64 / (1u64 << 53) as f64
    })
}
