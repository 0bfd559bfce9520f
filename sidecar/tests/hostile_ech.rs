//! A dishonest first relay against ECH, as real processes on loopback: shop -> hub-a -> hub-b
//! -> pay, where hub-a's side of shop's connection is a relay holding hub-a's certificate and
//! key that attacks every stream (`common::mitm`). It forges retry configs, omits configs,
//! replaces config ids, re-seals routes and substitutes the destination's Noise key; each
//! attempt must leave it without a single inner route or payload byte, and every substitution
//! must fail the stream and be counted, never fall back to plain.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::mitm::{Attack, Mitm, Seen};
use common::{Proc, echo_server, eventually};
use relayfed_e2e::Testbed;
use relayfed_sidecar::config::{Snapshot, base64_decode};
use relayfed_sidecar::federation::ech_policy::{EchMode, EchPolicy};
use relayfed_sidecar::protocol::InnerRoute;

struct Net {
    _tb: Testbed,
    /// hub-a, hub-b.
    relays: Vec<Proc>,
    pay: Proc,
    shop: Proc,
    mitm: Mitm,
}

/// The route shop sends for a call to `echo:7` (what a relay could guess from the registry).
fn shop_route() -> InnerRoute {
    InnerRoute {
        dest_node: "pay".into(),
        dest_main: "hub-b".into(),
        service: "echo".into(),
        port: 7,
        origin: "shop@hub-a".into(),
    }
}

async fn net(attack: Attack, mode: EchMode) -> Net {
    net_at(attack, mode, 100).await
}

async fn net_at(attack: Attack, mode: EchMode, percentage: u8) -> Net {
    let crs =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../tests/scenarios/two-hubs.yaml")).unwrap();
    let tb = Testbed::new("hostile.test").unwrap();
    let echo = echo_server().await;
    let files = tb.scenario(&crs, |_, _, _| echo).unwrap();
    let mut relays = Vec::new();
    for (_, path, _) in &files.mains {
        relays.push(common::start("main-relay", path, &[]).await);
    }
    let hub_a = files.mains.iter().find(|(id, _, _)| id == "hub-a").unwrap();
    let hub_b_list = base64_decode(relays[1].ready["echConfigList"].as_str().unwrap()).unwrap();
    let path_of = |id: &str| files.homes.iter().find(|(h, _)| h == id).unwrap().1.clone();
    let pay = common::start("home", &path_of("pay"), &[]).await;
    let shop_path = path_of("shop");
    let mut shop_snap = Snapshot::load(&shop_path).unwrap();
    let attack = match attack {
        // The destination's real certificate: public, so a relay may well have it.
        Attack::SubstituteNoiseKey { route, .. } => {
            let pem = std::fs::read_to_string(tb.dir.join("pay.pem")).unwrap();
            let cert = relayfed_sidecar::crypto::ca::parse_cert_pem(&pem).unwrap().to_vec();
            Attack::SubstituteNoiseKey { route, cert }
        }
        other => other,
    };
    let mitm =
        Mitm::start(&Snapshot::load(&hub_a.1).unwrap(), &shop_snap, hub_a.2, "hub-b", Some(&hub_b_list), attack).await;
    shop_snap.main_relays[0].endpoint = mitm.addr;
    shop_snap.ech_policy = EchPolicy { enabled: true, mode, percentage, ..EchPolicy::default() };
    assert!(shop_snap.ech_configs.contains_key("hub-b"), "the plan gives homes every main relay's config");
    let shop = common::start("home", &tb.save("shop", &shop_snap).unwrap(), &[]).await;
    eventually("shop's view lists pay's echo", Duration::from_secs(15), || async {
        shop.json("/federation/registry").await["entries"].as_array().is_some_and(|e| !e.is_empty())
    })
    .await;
    Net { _tb: tb, relays, pay, shop, mitm }
}

/// Makes `n` calls from shop to pay's echo; returns how many echoed their payload.
async fn calls(net: &Net, n: usize) -> usize {
    common::echo_calls(net.shop.import("echo:7"), n).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_relay_that_forges_retry_configs_reads_no_route() {
    let net = net(Attack::ForgeRetryConfigs, EchMode::Required).await;
    // Before the fix: 10/10 calls succeeded and the relay read 10/10 inner routes.
    let ok = calls(&net, 10).await;
    assert_eq!(Seen::get(&net.mitm.seen.forged_retries), 1);
    assert_eq!(Seen::get(&net.mitm.seen.routes_read), 0, "the relay read an inner route");
    assert_eq!(ok, 9, "the forged stream fails closed; every later call is sealed to the real key");
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "retry_refused")]).await, 1.0);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "retried")]).await, 0.0);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "accepted")]).await, 9.0);
    assert_eq!(net.shop.metric("relayfed_proxy_stream_errors_total", &[("code", "ECH_UNKNOWN_CONFIG")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_relay_that_omits_configs_cannot_downgrade_opportunistic_ech() {
    let net = net(Attack::OmitConfigs, EchMode::Opportunistic).await;
    // Before the fix: the origin took hub-b's config from the view, found none, sent plain.
    assert_eq!(calls(&net, 5).await, 5);
    assert_eq!(Seen::get(&net.mitm.seen.routes_read), 0, "the relay read an inner route");
    assert_eq!(Seen::get(&net.mitm.seen.sealed_unread), 5);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "fallback")]).await, 0.0);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "accepted")]).await, 5.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replaced_config_id_fails_closed_without_trusting_the_retry_configs() {
    let net = net(Attack::ReplaceConfigId, EchMode::Required).await;
    assert_eq!(calls(&net, 3).await, 0);
    assert_eq!(Seen::get(&net.mitm.seen.routes_read), 0);
    assert_eq!(Seen::get(&net.mitm.seen.rewritten), 3);
    // hub-b does not know the id and answers with its real configs; they arrive through the
    // dishonest relay, so the origin does not act on them. (On a heavily loaded machine a
    // stream may fail before hub-b answers it, so the counts are bounded, not exact.)
    let sent = net.relays[1].metric("relayfed_relay_ech_streams_total", &[("outcome", "retry_sent")]).await;
    let refused = net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "retry_refused")]).await;
    assert!(sent >= 1.0, "hub-b answered no stream with retry configs");
    assert!((1.0..=3.0).contains(&refused), "{refused} retry configs refused of {sent} sent");
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "retried")]).await, 0.0);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "fallback")]).await, 0.0);
    assert_eq!(net.pay.metric("relayfed_proxy_e2e_handshakes_total", &[("result", "ok")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_resealed_route_fails_the_end_to_end_handshake() {
    // The relay seals the very route shop sends, to hub-b's real key, in place of shop's: all
    // it lacks is shop's encapsulation, which the prologue binds.
    let net = net(Attack::Reseal(shop_route()), EchMode::Required).await;
    // Before the fix (prologue without the ECH key and encapsulation): 3/3 calls succeeded.
    assert_eq!(calls(&net, 3).await, 0);
    assert_eq!(Seen::get(&net.mitm.seen.rewritten), 3);
    assert_eq!(net.pay.metric("relayfed_proxy_e2e_handshakes_total", &[("result", "failed")]).await, 3.0);
    assert_eq!(net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "downgrade")]).await, 3.0);
    assert_eq!(net.shop.metric("relayfed_proxy_stream_errors_total", &[("code", "HANDSHAKE_FAILED")]).await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_first_relay_that_substitutes_the_destinations_noise_key_reads_no_payload() {
    // The relay puts its own Noise key for pay in shop's view and answers as pay. It cannot
    // open the sealed route, but it guesses it and knows every field of the prologue; what it
    // lacks is a certificate binding its key to pay, so it shows pay's real one.
    let net = net(Attack::SubstituteNoiseKey { route: shop_route(), cert: vec![] }, EchMode::Required).await;
    // Before the fix (no certificate in message 2): 3/3 handshakes with the relay completed.
    assert_eq!(calls(&net, 3).await, 0);
    assert_eq!(Seen::get(&net.mitm.seen.payload_read), 0, "the relay decrypted a payload");
    assert_eq!(Seen::get(&net.mitm.seen.handshakes), 0, "shop finished a handshake with the relay");
    assert_eq!(net.shop.metric("relayfed_proxy_e2e_handshakes_total", &[("result", "key_unverified")]).await, 3.0);
    assert_eq!(net.shop.metric("relayfed_proxy_stream_errors_total", &[("code", "HANDSHAKE_FAILED")]).await, 3.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_plain_stream_carries_grease_as_long_as_a_sealed_header_and_is_delivered() {
    // The same call, once outside the ECH cohort (0%) and once in it (100%): what the first
    // relay receives is as long either way, and the greased stream is delivered.
    let mut lengths = Vec::new();
    for (percentage, kind) in [(0, "grease"), (100, "sealed")] {
        let net = net_at(Attack::Observe, EchMode::Opportunistic, percentage).await;
        assert_eq!(calls(&net, 5).await, 5, "{kind}: every call is served");
        let routes = net.mitm.seen.routes.lock().unwrap().clone();
        assert_eq!(routes.len(), 5, "{routes:?}");
        assert!(routes.iter().all(|(k, _)| *k == kind), "{routes:?}");
        lengths.extend(routes.iter().map(|(_, l)| *l));
        let grease = net.shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "grease")]).await;
        assert_eq!(grease, if kind == "grease" { 5.0 } else { 0.0 });
    }
    assert!(lengths.windows(2).all(|w| w[0] == w[1]), "first frames differ in length: {lengths:?}");
}
