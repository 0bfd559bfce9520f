//! relayfed's data plane: wire protocol, ECH and Noise crypto, QUIC transport and the
//! `relayfed-proxy` binary's modes (main relay, home node).
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub use relayfed_proto::{config, crypto, protocol};
pub use relayfed_serving as serving;

pub mod admin;
pub mod distribution;
pub mod federation;
pub mod intercept;
pub mod node;
pub mod resilience;
#[cfg(feature = "test-util")]
pub mod testbed;
pub mod transport;
