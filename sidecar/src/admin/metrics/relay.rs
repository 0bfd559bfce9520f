//! `relayfed_relay_*`: what only a main relay does — admit homes and peers, route and relay
//! streams, open ECH route headers, keep the federated registry.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

use super::L1;

/// The labels of a relay's breaker toward a `peer` main relay.
pub type PeerLabel = [(&'static str, String); 1];

/// The main relay families.
pub struct Relay {
    /// Streams refused by rate limiting, by `sender_kind` (home, peer, probe); the senders
    /// themselves are in [`super::Metrics::top_rate_limited`] (bounded cardinality).
    pub rate_limited: Family<L1, Counter>,
    /// Trust denials by `rule` (reject_unknown, blocked, call_permission, export_permission,
    /// node_id_collision, export_not_planned).
    pub trust_denials: Family<L1, Counter>,
    /// Routing decisions by `result` (local, forwarded, no_route, circuit_open,
    /// peer_unreachable).
    pub routes: Family<L1, Counter>,
    /// Registry entries by `kind` (local, federated).
    pub registry_entries: Family<L1, Gauge>,
    /// Distinct services this relay's homes export (its ECH anonymity set).
    pub ech_anonymity_set: Gauge,
    /// Registry propagation events by `event` (delta_sent, delta_applied, delta_stale,
    /// delta_forged, refresh_sent, refresh_applied, expired, withdrawn, view_sent).
    pub propagation: Family<L1, Counter>,
    /// Peer health: 1 when up, by `peer`.
    pub peer_up: Family<PeerLabel, Gauge>,
    /// Smoothed round-trip time of the QUIC connection to each `peer` (absent while down),
    /// refreshed at every health ping.
    pub peer_rtt: Family<PeerLabel, Gauge<f64, std::sync::atomic::AtomicU64>>,
    /// Reconnections to peer main relays.
    pub peer_reconnects: Counter,
    /// Circuit breaker state toward each `peer` (0 closed, 1 open, 2 half-open).
    pub circuit_state: Family<PeerLabel, Gauge>,
    /// ECH route headers by `outcome` (opened, retry_sent, decrypt_failed).
    pub ech: Family<L1, Counter>,
    /// Route headers received by `envelope` (plain, sealed, grease): after an ECH rollout
    /// reaches 100%, plain stops growing.
    pub route_headers: Family<L1, Counter>,
    /// Payload bytes relayed (both directions).
    pub bytes: Counter,
    /// Relayed streams by `result` (ok, error): error when either side's copy failed.
    pub streams: Family<L1, Counter>,
    /// Relayed or refused stream failures by structured error `code`.
    pub stream_errors: Family<L1, Counter>,
    /// Direct-path punch requests by `result` (coordinated, forwarded, disabled,
    /// not_connected, not_permitted, peer_unreachable).
    pub punches: Family<L1, Counter>,
    /// Homes taking part in direct paths at this relay.
    pub direct_parties: Gauge,
}

impl Relay {
    /// Creates the families, registers them in `r` (prefix `relayfed_relay`) and exports
    /// those with known label values from the start with zeros.
    pub(super) fn register(r: &mut Registry) -> Self {
        let m = Self {
            rate_limited: Family::default(),
            trust_denials: Family::default(),
            routes: Family::default(),
            registry_entries: Family::default(),
            ech_anonymity_set: Gauge::default(),
            propagation: Family::default(),
            peer_up: Family::default(),
            peer_rtt: Family::default(),
            peer_reconnects: Counter::default(),
            circuit_state: Family::default(),
            ech: Family::default(),
            route_headers: Family::default(),
            bytes: Counter::default(),
            streams: Family::default(),
            stream_errors: Family::default(),
            punches: Family::default(),
            direct_parties: Gauge::default(),
        };
        r.register(
            "rate_limited_streams",
            "Streams refused by rate limiting, by kind of sender (home, peer, probe)",
            m.rate_limited.clone(),
        );
        r.register("trust_denials", "Peers, homes, calls or exports denied by trust rules", m.trust_denials.clone());
        r.register("routes", "Routing decisions by result", m.routes.clone());
        r.register("registry_entries", "Registry entries by kind (local, federated)", m.registry_entries.clone());
        r.register(
            "ech_anonymity_set_services",
            "Distinct services the main relay's homes export: what a stream sealed to it could be for",
            m.ech_anonymity_set.clone(),
        );
        r.register("registry_propagation", "Registry propagation events", m.propagation.clone());
        r.register("peer_up", "1 when the peering is up", m.peer_up.clone());
        r.register("peer_rtt_seconds", "Round-trip time to each peer main relay", m.peer_rtt.clone());
        r.register("peer_reconnects", "Reconnections to peer main relays", m.peer_reconnects.clone());
        r.register(
            "circuit_state",
            "Circuit breaker state toward each peer: 0 closed, 1 open, 2 half-open",
            m.circuit_state.clone(),
        );
        r.register("ech_streams", "ECH route headers by outcome", m.ech.clone());
        r.register(
            "route_headers",
            "Route headers received by envelope (plain, sealed, grease)",
            m.route_headers.clone(),
        );
        r.register("payload_bytes", "Payload bytes relayed, both directions", m.bytes.clone());
        r.register("streams", "Relayed streams by result", m.streams.clone());
        r.register(
            "stream_errors",
            "Relayed or refused stream failures by structured error code",
            m.stream_errors.clone(),
        );
        r.register("punches", "Direct-path punch requests by result", m.punches.clone());
        r.register("direct_parties", "Homes taking part in direct paths at this relay", m.direct_parties.clone());
        for result in ["coordinated", "forwarded", "disabled", "not_connected", "not_permitted", "peer_unreachable"] {
            let _ = m.punches.get_or_create(&[("result", result)]);
        }
        for o in ["opened", "retry_sent", "decrypt_failed"] {
            let _ = m.ech.get_or_create(&[("outcome", o)]);
        }
        for e in ["plain", "sealed", "grease"] {
            let _ = m.route_headers.get_or_create(&[("envelope", e)]);
        }
        for result in ["ok", "error"] {
            let _ = m.streams.get_or_create(&[("result", result)]);
        }
        for code in crate::protocol::ErrorCode::ALL {
            let _ = m.stream_errors.get_or_create(&[("code", code.label())]);
        }
        for k in ["home", "peer", "probe"] {
            let _ = m.rate_limited.get_or_create(&[("sender_kind", k)]);
        }
        for rule in [
            "reject_unknown",
            "blocked",
            "call_permission",
            "export_permission",
            "node_id_collision",
            "export_not_planned",
        ] {
            let _ = m.trust_denials.get_or_create(&[("rule", rule)]);
        }
        m
    }
}
