//! Bounded TCP servers. Every HTTP(S) server relayfed runs (admin, operator probes, config
//! distribution, certificates, the injection webhook, the local-mode supervisor) accepts
//! through [`BoundedListener`] and serves with [`http1`], so hostile clients cannot hold
//! resources without bound:
//!
//! - at most `max_connections` connections at once: at the limit the server stops accepting
//!   (the kernel's backlog queues, then refuses) instead of opening file descriptors;
//! - a failed `accept` (for example `EMFILE`) backs off with jitter (1 ms doubling to 1 s)
//!   instead of spinning;
//! - a TLS handshake must finish within `handshake_timeout` ([`tls_accept`]);
//! - request headers must arrive within `header_read_timeout`, which also closes idle
//!   keep-alive connections.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use relayfed_proto::backoff::Backoff;

/// Resource limits of one server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ServerLimits {
    /// Connections served at once.
    pub max_connections: usize,
    /// Time for a client to send a request's headers (and the longest a keep-alive connection idles).
    pub header_read_timeout: Duration,
    /// Time for a TLS handshake.
    pub handshake_timeout: Duration,
}

impl ServerLimits {
    /// Admin, probe and control endpoints: few clients (Prometheus, kubectl, probes).
    pub const ADMIN: Self = Self {
        max_connections: 64,
        header_read_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
    };
    /// Data-path listeners (a home's import and intercepted-outbound ports): as many
    /// connections as the application opens, within the process's descriptor budget.
    pub const DATA: Self = Self {
        max_connections: 16_384,
        header_read_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
    };
    /// Endpoints every node or pod of a federation calls (certificates, webhook).
    pub const FLEET: Self = Self {
        max_connections: 4096,
        header_read_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
    };
    /// Config distribution: every sidecar holds one long-poll connection, so a federation of
    /// 10,000 homes needs 10,000 at once (within the descriptor budget [`raise_fd_limit`] gives).
    pub const DISTRIBUTION: Self = Self {
        max_connections: 16_384,
        header_read_timeout: Duration::from_secs(10),
        handshake_timeout: Duration::from_secs(10),
    };
}

/// Raises the process's soft open-file limit to its hard limit (as Go's runtime does), so the
/// connection limits above are not cut short by a soft limit of 1,024; returns the limit now
/// in force, `None` when it cannot be read.
pub fn raise_fd_limit() -> Option<u64> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).ok()?;
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return Some(hard);
    }
    Some(soft)
}

/// A listener that admits at most `max_connections` at once and backs off on accept errors.
pub struct BoundedListener {
    listener: TcpListener,
    permits: Arc<Semaphore>,
    /// The limits it enforces.
    pub limits: ServerLimits,
    name: &'static str,
}

/// One admitted connection; dropping `permit` frees its slot.
pub struct Admitted {
    /// The connection.
    pub tcp: TcpStream,
    /// The client's address.
    pub remote: SocketAddr,
    /// Held while the connection is served.
    pub permit: OwnedSemaphorePermit,
}

impl BoundedListener {
    /// Binds `addr`; `name` appears in logs.
    pub async fn bind(addr: SocketAddr, limits: ServerLimits, name: &'static str) -> std::io::Result<Self> {
        let socket = if addr.is_ipv4() { tokio::net::TcpSocket::new_v4()? } else { tokio::net::TcpSocket::new_v6()? };
        socket.set_reuseaddr(true)?;
        socket.bind(addr)?;
        // A backlog as deep as the connection limit (the kernel caps it at
        // net.core.somaxconn): a fleet reconnecting at once is queued, not made to wait for
        // SYN retransmissions (1 s, 3 s, 7 s, ...).
        let backlog = u32::try_from(limits.max_connections).unwrap_or(u32::MAX).max(128);
        Ok(Self::new(socket.listen(backlog)?, limits, name))
    }

    /// Wraps a bound listener.
    pub fn new(listener: TcpListener, limits: ServerLimits, name: &'static str) -> Self {
        Self { listener, permits: Arc::new(Semaphore::new(limits.max_connections.max(1))), limits, name }
    }

    /// The bound address.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Connections being served now.
    pub fn active(&self) -> usize {
        self.limits.max_connections.max(1) - self.permits.available_permits()
    }

    /// Waits for a free slot, then for the next connection.
    pub async fn accept(&self) -> Admitted {
        let backoff = Backoff { initial: Duration::from_millis(1), max: Duration::from_secs(1) };
        let mut failures = 0u32;
        loop {
            let permit = match self.permits.clone().acquire_owned().await {
                Ok(p) => p,
                // The semaphore is never closed; wait like any other failure would.
                Err(_) => {
                    tokio::time::sleep(backoff.max).await;
                    continue;
                }
            };
            match self.listener.accept().await {
                Ok((tcp, remote)) => return Admitted { tcp, remote, permit },
                Err(e) => {
                    let wait = backoff.wait(failures, &mut rand::rng());
                    if failures == 0 {
                        tracing::warn!(server = self.name, error = %e, "accept failed (file descriptors exhausted?); backing off");
                    }
                    failures = failures.saturating_add(1);
                    drop(permit);
                    tokio::time::sleep(wait).await;
                }
            }
        }
    }
}

/// An HTTP/1.1 connection builder with the header-read timeout of `limits`.
pub fn http1(limits: &ServerLimits) -> hyper::server::conn::http1::Builder {
    let mut b = hyper::server::conn::http1::Builder::new();
    b.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
    b
}

/// A TLS handshake bounded by `limits.handshake_timeout`; `None` when it failed or timed out.
pub async fn tls_accept<IO>(
    acceptor: &tokio_rustls::TlsAcceptor,
    io: IO,
    limits: &ServerLimits,
) -> Option<tokio_rustls::server::TlsStream<IO>>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match tokio::time::timeout(limits.handshake_timeout, acceptor.accept(io)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(error = %e, "TLS handshake failed");
            None
        }
        Err(_) => {
            tracing::debug!("TLS handshake timed out");
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn server(limits: ServerLimits) -> (SocketAddr, Arc<BoundedListener>) {
        let l = Arc::new(BoundedListener::bind(([127, 0, 0, 1], 0).into(), limits, "test").await.unwrap());
        let addr = l.local_addr().unwrap();
        let listener = l.clone();
        tokio::spawn(async move {
            loop {
                let a = listener.accept().await;
                let limits = listener.limits;
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(|_req| async {
                        Ok::<_, std::convert::Infallible>(hyper::Response::new(http_body_util::Full::new(
                            bytes::Bytes::from_static(b"ok"),
                        )))
                    });
                    let _ = http1(&limits).serve_connection(hyper_util::rt::TokioIo::new(a.tcp), svc).await;
                    drop(a.permit);
                });
            }
        });
        (addr, l)
    }

    async fn get(addr: SocketAddr) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn an_idle_connection_is_closed_after_the_header_timeout() {
        let limits = ServerLimits { header_read_timeout: Duration::from_millis(300), ..ServerLimits::ADMIN };
        let (addr, _l) = server(limits).await;
        let mut idle = TcpStream::connect(addr).await.unwrap();
        idle.write_all(b"GET / HTTP/1.1\r\n").await.unwrap(); // never finishes its headers
        let mut buf = Vec::new();
        // The server closes it (hyper answers 408 or just closes); a read returns, not hangs.
        let n = tokio::time::timeout(Duration::from_secs(5), idle.read_to_end(&mut buf)).await;
        assert!(n.is_ok(), "an idle connection was kept past the header timeout");
    }

    #[tokio::test]
    async fn connections_over_the_limit_wait_and_are_served_once_slots_free() {
        let limits =
            ServerLimits { max_connections: 4, header_read_timeout: Duration::from_millis(500), ..ServerLimits::ADMIN };
        let (addr, l) = server(limits).await;
        let mut idle = Vec::new();
        for _ in 0..20 {
            idle.push(TcpStream::connect(addr).await.unwrap());
        }
        // The slots fill up to the limit and no further, however many clients hold connections.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
        while l.active() < 4 {
            assert!(tokio::time::Instant::now() < deadline, "only {} connections admitted", l.active());
            tokio::task::yield_now().await;
        }
        assert_eq!(l.active(), 4, "connections admitted over a limit of 4");
        // The idle ones time out and free their slots: a real request is then served.
        let answer = tokio::time::timeout(Duration::from_secs(20), get(addr)).await.unwrap();
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        drop(idle);
    }
}
