//! The real CLIs against a plane (`kubectl`, `helm`) and credentials for other identities.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use anyhow::Context;
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{Api, PostParams};

use crate::Endpoints;

/// What a CLI run printed.
#[derive(Debug)]
pub struct Run {
    /// Exit success.
    pub ok: bool,
    /// Standard output.
    pub stdout: String,
    /// Standard error.
    pub stderr: String,
}

impl From<Output> for Run {
    fn from(o: Output) -> Self {
        Self {
            ok: o.status.success(),
            stdout: String::from_utf8_lossy(&o.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&o.stderr).into_owned(),
        }
    }
}

/// Runs `cmd` to completion, feeding it `input` when given.
fn run(cmd: &mut Command, input: Option<&str>) -> anyhow::Result<Run> {
    use std::io::Write;
    use std::process::Stdio;
    let stdin = if input.is_some() { Stdio::piped() } else { Stdio::null() };
    let mut child = cmd
        .stdin(stdin)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .with_context(|| format!("running {:?}", cmd.get_program()))?;
    if let (Some(text), Some(mut pipe)) = (input, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    Ok(child.wait_with_output()?.into())
}

impl Endpoints {
    /// Runs the real `kubectl --kubeconfig <admin> args...`.
    pub fn kubectl(&self, args: &[&str]) -> anyhow::Result<Run> {
        self.kubectl_as(&self.kubeconfig, args)
    }

    /// Runs `kubectl` with another kubeconfig.
    pub fn kubectl_as(&self, kubeconfig: &Path, args: &[&str]) -> anyhow::Result<Run> {
        run(
            Command::new(self.bin.join("kubectl")).arg(format!("--kubeconfig={}", kubeconfig.display())).args(args),
            None,
        )
    }

    /// Runs `kubectl` (admin) with `input` on its standard input.
    pub fn kubectl_stdin(&self, args: &[&str], input: &str) -> anyhow::Result<Run> {
        let kubeconfig = format!("--kubeconfig={}", self.kubeconfig.display());
        run(Command::new(self.bin.join("kubectl")).arg(kubeconfig).args(args), Some(input))
    }

    /// Runs the real `helm --kubeconfig <admin> args...` (its cache and config in the plane's
    /// directory).
    pub fn helm(&self, args: &[&str]) -> anyhow::Result<Run> {
        let home = self.dir.join("helm-home");
        run(
            Command::new(self.bin.join("helm"))
                .arg(format!("--kubeconfig={}", self.kubeconfig.display()))
                .args(args)
                .env("HELM_CACHE_HOME", home.join("cache"))
                .env("HELM_CONFIG_HOME", home.join("config"))
                .env("HELM_DATA_HOME", home.join("data")),
            None,
        )
    }

    /// A kubeconfig authenticating as ServiceAccount `ns/name` with a token from the
    /// TokenRequest API (valid `seconds`), written into the plane's directory.
    pub async fn service_account_kubeconfig(&self, ns: &str, name: &str, seconds: i64) -> anyhow::Result<PathBuf> {
        let admin = crate::kubeconfig::client(&self.kubeconfig).await?;
        let sas: Api<ServiceAccount> = Api::namespaced(admin, ns);
        let req = TokenRequest {
            spec: TokenRequestSpec { expiration_seconds: Some(seconds), ..Default::default() },
            ..Default::default()
        };
        let token = sas
            .create_token_request(name, &PostParams::default(), &req)
            .await
            .with_context(|| format!("TokenRequest for {ns}/{name}"))?
            .status
            .context("TokenRequest without status")?
            .token;
        let path = self.dir.join(format!("sa-{ns}-{name}.kubeconfig"));
        crate::kubeconfig::write_token(&path, &format!("{ns}-{name}"), &self.server, &self.ca_cert, &token)?;
        Ok(path)
    }
}

/// One write recorded in the API server's audit log.
#[derive(Debug, Clone)]
pub struct AuditWrite {
    /// `create`, `update`, `patch`, `delete`, ...
    pub verb: String,
    /// Resource (plural), with `/subresource` when there is one.
    pub resource: String,
    /// Namespace, empty for cluster-scoped objects.
    pub namespace: String,
    /// Object name.
    pub name: String,
    /// When the API server received it (RFC 3339, microseconds).
    pub time: String,
    /// HTTP status code of the answer.
    pub code: u16,
}

impl Endpoints {
    /// Every write `user` made, in order, from the audit log.
    pub fn audit_writes(&self, user: &str) -> Vec<AuditWrite> {
        let text = std::fs::read_to_string(&self.audit_log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|e| e["user"]["username"] == user && e["stage"] == "ResponseComplete")
            .map(|e| {
                let o = &e["objectRef"];
                let sub = o["subresource"].as_str().map(|s| format!("/{s}")).unwrap_or_default();
                AuditWrite {
                    verb: e["verb"].as_str().unwrap_or_default().to_owned(),
                    resource: format!("{}{sub}", o["resource"].as_str().unwrap_or_default()),
                    namespace: o["namespace"].as_str().unwrap_or_default().to_owned(),
                    name: o["name"].as_str().unwrap_or_default().to_owned(),
                    time: e["requestReceivedTimestamp"].as_str().unwrap_or_default().to_owned(),
                    code: e["responseStatus"]["code"].as_u64().unwrap_or(0) as u16,
                }
            })
            .collect()
    }
}

impl Endpoints {
    /// A service-account JWT with `claims`, signed (ES256) with the plane's own signing key:
    /// for tokens the TokenRequest API will not issue, such as one that has already expired.
    pub fn mint_token(&self, claims: &serde_json::Value) -> anyhow::Result<String> {
        use base64::Engine;
        use base64::engine::general_purpose::URL_SAFE_NO_PAD as B64URL;
        use ring::signature::{ECDSA_P256_SHA256_FIXED_SIGNING, EcdsaKeyPair};
        use rustls_pki_types::PrivatePkcs8KeyDer;
        use rustls_pki_types::pem::PemObject;
        let pem = std::fs::read(&self.sa_key)?;
        let der = PrivatePkcs8KeyDer::from_pem_slice(&pem).map_err(|e| anyhow::anyhow!("sa.key: {e}"))?;
        let rng = ring::rand::SystemRandom::new();
        let key = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_FIXED_SIGNING, der.secret_pkcs8_der(), &rng)
            .map_err(|e| anyhow::anyhow!("sa.key: {e}"))?;
        let header = B64URL.encode(br#"{"alg":"ES256","typ":"JWT"}"#);
        let body = B64URL.encode(serde_json::to_vec(claims)?);
        let input = format!("{header}.{body}");
        let sig = key.sign(&rng, input.as_bytes()).map_err(|e| anyhow::anyhow!("signing: {e}"))?;
        Ok(format!("{input}.{}", B64URL.encode(sig.as_ref())))
    }
}
