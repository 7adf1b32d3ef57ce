//! One upstream listener and its server slots: where it binds, which instances serve it, the
//! slot each keeps and what its backend pins their certificates to. Also builds the slot pools
//! of chain targets and gateway routes (`pool`, `place`).

use super::*;
use crate::peering::PeerKey;

/// What every upstream's backends depend on besides the snapshot.
pub(crate) struct Here<'a> {
    /// Our own datacenter: the default of a destination's.
    pub datacenter: String,
    pub trust_domain: &'a str,
    pub identity_check: bool,
    /// `-balance`: every backend's algorithm unless a resolver asks for another.
    pub balance: &'a str,
}

/// The datacenter of our own leaf's SPIFFE ID, or else of the registration.
pub(crate) fn local_datacenter(leaf_uri: &str, registration_dc: &str) -> String {
    crate::pki::SpiffeId::parse(leaf_uri)
        .map(|id| id.datacenter)
        .unwrap_or_else(|_| registration_dc.to_string())
}

pub(super) fn upstream(
    u: &Upstream,
    snapshot: &Snapshot,
    previous: Option<&Desired>,
    here: &Here<'_>,
    warnings: &mut Vec<String>,
) -> Result<UpstreamListener> {
    if u.destination_name.is_empty() {
        return Err(Error::msg("it has no DestinationName"));
    }
    // Each value below reaches a name, a comment or a bind line: a bad one skips this upstream.
    Name::parse("DestinationName", &u.destination_name)?;
    for (field, v) in [
        ("Datacenter", &u.datacenter),
        ("DestinationNamespace", &u.destination_namespace),
    ] {
        if !v.is_empty() {
            Name::parse(field, v)?;
        }
    }
    // A peer's service: dialed through this sidecar's forwarder (`peered`), never as ours.
    let peer = match u.destination_peer.as_str() {
        "" => None,
        p => {
            Name::parse("DestinationPeer", p)?;
            if !u.datacenter.is_empty() || u.destination_type == "prepared_query" {
                return Err(Error::msg(format!(
                    "its destination is in cluster peer {p:?} and names a Datacenter or a prepared query, which a peer's exports cannot be"
                )));
            }
            Some(PeerKey {
                peer: p.to_string(),
                service: u.destination_name.clone(),
            })
        }
    };
    let socket = unix_socket(u)?;
    if socket.is_none() && u.local_bind_port == 0 {
        return Err(Error::msg(
            "it has neither LocalBindPort nor LocalBindSocketPath",
        ));
    }
    let kind = match u.destination_type.as_str() {
        "" | "service" => DestinationKind::Service,
        "prepared_query" => DestinationKind::PreparedQuery,
        other => return Err(Error::msg(format!("unknown DestinationType {other:?}"))),
    };
    let key = DestinationKey {
        kind,
        name: u.destination_name.clone(),
        datacenter: u.datacenter.clone(),
    };
    let (bind_address, bind_port) = match &socket {
        Some(s) => (s.path.clone(), 0),
        None => (
            match non_empty(&u.local_bind_address) {
                Some(a) => Address::parse_ip("LocalBindAddress", &a)?.to_string(),
                None => DEFAULT_UPSTREAM_BIND.to_string(),
            },
            u.local_bind_port,
        ),
    };
    // Address and port make a listener unique, and the datacenter keeps two watches of one
    // destination apart in names and metrics.
    let name = sanitize(&format!(
        "up_{}_{}_{}_{}_{}",
        match kind {
            DestinationKind::Service => "svc",
            DestinationKind::PreparedQuery => "pq",
        },
        u.destination_name,
        match (&peer, u.datacenter.is_empty()) {
            (Some(p), _) => format!("peer_{}", p.peer),
            (None, true) => "local".to_string(),
            (None, false) => u.datacenter.clone(),
        },
        if socket.is_some() {
            "unix"
        } else {
            &bind_address
        },
        if socket.is_some() {
            sanitize(&bind_address)
        } else {
            bind_port.to_string()
        }
    ));
    let previous_listener = previous.and_then(|p| p.upstream(&name));
    let before = previous_listener.map_or(&[][..], |l| l.slots.as_slice());
    if let Some(peer) = &peer {
        return peered_upstream(
            u,
            peer,
            name,
            bind_address,
            bind_port,
            socket,
            snapshot,
            before,
            warnings,
        );
    }
    let entries = snapshot
        .endpoints
        .get(&key)
        .map_or(&[][..], |v| v.as_slice());
    let identity = (kind == DestinationKind::Service).then(|| Identity {
        namespace: non_empty(&u.destination_namespace)
            .unwrap_or_else(|| admission::DEFAULT.to_string()),
        ..Identity::service(
            &u.destination_name,
            if u.datacenter.is_empty() {
                &here.datacenter
            } else {
                &u.datacenter
            },
        )
    });
    let (slots, verifyhost) = pool(
        entries,
        &u.destination_name,
        identity.as_ref(),
        here,
        snapshot,
        before,
        previous_listener.and_then(|p| p.verifyhost.as_ref()),
        warnings,
    );
    let backend = format!("{BACKEND_PREFIX}{name}");
    let chain = snapshot.chains.get(&key);
    // The upstream's own protocol wins; without one, the chain's (service-defaults) applies.
    let protocol = config_str(&u.config, "protocol")
        .or_else(|| chain.map(|c| c.protocol.clone()).filter(|p| !p.is_empty()));
    let listener_protocol = Protocol::parse(protocol.as_deref());
    let listener_mode = listener_protocol.mode();
    let whose = format!("upstream {key}");
    keys::warn_unknown(&u.config, keys::UPSTREAM, &whose, warnings);
    let connect_timeout = timeout_setting(&u.config, "connect_timeout_ms", &whose, warnings)
        .or_else(|| keys::go_timeout(&u.config, "connect_timeout", &whose, warnings));
    let read_timeout = keys::go_timeout(&u.config, "read_timeout", &whose, warnings);
    keys::check_poll_interval(&u.config, kind, &whose, warnings);
    let limits = keys::upstream_limits(&u.config, listener_mode, &whose, warnings);
    let passive = keys::passive_check(&u.config, &whose, warnings);
    let routing = match chain {
        Some(c) => {
            let before = previous_listener.and_then(|l| l.routing.as_ref());
            let mut chain_warnings = Vec::new();
            match chain::routing(
                c,
                &key,
                &backend,
                listener_mode,
                connect_timeout,
                here,
                snapshot,
                before,
                &mut chain_warnings,
            ) {
                Ok(r) => {
                    warnings.extend(chain_warnings);
                    r
                }
                // The routing that served before keeps serving (or the destination itself).
                Err(e) => {
                    warnings.push(format!(
                        "upstream {key}: its discovery chain cannot be followed, keeping the routing it had: {e}"
                    ));
                    before.cloned()
                }
            }
        }
        None => None,
    };
    Ok(UpstreamListener {
        backend,
        name,
        destination: key.to_string(),
        bind_address,
        bind_port,
        socket,
        mode: listener_mode,
        h2: listener_protocol.h2(),
        connect_timeout_ms: connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        read_timeout_ms: read_timeout,
        slots,
        identity,
        verifyhost,
        routing,
        implicit: false,
        limits,
        passive,
        peer: None,
    })
}

/// A peered upstream's listener: as any upstream's (bind, protocol, timeouts, limits), with
/// the forwarder as its one server and no discovery chain (a peer's chain is the peer's).
#[allow(clippy::too_many_arguments)]
fn peered_upstream(
    u: &Upstream,
    key: &PeerKey,
    name: String,
    bind_address: String,
    bind_port: u16,
    socket: Option<UnixSocket>,
    snapshot: &Snapshot,
    before: &[Slot],
    warnings: &mut Vec<String>,
) -> Result<UpstreamListener> {
    let whose = format!("upstream {key}");
    let listener_protocol = Protocol::parse(config_str(&u.config, "protocol").as_deref());
    let mode = listener_protocol.mode();
    keys::warn_unknown(&u.config, keys::UPSTREAM, &whose, warnings);
    let connect_timeout = timeout_setting(&u.config, "connect_timeout_ms", &whose, warnings)
        .or_else(|| keys::go_timeout(&u.config, "connect_timeout", &whose, warnings));
    let read_timeout = keys::go_timeout(&u.config, "read_timeout", &whose, warnings);
    let limits = keys::upstream_limits(&u.config, mode, &whose, warnings);
    let (slots, dial) = peered::pool(key, listener_protocol, snapshot, before, warnings);
    Ok(UpstreamListener {
        backend: format!("{BACKEND_PREFIX}{name}"),
        name,
        destination: key.to_string(),
        bind_address,
        bind_port,
        socket,
        mode,
        // HTTP/2 in clear text to the forwarder, which offers `h2` in ALPN to the peer.
        h2: listener_protocol.h2(),
        connect_timeout_ms: connect_timeout.unwrap_or(DEFAULT_CONNECT_TIMEOUT),
        read_timeout_ms: read_timeout,
        slots,
        identity: None,
        verifyhost: None,
        routing: None,
        implicit: false,
        limits,
        // No HAProxy check runs on the forwarder, and a passive check needs one.
        passive: None,
        peer: Some(dial),
    })
}

/// A backend's slots and the certificate name its servers are pinned to (`verifyhost`): the
/// instances in `entries`, each admitted as the identity checker judged it, placed in the
/// slots they had (`before`).
#[allow(clippy::too_many_arguments)]
pub(crate) fn pool(
    entries: &[HealthEntry],
    destination: &str,
    identity: Option<&Identity>,
    here: &Here<'_>,
    snapshot: &Snapshot,
    before: &[Slot],
    pinned_before: Option<&String>,
    warnings: &mut Vec<String>,
) -> (Vec<Slot>, Option<String>) {
    let mut instances = servers(entries, destination, identity, &here.datacenter, warnings);
    for i in &mut instances {
        i.admission = admission_of(i, snapshot, here.identity_check);
    }
    let slots = place(instances, before);
    let verifyhost =
        pinned_name(&slots, here.trust_domain).unwrap_or_else(|| pinned_before.cloned());
    (slots, verifyhost)
}

pub(super) fn admission_of(i: &Server, snapshot: &Snapshot, check: bool) -> Admission {
    if !check {
        return Admission::Unchecked;
    }
    match snapshot.admission.get(&i.endpoint()) {
        None => Admission::Unproven,
        Some(Verdict::Proven { common_name }) => Admission::Proven {
            common_name: common_name.clone(),
        },
        Some(Verdict::Refused { .. }) => Admission::Refused,
    }
}

/// The name HAProxy can check on every connection of a backend: the legacy CN, when every
/// admitted instance presented exactly the CN its identity has in leaves before Consul 1.11.
/// `Some(None)`: never pin (one instance's leaf has no such CN, or the check is off);
/// `None`: nothing admitted to judge by, so the backend keeps what it had.
pub(super) fn pinned_name(slots: &[Slot], trust_domain: &str) -> Option<Option<String>> {
    let mut pinned: Option<String> = None;
    for i in slots.iter().filter_map(|s| s.instance.as_ref()) {
        let cn = match &i.admission {
            Admission::Unchecked => return Some(None),
            Admission::Proven { common_name } => common_name,
            Admission::Unproven | Admission::Refused => continue,
        };
        let legacy = i.identity.legacy_common_name(trust_domain);
        match (cn, &pinned) {
            (Some(cn), _) if legacy.as_ref() != Some(cn) => return Some(None),
            (None, _) => return Some(None),
            (Some(cn), Some(p)) if p != cn => return Some(None),
            (Some(cn), _) => pinned = Some(cn.clone()),
        }
    }
    pinned.map(Some)
}

/// `LocalBindSocketPath` and `LocalBindSocketMode`, checked: an absolute path short enough for
/// HAProxy, and an octal mode.
pub(super) fn unix_socket(u: &Upstream) -> Result<Option<UnixSocket>> {
    let path = u.local_bind_socket_path.trim();
    if path.is_empty() {
        return Ok(None);
    }
    if !path.starts_with('/') {
        return Err(Error::msg(format!(
            "LocalBindSocketPath {path:?} is not an absolute path"
        )));
    }
    Word::parse("LocalBindSocketPath", path)?;
    if path.len() > MAX_SOCKET_PATH {
        return Err(Error::msg(format!(
            "LocalBindSocketPath {path:?} is {} bytes, more than the {} HAProxy can bind",
            path.len(),
            MAX_SOCKET_PATH
        )));
    }
    let mode = match u.local_bind_socket_mode.trim() {
        "" => None,
        m if (3..=4).contains(&m.len()) && m.chars().all(|c| ('0'..='7').contains(&c)) => {
            Some(m.to_string())
        }
        m => {
            return Err(Error::msg(format!(
                "LocalBindSocketMode {m:?} is not an octal mode such as 0660"
            )))
        }
    };
    Ok(Some(UnixSocket {
        path: path.to_string(),
        mode,
    }))
}

/// How a listener's address reads in a message.
pub fn listener_address(u: &UpstreamListener) -> String {
    match &u.socket {
        Some(s) => format!("unix socket {}", s.path),
        None => format!("{}:{}", u.bind_address, u.bind_port),
    }
}

/// The instances of a destination. A service's instances must all be `identity`; a prepared
/// query's each the service its answer lists it as (the service a sidecar fronts), in the
/// datacenter of its node.
pub(super) fn servers(
    entries: &[HealthEntry],
    destination: &str,
    identity: Option<&Identity>,
    local_dc: &str,
    warnings: &mut Vec<String>,
) -> Vec<Server> {
    let mut by_name: BTreeMap<String, Server> = BTreeMap::new();
    for e in entries {
        let (address, field) = match non_empty(&e.service.address) {
            Some(a) => (a, "Service.Address"),
            None => (e.node.address.trim().to_string(), "Node.Address"),
        };
        if address.is_empty() || e.service.port == 0 {
            warnings.push(format!(
                "instance {:?} on node {:?} of {destination} has no address or port; skipping it",
                e.service.id, e.node.node
            ));
            continue;
        }
        // Everything of an instance that reaches HAProxy: its address (a server line, a
        // runtime-API command) and the names that make its slot's identity. A refused value
        // drops this instance only.
        let fronted = e
            .service
            .proxy
            .as_ref()
            .and_then(|p| non_empty(&p.destination_service_name))
            .unwrap_or_else(|| e.service.service.clone());
        let typed = Name::parse("Service.ID", &e.service.id).and_then(|_| {
            Name::parse("Node.Node", &e.node.node)?;
            if identity.is_none() {
                Name::parse("Service.Proxy.DestinationServiceName", &fronted)?;
                if !e.node.datacenter.is_empty() {
                    Name::parse("Node.Datacenter", &e.node.datacenter)?;
                }
            }
            Address::parse(field, &address)
        });
        let address = match typed {
            Ok(a) => a,
            Err(e2) => {
                warnings.push(format!(
                    "instance {:?} on node {:?} of {destination}: {e2}; skipping it",
                    e.service.id.escape_debug().to_string(),
                    e.node.node.escape_debug().to_string()
                ));
                continue;
            }
        };
        let id = format!("{}.{}", e.service.id, e.node.node);
        let weight = e.service.weights.map_or(1, |w| w.passing).clamp(1, 256);
        let identity = identity.cloned().unwrap_or_else(|| {
            let dc = non_empty(&e.node.datacenter).unwrap_or_else(|| local_dc.to_string());
            Identity::service(&fronted, &dc)
        });
        by_name.insert(
            id.clone(),
            Server {
                id,
                address,
                port: e.service.port,
                weight,
                identity,
                admission: Admission::Unproven,
            },
        );
    }
    by_name.into_values().collect()
}

/// Places instances in slots: each keeps its previous slot; newcomers take the lowest free one.
/// The pool grows (doubling) when full and shrinks only when at most a quarter is used, so a
/// flapping instance count never resizes it back and forth.
pub fn place(instances: Vec<Server>, before: &[Slot]) -> Vec<Slot> {
    let n = instances.len();
    let fit = |k: usize| k.next_power_of_two().max(MIN_SLOTS);
    let capacity = match before.len() {
        0 => fit(n),
        c if n > c => fit(n),
        c if c > MIN_SLOTS && n <= c / 4 => fit(2 * n),
        c => c,
    };
    let mut slots: Vec<Option<Server>> = vec![None; capacity];
    let mut newcomers = Vec::new();
    for inst in instances {
        let had = before
            .iter()
            .position(|s| s.instance.as_ref().is_some_and(|i| i.id == inst.id))
            .filter(|i| *i < capacity && slots[*i].is_none());
        match had {
            Some(i) => slots[i] = Some(inst),
            None => newcomers.push(inst),
        }
    }
    let mut free = (0..capacity)
        .filter(|i| slots[*i].is_none())
        .collect::<Vec<_>>()
        .into_iter();
    for inst in newcomers {
        if let Some(i) = free.next() {
            slots[i] = Some(inst);
        }
    }
    slots
        .into_iter()
        .enumerate()
        .map(|(i, instance)| Slot {
            name: format!("s{i}"),
            instance,
        })
        .collect()
}
