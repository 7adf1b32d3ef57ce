//! Cluster peering in the sidecar's desired state: a peered upstream's one server is the
//! supervisor's forwarder for that peer's service (plain TCP on loopback; the forwarder
//! originates the mesh TLS, see `crate::peering`), and the public listener of a service
//! exported to peers trusts those peers' CAs.

use super::*;
use crate::peering::{Alpn, PeerKey, Target};

/// What a peered upstream needs dialed: the forwarder of `key`, serving `target` (`None`:
/// nothing may be dialed yet, and the forwarder closes every connection).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeerDial {
    pub key: PeerKey,
    pub target: Option<Target>,
}

/// The slot pool and the dial of the peered upstream `key`: one server at the forwarder's
/// address once the target is known and the forwarder runs; none before (the listener then
/// closes what it accepts), with one warning saying why.
pub(super) fn pool(
    key: &PeerKey,
    protocol: Protocol,
    snapshot: &Snapshot,
    before: &[Slot],
    warnings: &mut Vec<String>,
) -> (Vec<Slot>, PeerDial) {
    let alpn = match protocol {
        Protocol::Tcp => Alpn::None,
        Protocol::Http => Alpn::Http1,
        Protocol::Http2 | Protocol::Grpc => Alpn::H2,
    };
    let target = target(key, snapshot, warnings).map(|t| Target { alpn, ..t });
    let forwarder = snapshot.forwarders.get(key);
    let server = match (&target, forwarder) {
        (Some(t), Some(at)) => Some(Server {
            id: format!("forwarder.{}.{}", key.peer, key.service),
            address: Address::Ip(at.ip()),
            port: at.port(),
            weight: 1,
            identity: Identity::of(&t.identity),
            // The forwarder proves the peer's identity on every connection itself.
            admission: Admission::Unchecked,
        }),
        (Some(_), None) => {
            warnings.push(format!(
                "upstream {key}: its forwarder is not running; the listener refuses connections"
            ));
            None
        }
        (None, _) => None,
    };
    let dial = PeerDial {
        key: key.clone(),
        target,
    };
    (place(server.into_iter().collect(), before), dial)
}

fn target(key: &PeerKey, snapshot: &Snapshot, warnings: &mut Vec<String>) -> Option<Target> {
    let refuse = |why: String, warnings: &mut Vec<String>| {
        warnings.push(format!(
            "upstream {key}: {why}; the listener refuses connections until it can dial the peer"
        ));
        None
    };
    let (Some(peering), Some(instances)) = (
        snapshot.peerings.get(&key.peer),
        snapshot.peer_instances.get(key),
    ) else {
        return refuse(
            "the peering or its instances are not read yet".into(),
            warnings,
        );
    };
    match Target::from_consul(&key.service, peering, instances, warnings) {
        Ok(t) => Some(t),
        Err(e) => refuse(e.to_string(), warnings),
    }
}

/// The CA roots (PEM) of every active peer `service` is exported to, for the public
/// listener's `ca-file`; a peer whose CA cannot be used is left out with a warning (its
/// clients are refused: fails closed).
pub(super) fn exported_peer_cas(
    snapshot: &Snapshot,
    service: &str,
    warnings: &mut Vec<String>,
) -> String {
    let mut pem = String::new();
    let peers = snapshot
        .exported
        .iter()
        .flat_map(|x| crate::consul::exported_to(x, service));
    for peer in peers {
        let Some(p) = snapshot.peerings.get(&peer) else {
            continue;
        };
        if p.state.as_deref().is_some_and(|s| s != "ACTIVE") {
            continue;
        }
        let ca = p.ca_pem();
        let blocks = pem_blocks(&ca, "CERTIFICATE");
        if blocks.is_empty() || blocks.iter().any(|b| parse_cert(b).is_err()) {
            warnings.push(format!(
                "{service} is exported to peer {peer:?}, whose CA (PeerCAPems) cannot be used; its clients are refused"
            ));
            continue;
        }
        blocks.iter().for_each(|b| pem.push_str(b));
    }
    pem
}
