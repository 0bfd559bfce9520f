//! Starting one container: a shell script run under `ip netns exec <pod netns>` (which also
//! bind-mounts `/etc/netns/<netns>/resolv.conf`) and `unshare --mount --uts` builds the
//! container's view — its image root (or a root of the host's programs), `/proc`, `/dev`, a
//! private `/tmp`, every volume mount, the pod's `resolv.conf` and `hosts`, its hostname — then
//! `chroot --userspec` runs the entrypoint as the container's user with only its environment.
//! The process keeps its pid through every `exec`, so the runner signals the container itself.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Stdio;

use anyhow::{Context, bail};
use k8s_openapi::api::core::v1::{Container, Pod};

use crate::images::ImageSpec;

/// What a container runs and as whom, resolved from the pod and its image.
#[derive(Debug, Clone)]
pub struct Launch {
    /// Root filesystem (`None`: the host's).
    pub rootfs: Option<PathBuf>,
    /// argv.
    pub argv: Vec<String>,
    /// Environment (nothing else is inherited).
    pub env: BTreeMap<String, String>,
    /// `uid:gid`.
    pub user: (u32, u32),
    /// Supplementary groups (the pod's `fsGroup` and `supplementalGroups`).
    pub groups: Vec<u32>,
    /// Working directory inside the root.
    pub working_dir: String,
    /// (host source, path in the container, read-only).
    pub mounts: Vec<(PathBuf, String, bool)>,
}

fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

fn numeric(s: &str, what: &str) -> anyhow::Result<u32> {
    s.parse().with_context(|| format!("{what} {s:?}: the pod runner needs a numeric id"))
}

impl Launch {
    /// Resolves `c` of `pod` against its image and the pod's volume directories.
    pub fn resolve(
        pod: &Pod,
        c: &Container,
        image: &ImageSpec,
        env: BTreeMap<String, String>,
        volume_dir: &dyn Fn(&str) -> PathBuf,
    ) -> anyhow::Result<Self> {
        let spec = pod.spec.as_ref().context("pod without spec")?;
        let (mut entry, mut args) = (image.entrypoint.clone(), image.cmd.clone());
        if let Some(cmd) = &c.command {
            entry = cmd.clone();
            args = vec![];
        }
        if let Some(a) = &c.args {
            args = a.clone();
        }
        let argv: Vec<String> = entry.into_iter().chain(args).map(|a| crate::volumes::expand(&a, &env)).collect();
        if argv.is_empty() {
            bail!("container {} has no command and its image no entrypoint", c.name);
        }
        let (mut uid, mut gid) = (0, 0);
        if let Some(u) = &image.user {
            let (a, b) = u.split_once(':').unwrap_or((u, u));
            uid = numeric(a, "image user")?;
            gid = if b == u { uid } else { numeric(b, "image group")? };
        }
        let psc = spec.security_context.as_ref();
        let csc = c.security_context.as_ref();
        if let Some(u) = csc.and_then(|s| s.run_as_user).or(psc.and_then(|s| s.run_as_user)) {
            uid = u as u32;
        }
        if let Some(g) = csc.and_then(|s| s.run_as_group).or(psc.and_then(|s| s.run_as_group)) {
            gid = g as u32;
        }
        let non_root = csc.and_then(|s| s.run_as_non_root).or(psc.and_then(|s| s.run_as_non_root));
        if non_root == Some(true) && uid == 0 {
            bail!("container {}: runAsNonRoot but the image runs as root (CreateContainerConfigError)", c.name);
        }
        let mut groups: Vec<u32> =
            psc.and_then(|s| s.supplemental_groups.clone()).unwrap_or_default().iter().map(|g| *g as u32).collect();
        if let Some(g) = psc.and_then(|s| s.fs_group) {
            groups.push(g as u32);
        }
        let mounts = c
            .volume_mounts
            .clone()
            .unwrap_or_default()
            .into_iter()
            .map(|m| {
                let mut src = volume_dir(&m.name);
                if let Some(sub) = m.sub_path.filter(|s| !s.is_empty()) {
                    src = src.join(sub);
                }
                (src, m.mount_path, m.read_only == Some(true))
            })
            .collect();
        Ok(Self {
            rootfs: image.rootfs.clone(),
            argv,
            env,
            user: (uid, gid),
            groups,
            working_dir: c.working_dir.clone().or_else(|| image.working_dir.clone()).unwrap_or_else(|| "/".into()),
            mounts,
        })
    }

    /// The script that builds the container's mount namespace and execs its process.
    pub fn script(&self, root: &Path, pod_dir: &Path, hostname: &str) -> String {
        let r = quote(&root.display().to_string());
        let mut s = String::from("set -eu\n");
        let _ = writeln!(s, "R={r}");
        if self.rootfs.is_none() {
            for d in ["usr", "lib", "lib64", "bin", "sbin", "etc"] {
                let _ = writeln!(s, "if [ -e /{d} ]; then mkdir -p \"$R/{d}\"; mount --rbind /{d} \"$R/{d}\"; fi");
            }
            // A host program outside those (a build output) is visible at its own path.
            if let Some(dir) = self.argv.first().map(Path::new).filter(|p| p.is_absolute()).and_then(Path::parent) {
                let d = quote(&dir.display().to_string());
                let _ = writeln!(s, "mkdir -p \"$R\"{d}; mount --bind {d} \"$R\"{d}");
            }
        }
        let _ = writeln!(s, "mkdir -p \"$R/proc\" \"$R/dev\" \"$R/tmp\" \"$R/etc\"");
        s.push_str("mount --rbind /proc \"$R/proc\"\nmount --rbind /dev \"$R/dev\"\nmount -t tmpfs tmpfs \"$R/tmp\"\n");
        for f in ["resolv.conf", "hosts"] {
            let src = quote(&pod_dir.join(f).display().to_string());
            let _ = writeln!(s, "[ -e \"$R/etc/{f}\" ] || touch \"$R/etc/{f}\"; mount --bind {src} \"$R/etc/{f}\"");
        }
        for (src, path, ro) in &self.mounts {
            let (src, dst) = (quote(&src.display().to_string()), quote(path));
            let _ = writeln!(
                s,
                "if [ -d {src} ]; then mkdir -p \"$R\"{dst}; else mkdir -p \"$(dirname \"$R\"{dst})\"; touch \"$R\"{dst}; fi"
            );
            let _ = writeln!(s, "mount --bind {src} \"$R\"{dst}");
            if *ro {
                let _ = writeln!(s, "mount -o remount,bind,ro \"$R\"{dst}");
            }
        }
        let _ = writeln!(s, "hostname {}", quote(hostname));
        let _ = writeln!(s, "cd \"$R\"{}", quote(&self.working_dir));
        let groups = self.groups.iter().map(u32::to_string).collect::<Vec<_>>().join(",");
        let groups = if groups.is_empty() { String::new() } else { format!(" --groups={groups}") };
        let mut exec = String::from("exec /usr/bin/env -i");
        for (k, v) in &self.env {
            let _ = write!(exec, " {}", quote(&format!("{k}={v}")));
        }
        let _ = write!(exec, " /usr/sbin/chroot --userspec={}:{}{groups} \"$R\"", self.user.0, self.user.1);
        for a in &self.argv {
            let _ = write!(exec, " {}", quote(a));
        }
        s.push_str(&exec);
        s.push('\n');
        s
    }
}

/// Starts a container from its script; stdout and stderr go to `log`. The process dies with
/// the runner (`setpriv --pdeathsig KILL`).
pub fn spawn(netns: &str, script: &Path, log: &Path) -> anyhow::Result<tokio::process::Child> {
    if let Some(parent) = log.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let out = std::fs::File::create(log).with_context(|| log.display().to_string())?;
    let err = out.try_clone()?;
    tokio::process::Command::new("setpriv")
        .args(["--pdeathsig", "KILL", "--", "ip", "netns", "exec", netns])
        .args(["unshare", "--mount", "--uts", "--propagation", "private", "/bin/sh"])
        .arg(script)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(err)
        .kill_on_drop(true)
        .spawn()
        .context("starting a container (setpriv, ip, unshare)")
}
