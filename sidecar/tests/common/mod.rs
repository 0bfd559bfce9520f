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

/// Makes `n` calls to an echo service at `addr`, each with a distinct private payload;
/// returns how many came back intact.
pub async fn echo_calls(addr: std::net::SocketAddr, n: usize) -> usize {
    let mut ok = 0;
    for i in 0..n {
        let msg = format!("private request {i}");
        if round_trip(addr, msg.as_bytes()).await.is_ok_and(|r| r == msg.as_bytes()) {
            ok += 1;
        }
    }
    ok
}
