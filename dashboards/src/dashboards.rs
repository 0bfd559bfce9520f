//! The five dashboards. Every query filters on the `federation` and `node` variables; the
//! scrape configuration attaches `federation`, `node` and `role` (main, home, operator) to
//! every target (docs/operations.md "Dashboards and alerts").

use crate::model::{Dashboard, Kind, Panel, Row, panel, quantiles, rate, sel};

fn row(title: &str, panels: Vec<Panel>) -> Row {
    Row { title: title.to_owned(), panels }
}

fn owned(q: &[(String, String)]) -> Vec<(&str, &str)> {
    q.iter().map(|(e, l)| (e.as_str(), l.as_str())).collect()
}

/// Calls, success, latency and errors across the federation.
pub fn overview() -> Dashboard {
    let origin = r#"side="origin""#;
    let success = format!(
        "sum({}) / sum({})",
        rate("relayfed_proxy_calls_total", r#"side="origin",code="OK""#),
        rate("relayfed_proxy_calls_total", origin)
    );
    let calls = format!("sum by (node) ({})", rate("relayfed_proxy_calls_total", origin));
    let errors = format!("sum by (code) ({})", rate("relayfed_proxy_stream_errors_total", ""));
    let relays_up = format!("sum(up{})", sel(r#"role="main""#));
    let homes = format!("count(relayfed_proxy_uplink_active{} == 1)", sel(""));
    let versions = format!("max by (node) (relayfed_transport_config_version{})", sel(""));
    let per_service = format!("sum by (service) ({})", rate("relayfed_proxy_lb_picks_total", ""));
    let pair = "service, source_main, destination_main";
    // The relay pair selected with the source and destination variables.
    let calls_from = |extra: &str| {
        rate(
            "relayfed_proxy_calls_total",
            &format!(r#"side="origin",source_main=~"$source",destination_main=~"$destination"{extra}"#),
        )
    };
    let pair_success =
        format!("sum by ({pair}) ({}) / sum by ({pair}) ({})", calls_from(r#",code="OK""#), calls_from(""));
    let pair_calls = format!("sum by ({pair}) ({})", calls_from(""));
    let pair_errors = format!("sum by (service, destination_main, code) ({})", calls_from(r#",code!="OK""#));
    let pair_p99 = format!(
        "histogram_quantile(0.99, sum by (le, service, destination_main) ({}))",
        rate("relayfed_proxy_call_setup_duration_seconds_bucket", r#"destination_main=~"$destination""#)
    );
    let pair_legend = "{{service}} {{source_main}} -> {{destination_main}}";
    Dashboard {
        uid: "relayfed-overview",
        title: "relayfed / Overview",
        description: "Calls between homes of the federation: success, rate, setup latency, errors; relays and homes up.",
        node_metric: "relayfed_transport_config_version",
        variables: &[
            ("source", "Source main relay", "relayfed_proxy_calls_total", "source_main"),
            ("destination", "Destination main relay", "relayfed_proxy_calls_total", "destination_main"),
        ],
        rows: vec![
            row(
                "Calls",
                vec![
                    panel(
                        Kind::Stat,
                        "Success rate",
                        "percentunit",
                        "Calls that ended cleanly (code OK), over all calls the selected homes made.",
                        &[(&success, "success")],
                    ),
                    panel(
                        Kind::Stat,
                        "Main relays up",
                        "short",
                        "Main relays whose admin port answers scrapes.",
                        &[(&relays_up, "up")],
                    ),
                    panel(
                        Kind::Stat,
                        "Homes connected",
                        "short",
                        "Homes with an active main relay link.",
                        &[(&homes, "homes")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Calls per second by caller",
                        "reqps",
                        "Calls per second, by calling home.",
                        &[(&calls, "{{node}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Calls per second by service",
                        "reqps",
                        "Load-balancer picks per second, by service called.",
                        &[(&per_service, "{{service}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Call setup latency by service",
                        "s",
                        "p50, p95 and p99 from accepting the app's connection to an established end-to-end session, at the caller, per service.",
                        &owned(&quantiles("relayfed_proxy_call_setup_duration_seconds", "", "service")),
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Errors by code",
                        "reqps",
                        "Stream failures per second by structured error code (docs/operations.md \"Error codes\").",
                        &[(&errors, "{{code}}")],
                    ),
                ],
            ),
            row(
                "Service level, per service and relay pair",
                vec![
                    panel(
                        Kind::TimeSeries,
                        "Success rate by service and relay pair",
                        "percentunit",
                        "Finished calls that ended cleanly, at the callers, by service, the caller's main relay and the serving home's main relay.",
                        &[(&pair_success, pair_legend)],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Calls per second by service and relay pair",
                        "reqps",
                        "Finished calls per second at the callers, by service and relay pair.",
                        &[(&pair_calls, pair_legend)],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Failed calls by service, destination relay and code",
                        "reqps",
                        "Calls that failed, at the callers, by service, the serving home's main relay (`none`: not resolved) and error code.",
                        &[(&pair_errors, "{{service}} -> {{destination_main}} {{code}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Call setup p99 by service and destination relay",
                        "s",
                        "99th percentile of successful calls' setup time at the callers.",
                        &[(&pair_p99, "{{service}} -> {{destination_main}}")],
                    ),
                ],
            ),
            row(
                "Configuration",
                vec![panel(
                    Kind::TimeSeries,
                    "Config version in force",
                    "short",
                    "The snapshot version each node applied; a node behind the others has not received or accepted the latest.",
                    &[(&versions, "{{node}}")],
                )],
            ),
        ],
    }
}

/// One main relay at a time: peers, homes, streams, registry.
pub fn relay() -> Dashboard {
    let m = r#"role="main""#;
    let q = |metric: &str, by: &str| format!("sum by ({by}) ({})", rate(metric, m));
    Dashboard {
        uid: "relayfed-relay",
        title: "relayfed / Relay",
        description: "Per main relay: peerings, homes, relayed streams and bytes, handshakes, registry and propagation.",
        node_metric: "relayfed_relay_registry_entries",
        variables: &[],
        rows: vec![
            row(
                "Peerings and homes",
                vec![
                    panel(
                        Kind::TimeSeries,
                        "Peers up",
                        "short",
                        "1 while the peering with each other main relay is up.",
                        &[(&format!("max by (node, peer) (relayfed_relay_peer_up{})", sel(m)), "{{node}} -> {{peer}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Peer RTT",
                        "s",
                        "Smoothed QUIC round-trip time from each main relay to each peer it is connected to.",
                        &[(
                            &format!("max by (node, peer) (relayfed_relay_peer_rtt_seconds{})", sel(m)),
                            "{{node}} -> {{peer}}",
                        )],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Open hop connections",
                        "short",
                        "QUIC connections from homes and peers.",
                        &[(&format!("sum by (node) (relayfed_transport_hop_connections_open{})", sel(m)), "{{node}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Hop handshakes by result",
                        "reqps",
                        "QUIC/TLS handshakes per second, by role and result.",
                        &[(&q("relayfed_transport_hop_handshakes_total", "role, result"), "{{role}} {{result}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Reconnects",
                        "reqps",
                        "Re-established peerings per second.",
                        &[(&q("relayfed_relay_peer_reconnects_total", "node"), "{{node}}")],
                    ),
                ],
            ),
            row(
                "Traffic",
                vec![
                    panel(
                        Kind::TimeSeries,
                        "Relayed streams by result",
                        "reqps",
                        "Streams per second through the relay; error when either side's copy failed.",
                        &[(&q("relayfed_relay_streams_total", "node, result"), "{{node}} {{result}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Relayed bytes",
                        "Bps",
                        "Payload bytes per second through the relay, both directions.",
                        &[(&q("relayfed_relay_payload_bytes_total", "node"), "{{node}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Routing decisions",
                        "reqps",
                        "Routes per second by result (local, forwarded, no_route, ...).",
                        &[(&q("relayfed_relay_routes_total", "result"), "{{result}}")],
                    ),
                ],
            ),
            row(
                "Registry",
                vec![
                    panel(
                        Kind::TimeSeries,
                        "Registry entries by kind",
                        "short",
                        "Local (own homes) and federated (learned from peers) entries.",
                        &[(
                            &format!("sum by (node, kind) (relayfed_relay_registry_entries{})", sel(m)),
                            "{{node}} {{kind}}",
                        )],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Propagation events",
                        "reqps",
                        "Deltas, refreshes, withdrawals and expiries per second.",
                        &[(&q("relayfed_relay_registry_propagation_total", "event"), "{{event}}")],
                    ),
                ],
            ),
            row(
                "Process",
                vec![
                    panel(
                        Kind::TimeSeries,
                        "CPU",
                        "short",
                        "CPU cores used by each main relay process.",
                        &[(&q("process_cpu_seconds_total", "node"), "{{node}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Memory",
                        "bytes",
                        "Resident memory of each main relay process.",
                        &[(&format!("max by (node) (process_resident_memory_bytes{})", sel(m)), "{{node}}")],
                    ),
                    panel(
                        Kind::TimeSeries,
                        "Open file descriptors",
                        "short",
                        "Open file descriptors of each main relay process, against its limit.",
                        &[
                            (&format!("max by (node) (process_open_fds{})", sel(m)), "{{node}}"),
                            (&format!("max by (node) (process_max_fds{})", sel(m)), "{{node}} limit"),
                        ],
                    ),
                ],
            ),
        ],
    }
}

/// The ECH rollout: how much is sealed, and what goes wrong.
pub fn ech() -> Dashboard {
    let sealed = format!(
        "sum({}) / sum({})",
        rate("relayfed_proxy_ech_streams_total", r#"outcome="accepted""#),
        rate("relayfed_proxy_calls_total", r#"side="origin""#)
    );
    let outcomes = format!("sum by (outcome) ({})", rate("relayfed_proxy_ech_streams_total", ""));
    let relay_outcomes = format!("sum by (outcome) ({})", rate("relayfed_relay_ech_streams_total", ""));
    let anonymity = format!("min by (node) (relayfed_relay_ech_anonymity_set_services{})", sel(r#"role="main""#));
    let headers = format!("sum by (node, envelope) ({})", rate("relayfed_relay_route_headers_total", ""));
    let signed = format!("sum by (result) ({})", rate("relayfed_proxy_ech_signed_configs_total", ""));
    let o = r#"role="operator""#;
    let configured = format!("max(relayfed_operator_rollout_configured_percent{})", sel(o));
    let step = format!("max(relayfed_operator_rollout_step_percent{})", sel(o));
    let effective = format!("max by (main) (relayfed_operator_rollout_effective_percent{})", sel(o));
    let transitions = format!("sum by (kind) ({})", rate("relayfed_operator_rollout_transitions_total", o));
    let verdicts = format!("sum by (result) ({})", rate("relayfed_operator_rollout_analysis_total", o));
    Dashboard {
        uid: "relayfed-ech",
        title: "relayfed / ECH rollout",
        description: "Sealed share of streams, ECH outcomes, setup latency with and without ECH, anonymity sets.",
        node_metric: "relayfed_transport_config_version",
        variables: &[],
        rows: vec![row(
            "ECH",
            vec![
                panel(
                    Kind::TimeSeries,
                    "Configured vs effective percentage",
                    "percent",
                    "The RolloutPolicy's percentage, the current step's, and the percentage in force toward each main relay (lower where automatic rollback acted).",
                    &[(&configured, "configured"), (&step, "step"), (&effective, "effective {{main}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Rollout transitions and verdicts",
                    "reqps",
                    "Rollbacks, would-be rollbacks (dry run), advances and re-arms, and the analysis verdicts (pass, fail, inconclusive) per second.",
                    &[(&transitions, "{{kind}}"), (&verdicts, "verdict {{result}}")],
                ),
                panel(
                    Kind::Stat,
                    "Sealed share",
                    "percentunit",
                    "Calls whose route was sealed and accepted, over all calls the selected homes made: the effective rollout percentage.",
                    &[(&sealed, "sealed")],
                ),
                panel(
                    Kind::TimeSeries,
                    "ECH outcomes",
                    "reqps",
                    "At calling homes: attempted, accepted, retried, fallback, failed, downgrade, retry_refused, grease per second; at main relays: opened, retry_sent, decrypt_failed.",
                    &[(&outcomes, "home {{outcome}}"), (&relay_outcomes, "relay {{outcome}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Setup latency, ECH vs plain",
                    "s",
                    "Call setup quantiles with (ech=true) and without ECH.",
                    &owned(&quantiles("relayfed_proxy_call_setup_duration_seconds", "", "ech")),
                ),
                panel(
                    Kind::TimeSeries,
                    "Route headers seen by relays",
                    "reqps",
                    "Route headers each main relay received per second by envelope: plain and grease ones it can read, sealed ones it cannot (only the key owner opens them). At 100% ECH only sealed grows.",
                    &[(&headers, "{{node}} {{envelope}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Other clusters' signed ECH configs",
                    "reqps",
                    "CA-signed ECH configs of another cluster's main relays checked by homes, by result; any invalid means a relay offered a config the federation CA did not sign.",
                    &[(&signed, "{{result}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Anonymity set per main relay",
                    "short",
                    "Distinct services hosted behind each main relay: what a sealed stream to it could be for (warn below 3).",
                    &[(&anonymity, "{{node}}")],
                ),
            ],
        )],
    }
}

/// Rate limits, breakers, retries, trust.
pub fn resilience() -> Dashboard {
    let by = |metric: &str, labels: &str| format!("sum by ({labels}) ({})", rate(metric, ""));
    let open = format!("count by (node) (relayfed_proxy_circuit_state{} == 1)", sel(""));
    let peers = format!("max by (node, peer) (relayfed_relay_circuit_state{})", sel(r#"role="main""#));
    let timeout = r#"code="TIMEOUT""#;
    let timeouts = format!("sum by (node) ({})", rate("relayfed_proxy_stream_errors_total", timeout));
    let relay_timeouts = format!("sum by (node) ({})", rate("relayfed_relay_stream_errors_total", timeout));
    let paths = format!("sum by (kind) (relayfed_proxy_paths{})", sel(""));
    Dashboard {
        uid: "relayfed-resilience",
        title: "relayfed / Resilience",
        description: "Rate-limited streams, circuit breakers, retries, timeouts, relay switches, trust denials and direct paths between homes.",
        node_metric: "relayfed_transport_config_version",
        variables: &[],
        rows: vec![row(
            "Resilience",
            vec![
                panel(
                    Kind::TimeSeries,
                    "Rate-limited streams",
                    "reqps",
                    "Streams refused with RATE_LIMITED per second, by relay and kind of sender (the senders: the relay's /federation/health).",
                    &[(
                        &by("relayfed_relay_rate_limited_streams_total", "node, sender_kind"),
                        "{{node}} {{sender_kind}}",
                    )],
                ),
                panel(
                    Kind::TimeSeries,
                    "Open circuit breakers",
                    "short",
                    "Service instances whose breaker is open, by calling home.",
                    &[(&open, "{{node}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Peer circuit breakers",
                    "short",
                    "Each main relay's breaker toward each peer main relay: 0 closed, 1 open, 2 half-open.",
                    &[(&peers, "{{node}} -> {{peer}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Retries by cause",
                    "reqps",
                    "Stream setups retried on another instance or link, by the code that caused it.",
                    &[(&by("relayfed_proxy_stream_retries_total", "code"), "{{code}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Timeouts",
                    "reqps",
                    "Streams failed with TIMEOUT per second, at homes and at main relays.",
                    &[(&timeouts, "{{node}}"), (&relay_timeouts, "{{node}} (relay)")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Relay switches",
                    "reqps",
                    "Changes of a home's active main relay, by reason (lost, failback).",
                    &[(&by("relayfed_proxy_relay_switches_total", "reason"), "{{reason}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Trust denials by rule",
                    "reqps",
                    "Peers, homes, calls or exports refused, by rule.",
                    &[(&by("relayfed_relay_trust_denials_total", "rule"), "{{rule}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Paths to other homes",
                    "short",
                    "Homes' paths to the homes they call or are asked by, by kind (direct, relayed); all relayed unless the RolloutPolicy turns directPaths on.",
                    &[(&paths, "{{kind}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Direct-path attempts",
                    "reqps",
                    "Direct-path attempts at homes by result (direct, no_address, refused, timeout), and port sweeps started by half (sockets, ports) where plain probes went unanswered; timeouts are NATs that do not allow it (both symmetric).",
                    &[
                        (&by("relayfed_proxy_punches_total", "result"), "{{result}}"),
                        (&by("relayfed_proxy_port_sweeps_total", "half"), "sweep: {{half}}"),
                    ],
                ),
                panel(
                    Kind::TimeSeries,
                    "Direct-path rollout",
                    "reqps",
                    "The direct-path rollout's transitions (rolled_back: direct setups toward a main relay's homes failed where relayed ones did not; advanced, rearmed) and analysis verdicts per second; the percentage in force per relay is relayfed_operator_direct_paths_effective_percent and the RolloutPolicy's status.directPaths.",
                    &[
                        (
                            &format!(
                                "sum by (kind) ({})",
                                rate("relayfed_operator_direct_paths_transitions_total", r#"role="operator""#)
                            ),
                            "{{kind}}",
                        ),
                        (
                            &format!(
                                "sum by (result) ({})",
                                rate("relayfed_operator_direct_paths_analysis_total", r#"role="operator""#)
                            ),
                            "verdict {{result}}",
                        ),
                    ],
                ),
            ],
        )],
    }
}

/// The operator (or the local-mode supervisor).
pub fn control_plane() -> Dashboard {
    let o = r#"role="operator""#;
    let by = |metric: &str, labels: &str| format!("sum by ({labels}) ({})", rate(metric, o));
    let behind = format!(
        "max by (node) (relayfed_operator_config_published_version{s}) - max by (node) (relayfed_operator_config_acknowledged_version{s})",
        s = sel(o)
    );
    Dashboard {
        uid: "relayfed-control-plane",
        title: "relayfed / Control plane",
        description: "Reconciles, admissions, certificates, config distribution and acknowledgements.",
        node_metric: "relayfed_operator_config_published_version",
        variables: &[],
        rows: vec![row(
            "Operator",
            vec![
                panel(
                    Kind::TimeSeries,
                    "Reconciles by kind and result",
                    "reqps",
                    "Reconciles per second.",
                    &[(&by("relayfed_operator_reconciles_total", "kind, result"), "{{kind}} {{result}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Reconcile latency",
                    "s",
                    "Reconcile duration quantiles.",
                    &owned(&quantiles("relayfed_operator_reconcile_duration_seconds", o, "")),
                ),
                panel(
                    Kind::TimeSeries,
                    "Webhook admissions",
                    "reqps",
                    "Pod admissions by result (injected, skipped, error).",
                    &[(&by("relayfed_operator_webhook_admissions_total", "result"), "{{result}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Certificates issued",
                    "reqps",
                    "Certificates issued per second, by kind.",
                    &[(&by("relayfed_operator_certificates_issued_total", "kind"), "{{kind}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Distribution subscribers",
                    "short",
                    "Nodes connected to the config distribution server.",
                    &[(&format!("sum(relayfed_operator_config_subscribers{})", sel(o)), "subscribers")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Publish-to-acknowledge latency",
                    "s",
                    "From publishing a version to a node acknowledging it.",
                    &owned(&quantiles("relayfed_operator_config_ack_latency_seconds", o, "")),
                ),
                panel(
                    Kind::TimeSeries,
                    "Versions not yet acknowledged",
                    "short",
                    "Published minus acknowledged config version, per node.",
                    &[(&behind, "{{node}}")],
                ),
                panel(
                    Kind::TimeSeries,
                    "Config changes",
                    "reqps",
                    "Config sources (CR updates, files) by result.",
                    &[(&by("relayfed_operator_config_changes_total", "result"), "{{result}}")],
                ),
            ],
        )],
    }
}

/// Every dashboard, with its file name.
pub fn all() -> Vec<(&'static str, Dashboard)> {
    vec![
        ("relayfed-overview.json", overview()),
        ("relayfed-relay.json", relay()),
        ("relayfed-ech.json", ech()),
        ("relayfed-resilience.json", resilience()),
        ("relayfed-control-plane.json", control_plane()),
    ]
}
