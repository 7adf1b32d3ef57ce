//! The Consul servers of `-http-addr`, in the order requests try them (pure). An address given
//! as an IP, a unix socket or a name without a port is one server; a DNS name with a port is
//! one server per address it resolves to (as consul-dataplane uses every address of a server
//! set's name), each pinned to its address while the URL, the Host header and TLS keep the name.
//! The client moves to the next server when one fails and asks the resolver again when all
//! have failed (`Consul::exchange`).

use std::fmt;
use std::net::{IpAddr, SocketAddr};

use crate::config::Endpoint;
use crate::error::{Error, Result};

/// One server requests can go to.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Server {
    pub endpoint: Endpoint,
    /// The address a name resolved to; `None`: the endpoint is connected to as it is.
    pub pinned: Option<SocketAddr>,
}

impl fmt::Display for Server {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.pinned {
            Some(addr) => write!(f, "{} ({addr})", self.endpoint),
            None => write!(f, "{}", self.endpoint),
        }
    }
}

/// The `host:port` of an endpoint worth resolving: a DNS name with a port, over TCP.
pub fn name_of(endpoint: &Endpoint) -> Option<&str> {
    let (Endpoint::Http { authority } | Endpoint::Https { authority }) = endpoint else {
        return None;
    };
    let (host, port) = authority.rsplit_once(':')?;
    if port.parse::<u16>().is_err() || host.starts_with('[') || host.parse::<IpAddr>().is_ok() {
        return None;
    }
    Some(authority)
}

/// The servers of `endpoints`, in order: each name's addresses as `resolve` gives them (each
/// once); a name that does not resolve stays one unpinned server, so that its requests fail
/// with the resolver's own words and a later resolution can find it. Also one line per name
/// for the log: what it resolved to, or why not.
pub fn expand<R>(endpoints: &[Endpoint], resolve: R) -> (Vec<Server>, Vec<String>)
where
    R: Fn(&str) -> Result<Vec<SocketAddr>>,
{
    let mut servers = Vec::new();
    let mut notes = Vec::new();
    for endpoint in endpoints {
        let Some(name) = name_of(endpoint) else {
            servers.push(Server {
                endpoint: endpoint.clone(),
                pinned: None,
            });
            continue;
        };
        let resolved = resolve(name).and_then(|a| {
            if a.is_empty() {
                Err(Error::msg("no address"))
            } else {
                Ok(a)
            }
        });
        let addrs = match resolved {
            Ok(addrs) => addrs,
            Err(e) => {
                notes.push(format!("Consul address {name} does not resolve: {e}"));
                servers.push(Server {
                    endpoint: endpoint.clone(),
                    pinned: None,
                });
                continue;
            }
        };
        let mut unique: Vec<SocketAddr> = Vec::new();
        for a in addrs {
            if !unique.contains(&a) {
                unique.push(a);
            }
        }
        let list: Vec<String> = unique.iter().map(SocketAddr::to_string).collect();
        notes.push(format!(
            "Consul address {name} resolves to {} server(s): {}",
            unique.len(),
            list.join(", ")
        ));
        servers.extend(unique.into_iter().map(|a| Server {
            endpoint: endpoint.clone(),
            pinned: Some(a),
        }));
    }
    (servers, notes)
}

/// Whether any server is a name to resolve again once all have failed.
pub fn any_named(endpoints: &[Endpoint]) -> bool {
    endpoints.iter().any(|e| name_of(e).is_some())
}

/// Whether an answer comes from a server that has lost its cluster: Consul's "No cluster
/// leader" error (500), or an answer marked `X-Consul-Knownleader: false` (such a server still
/// answers streaming health reads, from the empty view it has). Another server of the list is
/// asked instead, as consul-dataplane leaves a server that cannot serve.
pub fn leaderless(status: u16, body: &str, known_leader: Option<&str>) -> bool {
    (status >= 500 && body.contains("No cluster leader"))
        || known_leader.is_some_and(|v| v.trim().eq_ignore_ascii_case("false"))
}

/// The index to try `k` places after `first` in a list of `len` (`len` > 0).
pub fn nth_after(first: usize, k: usize, len: usize) -> usize {
    (first % len + k) % len
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ep(s: &str) -> Endpoint {
        Endpoint::parse(s).unwrap()
    }

    fn addr(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn only_a_name_with_a_port_is_resolved() {
        assert_eq!(
            name_of(&ep("consul.service:8500")),
            Some("consul.service:8500")
        );
        assert_eq!(name_of(&ep("https://servers:8501")), Some("servers:8501"));
        for literal in [
            "127.0.0.1:8500",
            "[::1]:8500",
            "unix:///run/consul.sock",
            "consul.service",
        ] {
            assert_eq!(name_of(&ep(literal)), None, "{literal}");
        }
    }

    /// A name that resolves to three servers becomes three, in the resolver's order, between
    /// the addresses given as they are; a repeated address counts once.
    #[test]
    fn a_name_becomes_one_server_per_address() {
        let endpoints = [
            ep("10.0.0.9:8500"),
            ep("servers:8500"),
            ep("unix:///c.sock"),
        ];
        let (servers, notes) = expand(&endpoints, |name| {
            assert_eq!(name, "servers:8500");
            Ok(vec![
                addr("10.0.0.1:8500"),
                addr("[fd00::2]:8500"),
                addr("10.0.0.1:8500"),
                addr("10.0.0.3:8500"),
            ])
        });
        let shown: Vec<String> = servers.iter().map(Server::to_string).collect();
        assert_eq!(
            shown,
            [
                "http://10.0.0.9:8500",
                "http://servers:8500 (10.0.0.1:8500)",
                "http://servers:8500 ([fd00::2]:8500)",
                "http://servers:8500 (10.0.0.3:8500)",
                "unix:///c.sock",
            ]
        );
        assert_eq!(
            notes,
            ["Consul address servers:8500 resolves to 3 server(s): 10.0.0.1:8500, [fd00::2]:8500, 10.0.0.3:8500"]
        );
    }

    #[test]
    fn a_name_that_does_not_resolve_stays_as_given_and_says_why() {
        for failed in [true, false] {
            let answer = || {
                if failed {
                    Err(Error::msg("no such host"))
                } else {
                    Ok(Vec::new())
                }
            };
            let (servers, notes) = expand(&[ep("gone:8500")], |_| answer());
            assert_eq!(
                servers,
                [Server {
                    endpoint: ep("gone:8500"),
                    pinned: None
                }]
            );
            assert_eq!(notes.len(), 1);
            assert!(notes[0].starts_with("Consul address gone:8500 does not resolve"));
        }
        assert!(any_named(&[ep("127.0.0.1:1"), ep("gone:8500")]));
        assert!(!any_named(&[ep("127.0.0.1:1")]));
    }

    /// As Consul 1.16.3 answered from a server whose cluster has no leader (recorded by hand):
    /// a 500 with its error on catalog and CA reads, and a 200 with an empty list, marked
    /// `X-Consul-Knownleader: false`, on a streaming health read.
    #[test]
    fn a_server_without_a_cluster_leader_is_recognised() {
        assert!(leaderless(500, "No cluster leader", Some("false")));
        assert!(leaderless(500, "No cluster leader", None));
        assert!(leaderless(200, "[]", Some("false")));
        assert!(!leaderless(200, "[]", Some("true")));
        assert!(!leaderless(200, "[]", None));
        assert!(!leaderless(500, "rpc error: permission denied", None));
        assert!(
            !leaderless(403, "No cluster leader", None),
            "not a server fault"
        );
    }

    /// From the current server, every server is tried once, in list order, wrapping around.
    #[test]
    fn the_turn_goes_round_from_the_current_server() {
        let order: Vec<usize> = (0..4).map(|k| nth_after(2, k, 4)).collect();
        assert_eq!(order, [2, 3, 0, 1]);
        // A current index left from a longer list (before a new resolution) still lands.
        let order: Vec<usize> = (0..2).map(|k| nth_after(5, k, 2)).collect();
        assert_eq!(order, [1, 0]);
    }
}
