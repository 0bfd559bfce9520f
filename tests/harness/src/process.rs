//! Child processes of a control plane: each runs under `setpriv --pdeathsig KILL`, so it dies
//! with the thread that started it even when the test process is killed, logs to a file, and
//! is killed and reaped on drop.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context;

/// One running component.
#[derive(Debug)]
pub struct Proc {
    /// Component name (`etcd`, `kube-apiserver`, ...).
    pub name: String,
    /// Where its stdout and stderr go.
    pub log: PathBuf,
    child: Child,
}

impl Proc {
    /// Starts `bin args...` with its output in `dir/<name>.log`.
    pub fn spawn(name: &str, bin: &Path, args: &[String], dir: &Path) -> anyhow::Result<Self> {
        Self::spawn_with_env(name, bin, args, &[], dir)
    }

    /// [`Proc::spawn`] inside network namespace `netns` when given: `nsenter --net` switches
    /// the network namespace only, so namespaces the process creates with `ip netns add` (the
    /// pod runner's pods) are mounted where every other process sees them (`ip netns exec`
    /// would give it a mount namespace of its own).
    pub fn spawn_in(netns: Option<&str>, name: &str, bin: &Path, args: &[String], dir: &Path) -> anyhow::Result<Self> {
        match netns {
            None => Self::spawn(name, bin, args, dir),
            Some(ns) => {
                let mut all = vec![format!("--net=/var/run/netns/{ns}"), "--".to_owned(), bin.display().to_string()];
                all.extend(args.iter().cloned());
                Self::spawn(name, Path::new("nsenter"), &all, dir)
            }
        }
    }

    /// [`Proc::spawn`] with extra environment variables.
    pub fn spawn_with_env(
        name: &str,
        bin: &Path,
        args: &[String],
        env: &[(&str, &std::ffi::OsStr)],
        dir: &Path,
    ) -> anyhow::Result<Self> {
        let log = dir.join(format!("{name}.log"));
        let out = std::fs::File::create(&log).with_context(|| log.display().to_string())?;
        let err = out.try_clone()?;
        let child = Command::new("setpriv")
            .args(["--pdeathsig", "KILL", "--"])
            .arg(bin)
            .args(args)
            .envs(env.iter().copied())
            .current_dir(dir)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .with_context(|| format!("starting {name} ({}) under setpriv (util-linux)", bin.display()))?;
        Ok(Self { name: name.to_owned(), log, child })
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// `Some(status)` once it has exited.
    pub fn exited(&mut self) -> Option<std::process::ExitStatus> {
        self.child.try_wait().ok().flatten()
    }

    /// The last `lines` lines of its log, for error messages.
    pub fn log_tail(&self, lines: usize) -> String {
        tail(&self.log, lines)
    }

    /// Resident memory in bytes (from /proc), 0 when gone.
    pub fn rss_bytes(&self) -> u64 {
        rss_bytes(self.pid())
    }

    /// Kills the process and waits for it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.kill();
    }
}

/// Whether `pid` is a live process (a zombie counts as gone).
pub fn alive(pid: i32) -> bool {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    !stat.is_empty() && !stat.split(") ").nth(1).is_some_and(|rest| rest.starts_with('Z'))
}

/// The last `lines` lines of a file.
pub fn tail(path: &Path, lines: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// Resident memory of a process in bytes, 0 when it is gone.
pub fn rss_bytes(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}
