//! `relayfed local up --prometheus`: a Prometheus (the binary on `PATH`) scraping every node's
//! admin port and the supervisor's `/metrics`, with the `federation`, `node` and `role` labels
//! the dashboards filter on. Targets are a file-based service discovery file rewritten when a
//! node (re)starts, since node admin ports are chosen at process start.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use relayfed_proto::config::Role;
use serde_json::{Value, json};

/// How often Prometheus scrapes in local mode.
pub const SCRAPE_INTERVAL: Duration = Duration::from_secs(2);

/// One scrape target: node id, role label (`main`, `home`, `operator` for the supervisor),
/// `host:port`.
pub type Target = (String, &'static str, String);

/// The role label of a node.
pub fn role_label(role: Role) -> &'static str {
    match role {
        Role::Main => "main",
        Role::Home => "home",
    }
}

/// The targets: every node whose process reported its admin address, and the supervisor's
/// control API (`control`).
pub fn targets(
    nodes: &std::collections::BTreeMap<String, super::supervisor::NodeProc>,
    control: Option<std::net::SocketAddr>,
) -> Vec<Target> {
    let mut out: Vec<Target> = nodes
        .iter()
        .filter_map(|(n, p)| Some((n.clone(), role_label(p.role), p.ready.as_ref()?["admin"].as_str()?.to_owned())))
        .collect();
    out.extend(control.map(|c| ("supervisor".to_owned(), "operator", c.to_string())));
    out
}

/// The file-based service discovery document for `targets`.
pub fn targets_document(federation: &str, targets: &[Target]) -> Value {
    Value::Array(
        targets
            .iter()
            .map(|(node, role, addr)| {
                // The supervisor's own metrics carry a `node` label per node: no target label
                // may shadow it.
                let labels = if *role == "operator" {
                    json!({"federation": federation, "role": role})
                } else {
                    json!({"federation": federation, "node": node, "role": role})
                };
                json!({"targets": [addr], "labels": labels})
            })
            .collect(),
    )
}

/// The Prometheus configuration: one job reading `targets_file`.
pub fn config(targets_file: &Path) -> String {
    let secs = SCRAPE_INTERVAL.as_secs();
    format!(
        "# Written by `relayfed local up --prometheus`.\nglobal:\n  scrape_interval: {secs}s\n  evaluation_interval: {secs}s\n\
         scrape_configs:\n  - job_name: relayfed\n    file_sd_configs:\n      - files: [{:?}]\n        refresh_interval: {secs}s\n",
        targets_file.display().to_string()
    )
}

fn which(program: &str) -> bool {
    std::env::var_os("PATH").is_some_and(|path| std::env::split_paths(&path).any(|d| d.join(program).is_file()))
}

/// A Prometheus child process and its files.
pub struct Prometheus {
    child: std::process::Child,
    targets_file: PathBuf,
    federation: String,
    /// Its web address (`http://127.0.0.1:PORT`).
    pub url: String,
}

impl Prometheus {
    /// Writes the configuration under `dir` and starts `prometheus` listening on a free
    /// loopback port; fails with a clear message when the binary is missing.
    pub fn start(dir: &Path, federation: &str) -> anyhow::Result<Self> {
        std::fs::create_dir_all(dir.join("data"))?;
        let targets_file = dir.join("targets.json");
        std::fs::write(&targets_file, "[]")?;
        let config_file = dir.join("prometheus.yml");
        std::fs::write(&config_file, config(&targets_file))?;
        let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
        let log = std::fs::File::create(dir.join("prometheus.log"))?;
        // It dies with the supervisor even when that is killed (-9): through util-linux's
        // setpriv where it exists (the nodes set their parent-death signal themselves).
        let mut cmd = if which("setpriv") {
            let mut c = std::process::Command::new("setpriv");
            c.args(["--pdeathsig", "TERM", "--", "prometheus"]);
            c
        } else {
            std::process::Command::new("prometheus")
        };
        let child = cmd
            .arg(format!("--config.file={}", config_file.display()))
            .arg(format!("--storage.tsdb.path={}", dir.join("data").display()))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdin(std::process::Stdio::null())
            .stdout(log.try_clone()?)
            .stderr(log)
            .spawn()
            .context("--prometheus needs the prometheus binary on PATH (Debian: apt-get install prometheus)")?;
        Ok(Self { child, targets_file, federation: federation.to_owned(), url: format!("http://127.0.0.1:{port}") })
    }

    /// Replaces the scrape targets (written to a temporary file, then renamed, so Prometheus
    /// never reads half a file).
    pub fn set_targets(&self, targets: &[Target]) -> std::io::Result<()> {
        let tmp = self.targets_file.with_extension("json.tmp");
        std::fs::write(&tmp, targets_document(&self.federation, targets).to_string())?;
        std::fs::rename(&tmp, &self.targets_file)
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_target_carries_the_dashboard_labels() {
        let doc = targets_document(
            "acme",
            &[("hub".into(), "main", "127.0.0.1:1".into()), ("supervisor".into(), "operator", "127.0.0.1:2".into())],
        );
        assert_eq!(doc[0]["targets"][0], "127.0.0.1:1");
        assert_eq!(doc[0]["labels"], json!({"federation": "acme", "node": "hub", "role": "main"}));
        assert_eq!(doc[1]["labels"], json!({"federation": "acme", "role": "operator"}));
        let cfg = config(Path::new("/s/targets.json"));
        assert!(cfg.contains("files: [\"/s/targets.json\"]") && cfg.contains("scrape_interval: 2s"), "{cfg}");
    }
}
