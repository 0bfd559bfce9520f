//! Direct paths between homes (hole punching) as the data plane sees the RolloutPolicy: off
//! by default, rolled out to a share of calling homes like ECH (docs/protocol.md §12).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Direct-path policy of a node.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DirectPaths {
    /// Master switch: relays coordinate punches and homes attempt them only when on.
    #[serde(default)]
    pub enabled: bool,
    /// Share of calling homes (by node id, 0–100) that attempt direct paths.
    #[serde(default = "all")]
    pub percentage: u8,
    /// Destination main relays whose share the rollout lowered below `percentage` (its
    /// automatic rollback): a home calls homes behind them directly only if its bucket is
    /// below this share.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub percentage_by_main: BTreeMap<String, u8>,
}

fn all() -> u8 {
    100
}

impl Default for DirectPaths {
    fn default() -> Self {
        Self { enabled: false, percentage: 100, percentage_by_main: BTreeMap::new() }
    }
}

impl DirectPaths {
    /// Whether this is the default (off): the snapshot then leaves the field out.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// The share in force for calls to homes behind destination main relay `main`.
    pub fn percentage_for(&self, main: &str) -> u8 {
        self.percentage_by_main.get(main).copied().unwrap_or(self.percentage).min(100)
    }

    /// Whether home `node` attempts direct paths to the homes it calls behind `dest_main`.
    pub fn attempts(&self, node: &str, dest_main: &str) -> bool {
        self.enabled && bucket(node) < u16::from(self.percentage_for(dest_main)) * 100
    }
}

/// The rollout bucket (0..10,000) of a home for direct paths (its own salt: a home's ECH
/// cohort says nothing about its direct-path cohort).
pub fn bucket(node: &str) -> u16 {
    crate::federation::ech_policy::salted_bucket(b"relayfed direct paths v1\0", node)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn off_by_default_and_a_share_when_on() {
        let at = |percentage| DirectPaths { enabled: true, percentage, ..DirectPaths::default() };
        let d = DirectPaths::default();
        assert!(d.is_default() && !d.attempts("a", "m"));
        assert!(at(100).attempts("a", "m"));
        assert!(!at(0).attempts("a", "m"));
        let taking = (0..1000).filter(|i| at(50).attempts(&format!("home-{i}"), "m")).count();
        assert!((400..600).contains(&taking), "{taking} of 1000 at 50%");
    }

    #[test]
    fn a_rolled_back_relay_lowers_only_calls_to_homes_behind_it() {
        let mut p = DirectPaths { enabled: true, percentage: 100, ..DirectPaths::default() };
        p.percentage_by_main.insert("broken".into(), 0);
        assert!(!p.attempts("a", "broken"));
        assert!(p.attempts("a", "fine"));
        p.percentage_by_main.insert("broken".into(), 50);
        let taking = (0..1000).filter(|i| p.attempts(&format!("home-{i}"), "broken")).count();
        assert!((400..600).contains(&taking), "{taking} of 1000 at 50%");
        p.enabled = false;
        assert!(!p.attempts("a", "fine"), "the master switch wins");
    }
}
