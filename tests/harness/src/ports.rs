//! Free TCP ports for control-plane components, below the ephemeral range (a port picked from
//! it could be taken by an outgoing connection before the component binds it).

use std::sync::atomic::{AtomicU16, Ordering};

/// A port in 20000..30000 that is free on 127.0.0.1 right now.
pub fn free_port() -> anyhow::Result<u16> {
    static NEXT: AtomicU16 = AtomicU16::new(0);
    // Spread concurrent test binaries apart by pid.
    let seed = (std::process::id() % 500) as u16 * 20;
    for _ in 0..10_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20000 + (seed.wrapping_add(n) % 10_000);
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return Ok(port);
        }
    }
    anyhow::bail!("no free port in 20000..30000")
}
