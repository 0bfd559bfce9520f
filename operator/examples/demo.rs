//! `make demo`: the example federation (`examples/federation/`) run by `relayfed local up`,
//! with HTTP traffic flowing through it while the example RolloutPolicy is edited from 0% to
//! 50% to 100% ECH — exactly like `kubectl edit rolloutpolicy default` in a cluster.
//!
//! The manifests are copied to a work directory first (the repository stays untouched). For
//! each step the demo edits the policy file, waits until every relay acknowledged the new
//! config version, sends requests through the home relays' import listeners (web-eu calls
//! catalog on shop-eu and payments on pay-us; shop-eu calls payments), and prints what the
//! origins' own `/metrics` say: the share of new streams sealed with ECH (and the share the
//! consistent hash predicts), success rate, fallbacks and setup latency. An invalid edit is
//! shown being refused. Everything is stopped at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use relayfed_operator::local::http;
use relayfed_sidecar::federation::ech_policy::bucket;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

const REQUESTS_PER_ROUTE: usize = 200;
/// (origin home, service, port, destination home)
const ROUTES: [(&str, &str, u16, &str); 3] = [
    ("web-eu", "catalog", 8080, "shop-eu"),
    ("web-eu", "payments", 9090, "pay-us"),
    ("shop-eu", "payments", 9090, "pay-us"),
];

fn relayfed() -> PathBuf {
    // target/<profile>/examples/demo -> target/<profile>/relayfed
    let exe = std::env::current_exe().unwrap();
    exe.parent().and_then(|p| p.parent()).unwrap().join("relayfed")
}

fn cli(state: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(relayfed()).args(args).arg("--state-dir").arg(state).output().unwrap()
}

fn status(state: &Path) -> Value {
    let out = cli(state, &["local", "status", "--json"]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn node<'a>(s: &'a Value, n: &str) -> &'a Value {
    s["nodes"].as_array().unwrap().iter().find(|x| x["node"] == n).unwrap()
}

/// Metric samples as (name, labels) -> value, summed over labels not asked for.
fn samples(text: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    let mut out = Vec::new();
    for l in text.lines().filter(|l| !l.starts_with('#')) {
        let Some((head, value)) = l.rsplit_once(' ') else { continue };
        let Ok(v) = value.parse::<f64>() else { continue };
        let (name, labels) = match head.split_once('{') {
            Some((n, rest)) => {
                let mut m = BTreeMap::new();
                for kv in rest.trim_end_matches('}').split(',') {
                    if let Some((k, v)) = kv.split_once('=') {
                        m.insert(k.to_owned(), v.trim_matches('"').to_owned());
                    }
                }
                (n.to_owned(), m)
            }
            None => (head.to_owned(), BTreeMap::new()),
        };
        out.push((name, labels, v));
    }
    out
}

fn sum(s: &[(String, BTreeMap<String, String>, f64)], name: &str, want: &[(&str, &str)]) -> f64 {
    s.iter()
        .filter(|(n, l, _)| n == name && want.iter().all(|(k, v)| l.get(*k).map(String::as_str) == Some(*v)))
        .map(|(_, _, v)| v)
        .sum()
}

/// Setup-latency histogram buckets (le -> cumulative count) over both `ech` values.
fn buckets(s: &[(String, BTreeMap<String, String>, f64)]) -> Vec<(f64, f64)> {
    let mut m: Vec<(f64, f64)> = Vec::new();
    for (n, l, v) in s.iter().filter(|(n, _, _)| n == "relayfed_stream_setup_duration_seconds_bucket") {
        let _ = n;
        let le = l.get("le").map(|x| if x == "+Inf" { f64::INFINITY } else { x.parse().unwrap() }).unwrap();
        match m.iter_mut().find(|(b, _)| *b == le) {
            Some(e) => e.1 += v,
            None => m.push((le, *v)),
        }
    }
    m.sort_by(|a, b| a.0.partial_cmp(&b.0).unwrap());
    m
}

fn quantile_ms(before: &[(f64, f64)], after: &[(f64, f64)], q: f64) -> String {
    let delta: Vec<(f64, f64)> = after
        .iter()
        .map(|(le, c)| (*le, c - before.iter().find(|(b, _)| b == le).map(|x| x.1).unwrap_or(0.0)))
        .collect();
    let total = delta.last().map(|d| d.1).unwrap_or(0.0);
    match delta.iter().find(|(_, c)| *c >= q * total) {
        Some((le, _)) if le.is_finite() => format!("<= {:.0} ms", le * 1e3),
        _ => "-".into(),
    }
}

async fn scrape(addr: &str) -> Vec<(String, BTreeMap<String, String>, f64)> {
    samples(&http::request(addr, hyper::Method::GET, "/metrics", Duration::from_secs(5)).await.unwrap().1)
}

fn set_percentage(file: &Path, pct: &str) {
    let text = std::fs::read_to_string(file).unwrap();
    let out: Vec<String> = text
        .lines()
        .map(|l| match l.split_once("percentage:") {
            Some((indent, _)) if indent.trim().is_empty() => format!("{indent}percentage: {pct}"),
            _ => l.to_owned(),
        })
        .collect();
    std::fs::write(file, out.join("\n") + "\n").unwrap();
}

async fn wait_acked(state: &Path, after_generation: u64) -> Duration {
    let started = Instant::now();
    loop {
        let s = status(state);
        let acked =
            s["nodes"].as_array().unwrap().iter().all(|n| n["ackedVersion"].as_u64() >= n["configVersion"].as_u64());
        if s["generation"].as_u64().unwrap() > after_generation && acked {
            return started.elapsed();
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the edit was not acknowledged in 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let repo =
        std::fs::canonicalize(Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join(".."))
            .unwrap();
    let work = repo.join("target/demo");
    let manifests = work.join("manifests");
    let state = work.join("state");
    let _ = std::fs::remove_dir_all(&manifests);
    std::fs::create_dir_all(&manifests).unwrap();
    for e in std::fs::read_dir(repo.join("examples/federation")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, manifests.join(p.file_name().unwrap())).unwrap();
    }
    let policy = manifests.join("40-rollout-policy.yaml");
    println!("== relayfed demo: the example federation in local mode");
    println!("   manifests: {} (a copy of examples/federation)", manifests.display());
    println!("   $ relayfed local up -f {} --state-dir {}", manifests.display(), state.display());
    let _ = cli(&state, &["local", "down"]);
    // With Prometheus installed, the federation is scraped while the demo runs.
    let prometheus = std::process::Command::new("prometheus").arg("--version").output().is_ok();
    let mut up = tokio::process::Command::new(relayfed())
        .args(if prometheus { &["local", "up", "--prometheus", "-f"][..] } else { &["local", "up", "-f"][..] })
        .arg(&manifests)
        .arg("--state-dir")
        .arg(&state)
        .env("RELAYFED_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .stderr(std::fs::File::create(work.join("supervisor.log")).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(up.stdout.take().unwrap()).lines();
    let started = Instant::now();
    match tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await {
        Ok(Ok(Some(line))) => {
            let ready: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
            match ready["prometheus"].as_str() {
                Some(url) => println!(
                    "   Prometheus scraping every node: {url} (dashboards to import: charts/relayfed/dashboards/)"
                ),
                None => println!(
                    "   dashboards: charts/relayfed/dashboards/ (install prometheus and run `relayfed local up --prometheus` to scrape)"
                ),
            }
        }
        _ => {
            eprintln!("local up failed; {}:", work.join("supervisor.log").display());
            eprintln!("{}", std::fs::read_to_string(work.join("supervisor.log")).unwrap_or_default());
            std::process::exit(1);
        }
    }
    println!(
        "   up in {:.1} s (2 main relays, 3 home relays, built-in HTTP services on the exports)\n",
        started.elapsed().as_secs_f64()
    );
    // Registration propagates between the hubs; wait until both origins see their services.
    let t = Instant::now();
    while !["web-eu", "shop-eu"].iter().all(|n| node(&status(&state), n)["health"]["services"].as_u64() >= Some(1)) {
        assert!(t.elapsed() < Duration::from_secs(30), "services did not propagate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("$ relayfed local status");
    print!("{}", String::from_utf8_lossy(&cli(&state, &["local", "status"]).stdout));

    println!("\nEach step edits spec.ech.percentage in {}, waits for every relay to", policy.display());
    println!("acknowledge the new config version, then sends {REQUESTS_PER_ROUTE} HTTP requests on each route:");
    for (o, s, p, d) in ROUTES {
        println!("  {o} -> {s}:{p} (served by {d}, bucket {:.2}%)", f64::from(bucket(d)) / 100.0);
    }
    println!();
    println!(
        "{:>5}  {:>9}  {:>8}  {:>16}  {:>9}  {:>9}  {:>10}  {:>10}",
        "ECH%", "acked in", "requests", "sealed (share)", "expected", "fallbacks", "setup p50", "setup p99"
    );
    for pct in ["0", "50", "100"] {
        let generation = status(&state)["generation"].as_u64().unwrap();
        set_percentage(&policy, pct);
        let acked = if pct == "0" { Duration::ZERO } else { wait_acked(&state, generation).await };
        let s = status(&state);
        let admins: Vec<String> =
            ["web-eu", "shop-eu"].iter().map(|n| node(&s, n)["admin"].as_str().unwrap().to_owned()).collect();
        let mut before = Vec::new();
        for a in &admins {
            before.extend(scrape(a).await);
        }
        let mut ok = 0usize;
        let mut expected_sealed = 0usize;
        for (origin, service, port, dest) in ROUTES {
            let listen = node(&s, origin)["imports"]
                .as_array()
                .unwrap()
                .iter()
                .find(|i| i["service"] == service && i["port"] == port)
                .map(|i| i["listen"].as_str().unwrap().to_owned())
                .unwrap();
            // The example policy rate-limits each sender to 200 new streams/s (burst 400):
            // stay under it, like a well-behaved client.
            let mut pace = tokio::time::interval(Duration::from_millis(6));
            for k in 0..REQUESTS_PER_ROUTE {
                pace.tick().await;
                let r =
                    http::request(&listen, hyper::Method::GET, &format!("/demo/{k}"), Duration::from_secs(10)).await;
                if r.is_ok_and(|(code, body)| code == 200 && body.contains(dest)) {
                    ok += 1;
                }
            }
            if bucket(dest) < pct.parse::<u16>().unwrap() * 100 {
                expected_sealed += REQUESTS_PER_ROUTE;
            }
        }
        let mut after = Vec::new();
        for a in &admins {
            after.extend(scrape(a).await);
        }
        let d = |name: &str, l: &[(&str, &str)]| sum(&after, name, l) - sum(&before, name, l);
        let sealed = d("relayfed_stream_setup_duration_seconds_count", &[("ech", "true")]);
        let plain = d("relayfed_stream_setup_duration_seconds_count", &[("ech", "false")]);
        let total = (sealed + plain).max(1.0);
        let requests = ROUTES.len() * REQUESTS_PER_ROUTE;
        println!(
            "{:>5}  {:>9}  {:>8}  {:>16}  {:>9}  {:>9}  {:>10}  {:>10}",
            pct,
            if pct == "0" { "(start)".to_owned() } else { format!("{:.0} ms", acked.as_secs_f64() * 1e3) },
            format!("{ok}/{requests}"),
            format!("{sealed:.0} ({:.0}%)", 100.0 * sealed / total),
            format!("{:.0}%", 100.0 * expected_sealed as f64 / requests as f64),
            d("relayfed_ech_streams_total", &[("outcome", "fallback")]),
            quantile_ms(&buckets(&before), &buckets(&after), 0.5),
            quantile_ms(&buckets(&before), &buckets(&after), 0.99),
        );
    }

    println!("\nAn invalid edit (percentage: 150) is refused like the API server would, and 100% stays:");
    set_percentage(&policy, "150");
    let t = Instant::now();
    let rejected = loop {
        let s = status(&state);
        if let Some(e) = s["lastRejected"]["errors"][0].as_str() {
            break (e.to_owned(), s["rollout"]["percentage"].clone());
        }
        assert!(t.elapsed() < Duration::from_secs(20), "the invalid edit was not reported");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    println!("  {}\n  percentage in force: {}", rejected.0, rejected.1);
    set_percentage(&policy, "100");

    println!("\n$ relayfed local down");
    let out = cli(&state, &["local", "down"]);
    print!("{}", String::from_utf8_lossy(&out.stderr));
    let code = tokio::time::timeout(Duration::from_secs(30), up.wait()).await.unwrap().unwrap();
    // Node processes still alive: any process whose command line is `<relayfed> node ...`.
    let me = relayfed().display().to_string();
    let left = std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .filter(|c| {
            c.split(|b| *b == 0).map(String::from_utf8_lossy).take(2).collect::<Vec<_>>() == [me.as_str(), "node"]
        })
        .count();
    println!("supervisor exited ({code}); node processes left running: {left}");
    println!("logs: {}/logs, state (sealed keys, reused next time): {}", state.display(), state.join("keys").display());
}
