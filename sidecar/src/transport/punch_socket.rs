//! A home's UDP socket as QUIC sees it, plus punch probes (docs/protocol.md §12.2): the same
//! socket, so the same NAT mapping, carries the links to main relays, the probes and any
//! direct connection. Received probes never reach QUIC; they are handed to the home's
//! direct-path task through a bounded queue (a flood of probes is dropped, not queued).

use std::fmt;
use std::io::{self, IoSliceMut};
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use quinn::udp::{RecvMeta, Transmit};
use quinn::{AsyncUdpSocket, UdpPoller};
use tokio::sync::mpsc;

use crate::protocol::punch::{self, TOKEN_LEN};

/// Received probes waiting for the home's direct-path task, at most.
pub const PROBE_QUEUE: usize = 64;

/// A probe as received: its token and where it came from.
pub type Probe = ([u8; TOKEN_LEN], SocketAddr);

/// The home's QUIC socket, which also sends and receives punch probes.
pub struct PunchSocket {
    inner: Arc<dyn AsyncUdpSocket>,
    probes: mpsc::Sender<Probe>,
}

impl fmt::Debug for PunchSocket {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("PunchSocket").field("inner", &self.inner).finish()
    }
}

impl PunchSocket {
    /// Binds `addr` for QUIC; probes received go to the returned queue.
    pub fn bind(addr: SocketAddr) -> io::Result<(Arc<Self>, mpsc::Receiver<Probe>)> {
        Self::from_std(std::net::UdpSocket::bind(addr)?)
    }

    /// Takes over a bound socket (a port sweep's winner); probes received go to the
    /// returned queue.
    pub fn from_std(socket: std::net::UdpSocket) -> io::Result<(Arc<Self>, mpsc::Receiver<Probe>)> {
        let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
        let inner = runtime.wrap_udp_socket(socket)?;
        let (probes, rx) = mpsc::channel(PROBE_QUEUE);
        Ok((Arc::new(Self { inner, probes }), rx))
    }

    /// A QUIC endpoint on this socket (no server configuration until direct paths are on).
    pub fn endpoint(self: &Arc<Self>) -> io::Result<quinn::Endpoint> {
        let runtime = quinn::default_runtime().ok_or_else(|| io::Error::other("no async runtime for QUIC"))?;
        quinn::Endpoint::new_with_abstract_socket(quinn::EndpointConfig::default(), None, self.clone(), runtime)
    }

    /// Sends one probe carrying `token` to `to` (best effort: a full socket buffer drops it,
    /// as the network may).
    pub fn send_probe(&self, to: SocketAddr, token: &[u8; TOKEN_LEN]) {
        let probe = punch::encode(token);
        let t = Transmit { destination: to, ecn: None, contents: &probe, segment_size: None, src_ip: None };
        if let Err(e) = self.inner.try_send(&t)
            && e.kind() != io::ErrorKind::WouldBlock
        {
            tracing::debug!(%to, error = %e, "probe not sent");
        }
    }
}

impl AsyncUdpSocket for PunchSocket {
    fn create_io_poller(self: Arc<Self>) -> Pin<Box<dyn UdpPoller>> {
        self.inner.clone().create_io_poller()
    }

    fn try_send(&self, transmit: &Transmit) -> io::Result<()> {
        self.inner.try_send(transmit)
    }

    fn poll_recv(
        &self,
        cx: &mut Context,
        bufs: &mut [IoSliceMut<'_>],
        meta: &mut [RecvMeta],
    ) -> Poll<io::Result<usize>> {
        let n = match self.inner.poll_recv(cx, bufs, meta) {
            Poll::Ready(Ok(n)) => n,
            other => return other,
        };
        for (m, buf) in meta.iter_mut().zip(bufs.iter()).take(n) {
            let data = &buf[..m.len.min(buf.len())];
            if punch::looks_like_probe(data) {
                // Probes are never coalesced with QUIC packets (they differ in size and
                // flow); a probe of the wrong length is dropped like any junk.
                if let Ok(token) = punch::decode(&data[..m.stride.min(data.len())]) {
                    let _ = self.probes.try_send((token, m.addr));
                }
                // An empty buffer: QUIC skips it.
                m.len = 0;
            }
        }
        Poll::Ready(Ok(n))
    }

    fn local_addr(&self) -> io::Result<SocketAddr> {
        self.inner.local_addr()
    }

    fn max_transmit_segments(&self) -> usize {
        self.inner.max_transmit_segments()
    }

    fn max_receive_segments(&self) -> usize {
        self.inner.max_receive_segments()
    }

    fn may_fragment(&self) -> bool {
        self.inner.may_fragment()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn probes_are_taken_out_and_quic_still_works_on_the_socket() {
        let (sock, mut probes) = PunchSocket::bind("127.0.0.1:0".parse().unwrap()).unwrap();
        let _endpoint = sock.endpoint().unwrap();
        let to = sock.local_addr().unwrap();
        let other = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        other.send_to(&punch::encode(&[9; TOKEN_LEN]), to).unwrap();
        let (token, from) = probes.recv().await.unwrap();
        assert_eq!((token, from), ([9; TOKEN_LEN], other.local_addr().unwrap()));
        // A datagram with the magic but the wrong length is dropped, not queued.
        let mut long = punch::encode(&[1; TOKEN_LEN]).to_vec();
        long.push(0);
        other.send_to(&long, to).unwrap();
        other.send_to(&punch::encode(&[2; TOKEN_LEN]), to).unwrap();
        assert_eq!(probes.recv().await.unwrap().0, [2; TOKEN_LEN]);
        // Sending: the other side receives exactly a probe.
        sock.send_probe(other.local_addr().unwrap(), &[5; TOKEN_LEN]);
        let mut buf = [0u8; 64];
        let (len, from) = other.recv_from(&mut buf).unwrap();
        assert_eq!((punch::decode(&buf[..len]).unwrap(), from), ([5; TOKEN_LEN], to));
    }
}
