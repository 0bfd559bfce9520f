//! Kubeconfig files for a plane (the admin's client certificate, or a bearer token such as a
//! ServiceAccount's) and kube clients built from them.

use std::path::{Path, PathBuf};

use anyhow::Context;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as B64;
use kube::config::{KubeConfigOptions, Kubeconfig};

use crate::pki::Pki;

fn b64_file(p: &Path) -> anyhow::Result<String> {
    Ok(B64.encode(std::fs::read(p).with_context(|| p.display().to_string())?))
}

fn write(path: &Path, name: &str, server: &str, ca_cert: &Path, user: serde_json::Value) -> anyhow::Result<()> {
    let doc = serde_json::json!({
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": server, "certificate-authority-data": b64_file(ca_cert)?}}],
        "users": [{"name": name, "user": user}],
        "contexts": [{"name": name, "context": {"cluster": name, "user": name, "namespace": "default"}}],
        "current-context": name,
    });
    std::fs::write(path, serde_json::to_vec_pretty(&doc)?).with_context(|| path.display().to_string())
}

/// Writes `dir/admin.kubeconfig` (client certificate in `system:masters`).
pub fn write_admin(dir: &Path, name: &str, server: &str, pki: &Pki) -> anyhow::Result<PathBuf> {
    let path = dir.join("admin.kubeconfig");
    let user = serde_json::json!({
        "client-certificate-data": b64_file(&pki.admin_cert)?,
        "client-key-data": b64_file(&pki.admin_key)?,
    });
    write(&path, name, server, &pki.ca_cert, user)?;
    Ok(path)
}

/// Writes a kubeconfig at `path` that authenticates with a bearer `token`.
pub fn write_token(path: &Path, name: &str, server: &str, ca_cert: &Path, token: &str) -> anyhow::Result<()> {
    write(path, name, server, ca_cert, serde_json::json!({"token": token}))
}

/// A client from a kubeconfig file.
pub async fn client(path: &Path) -> anyhow::Result<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(path).with_context(|| path.display().to_string())?;
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(kube::Client::try_from(config)?)
}

/// A client with the kubeconfig's credentials and CA aimed at another `https://` URL (the
/// scheduler's and controller-manager's health endpoints share the serving CA).
pub async fn client_at(path: &Path, url: &str) -> anyhow::Result<kube::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let kc = Kubeconfig::read_from(path).with_context(|| path.display().to_string())?;
    let mut config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    config.cluster_url = url.parse()?;
    Ok(kube::Client::try_from(config)?)
}
