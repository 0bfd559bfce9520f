//! ECH to a main relay of another cluster (docs/protocol.md §5.7), as real processes on
//! loopback: shop -> hub-a -> hub-b -> pay, where shop's snapshot holds no config for hub-b
//! (another cluster's operator publishes it) and hub-b announces its CA-signed config to hub-a,
//! which passes it on in views. Between shop and hub-a sits a relay with hub-a's certificate
//! and key (`common::mitm`). Honest, the route is sealed to hub-b and the relay reads none;
//! when the relay substitutes a config of its choosing, the home refuses it (no CA signature
//! for hub-b), and required ECH fails closed instead of sending a route the relay can read.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::mitm::{Attack, Mitm, Seen};
use common::{Proc, echo_server, eventually};
use relayfed_e2e::Testbed;
use relayfed_sidecar::config::{SignedEchConfig, Snapshot, base64_decode, base64_encode};
use relayfed_sidecar::federation::ech_policy::{EchMode, EchPolicy};

struct Net {
    _tb: Testbed,
    _relays: Vec<Proc>,
    _pay: Proc,
    shop: Proc,
    mitm: Mitm,
}

/// The federation CA's signature for `main` over `list` (base64 in, base64 out).
fn sign(tb: &Testbed, main: &str, list: &str) -> String {
    base64_encode(&tb.ca.sign_ech_config(main, &base64_decode(list).unwrap()).unwrap())
}

/// The net with `attack` from the relay between shop and hub-a, once shop's view lists pay
/// and hub-b's signed config.
async fn net(attack: impl FnOnce(&Testbed, &Snapshot) -> Attack) -> Net {
    let crs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/scenarios/two-hubs.yaml")).unwrap();
    let tb = Testbed::new("hostile.test").unwrap();
    let echo = echo_server().await;
    let files = tb.scenario(&crs, |_, _, _| echo).unwrap();
    let path_of = |id: &str| files.homes.iter().find(|(h, _)| h == id).unwrap().1.clone();
    let mut shop_snap = Snapshot::load(&path_of("shop")).unwrap();
    // hub-b is another cluster's relay: shop's operator has no config of it; hub-b's own
    // operator signed the one hub-b announces.
    let hub_b_list = shop_snap.ech_configs.remove("hub-b").unwrap();
    let mut relays = Vec::new();
    for (id, path, _) in &files.mains {
        let mut snap = Snapshot::load(path).unwrap();
        if id == "hub-b" {
            snap.ech_announcement = Some(SignedEchConfig {
                ech_config_list: hub_b_list.clone(),
                signature: sign(&tb, "hub-b", &hub_b_list),
            });
        }
        relays.push(common::start("main-relay", &tb.save(id, &snap).unwrap(), &[]).await);
    }
    let hub_a = files.mains.iter().find(|(id, _, _)| id == "hub-a").unwrap();
    let pay = common::start("home", &path_of("pay"), &[]).await;
    let attack = attack(&tb, &shop_snap);
    let raw = base64_decode(&hub_b_list).unwrap();
    let mitm = Mitm::start(&Snapshot::load(&hub_a.1).unwrap(), &shop_snap, hub_a.2, "hub-b", Some(&raw), attack).await;
    shop_snap.main_relays[0].endpoint = mitm.addr;
    shop_snap.ech_policy =
        EchPolicy { enabled: true, mode: EchMode::Required, percentage: 100, ..EchPolicy::default() };
    let shop = common::start("home", &tb.save("shop", &shop_snap).unwrap(), &[]).await;
    eventually("shop's view lists pay's echo and hub-b's config", Duration::from_secs(15), || async {
        let reg = shop.json("/federation/registry").await;
        reg["entries"].as_array().is_some_and(|e| !e.is_empty()) && reg["mains"]["hub-b"]["echSignature"].is_string()
    })
    .await;
    Net { _tb: tb, _relays: relays, _pay: pay, shop, mitm }
}

/// Makes `n` calls from shop to pay's echo; returns how many echoed their payload.
async fn calls(net: &Net, n: usize) -> usize {
    common::echo_calls(net.shop.import("echo:7"), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_seals_to_another_clusters_relay_by_its_ca_signed_config() {
    let net = net(|_, _| Attack::Observe).await;
    assert_eq!(calls(&net, 5).await, 5);
    assert_eq!(Seen::get(&net.mitm.seen.routes_read), 0, "the first relay read an inner route");
    assert_eq!(Seen::get(&net.mitm.seen.sealed_unread), 5);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_signed_configs_total", &[("result", "accepted")]).await, 1.0);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "accepted")]).await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_cannot_substitute_another_relays_signed_config() {
    // The relay shows hub-a's real config under hub-b's name, with hub-a's real signature: the
    // only signed config it could have whose key it might hold.
    let net = net(|tb, shop| {
        let list = shop.ech_configs["hub-a"].clone();
        Attack::SubstituteSignedConfig { main: "hub-b".into(), signature: sign(tb, "hub-a", &list), list }
    })
    .await;
    assert_eq!(calls(&net, 3).await, 0, "required ECH without a trusted config fails closed");
    assert_eq!(Seen::get(&net.mitm.seen.routes_read), 0, "the first relay read an inner route");
    assert!(net.shop.metric("relayfed_proxy_ech_signed_configs_total", &[("result", "invalid")]).await >= 1.0);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_signed_configs_total", &[("result", "accepted")]).await, 0.0);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "accepted")]).await, 0.0);
}
