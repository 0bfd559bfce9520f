//! `relayfed_transport_*`: what every node (main relay or home) has — its QUIC/TLS hop
//! connections and handshakes, its certificate, and its config channel to the distribution
//! server.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

use super::{L1, L2, latency_histogram};

/// The transport families of one node.
pub struct Transport {
    /// Hop (QUIC/TLS) handshakes by `role` (server, client) and `result`.
    pub hop_handshakes: Family<L2, Counter>,
    /// Hop handshake latency at the dialing side.
    pub hop_handshake_seconds: Histogram,
    /// Open hop connections.
    pub open_connections: Gauge,
    /// When the hop certificate in use expires (Unix seconds).
    pub certificate_expiry: Gauge,
    /// Version of the config snapshot in force.
    pub config_version: Gauge,
    /// Config updates received from the distribution server by `result` (applied,
    /// restart_required, invalid, error).
    pub config_updates: Family<L1, Counter>,
}

impl Transport {
    /// Creates the families and registers them in `r` (prefix `relayfed_transport`).
    pub(super) fn register(r: &mut Registry) -> Self {
        let t = Self {
            hop_handshakes: Family::default(),
            hop_handshake_seconds: latency_histogram(),
            open_connections: Gauge::default(),
            certificate_expiry: Gauge::default(),
            config_version: Gauge::default(),
            config_updates: Family::default(),
        };
        r.register("hop_handshakes", "QUIC/TLS hop handshakes by role and result", t.hop_handshakes.clone());
        r.register(
            "hop_handshake_duration_seconds",
            "QUIC/TLS hop handshake latency at the dialing side",
            t.hop_handshake_seconds.clone(),
        );
        r.register("hop_connections_open", "Open QUIC hop connections", t.open_connections.clone());
        r.register(
            "certificate_expiry_timestamp_seconds",
            "When the hop certificate in use expires, Unix time",
            t.certificate_expiry.clone(),
        );
        r.register("config_version", "Version of the config snapshot in force", t.config_version.clone());
        r.register(
            "config_updates",
            "Config updates received from the distribution server, by result",
            t.config_updates.clone(),
        );
        t
    }
}
