//! The ECH rollout watching itself, in local mode on real processes (`tests/rollout/`):
//! steps that pause without traffic and advance 5 -> 25 -> 50 -> 100 under healthy traffic;
//! then one main relay's ECH key broken under load, and only that relay's percentage rolled
//! back (status, event, metric); then the key fixed and the policy edited, and every relay at
//! 100% again with ECH working. The analysis reads the cohort counters the calling home
//! reports to the supervisor's config distribution: no Prometheus involved. The direct-path
//! rollout (`tests/direct-rollout/`) is proved the same way, in its own network namespace.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "chaos/scenario.rs"]
#[allow(dead_code)]
mod scenario;

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use relayfed_e2e::procs::{eventually, get, round_trip};
use relayfed_sidecar::config::keys::EchKeyFile;
use serde_json::Value;

fn bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_relayfed"));
    relayfed_e2e::procs::proxy_next_to(&bin);
    bin
}

/// The policy: ECH to 100% through `steps`, judged over 10 s windows.
fn policy(steps: &str) -> String {
    format!(
        "apiVersion: relayfed.io/v1alpha1
kind: RolloutPolicy
metadata: {{name: default, namespace: relayfed-system}}
spec:
  ech:
    enabled: true
    mode: opportunistic
    percentage: 100
    steps: {steps}
    stepInterval: 10s
    autoRollback: {{enabled: true, minSuccessRate: 0.9, evaluationWindow: 10s, step: 50, minStreams: 5}}
  loadBalancing: {{algorithm: roundRobin, preferLocal: false}}
"
    )
}

fn status(state: &Path) -> Value {
    let out = std::process::Command::new(bin())
        .args(["local", "status", "--json", "--state-dir"])
        .arg(state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap()
}

fn evaluation(s: &Value) -> &Value {
    &s["rollout"]["evaluation"]
}

fn effective(s: &Value, main: &str) -> Option<u64> {
    evaluation(s)["effectiveByMain"][main].as_u64()
}

fn verdict<'a>(s: &'a Value, main: &str) -> Option<&'a str> {
    evaluation(s)["analyses"].as_array()?.iter().find(|a| a["main"] == main)?["verdict"].as_str()
}

fn events(s: &Value) -> Vec<String> {
    s["rollout"]["events"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["message"].as_str().map(str::to_owned))
        .collect()
}

/// Polls `f` until it yields a value (every 200 ms, at most `limit`).
async fn eventually_value<T, F, Fut>(what: &str, limit: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(tokio::time::Instant::now() < deadline, "timed out after {limit:?} waiting until {what}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn node(s: &Value, id: &str) -> Value {
    s["nodes"].as_array().unwrap().iter().find(|n| n["node"] == id).cloned().unwrap_or(Value::Null)
}

/// Calls `addr` in a loop (three at a time) until `stop`; counts successes, failures, and
/// failures of the calls that started after `mark` was set.
fn load(addr: std::net::SocketAddr, stop: Arc<AtomicBool>, mark: Arc<AtomicBool>) -> [Arc<AtomicU64>; 3] {
    let counters = [(); 3].map(|_| Arc::new(AtomicU64::new(0)));
    for _ in 0..3 {
        let ([ok, failed, late], stop, mark) = (counters.clone(), stop.clone(), mark.clone());
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let marked = mark.load(Ordering::Relaxed);
                let r = tokio::time::timeout(Duration::from_secs(5), round_trip(addr, b"rollout")).await;
                if matches!(r, Ok(Ok(b)) if b == b"rollout") {
                    ok.fetch_add(1, Ordering::Relaxed);
                } else {
                    failed.fetch_add(1, Ordering::Relaxed);
                    late.fetch_add(u64::from(marked), Ordering::Relaxed);
                }
                // Pacing of the load (about 30 calls a second), not a synchronisation.
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        });
    }
    counters
}

/// A local federation started from `dir`: the supervisor, its control address, its first
/// status and c1's import address.
struct Up {
    child: tokio::process::Child,
    control: std::net::SocketAddr,
    status: Value,
    c1: std::net::SocketAddr,
}

async fn up(dir: &Path) -> Up {
    let (child, ready) = scenario::local_up(&bin(), dir, &[]).await;
    let control = ready["control"].as_str().unwrap().parse().unwrap();
    let status = status(&dir.join("state"));
    let c1 = node(&status, "c1")["imports"].as_array().unwrap()[0]["listen"].as_str().unwrap().parse().unwrap();
    Up { child, control, status, c1 }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn steps_advance_and_a_broken_relay_is_rolled_back_alone() {
    let dir = scenario::work_dir("rollout");
    let policy_file = dir.join("manifests/50-policy.yaml");
    std::fs::write(&policy_file, policy("[5, 25, 50]")).unwrap();
    let state = dir.join("state");
    let Up { mut child, control, c1, .. } = up(&dir).await;

    // Without traffic the first step is held.
    eventually("the rollout is evaluated and paused at 5%", Duration::from_secs(30), || async {
        let s = status(&state);
        evaluation(&s)["phase"] == "Paused" && evaluation(&s)["stepPercentage"] == 5
    })
    .await;
    // The measurement period: longer than stepInterval, nothing may advance.
    tokio::time::sleep(Duration::from_secs(12)).await;
    let s = status(&state);
    assert_eq!(evaluation(&s)["stepPercentage"], 5, "no traffic, no step: {}", evaluation(&s));
    assert_eq!(evaluation(&s)["phase"], "Paused");

    // Healthy traffic: the steps advance to 100%.
    let stop = Arc::new(AtomicBool::new(false));
    let [ok, failed, _] = load(c1, stop.clone(), Arc::default());
    eventually("the steps reach 100% under healthy traffic", Duration::from_secs(90), || async {
        let s = status(&state);
        evaluation(&s)["phase"] == "Succeeded" && evaluation(&s)["stepPercentage"] == 100
    })
    .await;
    let advanced: Vec<String> = events(&status(&state)).into_iter().filter(|e| e.contains("advanced to")).collect();
    assert_eq!(
        advanced.iter().map(|e| e.rsplit(' ').next().unwrap().to_owned()).collect::<Vec<_>>(),
        ["25%", "50%", "100%"],
        "{advanced:?}"
    );
    eventually("every relay passes with ECH at 100%", Duration::from_secs(30), || async {
        let s = status(&state);
        ["m1", "m2", "m3"].iter().all(|m| verdict(&s, m) == Some("Pass"))
    })
    .await;
    let healthy_failed = failed.load(Ordering::Relaxed);

    // m2's ECH key is replaced behind the supervisor's back: homes seal to a config it no
    // longer holds, and its ECH setups fail.
    let key_file = state.join("keys/m2-ech.json");
    let pass = std::fs::read_to_string(state.join("passphrase")).unwrap();
    let pass = pass.trim_end().as_bytes();
    let original = std::fs::read(&key_file).unwrap();
    let mut broken = EchKeyFile::load(&key_file, Some(pass)).unwrap();
    let good_id = broken.current.config_id;
    broken.current.config_id = good_id.wrapping_add(7);
    broken.current.secret = relayfed_sidecar::config::base64_encode(&rand::random::<[u8; 32]>());
    broken.previous = None;
    broken.next = None;
    broken.save(&key_file, Some(pass)).unwrap();
    let m2_admin = node(&s, "m2")["admin"].as_str().unwrap().to_owned();
    eventually("m2 runs the broken key", Duration::from_secs(20), || async {
        let h = relayfed_operator::local::http::get_json(&m2_admin, "/federation/health").await;
        h.is_some_and(|h| h["echKeys"]["current"] == u64::from(good_id.wrapping_add(7)))
    })
    .await;
    let mut others_held = true;
    eventually("m2's percentage is rolled back", Duration::from_secs(30), || {
        let s = status(&state);
        others_held &= effective(&s, "m1") == Some(100) && effective(&s, "m3") == Some(100);
        async move { effective(&s, "m2").is_some_and(|p| p < 100) }
    })
    .await;
    assert!(others_held, "m1 and m3 kept 100% while m2 failed");
    let s = status(&state);
    assert_eq!(evaluation(&s)["phase"], "RolledBack");
    assert_eq!((effective(&s, "m1"), effective(&s, "m3")), (Some(100), Some(100)));
    let event = events(&s).into_iter().find(|e| e.contains("rolled back")).expect("a rollback event");
    assert!(event.contains("m2") && event.contains("from 100% to 50%"), "{event}");
    let m2 = evaluation(&s)["analyses"].as_array().unwrap().iter().find(|a| a["main"] == "m2").cloned();
    eprintln!("rollback: {event}; m2 analysis {m2:?}");
    let metrics = get(control, "/metrics").await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("relayfed_operator_rollout_effective_percent{main=\"m2\"} 50")),
        "the supervisor exports m2's effective percentage"
    );
    assert!(metrics.lines().any(|l| l.starts_with("relayfed_operator_rollout_effective_percent{main=\"m1\"} 100")));
    assert!(failed.load(Ordering::Relaxed) > healthy_failed, "the broken key failed calls");
    let m2_health = relayfed_operator::local::http::get_json(&m2_admin, "/federation/health").await.unwrap();
    assert!(m2_health["ech"]["retrySent"].as_u64() > Some(0), "m2 answered the stale config id: {}", m2_health["ech"]);
    // The calling home applies it, and its admin API shows its ECH health.
    let c1_admin = node(&s, "c1")["admin"].as_str().unwrap().to_owned();
    let ech = eventually_value("c1 applies m2's lowered percentage", Duration::from_secs(20), || async {
        let h = relayfed_operator::local::http::get_json(&c1_admin, "/federation/health").await?;
        (h["ech"]["percentageByMain"]["m2"] == 50).then(|| h["ech"].clone())
    })
    .await;
    assert_eq!(ech["configsKnown"], serde_json::json!(["m1", "m2", "m3"]), "{ech}");
    assert!(ech["setups"].as_u64().unwrap() > 0 && ech["successRate"].as_f64().unwrap() < 1.0, "{ech}");
    assert!(matches!(ech["status"].as_str(), Some("healthy" | "degraded")), "{ech}");
    let table =
        std::process::Command::new(bin()).args(["local", "status", "--state-dir"]).arg(&state).output().unwrap();
    let table = String::from_utf8_lossy(&table.stdout);
    assert!(table.contains("m2: 50% (rolled back)"), "{table}");

    // The key is fixed, then the policy edited (without steps): every relay at 100% again.
    std::fs::write(&key_file, &original).unwrap();
    eventually("m2 runs its own key again", Duration::from_secs(20), || async {
        let h = relayfed_operator::local::http::get_json(&m2_admin, "/federation/health").await;
        h.is_some_and(|h| h["echKeys"]["current"] == u64::from(good_id))
    })
    .await;
    std::fs::write(&policy_file, policy("[]")).unwrap();
    eventually("the edit re-arms the rollout at 100% everywhere", Duration::from_secs(30), || async {
        let s = status(&state);
        evaluation(&s)["phase"] == "Succeeded"
            && ["m1", "m2", "m3"].iter().all(|m| effective(&s, m) == Some(100))
            && events(&s).iter().any(|e| e.contains("starts again at 100%"))
    })
    .await;
    eventually("ECH toward m2 works again", Duration::from_secs(40), || async {
        verdict(&status(&state), "m2") == Some("Pass")
    })
    .await;
    let s = status(&state);
    let all = events(&s);
    let rearmed = all.iter().rposition(|e| e.contains("starts again at 100%")).unwrap();
    assert!(
        !all[rearmed..].iter().any(|e| e.contains("rolled back")),
        "setups from before the edit are not judged again: {all:?}"
    );
    assert_eq!(effective(&s, "m2"), Some(100));
    let before = ok.load(Ordering::Relaxed);
    eventually("calls keep succeeding", Duration::from_secs(20), || async { ok.load(Ordering::Relaxed) > before + 20 })
        .await;
    stop.store(true, Ordering::Relaxed);
    eprintln!("rollout: {} calls ok, {} failed", ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    let _ = std::process::Command::new(bin()).args(["local", "down", "--state-dir"]).arg(&state).status();
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// Whether this run is the copy [`isolated`] started in its own network namespace.
fn in_netns() -> bool {
    std::env::var_os("RELAYFED_ROLLOUT_IN_NETNS").is_some()
}

/// Runs test `name` again inside a fresh network namespace (root, `unshare`), where it may
/// install iptables rules without touching the host; asserts that copy passed.
fn isolated(name: &str) {
    let root = std::process::Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.trim_ascii() == b"0");
    assert!(root, "{name} needs root: it breaks a direct path with iptables in its own network namespace");
    let status = std::process::Command::new("unshare")
        .args(["--net", "--", "sh", "-c", "ip link set lo up && exec \"$0\" \"$@\""])
        .arg(std::env::current_exe().unwrap())
        .args(["--exact", name, "--nocapture"])
        .env("RELAYFED_ROLLOUT_IN_NETNS", "1")
        .status()
        .unwrap();
    assert!(status.success(), "{name} in its own network namespace failed: {status}");
}

fn direct_policy() -> &'static str {
    "apiVersion: relayfed.io/v1alpha1
kind: RolloutPolicy
metadata: {name: default, namespace: relayfed-system}
spec:
  ech: {enabled: false}
  resilience: {timeouts: {handshake: 1s, linkIdle: 1500ms}}
  loadBalancing: {algorithm: roundRobin, preferLocal: false}
  directPaths:
    enabled: true
    autoRollback: {minSuccessRate: 0.99, evaluationWindow: 20s, step: 100, minStreams: 3}
"
}

fn direct(s: &Value) -> &Value {
    &s["rollout"]["directPaths"]["status"]
}

/// The path `admin`'s home has to home `peer` (`/federation/peers`), and its remote address.
async fn home_path(admin: &str, peer: &str) -> Option<(String, String)> {
    let peers = relayfed_operator::local::http::get_json(admin, "/federation/peers").await?;
    let p = peers.as_array()?.iter().find(|p| p["kind"] == "home" && p["node"] == peer)?.clone();
    Some((p["path"].as_str()?.to_owned(), p["remote"].as_str().unwrap_or_default().to_owned()))
}

fn iptables(rule: &str) {
    let out = std::process::Command::new("sh").args(["-c", &format!("iptables {rule}")]).output().unwrap();
    assert!(out.status.success(), "iptables {rule}: {}", String::from_utf8_lossy(&out.stderr));
}

/// Issue 22's "rolled out like ECH": direct paths that connect and then carry nothing (the
/// QUIC handshake passes, every later packet between the two homes is dropped) fail each
/// stream set up on them after the handshake timeout; the call takes the relay at once. The
/// analysis sees direct setups toward m2 fail where relayed ones do not and rolls m2 back to
/// 0%; m1's direct path (unbroken) keeps 100%; no call fails.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn direct_paths_that_carry_nothing_are_rolled_back_for_their_relay_alone() {
    if !in_netns() {
        return isolated("direct_paths_that_carry_nothing_are_rolled_back_for_their_relay_alone");
    }
    let dir = scenario::work_dir("direct-rollout");
    std::fs::write(dir.join("manifests/50-policy.yaml"), direct_policy()).unwrap();
    let federation = std::fs::read_to_string(dir.join("manifests/00-federation.yaml")).unwrap();
    let m2_port = federation.split("nodeId: m2, endpoint: \"127.0.0.1:").nth(1).unwrap().split('"').next().unwrap();
    let state = dir.join("state");
    let Up { mut child, control, status: s, c1 } = up(&dir).await;
    let c1_admin = node(&s, "c1")["admin"].as_str().unwrap().to_owned();

    let (stop, applied) = (Arc::new(AtomicBool::new(false)), Arc::new(AtomicBool::new(false)));
    let [ok, failed, late] = load(c1, stop.clone(), applied.clone());
    let e2 = eventually_value("c1 calls e1 and e2 on direct paths", Duration::from_secs(60), || async {
        let e1 = home_path(&c1_admin, "e1").await?;
        let e2 = home_path(&c1_admin, "e2").await?;
        (e1.0 == "direct" && e2.0 == "direct").then_some(e2.1)
    })
    .await;
    eventually("both relays pass with direct paths at 100%", Duration::from_secs(60), || async {
        let s = status(&state);
        let pass = |m: &str| {
            direct(&s)["analysis"].as_array().into_iter().flatten().any(|a| a["main"] == m && a["verdict"] == "Pass")
        };
        pass("m1") && pass("m2") && direct(&s)["effectiveByMain"]["m2"] == 100
    })
    .await;
    let healthy_failed = failed.load(Ordering::Relaxed);

    // Short-header QUIC packets (first byte 01xxxxxx) to and from e2's socket, except its
    // relay link's: the handshake of a direct connection passes (long headers), nothing after.
    let e2_port = e2.rsplit(':').next().unwrap().to_owned();
    let short = "-m u32 --u32 '0>>22&0x3C@8>>24&0xC0=0x40'";
    iptables(&format!("-I INPUT -p udp --dport {e2_port} ! --sport {m2_port} {short} -j DROP"));
    iptables(&format!("-I INPUT -p udp --sport {e2_port} ! --dport {m2_port} {short} -j DROP"));

    let mut m1_held = true;
    eventually("m2's direct-path percentage is rolled back", Duration::from_secs(90), || {
        let s = status(&state);
        m1_held &= direct(&s)["effectiveByMain"]["m1"] == 100;
        async move { direct(&s)["effectiveByMain"]["m2"] == 0 }
    })
    .await;
    assert!(m1_held, "m1 kept 100% while m2's direct paths failed");
    let s = status(&state);
    assert_eq!(direct(&s)["phase"], "RolledBack", "{}", direct(&s));
    eprintln!("direct-path rollback: analyses {}", direct(&s)["analysis"]);
    let event = s["rollout"]["directPaths"]["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|e| e["message"].as_str())
        .find(|e| e.contains("rolled back"))
        .expect("a rollback event")
        .to_owned();
    assert!(event.contains("direct paths to homes behind m2 rolled back from 100% to 0%"), "{event}");
    let metrics = get(control, "/metrics").await.unwrap();
    assert!(
        metrics.lines().any(|l| l.starts_with("relayfed_operator_direct_paths_effective_percent{main=\"m2\"} 0")),
        "the supervisor exports m2's direct-path percentage"
    );
    // c1 applies it: new calls to e2 take the relays; e1 is still called directly.
    eventually("c1 applies m2's direct-path rollback", Duration::from_secs(30), || async {
        let h = relayfed_operator::local::http::get_json(&c1_admin, "/federation/health").await;
        h.is_some_and(|h| h["directPaths"]["percentageByMain"]["m2"] == 0)
    })
    .await;
    applied.store(true, Ordering::Relaxed);
    let before = ok.load(Ordering::Relaxed);
    eventually("calls keep succeeding", Duration::from_secs(60), || async { ok.load(Ordering::Relaxed) > before + 20 })
        .await;
    assert_eq!(home_path(&c1_admin, "e1").await.map(|p| p.0).as_deref(), Some("direct"), "m1's path is untouched");
    stop.store(true, Ordering::Relaxed);
    let [ok, failed, late] = [ok, failed, late].map(|c| c.load(Ordering::Relaxed));
    eprintln!(
        "direct-path rollout: {ok} calls ok, {failed} failed ({healthy_failed} before the fault, {late} after the rollback)"
    );
    assert_eq!(healthy_failed, 0, "no call failed before the fault");
    // While the path was broken, a stream whose handshake got through (a datagram that starts
    // with a QUIC long header passes) and then stalled failed its call; once the rollback is
    // in force at c1, calls to e2 take the relays.
    assert_eq!(late, 0, "a call failed after the rollback was applied");
    let _ = std::process::Command::new(bin()).args(["local", "down", "--state-dir"]).arg(&state).status();
    let _ = tokio::time::timeout(Duration::from_secs(20), child.wait()).await;
    let _ = std::fs::remove_dir_all(&dir);
}
