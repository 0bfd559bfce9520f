//! Volumes and environment as the kubelet materialises them: Secret, ConfigMap, downwardAPI and
//! projected volumes (service-account tokens from the TokenRequest API, bound to the pod) are
//! written the way the kubelet's atomic writer does — a timestamped directory behind a
//! `..data` symlink, one symlink per file — so a container sees every refresh at once; emptyDir
//! is a directory of the pod. `fsGroup` owns the files (group-readable), as the kubelet does.

use std::collections::BTreeMap;
use std::os::unix::fs::{PermissionsExt, symlink};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{
    ConfigMap, Container, DownwardAPIVolumeFile, KeyToPath, ObjectFieldSelector, Pod, Secret, ServiceAccount, Volume,
};
use kube::Api;
use kube::api::PostParams;
use serde_json::json;

/// A token obtained for a projected volume, reused until 80% of its life has passed.
struct Token {
    value: String,
    renew_at: Instant,
}

/// The volumes of one pod, under `<pod dir>/volumes/<name>`.
pub struct PodVolumes {
    root: PathBuf,
    tokens: BTreeMap<String, Token>,
}

/// Files of one volume: relative path -> (bytes, mode).
type Files = BTreeMap<String, (Vec<u8>, u32)>;

fn field(pod: &Pod, f: &ObjectFieldSelector) -> anyhow::Result<String> {
    let m = &pod.metadata;
    let path = f.field_path.as_str();
    let status = pod.status.as_ref();
    let map_value = |map: &Option<BTreeMap<String, String>>, key: &str| {
        map.as_ref().and_then(|l| l.get(key)).cloned().unwrap_or_default()
    };
    let map_all = |map: &Option<BTreeMap<String, String>>| {
        map.as_ref().map(|l| l.iter().map(|(k, v)| format!("{k}={v:?}\n")).collect::<String>()).unwrap_or_default()
    };
    Ok(match path {
        "metadata.name" => m.name.clone().unwrap_or_default(),
        "metadata.namespace" => m.namespace.clone().unwrap_or_default(),
        "metadata.uid" => m.uid.clone().unwrap_or_default(),
        "metadata.labels" => map_all(&m.labels),
        "metadata.annotations" => map_all(&m.annotations),
        "spec.nodeName" => pod.spec.as_ref().and_then(|s| s.node_name.clone()).unwrap_or_default(),
        "spec.serviceAccountName" => {
            pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into())
        }
        "status.podIP" => status.and_then(|s| s.pod_ip.clone()).unwrap_or_default(),
        "status.hostIP" => status.and_then(|s| s.host_ip.clone()).unwrap_or_default(),
        other => {
            if let Some(key) = other.strip_prefix("metadata.labels['").and_then(|k| k.strip_suffix("']")) {
                map_value(&m.labels, key)
            } else if let Some(key) = other.strip_prefix("metadata.annotations['").and_then(|k| k.strip_suffix("']")) {
                map_value(&m.annotations, key)
            } else {
                bail!("fieldRef {other} is not supported by the pod runner")
            }
        }
    })
}

fn select(data: BTreeMap<String, Vec<u8>>, items: &Option<Vec<KeyToPath>>, mode: u32) -> anyhow::Result<Files> {
    match items {
        None => Ok(data.into_iter().map(|(k, v)| (k, (v, mode))).collect()),
        Some(items) => items
            .iter()
            .map(|i| {
                let v = data.get(&i.key).with_context(|| format!("key {} not found", i.key))?;
                Ok((i.path.clone(), (v.clone(), i.mode.map_or(mode, |m| m as u32))))
            })
            .collect(),
    }
}

fn secret_data(s: Secret) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> = s.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.0)).collect();
    for (k, v) in s.string_data.unwrap_or_default() {
        out.insert(k, v.into_bytes());
    }
    out
}

fn config_map_data(c: ConfigMap) -> BTreeMap<String, Vec<u8>> {
    let mut out: BTreeMap<String, Vec<u8>> =
        c.data.unwrap_or_default().into_iter().map(|(k, v)| (k, v.into_bytes())).collect();
    for (k, v) in c.binary_data.unwrap_or_default() {
        out.insert(k, v.0);
    }
    out
}

async fn get_opt<K>(api: Api<K>, name: &str, optional: bool, what: &str) -> anyhow::Result<Option<K>>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    match api.get_opt(name).await.with_context(|| format!("reading {what} {name}"))? {
        Some(o) => Ok(Some(o)),
        None if optional => Ok(None),
        None => bail!("{what} {name} not found"),
    }
}

/// The data of Secret `ns/name` (empty when it is optional and absent).
async fn secret_of(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: Option<bool>,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let api = Api::<Secret>::namespaced(client.clone(), ns);
    Ok(get_opt(api, name, optional == Some(true), "Secret").await?.map(secret_data).unwrap_or_default())
}

/// The data of ConfigMap `ns/name` (empty when it is optional and absent).
async fn config_map_of(
    client: &kube::Client,
    ns: &str,
    name: &str,
    optional: Option<bool>,
) -> anyhow::Result<BTreeMap<String, Vec<u8>>> {
    let api = Api::<ConfigMap>::namespaced(client.clone(), ns);
    Ok(get_opt(api, name, optional == Some(true), "ConfigMap").await?.map(config_map_data).unwrap_or_default())
}

fn downward(pod: &Pod, items: &[DownwardAPIVolumeFile], mode: u32) -> anyhow::Result<Files> {
    items
        .iter()
        .map(|i| {
            let value = match &i.field_ref {
                Some(f) => field(pod, f)?,
                None => bail!("downwardAPI item {}: only fieldRef is supported", i.path),
            };
            Ok((i.path.clone(), (value.into_bytes(), i.mode.map_or(mode, |m| m as u32))))
        })
        .collect()
}

impl PodVolumes {
    /// Volumes of a pod whose directory is `pod_dir`.
    pub fn new(pod_dir: &Path) -> Self {
        Self { root: pod_dir.join("volumes"), tokens: BTreeMap::new() }
    }

    /// The host directory of volume `name`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.root.join(name)
    }

    async fn token(
        &mut self,
        client: &kube::Client,
        pod: &Pod,
        key: String,
        audience: Option<String>,
        seconds: i64,
    ) -> anyhow::Result<String> {
        if let Some(t) = self.tokens.get(&key).filter(|t| Instant::now() < t.renew_at) {
            return Ok(t.value.clone());
        }
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let sa = pod.spec.as_ref().and_then(|s| s.service_account_name.clone()).unwrap_or_else(|| "default".into());
        let api: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns);
        let body = json!({
            "apiVersion": "authentication.k8s.io/v1", "kind": "TokenRequest",
            "spec": {
                "audiences": audience.map(|a| vec![a]).unwrap_or_default(),
                "expirationSeconds": seconds,
                "boundObjectRef": {"apiVersion": "v1", "kind": "Pod",
                    "name": pod.metadata.name, "uid": pod.metadata.uid},
            }
        });
        let resp: serde_json::Value = api
            .create_subresource("token", &sa, &PostParams::default(), &body)
            .await
            .with_context(|| format!("TokenRequest for service account {ns}/{sa}"))?;
        let value = resp["status"]["token"].as_str().context("TokenRequest answered without a token")?.to_owned();
        let granted = resp["spec"]["expirationSeconds"].as_i64().unwrap_or(seconds).max(60) as u64;
        let renew_at = Instant::now() + Duration::from_secs(granted * 8 / 10);
        self.tokens.insert(key, Token { value: value.clone(), renew_at });
        Ok(value)
    }

    /// Writes (or refreshes) every volume of `pod`. Returns the names of volumes that could not
    /// be written yet, with the reason (a Secret that does not exist yet keeps the pod waiting).
    pub async fn sync(&mut self, client: &kube::Client, pod: &Pod) -> anyhow::Result<()> {
        let ns = pod.metadata.namespace.clone().unwrap_or_default();
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let fs_group = spec.security_context.as_ref().and_then(|s| s.fs_group).map(|g| g as u32);
        for v in spec.volumes.clone().unwrap_or_default() {
            let files = self.files(client, pod, &ns, &v).await.with_context(|| format!("volume {}", v.name))?;
            let dir = self.path(&v.name);
            match files {
                None => {
                    std::fs::create_dir_all(&dir)?;
                    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o777))?;
                    if let Some(g) = fs_group {
                        std::os::unix::fs::chown(&dir, None, Some(g))?;
                    }
                }
                Some(files) => write_atomic(&dir, &files, fs_group)?,
            }
        }
        Ok(())
    }

    async fn files(&mut self, client: &kube::Client, pod: &Pod, ns: &str, v: &Volume) -> anyhow::Result<Option<Files>> {
        if v.empty_dir.is_some() {
            return Ok(None);
        }
        if let Some(s) = &v.secret {
            let name = s.secret_name.clone().unwrap_or_default();
            let mode = s.default_mode.unwrap_or(0o644) as u32;
            return Ok(Some(select(secret_of(client, ns, &name, s.optional).await?, &s.items, mode)?));
        }
        if let Some(c) = &v.config_map {
            let mode = c.default_mode.unwrap_or(0o644) as u32;
            return Ok(Some(select(config_map_of(client, ns, &c.name, c.optional).await?, &c.items, mode)?));
        }
        if let Some(d) = &v.downward_api {
            let mode = d.default_mode.unwrap_or(0o644) as u32;
            return Ok(Some(downward(pod, d.items.as_deref().unwrap_or_default(), mode)?));
        }
        if let Some(p) = &v.projected {
            let mode = p.default_mode.unwrap_or(0o644) as u32;
            let mut files = Files::new();
            for (i, src) in p.sources.clone().unwrap_or_default().into_iter().enumerate() {
                if let Some(s) = src.secret {
                    files.extend(select(secret_of(client, ns, &s.name, s.optional).await?, &s.items, mode)?);
                } else if let Some(c) = src.config_map {
                    files.extend(select(config_map_of(client, ns, &c.name, c.optional).await?, &c.items, mode)?);
                } else if let Some(d) = src.downward_api {
                    files.extend(downward(pod, d.items.as_deref().unwrap_or_default(), mode)?);
                } else if let Some(t) = src.service_account_token {
                    let key = format!("{}/{i}", v.name);
                    let token = self.token(client, pod, key, t.audience, t.expiration_seconds.unwrap_or(3600)).await?;
                    files.insert(t.path, (token.into_bytes(), mode));
                } else {
                    bail!(
                        "projected source {i}: only secret, configMap, downwardAPI and serviceAccountToken are supported"
                    );
                }
            }
            return Ok(Some(files));
        }
        if let Some(h) = &v.host_path {
            let dir = self.path(&v.name);
            if std::fs::symlink_metadata(&dir).is_err() {
                std::fs::create_dir_all(&self.root)?;
                symlink(&h.path, &dir)?;
            }
            return Ok(None);
        }
        bail!(
            "volume type not supported by the pod runner (emptyDir, secret, configMap, downwardAPI, projected, hostPath are)"
        )
    }
}

/// The kubelet's atomic writer: the files go into a fresh `..<stamp>` directory, `..data`
/// is swapped to it with one rename, and each file is a symlink through `..data`.
fn write_atomic(dir: &Path, files: &Files, fs_group: Option<u32>) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir)?;
    let current = std::fs::read_link(dir.join("..data")).ok();
    if let Some(cur) = &current {
        let same = files.iter().all(|(p, (bytes, _))| std::fs::read(dir.join(cur).join(p)).is_ok_and(|b| &b == bytes));
        let count = walk(&dir.join(cur)).len();
        if same && count == files.len() {
            return Ok(());
        }
    }
    let stamp = format!(
        "..{}",
        SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or_default()
    );
    let target = dir.join(&stamp);
    for (rel, (bytes, mode)) in files {
        if rel.split('/').any(|c| c == ".." || c.is_empty()) {
            bail!("file path {rel:?} escapes its volume");
        }
        let path = target.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(&path, bytes)?;
        let mode = match fs_group {
            Some(g) => {
                std::os::unix::fs::chown(&path, None, Some(g))?;
                mode | 0o040
            }
            None => *mode,
        };
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode))?;
    }
    std::fs::set_permissions(&target, std::fs::Permissions::from_mode(0o755))?;
    let tmp = dir.join("..data_tmp");
    let _ = std::fs::remove_file(&tmp);
    symlink(&stamp, &tmp)?;
    std::fs::rename(&tmp, dir.join("..data"))?;
    for rel in files.keys() {
        let top = rel.split('/').next().unwrap_or(rel);
        let link = dir.join(top);
        if std::fs::symlink_metadata(&link).is_err() {
            symlink(format!("..data/{top}"), &link)?;
        }
    }
    if let Some(old) = current {
        let _ = std::fs::remove_dir_all(dir.join(old));
    }
    Ok(())
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let p = e.path();
        if p.is_dir() { out.extend(walk(&p)) } else { out.push(p) }
    }
    out
}

/// Expands `$(VAR)` references as the kubelet does (`$$` escapes; unknown names stay).
pub fn expand(s: &str, env: &BTreeMap<String, String>) -> String {
    let mut out = String::new();
    let mut rest = s;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        if let Some(tail) = after.strip_prefix('$') {
            out.push('$');
            rest = tail;
        } else if let Some(inner) = after.strip_prefix('(')
            && let Some(end) = inner.find(')')
        {
            let name = &inner[..end];
            match env.get(name) {
                Some(v) => out.push_str(v),
                None => out.push_str(&format!("$({name})")),
            }
            rest = &inner[end + 1..];
        } else {
            out.push('$');
            rest = after;
        }
    }
    out.push_str(rest);
    out
}

/// A container's environment: the image's, then the kubelet's service variables for the API
/// server, then `envFrom`, then `env` (fieldRef, secretKeyRef, configMapKeyRef, `$(VAR)`).
pub async fn environment(
    client: &kube::Client,
    pod: &Pod,
    c: &Container,
    image_env: &[String],
    api: (&str, u16),
) -> anyhow::Result<BTreeMap<String, String>> {
    let ns = pod.metadata.namespace.clone().unwrap_or_default();
    let mut env = BTreeMap::new();
    for kv in image_env {
        if let Some((k, v)) = kv.split_once('=') {
            env.insert(k.to_owned(), v.to_owned());
        }
    }
    // What a container runtime sets when the image does not.
    env.entry("PATH".into()).or_insert_with(|| "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin".into());
    env.insert("HOSTNAME".into(), pod.metadata.name.clone().unwrap_or_default());
    env.insert("KUBERNETES_SERVICE_HOST".into(), api.0.to_owned());
    env.insert("KUBERNETES_SERVICE_PORT".into(), api.1.to_string());
    env.insert("KUBERNETES_SERVICE_PORT_HTTPS".into(), api.1.to_string());
    env.insert("KUBERNETES_PORT".into(), format!("tcp://{}:{}", api.0, api.1));
    for from in c.env_from.clone().unwrap_or_default() {
        let prefix = from.prefix.unwrap_or_default();
        let data = if let Some(r) = from.secret_ref {
            secret_of(client, &ns, &r.name, r.optional).await?
        } else if let Some(r) = from.config_map_ref {
            config_map_of(client, &ns, &r.name, r.optional).await?
        } else {
            BTreeMap::new()
        };
        for (k, v) in data {
            env.insert(format!("{prefix}{k}"), String::from_utf8_lossy(&v).into_owned());
        }
    }
    for e in c.env.clone().unwrap_or_default() {
        let value = match e.value_from {
            None => expand(&e.value.unwrap_or_default(), &env),
            Some(from) => {
                let (data, key, optional, kind, name) = if let Some(f) = from.field_ref {
                    env.insert(e.name, field(pod, &f)?);
                    continue;
                } else if let Some(k) = from.secret_key_ref {
                    (secret_of(client, &ns, &k.name, k.optional).await?, k.key, k.optional, "Secret", k.name)
                } else if let Some(k) = from.config_map_key_ref {
                    (config_map_of(client, &ns, &k.name, k.optional).await?, k.key, k.optional, "ConfigMap", k.name)
                } else {
                    bail!("env {}: only fieldRef, secretKeyRef and configMapKeyRef are supported", e.name)
                };
                match data.get(&key) {
                    Some(v) => String::from_utf8_lossy(v).into_owned(),
                    None if optional == Some(true) => continue,
                    None => bail!("env {}: key {key} not in {kind} {name}", e.name),
                }
            }
        };
        env.insert(e.name, value);
    }
    Ok(env)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn references_expand_like_the_kubelet() {
        let env = BTreeMap::from([("A".to_owned(), "x".to_owned())]);
        assert_eq!(expand("$(A)/$(B)/$$(A)/$", &env), "x/$(B)/$(A)/$");
    }

    #[test]
    fn refreshed_volumes_swap_in_one_rename() {
        let dir = std::env::temp_dir().join(format!("rf-vol-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let files = |v: &str| Files::from([("token".to_owned(), (v.as_bytes().to_vec(), 0o644))]);
        write_atomic(&dir, &files("one"), None).unwrap();
        let first = std::fs::read_link(dir.join("..data")).unwrap();
        write_atomic(&dir, &files("two"), None).unwrap();
        assert_eq!(std::fs::read_to_string(dir.join("token")).unwrap(), "two");
        assert_ne!(std::fs::read_link(dir.join("..data")).unwrap(), first);
        assert!(!dir.join(&first).exists(), "the previous version is removed");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
