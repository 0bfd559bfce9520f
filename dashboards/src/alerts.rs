//! The alert rules (Prometheus rule groups): each alert names its runbook section in
//! docs/operations.md "Alerts and runbooks".

use serde::Serialize;

/// One alerting rule.
#[derive(Clone, Debug, Serialize)]
pub struct Alert {
    /// Alert name.
    pub alert: &'static str,
    /// PromQL condition.
    pub expr: String,
    /// How long the condition must hold.
    #[serde(rename = "for")]
    pub for_: &'static str,
    /// Labels (severity).
    pub labels: std::collections::BTreeMap<&'static str, &'static str>,
    /// Summary, description and runbook.
    pub annotations: std::collections::BTreeMap<&'static str, String>,
}

/// A rule group.
#[derive(Clone, Debug, Serialize)]
pub struct Group {
    /// Group name.
    pub name: &'static str,
    /// Its rules.
    pub rules: Vec<Alert>,
}

/// A Prometheus rule file.
#[derive(Clone, Debug, Serialize)]
pub struct RuleFile {
    /// Its groups.
    pub groups: Vec<Group>,
}

fn alert(
    name: &'static str,
    expr: &str,
    for_: &'static str,
    severity: &'static str,
    summary: &str,
    anchor: &str,
) -> Alert {
    Alert {
        alert: name,
        expr: expr.to_owned(),
        for_,
        labels: [("severity", severity)].into(),
        annotations: [
            ("summary", summary.to_owned()),
            ("runbook_url", format!("https://github.com/relayfed/relayfed/blob/main/docs/operations.md#{anchor}")),
        ]
        .into(),
    }
}

/// Every alert.
pub fn rules() -> RuleFile {
    RuleFile {
        groups: vec![Group {
            name: "relayfed",
            rules: vec![
                alert(
                    "RelayfedRelayDown",
                    r#"up{role="main"} == 0"#,
                    "2m",
                    "critical",
                    "Main relay {{ $labels.node }} of federation {{ $labels.federation }} is not answering scrapes",
                    "relayfedrelaydown",
                ),
                alert(
                    "RelayfedPeerDown",
                    "max by (federation, node, peer) (relayfed_relay_peer_up) == 0",
                    "2m",
                    "warning",
                    "Main relay {{ $labels.node }} cannot reach its peer {{ $labels.peer }}",
                    "relayfedpeerdown",
                ),
                alert(
                    "RelayfedCallErrorRatioHigh",
                    r#"sum by (federation, node) (rate(relayfed_proxy_calls_total{side="origin",code!="OK"}[5m])) / sum by (federation, node) (rate(relayfed_proxy_calls_total{side="origin"}[5m])) > 0.05"#,
                    "5m",
                    "warning",
                    "More than 5% of calls from {{ $labels.node }} fail",
                    "relayfedcallerrorratiohigh",
                ),
                alert(
                    "RelayfedEchFailureRatioHigh",
                    r#"sum by (federation, node) (rate(relayfed_proxy_ech_streams_total{outcome=~"failed|downgrade|retry_refused"}[5m])) / sum by (federation, node) (rate(relayfed_proxy_ech_streams_total{outcome="attempted"}[5m])) > 0.01"#,
                    "5m",
                    "warning",
                    "More than 1% of ECH attempts from {{ $labels.node }} fail",
                    "relayfedechfailureratiohigh",
                ),
                alert(
                    "RelayfedCircuitOpen",
                    "max by (federation, node, service, destination) (relayfed_proxy_circuit_state) == 1",
                    "5m",
                    "warning",
                    "{{ $labels.node }} has kept its breaker for {{ $labels.service }} on {{ $labels.destination }} open for 5 minutes",
                    "relayfedcircuitopen",
                ),
                alert(
                    "RelayfedConfigNotAcknowledged",
                    "max by (node) (relayfed_operator_config_published_version) > max by (node) (relayfed_operator_config_acknowledged_version)",
                    "5m",
                    "warning",
                    "Node {{ $labels.node }} has not acknowledged the published config for 5 minutes",
                    "relayfedconfignotacknowledged",
                ),
                alert(
                    "RelayfedDirectPathsRolledBack",
                    r#"sum(increase(relayfed_operator_direct_paths_transitions_total{kind="rolled_back"}[15m])) > 0"#,
                    "0m",
                    "warning",
                    "The direct-path rollout lowered its percentage for homes behind a main relay in the last 15 minutes",
                    "relayfeddirectpathsrolledback",
                ),
                alert(
                    "RelayfedCertificateExpiringSoon",
                    "min by (federation, node) (relayfed_transport_certificate_expiry_timestamp_seconds) - time() < 3 * 86400",
                    "1h",
                    "warning",
                    "The certificate of {{ $labels.node }} expires in less than 3 days",
                    "relayfedcertificateexpiringsoon",
                ),
            ],
        }],
    }
}
