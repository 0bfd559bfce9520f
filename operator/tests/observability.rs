//! The dashboards and alerts against a real Prometheus (Debian's, started by `relayfed local
//! up --prometheus`) scraping a real local federation under mixed traffic the test drives:
//! successful calls with ECH at 50%, a broken instance whose breakers open, calls a relay's
//! permissions refuse, a burst over the rate limit, an accepted policy edit and a main relay
//! killed (-9) and restarted. Every query of every panel and every alert expression (its
//! left-hand side, without the threshold) must return samples over the run; a panel whose
//! query returns nothing fails the test with its title.
//!
//! The operator's own series (reconciles, webhook admissions, certificates issued) exist only
//! in a cluster: the four panels over them are listed in [`CLUSTER_ONLY`] and checked to
//! exist here; `tests/cluster/observability.rs` proves they have data from a real operator.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "chaos/scenario.rs"]
#[allow(dead_code)]
mod scenario;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use relayfed_e2e::procs::{eventually, round_trip};
use serde_json::Value;

/// Panels over series only the operator in a cluster exports.
const CLUSTER_ONLY: &[&str] =
    &["Reconciles by kind and result", "Reconcile latency", "Webhook admissions", "Certificates issued"];

fn bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_relayfed"));
    relayfed_e2e::procs::proxy_next_to(&bin);
    bin
}

fn policy(ech: u8) -> String {
    scenario::policy_yaml(
        ech,
        "  resilience:
    rateLimit: {streamsPerSecond: 10, burst: 10}
    circuitBreaker: {consecutiveFailures: 3, failureRate: 0.5, window: 30s, openDuration: 20s, halfOpenProbes: 1}
  loadBalancing: {algorithm: roundRobin, preferLocal: false}
",
    )
}

fn local(args: &[&str], state: &Path) -> Value {
    let out =
        std::process::Command::new(bin()).args(["local"]).args(args).arg("--state-dir").arg(state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

fn node(status: &Value, id: &str) -> Value {
    status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == id).cloned().unwrap_or(Value::Null)
}

/// Samples of `expr` between `from` and now: how many series.
async fn series(prometheus: std::net::SocketAddr, expr: &str, from: f64) -> Result<usize, String> {
    relayfed_e2e::procs::prometheus_series(prometheus, expr, from).await
}

/// A panel query as Grafana would send it with every variable at "All".
fn substitute(expr: &str) -> String {
    ["$federation", "$node", "$source", "$destination"]
        .iter()
        .fold(expr.to_owned(), |e, v| e.replace(v, ".*"))
        .replace("$__rate_interval", "20s")
}

/// An alert expression without its final threshold comparison (`== 0`, `> 0.05`, ...).
fn left_side(expr: &str) -> String {
    let (mut depth, mut quoted, mut cut) = (0i32, false, expr.len());
    let bytes = expr.as_bytes();
    for (i, &b) in bytes.iter().enumerate() {
        match b {
            b'"' => quoted = !quoted,
            b'(' | b'{' | b'[' if !quoted => depth += 1,
            b')' | b'}' | b']' if !quoted => depth -= 1,
            b'=' | b'>' | b'<' | b'!' if !quoted && depth == 0 && bytes.get(i + 1).is_some_and(|n| *n != b'~') => {
                cut = i;
                break;
            }
            _ => {}
        }
    }
    expr[..cut].trim().to_owned()
}

#[test]
fn the_left_side_of_an_alert_drops_only_the_threshold() {
    assert_eq!(left_side(r#"up{role="main"} == 0"#), r#"up{role="main"}"#);
    assert_eq!(left_side(r#"sum(rate(x{a=~"b|c"}[5m])) / sum(y) > 0.05"#), r#"sum(rate(x{a=~"b|c"}[5m])) / sum(y)"#);
    assert_eq!(left_side("min(a) - time() < 3 * 86400"), "min(a) - time()");
}

async fn call(addr: std::net::SocketAddr) -> bool {
    matches!(tokio::time::timeout(Duration::from_secs(5), round_trip(addr, b"obs")).await, Ok(Ok(b)) if b == b"obs")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_panel_and_alert_query_returns_samples_from_a_live_federation() {
    eprintln!("observability: {}", relayfed_e2e::procs::prometheus_version());
    let dir = scenario::work_dir("observability");
    std::fs::write(dir.join("manifests/50-policy.yaml"), policy(50)).unwrap();
    let state = dir.join("state");
    let (mut child, ready) = scenario::local_up(&bin(), &dir, &["--prometheus"]).await;
    let prometheus: std::net::SocketAddr = ready["prometheus"]
        .as_str()
        .expect("the ready line names Prometheus")
        .trim_start_matches("http://")
        .parse()
        .unwrap();
    let status = local(&["status", "--json"], &state);
    let import = |caller: &str| -> std::net::SocketAddr {
        let n = node(&status, caller);
        n["imports"].as_array().unwrap()[0]["listen"].as_str().unwrap().parse().unwrap()
    };
    let (c1, c2) = (import("c1"), import("c2"));
    let from = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs_f64();
    eventually("c1 is served", Duration::from_secs(60), || call(c1)).await;
    // Every node, and the supervisor, is a target with its labels.
    let targets = status["nodes"].as_array().unwrap().len() + 1;
    eventually("Prometheus scrapes every node and the supervisor", Duration::from_secs(60), || async {
        series(prometheus, r#"up{federation="obs"} == 1"#, from).await.is_ok_and(|n| n == targets)
    })
    .await;

    // Mixed traffic for 30 s.
    let started = Instant::now();
    let (mut ok, mut failed, mut burst_done, mut edited, mut killed) = (0, 0, false, false, false);
    while started.elapsed() < Duration::from_secs(30) {
        for addr in [c1, c2] {
            if call(addr).await { ok += 1 } else { failed += 1 }
        }
        let t = started.elapsed();
        if t > Duration::from_secs(5) && !burst_done {
            // Over the rate limit (10/s, burst 10): 80 at once from c1.
            let burst: Vec<_> = (0..80).map(|_| tokio::spawn(call(c1))).collect();
            for b in burst {
                let _ = b.await;
            }
            burst_done = true;
        }
        if t > Duration::from_secs(10) && !edited {
            std::fs::write(dir.join("manifests/50-policy.yaml"), policy(60)).unwrap();
            edited = true;
        }
        if t > Duration::from_secs(15) && !killed {
            let pid = node(&local(&["status", "--json"], &state), "m2")["pid"].as_u64().unwrap();
            std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
            killed = true;
        }
        // Pacing of the load (about 10 calls a second), not a synchronisation.
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("observability: {ok} calls ok, {failed} failed");
    assert!(ok > 100, "the federation served calls: {ok} ok, {failed} failed");
    // The last scrapes land (2 s interval) before the queries.
    eventually("a scrape after the load", Duration::from_secs(20), || async {
        series(prometheus, r#"relayfed_operator_config_changes_total{result="accepted"} > 0"#, from)
            .await
            .is_ok_and(|n| n > 0)
    })
    .await;

    let mut empty = Vec::new();
    for (name, d) in relayfed_dashboards::dashboards::all() {
        for (title, expr) in d.queries() {
            let n = series(prometheus, &substitute(&expr), from).await.unwrap();
            if n == 0 && !CLUSTER_ONLY.contains(&title.as_str()) {
                empty.push(format!("{name}: {title}: {expr}"));
            }
        }
    }
    for rule in relayfed_dashboards::alerts::rules().groups.into_iter().flat_map(|g| g.rules) {
        let lhs = left_side(&rule.expr);
        if series(prometheus, &lhs, from).await.unwrap() == 0 {
            empty.push(format!("alert {}: {lhs}", rule.alert));
        }
    }
    assert!(empty.is_empty(), "queries without samples:\n{}", empty.join("\n"));
    // A misspelt metric is caught: the check is not vacuous.
    assert_eq!(
        series(prometheus, &substitute(r#"sum(rate(relayfed_stream_total{node=~"$node"}[$__rate_interval]))"#), from)
            .await
            .unwrap(),
        0
    );
    let all_titles: Vec<String> =
        relayfed_dashboards::dashboards::all().iter().flat_map(|(_, d)| d.queries()).map(|(t, _)| t).collect();
    for t in CLUSTER_ONLY {
        assert!(all_titles.iter().any(|x| x == t), "CLUSTER_ONLY names a panel that does not exist: {t}");
    }
    local(&["down"], &state);
    let _ = child.wait().await;
    let _ = std::fs::remove_dir_all(&dir);
}
