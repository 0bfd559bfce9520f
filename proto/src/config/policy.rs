//! Snapshot sections for trust and resilience: peers with trust levels, permissions and rate
//! limits; trust defaults; circuit breaker, retry and rate-limit settings.

use serde::{Deserialize, Serialize};

/// A peer main relay (main relays only). Of two peers, the one with the smaller node id dials.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerRelay {
    /// Its node id.
    pub node_id: String,
    /// Its QUIC address: `ip:port`, or `host:port` looked up at every dial (a name that
    /// moves is followed on the next reconnect).
    pub endpoint: String,
    /// Further addresses (`Peer.spec.endpoints` after the first), tried in turn after a failed
    /// dial.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fallback_endpoints: Vec<String>,
    /// How a relay of another trust domain is recognised; `None`: our CA vouches for it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pin: Option<PeerPin>,
    /// How much it is trusted.
    #[serde(default = "trusted")]
    pub trust_level: TrustLevel,
    /// What it may call and export (default: the policy's `defaultPermissions` for verified
    /// peers; everything for trusted ones).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<Permissions>,
    /// Rate limit for streams it forwards (default: `resilience.rateLimit`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
}

/// The pinned identity of a peer main relay of another trust domain (docs/protocol.md §2.3):
/// its certificate must name `<node id>.<trust domain>` and chain to a CA of `ca_bundle`, or
/// to a CA certificate it presents whose public key has one of `fingerprints`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PeerPin {
    /// The peer federation's trust domain.
    pub trust_domain: String,
    /// PEM CA certificates that issue its certificates.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ca_bundle: Option<String>,
    /// `sha256:<64 hex>` over the DER SubjectPublicKeyInfo of its CA (two during a rotation).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub fingerprints: Vec<String>,
}

/// A peer federation of another trust domain as a home sees it (home nodes): the main relays
/// through which its homes are reached and how its certificates are recognised. A destination
/// behind one of `relays` shows a certificate of `pin.trustDomain` (docs/protocol.md §6).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PartnerFederation {
    /// Its main relays that peer with ours.
    pub relays: Vec<String>,
    /// Its trust domain and pinned CA.
    pub pin: PeerPin,
}

/// `host:port` split into its parts (`[v6]:port` too); `None` when the port is missing or not
/// a number, or the host is empty.
pub fn split_endpoint(endpoint: &str) -> Option<(&str, u16)> {
    let (host, port) = endpoint.rsplit_once(':')?;
    let host = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')).unwrap_or(host);
    (!host.is_empty()).then_some(())?;
    Some((host, port.parse().ok()?))
}

/// The 32 bytes of a `sha256:<64 lowercase hex>` fingerprint.
pub fn parse_fingerprint(s: &str) -> Option<[u8; 32]> {
    let hex = s.strip_prefix("sha256:")?;
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b)) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The `sha256:<64 hex>` fingerprint of `bytes` (a DER SubjectPublicKeyInfo).
pub fn fingerprint(bytes: &[u8]) -> String {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(bytes);
    let hex: String = digest.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256:{hex}")
}

fn trusted() -> TrustLevel {
    TrustLevel::Trusted
}

/// Trust levels (mirror `Peer.spec.trustLevel`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TrustLevel {
    /// Everything allowed unless `permissions` narrows it.
    Trusted,
    /// `permissions`, or the policy's `defaultPermissions`.
    Verified,
    /// Refused under `rejectUnknown`; otherwise `defaultPermissions`.
    #[default]
    Unknown,
    /// Always refused.
    Blocked,
}

/// Service name patterns: `*`, `prefix*`, or an exact name.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Permissions {
    /// Services the peer may call.
    #[serde(default)]
    pub call: Vec<String>,
    /// Services the peer may export into our registry.
    #[serde(default)]
    pub export: Vec<String>,
}

impl Permissions {
    /// Whether any of `patterns` matches `service`.
    pub fn matches(patterns: &[String], service: &str) -> bool {
        patterns
            .iter()
            .any(|p| p == "*" || p == service || p.strip_suffix('*').is_some_and(|pre| service.starts_with(pre)))
    }
}

/// A token-bucket rate limit for new streams.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RateLimit {
    /// Sustained streams per second.
    pub streams_per_second: f64,
    /// Burst size.
    pub burst: f64,
}

/// Trust defaults (relays).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Trust {
    /// Refuse any node that is neither a configured peer nor in `knownNodes`, before routing.
    #[serde(default)]
    pub reject_unknown: bool,
    /// Home nodes this relay expects (ignored unless `rejectUnknown`).
    #[serde(default)]
    pub known_nodes: Vec<String>,
    /// Permissions of verified peers without their own.
    #[serde(default)]
    pub default_permissions: Permissions,
    /// The home nodes the plan assigns to this main relay, each with the `service:port`
    /// exports it may register (main relays). When set, any other home is refused, only
    /// granted exports are registered, and a home's certificate must bind the Noise key it
    /// registers. Absent (a hand-written snapshot): homes the other rules admit register
    /// what they like, with any Noise key their certificate does not contradict.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub homes: Option<std::collections::BTreeMap<String, Vec<String>>>,
}

/// Circuit breaker settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CircuitBreakerConfig {
    /// Consecutive failures that open the circuit.
    #[serde(default = "cb_consecutive")]
    pub consecutive_failures: u32,
    /// Failure share over the window that opens it.
    #[serde(default = "cb_rate")]
    pub failure_rate: f64,
    /// Window in milliseconds.
    #[serde(default = "cb_window")]
    pub window_ms: u64,
    /// How long it stays open, in milliseconds.
    #[serde(default = "cb_open")]
    pub open_ms: u64,
    /// Probes while half-open.
    #[serde(default = "cb_probes")]
    pub half_open_probes: u32,
}

impl Default for CircuitBreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: cb_consecutive(),
            failure_rate: cb_rate(),
            window_ms: cb_window(),
            open_ms: cb_open(),
            half_open_probes: cb_probes(),
        }
    }
}

fn cb_consecutive() -> u32 {
    5
}
fn cb_rate() -> f64 {
    0.5
}
fn cb_window() -> u64 {
    30_000
}
fn cb_open() -> u64 {
    30_000
}
fn cb_probes() -> u32 {
    3
}

/// Retry settings: only stream setups that delivered no payload byte are retried.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct RetryConfig {
    /// Attempts including the first.
    #[serde(default = "retry_attempts")]
    pub max_attempts: u32,
    /// First backoff ceiling, milliseconds.
    #[serde(default = "retry_initial")]
    pub initial_backoff_ms: u64,
    /// Largest backoff ceiling, milliseconds.
    #[serde(default = "retry_max")]
    pub max_backoff_ms: u64,
}

impl Default for RetryConfig {
    fn default() -> Self {
        Self { max_attempts: retry_attempts(), initial_backoff_ms: retry_initial(), max_backoff_ms: retry_max() }
    }
}

fn retry_attempts() -> u32 {
    3
}
fn retry_initial() -> u64 {
    100
}
fn retry_max() -> u64 {
    5_000
}

/// Resilience settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Resilience {
    /// Default per-sender rate limit at relays (none: unlimited).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Circuit breakers (per instance at homes, per peer at relays).
    #[serde(default)]
    pub circuit_breaker: CircuitBreakerConfig,
    /// Stream-setup retries at homes.
    #[serde(default)]
    pub retry: RetryConfig,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn endpoints_and_fingerprints_parse_as_documented() {
        assert_eq!(split_endpoint("relay.partner.example:4433"), Some(("relay.partner.example", 4433)));
        assert_eq!(split_endpoint("10.0.0.1:1"), Some(("10.0.0.1", 1)));
        assert_eq!(split_endpoint("[::1]:7"), Some(("::1", 7)));
        for bad in ["nohost", ":80", "h:", "h:70000", "h:x"] {
            assert_eq!(split_endpoint(bad), None, "{bad}");
        }
        let f = fingerprint(b"spki");
        assert_eq!(parse_fingerprint(&f).map(|b| fingerprint_of_bytes(&b)), Some(f.clone()));
        assert_eq!(parse_fingerprint(&f.to_uppercase()), None, "lowercase hex only");
        assert_eq!(parse_fingerprint("sha256:00"), None);
        assert_eq!(parse_fingerprint(&f.replace("sha256:", "sha1:")), None);
    }

    fn fingerprint_of_bytes(b: &[u8; 32]) -> String {
        format!("sha256:{}", b.iter().map(|x| format!("{x:02x}")).collect::<String>())
    }

    proptest! {
        #[test]
        fn no_input_panics_and_fingerprints_round_trip(s in ".{0,80}", bytes in proptest::array::uniform32(any::<u8>())) {
            let _ = split_endpoint(&s);
            let _ = parse_fingerprint(&s);
            prop_assert_eq!(parse_fingerprint(&fingerprint_of_bytes(&bytes)), Some(bytes));
        }
    }
}
