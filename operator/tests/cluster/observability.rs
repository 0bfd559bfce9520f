//! The Control plane dashboard's operator-only panels (reconciles, reconcile latency, webhook
//! admissions, certificates issued) against a real Prometheus (Debian's) scraping a real
//! operator and injection webhook on the real API server, with the `role="operator"` label
//! the chart's ServiceMonitor sets. The local-mode observability test proves every other
//! panel; these four have no data there.

use std::time::{Duration, SystemTime};

use relayfed_operator::local::prometheus::Prometheus;
use serde_json::json;

use crate::injection::{Injector, create_pod};
use crate::support::{Namespace, eventually, examples_in, operated, plane};

/// The panels only an operator in a cluster feeds.
const OPERATOR_PANELS: &[&str] =
    &["Reconciles by kind and result", "Reconcile latency", "Webhook admissions", "Certificates issued"];

/// How many series `expr` (variables at "All") returns over the last two minutes.
async fn series(prometheus: std::net::SocketAddr, expr: &str) -> Option<usize> {
    let expr = expr.replace("$federation", ".*").replace("$node", ".*").replace("$__rate_interval", "20s");
    let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).ok()?.as_secs_f64();
    relayfed_e2e::procs::prometheus_series(prometheus, &expr, now - 120.0).await.ok()
}

#[tokio::test]
async fn the_operator_panels_have_data_from_a_real_operator_and_webhook() {
    let setup = operated("obs").await;
    let (ns, op) = (&setup.ns, &setup.op);
    let injector = Injector::install(&ns.name, &ns.name);
    let dir = plane().dir.join(format!("prometheus-{}", ns.name));
    eprintln!("observability: {}", relayfed_e2e::procs::prometheus_version());
    let prometheus = Prometheus::start(&dir, "acme").expect("prometheus on PATH (make test builds Prometheus 3)");
    prometheus
        .set_targets(&[
            ("operator".into(), "operator", format!("127.0.0.1:{}", op.admin_port)),
            ("injector".into(), "operator", format!("127.0.0.1:{}", injector.admin)),
        ])
        .unwrap();

    // Reconciles and certificates: the example federation; admissions: an injected pod.
    let examples = examples_in("federation", &ns.name);
    let out = plane().kubectl(&["apply", "-f", &examples.display().to_string()]).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let injected = Namespace::create("obs-pods", &[]);
    let out = create_pod(&injected.name, "opted-in", json!({"relayfed.io/inject": "enabled"}));
    assert!(out.ok, "{}", out.stderr);

    let address: std::net::SocketAddr = prometheus.url.trim_start_matches("http://").parse().unwrap();
    let dashboard = relayfed_dashboards::dashboards::control_plane();
    let queries: Vec<(String, String)> =
        dashboard.queries().into_iter().filter(|(title, _)| OPERATOR_PANELS.contains(&title.as_str())).collect();
    assert_eq!(
        OPERATOR_PANELS.iter().filter(|p| queries.iter().any(|(t, _)| t == *p)).count(),
        OPERATOR_PANELS.len(),
        "a panel of {OPERATOR_PANELS:?} is gone from the Control plane dashboard"
    );
    for (title, expr) in &queries {
        eventually(&format!("samples for panel {title:?}: {expr}"), Duration::from_secs(90), || async {
            series(address, expr).await.filter(|n| *n > 0)
        })
        .await;
    }
    // A misspelt metric returns nothing: the check above is not vacuous.
    assert_eq!(series(address, "rate(relayfed_operator_reconcile_totals[20s])").await, Some(0));
}
