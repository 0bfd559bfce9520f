//! Hop TLS: mutual TLS 1.3 over QUIC with certificates from the federation CA.
//!
//! Servers require a client certificate chaining to the CA (or, for a main relay of another
//! trust domain, to the CA its Peer pins); clients verify the server as
//! `<node-id>.<trust-domain>`, so a certificate for another node is refused. ALPN names the
//! protocol version; a peer without it is refused by the handshake itself.

use std::sync::Arc;
use std::time::Duration;

use quinn::crypto::rustls::{QuicClientConfig, QuicServerConfig};
use rustls_pki_types::CertificateDer;

use crate::config::Timeouts;
pub use relayfed_serving::identity::{HopIdentity, SharedIdentity, TlsError};
pub use relayfed_serving::partners::Partner;

/// ALPN of relayfed protocol version 1.
pub const ALPN: &[u8] = b"relayfed/1";

/// QUIC configurations and endpoints built from a node's [`HopIdentity`].
pub trait QuicIdentity {
    /// QUIC server configuration: client certificates required, ALPN `relayfed/1`.
    fn server_config(&self, timeouts: &Timeouts) -> Result<quinn::ServerConfig, TlsError>;
    /// A QUIC endpoint bound to `listen` serving `server`. Its stateless-reset key is
    /// derived from this node's private key, so a restarted process (same key, same address)
    /// answers packets of its previous life's connections with resets the peers accept: they
    /// learn of the restart at their next packet instead of at their idle timeout.
    fn server_endpoint(
        &self,
        server: quinn::ServerConfig,
        listen: std::net::SocketAddr,
    ) -> std::io::Result<quinn::Endpoint>;
    /// QUIC client configuration presenting this node's certificate.
    fn client_config(&self, timeouts: &Timeouts) -> Result<quinn::ClientConfig, TlsError>;
    /// As [`QuicIdentity::client_config`] with another ALPN (tests prove a wrong one is refused).
    fn client_config_with_alpn(&self, timeouts: &Timeouts, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError>;
    /// QUIC client configuration for dialing a main relay of another trust domain, checked
    /// against its pin.
    fn client_config_for_partner(&self, timeouts: &Timeouts, partner: Partner)
    -> Result<quinn::ClientConfig, TlsError>;
    /// The authenticated node id of the peer of `conn`.
    fn peer_node_id(&self, conn: &quinn::Connection) -> Result<String, TlsError>;
}

impl QuicIdentity for HopIdentity {
    fn server_config(&self, timeouts: &Timeouts) -> Result<quinn::ServerConfig, TlsError> {
        let tls = self.rustls_server(&[ALPN])?;
        let quic = QuicServerConfig::try_from(tls).map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut cfg = quinn::ServerConfig::with_crypto(Arc::new(quic));
        cfg.transport_config(transport(timeouts));
        Ok(cfg)
    }

    fn server_endpoint(
        &self,
        server: quinn::ServerConfig,
        listen: std::net::SocketAddr,
    ) -> std::io::Result<quinn::Endpoint> {
        let socket = std::net::UdpSocket::bind(listen)?;
        grow_receive_buffer(&socket);
        let runtime =
            quinn::default_runtime().ok_or_else(|| std::io::Error::other("no async runtime for the QUIC endpoint"))?;
        let key =
            ring::hmac::Key::new(ring::hmac::HMAC_SHA256, &self.derive_secret(b"relayfed stateless reset key v1\0"));
        quinn::Endpoint::new(quinn::EndpointConfig::new(Arc::new(key)), Some(server), socket, runtime)
    }

    fn client_config(&self, timeouts: &Timeouts) -> Result<quinn::ClientConfig, TlsError> {
        self.client_config_with_alpn(timeouts, ALPN)
    }

    fn client_config_with_alpn(&self, timeouts: &Timeouts, alpn: &[u8]) -> Result<quinn::ClientConfig, TlsError> {
        let tls = self.rustls_client(alpn)?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(transport(timeouts));
        Ok(cfg)
    }

    fn client_config_for_partner(
        &self,
        timeouts: &Timeouts,
        partner: Partner,
    ) -> Result<quinn::ClientConfig, TlsError> {
        let tls = self.rustls_client_for_partner(ALPN, partner)?;
        let quic = QuicClientConfig::try_from(tls).map_err(|e| TlsError::Rustls(e.to_string()))?;
        let mut cfg = quinn::ClientConfig::new(Arc::new(quic));
        cfg.transport_config(transport(timeouts));
        Ok(cfg)
    }

    fn peer_node_id(&self, conn: &quinn::Connection) -> Result<String, TlsError> {
        let id = conn.peer_identity().ok_or_else(|| TlsError::Identity("no certificate".into()))?;
        let chain = id
            .downcast::<Vec<CertificateDer<'static>>>()
            .map_err(|_| TlsError::Identity("unexpected identity type".into()))?;
        self.node_id_of_chain(&chain)
    }
}

/// Receive buffer asked for a relay's UDP socket. The kernel's default (208 KiB) drops the
/// Initial packets of a reconnect storm (thousands of homes redialing a restarted relay),
/// and each drop costs a handshake a retransmission timeout; the kernel caps the size at
/// `net.core.rmem_max` (docs/operations.md).
pub const RELAY_RECEIVE_BUFFER: usize = 8 << 20;

/// Asks for [`RELAY_RECEIVE_BUFFER`] on `socket`; the kernel may grant less (logged).
pub fn grow_receive_buffer(socket: &std::net::UdpSocket) {
    use nix::sys::socket::{setsockopt, sockopt};
    if let Err(e) = setsockopt(socket, sockopt::RcvBuf, &RELAY_RECEIVE_BUFFER) {
        tracing::warn!(error = %e, "cannot grow the QUIC socket's receive buffer");
    }
    if let Ok(got) = nix::sys::socket::getsockopt(socket, sockopt::RcvBuf) {
        // Linux reports twice the granted size (bookkeeping included).
        if got / 2 < RELAY_RECEIVE_BUFFER {
            tracing::info!(
                granted = got / 2,
                asked = RELAY_RECEIVE_BUFFER,
                "QUIC socket receive buffer capped by net.core.rmem_max"
            );
        }
    }
}

/// Transport parameters: keep-alives, idle timeout, windows sized for bulk streams.
fn transport(timeouts: &Timeouts) -> Arc<quinn::TransportConfig> {
    let mut t = quinn::TransportConfig::default();
    let idle = link_idle(timeouts);
    t.max_idle_timeout(quinn::IdleTimeout::try_from(idle).ok());
    t.keep_alive_interval(Some(idle / 4));
    // quinn preallocates state for every stream a peer may open, so the default stays small
    // (a relay holds thousands of home connections); links that carry many streams (peer
    // relays, and a home's single link to its relay) raise it with `raise_stream_limit`.
    t.max_concurrent_bidi_streams(HOME_STREAMS.into());
    t.max_concurrent_uni_streams(0u32.into());
    // Flow-control windows bound what a hop buffers (docs/benchmarks.md, "Beside its peers":
    // 32 MiB windows let three processes peak at 248 MiB under iperf3, these at 101 MiB, at
    // the same throughput). They still cover a 50 ms path at 40 MB/s per stream, 320 MB/s per
    // link received and 160 MB/s sent.
    t.stream_receive_window((2u32 << 20).into());
    t.receive_window((16u32 << 20).into());
    t.send_window(8 << 20);
    Arc::new(t)
}

/// Shortest link idle timeout honoured (keep-alives every 50 ms).
pub const MIN_LINK_IDLE: Duration = Duration::from_millis(200);

/// How long a hop link may hear nothing before it is dead (`timeouts.idleMs`, at least
/// [`MIN_LINK_IDLE`]).
pub fn link_idle(timeouts: &Timeouts) -> Duration {
    Duration::from_millis(timeouts.idle_ms).max(MIN_LINK_IDLE)
}

/// Concurrent streams a home node may open to its main relay at first (the relay doubles it,
/// up to [`TRUNK_STREAMS`], whenever a home uses three quarters of it).
pub const HOME_STREAMS: u32 = 16;
/// Concurrent streams on links that aggregate many callers (relay <-> relay, relay -> home).
pub const TRUNK_STREAMS: u32 = 8192;

/// Raises the number of streams the peer of `conn` may open at once (trunk links).
pub fn raise_stream_limit(conn: &quinn::Connection) {
    conn.set_max_concurrent_bi_streams(TRUNK_STREAMS.into());
}

/// Low-cardinality reason a hop handshake failed, for logs and metric labels.
pub fn failure_reason(err: &quinn::ConnectionError) -> &'static str {
    let text = format!("{err:?} {err}");
    // A pin's refusal, by its message or (as rustls reports it to the server) its variant.
    if ["pinned identity mismatch", "NoPinnedCa", "PinnedChain", "WrongNode"].iter().any(|p| text.contains(p)) {
        "pin_mismatch"
    } else if text.contains("UnknownIssuer") || text.contains("BadSignature") || text.contains("unknown ca") {
        "unknown_ca"
    } else if text.contains("Expired") || text.contains("certificate expired") {
        "expired"
    } else if text.contains("NotValidForName") || text.contains("not valid for name") {
        "node_id_mismatch"
    } else if text.contains("NoApplicationProtocol")
        || text.contains("no_application_protocol")
        || text.contains("crypto(78)")
    {
        "alpn"
    } else if text.contains("CONNECTION_REFUSED") || text.contains("refused to accept a new connection") {
        // A relay with too many handshakes in progress (MAX_PENDING_HANDSHAKES).
        "overloaded"
    } else if text.contains("TimedOut") || text.contains("timed out") {
        "timeout"
    } else if text.contains("CertificateRequired")
        || text.contains("certificate required")
        || text.contains("NoCertificatesPresented")
        || text.contains("no certificates")
        || text.contains("crypto(74)")
    {
        "no_client_certificate"
    } else {
        "other"
    }
}
