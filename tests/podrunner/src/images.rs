//! Which program an image runs. Images are not pulled: the test maps each image repository to
//! either an unpacked OCI image (its root filesystem, entrypoint, user and environment from the
//! image config) or a program of this machine run over a root made of the host's `/usr`,
//! `/lib*`, `/bin`, `/sbin` and `/etc`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};

/// One image the runner knows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ImageSpec {
    /// Repository matched against a container's image (tag and digest ignored).
    pub repository: String,
    /// Unpacked root filesystem to chroot into; `None`: the host's programs and libraries.
    #[serde(default)]
    pub rootfs: Option<PathBuf>,
    /// The image ENTRYPOINT (a container's `command` replaces it).
    #[serde(default)]
    pub entrypoint: Vec<String>,
    /// The image CMD (a container's `args` replace it).
    #[serde(default)]
    pub cmd: Vec<String>,
    /// `NAME=value` pairs of the image config.
    #[serde(default)]
    pub env: Vec<String>,
    /// `uid[:gid]` of the image config; root when absent.
    #[serde(default)]
    pub user: Option<String>,
    /// Working directory of the image config.
    #[serde(default)]
    pub working_dir: Option<String>,
}

/// The image map the runner is started with (a JSON list of [`ImageSpec`]).
#[derive(Clone, Debug, Default)]
pub struct Images(Vec<ImageSpec>);

impl Images {
    /// Reads the map from a JSON file.
    pub fn load(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path).with_context(|| format!("reading image map {}", path.display()))?;
        Ok(Self(serde_json::from_str(&text).with_context(|| format!("parsing image map {}", path.display()))?))
    }

    /// The spec for a container image reference, if mapped.
    pub fn find(&self, image: &str) -> Option<&ImageSpec> {
        let repo = repository(image);
        self.0.iter().find(|s| s.repository == repo)
    }
}

/// The repository part of an image reference: without `@digest` and `:tag`.
pub fn repository(image: &str) -> &str {
    let no_digest = image.split('@').next().unwrap_or(image);
    match no_digest.rsplit_once(':') {
        Some((repo, tag)) if !tag.contains('/') => repo,
        _ => no_digest,
    }
}

fn tar(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("tar").args(args).output().context("running tar")?;
    if !out.status.success() {
        bail!("tar {args:?}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn blob(layout: &Path, digest: &str) -> anyhow::Result<PathBuf> {
    let hex = digest.strip_prefix("sha256:").with_context(|| format!("digest {digest} is not sha256"))?;
    Ok(layout.join("blobs/sha256").join(hex))
}

fn read_json(path: &Path) -> anyhow::Result<serde_json::Value> {
    let text = std::fs::read(path).with_context(|| path.display().to_string())?;
    serde_json::from_slice(&text).with_context(|| format!("{} is not JSON", path.display()))
}

fn strings(v: &serde_json::Value) -> Vec<String> {
    v.as_array().map(|a| a.iter().filter_map(|s| s.as_str().map(str::to_owned)).collect()).unwrap_or_default()
}

/// Unpacks an OCI image archive (an OCI layout in a tar, as `make images` writes) into
/// `out/rootfs` and returns its spec under `repository`.
pub fn unpack(archive: &Path, repository: &str, out: &Path) -> anyhow::Result<ImageSpec> {
    let layout = out.join("layout");
    let rootfs = out.join("rootfs");
    for d in [&layout, &rootfs] {
        let _ = std::fs::remove_dir_all(d);
        std::fs::create_dir_all(d)?;
    }
    tar(&["-xf", &archive.display().to_string(), "-C", &layout.display().to_string()])?;
    let index = read_json(&layout.join("index.json"))?;
    let manifest_digest = index["manifests"][0]["digest"].as_str().context("index.json names no manifest")?;
    let manifest = read_json(&blob(&layout, manifest_digest)?)?;
    let config_digest = manifest["config"]["digest"].as_str().context("the manifest names no config")?;
    let config = read_json(&blob(&layout, config_digest)?)?;
    for layer in manifest["layers"].as_array().context("the manifest lists no layers")? {
        let digest = layer["digest"].as_str().context("a layer without a digest")?;
        tar(&["-xf", &blob(&layout, digest)?.display().to_string(), "-C", &rootfs.display().to_string()])?;
    }
    let _ = std::fs::remove_dir_all(&layout);
    let c = &config["config"];
    Ok(ImageSpec {
        repository: repository.to_owned(),
        rootfs: Some(rootfs),
        entrypoint: strings(&c["Entrypoint"]),
        cmd: strings(&c["Cmd"]),
        env: strings(&c["Env"]),
        user: c["User"].as_str().filter(|u| !u.is_empty()).map(str::to_owned),
        working_dir: c["WorkingDir"].as_str().filter(|w| !w.is_empty()).map(str::to_owned),
    })
}

#[cfg(test)]
mod tests {
    use super::repository;

    #[test]
    fn repositories_drop_tags_and_digests_but_not_registry_ports() {
        assert_eq!(repository("ghcr.io/relayfed/relayfed:0.1.0"), "ghcr.io/relayfed/relayfed");
        assert_eq!(repository("ghcr.io/relayfed/relayfed@sha256:ab"), "ghcr.io/relayfed/relayfed");
        assert_eq!(repository("localhost:5000/app"), "localhost:5000/app");
        assert_eq!(repository("localhost:5000/app:v1"), "localhost:5000/app");
        assert_eq!(repository("busybox"), "busybox");
    }
}
