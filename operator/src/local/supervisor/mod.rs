//! The local-mode supervisor: admits and compiles the CRs, keeps key material, serves config
//! distribution, runs one child process per relay, restarts crashed ones with backoff, and
//! applies edits of the watched CR files.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use relayfed_crds::AnyResource;
use relayfed_proto::config::{Role, Snapshot};
use serde_json::Value;
use tokio::sync::mpsc;
use tracing::{error, info, warn};

mod ca;
mod processes;

use super::keys::{KeyStore, NodeKeys};
use super::sources::{Loaded, Sources};
use super::workloads;
use super::{StateDir, SupervisorFile};
use crate::distribution::Distributor;
use crate::metrics::OperatorMetrics;
use crate::plan::{self, KeyLayout, Placement};

/// Node id in the distribution server's certificate.
pub const SERVER_NODE: &str = relayfed_proto::distribution::DEFAULT_SERVER_NODE;
/// How often the CR files are checked for edits.
const WATCH_INTERVAL: Duration = Duration::from_millis(250);
/// How long a node may take to print its ready line.
const READY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a node gets to exit after SIGTERM before SIGKILL.
const STOP_GRACE: Duration = Duration::from_secs(5);

/// Options of `relayfed local up`.
#[derive(Clone, Debug)]
pub struct UpOptions {
    /// `-f` inputs.
    pub inputs: Vec<PathBuf>,
    /// State directory.
    pub state: StateDir,
    /// Passphrase file for the key material (else `$RELAYFED_PASSPHRASE`, else generated).
    pub passphrase_file: Option<PathBuf>,
    /// The `relayfed-proxy` that runs each node (`main-relay|home --config F --config-server A
    /// --exit-with-parent`), the binary clusters run.
    pub proxy_exe: PathBuf,
    /// Start a Prometheus scraping every node (`--prometheus`).
    pub prometheus: bool,
}

/// Lifecycle of a node process.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "camelCase")]
pub enum ProcState {
    /// Spawned, no ready line yet.
    Starting,
    /// Serving.
    Running,
    /// Exited unexpectedly; a restart is scheduled.
    CrashLoop,
    /// Being stopped (for a restart or shutdown).
    Stopping,
}

/// One supervised node process.
#[derive(Clone, Debug)]
pub struct NodeProc {
    /// Role.
    pub role: Role,
    /// Lifecycle state.
    pub state: ProcState,
    /// Process id while one runs.
    pub pid: Option<u32>,
    /// Unexpected exits so far.
    pub restarts: u64,
    /// The ready line of the current process.
    pub ready: Option<Value>,
    /// How the last process ended.
    pub last_exit: Option<String>,
    /// The snapshot the current process started with (restart-only fields compare to it).
    pub started_with: Snapshot,
    generation: u64,
    started_at: Instant,
    restart_now: bool,
}

/// What the control API reports besides the nodes.
#[derive(Clone, Debug, Default)]
pub struct Shared {
    /// Nodes by id.
    pub nodes: BTreeMap<String, NodeProc>,
    /// Currently admitted resources.
    pub resources: Vec<AnyResource>,
    /// Files read.
    pub files: Vec<PathBuf>,
    /// Plan warnings.
    pub warnings: Vec<String>,
    /// The last rejected edit: when (unix seconds) and every message.
    pub last_rejected: Option<(u64, Vec<String>)>,
    /// The ECH rollout's last evaluation and recent transitions (null before the first).
    pub rollout: Value,
    /// Accepted edits since start.
    pub accepted_edits: u64,
    /// Built-in workloads: (node, service, address, kind).
    pub workloads: Vec<(String, String, SocketAddr, &'static str)>,
    /// CA fingerprint.
    pub ca_fingerprint: Option<String>,
    /// The CA rotation in progress (null when none).
    pub ca_rotation: Value,
}

enum Event {
    Ready { node: String, generation: u64, line: Value },
    Exited { node: String, generation: u64, status: String },
    Restart { node: String },
    RotateKeys(BTreeSet<String>),
    RotateCa { stage_for: Duration, overlap: Duration },
    AdvanceCa,
    Down,
}

/// A running supervisor.
pub struct Supervisor {
    opts: UpOptions,
    sources: Sources,
    loaded: Loaded,
    keys: KeyStore,
    passphrase_file: PathBuf,
    remove_passphrase_on_exit: bool,
    /// The config distribution store.
    pub distributor: Arc<Distributor>,
    distribution_addr: SocketAddr,
    /// The distribution server's identity (a CA rotation replaces it).
    server_identity: relayfed_serving::identity::SharedIdentity,
    /// When a CA rotation in progress is looked at next.
    ca_due: tokio::time::Instant,
    /// State shown by `status`.
    pub shared: Arc<Mutex<Shared>>,
    /// Metrics (`/metrics` of the control API).
    pub metrics: Arc<OperatorMetrics>,
    events: mpsc::UnboundedSender<Event>,
    events_rx: Option<mpsc::UnboundedReceiver<Event>>,
    workloads: workloads::Running,
    shutting_down: bool,
    prometheus: Option<super::prometheus::Prometheus>,
    control: Option<SocketAddr>,
    /// When the ECH key schedules run next, and the relays asked to rotate now.
    keys_due: tokio::time::Instant,
    rotate_now: BTreeSet<String>,
    /// The ECH rollout (analysis of the homes' reports, steps, automatic rollback).
    rollout: super::rollout::LocalRollout,
}

fn now_unix() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn federation_of(resources: &[AnyResource]) -> Option<(String, String)> {
    resources.iter().find_map(|r| match r {
        AnyResource::Federation(f) => Some((f.spec.trust_domain.clone(), f.spec.public_name.clone())),
        _ => None,
    })
}

/// Snapshots by node and the plan's warnings.
type Compiled = (BTreeMap<String, Snapshot>, Vec<String>);

/// Compiles admitted resources into the snapshots local nodes run with, and the plan's warnings.
fn compile(keys: &KeyStore, passphrase_file: &std::path::Path, loaded: &Loaded) -> Result<Compiled, Vec<String>> {
    let placement = Placement::local(KeyLayout { dir: keys.dir.clone() }, passphrase_file.to_owned());
    let plan = plan::compile(&loaded.resources, &placement)
        .map_err(|errs| errs.iter().map(ToString::to_string).collect::<Vec<_>>())?;
    Ok((plan.snapshots, plan.warnings))
}

/// Gives home snapshots the ECH configs of the main relays' key files (kept by this
/// supervisor; our homes seal to configs from their snapshot), and each main relay its
/// config signed by our CA to announce to peers (a partner's homes check it against their
/// pin of our CA, docs/protocol.md §5.7).
fn with_ech_configs(
    keys: &KeyStore,
    nodes: &[NodeKeys],
    snapshots: &mut BTreeMap<String, Snapshot>,
) -> Result<(), super::keys::KeyError> {
    let configs = keys.ech_configs(nodes)?;
    plan::set_ech_configs(snapshots, &configs);
    let mut announced = keys.ech_announcements(&configs)?;
    for (node, s) in snapshots.iter_mut().filter(|(_, s)| s.node.role == relayfed_proto::config::Role::Main) {
        if let Some(a) = announced.remove(node) {
            s.ech_announcement = Some(a);
        }
    }
    Ok(())
}

/// The key material the snapshots' nodes need.
fn node_keys(snapshots: &BTreeMap<String, Snapshot>) -> Vec<NodeKeys> {
    snapshots
        .iter()
        .map(|(n, s)| NodeKeys {
            node: n.clone(),
            role: s.node.role,
            ech_key: s.ech.as_ref().map(|e| e.key_file.clone()),
        })
        .collect()
}

impl Supervisor {
    /// Admits, compiles, prepares keys, starts distribution, workloads and every node.
    /// Errors name the file, object and field (as `kubectl apply` would).
    pub async fn start(opts: UpOptions) -> anyhow::Result<Self> {
        let sources = Sources::new(opts.inputs.clone());
        let loaded = sources
            .load(None)
            .map_err(|errs| anyhow::anyhow!("the manifests were rejected:\n  {}", errs.join("\n  ")))?;
        let (trust_domain, public_name) =
            federation_of(&loaded.resources).context("the manifests define no RelayFederation")?;
        std::fs::create_dir_all(opts.state.run().join("nodes"))?;
        std::fs::create_dir_all(opts.state.logs())?;
        let (passphrase_file, pass, remove_passphrase_on_exit) =
            super::keys::passphrase(&opts.state, opts.passphrase_file.as_deref())?;
        let keys = KeyStore::new(opts.state.keys(), &trust_domain, &public_name, pass);
        let metrics = Arc::new(OperatorMetrics::new());
        let distributor = Distributor::new(metrics.clone(), 0);
        let (mut snapshots, warnings) = compile(&keys, &passphrase_file, &loaded)
            .map_err(|errs| anyhow::anyhow!("the manifests cannot run:\n  {}", errs.join("\n  ")))?;
        let nodes = node_keys(&snapshots);
        let report = keys.ensure(&nodes, SERVER_NODE)?;
        with_ech_configs(&keys, &nodes, &mut snapshots)?;
        info!(generated = ?report.generated, reused = ?report.reused, "key material ready");
        let server_identity = relayfed_serving::identity::SharedIdentity::from(keys.identity(SERVER_NODE)?);
        let distribution_addr =
            distributor.clone().serve(SocketAddr::from(([127, 0, 0, 1], 0)), server_identity.clone()).await?;
        let (tx, rx) = mpsc::unbounded_channel();
        let shared = Arc::new(Mutex::new(Shared { ca_fingerprint: keys.ca_fingerprint(), ..Default::default() }));
        let mut sup = Self {
            opts,
            sources,
            loaded: loaded.clone(),
            keys,
            passphrase_file,
            remove_passphrase_on_exit,
            distributor,
            distribution_addr,
            server_identity,
            ca_due: tokio::time::Instant::now(),
            shared,
            metrics,
            events: tx,
            events_rx: Some(rx),
            workloads: Default::default(),
            shutting_down: false,
            prometheus: None,
            control: None,
            keys_due: tokio::time::Instant::now(),
            rotate_now: BTreeSet::new(),
            rollout: Default::default(),
        };
        if let Ok(mut s) = sup.shared.lock() {
            s.warnings = warnings;
        }
        sup.sync_workloads(&loaded.resources).await?;
        sup.distributor.publish(&snapshots);
        if let Ok(mut s) = sup.shared.lock() {
            s.resources = loaded.resources.clone();
            s.files = loaded.files.clone();
        }
        // Main relays first (home nodes dial them), then home nodes.
        for role in [Role::Main, Role::Home] {
            let group: Vec<String> =
                snapshots.iter().filter(|(_, s)| s.node.role == role).map(|(n, _)| n.clone()).collect();
            for node in &group {
                sup.spawn(node)?;
            }
            sup.wait_ready(&group).await?;
        }
        Ok(sup)
    }

    /// The config distribution address.
    pub fn distribution_addr(&self) -> SocketAddr {
        self.distribution_addr
    }

    /// Compiles admitted resources into the snapshots local nodes run with.
    fn compile(&self, loaded: &Loaded) -> Result<BTreeMap<String, Snapshot>, Vec<String>> {
        let (mut out, warnings) = compile(&self.keys, &self.passphrase_file, loaded)?;
        self.rollout.apply(&loaded.resources, &mut out);
        for w in &warnings {
            warn!("{w}");
        }
        if let Ok(mut s) = self.shared.lock() {
            s.warnings = warnings;
        }
        Ok(out)
    }

    /// Starts, restarts or stops built-in workloads to match the annotations.
    async fn sync_workloads(&mut self, resources: &[AnyResource]) -> anyhow::Result<()> {
        let listed = self.workloads.sync(resources).await?;
        if let Ok(mut s) = self.shared.lock() {
            s.workloads = listed;
        }
        Ok(())
    }

    /// Re-reads the sources after an edit; publishes an admitted and compilable one, keeps
    /// the running configuration otherwise. Returns whether it was accepted.
    pub async fn reload(&mut self, contents: &super::sources::Contents) -> bool {
        let result = match super::sources::admit(contents, Some(&self.loaded)) {
            Err(errs) => Err(errs),
            Ok(loaded) => self.compile(&loaded).map(|snaps| (loaded, snaps)),
        };
        let (loaded, mut snapshots) = match result {
            Ok(x) => x,
            Err(errs) => {
                self.metrics.config_changes.get_or_create(&[("result", "rejected")]).inc();
                for e in &errs {
                    error!("edit rejected; the running configuration stays in force: {e}");
                }
                if let Ok(mut s) = self.shared.lock() {
                    s.last_rejected = Some((now_unix(), errs));
                }
                // Do not admit the same broken contents again on every tick.
                self.loaded.fingerprint = contents.fingerprint;
                return false;
            }
        };
        let nodes = node_keys(&snapshots);
        if let Err(e) = self.keys.ensure(&nodes, SERVER_NODE) {
            error!(error = %e, "cannot prepare keys for the edited federation; not applied");
            return false;
        }
        if let Err(e) = with_ech_configs(&self.keys, &nodes, &mut snapshots) {
            error!(error = %e, "cannot read the main relays' ECH keys; not applied");
            return false;
        }
        if let Err(e) = self.sync_workloads(&loaded.resources).await {
            error!(error = %e, "built-in workloads");
        }
        let changed = self.distributor.publish(&snapshots);
        let running: BTreeSet<String> =
            self.shared.lock().map(|s| s.nodes.keys().cloned().collect()).unwrap_or_default();
        for node in running.iter().filter(|n| !snapshots.contains_key(*n)) {
            info!(%node, "relay removed from the manifests: stopping");
            self.stop(node, false);
            if let Ok(mut s) = self.shared.lock() {
                s.nodes.remove(node);
            }
        }
        for node in &changed {
            let started_with = self.shared.lock().ok().and_then(|s| s.nodes.get(node).map(|p| p.started_with.clone()));
            match started_with {
                None => {
                    info!(%node, "relay added: starting");
                    if let Err(e) = self.spawn(node) {
                        error!(%node, error = %e, "cannot start node");
                    }
                }
                Some(old) => {
                    let restart = snapshots.get(node).map(|s| old.restart_fields(s)).unwrap_or_default();
                    if !restart.is_empty() {
                        info!(%node, fields = ?restart, "changed fields need a restart: restarting the node");
                        self.stop(node, true);
                    }
                }
            }
        }
        self.metrics.config_changes.get_or_create(&[("result", "accepted")]).inc();
        info!(changed = ?changed, "edit admitted and published");
        if let Ok(mut s) = self.shared.lock() {
            s.resources = loaded.resources.clone();
            s.files = loaded.files.clone();
            s.accepted_edits += 1;
        }
        self.loaded = loaded;
        self.rollout.soon();
        true
    }

    /// Points the local Prometheus (if any) at every running node's admin port and at the
    /// supervisor's `/metrics`.
    fn refresh_scrape_targets(&self) {
        let Some(p) = &self.prometheus else { return };
        let targets =
            self.shared.lock().map(|s| super::prometheus::targets(&s.nodes, self.control)).unwrap_or_default();
        if let Err(e) = p.set_targets(&targets) {
            warn!(error = %e, "cannot write the Prometheus targets");
        }
    }

    /// Serves the control API and runs until `down`, SIGTERM or Ctrl-C; then stops every
    /// node (home nodes first) and removes the runtime files.
    pub async fn run(mut self) -> anyhow::Result<()> {
        let control = super::status::serve(
            self.shared.clone(),
            self.distributor.clone(),
            self.metrics.clone(),
            self.control_events(),
        )
        .await?;
        self.control = Some(control);
        if self.opts.prometheus {
            let federation = self
                .loaded
                .resources
                .iter()
                .find_map(|r| match r {
                    AnyResource::Federation(f) => f.metadata.name.clone(),
                    _ => None,
                })
                .unwrap_or_default();
            // The nodes already run: a Prometheus that cannot start is reported, not fatal.
            match super::prometheus::Prometheus::start(&self.opts.state.run().join("prometheus"), &federation) {
                Ok(p) => {
                    info!(url = %p.url, "Prometheus scraping every node");
                    self.prometheus = Some(p);
                    self.refresh_scrape_targets();
                }
                Err(e) => error!(error = %e, "cannot start Prometheus; the federation runs without it"),
            }
        }
        let file = SupervisorFile {
            pid: std::process::id(),
            control: control.to_string(),
            distribution: self.distribution_addr.to_string(),
        };
        std::fs::write(self.opts.state.supervisor_file(), serde_json::to_vec_pretty(&file)?)?;
        println!(
            "{}",
            serde_json::json!({"event": "ready", "control": file.control, "distribution": file.distribution,
                "state": self.opts.state.root, "prometheus": self.prometheus.as_ref().map(|p| p.url.clone())})
        );
        let mut rx = self.events_rx.take().context("event loop already running")?;
        let mut tick = tokio::time::interval(WATCH_INTERVAL);
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        loop {
            tokio::select! {
                _ = tick.tick() => {
                    match self.sources.read() {
                        Ok(contents) if contents.fingerprint != self.loaded.fingerprint => {
                            info!("manifests changed: admitting the edit");
                            self.reload(&contents).await;
                        }
                        Ok(_) => {}
                        Err(e) => warn!(error = %e, "cannot read the manifests"),
                    }
                    self.run_key_schedules();
                    self.run_rollout();
                    self.run_ca_rotation().await;
                }
                ev = rx.recv() => match ev {
                    Some(Event::Down) | None => break,
                    Some(ev) => self.handle(ev),
                },
                _ = tokio::signal::ctrl_c() => break,
                _ = term.recv() => break,
            }
        }
        self.shutdown(&mut rx).await;
        Ok(())
    }

    fn control_events(&self) -> Box<dyn Fn(super::status::ControlRequest) + Send + Sync> {
        let tx = self.events.clone();
        Box::new(move |req| {
            let _ = tx.send(match req {
                super::status::ControlRequest::Down => Event::Down,
                super::status::ControlRequest::RotateKeys(nodes) => Event::RotateKeys(nodes),
                super::status::ControlRequest::RotateCa { stage_for, overlap } => {
                    Event::RotateCa { stage_for, overlap }
                }
                super::status::ControlRequest::AdvanceCa => Event::AdvanceCa,
            });
        })
    }

    /// Runs the main relays' ECH key schedules when due; after a promotion, homes get the new
    /// configs in a new snapshot version (relays already hold the key: it was staged).
    fn run_key_schedules(&mut self) {
        if tokio::time::Instant::now() < self.keys_due {
            return;
        }
        let schedules = super::rotation::schedules(&self.loaded.resources, &self.keys.dir);
        let force = std::mem::take(&mut self.rotate_now);
        let pass = super::rotation::run(&self.keys, &schedules, &force, std::time::SystemTime::now());
        // Whole seconds in the key files: look again just after the due second.
        self.keys_due = tokio::time::Instant::now() + pass.next_due + Duration::from_millis(500);
        if pass.promoted {
            self.republish();
        }
    }

    /// Evaluates the ECH rollout when due; publishes new effective percentages.
    fn run_rollout(&mut self) {
        let Some(changed) = self.rollout.tick(&self.loaded.resources, &self.distributor, &self.metrics) else {
            return;
        };
        if changed {
            // Only the ECH policy changes: the published snapshots, with the new percentages
            // (the ECH configs homes seal to stay what the key schedule last published).
            let mut snapshots = self.distributor.published();
            self.rollout.apply(&self.loaded.resources, &mut snapshots);
            let nodes = self.distributor.publish(&snapshots);
            if !nodes.is_empty() {
                info!(changed = ?nodes, "rollout percentages published");
            }
        }
        if let Ok(mut s) = self.shared.lock() {
            s.rollout = self.rollout.status();
        }
    }

    /// Publishes the running configuration again with the key files' current ECH configs.
    fn republish(&mut self) {
        let result = self.compile(&self.loaded).map_err(|errs| errs.join("; ")).and_then(|mut snapshots| {
            let nodes = node_keys(&snapshots);
            with_ech_configs(&self.keys, &nodes, &mut snapshots).map_err(|e| e.to_string())?;
            Ok(snapshots)
        });
        match result {
            Ok(snapshots) => {
                let changed = self.distributor.publish(&snapshots);
                info!(changed = ?changed, "new ECH configs published");
            }
            Err(e) => error!(error = %e, "cannot publish the new ECH configs; homes keep sealing to the previous key"),
        }
    }
}
