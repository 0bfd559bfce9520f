//! Every data-plane metric, in one registry per component ([`Metrics::for_role`]):
//! `relayfed_transport_*` on every node ([`transport`]), `relayfed_relay_*` on main relays
//! ([`relay`]), `relayfed_proxy_*` on homes ([`proxy`]), plus `relayfed_build_info` and the
//! standard process metrics. Names follow `relayfed_<component>_<what>_<unit>`; counters get
//! `_total` from the encoder. docs/operations.md "Metrics" lists them all.

pub mod proxy;
pub mod relay;
pub mod transport;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use crate::config::Role;
pub use proxy::{Breaker, CallLabels, SetupLabels};

/// How many senders [`Metrics::rate_limited`] keeps counts for.
pub const MAX_TRACKED_SENDERS: usize = 1000;

/// The labels of an instance's breaker.
pub fn instance_breaker(service: &str, node: &str, main: &str) -> Breaker {
    [("service", service.to_owned()), ("destination", node.to_owned()), ("destination_main", main.to_owned())]
}

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

fn latency_histogram() -> Histogram {
    // 50 µs .. ~73 s, 1.5x apart: cross-region setups and slow handshakes land in a bucket.
    Histogram::new(exponential_buckets(0.000_05, 1.5, 36))
}

/// The data-plane metrics of one process.
pub struct Metrics {
    registry: Registry,
    /// Hop connections, certificate and config channel (every node).
    pub transport: transport::Transport,
    /// Main relay families (registered only at main relays).
    pub relay: relay::Relay,
    /// Home families (registered only at homes).
    pub proxy: proxy::Proxy,
    /// Refused streams per sender, at most [`MAX_TRACKED_SENDERS`] (the least limited is
    /// dropped for a new one).
    rate_limited_by_sender: std::sync::Mutex<std::collections::HashMap<String, u64>>,
    /// Stream failures by code, readable back for the admin API.
    error_counts: std::sync::Mutex<std::collections::BTreeMap<&'static str, u64>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    /// Every component of both roles (tests and tools that are neither).
    pub fn new() -> Self {
        Self::build(None)
    }

    /// The metrics of a node of `role`: transport and its role's component (a home exports
    /// no `relayfed_relay_*` family, a relay no `relayfed_proxy_*` one).
    pub fn for_role(role: Role) -> Self {
        Self::build(Some(role))
    }

    fn build(role: Option<Role>) -> Self {
        let (relay_on, proxy_on) = (role != Some(Role::Home), role != Some(Role::Main));
        let mut registry = Registry::default();
        super::process::register(&mut registry);
        let transport = transport::Transport::register(registry.sub_registry_with_prefix("relayfed_transport"));
        // A component the role does not have is built but never registered: nothing of it
        // is exported.
        let mut unexported = Registry::default();
        let relay = relay::Relay::register(if relay_on {
            registry.sub_registry_with_prefix("relayfed_relay")
        } else {
            &mut unexported
        });
        let proxy = proxy::Proxy::register(if proxy_on {
            registry.sub_registry_with_prefix("relayfed_proxy")
        } else {
            &mut unexported
        });
        Self {
            registry,
            transport,
            relay,
            proxy,
            rate_limited_by_sender: Default::default(),
            error_counts: Default::default(),
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
        self.relay.rate_limited.get_or_create(&[("sender_kind", kind)]).inc();
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
        self.proxy
            .intercepted
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
        self.proxy
            .calls
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
        self.proxy
            .call_setup_seconds
            .get_or_create(&[
                ("service", service.to_owned()),
                ("destination_main", destination_main.to_owned()),
                ("ech", ech.to_string()),
            ])
            .observe(seconds);
    }

    /// Counts a home's stream failure with its code.
    pub fn proxy_stream_error(&self, code: crate::protocol::ErrorCode) {
        self.proxy.stream_errors.get_or_create(&[("code", code.label())]).inc();
        self.count_error(code);
    }

    /// Counts a relayed (or refused) stream's failure with its code.
    pub fn relay_stream_error(&self, code: crate::protocol::ErrorCode) {
        self.relay.stream_errors.get_or_create(&[("code", code.label())]).inc();
        self.relay.streams.get_or_create(&[("result", "error")]).inc();
        self.count_error(code);
    }

    fn count_error(&self, code: crate::protocol::ErrorCode) {
        if let Ok(mut c) = self.error_counts.lock() {
            *c.entry(code.label()).or_insert(0) += 1;
        }
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
        for f in &relay {
            assert!(!f.starts_with("relayfed_proxy_"), "a relay exports {f}");
        }
        for f in &home {
            assert!(!f.starts_with("relayfed_relay_"), "a home exports {f}");
        }
        for f in all.iter().filter(|f| f.starts_with("relayfed_")) {
            let component = f.trim_start_matches("relayfed_").split('_').next().unwrap_or_default();
            assert!(
                ["transport", "relay", "proxy", "build"].contains(&component),
                "{f}: relayfed_<component>_<what>, component one of transport, relay, proxy"
            );
        }
        assert!(relay.contains("relayfed_relay_trust_denials") && home.contains("relayfed_proxy_stream_retries"));
        assert!(
            home.contains("relayfed_transport_config_version") && relay.contains("relayfed_transport_config_version")
        );
        assert_eq!(all, home.union(&relay).cloned().collect(), "new() is both roles");
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
                "relayfed_relay_rate_limited_streams_total{{sender_kind=\"home\"}} {}",
                MAX_TRACKED_SENDERS + 50
            )),
            "{text}"
        );
        assert!(text.contains("relayfed_relay_rate_limited_streams_total{sender_kind=\"probe\"} 0"), "{text}");
        assert!(!text.contains("h17"), "no per-sender series");
    }
}
