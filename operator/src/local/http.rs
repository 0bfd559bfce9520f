//! A minimal plain-HTTP/1.1 client for loopback control traffic: the CLI asking the
//! supervisor, the supervisor asking node admin servers.

use std::time::Duration;

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request};
use hyper_util::rt::TokioIo;

/// Sends one request to `addr` (`host:port`) and returns the status and body.
pub async fn request(addr: &str, method: Method, path: &str, timeout: Duration) -> anyhow::Result<(u16, String)> {
    let work = async {
        let tcp = tokio::net::TcpStream::connect(addr).await?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tcp)).await?;
        tokio::spawn(conn);
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(hyper::header::HOST, addr)
            .body(Full::new(Bytes::new()))?;
        let resp = sender.send_request(req).await?;
        let status = resp.status().as_u16();
        let body = resp.into_body().collect().await?.to_bytes();
        anyhow::Ok((status, String::from_utf8_lossy(&body).into_owned()))
    };
    tokio::time::timeout(timeout, work).await.map_err(|_| anyhow::anyhow!("{addr}{path}: no answer in {timeout:?}"))?
}

/// GET `path` and parse JSON; `None` on any failure.
pub async fn get_json(addr: &str, path: &str) -> Option<serde_json::Value> {
    let (status, body) = request(addr, Method::GET, path, Duration::from_secs(2)).await.ok()?;
    (status == 200).then(|| serde_json::from_str(&body).ok()).flatten()
}
