//! Every data-plane metric, registered in one place, each family for the roles it belongs to
//! ([`Metrics::for_role`]). Names follow `relayfed_<what>_<unit>`; counters get `_total` from
//! the encoder. docs/operations.md "Metrics" lists them all.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::Role;

/// How many senders [`Metrics::rate_limited`] keeps counts for.
pub const MAX_TRACKED_SENDERS: usize = 1000;

/// The labels of a circuit breaker: at homes a service instance (`service`, its home
/// `destination` and that home's `destination_main`), at relays a peer (`service` empty,
/// `destination` and `destination_main` the peer).
pub type Breaker = [(&'static str, String); 3];

/// The labels of an instance's breaker.
pub fn instance_breaker(service: &str, node: &str, main: &str) -> Breaker {
    [("service", service.to_owned()), ("destination", node.to_owned()), ("destination_main", main.to_owned())]
}

/// The labels of a finished call: `side` (origin, destination), `service`, `source_main`,
/// `destination_main` (main relay ids of the plan, `other` for an id the plan does not name,
/// `none` when unknown), `ech` (true, false) and `code` (`OK` or an error code label).
pub type CallLabels = [(&'static str, String); 6];

/// The labels of a call's setup latency: `service`, `destination_main`, `ech`.
pub type SetupLabels = [(&'static str, String); 3];

/// A finished call, as the cross-cluster SLO metrics count it.
#[derive(Clone, Copy, Debug)]
pub struct Call<'a> {
    /// `origin` (the calling home) or `destination` (the serving home).
    pub side: &'static str,
    /// The service called.
    pub service: &'a str,
    /// The caller's main relay.
    pub source_main: &'a str,
    /// The serving home's main relay.
    pub destination_main: &'a str,
    /// Whether the route was sealed with ECH.
    pub ech: bool,
    /// `None`: the call ended cleanly.
    pub code: Option<crate::protocol::ErrorCode>,
}

/// One label.
pub type L1 = [(&'static str, &'static str); 1];
/// Two labels.
pub type L2 = [(&'static str, &'static str); 2];

/// Registers `metric` when `on` (the family belongs to this node's role).
fn reg(registry: &mut Registry, on: bool, name: &str, help: &str, metric: impl prometheus_client::registry::Metric) {
    if on {
        registry.register(name, help, metric);
    }
}

fn latency_histogram() -> Histogram {
    // 50 µs .. ~73 s, 1.5x apart: cross-region setups and slow handshakes land in a bucket.
    Histogram::new(exponential_buckets(0.000_05, 1.5, 36))
}

/// The data-plane metrics of one process.
pub struct Metrics {
    registry: Registry,
    /// Hop (QUIC/TLS) handshakes by `role` (server/client) and `result`.
    pub hop_handshakes: Family<L2, Counter>,
    /// ECH outcomes by `outcome`: attempted, accepted, retried, fallback, failed,
    /// retry_refused, downgrade, grease (origins); opened, retry_sent, decrypt_failed (relays).
    pub ech: Family<L1, Counter>,
    /// Route headers a relay received, by `envelope` (plain, sealed, grease): after an ECH
    /// rollout reaches 100%, plain stops growing.
    pub route_headers: Family<L1, Counter>,
    /// CA-signed ECH configs of other clusters' relays a home checked, by `result`
    /// (accepted, invalid; docs/protocol.md §5.7).
    pub ech_signed_configs: Family<L1, Counter>,
    /// Hop handshake latency at the dialing side.
    pub hop_handshake_seconds: Histogram,
    /// End-to-end Noise handshakes by `result` (ok, failed).
    pub e2e_handshakes: Family<L1, Counter>,
    /// Noise handshake latency at the initiator.
    pub e2e_handshake_seconds: Histogram,
    /// Stream setup latency at the origin (accept to first byte forwardable), by `ech`.
    pub stream_setup_seconds: Family<L1, Histogram, fn() -> Histogram>,
    /// Payload bytes by `direction` (tx: app to federation, rx: federation to app, relayed).
    pub bytes: Family<L1, Counter>,
    /// Streams by `direction` (outbound, inbound, relayed) and `result` (ok, error).
    pub streams: Family<L2, Counter>,
    /// Stream failures by structured error `code`.
    pub stream_errors: Family<L1, Counter>,
    /// Finished calls by [`CallLabels`], at the calling and the serving home.
    pub calls: Family<CallLabels, Counter>,
    /// Setup latency of successful calls at the caller, by [`SetupLabels`].
    pub call_setup_seconds: Family<SetupLabels, Histogram, fn() -> Histogram>,
    /// Open hop connections.
    pub open_connections: Gauge,
    /// Routing decisions at relays by `result` (local, forwarded, no_route, peer_unreachable)
    /// and at origins (resolved, service_not_found).
    pub routes: Family<L1, Counter>,
    /// Registry entries by `kind` (local, federated) at relays, `view` at home nodes.
    pub registry_entries: Family<L1, Gauge>,
    /// Distinct services this main relay's homes export (its ECH anonymity set).
    pub ech_anonymity_set: Gauge,
    /// Registry propagation events by `event` (delta_sent, delta_applied, delta_stale,
    /// delta_forged, refresh_sent, refresh_applied, expired, view_sent, view_received).
    pub propagation: Family<L1, Counter>,
    /// Peer health: 1 when up, by `peer`.
    pub peer_up: Family<[(&'static str, String); 1], Gauge>,
    /// Reconnections by `kind` (peer, main).
    pub reconnects: Family<L1, Counter>,
    /// A home's links to its main relays by `main`: 1 active, 0 warm standby (absent: down).
    pub uplink_active: Family<[(&'static str, String); 1], Gauge>,
    /// Changes of a home's active main relay by `reason` (lost: its link went down;
    /// failback: the preferred relay was back and stable).
    pub relay_switches: Family<L1, Counter>,
    /// Load-balancer picks by `service` and `node`.
    pub lb_picks: Family<[(&'static str, String); 2], Counter>,
    /// Circuit breaker state by [`Breaker`] labels (0 closed, 1 open, 2 half-open).
    pub circuit_state: Family<Breaker, Gauge>,
    /// Stream-setup retries by the `code` that caused them.
    pub retries: Family<L1, Counter>,
    /// Streams refused by rate limiting, by `sender_kind` (home, peer, probe); the senders
    /// themselves are in [`Metrics::top_rate_limited`] (bounded cardinality).
    pub rate_limited: Family<L1, Counter>,
    /// Refused streams per sender, at most [`MAX_TRACKED_SENDERS`] (the least limited is
    /// dropped for a new one).
    rate_limited_by_sender: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Trust denials by `rule` (reject_unknown, blocked, call_permission, export_permission).
    pub trust_denials: Family<L1, Counter>,
    /// Version of the config snapshot in force.
    pub config_version: Gauge,
    /// When the hop certificate in use expires (Unix seconds).
    pub certificate_expiry: Gauge,
    /// Config updates received from the distribution server by `result` (applied, restart_required, invalid, error).
    pub config_updates: Family<L1, Counter>,
    /// Stream failures by code, readable back for the admin API.
    error_counts: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
    /// Intercepted connections by `original_dst` (for imports; `other` otherwise), `service`
    /// and `result` (federated, passthrough, refused, not_redirected).
    pub intercepted: Family<[(&'static str, String); 3], Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every metric of both roles (tests and tools that are neither).
    pub fn new() -> Self {
        Self::build(None)
    }

    /// The metrics of a node of `role`: the families both roles share and its own (a home
    /// exports no relay-only family, a relay no home-only one).
    pub fn for_role(role: Role) -> Self {
        Self::build(Some(role))
    }

    fn build(role: Option<Role>) -> Self {
        let (relay, proxy) = (role != Some(Role::Home), role != Some(Role::Main));
        let mut registry = Registry::default();
        super::process::register(&mut registry);
        let hop_handshakes = Family::<L2, Counter>::default();
        let ech = Family::<L1, Counter>::default();
        let hop_handshake_seconds = latency_histogram();
        let e2e_handshakes = Family::<L1, Counter>::default();
        let e2e_handshake_seconds = latency_histogram();
        let stream_setup_seconds = Family::<L1, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let bytes = Family::<L1, Counter>::default();
        let streams = Family::<L2, Counter>::default();
        let stream_errors = Family::<L1, Counter>::default();
        let calls = Family::<CallLabels, Counter>::default();
        let call_setup_seconds =
            Family::<SetupLabels, Histogram, fn() -> Histogram>::new_with_constructor(latency_histogram);
        let open_connections = Gauge::default();
        let intercepted = Family::<[(&'static str, String); 3], Counter>::default();
        let routes = Family::<L1, Counter>::default();
        let registry_entries = Family::<L1, Gauge>::default();
        let ech_anonymity_set = Gauge::default();
        let propagation = Family::<L1, Counter>::default();
        let peer_up = Family::<[(&'static str, String); 1], Gauge>::default();
        let reconnects = Family::<L1, Counter>::default();
        let uplink_active = Family::<[(&'static str, String); 1], Gauge>::default();
        let relay_switches = Family::<L1, Counter>::default();
        let lb_picks = Family::<[(&'static str, String); 2], Counter>::default();
        let circuit_state = Family::<Breaker, Gauge>::default();
        let retries = Family::<L1, Counter>::default();
        let rate_limited = Family::<L1, Counter>::default();
        let trust_denials = Family::<L1, Counter>::default();
        let config_version = Gauge::default();
        let certificate_expiry = Gauge::default();
        let config_updates = Family::<L1, Counter>::default();
        reg(
            &mut registry,
            true,
            "relayfed_config_version",
            "Version of the config snapshot in force",
            config_version.clone(),
        );
        reg(
            &mut registry,
            true,
            "relayfed_certificate_expiry_timestamp_seconds",
            "When the hop certificate in use expires, Unix time",
            certificate_expiry.clone(),
        );
        reg(
            &mut registry,
            true,
            "relayfed_config_updates",
            "Config updates received from the distribution server, by result",
            config_updates.clone(),
        );
        reg(
            &mut registry,
            true,
            "relayfed_circuit_state",
            "Circuit breaker state: 0 closed, 1 open, 2 half-open",
            circuit_state.clone(),
        );
        reg(
            &mut registry,
            proxy,
            "relayfed_stream_retries",
            "Stream-setup retries on another instance, by cause",
            retries.clone(),
        );
        reg(
            &mut registry,
            relay,
            "relayfed_rate_limited_streams",
            "Streams refused by rate limiting, by kind of sender (home, peer, probe)",
            rate_limited.clone(),
        );
        reg(
            &mut registry,
            relay,
            "relayfed_trust_denials",
            "Peers, homes, calls or exports denied by trust rules",
            trust_denials.clone(),
        );
        reg(&mut registry, true, "relayfed_routes", "Routing decisions by result", routes.clone());
        reg(&mut registry, true, "relayfed_registry_entries", "Registry entries by kind", registry_entries.clone());
        reg(
            &mut registry,
            relay,
            "relayfed_ech_anonymity_set_services",
            "Distinct services the main relay's homes export: what a stream sealed to it could be for",
            ech_anonymity_set.clone(),
        );
        reg(&mut registry, true, "relayfed_registry_propagation", "Registry propagation events", propagation.clone());
        reg(&mut registry, relay, "relayfed_peer_up", "1 when the peering is up", peer_up.clone());
        reg(&mut registry, true, "relayfed_reconnects", "Reconnections by kind", reconnects.clone());
        reg(
            &mut registry,
            proxy,
            "relayfed_home_uplink_active",
            "A home's main relay links: 1 active, 0 warm standby",
            uplink_active.clone(),
        );
        reg(
            &mut registry,
            proxy,
            "relayfed_home_relay_switches",
            "Changes of a home's active main relay by reason",
            relay_switches.clone(),
        );
        reg(&mut registry, proxy, "relayfed_lb_picks", "Load-balancer picks by service and instance", lb_picks.clone());
        reg(
            &mut registry,
            true,
            "relayfed_hop_handshakes",
            "QUIC/TLS hop handshakes by role and result",
            hop_handshakes.clone(),
        );
        reg(
            &mut registry,
            true,
            "relayfed_hop_handshake_duration_seconds",
            "QUIC/TLS hop handshake latency at the dialing side",
            hop_handshake_seconds.clone(),
        );
        reg(&mut registry, true, "relayfed_ech_streams", "ECH outcomes per stream", ech.clone());
        let route_headers = Family::<L1, Counter>::default();
        reg(
            &mut registry,
            relay,
            "relayfed_route_headers",
            "Route headers received by envelope (plain, sealed, grease)",
            route_headers.clone(),
        );
        let ech_signed_configs = Family::<L1, Counter>::default();
        reg(
            &mut registry,
            proxy,
            "relayfed_ech_signed_configs",
            "CA-signed ECH configs of other clusters' main relays checked, by result",
            ech_signed_configs.clone(),
        );
        reg(
            &mut registry,
            proxy,
            "relayfed_e2e_handshakes",
            "End-to-end Noise XK handshakes by result",
            e2e_handshakes.clone(),
        );
        reg(
            &mut registry,
            proxy,
            "relayfed_e2e_handshake_duration_seconds",
            "Noise XK handshake latency at the initiator",
            e2e_handshake_seconds.clone(),
        );
        reg(
            &mut registry,
            proxy,
            "relayfed_stream_setup_duration_seconds",
            "Stream setup latency at the origin, from accept to an established session",
            stream_setup_seconds.clone(),
        );
        reg(&mut registry, true, "relayfed_payload_bytes", "Payload bytes by direction", bytes.clone());
        reg(&mut registry, true, "relayfed_streams", "Streams by direction and result", streams.clone());
        reg(
            &mut registry,
            true,
            "relayfed_stream_errors",
            "Stream failures by structured error code",
            stream_errors.clone(),
        );
        reg(
            &mut registry,
            true,
            "relayfed_hop_connections_open",
            "Open QUIC hop connections",
            open_connections.clone(),
        );
        reg(
            &mut registry,
            proxy,
            "relayfed_calls",
            "Finished calls by side, service, source and destination main relay, ECH and code",
            calls.clone(),
        );
        reg(
            &mut registry,
            proxy,
            "relayfed_call_setup_duration_seconds",
            "Setup latency of successful calls at the caller, by service, destination main relay and ECH",
            call_setup_seconds.clone(),
        );
        reg(
            &mut registry,
            proxy,
            "relayfed_intercepted_connections",
            "Connections redirected by iptables, by original destination, service and result",
            intercepted.clone(),
        );
        // Families whose label values are known are exported from the start with zeros, so
        // a panel or alert over them reads 0, not "no data".
        let origin_outcomes =
            ["attempted", "accepted", "retried", "fallback", "failed", "retry_refused", "downgrade", "grease"];
        let relay_outcomes = ["opened", "retry_sent", "decrypt_failed"];
        for o in origin_outcomes.iter().filter(|_| proxy).chain(relay_outcomes.iter().filter(|_| relay)) {
            let _ = ech.get_or_create(&[("outcome", o)]);
        }
        for e in ["plain", "sealed", "grease"].iter().filter(|_| relay) {
            let _ = route_headers.get_or_create(&[("envelope", e)]);
        }
        for r in ["accepted", "invalid"].iter().filter(|_| proxy) {
            let _ = ech_signed_configs.get_or_create(&[("result", r)]);
        }
        for r in ["ok", "failed", "key_unverified"] {
            let _ = e2e_handshakes.get_or_create(&[("result", r)]);
        }
        let directions = [("outbound", proxy), ("inbound", proxy), ("relayed", relay)];
        for d in directions.iter().filter(|(_, on)| *on).map(|(d, _)| *d) {
            for r in ["ok", "error"] {
                let _ = streams.get_or_create(&[("direction", d), ("result", r)]);
            }
        }
        for d in [("tx", proxy), ("rx", proxy), ("relayed", relay)].iter().filter(|(_, on)| *on).map(|(d, _)| *d) {
            let _ = bytes.get_or_create(&[("direction", d)]);
        }
        for code in crate::protocol::ErrorCode::ALL {
            let _ = stream_errors.get_or_create(&[("code", code.label())]);
        }
        for k in [("peer", relay), ("main", proxy)].iter().filter(|(_, on)| *on).map(|(k, _)| *k) {
            let _ = reconnects.get_or_create(&[("kind", k)]);
        }
        for k in ["home", "peer", "probe"] {
            let _ = rate_limited.get_or_create(&[("sender_kind", k)]);
        }
        for r in ["lost", "failback"] {
            let _ = relay_switches.get_or_create(&[("reason", r)]);
        }
        for r in ["reject_unknown", "blocked", "call_permission", "export_permission", "export_not_planned"] {
            let _ = trust_denials.get_or_create(&[("rule", r)]);
        }
        for r in ["link_lost", "TARGET_UNREACHABLE", "NO_ROUTE", "PEER_UNREACHABLE", "CIRCUIT_OPEN", "TIMEOUT"] {
            let _ = retries.get_or_create(&[("code", r)]);
        }
        Self {
            registry,
            hop_handshakes,
            hop_handshake_seconds,
            ech,
            route_headers,
            ech_signed_configs,
            e2e_handshakes,
            e2e_handshake_seconds,
            stream_setup_seconds,
            bytes,
            streams,
            stream_errors,
            calls,
            call_setup_seconds,
            open_connections,
            routes,
            registry_entries,
            ech_anonymity_set,
            propagation,
            peer_up,
            reconnects,
            uplink_active,
            relay_switches,
            lb_picks,
            circuit_state,
            retries,
            rate_limited,
            rate_limited_by_sender: Default::default(),
            trust_denials,
            config_version,
            certificate_expiry,
            config_updates,
            error_counts: Default::default(),
            intercepted,
        }
    }

    /// The OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode(&mut out, &self.registry);
        out
    }

    /// Counts a stream refused by rate limiting from `sender` (a `kind`: home, peer, probe).
    pub fn rate_limited(&self, kind: &'static str, sender: &str) {
        self.rate_limited.get_or_create(&[("sender_kind", kind)]).inc();
        if let Ok(mut m) = self.rate_limited_by_sender.lock() {
            if !m.contains_key(sender)
                && m.len() >= MAX_TRACKED_SENDERS
                && let Some(least) = m.iter().min_by_key(|(_, n)| **n).map(|(s, _)| s.clone())
            {
                m.remove(&least);
            }
            *m.entry(sender.to_owned()).or_insert(0) += 1;
        }
    }

    /// The `n` senders refused most often by rate limiting, most first (for
    /// `/federation/health`).
    pub fn top_rate_limited(&self, n: usize) -> Vec<(String, u64)> {
        let mut all: Vec<(String, u64)> = self
            .rate_limited_by_sender
            .lock()
            .map(|m| m.iter().map(|(s, c)| (s.clone(), *c)).collect())
            .unwrap_or_default();
        all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        all.truncate(n);
        all
    }

    /// Stream failures so far, by code (for `/federation/health`).
    pub fn error_counts(&self) -> std::collections::BTreeMap<&'static str, u64> {
        self.error_counts.lock().map(|c| c.clone()).unwrap_or_default()
    }

    /// Counts an intercepted connection.
    pub fn intercepted(&self, original_dst: String, service: &str, result: &'static str) {
        self.intercepted
            .get_or_create(&[
                ("original_dst", original_dst),
                ("service", service.to_owned()),
                ("result", result.to_owned()),
            ])
            .inc();
    }

    /// Counts a finished call.
    pub fn call(&self, c: Call<'_>) {
        let code = c.code.map_or("OK", |c| c.label());
        self.calls
            .get_or_create(&[
                ("side", c.side.to_owned()),
                ("service", c.service.to_owned()),
                ("source_main", c.source_main.to_owned()),
                ("destination_main", c.destination_main.to_owned()),
                ("ech", c.ech.to_string()),
                ("code", code.to_owned()),
            ])
            .inc();
    }

    /// Observes a successful call's setup latency at the caller.
    pub fn call_setup(&self, service: &str, destination_main: &str, ech: bool, seconds: f64) {
        self.call_setup_seconds
            .get_or_create(&[
                ("service", service.to_owned()),
                ("destination_main", destination_main.to_owned()),
                ("ech", ech.to_string()),
            ])
            .observe(seconds);
    }

    /// Counts a stream failure with its code.
    pub fn stream_error(&self, direction: &'static str, code: crate::protocol::ErrorCode) {
        self.stream_errors.get_or_create(&[("code", code.label())]).inc();
        if let Ok(mut c) = self.error_counts.lock() {
            *c.entry(code.label()).or_insert(0) += 1;
        }
        self.streams.get_or_create(&[("direction", direction), ("result", "error")]).inc();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn families(m: &Metrics) -> std::collections::BTreeSet<String> {
        m.encode()
            .lines()
            .filter_map(|l| l.strip_prefix("# HELP "))
            .map(|l| l.split(' ').next().unwrap_or("").to_owned())
            .collect()
    }

    #[test]
    fn each_role_exports_only_its_families() {
        let (home, relay, all) = (
            families(&Metrics::for_role(Role::Home)),
            families(&Metrics::for_role(Role::Main)),
            families(&Metrics::new()),
        );
        // (Families without series are not encoded: these have zeros from the start.)
        for relay_only in
            ["relayfed_rate_limited_streams", "relayfed_trust_denials", "relayfed_ech_anonymity_set_services"]
        {
            assert!(relay.contains(relay_only) && !home.contains(relay_only), "{relay_only}");
        }
        for home_only in ["relayfed_stream_retries", "relayfed_e2e_handshakes", "relayfed_home_relay_switches"] {
            assert!(home.contains(home_only) && !relay.contains(home_only), "{home_only}");
        }
        assert!(home.contains("relayfed_streams") && relay.contains("relayfed_streams"));
        assert_eq!(all, home.union(&relay).cloned().collect(), "new() is both roles");
        let home_text = Metrics::for_role(Role::Home).encode();
        assert!(!home_text.contains("direction=\"relayed\""), "a home has no relayed series");
        assert!(!home_text.contains("outcome=\"opened\""), "a home opens no ECH");
    }

    #[test]
    fn rate_limited_senders_are_counted_by_kind_and_kept_bounded() {
        let m = Metrics::new();
        for i in 0..(MAX_TRACKED_SENDERS + 50) {
            m.rate_limited("home", &format!("h{i}"));
        }
        for _ in 0..5 {
            m.rate_limited("peer", "peer:far");
        }
        let top = m.top_rate_limited(3);
        assert_eq!(top[0], ("peer:far".to_owned(), 5));
        assert_eq!(m.rate_limited_by_sender.lock().unwrap().len(), MAX_TRACKED_SENDERS);
        let text = m.encode();
        assert!(
            text.contains(&format!(
                "relayfed_rate_limited_streams_total{{sender_kind=\"home\"}} {}",
                MAX_TRACKED_SENDERS + 50
            )),
            "{text}"
        );
        assert!(text.contains("relayfed_rate_limited_streams_total{sender_kind=\"probe\"} 0"), "{text}");
        assert!(!text.contains("h17"), "no per-sender series");
    }
}
