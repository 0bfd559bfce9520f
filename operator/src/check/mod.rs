//! `relayfed check`: pre- and post-install checks of a cluster, in the spirit of `linkerd
//! check`. [`gather`] reads what the checks need from the API (and dials the webhook); the
//! checks themselves are pure functions of that [`Facts`] ([`evaluate`]), each failure with
//! its remedy.

pub mod gather;

use std::time::{Duration, SystemTime};

use relayfed_crds::peer::PeerState;
use relayfed_crds::relay::RelayType;
use relayfed_crds::{Peer, Relay, RelayFederation, RolloutPolicy};
use serde::Serialize;

/// The oldest Kubernetes the chart supports (`kubeVersion` in Chart.yaml).
pub const MIN_KUBERNETES: (u32, u32) = (1, 30);
/// The CRDs the chart relies on (plural.group).
pub const CRDS: [&str; 4] =
    ["relayfederations.relayfed.io", "relays.relayfed.io", "peers.relayfed.io", "rolloutpolicies.relayfed.io"];

/// How one check came out.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Fine.
    Ok,
    /// Works, but worth a look (does not fail the run).
    Warn,
    /// Broken: the run exits non-zero.
    Fail,
}

/// One check's result.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Outcome {
    /// Group (`kubernetes-api`, `crds`, `control-plane`, `federation`).
    pub category: &'static str,
    /// What was checked.
    pub name: String,
    /// The result.
    pub status: Status,
    /// What was found.
    pub detail: String,
    /// What to do about a warning or failure.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

fn ok(category: &'static str, name: impl Into<String>, detail: impl Into<String>) -> Outcome {
    Outcome { category, name: name.into(), status: Status::Ok, detail: detail.into(), remedy: None }
}

fn bad(
    category: &'static str,
    status: Status,
    name: impl Into<String>,
    detail: impl Into<String>,
    remedy: impl Into<String>,
) -> Outcome {
    Outcome { category, name: name.into(), status, detail: detail.into(), remedy: Some(remedy.into()) }
}

/// A CRD as the server has it.
#[derive(Clone, Debug, Default)]
pub struct CrdFact {
    /// Established condition is True.
    pub established: bool,
    /// Its served schema equals what this relayfed build generates.
    pub current: bool,
}

/// The leader Lease.
#[derive(Clone, Debug, Default)]
pub struct LeaseFact {
    /// Holder identity.
    pub holder: Option<String>,
    /// Last renewal.
    pub renewed: Option<SystemTime>,
    /// Term.
    pub duration: Duration,
}

/// The injection webhook as registered and as reached.
#[derive(Clone, Debug, Default)]
pub struct WebhookFact {
    /// The MutatingWebhookConfiguration exists.
    pub registered: bool,
    /// Why the caBundle is unusable (missing, not PEM, expired), if it is.
    pub ca_problem: Option<String>,
    /// Ready endpoints behind the webhook Service (Service mode).
    pub ready_endpoints: Option<usize>,
    /// Result of a TLS handshake verified with the caBundle (URL mode).
    pub handshake: Option<Result<(), String>>,
}

/// Everything the checks look at.
#[derive(Clone, Debug)]
pub struct Facts {
    /// Namespace checked (the release namespace).
    pub namespace: String,
    /// Helm release name.
    pub release: String,
    /// Only the pre-install checks.
    pub pre_install: bool,
    /// `major.minor` of the API server, or why it could not be read.
    pub server_version: Result<(u32, u32), String>,
    /// The relayfed CRDs by name (absent: not installed).
    pub crds: std::collections::BTreeMap<String, CrdFact>,
    /// The leader Lease, if any.
    pub lease: Option<LeaseFact>,
    /// Ready operator replicas (Deployment status), if the Deployment exists.
    pub operator_ready: Option<(i32, i32)>,
    /// The webhook.
    pub webhook: WebhookFact,
    /// RelayFederations in the namespace.
    pub federations: Vec<RelayFederation>,
    /// Relays in the namespace.
    pub relays: Vec<Relay>,
    /// Peers in the namespace.
    pub peers: Vec<Peer>,
    /// RolloutPolicies in the namespace.
    pub policies: Vec<RolloutPolicy>,
    /// When the facts were read.
    pub now: SystemTime,
}

impl Default for Facts {
    fn default() -> Self {
        Self {
            namespace: String::new(),
            release: String::new(),
            pre_install: false,
            server_version: Err("not read".into()),
            crds: Default::default(),
            lease: None,
            operator_ready: None,
            webhook: WebhookFact::default(),
            federations: Vec::new(),
            relays: Vec::new(),
            peers: Vec::new(),
            policies: Vec::new(),
            now: SystemTime::UNIX_EPOCH,
        }
    }
}

fn condition<'a>(conds: &'a [relayfed_crds::Condition], type_: &str) -> Option<&'a relayfed_crds::Condition> {
    conds.iter().find(|c| c.type_ == type_)
}

/// Runs every check on `f`, in display order.
pub fn evaluate(f: &Facts) -> Vec<Outcome> {
    let mut out = vec![api_version(f)];
    out.extend(crds(f));
    if f.pre_install {
        return out;
    }
    out.push(operator(f));
    out.push(leader(f));
    out.push(webhook(f));
    out.extend(federations(f));
    out.extend(relays(f));
    out.extend(peers(f));
    out.extend(policies(f));
    out
}

fn api_version(f: &Facts) -> Outcome {
    let c = "kubernetes-api";
    match &f.server_version {
        Err(e) => bad(
            c,
            Status::Fail,
            "API server reachable",
            e.clone(),
            "check --kubeconfig/--context and that the API server is up (kubectl version)",
        ),
        Ok((maj, min)) if (*maj, *min) >= MIN_KUBERNETES => {
            ok(c, "API server version", format!("v{maj}.{min} (>= v{}.{})", MIN_KUBERNETES.0, MIN_KUBERNETES.1))
        }
        Ok((maj, min)) => bad(
            c,
            Status::Fail,
            "API server version",
            format!("v{maj}.{min} is older than v{}.{}", MIN_KUBERNETES.0, MIN_KUBERNETES.1),
            "upgrade the cluster; relayfed needs native sidecars and CEL validation (>= 1.30)",
        ),
    }
}

fn crds(f: &Facts) -> Vec<Outcome> {
    let c = "crds";
    let remedy = "helm upgrade --install relayfed-crds charts/relayfed-crds (before the relayfed chart)";
    CRDS.iter()
        .map(|name| match f.crds.get(*name) {
            None => bad(c, Status::Fail, format!("CRD {name}"), "not installed", remedy),
            Some(crd) if !crd.established => {
                bad(c, Status::Fail, format!("CRD {name}"), "not Established", "kubectl describe crd {name}")
            }
            Some(crd) if !crd.current => bad(
                c,
                Status::Fail,
                format!("CRD {name}"),
                "installed, but its schema differs from this relayfed version's",
                remedy,
            ),
            Some(_) => ok(c, format!("CRD {name}"), "installed, Established and current"),
        })
        .collect()
}

fn operator(f: &Facts) -> Outcome {
    let c = "control-plane";
    let deploy = format!("{}-operator", f.release);
    match f.operator_ready {
        None => bad(
            c,
            Status::Fail,
            "operator deployed",
            format!("no Deployment {deploy} in {}", f.namespace),
            format!("helm install {} charts/relayfed -n {} (or pass --release/-n)", f.release, f.namespace),
        ),
        Some((ready, want)) if ready >= 1 => ok(c, "operator deployed", format!("{ready}/{want} replicas Ready")),
        Some((ready, want)) => bad(
            c,
            Status::Fail,
            "operator deployed",
            format!("{ready}/{want} replicas Ready"),
            format!(
                "kubectl -n {} describe deploy/{deploy}; kubectl -n {} logs deploy/{deploy}",
                f.namespace, f.namespace
            ),
        ),
    }
}

fn leader(f: &Facts) -> Outcome {
    let c = "control-plane";
    let remedy =
        format!("kubectl -n {} logs -l app.kubernetes.io/component=operator (Lease relayfed-operator)", f.namespace);
    let Some(lease) = &f.lease else {
        return bad(c, Status::Fail, "operator leading", "no Lease relayfed-operator: no replica ever led", remedy);
    };
    let Some(holder) = lease.holder.as_deref().filter(|h| !h.is_empty()) else {
        return bad(c, Status::Fail, "operator leading", "the Lease has no holder", remedy);
    };
    match lease.renewed {
        Some(t) if t + lease.duration >= f.now => ok(c, "operator leading", format!("{holder} holds the Lease")),
        Some(t) => {
            let ago = f.now.duration_since(t).unwrap_or_default().as_secs();
            bad(
                c,
                Status::Fail,
                "operator leading",
                format!(
                    "{holder} last renewed the Lease {ago}s ago (term {}s): no replica leads",
                    lease.duration.as_secs()
                ),
                remedy,
            )
        }
        None => bad(c, Status::Fail, "operator leading", "the Lease was never renewed", remedy),
    }
}

fn webhook(f: &Facts) -> Outcome {
    let c = "control-plane";
    let name = format!("{}-injector", f.release);
    let w = &f.webhook;
    if !w.registered {
        return bad(
            c,
            Status::Warn,
            "injection webhook",
            format!("no MutatingWebhookConfiguration {name}: injection is off"),
            "helm upgrade with injection.enabled=true to inject sidecars",
        );
    }
    if let Some(p) = &w.ca_problem {
        return bad(
            c,
            Status::Fail,
            "injection webhook",
            format!("caBundle: {p}"),
            format!("delete Secret {name}-tls in {} and run helm upgrade to re-issue it", f.namespace),
        );
    }
    let remedy = format!(
        "kubectl -n {} get pods -l app.kubernetes.io/component=injector; opted-in pods wait while it is down",
        f.namespace
    );
    match (&w.handshake, w.ready_endpoints) {
        (Some(Err(e)), _) => bad(c, Status::Fail, "injection webhook", format!("TLS handshake: {e}"), remedy),
        (Some(Ok(())), _) => ok(c, "injection webhook", "reachable; its certificate verifies against the caBundle"),
        (None, Some(0) | None) => {
            bad(c, Status::Fail, "injection webhook", format!("Service {name} has no ready endpoints"), remedy)
        }
        (None, Some(n)) => ok(c, "injection webhook", format!("{n} ready endpoints; caBundle valid")),
    }
}

/// A check that reads one status condition: `True` passes with its message, `False` fails
/// with its reason and `remedy`, no condition at all means the operator never reconciled it.
fn from_condition(check: String, cond: Option<&relayfed_crds::Condition>, remedy: String) -> Outcome {
    let c = "federation";
    match cond {
        Some(cond) if cond.status == "True" => ok(c, check, cond.message.clone()),
        Some(cond) => bad(c, Status::Fail, check, format!("{}: {}", cond.reason, cond.message), remedy),
        None => bad(
            c,
            Status::Fail,
            check,
            format!("not reconciled by the operator yet ({remedy})"),
            "check that the operator leads (above)",
        ),
    }
}

fn federations(f: &Facts) -> Vec<Outcome> {
    f.federations
        .iter()
        .map(|fed| {
            let name = fed.metadata.name.clone().unwrap_or_default();
            let status = fed.status.clone().unwrap_or_default();
            from_condition(
                format!("federation {name} Ready"),
                condition(&status.common.conditions, "Ready"),
                format!(
                    "kubectl -n {} describe relayfederation {name}: the message names object and field",
                    f.namespace
                ),
            )
        })
        .collect()
}

fn relays(f: &Facts) -> Vec<Outcome> {
    let c = "federation";
    f.relays
        .iter()
        .flat_map(|r| {
            let name = r.metadata.name.clone().unwrap_or_default();
            let status = r.status.clone().unwrap_or_default();
            let mut out = vec![from_condition(
                format!("relay {name} Ready"),
                condition(&status.common.conditions, "Ready"),
                format!("kubectl -n {} describe relay {name}", f.namespace),
            )];
            if r.spec.relay_type == RelayType::Main {
                out.push(anonymity(c, &name, status.ech_anonymity_set));
                out.push(acknowledged(c, &f.namespace, &name, &status));
                let period = r.spec.ech_keys.rotation_period.get();
                let grace = r.spec.ech_keys.grace_period.get();
                let rotated = status.last_key_rotation.as_deref().and_then(crate::k8s::status::parse_rfc3339);
                out.push(match rotated {
                    Some(t) if t + period + grace >= f.now => {
                        let age = f.now.duration_since(t).unwrap_or_default().as_secs();
                        ok(
                            c,
                            format!("relay {name} ECH keys"),
                            format!("rotated {age}s ago (period {}s)", period.as_secs()),
                        )
                    }
                    Some(t) => bad(
                        c,
                        Status::Fail,
                        format!("relay {name} ECH keys"),
                        format!(
                            "last rotation {}s ago, past the rotation period {}s",
                            f.now.duration_since(t).unwrap_or_default().as_secs(),
                            period.as_secs()
                        ),
                        "the operator rotates keys while it leads: check its logs for Secret errors",
                    ),
                    None => bad(
                        c,
                        Status::Fail,
                        format!("relay {name} ECH keys"),
                        "no key rotation recorded",
                        "the operator creates the ECH key at the first reconcile: check that it leads",
                    ),
                });
            }
            out
        })
        .collect()
}

/// Whether a main relay acknowledged the config version published for it.
fn acknowledged(c: &'static str, ns: &str, name: &str, s: &relayfed_crds::RelayStatus) -> Outcome {
    let check = format!("relay {name} config acknowledged");
    let logs = format!("kubectl -n {ns} logs deploy/{name} (relays acknowledge a new snapshot within seconds)");
    match (s.config_version, s.acknowledged_version, s.acknowledged_result.as_deref()) {
        (None, _, _) => ok(c, check, "no config published yet"),
        (Some(v), Some(a), Some("invalid")) if a == v => {
            bad(c, Status::Fail, check, format!("the relay refused config version {v} as invalid"), logs)
        }
        (Some(v), Some(a), result) if a >= v => ok(c, check, format!("version {v} ({})", result.unwrap_or("applied"))),
        (Some(v), last, _) => bad(
            c,
            Status::Warn,
            check,
            match last {
                Some(a) => format!("version {v} published, {a} acknowledged"),
                None => format!("version {v} published, none acknowledged yet"),
            },
            logs,
        ),
    }
}

/// A main relay whose planned ECH anonymity set is small: a stream sealed to it names one of
/// few services, whatever ECH hides.
fn anonymity(c: &'static str, name: &str, set: Option<i64>) -> Outcome {
    let min = crate::local::status::MIN_ANONYMITY_SET;
    let check = format!("relay {name} ECH anonymity set");
    match set {
        None => ok(c, check, "not planned yet"),
        Some(n) if u64::try_from(n).unwrap_or(0) >= min => ok(c, check, format!("{n} services")),
        Some(n) => bad(
            c,
            Status::Warn,
            check,
            format!("{n} service(s): relays on the path of a stream sealed to it can tell which one it is for"),
            format!(
                "ECH hides a service among at least {min}: host more services at this main relay, or accept the smaller set"
            ),
        ),
    }
}

fn peers(f: &Facts) -> Vec<Outcome> {
    let c = "federation";
    f.peers
        .iter()
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            let status = p.status.clone().unwrap_or_default();
            let remedy =
                format!("kubectl -n {} describe peer {name}; check the peer's endpoints and trust", f.namespace);
            match (status.state, condition(&status.common.conditions, "Applied")) {
                (Some(PeerState::Up), _) => ok(c, format!("peer {name}"), "up"),
                (Some(other), _) => bad(c, Status::Fail, format!("peer {name}"), format!("{other:?}"), remedy),
                (None, Some(cond)) if cond.status == "True" => ok(c, format!("peer {name}"), cond.message.clone()),
                (None, Some(cond)) => {
                    bad(c, Status::Fail, format!("peer {name}"), format!("{}: {}", cond.reason, cond.message), remedy)
                }
                (None, None) => bad(
                    c,
                    Status::Warn,
                    format!("peer {name}"),
                    "not reconciled yet",
                    "check that the operator leads; re-run in a minute",
                ),
            }
        })
        .collect()
}

fn policies(f: &Facts) -> Vec<Outcome> {
    f.policies
        .iter()
        .map(|p| {
            let name = p.metadata.name.clone().unwrap_or_default();
            let status = p.status.clone().unwrap_or_default();
            let check = format!("rollout policy {name} applied");
            let applied = condition(&status.common.conditions, "Applied");
            let generation = p.metadata.generation;
            match applied {
                Some(cond) if cond.status == "True" && status.common.observed_generation != generation => bad(
                    "federation",
                    Status::Warn,
                    check,
                    format!(
                        "generation {} not reconciled yet (last: {:?})",
                        generation.unwrap_or(0),
                        status.common.observed_generation
                    ),
                    "re-run shortly; the operator applies an edit within seconds",
                ),
                _ => {
                    from_condition(check, applied, format!("kubectl -n {} describe rolloutpolicy {name}", f.namespace))
                }
            }
        })
        .collect()
}

/// Whether the run passed (no failure; warnings pass).
pub fn passed(outcomes: &[Outcome]) -> bool {
    outcomes.iter().all(|o| o.status != Status::Fail)
}

/// Human-readable report, one line per check and the remedy under each problem.
pub fn render_text(outcomes: &[Outcome]) -> String {
    let mut out = String::new();
    let mut category = "";
    for o in outcomes {
        if o.category != category {
            category = o.category;
            out.push_str(&format!("{category}\n"));
        }
        let mark = match o.status {
            Status::Ok => "ok  ",
            Status::Warn => "warn",
            Status::Fail => "FAIL",
        };
        out.push_str(&format!("  [{mark}] {}: {}\n", o.name, o.detail));
        if let Some(r) = &o.remedy {
            out.push_str(&format!("         remedy: {r}\n"));
        }
    }
    let fails = outcomes.iter().filter(|o| o.status == Status::Fail).count();
    let warns = outcomes.iter().filter(|o| o.status == Status::Warn).count();
    out.push_str(&match fails {
        0 => format!("status check results: passed ({} checks, {warns} warnings)\n", outcomes.len()),
        n => format!("status check results: {n} failed ({} checks, {warns} warnings)\n", outcomes.len()),
    });
    out
}

#[cfg(test)]
mod tests;
