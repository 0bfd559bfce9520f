//! `RolloutPolicy`: gradual ECH rollout with automatic rollback, trust defaults, resilience.

use std::collections::{BTreeMap, BTreeSet};

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::common::{CommonStatus, Duration, NODE_ID_PATTERN, Permissions, RateLimit};
use crate::error::{CrdError, Errors};

/// How ECH is applied to a destination the rollout selects.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum EchMode {
    /// Never seal route headers.
    Disabled,
    /// Seal when possible; fall back to a plain route header and count the fallback.
    #[default]
    Opportunistic,
    /// Seal or fail closed with a structured error.
    Required,
}

/// Automatic rollback of a rollout's percentage (ECH's or direct paths') when the success rate
/// of its cohort drops.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AutoRollback {
    /// Whether rollback is automatic.
    #[serde(default = "yes")]
    pub enabled: bool,
    /// Lowest acceptable share (0–1) of the cohort's stream setups (ECH-sealed, or first tried
    /// on a direct path) that succeed within the window.
    #[serde(default = "default_min_success")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub min_success_rate: f64,
    /// Window over which the success rate is measured.
    #[serde(default = "default_window")]
    pub evaluation_window: Duration,
    /// Percentage points removed per rollback.
    #[serde(default = "default_step")]
    #[schemars(range(min = 1, max = 100))]
    pub step: u8,
    /// Fewest setups of the cohort in the window before a decision is made.
    #[serde(default = "default_min_streams")]
    #[schemars(range(min = 1, max = 1_000_000))]
    pub min_streams: u32,
    /// Report what a rollback would do (status, Events, metrics) without lowering anything.
    #[serde(default)]
    pub dry_run: bool,
}

impl Default for AutoRollback {
    fn default() -> Self {
        Self {
            enabled: true,
            min_success_rate: default_min_success(),
            evaluation_window: default_window(),
            step: default_step(),
            min_streams: default_min_streams(),
            dry_run: false,
        }
    }
}
fn default_min_success() -> f64 {
    0.99
}
fn default_window() -> Duration {
    Duration::from_secs(300)
}
fn default_step() -> u8 {
    25
}
fn default_min_streams() -> u32 {
    100
}

/// ECH rollout settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.whitelist) || !has(self.blacklist) || self.whitelist.all(p, !(p in self.blacklist))").message("a peer id may not be in both whitelist and blacklist").field_path(".whitelist"))]
#[x_kube(validation = Rule::new("!has(self.mode) || self.mode != 'required' || (has(self.enabled) && self.enabled)").message("mode required needs enabled: true").field_path(".mode"))]
#[serde(rename_all = "camelCase")]
pub struct EchRollout {
    /// Master switch: when false no route header is sealed, whatever the other fields say.
    #[serde(default)]
    pub enabled: bool,
    /// Behaviour for destinations selected by the rollout.
    #[serde(default)]
    pub mode: EchMode,
    /// Share of destination peers (by a stable hash of the peer id) that use ECH.
    #[serde(default)]
    #[schemars(range(min = 0, max = 100))]
    pub percentage: u8,
    /// Peer ids that always use ECH (when enabled).
    #[serde(default)]
    #[schemars(length(max = 256), inner(regex(pattern = NODE_ID_PATTERN), length(max = 63)))]
    pub whitelist: Vec<String>,
    /// Peer ids that never use ECH.
    #[serde(default)]
    #[schemars(length(max = 256), inner(regex(pattern = NODE_ID_PATTERN), length(max = 63)))]
    pub blacklist: Vec<String>,
    /// Automatic rollback.
    #[serde(default)]
    pub auto_rollback: AutoRollback,
    /// Percentages to pass through on the way to `percentage` (ascending; those not below it
    /// are ignored): each is held for `stepInterval` while the analysis passes. Empty: straight
    /// to `percentage`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(range(min = 0, max = 100)))]
    pub steps: Vec<u8>,
    /// How long each step is held (and analysed) before the next.
    #[serde(default = "default_step_interval")]
    pub step_interval: Duration,
}

impl Default for EchRollout {
    fn default() -> Self {
        Self {
            enabled: false,
            mode: EchMode::default(),
            percentage: 0,
            whitelist: vec![],
            blacklist: vec![],
            auto_rollback: AutoRollback::default(),
            steps: vec![],
            step_interval: default_step_interval(),
        }
    }
}

fn default_step_interval() -> Duration {
    Duration::from_secs(300)
}

/// Direct paths between homes: hole punching through NATs, coordinated by their main relay.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectPathsRollout {
    /// Master switch: off, every stream goes through a main relay.
    #[serde(default)]
    pub enabled: bool,
    /// Share of calling homes (by a stable hash of the node id) that attempt direct paths.
    #[serde(default = "all_percent")]
    #[schemars(range(min = 0, max = 100))]
    pub percentage: u8,
    /// Automatic rollback per destination main relay: when setups first tried on a direct path
    /// to homes behind a relay fail where relayed ones do not.
    #[serde(default)]
    pub auto_rollback: AutoRollback,
    /// Percentages to pass through on the way to `percentage`, as `spec.ech.steps`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20), inner(range(min = 0, max = 100)))]
    pub steps: Vec<u8>,
    /// How long each step is held (and analysed) before the next.
    #[serde(default = "default_step_interval")]
    pub step_interval: Duration,
}

impl Default for DirectPathsRollout {
    fn default() -> Self {
        Self {
            enabled: false,
            percentage: all_percent(),
            auto_rollback: AutoRollback::default(),
            steps: vec![],
            step_interval: default_step_interval(),
        }
    }
}

fn all_percent() -> u8 {
    100
}

/// Trust defaults.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TrustDefaults {
    /// Refuse any peer or home node whose identity is not known, before routing.
    #[serde(default)]
    pub reject_unknown: bool,
    /// Permissions of verified peers that have none of their own.
    #[serde(default)]
    pub default_permissions: Permissions,
}

/// Circuit breaker settings, per peer connection and per service instance.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CircuitBreaker {
    /// Consecutive failures that open the circuit.
    #[serde(default = "default_consecutive")]
    #[schemars(range(min = 1, max = 1000))]
    pub consecutive_failures: u32,
    /// Failure share (0–1) over `window` that opens the circuit.
    #[serde(default = "default_failure_rate")]
    #[schemars(range(min = 0.0, max = 1.0))]
    pub failure_rate: f64,
    /// Window for `failureRate`.
    #[serde(default = "default_cb_window")]
    pub window: Duration,
    /// How long the circuit stays open before half-open probes.
    #[serde(default = "default_open")]
    pub open_duration: Duration,
    /// Probes admitted while half-open.
    #[serde(default = "default_probes")]
    #[schemars(range(min = 1, max = 100))]
    pub half_open_probes: u32,
}

impl Default for CircuitBreaker {
    fn default() -> Self {
        Self {
            consecutive_failures: default_consecutive(),
            failure_rate: default_failure_rate(),
            window: default_cb_window(),
            open_duration: default_open(),
            half_open_probes: default_probes(),
        }
    }
}

fn default_consecutive() -> u32 {
    5
}
fn default_failure_rate() -> f64 {
    0.5
}
fn default_cb_window() -> Duration {
    Duration::from_secs(30)
}
fn default_open() -> Duration {
    Duration::from_secs(30)
}
fn default_probes() -> u32 {
    3
}

/// Retry settings: only for attempts that delivered no payload byte.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, KubeSchema)]
#[x_kube(validation = Rule::new("!has(self.initialBackoff) || !has(self.maxBackoff) || duration(self.initialBackoff) <= duration(self.maxBackoff)").message("initialBackoff must not be longer than maxBackoff").field_path(".initialBackoff"))]
#[serde(rename_all = "camelCase")]
pub struct Retry {
    /// Attempts including the first.
    #[serde(default = "default_attempts")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: u32,
    /// First backoff; doubled per attempt, with full jitter.
    #[serde(default = "default_initial_backoff")]
    pub initial_backoff: Duration,
    /// Backoff ceiling.
    #[serde(default = "default_max_backoff")]
    pub max_backoff: Duration,
}

impl Default for Retry {
    fn default() -> Self {
        Self {
            max_attempts: default_attempts(),
            initial_backoff: default_initial_backoff(),
            max_backoff: default_max_backoff(),
        }
    }
}

fn default_attempts() -> u32 {
    3
}
fn default_initial_backoff() -> Duration {
    Duration::from_millis(100)
}
fn default_max_backoff() -> Duration {
    Duration::from_secs(5)
}

/// Timeouts.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Timeouts {
    /// QUIC connection establishment.
    #[serde(default = "default_connect")]
    pub connect: Duration,
    /// Noise handshake end to end.
    #[serde(default = "default_handshake")]
    pub handshake: Duration,
    /// A stream with no traffic in either direction is closed after this.
    #[serde(default = "default_idle")]
    pub idle: Duration,
    /// Stream setup from accept to first byte forwarded (connect, route, handshake, retries).
    #[serde(default = "default_call")]
    pub call: Duration,
    /// A hop link (home <-> main relay, main <-> main) that hears nothing for this long is
    /// declared dead; keep-alives go every quarter of it. This is how fast a crashed or hung
    /// relay is noticed; too short a value drops links on lossy paths (4 lost keep-alives in
    /// a row). At least 200ms.
    #[serde(default = "default_link_idle")]
    pub link_idle: Duration,
}

impl Default for Timeouts {
    fn default() -> Self {
        Self {
            connect: default_connect(),
            handshake: default_handshake(),
            idle: default_idle(),
            call: default_call(),
            link_idle: default_link_idle(),
        }
    }
}

fn default_connect() -> Duration {
    Duration::from_secs(5)
}
fn default_handshake() -> Duration {
    Duration::from_secs(5)
}
fn default_idle() -> Duration {
    Duration::from_secs(300)
}
fn default_call() -> Duration {
    Duration::from_secs(15)
}
fn default_link_idle() -> Duration {
    Duration::from_secs(1)
}

/// Resilience settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Resilience {
    /// Default per-sender rate limit at relays (a `Peer` may override it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<RateLimit>,
    /// Circuit breakers.
    #[serde(default)]
    pub circuit_breaker: CircuitBreaker,
    /// Retries.
    #[serde(default)]
    pub retry: Retry,
    /// Timeouts.
    #[serde(default)]
    pub timeouts: Timeouts,
}

/// Which workloads and relays a policy applies to; empty means all.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct PolicySelector {
    /// Node ids of relays and home nodes.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = NODE_ID_PATTERN), length(max = 63)))]
    pub node_ids: Vec<String>,
    /// Pod labels of injected workloads.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub match_labels: BTreeMap<String, String>,
}

/// Desired rollout policy.
#[derive(CustomResource, KubeSchema, Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[kube(
    group = "relayfed.io",
    version = "v1alpha1",
    kind = "RolloutPolicy",
    namespaced,
    derive = "PartialEq",
    status = "RolloutPolicyStatus",
    shortname = "rp",
    category = "relayfed",
    doc = "Gradual ECH rollout (mode, percentage, whitelist, automatic rollback), trust defaults and resilience settings.",
    printcolumn(name = "Enabled", type_ = "boolean", json_path = ".spec.ech.enabled"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.ech.mode"),
    printcolumn(name = "Percent", type_ = "integer", json_path = ".spec.ech.percentage"),
    printcolumn(name = "Effective", type_ = "integer", json_path = ".status.effectivePercentage"),
    printcolumn(name = "SuccessRate", type_ = "number", json_path = ".status.observedSuccessRate"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicySpec {
    /// Which workloads and relays this policy applies to.
    #[serde(default)]
    pub selector: PolicySelector,
    /// ECH rollout.
    #[serde(default)]
    pub ech: EchRollout,
    /// Trust defaults.
    #[serde(default)]
    pub trust: TrustDefaults,
    /// Rate limits, circuit breakers, retries, timeouts.
    #[serde(default)]
    pub resilience: Resilience,
    /// How a calling home picks among a service's instances.
    #[serde(default)]
    pub load_balancing: LoadBalancing,
    /// Direct paths between homes through NATs (off by default).
    #[serde(default, skip_serializing_if = "is_default_direct")]
    pub direct_paths: DirectPathsRollout,
}

fn is_default_direct(d: &DirectPathsRollout) -> bool {
    *d == DirectPathsRollout::default()
}

/// An instance-selection algorithm.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub enum LbAlgorithm {
    /// In turn.
    RoundRobin,
    /// Fewest streams in flight.
    LeastConnections,
    /// Uniformly at random.
    Random,
    /// Two random candidates, the one with the lower peak-EWMA latency times streams in flight.
    #[default]
    PeakEwma,
}

/// Load balancing at calling homes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct LoadBalancing {
    /// Algorithm for services without their own.
    #[serde(default)]
    pub algorithm: LbAlgorithm,
    /// Per-service algorithm, by service name.
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub per_service: std::collections::BTreeMap<String, LbAlgorithm>,
    /// Prefer healthy instances behind the caller's own main relay (one relay hop fewer);
    /// off balances over every healthy instance.
    #[serde(default = "yes")]
    pub prefer_local: bool,
}

impl Default for LoadBalancing {
    fn default() -> Self {
        Self { algorithm: LbAlgorithm::default(), per_service: Default::default(), prefer_local: true }
    }
}

fn yes() -> bool {
    true
}

/// Observed state of a rollout.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RolloutPolicyStatus {
    /// Generation and conditions (`RolledBack` is set while a rollback holds the percentage down).
    #[serde(flatten)]
    pub common: CommonStatus,
    /// Percentage in force after automatic rollback (equals spec unless rolled back).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub effective_percentage: Option<u8>,
    /// ECH stream success rate (0–1) over the last evaluation window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_success_rate: Option<f64>,
    /// RFC 3339 time of the last automatic rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollback: Option<String>,
    /// Where the rollout stands: Progressing, Paused, Succeeded or RolledBack.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    /// The percentage in force per destination main relay (where rollback lowered one, it
    /// differs from `effectivePercentage`, the current step).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub effective_by_main: BTreeMap<String, u8>,
    /// The last analysis per destination main relay: verdict and why, with the figures.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<MainAnalysis>,
    /// The direct-path rollout (`spec.directPaths`), while direct paths are on.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_paths: Option<DirectPathsStatus>,
}

/// Observed state of the direct-path rollout (the `DirectPathsRolledBack` condition is set
/// while a rollback holds a relay's percentage down).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectPathsStatus {
    /// Where the rollout stands: Progressing, Paused, Succeeded or RolledBack.
    pub phase: String,
    /// The percentage of the current step.
    pub effective_percentage: u8,
    /// The percentage in force for calls to homes behind each destination main relay.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub effective_by_main: BTreeMap<String, u8>,
    /// Success rate (0–1) of setups first tried on a direct path over the last window.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_success_rate: Option<f64>,
    /// RFC 3339 time of the last automatic rollback.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_rollback: Option<String>,
    /// The last analysis per destination main relay.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub analysis: Vec<DirectAnalysis>,
}

/// The direct-path analysis of one destination main relay over the evaluation window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct DirectAnalysis {
    /// The destination main relay's node id.
    pub main: String,
    /// Pass, Fail or Inconclusive.
    pub verdict: String,
    /// The reason, with the figures.
    pub reason: String,
    /// Setups first tried on a direct path in the window.
    pub direct_attempts: u64,
    /// Their success rate (0–1), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_success_rate: Option<f64>,
    /// Relayed setups in the window.
    pub relayed_attempts: u64,
    /// Their success rate (0–1), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_success_rate: Option<f64>,
    /// Mean setup time on a direct path, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub direct_setup_millis: Option<f64>,
    /// Mean relayed setup time, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relayed_setup_millis: Option<f64>,
}

/// The rollout analysis of one destination main relay over the evaluation window.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MainAnalysis {
    /// The destination main relay's node id.
    pub main: String,
    /// Pass, Fail or Inconclusive.
    pub verdict: String,
    /// The reason, with the figures.
    pub reason: String,
    /// ECH setups in the window.
    pub ech_attempts: u64,
    /// ECH setup success rate (0–1), if any ECH setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_success_rate: Option<f64>,
    /// Plain setups in the window.
    pub plain_attempts: u64,
    /// Plain setup success rate (0–1), if any plain setup.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_success_rate: Option<f64>,
    /// ECH setups that fell back to a plain route header.
    #[serde(default)]
    pub fallbacks: u64,
    /// ECH setups sent again with a newer config after the relay said the one used was stale.
    #[serde(default)]
    pub retries: u64,
    /// Mean ECH setup time, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_setup_millis: Option<f64>,
    /// Mean plain setup time, milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plain_setup_millis: Option<f64>,
}

/// Checks a rollout's steps, step interval and rollback settings under `at`.
fn check_progression(errs: &mut Errors, at: &str, steps: &[u8], interval: Duration, rb: &AutoRollback) {
    if !(0.0..=1.0).contains(&rb.min_success_rate) {
        errs.push(format!("{at}.autoRollback.minSuccessRate"), format!("{} is outside 0..1", rb.min_success_rate));
    }
    for (i, step) in steps.iter().enumerate() {
        if i > 0 && steps[i - 1] >= *step {
            errs.push(format!("{at}.steps[{i}]"), format!("{step} does not rise above the step before it"));
        }
    }
    if !steps.is_empty() && interval.get() < std::time::Duration::from_secs(10) {
        errs.push(format!("{at}.stepInterval"), format!("{interval} is too short: at least 10s"));
    }
    if rb.evaluation_window.get() < std::time::Duration::from_secs(10) {
        errs.push(
            format!("{at}.autoRollback.evaluationWindow"),
            format!("{} is too short: at least 10s", rb.evaluation_window),
        );
    }
}

impl RolloutPolicy {
    /// Semantic checks the schema cannot express.
    pub fn validate(&self) -> Result<(), CrdError> {
        let mut errs = Errors::default();
        let ech = &self.spec.ech;
        let black: BTreeSet<&str> = ech.blacklist.iter().map(String::as_str).collect();
        for (i, id) in ech.whitelist.iter().enumerate() {
            if black.contains(id.as_str()) {
                errs.push(
                    format!("spec.ech.whitelist[{i}]"),
                    format!("{id:?} is also in spec.ech.blacklist; a peer is either forced on or forced off"),
                );
            }
        }
        for (name, list) in [("whitelist", &ech.whitelist), ("blacklist", &ech.blacklist)] {
            let mut seen = BTreeSet::new();
            for (i, id) in list.iter().enumerate() {
                if !seen.insert(id) {
                    errs.push(format!("spec.ech.{name}[{i}]"), format!("duplicate peer id {id:?}"));
                }
            }
        }
        if ech.mode == EchMode::Required && !ech.enabled {
            errs.push(
                "spec.ech.mode",
                "mode required needs enabled: true (otherwise every ECH destination fails closed)",
            );
        }
        check_progression(&mut errs, "spec.ech", &ech.steps, ech.step_interval, &ech.auto_rollback);
        let direct = &self.spec.direct_paths;
        check_progression(&mut errs, "spec.directPaths", &direct.steps, direct.step_interval, &direct.auto_rollback);
        let res = &self.spec.resilience;
        if !(0.0..=1.0).contains(&res.circuit_breaker.failure_rate) {
            errs.push(
                "spec.resilience.circuitBreaker.failureRate",
                format!("{} is outside 0..1", res.circuit_breaker.failure_rate),
            );
        }
        if res.retry.initial_backoff > res.retry.max_backoff {
            errs.push(
                "spec.resilience.retry.initialBackoff",
                format!("{} exceeds maxBackoff {}", res.retry.initial_backoff, res.retry.max_backoff),
            );
        }
        for (name, d) in [
            ("connect", res.timeouts.connect),
            ("handshake", res.timeouts.handshake),
            ("idle", res.timeouts.idle),
            ("call", res.timeouts.call),
        ] {
            if d.get().is_zero() {
                errs.push(format!("spec.resilience.timeouts.{name}"), "must be greater than 0s");
            }
        }
        if res.timeouts.call < res.timeouts.connect {
            errs.push(
                "spec.resilience.timeouts.call",
                format!("{} is shorter than timeouts.connect {}", res.timeouts.call, res.timeouts.connect),
            );
        }
        for key in self.spec.selector.match_labels.keys() {
            if key.is_empty() || key.len() > 317 {
                errs.push(format!("spec.selector.matchLabels[{key:?}]"), "label keys are 1-317 characters");
            }
        }
        errs.into_result("RolloutPolicy", &crate::name_of(&self.metadata))
    }
}
