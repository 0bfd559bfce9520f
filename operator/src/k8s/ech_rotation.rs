//! When to create, rotate and prune a main relay's ECH keys. Pure: the reconciler reads the
//! key Secret, asks [`decide`], and writes back only what changed.
//!
//! The current key is replaced once it is `rotationPeriod` old (or when the federation's
//! public name changed); the replaced key stays as `previous` for `gracePeriod` so routes
//! sealed to it still open, then it is dropped.

use std::time::{Duration, SystemTime};

use relayfed_sidecar::config::keys::{EchKeyFile, StoredEchKey};
use relayfed_sidecar::crypto::ech::{EchError, EchKeyPair};

/// The stored key file and when its current key became current.
#[derive(Clone, Debug)]
pub struct EchState {
    /// The key file as mounted into relay pods.
    pub file: EchKeyFile,
    /// When the current key was created.
    pub current_since: SystemTime,
}

/// What changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing: keep the Secret as it is.
    Unchanged,
    /// First key created.
    Created,
    /// A new current key; the old one is kept for the grace period.
    Rotated,
    /// The previous key's grace period ended; it was dropped.
    PrunedPrevious,
}

/// The decision for one reconcile.
#[derive(Clone, Debug)]
pub struct Outcome {
    /// The key state to store (equal to the input when `change` is `Unchanged`).
    pub state: EchState,
    /// What changed.
    pub change: Change,
    /// When the next rotation or pruning is due, from `now`.
    pub next_due: Duration,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn fresh(config_id: u8, public_name: &str) -> Result<StoredEchKey, EchError> {
    let k = EchKeyPair::generate(config_id, public_name)?;
    Ok(EchKeyFile::from_key(&k).current)
}

/// Decides the key state for `now`.
pub fn decide(
    existing: Option<&EchState>,
    public_name: &str,
    rotation: Duration,
    grace: Duration,
    now: SystemTime,
) -> Result<Outcome, EchError> {
    let Some(state) = existing else {
        let file = EchKeyFile {
            public_name: public_name.to_owned(),
            current: fresh(rand::random(), public_name)?,
            previous: None,
        };
        return Ok(Outcome {
            state: EchState { file, current_since: now },
            change: Change::Created,
            next_due: rotation,
        });
    };
    let age = now.duration_since(state.current_since).unwrap_or_default();
    if age >= rotation || state.file.public_name != public_name {
        let old = &state.file.current;
        let mut id = old.config_id.wrapping_add(1);
        if state.file.previous.as_ref().is_some_and(|p| p.config_id == id) {
            id = id.wrapping_add(1);
        }
        let previous = StoredEchKey { rotated_at: Some(secs(now)), ..old.clone() };
        let file = EchKeyFile {
            public_name: public_name.to_owned(),
            current: fresh(id, public_name)?,
            previous: Some(previous),
        };
        return Ok(Outcome {
            state: EchState { file, current_since: now },
            change: Change::Rotated,
            next_due: grace.min(rotation),
        });
    }
    let until_rotation = rotation - age;
    if let Some(prev) = &state.file.previous {
        let rotated = SystemTime::UNIX_EPOCH + Duration::from_secs(prev.rotated_at.unwrap_or(0));
        let since = now.duration_since(rotated).unwrap_or_default();
        if since >= grace {
            let mut next = state.clone();
            next.file.previous = None;
            return Ok(Outcome { state: next, change: Change::PrunedPrevious, next_due: until_rotation });
        }
        return Ok(Outcome {
            state: state.clone(),
            change: Change::Unchanged,
            next_due: until_rotation.min(grace - since),
        });
    }
    Ok(Outcome { state: state.clone(), change: Change::Unchanged, next_due: until_rotation })
}
