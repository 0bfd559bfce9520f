//! Config distribution at scale: 1,000 subscribers (`RELAYFED_DIST_SUBSCRIBERS` to change it;
//! one TLS connection each, as many sidecars would hold; in child processes of 2,500 each)
//! on one distribution server; a
//! RolloutPolicy-style change is published to all of them and the time until the last
//! acknowledgement is measured. Target (issues 7 and 23): p99 < 2 s, at 10,000 subscribers too.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use relayfed_operator::distribution::Distributor;
use relayfed_operator::metrics::OperatorMetrics;
use relayfed_proto::distribution::{Ack, AckResult};
use relayfed_sidecar::admin::metrics::Metrics;
use relayfed_sidecar::distribution::client::Subscription;

const ROUNDS: usize = 30;

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

/// Subscribers per child process.
const PER_CHILD: usize = 2_500;
/// Set in a child: `<server>|<first>|<end>|<dir with ca.pem and ca.key>`.
const CHILD: &str = "RELAYFED_DIST_BENCH_CHILD";

fn node_name(i: usize) -> String {
    format!("n{i:05}")
}

/// A child: subscribers `first..end`, each acknowledging every snapshot, until killed.
fn child(spec: &str) {
    let parts: Vec<&str> = spec.split('|').collect();
    let (server, first, end, dir) =
        (parts[0].to_owned(), parts[1].parse().unwrap(), parts[2].parse().unwrap(), parts[3]);
    let read = |f: &str| std::fs::read_to_string(std::path::Path::new(dir).join(f)).unwrap();
    let pki = common::Pki::from_pem(&read("ca.pem"), &read("ca.key"));
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    rt.block_on(async {
        for i in first..end {
            let sub = Subscription {
                server: server.clone(),
                server_node: "relayfed-operator".into(),
                identity: pki.identity(&node_name(i)).into(),
                wait_seconds: 60,
                reports: None,
            };
            tokio::spawn(sub.run(0, Arc::new(Metrics::new()), |snap| Ack {
                version: snap.version,
                result: AckResult::Applied,
                restart_required: vec![],
                detail: None,
            }));
        }
        std::future::pending::<()>().await;
    });
}

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Ok(spec) = std::env::var(CHILD) {
        return child(&spec);
    }
    relayfed_serving::listener::raise_fd_limit();
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let subscribers: usize =
        std::env::var("RELAYFED_DIST_SUBSCRIBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    rt.block_on(async {
        let pki = common::Pki::new();
        let dist = Distributor::new(Arc::new(OperatorMetrics::new()), 0);
        let addr = dist.clone().serve("127.0.0.1:0".parse().unwrap(), &pki.identity("relayfed-operator")).await.unwrap();
        let nodes: Vec<String> = (0..subscribers).map(node_name).collect();
        let mut plan: BTreeMap<String, _> = nodes.iter().map(|n| (n.clone(), common::home(n, 0))).collect();
        dist.publish(&plan);
        let started = Instant::now();
        // Subscribers run in child processes of PER_CHILD each: one process holding both ends
        // of 10,000 connections would need more descriptors than a hard limit of 20,000 allows.
        let dir = std::env::temp_dir().join(format!("relayfed-dist-bench-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let (cert, key) = pki.ca_pem();
        std::fs::write(dir.join("ca.pem"), cert).unwrap();
        std::fs::write(dir.join("ca.key"), key).unwrap();
        let exe = std::env::current_exe().unwrap();
        let mut children = Vec::new();
        for start in (0..subscribers).step_by(PER_CHILD) {
            let end = (start + PER_CHILD).min(subscribers);
            let child = tokio::process::Command::new(&exe)
                .env(CHILD, format!("{addr}|{start}|{end}|{}", dir.display()))
                .kill_on_drop(true)
                .spawn()
                .unwrap();
            children.push(child);
        }
        let behind = dist.wait_acked(Duration::from_secs(150)).await;
        for n in behind.iter().take(5) {
            eprintln!("distribution: {n} behind: the server has its ack {:?}", dist.ack(n).map(|a| a.version));
        }
        assert!(behind.is_empty(), "{} subscribers never acknowledged", behind.len());
        let connect = started.elapsed();
        let _ = std::fs::remove_dir_all(&dir);
        let mut times = Vec::new();
        for round in 0..ROUNDS {
            for s in plan.values_mut() {
                s.ech_policy.percentage = ((round + 1) * 3 % 101) as u8;
            }
            let t = Instant::now();
            assert_eq!(dist.publish(&plan).len(), subscribers);
            let behind = dist.wait_acked(Duration::from_secs(30)).await;
            assert!(behind.is_empty(), "round {round}: {} subscribers behind", behind.len());
            times.push(t.elapsed());
        }
        times.sort();
        println!("| measurement | value |");
        println!("|---|---|");
        println!("| subscribers (TLS 1.3 mutual auth, one connection each, in child processes of 2,500 beside the server's) | {subscribers} |");
        println!("| first snapshot acknowledged by all, from cold start | {:.0} ms |", connect.as_secs_f64() * 1e3);
        println!(
            "| change -> last acknowledgement, {ROUNDS} changes: p50 / p99 / max (target p99 < 2 s) | {:.0} / {:.0} / {:.0} ms |",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times.last().unwrap().as_secs_f64() * 1e3
        );
    });
}
