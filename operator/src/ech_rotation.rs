//! When to create, stage, rotate and prune a main relay's ECH keys. Pure: the reconciler
//! (or the local supervisor) reads the key file, asks [`decide`], and writes back only what
//! changed.
//!
//! A rotation has two steps, so no home ever seals to a key its relay does not hold yet:
//! 1. **stage**: `stagingPeriod` before the current key is `rotationPeriod` old (or at once
//!    when forced), a new key is added as `next`. Relays accept it as soon as they reload the
//!    file; homes are not told about it.
//! 2. **promote**: once the staged key has been held for `stagingPeriod` (longer than the key
//!    file takes to reach every relay replica), it becomes current and is published to homes;
//!    the old current key stays as `previous` for `gracePeriod` so routes sealed to it by homes
//!    with an older snapshot still open, then it is dropped.
//!
//! A changed public name replaces the key at once (configs name it, so older ones are void).

use std::time::{Duration, SystemTime};

use relayfed_proto::config::keys::{EchKeyFile, StoredEchKey};
use relayfed_proto::crypto::ech::{EchError, EchKeyPair};

/// The stored key file and when its current key became current.
#[derive(Clone, Debug)]
pub struct EchState {
    /// The key file as mounted into relay pods.
    pub file: EchKeyFile,
    /// When the current key became current.
    pub current_since: SystemTime,
}

/// The key schedule of one main relay (`Relay.spec.echKeys`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Periods {
    /// How long a key is current.
    pub rotation: Duration,
    /// How long the previous key is still accepted after a rotation.
    pub grace: Duration,
    /// How long relays hold a new key before homes are given its config.
    pub staging: Duration,
}

impl From<&relayfed_crds::relay::EchKeys> for Periods {
    fn from(k: &relayfed_crds::relay::EchKeys) -> Self {
        Self { rotation: k.rotation_period.get(), grace: k.grace_period.get(), staging: k.staging_period.get() }
    }
}

/// What changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Change {
    /// Nothing: keep the file as it is.
    Unchanged,
    /// First key created.
    Created,
    /// A next key was staged: relays accept it, homes do not seal to it yet.
    Staged,
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
    /// What changed (a prune in the same step as a stage or rotation is not reported).
    pub change: Change,
    /// When the next step (stage, promotion or pruning) is due, from `now`.
    pub next_due: Duration,
}

fn secs(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn at(unix: Option<u64>) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(unix.unwrap_or(0))
}

fn fresh(config_id: u8, public_name: &str, now: SystemTime) -> Result<StoredEchKey, EchError> {
    let k = EchKeyPair::generate(config_id, public_name)?;
    Ok(StoredEchKey { since: Some(secs(now)), ..EchKeyFile::from_key(&k).current })
}

/// A config id used by no key in `file`.
fn unused_id(file: &EchKeyFile) -> u8 {
    let taken = |id: u8| {
        [Some(&file.current), file.previous.as_ref(), file.next.as_ref()]
            .into_iter()
            .flatten()
            .any(|k| k.config_id == id)
    };
    let mut id = file.current.config_id.wrapping_add(1);
    while taken(id) {
        id = id.wrapping_add(1);
    }
    id
}

/// `file` with `new` current and the old current kept as previous from `now`.
fn promote(file: &EchKeyFile, new: StoredEchKey, public_name: &str, now: SystemTime) -> EchKeyFile {
    let previous = StoredEchKey { rotated_at: Some(secs(now)), ..file.current.clone() };
    EchKeyFile {
        public_name: public_name.to_owned(),
        current: StoredEchKey { since: Some(secs(now)), ..new },
        previous: Some(previous),
        next: None,
    }
}

/// Decides the key state for `now`; `force` stages a next key now (an operator's request to
/// rotate) unless one is staged already.
pub fn decide(
    existing: Option<&EchState>,
    public_name: &str,
    periods: Periods,
    force: bool,
    now: SystemTime,
) -> Result<Outcome, EchError> {
    let Periods { rotation, grace, staging } = periods;
    let Some(state) = existing else {
        let file = EchKeyFile {
            public_name: public_name.to_owned(),
            current: fresh(rand::random(), public_name, now)?,
            previous: None,
            next: None,
        };
        return Ok(Outcome {
            state: EchState { file, current_since: now },
            change: Change::Created,
            next_due: rotation.saturating_sub(staging),
        });
    };
    let rotated = |file: EchKeyFile| Outcome {
        state: EchState { file, current_since: now },
        change: Change::Rotated,
        next_due: grace.min(rotation.saturating_sub(staging)),
    };
    if state.file.public_name != public_name {
        let new = fresh(unused_id(&state.file), public_name, now)?;
        return Ok(rotated(promote(&state.file, new, public_name, now)));
    }
    // Drop a previous key whose grace ended.
    let mut file = state.file.clone();
    let mut pruned = false;
    let mut due = Duration::MAX;
    if let Some(prev) = &file.previous {
        let since = now.duration_since(at(prev.rotated_at)).unwrap_or_default();
        if since >= grace {
            file.previous = None;
            pruned = true;
        } else {
            due = grace - since;
        }
    }
    let age = now.duration_since(state.current_since).unwrap_or_default();
    match file.next.clone() {
        Some(next) => {
            let held = now.duration_since(at(next.since)).unwrap_or_default();
            if held >= staging {
                return Ok(rotated(promote(&file, next, public_name, now)));
            }
            due = due.min(staging - held);
        }
        None if force || age + staging >= rotation => {
            let new = fresh(unused_id(&file), public_name, now)?;
            if staging.is_zero() {
                return Ok(rotated(promote(&file, new, public_name, now)));
            }
            file.next = Some(new);
            return Ok(Outcome {
                state: EchState { file, current_since: state.current_since },
                change: Change::Staged,
                next_due: due.min(staging),
            });
        }
        None => due = due.min(rotation.saturating_sub(staging).saturating_sub(age)),
    }
    let change = if pruned { Change::PrunedPrevious } else { Change::Unchanged };
    Ok(Outcome { state: EchState { file, current_since: state.current_since }, change, next_due: due })
}

#[cfg(test)]
mod tests {
    use super::*;

    const P: Periods = Periods {
        rotation: Duration::from_secs(3600),
        grace: Duration::from_secs(600),
        staging: Duration::from_secs(120),
    };

    fn t(s: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000 + s)
    }

    fn step(state: &EchState, s: u64) -> Outcome {
        decide(Some(state), "relay.example", P, false, t(s)).unwrap()
    }

    #[test]
    fn a_rotation_stages_first_and_publishes_after_the_staging_period() {
        let created = decide(None, "relay.example", P, false, t(0)).unwrap();
        assert_eq!(created.change, Change::Created);
        assert_eq!(created.next_due, Duration::from_secs(3480));
        let s0 = created.state;
        assert_eq!(step(&s0, 3479).change, Change::Unchanged);
        let staged = step(&s0, 3480);
        assert_eq!(staged.change, Change::Staged);
        assert_eq!(staged.next_due, P.staging);
        let next = staged.state.file.next.clone().unwrap();
        assert_eq!(staged.state.file.current.config_id, s0.file.current.config_id, "homes keep the current key");
        assert_ne!(next.config_id, s0.file.current.config_id);
        assert_eq!(step(&staged.state, 3599).change, Change::Unchanged, "held for less than the staging period");
        let rotated = step(&staged.state, 3600);
        assert_eq!(rotated.change, Change::Rotated);
        assert_eq!(rotated.state.file.current.secret, next.secret, "the staged key, not a new one, is promoted");
        assert_eq!(rotated.state.file.previous.as_ref().unwrap().config_id, s0.file.current.config_id);
        assert!(rotated.state.file.next.is_none());
        assert_eq!(rotated.state.current_since, t(3600));
        assert_eq!(rotated.next_due, P.grace);
        let pruned = step(&rotated.state, 4200);
        assert_eq!(pruned.change, Change::PrunedPrevious);
        assert!(pruned.state.file.previous.is_none());
        assert_eq!(pruned.next_due, Duration::from_secs(3600 + 3480 - 4200));
    }

    #[test]
    fn a_forced_rotation_stages_at_once_and_only_once() {
        let s0 = decide(None, "relay.example", P, false, t(0)).unwrap().state;
        let forced = decide(Some(&s0), "relay.example", P, true, t(10)).unwrap();
        assert_eq!(forced.change, Change::Staged);
        let again = decide(Some(&forced.state), "relay.example", P, true, t(20)).unwrap();
        assert_eq!(again.change, Change::Unchanged, "a second request while one is staged changes nothing");
        assert_eq!(again.state.file.next.unwrap().secret, forced.state.file.next.clone().unwrap().secret);
        assert_eq!(step(&forced.state, 130).change, Change::Rotated);
    }

    #[test]
    fn without_a_staging_period_the_key_is_replaced_in_one_step() {
        let p = Periods { staging: Duration::ZERO, ..P };
        let s0 = decide(None, "relay.example", p, false, t(0)).unwrap().state;
        let out = decide(Some(&s0), "relay.example", p, false, t(3600)).unwrap();
        assert_eq!(out.change, Change::Rotated);
        assert!(out.state.file.next.is_none());
    }

    #[test]
    fn a_new_public_name_replaces_the_key_at_once() {
        let s0 = decide(None, "relay.example", P, false, t(0)).unwrap().state;
        let out = decide(Some(&s0), "other.example", P, false, t(5)).unwrap();
        assert_eq!(out.change, Change::Rotated);
        assert_eq!(out.state.file.public_name, "other.example");
    }

    #[test]
    fn config_ids_never_collide() {
        let mut state = decide(None, "relay.example", P, false, t(0)).unwrap().state;
        for i in 0..600u64 {
            let out = decide(Some(&state), "relay.example", P, i % 3 == 0, t(i * 200)).unwrap();
            state = out.state;
            let f = &state.file;
            let ids: Vec<u8> = [Some(&f.current), f.previous.as_ref(), f.next.as_ref()]
                .into_iter()
                .flatten()
                .map(|k| k.config_id)
                .collect();
            let mut unique = ids.clone();
            unique.sort_unstable();
            unique.dedup();
            assert_eq!(unique.len(), ids.len(), "{ids:?}");
        }
    }
}
