//! The config snapshot: everything a relay or home node needs, in one typed, validated value.
//!
//! This is the schema the operator (and local mode) emits; `relayfed-proxy` reads it from a
//! YAML or JSON file. Validation happens once, at load, before any port is bound; every
//! message names the field. Documented field by field in docs/protocol.md §8.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::federation::ech_policy::EchPolicy;

mod validate;

pub mod direct;
pub mod keys;
pub mod keystore;
pub mod policy;

pub use policy::{
    CircuitBreakerConfig, PartnerFederation, PeerPin, PeerRelay, Permissions, RateLimit, Resilience, RetryConfig,
    Trust, TrustLevel,
};

/// Snapshot schema version understood here.
pub const SNAPSHOT_SCHEMA: u32 = 1;

/// Why a snapshot was refused.
#[derive(Debug, Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// File.
        path: PathBuf,
        /// Cause.
        source: std::io::Error,
    },
    /// The file is not a valid snapshot document.
    #[error("{path}: {reason}")]
    Parse {
        /// File.
        path: PathBuf,
        /// What the parser said (names the field).
        reason: String,
    },
    /// The snapshot is well-formed but inconsistent.
    #[error("invalid config snapshot: {field}: {reason}")]
    Invalid {
        /// Offending field.
        field: String,
        /// Why.
        reason: String,
    },
}

fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ConfigError {
    ConfigError::Invalid { field: field.into(), reason: reason.into() }
}

/// The role a process plays.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Role {
    /// Hub: accepts home nodes and routes between them.
    Main,
    /// Spoke: dials its main relay, imports and exports services.
    Home,
}

/// Identity of this node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NodeConfig {
    /// Node id (DNS label).
    pub id: String,
    /// Role.
    pub role: Role,
    /// Trust domain of the federation.
    pub trust_domain: String,
}

/// TLS material for hop connections (PEM files issued by the federation CA).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TlsFiles {
    /// Federation CA certificate(s).
    pub ca_file: PathBuf,
    /// This node's certificate.
    pub cert_file: PathBuf,
    /// This node's private key.
    pub key_file: PathBuf,
}

/// ECH keys of a main relay.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EchServerConfig {
    /// JSON key file written by `relayfed-proxy ech keygen` (current key, optional previous).
    pub key_file: PathBuf,
    /// Seconds the previous key stays valid after a rotation.
    #[serde(default = "default_grace")]
    pub grace_seconds: u64,
}

fn default_grace() -> u64 {
    3600
}

/// A main relay a home node may dial.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MainRelay {
    /// Node id.
    pub node_id: String,
    /// UDP address.
    pub endpoint: SocketAddr,
    /// Lower is preferred.
    #[serde(default)]
    pub priority: u16,
}

/// A local service offered to the federation.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Export {
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Where inbound streams are delivered.
    pub target: SocketAddr,
    /// Precede each delivered stream with a PROXY protocol v2 header naming the caller's
    /// authenticated identity (docs/protocol.md §6.1).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub proxy_protocol: bool,
}

impl Export {
    /// `service:port` delivered to `target`, without a PROXY header.
    pub fn new(service: impl Into<String>, port: u16, target: SocketAddr) -> Self {
        Self { service: service.into(), port, target, proxy_protocol: false }
    }
}

/// A federated service reachable on a local listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Import {
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Local TCP listener for unmodified clients.
    pub listen: SocketAddr,
    /// Destination home node; omit (with `main` and `noisePublicKey`) to resolve the service
    /// through the registry and load-balance across its instances.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
    /// Main relay the destination is attached to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub main: Option<String>,
    /// Destination's Noise static public key, base64 (32 bytes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_public_key: Option<String>,
    /// The imported service's address as apps dial it (its ClusterIP and port); connections
    /// redirected by `relayfed-proxy init` to this address are carried to this service.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cluster_ip: Option<SocketAddr>,
}

impl Import {
    /// An import of `service:port` on `listen`, resolved through the registry (no fixed
    /// destination, no ClusterIP).
    pub fn resolved(service: &str, port: u16, listen: SocketAddr) -> Self {
        Self {
            service: service.to_owned(),
            port,
            listen,
            node: None,
            main: None,
            noise_public_key: None,
            cluster_ip: None,
        }
    }

    /// An import of `service:port` on `listen`, sent to `node@main` with its Noise key.
    pub fn fixed(
        service: &str,
        port: u16,
        listen: SocketAddr,
        node: &str,
        main: &str,
        noise_public_key: String,
    ) -> Self {
        Self {
            node: Some(node.to_owned()),
            main: Some(main.to_owned()),
            noise_public_key: Some(noise_public_key),
            ..Self::resolved(service, port, listen)
        }
    }
}

/// What happens to an intercepted connection whose original destination is not an import.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Unmatched {
    /// Connect to the original destination directly (the proxy's uid is excluded from
    /// redirection, so this cannot loop). Istio's default (`ALLOW_ANY`).
    #[default]
    Passthrough,
    /// Reset the connection.
    Refuse,
}

/// Which outbound TCP the init step redirects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum InterceptScope {
    /// Only connections to the imports' `clusterIp` addresses.
    #[default]
    Imports,
    /// All outbound TCP, minus the exclusions.
    All,
}

/// Transparent interception (pods): the init step's rules and the outbound listener.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Intercept {
    /// Port of the outbound listener on loopback (IPv4 `127.0.0.1`, IPv6 `::1`).
    #[serde(default = "default_outbound_port")]
    pub outbound_port: u16,
    /// Uid the proxy runs as; its own traffic is never redirected.
    #[serde(default = "default_proxy_uid")]
    pub proxy_uid: u32,
    /// Which connections are redirected.
    #[serde(default)]
    pub scope: InterceptScope,
    /// Destination CIDRs never redirected (e.g. the API server).
    #[serde(default)]
    pub exclude_cidrs: Vec<String>,
    /// Destination ports never redirected.
    #[serde(default)]
    pub exclude_ports: Vec<u16>,
    /// Redirected connections that match no import.
    #[serde(default)]
    pub unmatched: Unmatched,
    /// Also install ip6tables rules and listen on `[::1]`.
    #[serde(default = "yes")]
    pub ipv6: bool,
}

fn default_health() -> u64 {
    30
}

fn default_outbound_port() -> u16 {
    15001
}
fn default_proxy_uid() -> u32 {
    1337
}
fn yes() -> bool {
    true
}

/// Registry timing (main relays).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RegistryConfig {
    /// Federated entries expire this long after the last delta or refresh from their owner.
    #[serde(default = "default_ttl")]
    pub ttl_seconds: u64,
    /// How often this relay refreshes its own entries at its peers (default: a third of the TTL).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub refresh_seconds: Option<u64>,
}

impl Default for RegistryConfig {
    fn default() -> Self {
        Self { ttl_seconds: default_ttl(), refresh_seconds: None }
    }
}

fn default_ttl() -> u64 {
    600
}

/// Load balancing (home nodes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct LoadBalancing {
    /// Algorithm for services without their own.
    #[serde(default)]
    pub default: Algorithm,
    /// Per-service algorithm.
    #[serde(default)]
    pub per_service: std::collections::BTreeMap<String, Algorithm>,
    /// Prefer instances on the caller's own main relay while any is healthy.
    #[serde(default = "yes")]
    pub prefer_local: bool,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        Self { default: Default::default(), per_service: Default::default(), prefer_local: true }
    }
}

/// Timeouts, in milliseconds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Timeouts {
    /// QUIC connection establishment.
    #[serde(default = "default_connect_ms")]
    pub connect_ms: u64,
    /// Route + Noise handshake of one attempt; a responder gives the initiator this long
    /// for the ROUTE frame and Noise messages 1 and 3.
    #[serde(default = "default_handshake_ms")]
    pub handshake_ms: u64,
    /// A caller's whole stream setup: resolve, route, handshake and retries on other instances.
    #[serde(default = "default_call_ms")]
    pub call_ms: u64,
    /// A hop link that hears nothing this long is dead (QUIC idle timeout; keep-alives every
    /// quarter of it, and the home's control-stream liveness pings at the same pace).
    #[serde(default = "default_idle_ms")]
    pub idle_ms: u64,
    /// A proxied stream with no payload in either direction for this long is closed.
    #[serde(default = "default_stream_idle_ms")]
    pub stream_idle_ms: u64,
}

fn default_stream_idle_ms() -> u64 {
    300_000
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect_ms: default_connect_ms(),
            handshake_ms: default_handshake_ms(),
            call_ms: default_call_ms(),
            idle_ms: default_idle_ms(),
            stream_idle_ms: default_stream_idle_ms(),
        }
    }
}

fn default_connect_ms() -> u64 {
    5_000
}
fn default_handshake_ms() -> u64 {
    5_000
}
fn default_idle_ms() -> u64 {
    1_000
}
fn default_call_ms() -> u64 {
    15_000
}

/// A complete config snapshot.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Snapshot {
    /// Schema version (must be 1).
    pub schema: u32,
    /// Monotonic version assigned by the producer.
    #[serde(default)]
    pub version: u64,
    /// This node.
    pub node: NodeConfig,
    /// Hop TLS material.
    pub tls: TlsFiles,
    /// QUIC listen address (main relays; home nodes bind an ephemeral port when absent).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listen: Option<SocketAddr>,
    /// Admin/metrics HTTP address.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub admin: Option<SocketAddr>,
    /// ECH keys (main relays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech: Option<EchServerConfig>,
    /// Main relays to dial (home nodes).
    #[serde(default)]
    pub main_relays: Vec<MainRelay>,
    /// Noise static private key file, base64 (home nodes).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub noise_key_file: Option<PathBuf>,
    /// Services offered (home nodes).
    #[serde(default)]
    pub exports: Vec<Export>,
    /// Services made reachable locally (home nodes).
    #[serde(default)]
    pub imports: Vec<Import>,
    /// ECH rollout (home nodes, as origin).
    #[serde(default)]
    pub ech_policy: EchPolicy,
    /// This main relay's published ECHConfigList with the federation CA's signature
    /// (docs/protocol.md §5.7), announced to peers in `peerHello` and passed on by them to
    /// their homes, which seal to it once the signature verifies (main relays).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_announcement: Option<SignedEchConfig>,
    /// The ECHConfigList (base64) of every main relay of the federation that has ECH keys, by
    /// node id (home nodes). The only ECH configs a home seals to: this snapshot comes from
    /// the CA-authenticated config distribution, so no relay on the path can substitute,
    /// omit or "retry" a key (docs/protocol.md §5). A main relay absent here has ECH
    /// switched off: `required` fails closed, `opportunistic` sends plain.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub ech_configs: std::collections::BTreeMap<String, String>,
    /// Peer main relays (main relays).
    #[serde(default)]
    pub peers: Vec<PeerRelay>,
    /// Peer federations of other trust domains (home nodes): their homes' certificates are
    /// verified by these pins.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub partners: Vec<PartnerFederation>,
    /// Registry timing (main relays).
    #[serde(default)]
    pub registry: RegistryConfig,
    /// Seconds between health checks of peers.
    #[serde(default = "default_health")]
    pub health_check_seconds: u64,
    /// Load balancing (home nodes).
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Trust defaults (relays).
    #[serde(default)]
    pub trust: Trust,
    /// Rate limits, circuit breakers, retries.
    #[serde(default)]
    pub resilience: Resilience,
    /// File holding the passphrase of encrypted key files (TLS key, Noise key, ECH keys).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_passphrase_file: Option<PathBuf>,
    /// Transparent interception (home nodes in pods).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub intercept: Option<Intercept>,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
    /// Direct paths between homes (absent: off).
    #[serde(default, skip_serializing_if = "direct::DirectPaths::is_default")]
    pub direct_paths: direct::DirectPaths,
}

impl Snapshot {
    /// Reads and validates a snapshot from a YAML or JSON file (relative paths in it are
    /// resolved against the file's directory).
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        let mut snap = Self::parse(&text).map_err(|reason| ConfigError::Parse { path: path.into(), reason })?;
        if let Some(dir) = path.parent() {
            snap.resolve_paths(dir);
        }
        snap.validate()?;
        Ok(snap)
    }

    /// Parses YAML or JSON (JSON is YAML); the error names the field.
    pub fn parse(text: &str) -> Result<Self, String> {
        let de = serde_saphyr::from_str::<serde_json::Value>(text).map_err(|e| e.to_string())?;
        serde_path_to_error::deserialize(de).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }

    /// Resolves relative key file paths against `dir` (the snapshot file's directory, or a
    /// workload sidecar's runtime directory).
    pub fn resolve_paths(&mut self, dir: &Path) {
        let fix = |p: &mut PathBuf| {
            if p.is_relative() {
                *p = dir.join(&*p);
            }
        };
        fix(&mut self.tls.ca_file);
        fix(&mut self.tls.cert_file);
        fix(&mut self.tls.key_file);
        if let Some(e) = &mut self.ech {
            fix(&mut e.key_file);
        }
        if let Some(k) = &mut self.noise_key_file {
            fix(k);
        }
        if let Some(k) = &mut self.key_passphrase_file {
            fix(k);
        }
    }

    /// The passphrase for encrypted key files, if one is configured (trailing newline removed).
    pub fn passphrase(&self) -> Result<Option<Vec<u8>>, ConfigError> {
        let Some(path) = &self.key_passphrase_file else { return Ok(None) };
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.clone(), source })?;
        Ok(Some(text.trim_end_matches(['\n', '\r']).as_bytes().to_vec()))
    }

    /// The fields that differ between `self` (in force) and `next` and that a running node
    /// cannot change in place: its identity, sockets, key files, exports/imports, main
    /// relays, registry timing and interception. Everything else (ECH policy, peers, trust,
    /// resilience, load balancing, per-stream timeouts) is applied live.
    pub fn restart_fields(&self, next: &Snapshot) -> Vec<&'static str> {
        let mut out = Vec::new();
        let mut check = |name: &'static str, same: bool| {
            if !same {
                out.push(name);
            }
        };
        check("node", self.node == next.node);
        check("tls", self.tls == next.tls);
        check("listen", self.listen == next.listen);
        check("admin", self.admin == next.admin);
        check("ech", self.ech == next.ech);
        check("mainRelays", self.main_relays == next.main_relays);
        check("noiseKeyFile", self.noise_key_file == next.noise_key_file);
        check("exports", self.exports == next.exports);
        check("imports", self.imports == next.imports);
        check("registry", self.registry == next.registry);
        check("healthCheckSeconds", self.health_check_seconds == next.health_check_seconds);
        check("keyPassphraseFile", self.key_passphrase_file == next.key_passphrase_file);
        check("intercept", self.intercept == next.intercept);
        check("timeouts.idleMs", self.timeouts.idle_ms == next.timeouts.idle_ms);
        out
    }

    /// The decoded `echConfigs` (entries that do not decode are left out; `validate` refuses
    /// them at load).
    pub fn ech_config_lists(&self) -> std::collections::HashMap<String, crate::protocol::EchConfigList> {
        self.ech_configs
            .iter()
            .filter_map(|(main, list)| {
                let parsed = crate::protocol::EchConfigList::decode(&base64_decode(list)?).ok()?;
                Some((main.clone(), parsed))
            })
            .collect()
    }
}

/// An ECHConfigList and the federation CA's signature over it (docs/protocol.md §5.7).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct SignedEchConfig {
    /// The ECHConfigList, base64.
    pub ech_config_list: String,
    /// ECDSA P-256 / SHA-256 signature (ASN.1 DER), base64.
    pub signature: String,
}

/// Standard base64 decode.
pub fn base64_decode(s: &str) -> Option<Vec<u8>> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.decode(s.trim()).ok()
}

/// Standard base64 encode.
pub fn base64_encode(b: &[u8]) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(b)
}

/// Decodes a base64 32-byte key.
pub fn decode_key32(s: &str) -> Option<[u8; 32]> {
    base64_decode(s)?.try_into().ok()
}

/// How a home chooses among a service's instances (`loadBalancing` in a snapshot).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Algorithm {
    /// In turn.
    RoundRobin,
    /// Fewest streams in flight.
    LeastConnections,
    /// Uniformly at random.
    Random,
    /// Two random candidates, the one with the lower peak-EWMA latency × (in-flight + 1).
    #[default]
    PeakEwma,
}

#[cfg(test)]
mod tests {
    use super::*;

    const HOME: &str = r#"
schema: 1
node: {id: shop-eu, role: home, trustDomain: acme.example}
tls: {caFile: ca.pem, certFile: node.pem, keyFile: node.key}
mainRelays: [{nodeId: hub-eu, endpoint: "127.0.0.1:7401"}]
noiseKeyFile: noise.key
imports:
  - {service: payments, port: 9090, listen: "127.0.0.1:19190", node: pay-us, main: hub-us, noisePublicKey: "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA="}
echPolicy: {enabled: true, percentage: 25}
"#;

    #[test]
    fn a_home_snapshot_parses_and_validates() {
        let s = Snapshot::parse(HOME).unwrap();
        s.validate().unwrap();
        assert_eq!(s.imports[0].listen.port(), 19190);
        assert_eq!(s.timeouts.connect_ms, 5000);
    }

    #[test]
    fn restart_fields_name_what_cannot_change_live() {
        let a = Snapshot::parse(HOME).unwrap();
        let mut b = a.clone();
        b.version = 9;
        b.ech_policy.percentage = 100;
        b.resilience.retry.max_attempts = 1;
        assert!(a.restart_fields(&b).is_empty(), "policy and resilience apply live");
        b.imports[0].listen = "127.0.0.1:1".parse().unwrap();
        b.timeouts.idle_ms = 1;
        assert_eq!(a.restart_fields(&b), ["imports", "timeouts.idleMs"]);
    }

    #[test]
    fn errors_name_the_field() {
        let e = Snapshot::parse(&HOME.replace("percentage: 25", "percentag: 25")).unwrap_err();
        assert!(e.contains("echPolicy") && e.contains("percentag"), "{e}");
        let e = Snapshot::parse(&HOME.replace("\"127.0.0.1:19190\"", "\"nowhere\"")).unwrap_err();
        assert!(e.contains("imports[0].listen"), "{e}");
        let mut s = Snapshot::parse(HOME).unwrap();
        s.imports[0].noise_public_key = Some("short".into());
        assert!(s.validate().unwrap_err().to_string().contains("imports[0].noisePublicKey"));
        s.main_relays.clear();
        s.imports.clear();
        assert!(s.validate().unwrap_err().to_string().contains("mainRelays"));
    }
}
