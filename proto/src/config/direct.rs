//! Direct paths between homes (hole punching) as the data plane sees the RolloutPolicy: off
//! by default, rolled out to a share of calling homes like ECH (docs/protocol.md §12).

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
}

fn all() -> u8 {
    100
}

impl Default for DirectPaths {
    fn default() -> Self {
        Self { enabled: false, percentage: 100 }
    }
}

impl DirectPaths {
    /// Whether this is the default (off): the snapshot then leaves the field out.
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    /// Whether home `node` attempts direct paths to the homes it calls.
    pub fn attempts(&self, node: &str) -> bool {
        self.enabled && bucket(node) < u16::from(self.percentage.min(100)) * 100
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
        let d = DirectPaths::default();
        assert!(d.is_default() && !d.attempts("a"));
        let on = DirectPaths { enabled: true, percentage: 100 };
        assert!(on.attempts("a"));
        let none = DirectPaths { enabled: true, percentage: 0 };
        assert!(!none.attempts("a"));
        let half = DirectPaths { enabled: true, percentage: 50 };
        let taking = (0..1000).filter(|i| half.attempts(&format!("home-{i}"))).count();
        assert!((400..600).contains(&taking), "{taking} of 1000 at 50%");
    }
}
