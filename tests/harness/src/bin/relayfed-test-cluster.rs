//! `relayfed-test-cluster up|down|status`: a test control plane kept running in the background
//! while iterating (`make cluster-up` / `make cluster-down`). `up` starts a detached `serve`
//! process that owns the plane and prints, as its last two lines, `kubeconfig: PATH` and
//! `bin: DIR`; `down` stops it and checks that none of its processes is left.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Parser, Subcommand};
use relayfed_test_cluster::process::alive;
use relayfed_test_cluster::{ControlPlane, Options};

#[derive(Parser)]
#[command(name = "relayfed-test-cluster", about = "A real Kubernetes control plane for tests, in the background")]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Start a plane in the background and wait until it is ready.
    Up {
        /// Directory for its files (certificates, logs, kubeconfig).
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
        /// Node names kwok makes Ready.
        #[arg(long, default_values_t = ["node-1".to_owned()])]
        node: Vec<String>,
    },
    /// Stop the plane started by `up`.
    Down {
        /// The directory given to `up`.
        #[arg(long, default_value_os_t = default_dir())]
        dir: PathBuf,
    },
    /// Own a plane in the foreground until SIGTERM/SIGINT (what `up` runs).
    #[command(hide = true)]
    Serve {
        /// Directory for its files.
        #[arg(long)]
        dir: PathBuf,
        /// Node names.
        #[arg(long)]
        node: Vec<String>,
    },
}

fn default_dir() -> PathBuf {
    relayfed_test_cluster::run_root().join("dev")
}

fn main() -> anyhow::Result<()> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    match Cli::parse().command {
        Cmd::Up { dir, node } => up(&dir, &node),
        Cmd::Down { dir } => down(&dir),
        Cmd::Serve { dir, node } => serve(dir, node),
    }
}

fn up(dir: &Path, nodes: &[String]) -> anyhow::Result<()> {
    if let Some(pid) = running(dir) {
        bail!("a plane already runs from {} (pid {pid}); `make cluster-down` first", dir.display());
    }
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    // Build (or find) the binaries here, so a cold build's progress shows in this terminal.
    let bin = relayfed_test_cluster::build::bin_dir()?;
    let log = std::fs::File::create(dir.join("serve.log"))?;
    let mut cmd = std::process::Command::new(std::env::current_exe()?);
    cmd.arg("serve").arg("--dir").arg(dir);
    for n in nodes {
        cmd.arg("--node").arg(n);
    }
    let mut child = std::os::unix::process::CommandExt::process_group(&mut cmd, 0)
        .env("RELAYFED_CLUSTER_BIN", &bin)
        .stdin(std::process::Stdio::null())
        .stdout(log.try_clone()?)
        .stderr(log)
        .spawn()?;
    std::fs::write(dir.join("serve.pid"), child.id().to_string())?;
    let t0 = Instant::now();
    let ready = dir.join("ready");
    while !ready.exists() {
        if let Some(status) = child.try_wait()? {
            bail!(
                "the plane did not start ({status}); {}:\n{}",
                dir.join("serve.log").display(),
                relayfed_test_cluster::process::tail(&dir.join("serve.log"), 40)
            );
        }
        if t0.elapsed() > Duration::from_secs(300) {
            bail!("the plane was not ready within 300 s; see {}", dir.join("serve.log").display());
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    print!("{}", std::fs::read_to_string(&ready)?);
    Ok(())
}

fn serve(dir: PathBuf, node: Vec<String>) -> anyhow::Result<()> {
    let nodes = if node.is_empty() { vec!["node-1".to_owned()] } else { node };
    let plane =
        ControlPlane::start(Options { name: "dev".to_owned(), nodes, dir: Some(dir.clone()), ..Options::default() })?;
    let rss: u64 = plane.rss_bytes().iter().map(|(_, b)| b).sum();
    std::fs::write(dir.join("pids"), plane.pids.iter().map(|(n, p)| format!("{p} {n}\n")).collect::<String>())?;
    let summary = format!(
        "ready in {:.1} s, {} MiB resident\nserver: {}\nkubeconfig: {}\nbin: {}\n",
        plane.ready_after.as_secs_f64(),
        rss / (1024 * 1024),
        plane.server,
        plane.kubeconfig.display(),
        plane.bin.display()
    );
    std::fs::write(dir.join("ready.tmp"), &summary)?;
    std::fs::rename(dir.join("ready.tmp"), dir.join("ready"))?;
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    rt.block_on(async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        anyhow::Ok(())
    })?;
    drop(plane);
    Ok(())
}

fn running(dir: &Path) -> Option<i32> {
    let pid: i32 = std::fs::read_to_string(dir.join("serve.pid")).ok()?.trim().parse().ok()?;
    alive(pid).then_some(pid)
}

fn down(dir: &Path) -> anyhow::Result<()> {
    let Some(pid) = running(dir) else {
        println!("no plane runs from {}", dir.display());
        return Ok(());
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM)
        .with_context(|| format!("signalling {pid}"))?;
    let children: Vec<i32> = std::fs::read_to_string(dir.join("pids"))
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    let t0 = Instant::now();
    while alive(pid) || children.iter().any(|c| alive(*c)) {
        if t0.elapsed() > Duration::from_secs(30) {
            let left: Vec<i32> = children.iter().copied().filter(|c| alive(*c)).collect();
            bail!("the plane did not stop within 30 s; still running: {pid} {left:?}");
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let _ = std::fs::remove_dir_all(dir);
    println!("stopped; no process left");
    Ok(())
}
