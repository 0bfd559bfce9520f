//! Running one node as a process: admin server, the relay or home node, the ready line on
//! stdout, config subscription (live updates), and clean shutdown on SIGTERM or Ctrl-C.

use std::sync::Arc;

use anyhow::Context;
use tracing::{info, warn};

use crate::admin::{metrics::Metrics, server};
use crate::config::{Role, Snapshot, base64_encode};
use crate::distribution::client::Subscription;
use crate::distribution::{Ack, AckResult};
use crate::proxy::HomeNode;
use crate::relay::MainRelay;
use crate::transport::tls::{HopIdentity, SharedIdentity};

/// How a node process runs besides its snapshot.
#[derive(Clone, Debug)]
pub struct RunOptions {
    /// Config distribution server `host:port` to subscribe to for new versions.
    pub config_server: Option<String>,
    /// Node id in that server's certificate.
    pub config_server_node: String,
    /// Renewed certificates (workload sidecars): each new value is used for new hop and
    /// distribution connections.
    pub identity_updates: Option<tokio::sync::watch::Receiver<HopIdentity>>,
    /// Directory relative key file paths in received snapshots are resolved against.
    pub base_dir: Option<std::path::PathBuf>,
}

impl Default for RunOptions {
    fn default() -> Self {
        Self {
            config_server: None,
            config_server_node: crate::distribution::DEFAULT_SERVER_NODE.to_owned(),
            identity_updates: None,
            base_dir: None,
        }
    }
}

/// A started node of either role.
#[derive(Clone)]
pub enum Running {
    /// A main relay.
    Main(Arc<MainRelay>),
    /// A home node.
    Home(Arc<HomeNode>),
}

impl Running {
    /// Applies the live parts of a new snapshot and says what the rest needs.
    pub fn apply(&self, in_force: &Snapshot, next: &Snapshot) -> Ack {
        if next.node.role != in_force.node.role {
            return Ack {
                version: next.version,
                result: AckResult::Invalid,
                restart_required: vec![],
                detail: Some(format!("node.role changed from {:?} to {:?}", in_force.node.role, next.node.role)),
            };
        }
        match self {
            Running::Main(r) => r.apply(next),
            Running::Home(h) => h.apply(next),
        }
        let restart: Vec<String> = in_force.restart_fields(next).into_iter().map(str::to_owned).collect();
        Ack {
            version: next.version,
            result: if restart.is_empty() { AckResult::Applied } else { AckResult::RestartRequired },
            restart_required: restart,
            detail: None,
        }
    }

    async fn shutdown(&self) {
        match self {
            Running::Main(r) => r.shutdown().await,
            Running::Home(h) => h.shutdown().await,
        }
    }
}

/// Runs the node described by `snap` until SIGTERM or Ctrl-C. Prints one JSON ready line on
/// stdout once it serves (bound addresses, ECH config list, imports).
pub async fn run(snap: Snapshot, opts: RunOptions) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::for_role(snap.node.role));
    let slot: server::AdminSlot = Default::default();
    let admin = match snap.admin {
        Some(a) => {
            Some(server::serve(a, metrics.clone(), slot.clone()).await.with_context(|| format!("admin listener {a}"))?)
        }
        None => None,
    };
    let (running, ready) = match snap.node.role {
        Role::Main => {
            let (relay, bound) = MainRelay::start(&snap, metrics.clone()).await?;
            let _ = slot.set(relay.clone());
            let ready = serde_json::json!({
                "event": "ready", "role": "main", "node": snap.node.id, "quic": bound.quic.to_string(),
                "admin": admin.map(|a| a.to_string()), "version": snap.version,
                "echConfigList": relay.ech_config_list().map(|l| base64_encode(&l)),
            });
            (Running::Main(relay), ready)
        }
        Role::Home => {
            let (node, bound) = HomeNode::start(&snap, metrics.clone()).await?;
            let _ = slot.set(node.clone());
            let imports: serde_json::Map<String, serde_json::Value> = bound
                .imports
                .iter()
                .map(|(i, a)| (format!("{}:{}", i.service, i.port), a.to_string().into()))
                .collect();
            let import_list: Vec<_> = bound
                .imports
                .iter()
                .map(|(i, a)| serde_json::json!({"service": i.service, "port": i.port, "node": i.node, "listen": a.to_string()}))
                .collect();
            let ready = serde_json::json!({
                "event": "ready", "role": "home", "node": snap.node.id, "version": snap.version,
                "imports": imports, "importList": import_list, "admin": admin.map(|a| a.to_string()),
                "outbound": bound.outbound.iter().map(ToString::to_string).collect::<Vec<_>>(),
            });
            (Running::Home(node), ready)
        }
    };
    let loaded = HopIdentity::load(&snap)?;
    metrics.transport.certificate_expiry.set(loaded.not_after_unix().unwrap_or(0));
    let identity = SharedIdentity::from(loaded.clone());
    // Workload sidecars renew through the certificate API; other nodes reload their files.
    let updates = match opts.identity_updates.clone() {
        Some(u) => u,
        None => super::identity_files::watch(&snap, loaded),
    };
    {
        let (identity, running, timeouts) = (identity.clone(), running.clone(), snap.timeouts.clone());
        let metrics = metrics.clone();
        let mut updates = updates;
        tokio::spawn(async move {
            while updates.changed().await.is_ok() {
                let next = updates.borrow_and_update().clone();
                let installed = match &running {
                    Running::Home(h) => h.renew_identity(&next, &timeouts),
                    Running::Main(r) => r.renew_identity(next.clone()),
                };
                if let Err(e) = installed {
                    warn!(error = %e, "renewed certificate not installed");
                    continue;
                }
                metrics.transport.certificate_expiry.set(next.not_after_unix().unwrap_or(0));
                identity.replace(next);
            }
        });
    }
    if let Some(server) = opts.config_server.clone() {
        let reports = match &running {
            Running::Home(h) => Some(h.cohort_counters()),
            Running::Main(_) => None,
        };
        let sub =
            Subscription { server, server_node: opts.config_server_node.clone(), identity, wait_seconds: 30, reports };
        let in_force = snap.clone();
        let node = running.clone();
        let base_dir = opts.base_dir.clone();
        tokio::spawn(sub.run(snap.version, metrics.clone(), move |mut next| {
            if let Some(d) = &base_dir {
                next.resolve_paths(d);
            }
            node.apply(&in_force, &next)
        }));
    }
    println!("{ready}");
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        r = tokio::signal::ctrl_c() => r?,
        _ = term.recv() => {}
    }
    info!("shutting down");
    running.shutdown().await;
    Ok(())
}
