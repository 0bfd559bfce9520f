//! relayfed's protocol without I/O, in the shape of quinn-proto: wire formats (route header,
//! frames, control messages, ECHConfigList, error codes), the ECH and Noise sessions and the
//! federation CA, the config snapshot schema and key files, config distribution's wire types,
//! the registry and ECH policy as plain data, and the workload file layout.
//!
//! Nothing here opens a socket or spawns a task: no tokio, quinn, hyper or kube in its
//! dependency tree (`tests/no_io.rs` checks). The operator builds snapshots with it; the
//! proxy (`relayfed-sidecar`) moves its bytes.
#![cfg_attr(not(test), deny(clippy::unwrap_used, clippy::expect_used))]

pub mod backoff;
pub mod config;
pub mod crypto;
pub mod distribution;
pub mod federation;
pub mod intercept;
pub mod layout;
pub mod protocol;
