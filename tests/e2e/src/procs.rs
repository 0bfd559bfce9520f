//! Running the real binary in tests, benches and the demo: processes that announce readiness
//! on stdout, admin-port scraping, and small TCP servers (echo, identify).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::process::Stdio;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;
use tokio::process::{Child, Command};

/// The `relayfed-proxy` next to `relayfed` (the binary local mode runs relays with), built
/// with the same profile if `cargo test` of another package did not build it.
pub fn proxy_next_to(relayfed: &Path) -> std::path::PathBuf {
    static BUILD: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let proxy = relayfed.with_file_name("relayfed-proxy");
    let _guard = BUILD.lock().unwrap_or_else(|p| p.into_inner());
    if !proxy.is_file() {
        let profile_dir = relayfed.parent().expect("binary in a directory");
        let target = profile_dir.parent().expect("profile directory in a target directory");
        let mut cmd = std::process::Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()));
        cmd.args(["build", "-q", "-p", "relayfed-sidecar", "--bin", "relayfed-proxy", "--target-dir"]).arg(target);
        if profile_dir.file_name().is_some_and(|n| n == "release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("cargo runs");
        assert!(status.success() && proxy.is_file(), "cannot build {}", proxy.display());
    }
    proxy
}

/// A field of `/proc/<pid>/status` in KiB (`VmRSS:`, `VmHWM:`); 0 when the process is gone.
pub fn status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| s.lines().find(|l| l.starts_with(field)).and_then(|l| l.split_whitespace().nth(1)?.parse().ok()))
        .unwrap_or(0)
}

/// A running `relayfed-proxy` process, killed on drop.
pub struct Proc {
    pub child: Child,
    pub ready: Value,
}

impl Proc {
    /// Starts `<binary> <mode> --config <config> [extra...]` and waits for its ready line.
    pub async fn start_bin(binary: &Path, mode: &str, config: &Path, extra: &[&str]) -> Proc {
        let mut child = Command::new(binary)
            .arg(mode)
            .arg("--config")
            .arg(config)
            .args(extra)
            .env("RELAYFED_LOG", std::env::var("RELAYFED_LOG").unwrap_or_else(|_| "error".into()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn relayfed-proxy");
        let stdout = child.stdout.take().unwrap();
        let mut lines = BufReader::new(stdout).lines();
        let line = lines.next_line().await.unwrap().expect("process exited before it was ready");
        let ready: Value = serde_json::from_str(&line).unwrap();
        assert_eq!(ready["event"], "ready", "{line}");
        // Keep draining stdout so the child never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        Proc { child, ready }
    }

    pub fn admin(&self) -> SocketAddr {
        self.ready["admin"].as_str().unwrap().parse().unwrap()
    }

    pub fn quic(&self) -> SocketAddr {
        self.ready["quic"].as_str().unwrap().parse().unwrap()
    }

    pub fn import(&self, key: &str) -> SocketAddr {
        self.ready["imports"][key]
            .as_str()
            .unwrap_or_else(|| panic!("no import {key}: {}", self.ready))
            .parse()
            .unwrap()
    }

    /// GETs an admin path and parses the JSON body.
    pub async fn json(&self, path: &str) -> Value {
        let out = get(self.admin(), path).await.unwrap();
        let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{path}: {e}: {out}"))
    }

    /// Sends a signal (SIGTERM for a clean stop, SIGKILL for a crash) and waits for exit.
    pub async fn signal(&mut self, sig: &str) {
        let pid = self.child.id().unwrap().to_string();
        std::process::Command::new("kill").args([format!("-{sig}"), pid]).status().unwrap();
        self.child.wait().await.unwrap();
    }

    /// Scrapes `/metrics`.
    pub async fn metrics(&self) -> String {
        get(self.admin(), "/metrics").await.unwrap()
    }

    /// Value of one sample, 0 when absent.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        sample(&self.metrics().await, name, labels)
    }
}

/// GETs `path` from an HTTP/1.0 server at `addr`: the whole response, head included.
pub async fn get(addr: SocketAddr, path: &str) -> std::io::Result<String> {
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: x\r\n\r\n").as_bytes()).await?;
    let mut out = String::new();
    s.read_to_string(&mut out).await?;
    Ok(out)
}

/// The value of `name` in Prometheus text summed over every series whose labels include
/// `labels` (one series when `labels` names them all), 0 when none does.
pub fn sample(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    let mut sum = 0.0;
    for line in text.lines() {
        let Some(rest) = line.strip_prefix(name) else { continue };
        let (lbl, value) = match rest.strip_prefix('{') {
            Some(r) => match r.split_once("} ") {
                Some((l, v)) => (l, v),
                None => continue,
            },
            None => match rest.strip_prefix(' ') {
                Some(v) => ("", v),
                None => continue,
            },
        };
        if labels.iter().all(|(k, v)| lbl.split(',').any(|kv| kv == format!("{k}=\"{v}\""))) {
            sum += value.trim().parse::<f64>().unwrap();
        }
    }
    sum
}

/// The version line of the `prometheus` on PATH (printed by the tests that scrape with it);
/// panics with how to get one when there is none.
pub fn prometheus_version() -> String {
    let out = std::process::Command::new("prometheus").arg("--version").output().unwrap_or_else(|e| {
        panic!("the prometheus binary is missing ({e}): `make prometheus` builds Prometheus 3 and make test puts it on PATH")
    });
    String::from_utf8_lossy(&out.stdout).lines().next().unwrap_or_default().to_owned()
}

/// How many series a Prometheus at `prometheus` returns for `expr` between `from` (Unix
/// seconds) and now (a range query, 2 s steps); the error carries Prometheus' answer.
pub async fn prometheus_series(prometheus: SocketAddr, expr: &str, from: f64) -> Result<usize, String> {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64());
    let path = format!("/api/v1/query_range?query={}&start={from:.3}&end={now:.3}&step=2", url_encode(expr));
    let out = get(prometheus, &path).await.map_err(|e| e.to_string())?;
    let body = out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default();
    let v: Value = serde_json::from_str(body).map_err(|e| format!("{e}: {out}"))?;
    if v["status"] != "success" {
        return Err(format!("{expr}: {body}"));
    }
    Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
}

/// Percent-encodes `q` for a URL query value.
fn url_encode(q: &str) -> String {
    q.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => (b as char).to_string(),
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// Waits until `check` holds, polling observable state every 20 ms; panics after `limit`.
pub async fn eventually<F, Fut>(what: &str, limit: std::time::Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

/// A server that answers each connection with `<name>|` followed by an echo of the request.
pub async fn identify_server(name: &str) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    let name = name.to_owned();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            let name = name.clone();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                if w.write_all(format!("{name}|").as_bytes()).await.is_ok() {
                    let _ = tokio::io::copy(&mut r, &mut w).await;
                }
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// A TCP echo server on loopback; returns its address.
pub async fn echo_server() -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    addr
}

/// Sends `payload`, half-closes, and reads everything back.
pub async fn round_trip(addr: SocketAddr, payload: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut s = TcpStream::connect(addr).await?;
    let (mut r, mut w) = s.split();
    let write = async {
        w.write_all(payload).await?;
        w.shutdown().await
    };
    let mut back = Vec::with_capacity(payload.len());
    let read = r.read_to_end(&mut back);
    let (wr, rd) = tokio::join!(write, read);
    wr?;
    rd?;
    Ok(back)
}
