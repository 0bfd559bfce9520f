//! Where the control-plane binaries are: `$RELAYFED_CLUSTER_BIN`, else whatever
//! `tests/cluster/build.sh` prints (it builds them once per go.sum into a cache outside the
//! work tree and answers at once when they are current).

use std::path::PathBuf;
use std::sync::OnceLock;

use anyhow::{Context, bail};

/// The directory holding etcd, kube-apiserver, ..., kubectl, kwok and helm.
pub fn bin_dir() -> anyhow::Result<PathBuf> {
    static DIR: OnceLock<Result<PathBuf, String>> = OnceLock::new();
    DIR.get_or_init(|| find().map_err(|e| format!("{e:#}"))).clone().map_err(|e| anyhow::anyhow!(e))
}

fn find() -> anyhow::Result<PathBuf> {
    if let Some(d) = std::env::var_os("RELAYFED_CLUSTER_BIN") {
        return Ok(PathBuf::from(d));
    }
    // From the running test's package up to the repository (not the path this crate was
    // compiled at: a shared target directory serves checkouts at other paths).
    let start = std::env::var_os("CARGO_MANIFEST_DIR").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("."));
    let script = start
        .ancestors()
        .map(|d| d.join("tests/cluster/build.sh"))
        .find(|p| p.exists())
        .with_context(|| format!("no tests/cluster/build.sh above {}", start.display()))?;
    let out = std::process::Command::new("bash")
        .arg(&script)
        .stderr(std::process::Stdio::inherit())
        .output()
        .with_context(|| format!("running {} (needs Go: `make cluster`)", script.display()))?;
    if !out.status.success() {
        bail!("{} failed ({}); run `make cluster` to see why", script.display(), out.status);
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let dir = text.lines().last().map(str::trim).unwrap_or_default();
    if dir.is_empty() {
        bail!("{} printed no binary directory", script.display());
    }
    Ok(PathBuf::from(dir))
}
