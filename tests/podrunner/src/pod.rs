//! One pod's life on this node, as the kubelet drives it: network, volumes, init containers in
//! order (a `restartPolicy: Always` init container is a native sidecar: started, then left
//! running while the next one starts), then the containers; restarts per restart policy with a
//! capped backoff; startup, readiness and liveness probes; status written back; and on
//! deletion, containers stopped (SIGTERM, then SIGKILL after the grace period), sidecars last,
//! the namespace removed and the pod object deleted.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use k8s_openapi::api::core::v1::{Container, Pod, Probe};
use kube::Api;
use kube::api::{DeleteParams, Patch, PatchParams, Preconditions};
use serde_json::{Value, json};
use tokio::process::Child;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::container::{self, Launch};
use crate::images::Images;
use crate::net::{Network, PodNet};
use crate::volumes::{self, PodVolumes};

/// What every pod worker shares.
pub struct Node {
    /// Admin client of the cluster.
    pub client: kube::Client,
    /// Image map.
    pub images: Images,
    /// Pod network.
    pub network: Network,
    /// State directory (pods, logs, scripts).
    pub dir: PathBuf,
    /// Node IP (`status.hostIP`).
    pub node_ip: String,
    /// Cluster DNS server written into each pod's resolv.conf.
    pub dns: Ipv4Addr,
    /// Cluster domain (`cluster.local`).
    pub domain: String,
    /// The `kubernetes` Service (ClusterIP, port) handed to containers.
    pub api_service: (String, u16),
}

/// Longest wait between restarts of a crashing container (the kubelet's is 5 min; tests want
/// recovery they can wait for).
const MAX_BACKOFF: Duration = Duration::from_secs(10);
/// Longest grace period honoured on deletion.
const MAX_GRACE: Duration = Duration::from_secs(10);

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    Init,
    Sidecar,
    Main,
}

#[derive(Clone, Debug, PartialEq)]
enum State {
    Waiting(String, String),
    Running(String),
    Terminated { code: i32, started: String, finished: String },
}

#[derive(Default)]
struct ProbeState {
    due: Option<Instant>,
    ok_streak: i32,
    fail_streak: i32,
}

struct Ctr {
    spec: Container,
    kind: Kind,
    child: Option<Child>,
    state: State,
    last: Option<State>,
    restarts: i32,
    ready: bool,
    started: bool,
    retry_at: Option<Instant>,
    readiness: ProbeState,
    liveness: ProbeState,
    startup: ProbeState,
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn state_json(s: &State) -> Value {
    match s {
        State::Waiting(reason, message) => json!({"waiting": {"reason": reason, "message": message}}),
        State::Running(at) => json!({"running": {"startedAt": at}}),
        State::Terminated { code, started, finished } => json!({"terminated": {
            "exitCode": code, "reason": if *code == 0 { "Completed" } else { "Error" },
            "startedAt": started, "finishedAt": finished}}),
    }
}

impl Ctr {
    fn new(spec: Container, kind: Kind) -> Self {
        Self {
            spec,
            kind,
            child: None,
            state: State::Waiting("PodInitializing".into(), String::new()),
            last: None,
            restarts: 0,
            ready: false,
            started: false,
            retry_at: None,
            readiness: ProbeState::default(),
            liveness: ProbeState::default(),
            startup: ProbeState::default(),
        }
    }

    fn running(&self) -> bool {
        matches!(self.state, State::Running(_))
    }

    fn status(&self) -> Value {
        let mut v = json!({
            "name": self.spec.name, "image": self.spec.image.clone().unwrap_or_default(), "imageID": "",
            "ready": self.ready, "started": self.started, "restartCount": self.restarts,
            "state": state_json(&self.state),
        });
        if let Some(pid) = self.child.as_ref().and_then(Child::id) {
            v["containerID"] = json!(format!("runner://{pid}"));
        }
        if let Some(l) = &self.last {
            v["lastState"] = state_json(l);
        }
        v
    }
}

/// Starts the worker of one pod; it ends when the pod is gone and cleaned up.
pub fn spawn(node: Arc<Node>, rx: watch::Receiver<Option<Pod>>) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut w = match Worker::new(node, rx) {
            Some(w) => w,
            None => return,
        };
        w.run().await;
    })
}

struct Worker {
    node: Arc<Node>,
    rx: watch::Receiver<Option<Pod>>,
    pod: Pod,
    dir: PathBuf,
    net: Option<PodNet>,
    volumes: PodVolumes,
    ctrs: Vec<Ctr>,
    last_status: Value,
    message: Option<String>,
    start_time: String,
}

impl Worker {
    fn new(node: Arc<Node>, rx: watch::Receiver<Option<Pod>>) -> Option<Self> {
        let pod = rx.borrow().clone()?;
        let spec = pod.spec.clone()?;
        let m = &pod.metadata;
        let dir = node.dir.join("pods").join(format!(
            "{}_{}_{}",
            m.namespace.as_deref().unwrap_or_default(),
            m.name.as_deref().unwrap_or_default(),
            m.uid.as_deref().unwrap_or_default()
        ));
        let mut ctrs = Vec::new();
        for c in spec.init_containers.unwrap_or_default() {
            let kind = if c.restart_policy.as_deref() == Some("Always") { Kind::Sidecar } else { Kind::Init };
            ctrs.push(Ctr::new(c, kind));
        }
        ctrs.extend(spec.containers.into_iter().map(|c| Ctr::new(c, Kind::Main)));
        Some(Self {
            volumes: PodVolumes::new(&dir),
            node,
            rx,
            pod,
            dir,
            net: None,
            ctrs,
            last_status: Value::Null,
            message: None,
            start_time: now(),
        })
    }

    fn name(&self) -> String {
        format!(
            "{}/{}",
            self.pod.metadata.namespace.as_deref().unwrap_or_default(),
            self.pod.metadata.name.as_deref().unwrap_or_default()
        )
    }

    fn api(&self) -> Api<Pod> {
        Api::namespaced(self.node.client.clone(), self.pod.metadata.namespace.as_deref().unwrap_or_default())
    }

    async fn run(&mut self) {
        info!(pod = %self.name(), "pod assigned to this node");
        let mut tick = tokio::time::interval(Duration::from_millis(250));
        let mut next_sync = Instant::now();
        loop {
            tokio::select! {
                changed = self.rx.changed() => {
                    if changed.is_err() { break; }
                }
                _ = tick.tick() => {}
            }
            let latest = self.rx.borrow().clone();
            match latest {
                Some(p) if p.metadata.deletion_timestamp.is_none() => self.pod = p,
                _ => break,
            }
            if self.net.is_none() && !self.setup() {
                self.report().await;
                continue;
            }
            if Instant::now() >= next_sync {
                next_sync = Instant::now() + Duration::from_secs(5);
                match self.volumes.sync(&self.node.client, &self.pod).await {
                    Ok(()) => self.message = None,
                    Err(e) => self.message = Some(format!("{e:#}")),
                }
            }
            if self.message.is_none() {
                self.step().await;
            }
            self.report().await;
        }
        self.shutdown().await;
    }

    fn setup(&mut self) -> bool {
        let uid = self.pod.metadata.uid.clone().unwrap_or_default();
        match self.node.network.attach(&uid) {
            Ok(net) => {
                let ns = self.pod.metadata.namespace.clone().unwrap_or_default();
                let d = &self.node.domain;
                let resolv =
                    format!("search {ns}.svc.{d} svc.{d} {d}\nnameserver {}\noptions ndots:5\n", self.node.dns);
                let hosts = format!(
                    "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n{}\t{}\n",
                    net.ip,
                    self.pod.metadata.name.as_deref().unwrap_or_default()
                );
                let written = std::fs::create_dir_all(&self.dir)
                    .and_then(|()| std::fs::write(self.dir.join("resolv.conf"), &resolv))
                    .and_then(|()| std::fs::write(self.dir.join("hosts"), &hosts))
                    .and_then(|()| std::fs::create_dir_all(format!("/etc/netns/{}", net.netns)))
                    .and_then(|()| std::fs::write(format!("/etc/netns/{}/resolv.conf", net.netns), &resolv));
                if let Err(e) = written {
                    self.message = Some(format!("writing the pod's resolv.conf: {e}"));
                }
                info!(pod = %self.name(), ip = %net.ip, netns = %net.netns, "pod network ready");
                self.net = Some(net);
                true
            }
            Err(e) => {
                self.message = Some(format!("pod network: {e:#}"));
                false
            }
        }
    }

    fn backoff(restarts: i32) -> Duration {
        Duration::from_secs(1u64 << restarts.clamp(0, 4) as u32).min(MAX_BACKOFF)
    }

    async fn start(&mut self, i: usize) {
        let Some(net) = self.net.clone() else { return };
        let c = self.ctrs[i].spec.clone();
        let image = c.image.clone().unwrap_or_default();
        let result = async {
            let spec = self
                .node
                .images
                .find(&image)
                .ok_or_else(|| anyhow::anyhow!("image {image} is not in the pod runner's image map"))?
                .clone();
            let api = (self.node.api_service.0.as_str(), self.node.api_service.1);
            let env = volumes::environment(&self.node.client, &self.pod, &c, &spec.env, api).await?;
            let launch = Launch::resolve(&self.pod, &c, &spec, env, &|v| self.volumes.path(v))?;
            let root = spec.rootfs.clone().unwrap_or_else(|| self.node.dir.join("hostroot"));
            std::fs::create_dir_all(&root)?;
            let hostname = self.pod.metadata.name.clone().unwrap_or_default();
            let script = self.dir.join("scripts").join(format!("{}.sh", c.name));
            std::fs::create_dir_all(self.dir.join("scripts"))?;
            std::fs::write(&script, launch.script(&root, &self.dir, &hostname))?;
            let log = self.dir.join("logs").join(&c.name).join(format!("{}.log", self.ctrs[i].restarts));
            container::spawn(&net.netns, &script, &log)
        }
        .await;
        let ctr = &mut self.ctrs[i];
        match result {
            Ok(child) => {
                info!(pod = %self.pod.metadata.name.as_deref().unwrap_or_default(), container = %c.name, pid = ?child.id(), "container started");
                ctr.child = Some(child);
                ctr.state = State::Running(now());
                ctr.started = ctr.spec.startup_probe.is_none();
                ctr.ready = false;
                let delay = |p: &Option<Probe>| {
                    p.as_ref()
                        .map(|p| Instant::now() + Duration::from_secs(p.initial_delay_seconds.unwrap_or(0) as u64))
                };
                ctr.readiness = ProbeState { due: delay(&ctr.spec.readiness_probe), ..Default::default() };
                ctr.liveness = ProbeState { due: delay(&ctr.spec.liveness_probe), ..Default::default() };
                ctr.startup = ProbeState { due: delay(&ctr.spec.startup_probe), ..Default::default() };
            }
            Err(e) => {
                warn!(container = %c.name, "cannot start: {e:#}");
                ctr.state = State::Waiting("CreateContainerConfigError".into(), format!("{e:#}"));
                ctr.retry_at = Some(Instant::now() + Self::backoff(ctr.restarts));
            }
        }
    }

    /// Records exits; returns whether a container may be (re)started now.
    fn reap(&mut self, i: usize) -> Option<i32> {
        let ctr = &mut self.ctrs[i];
        let status = ctr.child.as_mut()?.try_wait().ok()??;
        let code = status.code().unwrap_or(128 + 9);
        let started = match &ctr.state {
            State::Running(at) => at.clone(),
            _ => now(),
        };
        ctr.child = None;
        ctr.ready = false;
        ctr.state = State::Terminated { code, started, finished: now() };
        Some(code)
    }

    fn restart_policy(&self) -> String {
        self.pod.spec.as_ref().and_then(|s| s.restart_policy.clone()).unwrap_or_else(|| "Always".into())
    }

    /// Whether an exited container is started again, per its kind and the pod's policy.
    fn restarts(&self, i: usize, code: i32) -> bool {
        match (self.ctrs[i].kind, self.restart_policy().as_str()) {
            (Kind::Sidecar, _) => true,
            (_, "Always") => self.ctrs[i].kind == Kind::Main || code != 0,
            (_, "OnFailure") => code != 0,
            _ => false,
        }
    }

    async fn step(&mut self) {
        // Init containers, in order; each sidecar only needs to have started.
        for i in 0..self.ctrs.len() {
            if self.ctrs[i].kind == Kind::Main {
                break;
            }
            if let Some(code) = self.reap(i) {
                let restart = self.restarts(i, code);
                let ctr = &mut self.ctrs[i];
                if restart {
                    ctr.last = Some(ctr.state.clone());
                    ctr.restarts += 1;
                    ctr.retry_at = Some(Instant::now() + Self::backoff(ctr.restarts));
                }
            }
            let ctr = &self.ctrs[i];
            let done = match ctr.kind {
                Kind::Init => matches!(ctr.state, State::Terminated { code: 0, .. }),
                _ => ctr.started,
            };
            if done {
                continue;
            }
            if ctr.child.is_none() && ctr.retry_at.is_none_or(|t| Instant::now() >= t) {
                if matches!(ctr.state, State::Terminated { .. }) && !self.restarts(i, 1) {
                    return; // failed for good: the pod is Failed
                }
                self.ctrs[i].retry_at = None;
                self.start(i).await;
            }
            if !(self.ctrs[i].kind == Kind::Sidecar && self.ctrs[i].started) {
                self.probe_all().await;
                return;
            }
        }
        for i in 0..self.ctrs.len() {
            if let Some(code) = self.reap(i)
                && self.restarts(i, code)
            {
                let ctr = &mut self.ctrs[i];
                ctr.last = Some(ctr.state.clone());
                ctr.restarts += 1;
                ctr.retry_at = Some(Instant::now() + Self::backoff(ctr.restarts));
            }
            let ctr = &self.ctrs[i];
            let never_ran = matches!(ctr.state, State::Waiting(..));
            let due = ctr.retry_at.is_some_and(|t| Instant::now() >= t);
            if ctr.kind != Kind::Init && ctr.child.is_none() && (due || (never_ran && ctr.retry_at.is_none())) {
                self.ctrs[i].retry_at = None;
                self.start(i).await;
            }
        }
        self.probe_all().await;
    }

    async fn probe_all(&mut self) {
        let Some(ip) = self.net.as_ref().map(|n| n.ip) else { return };
        for ctr in self.ctrs.iter_mut().filter(|c| c.running()) {
            let spec = ctr.spec.clone();
            if !ctr.started {
                if let Some(p) = &spec.startup_probe
                    && let Some(ok) = probe_due(ip, &spec, p, &mut ctr.startup).await
                {
                    ctr.started = ok;
                }
                continue;
            }
            match &spec.readiness_probe {
                None => ctr.ready = true,
                Some(p) => {
                    if let Some(ok) = probe_due(ip, &spec, p, &mut ctr.readiness).await {
                        ctr.ready = ok;
                    }
                }
            }
            if let Some(p) = &spec.liveness_probe
                && probe_due(ip, &spec, p, &mut ctr.liveness).await == Some(false)
                && let Some(child) = ctr.child.as_mut()
            {
                warn!(container = %spec.name, "liveness probe failed: restarting the container");
                let _ = child.start_kill();
            }
        }
    }

    fn phase(&self) -> &'static str {
        let mains: Vec<&Ctr> = self.ctrs.iter().filter(|c| c.kind == Kind::Main).collect();
        let init_failed = self.ctrs.iter().any(|c| {
            c.kind == Kind::Init
                && matches!(c.state, State::Terminated { code, .. } if code != 0)
                && c.retry_at.is_none()
        }) && self.restart_policy() == "Never";
        if init_failed {
            return "Failed";
        }
        let terminated = |c: &&Ctr| matches!(c.state, State::Terminated { .. }) && c.retry_at.is_none();
        if !mains.is_empty() && mains.iter().all(terminated) {
            let ok = mains.iter().all(|c| matches!(c.state, State::Terminated { code: 0, .. }));
            return if ok { "Succeeded" } else { "Failed" };
        }
        if mains.iter().all(|c| !matches!(c.state, State::Waiting(..))) { "Running" } else { "Pending" }
    }

    async fn report(&mut self) {
        let init_done = self.ctrs.iter().filter(|c| c.kind != Kind::Main).all(|c| match c.kind {
            Kind::Init => matches!(c.state, State::Terminated { code: 0, .. }),
            _ => c.started,
        });
        let ready = self.ctrs.iter().filter(|c| c.kind != Kind::Init).all(|c| c.ready) && init_done;
        let cond = |t: &str, ok: bool| json!({"type": t, "status": if ok { "True" } else { "False" }});
        let mut status = json!({
            "phase": self.phase(),
            "hostIP": self.node.node_ip, "hostIPs": [{"ip": self.node.node_ip}],
            "startTime": self.start_time,
            "conditions": [
                cond("PodScheduled", true), cond("PodReadyToStartContainers", self.net.is_some()),
                cond("Initialized", init_done), cond("ContainersReady", ready), cond("Ready", ready),
            ],
            "initContainerStatuses": self.ctrs.iter().filter(|c| c.kind != Kind::Main).map(Ctr::status).collect::<Vec<_>>(),
            "containerStatuses": self.ctrs.iter().filter(|c| c.kind == Kind::Main).map(Ctr::status).collect::<Vec<_>>(),
            "message": self.message,
        });
        if let Some(net) = &self.net {
            status["podIP"] = json!(net.ip.to_string());
            status["podIPs"] = json!([{"ip": net.ip.to_string()}]);
        }
        if status == self.last_status {
            return;
        }
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        match self.api().patch_status(&name, &PatchParams::default(), &Patch::Merge(json!({"status": status}))).await {
            Ok(_) => self.last_status = status,
            Err(e) => warn!(pod = %self.name(), "status update failed: {e}"),
        }
    }

    async fn stop(&mut self, kinds: &[Kind], grace: Duration) {
        let mut pids = Vec::new();
        for c in self.ctrs.iter_mut().rev().filter(|c| kinds.contains(&c.kind)) {
            if let Some(pid) = c.child.as_ref().and_then(Child::id) {
                let _ = std::process::Command::new("kill").args(["-TERM", &pid.to_string()]).status();
                pids.push(pid);
            }
        }
        let deadline = Instant::now() + grace;
        for c in self.ctrs.iter_mut().filter(|c| kinds.contains(&c.kind)) {
            if let Some(child) = c.child.as_mut() {
                let left = deadline.saturating_duration_since(Instant::now());
                if tokio::time::timeout(left, child.wait()).await.is_err() {
                    let _ = child.kill().await;
                }
            }
            c.child = None;
        }
    }

    async fn shutdown(&mut self) {
        let grace = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.termination_grace_period_seconds)
            .map_or(MAX_GRACE, |s| Duration::from_secs(s.max(0) as u64).min(MAX_GRACE));
        info!(pod = %self.name(), "stopping the pod");
        self.stop(&[Kind::Main, Kind::Init], grace).await;
        self.stop(&[Kind::Sidecar], grace).await;
        if let Some(net) = self.net.take() {
            self.node.network.detach(&net);
        }
        // The kubelet's last word: remove the object once nothing of it runs.
        let name = self.pod.metadata.name.clone().unwrap_or_default();
        let dp = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions { uid: self.pod.metadata.uid.clone(), resource_version: None }),
            ..Default::default()
        };
        if self.rx.borrow().is_some() {
            let _ = self.api().delete(&name, &dp).await;
        }
        let _ = std::fs::remove_dir_all(self.dir.join("volumes"));
    }
}

/// Runs a probe when it is due; `Some(result)` once the threshold decides.
async fn probe_due(ip: Ipv4Addr, c: &Container, p: &Probe, st: &mut ProbeState) -> Option<bool> {
    let due = st.due?;
    if Instant::now() < due {
        return None;
    }
    st.due = Some(Instant::now() + Duration::from_secs(p.period_seconds.unwrap_or(10).max(1) as u64));
    match crate::probe::run(ip, c, p).await {
        Ok(()) => {
            st.fail_streak = 0;
            st.ok_streak += 1;
            (st.ok_streak >= p.success_threshold.unwrap_or(1)).then_some(true)
        }
        Err(why) => {
            st.ok_streak = 0;
            st.fail_streak += 1;
            tracing::debug!(container = %c.name, "probe failed: {why}");
            (st.fail_streak >= p.failure_threshold.unwrap_or(3)).then_some(false)
        }
    }
}

/// Pod keys of the workers a node runs.
pub type Workers = BTreeMap<String, (watch::Sender<Option<Pod>>, tokio::task::JoinHandle<()>)>;
