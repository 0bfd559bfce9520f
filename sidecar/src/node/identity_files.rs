//! A node's TLS files watched for changes: a renewed certificate or a CA rotation's new trust
//! bundle (local mode's supervisor rewrites them; in a cluster the kubelet refreshes the
//! mounted identity Secret) takes effect without a restart. Connections made after the change
//! present the new certificate and verify against the new CAs; established ones keep theirs.

use std::path::PathBuf;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{info, warn};

use crate::config::Snapshot;
use crate::transport::tls::HopIdentity;

/// How often the files are compared with what was loaded (a read of three small files).
pub const RELOAD_INTERVAL: Duration = Duration::from_secs(2);

/// The files an identity is loaded from, in the order they are compared.
fn files(snap: &Snapshot) -> [PathBuf; 3] {
    [snap.tls.ca_file.clone(), snap.tls.cert_file.clone(), snap.tls.key_file.clone()]
}

fn contents(paths: &[PathBuf; 3]) -> Option<Vec<Vec<u8>>> {
    paths.iter().map(|p| std::fs::read(p).ok()).collect()
}

/// Watches `snap`'s TLS files and sends each changed identity that loads and names the same
/// node (a change that does not load is reported once and skipped until the files change
/// again: a writer that replaces files one by one is seen complete at a later look).
pub fn watch(snap: &Snapshot, initial: HopIdentity) -> watch::Receiver<HopIdentity> {
    let (tx, rx) = watch::channel(initial);
    let paths = files(snap);
    let snap = snap.clone();
    tokio::spawn(async move {
        let mut last = contents(&paths);
        loop {
            tokio::time::sleep(RELOAD_INTERVAL).await;
            if tx.is_closed() {
                return;
            }
            let now = contents(&paths);
            if now.is_none() || now == last {
                continue;
            }
            last = now;
            match HopIdentity::load(&snap) {
                Ok(next) if next.node_id == snap.node.id => {
                    info!(
                        certificate = %next.certificate_fingerprint(),
                        roots = ?next.root_fingerprints(),
                        "TLS files changed: identity reloaded"
                    );
                    let _ = tx.send(next);
                }
                Ok(next) => warn!(found = %next.node_id, "TLS files changed to another node's certificate; not used"),
                Err(e) => warn!(error = %e, "TLS files changed but do not load; keeping the identity in force"),
            }
        }
    });
    rx
}
