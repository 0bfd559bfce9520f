//! Direct paths on loopback (no NAT): with `directPaths` on, a home that calls another home
//! of its relay gets a direct connection and the relay stops carrying the bytes; with it off
//! (the default) every byte goes through the relay and nothing is punched. The NAT cases are
//! in `nat_matrix.rs`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::time::Duration;

use common::{Proc, eventually, identify_server, round_trip, sample};
use relayfed_e2e::Testbed;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

fn crs(direct: bool) -> String {
    crs_with(direct, "{timeouts: {linkIdle: 1500ms}}")
}

fn crs_with(direct: bool, resilience: &str) -> String {
    format!(
        "apiVersion: relayfed.io/v1alpha1\nkind: RelayFederation\nmetadata: {{name: d, namespace: test}}\n\
         spec: {{trustDomain: direct.test, publicName: relay.direct.test, defaultRolloutPolicy: default, \
         mainRelays: [{{nodeId: hub, endpoint: \"127.0.0.1:0\"}}]}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {{name: default, namespace: test}}\n\
         spec:\n  ech: {{enabled: true, mode: opportunistic, percentage: 100}}\n  resilience: {resilience}\n{}\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: hub, namespace: test}}\nspec: {{type: main, nodeId: hub, federation: d}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: shop, namespace: test}}\n\
         spec: {{type: home, nodeId: shop, federation: d, mainRelays: [{{nodeId: hub}}], imports: [{{name: pay, port: 80, listen: \"127.0.0.1:0\"}}]}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: pay, namespace: test}}\n\
         spec: {{type: home, nodeId: pay, federation: d, mainRelays: [{{nodeId: hub}}], exports: [{{name: pay, port: 80, target: \"127.0.0.1:1\"}}]}}\n",
        if direct { "  directPaths: {enabled: true}\n" } else { "" }
    )
}

async fn start(direct: bool) -> (Proc, Proc, Proc) {
    start_from(&crs(direct)).await
}

async fn start_from(crs: &str) -> (Proc, Proc, Proc) {
    let tb = Testbed::new("direct.test").unwrap();
    let target = identify_server("pay").await;
    let files = tb.scenario(crs, |_, _, _| target).unwrap();
    let hub = common::start("main-relay", &files.mains[0].1, &[]).await;
    let home = |id: &str| files.homes.iter().find(|(h, _)| h == id).unwrap().1.clone();
    let pay = common::start("home", &home("pay"), &[]).await;
    let shop = common::start("home", &home("shop"), &[]).await;
    (hub, pay, shop)
}

async fn call(shop: &Proc) -> bool {
    round_trip(shop.import("pay:80"), b"hello").await.is_ok_and(|r| r.ends_with(b"hello"))
}

/// The path `home` shows to `peer` in `/federation/peers`.
async fn path_to(home: &Proc, peer: &str) -> Option<String> {
    let peers: Value = home.json("/federation/peers").await;
    peers.as_array()?.iter().find(|p| p["kind"] == "home" && p["node"] == peer)?["path"].as_str().map(str::to_owned)
}

async fn relayed_bytes(hub: &Proc) -> f64 {
    sample(&hub.metrics().await, "relayfed_relay_payload_bytes_total", &[])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_called_home_is_reached_directly_and_the_relay_stops_carrying_bytes() {
    let (hub, pay, shop) = start(true).await;
    eventually("the first call goes through", WAIT, || call(&shop)).await;
    // The call asked for a direct path; later calls use it.
    eventually("shop has a direct path to pay", WAIT, || async {
        call(&shop).await && path_to(&shop, "pay").await.as_deref() == Some("direct")
    })
    .await;
    assert_eq!(path_to(&pay, "shop").await.as_deref(), Some("direct"), "both ends hold the path");
    let before = relayed_bytes(&hub).await;
    for _ in 0..20 {
        assert!(call(&shop).await, "every call on the direct path succeeds");
    }
    assert_eq!(relayed_bytes(&hub).await, before, "no payload byte went through the relay");
    let m = shop.metrics().await;
    assert_eq!(sample(&m, "relayfed_proxy_paths", &[("kind", "direct")]), 1.0);
    assert_eq!(sample(&m, "relayfed_proxy_punches_total", &[("result", "direct")]), 1.0);
    assert_eq!(sample(&hub.metrics().await, "relayfed_relay_punches_total", &[("result", "coordinated")]), 1.0);
    // The destination app still sees calls from shop (the route names it, the Noise session
    // authenticates it); the direct stream carried no ECH (nothing in the middle).
    let pm = pay.metrics().await;
    assert!(sample(&pm, "relayfed_proxy_calls_total", &[("side", "destination"), ("code", "OK")]) >= 20.0);

    // The destination goes away: calls fail over nothing (there is no other instance), but
    // the direct path is dropped, and shop is relayed again.
    drop(pay);
    eventually("shop sees the direct path lost", WAIT, || async {
        path_to(&shop, "pay").await.as_deref() != Some("direct")
    })
    .await;
    drop(hub);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_direct_paths_off_every_byte_goes_through_the_relay() {
    let (hub, _pay, shop) = start(false).await;
    eventually("the first call goes through", WAIT, || call(&shop)).await;
    let before = relayed_bytes(&hub).await;
    for _ in 0..5 {
        assert!(call(&shop).await);
    }
    assert!(relayed_bytes(&hub).await > before, "the relay carried the calls");
    assert_eq!(path_to(&shop, "pay").await, None, "no path was attempted");
    let m = hub.metrics().await;
    assert_eq!(sample(&m, "relayfed_relay_punches_total", &[("result", "coordinated")]), 0.0);
    assert_eq!(sample(&m, "relayfed_relay_direct_parties", &[]), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_called_home_applies_the_relays_rate_limit_to_direct_streams() {
    let resilience = "{timeouts: {linkIdle: 1500ms}, rateLimit: {streamsPerSecond: 1, burst: 3}}";
    let (hub, pay, shop) = start_from(&crs_with(true, resilience)).await;
    eventually("shop has a direct path to pay", WAIT, || async {
        call(&shop).await && path_to(&shop, "pay").await.as_deref() == Some("direct")
    })
    .await;
    let relayed = sample(&hub.metrics().await, "relayfed_relay_rate_limited_streams_total", &[("sender_kind", "home")]);
    let before = sample(&pay.metrics().await, "relayfed_proxy_stream_errors_total", &[("code", "RATE_LIMITED")]);
    // Far more calls at once than the bucket holds: pay refuses the excess itself.
    let addr = shop.import("pay:80");
    let handles: Vec<_> = (0..10)
        .map(|_| tokio::spawn(async move { round_trip(addr, b"hello").await.is_ok_and(|r| r.ends_with(b"hello")) }))
        .collect();
    let mut ok = 0;
    for h in handles {
        ok += usize::from(h.await.unwrap());
    }
    assert!(ok < 10, "some calls were refused ({ok} of 10 went through)");
    let after = sample(&pay.metrics().await, "relayfed_proxy_stream_errors_total", &[("code", "RATE_LIMITED")]);
    assert!(after > before, "pay counted RATE_LIMITED refusals");
    let relayed_after =
        sample(&hub.metrics().await, "relayfed_relay_rate_limited_streams_total", &[("sender_kind", "home")]);
    assert_eq!(relayed_after, relayed, "the relay saw none of these streams");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn homes_of_two_relays_are_reached_directly_through_a_forwarded_punch() {
    let crs = "apiVersion: relayfed.io/v1alpha1\nkind: RelayFederation\nmetadata: {name: d, namespace: test}\n\
         spec: {trustDomain: direct.test, publicName: relay.direct.test, defaultRolloutPolicy: default, \
         mainRelays: [{nodeId: hub-a, endpoint: \"127.0.0.1:0\"}, {nodeId: hub-b, endpoint: \"127.0.0.1:0\"}]}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {name: default, namespace: test}\n\
         spec:\n  resilience: {timeouts: {linkIdle: 1500ms}}\n  directPaths: {enabled: true}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: hub-a, namespace: test}\nspec: {type: main, nodeId: hub-a, federation: d}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: hub-b, namespace: test}\nspec: {type: main, nodeId: hub-b, federation: d}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: shop, namespace: test}\n\
         spec: {type: home, nodeId: shop, federation: d, mainRelays: [{nodeId: hub-a}], imports: [{name: pay, port: 80, listen: \"127.0.0.1:0\"}]}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: pay, namespace: test}\n\
         spec: {type: home, nodeId: pay, federation: d, mainRelays: [{nodeId: hub-b}], exports: [{name: pay, port: 80, target: \"127.0.0.1:1\"}]}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: hr, namespace: test}\n\
         spec: {type: home, nodeId: hr, federation: d, mainRelays: [{nodeId: hub-a}, {nodeId: hub-b, priority: 1}], imports: [{name: pay, port: 80, listen: \"127.0.0.1:0\"}]}\n";
    let tb = Testbed::new("direct.test").unwrap();
    let target = identify_server("pay").await;
    let files = tb.scenario(crs, |_, _, _| target).unwrap();
    let main = |id: &str| files.mains.iter().find(|(m, _, _)| m == id).unwrap().1.clone();
    let hub_a = common::start("main-relay", &main("hub-a"), &[]).await;
    let hub_b = common::start("main-relay", &main("hub-b"), &[]).await;
    let home = |id: &str| files.homes.iter().find(|(h, _)| h == id).unwrap().1.clone();
    let pay = common::start("home", &home("pay"), &[]).await;
    let shop = common::start("home", &home("shop"), &[]).await;
    eventually("shop has a direct path to pay, a home of another relay", WAIT, || async {
        call(&shop).await && path_to(&shop, "pay").await.as_deref() == Some("direct")
    })
    .await;
    assert_eq!(path_to(&pay, "shop").await.as_deref(), Some("direct"));
    // hr lists both relays: both see its socket at one address (no NAT on loopback).
    let hr = common::start("home", &home("hr"), &[]).await;
    eventually("hr knows its NAT's mapping", WAIT, || async {
        hr.json("/federation/health").await["natMapping"] == "endpoint_independent"
    })
    .await;
    assert_eq!(shop.json("/federation/health").await["natMapping"], "unknown", "one relay tells nothing");
    // hub-a forwarded shop's request; hub-b punched pay and answered.
    assert_eq!(sample(&hub_a.metrics().await, "relayfed_relay_punches_total", &[("result", "forwarded")]), 1.0);
    assert_eq!(sample(&hub_b.metrics().await, "relayfed_relay_punches_total", &[("result", "coordinated")]), 1.0);
    let before = (relayed_bytes(&hub_a).await, relayed_bytes(&hub_b).await);
    for _ in 0..10 {
        assert!(call(&shop).await);
    }
    assert_eq!((relayed_bytes(&hub_a).await, relayed_bytes(&hub_b).await), before, "neither relay carried the calls");
}
