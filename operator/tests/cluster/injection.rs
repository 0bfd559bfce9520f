//! Injection by the API server itself: the chart's MutatingWebhookConfiguration (URL mode,
//! pointed at `relayfed webhook serve` on loopback, with the chart's own certificate) makes
//! the real kube-apiserver call the webhook for pods the controller-manager creates. Opted-out
//! and non-opted-in pods are untouched; with the webhook stopped, pods outside the injection
//! scope are still created; PodSecurity `baseline` and `restricted` reject the injected init
//! container (NET_ADMIN), which docs/operations.md states.

use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, ListParams};
use relayfed_test_cluster::process::Proc;
use serde_json::{Value, json};

use crate::support::{Namespace, eventually, plane, render_chart_release, serial, serve_webhook, write_tls};

/// The webhook process and the MutatingWebhookConfiguration; both removed on drop, so no other
/// test meets a webhook that is not there.
pub struct Injector {
    child: Option<Proc>,
    mwc: String,
    port: u16,
    /// Its admin port (`/metrics`).
    pub admin: u16,
    files: std::path::PathBuf,
}

impl Injector {
    /// Renders the chart's webhook for `release` in `ns`, starts it and applies its
    /// MutatingWebhookConfiguration.
    pub fn install(release: &str, ns: &str) -> Self {
        let port = relayfed_test_cluster::ports::free_port().unwrap();
        let admin = relayfed_test_cluster::ports::free_port().unwrap();
        let url = format!("https://127.0.0.1:{port}");
        let rendered = render_chart_release(
            release,
            ns,
            &["--set", &format!("injection.webhook.url={url}"), "--show-only", "templates/injection-webhook.yaml"],
        );
        let docs: Vec<Value> = rendered
            .split("\n---")
            .filter_map(|d| serde_saphyr::from_str::<Value>(d).ok())
            .filter(|d| d.is_object())
            .collect();
        let kind = |k: &str| docs.iter().find(|d| d["kind"] == k).unwrap_or_else(|| panic!("no {k} rendered")).clone();
        let secret = kind("Secret");
        let files = plane().dir.join(format!("injector-{release}"));
        write_tls(&secret, &files);
        let config = kind("ConfigMap")["data"]["inject.json"].as_str().unwrap().to_owned();
        std::fs::write(files.join("inject.json"), config).unwrap();
        let mwc = kind("MutatingWebhookConfiguration");
        let mut me =
            Self { child: None, mwc: mwc["metadata"]["name"].as_str().unwrap().to_owned(), port, admin, files };
        me.start();
        let out = plane().kubectl_stdin(&["apply", "-f", "-"], &mwc.to_string()).unwrap();
        assert!(out.ok, "{}", out.stderr);
        me
    }

    fn start(&mut self) {
        self.child = Some(serve_webhook(self.port, self.admin, &self.files));
    }

    fn stop(&mut self) {
        drop(self.child.take());
    }
}

impl Drop for Injector {
    fn drop(&mut self) {
        let _ = plane().kubectl(&["delete", "mutatingwebhookconfiguration", &self.mwc, "--wait=false"]);
        self.stop();
    }
}

pub fn pod(name: &str, labels: Value) -> String {
    json!({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "labels": labels},
           "spec": {"containers": [{"name": "app", "image": "registry.example/app:1"}]}})
    .to_string()
}

pub fn create_pod(ns: &str, name: &str, labels: Value) -> relayfed_test_cluster::tools::Run {
    plane().kubectl_stdin(&["create", "-n", ns, "-f", "-"], &pod(name, labels)).unwrap()
}

fn injected(p: &Pod) -> bool {
    let spec = p.spec.as_ref().unwrap();
    let names: Vec<&str> = spec.init_containers.iter().flatten().map(|c| c.name.as_str()).collect();
    names.contains(&"relayfed-init") && names.contains(&"relayfed-proxy")
}

#[tokio::test]
async fn the_api_server_injects_only_pods_that_asked_and_survives_the_webhook_down() {
    let _serial = serial().await;
    let release = Namespace::create("inj-release", &[]);
    let on = Namespace::create("inj-on", &[("relayfed.io/inject", "enabled")]);
    let off = Namespace::create("inj-off", &[]);
    let mut injector = Injector::install(&release.name, &release.name);
    let client = plane().client().await.unwrap();

    // A Deployment in an injection-enabled namespace: the ReplicaSet controller creates the
    // pods, the API server calls the webhook, the pods arrive injected.
    let dep = json!({"apiVersion": "apps/v1", "kind": "Deployment", "metadata": {"name": "catalog"},
        "spec": {"replicas": 2, "selector": {"matchLabels": {"app": "catalog"}},
                 "template": {"metadata": {"labels": {"app": "catalog"}},
                              "spec": {"containers": [{"name": "app", "image": "registry.example/catalog:1"}]}}}});
    let out = plane().kubectl_stdin(&["create", "-n", &on.name, "-f", "-"], &dep.to_string()).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let pods_on: Api<Pod> = Api::namespaced(client.clone(), &on.name);
    let created = eventually("the Deployment's two pods", Duration::from_secs(60), || async {
        let l = pods_on.list(&ListParams::default().labels("app=catalog")).await.ok()?;
        (l.items.len() == 2).then_some(l.items)
    })
    .await;
    for p in &created {
        assert!(injected(p), "pod {:?} of an enabled namespace not injected", p.metadata.name);
        assert_eq!(p.metadata.labels.as_ref().unwrap().get("relayfed.io/injected").map(String::as_str), Some("true"));
    }
    // Opted out in an enabled namespace; not opted in elsewhere; opted in by label elsewhere.
    assert!(create_pod(&on.name, "opted-out", json!({"relayfed.io/inject": "disabled"})).ok);
    assert!(create_pod(&off.name, "plain", json!({"app": "plain"})).ok);
    assert!(create_pod(&off.name, "opted-in", json!({"relayfed.io/inject": "enabled"})).ok);
    let pods_off: Api<Pod> = Api::namespaced(client.clone(), &off.name);
    assert!(!injected(&pods_on.get("opted-out").await.unwrap()));
    assert!(!injected(&pods_off.get("plain").await.unwrap()));
    assert!(injected(&pods_off.get("opted-in").await.unwrap()));

    // The injector down: pods that did not ask for injection are still created; pods that did
    // are refused (failurePolicy Fail) with a message naming the webhook.
    injector.stop();
    let out = create_pod(&off.name, "while-down", json!({"app": "plain"}));
    assert!(out.ok, "a pod outside the injection scope was blocked by the stopped webhook: {}", out.stderr);
    let out = create_pod(&off.name, "asked-while-down", json!({"relayfed.io/inject": "enabled"}));
    assert!(!out.ok && out.stderr.contains("inject.relayfed.io"), "{}", out.stderr);
}

#[tokio::test]
async fn pod_security_baseline_and_restricted_reject_the_injected_init_container() {
    let _serial = serial().await;
    let release = Namespace::create("psa-release", &[]);
    let _injector = Injector::install(&release.name, &release.name);
    for level in ["baseline", "restricted"] {
        let ns = Namespace::create(
            &format!("psa-{level}"),
            &[("relayfed.io/inject", "enabled"), ("pod-security.kubernetes.io/enforce", level)],
        );
        let out = create_pod(&ns.name, "app", json!({"app": "a"}));
        assert!(!out.ok, "PodSecurity {level} admitted an injected pod");
        assert!(
            out.stderr.contains("violates PodSecurity") && out.stderr.contains("NET_ADMIN"),
            "{level}: {}",
            out.stderr
        );
        eprintln!("PodSecurity {level}: {}", out.stderr.trim());
        // Opted out, the same pod passes baseline (restricted also wants runAsNonRoot and more
        // from the app itself).
        if level == "baseline" {
            let out = create_pod(&ns.name, "opted-out", json!({"relayfed.io/inject": "disabled"}));
            assert!(out.ok, "{level}: {}", out.stderr);
        }
    }
}
