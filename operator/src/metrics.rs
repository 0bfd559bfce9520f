//! Operator and local-mode metrics (Prometheus text via prometheus-client):
//! `relayfed_operator_*` for what the operator does (and the local supervisor in its place):
//! config distribution, ECH rollout, reconciles, certificates, admissions;
//! `relayfed_local_*` for the node processes only local mode supervises.

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

type Node = [(&'static str, String); 1];
type L1 = [(&'static str, &'static str); 1];
type L2 = [(&'static str, &'static str); 2];

/// Every metric the operator (or the local-mode supervisor) exports.
pub struct OperatorMetrics {
    registry: Registry,
    /// Config version published per `node`.
    pub config_published_version: Family<Node, Gauge>,
    /// Config version acknowledged per `node`.
    pub config_acked_version: Family<Node, Gauge>,
    /// Acknowledgements by `result`.
    pub config_acks: Family<L1, Counter>,
    /// Snapshots sent to subscribers.
    pub config_served: Counter,
    /// Open subscriber connections.
    pub config_subscribers: Gauge,
    /// Time from publishing a version to a node acknowledging it.
    pub config_ack_seconds: Histogram,
    /// Refused distribution clients by `reason` (tls, identity, wrong_node).
    pub config_refusals: Family<L1, Counter>,
    /// Config sources (files or CR updates) by `result` (accepted, rejected, unchanged).
    pub config_changes: Family<L1, Counter>,
    /// Supervised node processes that are running, by `node` (local mode).
    pub process_up: Family<Node, Gauge>,
    /// Restarts of supervised node processes, by `node` (local mode).
    pub process_restarts: Family<Node, Counter>,
    /// Reconciles by `kind` and `result` (ok, error).
    pub reconciles: Family<L2, Counter>,
    /// Reconcile duration by `kind`.
    pub reconcile_seconds: Family<L1, Histogram, fn() -> Histogram>,
    /// Certificates issued by `kind` (node, ca).
    pub certificates_issued: Family<L1, Counter>,
    /// Webhook admissions by `result` (injected, skipped, error).
    pub admissions: Family<L1, Counter>,
    /// 1 while this replica holds the leader Lease, else 0.
    pub leader: Gauge,
    /// The RolloutPolicy's configured ECH percentage (`spec.ech.percentage`).
    pub rollout_configured_percent: Gauge,
    /// The percentage of the rollout's current step (before per-relay rollbacks).
    pub rollout_step_percent: Gauge,
    /// ECH percentage in force for destinations behind each `main` relay (after steps and
    /// automatic rollback).
    pub rollout_effective_percent: Family<Main, Gauge>,
    /// Rollout analyses by `result` (pass, fail, inconclusive), one per main relay per evaluation.
    pub rollout_analyses: Family<L1, Counter>,
    /// Rollout transitions by `kind` (rearmed, advanced, rolled_back, would_roll_back).
    pub rollout_transitions: Family<L1, Counter>,
    /// ECH cohort reports from nodes by `result` (accepted, refused).
    pub rollout_reports: Family<L1, Counter>,
    /// The direct-path rollout's configured percentage (`spec.directPaths.percentage`).
    pub direct_configured_percent: Gauge,
    /// The direct-path percentage of the current step.
    pub direct_step_percent: Gauge,
    /// Direct-path percentage in force for calls to homes behind each `main` relay.
    pub direct_effective_percent: Family<Main, Gauge>,
    /// Direct-path rollout analyses by `result`.
    pub direct_analyses: Family<L1, Counter>,
    /// Direct-path rollout transitions by `kind`.
    pub direct_transitions: Family<L1, Counter>,
}

/// The metrics of one rollout (ECH's or direct paths'), as the rollout driver records them.
pub struct RolloutMetrics<'a> {
    /// The configured percentage.
    pub configured: &'a Gauge,
    /// The current step's percentage.
    pub step: &'a Gauge,
    /// The percentage in force per main relay.
    pub effective: &'a Family<Main, Gauge>,
    /// Analyses by result.
    pub analyses: &'a Family<L1, Counter>,
    /// Transitions by kind.
    pub transitions: &'a Family<L1, Counter>,
}

type Main = [(&'static str, String); 1];

fn seconds_histogram() -> Histogram {
    Histogram::new([0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0])
}

impl Default for OperatorMetrics {
    fn default() -> Self {
        Self::new()
    }
}

impl OperatorMetrics {
    /// Creates and registers every metric.
    pub fn new() -> Self {
        let mut registry = Registry::default();
        relayfed_serving::process::register(&mut registry);
        let m = Self {
            config_published_version: Default::default(),
            config_acked_version: Default::default(),
            config_acks: Default::default(),
            config_served: Default::default(),
            config_subscribers: Default::default(),
            config_ack_seconds: seconds_histogram(),
            config_refusals: Default::default(),
            config_changes: Default::default(),
            process_up: Default::default(),
            process_restarts: Default::default(),
            reconciles: Default::default(),
            reconcile_seconds: Family::new_with_constructor(seconds_histogram),
            certificates_issued: Default::default(),
            admissions: Default::default(),
            leader: Default::default(),
            rollout_configured_percent: Default::default(),
            rollout_step_percent: Default::default(),
            rollout_effective_percent: Default::default(),
            rollout_analyses: Default::default(),
            rollout_transitions: Default::default(),
            rollout_reports: Default::default(),
            direct_configured_percent: Default::default(),
            direct_step_percent: Default::default(),
            direct_effective_percent: Default::default(),
            direct_analyses: Default::default(),
            direct_transitions: Default::default(),
            registry: Registry::default(),
        };
        registry.register(
            "relayfed_operator_config_published_version",
            "Config snapshot version published per node",
            m.config_published_version.clone(),
        );
        registry.register(
            "relayfed_operator_config_acknowledged_version",
            "Config snapshot version acknowledged per node",
            m.config_acked_version.clone(),
        );
        registry.register("relayfed_operator_config_acks", "Config acknowledgements by result", m.config_acks.clone());
        registry.register(
            "relayfed_operator_config_snapshots_served",
            "Snapshots sent to subscribers",
            m.config_served.clone(),
        );
        registry.register(
            "relayfed_operator_config_subscribers",
            "Open subscriber connections",
            m.config_subscribers.clone(),
        );
        registry.register_with_unit(
            "relayfed_operator_config_ack_latency",
            "Time from publishing a config version to its acknowledgement",
            prometheus_client::registry::Unit::Seconds,
            m.config_ack_seconds.clone(),
        );
        registry.register(
            "relayfed_operator_config_refusals",
            "Refused distribution clients by reason",
            m.config_refusals.clone(),
        );
        registry.register(
            "relayfed_operator_config_changes",
            "Config source changes by result",
            m.config_changes.clone(),
        );
        registry.register(
            "relayfed_local_process_up",
            "Supervised node processes running (local mode)",
            m.process_up.clone(),
        );
        registry.register(
            "relayfed_local_process_restarts",
            "Restarts of supervised node processes (local mode)",
            m.process_restarts.clone(),
        );
        registry.register("relayfed_operator_reconciles", "Reconciles by kind and result", m.reconciles.clone());
        registry.register_with_unit(
            "relayfed_operator_reconcile_duration",
            "Reconcile duration by kind",
            prometheus_client::registry::Unit::Seconds,
            m.reconcile_seconds.clone(),
        );
        registry.register(
            "relayfed_operator_certificates_issued",
            "Certificates issued by kind",
            m.certificates_issued.clone(),
        );
        registry.register("relayfed_operator_webhook_admissions", "Webhook admissions by result", m.admissions.clone());
        registry.register(
            "relayfed_operator_leader",
            "1 while this replica holds the leader Lease (it reconciles and serves distribution)",
            m.leader.clone(),
        );
        registry.register(
            "relayfed_operator_rollout_configured_percent",
            "The RolloutPolicy's configured ECH percentage",
            m.rollout_configured_percent.clone(),
        );
        registry.register(
            "relayfed_operator_rollout_step_percent",
            "ECH percentage of the rollout's current step, before per-relay rollbacks",
            m.rollout_step_percent.clone(),
        );
        registry.register(
            "relayfed_operator_rollout_effective_percent",
            "ECH percentage in force for destinations behind each main relay (after steps and automatic rollback)",
            m.rollout_effective_percent.clone(),
        );
        registry.register(
            "relayfed_operator_rollout_analysis",
            "ECH rollout analyses by result, one per main relay per evaluation",
            m.rollout_analyses.clone(),
        );
        registry.register(
            "relayfed_operator_rollout_transitions",
            "ECH rollout transitions by kind",
            m.rollout_transitions.clone(),
        );
        registry.register(
            "relayfed_operator_rollout_reports",
            "ECH cohort reports from nodes by result",
            m.rollout_reports.clone(),
        );
        registry.register(
            "relayfed_operator_direct_paths_configured_percent",
            "The RolloutPolicy's configured direct-path percentage",
            m.direct_configured_percent.clone(),
        );
        registry.register(
            "relayfed_operator_direct_paths_step_percent",
            "Direct-path percentage of the rollout's current step, before per-relay rollbacks",
            m.direct_step_percent.clone(),
        );
        registry.register(
            "relayfed_operator_direct_paths_effective_percent",
            "Direct-path percentage in force for calls to homes behind each main relay (after steps and automatic rollback)",
            m.direct_effective_percent.clone(),
        );
        registry.register(
            "relayfed_operator_direct_paths_analysis",
            "Direct-path rollout analyses by result, one per main relay per evaluation",
            m.direct_analyses.clone(),
        );
        registry.register(
            "relayfed_operator_direct_paths_transitions",
            "Direct-path rollout transitions by kind",
            m.direct_transitions.clone(),
        );
        for (analyses, transitions) in
            [(&m.rollout_analyses, &m.rollout_transitions), (&m.direct_analyses, &m.direct_transitions)]
        {
            for result in ["pass", "fail", "inconclusive"] {
                let _ = analyses.get_or_create(&[("result", result)]);
            }
            for kind in ["rearmed", "advanced", "rolled_back", "would_roll_back"] {
                let _ = transitions.get_or_create(&[("kind", kind)]);
            }
        }
        for result in ["accepted", "refused"] {
            let _ = m.rollout_reports.get_or_create(&[("result", result)]);
        }
        Self { registry, ..m }
    }

    /// The metrics of the ECH rollout (`direct` false) or the direct-path rollout.
    pub fn rollout(&self, direct: bool) -> RolloutMetrics<'_> {
        if direct {
            RolloutMetrics {
                configured: &self.direct_configured_percent,
                step: &self.direct_step_percent,
                effective: &self.direct_effective_percent,
                analyses: &self.direct_analyses,
                transitions: &self.direct_transitions,
            }
        } else {
            RolloutMetrics {
                configured: &self.rollout_configured_percent,
                step: &self.rollout_step_percent,
                effective: &self.rollout_effective_percent,
                analyses: &self.rollout_analyses,
                transitions: &self.rollout_transitions,
            }
        }
    }

    /// Prometheus/OpenMetrics text exposition.
    pub fn encode(&self) -> String {
        let mut out = String::new();
        let _ = encode(&mut out, &self.registry);
        out
    }
}
