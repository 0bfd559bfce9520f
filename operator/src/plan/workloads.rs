//! Injected pods in the plan: every pod running the relayfed sidecar is a home node whose
//! snapshot the plan derives from observed cluster facts (the pod, the Services it backs that
//! are exported, the imported services), not from a `Relay` CR.
//!
//! A workload's problems never block the federation: a workload that cannot be planned (no
//! reachable main relay yet, say) is left out with a warning, and its sidecar keeps asking
//! until it is planned.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use relayfed_crds::Relay;
use relayfed_proto::config::{Export, Import, Intercept, InterceptScope, MainRelay, Role, Snapshot, TlsFiles};
use relayfed_proto::layout::{CA_FILE, CERT_FILE, KEY_FILE, NOISE_FILE};

/// A pod with the injected sidecar, as the plan needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Workload {
    /// Node id (the one its workload certificate names: `identity::node_id_for`).
    pub node_id: String,
    /// `namespace/pod`, for warnings.
    pub pod: String,
    /// Services this pod serves: `<service>.<namespace>`, the Service port, and the pod port
    /// inbound streams are delivered to on loopback.
    pub exports: Vec<WorkloadExport>,
}

/// One exported port a workload serves.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct WorkloadExport {
    /// Federated service name, `<service>.<namespace>` (MCS namespace sameness).
    pub service: String,
    /// The Service port callers use.
    pub port: u16,
    /// The container port the Service targets (delivered to `127.0.0.1:<targetPort>`).
    pub target_port: u16,
    /// The app gets a PROXY protocol v2 header with the caller's identity first (the
    /// ServiceExport's `relayfed.io/proxy-protocol: "true"`; docs/protocol.md §6.1).
    pub proxy_protocol: bool,
}

/// An imported service as local pods dial it (its `ServiceImport` Service's ClusterIP).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ImportedService {
    /// Federated service name, `<service>.<namespace>`.
    pub service: String,
    /// Port.
    pub port: u16,
    /// The local ClusterIP the import's Service got.
    pub cluster_ip: IpAddr,
}

/// Everything the plan needs to give injected pods their snapshots.
#[derive(Clone, Debug)]
pub struct WorkloadFacts {
    /// Injected pods.
    pub workloads: Vec<Workload>,
    /// Imported services (every workload imports all of them).
    pub imports: Vec<ImportedService>,
    /// Interception settings (the injection webhook's); the scope is always `all`, because
    /// the init container installs its rules before the pod's imports are known.
    pub intercept: Intercept,
    /// Admin port of injected sidecars (`/healthz`, `/metrics`).
    pub admin_port: u16,
}

/// The key files a workload's sidecar writes into its runtime directory, as the plan names
/// them: relative paths, resolved against that directory by the sidecar (`--dir`).
pub fn tls_files() -> TlsFiles {
    TlsFiles { ca_file: PathBuf::from(CA_FILE), cert_file: PathBuf::from(CERT_FILE), key_file: PathBuf::from(KEY_FILE) }
}

/// The main relays a workload dials: the federation's main relays in `spec.mainRelays` order
/// (that order is the priority), each at its observed endpoint (`Relay.status.endpoint`, the
/// Service address) or else its declared `ip:port` endpoint.
pub fn main_relays_for_workloads(
    fed: &relayfed_crds::RelayFederation,
    relays: &[&Relay],
    resolve: &dyn Fn(&str) -> Option<SocketAddr>,
    warnings: &mut Vec<String>,
) -> Vec<MainRelay> {
    let mut out = Vec::new();
    for (i, m) in fed.spec.main_relays.iter().enumerate() {
        let relay = relays.iter().find(|r| r.spec.node_id == m.node_id);
        let status = relay.and_then(|r| r.status.as_ref());
        let endpoint = status
            .and_then(|s| s.endpoint.as_deref())
            .and_then(resolve)
            .or_else(|| m.endpoint.as_deref().and_then(resolve));
        let Some(endpoint) = endpoint else {
            warnings.push(format!(
                "main relay {} has no resolvable endpoint yet (Relay status.endpoint); workloads do not dial it",
                m.node_id
            ));
            continue;
        };
        out.push(MainRelay { node_id: m.node_id.clone(), endpoint, priority: u16::try_from(i).unwrap_or(u16::MAX) });
    }
    out
}

/// Builds one workload's home snapshot from `base` (the federation's policy parts already in
/// it). Returns `None` with a warning when the workload cannot be planned.
pub fn workload_snapshot(
    mut base: Snapshot,
    w: &Workload,
    facts: &WorkloadFacts,
    mains: &[MainRelay],
    warnings: &mut Vec<String>,
) -> Option<Snapshot> {
    if mains.is_empty() {
        warnings.push(format!("Pod/{}: no main relay with a known endpoint; sidecar not planned yet", w.pod));
        return None;
    }
    base.node.role = Role::Home;
    base.tls = tls_files();
    base.noise_key_file = Some(PathBuf::from(NOISE_FILE));
    base.main_relays = mains.to_vec();
    base.admin = Some(SocketAddr::from(([0, 0, 0, 0], facts.admin_port)));
    base.exports = w
        .exports
        .iter()
        .map(|e| Export {
            service: e.service.clone(),
            port: e.port,
            target: SocketAddr::from(([127, 0, 0, 1], e.target_port)),
            proxy_protocol: e.proxy_protocol,
        })
        .collect();
    base.imports = facts
        .imports
        .iter()
        .map(|i| Import {
            cluster_ip: Some(SocketAddr::new(i.cluster_ip, i.port)),
            // Apps reach imports through interception; the loopback listener is a fallback
            // on an ephemeral port.
            ..Import::resolved(&i.service, i.port, SocketAddr::from(([127, 0, 0, 1], 0)))
        })
        .collect();
    base.intercept = Some(Intercept { scope: InterceptScope::All, ..facts.intercept.clone() });
    match base.validate() {
        Ok(()) => Some(base),
        Err(e) => {
            warnings.push(format!("Pod/{}: sidecar snapshot invalid, not planned: {e}", w.pod));
            None
        }
    }
}
