//! Intentions as the table holds them: what each does to a matching source, the default
//! policy, and how a source identity is matched (Consul's precedence and wildcard rules).

use super::*;

/// What an intention does to a matching source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    Allow,
    Deny,
    /// An intention with HTTP permissions and no action (Consul 1.9+). On an http listener the
    /// connection is let in and each request judged by the permissions (`decide_request`); on a
    /// tcp listener it denies, as Consul does.
    L7 {
        permissions: usize,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::Allow => f.write_str("allow"),
            Action::Deny => f.write_str("deny"),
            Action::L7 { permissions } => write!(f, "L7 ({permissions} HTTP permission(s))"),
        }
    }
}

/// What a connection that no intention matches gets: Consul's ACL default policy (allow when
/// ACLs are off).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum DefaultPolicy {
    Allow,
    Deny,
    /// A value this sidecar does not know. Connections no intention matches are denied, and
    /// the reason quotes the value, so it is never silently read as deny or allow.
    Unknown(String),
}

impl DefaultPolicy {
    /// Consul's spelling (`allow`, `deny`, any case); anything else is kept as `Unknown`.
    pub fn parse(value: &str) -> DefaultPolicy {
        match value.trim().to_ascii_lowercase().as_str() {
            "allow" => DefaultPolicy::Allow,
            "deny" => DefaultPolicy::Deny,
            _ => DefaultPolicy::Unknown(value.to_string()),
        }
    }

    pub fn allows(&self) -> bool {
        *self == DefaultPolicy::Allow
    }
}

impl fmt::Display for DefaultPolicy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DefaultPolicy::Allow => f.write_str("allow"),
            DefaultPolicy::Deny => f.write_str("deny"),
            DefaultPolicy::Unknown(v) => write!(f, "unknown ({v:?}, so deny)"),
        }
    }
}

/// One intention whose destination is this sidecar's service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intention {
    /// Source service name, or `*` for any. Compared case-sensitively, as Consul does.
    pub source: String,
    /// Source namespace: empty or `default` for the default one, `*` for any.
    pub source_ns: String,
    /// Source admin partition: empty or `default` for the default one, `*` for any.
    pub source_partition: String,
    /// Set when the source is a service of a cluster peer: such a source never matches a
    /// client of this cluster, whatever its name.
    pub source_peer: String,
    pub action: Action,
    /// The HTTP permissions of an `Action::L7` intention, in order; the error says why they
    /// cannot be judged (then every request from this source is denied).
    pub permissions: Result<Vec<l7::Permission>, String>,
    /// Consul's precedence (9 exact→exact … 1 `*`→`*`); higher is evaluated first.
    pub precedence: i64,
    /// The service-intentions entry's top-level `JWT` (Consul 1.16): every request of this
    /// source must carry a token it accepts, before any permission is looked at. Only on an
    /// `Action::L7` intention (an allow that needs a token is judged per request).
    pub jwt: Option<jwt::Requirement>,
}

impl Intention {
    /// A source in the default namespace and partition of this cluster.
    pub fn new(source: impl Into<String>, action: Action, precedence: i64) -> Intention {
        Intention {
            source: source.into(),
            source_ns: String::new(),
            source_partition: String::new(),
            source_peer: String::new(),
            action,
            permissions: Ok(Vec::new()),
            precedence,
            jwt: None,
        }
    }

    /// Whether this intention's source is the client `id`, as Consul's
    /// `AuthorizeIntentionTarget` decides it: peer, partition, namespace, then name.
    pub fn matches(&self, id: &SpiffeId) -> bool {
        self.matches_from(id, None)
    }

    /// Whether this intention's source is `id`, a client of cluster peer `peer` (`None`: of
    /// this cluster). A peer's client matches only intentions naming that peer, by namespace
    /// and name (its partition is the peer's, not one of ours); a local client never matches
    /// an intention naming a peer.
    pub fn matches_from(&self, id: &SpiffeId, peer: Option<&str>) -> bool {
        // On the decision path: compared in place, no allocation.
        fn same_or_any(pattern: &str, value: &str) -> bool {
            fn or_default(s: &str) -> &str {
                if s.is_empty() {
                    "default"
                } else {
                    s
                }
            }
            pattern == "*" || or_default(pattern) == or_default(value)
        }
        if let Some(peer) = peer {
            return self.source_peer == peer
                && same_or_any(&self.source_ns, &id.namespace)
                && (self.source == "*" || self.source == id.service);
        }
        // A client whose certificate chains to our roots belongs to this cluster, never a peer.
        self.source_peer.is_empty()
            && same_or_any(
                &self.source_partition,
                id.partition.as_deref().unwrap_or(""),
            )
            && same_or_any(&self.source_ns, &id.namespace)
            && (self.source == "*" || self.source == id.service)
    }

    /// How the source reads in a log line: `name`, or `ns/name`, `peer:p/name` where not
    /// the default.
    pub fn source_label(&self) -> String {
        let mut s = String::new();
        if !self.source_peer.is_empty() {
            s.push_str(&format!("peer:{}/", self.source_peer));
        }
        if !matches!(self.source_partition.as_str(), "" | "default") {
            s.push_str(&format!("ap:{}/", self.source_partition));
        }
        if !matches!(self.source_ns.as_str(), "" | "default") {
            s.push_str(&format!("{}/", self.source_ns));
        }
        s.push_str(&self.source);
        s
    }
}
