//! relayfed-test-app: the app the two-cluster test's pods run, never part of the product.
//! `serve` answers every HTTP request with the pod's name (so a caller sees which replica
//! answered) and, when the connection starts with relayfed's PROXY v2 header (an export with
//! `relayfed.io/proxy-protocol: "true"`), the caller's identity from it; `call` is an
//! unmodified client: it resolves a URL's host with the system resolver and calls it in a
//! loop, printing one JSON line per call.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream, ToSocketAddrs};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "The two-cluster test's app: an HTTP server naming its pod, and a client")]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Answer HTTP on 0.0.0.0:PORT with `{"pod": "<HOSTNAME>"}` (and `"caller"` from a PROXY
    /// v2 header).
    Serve {
        /// Port.
        #[arg(long, default_value_t = 8080)]
        port: u16,
    },
    /// Call `http://host:port/path` every INTERVAL ms, COUNT times (0: forever).
    Call {
        /// URL (http only).
        url: String,
        /// Pause between calls, ms.
        #[arg(long, default_value_t = 100)]
        interval_ms: u64,
        /// Calls to make; 0 means forever.
        #[arg(long, default_value_t = 0)]
        count: u64,
        /// Per-call timeout, ms.
        #[arg(long, default_value_t = 3000)]
        timeout_ms: u64,
    },
}

fn serve(port: u16) -> anyhow::Result<()> {
    let pod = std::env::var("HOSTNAME").unwrap_or_default();
    let listener = TcpListener::bind(("0.0.0.0", port)).with_context(|| format!("binding port {port}"))?;
    eprintln!("serving on :{port} as {pod}");
    for conn in listener.incoming() {
        let Ok(mut s) = conn else { continue };
        let pod = pod.clone();
        std::thread::spawn(move || {
            let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
            let mut reader = BufReader::new(match s.try_clone() {
                Ok(r) => r,
                Err(_) => return,
            });
            let caller = proxy_header(&mut reader);
            let mut line = String::new();
            // Request line and headers, up to the blank line.
            loop {
                line.clear();
                match reader.read_line(&mut line) {
                    Ok(0) | Err(_) => return,
                    Ok(_) if line == "\r\n" || line == "\n" => break,
                    Ok(_) => {}
                }
            }
            let body = format!("{}\n", serde_json::json!({"pod": pod, "caller": caller}));
            let resp = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                body.len()
            );
            let _ = s.write_all(resp.as_bytes());
        });
    }
    Ok(())
}

/// The caller's identity from a PROXY v2 header at the start of the connection, consumed;
/// `None` (and nothing consumed) when the connection starts otherwise (an HTTP request starts
/// with a method, the header with `\r`).
fn proxy_header(reader: &mut BufReader<TcpStream>) -> Option<String> {
    use relayfed_proto::protocol::proxy_header::{SIGNATURE, decode};
    if reader.fill_buf().ok()?.first() != Some(&SIGNATURE[0]) {
        return None;
    }
    let mut header = vec![0u8; 16];
    reader.read_exact(&mut header).ok()?;
    let mut tlvs = vec![0u8; usize::from(u16::from_be_bytes([header[14], header[15]]))];
    reader.read_exact(&mut tlvs).ok()?;
    header.extend_from_slice(&tlvs);
    decode(&header).ok()?.0.identity
}

fn once(url: &str, timeout: Duration) -> Result<(String, Option<String>), String> {
    let rest = url.strip_prefix("http://").ok_or("only http:// URLs")?;
    let (authority, path) = rest.split_once('/').map_or((rest, "/".to_owned()), |(a, p)| (a, format!("/{p}")));
    let addr = authority
        .to_socket_addrs()
        .map_err(|e| format!("resolving {authority}: {e}"))?
        .next()
        .ok_or_else(|| format!("{authority} resolved to no address"))?;
    let mut s = TcpStream::connect_timeout(&addr, timeout).map_err(|e| format!("connecting {addr}: {e}"))?;
    s.set_read_timeout(Some(timeout)).map_err(|e| e.to_string())?;
    let req = format!("GET {path} HTTP/1.1\r\nHost: {authority}\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).map_err(|e| format!("writing: {e}"))?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).map_err(|e| format!("reading: {e}"))?;
    let status = resp.split_whitespace().nth(1).unwrap_or("");
    if status != "200" {
        return Err(format!("status {status:?}: {}", resp.lines().next().unwrap_or("(empty answer)")));
    }
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or("").trim();
    let v: serde_json::Value = serde_json::from_str(body).map_err(|e| format!("body {body:?}: {e}"))?;
    Ok((v["pod"].as_str().unwrap_or_default().to_owned(), v["caller"].as_str().map(str::to_owned)))
}

fn call(url: &str, interval: Duration, count: u64, timeout: Duration) {
    let mut n = 0u64;
    while count == 0 || n < count {
        let t0 = Instant::now();
        let result = once(url, timeout);
        let unix_ms = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).map_or(0, |d| d.as_millis());
        let line = match result {
            Ok((pod, caller)) => {
                serde_json::json!({"t": unix_ms, "ok": true, "us": t0.elapsed().as_micros() as u64, "pod": pod, "caller": caller})
            }
            Err(e) => serde_json::json!({"t": unix_ms, "ok": false, "us": t0.elapsed().as_micros() as u64, "error": e}),
        };
        println!("{line}");
        n += 1;
        std::thread::sleep(interval);
    }
}

fn main() -> anyhow::Result<()> {
    match Cli::parse().cmd {
        Cmd::Serve { port } => serve(port),
        Cmd::Call { url, interval_ms, count, timeout_ms } => {
            call(&url, Duration::from_millis(interval_ms), count, Duration::from_millis(timeout_ms));
            Ok(())
        }
    }
}
