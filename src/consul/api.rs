//! The shapes of the Consul agent's answers that the sidecar reads. Fields Consul may leave out
//! or send as `null` are defaulted, so a response from an older or newer agent still parses;
//! what the sidecar cannot do without is checked in `snapshot`/`model`, with an error naming it.

use std::collections::BTreeMap;

use serde::Deserialize;
use serde_json::Value;

pub(crate) fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

/// `/v1/agent/services` values and `/v1/agent/service/:id`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct AgentService {
    #[serde(default, deserialize_with = "null_as_default")]
    pub kind: String,
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub tags: Vec<String>,
    #[serde(default)]
    pub port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub datacenter: String,
    #[serde(default)]
    pub proxy: Option<ProxyConfig>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub content_hash: String,
}

/// `/v1/catalog/node-services/<node>`: a node's services in the catalog (null for a node the
/// catalog does not hold).
#[derive(Clone, Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct NodeServices {
    #[serde(default, deserialize_with = "null_as_default")]
    pub services: Vec<AgentService>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ProxyConfig {
    #[serde(default, deserialize_with = "null_as_default")]
    pub destination_service_name: String,
    #[serde(
        rename = "DestinationServiceID",
        default,
        deserialize_with = "null_as_default"
    )]
    pub destination_service_id: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub local_service_address: String,
    #[serde(default)]
    pub local_service_port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    pub config: BTreeMap<String, Value>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub upstreams: Vec<Upstream>,
    /// `transparent` (Consul 1.10+) asks the proxy to capture outbound traffic itself.
    #[serde(default, deserialize_with = "null_as_default")]
    pub mode: String,
    /// Consul 1.10+: the outbound listener's port and whether this service's instances may be
    /// dialed directly (absent or `{}` in every other case).
    #[serde(default, deserialize_with = "null_as_default")]
    pub transparent_proxy: TransparentProxy,
    /// Paths of the local app served without mTLS (health checks, metrics). 1.16.3 sends
    /// `"Expose": {}` when nothing is exposed, 1.8.7 leaves it out.
    #[serde(default, deserialize_with = "null_as_default")]
    pub expose: Expose,
    /// `AccessLogs` (Consul 1.15+, from proxy-defaults or the registration), as sent; read by
    /// `model::access_logs`.
    #[serde(default)]
    pub access_logs: Value,
}

/// `Proxy.TransparentProxy`. `OutboundListenerPort` 0 means Consul's default, 15001.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct TransparentProxy {
    #[serde(default, deserialize_with = "null_as_default")]
    pub outbound_listener_port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    pub dialed_directly: bool,
}

/// `/v1/internal/ui/service-topology/:service` (Consul 1.10+, blocking): Consul's own
/// computation of what this service may reach by intentions or the default policy (the
/// "intention upstreams" its proxycfg gives Envoy in transparent mode; no public endpoint
/// serves that list alone), with explicit upstreams merged in.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceTopology {
    #[serde(default, deserialize_with = "null_as_default")]
    pub upstreams: Vec<TopologyService>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct TopologyService {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub datacenter: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub intention: TopologyIntention,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct TopologyIntention {
    #[serde(default, deserialize_with = "null_as_default")]
    pub allowed: bool,
}

impl ServiceTopology {
    /// The services an intention (or the default policy) lets this one reach, sorted, each
    /// once; a denied one is not listed by Consul, and is left out here too if it were.
    pub fn allowed(&self) -> Vec<String> {
        let mut out: Vec<String> = self
            .upstreams
            .iter()
            .filter(|u| u.intention.allowed && !u.name.is_empty())
            .map(|u| u.name.clone())
            .collect();
        out.sort();
        out.dedup();
        out
    }
}

/// Transparent mode's part of the `mesh` config entry (read from the list `client::MESH_PATH`
/// answers, `consul::mesh_entry`; none written is Consul's defaults).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct MeshEntry {
    #[serde(default, deserialize_with = "null_as_default")]
    pub transparent_proxy: MeshTransparentProxy,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct MeshTransparentProxy {
    /// Refuse outbound connections to anything that is not a mesh service.
    #[serde(default, deserialize_with = "null_as_default")]
    pub mesh_destinations_only: bool,
}

/// `Proxy.Expose`. With `Checks`, neither 1.8.7 nor 1.16.3 lists the checks' paths here (both
/// send `{"Checks": true}` only): they are read from the agent's checks (`AgentCheck`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Expose {
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks: bool,
    #[serde(default, deserialize_with = "null_as_default")]
    pub paths: Vec<ExposePath>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ExposePath {
    #[serde(default)]
    pub listener_port: u16,
    #[serde(default, deserialize_with = "null_as_default")]
    pub path: String,
    #[serde(default)]
    pub local_path_port: u16,
    /// `http` (the default) or `http2`.
    #[serde(default, deserialize_with = "null_as_default")]
    pub protocol: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub parsed_from_check: bool,
}

/// One value of `/v1/agent/checks`. With `Expose.Checks` the agent runs an HTTP/gRPC check
/// against the sidecar's exposed listener, but says where only partly: 1.16.3 gives the
/// listener's port (`ExposedPort`), 1.8.7 nothing, and neither the check's target (`Definition`
/// is `{}` in both); the URL the check last requested appears in its `Output`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AgentCheck {
    #[serde(rename = "CheckID", default, deserialize_with = "null_as_default")]
    pub check_id: String,
    #[serde(rename = "ServiceID", default, deserialize_with = "null_as_default")]
    pub service_id: String,
    #[serde(rename = "Type", default, deserialize_with = "null_as_default")]
    pub kind: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub status: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub output: String,
    /// Consul 1.10+; `0` or absent before.
    #[serde(default, deserialize_with = "null_as_default")]
    pub exposed_port: u16,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Upstream {
    #[serde(default, deserialize_with = "null_as_default")]
    pub destination_type: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub destination_namespace: String,
    pub destination_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub datacenter: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub local_bind_address: String,
    #[serde(default)]
    pub local_bind_port: u16,
    /// Consul 1.10+: listen on this unix socket instead of an address and port.
    #[serde(default, deserialize_with = "null_as_default")]
    pub local_bind_socket_path: String,
    /// The socket's permissions, octal (`0660`).
    #[serde(default, deserialize_with = "null_as_default")]
    pub local_bind_socket_mode: String,
    /// Consul 1.13+: the destination is a service of this cluster peer.
    #[serde(default, deserialize_with = "null_as_default")]
    pub destination_peer: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub config: BTreeMap<String, Value>,
}

/// `/v1/agent/connect/ca/leaf/:service`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct LeafCert {
    #[serde(default)]
    pub serial_number: String,
    #[serde(rename = "CertPEM")]
    pub cert_pem: String,
    #[serde(rename = "PrivateKeyPEM")]
    pub private_key_pem: String,
    #[serde(default)]
    pub service: String,
    #[serde(rename = "ServiceURI", default)]
    pub service_uri: String,
    #[serde(default)]
    pub valid_after: String,
    #[serde(default)]
    pub valid_before: String,
    #[serde(default)]
    pub modify_index: u64,
}

/// `/v1/agent/connect/ca/roots`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CaRoots {
    #[serde(rename = "ActiveRootID", default)]
    pub active_root_id: String,
    #[serde(default)]
    pub trust_domain: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub roots: Vec<CaRoot>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct CaRoot {
    #[serde(rename = "ID", default)]
    pub id: String,
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub root_cert: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub intermediate_certs: Vec<String>,
    #[serde(default)]
    pub active: bool,
}

/// One entry of `/v1/health/connect/:service` (and of a prepared query's `Nodes`).
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthEntry {
    pub node: HealthNode,
    pub service: HealthService,
    #[serde(default, deserialize_with = "null_as_default")]
    pub checks: Vec<HealthCheck>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthNode {
    #[serde(default)]
    pub node: String,
    #[serde(default)]
    pub address: String,
    #[serde(default)]
    pub datacenter: String,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthService {
    #[serde(rename = "ID")]
    pub id: String,
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub address: String,
    #[serde(default)]
    pub port: u16,
    #[serde(default)]
    pub weights: Option<Weights>,
    /// Set on connect-proxy instances: which service the instance fronts.
    #[serde(default)]
    pub proxy: Option<InstanceProxy>,
    /// `consul-virtual` (Consul 1.10+: the service's virtual IP, the same on every instance of
    /// its proxies), `lan_ipv4`, … each `{"Address", "Port"}`; kept loose, read where used.
    #[serde(default, deserialize_with = "null_as_default")]
    pub tagged_addresses: BTreeMap<String, Value>,
}

impl HealthService {
    /// The service's virtual IP as Consul tags it (`consul-virtual`), unparsed.
    pub fn virtual_ip(&self) -> Option<&str> {
        self.tagged_addresses
            .get("consul-virtual")?
            .get("Address")?
            .as_str()
            .filter(|a| !a.is_empty())
    }
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct InstanceProxy {
    #[serde(default, deserialize_with = "null_as_default")]
    pub destination_service_name: String,
    /// Consul 1.10+: whether the instance may be dialed at its own address (transparent mode).
    #[serde(default, deserialize_with = "null_as_default")]
    pub transparent_proxy: TransparentProxy,
    /// The port the fronted service registered (what an app dials at the instance's own
    /// address when `DialedDirectly` allows it).
    #[serde(default, deserialize_with = "null_as_default")]
    pub local_service_port: u16,
}

/// A `service-defaults` config entry, for its `Destination` only (a terminating gateway's
/// external address, Consul 1.13+): transparent mode names it.
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceDefaultsEntry {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default)]
    pub destination: Option<ServiceDestination>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceDestination {
    #[serde(default, deserialize_with = "null_as_default")]
    pub addresses: Vec<String>,
    #[serde(default, deserialize_with = "null_as_default")]
    pub port: u16,
}

#[derive(Clone, Copy, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Weights {
    #[serde(default)]
    pub passing: u32,
    #[serde(default)]
    pub warning: u32,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct HealthCheck {
    #[serde(default)]
    pub status: String,
}

/// `/v1/query/:name/execute`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct QueryResult {
    #[serde(default)]
    pub service: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub nodes: Vec<HealthEntry>,
    #[serde(default)]
    pub datacenter: String,
}

/// One entry of `/v1/connect/intentions` (the list, which blocks on an index). Consul 1.9+
/// adds partitions, peers and L7 permissions; entries written as config entries (1.16) have
/// no `ID`, and an L7 source has `Permissions` and no `Action`.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct IntentionEntry {
    #[serde(rename = "SourceNS", default, deserialize_with = "null_as_default")]
    pub source_ns: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub source_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub source_partition: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub source_peer: String,
    #[serde(
        rename = "DestinationNS",
        default,
        deserialize_with = "null_as_default"
    )]
    pub destination_ns: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub destination_partition: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub destination_name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub action: String,
    /// HTTP permissions, kept as Consul sent them.
    #[serde(default, deserialize_with = "null_as_default")]
    pub permissions: Vec<Value>,
    /// The service-intentions entry's top-level `JWT` requirement (Consul 1.16), which the
    /// list copies onto each of its intentions; `null` when none.
    #[serde(rename = "JWT", default)]
    pub jwt: Value,
    #[serde(default)]
    pub precedence: i64,
}

impl IntentionEntry {
    /// Whether this intention or one of its permissions names a JWT provider (Consul 1.16).
    pub fn needs_jwt(&self) -> bool {
        let named = |v: &Value| {
            v.get("Providers")
                .and_then(Value::as_array)
                .is_some_and(|p| !p.is_empty())
        };
        named(&self.jwt)
            || self
                .permissions
                .iter()
                .any(|p| p.get("JWT").is_some_and(named))
    }
}

/// `/v1/config/jwt-provider`: the entries as Consul sent them (parsed, and judged, by
/// `spoe::authz::jwt::Provider`), and each local JWKS file they name, read by the watcher:
/// its text, or why it could not be read; and the last key set fetched from each remote JWKS
/// URI they name (`consul::jwks`), kept when the entries change.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct JwtProviders {
    pub entries: Vec<Value>,
    pub files: BTreeMap<String, Result<String, String>>,
    /// Remote JWKS URI → the last key set fetched from it. A URI is absent until a fetch of
    /// it succeeded; a failed fetch leaves the last good text in place.
    pub remote: BTreeMap<String, String>,
}

/// The part of `/v1/agent/self` that tells the ACL default policy. Consul 1.8 has it at
/// `DebugConfig.ACLDefaultPolicy`, 1.11+ at `DebugConfig.ACLResolverSettings.ACLDefaultPolicy`
/// (and 1.10+ also in the `X-Consul-Default-Acl-Policy` header of every answer).
#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct AgentSelf {
    #[serde(default)]
    pub debug_config: AclConfig,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct AclConfig {
    #[serde(rename = "ACLsEnabled", default)]
    pub acls_enabled: bool,
    #[serde(rename = "ACLDefaultPolicy", default)]
    pub acl_default_policy: Option<String>,
    #[serde(rename = "ACLResolverSettings", default)]
    pub acl_resolver_settings: Option<AclResolverSettings>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq, Eq)]
pub struct AclResolverSettings {
    #[serde(rename = "ACLDefaultPolicy", default)]
    pub acl_default_policy: Option<String>,
}

impl AgentSelf {
    /// The policy as the agent spells it (`allow` with ACLs off), or `None` when this answer
    /// does not say where either Consul version puts it.
    pub fn default_policy(&self) -> Option<String> {
        let c = &self.debug_config;
        if !c.acls_enabled {
            return Some("allow".into());
        }
        c.acl_resolver_settings
            .as_ref()
            .and_then(|r| r.acl_default_policy.clone())
            .or_else(|| c.acl_default_policy.clone())
    }
}

/// Parses a Consul answer, naming the endpoint and the problem when it does not fit.
/// One `exported-services` config entry (`/v1/config/exported-services`, a list): which
/// services of a partition its peers (or other partitions) may reach, through a mesh gateway.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExportedServicesEntry {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub partition: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub services: Vec<ExportedService>,
}

#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ExportedService {
    #[serde(default, deserialize_with = "null_as_default")]
    pub name: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub namespace: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub consumers: Vec<ServiceConsumer>,
}

/// Who may reach an exported service: a peer, a partition or a sameness group.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct ServiceConsumer {
    #[serde(default, deserialize_with = "null_as_default")]
    pub peer: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub partition: String,
    #[serde(default, deserialize_with = "null_as_default")]
    pub sameness_group: String,
}

pub fn parse<T: serde::de::DeserializeOwned>(what: &str, body: &str) -> crate::error::Result<T> {
    serde_json::from_str(body).map_err(|e| {
        crate::error::Error::msg(format!(
            "Consul's answer to {what} is not what the sidecar expects ({e}); first bytes: {:?}",
            body.chars().take(120).collect::<String>()
        ))
    })
}
