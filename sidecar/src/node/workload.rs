//! An injected sidecar in a pod (`relayfed-proxy workload`): it starts with nothing but its
//! projected service-account token and the federation CA, and
//!
//! 1. generates its TLS key and Noise static key (never leaving the pod's memory volume),
//! 2. asks the operator for a workload certificate (CSR + token; the operator names the node
//!    and binds the Noise key),
//! 3. fetches its first config snapshot from the distribution server with that certificate
//!    (retrying while the operator has not planned the pod yet),
//! 4. runs as a home node subscribed to new snapshot versions, and
//! 5. renews its certificate at the time the operator names (two thirds of its life), with
//!    the same keys, installing it for new connections without dropping existing ones.

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use anyhow::Context;
use tokio::sync::watch;
use tracing::{info, warn};

use super::runner::{self, RunOptions};
use crate::config::keys::{save_noise_key, write_private};
use crate::config::{Role, base64_encode};
use crate::crypto::noise::StaticKeypair;
use crate::distribution::certificate::{CertificateClient, CertificateRequest, CertificateResponse};
use crate::distribution::client::Subscription;
use crate::resilience::backoff::{Backoff, Retry};
use crate::transport::tls::HopIdentity;

/// Where a workload sidecar finds its inputs and the servers it talks to (the flags of
/// `relayfed-proxy workload`; the defaults are the injected pod's paths).
#[derive(Clone, Debug, clap::Args)]
pub struct WorkloadOptions {
    /// Workload certificate server (`host:port`, the operator; `POST /v1/certificate`).
    #[arg(long)]
    pub identity_server: String,
    /// Config distribution server (`host:port`, the operator).
    #[arg(long)]
    pub config_server: String,
    /// Node id in both servers' certificates.
    #[arg(long, default_value = crate::distribution::DEFAULT_SERVER_NODE)]
    pub server_node: String,
    /// Runtime directory: key material and the current snapshot are written here; relative
    /// paths in snapshots are resolved against it.
    #[arg(long, default_value = "/var/run/relayfed")]
    pub dir: PathBuf,
    /// The projected service-account token (audience `relayfed`; re-read for every request,
    /// since the kubelet rotates it).
    #[arg(long, default_value = "/var/run/secrets/relayfed.io/token")]
    pub token_file: PathBuf,
    /// The federation CA (PEM) that issued the servers' certificates (projected from the
    /// `relayfed-ca-root` ConfigMap).
    #[arg(long, default_value = "/var/run/secrets/relayfed.io/ca.pem")]
    pub ca_file: PathBuf,
    /// File holding the federation's trust domain (projected from the same ConfigMap).
    #[arg(long, default_value = "/var/run/secrets/relayfed.io/trust-domain")]
    pub trust_domain_file: PathBuf,
}

pub use relayfed_proto::layout::{CA_FILE, CERT_FILE, KEY_FILE, NOISE_FILE};

/// Key material a workload keeps for its whole life (renewals reuse it).
struct Keys {
    tls: rcgen::KeyPair,
    noise: StaticKeypair,
}

fn read(path: &Path, what: &str) -> anyhow::Result<String> {
    std::fs::read_to_string(path)
        .with_context(|| format!("{what} {}: is the relayfed token volume mounted?", path.display()))
}

fn unix(secs: u64) -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(secs)
}

/// Asks for a certificate until it is issued: transient failures are retried with capped,
/// jittered backoff; a refusal that cannot change (bad token, forbidden) is returned.
async fn obtain(
    client: &CertificateClient,
    opts: &WorkloadOptions,
    keys: &Keys,
) -> anyhow::Result<CertificateResponse> {
    let csr = rcgen::CertificateParams::default().serialize_request(&keys.tls)?.pem()?;
    let req = CertificateRequest { csr, noise_public_key: Some(base64_encode(&keys.noise.public)) };
    let mut retry = Retry::new(Backoff::BOOTSTRAP);
    loop {
        let token = read(&opts.token_file, "service-account token")?;
        match client.request(&token, &req).await {
            Ok(r) => return Ok(r),
            Err(e) if e.is_transient() => {
                warn!(error = %e, retry_within = ?retry.ceiling(), "no workload certificate yet")
            }
            Err(e) => return Err(e).context("the operator refused a workload certificate"),
        }
        tokio::time::sleep(retry.next_wait()).await;
    }
}

/// Writes an issued certificate (and the CA bundle) into the runtime directory and returns
/// the identity it makes.
fn install(dir: &Path, trust_domain: &str, keys: &Keys, issued: &CertificateResponse) -> anyhow::Result<HopIdentity> {
    let key_pem = keys.tls.serialize_pem();
    let identity =
        HopIdentity::from_pem(trust_domain, &issued.node_id, &issued.ca_bundle, &issued.certificate, &key_pem)
            .context("the issued certificate does not make a usable identity")?;
    let write = |name: &str, text: &str| -> anyhow::Result<()> {
        // Write then rename: a reader never sees half a certificate.
        let tmp = dir.join(format!(".{name}.tmp"));
        write_private(&tmp, text.as_bytes())?;
        std::fs::rename(&tmp, dir.join(name)).with_context(|| format!("{}/{name}", dir.display()))
    };
    write(CA_FILE, &issued.ca_bundle)?;
    write(KEY_FILE, &key_pem)?;
    write(CERT_FILE, &issued.certificate)?;
    Ok(identity)
}

/// Runs a workload sidecar until SIGTERM (see the module docs for the steps).
pub async fn run(opts: WorkloadOptions) -> anyhow::Result<()> {
    let trust_domain = read(&opts.trust_domain_file, "trust domain")?.trim().to_owned();
    let client = CertificateClient {
        server: opts.identity_server.clone(),
        ca_pem: read(&opts.ca_file, "federation CA")?,
        trust_domain: trust_domain.clone(),
        server_node: opts.server_node.clone(),
    };
    std::fs::create_dir_all(&opts.dir).with_context(|| format!("runtime directory {}", opts.dir.display()))?;
    let keys = Keys { tls: rcgen::KeyPair::generate()?, noise: StaticKeypair::generate()? };
    save_noise_key(&opts.dir.join(NOISE_FILE), &keys.noise, None)?;
    let issued = obtain(&client, &opts, &keys).await?;
    let identity = install(&opts.dir, &trust_domain, &keys, &issued)?;
    info!(node = %issued.node_id, renew_at = issued.renew_after, "workload certificate issued");

    // The first snapshot: the operator plans the pod once its informer has seen it.
    let sub = Subscription {
        server: opts.config_server.clone(),
        server_node: opts.server_node.clone(),
        identity: identity.clone().into(),
        wait_seconds: 30,
        reports: None,
    };
    let mut retry = Retry::new(Backoff::BOOTSTRAP);
    let mut snap = loop {
        match sub.fetch().await {
            Ok(Some(s)) => break s,
            Ok(None) => info!(node = %issued.node_id, "not planned yet; waiting for the operator"),
            Err(e) => warn!(error = %e, "config distribution unavailable"),
        }
        tokio::time::sleep(retry.next_wait()).await;
    };
    snap.resolve_paths(&opts.dir);
    snap.validate()?;
    anyhow::ensure!(
        snap.node.id == issued.node_id && snap.node.role == Role::Home,
        "the distribution server sent a {:?} snapshot for {:?}; this sidecar is home node {:?}",
        snap.node.role,
        snap.node.id,
        issued.node_id
    );
    anyhow::ensure!(
        snap.node.trust_domain == trust_domain,
        "snapshot trust domain {:?} differs from the mounted one {trust_domain:?}",
        snap.node.trust_domain
    );
    // For `relayfed-proxy init --config` and for people debugging the pod.
    std::fs::write(opts.dir.join("snapshot.json"), serde_json::to_vec_pretty(&snap)?)?;

    let (tx, rx) = watch::channel(identity);
    tokio::spawn(renew(client, opts.clone(), trust_domain, keys, issued, tx));
    let run = RunOptions {
        config_server: Some(opts.config_server.clone()),
        config_server_node: opts.server_node.clone(),
        identity_updates: Some(rx),
        base_dir: Some(opts.dir.clone()),
    };
    runner::run(snap, run).await
}

/// Renews the certificate at each `renewAfter`, until the process ends.
async fn renew(
    client: CertificateClient,
    opts: WorkloadOptions,
    trust_domain: String,
    keys: Keys,
    mut current: CertificateResponse,
    tx: watch::Sender<HopIdentity>,
) {
    loop {
        let wait = unix(current.renew_after).duration_since(SystemTime::now()).unwrap_or_default();
        tokio::time::sleep(wait).await;
        let next = match obtain(&client, &opts, &keys).await {
            Ok(n) => n,
            Err(e) => {
                // Refused now (the pod lost its right to one?): keep the current certificate
                // and ask again in a minute, loudly.
                warn!(error = %e, not_after = current.not_after, "certificate renewal refused; retrying in 60 s");
                tokio::time::sleep(Duration::from_secs(60)).await;
                continue;
            }
        };
        if next.node_id != current.node_id {
            warn!(old = %current.node_id, new = %next.node_id, "renewal named another node; keeping the current certificate");
            tokio::time::sleep(Duration::from_secs(60)).await;
            continue;
        }
        match install(&opts.dir, &trust_domain, &keys, &next) {
            Ok(identity) => {
                info!(node = %next.node_id, not_after = next.not_after, "workload certificate renewed");
                let _ = tx.send(identity);
                current = next;
            }
            Err(e) => {
                warn!(error = %e, "renewed certificate not installed; retrying in 60 s");
                tokio::time::sleep(Duration::from_secs(60)).await;
            }
        }
    }
}
