//! Transparent mode (`Proxy.Mode: transparent`): the app dials a mesh service's virtual IP,
//! `consul connect redirect-traffic` sends the connection to the outbound listener, and the
//! listener picks the service's backend by the connection's original destination. Every
//! service intentions let this one reach is an implicit upstream, built like an explicit one
//! (`model::upstream`: slots, identity, protocol, TLS) but without a listener of its own.

use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use super::{Mode, Paths, UnixSocket, UpstreamListener, MAX_SOCKET_PATH};
use crate::consul::api::{HealthEntry, ProxyConfig, ServiceDefaultsEntry, Upstream};
use crate::names::sanitize;
use crate::snapshot::Snapshot;
use crate::value::{Address, Millis};

/// Consul's default `TransparentProxy.OutboundListenerPort`.
pub const DEFAULT_OUTBOUND_PORT: u16 = 15001;

/// Where the outbound listener binds: an iptables REDIRECT of a locally made connection
/// delivers it to 127.0.0.1, as Consul's Envoy binds its outbound listener.
pub const OUTBOUND_BIND: Address = Address::Ip(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST));

/// What `supervisor::redirect` dials to learn whether the sidecar's own connections are
/// redirected (TEST-NET-1: nothing answers it); the outbound listener refuses it.
pub const PROBE_ADDRESS: &str = "192.0.2.1";

/// The outbound listener and its routing table.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outbound {
    pub bind_address: Address,
    pub port: u16,
    /// `mesh` config entry `TransparentProxy.MeshDestinationsOnly`: a destination that is no
    /// mesh service is refused instead of passed through. Unknown (the entry not read yet)
    /// counts as true: a security setting that cannot be honoured fails closed.
    pub mesh_only: bool,
    /// Virtual IP → route, sorted by address; each address once.
    pub routes: Vec<Route>,
    /// `Host` → the http service it names (its names and its virtual IP), sorted by host:
    /// a connection to an http service's virtual IP is read as HTTP and routed per request.
    pub hosts: Vec<HostRoute>,
    /// An instance's own address and port → its service's dialer (`DialedDirectly`), sorted.
    pub direct: Vec<DirectRoute>,
    /// The backends that hand a connection to a routed implicit upstream's own listener.
    pub hops: Vec<Hop>,
    /// The backends that dial a connection's original destination with mTLS.
    pub dialers: Vec<Dialer>,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Route {
    pub virtual_ip: Address,
    pub service: String,
    /// The implicit upstream's backend (`UpstreamListener::backend`), or its hop's.
    pub backend: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct HostRoute {
    /// Lower case, without a port: how the outbound listener reads a request's `Host`. Made
    /// of a Consul name, a datacenter name or an IP address only.
    pub host: String,
    pub service: String,
    pub backend: String,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct DirectRoute {
    pub address: Address,
    pub port: u16,
    pub service: String,
    /// The service's `Dialer::backend`.
    pub backend: String,
}

/// An implicit upstream whose discovery chain routes, splits or redirects: its listener (the
/// chain's rules, as an explicit upstream's) binds a unix socket, and this backend sends the
/// outbound listener's connections there.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Hop {
    pub backend: String,
    pub service: String,
    pub socket: String,
    pub mode: Mode,
    /// `proto h2` towards the listener (an http2/grpc destination).
    pub h2: bool,
}

/// `DialedDirectly`: one server, `0.0.0.0:0` (the address and port the app dialed), with the
/// service's mTLS settings; the instance's own redirect takes the connection to its public
/// listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Dialer {
    pub backend: String,
    pub service: String,
    pub mode: Mode,
    pub h2: bool,
    pub verifyhost: Option<String>,
    pub connect_timeout_ms: Millis,
}

/// One of the outbound listener's maps as its file and the runtime API hold it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct OutboundMap {
    pub path: PathBuf,
    /// What the map routes by, for the file's first comment.
    pub by: &'static str,
    /// (service, key, backend), in file order.
    pub entries: Vec<(String, String, String)>,
}

impl OutboundMap {
    pub fn pairs(&self) -> Vec<(String, String)> {
        self.entries
            .iter()
            .map(|(_, k, b)| (k.clone(), b.clone()))
            .collect()
    }
}

/// The map files of the outbound listener (all three always exist: its rules name them).
pub fn hosts_map_path(paths: &Paths) -> PathBuf {
    paths.workdir.join("transparent-hosts.map")
}

pub fn direct_map_path(paths: &Paths) -> PathBuf {
    paths.workdir.join("transparent-direct.map")
}

impl Outbound {
    /// The three maps: by virtual IP (`map_ip`), by `Host` (`map_str`), by address and port
    /// (`map_str` of `<ip>:<port>`).
    pub fn maps(&self, paths: &Paths) -> Vec<OutboundMap> {
        vec![
            OutboundMap {
                path: paths.transparent_map.clone(),
                by: "original destination",
                entries: self
                    .routes
                    .iter()
                    .map(|r| {
                        (
                            r.service.clone(),
                            r.virtual_ip.to_string(),
                            r.backend.clone(),
                        )
                    })
                    .collect(),
            },
            OutboundMap {
                path: hosts_map_path(paths),
                by: "Host of a request to an http service's virtual IP",
                entries: self
                    .hosts
                    .iter()
                    .map(|h| (h.service.clone(), h.host.clone(), h.backend.clone()))
                    .collect(),
            },
            OutboundMap {
                path: direct_map_path(paths),
                by: "an instance's own address and port (DialedDirectly)",
                entries: self
                    .direct
                    .iter()
                    .map(|d| {
                        (
                            d.service.clone(),
                            direct_key(&d.address, d.port),
                            d.backend.clone(),
                        )
                    })
                    .collect(),
            },
        ]
    }
}

/// How the outbound listener writes a connection's original destination to look it up in the
/// direct map (`%[dst]:%[dst_port]`).
pub fn direct_key(address: &Address, port: u16) -> String {
    format!("{address}:{port}")
}

/// The registration's outbound listener port, Consul's default when it names none.
pub fn outbound_port(proxy: &ProxyConfig) -> u16 {
    match proxy.transparent_proxy.outbound_listener_port {
        0 => DEFAULT_OUTBOUND_PORT,
        p => p,
    }
}

/// An implicit upstream as an explicit one would be written: the service in our datacenter,
/// "listening" on the outbound port (its listener is never rendered; the name stays unique
/// per service because the outbound address is no other listener's).
pub fn as_upstream(service: &str, port: u16) -> Upstream {
    Upstream {
        destination_name: service.to_string(),
        local_bind_address: OUTBOUND_BIND.to_string(),
        local_bind_port: port,
        ..Upstream::default()
    }
}

/// The outbound listener for the implicit upstreams built: each routed by the virtual IP its
/// instances carry (`consul-virtual`), an http one also by `Host`, and the instances whose
/// proxy allows `DialedDirectly` by their own address. An upstream with no instance has no
/// address yet. One whose discovery chain does more than reach the service itself gets a
/// listener of its own on a unix socket in `paths.workdir` (the same rules an explicit
/// upstream's listener has), which its routes reach through a hop.
pub fn outbound(
    port: u16,
    snapshot: &Snapshot,
    implicit: &mut [(String, UpstreamListener)],
    datacenter: &str,
    paths: &Paths,
    warnings: &mut Vec<String>,
) -> Outbound {
    let mut o = Outbound {
        bind_address: OUTBOUND_BIND,
        port,
        mesh_only: snapshot
            .mesh
            .as_deref()
            .map(crate::consul::mesh_entry)
            .is_none_or(|m| m.transparent_proxy.mesh_destinations_only),
        routes: Vec::new(),
        hosts: Vec::new(),
        direct: Vec::new(),
        hops: Vec::new(),
        dialers: Vec::new(),
    };
    for (service, u) in implicit.iter_mut() {
        let service = service.clone();
        let entries = instances(snapshot, &service);
        direct_routes(&service, u, entries, &mut o, warnings);
        let Some(vip) = virtual_ip(&service, entries, warnings) else {
            continue;
        };
        if let Some(other) = o.routes.iter().find(|r| r.virtual_ip == vip) {
            warnings.push(format!(
                "implicit upstream {service:?}: virtual IP {vip} is already {:?}'s; not routed",
                other.service
            ));
            continue;
        }
        let backend = if u.routing.is_some() {
            match hop(&service, u, &paths.workdir, warnings) {
                Some(h) => {
                    let b = h.backend.clone();
                    o.hops.push(h);
                    b
                }
                None => continue,
            }
        } else {
            u.backend.clone()
        };
        if u.mode == Mode::Http {
            o.hosts.extend(
                host_names(&service, datacenter, &vip)
                    .into_iter()
                    .map(|host| HostRoute {
                        host,
                        service: service.clone(),
                        backend: backend.clone(),
                    }),
            );
        }
        o.routes.push(Route {
            virtual_ip: vip,
            service,
            backend,
        });
    }
    for raw in snapshot.service_defaults.iter().flatten() {
        // An entry that does not read as one names no Destination this sidecar could see.
        let Ok(e) = ServiceDefaultsEntry::deserialize(raw) else {
            continue;
        };
        if let Some(dest) = &e.destination {
            warnings.push(destination_warning(&e.name, dest, o.mesh_only));
        }
    }
    o.routes.sort_by_key(|r| r.virtual_ip.to_string());
    o.hosts.sort_by(|a, b| a.host.cmp(&b.host));
    o.direct
        .sort_by_key(|d| (direct_key(&d.address, d.port), d.service.clone()));
    // Two services' instances claiming one address and port: the first (by name) keeps it.
    o.direct.dedup_by(|later, kept| {
        let same = later.address == kept.address && later.port == kept.port;
        if same && later.service != kept.service {
            warnings.push(format!(
                "implicit upstream {:?}: {} is already {:?}'s address; not routed directly",
                later.service,
                direct_key(&later.address, later.port),
                kept.service
            ));
        }
        same
    });
    o
}

/// `service-defaults` with a `Destination`: Consul's Envoy sends a connection to those
/// addresses through a terminating gateway; this sidecar does not, so it says what happens
/// instead: the outbound listener's rule for any address outside the mesh (passed through
/// to the address itself, or refused with `MeshDestinationsOnly`). The name and addresses
/// are escaped by `Debug`: they only reach a log line.
fn destination_warning(
    name: &str,
    dest: &crate::consul::api::ServiceDestination,
    mesh_only: bool,
) -> String {
    format!(
        "service-defaults {name:?} has a Destination ({:?} port {}), which this sidecar does not route through a terminating gateway; a connection to it is {}",
        dest.addresses,
        dest.port,
        if mesh_only {
            "refused (MeshDestinationsOnly)"
        } else {
            "passed through to the address itself, outside the mesh"
        }
    )
}

/// The names a request's `Host` may give an http service, as Consul DNS serves them, and its
/// virtual IP (a port is cut from the header before the lookup). Lower case: the header is
/// lowered too, and DNS names are case-blind.
fn host_names(service: &str, datacenter: &str, vip: &Address) -> Vec<String> {
    let s = service.to_ascii_lowercase();
    let dc = datacenter.to_ascii_lowercase();
    vec![
        s.clone(),
        format!("{s}.virtual.consul"),
        format!("{s}.service.consul"),
        format!("{s}.service.{dc}.consul"),
        vip.to_string(),
    ]
}

/// The routed upstream's listener moved to its unix socket, and the hop to it; `None` (named)
/// when the working directory's path leaves no room for the socket's.
fn hop(
    service: &str,
    u: &mut UpstreamListener,
    workdir: &Path,
    warnings: &mut Vec<String>,
) -> Option<Hop> {
    let socket = workdir
        .join(format!("tp-{}.sock", sanitize(service)))
        .display()
        .to_string();
    if socket.len() > MAX_SOCKET_PATH {
        warnings.push(format!(
            "implicit upstream {service:?}: its discovery chain routes, splits or redirects, which takes a listener on a unix socket, and {socket:?} is longer than the {MAX_SOCKET_PATH} bytes HAProxy can bind (a shorter -haproxy-cfg-base-path helps); not routed"
        ));
        return None;
    }
    u.bind_address = socket.clone();
    u.bind_port = 0;
    u.socket = Some(UnixSocket {
        path: socket.clone(),
        mode: None,
    });
    Some(Hop {
        backend: format!("{}_hop", u.backend),
        service: service.to_string(),
        socket,
        mode: u.mode,
        h2: u.h2,
    })
}

fn instances<'a>(snapshot: &'a Snapshot, service: &str) -> &'a [HealthEntry] {
    let key = crate::consul::DestinationKey {
        kind: crate::consul::DestinationKind::Service,
        name: service.to_string(),
        datacenter: String::new(),
    };
    snapshot
        .endpoints
        .get(&key)
        .map_or(&[][..], |v| v.as_slice())
}

/// `DialedDirectly`: each instance whose proxy allows it, and whose sidecar's slot takes
/// traffic (so the identity check and health hold as for the virtual IP), by its address and
/// `LocalServicePort` (the port the service registered, which its own redirect captures); the
/// service's dialer with them.
fn direct_routes(
    service: &str,
    u: &UpstreamListener,
    entries: &[HealthEntry],
    o: &mut Outbound,
    warnings: &mut Vec<String>,
) {
    let backend = format!("{}_direct", u.backend);
    let mut any = false;
    for e in entries {
        let Some(p) = e
            .service
            .proxy
            .as_ref()
            .filter(|p| p.transparent_proxy.dialed_directly)
        else {
            continue;
        };
        any = true;
        let raw = match e.service.address.trim() {
            "" => e.node.address.trim(),
            a => a,
        };
        let address = match Address::parse_ip("Service.Address", raw) {
            Ok(a) => a,
            Err(err) => {
                warnings.push(format!(
                    "implicit upstream {service:?}: instance {:?} allows DialedDirectly, but {err}; its address is not routed",
                    e.service.id
                ));
                continue;
            }
        };
        if p.local_service_port == 0 {
            continue;
        }
        let serving = u
            .slots
            .iter()
            .filter_map(|s| s.instance.as_ref())
            .any(|s| s.address == address && s.port == e.service.port && s.in_service());
        if serving {
            o.direct.push(DirectRoute {
                address,
                port: p.local_service_port,
                service: service.to_string(),
                backend: backend.clone(),
            });
        }
    }
    if any {
        o.dialers.push(Dialer {
            backend,
            service: service.to_string(),
            mode: u.mode,
            h2: u.h2,
            verifyhost: u.verifyhost.clone(),
            connect_timeout_ms: u.connect_timeout_ms,
        });
    }
}

/// The service's virtual IP from its instances (the same on each); a refused address is
/// named and the service not routed.
fn virtual_ip(
    service: &str,
    entries: &[HealthEntry],
    warnings: &mut Vec<String>,
) -> Option<Address> {
    let raw = entries.iter().find_map(|e| e.service.virtual_ip())?;
    match Address::parse_ip("TaggedAddresses.consul-virtual", raw) {
        Ok(a) => Some(a),
        Err(e) => {
            warnings.push(format!("implicit upstream {service:?}: {e}; not routed"));
            None
        }
    }
}

#[cfg(test)]
mod tests;
