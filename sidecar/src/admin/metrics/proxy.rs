//! `relayfed_proxy_*`: what only a home (the sidecar next to an app) does — intercept the
//! app's connections, pick an instance, seal the route, run Noise end to end, and count each
//! call for cross-cluster SLOs.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{L1, L2, latency_histogram};

/// The labels of an instance's circuit breaker: `service`, its home `destination` and that
/// home's `destination_main`.
pub type Breaker = [(&'static str, String); 3];

/// The labels of a finished call: `side` (origin, destination), `service`, `source_main`,
/// `destination_main` (main relay ids of the plan, `other` for an id the plan does not name,
/// `none` when unknown), `ech` (true, false) and `code` (`OK` or an error code label).
pub type CallLabels = [(&'static str, String); 6];

/// The labels of a call's setup latency: `service`, `destination_main`, `ech`.
pub type SetupLabels = [(&'static str, String); 3];

/// The home families.
pub struct Proxy {
    /// Finished calls by [`CallLabels`], at the calling and the serving home.
    pub calls: Family<CallLabels, Counter>,
    /// Setup latency of successful calls at the caller, by [`SetupLabels`].
    pub call_setup_seconds: Family<SetupLabels, Histogram, fn() -> Histogram>,
    /// Stream failures by structured error `code`, including inbound streams refused before
    /// they became a call.
    pub stream_errors: Family<L1, Counter>,
    /// Payload bytes by `direction` (tx: app to federation, rx: federation to app).
    pub bytes: Family<L1, Counter>,
    /// ECH outcomes at the origin by `outcome` (attempted, accepted, retried, fallback,
    /// failed, retry_refused, downgrade, grease).
    pub ech: Family<L1, Counter>,
    /// CA-signed ECH configs of other clusters' relays checked, by `result` (accepted,
    /// invalid; docs/protocol.md §5.7).
    pub ech_signed_configs: Family<L1, Counter>,
    /// End-to-end Noise handshakes by `result` (ok, failed, key_unverified).
    pub e2e_handshakes: Family<L1, Counter>,
    /// Noise handshake latency at the initiator.
    pub e2e_handshake_seconds: Histogram,
    /// Lookups of imported services by `result` (resolved, service_not_found,
    /// no_healthy_instance).
    pub routes: Family<L1, Counter>,
    /// Entries in the registry view the home holds.
    pub view_entries: Gauge,
    /// Registry views received from the main relay.
    pub views_received: Counter,
    /// A home's links to its main relays by `main`: 1 active, 0 warm standby (absent: down).
    pub uplink_active: Family<[(&'static str, String); 1], Gauge>,
    /// Reconnections to main relays.
    pub uplink_reconnects: Counter,
    /// Changes of the active main relay by `reason` (lost: its link went down; failback:
    /// the preferred relay was back and stable).
    pub relay_switches: Family<L1, Counter>,
    /// Load-balancer picks by `service` and `node`.
    pub lb_picks: Family<[(&'static str, String); 2], Counter>,
    /// Circuit breaker state by [`Breaker`] labels (0 closed, 1 open, 2 half-open).
    pub circuit_state: Family<Breaker, Gauge>,
    /// Stream-setup retries by the `code` that caused them.
    pub retries: Family<L1, Counter>,
    /// Intercepted connections by `original_dst` (for imports; `other` otherwise), `service`
    /// and `result` (federated, passthrough, refused, not_redirected).
    pub intercepted: Family<[(&'static str, String); 3], Counter>,
    /// Paths to the homes this home has called or been asked by, by `kind` (direct, relayed).
    pub paths: Family<L1, Gauge>,
    /// Direct-path attempts by `result` (direct, no_address, refused, timeout) and
    /// `nat_pair` (how this home's NAT maps, then how the other home's did:
    /// `<independent|dependent|unknown>-<same>`).
    pub punches: Family<L2, Counter>,
    /// Port sweeps started by `half` (sockets: a fan of extra sockets; ports: many ports of
    /// the other home's address), for attempts whose plain probes went unanswered.
    pub port_sweeps: Family<L1, Counter>,
    /// Time from a direct-path attempt's start to its direct connection.
    pub time_to_direct: Histogram,
    /// Direct paths lost (the connection ended; new streams went back to the relay).
    pub direct_lost: Counter,
    /// 1 for how this home's NAT maps its socket, by `kind` (unknown, endpoint_independent,
    /// endpoint_dependent), from the addresses its main relays observed.
    pub nat_mapping: Family<L1, Gauge>,
}

impl Proxy {
    /// Creates the families, registers them in `r` (prefix `relayfed_proxy`) and exports
    /// those with known label values from the start with zeros.
    pub(super) fn register(r: &mut Registry) -> Self {
        let m = Self {
            calls: Family::default(),
            call_setup_seconds: Family::new_with_constructor(latency_histogram),
            stream_errors: Family::default(),
            bytes: Family::default(),
            ech: Family::default(),
            ech_signed_configs: Family::default(),
            e2e_handshakes: Family::default(),
            e2e_handshake_seconds: latency_histogram(),
            routes: Family::default(),
            view_entries: Gauge::default(),
            views_received: Counter::default(),
            uplink_active: Family::default(),
            uplink_reconnects: Counter::default(),
            relay_switches: Family::default(),
            lb_picks: Family::default(),
            circuit_state: Family::default(),
            retries: Family::default(),
            intercepted: Family::default(),
            paths: Family::default(),
            punches: Family::default(),
            port_sweeps: Family::default(),
            time_to_direct: latency_histogram(),
            direct_lost: Counter::default(),
            nat_mapping: Family::default(),
        };
        r.register(
            "calls",
            "Finished calls by side, service, source and destination main relay, ECH and code",
            m.calls.clone(),
        );
        r.register(
            "call_setup_duration_seconds",
            "Setup latency of successful calls at the caller, by service, destination main relay and ECH",
            m.call_setup_seconds.clone(),
        );
        r.register("stream_errors", "Stream failures by structured error code", m.stream_errors.clone());
        r.register("payload_bytes", "Payload bytes by direction (tx, rx)", m.bytes.clone());
        r.register("ech_streams", "ECH outcomes per stream at the origin", m.ech.clone());
        r.register(
            "ech_signed_configs",
            "CA-signed ECH configs of other clusters' main relays checked, by result",
            m.ech_signed_configs.clone(),
        );
        r.register("e2e_handshakes", "End-to-end Noise XK handshakes by result", m.e2e_handshakes.clone());
        r.register(
            "e2e_handshake_duration_seconds",
            "Noise XK handshake latency at the initiator",
            m.e2e_handshake_seconds.clone(),
        );
        r.register("routes", "Lookups of imported services by result", m.routes.clone());
        r.register("view_entries", "Entries in the registry view from the main relay", m.view_entries.clone());
        r.register("views_received", "Registry views received from the main relay", m.views_received.clone());
        r.register("uplink_active", "Main relay links: 1 active, 0 warm standby", m.uplink_active.clone());
        r.register("uplink_reconnects", "Reconnections to main relays", m.uplink_reconnects.clone());
        r.register("relay_switches", "Changes of the active main relay by reason", m.relay_switches.clone());
        r.register("lb_picks", "Load-balancer picks by service and instance", m.lb_picks.clone());
        r.register(
            "circuit_state",
            "Circuit breaker state per service instance: 0 closed, 1 open, 2 half-open",
            m.circuit_state.clone(),
        );
        r.register("stream_retries", "Stream-setup retries on another instance, by cause", m.retries.clone());
        r.register(
            "intercepted_connections",
            "Connections redirected by iptables, by original destination, service and result",
            m.intercepted.clone(),
        );
        r.register("paths", "Paths to other homes by kind (direct, relayed)", m.paths.clone());
        r.register("punches", "Direct-path attempts by result and NAT pair", m.punches.clone());
        r.register("port_sweeps", "Port sweeps started, by half (sockets, ports)", m.port_sweeps.clone());
        r.register(
            "time_to_direct_seconds",
            "Time from a direct-path attempt's start to its direct connection",
            m.time_to_direct.clone(),
        );
        r.register(
            "direct_paths_lost",
            "Direct paths lost (new streams went back to the relay)",
            m.direct_lost.clone(),
        );
        r.register(
            "nat_mapping",
            "1 for how the home's NAT maps its socket, as its main relays observe it",
            m.nat_mapping.clone(),
        );
        for kind in ["unknown", "endpoint_independent", "endpoint_dependent"] {
            let _ = m.nat_mapping.get_or_create(&[("kind", kind)]).set(i64::from(kind == "unknown"));
        }
        for kind in ["direct", "relayed"] {
            let _ = m.paths.get_or_create(&[("kind", kind)]);
        }
        let mappings = ["independent", "dependent", "unknown"];
        for result in ["direct", "no_address", "refused", "timeout"] {
            for ours in mappings {
                for theirs in mappings {
                    let pair = crate::federation::direct_path::nat_pair_label(ours, theirs);
                    let _ = m.punches.get_or_create(&[("result", result), ("nat_pair", pair)]);
                }
            }
        }
        for half in ["sockets", "ports"] {
            let _ = m.port_sweeps.get_or_create(&[("half", half)]);
        }
        for o in ["attempted", "accepted", "retried", "fallback", "failed", "retry_refused", "downgrade", "grease"] {
            let _ = m.ech.get_or_create(&[("outcome", o)]);
        }
        for result in ["accepted", "invalid"] {
            let _ = m.ech_signed_configs.get_or_create(&[("result", result)]);
        }
        for result in ["ok", "failed", "key_unverified"] {
            let _ = m.e2e_handshakes.get_or_create(&[("result", result)]);
        }
        for d in ["tx", "rx"] {
            let _ = m.bytes.get_or_create(&[("direction", d)]);
        }
        for code in crate::protocol::ErrorCode::ALL {
            let _ = m.stream_errors.get_or_create(&[("code", code.label())]);
        }
        for reason in ["lost", "failback"] {
            let _ = m.relay_switches.get_or_create(&[("reason", reason)]);
        }
        for code in ["link_lost", "TARGET_UNREACHABLE", "NO_ROUTE", "PEER_UNREACHABLE", "CIRCUIT_OPEN", "TIMEOUT"] {
            let _ = m.retries.get_or_create(&[("code", code)]);
        }
        m
    }
}
