//! QUIC hop transport: TLS identities and configs, frame I/O on streams, the stream idle
//! watchdog.

pub mod idle;
pub mod io;
pub mod port_sweep;
pub mod punch_socket;
pub mod tls;
