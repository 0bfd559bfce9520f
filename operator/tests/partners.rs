//! Two organisations' federations in local mode, from two directories of CR YAML
//! (examples/partners): two CAs, two trust domains, nothing shared. Each side learns the
//! other's pin with `relayfed local identity` and writes its own Peer (the example's
//! template), applied live. Calls the permissions allow cross the boundary both ways
//! (home -> main -> partner main -> partner home); a service the partner may not call is not
//! even in its registry.
#![allow(clippy::unwrap_used, clippy::expect_used)]

#[path = "chaos/scenario.rs"]
#[allow(dead_code)]
mod scenario;

use std::path::{Path, PathBuf};
use std::time::Duration;

use relayfed_e2e::procs::{eventually, round_trip};
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(60);

fn bin() -> PathBuf {
    let bin = PathBuf::from(env!("CARGO_BIN_EXE_relayfed"));
    relayfed_e2e::procs::proxy_next_to(&bin);
    bin
}

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn local(args: &[&str], state: &Path) -> Value {
    let out =
        std::process::Command::new(bin()).args(["local"]).args(args).arg("--state-dir").arg(state).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
}

/// One side: the example's manifests with its fixed ports replaced by free ones.
struct Side {
    dir: PathBuf,
    relay: &'static str,
    quic: u16,
}

impl Side {
    fn new(name: &str, relay: &'static str, ports: &[(u16, &str)]) -> (Self, String) {
        // Tests of this file run at once: a directory per side per test.
        static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("relayfed-partners-{name}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("manifests")).unwrap();
        let mut text =
            std::fs::read_to_string(repo().join(format!("examples/partners/{name}/federation.yaml"))).unwrap();
        let mut quic = 0;
        for (i, (fixed, proto)) in ports.iter().enumerate() {
            let free = scenario::free_port(proto);
            text = text.replace(&format!("127.0.0.1:{fixed}\""), &format!("127.0.0.1:{free}\""));
            if i == 0 {
                quic = free;
            }
        }
        std::fs::write(dir.join("manifests/00-federation.yaml"), &text).unwrap();
        (Self { dir, relay, quic }, text)
    }

    fn state(&self) -> PathBuf {
        self.dir.join("state")
    }

    fn status(&self) -> Value {
        local(&["status", "--json"], &self.state())
    }

    /// The Peer this side writes for `other` (the example's template filled in).
    fn peer_for(&self, other: &Side, other_identity: &Value, call: &str, export: &str) {
        let pin = other_identity["fingerprint"].as_str().unwrap();
        self.peer_pinning(other, other_identity, &[pin], call, export);
    }

    /// The Peer this side writes for `other`, pinning `pins` (two during a CA rotation).
    fn peer_pinning(&self, other: &Side, other_identity: &Value, pins: &[&str], call: &str, export: &str) {
        let template = std::fs::read_to_string(repo().join("examples/partners/peer.yaml.template")).unwrap();
        let peer = template
            .replace("${NAME}", other.relay)
            .replace("${NODE}", other.relay)
            .replace("${LOCAL}", self.relay)
            .replace("${DOMAIN}", other_identity["trustDomain"].as_str().unwrap())
            .replace("${ENDPOINT}", &format!("127.0.0.1:{}", other.quic))
            .replace("${FINGERPRINT}", pins[0])
            .replace("${CALL}", call)
            .replace("${EXPORT}", export);
        let peer = match pins.get(1) {
            Some(next) => peer.replace(
                &format!("identity: {{fingerprint: \"{}\"}}", pins[0]),
                &format!("identity: {{fingerprint: \"{}\", nextFingerprint: \"{next}\"}}", pins[0]),
            ),
            None => peer,
        };
        assert!(pins.len() == 1 || peer.contains("nextFingerprint"), "the template's identity line changed");
        std::fs::write(self.dir.join("manifests/30-peer.yaml"), peer).unwrap();
    }

    /// The state of this side's main relay's peering with `peer`.
    fn peering(&self, peer: &str) -> String {
        let status = self.status();
        let main = status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == self.relay).cloned();
        let peers = main.map(|m| m["health"]["peers"].clone()).unwrap_or(Value::Null);
        let p = peers.as_array().into_iter().flatten().find(|p| p["node"] == peer);
        p.map(|p| p["state"].as_str().unwrap_or("-").to_owned()).unwrap_or_else(|| "absent".into())
    }

    /// `path` of node `node`'s admin API.
    async fn admin_json(&self, node: &str, path: &str) -> Value {
        let status = self.status();
        let n = status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == node).cloned().unwrap();
        let admin: std::net::SocketAddr = n["admin"].as_str().unwrap().parse().unwrap();
        let out = relayfed_e2e::procs::get(admin, path).await.unwrap();
        serde_json::from_str(out.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or_default()).unwrap()
    }

    /// The value of one sample of node `node`'s metrics (0 when absent).
    async fn metric(&self, node: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
        let status = self.status();
        let n = status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == node).cloned().unwrap();
        let admin: std::net::SocketAddr = n["admin"].as_str().unwrap().parse().unwrap();
        relayfed_e2e::procs::sample(&relayfed_e2e::procs::get(admin, "/metrics").await.unwrap(), name, labels)
    }

    /// The loopback address of `home`'s import of `service`.
    fn import(&self, home: &str, service: &str) -> std::net::SocketAddr {
        let status = self.status();
        let node = status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == home).cloned().unwrap();
        let imp = node["imports"].as_array().unwrap().iter().find(|i| i["service"] == service).cloned().unwrap();
        imp["listen"].as_str().unwrap().parse().unwrap()
    }
}

/// The example's two sides, their fixed ports replaced by free ones.
fn example_sides() -> (Side, Side) {
    let ports =
        |q: u16, t: &[u16]| std::iter::once((q, "udp")).chain(t.iter().map(|p| (*p, "tcp"))).collect::<Vec<_>>();
    let (acme, _) = Side::new("acme", "hub-a", &ports(7411, &[18411, 18412, 18413, 18414]));
    let (partner, _) = Side::new("partner", "hub-p", &ports(7421, &[18421, 18422, 18423]));
    (acme, partner)
}

/// Stops both federations and removes their directories.
async fn down(sides: [(&Side, tokio::process::Child); 2]) {
    for (side, mut supervisor) in sides {
        local(&["down"], &side.state());
        let _ = supervisor.wait().await;
        let _ = std::fs::remove_dir_all(&side.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_organisations_federate_by_pinned_keys_from_two_directories_of_yaml() {
    let (acme, partner) = example_sides();
    let (a, _) = scenario::local_up(&bin(), &acme.dir, &[]).await;
    let (p, _) = scenario::local_up(&bin(), &partner.dir, &[]).await;

    // Only public material crosses: each side's trust domain and CA key fingerprint.
    let (acme_id, partner_id) =
        (local(&["identity", "--json"], &acme.state()), local(&["identity", "--json"], &partner.state()));
    assert_eq!(
        (acme_id["trustDomain"].as_str(), partner_id["trustDomain"].as_str()),
        (Some("acme.example"), Some("partner.example"))
    );
    assert_ne!(acme_id["fingerprint"], partner_id["fingerprint"], "two CAs");
    acme.peer_for(&partner, &partner_id, r#""catalog""#, r#""inventory*""#);
    partner.peer_for(&acme, &acme_id, r#""inventory*""#, r#""catalog""#);
    eventually("both sides see the peering up", WAIT, || async {
        acme.peering("hub-p") == "up" && partner.peering("hub-a") == "up"
    })
    .await;

    // Calls both ways, through both main relays, checked end to end by the pinned keys.
    let (inventory, catalog) = (acme.import("shop", "inventory"), partner.import("stock", "catalog"));
    let get = |addr| async move {
        let r = round_trip(addr, b"GET / HTTP/1.0\r\n\r\n").await.unwrap_or_default();
        String::from_utf8_lossy(&r).into_owned()
    };
    eventually("shop calls inventory at the partner's stock", WAIT, || async {
        get(inventory).await.contains(r#""node":"stock""#)
    })
    .await;
    eventually("stock calls catalog at acme's shop", WAIT, || async {
        get(catalog).await.contains(r#""node":"shop""#)
    })
    .await;
    // Each side's homes took the other's relay's ECH config, signed by the other's CA and
    // checked against the pinned key (protocol §5.7): raising `ech.percentage` seals to it.
    for (side, home) in [(&acme, "shop"), (&partner, "stock")] {
        let accepted = side.metric(home, "relayfed_proxy_ech_signed_configs_total", &[("result", "accepted")]).await;
        let invalid = side.metric(home, "relayfed_proxy_ech_signed_configs_total", &[("result", "invalid")]).await;
        let reg = side.admin_json(home, "/federation/registry").await;
        assert!(accepted >= 1.0 && invalid == 0.0, "{home}: accepted {accepted}, invalid {invalid}: {}", reg["mains"]);
    }
    // hr is not acme's to call: never propagated to acme, so the call fails.
    assert!(round_trip(acme.import("shop", "hr"), b"x").await.is_err());
    // The partner's relay learned catalog, and nothing of payroll.
    let registry = partner.admin_json("hub-p", "/federation/registry").await.to_string();
    assert!(registry.contains("catalog") && !registry.contains("payroll"), "{registry}");

    down([(&acme, a), (&partner, p)]).await;
}

/// Wall-clock time of day (UTC, seconds), to line failures up with the nodes' logs.
fn now() -> String {
    let t = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default();
    format!("{:02}:{:02}:{:06.3}", t.as_secs() / 3600 % 24, t.as_secs() / 60 % 60, t.as_secs_f64() % 60.0)
}

/// Calls `addr` at a steady pace until `stop`, counting answers from `expect` and failures.
async fn load(
    addr: std::net::SocketAddr,
    expect: &'static str,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    ok: std::sync::Arc<std::sync::atomic::AtomicU64>,
) -> Vec<String> {
    use std::sync::atomic::Ordering;
    // 20 calls a second: under the partners' rate limit (50/s), so every refusal is a fault.
    let mut pace = tokio::time::interval(Duration::from_millis(50));
    let mut failures = Vec::new();
    while !stop.load(Ordering::Relaxed) {
        pace.tick().await;
        match round_trip(addr, b"GET / HTTP/1.0\r\n\r\n").await {
            Ok(r) if String::from_utf8_lossy(&r).contains(&format!(r#""node":"{expect}""#)) => {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            Ok(r) => failures.push(format!("{} {addr}: {:?}", now(), String::from_utf8_lossy(&r))),
            Err(e) => failures.push(format!("{} {addr}: {e}", now())),
        }
    }
    failures
}

/// Whether every node of `side` runs the newest config it was given.
fn settled(side: &Side) -> bool {
    side.status()["nodes"]
        .as_array()
        .unwrap()
        .iter()
        .all(|n| n["state"] == "running" && n["ackedVersion"] == n["configVersion"])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_federation_rotates_its_ca_under_load_without_a_failed_call() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    let (acme, partner) = example_sides();
    // A second acme home calling shop: traffic inside the rotating federation too.
    let office = scenario::free_port("tcp");
    std::fs::write(
        acme.dir.join("manifests/40-office.yaml"),
        format!(
            "apiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: office, namespace: relayfed-system}}\n\
             spec:\n  type: home\n  nodeId: office\n  federation: acme\n  mainRelays: [{{nodeId: hub-a}}]\n  \
             imports:\n    - {{name: catalog, port: 80, listen: \"127.0.0.1:{office}\"}}\n"
        ),
    )
    .unwrap();
    let (a, _) = scenario::local_up(&bin(), &acme.dir, &[]).await;
    let (p, _) = scenario::local_up(&bin(), &partner.dir, &[]).await;
    let (acme_id, partner_id) =
        (local(&["identity", "--json"], &acme.state()), local(&["identity", "--json"], &partner.state()));
    let old = acme_id["fingerprint"].as_str().unwrap().to_owned();
    acme.peer_for(&partner, &partner_id, r#""catalog""#, r#""inventory*""#);
    partner.peer_for(&acme, &acme_id, r#""inventory*""#, r#""catalog""#);
    let routes = [
        (acme.import("shop", "inventory"), "stock"),
        (partner.import("stock", "catalog"), "shop"),
        (acme.import("office", "catalog"), "shop"),
    ];
    for (addr, node) in routes {
        eventually("calls cross before the rotation", WAIT, || async move {
            round_trip(addr, b"GET / HTTP/1.0\r\n\r\n").await.is_ok_and(|r| String::from_utf8_lossy(&r).contains(node))
        })
        .await;
    }

    let stop = Arc::new(AtomicBool::new(false));
    let ok: Vec<Arc<AtomicU64>> = routes.iter().map(|_| Arc::new(AtomicU64::new(0))).collect();
    let loads: Vec<_> = routes
        .iter()
        .zip(&ok)
        .map(|((addr, node), ok)| tokio::spawn(load(*addr, node, stop.clone(), ok.clone())))
        .collect();
    // Every route carries calls in every phase.
    let progressed = |ok: &[Arc<AtomicU64>]| {
        let before: Vec<u64> = ok.iter().map(|c| c.load(Ordering::Relaxed)).collect();
        let ok = ok.to_vec();
        move || {
            let ok = ok.clone();
            let before = before.clone();
            async move { ok.iter().zip(&before).all(|(c, b)| c.load(Ordering::Relaxed) >= b + 10) }
        }
    };
    let rotation = |field: &str| acme.status()["caRotation"][field].as_str().unwrap_or_default().to_owned();

    eprintln!("{} step 1: every node trusts both CAs", now());
    // 1. acme's nodes trust both CAs; the partner pins the next key.
    local(&["rotate-ca", "--stage-for", "1h", "--overlap", "1h"], &acme.state());
    eventually("every acme node trusts the new CA", WAIT, || async { rotation("waiting").contains("stageFor") }).await;
    eventually("calls go on while nodes trust both", WAIT, progressed(&ok)).await;
    let next = local(&["identity", "--json"], &acme.state());
    let new = next["nextFingerprint"].as_str().expect("identity shows the next CA key").to_owned();
    assert_eq!(next["fingerprint"], old.as_str(), "the old CA still issues");
    let generation = partner.status()["generation"].as_u64().unwrap();
    partner.peer_pinning(&acme, &acme_id, &[&old, &new], r#""inventory*""#, r#""catalog""#);
    eventually("the partner pins both keys", WAIT, || async {
        partner.status()["generation"].as_u64().unwrap() > generation && settled(&partner)
    })
    .await;

    eprintln!("{} step 2: the new CA issues", now());
    // 2. The new CA issues every certificate; both are trusted.
    local(&["rotate-ca", "--next"], &acme.state());
    eventually("every acme node presents a certificate of the new CA", WAIT, || async {
        rotation("phase") == "overlap" && rotation("waiting").contains("overlap")
    })
    .await;
    eventually("calls go on while new certificates meet old ones", WAIT, progressed(&ok)).await;
    let during = local(&["identity", "--json"], &acme.state());
    assert_eq!(
        (during["fingerprint"].as_str(), during["previousFingerprint"].as_str()),
        (Some(new.as_str()), Some(old.as_str()))
    );

    eprintln!("{} step 3: the old CA goes", now());
    // 3. The old CA is dropped; the partner unpins it.
    local(&["rotate-ca", "--next"], &acme.state());
    eventually("the rotation ends", WAIT, || async { acme.status()["caRotation"].is_null() }).await;
    eventually("every acme node trusts the new CA alone", WAIT, || async {
        acme.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["health"]["tls"]["roots"] == serde_json::json!([new]))
    })
    .await;
    let generation = partner.status()["generation"].as_u64().unwrap();
    partner.peer_pinning(&acme, &acme_id, &[&new], r#""inventory*""#, r#""catalog""#);
    eventually("the partner pins the new key alone", WAIT, || async {
        partner.status()["generation"].as_u64().unwrap() > generation && settled(&partner)
    })
    .await;
    eventually("calls go on after the rotation", WAIT, progressed(&ok)).await;

    eprintln!("{} load stops", now());
    stop.store(true, Ordering::Relaxed);
    let mut failures = Vec::new();
    for l in loads {
        failures.extend(l.await.unwrap());
    }
    let calls: u64 = ok.iter().map(|c| c.load(Ordering::Relaxed)).sum();
    eprintln!("CA rotation under load: {calls} calls succeeded, {} failed", failures.len());
    assert!(failures.is_empty(), "{} failed calls: {failures:?}", failures.len());

    // A node started now (new certificate, new CA only) joins and calls: new handshakes work.
    let office_pid = acme.status()["nodes"].as_array().unwrap().iter().find(|n| n["node"] == "office").unwrap()["pid"]
        .as_u64()
        .unwrap();
    let office = acme.import("office", "catalog");
    let _ = std::process::Command::new("kill").args(["-9", &office_pid.to_string()]).status();
    eventually("a restarted node calls with its new certificate", WAIT, || async {
        acme.status()["nodes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|n| n["node"] == "office" && n["pid"].as_u64() != Some(office_pid))
            && round_trip(office, b"GET / HTTP/1.0\r\n\r\n")
                .await
                .is_ok_and(|r| String::from_utf8_lossy(&r).contains("shop"))
    })
    .await;

    down([(&acme, a), (&partner, p)]).await;
}
