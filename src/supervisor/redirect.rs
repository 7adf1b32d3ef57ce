//! Transparent mode's start-up check of the traffic redirect: the app's connections reach the
//! outbound listener only through the iptables rules `consul connect redirect-traffic` installs,
//! and the sidecar's own connections must be exempt from them (`-proxy-uid`, the UID the
//! sidecar and its children run as), or they come back to it. Said once, as warnings; nothing
//! is changed.
//!
//! Where the NAT table can be read (`iptables-save`, which needs CAP_NET_ADMIN) its rules are
//! judged. Otherwise (the usual case: the sidecar runs as the unprivileged proxy UID) one probe
//! connection to a documentation address (TEST-NET-1, which nothing answers) tells whether
//! the sidecar's own traffic is captured: it is answered at once (connected, or reset) only if
//! it was redirected to the outbound listener, which refuses the probe address.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::model::transparent::PROBE_ADDRESS;

/// What the NAT table (`iptables-save -t nat`) says about this sidecar: one line per problem,
/// empty when the redirect to `outbound_port` exists and `uid` is exempt from it.
pub fn judge_rules(nat: &str, outbound_port: u16, uid: u32) -> Vec<String> {
    let to_outbound = format!("REDIRECT --to-ports {outbound_port}");
    let exempt = format!("--uid-owner {uid} ");
    let mut problems = Vec::new();
    if !nat.lines().any(|l| l.contains(&to_outbound)) {
        problems.push(format!(
            "no iptables rule redirects outbound TCP to the outbound listener's port {outbound_port}: the app's connections do not reach this sidecar (apply `consul connect redirect-traffic` in its network namespace)"
        ));
    } else if !nat
        .lines()
        .any(|l| l.contains(&exempt) && l.ends_with("-j RETURN"))
    {
        problems.push(format!(
            "the redirect does not exempt this sidecar's UID {uid}: its own connections would come back to it (give `redirect-traffic -proxy-uid {uid}`, or run the sidecar as the UID given there)"
        ));
    }
    problems
}

/// Runs the check on a thread of its own and logs what it finds.
pub fn check_in_background(outbound_port: u16) {
    let spawned = std::thread::Builder::new()
        .name("redirect check".into())
        .stack_size(256 * 1024)
        .spawn(move || {
            let uid = nix::unistd::getuid().as_raw();
            let problems = match read_nat_table() {
                Some(nat) => judge_rules(&nat, outbound_port, uid),
                None => probe(outbound_port, uid).into_iter().collect(),
            };
            if problems.is_empty() {
                log::info!(
                    "transparent mode: outbound listener on port {outbound_port}; this sidecar runs as UID {uid}, which the redirect must exempt (`redirect-traffic -proxy-uid {uid}`)"
                );
            }
            for p in problems {
                log::warn!("transparent mode: {p}");
            }
        });
    if let Err(e) = spawned {
        log::warn!("cannot start the redirect check: {e}");
    }
}

/// The NAT table as `iptables-save` prints it, when this process may read it.
fn read_nat_table() -> Option<String> {
    let out = std::process::Command::new("iptables-save")
        .args(["-t", "nat"])
        .stdin(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && text.lines().any(|l| l == "*nat")).then_some(text)
}

/// One connection to the probe address. Nothing out there answers it: a connection that
/// completes, or is reset or refused at once, was answered on this host, i.e. redirected (the
/// outbound listener resets it, and on loopback the reset may come before `connect` returns;
/// before HAProxy listens the redirect is refused). A timeout or an unreachable network is
/// what an exempt sidecar sees.
fn probe(outbound_port: u16, uid: u32) -> Option<String> {
    let addr: SocketAddr = format!("{PROBE_ADDRESS}:{outbound_port}").parse().ok()?;
    let answered_here = match TcpStream::connect_timeout(&addr, Duration::from_secs(1)) {
        Ok(_) => true,
        Err(e) => matches!(
            e.kind(),
            std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::ConnectionRefused
        ),
    };
    answered_here.then(|| format!(
        "this sidecar's own connections are redirected (a probe to {addr} came back to it): the redirect must exempt its UID {uid} (`redirect-traffic -proxy-uid {uid}`), its children's too"
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `consul connect redirect-traffic -proxy-uid 5995` of Consul 1.16.3, as iptables-save
    /// 1.8.9 printed it in a test namespace.
    const RECORDED: &str = "*nat
:PREROUTING ACCEPT [0:0]
:CONSUL_PROXY_OUTPUT - [0:0]
:CONSUL_PROXY_REDIRECT - [0:0]
-A PREROUTING -p tcp -j CONSUL_PROXY_INBOUND
-A OUTPUT -p tcp -j CONSUL_PROXY_OUTPUT
-A CONSUL_PROXY_IN_REDIRECT -p tcp -j REDIRECT --to-ports 21000
-A CONSUL_PROXY_OUTPUT -m owner --uid-owner 5995 -j RETURN
-A CONSUL_PROXY_OUTPUT -d 127.0.0.1/32 -j RETURN
-A CONSUL_PROXY_OUTPUT -j CONSUL_PROXY_REDIRECT
-A CONSUL_PROXY_REDIRECT -p tcp -j REDIRECT --to-ports 15001
COMMIT
";

    #[test]
    fn the_recorded_rules_pass_for_their_uid_and_port_only() {
        assert!(judge_rules(RECORDED, 15001, 5995).is_empty());
        let other_uid = judge_rules(RECORDED, 15001, 0);
        assert_eq!(other_uid.len(), 1);
        assert!(other_uid[0].contains("UID 0"), "{other_uid:?}");
        let other_port = judge_rules(RECORDED, 15002, 5995);
        assert!(other_port[0].contains("port 15002"), "{other_port:?}");
        let none = judge_rules("*nat\nCOMMIT\n", 15001, 5995);
        assert!(none[0].contains("no iptables rule"), "{none:?}");
        // A longer UID that starts with ours is not ours.
        let longer = RECORDED.replace("5995", "59951");
        assert_eq!(judge_rules(&longer, 15001, 5995).len(), 1);
    }
}
