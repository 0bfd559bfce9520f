//! relayfed's data plane: wire protocol, ECH and Noise crypto, QUIC transport and the
//! `relayfed-proxy` binary's modes (main relay, home node).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod admin;
pub mod config;
pub mod crypto;
pub mod distribution;
pub mod federation;
pub mod intercept;
pub mod node;
pub mod protocol;
pub mod resilience;
pub mod serving;
#[cfg(feature = "test-util")]
pub mod testbed;
pub mod transport;
