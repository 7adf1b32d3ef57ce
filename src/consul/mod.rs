//! Everything the sidecar reads from the local Consul agent: the response types (`api`), the
//! client with its proxy lookup (`client`) and the blocking-query watchers (`watch`).
//! This module knows nothing about HAProxy.

pub mod api;
pub mod client;
pub mod watch;

/// One upstream destination as Consul resolves it. Two upstreams that name the same destination
/// in the same datacenter share one watch; the listeners stay apart (see `model`).
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DestinationKey {
    pub kind: DestinationKind,
    pub name: String,
    /// Empty for the agent's own datacenter.
    pub datacenter: String,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum DestinationKind {
    Service,
    PreparedQuery,
}

impl std::fmt::Display for DestinationKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kind = match self.kind {
            DestinationKind::Service => "service",
            DestinationKind::PreparedQuery => "prepared query",
        };
        write!(f, "{kind} {}", self.name)?;
        if !self.datacenter.is_empty() {
            write!(f, " in {}", self.datacenter)?;
        }
        Ok(())
    }
}

/// Percent-encodes one path segment or query value.
pub fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}
