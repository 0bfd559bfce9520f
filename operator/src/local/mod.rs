//! Embedded local mode: the whole federation on one machine from the same CR YAML that
//! `kubectl apply` takes (`relayfed local up|status|down`).
//!
//! One supervisor process admits the CRs (schema, CEL, `validate()`), compiles them with the
//! operator's [`plan`](crate::plan), keeps key material under a state directory, serves the
//! config distribution endpoint, and runs every relay as a child process of `relayfed-proxy`
//! (the binary a cluster runs), so a relay can crash, be killed and come back independently,
//! exactly like a pod. The CR files are watched: an admitted edit is published to the running nodes
//! (live where possible, a restart of that node where not); a rejected edit leaves the
//! running configuration in force. docs/architecture.md ("Local mode") has the picture.

pub mod ca_rotation;
pub mod http;
pub mod keys;
pub mod prometheus;
pub mod rollout;
pub mod rotation;
pub mod sources;
pub mod status;
pub mod supervisor;
pub mod workloads;

use std::path::{Path, PathBuf};

/// Where `relayfed-proxy` is: `explicit` (`--proxy` or `$RELAYFED_PROXY`), else next to the
/// running `relayfed` (`relayfed_exe`), else on `PATH`.
pub fn find_proxy(explicit: Option<PathBuf>, relayfed_exe: &Path) -> anyhow::Result<PathBuf> {
    const NAME: &str = "relayfed-proxy";
    if let Some(p) = explicit {
        anyhow::ensure!(p.is_file(), "--proxy {}: no such file", p.display());
        return Ok(p);
    }
    let sibling = relayfed_exe.with_file_name(NAME);
    if sibling.is_file() {
        return Ok(sibling);
    }
    let on_path = std::env::var_os("PATH")
        .into_iter()
        .flat_map(|p| std::env::split_paths(&p).collect::<Vec<_>>())
        .map(|d| d.join(NAME))
        .find(|p| p.is_file());
    on_path.ok_or_else(|| {
        anyhow::anyhow!(
            "local mode runs every relay with {NAME}, found neither next to {} nor on PATH; install it \
             (`cargo install --path sidecar`, or `cargo build --release -p relayfed-sidecar`) or give --proxy",
            relayfed_exe.display()
        )
    })
}

/// Files and directories under a state directory.
#[derive(Clone, Debug)]
pub struct StateDir {
    /// The root.
    pub root: PathBuf,
}

impl StateDir {
    /// The default: `$RELAYFED_STATE_DIR`, else `$XDG_STATE_HOME/relayfed/local`, else
    /// `~/.local/state/relayfed/local`.
    pub fn default_root() -> PathBuf {
        if let Some(d) = std::env::var_os("RELAYFED_STATE_DIR") {
            return PathBuf::from(d);
        }
        let base = std::env::var_os("XDG_STATE_HOME").map(PathBuf::from).unwrap_or_else(|| {
            std::env::var_os("HOME").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(".")).join(".local/state")
        });
        base.join("relayfed/local")
    }

    /// A state directory at `root`; a relative path is taken from the current directory now,
    /// since node processes run elsewhere and resolve paths in their snapshots as given.
    pub fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        let root = match (root.is_relative(), std::env::current_dir()) {
            (true, Ok(cwd)) => cwd.join(root),
            _ => root,
        };
        Self { root }
    }

    /// Key material.
    pub fn keys(&self) -> PathBuf {
        self.root.join("keys")
    }

    /// Runtime files (removed by `down`).
    pub fn run(&self) -> PathBuf {
        self.root.join("run")
    }

    /// The running supervisor's address file.
    pub fn supervisor_file(&self) -> PathBuf {
        self.run().join("supervisor.json")
    }

    /// Per-node snapshot files handed to node processes.
    pub fn node_file(&self, node: &str) -> PathBuf {
        self.run().join("nodes").join(format!("{node}.json"))
    }

    /// Logs.
    pub fn logs(&self) -> PathBuf {
        self.root.join("logs")
    }

    /// A node's log file.
    pub fn log_file(&self, node: &str) -> PathBuf {
        self.logs().join(format!("{node}.log"))
    }

    /// The generated passphrase file (used when none is given).
    pub fn generated_passphrase(&self) -> PathBuf {
        self.root.join("passphrase")
    }
}

/// The supervisor's address file: how `status` and `down` find it.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SupervisorFile {
    /// Supervisor process id.
    pub pid: u32,
    /// Control API address (`/local/status`, `/local/down`, `/metrics`).
    pub control: String,
    /// Config distribution address.
    pub distribution: String,
}

impl SupervisorFile {
    /// Reads it; `None` when absent or unreadable.
    pub fn read(path: &Path) -> Option<Self> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    }
}

/// Whether process `pid` exists.
pub fn alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else { return false };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

#[cfg(test)]
mod tests {
    use super::StateDir;

    #[test]
    fn a_relative_state_dir_becomes_absolute() {
        let s = StateDir::new("state");
        assert!(s.root.is_absolute(), "{}", s.root.display());
        assert!(s.root.ends_with("state"));
        assert!(s.keys().is_absolute());
        assert_eq!(StateDir::new("/var/lib/x").root, std::path::PathBuf::from("/var/lib/x"));
    }
}
