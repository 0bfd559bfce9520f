//! One control plane: etcd, kube-apiserver (RBAC, default admission plugins), controller-
//! manager, scheduler and kwok with Ready nodes, on 127.0.0.1 ports picked at start.
//!
//! Every process is started, waited for and killed by one owner thread: `setpriv --pdeathsig`
//! fires when the *thread* that spawned a child ends, so the thread must live as long as the
//! plane. Readiness is awaited on each component's own endpoint (etcd `/health`, apiserver
//! `/readyz`, scheduler and controller-manager `/healthz`), then on the objects that prove the
//! controllers run (the `default` ServiceAccount) and on every node's Ready condition.

use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Node, ServiceAccount};
use kube::api::{Api, PostParams};

use crate::pki::Pki;
use crate::ports::free_port;
use crate::process::Proc;

/// How to start a control plane.
#[derive(Debug, Clone)]
pub struct Options {
    /// A name for logs and the kubeconfig context.
    pub name: String,
    /// Node names kwok makes Ready.
    pub nodes: Vec<String>,
    /// Directory for the plane's files; a fresh one under the run root when `None`.
    pub dir: Option<PathBuf>,
    /// Service ClusterIP range.
    pub service_cidr: String,
    /// Pod CIDR kwok hands out pod IPs from.
    pub pod_cidr: String,
    /// Run every component inside this network namespace (a node of [`crate::netns`]) instead
    /// of the test's own.
    pub netns: Option<String>,
    /// The address every component listens on (and the API server advertises: the
    /// `kubernetes` Service's endpoint).
    pub address: String,
    /// Start kwok for `nodes`; without it the caller brings its own nodes (a pod runner).
    pub kwok: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            name: "test".to_owned(),
            nodes: vec!["node-1".to_owned()],
            dir: None,
            service_cidr: "10.96.0.0/16".to_owned(),
            pod_cidr: "10.244.0.0/16".to_owned(),
            netns: None,
            address: "127.0.0.1".to_owned(),
            kwok: true,
        }
    }
}

/// What a started plane offers its users.
#[derive(Debug, Clone)]
pub struct Endpoints {
    /// The plane's directory (certificates, logs, data).
    pub dir: PathBuf,
    /// Admin kubeconfig (`system:masters`).
    pub kubeconfig: PathBuf,
    /// `https://<address>:<port>` of the API server.
    pub server: String,
    /// The CA of every serving certificate (PEM path).
    pub ca_cert: PathBuf,
    /// The service-account signing key (PKCS#8 PEM path), for tokens the API would refuse to mint.
    pub sa_key: PathBuf,
    /// The API server's audit log (JSON lines, level Metadata: who did what to which object).
    pub audit_log: PathBuf,
    /// Directory with kubectl, helm and the components.
    pub bin: PathBuf,
    /// Component name and pid, in start order.
    pub pids: Vec<(String, u32)>,
    /// Seconds from the first process start to every node Ready.
    pub ready_after: Duration,
}

/// A running control plane; dropping it stops every process and removes its directory
/// (kept when `RELAYFED_KEEP_CLUSTER` is set).
pub struct ControlPlane {
    endpoints: Endpoints,
    stop: Option<mpsc::Sender<()>>,
    owner: Option<std::thread::JoinHandle<()>>,
    remove_dir: bool,
}

impl std::ops::Deref for ControlPlane {
    type Target = Endpoints;
    fn deref(&self) -> &Endpoints {
        &self.endpoints
    }
}

impl ControlPlane {
    /// Starts a plane and waits until it is ready. Callable from sync or async code: the work
    /// happens on the owner thread.
    pub fn start(opts: Options) -> anyhow::Result<Self> {
        let bin = crate::build::bin_dir()?;
        let dir = match &opts.dir {
            Some(d) => d.clone(),
            None => crate::run_dir(&opts.name)?,
        };
        std::fs::create_dir_all(&dir)?;
        let (ready_tx, ready_rx) = mpsc::channel::<anyhow::Result<Endpoints>>();
        let (stop_tx, stop_rx) = mpsc::channel::<()>();
        let owner = std::thread::Builder::new().name(format!("cluster-{}", opts.name)).spawn({
            let dir = dir.clone();
            move || {
                let mut procs = Vec::new();
                let started = match crate::runtime() {
                    Ok(rt) => rt.block_on(boot(&opts, &bin, &dir, &mut procs)),
                    Err(e) => Err(e),
                };
                let failed = started.is_err();
                let _ = ready_tx.send(started);
                if !failed {
                    // Parked until the plane is dropped (or the process exits).
                    let _ = stop_rx.recv();
                }
                // Stop in reverse start order: clients before the API server before etcd.
                while let Some(mut p) = procs.pop() {
                    p.kill();
                }
            }
        })?;
        let endpoints = ready_rx.recv().context("control plane owner thread died")??;
        Ok(Self {
            endpoints,
            stop: Some(stop_tx),
            owner: Some(owner),
            remove_dir: std::env::var_os("RELAYFED_KEEP_CLUSTER").is_none(),
        })
    }

    /// Resident memory of every component, in bytes.
    pub fn rss_bytes(&self) -> Vec<(String, u64)> {
        self.pids.iter().map(|(n, pid)| (n.clone(), crate::process::rss_bytes(*pid))).collect()
    }

    /// An admin client for this plane.
    pub async fn client(&self) -> anyhow::Result<kube::Client> {
        crate::kubeconfig::client(&self.kubeconfig).await
    }
}

impl Drop for ControlPlane {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(t) = self.owner.take() {
            let _ = t.join();
        }
        if self.remove_dir {
            let _ = std::fs::remove_dir_all(&self.endpoints.dir);
        }
    }
}

fn s(v: impl std::fmt::Display) -> String {
    v.to_string()
}

async fn boot(opts: &Options, bin: &Path, dir: &Path, procs: &mut Vec<Proc>) -> anyhow::Result<Endpoints> {
    let t0 = Instant::now();
    let service_ip = first_service_ip(&opts.service_cidr)?;
    let addr = opts.address.as_str();
    let pki = Pki::generate(dir, &service_ip, addr)?;
    let (etcd_port, etcd_peer, api_port, cm_port, sched_port) =
        (free_port()?, free_port()?, free_port()?, free_port()?, free_port()?);
    let server = format!("https://{addr}:{api_port}");
    let ns = opts.netns.as_deref();
    let kubeconfig = crate::kubeconfig::write_admin(dir, &opts.name, &server, &pki)?;
    let p = |x: &Path| x.display().to_string();

    // Writes only (reads are not logged): enough to tell which identity wrote what, e.g. that
    // a follower replica of the operator wrote nothing.
    let audit_policy = dir.join("audit-policy.yaml");
    std::fs::write(
        &audit_policy,
        "apiVersion: audit.k8s.io/v1\nkind: Policy\nomitStages: [RequestReceived]\nrules:\n\
         - level: None\n  verbs: [get, list, watch]\n\
         - level: Metadata\n",
    )?;
    let audit_log = dir.join("audit.log");
    let etcd_url = format!("http://{addr}:{etcd_port}");
    let peer_url = format!("http://127.0.0.1:{etcd_peer}");
    procs.push(Proc::spawn_in(
        ns,
        "etcd",
        &bin.join("etcd"),
        &[
            s(format_args!("--data-dir={}", p(&dir.join("etcd")))),
            s(format_args!("--listen-client-urls={etcd_url}")),
            s(format_args!("--advertise-client-urls={etcd_url}")),
            s(format_args!("--listen-peer-urls={peer_url}")),
            s(format_args!("--initial-advertise-peer-urls={peer_url}")),
            s(format_args!("--initial-cluster=t={peer_url}")),
            s("--name=t"),
            s("--unsafe-no-fsync"),
            s("--log-level=warn"),
        ],
        dir,
    )?);
    wait(procs, "etcd /health", Duration::from_secs(30), || async {
        crate::http::get_plain_at(addr, etcd_port, "/health").await.is_ok_and(|b| b.contains("\"health\":\"true\""))
    })
    .await?;

    // With nodes of its own (no kwok), the `kubernetes` Service gets the advertised address as
    // its endpoint, as in a real cluster; kwok's fake pods never call it.
    let reconciler = if opts.kwok { "none" } else { "lease" };
    procs.push(Proc::spawn_in(
        ns,
        "kube-apiserver",
        &bin.join("kube-apiserver"),
        &[
            s(format_args!("--etcd-servers={etcd_url}")),
            s(format_args!("--bind-address={addr}")),
            s(format_args!("--advertise-address={addr}")),
            s(format_args!("--secure-port={api_port}")),
            s(format_args!("--tls-cert-file={}", p(&pki.serving_cert))),
            s(format_args!("--tls-private-key-file={}", p(&pki.serving_key))),
            s(format_args!("--client-ca-file={}", p(&pki.ca_cert))),
            s(format_args!("--service-account-issuer={server}")),
            s(format_args!("--service-account-key-file={}", p(&pki.sa_pub))),
            s(format_args!("--service-account-signing-key-file={}", p(&pki.sa_key))),
            s("--authorization-mode=Node,RBAC"),
            s(format_args!("--service-cluster-ip-range={}", opts.service_cidr)),
            s("--allow-privileged=true"),
            s(format_args!("--endpoint-reconciler-type={reconciler}")),
            s("--profiling=false"),
            s(format_args!("--cert-dir={}", p(&dir.join("apiserver-certs")))),
            s(format_args!("--audit-policy-file={}", p(&audit_policy))),
            s(format_args!("--audit-log-path={}", p(&audit_log))),
            s("--audit-log-format=json"),
        ],
        dir,
    )?);
    let admin = crate::kubeconfig::client(&kubeconfig).await?;
    wait(procs, "kube-apiserver /readyz", Duration::from_secs(90), || {
        let c = admin.clone();
        async move {
            let req = http::Request::get("/readyz").body(Vec::new());
            match req {
                Ok(r) => c.request_text(r).await.is_ok_and(|b| b.trim() == "ok"),
                Err(_) => false,
            }
        }
    })
    .await?;

    let common = |port: u16| {
        vec![
            s(format_args!("--kubeconfig={}", p(&kubeconfig))),
            s(format_args!("--authentication-kubeconfig={}", p(&kubeconfig))),
            s(format_args!("--authorization-kubeconfig={}", p(&kubeconfig))),
            s("--leader-elect=false"),
            s(format_args!("--bind-address={addr}")),
            s(format_args!("--secure-port={port}")),
            s(format_args!("--tls-cert-file={}", p(&pki.serving_cert))),
            s(format_args!("--tls-private-key-file={}", p(&pki.serving_key))),
        ]
    };
    let mut cm_args = common(cm_port);
    cm_args.extend([
        s("--controllers=*"),
        s(format_args!("--service-account-private-key-file={}", p(&pki.sa_key))),
        s(format_args!("--root-ca-file={}", p(&pki.ca_cert))),
        s(format_args!("--cluster-signing-cert-file={}", p(&pki.ca_cert))),
        s(format_args!("--cluster-signing-key-file={}", p(&pki.ca_key))),
        s(format_args!("--service-cluster-ip-range={}", opts.service_cidr)),
        s("--use-service-account-credentials=true"),
        // The default node-monitor grace period (50 s) stays: kwok renews node Leases about
        // every 25 s at its default 40 s duration, and a 20 s grace made the node flap
        // NotReady every cycle, which marks every pod NotReady for good (kwok does not make
        // them Ready again) — Deployments lost their ready replicas mid-test.
    ]);
    procs.push(Proc::spawn_in(ns, "kube-controller-manager", &bin.join("kube-controller-manager"), &cm_args, dir)?);
    procs.push(Proc::spawn_in(ns, "kube-scheduler", &bin.join("kube-scheduler"), &common(sched_port), dir)?);
    for (what, port) in [("kube-controller-manager /healthz", cm_port), ("kube-scheduler /healthz", sched_port)] {
        let c = crate::kubeconfig::client_at(&kubeconfig, &format!("https://{addr}:{port}")).await?;
        wait(procs, what, Duration::from_secs(60), || {
            let c = c.clone();
            async move {
                match http::Request::get("/healthz").body(Vec::new()) {
                    Ok(r) => c.request_text(r).await.is_ok_and(|b| b.trim() == "ok"),
                    Err(_) => false,
                }
            }
        })
        .await?;
    }
    // The service-account controllers run: new namespaces get their default ServiceAccount.
    wait(procs, "the default ServiceAccount", Duration::from_secs(60), || {
        let sas: Api<ServiceAccount> = Api::namespaced(admin.clone(), "default");
        async move { sas.get_opt("default").await.ok().flatten().is_some() }
    })
    .await?;

    let endpoints = |procs: &[Proc]| Endpoints {
        dir: dir.to_owned(),
        kubeconfig: kubeconfig.clone(),
        server: server.clone(),
        ca_cert: pki.ca_cert.clone(),
        sa_key: pki.sa_key.clone(),
        audit_log: audit_log.clone(),
        bin: bin.to_owned(),
        pids: procs.iter().map(|p| (p.name.clone(), p.pid())).collect(),
        ready_after: t0.elapsed(),
    };
    if !opts.kwok {
        return Ok(endpoints(procs));
    }
    procs.push(Proc::spawn(
        "kwok",
        &bin.join("kwok"),
        &[
            s(format_args!("--kubeconfig={}", p(&kubeconfig))),
            s(format_args!("--config={}", p(&bin.join("kwok-stages.yaml")))),
            s("--manage-all-nodes=true"),
            s(format_args!("--cidr={}", opts.pod_cidr)),
            s("--node-ip=127.0.0.1"),
            // Renew node Leases more often (every ~12 s), well within the grace period.
            s("--node-lease-duration-seconds=20"),
        ],
        dir,
    )?);
    let nodes: Api<Node> = Api::all(admin.clone());
    for name in &opts.nodes {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "type": "kwok"}},
            "status": {"allocatable": {"cpu": "32", "memory": "256Gi", "pods": "110"},
                       "capacity": {"cpu": "32", "memory": "256Gi", "pods": "110"}}
        }))?;
        nodes.create(&PostParams::default(), &node).await.with_context(|| format!("creating node {name}"))?;
    }
    for name in &opts.nodes {
        wait(procs, &format!("node {name} Ready"), Duration::from_secs(60), || {
            let nodes = nodes.clone();
            let name = name.clone();
            async move {
                nodes
                    .get(&name)
                    .await
                    .ok()
                    .and_then(|n| n.status)
                    .and_then(|s| s.conditions)
                    .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
            }
        })
        .await?;
    }
    Ok(endpoints(procs))
}

/// Polls `check` (every 100 ms, then up to 1 s) until it holds; fails early, with the
/// component's log, when a started process exits.
async fn wait<F, Fut>(procs: &mut [Proc], what: &str, limit: Duration, mut check: F) -> anyhow::Result<()>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(100);
    loop {
        if check().await {
            return Ok(());
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.exited() {
                bail!("{} exited ({status}) while waiting for {what}; its log ends:\n{}", p.name, p.log_tail(30));
            }
        }
        if Instant::now() > deadline {
            let last = procs.last().map(|p| format!("\n{} log ends:\n{}", p.name, p.log_tail(30))).unwrap_or_default();
            bail!("timed out after {limit:?} waiting for {what}{last}");
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_secs(1));
    }
}

/// The first address of the service range (the `kubernetes` Service's ClusterIP).
fn first_service_ip(cidr: &str) -> anyhow::Result<String> {
    let base = cidr.split('/').next().unwrap_or(cidr);
    let ip: std::net::Ipv4Addr = base.parse().with_context(|| format!("service CIDR {cidr}"))?;
    Ok(std::net::Ipv4Addr::from(u32::from(ip) + 1).to_string())
}
