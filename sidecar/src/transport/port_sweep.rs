//! The two halves of a port sweep (docs/protocol.md §12.3), for a punch that plain probes
//! could not complete: a fan of extra sockets, each probing the other home (each a fresh
//! mapping at a symmetric NAT), and a sweep of many ports of the other home's address from
//! the home's own socket (entries in a port-keeping NAT that let one of those mappings in).
//! Bounded: [`FAN_SOCKETS`] sockets and [`SWEEP_PORTS`] probes per address.

use std::io;
use std::net::{IpAddr, SocketAddr};
use std::task::Poll;
use std::time::Duration;

use rand::seq::index;
use tokio::net::UdpSocket;

use super::punch_socket::PunchSocket;
use crate::protocol::punch::{self, TOKEN_LEN};

/// Extra sockets a fan opens.
pub const FAN_SOCKETS: usize = 256;
/// Ports of one address a sweep probes. With [`FAN_SOCKETS`] mappings among the 64,512
/// ports a NAT draws from, a sweep misses all of them with probability
/// (1 − 256/64512)^2048 ≈ 0.03%.
pub const SWEEP_PORTS: usize = 2048;
/// The lowest port a NAT maps an unprivileged source port to.
const FIRST_PORT: u16 = 1024;
/// Probes sent back to back before the sweep yields (the socket buffer drains meanwhile).
const SWEEP_BATCH: usize = 128;
/// Pause between batches.
const SWEEP_PAUSE: Duration = Duration::from_millis(2);

/// Extra UDP sockets probing the same addresses; the first to receive a probe of the
/// attempt wins and becomes the direct path's socket.
pub struct Fan {
    sockets: Vec<UdpSocket>,
}

impl Fan {
    /// Opens `n` sockets on `ip` (ephemeral ports).
    pub fn open(ip: IpAddr, n: usize) -> io::Result<Self> {
        let sockets = (0..n)
            .map(|_| {
                let s = std::net::UdpSocket::bind(SocketAddr::new(ip, 0))?;
                s.set_nonblocking(true)?;
                UdpSocket::from_std(s)
            })
            .collect::<io::Result<Vec<_>>>()?;
        Ok(Self { sockets })
    }

    /// Sends one probe per token from every socket to each of `to` (a send that fails is
    /// skipped, as a lost packet would be). Waits for each socket to be writable: a fresh
    /// socket is not until the runtime has polled it once.
    pub async fn probe(&self, to: &[SocketAddr], tokens: &[[u8; TOKEN_LEN]]) {
        for s in &self.sockets {
            for addr in to {
                for token in tokens {
                    let _ = s.send_to(&punch::encode(token), *addr).await;
                }
            }
        }
    }

    /// Waits for the first probe carrying one of `tokens` on any socket: which socket, and
    /// where the probe came from. Other datagrams are read and dropped. A socket stops
    /// being read once it got a probe, so whatever follows the probe (the other home's QUIC
    /// handshake) stays for QUIC.
    pub async fn hit(&self, tokens: &[[u8; TOKEN_LEN]]) -> io::Result<(usize, SocketAddr)> {
        let sockets = &self.sockets;
        std::future::poll_fn(|cx| {
            let mut buf = [0u8; 64];
            for (i, s) in sockets.iter().enumerate() {
                // Drain what is queued on this socket until a probe of ours or nothing.
                loop {
                    let mut rb = tokio::io::ReadBuf::new(&mut buf);
                    match s.poll_recv_from(cx, &mut rb) {
                        Poll::Ready(Ok(from)) => {
                            if punch::decode(rb.filled()).is_ok_and(|t| tokens.contains(&t)) {
                                return Poll::Ready(Ok((i, from)));
                            }
                        }
                        Poll::Ready(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => {}
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => break,
                    }
                }
            }
            Poll::Pending
        })
        .await
    }

    /// Socket `i` for the direct path; the others close.
    pub fn take(mut self, i: usize) -> io::Result<std::net::UdpSocket> {
        if i >= self.sockets.len() {
            return Err(io::Error::other("no such socket in the fan"));
        }
        self.sockets.swap_remove(i).into_std()
    }
}

/// `n` distinct ports a NAT may map to, drawn at random.
pub fn sweep_ports(n: usize) -> Vec<u16> {
    let span = usize::from(u16::MAX - FIRST_PORT) + 1;
    let mut rng = rand::rng();
    index::sample(&mut rng, span, n.min(span))
        .into_iter()
        .filter_map(|i| u16::try_from(i).ok())
        .map(|i| FIRST_PORT + i)
        .collect()
}

/// Probes `ports` of `ip` from the home's socket, paced so the socket buffer keeps up.
pub async fn sweep(socket: &PunchSocket, ip: IpAddr, ports: &[u16], token: &[u8; TOKEN_LEN]) {
    for batch in ports.chunks(SWEEP_BATCH) {
        for port in batch {
            socket.send_probe(SocketAddr::new(ip, *port), token);
        }
        tokio::time::sleep(SWEEP_PAUSE).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sweep_ports_are_distinct_and_unprivileged() {
        let ports = sweep_ports(SWEEP_PORTS);
        assert_eq!(ports.len(), SWEEP_PORTS);
        assert!(ports.iter().all(|p| *p >= FIRST_PORT));
        let mut sorted = ports.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(sorted.len(), SWEEP_PORTS);
        // More than there are: every port once.
        assert_eq!(sweep_ports(100_000).len(), usize::from(u16::MAX - FIRST_PORT) + 1);
    }

    #[tokio::test]
    async fn the_socket_a_probe_reaches_wins_and_keeps_what_follows() {
        let fan = Fan::open("127.0.0.1".parse().unwrap(), 8).unwrap();
        let target = fan.sockets[5].local_addr().unwrap();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        // Junk and another attempt's probe are skipped; ours wins; what follows stays queued.
        peer.send_to(b"junk", target).unwrap();
        peer.send_to(&punch::encode(&[1; TOKEN_LEN]), target).unwrap();
        peer.send_to(&punch::encode(&[7; TOKEN_LEN]), target).unwrap();
        peer.send_to(b"after", target).unwrap();
        let (i, from) = fan.hit(&[[7; TOKEN_LEN]]).await.unwrap();
        assert_eq!(from, peer.local_addr().unwrap());
        let socket = fan.take(i).unwrap();
        assert_eq!(socket.local_addr().unwrap(), target);
        socket.set_nonblocking(false).unwrap();
        let mut buf = [0u8; 16];
        let (n, _) = socket.recv_from(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"after");
    }

    #[tokio::test]
    async fn a_fan_probes_from_every_socket() {
        let fan = Fan::open("127.0.0.1".parse().unwrap(), 4).unwrap();
        let sources: Vec<SocketAddr> = fan.sockets.iter().map(|s| s.local_addr().unwrap()).collect();
        let peer = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        fan.probe(&[peer.local_addr().unwrap()], &[[3; TOKEN_LEN]]).await;
        let mut seen = vec![];
        let mut buf = [0u8; 64];
        for _ in 0..4 {
            let (n, from) = peer.recv_from(&mut buf).unwrap();
            assert_eq!(punch::decode(&buf[..n]).unwrap(), [3; TOKEN_LEN]);
            seen.push(from);
        }
        seen.sort();
        let mut want = sources;
        want.sort();
        assert_eq!(seen, want);
    }
}
