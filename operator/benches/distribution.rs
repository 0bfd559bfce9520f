//! Config distribution at scale: 1,000 subscribers (`RELAYFED_DIST_SUBSCRIBERS` to change it;
//! one TLS connection each, as many sidecars would hold) on one distribution server; a
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

fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    if let Ok((_, hard)) = nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        let _ = nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE, hard, hard);
    }
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
    let subscribers: usize =
        std::env::var("RELAYFED_DIST_SUBSCRIBERS").ok().and_then(|v| v.parse().ok()).unwrap_or(1_000);
    rt.block_on(async {
        let pki = common::Pki::new();
        let dist = Distributor::new(Arc::new(OperatorMetrics::new()), 0);
        let addr = dist.clone().serve("127.0.0.1:0".parse().unwrap(), &pki.identity("relayfed-operator")).await.unwrap();
        let nodes: Vec<String> = (0..subscribers).map(|i| format!("n{i:04}")).collect();
        let mut plan: BTreeMap<String, _> = nodes.iter().map(|n| (n.clone(), common::home(n, 0))).collect();
        dist.publish(&plan);
        let started = Instant::now();
        for n in &nodes {
            let sub = Subscription {
                server: addr.to_string(),
                server_node: "relayfed-operator".into(),
                identity: pki.identity(n).into(),
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
        let behind = dist.wait_acked(Duration::from_secs(120)).await;
        assert!(behind.is_empty(), "{} subscribers never acknowledged", behind.len());
        let connect = started.elapsed();
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
        println!("| subscribers (TLS 1.3 mutual auth, one connection each, in one process with the server) | {subscribers} |");
        println!("| first snapshot acknowledged by all, from cold start | {:.0} ms |", connect.as_secs_f64() * 1e3);
        println!(
            "| change -> last acknowledgement, {ROUNDS} changes: p50 / p99 / max (target p99 < 2 s) | {:.0} / {:.0} / {:.0} ms |",
            percentile(&times, 0.5).as_secs_f64() * 1e3,
            percentile(&times, 0.99).as_secs_f64() * 1e3,
            times.last().unwrap().as_secs_f64() * 1e3
        );
    });
}
