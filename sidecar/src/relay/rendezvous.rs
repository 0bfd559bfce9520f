//! A main relay's part in direct paths (docs/protocol.md §12): it tells each home the address
//! it sees the home's packets come from, keeps the homes' candidate addresses (in memory,
//! never propagated to peers or shown to anyone else), and on a home's `punchRequest` sends
//! `punch` to both homes at once, each with the other's candidates.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::mpsc;

use super::views::Interest;
use crate::protocol::control::{Control, MAX_CANDIDATES};

/// What the relay knows of one home for direct paths.
pub(crate) struct Party {
    /// The home's QUIC connection (`stable_id`): a newer connection replaces the party.
    pub(crate) conn_id: usize,
    /// Control messages to the home (its view writer sends them between views).
    pub(crate) tx: mpsc::Sender<Control>,
    /// The address the relay sees the home's packets come from.
    pub(crate) observed: SocketAddr,
    /// The home was told `observed` (it takes part in direct paths).
    pub(crate) told: bool,
    /// The home's own addresses, as it listed them.
    pub(crate) local: Vec<SocketAddr>,
    /// `service:port`s the home imports (`None`: everything).
    pub(crate) imports: Option<Arc<Interest>>,
    /// `service:port`s the home registered.
    pub(crate) services: Vec<(String, u16)>,
}

/// Why a punch was not coordinated (a metric label and the `punchRefused` reason).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// Direct paths are off at this relay.
    Disabled,
    /// The other home is not connected here (or is the asker itself).
    NotConnected,
    /// The asker may call nothing the other home serves.
    NotPermitted,
    /// The other home's relay is not a connected peer of this federation, or did not answer.
    PeerUnreachable,
}

impl Refusal {
    /// Label value and wire reason.
    pub(crate) fn label(self) -> &'static str {
        match self {
            Refusal::Disabled => "disabled",
            Refusal::NotConnected => "not_connected",
            Refusal::NotPermitted => "not_permitted",
            Refusal::PeerUnreachable => "peer_unreachable",
        }
    }
}

/// Punches forwarded to other relays and not answered yet, at most; older than
/// [`FORWARD_TIMEOUT`] they are forgotten.
pub(crate) const MAX_FORWARDED: usize = 4096;
/// How long an answer to a forwarded punch is waited for.
pub(crate) const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// A punch forwarded to the relay of the other home.
struct Forwarded {
    from: String,
    peer: String,
    relay: String,
    at: std::time::Instant,
}

/// The homes taking part in direct paths at this relay.
#[derive(Default)]
pub(crate) struct Rendezvous {
    parties: HashMap<String, Party>,
    /// By token (base64).
    forwarded: HashMap<String, Forwarded>,
}

impl Rendezvous {
    /// Adds or replaces `node`'s party.
    pub(crate) fn join(&mut self, node: &str, party: Party) {
        self.parties.insert(node.to_owned(), party);
    }

    /// Updates what `node` registered and imports.
    pub(crate) fn registered(&mut self, node: &str, services: Vec<(String, u16)>, imports: Option<Arc<Interest>>) {
        if let Some(p) = self.parties.get_mut(node) {
            p.services = services;
            p.imports = imports;
        }
    }

    /// Records `node`'s local addresses (the first [`MAX_CANDIDATES`] that parse).
    pub(crate) fn candidates(&mut self, node: &str, local: &[String]) {
        if let Some(p) = self.parties.get_mut(node) {
            p.local = local.iter().take(MAX_CANDIDATES).filter_map(|a| a.parse().ok()).collect();
        }
    }

    /// Removes `node`'s party if it still belongs to connection `conn_id`.
    pub(crate) fn leave(&mut self, node: &str, conn_id: usize) {
        if self.parties.get(node).is_some_and(|p| p.conn_id == conn_id) {
            self.parties.remove(node);
        }
    }

    /// What `node` imports (`Some(None)`: everything), if it is a party.
    pub(crate) fn imports_of(&self, node: &str) -> Option<Option<Arc<Interest>>> {
        self.parties.get(node).map(|p| p.imports.clone())
    }

    /// Homes taking part: told their address (a gauge).
    pub(crate) fn len(&self) -> usize {
        self.parties.values().filter(|p| p.told).count()
    }

    /// Sends `node` its `observed` address unless it was told already; returns the message
    /// sent.
    pub(crate) fn tell(&mut self, node: &str) -> Option<Control> {
        let p = self.parties.get_mut(node).filter(|p| !p.told)?;
        let m = Control::Observed { address: p.observed.to_string() };
        p.told = p.tx.try_send(m.clone()).is_ok();
        p.told.then_some(m)
    }

    /// Decides `from`'s request for a direct path to `peer`: the two `punch` messages (for
    /// `from`, for `peer`) and where to send them, or why not.
    #[allow(clippy::type_complexity)]
    pub(crate) fn coordinate(
        &self,
        from: &str,
        peer: &str,
        token: &[u8; 16],
    ) -> Result<((mpsc::Sender<Control>, Control), (mpsc::Sender<Control>, Control)), Refusal> {
        // The other home must take part (told its address: it runs with direct paths on).
        let (Some(a), Some(b)) = (self.parties.get(from), self.parties.get(peer).filter(|p| p.told)) else {
            return Err(Refusal::NotConnected);
        };
        if from == peer {
            return Err(Refusal::NotConnected);
        }
        if !may_call(a.imports.as_deref(), &b.services) {
            return Err(Refusal::NotPermitted);
        }
        let token = crate::config::base64_encode(token);
        let punch = |to: &str, other: &Party, viewer: &Party, dial: bool| Control::Punch {
            peer: to.to_owned(),
            token: token.clone(),
            candidates: shown_to(&candidates(other), viewer.observed.ip()),
            dial,
        };
        Ok(((a.tx.clone(), punch(peer, b, a, true)), (b.tx.clone(), punch(from, a, b, false))))
    }
}

impl Rendezvous {
    /// The `punchForward` for `from`'s request toward `peer` at relay `relay` (recorded to
    /// match the answer), or why not. `permitted`: `from` imports something `peer` registered
    /// (the registry knows).
    pub(crate) fn forward(
        &mut self,
        from: &str,
        peer: &str,
        relay: &str,
        permitted: bool,
        token: &[u8; 16],
        now: std::time::Instant,
    ) -> Result<Control, Refusal> {
        let a = self.parties.get(from).ok_or(Refusal::NotConnected)?;
        if !permitted {
            return Err(Refusal::NotPermitted);
        }
        let candidates = candidates(a);
        self.forwarded.retain(|_, f| now.saturating_duration_since(f.at) < FORWARD_TIMEOUT);
        if self.forwarded.len() >= MAX_FORWARDED {
            return Err(Refusal::PeerUnreachable);
        }
        let token = crate::config::base64_encode(token);
        let f = Forwarded { from: from.to_owned(), peer: peer.to_owned(), relay: relay.to_owned(), at: now };
        self.forwarded.insert(token.clone(), f);
        Ok(Control::PunchForward { from: from.to_owned(), peer: peer.to_owned(), token, candidates })
    }

    /// At the other home's relay: the `punch` for `peer` (one of ours) with the asking home's
    /// `candidates`, and the answer for the asking relay; or the refusal to answer with.
    pub(crate) fn forwarded(
        &self,
        from: &str,
        peer: &str,
        token: &str,
        their_candidates: &[String],
    ) -> Result<((mpsc::Sender<Control>, Control), Control), Refusal> {
        let b = self.parties.get(peer).filter(|p| p.told).ok_or(Refusal::NotConnected)?;
        let theirs = shown_to(their_candidates, b.observed.ip());
        let punch = Control::Punch { peer: from.to_owned(), token: token.to_owned(), candidates: theirs, dial: false };
        let answer = Control::PunchAnswer {
            from: from.to_owned(),
            peer: peer.to_owned(),
            token: token.to_owned(),
            candidates: candidates(b),
            refused: None,
        };
        Ok(((b.tx.clone(), punch), answer))
    }

    /// At the asking home's relay: the answer from `relay` to a forwarded punch; what to send
    /// the asking home (`punch` or `punchRefused`), if the answer matches one we forwarded.
    pub(crate) fn answered(
        &mut self,
        relay: &str,
        answer: &Control,
        now: std::time::Instant,
    ) -> Option<(mpsc::Sender<Control>, Control)> {
        let Control::PunchAnswer { from, peer, token, candidates, refused } = answer else { return None };
        let f = self.forwarded.get(token)?;
        if f.relay != relay
            || &f.from != from
            || &f.peer != peer
            || now.saturating_duration_since(f.at) >= FORWARD_TIMEOUT
        {
            return None;
        }
        self.forwarded.remove(token);
        let a = self.parties.get(from)?;
        let m = match refused {
            Some(reason) => Control::PunchRefused { peer: peer.clone(), reason: reason.clone() },
            None => Control::Punch {
                peer: peer.clone(),
                token: token.clone(),
                candidates: shown_to(candidates, a.observed.ip()),
                dial: true,
            },
        };
        Some((a.tx.clone(), m))
    }
}

/// Whether a home importing `imports` may call something among `services`.
pub(crate) fn may_call(imports: Option<&Interest>, services: &[(String, u16)]) -> bool {
    match imports {
        None => !services.is_empty(),
        Some(i) => services.iter().any(|s| i.contains(s)),
    }
}

/// The candidates a home at public address `viewer` is shown: the other home's observed
/// address (the first), and its own addresses only when both are behind the same public
/// address (one NAT: the only case they can help, and nobody else learns a home's private
/// addresses). Unparsable entries are dropped; at most [`MAX_CANDIDATES`].
pub(crate) fn shown_to(candidates: &[String], viewer: std::net::IpAddr) -> Vec<String> {
    let parsed: Vec<SocketAddr> =
        candidates.iter().take(MAX_CANDIDATES).filter_map(|a| a.parse::<SocketAddr>().ok()).collect();
    let Some(first) = parsed.first().copied() else { return vec![] };
    let same_nat = first.ip() == viewer;
    parsed.iter().enumerate().filter(|(i, _)| *i == 0 || same_nat).map(|(_, a)| a.to_string()).collect()
}

/// A home's candidates: the observed address first, then its own (without repeats), at
/// most [`MAX_CANDIDATES`].
pub(crate) fn candidates(p: &Party) -> Vec<String> {
    let mut out: Vec<SocketAddr> = vec![p.observed];
    for a in &p.local {
        if !out.contains(a) && out.len() < MAX_CANDIDATES {
            out.push(*a);
        }
    }
    out.iter().map(SocketAddr::to_string).collect()
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn party(conn_id: usize, observed: &str, imports: Option<&[(&str, u16)]>, services: &[(&str, u16)]) -> Party {
        let (tx, rx) = mpsc::channel(4);
        // The home's end stays open for the test's length (a closed one takes nothing).
        std::mem::forget(rx);
        Party {
            conn_id,
            tx,
            observed: observed.parse().unwrap(),
            told: true,
            local: vec![],
            imports: imports.map(|i| Arc::new(i.iter().map(|(s, p)| ((*s).to_owned(), *p)).collect())),
            services: services.iter().map(|(s, p)| ((*s).to_owned(), *p)).collect(),
        }
    }

    #[test]
    fn both_homes_get_the_others_candidates_and_only_the_asker_dials() {
        let mut r = Rendezvous::default();
        r.join("shop", party(1, "198.51.100.1:4000", Some(&[("pay", 80)]), &[]));
        r.join("pay", party(2, "203.0.113.9:5000", None, &[("pay", 80)]));
        r.candidates("pay", &["10.0.0.2:5000".into(), "203.0.113.9:5000".into(), "junk".into()]);
        let ((_, to_shop), (_, to_pay)) = r.coordinate("shop", "pay", &[0; 16]).unwrap();
        let Control::Punch { peer, candidates, dial, token } = to_shop else { panic!() };
        assert_eq!((peer.as_str(), dial), ("pay", true));
        // shop is behind another public address: pay's own address is not shown to it.
        assert_eq!(candidates, vec!["203.0.113.9:5000"]);
        let Control::Punch { peer, candidates, dial, token: t2 } = to_pay else { panic!() };
        assert_eq!((peer.as_str(), dial, candidates), ("shop", false, vec!["198.51.100.1:4000".to_owned()]));
        assert_eq!(token, t2);
    }

    #[test]
    fn refusals_name_why() {
        let mut r = Rendezvous::default();
        r.join("shop", party(1, "198.51.100.1:4000", Some(&[("hr", 80)]), &[]));
        r.join("pay", party(2, "203.0.113.9:5000", None, &[("pay", 80)]));
        assert_eq!(r.coordinate("shop", "pay", &[0; 16]).err(), Some(Refusal::NotPermitted));
        assert_eq!(r.coordinate("shop", "nobody", &[0; 16]).err(), Some(Refusal::NotConnected));
        assert_eq!(r.coordinate("shop", "shop", &[0; 16]).err(), Some(Refusal::NotConnected));
        // A home that exports nothing is never a punch target, even for "import everything".
        assert_eq!(r.coordinate("pay", "shop", &[0; 16]).err(), Some(Refusal::NotPermitted));
        // A home not told its address (direct paths were off when it registered) is not
        // punched to until it is.
        let mut quiet = party(4, "192.0.2.4:4", None, &[("hr", 80)]);
        quiet.told = false;
        r.join("hr", quiet);
        assert_eq!(r.coordinate("shop", "hr", &[0; 16]).err(), Some(Refusal::NotConnected));
        assert!(matches!(r.tell("hr"), Some(Control::Observed { address }) if address == "192.0.2.4:4"));
        assert_eq!(r.tell("hr"), None, "told once");
        assert!(r.coordinate("shop", "hr", &[0; 16]).is_ok());
        r.leave("hr", 4);
        // An old connection leaving does not remove the new one's party.
        r.join("pay", party(3, "203.0.113.9:5001", None, &[("pay", 80)]));
        r.leave("pay", 2);
        assert_eq!(r.len(), 2);
        r.leave("pay", 3);
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn a_punch_across_two_relays_goes_out_and_its_answer_comes_back_once() {
        let t0 = std::time::Instant::now();
        let mut a = Rendezvous::default();
        a.join("shop", party(1, "198.51.100.1:4000", Some(&[("pay", 80)]), &[]));
        let mut b = Rendezvous::default();
        b.join("pay", party(2, "203.0.113.9:5000", None, &[("pay", 80)]));
        assert_eq!(a.forward("shop", "pay", "hub-b", false, &[1; 16], t0).err(), Some(Refusal::NotPermitted));
        let fwd = a.forward("shop", "pay", "hub-b", true, &[1; 16], t0).unwrap();
        let Control::PunchForward { from, peer, token, candidates } = &fwd else { panic!() };
        assert_eq!(candidates, &vec!["198.51.100.1:4000".to_owned()]);
        // The other relay punches its home with the asker's candidates and answers with its own.
        let with_junk = [candidates.clone(), vec!["junk".into()]].concat();
        let ((_, to_pay), answer) = b.forwarded(from, peer, token, &with_junk).unwrap();
        assert!(
            matches!(&to_pay, Control::Punch { peer, dial: false, candidates, .. } if peer == "shop" && candidates.len() == 1)
        );
        assert_eq!(b.forwarded(from, "nobody", token, &[]).err(), Some(Refusal::NotConnected));
        // An answer from another relay, or a second one, is not taken.
        assert!(a.answered("hub-c", &answer, t0).is_none());
        let (_, to_shop) = a.answered("hub-b", &answer, t0).unwrap();
        assert!(
            matches!(&to_shop, Control::Punch { peer, dial: true, candidates, .. } if peer == "pay" && candidates == &vec!["203.0.113.9:5000".to_owned()])
        );
        assert!(a.answered("hub-b", &answer, t0).is_none());
        // Too late: forgotten.
        let late = a.forward("shop", "pay", "hub-b", true, &[2; 16], t0).unwrap();
        let Control::PunchForward { token, .. } = late else { panic!() };
        let refused = Control::PunchAnswer {
            from: "shop".into(),
            peer: "pay".into(),
            token,
            candidates: vec![],
            refused: Some("not_connected".into()),
        };
        assert!(a.answered("hub-b", &refused, t0 + FORWARD_TIMEOUT).is_none());
    }

    #[test]
    fn own_addresses_are_shown_only_behind_the_same_public_address() {
        let list = vec!["203.0.113.9:5000".to_owned(), "10.0.0.2:5000".into(), "junk".into()];
        assert_eq!(shown_to(&list, "203.0.113.9".parse().unwrap()), vec!["203.0.113.9:5000", "10.0.0.2:5000"]);
        assert_eq!(shown_to(&list, "198.51.100.1".parse().unwrap()), vec!["203.0.113.9:5000"]);
        assert!(shown_to(&[], "198.51.100.1".parse().unwrap()).is_empty());
        let mut r = Rendezvous::default();
        r.join("a", party(1, "203.0.113.9:4000", Some(&[("x", 1)]), &[]));
        r.join("b", party(2, "203.0.113.9:5000", None, &[("x", 1)]));
        r.candidates("b", &["10.0.0.2:5000".into()]);
        let ((_, to_a), _) = r.coordinate("a", "b", &[0; 16]).unwrap();
        let Control::Punch { candidates, .. } = to_a else { panic!() };
        assert_eq!(candidates, vec!["203.0.113.9:5000", "10.0.0.2:5000"], "one NAT: the local address helps");
    }

    #[test]
    fn candidates_are_bounded() {
        let mut r = Rendezvous::default();
        r.join("a", party(1, "192.0.2.1:1", None, &[("x", 1)]));
        let many: Vec<String> = (2..40).map(|p| format!("10.0.0.1:{p}")).collect();
        r.candidates("a", &many);
        let p = r.parties.get("a").unwrap();
        assert_eq!(candidates(p).len(), MAX_CANDIDATES);
    }
}
