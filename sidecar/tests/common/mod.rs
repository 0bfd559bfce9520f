//! Shared helpers for the integration tests: the test-util process and server helpers, with
//! the binary built for these tests.
#![allow(dead_code, unused_imports, clippy::unwrap_used, clippy::expect_used)]

pub mod mitm;

use std::path::Path;

pub use relayfed_e2e::procs::{Proc, echo_server, eventually, get, identify_server, round_trip, sample};

/// Starts the test build of `relayfed-proxy` and waits for its ready line.
pub async fn start(mode: &str, config: &Path, extra: &[&str]) -> Proc {
    Proc::start_bin(Path::new(env!("CARGO_BIN_EXE_relayfed-proxy")), mode, config, extra).await
}
