//! Local mode end to end: `relayfed local up` runs a federation from CR YAML in child
//! processes; edits of the RolloutPolicy reach every node live; the ECH share of new streams
//! follows the consistent hash; whitelist and blacklist win; in-flight connections survive;
//! an invalid edit is refused and the old policy stays; a killed relay shows up in `status`
//! and metrics and the federation recovers; a second start reuses the key material.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use relayfed_e2e::procs::{eventually, round_trip, sample};
use relayfed_sidecar::federation::ech_policy::bucket;
use serde_json::Value;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const BIN: &str = env!("CARGO_BIN_EXE_relayfed");

/// A port for the manifests, picked below Linux's ephemeral range (32768-60999): a port from
/// that range, free when picked, can be taken by any outgoing connection before the federation
/// binds it. Each call moves on (tests in this binary run in parallel) and skips ports in use.
fn pick(bindable: impl Fn(u16) -> bool) -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 20_000 + (std::process::id() % 400) as u16 * 20;
    loop {
        let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2_000; // < 30000
        if bindable(port) {
            return port;
        }
    }
}
fn free_udp() -> u16 {
    pick(|p| std::net::UdpSocket::bind(("127.0.0.1", p)).is_ok())
}
fn free_tcp() -> u16 {
    pick(|p| std::net::TcpListener::bind(("127.0.0.1", p)).is_ok())
}

fn workdir(name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("relayfed-local-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(d.join("manifests")).unwrap();
    d
}

/// Two main relays; `dests` home relays each exporting `sNN` (built-in echo), alternating
/// between the hubs; one `client` home on hub-a importing every service.
fn federation_yaml(dests: usize) -> String {
    let (a, b) = (free_udp(), free_udp());
    let mut y = format!(
        "apiVersion: relayfed.io/v1alpha1
kind: RelayFederation
metadata: {{name: t, namespace: relayfed-system}}
spec:
  trustDomain: test.example
  publicName: relay.test.example
  mainRelays:
    - {{nodeId: hub-a, endpoint: \"127.0.0.1:{a}\"}}
    - {{nodeId: hub-b, endpoint: \"127.0.0.1:{b}\"}}
---
apiVersion: relayfed.io/v1alpha1
kind: Relay
metadata: {{name: hub-a, namespace: relayfed-system}}
spec: {{type: main, nodeId: hub-a, federation: t}}
---
apiVersion: relayfed.io/v1alpha1
kind: Relay
metadata: {{name: hub-b, namespace: relayfed-system}}
spec: {{type: main, nodeId: hub-b, federation: t}}
"
    );
    let mut imports = String::new();
    for i in 0..dests {
        let hub = if i % 2 == 0 { "hub-a" } else { "hub-b" };
        y.push_str(&format!(
            "---
apiVersion: relayfed.io/v1alpha1
kind: Relay
metadata:
  name: d{i:02}
  namespace: relayfed-system
  annotations: {{relayfed.io/local-workload: echo}}
spec:
  type: home
  nodeId: d{i:02}
  federation: t
  mainRelays: [{{nodeId: {hub}}}]
  exports: [{{name: s{i:02}, port: 7000, target: \"127.0.0.1:{}\"}}]
",
            free_tcp()
        ));
        imports.push_str(&format!("    - {{name: s{i:02}, port: 7000, listen: \"127.0.0.1:{}\"}}\n", free_tcp()));
    }
    y.push_str(&format!(
        "---
apiVersion: relayfed.io/v1alpha1
kind: Relay
metadata: {{name: client, namespace: relayfed-system}}
spec:
  type: home
  nodeId: client
  federation: t
  mainRelays: [{{nodeId: hub-a}}]
  imports:
{imports}"
    ));
    y
}

fn policy_yaml(percentage: &str, whitelist: &[&str], blacklist: &[&str]) -> String {
    format!(
        "apiVersion: relayfed.io/v1alpha1
kind: RolloutPolicy
metadata: {{name: default, namespace: relayfed-system}}
spec:
  ech:
    enabled: true
    mode: opportunistic
    percentage: {percentage}
    whitelist: {whitelist:?}
    blacklist: {blacklist:?}
"
    )
}

/// A running `relayfed local up` and the CLI around it.
struct Local {
    child: tokio::process::Child,
    dir: PathBuf,
}

impl Local {
    async fn up(dir: &Path) -> Self {
        relayfed_e2e::procs::proxy_next_to(Path::new(BIN));
        let mut child = tokio::process::Command::new(BIN)
            .args(["local", "up", "-f"])
            .arg(dir.join("manifests"))
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env("RELAYFED_LOG", "warn")
            .stdout(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.unwrap().unwrap();
        let ready: Value = serde_json::from_str(&line.expect("local up exited before it was ready")).unwrap();
        assert_eq!(ready["event"], "ready");
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        let local = Self { child, dir: dir.to_owned() };
        // Registration propagates across the hubs: wait until the client sees every service.
        eventually("the client sees every exported service", Duration::from_secs(30), || async {
            let s = local.status();
            let exported = s["workloads"].as_array().unwrap().len() as u64;
            Local::node(&s, "client")["health"]["services"].as_u64() == Some(exported)
        })
        .await;
        local
    }

    fn cli(&self, args: &[&str]) -> std::process::Output {
        std::process::Command::new(BIN).args(args).arg("--state-dir").arg(self.dir.join("state")).output().unwrap()
    }

    fn status(&self) -> Value {
        let out = self.cli(&["local", "status", "--json"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    fn node<'a>(status: &'a Value, node: &str) -> &'a Value {
        status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == node).unwrap()
    }

    /// Writes the policy and waits until every node acknowledged the new generation.
    async fn set_policy(&self, yaml: &str) {
        let path = self.dir.join("manifests/50-policy.yaml");
        if std::fs::read_to_string(&path).unwrap() == yaml {
            return;
        }
        let before = self.status()["generation"].as_u64().unwrap();
        std::fs::write(self.dir.join("manifests/50-policy.yaml"), yaml).unwrap();
        eventually("every node acknowledged the edited policy", Duration::from_secs(30), || async {
            let s = self.status();
            s["generation"].as_u64().unwrap() > before
                && s["nodes"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .all(|n| n["ackedVersion"].as_u64() >= n["configVersion"].as_u64())
        })
        .await;
    }

    async fn down(mut self) -> Vec<u64> {
        let pids: Vec<u64> =
            self.status()["nodes"].as_array().unwrap().iter().filter_map(|n| n["pid"].as_u64()).collect();
        let out = self.cli(&["local", "down"]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let status = tokio::time::timeout(Duration::from_secs(30), self.child.wait()).await.unwrap().unwrap();
        assert!(status.success(), "local up exited with {status}");
        pids
    }
}

fn alive(pid: u64) -> bool {
    Path::new(&format!("/proc/{pid}")).exists()
        && !std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default().contains(") Z ")
}

/// The client's import listeners by service.
fn imports(status: &Value) -> BTreeMap<String, SocketAddr> {
    Local::node(status, "client")["imports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["service"].as_str().unwrap().to_owned(), i["listen"].as_str().unwrap().parse().unwrap()))
        .collect()
}

/// Streams set up by the client with and without ECH so far.
async fn ech_counts(status: &Value) -> (f64, f64) {
    let admin = Local::node(status, "client")["admin"].as_str().unwrap().to_owned();
    let text = relayfed_operator::local::http::request(&admin, hyper::Method::GET, "/metrics", Duration::from_secs(5))
        .await
        .unwrap()
        .1;
    let n = "relayfed_proxy_call_setup_duration_seconds_count";
    (sample(&text, n, &[("ech", "true")]), sample(&text, n, &[("ech", "false")]))
}

/// Makes `calls` new connections to each service; returns the (ECH, total) streams they used.
async fn calls(status: &Value, services: &[String], per_service: usize) -> (f64, f64) {
    let imports = imports(status);
    let (e0, p0) = ech_counts(status).await;
    for s in services {
        for k in 0..per_service {
            let payload = format!("{s}-{k}");
            let got = round_trip(imports[s], payload.as_bytes()).await.unwrap();
            assert_eq!(got, payload.as_bytes(), "echo through {s}");
        }
    }
    let (e1, p1) = ech_counts(status).await;
    (e1 - e0, (e1 - e0) + (p1 - p0))
}

async fn still_open(conn: &mut TcpStream, n: usize) {
    let msg = format!("in-flight {n}");
    conn.write_all(msg.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; msg.len()];
    tokio::time::timeout(Duration::from_secs(10), conn.read_exact(&mut buf)).await.unwrap().unwrap();
    assert_eq!(buf, msg.as_bytes(), "the connection opened before the edits still carries data");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_edits_reach_every_node_live_and_follow_the_consistent_hash() {
    const DESTS: usize = 12;
    let dir = workdir("rollout");
    std::fs::write(dir.join("manifests/00-federation.yaml"), federation_yaml(DESTS)).unwrap();
    std::fs::write(dir.join("manifests/50-policy.yaml"), policy_yaml("0", &[], &[])).unwrap();
    let local = Local::up(&dir).await;
    let status = local.status();
    assert_eq!(status["nodes"].as_array().unwrap().len(), DESTS + 3);
    let services: Vec<String> = (0..DESTS).map(|i| format!("s{i:02}")).collect();
    let dest = |s: &str| format!("d{}", &s[1..]);

    // A long-lived connection, opened before any edit.
    let mut inflight = TcpStream::connect(imports(&status)["s00"]).await.unwrap();
    still_open(&mut inflight, 0).await;

    // The share of new streams using ECH equals the share of destinations whose bucket is
    // below the percentage (every destination gets the same number of calls); tolerance
    // 5 percentage points.
    for (step, pct) in [0u16, 25, 100].into_iter().enumerate() {
        local.set_policy(&policy_yaml(&pct.to_string(), &[], &[])).await;
        let status = local.status();
        assert_eq!(status["rollout"]["percentage"], pct);
        let (ech, total) = calls(&status, &services, 3).await;
        let expected = services.iter().filter(|s| bucket(&dest(s)) < pct * 100).count() as f64 / DESTS as f64;
        let share = ech / total;
        assert!(
            (share - expected).abs() <= 0.05,
            "at {pct}%: {ech}/{total} streams used ECH, expected share {expected}"
        );
        still_open(&mut inflight, step + 1).await;
    }

    // Whitelisted destinations always use ECH (at 0%), blacklisted never (at 100%).
    local.set_policy(&policy_yaml("0", &["d03", "d07"], &[])).await;
    let status = local.status();
    let listed = ["s03".to_owned(), "s07".to_owned()];
    let others: Vec<String> = services.iter().filter(|s| !listed.contains(s)).cloned().collect();
    assert_eq!(calls(&status, &listed, 3).await, (6.0, 6.0), "whitelisted at 0%");
    assert_eq!(calls(&status, &others, 1).await.0, 0.0, "not whitelisted at 0%");
    local.set_policy(&policy_yaml("100", &[], &["d01", "d02"])).await;
    let status = local.status();
    let listed = ["s01".to_owned(), "s02".to_owned()];
    let others: Vec<String> = services.iter().filter(|s| !listed.contains(s)).cloned().collect();
    assert_eq!(calls(&status, &listed, 3).await, (0.0, 6.0), "blacklisted at 100%");
    let (ech, total) = calls(&status, &others, 1).await;
    assert_eq!(ech, total, "not blacklisted at 100%");
    still_open(&mut inflight, 10).await;

    // An invalid edit is refused with the API server's message; the old policy stays.
    let generation = local.status()["generation"].clone();
    std::fs::write(dir.join("manifests/50-policy.yaml"), policy_yaml("150", &[], &[])).unwrap();
    eventually("the invalid edit is reported", Duration::from_secs(20), || async {
        local.status()["lastRejected"]["errors"].to_string().contains("spec.ech.percentage")
    })
    .await;
    let status = local.status();
    let msg = status["lastRejected"]["errors"][0].as_str().unwrap();
    assert_eq!(
        msg,
        "RolloutPolicy.relayfed.io \"default\" is invalid: spec.ech.percentage: Invalid value: 150: must be less than or equal to 100"
    );
    assert_eq!(status["generation"], generation);
    assert_eq!(status["rollout"]["percentage"], 100);
    assert_eq!(calls(&status, &listed, 1).await, (0.0, 2.0), "the blacklist is still in force");
    assert_eq!(calls(&status, &["s05".to_owned()], 1).await, (1.0, 1.0), "100% is still in force");
    still_open(&mut inflight, 11).await;
    drop(inflight);

    let pids = local.down().await;
    assert_eq!(pids.len(), DESTS + 3);
    for pid in pids {
        assert!(!alive(pid), "node process {pid} still runs after `local down`");
    }
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_relay_shows_in_status_and_metrics_and_the_federation_recovers() {
    let dir = workdir("kill");
    std::fs::write(dir.join("manifests/00-federation.yaml"), federation_yaml(2)).unwrap();
    std::fs::write(dir.join("manifests/50-policy.yaml"), policy_yaml("100", &[], &[])).unwrap();
    let local = Local::up(&dir).await;
    let status = local.status();
    let ca = status["caFingerprint"].as_str().unwrap().to_owned();
    // s01 lives on hub-b: the client (on hub-a) reaches it across both hubs.
    assert_eq!(calls(&status, &["s01".to_owned()], 1).await, (1.0, 1.0));

    let hub_a_admin = Local::node(&status, "hub-a")["admin"].as_str().unwrap().to_owned();
    let peer_up = || async {
        let text = relayfed_operator::local::http::request(
            &hub_a_admin,
            hyper::Method::GET,
            "/metrics",
            Duration::from_secs(5),
        )
        .await
        .map(|r| r.1)
        .unwrap_or_default();
        sample(&text, "relayfed_relay_peer_up", &[("peer", "hub-b")])
    };
    assert_eq!(peer_up().await, 1.0);
    let pid = Local::node(&status, "hub-b")["pid"].as_u64().unwrap();
    std::process::Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();

    // The supervisor sees the exit at once and counts it; hub-a reports the peer down.
    eventually("status shows hub-b restarted", Duration::from_secs(20), || async {
        let s = local.status();
        let n = Local::node(&s, "hub-b");
        n["restarts"] == 1 && n["pid"].as_u64() != Some(pid)
    })
    .await;
    let control =
        serde_json::from_str::<Value>(&std::fs::read_to_string(dir.join("state/run/supervisor.json")).unwrap())
            .unwrap()["control"]
            .as_str()
            .unwrap()
            .to_owned();
    let text =
        relayfed_operator::local::http::request(&control, hyper::Method::GET, "/metrics", Duration::from_secs(5))
            .await
            .unwrap()
            .1;
    assert_eq!(sample(&text, "relayfed_local_process_restarts_total", &[("node", "hub-b")]), 1.0, "{text}");

    // Recovery: the restarted hub-b peers with hub-a again, the service is back, and a call
    // across both hubs works.
    eventually("hub-a sees hub-b up again", Duration::from_secs(60), || async { peer_up().await == 1.0 }).await;
    eventually("a call across both hubs works again", Duration::from_secs(60), || async {
        let s = local.status();
        let addr = imports(&s)["s01"];
        round_trip(addr, b"back").await.is_ok_and(|r| r == b"back")
    })
    .await;
    local.down().await;

    // A second start reuses the key material (same CA), sealed with the passphrase.
    let sealed = std::fs::read_to_string(dir.join("state/keys/ca.key")).unwrap();
    assert!(!sealed.contains("PRIVATE KEY"), "the CA key is stored sealed");
    let local = Local::up(&dir).await;
    assert_eq!(local.status()["caFingerprint"].as_str().unwrap(), ca);
    assert_eq!(std::fs::read_to_string(dir.join("state/keys/ca.key")).unwrap(), sealed);
    assert_eq!(calls(&local.status(), &["s00".to_owned()], 1).await, (1.0, 1.0));
    local.down().await;
    let _ = std::fs::remove_dir_all(&dir);
}
