//! `make bench` (resilience part): a well-behaved sender's call latency through a relay,
//! unloaded and while another sender floods at 10x its quota (token bucket at the relay).
//! Real release-build processes on loopback.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use relayfed_e2e::Testbed;
use relayfed_e2e::procs::{Proc, echo_server};
use relayfed_sidecar::config::{Export, Import, MainRelay, RateLimit, Snapshot};
use relayfed_sidecar::federation::ech_policy::EchPolicy;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

const QUOTA: f64 = 200.0;

async fn call(addr: SocketAddr) -> std::io::Result<Duration> {
    let t = Instant::now();
    let mut s = TcpStream::connect(addr).await?;
    s.write_all(b"ping").await?;
    let mut b = [0u8; 4];
    s.read_exact(&mut b).await?;
    Ok(t.elapsed())
}

/// The good sender: `n` calls at 50 per second (a quarter of its quota); latencies in ms.
async fn good_run(addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        tick.tick().await;
        out.push(call(addr).await.unwrap().as_secs_f64() * 1e3);
    }
    out
}

fn p(v: &mut [f64], q: f64) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v[((v.len() - 1) as f64 * q).round() as usize]
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let tb = Testbed::new("bench.example").unwrap();
    let cfg = tb.main_relay("hub", 1).unwrap();
    let mut s = Snapshot::load(&cfg).unwrap();
    s.resilience.rate_limit = Some(RateLimit { streams_per_second: QUOTA, burst: QUOTA / 4.0 });
    std::fs::write(&cfg, serde_saphyr::to_string(&s).unwrap()).unwrap();
    let relay = start("main-relay", &cfg).await;
    let quic: SocketAddr = relay.ready["quic"].as_str().unwrap().parse().unwrap();
    let main = MainRelay { node_id: "hub".into(), endpoint: quic, priority: 0 };
    let echo = echo_server().await;
    let dest = tb.home("dest", main.clone(), vec![Export::new("echo", 7, echo)], vec![], EchPolicy::default()).unwrap();
    let _dest = start("home", &dest).await;
    let import = Import::fixed("echo", 7, "127.0.0.1:0".parse().unwrap(), "dest", "hub", tb.noise_key("dest").unwrap());
    let mut addrs = Vec::new();
    let mut homes = Vec::new();
    for name in ["good", "flood"] {
        let cfg = tb.home(name, main.clone(), vec![], vec![import.clone()], EchPolicy::default()).unwrap();
        let p = start("home", &cfg).await;
        addrs.push(p.ready["imports"]["echo:7"].as_str().unwrap().parse::<SocketAddr>().unwrap());
        homes.push(p);
    }
    let (good, flood) = (addrs[0], addrs[1]);
    good_run(good, 50).await; // warm-up
    let mut unloaded = good_run(good, 500).await;

    // The flood: 10x the quota, from another sender, for the whole measured run.
    let stop = Arc::new(AtomicBool::new(false));
    let (sent, ok) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let flooder = {
        let (stop, sent, ok) = (stop.clone(), sent.clone(), ok.clone());
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros((1e6 / (QUOTA * 10.0)) as u64));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                sent.fetch_add(1, Ordering::Relaxed);
                let ok = ok.clone();
                tokio::spawn(async move {
                    if call(flood).await.is_ok() {
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                });
            }
        })
    };
    let t = Instant::now();
    let mut loaded = good_run(good, 500).await;
    let secs = t.elapsed().as_secs_f64();
    stop.store(true, Ordering::Relaxed);
    flooder.await.unwrap();
    let (u50, u99) = (p(&mut unloaded, 0.5), p(&mut unloaded, 0.99));
    let (l50, l99) = (p(&mut loaded, 0.5), p(&mut loaded, 0.99));
    println!("| measurement | p50 | p99 |");
    println!("|---|---|---|");
    println!("| well-behaved sender, 500 calls at 50/s, unloaded | {u50:.2} ms | {u99:.2} ms |");
    println!(
        "| same while another sender floods at 10x its quota ({:.0} attempts/s, {:.0}/s admitted; quota {QUOTA:.0}/s) | {l50:.2} ms | {l99:.2} ms |",
        sent.load(Ordering::Relaxed) as f64 / secs,
        ok.load(Ordering::Relaxed) as f64 / secs
    );
    println!("| p99 under flood / unloaded p99 | {:.2}x | |", l99 / u99);
    drop(homes);
}

async fn start(mode: &str, cfg: &std::path::Path) -> Proc {
    Proc::start_bin(Path::new(env!("CARGO_BIN_EXE_relayfed-proxy")), mode, cfg, &[]).await
}
