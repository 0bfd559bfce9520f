//! What the real-cluster suites share: the plane (one per test binary, CRDs installed once),
//! a namespace per test, the examples rewritten into it, the chart's RBAC for the operator,
//! `relayfed operator run` as a real process, and waiting on API state.

use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use std::ffi::OsStr;

use relayfed_test_cluster::ControlPlane;
use relayfed_test_cluster::process::Proc;
use serde_json::Value;

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..")
}

/// The shared plane with the CRD chart (with the optional MCS CRDs) applied and established.
pub fn plane() -> &'static ControlPlane {
    static READY: OnceLock<()> = OnceLock::new();
    let plane = relayfed_test_cluster::shared();
    READY.get_or_init(|| {
        let chart = repo().join("charts/relayfed-crds").display().to_string();
        let out = plane.helm(&["template", "relayfed-crds", &chart, "--set", "multicluster.installCRDs=true"]).unwrap();
        assert!(out.ok, "helm template relayfed-crds: {}", out.stderr);
        let out = plane.kubectl_stdin(&["apply", "--server-side", "-f", "-"], &out.stdout).unwrap();
        assert!(out.ok, "applying the CRD chart: {}", out.stderr);
        assert!(!out.stderr.contains("Warning"), "the API server warns about the chart's CRDs: {}", out.stderr);
        let out = plane.kubectl(&["wait", "--for=condition=Established", "--timeout=60s", "crd", "--all"]).unwrap();
        assert!(out.ok, "CRDs not established: {}", out.stderr);
    });
    plane
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
    eventually_or(what, limit, || {
        let next = f();
        async move { next.await.ok_or_else(String::new) }
    })
    .await
}

/// [`eventually`] for `f` that says what it saw instead (`Err`): the last of those is in the
/// timeout's message.
pub async fn eventually_or<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, String>>,
{
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(100);
    loop {
        match f().await {
            Ok(v) => return v,
            Err(seen) => assert!(Instant::now() < deadline, "timed out after {limit:?} waiting for {what}\n{seen}"),
        }
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

/// Applies the chart's operator RBAC (ServiceAccount, ClusterRole, bindings, Lease Role) for a
/// release named `release` in namespace `ns`, exactly as `helm template` renders it, and
/// returns a kubeconfig that authenticates as that ServiceAccount (TokenRequest).
pub async fn operator_identity(ns: &str, release: &str) -> PathBuf {
    let rendered = render_chart_release(release, ns, &["--show-only", "templates/operator.yaml"]);
    let rbac: Vec<&str> = rendered
        .split("\n---")
        .filter(|d| {
            ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"]
                .iter()
                .any(|k| d.contains(&format!("\nkind: {k}\n")))
        })
        .collect();
    assert_eq!(rbac.len(), 5, "the chart's operator RBAC changed shape:\n{rendered}");
    let out = plane().kubectl_stdin(&["apply", "-f", "-"], &rbac.join("\n---\n")).unwrap();
    assert!(out.ok, "applying the chart's RBAC: {}", out.stderr);
    plane().service_account_kubeconfig(ns, &format!("{release}-operator"), 3600).await.unwrap()
}

/// `helm template <release> charts/relayfed -n <ns> args...`.
pub fn render_chart_release(release: &str, ns: &str, args: &[&str]) -> String {
    let chart = repo().join("charts/relayfed").display().to_string();
    let mut all = vec!["template", release, chart.as_str(), "--namespace", ns];
    all.extend_from_slice(args);
    let out = plane().helm(&all).unwrap();
    assert!(out.ok, "helm template {args:?}: {}", out.stderr);
    out.stdout
}

/// Writes a TLS Secret's `tls.crt` and `tls.key` (its `data`, base64, as the API or
/// `helm template` shows it) into `dir`.
pub fn write_tls(secret: &Value, dir: &Path) {
    use base64::Engine;
    std::fs::create_dir_all(dir).unwrap();
    for key in ["tls.crt", "tls.key"] {
        let pem = base64::engine::general_purpose::STANDARD.decode(secret["data"][key].as_str().unwrap()).unwrap();
        std::fs::write(dir.join(key), pem).unwrap();
    }
}

/// `relayfed webhook serve` on `127.0.0.1:port` (its admin port, `/metrics`, on
/// `127.0.0.1:admin`) with the TLS files in `dir` (and its `inject.json` when there is one),
/// returned once it listens.
pub fn serve_webhook(port: u16, admin: u16, dir: &Path) -> Proc {
    let mut args = vec![
        "webhook".to_owned(),
        "serve".to_owned(),
        format!("--listen=127.0.0.1:{port}"),
        format!("--admin-listen=127.0.0.1:{admin}"),
        format!("--tls-cert={}", dir.join("tls.crt").display()),
        format!("--tls-key={}", dir.join("tls.key").display()),
    ];
    if dir.join("inject.json").exists() {
        args.push(format!("--config={}", dir.join("inject.json").display()));
    }
    let proc = Proc::spawn("webhook", Path::new(env!("CARGO_BIN_EXE_relayfed")), &args, dir).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "the webhook did not listen");
        std::thread::sleep(Duration::from_millis(50));
    }
    proc
}

/// `relayfed operator run` as a real process (the harness's [`Proc`]: logged, killed on drop).
pub struct Operator {
    proc: Proc,
    /// Its admin port (/metrics, /healthz, /readyz).
    pub admin_port: u16,
    /// Its config distribution port (nodes subscribe and report there).
    pub distribution_port: u16,
}

impl Operator {
    /// Starts replica `identity` with `kubeconfig`, the Lease in `lease_ns`, serving `federation`.
    pub fn start(kubeconfig: &Path, lease_ns: &str, identity: &str, federation: &str) -> Self {
        let port = || relayfed_test_cluster::ports::free_port().unwrap();
        let (dist, ids, admin) = (port(), port(), port());
        let args: Vec<String> = [
            "operator",
            "run",
            "--namespace",
            lease_ns,
            "--identity",
            identity,
            "--federation",
            federation,
            "--proxy-image",
            "ghcr.io/relayfed/relayfed:test",
        ]
        .iter()
        .map(|a| a.to_string())
        .chain([
            format!("--config-server=127.0.0.1:{dist}"),
            format!("--distribution-listen=127.0.0.1:{dist}"),
            format!("--identity-listen=127.0.0.1:{ids}"),
            format!("--admin-listen=127.0.0.1:{admin}"),
        ])
        .collect();
        let env = [("KUBECONFIG", kubeconfig.as_os_str()), ("RUST_LOG", OsStr::new("info,relayfed_operator=debug"))];
        let name = format!("operator-{lease_ns}-{identity}");
        let proc =
            Proc::spawn_with_env(&name, Path::new(env!("CARGO_BIN_EXE_relayfed")), &args, &env, &plane().dir).unwrap();
        Self { proc, admin_port: admin, distribution_port: dist }
    }

    /// What it logged so far.
    pub fn logged(&self) -> String {
        std::fs::read_to_string(&self.proc.log).unwrap_or_default()
    }

    /// The lines of its log where RBAC refused its ServiceAccount something (`... is
    /// forbidden: User "system:serviceaccount:..." cannot ...`). Other 403s, such as writes
    /// into a namespace another test is deleting, are not RBAC.
    pub fn rbac_refusals(&self) -> Vec<String> {
        self.logged().lines().filter(|l| l.contains("is forbidden: User \"")).map(str::to_owned).collect()
    }

    /// `GET path` on its admin port: `(status code, body)`.
    pub async fn admin(&self, path: &str) -> Option<(u16, String)> {
        relayfed_test_cluster::http::get(self.admin_port, path).await.ok()
    }

    /// Kills it (as a crash would).
    pub fn kill(&mut self) {
        self.proc.kill();
    }
}

/// A test's namespace with the chart's operator RBAC and `relayfed operator run` serving the
/// federation `<ns>/acme` as the chart's ServiceAccount, holding the serial lock throughout.
pub struct Operated {
    /// The operator (dropped first).
    pub op: Operator,
    /// The namespace.
    pub ns: Namespace,
    _serial: tokio::sync::MutexGuard<'static, ()>,
}

/// Sets up [`Operated`] in a namespace named after `prefix`.
pub async fn operated(prefix: &str) -> Operated {
    let serial = serial().await;
    let ns = Namespace::create(prefix, &[]);
    let kubeconfig = operator_identity(&ns.name, &ns.name).await;
    let op = Operator::start(&kubeconfig, &ns.name, "op-0", &format!("{}/acme", ns.name));
    Operated { op, ns, _serial: serial }
}
