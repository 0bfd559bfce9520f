//! relayfed-pod-runner: a small kubelet stand-in for tests, never part of the product. It
//! registers a Node with a podCIDR, watches the pods bound to it and runs each one as real
//! processes: a network namespace on the node's bridge, init containers in order (native
//! sidecars included), containers with their volumes, environment, user and probes, in a
//! chroot of their image. What it does not emulate: cgroups and resource limits, image pulls
//! (images are mapped to unpacked archives or host programs), seccomp and capability sets
//! beyond root/non-root, exec/attach/logs APIs (logs are files under its directory), exec and
//! gRPC probes, and service-link environment variables. See tests/README.md.

mod container;
mod images;
mod net;
mod node;
mod pod;
mod probe;
mod volumes;

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::Api;
use kube::runtime::watcher;
use tokio::sync::watch;
use tracing::{info, warn};

#[derive(Parser)]
#[command(
    about = "A kubelet stand-in for relayfed's tests: runs the pods bound to its node as processes in network namespaces"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Register the node and run its pods until SIGTERM (run it inside the node's network namespace).
    Run(RunArgs),
    /// Unpack an OCI image archive and print its image-map entry as JSON.
    Unpack {
        /// The archive (`make images` output).
        archive: PathBuf,
        /// Repository the entry maps.
        #[arg(long)]
        repository: String,
        /// Directory to unpack into (`<out>/rootfs`).
        #[arg(long)]
        out: PathBuf,
    },
}

#[derive(clap::Args)]
struct RunArgs {
    /// Admin kubeconfig of the cluster.
    #[arg(long)]
    kubeconfig: PathBuf,
    /// Node name.
    #[arg(long)]
    node: String,
    /// The node's address (status.hostIP, the InternalIP).
    #[arg(long)]
    node_ip: String,
    /// The node's podCIDR; its first address is the bridge's.
    #[arg(long)]
    pod_cidr: String,
    /// The bridge pod veths join (created by the test, in the node's namespace).
    #[arg(long, default_value = "cbr0")]
    bridge: String,
    /// Image map (JSON list of image specs).
    #[arg(long)]
    images: PathBuf,
    /// State directory: pods, volumes, scripts and container logs.
    #[arg(long)]
    dir: PathBuf,
    /// Cluster DNS server in every pod's resolv.conf.
    #[arg(long, default_value = "10.96.0.10")]
    dns: Ipv4Addr,
    /// Cluster domain.
    #[arg(long, default_value = "cluster.local")]
    domain: String,
    /// The `kubernetes` Service as containers see it (`KUBERNETES_SERVICE_HOST:PORT`).
    #[arg(long, default_value = "10.96.0.1:443")]
    api_service: String,
    /// Prefix of the pods' network namespace names (unique per runner on a machine).
    #[arg(long)]
    netns_prefix: String,
}

async fn client(path: &std::path::Path) -> anyhow::Result<kube::Client> {
    let kc = kube::config::Kubeconfig::read_from(path).with_context(|| path.display().to_string())?;
    let cfg = kube::Config::from_custom_kubeconfig(kc, &kube::config::KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(cfg)?)
}

async fn run(a: RunArgs) -> anyhow::Result<()> {
    let client = client(&a.kubeconfig).await?;
    let (host, port) = a.api_service.rsplit_once(':').context("--api-service is host:port")?;
    let node = Arc::new(pod::Node {
        client: client.clone(),
        images: images::Images::load(&a.images)?,
        network: net::Network::new(&a.pod_cidr, &a.bridge, &a.netns_prefix)?,
        dir: a.dir.clone(),
        node_ip: a.node_ip.clone(),
        dns: a.dns,
        domain: a.domain.clone(),
        api_service: (host.to_owned(), port.parse().context("--api-service port")?),
    });
    std::fs::create_dir_all(&a.dir)?;
    node.network.remove_all();
    node::register(&client, &a.node, &a.node_ip, &a.pod_cidr).await?;
    tokio::spawn(node::heartbeat(client.clone(), a.node.clone(), a.node_ip.clone()));
    info!(node = %a.node, "node registered; watching its pods");

    let pods: Api<Pod> = Api::all(client);
    let cfg = watcher::Config::default().fields(&format!("spec.nodeName={}", a.node));
    let mut events = watcher(pods, cfg).boxed();
    let mut workers = pod::Workers::new();
    let mut seen = std::collections::BTreeSet::new();
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    loop {
        let ev = tokio::select! {
            ev = events.next() => ev,
            _ = term.recv() => break,
            _ = tokio::signal::ctrl_c() => break,
        };
        let Some(ev) = ev else { break };
        workers.retain(|_, (_, h)| !h.is_finished());
        match ev {
            Ok(watcher::Event::Init) => seen.clear(),
            Ok(watcher::Event::InitApply(p) | watcher::Event::Apply(p)) => {
                let uid = p.metadata.uid.clone().unwrap_or_default();
                seen.insert(uid.clone());
                match workers.get(&uid) {
                    Some((tx, _)) => {
                        let _ = tx.send(Some(p));
                    }
                    None => {
                        let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                        if matches!(phase, Some("Succeeded" | "Failed")) {
                            continue;
                        }
                        let (tx, rx) = watch::channel(Some(p));
                        let handle = pod::spawn(node.clone(), rx);
                        workers.insert(uid, (tx, handle));
                    }
                }
            }
            Ok(watcher::Event::Delete(p)) => {
                if let Some((tx, _)) = workers.get(&p.metadata.uid.clone().unwrap_or_default()) {
                    let _ = tx.send(None);
                }
            }
            Ok(watcher::Event::InitDone) => {
                for (uid, (tx, _)) in &workers {
                    if !seen.contains(uid) {
                        let _ = tx.send(None);
                    }
                }
            }
            Err(e) => warn!("pod watch: {e}"),
        }
    }
    info!("stopping: removing every pod network of this node");
    node.network.remove_all();
    Ok(())
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info,kube=warn".into()),
        )
        .init();
    match Cli::parse().cmd {
        Cmd::Run(a) => run(a).await,
        Cmd::Unpack { archive, repository, out } => {
            let spec = images::unpack(&archive, &repository, &out)?;
            println!("{}", serde_json::to_string(&spec)?);
            Ok(())
        }
    }
}
