//! What the real-cluster suites share: the plane (one per test binary, CRDs installed once),
//! a namespace per test, the examples rewritten into it, the chart's RBAC for the operator,
//! `relayfed operator run` as a real process, and waiting on API state.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use relayfed_test_cluster::ControlPlane;
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The shared plane with the chart's CRDs (and the optional MCS CRDs) installed and
/// established.
pub fn plane() -> &'static ControlPlane {
    static READY: OnceLock<()> = OnceLock::new();
    let plane = relayfed_test_cluster::shared();
    READY.get_or_init(|| {
        let crds = repo().join("charts/relayfed/crds");
        let out = plane.kubectl(&["apply", "--server-side", "-f", &crds.display().to_string()]).unwrap();
        assert!(out.ok, "applying the chart's CRDs: {}", out.stderr);
        let mcs =
            render_chart(plane, &["--set", "multicluster.installCRDs=true", "--show-only", "templates/mcs-crds.yaml"]);
        let out = plane.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &mcs).unwrap();
        assert!(out.ok, "applying the MCS CRDs: {}", out.stderr);
        let out = plane.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"]).unwrap();
        assert!(out.ok, "CRDs not established: {}", out.stderr);
    });
    plane
}

/// `helm template` of the chart with `args`, through the real helm CLI.
pub fn render_chart(plane: &ControlPlane, args: &[&str]) -> String {
    let chart = repo().join("charts/relayfed").display().to_string();
    let mut all = vec!["template", "relayfed", chart.as_str(), "--namespace", "relayfed-system"];
    all.extend_from_slice(args);
    let out = plane.helm(&all).unwrap();
    assert!(out.ok, "helm template {args:?}: {}", out.stderr);
    out.stdout
}

/// Every test that runs an operator holds this: operators watch all namespaces, so two at
/// once would reconcile each other's objects.
pub async fn serial() -> tokio::sync::MutexGuard<'static, ()> {
    static LOCK: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
    LOCK.lock().await
}

/// A namespace for one test, deleted (without waiting) when dropped.
pub struct Namespace {
    /// Its name.
    pub name: String,
}

impl Namespace {
    /// Creates `<prefix>-<n>` with `labels`.
    pub fn create(prefix: &str, labels: &[(&str, &str)]) -> Self {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let name = format!("{prefix}-{}-{n}", std::process::id() % 10_000);
        let mut doc = serde_json::json!({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}});
        for (k, v) in labels {
            doc["metadata"]["labels"][*k] = Value::from(*v);
        }
        let out = plane().kubectl_stdin(&["create", "-f", "-"], &doc.to_string()).unwrap();
        assert!(out.ok, "creating namespace {name}: {}", out.stderr);
        Self { name }
    }
}

impl Drop for Namespace {
    fn drop(&mut self) {
        if std::env::var_os("RELAYFED_KEEP_CLUSTER").is_none() {
            let _ = plane().kubectl(&["delete", "namespace", &self.name, "--wait=false"]);
        }
    }
}

/// A copy of `examples/<sub>` with every `namespace: relayfed-system` set to `ns`, in a
/// fresh directory; returns the directory.
pub fn examples_in(sub: &str, ns: &str) -> PathBuf {
    let src = repo().join("examples").join(sub);
    let dst = plane().dir.join(format!("examples-{ns}-{}", sub.replace('/', "-")));
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(&src).unwrap() {
        let p = e.unwrap().path();
        let text =
            std::fs::read_to_string(&p).unwrap().replace("namespace: relayfed-system", &format!("namespace: {ns}"));
        std::fs::write(dst.join(p.file_name().unwrap()), text).unwrap();
    }
    dst
}

/// Polls `f` (backing off from 100 ms to 1 s) until it returns `Some`, for at most `limit`.
pub async fn eventually<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(100);
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}");
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// `kubectl get <what> -n ns -o json` parsed.
pub fn get_json(ns: &str, what: &[&str]) -> Value {
    let mut args = vec!["get", "-n", ns, "-o", "json"];
    args.extend_from_slice(what);
    let out = plane().kubectl(&args).unwrap();
    assert!(out.ok, "kubectl {args:?}: {}", out.stderr);
    serde_json::from_str(&out.stdout).unwrap()
}
