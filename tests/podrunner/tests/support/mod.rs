//! The two-cluster bed: node namespaces, control planes, kube-proxy, the pod runner, the image
//! map, and the user's steps (helm, kubectl) against each cluster.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Node, Pod, Secret, Service};
use kube::Api;
use kube::api::{ListParams, Patch, PatchParams};
use relayfed_test_cluster::netns::NodeNs;
use relayfed_test_cluster::process::Proc;
use relayfed_test_cluster::{ControlPlane, Options};
use serde::Deserialize;
use serde_json::{Value, json};

/// The repository root.
pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Unpacks the relayfed images (`make images`) and writes the image map: the two relayfed
/// images run from their unpacked root filesystems; CoreDNS and the test app are programs of
/// this machine.
pub fn image_map() -> PathBuf {
    let images =
        PathBuf::from(std::env::var("RELAYFED_IMAGES").expect("RELAYFED_IMAGES: the directory `make images` writes"));
    let out = relayfed_test_cluster::run_dir("e2e-images").unwrap();
    let runner = env!("CARGO_BIN_EXE_relayfed-pod-runner");
    let mut map = Vec::new();
    for (image, repository) in
        [("relayfed", "ghcr.io/relayfed/relayfed"), ("relayfed-proxy", "ghcr.io/relayfed/relayfed-proxy")]
    {
        let archive = std::fs::read_dir(&images)
            .unwrap()
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                let name = p.file_name().unwrap().to_string_lossy().into_owned();
                name.starts_with(&format!("{image}-"))
                    && name.ends_with(".oci.tar")
                    && name[image.len() + 1..].chars().next().is_some_and(|c| c.is_ascii_digit())
            })
            .unwrap_or_else(|| panic!("no {image}-<version>.oci.tar in {}: run `make images`", images.display()));
        let got = std::process::Command::new(runner)
            .args(["unpack", &archive.display().to_string(), "--repository", repository, "--out"])
            .arg(out.join(image))
            .output()
            .unwrap();
        assert!(got.status.success(), "unpacking {}: {}", archive.display(), String::from_utf8_lossy(&got.stderr));
        map.push(serde_json::from_slice::<Value>(&got.stdout).unwrap());
    }
    let bin = relayfed_test_cluster::build::bin_dir().unwrap();
    map.push(json!({"repository": "registry.k8s.io/coredns/coredns", "entrypoint": [bin.join("coredns")]}));
    map.push(json!({"repository": "relayfed.test/app", "entrypoint": [env!("CARGO_BIN_EXE_relayfed-test-app")]}));
    let path = out.join("images.json");
    std::fs::write(&path, serde_json::to_vec_pretty(&map).unwrap()).unwrap();
    path
}

/// One cluster: a node namespace holding its control plane, kube-proxy and pod runner.
pub struct Cluster {
    /// `a` or `b`.
    pub name: &'static str,
    /// Processes of the node (dropped first: they use the plane and the namespace).
    procs: Vec<Proc>,
    /// The control plane.
    pub plane: ControlPlane,
    /// The node's namespace (dropped last).
    pub node: NodeNs,
    /// The pod runner's directory (pods, volumes, container logs).
    pub runner_dir: PathBuf,
}

impl Cluster {
    /// Starts clusters `a` and `b` and links their nodes.
    pub fn pair(images: &Path) -> (Self, Self) {
        let (na, nb) = (NodeNs::create("rf2c-a", 1).unwrap(), NodeNs::create("rf2c-b", 2).unwrap());
        NodeNs::link(&na, &nb).unwrap();
        (Self::start("a", na, images), Self::start("b", nb, images))
    }

    fn start(name: &'static str, node: NodeNs, images: &Path) -> Self {
        let plane = ControlPlane::start(Options {
            name: format!("e2e-{name}"),
            nodes: vec![],
            netns: Some(node.name.clone()),
            address: node.address.clone(),
            kwok: false,
            pod_cidr: node.pod_cidr.clone(),
            ..Options::default()
        })
        .unwrap_or_else(|e| panic!("cluster {name}: the control plane did not start: {e:#}"));
        let s = |v: &str| v.to_owned();
        let kubeconfig = plane.kubeconfig.display().to_string();
        let node_name = format!("node-{name}");
        let kube_proxy = Proc::spawn_in(
            Some(&node.name),
            "kube-proxy",
            &plane.bin.join("kube-proxy"),
            &[
                format!("--kubeconfig={kubeconfig}"),
                format!("--hostname-override={node_name}"),
                s("--proxy-mode=iptables"),
                format!("--cluster-cidr={}", node.pod_cidr),
                // Leave the machine's conntrack table size alone (it is not per namespace).
                s("--conntrack-max-per-core=0"),
                format!("--metrics-bind-address={}:10249", node.address),
                format!("--healthz-bind-address={}:10256", node.address),
            ],
            &plane.dir,
        )
        .unwrap();
        let runner_dir = plane.dir.join("pod-runner");
        let runner = Proc::spawn_in(
            Some(&node.name),
            "pod-runner",
            Path::new(env!("CARGO_BIN_EXE_relayfed-pod-runner")),
            &[
                s("run"),
                format!("--kubeconfig={kubeconfig}"),
                format!("--node={node_name}"),
                format!("--node-ip={}", node.address),
                format!("--pod-cidr={}", node.pod_cidr),
                format!("--images={}", images.display()),
                format!("--dir={}", runner_dir.display()),
                format!("--netns-prefix=rf2c-{name}-pod"),
            ],
            &plane.dir,
        )
        .unwrap();
        Self { name, procs: vec![kube_proxy, runner], plane, node, runner_dir }
    }

    /// An admin client.
    pub async fn client(&self) -> kube::Client {
        self.plane.client().await.unwrap()
    }

    fn state(&self) -> String {
        let pods = self.plane.kubectl(&["get", "pods", "-A", "-o", "wide"]).map(|r| r.stdout).unwrap_or_default();
        let logs: String =
            self.procs.iter().map(|p| format!("--- {} log ends:\n{}\n", p.name, p.log_tail(15))).collect();
        format!("cluster {}:\n{pods}{logs}", self.name)
    }

    /// `kubectl apply -f path`.
    pub fn apply(&self, path: &Path) {
        let out = self.plane.kubectl(&["apply", "-f", &path.display().to_string()]).unwrap();
        assert!(out.ok, "cluster {}: kubectl apply -f {}: {}{}", self.name, path.display(), out.stdout, out.stderr);
    }

    /// `kubectl patch rolloutpolicy default --type merge -p <patch>` (what `kubectl edit` does).
    pub fn patch_rollout_policy(&self, patch: &str) {
        self.kubectl(&["-n", "relayfed-system", "patch", "rolloutpolicy", "default", "--type", "merge", "-p", patch]);
    }

    /// `kubectl args...`, which must succeed.
    pub fn kubectl(&self, args: &[&str]) -> String {
        let out = self.plane.kubectl(args).unwrap();
        assert!(out.ok, "cluster {}: kubectl {args:?}: {}{}", self.name, out.stdout, out.stderr);
        out.stdout
    }

    /// CoreDNS behind kube-dns (10.96.0.10), Ready.
    pub async fn install_dns(&self) {
        self.wait_node().await;
        self.apply(&repo().join("tests/podrunner/manifests/coredns.yaml"));
        self.wait_ready("kube-system", "k8s-app=kube-dns").await;
    }

    async fn wait_node(&self) {
        let nodes: Api<Node> = Api::all(self.client().await);
        self.eventually("the pod runner's node Ready", || {
            let nodes = nodes.clone();
            async move {
                let n = nodes.get_opt(&format!("node-{}", self.name)).await.ok()??;
                n.status?.conditions?.iter().any(|c| c.type_ == "Ready" && c.status == "True").then_some(())
            }
        })
        .await;
    }

    /// The user's install: the CRD chart (with the MCS CRDs), then the chart, with helm.
    pub async fn install_relayfed(&self) {
        self.install_relayfed_for("shop").await;
    }

    /// The chart as [`Cluster::install_relayfed`], its operator serving federation
    /// `relayfed-system/<federation>`.
    pub async fn install_relayfed_for(&self, federation: &str) {
        let served = format!("operator.federation=relayfed-system/{federation}");
        let helm = |args: &[&str]| {
            let out = self.plane.helm(args).unwrap();
            assert!(out.ok, "cluster {}: helm {args:?}: {}{}\n{}", self.name, out.stdout, out.stderr, self.state());
        };
        let charts = repo().join("charts");
        helm(&[
            "install",
            "relayfed-crds",
            &charts.join("relayfed-crds").display().to_string(),
            "--set",
            "multicluster.installCRDs=true",
            "--wait",
        ]);
        helm(&[
            "install",
            "relayfed",
            &charts.join("relayfed").display().to_string(),
            "--namespace",
            "relayfed-system",
            "--create-namespace",
            "--set",
            "operator.replicas=1",
            "--set",
            "injection.webhook.replicas=1",
            "--set",
            &served,
            "--wait",
            "--timeout",
            "4m",
        ]);
    }

    /// Polls `check` (every 250 ms) until it yields, for up to 3 minutes; panics with the
    /// cluster's pods and node logs otherwise.
    pub async fn eventually<T, F, Fut>(&self, what: &str, mut check: F) -> T
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = Option<T>>,
    {
        let deadline = Instant::now() + super::WAIT;
        loop {
            if let Some(v) = check().await {
                return v;
            }
            assert!(Instant::now() < deadline, "cluster {}: timed out waiting for {what}\n{}", self.name, self.state());
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    /// Waits for Secret `ns/name` and returns it as JSON.
    pub async fn wait_for_secret(&self, ns: &str, name: &str) -> Secret {
        let api: Api<Secret> = Api::namespaced(self.client().await, ns);
        self.eventually(&format!("Secret {ns}/{name}"), || {
            let api = api.clone();
            async move { api.get_opt(name).await.ok().flatten() }
        })
        .await
    }

    /// Copies the federation CA Secret `relayfed-system/<name>` from `from` with the kubectl
    /// commands the README gives (the CA files pass through a directory of the test's).
    pub fn copy_ca_from(&self, from: &Cluster, name: &str) {
        let dir = self.plane.dir.join("ca-copy");
        std::fs::create_dir_all(&dir).unwrap();
        for key in ["ca.crt", "ca.key"] {
            let template = format!("--template={{{{index .data \"{key}\" | base64decode}}}}");
            let pem = from.kubectl(&["-n", "relayfed-system", "get", "secret", name, "-o", "go-template", &template]);
            std::fs::write(dir.join(key), pem).unwrap();
        }
        let file = |k: &str| format!("--from-file={}", dir.join(k).display());
        self.kubectl(&["-n", "relayfed-system", "create", "secret", "generic", name, &file("ca.crt"), &file("ca.key")]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    /// The LoadBalancer controller's part: once the relay's Service exists, gives it `ip`
    /// (kube-proxy then forwards that address; the other node routes it over the WAN link).
    pub async fn assign_load_balancer(&self, service: &str, ip: &str) {
        let api: Api<Service> = Api::namespaced(self.client().await, "relayfed-system");
        self.eventually(&format!("Service {service}"), || {
            let api = api.clone();
            async move { api.get_opt(service).await.ok().flatten() }
        })
        .await;
        let status = json!({"status": {"loadBalancer": {"ingress": [{"ip": ip}]}}});
        api.patch_status(service, &PatchParams::default(), &Patch::Merge(status)).await.unwrap();
    }

    /// Waits until at least one pod matches `selector` in `ns` and all that do are Ready.
    pub async fn wait_ready(&self, ns: &str, selector: &str) -> Vec<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client().await, ns);
        self.eventually(&format!("pods {selector} in {ns} Ready"), || {
            let api = api.clone();
            async move {
                let pods = api.list(&ListParams::default().labels(selector)).await.ok()?.items;
                let live: Vec<Pod> = pods.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
                let ready = |p: &Pod| {
                    p.status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
                };
                (!live.is_empty() && live.iter().all(ready)).then_some(live)
            }
        })
        .await
    }

    /// Waits until exactly `n` pods match `selector` in `ns`, all Ready.
    pub async fn wait_ready_count(&self, ns: &str, selector: &str, n: usize) -> Vec<Pod> {
        let api: Api<Pod> = Api::namespaced(self.client().await, ns);
        self.eventually(&format!("{n} pods {selector} in {ns} Ready"), || {
            let api = api.clone();
            async move {
                let pods = api.list(&ListParams::default().labels(selector)).await.ok()?.items;
                let live: Vec<Pod> = pods.into_iter().filter(|p| p.metadata.deletion_timestamp.is_none()).collect();
                (live.len() == n && live.iter().all(is_ready)).then_some(live)
            }
        })
        .await
    }

    /// Fails with "sidecar missing" unless pod `ns/name` carries the injected proxy and its init
    /// step.
    pub fn assert_injected(&self, ns: &str, name: &str) {
        let inits = self.kubectl(&["-n", ns, "get", "pod", name, "-o", "jsonpath={.spec.initContainers[*].name}"]);
        for c in ["relayfed-init", "relayfed-proxy"] {
            assert!(
                inits.split_whitespace().any(|n| n == c),
                "sidecar missing: pod {ns}/{name} in cluster {} has no {c} init container (init containers: {inits:?}); \
                 is the namespace labelled relayfed.io/inject=enabled and the injector Ready?",
                self.name
            );
        }
    }

    /// The network namespace of the newest live pod in `ns` whose name starts with `prefix`.
    pub fn pod_netns(&self, ns: &str, prefix: &str) -> String {
        let out = self.kubectl(&[
            "-n",
            ns,
            "get",
            "pods",
            "-o",
            "jsonpath={range .items[*]}{.metadata.name} {.metadata.uid} {.metadata.deletionTimestamp}{\"\\n\"}{end}",
        ]);
        let uid = out
            .lines()
            .filter_map(|l| {
                let f: Vec<&str> = l.split_whitespace().collect();
                (f.len() == 2 && f[0].starts_with(prefix)).then(|| f[1].to_owned())
            })
            .next_back()
            .unwrap_or_else(|| panic!("cluster {}: no live pod {ns}/{prefix}*:\n{out}", self.name));
        let short: String = uid.chars().filter(char::is_ascii_hexdigit).take(8).collect();
        format!("rf2c-{}-pod-{short}", self.name)
    }

    /// `GET path` on `127.0.0.1:port` inside a pod (what `kubectl port-forward` gives a user).
    pub fn pod_get(&self, ns: &str, prefix: &str, port: u16, path: &str) -> String {
        let netns = self.pod_netns(ns, prefix);
        let url = format!("http://127.0.0.1:{port}{path}");
        let out = std::process::Command::new("ip")
            .args(["netns", "exec", &netns, "curl", "-sS", "-m", "5", &url])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "cluster {}: GET {url} in {ns}/{prefix}*: {}",
            self.name,
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The config versions the operator published and those nodes acknowledged, by node.
    pub fn config_versions(&self) -> (BTreeMap<String, f64>, BTreeMap<String, f64>) {
        let text = self.pod_get("relayfed-system", "relayfed-operator-", 9090, "/metrics");
        let versions = |family: &str| -> BTreeMap<String, f64> {
            text.lines()
                .filter(|l| l.starts_with(&format!("{family}{{")))
                .filter_map(|l| {
                    let node = l.split("node=\"").nth(1)?.split('"').next()?.to_owned();
                    Some((node, l.rsplit(' ').next()?.parse().ok()?))
                })
                .collect()
        };
        (
            versions("relayfed_operator_config_published_version"),
            versions("relayfed_operator_config_acknowledged_version"),
        )
    }

    /// Waits until every node of `before` has a newer published version and acknowledged it.
    pub async fn wait_acknowledged(&self, before: &BTreeMap<String, f64>) {
        self.eventually("every node acknowledging a new config version", || async {
            let (published, acked) = self.config_versions();
            before.iter().all(|(n, v)| published.get(n).is_some_and(|p| p > v && acked.get(n) == Some(p))).then_some(())
        })
        .await
    }

    /// The log of container `container` of pod `ns/name` (every restart), as the runner keeps it.
    pub fn pod_log(&self, ns: &str, name: &str, container: &str) -> PodLog<'_> {
        PodLog {
            cluster: self,
            ns: ns.to_owned(),
            pod: name.to_owned(),
            prefix: format!("{ns}_{name}_"),
            container: container.to_owned(),
        }
    }

    /// Starts an unmodified client pod `ns/name` calling `url` every 100 ms.
    pub fn run_client(&self, ns: &str, name: &str, url: &str) {
        let pod = json!({
            "apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
            "spec": {"containers": [{"name": "app", "image": "relayfed.test/app:1",
                "args": ["call", url, "--interval-ms", "100"]}]},
        });
        let out = self.plane.kubectl_stdin(&["apply", "-f", "-"], &pod.to_string()).unwrap();
        assert!(out.ok, "cluster {}: creating pod {ns}/{name}: {}", self.name, out.stderr);
    }

    /// Which layer fails the calls of client pod `ns/pod` to `url`, as a person would find out:
    /// is the sidecar there, does the name resolve in the pod, and which error codes the
    /// sidecar counted (since `baseline`, its earlier /metrics text, when given).
    pub fn diagnose(&self, ns: &str, pod: &str, url: &str, baseline: Option<&str>) -> String {
        let inits = self.plane.kubectl(&["-n", ns, "get", "pod", pod, "-o", "jsonpath={.spec.initContainers[*].name}"]);
        let inits = inits.map(|r| r.stdout).unwrap_or_default();
        if !inits.split_whitespace().any(|c| c == "relayfed-proxy") {
            return format!(
                "sidecar missing: pod {ns}/{pod} in cluster {} has no relayfed-proxy (init containers: {inits:?}): \
                 label its namespace relayfed.io/inject=enabled and check the injector is Ready",
                self.name
            );
        }
        let host = url.trim_start_matches("http://").split(['/', ':']).next().unwrap_or_default().to_owned();
        let netns = self.pod_netns(ns, pod);
        let resolved =
            std::process::Command::new("ip").args(["netns", "exec", &netns, "getent", "hosts", &host]).output();
        if !resolved.is_ok_and(|o| o.status.success()) {
            return format!(
                "DNS name {host} does not resolve in pod {ns}/{pod} of cluster {}: no Service of that name \
                 (a service of another cluster needs its ServiceImport here)",
                self.name
            );
        }
        let now = self.pod_get(ns, pod, 15090, "/metrics");
        let count =
            |text: &str, code: &str| metric(text, "relayfed_proxy_stream_errors_total", &[&format!("code=\"{code}\"")]);
        let mut codes: Vec<(f64, String)> = now
            .lines()
            .filter_map(|l| l.strip_prefix("relayfed_proxy_stream_errors_total{code=\""))
            .filter_map(|l| l.split('"').next().map(str::to_owned))
            .map(|code| (count(&now, &code) - baseline.map_or(0.0, |b| count(b, &code)), code))
            .filter(|(n, _)| *n > 0.0)
            .collect();
        codes.sort_by(|a, b| b.0.total_cmp(&a.0));
        if codes.is_empty() {
            return format!("no layer reports a failure for {ns}/{pod} in cluster {}", self.name);
        }
        let list: Vec<String> = codes.iter().map(|(n, c)| format!("{c} x{n}")).collect();
        // And what the cluster's main relays say of their peers.
        let relays = self.kubectl(&[
            "-n",
            "relayfed-system",
            "get",
            "pods",
            "-l",
            "app.kubernetes.io/name=relayfed-relay",
            "-o",
            "jsonpath={.items[*].metadata.name}",
        ]);
        let mut peers = Vec::new();
        for r in relays.split_whitespace() {
            let text = self.pod_get("relayfed-system", r, 9901, "/metrics");
            for l in text.lines().filter(|l| l.starts_with("relayfed_relay_peer_up{")) {
                let peer = l.split("peer=\"").nth(1).and_then(|p| p.split('"').next()).unwrap_or_default();
                let up = l.rsplit(' ').next().unwrap_or_default();
                peers.push(format!("{r}: peer {peer} {}", if up == "1" { "up" } else { "DOWN" }));
            }
        }
        format!(
            "the relay path fails for {ns}/{pod} in cluster {}: its sidecar counted {} (docs/operations.md, \"Errors\"); {}",
            self.name,
            list.join(", "),
            peers.join(", ")
        )
    }
}

fn is_ready(p: &Pod) -> bool {
    p.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // The runner first (it removes the pods' namespaces on SIGTERM), then kube-proxy.
        for p in self.procs.iter_mut() {
            let _ = std::process::Command::new("kill").args(["-TERM", &p.pid().to_string()]).status();
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && self.procs.iter_mut().any(|p| p.exited().is_none()) {
            std::thread::sleep(Duration::from_millis(50));
        }
        self.procs.clear();
    }
}

/// One call of the test app's client (a JSON line).
#[derive(Debug, Clone, Deserialize)]
pub struct Call {
    /// Unix ms.
    pub t: u64,
    /// Answered with 200.
    pub ok: bool,
    /// Duration, µs.
    pub us: u64,
    /// The answering pod.
    pub pod: Option<String>,
    /// The caller's identity the answering app read from a PROXY v2 header, if it got one.
    #[serde(default)]
    pub caller: Option<String>,
    /// Why it failed.
    pub error: Option<String>,
}

/// A container's log in the pod runner's directory.
pub struct PodLog<'a> {
    cluster: &'a Cluster,
    ns: String,
    pod: String,
    prefix: String,
    container: String,
}

impl PodLog<'_> {
    /// The URL the pod calls (its `call` argument).
    pub fn url(&self) -> String {
        self.cluster
            .plane
            .kubectl(&["-n", &self.ns, "get", "pod", &self.pod, "-o", "jsonpath={.spec.containers[0].args[1]}"])
            .map(|r| r.stdout)
            .unwrap_or_default()
    }

    /// Every call logged so far, oldest first.
    pub fn calls(&self) -> Vec<Call> {
        let mut calls = Vec::new();
        let pods = self.cluster.runner_dir.join("pods");
        for e in std::fs::read_dir(&pods).into_iter().flatten().flatten() {
            if !e.file_name().to_string_lossy().starts_with(&self.prefix) {
                continue;
            }
            let dir = e.path().join("logs").join(&self.container);
            let mut files: Vec<PathBuf> =
                std::fs::read_dir(&dir).into_iter().flatten().flatten().map(|f| f.path()).collect();
            files.sort();
            for f in files {
                let text = std::fs::read_to_string(&f).unwrap_or_default();
                calls.extend(text.lines().filter_map(|l| serde_json::from_str::<Call>(l).ok()));
            }
        }
        calls.sort_by_key(|c| c.t);
        calls
    }

    /// Waits until `done` holds for the calls logged so far; panics with the last errors and
    /// the cluster's state otherwise.
    pub async fn wait_for(&self, limit: Duration, done: impl Fn(&[Call]) -> bool) -> Vec<Call> {
        let deadline = Instant::now() + limit;
        loop {
            let calls = self.calls();
            if done(&calls) {
                return calls;
            }
            if Instant::now() > deadline {
                let errors: Vec<String> = calls.iter().rev().take(5).filter_map(|c| c.error.clone()).collect();
                panic!(
                    "{}\nthe calls of {}/{} did not get there in {limit:?} ({} calls, last errors: {errors:#?})\n{}",
                    self.cluster.diagnose(&self.ns, &self.pod, &self.url(), None),
                    self.ns,
                    self.pod,
                    calls.len(),
                    self.cluster.state()
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }
}

/// Prints the resident memory of every relayfed process in the clusters' pods, by pod.
pub fn report_rss(clusters: &[&Cluster]) {
    for c in clusters {
        for e in std::fs::read_dir(c.runner_dir.join("pods")).into_iter().flatten().flatten() {
            // `<namespace>_<pod>_<uid>`, whose network namespace is `rf2c-<cluster>-pod-<uid prefix>`.
            let dir = e.file_name().to_string_lossy().into_owned();
            let Some((pod, uid)) = dir.rsplit_once('_') else { continue };
            let short: String = uid.chars().filter(char::is_ascii_hexdigit).take(8).collect();
            let netns = format!("rf2c-{}-pod-{short}", c.name);
            let Ok(out) = std::process::Command::new("ip").args(["netns", "pids", &netns]).output() else { continue };
            for pid in String::from_utf8_lossy(&out.stdout).split_whitespace().filter_map(|p| p.parse::<u32>().ok()) {
                let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
                let argv: Vec<String> =
                    cmd.split(|b| *b == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect();
                if argv.first().is_some_and(|a| a.ends_with("/relayfed") || a.ends_with("/relayfed-proxy")) {
                    let rss = relayfed_test_cluster::process::rss_bytes(pid);
                    let sub = argv.get(1).cloned().unwrap_or_default();
                    eprintln!(
                        "cluster {}: pod {}: {} {sub}: {:.1} MiB",
                        c.name,
                        pod.replacen('_', "/", 1),
                        argv[0].rsplit('/').next().unwrap_or_default(),
                        rss as f64 / 1048576.0
                    );
                }
            }
        }
    }
}

/// Now, in Unix ms (the clock the client's records use).
pub fn unix_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// p50 and p99 of the successful calls' durations, in ms.
pub fn percentiles(calls: &[Call]) -> (f64, f64) {
    let mut us: Vec<u64> = calls.iter().filter(|c| c.ok).map(|c| c.us).collect();
    us.sort_unstable();
    let at = |q: f64| us.get(((us.len() as f64 - 1.0) * q).round() as usize).map_or(0.0, |v| *v as f64 / 1000.0);
    (at(0.5), at(0.99))
}

/// The sum of the samples of `family` whose labels include every `label="value"` of `labels`.
pub fn metric(text: &str, family: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")) || l.starts_with(&format!("{family} ")))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// The metrics of every hop of the path: the client's sidecar, both main relays and the
/// catalog's sidecar.
pub struct Hops {
    /// (hop, its /metrics text).
    pub texts: Vec<(&'static str, String)>,
}

impl Hops {
    /// Scrapes every hop (inside each pod, as a port-forward would).
    pub fn read(a: &Cluster, b: &Cluster) -> Self {
        Self {
            texts: vec![
                ("client sidecar (A)", a.pod_get("shop", "client", 15090, "/metrics")),
                ("main-a", a.pod_get("relayfed-system", "main-a-", 9901, "/metrics")),
                ("main-b", b.pod_get("relayfed-system", "main-b-", 9901, "/metrics")),
                ("catalog sidecar (B)", b.pod_get("shop", "catalog-", 15090, "/metrics")),
            ],
        }
    }

    /// The metrics text of `hop`.
    pub fn text(&self, hop: &str) -> &str {
        self.texts.iter().find(|(h, _)| *h == hop).map(|(_, t)| t.as_str()).unwrap_or_default()
    }

    /// Every hop counted the calls: the origin's calls, each relay's routing, the destination's
    /// inbound streams.
    pub fn assert_all_counted(&self) {
        let checks: [(&str, &str, &[&str]); 4] = [
            (
                "client sidecar (A)",
                "relayfed_proxy_calls_total",
                &["side=\"origin\"", "service=\"catalog.shop\"", "code=\"OK\""],
            ),
            ("main-a", "relayfed_relay_routes_total", &["result=\"forwarded\""]),
            ("main-b", "relayfed_relay_routes_total", &["result=\"local\""]),
            (
                "catalog sidecar (B)",
                "relayfed_proxy_calls_total",
                &["side=\"destination\"", "service=\"catalog.shop\"", "code=\"OK\""],
            ),
        ];
        for (hop, family, labels) in checks {
            let v = metric(self.text(hop), family, labels);
            assert!(v > 0.0, "{hop}: {family}{labels:?} is {v}; its metrics:\n{}", self.text(hop));
            eprintln!("{hop}: {family}{labels:?} = {v}");
        }
    }
}

/// `RELAYFED_E2E_HOLD=<seconds>`: keeps the clusters up that long at the end, printing their
/// kubeconfigs, for a person to look around (not a synchronisation: nothing waits on it).
pub fn hold(clusters: &[&Cluster]) {
    let Some(secs) = std::env::var("RELAYFED_E2E_HOLD").ok().and_then(|s| s.parse::<u64>().ok()) else { return };
    for c in clusters {
        eprintln!("cluster {}: KUBECONFIG={} (node namespace {})", c.name, c.plane.kubeconfig.display(), c.node.name);
    }
    std::thread::sleep(Duration::from_secs(secs));
}
