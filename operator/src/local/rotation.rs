//! ECH key rotation in local mode: the supervisor runs each main relay's key schedule (the
//! same staged decision as the Relay reconciler, [`crate::ech_rotation`]) on its key file,
//! and `relayfed local rotate-keys` asks for a rotation now.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use relayfed_crds::AnyResource;
use relayfed_crds::relay::RelayType;
use tracing::{error, info};

use super::keys::KeyStore;
use crate::ech_rotation::{Change, Periods};

/// The key schedule of one main relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct KeySchedule {
    /// The Relay's name.
    pub relay: String,
    /// Its node id (replicas share the relay's key file).
    pub node: String,
    /// Its key file.
    pub path: PathBuf,
    /// `spec.echKeys`.
    pub periods: Periods,
}

/// The schedules of every main relay in `resources`, key files under `dir`.
pub fn schedules(resources: &[AnyResource], dir: &Path) -> Vec<KeySchedule> {
    resources
        .iter()
        .filter_map(|r| match r {
            AnyResource::Relay(r) if r.spec.relay_type == RelayType::Main => Some(KeySchedule {
                relay: r.metadata.name.clone().unwrap_or_default(),
                node: r.spec.node_id.clone(),
                path: dir.join(format!("{}-ech.json", r.spec.node_id)),
                periods: Periods::from(&r.spec.ech_keys),
            }),
            _ => None,
        })
        .collect()
}

/// Which main relays `names` mean (a Relay's name or node id; none: all), or the name that
/// matches none.
pub fn resolve(schedules: &[KeySchedule], names: &[String]) -> Result<BTreeSet<String>, String> {
    if names.is_empty() {
        return Ok(schedules.iter().map(|s| s.node.clone()).collect());
    }
    names
        .iter()
        .map(|n| {
            schedules.iter().find(|s| &s.relay == n || &s.node == n).map(|s| s.node.clone()).ok_or_else(|| {
                let known: Vec<&str> = schedules.iter().map(|s| s.relay.as_str()).collect();
                format!("{n:?} is not a main relay of this federation (main relays: {})", known.join(", "))
            })
        })
        .collect()
}

/// What one pass over the schedules did.
#[derive(Debug, Default)]
pub struct Pass {
    /// Some relay's current key changed: homes need the new config.
    pub promoted: bool,
    /// When the next pass is due.
    pub next_due: Duration,
}

/// Runs every schedule once, staging now for the nodes in `force`.
pub fn run(keys: &KeyStore, schedules: &[KeySchedule], force: &BTreeSet<String>, now: SystemTime) -> Pass {
    let mut pass = Pass { promoted: false, next_due: Duration::from_secs(3600) };
    for s in schedules {
        match keys.rotate_ech(&s.path, s.periods, force.contains(&s.node), now) {
            Ok(out) => {
                pass.next_due = pass.next_due.min(out.next_due);
                let f = &out.state.file;
                match out.change {
                    Change::Staged => info!(
                        relay = %s.relay,
                        config_id = f.next.as_ref().map(|k| k.config_id),
                        staging = ?s.periods.staging,
                        "ECH key staged: relays accept it now, homes seal to it after the staging period"
                    ),
                    Change::Rotated | Change::Created => {
                        pass.promoted = true;
                        info!(relay = %s.relay, config_id = f.current.config_id, grace = ?s.periods.grace,
                            "ECH key rotated: homes get its config; the previous key is accepted for the grace period");
                    }
                    Change::PrunedPrevious => {
                        info!(relay = %s.relay, "previous ECH key dropped after the grace period")
                    }
                    Change::Unchanged => {}
                }
            }
            Err(e) => {
                error!(relay = %s.relay, error = %e, "ECH key schedule failed; the keys in force stay");
                pass.next_due = pass.next_due.min(Duration::from_secs(30));
            }
        }
    }
    pass
}
