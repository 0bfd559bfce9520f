//! Readiness, liveness and startup probes as the kubelet runs them: from the node, against the
//! pod IP (httpGet: a 2xx or 3xx answer; tcpSocket: a connection), within `timeoutSeconds`.
//! `exec` and `grpc` probes are not supported: such a probe always fails, with that reason.

use std::net::Ipv4Addr;
use std::time::Duration;

use k8s_openapi::api::core::v1::{Container, Probe};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn port(c: &Container, p: &IntOrString) -> Option<u16> {
    match p {
        IntOrString::Int(n) => u16::try_from(*n).ok(),
        IntOrString::String(name) => c
            .ports
            .as_ref()?
            .iter()
            .find(|cp| cp.name.as_deref() == Some(name))
            .and_then(|cp| u16::try_from(cp.container_port).ok()),
    }
}

/// Runs `probe` of container `c` against `ip`; `Err` says why it failed.
pub async fn run(ip: Ipv4Addr, c: &Container, probe: &Probe) -> Result<(), String> {
    let timeout = Duration::from_secs(probe.timeout_seconds.unwrap_or(1).max(1) as u64);
    let attempt = async {
        if let Some(h) = &probe.http_get {
            let port = port(c, &h.port).ok_or("httpGet port not found")?;
            let mut s = TcpStream::connect((ip, port)).await.map_err(|e| e.to_string())?;
            let path = h.path.clone().unwrap_or_else(|| "/".into());
            let req = format!(
                "GET {path} HTTP/1.1\r\nHost: {ip}:{port}\r\nUser-Agent: kube-probe/1.36\r\nConnection: close\r\n\r\n"
            );
            s.write_all(req.as_bytes()).await.map_err(|e| e.to_string())?;
            let mut head = vec![0u8; 64];
            let n = s.read(&mut head).await.map_err(|e| e.to_string())?;
            let line = String::from_utf8_lossy(&head[..n]).into_owned();
            let code: u16 = line.split_whitespace().nth(1).and_then(|c| c.parse().ok()).ok_or("no HTTP status line")?;
            if (200..400).contains(&code) { Ok(()) } else { Err(format!("HTTP probe failed with statuscode: {code}")) }
        } else if let Some(t) = &probe.tcp_socket {
            let port = port(c, &t.port).ok_or("tcpSocket port not found")?;
            TcpStream::connect((ip, port)).await.map(|_| ()).map_err(|e| e.to_string())
        } else {
            Err("only httpGet and tcpSocket probes are supported by the pod runner".to_owned())
        }
    };
    match tokio::time::timeout(timeout, attempt).await {
        Ok(r) => r,
        Err(_) => Err(format!("probe timed out after {timeout:?}")),
    }
}
