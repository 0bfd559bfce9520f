//! Leader election with a `coordination.k8s.io/v1` Lease, so two operator replicas can run:
//! only the holder reconciles. Updates use the Lease's `resourceVersion` (optimistic
//! concurrency), so two candidates can never both win the same term.
//!
//! The decision is pure ([`decide`]); [`Elector::try_lead`] performs it against the API.
//!
//! The holder also labels its own pod [`LEADER_LABEL`]`=true` and every other replica's
//! `false` ([`PodLabel`]): the distribution Service selects the label, so config subscribers
//! reach the leader while every replica is Ready. A replica that starts (or restarts after
//! losing the Lease) labels itself `false` first.

use std::time::{Duration, SystemTime};

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{Api, ListParams, ObjectMeta, Patch, PatchParams, PostParams};

use super::ReconcileError;

/// What a candidate should do about the Lease.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    /// No Lease yet: create it naming us.
    Create,
    /// We hold it: renew.
    Renew,
    /// Another holder's term ran out: take over.
    TakeOver,
    /// Another holder is current.
    Follow {
        /// Its identity.
        holder: String,
    },
}

fn micro(t: SystemTime) -> MicroTime {
    let us = t.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_micros() as i64).unwrap_or(0);
    MicroTime(Timestamp::from_microsecond(us).unwrap_or(Timestamp::UNIX_EPOCH))
}

/// A Lease time as a `SystemTime` (before the epoch reads as the epoch).
pub(crate) fn system(t: &MicroTime) -> SystemTime {
    let us = u64::try_from(t.0.as_microsecond()).unwrap_or(0);
    SystemTime::UNIX_EPOCH + Duration::from_micros(us)
}

/// How long a Lease's term lasts without renewal (15 s when unset).
pub(crate) fn term(spec: &LeaseSpec) -> Duration {
    Duration::from_secs(u64::try_from(spec.lease_duration_seconds.unwrap_or(15)).unwrap_or(15))
}

/// Decides from the current Lease (if any).
pub fn decide(lease: Option<&Lease>, me: &str, now: SystemTime) -> Decision {
    let Some(lease) = lease else { return Decision::Create };
    let spec = lease.spec.clone().unwrap_or_default();
    match spec.holder_identity.as_deref() {
        Some(h) if h == me => Decision::Renew,
        None | Some("") => Decision::TakeOver,
        Some(holder) => {
            let renewed = spec.renew_time.as_ref().or(spec.acquire_time.as_ref()).map(system);
            let term = term(&spec);
            match renewed {
                Some(t) if t + term > now => Decision::Follow { holder: holder.to_owned() },
                _ => Decision::TakeOver,
            }
        }
    }
}

/// One candidate for a Lease.
pub struct Elector {
    api: Api<Lease>,
    name: String,
    /// This replica's identity (the pod name).
    pub identity: String,
    /// How long a term lasts without renewal.
    pub lease_duration: Duration,
}

impl Elector {
    /// A candidate for Lease `name` in `api`'s namespace.
    pub fn new(api: Api<Lease>, name: &str, identity: &str, lease_duration: Duration) -> Self {
        Self { api, name: name.to_owned(), identity: identity.to_owned(), lease_duration }
    }

    /// Tries to become (or stay) the leader at `now`; returns whether we lead.
    pub async fn try_lead(&self, now: SystemTime) -> Result<bool, ReconcileError> {
        let current = self
            .api
            .get_opt(&self.name)
            .await
            .map_err(|e| ReconcileError::kube(format!("get Lease {}", self.name), e))?;
        let decision = decide(current.as_ref(), &self.identity, now);
        let term = i32::try_from(self.lease_duration.as_secs()).unwrap_or(15);
        let result = match (decision, current) {
            (Decision::Follow { holder }, _) => {
                tracing::debug!(%holder, "another replica leads");
                return Ok(false);
            }
            (Decision::Create, _) => {
                let lease = Lease {
                    metadata: ObjectMeta { name: Some(self.name.clone()), ..Default::default() },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(self.identity.clone()),
                        lease_duration_seconds: Some(term),
                        acquire_time: Some(micro(now)),
                        renew_time: Some(micro(now)),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                self.api.create(&PostParams::default(), &lease).await
            }
            (decision, Some(mut lease)) => {
                let mut spec = lease.spec.take().unwrap_or_default();
                if decision == Decision::TakeOver {
                    spec.holder_identity = Some(self.identity.clone());
                    spec.acquire_time = Some(micro(now));
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    tracing::info!(identity = %self.identity, "taking over the leader Lease");
                }
                spec.renew_time = Some(micro(now));
                spec.lease_duration_seconds = Some(term);
                lease.spec = Some(spec);
                // `replace` carries metadata.resourceVersion: a concurrent writer makes it fail with 409.
                self.api.replace(&self.name, &PostParams::default(), &lease).await
            }
            (_, None) => return Ok(false),
        };
        match result {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 409 => Ok(false),
            Err(e) => Err(ReconcileError::kube(format!("write Lease {}", self.name), e)),
        }
    }
}

/// The pod label naming the replica that leads (`true`) or follows (`false`).
pub const LEADER_LABEL: &str = "relayfed.io/leader";

/// Labels the operator's pods by role. Outside a pod (the operator run from a shell or a
/// test), the own pod does not exist and labelling is skipped with one log line.
pub struct PodLabel {
    api: Api<Pod>,
    own: String,
}

impl PodLabel {
    /// Labels pods in `api`'s namespace; `own` is this replica's pod name.
    pub fn new(api: Api<Pod>, own: &str) -> Self {
        Self { api, own: own.to_owned() }
    }

    async fn set(&self, pod: &str, leading: bool) -> Result<bool, ReconcileError> {
        let patch = serde_json::json!({"metadata": {"labels": {LEADER_LABEL: leading.to_string()}}});
        match self.api.patch(pod, &PatchParams::default(), &Patch::Merge(&patch)).await {
            Ok(_) => Ok(true),
            Err(kube::Error::Api(s)) if s.code == 404 => Ok(false),
            Err(e) => Err(ReconcileError::kube(format!("label pod {pod} {LEADER_LABEL}={leading}"), e)),
        }
    }

    /// Marks this replica a follower (at start-up, before it may lead).
    pub async fn follow(&self) -> Result<(), ReconcileError> {
        if !self.set(&self.own, false).await? {
            tracing::info!(pod = %self.own, "no such pod in the operator's namespace: not labelling the leader");
        }
        Ok(())
    }

    /// Marks this replica the leader, after taking every other replica's label away (one that
    /// lost the Lease while cut off from the API server may still carry it).
    pub async fn lead(&self) -> Result<(), ReconcileError> {
        let others = self
            .api
            .list(&ListParams::default().labels(&format!("{LEADER_LABEL}=true")))
            .await
            .map_err(|e| ReconcileError::kube(format!("list pods labelled {LEADER_LABEL}=true"), e))?;
        for pod in others.items {
            let name = pod.metadata.name.unwrap_or_default();
            if name != self.own {
                tracing::info!(pod = %name, "taking the leader label from a former leader");
                self.set(&name, false).await?;
            }
        }
        self.set(&self.own, true).await.map(|_| ())
    }
}
