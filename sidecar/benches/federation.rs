//! `make bench` (federation part): 1,000 concurrent cross-federation calls (home -> main ->
//! main -> home, small request/response, each a new stream with its own Noise handshake), and
//! a main relay's resident memory per connected, registered home node. Relays and home nodes
//! are real release-build processes; the extra homes for the memory measurement are real QUIC
//! clients in this process that connect, register a service and receive views.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use relayfed_e2e::Testbed;
use relayfed_e2e::procs::{Proc, echo_server, status_kib};
use relayfed_sidecar::config::{Snapshot, Timeouts};
use relayfed_sidecar::protocol::Frame;
use relayfed_sidecar::protocol::control::{Control, Service};
use relayfed_sidecar::transport::io::{read_frame, write_frames};
use relayfed_sidecar::transport::tls::HopIdentity;
use relayfed_sidecar::transport::tls::QuicIdentity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let mut crs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/scenarios/bench.yaml")).unwrap();
    // The homes measured at hub-m are in the plan like any other (a relay refuses homes the
    // plan does not assign to it), each exporting a service of its own.
    let n = 1000;
    for i in 0..n {
        crs.push_str(&format!(
            "---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: mem-{i}, namespace: test}}\n\
             spec: {{type: home, nodeId: mem-{i}, federation: bench, mainRelays: [{{nodeId: hub-m}}], \
             exports: [{{name: svc-{i}, port: 80, target: 127.0.0.1:1}}]}}\n"
        ));
    }

    let tb = Testbed::new("bench.example").unwrap();
    let echo = echo_server().await;
    let files = tb.scenario(&crs, |_, _, _| echo).unwrap();
    let mut mains = Vec::new();
    for (_, path, _) in &files.mains {
        mains.push(start("main-relay", path).await);
    }
    let home_file = |id: &str| files.homes.iter().find(|(h, _)| h == id).unwrap().1.clone();
    let server = start("home", &home_file("server")).await;
    let client = start("home", &home_file("client")).await;
    let deadline = Instant::now() + Duration::from_secs(20);
    while client.json("/federation/health").await["services"].as_u64().unwrap() < 1 {
        assert!(Instant::now() < deadline, "the client never saw the echo service");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let import: SocketAddr = client.ready["imports"]["echo:7"].as_str().unwrap().parse().unwrap();

    // Warm up, then 1,000 concurrent calls.
    for _ in 0..20 {
        call(import).await.unwrap();
    }
    // Memory per idle proxied connection: 1,000 connections through the client home (and
    // the server home at the far end), each after one round trip, then left open (measured before the concurrent
    // calls below raise the processes' high-water marks).
    let (client_pid, server_pid) = (client.child.id().unwrap(), server.child.id().unwrap());
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_before = (rss_kib(client_pid), rss_kib(server_pid));
    let mut idle_conns = Vec::new();
    for _ in 0..1000 {
        let mut s = TcpStream::connect(import).await.unwrap();
        s.write_all(b"x").await.unwrap();
        s.read_exact(&mut [0u8; 1]).await.unwrap();
        idle_conns.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let idle_after = (rss_kib(client_pid), rss_kib(server_pid));
    let per_conn = |b: u64, a: u64| a.saturating_sub(b) as f64 / idle_conns.len() as f64;
    let idle_rows = [
        ("calling home (client)", idle_before.0, idle_after.0),
        ("serving home (server)", idle_before.1, idle_after.1),
    ]
    .map(|(who, b, a)| {
        format!(
            "| 1,000 idle proxied connections, {who}: resident memory before / after, per connection | {b} KiB / {a} KiB, {:.1} KiB |",
            per_conn(b, a)
        )
    });
    drop(idle_conns);

    let mut runs = Vec::new();
    for _ in 0..3 {
        let t = Instant::now();
        let tasks: Vec<_> = (0..1000).map(|_| tokio::spawn(call(import))).collect();
        let mut ok = 0;
        for t in tasks {
            if t.await.unwrap().is_ok() {
                ok += 1;
            }
        }
        runs.push((t.elapsed(), ok));
    }

    // The largest peak of the processes that carried the calls (homes, hub-a, hub-b).
    let carried = [client_pid, server_pid, mains[0].child.id().unwrap(), mains[1].child.id().unwrap()];
    let peak_mib = carried.iter().map(|&p| status_kib(p, "VmHWM:")).max().unwrap_or(0) as f64 / 1024.0;

    // Memory per connected home at hub-m: RSS before and after the registered homes.
    let hub_m_pid = mains[2].child.id().unwrap();
    let hub_m: SocketAddr = files.mains[2].2;
    tokio::time::sleep(Duration::from_millis(200)).await;
    let before = rss_kib(hub_m_pid);
    let mut endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    let mut conns = Vec::new();
    // Each home's identity is the plan's, from its snapshot (its certificate binds the Noise
    // key it registers, as the plan's relays require); loaded before anything is timed.
    let identities: Vec<(String, HopIdentity)> = (0..n)
        .map(|i| {
            let node = format!("mem-{i}");
            (tb.noise_key(&node).unwrap(), HopIdentity::load(&Snapshot::load(&home_file(&node)).unwrap()).unwrap())
        })
        .collect();
    // Registration at scale: each block of 100 homes timed until its last home has its
    // first view (the relay processed its registration and sent it what it imports).
    let mut blocks = Vec::new();
    let mut block_started = std::time::Instant::now();
    for (i, (noise_key, id)) in identities.into_iter().enumerate() {
        endpoint.set_default_client_config(id.client_config(&Timeouts::default()).unwrap());
        let conn = endpoint.connect(hub_m, &id.server_name("hub-m")).unwrap().await.unwrap();
        let (mut send, mut recv) = conn.open_bi().await.unwrap();
        let reg = Control::Register {
            services: vec![Service { service: format!("svc-{i}"), port: 80, ech: true }],
            noise_key,
            imports: Some(vec!["echo:7".into()]),
            standby: false,
            attached: 0,
        };
        write_frames(&mut send, &[Frame::Control(reg)]).await.unwrap();
        // Behave like a home node: acknowledge every complete view.
        let (viewed, got_view) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let mut viewed = Some(viewed);
            while let Ok(Some(Frame::Control(Control::View { more, .. }))) = read_frame(&mut recv).await {
                if !more {
                    if let Some(v) = viewed.take() {
                        let _ = v.send(());
                    }
                    if write_frames(&mut send, &[Frame::Control(Control::ViewAck)]).await.is_err() {
                        break;
                    }
                }
            }
        });
        conns.push(conn);
        if (i + 1) % 100 == 0 {
            let _ = got_view.await;
            blocks.push(block_started.elapsed());
            block_started = std::time::Instant::now();
        }
    }
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after = rss_kib(hub_m_pid);
    let per_home = (after.saturating_sub(before)) as f64 / n as f64;

    println!("| measurement | result |");
    println!("|---|---|");
    for (i, (d, ok)) in runs.iter().enumerate() {
        println!(
            "| 1,000 concurrent cross-federation calls (home -> hub-a -> hub-b -> home, each a new stream with its own Noise XK handshake), run {} | {ok}/1000 ok in {:.0} ms |",
            i + 1,
            d.as_secs_f64() * 1e3
        );
    }
    println!(
        "| largest peak resident memory (VmHWM) of the four processes that carried the 1,000 idle connections and 3,000 concurrent calls | {peak_mib:.1} MiB |"
    );
    println!(
        "| main relay with no call load (hub-m): resident memory before / after {n} connected, registered home nodes | {before} KiB / {after} KiB |"
    );
    println!("| main relay memory per connected home node | {per_home:.1} KiB |");
    for row in &idle_rows {
        println!("{row}");
    }
    for (i, d) in blocks.iter().enumerate() {
        println!(
            "| homes {}–{} connected and registered at hub-m (each block until its last home has its first view) | {:.0} ms |",
            i * 100 + 1,
            (i + 1) * 100,
            d.as_secs_f64() * 1e3
        );
    }
    drop(conns);
    drop(server);
}

async fn call(addr: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(addr).await?;
    let msg = b"ping across the federation";
    s.write_all(msg).await?;
    let mut back = [0u8; 26];
    s.read_exact(&mut back).await?;
    if &back != msg {
        return Err(std::io::Error::other("corrupted"));
    }
    Ok(())
}

async fn start(mode: &str, cfg: &std::path::Path) -> Proc {
    Proc::start_bin(Path::new(env!("CARGO_BIN_EXE_relayfed-proxy")), mode, cfg, &[]).await
}
