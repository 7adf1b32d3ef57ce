//! The HAProxy version (read once at start from `haproxy -v`, by `supervisor::preflight`) and
//! what follows from it. Every difference between the HAProxy lines the sidecar supports (2.6,
//! 3.0, 3.2) is decided here, from the version of the binary it runs, never guessed. Pure.

use serde::Serialize;

use crate::error::{Error, Result};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct HaproxyVersion {
    pub major: u32,
    pub minor: u32,
    pub patch: u32,
}

impl HaproxyVersion {
    /// The line a tested-in-CI HAProxy 2.6 gives: what unit tests and fixtures assume.
    pub const V2_6: HaproxyVersion = HaproxyVersion {
        major: 2,
        minor: 6,
        patch: 12,
    };

    /// From `haproxy -v`'s first line, e.g. `HAProxy version 3.2.26-1 2026/…` or
    /// `HA-Proxy version 2.6.12-1+deb12u4 …`.
    pub fn parse(output: &str) -> Result<HaproxyVersion> {
        let word = output
            .lines()
            .find_map(|l| {
                let mut w = l.split_whitespace();
                while let Some(x) = w.next() {
                    if x == "version" {
                        return w.next();
                    }
                }
                None
            })
            .ok_or_else(|| Error::msg(format!("no version in {:?}", first_line(output))))?;
        let digits: Vec<u32> = word
            .split(|c: char| !c.is_ascii_digit())
            .take(3)
            .map(|n| n.parse().unwrap_or(0))
            .collect();
        match digits.as_slice() {
            [major, minor, rest @ ..] if *major > 0 => Ok(HaproxyVersion {
                major: *major,
                minor: *minor,
                patch: rest.first().copied().unwrap_or(0),
            }),
            _ => Err(Error::msg(format!("cannot read the version {word:?}"))),
        }
    }

    fn at_least(&self, major: u32, minor: u32) -> bool {
        (self.major, self.minor) >= (major, minor)
    }

    /// From 3.1 the SPOE engine is a multiplexer whose agents sit behind a `mode spop`
    /// backend; 3.0 and older know no such mode and talk SPOP from a `mode tcp` backend.
    pub fn spoe_backend_mode(&self) -> &'static str {
        if self.at_least(3, 1) {
            "spop"
        } else {
            "tcp"
        }
    }
}

impl std::fmt::Display for HaproxyVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.major, self.minor, self.patch)
    }
}

fn first_line(s: &str) -> &str {
    s.lines().next().unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_what_each_supported_line_prints() {
        for (out, want) in [
            (
                "HAProxy version 2.6.12-1+deb12u4 2026/10/17 - https://haproxy.org/\nStatus: long-term",
                (2, 6, 12),
            ),
            (
                "HAProxy version 3.0.11-1+deb13u4 2026/10/15 - https://haproxy.org/",
                (3, 0, 11),
            ),
            ("HAProxy version 3.2.26-1 2026/11/02 - https://haproxy.org/", (3, 2, 26)),
            ("HA-Proxy version 1.8.19 2019/02/11", (1, 8, 19)),
            ("HAProxy version 3.3-dev4-1 2025/07/01", (3, 3, 0)),
        ] {
            let v = HaproxyVersion::parse(out).unwrap();
            assert_eq!((v.major, v.minor, v.patch), want, "{out}");
        }
        assert!(HaproxyVersion::parse("").is_err());
        assert!(HaproxyVersion::parse("haproxy: command not found").is_err());
    }

    #[test]
    fn the_spoe_backend_is_spop_from_3_1() {
        let v = |s: &str| HaproxyVersion::parse(&format!("HAProxy version {s}")).unwrap();
        assert_eq!(v("2.6.12").spoe_backend_mode(), "tcp");
        assert_eq!(v("3.0.11").spoe_backend_mode(), "tcp");
        assert_eq!(v("3.1.0").spoe_backend_mode(), "spop");
        assert_eq!(v("3.2.26").spoe_backend_mode(), "spop");
    }
}
