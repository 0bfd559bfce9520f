//! The Node this runner stands for: registered with its podCIDR, address and capacity, kept
//! Ready by renewing its Lease in `kube-node-lease` (what the node lifecycle controller
//! watches) and its Ready condition.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Node;
use kube::Api;
use kube::api::{Patch, PatchParams};
use serde_json::json;
use tracing::warn;

const MANAGER: &str = "relayfed-pod-runner";

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%SZ").to_string()
}

fn micro_now() -> String {
    k8s_openapi::jiff::Timestamp::now().strftime("%Y-%m-%dT%H:%M:%S.%6fZ").to_string()
}

async fn ready(nodes: &Api<Node>, name: &str, ip: &str) -> kube::Result<()> {
    let t = now();
    let status = json!({"status": {
        "addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
        "capacity": {"cpu": "8", "memory": "32Gi", "pods": "110"},
        "allocatable": {"cpu": "8", "memory": "32Gi", "pods": "110"},
        "nodeInfo": {"kubeletVersion": "v1.36.3-relayfed-pod-runner", "kubeProxyVersion": "", "operatingSystem": "linux",
            "architecture": std::env::consts::ARCH, "containerRuntimeVersion": "relayfed-pod-runner://0",
            "osImage": "", "kernelVersion": "", "machineID": "", "systemUUID": "", "bootID": ""},
        "conditions": [{"type": "Ready", "status": "True", "reason": "KubeletReady",
            "message": "relayfed-pod-runner is posting ready status", "lastHeartbeatTime": t, "lastTransitionTime": t}],
    }});
    nodes.patch_status(name, &PatchParams::default(), &Patch::Merge(status)).await.map(|_| ())
}

/// Creates (or updates) the Node and marks it Ready.
pub async fn register(client: &kube::Client, name: &str, ip: &str, pod_cidr: &str) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    let node = json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name, "kubernetes.io/os": "linux",
            "node.relayfed.io/runner": "pod-runner"}},
        "spec": {"podCIDR": pod_cidr, "podCIDRs": [pod_cidr]},
    });
    nodes.patch(name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(node)).await?;
    ready(&nodes, name, ip).await?;
    Ok(())
}

/// Renews the node Lease every 10 s (40 s duration) and the Ready condition every 30 s.
pub async fn heartbeat(client: kube::Client, name: String, ip: String) {
    let leases: Api<Lease> = Api::namespaced(client.clone(), "kube-node-lease");
    let nodes: Api<Node> = Api::all(client);
    let mut n = 0u64;
    loop {
        let lease = json!({
            "apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
            "metadata": {"name": name},
            "spec": {"holderIdentity": name, "leaseDurationSeconds": 40, "renewTime": micro_now()},
        });
        if let Err(e) = leases.patch(&name, &PatchParams::apply(MANAGER).force(), &Patch::Apply(lease)).await {
            warn!("node lease renewal failed: {e}");
        }
        if n.is_multiple_of(3)
            && let Err(e) = ready(&nodes, &name, &ip).await
        {
            warn!("node status update failed: {e}");
        }
        n += 1;
        tokio::time::sleep(Duration::from_secs(10)).await;
    }
}
