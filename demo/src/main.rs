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
//! shown being refused.
//!
//! Besides the example's homes, the demo adds eight instances of an `inventory` service behind
//! hub-us and a caller behind hub-eu (`demo-inventory.yaml`), so 5, 25 and 50% visibly seal a
//! part of the streams (ECH is chosen per destination home). It ends with an automatic
//! rollback: hub-us's ECH key is replaced behind the supervisor's back, its sealed streams
//! fail, and the rollout analysis lowers the percentage for hub-us alone while hub-eu keeps
//! 100%; the demo prints the analysis and the figures, then restores the key and re-arms the
//! rollout with an edit. Everything is stopped at the end.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use relayfed_operator::local::http;
use relayfed_proto::federation::ech_policy::bucket;
use serde_json::Value;
use tokio::io::AsyncBufReadExt;

const REQUESTS_PER_ROUTE: usize = 200;
/// (origin home, service, port, destination home: `inv-` is any of the inventory instances)
const ROUTES: [(&str, &str, u16, &str); 4] = [
    ("web-eu", "catalog", 8080, "shop-eu"),
    ("web-eu", "payments", 9090, "pay-us"),
    ("shop-eu", "payments", 9090, "pay-us"),
    ("buyer-eu", "inventory", 7070, "inv-"),
];
/// Instances of `inventory` the demo adds behind hub-us.
const INVENTORY: usize = 8;

/// The demo's extra homes: `inventory` served by [`INVENTORY`] homes behind hub-us, called
/// from `buyer-eu` behind hub-eu.
fn inventory_manifest() -> String {
    let mut out = String::from("# Added by `make demo`: destinations enough for partial ECH percentages.\n");
    for i in 0..INVENTORY {
        out.push_str(&format!(
            "---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata:\n  name: inv-{i}\n  namespace: relayfed-system\n  annotations: {{relayfed.io/local-workload: http}}\nspec:\n  type: home\n  nodeId: inv-{i}\n  federation: acme\n  mainRelays: [{{nodeId: hub-us}}]\n  exports: [{{name: inventory, port: 7070, target: \"127.0.0.1:{}\"}}]\n",
            17071 + i
        ));
    }
    out.push_str("---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: buyer-eu, namespace: relayfed-system}\nspec:\n  type: home\n  nodeId: buyer-eu\n  federation: acme\n  mainRelays: [{nodeId: hub-eu}]\n  imports: [{name: inventory, port: 7070, listen: \"127.0.0.1:17170\"}]\n");
    out
}

/// The share (0–1) of `dest`'s homes ECH selects at `pct`.
fn selected(dest: &str, pct: u16) -> f64 {
    let homes: Vec<String> =
        if dest == "inv-" { (0..INVENTORY).map(|i| format!("inv-{i}")).collect() } else { vec![dest.to_owned()] };
    homes.iter().filter(|h| bucket(h) < pct * 100).count() as f64 / homes.len() as f64
}

fn relayfed() -> PathBuf {
    // target/<profile>/relayfed-demo -> target/<profile>/relayfed
    std::env::current_exe().unwrap().with_file_name("relayfed")
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

/// Where `origin` listens for its import of `service:port` (from `local status`).
fn import_listen(s: &Value, origin: &str, service: &str, port: u16) -> String {
    node(s, origin)["imports"]
        .as_array()
        .unwrap()
        .iter()
        .find(|i| i["service"] == service && i["port"] == port)
        .map(|i| i["listen"].as_str().unwrap().to_owned())
        .unwrap()
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
    for (n, l, v) in s.iter().filter(|(n, _, _)| n == "relayfed_proxy_call_setup_duration_seconds_bucket") {
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
    // `cargo run` names the package; `make demo` runs the binary from the repository root.
    let repo = match std::env::var_os("CARGO_MANIFEST_DIR") {
        Some(dir) => Path::new(&dir).join(".."),
        None => std::env::current_dir().unwrap(),
    };
    let repo = std::fs::canonicalize(repo).unwrap();
    if !repo.join("examples/federation").is_dir() {
        eprintln!("run the demo from the repository root (make demo): no examples/federation in {}", repo.display());
        std::process::exit(2);
    }
    let work = repo.join("target/demo");
    let manifests = work.join("manifests");
    let state = work.join("state");
    let _ = std::fs::remove_dir_all(&manifests);
    std::fs::create_dir_all(&manifests).unwrap();
    for e in std::fs::read_dir(repo.join("examples/federation")).unwrap() {
        let p = e.unwrap().path();
        std::fs::copy(&p, manifests.join(p.file_name().unwrap())).unwrap();
    }
    std::fs::write(manifests.join("25-demo-inventory.yaml"), inventory_manifest()).unwrap();
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
        "   up in {:.1} s (2 main relays, {} home relays, built-in HTTP services on the exports)\n",
        started.elapsed().as_secs_f64(),
        4 + INVENTORY
    );
    // Registration propagates between the hubs; wait until both origins see their services.
    let t = Instant::now();
    while !["web-eu", "shop-eu", "buyer-eu"]
        .iter()
        .all(|n| node(&status(&state), n)["health"]["services"].as_u64() >= Some(1))
    {
        assert!(t.elapsed() < Duration::from_secs(30), "services did not propagate");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    println!("$ relayfed local status");
    print!("{}", String::from_utf8_lossy(&cli(&state, &["local", "status"]).stdout));

    println!("\nEach step edits spec.ech.percentage in {}, waits for every relay to", policy.display());
    println!("acknowledge the new config version, then sends {REQUESTS_PER_ROUTE} HTTP requests on each route:");
    for (o, s, p, d) in ROUTES {
        if d == "inv-" {
            let b: Vec<String> =
                (0..INVENTORY).map(|i| format!("{:.0}%", f64::from(bucket(&format!("inv-{i}"))) / 100.0)).collect();
            println!("  {o} -> {s}:{p} (served by inv-0..inv-{}, buckets {})", INVENTORY - 1, b.join(" "));
        } else {
            println!("  {o} -> {s}:{p} (served by {d}, bucket {:.2}%)", f64::from(bucket(d)) / 100.0);
        }
    }
    println!();
    println!(
        "{:>5}  {:>9}  {:>8}  {:>16}  {:>9}  {:>9}  {:>10}  {:>10}",
        "ECH%", "acked in", "requests", "sealed (share)", "expected", "fallbacks", "setup p50", "setup p99"
    );
    for pct in ["0", "5", "25", "50", "100"] {
        let generation = status(&state)["generation"].as_u64().unwrap();
        set_percentage(&policy, pct);
        let acked = if pct == "0" { Duration::ZERO } else { wait_acked(&state, generation).await };
        let s = status(&state);
        let admins: Vec<String> = ["web-eu", "shop-eu", "buyer-eu"]
            .iter()
            .map(|n| node(&s, n)["admin"].as_str().unwrap().to_owned())
            .collect();
        let mut before = Vec::new();
        for a in &admins {
            before.extend(scrape(a).await);
        }
        let mut ok = 0usize;
        let mut expected_sealed = 0.0;
        for (origin, service, port, dest) in ROUTES {
            let listen = import_listen(&s, origin, service, port);
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
            expected_sealed += REQUESTS_PER_ROUTE as f64 * selected(dest, pct.parse().unwrap());
        }
        let mut after = Vec::new();
        for a in &admins {
            after.extend(scrape(a).await);
        }
        let d = |name: &str, l: &[(&str, &str)]| sum(&after, name, l) - sum(&before, name, l);
        let sealed = d("relayfed_proxy_call_setup_duration_seconds_count", &[("ech", "true")]);
        let plain = d("relayfed_proxy_call_setup_duration_seconds_count", &[("ech", "false")]);
        let total = (sealed + plain).max(1.0);
        let requests = ROUTES.len() * REQUESTS_PER_ROUTE;
        println!(
            "{:>5}  {:>9}  {:>8}  {:>16}  {:>9}  {:>9}  {:>10}  {:>10}",
            pct,
            if pct == "0" { "(start)".to_owned() } else { format!("{:.0} ms", acked.as_secs_f64() * 1e3) },
            format!("{ok}/{requests}"),
            format!("{sealed:.0} ({:.0}%)", 100.0 * sealed / total),
            format!("{:.0}%", 100.0 * expected_sealed / requests as f64),
            d("relayfed_proxy_ech_streams_total", &[("outcome", "fallback")]),
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

    rollback(&state, &policy).await;

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

/// Sends `n` requests on every route; returns how many succeeded.
async fn traffic(state: &Path, n: usize) -> usize {
    let s = status(state);
    let mut ok = 0;
    for (origin, service, port, _) in ROUTES {
        let listen = import_listen(&s, origin, service, port);
        for k in 0..n {
            let r = http::request(&listen, hyper::Method::GET, &format!("/rollback/{k}"), Duration::from_secs(5)).await;
            ok += usize::from(r.is_ok_and(|(code, _)| code == 200));
            // Under the example's rate limit (200 new streams/s per sender).
            tokio::time::sleep(Duration::from_millis(6)).await;
        }
    }
    ok
}

/// The rollout lines of `relayfed local status` (phase, per relay, events).
fn rollout_lines(state: &Path) -> String {
    let table = String::from_utf8_lossy(&cli(state, &["local", "status"]).stdout).into_owned();
    table.lines().skip(1).take_while(|l| !l.starts_with("config")).map(|l| format!("  {l}\n")).collect()
}

/// Breaks hub-us's ECH key under traffic and shows the analysis roll back hub-us alone; then
/// restores the key and re-arms the rollout with an edit.
async fn rollback(state: &Path, policy: &Path) {
    println!("\nAutomatic rollback. The policy is edited to judge 10 s windows (minStreams 20), then");
    println!("hub-us's ECH key file is replaced behind the supervisor's back: homes keep sealing to the");
    println!("published key, hub-us cannot open what they seal, and its ECH streams fail.");
    let text = std::fs::read_to_string(policy).unwrap();
    let short =
        text.replace("evaluationWindow: 5m", "evaluationWindow: 10s").replace("minStreams: 100", "minStreams: 20");
    let edits = status(state)["acceptedEdits"].as_u64().unwrap_or(0);
    std::fs::write(policy, &short).unwrap();
    let started = Instant::now();
    loop {
        let s = status(state);
        if s["acceptedEdits"].as_u64() > Some(edits) && s["rollout"]["evaluation"]["phase"] == "Succeeded" {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the edit was not applied");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let key_file = state.join("keys/hub-us-ech.json");
    let pass = std::fs::read_to_string(state.join("passphrase")).unwrap();
    let pass = pass.trim_end().as_bytes().to_vec();
    let original = std::fs::read(&key_file).unwrap();
    let mut broken = relayfed_proto::config::keys::EchKeyFile::load(&key_file, Some(&pass)).unwrap();
    broken.current.config_id = broken.current.config_id.wrapping_add(7);
    broken.current.secret = relayfed_proto::config::base64_encode(&rand::random::<[u8; 32]>());
    broken.previous = None;
    broken.next = None;
    broken.save(&key_file, Some(&pass)).unwrap();
    let admin = node(&status(state), "hub-us")["admin"].as_str().unwrap().to_owned();
    let started = Instant::now();
    loop {
        let h = http::get_json(&admin, "/federation/health").await.unwrap_or_default();
        if h["echKeys"]["current"] == u64::from(broken.current.config_id) {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(20), "hub-us did not load the replaced key: {}", h["echKeys"]);
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    println!("  hub-us runs the replaced key; traffic on every route until the analysis acts...");
    let started = Instant::now();
    let (mut sent, mut ok) = (0, 0);
    let rolled_back = loop {
        ok += traffic(state, 10).await;
        sent += 10 * ROUTES.len();
        let s = status(state);
        let e = &s["rollout"]["evaluation"];
        if e["effectiveByMain"]["hub-us"].as_u64().is_some_and(|p| p < 100) {
            break s;
        }
        assert!(started.elapsed() < Duration::from_secs(60), "no rollback within 60 s: {e}");
    };
    let e = &rolled_back["rollout"]["evaluation"];
    println!(
        "  rolled back after {:.1} s ({ok} of {sent} requests succeeded meanwhile): hub-us at {}%, hub-eu at {}%",
        started.elapsed().as_secs_f64(),
        e["effectiveByMain"]["hub-us"],
        e["effectiveByMain"]["hub-eu"]
    );
    println!("$ relayfed local status   (rollout lines)");
    print!("{}", rollout_lines(state));
    println!("  (in a cluster: `kubectl get rp` shows PHASE RolledBack, `kubectl describe rp default` the");
    println!("   RolledBack condition with these figures and a Warning Event; the configured percentage stays 100)");

    std::fs::write(&key_file, &original).unwrap();
    std::fs::write(policy, short.replace("minStreams: 20", "minStreams: 21")).unwrap();
    println!("\nThe key is restored and the policy edited (any edit re-arms the rollout):");
    let started = Instant::now();
    loop {
        let s = status(state);
        let e = &s["rollout"]["evaluation"];
        if e["phase"] == "Succeeded" && e["effectiveByMain"]["hub-us"] == 100 {
            break;
        }
        assert!(started.elapsed() < Duration::from_secs(30), "the edit did not re-arm: {e}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let ok = traffic(state, 20).await;
    println!("  every relay at 100% again; {ok} of {} requests succeeded", 20 * ROUTES.len());
}
