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
        let dir = std::env::temp_dir().join(format!("relayfed-partners-{name}-{}", std::process::id()));
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
        let template = std::fs::read_to_string(repo().join("examples/partners/peer.yaml.template")).unwrap();
        let peer = template
            .replace("${NAME}", other.relay)
            .replace("${NODE}", other.relay)
            .replace("${LOCAL}", self.relay)
            .replace("${DOMAIN}", other_identity["trustDomain"].as_str().unwrap())
            .replace("${ENDPOINT}", &format!("127.0.0.1:{}", other.quic))
            .replace("${FINGERPRINT}", other_identity["fingerprint"].as_str().unwrap())
            .replace("${CALL}", call)
            .replace("${EXPORT}", export);
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

    /// The loopback address of `home`'s import of `service`.
    fn import(&self, home: &str, service: &str) -> std::net::SocketAddr {
        let status = self.status();
        let node = status["nodes"].as_array().unwrap().iter().find(|n| n["node"] == home).cloned().unwrap();
        let imp = node["imports"].as_array().unwrap().iter().find(|i| i["service"] == service).cloned().unwrap();
        imp["listen"].as_str().unwrap().parse().unwrap()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_organisations_federate_by_pinned_keys_from_two_directories_of_yaml() {
    let ports =
        |q: u16, t: &[u16]| std::iter::once((q, "udp")).chain(t.iter().map(|p| (*p, "tcp"))).collect::<Vec<_>>();
    let (acme, _) = Side::new("acme", "hub-a", &ports(7411, &[18411, 18412, 18413, 18414]));
    let (partner, _) = Side::new("partner", "hub-p", &ports(7421, &[18421, 18422, 18423]));
    let (mut a, _) = scenario::local_up(&bin(), &acme.dir, &[]).await;
    let (mut p, _) = scenario::local_up(&bin(), &partner.dir, &[]).await;

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
    // hr is not acme's to call: never propagated to acme, so the call fails.
    assert!(round_trip(acme.import("shop", "hr"), b"x").await.is_err());
    // The partner's relay learned catalog, and nothing of payroll.
    let registry = partner.admin_json("hub-p", "/federation/registry").await.to_string();
    assert!(registry.contains("catalog") && !registry.contains("payroll"), "{registry}");

    local(&["down"], &acme.state());
    local(&["down"], &partner.state());
    let _ = a.wait().await;
    let _ = p.wait().await;
    let _ = std::fs::remove_dir_all(&acme.dir);
    let _ = std::fs::remove_dir_all(&partner.dir);
}
