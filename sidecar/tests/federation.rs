//! Three main relays and six home nodes as real processes on loopback, from the scenario in
//! tests/scenarios/federation.yaml: registration, registry propagation, local (2-hop) and
//! cross-federation (3-hop) calls, SERVICE_NOT_FOUND, load balancing, prompt deregistration,
//! TTL expiry after a relay crash, failover and recovery, and the path-trace probe.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::collections::HashMap;
use std::time::Duration;

use common::{Proc, eventually, identify_server, round_trip};
use relayfed_e2e::Testbed;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 7 % 251) as u8).collect()
}

/// Calls `service:port` through `home`'s import listener; returns (instance, payload echoed).
async fn call(home: &Proc, import: &str, payload: &[u8]) -> std::io::Result<(String, Vec<u8>)> {
    let reply = round_trip(home.import(import), payload).await?;
    let bar = reply.iter().position(|&b| b == b'|').ok_or_else(|| std::io::Error::other("no answer"))?;
    Ok((String::from_utf8_lossy(&reply[..bar]).into_owned(), reply[bar + 1..].to_vec()))
}

fn nodes_in(registry: &Value) -> Vec<String> {
    let mut v: Vec<String> = registry["local"]
        .as_array()
        .unwrap()
        .iter()
        .chain(registry["federated"].as_array().unwrap().iter().map(|f| &f["entry"]))
        .map(|e| format!("{}/{}", e["node"].as_str().unwrap(), e["service"].as_str().unwrap()))
        .collect();
    v.sort();
    v
}

async fn registry_of(p: &Proc) -> Vec<String> {
    nodes_in(&p.json("/federation/registry").await)
}

/// The `attached` stamp of `node`'s `service` entry in a home's view.
async fn attached_in_view(p: &Proc, node: &str, service: &str) -> Option<u64> {
    p.json("/federation/registry").await["entries"]
        .as_array()?
        .iter()
        .find(|e| e["node"] == node && e["service"] == service)
        .and_then(|e| e["attached"].as_u64())
}

async fn view_of(p: &Proc) -> Vec<String> {
    let mut v: Vec<String> = p.json("/federation/registry").await["entries"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| format!("{}/{}", e["node"].as_str().unwrap(), e["service"].as_str().unwrap()))
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_mains_six_homes() {
    let text = std::fs::read_to_string(
        std::path::Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo"))
            .join("../tests/scenarios/federation.yaml"),
    )
    .unwrap();
    let tb = Testbed::new("scenario.test").unwrap();
    let scenario = tb.compile(&text).unwrap();
    let (exports, imports) = (scenario.exports(), scenario.imports());
    let mut targets = HashMap::new();
    for (home, svc, port) in &exports {
        targets.insert((home.clone(), svc.clone(), *port), identify_server(home).await);
    }
    let files = scenario.write(&tb, |h, s, p| targets[&(h.to_owned(), s.to_owned(), p)]).unwrap();
    let mut mains: HashMap<String, Proc> = HashMap::new();
    for (id, path, _) in &files.mains {
        mains.insert(id.clone(), common::start("main-relay", path, &[]).await);
    }
    let mut homes: HashMap<String, Proc> = HashMap::new();
    for (id, path) in &files.homes {
        homes.insert(id.clone(), common::start("home", path, &[]).await);
    }
    let all: Vec<String> = {
        let mut v: Vec<String> = exports.iter().map(|(home, svc, _)| format!("{home}/{svc}")).collect();
        v.sort();
        v
    };

    // Every main relay holds every instance: its own as local, the others as federated.
    for (id, m) in &mains {
        eventually(&format!("{id} knows every instance"), WAIT, || async { registry_of(m).await == all }).await;
        let reg = m.json("/federation/registry").await;
        for e in reg["local"].as_array().unwrap() {
            assert_eq!(e["main"], id.as_str(), "local entries are this relay's");
        }
        for f in reg["federated"].as_array().unwrap() {
            assert_ne!(f["entry"]["main"], id.as_str());
            assert!(f["ttlSeconds"].as_f64().unwrap() > 0.0);
        }
        let health = m.json("/federation/health").await;
        assert_eq!(health["connectedPeers"], 2, "{id}: {health}");
    }
    // Each home's view holds exactly the instances of the services it imports.
    let importers: std::collections::BTreeSet<&String> = imports.iter().map(|(home, _, _)| home).collect();
    for home in importers {
        let wanted: Vec<&String> = imports.iter().filter(|(h, _, _)| h == home).map(|(_, svc, _)| svc).collect();
        let expected: Vec<String> =
            all.iter().filter(|e| wanted.iter().any(|w| e.ends_with(&format!("/{w}")))).cloned().collect();
        eventually(&format!("{home}'s view is complete"), WAIT, || async { view_of(&homes[home]).await == expected })
            .await;
    }

    // Local call (home -> main -> home): a2 prefers a1 on its own relay.
    let big = pattern(256 * 1024);
    let (who, echoed) = call(&homes["a2"], "echo:7", &big).await.unwrap();
    assert_eq!((who.as_str(), echoed == big), ("a1", true));
    let trace = homes["a2"].json("/federation/trace?service=echo&port=7").await;
    assert_eq!(trace["relayHops"], 1, "{trace}");
    assert_eq!(
        trace["hops"].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap()).collect::<Vec<_>>(),
        ["a2", "hub-a", "a1"]
    );

    // Cross-federation call (home -> main -> main -> home), with the hops in the trace.
    let (who, echoed) = call(&homes["c1"], "only-b:9", &big).await.unwrap();
    assert_eq!((who.as_str(), echoed == big), ("b1", true));
    let trace = homes["c1"].json("/federation/trace?service=only-b&port=9").await;
    assert_eq!(
        trace["hops"].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap()).collect::<Vec<_>>(),
        ["c1", "hub-c", "hub-b", "b1"],
        "{trace}"
    );

    // The call metrics name both ends' main relays (cross-cluster SLOs), at both homes.
    let pair = [("service", "only-b"), ("source_main", "hub-c"), ("destination_main", "hub-b"), ("ech", "false")];
    let ok = [&pair[..], &[("code", "OK")]].concat();
    eventually("c1 and b1 count the call", WAIT, || async {
        homes["c1"].metric("relayfed_proxy_calls_total", &[&ok[..], &[("side", "origin")]].concat()).await == 1.0
            && homes["b1"].metric("relayfed_proxy_calls_total", &[&ok[..], &[("side", "destination")]].concat()).await
                == 1.0
    })
    .await;
    let setup = [("service", "only-b"), ("destination_main", "hub-b")];
    assert_eq!(homes["c1"].metric("relayfed_proxy_call_setup_duration_seconds_count", &setup).await, 1.0);
    // Each main relay measures the round trip to its peers (set at every health ping).
    eventually("hub-c reports its RTT to hub-b", WAIT, || async {
        mains["hub-c"].metric("relayfed_relay_peer_rtt_seconds", &[("peer", "hub-b")]).await > 0.0
    })
    .await;

    // A service nobody exports.
    assert!(call(&homes["a2"], "missing:1", b"x").await.is_err());
    assert_eq!(homes["a2"].metric("relayfed_proxy_stream_errors_total", &[("code", "SERVICE_NOT_FOUND")]).await, 1.0);
    let missing =
        [("service", "missing"), ("source_main", "hub-a"), ("destination_main", "none"), ("code", "SERVICE_NOT_FOUND")];
    assert_eq!(homes["a2"].metric("relayfed_proxy_calls_total", &missing).await, 1.0);

    // Round robin across b1 and b2 for `spread` (configured for c1).
    let mut spread = HashMap::new();
    for i in 0..20u32 {
        let (who, echoed) = call(&homes["c1"], "spread:5", &i.to_be_bytes()).await.unwrap();
        assert_eq!(echoed, i.to_be_bytes());
        *spread.entry(who).or_insert(0) += 1;
    }
    assert_eq!(spread, HashMap::from([("b1".to_owned(), 10), ("b2".to_owned(), 10)]));

    // A clean stop removes a home's entries everywhere, promptly (well before the TTL).
    homes.get_mut("c2").unwrap().signal("TERM").await;
    for (id, m) in &mains {
        eventually(&format!("{id} forgets c2"), Duration::from_secs(2), || async {
            !registry_of(m).await.iter().any(|e| e.starts_with("c2/"))
        })
        .await;
    }

    // A killed instance stops receiving calls once its relay notices (QUIC idle timeout).
    homes.get_mut("b2").unwrap().signal("KILL").await;
    eventually("c1 stops seeing b2", WAIT, || async {
        !view_of(&homes["c1"]).await.iter().any(|e| e.starts_with("b2/"))
    })
    .await;
    for i in 0..6u32 {
        assert_eq!(call(&homes["c1"], "spread:5", &i.to_be_bytes()).await.unwrap().0, "b1");
    }

    // A main relay crash: its home fails over to the next main, calls resume; the relay
    // comes back and its own home reconnects to it.
    let a1_before = attached_in_view(&homes["c1"], "a1", "echo").await;
    assert!(a1_before.is_some_and(|a| a > 0), "a1's entry carries its attach stamp");
    mains.get_mut("hub-a").unwrap().signal("KILL").await;
    eventually("a2 fails over to hub-b", WAIT, || async {
        homes["a2"].json("/federation/health").await["mainRelay"] == "hub-b"
    })
    .await;
    assert_eq!(
        call(&homes["a2"], "only-b:9", b"after failover").await.unwrap(),
        ("b1".to_owned(), b"after failover".to_vec())
    );
    let a_path = &files.mains.iter().find(|(id, _, _)| id == "hub-a").unwrap().1;
    mains.insert("hub-a".into(), common::start("main-relay", a_path, &[]).await);
    // Back means registered again with hub-a's new life: a newer attach stamp (the entry
    // c1 had may survive until hub-c sees hub-a's restart).
    eventually("a1 is back in c1's view", WAIT, || async {
        attached_in_view(&homes["c1"], "a1", "echo").await > a1_before
    })
    .await;
    assert_eq!(call(&homes["c1"], "echo:7", b"resumed").await.unwrap(), ("a1".to_owned(), b"resumed".to_vec()));
    assert!(homes["a1"].metric("relayfed_proxy_uplink_reconnects_total", &[]).await >= 1.0);

    // A crashed relay's homes are withdrawn from every view as soon as its peers see the
    // link die; their entries stay at the peers, unroutable, until their TTL runs out.
    mains.get_mut("hub-b").unwrap().signal("KILL").await;
    let b_entries = |v: Vec<String>| v.iter().filter(|e| e.starts_with("b1/")).count();
    assert_eq!(b_entries(registry_of(&mains["hub-c"]).await), 2, "entries survive a crash until the TTL");
    eventually("c1's view drops b1 once hub-c sees hub-b gone", WAIT, || async {
        b_entries(view_of(&homes["c1"]).await) == 0
    })
    .await;
    assert_eq!(b_entries(registry_of(&mains["hub-c"]).await), 2, "withdrawn, not forgotten");
    for id in ["hub-a", "hub-c"] {
        eventually(&format!("{id} expires hub-b's entries"), WAIT, || async {
            b_entries(registry_of(&mains[id]).await) == 0
        })
        .await;
    }
    assert!(mains["hub-c"].metric("relayfed_relay_registry_propagation_total", &[("event", "expired")]).await >= 2.0);
}
