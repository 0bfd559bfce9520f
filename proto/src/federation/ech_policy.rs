//! Which destinations use ECH: mode, a monotone percentage rollout, whitelist and blacklist.
//!
//! A destination's bucket is the first 8 bytes (big-endian) of
//! `SHA-256("relayfed ech rollout v1\0" || peer_id)` modulo 10,000; it uses ECH when
//! `bucket < percentage * 100`. Raising the percentage therefore only adds destinations,
//! never removes one. The peer id is the destination home node id; the whitelist and
//! blacklist match either the destination node id or its main relay id.
//!
//! `percentageByMain` holds the percentage in force for destinations behind one main relay
//! where it differs from `percentage`: the operator's rollout analysis lowers it for a relay
//! whose ECH streams fail (docs/operations.md "ECH rollout").

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// ECH mode (mirrors `RolloutPolicy.spec.ech.mode`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum EchMode {
    /// Never seal.
    Disabled,
    /// Seal when selected; fall back to plain (counted) when sealing is impossible.
    #[default]
    Opportunistic,
    /// Seal when selected, or fail closed.
    Required,
}

/// The rollout policy as the data plane sees it.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EchPolicy {
    /// Master switch.
    #[serde(default)]
    pub enabled: bool,
    /// Mode for selected destinations.
    #[serde(default)]
    pub mode: EchMode,
    /// Share of destinations (0–100).
    #[serde(default)]
    pub percentage: u8,
    /// Always ECH.
    #[serde(default)]
    pub whitelist: Vec<String>,
    /// Never ECH.
    #[serde(default)]
    pub blacklist: Vec<String>,
    /// The share for destinations behind one main relay, where it differs from `percentage`
    /// (lowered by automatic rollback).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub percentage_by_main: BTreeMap<String, u8>,
}

/// What to do for one destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EchDecision {
    /// Plain route header.
    Plain,
    /// Seal; fall back to plain when no usable config exists.
    Opportunistic,
    /// Seal or fail with `ECH_REQUIRED`.
    Required,
}

/// The rollout bucket (0..10,000) of a peer id.
pub fn bucket(peer_id: &str) -> u16 {
    salted_bucket(b"relayfed ech rollout v1\0", peer_id)
}

/// A stable rollout bucket (0..10,000) of `id` under `salt`: the first 8 bytes of
/// SHA-256(salt || id), big-endian, modulo 10,000. Each rollout has its own salt, so a
/// node's cohort in one says nothing about its cohort in another.
pub fn salted_bucket(salt: &[u8], id: &str) -> u16 {
    let mut h = Sha256::new();
    h.update(salt);
    h.update(id.as_bytes());
    let d = h.finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&d[..8]);
    (u64::from_be_bytes(first) % 10_000) as u16
}

impl EchPolicy {
    /// The percentage in force for destinations behind `main` (0–100).
    pub fn percentage_for(&self, main: &str) -> u8 {
        self.percentage_by_main.get(main).copied().unwrap_or(self.percentage).min(100)
    }

    /// Decides for the destination `dest_node` attached to `dest_main`.
    pub fn decide(&self, dest_node: &str, dest_main: &str) -> EchDecision {
        if !self.enabled || self.mode == EchMode::Disabled {
            return EchDecision::Plain;
        }
        let listed = |l: &[String]| l.iter().any(|p| p == dest_node || p == dest_main);
        let selected = if listed(&self.blacklist) {
            false
        } else if listed(&self.whitelist) {
            true
        } else {
            bucket(dest_node) < u16::from(self.percentage_for(dest_main)) * 100
        };
        match (selected, self.mode) {
            (false, _) => EchDecision::Plain,
            (true, EchMode::Required) => EchDecision::Required,
            (true, _) => EchDecision::Opportunistic,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn policy(percentage: u8) -> EchPolicy {
        EchPolicy { enabled: true, mode: EchMode::Opportunistic, percentage, ..EchPolicy::default() }
    }

    #[test]
    fn extremes_lists_and_switches() {
        assert_eq!(policy(0).decide("a", "m"), EchDecision::Plain);
        assert_eq!(policy(100).decide("a", "m"), EchDecision::Opportunistic);
        let mut p = policy(0);
        p.whitelist = vec!["m".into()];
        assert_eq!(p.decide("a", "m"), EchDecision::Opportunistic, "whitelisted main relay");
        p.blacklist = vec!["a".into()];
        assert_eq!(p.decide("a", "m"), EchDecision::Plain, "blacklist wins");
        let mut p = policy(100);
        p.enabled = false;
        assert_eq!(p.decide("a", "m"), EchDecision::Plain);
        p.enabled = true;
        p.mode = EchMode::Required;
        assert_eq!(p.decide("a", "m"), EchDecision::Required);
    }

    #[test]
    fn share_matches_percentage() {
        let ids: Vec<String> = (0..10_000).map(|i| format!("node-{i}")).collect();
        for pct in [5u8, 25, 50] {
            let on = ids.iter().filter(|id| policy(pct).decide(id, "m") != EchDecision::Plain).count();
            let expected = usize::from(pct) * 100;
            assert!(on.abs_diff(expected) < 250, "{pct}%: {on} of 10000");
        }
    }

    #[test]
    fn a_relay_of_its_own_keeps_only_its_share() {
        let mut p = policy(100);
        p.percentage_by_main.insert("broken".into(), 0);
        assert_eq!(p.decide("a", "m"), EchDecision::Opportunistic);
        assert_eq!(p.decide("a", "broken"), EchDecision::Plain, "rolled back to 0 for its relay");
        p.whitelist = vec!["a".into()];
        assert_eq!(p.decide("a", "broken"), EchDecision::Opportunistic, "the whitelist still forces a peer on");
        assert_eq!(p.percentage_for("broken"), 0);
        assert_eq!(p.percentage_for("m"), 100);
    }

    proptest! {
        #[test]
        fn raising_the_percentage_never_turns_a_peer_off(id in "[a-z0-9-]{1,20}", lo in 0u8..=100, hi in 0u8..=100) {
            let (lo, hi) = (lo.min(hi), lo.max(hi));
            if policy(lo).decide(&id, "m") != EchDecision::Plain {
                prop_assert_ne!(policy(hi).decide(&id, "m"), EchDecision::Plain);
            }
        }
    }
}
