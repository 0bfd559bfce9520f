//! QUIC hop transport: TLS identities and configs, frame I/O on streams.

pub mod io;
pub mod tls;
