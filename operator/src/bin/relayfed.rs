//! `relayfed`: the control-plane binary. `relayfed local up|status|down` runs a whole
//! federation on this machine from CR YAML; `relayfed node` is what local mode runs per relay.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relayfed_operator::local::supervisor::{Supervisor, UpOptions};
use relayfed_operator::local::{StateDir, SupervisorFile, alive, http, status};

#[derive(Parser)]
#[command(name = "relayfed", version, about = "relayfed control plane: local mode (and, in a cluster, the operator)")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run a federation on this machine from RelayFederation/Relay/Peer/RolloutPolicy YAML.
    Local {
        #[command(subcommand)]
        command: LocalCommand,
    },
    /// The sidecar injection webhook (mutating admission).
    Webhook {
        #[command(subcommand)]
        command: WebhookCommand,
    },
    /// The Kubernetes operator (in-cluster; needs an API server).
    Operator {
        #[command(subcommand)]
        command: OperatorCommand,
    },
    /// Check a cluster before or after installing relayfed (API version, CRDs, operator
    /// leading, webhook reachable, relays Ready, ECH keys fresh, peers up, configs applied).
    /// Exits non-zero when a check fails; each failure names its remedy.
    Check(CheckArgs),
    /// Validate RelayFederation/Relay/Peer/RolloutPolicy YAML offline, as the API server
    /// would admit it and as the operator would plan it; starts nothing.
    Validate {
        /// Files or directories (`*.yaml`, `*.yml`, `*.json`); repeatable.
        #[arg(short = 'f', long = "filename", required = true)]
        inputs: Vec<PathBuf>,
    },
    /// Print shell completions (`relayfed completions bash > /etc/bash_completion.d/relayfed`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

/// `relayfed check` arguments.
#[derive(clap::Args)]
struct CheckArgs {
    /// Kubeconfig file (default: $KUBECONFIG, ~/.kube/config, or in-cluster).
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Kubeconfig context (default: the current one).
    #[arg(long)]
    context: Option<String>,
    /// The release namespace.
    #[arg(short = 'n', long, default_value = "relayfed-system")]
    namespace: String,
    /// The Helm release name.
    #[arg(long, default_value = "relayfed")]
    release: String,
    /// Only the checks that make sense before `helm install` (API server, CRDs).
    #[arg(long)]
    pre: bool,
    /// Output format.
    #[arg(short = 'o', long, value_enum, default_value_t = OutputFormat::Text)]
    output: OutputFormat,
}

/// How `relayfed check` prints its results.
#[derive(Clone, Copy, clap::ValueEnum)]
enum OutputFormat {
    /// One line per check, remedies underneath.
    Text,
    /// `{"passed": bool, "checks": [...]}`.
    Json,
}

#[derive(Subcommand)]
enum OperatorCommand {
    /// Reconcile the relayfed.io CRDs (leader-elected) and serve config distribution.
    Run {
        /// Namespace of the leader Lease (the operator's own; default $POD_NAMESPACE).
        #[arg(long, env = "POD_NAMESPACE", default_value = "relayfed-system")]
        namespace: String,
        /// This replica's identity in the Lease (default $POD_NAME).
        #[arg(long, env = "POD_NAME")]
        identity: String,
        /// The federation (`namespace/name`) whose nodes the distribution server serves.
        #[arg(long)]
        federation: String,
        /// Image of relayfed-proxy for main relay Deployments.
        #[arg(long)]
        proxy_image: String,
        /// Address nodes subscribe to (`host:port` of the operator's Service).
        #[arg(long)]
        config_server: String,
        /// Config distribution (HTTPS, mTLS) listen address.
        #[arg(long, default_value = "0.0.0.0:8443")]
        distribution_listen: std::net::SocketAddr,
        /// Workload certificate server (HTTPS, `POST /v1/certificate` with a bound token).
        #[arg(long, default_value = "0.0.0.0:8444")]
        identity_listen: std::net::SocketAddr,
        /// Admin port: /metrics, /healthz, /readyz (Ready once the API server and the Lease were reached).
        #[arg(long, default_value = "0.0.0.0:9090")]
        admin_listen: std::net::SocketAddr,
        /// Outbound listener port of injected sidecars (chart `injection.outboundPort`).
        #[arg(long, default_value_t = 15001)]
        workload_outbound_port: u16,
        /// Uid of injected sidecars, excluded from interception (chart `injection.proxyUid`).
        #[arg(long, default_value_t = 1337)]
        workload_proxy_uid: u32,
        /// Admin port of injected sidecars (chart `injection.adminPort`).
        #[arg(long, default_value_t = 15090)]
        workload_admin_port: u16,
        /// Placement and metadata of main relay pods, as JSON (chart `relays.*` and
        /// `imagePullSecrets`): nodeSelector, tolerations, affinity, topologySpreadConstraints,
        /// podAnnotations, podLabels, priorityClassName, imagePullSecrets.
        #[arg(long, default_value = "")]
        relay_pods: String,
    },
}

#[derive(Subcommand)]
enum WebhookCommand {
    /// Serve `/inject` and `/inject/namespace` over HTTPS.
    Serve {
        /// Listen address.
        #[arg(long, default_value = "0.0.0.0:9443")]
        listen: std::net::SocketAddr,
        /// Serving certificate chain (PEM).
        #[arg(long)]
        tls_cert: PathBuf,
        /// Serving key (PEM).
        #[arg(long)]
        tls_key: PathBuf,
        /// Injection settings (JSON, `InjectConfig`); defaults when absent.
        #[arg(long)]
        config: Option<PathBuf>,
        /// Plain-HTTP admin port: `/metrics` (admissions by result, process), `/healthz`,
        /// `/readyz`.
        #[arg(long, default_value = "0.0.0.0:9090")]
        admin_listen: std::net::SocketAddr,
    },
    /// Answer one AdmissionReview read from a file (or `-` for stdin) and print the response.
    Review {
        /// The AdmissionReview JSON.
        file: PathBuf,
        /// As if the pod's namespace carried `relayfed.io/inject=enabled`.
        #[arg(long)]
        namespace_enabled: bool,
        /// Injection settings (JSON); defaults when absent.
        #[arg(long)]
        config: Option<PathBuf>,
    },
}

fn inject_config(path: Option<&PathBuf>) -> anyhow::Result<relayfed_operator::webhook::InjectConfig> {
    match path {
        None => Ok(Default::default()),
        Some(p) => Ok(serde_json::from_str(&std::fs::read_to_string(p).with_context(|| p.display().to_string())?)
            .with_context(|| format!("{}: not an injection config", p.display()))?),
    }
}

fn webhook(command: WebhookCommand) -> anyhow::Result<()> {
    match command {
        WebhookCommand::Review { file, namespace_enabled, config } => {
            let body = if file.as_os_str() == "-" {
                let mut b = Vec::new();
                std::io::Read::read_to_end(&mut std::io::stdin(), &mut b)?;
                b
            } else {
                std::fs::read(&file).with_context(|| file.display().to_string())?
            };
            let (response, _) =
                relayfed_operator::webhook::review(&body, namespace_enabled, &inject_config(config.as_ref())?)?;
            println!("{response}");
            Ok(())
        }
        WebhookCommand::Serve { listen, tls_cert, tls_key, config, admin_listen } => {
            let cfg = inject_config(config.as_ref())?;
            runtime()?.block_on(async move {
                let metrics = std::sync::Arc::new(relayfed_operator::metrics::OperatorMetrics::new());
                let certs = relayfed_operator::https::Certificates::Files(tls_cert, tls_key);
                let addr = relayfed_operator::webhook::serve(listen, certs, cfg, metrics.clone()).await?;
                let standalone = std::sync::Arc::new(relayfed_operator::k8s::probes::Role::standalone());
                let admin = relayfed_operator::k8s::probes::serve(admin_listen, metrics, standalone).await?;
                eprintln!("injection webhook listening on https://{addr}, admin (metrics) on http://{admin}");
                tokio::signal::ctrl_c().await?;
                Ok(())
            })
        }
    }
}

#[derive(clap::Args, Clone)]
struct StateArg {
    /// State directory (keys, runtime files, logs). Default: $RELAYFED_STATE_DIR, else
    /// $XDG_STATE_HOME/relayfed/local, else ~/.local/state/relayfed/local.
    #[arg(long)]
    state_dir: Option<PathBuf>,
}

impl StateArg {
    fn state(&self) -> StateDir {
        StateDir::new(self.state_dir.clone().unwrap_or_else(StateDir::default_root))
    }
}

#[derive(Subcommand)]
enum LocalCommand {
    /// Admit, compile and run the federation; watch the files and apply edits live.
    Up {
        /// Manifest files or directories (`*.yaml`, `*.yml`, `*.json`), as for `kubectl apply -f`.
        #[arg(short = 'f', long = "filename", required = true)]
        inputs: Vec<PathBuf>,
        #[command(flatten)]
        state: StateArg,
        /// File holding the passphrase that seals the key material (else $RELAYFED_PASSPHRASE,
        /// else one generated into the state directory).
        #[arg(long)]
        passphrase_file: Option<PathBuf>,
        /// Return once the federation runs, leaving it in the background (logs in the state
        /// directory); stop it with `relayfed local down`.
        #[arg(short, long)]
        detach: bool,
        /// Also start a Prometheus (the `prometheus` binary on PATH) scraping every node with
        /// the labels the dashboards use; its URL is printed.
        #[arg(long)]
        prometheus: bool,
        /// The `relayfed-proxy` binary that runs each relay (default: next to this `relayfed`,
        /// else on PATH).
        #[arg(long, env = "RELAYFED_PROXY")]
        proxy: Option<PathBuf>,
    },
    /// Show relays, peers, services, ECH rollout state and health.
    Status {
        #[command(flatten)]
        state: StateArg,
        /// Print the JSON document instead of the table.
        #[arg(long)]
        json: bool,
    },
    /// Print what another organisation pins to peer with this federation: its trust domain,
    /// the fingerprint of its CA's key (a Peer's `spec.identity.fingerprint`) and the CA
    /// certificate (`spec.identity.caBundle`). Nothing secret is printed.
    Identity {
        #[command(flatten)]
        state: StateArg,
        /// Print a JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Stop the federation started with `up` (every node, then the supervisor).
    Down {
        #[command(flatten)]
        state: StateArg,
    },
    /// Rotate this federation's CA without downtime: every node first trusts the old and the
    /// new CA, then the new CA issues every certificate, and after `--overlap` the old CA is
    /// dropped. Each step waits until every running node has taken the previous one.
    RotateCa {
        /// Least time between every node trusting the new CA and the new CA issuing: give
        /// partner organisations this long to pin the new key (`relayfed local identity`
        /// prints it as nextFingerprint).
        #[arg(long, default_value = "0s", value_parser = parse_duration)]
        stage_for: Duration,
        /// How long the old CA stays trusted after the new one issues.
        #[arg(long, default_value = "10m", value_parser = parse_duration)]
        overlap: Duration,
        /// Take the next step of the rotation in progress now, without waiting for the rest of
        /// `--stage-for` or `--overlap` (the nodes' acknowledgements are still awaited).
        #[arg(long, conflicts_with_all = ["stage_for", "overlap"])]
        next: bool,
        #[command(flatten)]
        state: StateArg,
    },
    /// Rotate main relays' ECH keys now: the new key is staged (relays accept it), then homes
    /// get its config after the Relay's `echKeys.stagingPeriod`; the old key stays accepted
    /// for `gracePeriod`.
    RotateKeys {
        /// Main relays (Relay name or node id); none: every main relay.
        relays: Vec<String>,
        #[command(flatten)]
        state: StateArg,
    },
}

fn init_logging() {
    use std::io::IsTerminal;
    let filter = tracing_subscriber::EnvFilter::try_from_env("RELAYFED_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .init();
}

fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread().enable_all().build()?)
}

fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    init_logging();
    relayfed_serving::listener::raise_fd_limit();
    let _ = rustls::crypto::ring::default_provider().install_default();
    match cli.command {
        Command::Webhook { command } => webhook(command),
        Command::Operator {
            command:
                OperatorCommand::Run {
                    namespace,
                    identity,
                    federation,
                    proxy_image,
                    config_server,
                    distribution_listen,
                    identity_listen,
                    admin_listen,
                    workload_outbound_port,
                    workload_proxy_uid,
                    workload_admin_port,
                    relay_pods,
                },
        } => {
            use relayfed_operator::k8s::{Settings, controllers, workloads::WorkloadSettings};
            let mut workloads = WorkloadSettings { federation: federation.clone(), ..Default::default() };
            workloads.intercept.outbound_port = workload_outbound_port;
            workloads.intercept.proxy_uid = workload_proxy_uid;
            workloads.admin_port = workload_admin_port;
            let relay_pods = relayfed_operator::k8s::RelayPods::parse(&relay_pods).map_err(|e| anyhow::anyhow!(e))?;
            let settings = Settings { proxy_image, config_server, workloads, relay_pods, ..Settings::default() };
            let opts =
                controllers::RunOptions { namespace, identity, federation, distribution_listen, identity_listen };
            runtime()?.block_on(async move {
                let metrics = std::sync::Arc::new(relayfed_operator::metrics::OperatorMetrics::new());
                let role = std::sync::Arc::new(relayfed_operator::k8s::probes::Role::default());
                relayfed_operator::k8s::probes::serve(admin_listen, metrics.clone(), role.clone()).await?;
                let client = kube::Client::try_default()
                    .await
                    .context("no Kubernetes API: run in a cluster or with a kubeconfig (for a machine without one, see `relayfed local up`)")?;
                controllers::run(client, settings, opts, metrics, role).await?;
                Ok(())
            })
        }
        Command::Check(args) => check(args),
        Command::Validate { inputs } => validate(inputs),
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut <Cli as clap::CommandFactory>::command(),
                "relayfed",
                &mut std::io::stdout(),
            );
            Ok(())
        }
        Command::Local { command } => match command {
            LocalCommand::Up { inputs, state, passphrase_file, detach, prometheus, proxy } => {
                up(inputs, state.state(), passphrase_file, detach, prometheus, proxy)
            }
            LocalCommand::Status { state, json } => runtime()?.block_on(show_status(state.state(), json)),
            LocalCommand::Down { state } => runtime()?.block_on(down(state.state())),
            LocalCommand::RotateKeys { relays, state } => runtime()?.block_on(rotate_keys(state.state(), &relays)),
            LocalCommand::Identity { state, json } => show_identity(&state.state(), json),
            LocalCommand::RotateCa { stage_for, overlap, next, state } => {
                runtime()?.block_on(rotate_ca(state.state(), stage_for, overlap, next))
            }
        },
    }
}

/// `relayfed local identity`: the public half of this federation's trust, for a partner's Peer.
fn show_identity(state: &StateDir, json: bool) -> anyhow::Result<()> {
    let path = state.keys().join("ca.pem");
    let pem = std::fs::read_to_string(&path)
        .with_context(|| format!("no CA at {} yet: run `relayfed local up` once first", path.display()))?;
    let der = relayfed_proto::crypto::ca::parse_cert_pem(&pem)?;
    let trust_domain = relayfed_operator::local::keys::ca_trust_domain(&der)
        .ok_or_else(|| anyhow::anyhow!("{} is not a relayfed CA certificate", path.display()))?;
    let fingerprint = relayfed_serving::partners::spki_fingerprint(&der)
        .ok_or_else(|| anyhow::anyhow!("{}: unreadable public key", path.display()))?;
    // During a CA rotation a partner pins both keys: the one to come, then the one that goes.
    let rotation = relayfed_operator::local::ca_rotation::current_in(&state.keys())?;
    let (next, previous) = match &rotation {
        Some(r) if r.phase == relayfed_operator::local::ca_rotation::Phase::Trusting => (Some(r.new.clone()), None),
        Some(r) => (None, Some(r.old.clone())),
        None => (None, None),
    };
    if json {
        let doc = serde_json::json!({"trustDomain": trust_domain, "fingerprint": fingerprint, "caBundle": pem,
            "nextFingerprint": next, "previousFingerprint": previous});
        println!("{doc}");
    } else {
        println!("trust domain:        {trust_domain}");
        println!("CA key fingerprint:  {fingerprint}");
        if let Some(n) = &next {
            println!("next CA key:         {n}  (a CA rotation is in progress: pin it as nextFingerprint now)");
        }
        if let Some(p) = &previous {
            println!("previous CA key:     {p}  (still trusted until the rotation ends; then unpin it)");
        }
        println!("\nA partner pins it in the Peer it writes for one of your main relays:");
        println!("  spec:\n    trustDomain: {trust_domain}\n    identity:\n      fingerprint: {fingerprint}");
        println!("\n(or `caBundle:` with the CA certificate below)\n\n{pem}");
    }
    Ok(())
}

fn running(state: &StateDir) -> Option<SupervisorFile> {
    SupervisorFile::read(&state.supervisor_file()).filter(|f| alive(f.pid))
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    use relayfed_operator::check;
    let _ = rustls::crypto::ring::default_provider().install_default();
    let target = check::gather::Target { namespace: args.namespace, release: args.release, pre_install: args.pre };
    let outcomes = runtime()?.block_on(async move {
        let options = kube::config::KubeConfigOptions { context: args.context, ..Default::default() };
        let config = match &args.kubeconfig {
            Some(path) => {
                let kc = kube::config::Kubeconfig::read_from(path).with_context(|| path.display().to_string())?;
                kube::Config::from_custom_kubeconfig(kc, &options).await?
            }
            None if options.context.is_some() => kube::Config::from_kubeconfig(&options).await?,
            None => kube::Config::infer().await.context("no kubeconfig found and not running in a cluster")?,
        };
        let client = kube::Client::try_from(config)?;
        anyhow::Ok(check::evaluate(&check::gather::gather(&client, &target).await))
    })?;
    match args.output {
        OutputFormat::Text => print!("{}", check::render_text(&outcomes)),
        OutputFormat::Json => println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({"passed": check::passed(&outcomes), "checks": outcomes}))?
        ),
    }
    if !check::passed(&outcomes) {
        std::process::exit(1);
    }
    Ok(())
}

fn validate(inputs: Vec<PathBuf>) -> anyhow::Result<()> {
    use relayfed_operator::local::sources::Sources;
    let sources = Sources::new(inputs);
    let loaded = sources.load(None).map_err(|errors| anyhow::anyhow!("{}", errors.join("\n")))?;
    let keys = relayfed_operator::plan::KeyLayout { dir: PathBuf::from("/keys") };
    match relayfed_operator::plan::compile(&loaded.resources, &relayfed_operator::plan::Placement::offline(keys, 1)) {
        Ok(plan) => {
            for w in &plan.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "valid: {} resources in {} files; the plan has {} nodes",
                loaded.resources.len(),
                loaded.files.len(),
                plan.snapshots.len()
            );
            Ok(())
        }
        Err(errors) => {
            let text: Vec<String> = errors.iter().map(ToString::to_string).collect();
            anyhow::bail!("admitted, but the plan is invalid:\n{}", text.join("\n"))
        }
    }
}

fn up(
    inputs: Vec<PathBuf>,
    state: StateDir,
    passphrase_file: Option<PathBuf>,
    detach: bool,
    prometheus: bool,
    proxy: Option<PathBuf>,
) -> anyhow::Result<()> {
    if let Some(f) = running(&state) {
        anyhow::bail!(
            "a local federation already runs from {} (pid {}); `relayfed local down --state-dir {0}` first",
            state.root.display(),
            f.pid
        );
    }
    let _ = std::fs::remove_file(state.supervisor_file());
    if prometheus && std::process::Command::new("prometheus").arg("--version").output().is_err() {
        anyhow::bail!("--prometheus needs the prometheus binary on PATH (Debian: apt-get install prometheus)");
    }
    let exe = std::env::current_exe().context("cannot locate the relayfed executable")?;
    let proxy = relayfed_operator::local::find_proxy(proxy, &exe)?;
    if detach {
        return detach_up(&exe, &inputs, &state, passphrase_file.as_ref(), prometheus, &proxy);
    }
    let opts = UpOptions { inputs, state, passphrase_file, proxy_exe: proxy, prometheus };
    runtime()?.block_on(async move {
        let sup = Supervisor::start(opts).await?;
        eprintln!(
            "local federation running; `relayfed local status` shows it, `relayfed local down` (or Ctrl-C) stops it"
        );
        sup.run().await
    })
}

fn detach_up(
    exe: &PathBuf,
    inputs: &[PathBuf],
    state: &StateDir,
    pass: Option<&PathBuf>,
    prometheus: bool,
    proxy: &std::path::Path,
) -> anyhow::Result<()> {
    use std::os::unix::process::CommandExt;
    std::fs::create_dir_all(state.logs())?;
    let log_path = state.logs().join("supervisor.log");
    let log = std::fs::OpenOptions::new().create(true).append(true).open(&log_path)?;
    let mut cmd = std::process::Command::new(exe);
    cmd.arg("local").arg("up").arg("--state-dir").arg(&state.root).arg("--proxy").arg(proxy);
    for i in inputs {
        cmd.arg("-f").arg(std::fs::canonicalize(i).with_context(|| i.display().to_string())?);
    }
    if let Some(p) = pass {
        cmd.arg("--passphrase-file").arg(std::fs::canonicalize(p)?);
    }
    if prometheus {
        cmd.arg("--prometheus");
    }
    let mut child =
        cmd.stdin(std::process::Stdio::null()).stdout(log.try_clone()?).stderr(log).process_group(0).spawn()?;
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Some(status) = child.try_wait()? {
            let text = std::fs::read_to_string(&log_path).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(20).collect();
            anyhow::bail!(
                "the federation did not start ({status}); last lines of {}:\n{}",
                log_path.display(),
                tail.into_iter().rev().collect::<Vec<_>>().join("\n")
            );
        }
        if SupervisorFile::read(&state.supervisor_file()).is_some_and(|f| f.pid == child.id()) {
            eprintln!(
                "local federation running in the background (pid {}, logs in {}); `relayfed local status --state-dir {}`",
                child.id(),
                state.logs().display(),
                state.root.display()
            );
            return Ok(());
        }
        if std::time::Instant::now() > deadline {
            anyhow::bail!("the federation did not report ready in time; see {}", log_path.display());
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

async fn show_status(state: StateDir, as_json: bool) -> anyhow::Result<()> {
    let f = running(&state).with_context(|| format!("no local federation runs from {}", state.root.display()))?;
    let (code, body) = http::request(&f.control, hyper::Method::GET, "/local/status", Duration::from_secs(10)).await?;
    anyhow::ensure!(code == 200, "supervisor answered {code}: {body}");
    let v: serde_json::Value = serde_json::from_str(&body)?;
    if as_json {
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        print!("{}", status::render(&v));
    }
    Ok(())
}

async fn rotate_keys(state: StateDir, relays: &[String]) -> anyhow::Result<()> {
    let f = running(&state).with_context(|| format!("no local federation runs from {}", state.root.display()))?;
    let paths: Vec<String> = if relays.is_empty() {
        vec!["/local/rotate-keys".into()]
    } else {
        relays.iter().map(|r| format!("/local/rotate-keys/{r}")).collect()
    };
    for path in paths {
        let (status, body) = http::request(&f.control, hyper::Method::POST, &path, Duration::from_secs(5)).await?;
        let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        anyhow::ensure!(status == 202, "{}", answer["error"].as_str().unwrap_or(&body));
        eprintln!("ECH key staged for {}; homes seal to it after the relay's echKeys.stagingPeriod", answer["staging"]);
    }
    Ok(())
}

/// A duration as the CRDs write them (`90s`, `10m`, `1h`).
fn parse_duration(s: &str) -> Result<Duration, String> {
    s.parse::<relayfed_crds::common::Duration>().map(|d| d.get()).map_err(|e| e.to_string())
}

async fn rotate_ca(state: StateDir, stage_for: Duration, overlap: Duration, next: bool) -> anyhow::Result<()> {
    let f = running(&state).with_context(|| format!("no local federation runs from {}", state.root.display()))?;
    let in_progress = state.keys().join("ca-rotation.json").exists();
    let path = match (next, in_progress) {
        (true, true) => "/local/rotate-ca/next".to_owned(),
        (true, false) => anyhow::bail!("no CA rotation in progress; start one with `relayfed local rotate-ca`"),
        (false, true) => anyhow::bail!(
            "a CA rotation is already in progress (`relayfed local status` shows it; `--next` takes its next step now)"
        ),
        (false, false) => format!("/local/rotate-ca?stageFor={}&overlap={}", stage_for.as_secs(), overlap.as_secs()),
    };
    let (status, body) = http::request(&f.control, hyper::Method::POST, &path, Duration::from_secs(5)).await?;
    let answer: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
    anyhow::ensure!(status == 202, "{}", answer["error"].as_str().unwrap_or(&body));
    eprintln!(
        "{}; `relayfed local status` shows its progress",
        if next { "CA rotation: next step as soon as every node acknowledges" } else { "CA rotation started" }
    );
    Ok(())
}

async fn down(state: StateDir) -> anyhow::Result<()> {
    let Some(f) = running(&state) else {
        let _ = std::fs::remove_file(state.supervisor_file());
        eprintln!("no local federation runs from {}", state.root.display());
        return Ok(());
    };
    http::request(&f.control, hyper::Method::POST, "/local/down", Duration::from_secs(5)).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    // The supervisor removes its file once every node stopped (its process may linger as a
    // zombie of whoever started it).
    while alive(f.pid) && state.supervisor_file().exists() {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "supervisor {} did not stop within 30 s", f.pid);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    eprintln!("local federation stopped");
    Ok(())
}
