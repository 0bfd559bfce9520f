//! The path to one other home: relayed, or direct after a coordinated punch. A pure value
//! driven by events and the time; the home's I/O (`proxy/direct.rs`) feeds it and carries
//! out what it returns (docs/protocol.md §12).
//!
//! ```text
//! relayed --wanted--> discovering --observed--> coordinating --punch--> punching --connected--> direct
//!    ^                     |                         |                      |                      |
//!    +------ timeout, refused (retry after backoff) -+----------------------+         lost --------+
//! ```
//! The home that asked dials; the other home only probes and accepts. A home that is asked
//! (a `punch` without `dial`) starts punching from any phase; a second `punch` while
//! punching joins the running attempt.

use std::time::{Duration, Instant};

/// Longest wait for the relay to tell a home its reflexive address.
pub const DISCOVER_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest wait for the relay's `punch` after a `punchRequest`.
pub const COORDINATE_TIMEOUT: Duration = Duration::from_secs(2);
/// Longest a punch may take before the attempt is abandoned.
pub const PUNCH_TIMEOUT: Duration = Duration::from_secs(3);
/// Wait before the first retry after a failed attempt or a lost path; doubles per failure.
pub const RETRY_BASE: Duration = Duration::from_secs(2);
/// Longest wait between attempts.
pub const RETRY_MAX: Duration = Duration::from_secs(120);

/// Where a path stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Streams go through the main relay; an attempt may start at `retry_at`.
    Relayed,
    /// Waiting for our reflexive address from the relay.
    Discovering,
    /// Asked the relay to coordinate; waiting for its `punch`.
    Coordinating,
    /// Probing (and, for the asking home, dialing) the other home's candidates.
    Punching,
    /// A direct connection carries new streams.
    Direct,
}

impl Phase {
    /// The name shown in the admin API and logs.
    pub fn label(self) -> &'static str {
        match self {
            Phase::Relayed => "relayed",
            Phase::Discovering => "discovering",
            Phase::Coordinating => "coordinating",
            Phase::Punching => "punching",
            Phase::Direct => "direct",
        }
    }
}

/// What happened.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Event {
    /// This home opened a stream to the other home (through the relay).
    Wanted {
        /// Our reflexive address is known.
        observed: bool,
    },
    /// The relay told us our reflexive address.
    Observed,
    /// The relay sent `punch`; `dial` when we asked.
    Punch {
        /// This home dials.
        dial: bool,
    },
    /// The relay refused to coordinate.
    Refused,
    /// A direct connection to the other home is up (mutually authenticated).
    Connected,
    /// The direct connection ended.
    Lost,
}

/// What the home must do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Ask the relay for our reflexive address (send `candidates`).
    Discover,
    /// Send `punchRequest` to the relay.
    Request,
    /// Send probes to the other home's candidates and accept its connection; `dial`: dial them.
    Probe {
        /// Dial the candidates too.
        dial: bool,
    },
    /// Stop the attempt (probes, dials, accepting).
    Abandon,
    /// New streams go over the direct connection.
    UseDirect,
    /// New streams go through the relay.
    UseRelay,
}

/// How an attempt ended (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// Direct.
    Direct,
    /// No reflexive address in time.
    NoAddress,
    /// The relay did not answer in time or refused.
    Refused,
    /// Probes and dials found no path in time.
    Timeout,
}

impl Outcome {
    /// Metric label value.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Direct => "direct",
            Outcome::NoAddress => "no_address",
            Outcome::Refused => "refused",
            Outcome::Timeout => "timeout",
        }
    }
}

/// The path to one other home.
#[derive(Clone, Debug)]
pub struct PathSession {
    phase: Phase,
    /// When the current phase began.
    entered: Instant,
    /// When the current attempt began (wanted, or asked by the other home).
    attempt_started: Option<Instant>,
    /// Failed attempts and lost paths since the last direct path.
    failures: u32,
    /// The earliest time this home may start another attempt.
    retry_at: Instant,
    /// How the last attempt ended, and how long it took.
    last: Option<(Outcome, Duration)>,
}

impl PathSession {
    /// A relayed path that may try at once.
    pub fn new(now: Instant) -> Self {
        Self { phase: Phase::Relayed, entered: now, attempt_started: None, failures: 0, retry_at: now, last: None }
    }

    /// Where the path stands.
    pub fn phase(&self) -> Phase {
        self.phase
    }

    /// How the last attempt ended and how long it took (for a direct path: the time from
    /// the attempt's start to the direct connection).
    pub fn last(&self) -> Option<(Outcome, Duration)> {
        self.last
    }

    /// The earliest time another attempt may start.
    pub fn retry_at(&self) -> Instant {
        self.retry_at
    }

    /// When `tick` must be called next (the current phase's timeout), if ever.
    pub fn deadline(&self) -> Option<Instant> {
        let limit = match self.phase {
            Phase::Discovering => DISCOVER_TIMEOUT,
            Phase::Coordinating => COORDINATE_TIMEOUT,
            Phase::Punching => PUNCH_TIMEOUT,
            Phase::Relayed | Phase::Direct => return None,
        };
        Some(self.entered + limit)
    }

    fn enter(&mut self, phase: Phase, now: Instant) {
        self.phase = phase;
        self.entered = now;
    }

    fn fail(&mut self, outcome: Outcome, now: Instant) -> Vec<Action> {
        self.failures = self.failures.saturating_add(1);
        self.retry_at = now + backoff(self.failures);
        self.last = Some((outcome, self.attempt_started.map(|s| now.saturating_duration_since(s)).unwrap_or_default()));
        self.attempt_started = None;
        self.enter(Phase::Relayed, now);
        vec![Action::Abandon]
    }

    /// Applies `event` at `now`; returns what to do.
    pub fn on(&mut self, event: Event, now: Instant) -> Vec<Action> {
        match (self.phase, event) {
            (Phase::Relayed, Event::Wanted { observed }) if now >= self.retry_at => {
                self.attempt_started = Some(now);
                if observed {
                    self.enter(Phase::Coordinating, now);
                    vec![Action::Request]
                } else {
                    self.enter(Phase::Discovering, now);
                    vec![Action::Discover]
                }
            }
            (Phase::Discovering, Event::Observed) => {
                self.enter(Phase::Coordinating, now);
                vec![Action::Request]
            }
            (Phase::Direct, Event::Punch { dial }) => {
                // The other home lost the path we still hold: it is gone for us too.
                self.attempt_started = Some(now);
                self.enter(Phase::Punching, now);
                vec![Action::UseRelay, Action::Probe { dial }]
            }
            (_, Event::Punch { dial }) => {
                // Also while punching: the other home asked again (it restarted, or both
                // asked at once); the attempt takes the new punch in and runs on from now.
                self.attempt_started.get_or_insert(now);
                self.enter(Phase::Punching, now);
                vec![Action::Probe { dial }]
            }
            (Phase::Discovering | Phase::Coordinating | Phase::Punching, Event::Refused) => {
                self.fail(Outcome::Refused, now)
            }
            (Phase::Direct, Event::Connected) => vec![],
            (_, Event::Connected) => {
                let took = self.attempt_started.map(|s| now.saturating_duration_since(s)).unwrap_or_default();
                self.last = Some((Outcome::Direct, took));
                self.attempt_started = None;
                self.failures = 0;
                self.enter(Phase::Direct, now);
                vec![Action::UseDirect]
            }
            (Phase::Direct, Event::Lost) => {
                self.failures = self.failures.saturating_add(1);
                self.retry_at = now + backoff(self.failures);
                self.enter(Phase::Relayed, now);
                vec![Action::UseRelay]
            }
            _ => vec![],
        }
    }

    /// Applies the passing of time: a phase past its timeout abandons the attempt.
    pub fn tick(&mut self, now: Instant) -> Vec<Action> {
        match self.deadline() {
            Some(d) if now >= d => {
                let outcome = match self.phase {
                    Phase::Discovering => Outcome::NoAddress,
                    Phase::Coordinating => Outcome::Refused,
                    _ => Outcome::Timeout,
                };
                self.fail(outcome, now)
            }
            _ => vec![],
        }
    }
}

/// How this home's NAT maps its socket, as its main relays see it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mapping {
    /// Fewer than two relays told us our address.
    Unknown,
    /// Every relay sees the same address and port: no NAT, or one that keeps a mapping for
    /// every destination (direct paths work against any NAT but a symmetric one that
    /// filters by port, and that one's too).
    EndpointIndependent,
    /// Relays see different ports or addresses: a symmetric NAT (a fresh port per
    /// destination). Direct paths then need the other side to filter by address at most.
    EndpointDependent,
}

impl Mapping {
    /// Label value.
    pub fn label(self) -> &'static str {
        match self {
            Mapping::Unknown => "unknown",
            Mapping::EndpointIndependent => "endpoint_independent",
            Mapping::EndpointDependent => "endpoint_dependent",
        }
    }
}

impl Mapping {
    /// The short name in a NAT pair label (`independent`, `dependent`, `unknown`).
    pub fn short(self) -> &'static str {
        match self {
            Mapping::Unknown => "unknown",
            Mapping::EndpointIndependent => "independent",
            Mapping::EndpointDependent => "dependent",
        }
    }
}

/// The `nat_pair` label value for our mapping and the other home's (short names; nine
/// values, static so a metric family can hold them).
pub fn nat_pair_label(ours: &str, theirs: &str) -> &'static str {
    const PAIRS: [&str; 9] = [
        "independent-independent",
        "independent-dependent",
        "independent-unknown",
        "dependent-independent",
        "dependent-dependent",
        "dependent-unknown",
        "unknown-independent",
        "unknown-dependent",
        "unknown-unknown",
    ];
    PAIRS.iter().find(|p| p.split_once('-') == Some((ours, theirs))).copied().unwrap_or("unknown-unknown")
}

/// The mapping behaviour shown by the addresses several relays observed for one socket.
pub fn mapping(observed: &[std::net::SocketAddr]) -> Mapping {
    match observed {
        [] | [_] => Mapping::Unknown,
        [first, rest @ ..] if rest.iter().all(|a| a == first) => Mapping::EndpointIndependent,
        _ => Mapping::EndpointDependent,
    }
}

/// How long an attempt probes the candidates alone before it escalates to a port sweep (no
/// probe of the other home arrived by then: one side's NAT is symmetric and the other
/// filters by port, or nothing gets through).
pub const SWEEP_AFTER: Duration = Duration::from_millis(250);

/// What an attempt adds when the plain probes went unanswered (docs/protocol.md §12.3): a
/// home behind a symmetric NAT opens many sockets (many fresh mappings toward the other
/// home's one), a home behind a NAT that keeps one mapping probes many ports of the other's
/// address; one of the many mappings is then hit with high probability (a birthday match).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sweep {
    /// Open extra sockets and probe the candidates from each.
    pub sockets: bool,
    /// Probe many ports of each candidate's address from the home's socket.
    pub ports: bool,
}

/// Whether an attempt running for `elapsed`, that `heard` the other home or not, escalates,
/// and how, given how our NAT maps (`Unknown`: both halves, since one of them is useless
/// and harmless).
pub fn sweep(mapping: Mapping, heard: bool, elapsed: Duration) -> Option<Sweep> {
    if heard || elapsed < SWEEP_AFTER {
        return None;
    }
    Some(match mapping {
        Mapping::EndpointIndependent => Sweep { sockets: false, ports: true },
        Mapping::EndpointDependent => Sweep { sockets: true, ports: false },
        Mapping::Unknown => Sweep { sockets: true, ports: true },
    })
}

/// How the other home's NAT mapped, as its probes show: `EndpointDependent` when one came
/// from a port of its address that it did not list (a fresh mapping toward us),
/// `EndpointIndependent` when they came from a listed address, `Unknown` before any came.
pub fn peer_mapping(listed: &[std::net::SocketAddr], heard_from: &[std::net::SocketAddr]) -> Mapping {
    if heard_from.is_empty() {
        Mapping::Unknown
    } else if heard_from.iter().any(|h| !listed.contains(h)) {
        Mapping::EndpointDependent
    } else {
        Mapping::EndpointIndependent
    }
}

/// Wait before the next attempt after `failures` failures (1: `RETRY_BASE`, doubling, at
/// most `RETRY_MAX`).
pub fn backoff(failures: u32) -> Duration {
    let doublings = failures.saturating_sub(1).min(16);
    RETRY_BASE.saturating_mul(1u32 << doublings).min(RETRY_MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(t0: Instant, ms: u64) -> Instant {
        t0 + Duration::from_millis(ms)
    }

    #[test]
    fn an_unanswered_attempt_sweeps_with_the_half_its_nat_needs() {
        let late = SWEEP_AFTER;
        assert_eq!(sweep(Mapping::Unknown, false, late - Duration::from_millis(1)), None);
        assert_eq!(sweep(Mapping::Unknown, true, late * 4), None);
        assert_eq!(sweep(Mapping::Unknown, false, late), Some(Sweep { sockets: true, ports: true }));
        assert_eq!(sweep(Mapping::EndpointIndependent, false, late), Some(Sweep { sockets: false, ports: true }));
        assert_eq!(sweep(Mapping::EndpointDependent, false, late), Some(Sweep { sockets: true, ports: false }));
    }

    #[test]
    fn nat_pair_labels_are_the_nine_combinations() {
        let all = [Mapping::EndpointIndependent, Mapping::EndpointDependent, Mapping::Unknown];
        let mut seen = std::collections::BTreeSet::new();
        for a in all {
            for b in all {
                let l = nat_pair_label(a.short(), b.short());
                assert_eq!(l, format!("{}-{}", a.short(), b.short()));
                seen.insert(l);
            }
        }
        assert_eq!(seen.len(), 9);
        assert_eq!(nat_pair_label("bogus", "x"), "unknown-unknown");
    }

    #[test]
    fn the_peers_mapping_shows_in_where_its_probes_come_from() {
        let a: std::net::SocketAddr = "203.0.113.10:4000".parse().unwrap();
        let fresh: std::net::SocketAddr = "203.0.113.10:51234".parse().unwrap();
        assert_eq!(peer_mapping(&[a], &[]), Mapping::Unknown);
        assert_eq!(peer_mapping(&[a], &[a]), Mapping::EndpointIndependent);
        assert_eq!(peer_mapping(&[a], &[a, fresh]), Mapping::EndpointDependent);
    }

    #[test]
    fn the_asking_home_goes_direct_and_reports_the_time_it_took() {
        let t0 = Instant::now();
        let mut s = PathSession::new(t0);
        assert_eq!(s.on(Event::Wanted { observed: false }, t0), vec![Action::Discover]);
        assert_eq!(s.phase(), Phase::Discovering);
        assert_eq!(s.on(Event::Observed, at(t0, 10)), vec![Action::Request]);
        assert_eq!(s.phase(), Phase::Coordinating);
        // Calls made meanwhile start nothing new.
        assert_eq!(s.on(Event::Wanted { observed: true }, at(t0, 20)), vec![]);
        assert_eq!(s.on(Event::Punch { dial: true }, at(t0, 60)), vec![Action::Probe { dial: true }]);
        assert_eq!(s.on(Event::Connected, at(t0, 180)), vec![Action::UseDirect]);
        assert_eq!(s.phase(), Phase::Direct);
        assert_eq!(s.last(), Some((Outcome::Direct, Duration::from_millis(180))));
        assert_eq!(s.deadline(), None);
    }

    #[test]
    fn the_asked_home_punches_from_any_phase_and_takes_in_a_second_ask() {
        let t0 = Instant::now();
        let mut s = PathSession::new(t0);
        assert_eq!(s.on(Event::Punch { dial: false }, t0), vec![Action::Probe { dial: false }]);
        // Asked again (the caller restarted): the attempt runs on, its timeout from now.
        assert_eq!(s.on(Event::Punch { dial: false }, at(t0, 2000)), vec![Action::Probe { dial: false }]);
        assert_eq!(s.deadline(), Some(at(t0, 5000)));
        assert_eq!(s.on(Event::Connected, at(t0, 2050)), vec![Action::UseDirect]);
        assert_eq!(s.last(), Some((Outcome::Direct, Duration::from_millis(2050))));
        // Both homes asked at once: our own punch (dial) still dials while punching.
        let mut both = PathSession::new(t0);
        both.on(Event::Wanted { observed: true }, t0);
        assert_eq!(both.on(Event::Punch { dial: false }, at(t0, 1)), vec![Action::Probe { dial: false }]);
        assert_eq!(both.on(Event::Punch { dial: true }, at(t0, 2)), vec![Action::Probe { dial: true }]);
    }

    #[test]
    fn every_phase_times_out_into_relayed_with_a_growing_backoff() {
        let t0 = Instant::now();
        let mut s = PathSession::new(t0);
        s.on(Event::Wanted { observed: false }, t0);
        assert_eq!(s.tick(at(t0, 1999)), vec![]);
        assert_eq!(s.tick(at(t0, 2000)), vec![Action::Abandon]);
        assert_eq!((s.phase(), s.last().map(|l| l.0)), (Phase::Relayed, Some(Outcome::NoAddress)));
        assert_eq!(s.retry_at(), at(t0, 4000));
        // Too early: nothing; then coordinating times out.
        assert_eq!(s.on(Event::Wanted { observed: true }, at(t0, 3999)), vec![]);
        assert_eq!(s.on(Event::Wanted { observed: true }, at(t0, 4000)), vec![Action::Request]);
        assert_eq!(s.tick(at(t0, 6000)), vec![Action::Abandon]);
        assert_eq!(s.last().map(|l| l.0), Some(Outcome::Refused));
        assert_eq!(s.retry_at(), at(t0, 6000 + 4000));
        // Then punching times out after PUNCH_TIMEOUT.
        s.on(Event::Wanted { observed: true }, at(t0, 10_000));
        s.on(Event::Punch { dial: true }, at(t0, 10_010));
        assert_eq!(s.deadline(), Some(at(t0, 13_010)));
        assert_eq!(s.tick(at(t0, 13_010)), vec![Action::Abandon]);
        assert_eq!(s.last(), Some((Outcome::Timeout, Duration::from_millis(3010))));
        assert_eq!(s.retry_at(), at(t0, 13_010 + 8000));
    }

    #[test]
    fn a_refusal_ends_the_attempt_at_once() {
        let t0 = Instant::now();
        let mut s = PathSession::new(t0);
        s.on(Event::Wanted { observed: true }, t0);
        assert_eq!(s.on(Event::Refused, at(t0, 30)), vec![Action::Abandon]);
        assert_eq!(s.phase(), Phase::Relayed);
        // A refusal while relayed (a late answer) changes nothing.
        assert_eq!(s.on(Event::Refused, at(t0, 40)), vec![]);
    }

    #[test]
    fn a_lost_direct_path_falls_back_and_retries_later() {
        let t0 = Instant::now();
        let mut s = PathSession::new(t0);
        s.on(Event::Punch { dial: false }, t0);
        s.on(Event::Connected, at(t0, 10));
        assert_eq!(s.on(Event::Lost, at(t0, 5000)), vec![Action::UseRelay]);
        assert_eq!(s.phase(), Phase::Relayed);
        assert_eq!(s.on(Event::Wanted { observed: true }, at(t0, 6000)), vec![]);
        assert_eq!(s.on(Event::Wanted { observed: true }, at(t0, 7000)), vec![Action::Request]);
        // A direct path makes the failures count start again.
        s.on(Event::Punch { dial: true }, at(t0, 7010));
        s.on(Event::Connected, at(t0, 7020));
        s.on(Event::Lost, at(t0, 8000));
        assert_eq!(s.retry_at(), at(t0, 10_000));
        // The other home asking again while we think we are direct: our path is gone too.
        let mut d = PathSession::new(t0);
        d.on(Event::Punch { dial: false }, t0);
        d.on(Event::Connected, t0);
        assert_eq!(
            d.on(Event::Punch { dial: false }, at(t0, 1)),
            vec![Action::UseRelay, Action::Probe { dial: false }]
        );
        // Losing a path we do not have changes nothing.
        assert_eq!(PathSession::new(t0).on(Event::Lost, t0), vec![]);
    }

    #[test]
    fn the_mapping_is_told_by_two_relays_or_more() {
        let a: std::net::SocketAddr = "198.51.100.7:4000".parse().unwrap();
        let b: std::net::SocketAddr = "198.51.100.7:4001".parse().unwrap();
        assert_eq!(mapping(&[]), Mapping::Unknown);
        assert_eq!(mapping(&[a]), Mapping::Unknown);
        assert_eq!(mapping(&[a, a]), Mapping::EndpointIndependent);
        assert_eq!(mapping(&[a, a, b]), Mapping::EndpointDependent);
        assert_eq!(mapping(&[a, b]).label(), "endpoint_dependent");
    }

    #[test]
    fn backoff_doubles_up_to_its_cap() {
        assert_eq!(backoff(1), Duration::from_secs(2));
        assert_eq!(backoff(2), Duration::from_secs(4));
        assert_eq!(backoff(7), Duration::from_secs(120));
        assert_eq!(backoff(u32::MAX), RETRY_MAX);
    }
}
