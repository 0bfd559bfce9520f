//! What one stream setup says to the rollouts' analyses: its ECH cohort and whether a
//! failure could be ECH's doing, and how it counts for the direct-path rollout.

use std::time::Duration;

use super::{ErrorCode, StreamError};
use crate::federation::ech_cohorts::{Cohort, Setup};

/// The ECH cohort of one setup attempt, noted while it runs (the decision is taken inside).
#[derive(Debug, Default)]
pub(super) struct CohortNote {
    /// Set once the ECH decision is taken; `None`: the attempt ended before it.
    pub(super) cohort: Option<Cohort>,
    pub(super) fallback: bool,
    pub(super) retried: bool,
}

impl CohortNote {
    /// The setup to count for the rollout analysis, if the attempt says anything about ECH:
    /// a completed handshake, or a failure the route header's sealing could cause (`ECH_*`, a
    /// failed end-to-end handshake, a malformed answer). Failures of the path or the
    /// destination (a relay or home down or hung, a missing service) and refusals of the
    /// caller (rate limits, permissions) happen alike in both cohorts and are left out: with
    /// ECH at 100% there is no plain cohort to tell them apart, and a crashed relay must not
    /// roll ECH back.
    pub(super) fn setup<T>(
        &self,
        result: &Result<T, StreamError>,
        own_link_lost: bool,
        took: Duration,
    ) -> Option<Setup> {
        let cohort = self.cohort?;
        let ok = match result {
            Ok(_) => true,
            Err(_) if own_link_lost => return None,
            Err((code, _)) if counts_against_ech(*code) => false,
            Err(_) => return None,
        };
        Some(Setup { cohort, ok, fallback: self.fallback, retried: self.retried, seconds: took.as_secs_f64() })
    }
}

/// How a setup counts for the direct-path rollout analysis, if it says anything about the
/// path it took: a completed handshake; a direct path that closed or did not answer (the
/// stream goes out again through a relay); a path that delivered garbage or broke the
/// handshake, on either path. Refusals and missing services happen alike on both paths and
/// are left out; so is a relayed setup whose main relay link died (it is retried at once).
pub(super) fn path_setup<T>(
    result: &Result<T, StreamError>,
    direct: bool,
    direct_failed: bool,
    link_closed: bool,
) -> Option<bool> {
    match result {
        Ok(_) => Some(true),
        Err(_) if direct && direct_failed => Some(false),
        Err(_) if link_closed => None,
        Err((code, _)) => matches!(
            code,
            ErrorCode::Timeout | ErrorCode::PeerUnreachable | ErrorCode::HandshakeFailed | ErrorCode::MalformedFrame
        )
        .then_some(false),
    }
}

/// Whether a stream set up on a direct connection ended because that connection died (it
/// failed, and the connection is closed): the direct-path rollout counts it as a failed
/// direct attempt besides its setup, so a path that connects and then carries nothing is
/// seen even when its handshakes complete.
pub(super) fn lost_with_direct_path(ended: &Result<(), ErrorCode>, conn_closed: bool) -> bool {
    ended.is_err() && conn_closed
}

/// Failures the route header's sealing can cause (what the rollout analysis counts).
fn counts_against_ech(code: ErrorCode) -> bool {
    code.is_ech() || matches!(code, ErrorCode::HandshakeFailed | ErrorCode::MalformedFrame)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_direct_path_that_fails_a_setup_counts_against_it_and_refusals_do_not() {
        let ok: Result<(), StreamError> = Ok(());
        let err = |code| -> Result<(), StreamError> { Err((code, String::new())) };
        assert_eq!(path_setup(&ok, true, false, false), Some(true));
        assert_eq!(path_setup(&ok, false, false, false), Some(true));
        assert_eq!(path_setup(&err(ErrorCode::Timeout), true, true, false), Some(false), "the direct path hung");
        assert_eq!(path_setup(&err(ErrorCode::PeerUnreachable), true, true, true), Some(false), "it closed");
        assert_eq!(path_setup(&err(ErrorCode::Timeout), false, false, false), Some(false), "the relayed path hung");
        assert_eq!(path_setup(&err(ErrorCode::PeerUnreachable), false, false, true), None, "our relay link died");
        assert_eq!(path_setup(&err(ErrorCode::HandshakeFailed), true, false, false), Some(false));
        assert!(lost_with_direct_path(&Err(ErrorCode::PeerUnreachable), true));
        assert!(!lost_with_direct_path(&Err(ErrorCode::TargetUnreachable), false), "the app's side failed");
        assert!(!lost_with_direct_path(&Ok(()), true), "it ended well before the path went");
        for refusal in [ErrorCode::RateLimited, ErrorCode::PermissionDenied] {
            assert_eq!(path_setup(&err(refusal), true, false, false), None, "{refusal:?}");
            assert_eq!(path_setup(&err(refusal), false, false, false), None, "{refusal:?}");
        }
    }
}
