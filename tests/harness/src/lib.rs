//! Test support, never part of the product: real Kubernetes control planes for the operator's
//! suites. `tests/cluster/build.sh` builds the components from Go modules; [`ControlPlane`]
//! starts one on 127.0.0.1 and stops it on drop; [`shared`] gives a test binary one plane for
//! all its tests (each test takes its own namespace).

pub mod build;
pub mod http;
pub mod kubeconfig;
pub mod netns;
pub mod pki;
pub mod plane;
pub mod ports;
pub mod process;
pub mod tools;

use std::path::PathBuf;
use std::sync::OnceLock;

pub use plane::{ControlPlane, Endpoints, Options};

/// Where planes keep their files: `$RELAYFED_CLUSTER_RUN`, else `/tmp/relayfed-clusters`.
pub fn run_root() -> PathBuf {
    std::env::var_os("RELAYFED_CLUSTER_RUN").map_or_else(|| PathBuf::from("/tmp/relayfed-clusters"), PathBuf::from)
}

/// A fresh directory for a plane named `name`; directories of test processes that died
/// without cleaning up are removed first.
pub fn run_dir(name: &str) -> anyhow::Result<PathBuf> {
    let root = run_root();
    std::fs::create_dir_all(&root)?;
    for entry in std::fs::read_dir(&root)?.flatten() {
        let file = entry.file_name().to_string_lossy().into_owned();
        let owner = file.rsplit('-').nth(1).and_then(|p| p.parse::<i32>().ok());
        if owner.is_some_and(|pid| !process::alive(pid)) {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = root.join(format!("{name}-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

/// A current-thread runtime for the harness's own waits.
pub(crate) fn runtime() -> anyhow::Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_current_thread().enable_all().build()?)
}

/// One control plane per test binary, started on first use and stopped when the binary exits
/// (its processes die with it through `--pdeathsig`). Panics with the reason when it cannot
/// start: a suite that needs a cluster must not pass without one.
pub fn shared() -> &'static ControlPlane {
    static PLANE: OnceLock<ControlPlane> = OnceLock::new();
    PLANE.get_or_init(|| {
        let _ = rustls::crypto::ring::default_provider().install_default();
        match ControlPlane::start(Options { name: "shared".to_owned(), ..Options::default() }) {
            Ok(p) => p,
            Err(e) => panic!("the test control plane did not start: {e:#}"),
        }
    })
}
