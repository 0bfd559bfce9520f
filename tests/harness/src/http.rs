//! A plain-HTTP GET for endpoints that are not TLS (etcd's `/health`).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on 127.0.0.1:`port`; returns the body.
pub async fn get_plain(port: u16, path: &str) -> anyhow::Result<String> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    match text.split_once("\r\n\r\n") {
        Some((head, body)) if head.starts_with("HTTP/1.") && head.contains(" 200 ") => Ok(body.to_owned()),
        _ => anyhow::bail!("unexpected answer: {text}"),
    }
}
