//! Direct connections (docs/protocol.md §12.4): dialing a punched address, accepting from
//! one, and keeping one connection per pair of homes.

use super::*;

/// Whether a new direct connection (dialed by `new_dialer`) replaces the one we hold (dialed
/// by `held_dialer`): both homes keep the one dialed by the smaller node id (the newest of
/// those), so two homes that punched each other at once agree on one connection.
pub(crate) fn replaces(held_dialer: &str, new_dialer: &str, me: &str, peer: &str) -> bool {
    let preferred = if me < peer { me } else { peer };
    new_dialer == preferred || held_dialer != preferred
}

impl HomeNode {
    /// Dials `peer` at `addr` on the home's socket (its certificate must name `peer`).
    pub(super) fn dial_direct(self: Arc<Self>, peer: String, addr: SocketAddr) {
        let Some(endpoint) = self.endpoint.get().cloned() else { return };
        self.dial_from(endpoint, peer, addr);
    }

    /// Dials `peer` at `addr` from `endpoint` (the home's, or a port sweep's winner).
    pub(super) fn dial_from(self: Arc<Self>, endpoint: quinn::Endpoint, peer: String, addr: SocketAddr) {
        let tls = self.client_config();
        let name = self.identity.server_name(&peer);
        tokio::spawn(async move {
            let connecting = match endpoint.connect_with(tls, addr, &name) {
                Ok(c) => c,
                Err(e) => return debug!(%peer, %addr, error = %e, "cannot dial direct"),
            };
            match tokio::time::timeout(PUNCH_TIMEOUT, connecting).await {
                Ok(Ok(conn)) => {
                    let me = self.identity.node_id.clone();
                    self.direct_connected(&peer, conn, me);
                }
                Ok(Err(e)) => debug!(%peer, %addr, reason = failure_reason(&e), "direct dial failed"),
                Err(_) => debug!(%peer, %addr, "direct dial timed out"),
            }
        });
    }

    /// Accepts direct connections from homes we punch with, until the endpoint closes.
    pub(in crate::proxy) async fn accept_direct(self: Arc<Self>, endpoint: quinn::Endpoint) {
        while let Some(incoming) = endpoint.accept().await {
            self.accept_incoming(incoming);
        }
    }

    /// Takes a direct handshake if it comes from an address of a running attempt and a
    /// handshake slot is free; refuses it otherwise.
    pub(super) fn accept_incoming(self: &Arc<Self>, incoming: quinn::Incoming) {
        let from = incoming.remote_address();
        let expected = {
            let s = self.direct_state();
            s.peers.iter().find(|(_, p)| p.attempt.as_ref().is_some_and(|a| a.expects(from))).map(|(n, _)| n.clone())
        };
        let slot = self.direct.handshakes.clone().try_acquire_owned().ok();
        let (Some(peer), Some(slot)) = (expected, slot) else {
            incoming.refuse();
            return;
        };
        let node = self.clone();
        let timeout = self.live().handshake_timeout;
        tokio::spawn(async move {
            let result = tokio::time::timeout(timeout, async { incoming.accept()?.await }).await;
            drop(slot);
            let conn = match result {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => return debug!(%peer, %from, error = %e, "direct handshake failed"),
                Err(_) => return debug!(%peer, %from, "direct handshake timed out"),
            };
            match node.identity.peer_node_id(&conn) {
                Ok(id) if id == peer => node.direct_connected(&peer, conn, peer.clone()),
                Ok(id) => {
                    warn!(%peer, other = %id, %from, "direct connection from another node than the one punched with: closed");
                    conn.close(ErrorCode::PermissionDenied.to_u16().into(), b"not the node punched with");
                }
                Err(e) => {
                    warn!(%peer, %from, error = %e, "direct connection without a usable certificate: closed");
                    conn.close(ErrorCode::PermissionDenied.to_u16().into(), b"no node identity");
                }
            }
        });
    }

    /// A direct connection to `peer` (dialed by `dialer`) is up: it carries new streams both
    /// ways until it ends.
    fn direct_connected(self: &Arc<Self>, peer: &str, conn: quinn::Connection, dialer: String) {
        let me = self.identity.node_id.clone();
        let actions = {
            let mut s = self.direct_state();
            let Some(p) = s.peers.get_mut(peer) else {
                conn.close(0u32.into(), b"no attempt");
                return;
            };
            let live_held = p.conn.as_ref().filter(|(c, _)| c.close_reason().is_none());
            if let Some((held, held_dialer)) = live_held {
                if !replaces(held_dialer, &dialer, &me, peer) {
                    conn.close(0u32.into(), b"duplicate direct connection");
                    return;
                }
                held.close(0u32.into(), b"duplicate direct connection");
            }
            crate::transport::tls::raise_stream_limit(&conn);
            p.conn = Some((conn.clone(), dialer));
            p.session.on(Event::Connected, Instant::now())
        };
        self.direct_actions(peer, actions, None);
        let node = self.clone();
        let peer = peer.to_owned();
        tokio::spawn(async move {
            while let Ok((send, recv)) = conn.accept_bi().await {
                let n = node.clone();
                let peer = peer.clone();
                tokio::spawn(async move { n.inbound(send, recv, Some(&peer)).await });
            }
            node.direct_lost(&peer, conn.stable_id());
        });
    }
}

#[cfg(test)]
mod tests {
    use super::replaces;

    #[test]
    fn both_homes_keep_the_connection_dialed_by_the_smaller_node_id() {
        // "a" < "b": from either side, a connection dialed by "a" wins over one by "b".
        for (me, peer) in [("a", "b"), ("b", "a")] {
            assert!(replaces("b", "a", me, peer));
            assert!(!replaces("a", "b", me, peer));
            // Same dialer: the newer one (a redial after the old one died).
            assert!(replaces("a", "a", me, peer));
            assert!(replaces("b", "b", me, peer));
        }
    }
}
