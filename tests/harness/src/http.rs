//! A plain-HTTP GET for endpoints that are not TLS (etcd's `/health`, the operator's admin port).

use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `GET path` on 127.0.0.1:`port`: the status code and the body.
pub async fn get(port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    get_at("127.0.0.1", port, path).await
}

/// `GET path` on `host:port`: the status code and the body.
pub async fn get_at(host: &str, port: u16, path: &str) -> anyhow::Result<(u16, String)> {
    let mut s = tokio::net::TcpStream::connect((host, port)).await?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {host}\r\n\r\n").as_bytes()).await?;
    let mut buf = Vec::new();
    tokio::time::timeout(std::time::Duration::from_secs(5), s.read_to_end(&mut buf)).await??;
    let text = String::from_utf8_lossy(&buf).into_owned();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text.as_str(), ""));
    let code = head
        .strip_prefix("HTTP/1.")
        .and_then(|h| h.split_whitespace().nth(1))
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("not an HTTP answer: {text}"))?;
    Ok((code, body.to_owned()))
}

/// `GET path`; the body of a `200`, an error otherwise.
pub async fn get_plain(port: u16, path: &str) -> anyhow::Result<String> {
    get_plain_at("127.0.0.1", port, path).await
}

/// `GET path` on `host:port`; the body of a `200`, an error otherwise.
pub async fn get_plain_at(host: &str, port: u16, path: &str) -> anyhow::Result<String> {
    match get_at(host, port, path).await? {
        (200, body) => Ok(body),
        (code, body) => anyhow::bail!("{path}: {code} {body}"),
    }
}
