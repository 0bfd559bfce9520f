//! The supervisor's process table: starting a relay as a `relayfed-proxy` child, waiting for
//! its ready line, handling its exit (restart with backoff, or not while stopping), signals,
//! and the ordered shutdown (homes first, then main relays).

use std::process::Stdio;
use std::time::Instant;

use anyhow::Context;
use relayfed_proto::config::Role;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;
use tracing::{error, info, warn};

use super::*;

impl Supervisor {
    pub(super) fn spawn(&mut self, node: &str) -> anyhow::Result<()> {
        let snap = self.distributor.snapshot(node).with_context(|| format!("no snapshot for {node}"))?;
        let file = self.opts.state.node_file(node);
        std::fs::write(&file, serde_json::to_vec_pretty(snap.as_ref())?)?;
        let log = std::fs::OpenOptions::new().create(true).append(true).open(self.opts.state.log_file(node))?;
        let mode = match snap.node.role {
            Role::Main => "main-relay",
            Role::Home => "home",
        };
        let mut child = tokio::process::Command::new(&self.opts.proxy_exe)
            .arg(mode)
            .arg("--exit-with-parent")
            .arg("--config")
            .arg(&file)
            .arg("--config-server")
            .arg(self.distribution_addr.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::from(log))
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("cannot start {} for node {node}", self.opts.proxy_exe.display()))?;
        let pid = child.id();
        let generation = {
            let mut shared = self.shared.lock().map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
            let entry = shared.nodes.entry(node.to_owned()).or_insert_with(|| NodeProc {
                role: snap.node.role,
                state: ProcState::Starting,
                pid: None,
                restarts: 0,
                ready: None,
                last_exit: None,
                started_with: snap.as_ref().clone(),
                generation: 0,
                started_at: Instant::now(),
                restart_now: false,
            });
            entry.generation += 1;
            entry.state = ProcState::Starting;
            entry.pid = pid;
            entry.ready = None;
            entry.started_with = snap.as_ref().clone();
            entry.started_at = Instant::now();
            entry.restart_now = false;
            entry.generation
        };
        self.metrics.process_up.get_or_create(&[("node", node.to_owned())]).set(0);
        info!(%node, ?pid, version = snap.version, "node process started");
        let stdout = child.stdout.take();
        let tx = self.events.clone();
        let name = node.to_owned();
        tokio::spawn(async move {
            if let Some(out) = stdout {
                let mut lines = BufReader::new(out).lines();
                if let Ok(Some(line)) = lines.next_line().await
                    && let Ok(v) = serde_json::from_str::<Value>(&line)
                {
                    let _ = tx.send(Event::Ready { node: name.clone(), generation, line: v });
                }
                while let Ok(Some(_)) = lines.next_line().await {}
            }
            let status = match child.wait().await {
                Ok(s) => s.to_string(),
                Err(e) => e.to_string(),
            };
            let _ = tx.send(Event::Exited { node: name, generation, status });
        });
        Ok(())
    }

    /// Waits until every node in `group` printed its ready line; fails with the log tail of
    /// the first that exits or stays silent.
    pub(super) async fn wait_ready(&mut self, group: &[String]) -> anyhow::Result<()> {
        let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
        let mut rx = self.events_rx.take().context("event loop already running")?;
        let result = loop {
            let pending: Vec<String> = {
                let s = self.shared.lock().map_err(|_| anyhow::anyhow!("state lock poisoned"))?;
                group
                    .iter()
                    .filter(|n| s.nodes.get(*n).is_none_or(|p| p.state != ProcState::Running))
                    .cloned()
                    .collect()
            };
            if pending.is_empty() {
                break Ok(());
            }
            match tokio::time::timeout_at(deadline, rx.recv()).await {
                Ok(Some(Event::Exited { node, status, .. })) => {
                    break Err(anyhow::anyhow!(
                        "node {node} exited during start-up ({status}):\n{}",
                        self.log_tail(&node)
                    ));
                }
                Ok(Some(ev)) => self.handle(ev),
                Ok(None) => break Err(anyhow::anyhow!("event channel closed")),
                Err(_) => {
                    break Err(anyhow::anyhow!("nodes not ready after {READY_TIMEOUT:?}: {}", pending.join(", ")));
                }
            }
        };
        self.events_rx = Some(rx);
        result
    }

    pub(super) fn log_tail(&self, node: &str) -> String {
        let text = std::fs::read_to_string(self.opts.state.log_file(node)).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(15)..].join("\n")
    }

    /// Handles one event (except `Down`, which the loop handles).
    pub(super) fn handle(&mut self, ev: Event) {
        match ev {
            Event::RotateKeys(nodes) => {
                info!(relays = ?nodes, "ECH key rotation requested");
                self.rotate_now.extend(nodes);
                self.keys_due = tokio::time::Instant::now();
            }
            Event::RotateCa { stage_for, overlap } => self.begin_ca_rotation(stage_for, overlap),
            Event::AdvanceCa => self.advance_ca_rotation(),
            Event::Ready { node, generation, line } => {
                if let Ok(mut s) = self.shared.lock()
                    && let Some(p) = s.nodes.get_mut(&node)
                    && p.generation == generation
                {
                    p.state = ProcState::Running;
                    p.ready = Some(line);
                    self.metrics.process_up.get_or_create(&[("node", node.clone())]).set(1);
                    info!(%node, "node ready");
                }
                self.refresh_scrape_targets();
            }
            Event::Exited { node, generation, status } => {
                let mut respawn_now = false;
                let mut backoff = None;
                if let Ok(mut s) = self.shared.lock()
                    && let Some(p) = s.nodes.get_mut(&node)
                    && p.generation == generation
                {
                    self.metrics.process_up.get_or_create(&[("node", node.clone())]).set(0);
                    p.pid = None;
                    p.ready = None;
                    p.last_exit = Some(status.clone());
                    if self.shutting_down {
                        p.state = ProcState::Stopping;
                    } else if p.restart_now {
                        respawn_now = true;
                    } else {
                        p.state = ProcState::CrashLoop;
                        p.restarts += 1;
                        self.metrics.process_restarts.get_or_create(&[("node", node.clone())]).inc();
                        if p.started_at.elapsed() > Duration::from_secs(30) {
                            p.restarts = p.restarts.min(1);
                        }
                        let failures = u32::try_from(p.restarts.saturating_sub(1)).unwrap_or(u32::MAX);
                        backoff = Some(relayfed_proto::backoff::Backoff::RESTART.ceiling(failures));
                        error!(%node, %status, restart_in = ?backoff, "node process exited unexpectedly");
                    }
                }
                if respawn_now && let Err(e) = self.spawn(&node) {
                    error!(%node, error = %e, "cannot restart node");
                }
                if let Some(wait) = backoff {
                    let tx = self.events.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(wait).await;
                        let _ = tx.send(Event::Restart { node });
                    });
                }
            }
            Event::Restart { node } => {
                let due = self
                    .shared
                    .lock()
                    .ok()
                    .and_then(|s| s.nodes.get(&node).map(|p| p.state == ProcState::CrashLoop))
                    .unwrap_or(false);
                if due && !self.shutting_down {
                    info!(%node, "restarting node process");
                    if let Err(e) = self.spawn(&node) {
                        error!(%node, error = %e, "cannot restart node");
                    }
                }
            }
            Event::Down => {}
        }
    }

    pub(super) fn signal(&self, node: &str, sig: nix::sys::signal::Signal) {
        let pid = self.shared.lock().ok().and_then(|s| s.nodes.get(node).and_then(|p| p.pid));
        if let Some(pid) = pid.and_then(|p| i32::try_from(p).ok()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), sig);
        }
    }

    /// Stops `node`'s process; with `restart`, a new one starts (with the current snapshot)
    /// as soon as it exited.
    pub(super) fn stop(&mut self, node: &str, restart: bool) {
        if let Ok(mut s) = self.shared.lock()
            && let Some(p) = s.nodes.get_mut(node)
        {
            p.state = ProcState::Stopping;
            p.restart_now = restart;
        }
        self.signal(node, nix::sys::signal::Signal::SIGTERM);
    }

    pub(super) async fn shutdown(&mut self, rx: &mut mpsc::UnboundedReceiver<Event>) {
        self.shutting_down = true;
        info!("stopping the local federation");
        for role in [Role::Home, Role::Main] {
            let group: Vec<String> = self
                .shared
                .lock()
                .map(|s| {
                    s.nodes.iter().filter(|(_, p)| p.role == role && p.pid.is_some()).map(|(n, _)| n.clone()).collect()
                })
                .unwrap_or_default();
            for n in &group {
                self.stop(n, false);
            }
            let deadline = tokio::time::Instant::now() + STOP_GRACE;
            loop {
                let left: Vec<String> = self
                    .shared
                    .lock()
                    .map(|s| {
                        group.iter().filter(|n| s.nodes.get(*n).is_some_and(|p| p.pid.is_some())).cloned().collect()
                    })
                    .unwrap_or_default();
                if left.is_empty() {
                    break;
                }
                match tokio::time::timeout_at(deadline, rx.recv()).await {
                    Ok(Some(ev)) => self.handle(ev),
                    Ok(None) => break,
                    Err(_) => {
                        for n in &left {
                            warn!(node = %n, "did not stop in time: killing");
                            self.signal(n, nix::sys::signal::Signal::SIGKILL);
                        }
                        break;
                    }
                }
            }
        }
        self.workloads.stop_all();
        let _ = std::fs::remove_file(self.opts.state.supervisor_file());
        if self.remove_passphrase_on_exit {
            let _ = std::fs::remove_file(&self.passphrase_file);
        }
        info!("local federation stopped");
    }
}
