//! `make demo`: a federation on this machine with traffic flowing through it.
//!
//! One main relay, six destination home nodes exporting an echo service, and three origin
//! home nodes whose rollout policies put ECH at 0%, 50% and 100%. Each origin sends streams
//! to every destination; the demo then reads each origin's own `/metrics` and prints the
//! share of streams that used ECH (and the share the consistent hash predicts), the success
//! rate, fallbacks and setup latency. Every process is stopped at the end.
//!
//! This exercises the transport built so far (issue 3); the CR-driven local mode with live
//! edits (`relayfed local up`) is issue 8.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::PathBuf;

use relayfed_sidecar::config::{Export, Import, MainRelay};
use relayfed_sidecar::federation::ech_policy::{EchMode, EchPolicy, bucket};
use relayfed_sidecar::testbed::Testbed;
use relayfed_sidecar::testbed::procs::{Proc, echo_server};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const DESTINATIONS: usize = 6;
const STREAMS_PER_ORIGIN: usize = 240;

fn proxy_binary() -> PathBuf {
    // target/<profile>/examples/demo -> target/<profile>/relayfed-proxy
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|p| p.parent()).unwrap().join("relayfed-proxy")
}

/// Sum of every sample of `name` whose labels include all of `labels`.
fn sum(text: &str, name: &str, labels: &[&str]) -> f64 {
    text.lines()
        .filter(|l| l.starts_with(name) && l[name.len()..].starts_with(['{', ' ']))
        .filter(|l| labels.iter().all(|want| l.contains(want)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, |a, b| a + b)
}

/// Quantile `q` of the setup-latency histogram (upper bucket bound), in milliseconds.
fn quantile(text: &str, q: f64) -> f64 {
    let name = "relayfed_stream_setup_duration_seconds_bucket";
    let mut buckets: Vec<(f64, f64)> = Vec::new();
    for l in text.lines().filter(|l| l.starts_with(name)) {
        let le = l.split("le=\"").nth(1).and_then(|r| r.split('"').next()).unwrap_or("+Inf");
        let le = if le == "+Inf" { f64::INFINITY } else { le.parse().unwrap() };
        let v: f64 = l.rsplit(' ').next().unwrap().parse().unwrap();
        match buckets.iter_mut().find(|(b, _)| *b == le) {
            Some(e) => e.1 += v,
            None => buckets.push((le, v)),
        }
    }
    buckets.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    let total = buckets.last().map(|b| b.1).unwrap_or(0.0);
    buckets.iter().find(|(_, c)| *c >= q * total).map(|(le, _)| le * 1e3).unwrap_or(f64::NAN)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    println!("relayfed demo: a federation on loopback, ECH rolled out at 0%, 50% and 100%\n");
    let tb = Testbed::new("demo.example").unwrap();
    println!("  federation CA, node certificates, Noise keys and an ECH key generated in {}", tb.dir.display());
    let mut relay = start("main-relay", &tb.main_relay("hub", 1).unwrap()).await;
    let quic: SocketAddr = relay.ready["quic"].as_str().unwrap().parse().unwrap();
    let list = relay.ready["echConfigList"].as_str().unwrap().to_owned();
    println!("  main relay `hub` on udp/{quic}, ECHConfigList {}...", &list[..24]);
    let main = |l: Option<String>| MainRelay { node_id: "hub".into(), endpoint: quic, priority: 0, ech_config_list: l };

    let mut procs = Vec::new();
    let mut imports = Vec::new();
    for i in 1..=DESTINATIONS {
        let node = format!("pay-{i}");
        let echo = echo_server().await;
        let cfg = tb
            .home(
                &node,
                main(None),
                vec![Export { service: "echo".into(), port: 7, target: echo }],
                vec![],
                EchPolicy::default(),
            )
            .unwrap();
        procs.push(start("home", &cfg).await);
        imports.push(Import::fixed(
            "echo",
            7,
            "127.0.0.1:0".parse().unwrap(),
            &node,
            "hub",
            tb.noise_key(&node).unwrap(),
        ));
    }
    println!("  {DESTINATIONS} destination home nodes (pay-1..pay-{DESTINATIONS}) export `echo:7`\n");

    println!(
        "  {:>4}  {:>7}  {:>9}  {:>14}  {:>8}  {:>9}  {:>10}  {:>10}",
        "ECH%", "streams", "ok", "sealed (share)", "expected", "fallbacks", "setup p50", "setup p99"
    );
    println!("  {:>87}", "(latency: upper bound of the histogram bucket, from each origin's /metrics)");
    for pct in [0u8, 50, 100] {
        let policy = EchPolicy { enabled: true, mode: EchMode::Opportunistic, percentage: pct, ..EchPolicy::default() };
        let name = format!("shop-{pct}");
        let cfg = tb.home(&name, main(Some(list.clone())), vec![], imports.clone(), policy).unwrap();
        let origin = start("home", &cfg).await;
        let addrs: Vec<SocketAddr> = origin.ready["importList"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v["listen"].as_str().unwrap().parse().unwrap())
            .collect();
        let mut ok = 0;
        for n in 0..STREAMS_PER_ORIGIN {
            let addr = addrs[n % addrs.len()];
            let msg = format!("request {n} via {name}");
            if let Ok(mut s) = TcpStream::connect(addr).await {
                let _ = s.write_all(msg.as_bytes()).await;
                let mut back = vec![0u8; msg.len()];
                if s.read_exact(&mut back).await.is_ok() && back == msg.as_bytes() {
                    ok += 1;
                }
            }
        }
        let m = origin.metrics().await;
        let sealed = sum(&m, "relayfed_ech_streams_total", &["outcome=\"accepted\""]);
        let fallbacks = sum(&m, "relayfed_ech_streams_total", &["outcome=\"fallback\""]);
        let handshakes = sum(&m, "relayfed_e2e_handshakes_total", &["result=\"ok\""]);
        let expected = (1..=DESTINATIONS).filter(|i| bucket(&format!("pay-{i}")) < u16::from(pct) * 100).count();
        println!(
            "  {:>3}%  {:>7}  {:>4} ({:>3.0}%)  {:>6} ({:>4.0}%)  {:>3} of {}  {:>9}  {:>7.2} ms  {:>7.2} ms",
            pct,
            STREAMS_PER_ORIGIN,
            ok,
            100.0 * ok as f64 / STREAMS_PER_ORIGIN as f64,
            sealed,
            100.0 * sealed / handshakes.max(1.0),
            expected,
            DESTINATIONS,
            fallbacks,
            quantile(&m, 0.5),
            quantile(&m, 0.99),
        );
        drop(origin);
    }
    let r = relay.metrics().await;
    println!(
        "\n  the relay opened {} sealed route headers and relayed {:.1} KB it could not read (Noise ciphertext)",
        sum(&r, "relayfed_ech_streams_total", &["outcome=\"opened\""]),
        sum(&r, "relayfed_payload_bytes_total", &["direction=\"relayed\""]) / 1e3
    );
    for p in procs.iter_mut().chain(std::iter::once(&mut relay)) {
        let _ = p.child.kill().await;
    }
    println!("  all {} relayfed processes stopped; key material removed with {}", procs.len() + 1, tb.dir.display());
}

async fn start(mode: &str, cfg: &std::path::Path) -> Proc {
    Proc::start_bin(&proxy_binary(), mode, cfg, &[]).await
}
