//! Circuit breakers: closed -> open after too many failures, open -> half-open after a
//! timeout, half-open admits a few probes; a successful probe closes the circuit, a failed
//! one opens it again. One breaker per peer connection and per service instance.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

/// Breaker settings (from `RolloutPolicy.spec.resilience.circuitBreaker`).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BreakerConfig {
    /// Consecutive failures that open the circuit.
    pub consecutive_failures: u32,
    /// Failure share over `window` that opens it (with at least `min_requests` outcomes).
    pub failure_rate: f64,
    /// Window for the failure rate.
    pub window: Duration,
    /// Fewest outcomes in the window before the rate counts.
    pub min_requests: u32,
    /// How long the circuit stays open.
    pub open_for: Duration,
    /// Probes admitted while half-open.
    pub half_open_probes: u32,
}

impl Default for BreakerConfig {
    fn default() -> Self {
        Self {
            consecutive_failures: 5,
            failure_rate: 0.5,
            window: Duration::from_secs(30),
            min_requests: 20,
            open_for: Duration::from_secs(30),
            half_open_probes: 3,
        }
    }
}

/// Breaker state (exported as a metric: 0 closed, 1 open, 2 half-open).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Calls flow.
    Closed,
    /// Calls fail fast with `CIRCUIT_OPEN`.
    Open,
    /// A few probes are let through.
    HalfOpen,
}

impl State {
    /// Metric value.
    pub fn as_i64(self) -> i64 {
        match self {
            State::Closed => 0,
            State::Open => 1,
            State::HalfOpen => 2,
        }
    }

    /// Label.
    pub fn label(self) -> &'static str {
        match self {
            State::Closed => "closed",
            State::Open => "open",
            State::HalfOpen => "half_open",
        }
    }
}

/// One circuit breaker.
#[derive(Clone, Debug)]
pub struct Breaker {
    config: BreakerConfig,
    state: State,
    consecutive: u32,
    outcomes: VecDeque<(Instant, bool)>,
    opened_at: Option<Instant>,
    probes_in_flight: u32,
}

impl Breaker {
    /// A closed breaker.
    pub fn new(config: BreakerConfig) -> Self {
        Self {
            config,
            state: State::Closed,
            consecutive: 0,
            outcomes: VecDeque::new(),
            opened_at: None,
            probes_in_flight: 0,
        }
    }

    /// Current state (moving open -> half-open when the timeout has passed).
    pub fn state(&mut self, now: Instant) -> State {
        if self.state == State::Open && self.opened_at.is_some_and(|t| now >= t + self.config.open_for) {
            self.state = State::HalfOpen;
            self.probes_in_flight = 0;
        }
        self.state
    }

    /// Whether a call may go ahead now; in half-open this reserves a probe slot.
    pub fn allow(&mut self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen if self.probes_in_flight < self.config.half_open_probes => {
                self.probes_in_flight += 1;
                true
            }
            State::HalfOpen => false,
        }
    }

    /// Whether a call would be allowed, without reserving anything (for load balancing).
    pub fn would_allow(&mut self, now: Instant) -> bool {
        match self.state(now) {
            State::Closed => true,
            State::Open => false,
            State::HalfOpen => self.probes_in_flight < self.config.half_open_probes,
        }
    }

    /// Gives back a half-open probe slot reserved by [`Breaker::allow`] for a call whose
    /// outcome says nothing about the target (e.g. refused for the caller's own reasons).
    pub fn cancel(&mut self) {
        if self.state == State::HalfOpen {
            self.probes_in_flight = self.probes_in_flight.saturating_sub(1);
        }
    }

    /// Records an outcome.
    pub fn record(&mut self, ok: bool, now: Instant) {
        while self.outcomes.front().is_some_and(|(t, _)| now.saturating_duration_since(*t) > self.config.window) {
            self.outcomes.pop_front();
        }
        self.outcomes.push_back((now, ok));
        match (self.state(now), ok) {
            (State::HalfOpen, true) => self.close(),
            (State::HalfOpen, false) => self.open(now),
            (State::Closed, true) => self.consecutive = 0,
            (State::Closed, false) => {
                self.consecutive += 1;
                let failures = self.outcomes.iter().filter(|(_, ok)| !ok).count() as f64;
                let n = self.outcomes.len();
                let rate_trips =
                    n as u32 >= self.config.min_requests && failures / n as f64 >= self.config.failure_rate;
                if self.consecutive >= self.config.consecutive_failures || rate_trips {
                    self.open(now);
                }
            }
            (State::Open, _) => {}
        }
    }

    fn open(&mut self, now: Instant) {
        self.state = State::Open;
        self.opened_at = Some(now);
        self.probes_in_flight = 0;
    }

    fn close(&mut self) {
        self.state = State::Closed;
        self.consecutive = 0;
        self.outcomes.clear();
        self.opened_at = None;
    }
}

impl From<&relayfed_proto::config::CircuitBreakerConfig> for BreakerConfig {
    fn from(c: &relayfed_proto::config::CircuitBreakerConfig) -> Self {
        BreakerConfig {
            consecutive_failures: c.consecutive_failures.max(1),
            failure_rate: c.failure_rate,
            window: Duration::from_millis(c.window_ms),
            min_requests: 20,
            open_for: Duration::from_millis(c.open_ms),
            half_open_probes: c.half_open_probes.max(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> BreakerConfig {
        BreakerConfig {
            consecutive_failures: 3,
            open_for: Duration::from_secs(10),
            half_open_probes: 1,
            ..Default::default()
        }
    }

    #[test]
    fn opens_after_consecutive_failures_and_recovers_through_half_open() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            assert!(b.allow(t0));
            b.record(false, t0);
        }
        assert_eq!(b.state(t0), State::Open);
        assert!(!b.allow(t0 + Duration::from_secs(9)));
        let t1 = t0 + Duration::from_secs(10);
        assert_eq!(b.state(t1), State::HalfOpen);
        assert!(b.allow(t1), "one probe");
        assert!(!b.allow(t1), "only one probe at a time");
        b.record(true, t1);
        assert_eq!(b.state(t1), State::Closed);
    }

    #[test]
    fn a_cancelled_probe_frees_its_slot() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.record(false, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert!(b.allow(t1));
        assert!(!b.allow(t1));
        b.cancel();
        assert!(b.allow(t1), "the slot is free again");
    }

    #[test]
    fn a_failed_probe_reopens() {
        let t0 = Instant::now();
        let mut b = Breaker::new(cfg());
        for _ in 0..3 {
            b.record(false, t0);
        }
        let t1 = t0 + Duration::from_secs(10);
        assert!(b.allow(t1));
        b.record(false, t1);
        assert_eq!(b.state(t1), State::Open);
        assert!(!b.allow(t1 + Duration::from_secs(9)));
        assert!(b.allow(t1 + Duration::from_secs(10)));
    }

    /// A rate-only breaker (10 outcomes minimum, 50%) fed `outcomes` in order.
    fn rate_breaker(outcomes: impl Iterator<Item = bool>, t0: Instant) -> Breaker {
        let mut b = Breaker::new(BreakerConfig {
            consecutive_failures: 100,
            min_requests: 10,
            failure_rate: 0.5,
            ..Default::default()
        });
        for (i, ok) in outcomes.enumerate() {
            b.record(ok, t0 + Duration::from_millis(i as u64));
        }
        b
    }

    #[test]
    fn failure_rate_over_the_window_opens() {
        let t0 = Instant::now();
        assert_eq!(rate_breaker((0..10).map(|i| i % 2 == 0), t0).state(t0), State::Open, "5 of 10 failed");
        assert_eq!(rate_breaker((0..10).map(|i| i % 3 == 1), t0).state(t0), State::Open, "7 of 10 failed");
        assert_eq!(rate_breaker((0..10).map(|i| i % 4 != 0), t0).state(t0), State::Closed, "3 of 10 failed");
    }
}
