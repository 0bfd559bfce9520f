//! The supervisor's side of a CA rotation ([`crate::local::ca_rotation`]): starting one,
//! asking the running nodes what they trust and present, and taking the next step when
//! [`decide`](crate::local::ca_rotation::decide) says so.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::json;
use tracing::{error, info};

use super::{ProcState, SERVER_NODE, Supervisor, node_keys, now_unix};
use crate::local::ca_rotation::{self, NodeTls, Step};

/// How often a rotation in progress asks the nodes.
pub(super) const CHECK_INTERVAL: Duration = Duration::from_secs(1);

impl Supervisor {
    /// Starts a CA rotation (step 1: every node trusts old and new).
    pub(super) fn begin_ca_rotation(&mut self, stage_for: Duration, overlap: Duration) {
        match ca_rotation::begin(&self.keys, stage_for, overlap, now_unix()) {
            Ok(r) => {
                info!(old = %r.old, new = %r.new, "CA rotation started: every node now trusts both CAs");
                self.reload_server_identity();
                self.ca_due = tokio::time::Instant::now();
            }
            Err(e) => error!(error = %e, "CA rotation not started"),
        }
        self.show_ca_rotation(None);
    }

    /// Ends the current phase's wait early (the nodes' acknowledgements are still required).
    pub(super) fn advance_ca_rotation(&mut self) {
        match ca_rotation::advance(&self.keys) {
            Ok(Some(r)) => info!(phase = ?r.phase, "CA rotation: next step as soon as every node acknowledges"),
            Ok(None) => info!("no CA rotation in progress"),
            Err(e) => error!(error = %e, "CA rotation"),
        }
        self.ca_due = tokio::time::Instant::now();
    }

    /// Takes the rotation's next step when every running node acknowledges the current one.
    pub(super) async fn run_ca_rotation(&mut self) {
        if tokio::time::Instant::now() < self.ca_due {
            return;
        }
        self.ca_due = tokio::time::Instant::now() + CHECK_INTERVAL;
        let mut rotation = match ca_rotation::current(&self.keys) {
            Ok(Some(r)) => r,
            Ok(None) => return,
            Err(e) => {
                error!(error = %e, "CA rotation state");
                return;
            }
        };
        let nodes = self.node_tls().await;
        let step = ca_rotation::decide(&rotation, &nodes, now_unix());
        match &step {
            Step::Wait(_) => {}
            Step::Promote => {
                let published = self.distributor.published();
                let result = ca_rotation::promote(&self.keys, &mut rotation, now_unix())
                    .and_then(|()| self.keys.ensure(&node_keys(&published), SERVER_NODE));
                match result {
                    Ok(report) => {
                        info!(new = %rotation.new, reissued = report.generated.len(), "CA rotation: the new CA issues; every certificate re-issued, both CAs trusted")
                    }
                    Err(e) => error!(error = %e, "CA rotation: promoting the new CA failed; will try again"),
                }
                self.reload_server_identity();
            }
            Step::Finish => match ca_rotation::finish(&self.keys) {
                Ok(()) => {
                    info!(ca = %rotation.new, "CA rotation done: the old CA is no longer trusted");
                    self.reload_server_identity();
                }
                Err(e) => error!(error = %e, "CA rotation: dropping the old CA failed; will try again"),
            },
        }
        self.show_ca_rotation(match step {
            Step::Wait(why) => Some(why),
            _ => None,
        });
    }

    /// Each running node's TLS report, with the fingerprint of the certificate file written
    /// for it.
    async fn node_tls(&self) -> BTreeMap<String, (Option<NodeTls>, String)> {
        let running = self
            .shared
            .lock()
            .map(|s| {
                s.nodes
                    .iter()
                    .filter(|(_, p)| p.state == ProcState::Running)
                    .map(|(n, p)| (n.clone(), p.clone()))
                    .collect::<BTreeMap<_, _>>()
            })
            .unwrap_or_default();
        let mut out = BTreeMap::new();
        for (node, health) in crate::local::status::healths(running.iter()).await {
            let tls = health.map(|h| NodeTls {
                roots: h["tls"]["roots"]
                    .as_array()
                    .map(|a| a.iter().filter_map(|r| r.as_str().map(str::to_owned)).collect())
                    .unwrap_or_default(),
                certificate: h["tls"]["certificate"].as_str().unwrap_or_default().to_owned(),
            });
            let file = std::fs::read_to_string(self.keys.path(&format!("{node}.pem")))
                .ok()
                .and_then(|pem| relayfed_proto::crypto::ca::cert_fingerprint(&pem).ok())
                .unwrap_or_default();
            out.insert(node, (tls, file));
        }
        out
    }

    /// Gives the distribution server the identity its files now hold.
    fn reload_server_identity(&self) {
        match self.keys.identity(SERVER_NODE) {
            Ok(id) => self.server_identity.replace(id),
            Err(e) => error!(error = %e, "distribution server identity not reloaded"),
        }
    }

    /// Puts the rotation (or its absence) and the CA fingerprint into `status`.
    fn show_ca_rotation(&self, waiting: Option<String>) {
        let rotation = ca_rotation::current(&self.keys).ok().flatten();
        if let Ok(mut s) = self.shared.lock() {
            s.ca_fingerprint = self.keys.ca_fingerprint();
            s.ca_rotation = match rotation {
                Some(r) => json!({
                    "phase": r.phase, "old": r.old, "new": r.new, "phaseSinceUnix": r.phase_since,
                    "stageForSeconds": r.stage_for_seconds, "overlapSeconds": r.overlap_seconds,
                    "advance": r.advance, "waiting": waiting,
                }),
                None => serde_json::Value::Null,
            };
        }
    }
}
