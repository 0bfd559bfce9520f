//! `make bench`: Noise XK handshake, HPKE seal+open, the first frame sealed and greased (time
//! to build and length), stream setup through a relay with ECH off, plain with GREASE and
//! sealed over warm hop connections, and single-stream throughput home -> main -> home.
//! Relay and home nodes are real release-build processes on loopback. Prints a Markdown
//! table (the Makefile writes it to docs/benchmarks.md).
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::Instant;

use relayfed_e2e::Testbed;
use relayfed_e2e::procs::{Proc, echo_server};
use relayfed_sidecar::config::{Export, Import, MainRelay};
use relayfed_sidecar::crypto::ech::{EchKeyPair, seal};
use relayfed_sidecar::crypto::noise::{Initiator, Responder, StaticKeypair, prologue};
use relayfed_sidecar::federation::ech_policy::{EchMode, EchPolicy};
use relayfed_sidecar::protocol::InnerRoute;
use relayfed_sidecar::protocol::route::EchBinding;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn stats(mut v: Vec<f64>) -> (f64, f64, f64) {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| v[((v.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.5), pct(0.99), v.iter().sum::<f64>() / v.len() as f64)
}

fn route() -> InnerRoute {
    InnerRoute {
        dest_node: "pay".into(),
        dest_main: "hub".into(),
        service: "echo".into(),
        port: 7,
        origin: "shop@hub".into(),
    }
}

fn bench_noise(n: usize) -> Vec<f64> {
    let a = StaticKeypair::generate().unwrap();
    let b = StaticKeypair::generate().unwrap();
    let binding = EchBinding { config_id: 1, config_digest: [7; 32], enc: vec![9; 32] };
    let p = prologue(Some(&binding), &route()).unwrap();
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let (i, m1) = Initiator::start(&a, &b.public, &p).unwrap();
            let (r, m2) = Responder::accept(&b, &p, &m1, &[]).unwrap();
            let (_s, m3, _) = i.finish(&m2, &[]).unwrap();
            r.finish(&m3).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

fn bench_hpke(n: usize) -> Vec<f64> {
    let key = EchKeyPair::generate(1, "relay.bench.example").unwrap();
    let (config, suite) = (key.config().clone(), key.config().usable_suite().unwrap());
    (0..n)
        .map(|_| {
            let t = Instant::now();
            let s = seal(&config, suite, "hub", &route()).unwrap();
            key.open(&s).unwrap();
            t.elapsed().as_secs_f64() * 1e3
        })
        .collect()
}

/// Time to build an origin's first frame (route header) sealed, and plain with a GREASE
/// envelope imitating that sealing (what an origin does for a stream outside the ECH cohort);
/// with the encoded lengths.
fn bench_first_frame(n: usize) -> (Vec<f64>, Vec<f64>, usize, usize) {
    use relayfed_sidecar::protocol::route::{Grease, RouteBody, RouteHeader};
    let key = EchKeyPair::generate(1, "relay.bench.example").unwrap();
    let (config, suite) = (key.config().clone(), key.config().usable_suite().unwrap());
    let header = |body, grease| RouteHeader {
        hop_limit: 3,
        probe: false,
        trace_context: String::new(),
        path: vec![],
        body,
        grease,
    };
    let (mut sealed, mut greased, mut ls, mut lg) = (Vec::new(), Vec::new(), 0, 0);
    for _ in 0..n {
        let t = Instant::now();
        let s = seal(&config, suite, "hub", &route()).unwrap();
        ls = header(RouteBody::Sealed(s), None).encode().unwrap().len();
        sealed.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        let shape = seal(&config, suite, "hub", &route()).unwrap();
        let g = Grease::imitating(&shape, &route(), rand::random(), |b| rand::fill(b)).unwrap();
        lg = header(RouteBody::Plain(route()), Some(g)).encode().unwrap().len();
        greased.push(t.elapsed().as_secs_f64() * 1e3);
    }
    (sealed, greased, ls, lg)
}

/// Time from TCP connect to the first echoed byte: route, ECH, Noise XK, one round trip.
async fn bench_setup(addr: SocketAddr, n: usize) -> Vec<f64> {
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let t = Instant::now();
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.set_nodelay(true).unwrap();
        s.write_all(b"x").await.unwrap();
        let mut b = [0u8; 1];
        s.read_exact(&mut b).await.unwrap();
        out.push(t.elapsed().as_secs_f64() * 1e3);
    }
    out
}

/// A sink: reads to EOF, then answers the byte count (8 bytes) and closes.
async fn sink_server() -> SocketAddr {
    let l = relayfed_sidecar::transport::io::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 256 * 1024];
                let mut total = 0u64;
                loop {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => total += n as u64,
                    }
                }
                let _ = s.write_all(&total.to_be_bytes()).await;
            });
        }
    });
    addr
}

/// One stream, `bytes` one way into the sink; MB/s until the sink confirms every byte.
async fn bench_throughput(addr: SocketAddr, bytes: usize) -> f64 {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let t = Instant::now();
    let chunk = vec![0x5au8; 64 * 1024];
    let mut sent = 0;
    while sent < bytes {
        s.write_all(&chunk).await.unwrap();
        sent += chunk.len();
    }
    s.shutdown().await.unwrap();
    let mut count = [0u8; 8];
    s.read_exact(&mut count).await.unwrap();
    assert_eq!(u64::from_be_bytes(count), bytes as u64, "the sink must receive every byte");
    bytes as f64 / t.elapsed().as_secs_f64() / 1e6
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let noise = stats(bench_noise(2000));
    let hpke = stats(bench_hpke(5000));
    let (sealed_frame, greased_frame, sealed_len, greased_len) = bench_first_frame(5000);
    let (sealed_frame, greased_frame) = (stats(sealed_frame), stats(greased_frame));

    let tb = Testbed::new("bench.example").unwrap();
    let relay = start("main-relay", &tb.main_relay("hub", 1).unwrap()).await;
    let quic: SocketAddr = relay.ready["quic"].as_str().unwrap().parse().unwrap();
    let main = || MainRelay { node_id: "hub".into(), endpoint: quic, priority: 0 };
    let echo = echo_server().await;
    let sink = sink_server().await;
    let exports = vec![Export::new("echo", 7, echo), Export::new("sink", 9, sink)];
    let pay = tb.home("pay", main(), exports, vec![], EchPolicy::default()).unwrap();
    let _pay = start("home", &pay).await;
    let import = Import::fixed("echo", 7, "127.0.0.1:0".parse().unwrap(), "pay", "hub", tb.noise_key("pay").unwrap());
    let sink_import = Import { service: "sink".into(), port: 9, ..import.clone() };
    let mut addrs = Vec::new();
    // ECH off (no GREASE), outside the ECH cohort (plain with GREASE), in it (sealed).
    for (name, enabled, pct) in [("shop-plain", true, 0u8), ("shop-ech", true, 100), ("shop-off", false, 0)] {
        let policy = EchPolicy { enabled, mode: EchMode::Opportunistic, percentage: pct, ..EchPolicy::default() };
        let cfg = tb.home(name, main(), vec![], vec![import.clone(), sink_import.clone()], policy).unwrap();
        let p = start("home", &cfg).await;
        let echo_addr = p.ready["imports"]["echo:7"].as_str().unwrap().parse::<SocketAddr>().unwrap();
        let sink_addr = p.ready["imports"]["sink:9"].as_str().unwrap().parse::<SocketAddr>().unwrap();
        addrs.push((echo_addr, sink_addr, p));
    }
    // Warm up the hop connections and code paths.
    bench_setup(addrs[0].0, 50).await;
    bench_setup(addrs[1].0, 50).await;
    bench_setup(addrs[2].0, 50).await;
    let plain = stats(bench_setup(addrs[0].0, 1000).await);
    let ech = stats(bench_setup(addrs[1].0, 1000).await);
    let off = stats(bench_setup(addrs[2].0, 1000).await);
    let mut tput_plain = Vec::new();
    let mut tput_ech = Vec::new();
    for _ in 0..3 {
        tput_plain.push(bench_throughput(addrs[0].1, 512 << 20).await);
        tput_ech.push(bench_throughput(addrs[1].1, 512 << 20).await);
    }
    let (tp, _, _) = stats(tput_plain);
    let (te, _, _) = stats(tput_ech);

    let row = |what: &str, (p50, p99, mean): (f64, f64, f64)| {
        println!("| {what} | {p50:.3} ms | {p99:.3} ms | {mean:.3} ms |");
    };
    println!("| measurement | p50 | p99 | mean |");
    println!("|---|---|---|---|");
    row("Noise XK handshake, both sides, in memory (2,000 runs)", noise);
    row("HPKE seal + open of a route header (5,000 runs)", hpke);
    row(&format!("first frame built, sealed (HPKE seal + encode; 5,000 runs; {sealed_len} bytes)"), sealed_frame);
    row(
        &format!(
            "first frame built, plain with GREASE (the same sealing for its shape + envelope + encode; {greased_len} bytes)"
        ),
        greased_frame,
    );
    row("stream setup home -> main -> home, ECH disabled (no GREASE), warm hops (1,000 runs)", off);
    row("stream setup home -> main -> home, plain with GREASE (outside the ECH cohort), warm hops (1,000 runs)", plain);
    row("stream setup home -> main -> home, ECH, warm hops (1,000 runs)", ech);
    println!("| ECH cost on stream setup over plain with GREASE (p50 difference) | {:.3} ms | | |", ech.0 - plain.0);
    println!(
        "| single-stream throughput home -> main -> home (512 MiB one way into a sink, median of 3), plain with GREASE | {tp:.0} MB/s | | |"
    );
    println!("| single-stream throughput, ECH | {te:.0} MB/s | | |");
}

async fn start(mode: &str, cfg: &std::path::Path) -> Proc {
    Proc::start_bin(Path::new(env!("CARGO_BIN_EXE_relayfed-proxy")), mode, cfg, &[]).await
}
