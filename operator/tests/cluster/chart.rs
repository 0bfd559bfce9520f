//! The chart installed and upgraded with the real helm CLI: the webhook's serving certificate
//! and CA survive `helm upgrade` with changed values (no caBundle rotation, no GitOps diff),
//! and `helm uninstall` removes the cluster-scoped webhook configuration. kwok runs the pods,
//! so `--wait` here proves scheduling, not that the containers would start.

use crate::support::{Namespace, plane, repo, serial};

fn ca_bundle(release: &str) -> String {
    let out = plane()
        .kubectl(&[
            "get",
            "mutatingwebhookconfiguration",
            &format!("{release}-injector"),
            "-o",
            "jsonpath={.webhooks[0].clientConfig.caBundle}",
        ])
        .unwrap();
    assert!(out.ok, "{}", out.stderr);
    out.stdout
}

fn tls_secret(ns: &str, release: &str) -> String {
    let out = plane()
        .kubectl(&["get", "secret", "-n", ns, &format!("{release}-injector-tls"), "-o", "jsonpath={.data}"])
        .unwrap();
    assert!(out.ok, "{}", out.stderr);
    out.stdout
}

#[tokio::test]
async fn helm_upgrade_keeps_the_webhook_certificate_and_uninstall_removes_the_webhook() {
    let _serial = serial().await;
    let ns = Namespace::create("chart", &[]);
    let release = ns.name.clone();
    let chart = repo().join("charts/relayfed").display().to_string();
    // URL mode at a closed port: nothing in this test asks for injection.
    let url = "injection.webhook.url=https://127.0.0.1:9";
    let out = plane()
        .helm(&["install", &release, &chart, "-n", &ns.name, "--set", url, "--wait", "--timeout", "120s"])
        .unwrap();
    assert!(out.ok, "helm install: {}{}", out.stdout, out.stderr);
    let (ca, secret) = (ca_bundle(&release), tls_secret(&ns.name, &release));
    assert!(!ca.is_empty() && !secret.is_empty());

    let out = plane()
        .helm(&[
            "upgrade",
            &release,
            &chart,
            "-n",
            &ns.name,
            "--set",
            url,
            "--set",
            "injection.webhook.timeoutSeconds=7",
            "--wait",
            "--timeout",
            "120s",
        ])
        .unwrap();
    assert!(out.ok, "helm upgrade: {}{}", out.stdout, out.stderr);
    let timeout = plane()
        .kubectl(&[
            "get",
            "mutatingwebhookconfiguration",
            &format!("{release}-injector"),
            "-o",
            "jsonpath={.webhooks[0].timeoutSeconds}",
        ])
        .unwrap();
    assert_eq!(timeout.stdout, "7", "the upgrade did not apply");
    assert_eq!(ca_bundle(&release), ca, "helm upgrade rotated the webhook CA");
    assert_eq!(tls_secret(&ns.name, &release), secret, "helm upgrade re-issued the serving certificate");

    let out = plane().helm(&["uninstall", &release, "-n", &ns.name, "--wait"]).unwrap();
    assert!(out.ok, "helm uninstall: {}", out.stderr);
    let out = plane().kubectl(&["get", "mutatingwebhookconfiguration", &format!("{release}-injector")]).unwrap();
    assert!(!out.ok && out.stderr.contains("NotFound"), "the webhook configuration outlived the release");
}
