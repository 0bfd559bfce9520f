//! A main relay's part in direct paths, the I/O around the decisions of `rendezvous.rs`
//! (docs/protocol.md §12): homes join when they register and are told their address while
//! direct paths are on; punch requests are coordinated between two of our homes, or forwarded
//! to and answered from the relay of the other home.

use tokio::sync::mpsc;
use tracing::warn;

use super::MainRelay;
use super::live::MainLive;
use super::rendezvous::{Party, Refusal};
use crate::federation::registry::Entry;
use crate::protocol::control::Control;

/// Whether `relay` is a peer relay of this federation: a partner's has a pin, and homes'
/// addresses never leave the federation.
fn of_this_federation(live: &MainLive, relay: &str) -> bool {
    live.peers.get(relay).is_some_and(|p| p.pin.is_none())
}

impl MainRelay {
    /// Adds `node` to the rendezvous (nothing is sent); returns its connection's id.
    pub(super) fn join_rendezvous(&self, node: &str, tx: mpsc::Sender<Control>) -> Option<usize> {
        let conn = self.homes.read().ok().and_then(|h| h.get(node).map(|l| l.conn.clone()))?;
        let party = Party {
            conn_id: conn.stable_id(),
            tx,
            observed: conn.remote_address(),
            told: false,
            local: vec![],
            imports: None,
            services: vec![],
        };
        self.rendezvous.lock().ok()?.join(node, party);
        Some(conn.stable_id())
    }

    /// Tells `node` its reflexive address, once per connection: from then on it takes part
    /// in direct paths (it may be punched to).
    pub(super) fn tell_observed(&self, node: &str) {
        let Ok(mut r) = self.rendezvous.lock() else { return };
        if let Some(m) = r.tell(node) {
            self.metrics.relay.direct_parties.set(r.len() as i64);
            drop(r);
            tracing::debug!(home = %node, message = ?m, "direct paths: home told its address");
        }
    }

    /// Coordinates `from`'s request for a direct path to `peer`: `punch` to both homes at
    /// once, or `punchRefused` to `from`.
    pub(super) fn punch_request(&self, from: &str, peer: &str, reply: &mpsc::Sender<Control>) {
        let decided = if self.live().direct_paths.enabled {
            self.tell_observed(from);
            let token: [u8; 16] = rand::random();
            match self.rendezvous.lock() {
                Ok(r) => r.coordinate(from, peer, &token),
                Err(_) => Err(Refusal::NotConnected),
            }
        } else {
            Err(Refusal::Disabled)
        };
        let result = match decided {
            Ok(((to_from, a), (to_peer, b))) => {
                let _ = to_peer.try_send(b);
                let _ = to_from.try_send(a);
                tracing::debug!(home = %from, peer = %peer, "direct path: punch coordinated");
                "coordinated"
            }
            Err(why) => {
                let _ = reply.try_send(Control::PunchRefused { peer: peer.to_owned(), reason: why.label().to_owned() });
                tracing::debug!(home = %from, peer = %peer, reason = why.label(), "direct path: punch refused");
                why.label()
            }
        };
        self.metrics.relay.punches.get_or_create(&[("result", result)]).inc();
    }

    /// `from`'s request for a direct path to `peer`, registered at peer relay `relay`: sent on
    /// to that relay (`punchForward`), which punches its home and answers with its
    /// candidates; or `punchRefused` to `from` now.
    pub(super) fn forward_punch(&self, from: &str, peer: &str, relay: &str, reply: &mpsc::Sender<Control>) {
        let live = self.live();
        let forwarded = (|| {
            if !live.direct_paths.enabled {
                return Err(Refusal::Disabled);
            }
            self.tell_observed(from);
            if !of_this_federation(&live, relay) {
                return Err(Refusal::PeerUnreachable);
            }
            let link = self.peers.read().ok().and_then(|p| p.get(relay).and_then(|l| l.control.clone()));
            let link = link.ok_or(Refusal::PeerUnreachable)?;
            let imports = self.rendezvous.lock().ok().and_then(|r| r.imports_of(from)).ok_or(Refusal::NotConnected)?;
            let permitted = self.registry.lock().is_ok_and(|r| {
                let theirs = |e: &Entry| e.node == peer && e.main == relay;
                match imports.as_deref() {
                    Some(i) => i.iter().any(|(s, p)| r.lookup(s, *p).iter().any(theirs)),
                    None => r.all().iter().any(theirs),
                }
            });
            let token: [u8; 16] = rand::random();
            let m = self.rendezvous.lock().map_err(|_| Refusal::NotConnected)?.forward(
                from,
                peer,
                relay,
                permitted,
                &token,
                std::time::Instant::now(),
            )?;
            link.send(m).map_err(|_| Refusal::PeerUnreachable)
        })();
        let result = match forwarded {
            Ok(()) => "forwarded",
            Err(why) => {
                let _ = reply.try_send(Control::PunchRefused { peer: peer.to_owned(), reason: why.label().to_owned() });
                why.label()
            }
        };
        tracing::debug!(home = %from, peer = %peer, relay, result, "direct path: punch request for another relay's home");
        self.metrics.relay.punches.get_or_create(&[("result", result)]).inc();
    }

    /// A peer relay's `punchForward` (its home `from` asks for our home `peer`) or
    /// `punchAnswer` (to one we forwarded); `reply` goes back to that relay.
    pub(crate) fn peer_punch(
        &self,
        relay: &str,
        m: Control,
        reply: Option<&tokio::sync::mpsc::UnboundedSender<Control>>,
    ) {
        let live = self.live();
        match m {
            Control::PunchForward { from, peer, token, candidates } => {
                let decided = if !live.direct_paths.enabled {
                    Err(Refusal::Disabled)
                } else if !of_this_federation(&live, relay) {
                    Err(Refusal::PeerUnreachable)
                } else {
                    match self.rendezvous.lock() {
                        Ok(r) => r.forwarded(&from, &peer, &token, &candidates),
                        Err(_) => Err(Refusal::NotConnected),
                    }
                };
                let (answer, result) = match decided {
                    Ok(((to_peer, punch), answer)) => {
                        let _ = to_peer.try_send(punch);
                        (answer, "coordinated")
                    }
                    Err(why) => (
                        Control::PunchAnswer {
                            from: from.clone(),
                            peer: peer.clone(),
                            token,
                            candidates: vec![],
                            refused: Some(why.label().to_owned()),
                        },
                        why.label(),
                    ),
                };
                if let Some(tx) = reply {
                    let _ = tx.send(answer);
                }
                tracing::debug!(%relay, home = %peer, asker = %from, result, "direct path: punch forwarded to us");
                self.metrics.relay.punches.get_or_create(&[("result", result)]).inc();
            }
            m @ Control::PunchAnswer { .. } => {
                let to_home =
                    self.rendezvous.lock().ok().and_then(|mut r| r.answered(relay, &m, std::time::Instant::now()));
                match to_home {
                    Some((tx, punch)) => {
                        let _ = tx.try_send(punch);
                    }
                    None => warn!(%relay, "an answer to no punch we forwarded: ignored"),
                }
            }
            _ => {}
        }
    }
}
