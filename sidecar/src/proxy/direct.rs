//! Direct paths from this home to the homes it calls (docs/protocol.md §12): the I/O around
//! the pure [`PathSession`]. The relay path is never given up: a call uses the direct
//! connection only while it is up, and a call whose direct stream fails before any payload
//! goes through the relay.
//!
//! The home that calls asks its peer's main relay to coordinate (`punchRequest`); the relay
//! sends `punch` to both homes at once. Both send probes from their QUIC socket to the
//! other's candidates (a burst, then every [`PROBE_INTERVAL`]); a probe received from an
//! address not listed
//! (a symmetric NAT's fresh mapping) is answered and added. The caller dials each address a
//! probe came from at once, and every candidate after [`DIAL_ALL_AFTER`]. The other home
//! accepts a connection only from an address of a running attempt, and only from the
//! node it punches with (its certificate, verified as on any hop).

use std::collections::HashMap;
use std::net::SocketAddr;

use quinn::AsyncUdpSocket;
use tokio::sync::mpsc;

use super::*;
use crate::federation::direct_path::{Action, Event, Mapping, Outcome, PUNCH_TIMEOUT, PathSession, Phase};
use crate::protocol::control::MAX_CANDIDATES;
use crate::protocol::punch::TOKEN_LEN;
use crate::transport::punch_socket::{Probe, PunchSocket};

#[path = "direct_connect.rs"]
mod connect;
#[path = "direct_sweep.rs"]
mod sweep;

/// Probes go to every candidate this often while an attempt runs.
pub const PROBE_INTERVAL: Duration = Duration::from_millis(100);
/// The caller dials every candidate this long into an attempt, probe or not (a peer whose
/// probes cannot reach us may still accept our packets).
pub const DIAL_ALL_AFTER: Duration = Duration::from_millis(500);
/// Direct handshakes a home accepts at once.
pub const MAX_DIRECT_HANDSHAKES: usize = 16;
/// Addresses one attempt probes, at most (candidates plus learned ones).
const MAX_ATTEMPT_ADDRESSES: usize = MAX_CANDIDATES * 2;
/// Punches one attempt takes in, at most (the other home asked again, or both asked).
const MAX_ATTEMPT_TOKENS: usize = 4;
/// When probes go out, from the start of an attempt: a burst while both homes' first
/// probes may still cross (each NAT drops the other's until its own went out), then every
/// [`PROBE_INTERVAL`].
const PROBE_SCHEDULE_MS: [u64; 5] = [0, 10, 25, 50, 75];

/// The direct-path state of a home.
pub(super) struct Direct {
    socket: Arc<PunchSocket>,
    state: std::sync::Mutex<DirectState>,
    /// Direct handshakes this home accepts at once.
    handshakes: Arc<tokio::sync::Semaphore>,
    /// The relays' per-home rate limit (`resilience.rateLimit`), applied here to streams
    /// that arrive on direct connections, where no relay counts them.
    limiter: std::sync::Mutex<crate::resilience::rate_limit::RateLimiter>,
    /// Fans of extra sockets (port sweeps, `direct_sweep.rs`) running at once.
    fans: Arc<tokio::sync::Semaphore>,
    /// The server configuration for direct connections while direct paths are on (a port
    /// sweep's winning socket accepts with it too).
    server: std::sync::Mutex<Option<quinn::ServerConfig>>,
}

/// Senders whose buckets a home tracks for direct streams, at most.
const MAX_DIRECT_SENDERS: usize = 4096;
/// Other homes a home keeps path state for, at most (relayed ones without an attempt are
/// forgotten first).
const MAX_PEERS: usize = 4096;
/// Attempts a home runs at once, at most: a relay cannot make a home probe more addresses
/// than `MAX_ATTEMPTS` × 16 at a time.
const MAX_ATTEMPTS: usize = 16;

#[derive(Default)]
struct DirectState {
    /// Our reflexive address, by main relay that told us.
    observed: HashMap<String, SocketAddr>,
    peers: HashMap<String, PeerPath>,
}

struct PeerPath {
    session: PathSession,
    /// The main relay coordinating: the one the peer is registered at if we have a link to
    /// it, else our active one (which forwards to the peer's).
    via: String,
    /// The main relay the peer is registered at.
    peer_main: String,
    attempt: Option<Attempt>,
    /// The direct connection and the node that dialed it.
    conn: Option<(quinn::Connection, String)>,
}

struct Attempt {
    /// The tokens of the punches this attempt took in (probes carry each; at most
    /// [`MAX_ATTEMPT_TOKENS`]).
    tokens: Vec<[u8; TOKEN_LEN]>,
    /// Where probes go and handshakes are taken from: the relay's candidates, then
    /// addresses the other home's probes came from.
    addresses: Vec<SocketAddr>,
    /// The candidates the relay sent.
    listed: Vec<SocketAddr>,
    /// Where the other home's probes came from (at most [`MAX_ATTEMPT_ADDRESSES`]).
    heard_from: Vec<SocketAddr>,
    /// A port sweep started (handshakes are then taken from any port of a candidate's
    /// address: the other home's fresh mapping is not known in advance).
    swept: bool,
    dial: bool,
    dialed: Vec<SocketAddr>,
    started: Instant,
    /// Distinguishes this attempt's probe task from an abandoned one's.
    generation: u64,
}

impl Attempt {
    /// Whether a direct handshake from `from` belongs to this attempt.
    fn expects(&self, from: SocketAddr) -> bool {
        self.addresses.contains(&from) || (self.swept && self.listed.iter().any(|a| a.ip() == from.ip()))
    }

    /// Records an address the other home's probe came from; whether it is new.
    fn heard(&mut self, from: SocketAddr) -> bool {
        if !self.heard_from.contains(&from) && self.heard_from.len() < MAX_ATTEMPT_ADDRESSES {
            self.heard_from.push(from);
        }
        let new = !self.addresses.contains(&from) && self.addresses.len() < MAX_ATTEMPT_ADDRESSES;
        if new {
            self.addresses.push(from);
        }
        new
    }

    /// The `nat_pair` label: how our NAT maps (`ours`, as our relays saw), then how the
    /// other home's did (as its probes showed).
    fn nat_pair(&self, ours: Mapping) -> &'static str {
        let theirs = crate::federation::direct_path::peer_mapping(&self.listed, &self.heard_from);
        crate::federation::direct_path::nat_pair_label(ours.short(), theirs.short())
    }
}

impl Direct {
    /// Direct-path state over the home's QUIC socket.
    pub(super) fn new(socket: Arc<PunchSocket>) -> Self {
        Self {
            socket,
            state: Default::default(),
            handshakes: Arc::new(tokio::sync::Semaphore::new(MAX_DIRECT_HANDSHAKES)),
            limiter: std::sync::Mutex::new(crate::resilience::rate_limit::RateLimiter::new(MAX_DIRECT_SENDERS)),
            fans: Arc::new(tokio::sync::Semaphore::new(sweep::MAX_FANS)),
            server: std::sync::Mutex::new(None),
        }
    }
}

impl DirectState {
    /// How our NAT maps the home's socket, from the addresses our main relays observed.
    fn mapping(&self) -> Mapping {
        let seen: Vec<SocketAddr> = self.observed.values().copied().collect();
        crate::federation::direct_path::mapping(&seen)
    }

    /// The path to `node`, created if there is room.
    fn peer(&mut self, node: &str, via: &str, now: Instant) -> Option<&mut PeerPath> {
        if !self.peers.contains_key(node) && self.peers.len() >= MAX_PEERS {
            let idle = self
                .peers
                .iter()
                .find(|(_, p)| p.session.phase() == Phase::Relayed && p.attempt.is_none())
                .map(|(n, _)| n.clone())?;
            self.peers.remove(&idle);
        }
        Some(self.peers.entry(node.to_owned()).or_insert_with(|| PeerPath {
            session: PathSession::new(now),
            via: via.to_owned(),
            peer_main: via.to_owned(),
            attempt: None,
            conn: None,
        }))
    }

    /// Attempts running now.
    fn attempts(&self) -> usize {
        self.peers.values().filter(|p| p.attempt.is_some()).count()
    }
}

impl HomeNode {
    fn direct_state(&self) -> std::sync::MutexGuard<'_, DirectState> {
        match self.direct.state.lock() {
            Ok(s) => s,
            Err(p) => p.into_inner(),
        }
    }

    /// The direct connection to `node`, while one is up.
    pub(super) fn direct_conn(&self, node: &str) -> Option<quinn::Connection> {
        let s = self.direct_state();
        let p = s.peers.get(node)?;
        let (conn, _) = p.conn.as_ref().filter(|_| p.session.phase() == Phase::Direct)?;
        conn.close_reason().is_none().then(|| conn.clone())
    }

    /// A call to `dest` went out and the policy selects this home for direct paths to it:
    /// starts an attempt when backoff allows.
    pub(super) fn want_direct(self: &Arc<Self>, dest: &Entry) {
        if dest.node == self.identity.node_id {
            return;
        }
        // The peer's relay coordinates when we have a link to it; else our active relay asks
        // it for us.
        let via = if self.uplinks().contains_key(&dest.main) {
            dest.main.clone()
        } else {
            match self.path(&[]) {
                Some((main, _)) => main,
                None => return,
            }
        };
        let now = Instant::now();
        let actions = {
            let mut s = self.direct_state();
            let observed = s.observed.contains_key(&via);
            let Some(p) = s.peer(&dest.node, &via, now) else { return };
            if p.session.phase() == Phase::Relayed {
                p.via = via;
                p.peer_main = dest.main.clone();
            }
            p.session.on(Event::Wanted { observed }, now)
        };
        self.direct_actions(&dest.node, actions, None);
    }

    /// A direct stream to `node` failed on a closed connection: the path is lost.
    pub(super) fn direct_lost(self: &Arc<Self>, node: &str, conn_id: usize) {
        let actions = {
            let mut s = self.direct_state();
            let Some(p) = s.peers.get_mut(node) else { return };
            if p.conn.as_ref().is_none_or(|(c, _)| c.stable_id() != conn_id) {
                return;
            }
            p.conn = None;
            p.session.on(Event::Lost, Instant::now())
        };
        if !actions.is_empty() {
            self.metrics.proxy.direct_lost.inc();
            info!(peer = %node, "direct path lost: new streams go through the relay");
        }
        self.direct_actions(node, actions, None);
    }

    /// A direct-path message from main relay `main`; returns the answer to send it.
    pub(super) fn direct_control(self: &Arc<Self>, main: &str, m: Control) -> Option<Control> {
        match m {
            Control::Observed { address } => {
                let Ok(addr) = address.parse::<SocketAddr>() else {
                    warn!(main, address, "main relay sent an unusable observed address");
                    return None;
                };
                debug!(main, %addr, "reflexive address learned");
                let waiting: Vec<String> = {
                    let mut s = self.direct_state();
                    s.observed.insert(main.to_owned(), addr);
                    let kind = s.mapping();
                    for k in ["unknown", "endpoint_independent", "endpoint_dependent"] {
                        self.metrics.proxy.nat_mapping.get_or_create(&[("kind", k)]).set(i64::from(k == kind.label()));
                    }
                    s.peers.iter().filter(|(_, p)| p.via == main).map(|(n, _)| n.clone()).collect()
                };
                for peer in waiting {
                    let actions =
                        self.direct_state().peers.get_mut(&peer).map(|p| p.session.on(Event::Observed, Instant::now()));
                    self.direct_actions(&peer, actions.unwrap_or_default(), None);
                }
                Some(self.candidates_toward(addr))
            }
            Control::Punch { peer, token, candidates, dial } => {
                // Only a home this one may be called by is ever punched to: the relay checks
                // the caller's imports; accepting checks the node's certificate.
                if !self.live().direct_paths.enabled {
                    return None;
                }
                let Some(token) =
                    crate::config::base64_decode(&token).and_then(|t| <[u8; TOKEN_LEN]>::try_from(t).ok())
                else {
                    warn!(main, %peer, "punch with an unusable token");
                    return None;
                };
                let addresses: Vec<SocketAddr> =
                    candidates.iter().take(MAX_CANDIDATES).filter_map(|a| a.parse().ok()).collect();
                let now = Instant::now();
                let actions = {
                    let mut s = self.direct_state();
                    let busy = s.attempts() >= MAX_ATTEMPTS;
                    let Some(p) = s.peer(&peer, main, now).filter(|p| p.attempt.is_some() || !busy) else {
                        warn!(main, %peer, "punch ignored: too many attempts or paths at once");
                        return None;
                    };
                    p.via = main.to_owned();
                    p.session.on(Event::Punch { dial }, now)
                };
                let attempt = Attempt {
                    tokens: vec![token],
                    listed: addresses.clone(),
                    addresses,
                    heard_from: vec![],
                    swept: false,
                    dial,
                    dialed: vec![],
                    started: now,
                    generation: rand::random(),
                };
                self.direct_actions(&peer, actions, Some(attempt));
                None
            }
            Control::PunchRefused { peer, reason } => {
                info!(main, %peer, reason, "main relay will not coordinate a direct path");
                let actions =
                    self.direct_state().peers.get_mut(&peer).map(|p| p.session.on(Event::Refused, Instant::now()));
                self.direct_actions(&peer, actions.unwrap_or_default(), None);
                None
            }
            _ => None,
        }
    }

    /// Carries out what the session of `peer` decided.
    fn direct_actions(self: &Arc<Self>, peer: &str, actions: Vec<Action>, attempt: Option<Attempt>) {
        // Every change of phase comes with an action: nothing to do, nothing to count (this
        // runs for every call to another home).
        if actions.is_empty() {
            return;
        }
        let mut attempt = attempt;
        for a in actions {
            match a {
                Action::Discover => {
                    // The relay answers `candidates` with our address (it may not have told us
                    // yet: direct paths were switched on after we registered).
                    let via = self.direct_state().peers.get(peer).map(|p| p.via.clone());
                    let relay = via.as_ref().and_then(|v| self.mains.iter().find(|m| &m.node_id == v));
                    if let (Some(via), Some(relay)) = (&via, relay) {
                        self.send_control(via, self.candidates_toward(relay.endpoint));
                    }
                }
                Action::Request => {
                    let route = self.direct_state().peers.get(peer).map(|p| (p.via.clone(), p.peer_main.clone()));
                    if let Some((via, peer_main)) = route {
                        let main = (peer_main != via).then_some(peer_main);
                        self.send_control(&via, Control::PunchRequest { peer: peer.to_owned(), main });
                    }
                }
                Action::Probe { .. } => {
                    let Some(new) = attempt.take() else { continue };
                    let generation = new.generation;
                    let mut s = self.direct_state();
                    let Some(p) = s.peers.get_mut(peer) else { continue };
                    // Asked and asking at once: one attempt, which dials if either said so.
                    let merged = match p.attempt.take() {
                        Some(mut old) => {
                            old.dial |= new.dial;
                            for t in new.tokens {
                                if !old.tokens.contains(&t) {
                                    if old.tokens.len() >= MAX_ATTEMPT_TOKENS {
                                        old.tokens.remove(0);
                                    }
                                    old.tokens.push(t);
                                }
                            }
                            for a in new.addresses {
                                if !old.addresses.contains(&a) && old.addresses.len() < MAX_ATTEMPT_ADDRESSES {
                                    old.addresses.push(a);
                                }
                                if !old.listed.contains(&a) && old.listed.len() < MAX_ATTEMPT_ADDRESSES {
                                    old.listed.push(a);
                                }
                            }
                            old
                        }
                        None => new,
                    };
                    let started = merged.generation == generation;
                    p.attempt = Some(merged);
                    drop(s);
                    if started {
                        let node = self.clone();
                        let peer = peer.to_owned();
                        tokio::spawn(async move { node.punch(peer, generation).await });
                    }
                }
                Action::Abandon => {
                    let mut s = self.direct_state();
                    let ours = s.mapping();
                    if let Some(p) = s.peers.get_mut(peer) {
                        let pair = p.attempt.take().map_or("unknown-unknown", |a| a.nat_pair(ours));
                        if let Some((outcome, _)) = p.session.last() {
                            let labels = [("result", outcome.label()), ("nat_pair", pair)];
                            self.metrics.proxy.punches.get_or_create(&labels).inc();
                            info!(peer, result = outcome.label(), "direct path attempt abandoned: relayed");
                        }
                    }
                }
                Action::UseDirect => {
                    let mut s = self.direct_state();
                    let ours = s.mapping();
                    if let Some(p) = s.peers.get_mut(peer) {
                        let pair = p.attempt.take().map_or("unknown-unknown", |a| a.nat_pair(ours));
                        if let Some((Outcome::Direct, took)) = p.session.last() {
                            let labels = [("result", "direct"), ("nat_pair", pair)];
                            self.metrics.proxy.punches.get_or_create(&labels).inc();
                            self.metrics.proxy.time_to_direct.observe(took.as_secs_f64());
                            info!(peer, millis = took.as_millis() as u64, "direct path up");
                        }
                    }
                }
                Action::UseRelay => {
                    let mut s = self.direct_state();
                    if let Some(p) = s.peers.get_mut(peer)
                        && let Some((c, _)) = p.conn.take()
                    {
                        c.close(0u32.into(), b"path abandoned");
                    }
                }
            }
        }
        self.count_paths();
    }

    fn count_paths(&self) {
        let s = self.direct_state();
        let direct = s.peers.values().filter(|p| p.session.phase() == Phase::Direct).count();
        self.metrics.proxy.paths.get_or_create(&[("kind", "direct")]).set(direct as i64);
        self.metrics.proxy.paths.get_or_create(&[("kind", "relayed")]).set((s.peers.len() - direct) as i64);
    }

    /// Sends `m` on the control stream of the link to `main`, if it is up.
    fn send_control(&self, main: &str, m: Control) {
        if let Some(tx) = self.uplinks().get(main).map(|l| l.control.clone()) {
            let _ = tx.send(m);
        }
    }

    /// The `candidates` message for the relay at `toward`: our own address, i.e. the one
    /// the OS would send from toward it, with the QUIC socket's port.
    fn candidates_toward(&self, toward: SocketAddr) -> Control {
        Control::Candidates { local: self.local_address(toward).iter().map(SocketAddr::to_string).collect() }
    }

    fn local_address(&self, toward: SocketAddr) -> Option<SocketAddr> {
        let bound = self.direct.socket.local_addr().ok()?;
        if !bound.ip().is_unspecified() {
            return Some(bound);
        }
        // Which source address routing picks toward the relay (connect sends nothing).
        let any: SocketAddr = if toward.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }.parse().ok()?;
        let u = std::net::UdpSocket::bind(any).ok()?;
        u.connect(toward).ok()?;
        Some(SocketAddr::new(u.local_addr().ok()?.ip(), bound.port()))
    }

    /// Runs one attempt toward `peer`: probes on [`PROBE_SCHEDULE_MS`], then every
    /// [`PROBE_INTERVAL`]; dials (the caller) every candidate after [`DIAL_ALL_AFTER`]; until
    /// the attempt ends or times out.
    async fn punch(self: Arc<Self>, peer: String, generation: u64) {
        let start = tokio::time::Instant::now();
        let mut schedule = PROBE_SCHEDULE_MS.iter().map(|ms| start + Duration::from_millis(*ms));
        let mut next = schedule.next().unwrap_or(start);
        loop {
            tokio::time::sleep_until(next).await;
            next = schedule.next().unwrap_or(next + PROBE_INTERVAL);
            let now = Instant::now();
            let (tokens, addresses, to_dial, timed_out, sweep) = {
                let mut s = self.direct_state();
                let mapping = s.mapping();
                let Some(p) = s.peers.get_mut(&peer) else { return };
                let timed_out = p.session.deadline().is_some_and(|d| now >= d);
                let Some(a) = p.attempt.as_mut().filter(|a| a.generation == generation) else { return };
                let mut to_dial = vec![];
                if a.dial && now.saturating_duration_since(a.started) >= DIAL_ALL_AFTER {
                    for addr in &a.addresses {
                        if !a.dialed.contains(addr) {
                            to_dial.push(*addr);
                        }
                    }
                    a.dialed.extend(to_dial.iter().copied());
                }
                let elapsed = now.saturating_duration_since(a.started);
                let sweep = if a.swept {
                    None
                } else {
                    crate::federation::direct_path::sweep(mapping, !a.heard_from.is_empty(), elapsed)
                };
                a.swept |= sweep.is_some();
                (a.tokens.clone(), a.addresses.clone(), to_dial, timed_out, sweep)
            };
            if timed_out {
                let actions = self.direct_state().peers.get_mut(&peer).map(|p| p.session.tick(now));
                return self.direct_actions(&peer, actions.unwrap_or_default(), None);
            }
            for addr in &addresses {
                for token in &tokens {
                    self.direct.socket.send_probe(*addr, token);
                }
            }
            for addr in to_dial {
                self.clone().dial_direct(peer.clone(), addr);
            }
            if let Some(how) = sweep {
                self.start_sweep(&peer, generation, how);
            }
        }
    }

    /// Handles the probes the socket received, until the socket closes.
    pub(super) async fn probes(self: Arc<Self>, mut rx: mpsc::Receiver<Probe>) {
        while let Some((token, from)) = rx.recv().await {
            let (peer, dial, answer) =
                {
                    let mut s = self.direct_state();
                    let Some((peer, a)) = s.peers.iter_mut().find_map(|(n, p)| {
                        Some((n.clone(), p.attempt.as_mut().filter(|a| a.tokens.contains(&token))?))
                    }) else {
                        continue;
                    };
                    // A fresh mapping of a symmetric NAT: answer it, and dial it if we dial.
                    let answer = a.heard(from);
                    let dial = a.dial && !a.dialed.contains(&from);
                    if dial {
                        a.dialed.push(from);
                    }
                    (peer, dial, answer.then_some(token))
                };
            if let Some(token) = answer {
                self.direct.socket.send_probe(from, &token);
            }
            if dial {
                self.clone().dial_direct(peer, from);
            }
        }
    }

    /// Draws a token for a new direct stream from `peer` under the relays' rate limit;
    /// `Some(wait)` when it has none left.
    pub(super) fn direct_rate_limited(&self, peer: &str, live: &HomeLive) -> Option<Duration> {
        let limit = live.direct_rate?;
        self.direct.limiter.lock().ok()?.admit(peer, limit, Instant::now()).retry_after()
    }

    /// How this home's NAT maps its socket (from the addresses its relays observed), for
    /// `/federation/health`.
    pub(super) fn nat_mapping(&self) -> &'static str {
        self.direct_state().mapping().label()
    }

    /// Paths to other homes, for `/federation/peers`.
    pub(super) fn direct_paths_json(&self) -> Vec<serde_json::Value> {
        let s = self.direct_state();
        let mut out: Vec<serde_json::Value> = s
            .peers
            .iter()
            .map(|(node, p)| {
                let last = p.session.last();
                serde_json::json!({
                    "node": node,
                    "via": p.via,
                    "path": p.session.phase().label(),
                    "remote": p.conn.as_ref().map(|(c, _)| c.remote_address().to_string()),
                    "lastAttempt": last.map(|(o, _)| o.label()),
                    "lastAttemptMillis": last.map(|(_, d)| d.as_millis() as u64),
                })
            })
            .collect();
        out.sort_by(|a, b| a["node"].as_str().cmp(&b["node"].as_str()));
        out
    }

    /// Applies a new direct-path policy and identity to the endpoint: a server configuration
    /// (to accept direct connections) only while direct paths are on.
    pub(super) fn direct_server(&self, enabled: bool, timeouts: &crate::config::Timeouts) {
        let Some(endpoint) = self.endpoint.get() else { return };
        let config = enabled.then(|| self.current_identity().server_config(timeouts)).transpose();
        match config {
            Ok(c) => {
                match self.direct.server.lock() {
                    Ok(mut s) => s.clone_from(&c),
                    Err(p) => p.into_inner().clone_from(&c),
                }
                endpoint.set_server_config(c)
            }
            Err(e) => warn!(error = %e, "no server configuration for direct paths"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::{Attempt, DirectState, HashMap, Mapping, SocketAddr};

    fn attempt(listed: &[&str]) -> Attempt {
        let listed: Vec<SocketAddr> = listed.iter().map(|a| a.parse().unwrap()).collect();
        Attempt {
            tokens: vec![[1; 16]],
            addresses: listed.clone(),
            listed,
            heard_from: vec![],
            swept: false,
            dial: true,
            dialed: vec![],
            started: std::time::Instant::now(),
            generation: 1,
        }
    }

    #[test]
    fn handshakes_come_from_an_attempts_addresses_or_while_it_sweeps_any_port_of_them() {
        let mut a = attempt(&["203.0.113.20:4000"]);
        let fresh: SocketAddr = "203.0.113.20:51234".parse().unwrap();
        let elsewhere: SocketAddr = "198.51.100.9:4000".parse().unwrap();
        assert!(a.expects("203.0.113.20:4000".parse().unwrap()));
        assert!(!a.expects(fresh), "an unknown port before any sweep");
        a.swept = true;
        assert!(a.expects(fresh), "a symmetric NAT's fresh port while sweeping");
        assert!(!a.expects(elsewhere), "never another address");
    }

    #[test]
    fn a_probe_from_a_fresh_port_is_learnt_once_and_shows_a_dependent_peer() {
        let mut a = attempt(&["203.0.113.20:4000"]);
        assert_eq!(a.nat_pair(Mapping::Unknown), "unknown-unknown");
        assert!(!a.heard("203.0.113.20:4000".parse().unwrap()), "a listed address is not new");
        assert_eq!(a.nat_pair(Mapping::Unknown), "unknown-independent");
        let fresh: SocketAddr = "203.0.113.20:51234".parse().unwrap();
        assert!(a.heard(fresh));
        assert!(!a.heard(fresh), "learnt once");
        assert_eq!(a.addresses.len(), 2);
        assert_eq!(a.nat_pair(Mapping::Unknown), "unknown-dependent");
        // Our own mapping from two relays that saw the same address: independent.
        let same: SocketAddr = "198.51.100.1:7000".parse().unwrap();
        let s = DirectState {
            observed: HashMap::from([("hub-a".to_owned(), same), ("hub-b".to_owned(), same)]),
            ..DirectState::default()
        };
        assert_eq!(a.nat_pair(s.mapping()), "independent-dependent");
    }
}
