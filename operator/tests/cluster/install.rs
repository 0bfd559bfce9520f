//! The user's install sequence with the real helm CLI, as the README gives it: the CRD chart,
//! `relayfed check --pre`, `helm install --wait`, a federation applied and Ready, `relayfed
//! check` passing, `helm test`, `relayfed check` reporting a stopped webhook and a lost leader
//! with their remedies, the injector scaled to 0 blocking only pods that asked for injection,
//! and `helm uninstall` keeping only the CRDs. kwok runs the chart's pods
//! without executing them, so the operator and the webhook run as real processes on loopback
//! under the chart's identities: the operator with the name of one of the chart's operator pods
//! (it labels that pod as the leader), the webhook with the chart's own certificate (URL mode).

use std::time::Duration;

use serde_json::Value;

use crate::support::{
    Namespace, Operator, eventually, eventually_or, examples_in, get_json, plane, repo, serial, serve_webhook,
    write_tls,
};

fn helm(args: &[&str]) -> String {
    let out = plane().helm(args).unwrap();
    if !out.ok {
        let state = plane().kubectl(&["get", "nodes,pods,deploy", "-A", "-o", "wide"]).unwrap().stdout;
        panic!("helm {args:?}: {}{}\n{state}", out.stdout, out.stderr);
    }
    out.stdout
}

/// `relayfed check -o json` as `kubeconfig`: (exit ok, report).
fn check(kubeconfig: &std::path::Path, ns: &str, release: &str, extra: &[&str]) -> (bool, Value) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relayfed"))
        .args(["check", "-o", "json", "--kubeconfig"])
        .arg(kubeconfig)
        .args(["-n", ns, "--release", release])
        .args(extra)
        .env_remove("RUST_BACKTRACE")
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("check printed no JSON ({e}): {}", String::from_utf8_lossy(&out.stderr)));
    assert_eq!(out.status.success(), report["passed"] == true, "the exit status follows the report");
    (out.status.success(), report)
}

fn failures(report: &Value) -> Vec<(String, String)> {
    report["checks"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["status"] == "fail")
        .map(|c| (c["name"].as_str().unwrap().to_owned(), c["remedy"].as_str().unwrap_or_default().to_owned()))
        .collect()
}

#[tokio::test]
async fn a_user_installs_checks_tests_and_uninstalls_relayfed_with_helm() {
    let _serial = serial().await;
    let ns = Namespace::create("install", &[]);
    let (release, n) = (ns.name.clone(), ns.name.as_str());
    let admin = plane().kubeconfig.clone();
    let crds = repo().join("charts/relayfed-crds").display().to_string();
    let chart = repo().join("charts/relayfed").display().to_string();
    // The shared plane applied the CRDs with kubectl; the CRD chart takes them over.
    helm(&["upgrade", "--install", "relayfed-crds", &crds, "-n", n, "--take-ownership", "--wait"]);
    let (ok, report) = check(&admin, n, &release, &["--pre"]);
    assert!(ok, "pre-install checks: {report:#}");

    let port = relayfed_test_cluster::ports::free_port().unwrap();
    let url = format!("injection.webhook.url=https://127.0.0.1:{port}");
    let fed = format!("operator.federation={n}/acme");
    helm(&["install", &release, &chart, "-n", n, "--set", &url, "--set", &fed, "--wait", "--timeout", "180s"]);
    // Every replica of both Deployments is Ready (readiness no longer waits for leadership).
    for d in [format!("{release}-operator"), format!("{release}-injector")] {
        let dep = get_json(n, &["deployment", &d]);
        assert_eq!(dep["status"]["readyReplicas"], dep["spec"]["replicas"], "{d}");
    }

    // The webhook with the installed certificate, the operator as the first operator pod.
    let dir = plane().dir.join(format!("install-{release}"));
    write_tls(&get_json(n, &["secret", &format!("{release}-injector-tls")]), &dir);
    let mut webhook = Some(serve_webhook(port, relayfed_test_cluster::ports::free_port().unwrap(), &dir));
    let pods = get_json(n, &["pods", "-l", "app.kubernetes.io/component=operator"]);
    let leader_pod = pods["items"][0]["metadata"]["name"].as_str().unwrap().to_owned();
    let sa = plane().service_account_kubeconfig(n, &format!("{release}-operator"), 3600).await.unwrap();
    let mut op = Operator::start(&sa, n, &leader_pod, &format!("{n}/acme"));

    let examples = examples_in("federation", n);
    let out = plane().kubectl(&["apply", "-f", &examples.display().to_string()]).unwrap();
    assert!(out.ok, "kubectl apply -f examples/federation/: {}", out.stderr);
    // The leader labels its pod, so the distribution Service has exactly that endpoint.
    eventually("the leader label on the operator pod", Duration::from_secs(60), || async {
        let pod = get_json(n, &["pod", &leader_pod]);
        (pod["metadata"]["labels"]["relayfed.io/leader"] == "true").then_some(())
    })
    .await;
    eventually_or("relayfed check to pass", Duration::from_secs(120), || async {
        match check(&admin, n, &release, &[]) {
            (true, _) => Ok(()),
            (false, report) => Err(format!("{report:#}")),
        }
    })
    .await;
    // The endpoint slice controller follows the label (asynchronously).
    eventually("the distribution Service to select the leader only", Duration::from_secs(60), || async {
        let slices = get_json(n, &["endpointslices", "-l", &format!("kubernetes.io/service-name={release}-operator")]);
        let targets: Vec<String> = slices["items"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|s| s["endpoints"].as_array().into_iter().flatten())
            .filter_map(|e| e["targetRef"]["name"].as_str().map(str::to_owned))
            .collect();
        (targets == [leader_pod.clone()]).then_some(())
    })
    .await;

    // helm test runs the check Job; kwok completes it without executing the container.
    helm(&["test", &release, "-n", n, "--timeout", "120s"]);
    // The check's own ServiceAccount (the chart's read-only ClusterRole) can run every check.
    let check_sa = plane().service_account_kubeconfig(n, &format!("{release}-check"), 600).await.unwrap();
    let (ok, report) = check(&check_sa, n, &release, &[]);
    assert!(ok, "relayfed check as {release}-check: {report:#}");

    // Broken states, each reported with its remedy.
    webhook.take();
    let (ok, report) = check(&admin, n, &release, &[]);
    let fails = failures(&report);
    assert!(!ok && fails.len() == 1 && fails[0].0 == "injection webhook" && !fails[0].1.is_empty(), "{report:#}");
    // With the injector scaled to 0 as well, pods that did not opt in are created; a pod that
    // asked for injection is refused (failurePolicy Fail) rather than started without a proxy.
    let out =
        plane().kubectl(&["scale", "-n", n, "deployment", &format!("{release}-injector"), "--replicas=0"]).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let plain = Namespace::create("install-plain", &[]);
    let pod = |name: &str, inject: &str| {
        serde_json::json!({"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": plain.name, "labels": {"relayfed.io/inject": inject}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]}})
        .to_string()
    };
    let out = plane().kubectl_stdin(&["create", "-f", "-"], &pod("not-opted-in", "unset")).unwrap();
    assert!(out.ok, "a pod outside the injection scope was refused: {}", out.stderr);
    let out = plane().kubectl_stdin(&["create", "-f", "-"], &pod("opted-in", "enabled")).unwrap();
    assert!(!out.ok && out.stderr.contains("pod.inject.relayfed.io"), "{}", out.stderr);
    op.kill();
    eventually("the lost leader to be reported", Duration::from_secs(60), || async {
        let (_, report) = check(&admin, n, &release, &[]);
        failures(&report)
            .iter()
            .any(|(name, remedy)| name == "operator leading" && remedy.contains("logs"))
            .then_some(())
    })
    .await;

    helm(&["uninstall", &release, "-n", n, "--wait"]);
    for kind in ["deployments", "services", "mutatingwebhookconfigurations", "clusterroles"] {
        let out = plane()
            .kubectl(&["get", kind, "-A", "-l", &format!("app.kubernetes.io/instance={release}"), "-o", "name"])
            .unwrap();
        assert!(out.ok && out.stdout.trim().is_empty(), "{kind} outlived the release: {}", out.stdout);
    }
    let out = plane().kubectl(&["get", "crd", "relays.relayfed.io"]).unwrap();
    assert!(out.ok, "the CRDs are kept (helm.sh/resource-policy: keep)");
}

#[tokio::test]
async fn relayfed_check_reports_missing_crds_on_a_fresh_cluster_until_the_crd_chart_is_installed() {
    // Serialised with the other heavy tests: a second plane at once loads 2 cores.
    let _serial = serial().await;
    // A control plane of its own: the shared one has the CRDs.
    let fresh = relayfed_test_cluster::ControlPlane::start(relayfed_test_cluster::Options {
        name: "fresh".into(),
        ..Default::default()
    })
    .unwrap();
    let (ok, report) = check(&fresh.kubeconfig, "relayfed-system", "relayfed", &["--pre"]);
    assert!(!ok);
    let fails = failures(&report);
    assert_eq!(fails.len(), relayfed_operator::check::CRDS.len(), "{report:#}");
    for (name, remedy) in &fails {
        assert!(name.starts_with("CRD ") && remedy.contains("charts/relayfed-crds"), "{name}: {remedy}");
    }
    let crds = repo().join("charts/relayfed-crds").display().to_string();
    let out = fresh.helm(&["install", "relayfed-crds", &crds, "--wait"]).unwrap();
    assert!(out.ok, "{}", out.stderr);
    eventually("the pre-install checks to pass", Duration::from_secs(30), || async {
        let (ok, _) = check(&fresh.kubeconfig, "relayfed-system", "relayfed", &["--pre"]);
        ok.then_some(())
    })
    .await;
    // Post-install checks without the main chart name what is missing, with remedies.
    let (ok, report) = check(&fresh.kubeconfig, "relayfed-system", "relayfed", &[]);
    let fails = failures(&report);
    assert!(!ok && fails.iter().any(|(n, r)| n == "operator deployed" && r.contains("helm install")), "{report:#}");
}
