//! Port sweeps for a direct-path attempt whose plain probes went unanswered (docs/protocol.md
//! §12.3): the I/O around `transport::port_sweep`, decided by
//! `federation::direct_path::sweep`. The half that probes many ports sends from the home's
//! socket once; the half that opens a fan of sockets probes from each until one hears the
//! other home, then makes that socket a QUIC endpoint for the direct connection (it dials
//! if this home dials, and accepts until the attempt's time is up either way).

use std::net::{IpAddr, SocketAddr};

use super::*;
use crate::federation::direct_path::{PUNCH_TIMEOUT, Sweep};
use crate::transport::port_sweep::{self, FAN_SOCKETS, Fan, SWEEP_PORTS};
use crate::transport::punch_socket::PunchSocket;

/// Fans (of [`FAN_SOCKETS`] sockets each) a home runs at once; another attempt that wants
/// one does without.
pub(super) const MAX_FANS: usize = 2;
/// Addresses of the other home whose ports one sweep probes, at most.
const MAX_SWEPT_ADDRESSES: usize = 2;
/// When a fan probes from every socket, from its start: soon again while the other home's
/// sweep may still be on its way (a probe that reached its NAT first was dropped), then
/// every [`FAN_INTERVAL`].
const FAN_SCHEDULE_MS: [u64; 4] = [0, 40, 80, 150];
/// Sweeps a home starts, at most: a burst of 8, then two per second on average. A main
/// relay can ask a home to punch toward any address; this bounds how much a hostile one can
/// make it send there (2,048 probes of 24 bytes per swept address), while a home that calls
/// several homes behind symmetric NATs in a row still sweeps for each.
const SWEEP_LIMIT: crate::resilience::rate_limit::Limit =
    crate::resilience::rate_limit::Limit { rate: 2.0, burst: 8.0 };
/// A fan probes from every socket this often after [`FAN_SCHEDULE_MS`].
const FAN_INTERVAL: Duration = Duration::from_millis(200);

impl HomeNode {
    /// Starts the halves of a port sweep `how` asks for, for the attempt `generation`
    /// toward `peer`.
    pub(super) fn start_sweep(self: &Arc<Self>, peer: &str, generation: u64, how: Sweep) {
        let Some((tokens, listed)) = self.attempt_probe_set(peer, generation) else { return };
        let Some(token) = tokens.first().copied() else { return };
        let limited = match self.direct.limiter.lock() {
            Ok(mut l) => l.admit("port sweep", SWEEP_LIMIT, Instant::now()).retry_after().is_some(),
            Err(_) => true,
        };
        if limited {
            return debug!(peer, "port sweeps are rate limited: this attempt does without");
        }
        info!(peer, sockets = how.sockets, ports = how.ports, "no probe answered: sweeping ports");
        if how.ports {
            self.metrics.proxy.port_sweeps.get_or_create(&[("half", "ports")]).inc();
            let mut ips: Vec<IpAddr> = vec![];
            for a in &listed {
                if !ips.contains(&a.ip()) && ips.len() < MAX_SWEPT_ADDRESSES {
                    ips.push(a.ip());
                }
            }
            let socket = self.direct.socket.clone();
            tokio::spawn(async move {
                let ports = port_sweep::sweep_ports(SWEEP_PORTS);
                for ip in ips {
                    port_sweep::sweep(&socket, ip, &ports, &token).await;
                }
            });
        }
        if how.sockets {
            let Ok(permit) = self.direct.fans.clone().try_acquire_owned() else {
                return debug!(peer, "every fan of sockets is in use: this attempt sweeps without one");
            };
            self.metrics.proxy.port_sweeps.get_or_create(&[("half", "sockets")]).inc();
            let node = self.clone();
            let peer = peer.to_owned();
            tokio::spawn(async move {
                if let Err(e) = node.fan(&peer, generation, permit).await {
                    debug!(%peer, error = %e, "fan of sockets ended");
                }
            });
        }
    }

    /// The tokens and the relay's candidates of attempt `generation` toward `peer`, while it
    /// runs.
    fn attempt_probe_set(&self, peer: &str, generation: u64) -> Option<(Vec<[u8; 16]>, Vec<SocketAddr>)> {
        let s = self.direct_state();
        let a = s.peers.get(peer)?.attempt.as_ref().filter(|a| a.generation == generation)?;
        Some((a.tokens.clone(), a.listed.clone()))
    }

    /// Opens a fan, probes from it until a socket hears the other home or the attempt ends,
    /// and carries the direct connection on the winner. `permit` is let go with the fan's
    /// other sockets.
    async fn fan(
        self: &Arc<Self>,
        peer: &str,
        generation: u64,
        permit: tokio::sync::OwnedSemaphorePermit,
    ) -> std::io::Result<()> {
        let ip = self.direct.socket.local_addr()?.ip();
        let fan = Fan::open(ip, FAN_SOCKETS)?;
        let start = tokio::time::Instant::now();
        let deadline = start + PUNCH_TIMEOUT;
        let mut schedule = FAN_SCHEDULE_MS.iter().skip(1).map(|ms| start + Duration::from_millis(*ms));
        let (i, from) = loop {
            let Some((tokens, listed)) = self.attempt_probe_set(peer, generation) else { return Ok(()) };
            fan.probe(&listed, &tokens).await;
            let next = schedule.next().unwrap_or_else(|| tokio::time::Instant::now() + FAN_INTERVAL).min(deadline);
            tokio::select! {
                hit = fan.hit(&tokens) => break hit?,
                _ = tokio::time::sleep_until(next) => {
                    if next >= deadline {
                        return Ok(());
                    }
                }
            }
        };
        let winner = fan.take(i)?;
        drop(permit);
        let dial = {
            let mut s = self.direct_state();
            let Some(a) = s.peers.get_mut(peer).and_then(|p| p.attempt.as_mut()).filter(|a| a.generation == generation)
            else {
                return Ok(());
            };
            a.heard(from);
            // The other home learns this mapping from the answer (its sweep may have
            // reached us before our probes reached it). Sent before QUIC takes the socket:
            // a socket QUIC just took is not writable until the runtime polled it.
            for token in &a.tokens {
                let _ = winner.send_to(&crate::protocol::punch::encode(token), from);
            }
            a.dial
        };
        let (socket, _probes) = PunchSocket::from_std(winner)?;
        let endpoint = socket.endpoint()?;
        let server = match self.direct.server.lock() {
            Ok(s) => s.clone(),
            Err(p) => p.into_inner().clone(),
        };
        endpoint.set_server_config(server);
        debug!(peer, %from, local = %endpoint.local_addr()?, "a socket of the fan heard the other home");
        if dial {
            self.clone().dial_from(endpoint.clone(), peer.to_owned(), from);
        }
        while let Ok(Some(incoming)) = tokio::time::timeout_at(deadline, endpoint.accept()).await {
            self.accept_incoming(incoming);
        }
        // The connection (if any) keeps the endpoint; nothing else is accepted on it.
        endpoint.set_server_config(None);
        Ok(())
    }
}
