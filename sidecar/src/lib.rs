//! relayfed's proxy: the data plane around the I/O-free protocol crate (`relayfed-proto`,
//! re-exported as `config`, `crypto`, `protocol`). `relay/` is a main relay (accept, router,
//! peering, homes, live settings), `proxy/` a home node (outbound, inbound, pump, uplinks,
//! decisions), `transport/` the QUIC hops, `resilience/` the rate limits, breakers and backoff,
//! `intercept/` the iptables rules, `admin/` metrics and the admin API, `node/` a node as a
//! process (`relayfed-proxy main-relay|home|workload`).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub use relayfed_proto::{config, crypto, protocol};
pub use relayfed_serving as serving;

pub mod admin;
pub mod distribution;
pub mod federation;
pub mod intercept;
pub mod node;
pub mod proxy;
pub mod relay;
pub mod resilience;
pub mod transport;
