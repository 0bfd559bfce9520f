//! Which of a home's connected main relays is its active one (the others are warm
//! standbys: connected, registered as standby, serving inbound streams).
//!
//! A pure decision, re-taken whenever a link comes up or goes down and once a second:
//! - the active relay stays active while its link is up, so a flapping relay does not move
//!   traffic back and forth;
//! - when it is lost, the connected relay with the best priority (lowest number; ties in
//!   listing order) takes over at once;
//! - a better-priority relay takes over from a worse one at once the first time it connects
//!   (start-up, where links come up in any order), and after `failback_after` of being up
//!   when it comes back from a loss (the home returns once the relay has proved stable).

use std::time::Duration;

/// How long a recovered preferred relay must stay connected before the home moves back.
pub const FAILBACK_AFTER: Duration = Duration::from_secs(10);

/// One connected main relay, as the election sees it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Candidate<'a> {
    /// Node id of the main relay.
    pub main: &'a str,
    /// Its priority in the home's list (lower is preferred).
    pub priority: u32,
    /// Its place in the home's list (breaks priority ties).
    pub order: usize,
    /// How long its link has been up.
    pub up_for: Duration,
    /// This link replaced an earlier one to the same relay that was lost.
    pub recovered: bool,
}

/// The main relay that should be active, given the current one and the connected links.
pub fn elect<'a>(active: Option<&str>, connected: &[Candidate<'a>], failback_after: Duration) -> Option<&'a str> {
    let best = connected.iter().min_by_key(|c| (c.priority, c.order))?;
    let Some(current) = active.and_then(|a| connected.iter().find(|c| c.main == a)) else {
        return Some(best.main);
    };
    let better = (best.priority, best.order) < (current.priority, current.order);
    let proven = !best.recovered || best.up_for >= failback_after;
    if better && proven { Some(best.main) } else { Some(current.main) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn c(main: &str, priority: u32, order: usize, up_secs: u64) -> Candidate<'_> {
        Candidate { main, priority, order, up_for: Duration::from_secs(up_secs), recovered: true }
    }

    #[test]
    fn the_preferred_relay_leads_and_a_lost_one_is_replaced_at_once() {
        let both = [c("m1", 0, 0, 100), c("m2", 1, 1, 100)];
        assert_eq!(elect(None, &both, FAILBACK_AFTER), Some("m1"));
        assert_eq!(elect(Some("m1"), &both, FAILBACK_AFTER), Some("m1"));
        // m1's link is gone: m2 at once, with no hold time.
        assert_eq!(elect(Some("m1"), &[c("m2", 1, 1, 0)], FAILBACK_AFTER), Some("m2"));
        assert_eq!(elect(Some("m1"), &[], FAILBACK_AFTER), None);
    }

    #[test]
    fn the_home_returns_to_its_preferred_relay_only_after_it_proved_stable() {
        let back_briefly = [c("m1", 0, 0, 3), c("m2", 1, 1, 60)];
        assert_eq!(elect(Some("m2"), &back_briefly, FAILBACK_AFTER), Some("m2"));
        let back_stable = [c("m1", 0, 0, 10), c("m2", 1, 1, 60)];
        assert_eq!(elect(Some("m2"), &back_stable, FAILBACK_AFTER), Some("m1"));
    }

    #[test]
    fn at_start_up_the_preferred_relay_takes_over_as_soon_as_it_connects() {
        let first_time = Candidate { recovered: false, ..c("m1", 0, 0, 0) };
        assert_eq!(elect(Some("m2"), &[first_time, c("m2", 1, 1, 1)], FAILBACK_AFTER), Some("m1"));
    }

    #[test]
    fn equal_priorities_follow_the_listing_order_and_do_not_flap() {
        let tie = [c("b", 0, 1, 100), c("a", 0, 0, 100)];
        assert_eq!(elect(None, &tie, FAILBACK_AFTER), Some("a"));
        assert_eq!(elect(Some("b"), &tie, FAILBACK_AFTER), Some("a"), "listing order decides once stable");
    }

    proptest! {
        /// Whatever the links, the choice is a connected relay, the current one is kept
        /// unless a strictly better one has been up for the hold time, and electing again
        /// from the result changes nothing.
        #[test]
        fn the_choice_is_connected_and_stable(
            links in proptest::collection::vec((0u32..3, 0u64..20, any::<bool>()), 0..5),
            current in proptest::option::of(0usize..6),
        ) {
            let names: Vec<String> = (0..links.len()).map(|i| format!("m{i}")).collect();
            let cands: Vec<Candidate> = links
                .iter()
                .enumerate()
                .map(|(i, (p, up, rec))| Candidate { recovered: *rec, ..c(&names[i], *p, i, *up) })
                .collect();
            let active = current.map(|i| format!("m{i}"));
            let chosen = elect(active.as_deref(), &cands, FAILBACK_AFTER);
            prop_assert_eq!(chosen.is_none(), cands.is_empty());
            if let Some(ch) = chosen {
                let picked = cands.iter().find(|x| x.main == ch).unwrap();
                if let Some(cur) = active.as_deref().and_then(|a| cands.iter().find(|x| x.main == a))
                    && cur.main != ch
                {
                    prop_assert!((picked.priority, picked.order) < (cur.priority, cur.order));
                    prop_assert!(!picked.recovered || picked.up_for >= FAILBACK_AFTER);
                }
                prop_assert_eq!(elect(Some(ch), &cands, FAILBACK_AFTER), Some(ch));
            }
        }
    }
}
