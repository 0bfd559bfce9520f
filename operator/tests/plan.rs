//! The plan compiles the example federation into valid per-node snapshots, and names the
//! object and field of every combination it cannot compile.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

use relayfed_crds::{AnyResource, parse_documents};
use relayfed_operator::plan::{KeyLayout, Placement, compile};
use relayfed_sidecar::config::{Role, TrustLevel};

fn examples() -> Vec<AnyResource> {
    let dir = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../examples/federation");
    let mut files: Vec<PathBuf> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    files
        .iter()
        .flat_map(|f| parse_documents(&f.display().to_string(), &std::fs::read_to_string(f).unwrap()).unwrap())
        .collect()
}

fn keys() -> KeyLayout {
    KeyLayout { dir: PathBuf::from("/var/lib/relayfed/keys") }
}

fn yaml(text: &str) -> Vec<AnyResource> {
    parse_documents("inline.yaml", text).unwrap()
}

#[test]
fn the_example_federation_compiles_into_one_valid_snapshot_per_relay() {
    let plan = compile(&examples(), &Placement::offline(keys(), 7)).unwrap();
    assert_eq!(plan.snapshots.keys().collect::<Vec<_>>(), ["hub-eu", "hub-us", "pay-us", "shop-eu", "web-eu"]);
    let hub = &plan.snapshots["hub-eu"];
    assert_eq!(hub.node.role, Role::Main);
    assert_eq!(hub.listen, Some("127.0.0.1:7401".parse().unwrap()));
    assert_eq!(hub.version, 7);
    assert_eq!(hub.registry.ttl_seconds, 600);
    assert_eq!(hub.ech.as_ref().unwrap().grace_seconds, 3600);
    // The other hub is a trusted peer; the partner (another trust domain) is recognised by
    // its pinned CA key; the blocked legacy hub keeps its DNS name (looked up at each dial).
    assert_eq!(
        hub.peers.iter().map(|p| (p.node_id.as_str(), p.trust_level)).collect::<Vec<_>>(),
        [("hub-us", TrustLevel::Trusted), ("legacy-hub", TrustLevel::Blocked), ("partner-hub", TrustLevel::Verified)]
    );
    let partner = hub.peers.iter().find(|p| p.node_id == "partner-hub").unwrap();
    let pin = partner.pin.as_ref().expect("a peer of another trust domain carries its pin");
    assert_eq!(pin.trust_domain, "partner.example");
    assert_eq!(pin.fingerprints, ["sha256:3f1c9a1e5b7d2c4f6a8e0b1d3c5f7a9e2b4d6f8a0c1e3b5d7f9a2c4e6b8d0f1a"]);
    assert_eq!(partner.endpoint, "relay.partner.example:4433");
    assert!(hub.peers.iter().find(|p| p.node_id == "hub-us").unwrap().pin.is_none(), "our CA vouches for hub-us");
    assert!(!plan.warnings.iter().any(|w| w.contains("Peer/")), "{:?}", plan.warnings);
    assert!(
        plan.warnings.iter().any(|w| w.contains("Relay/hub-eu") && w.contains("2 replicas")),
        "a main relay with replicas is flagged: {:?}",
        plan.warnings
    );
    // Policy: ECH on, opportunistic, 0%; trust defaults with every relay known.
    assert!(hub.ech_policy.enabled && hub.ech_policy.percentage == 0);
    assert!(hub.trust.reject_unknown);
    assert_eq!(hub.trust.known_nodes.len(), 5);
    assert_eq!(hub.resilience.rate_limit.unwrap().streams_per_second, 200.0);
    assert_eq!(hub.resilience.retry.initial_backoff_ms, 100);

    let shop = &plan.snapshots["shop-eu"];
    assert_eq!(shop.node.role, Role::Home);
    let mains: Vec<(&str, u16, String)> =
        shop.main_relays.iter().map(|m| (m.node_id.as_str(), m.priority, m.endpoint.to_string())).collect();
    assert_eq!(mains, [("hub-eu", 0, "127.0.0.1:7401".into()), ("hub-us", 10, "127.0.0.1:7402".into())]);
    assert_eq!(shop.exports[0].target, "127.0.0.1:18080".parse().unwrap());
    assert!(shop.imports.iter().all(|i| i.node.is_none()), "imports are resolved through the registry");
    assert_eq!(shop.noise_key_file.as_deref(), Some(Path::new("/var/lib/relayfed/keys/shop-eu-noise.key")));
    let web = &plan.snapshots["web-eu"];
    assert_eq!(web.imports.iter().map(|i| i.service.as_str()).collect::<Vec<_>>(), ["catalog", "payments"]);
}

#[test]
fn a_changed_policy_changes_every_snapshot() {
    let mut res = examples();
    for r in &mut res {
        if let AnyResource::RolloutPolicy(p) = r {
            p.spec.ech.percentage = 25;
        }
    }
    let plan = compile(&res, &Placement::offline(keys(), 8)).unwrap();
    assert!(plan.snapshots.values().all(|s| s.ech_policy.percentage == 25 && s.version == 8));
}

#[test]
fn impossible_combinations_name_object_and_field() {
    let base = "apiVersion: relayfed.io/v1alpha1\nkind: RelayFederation\nmetadata: {name: f}\nspec: {trustDomain: t.example, publicName: r.t.example, mainRelays: [{nodeId: hub, endpoint: \"127.0.0.1:7000\"}]}\n";
    let policy = "---\napiVersion: relayfed.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {name: default}\nspec: {}\n";
    let hub = "---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: hub}\nspec: {type: main, nodeId: hub, federation: f}\n";

    let no_policy = compile(&yaml(&format!("{base}{hub}")), &Placement::offline(keys(), 1)).unwrap_err();
    assert_eq!(
        (no_policy[0].object.as_str(), no_policy[0].field.as_str()),
        ("RelayFederation/f", "spec.defaultRolloutPolicy")
    );

    let stray_main = "---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: other}\nspec: {type: main, nodeId: other, federation: f}\n";
    let e = compile(&yaml(&format!("{base}{policy}{hub}{stray_main}")), &Placement::offline(keys(), 1)).unwrap_err();
    assert!(e.iter().any(|e| e.object == "Relay/other" && e.field == "spec.nodeId"), "{e:?}");

    let lost_home = "---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: lost}\nspec: {type: home, nodeId: lost, federation: f, mainRelays: [{nodeId: nowhere}]}\n";
    let e = compile(&yaml(&format!("{base}{policy}{hub}{lost_home}")), &Placement::offline(keys(), 1)).unwrap_err();
    assert!(e.iter().any(|e| e.object == "Relay/lost" && e.field == "spec.mainRelays[0].nodeId"), "{e:?}");

    let twin = "---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: twin}\nspec: {type: home, nodeId: hub, federation: f, mainRelays: [{nodeId: hub}]}\n";
    let e = compile(&yaml(&format!("{base}{policy}{hub}{twin}")), &Placement::offline(keys(), 1)).unwrap_err();
    assert!(e.iter().any(|e| e.field == "spec.nodeId" && e.reason.contains("also the node id")), "{e:?}");

    // A partner (another trust domain) whose relay has one of our node ids is refused; a
    // peer of our own trust domain names our own relays by design.
    let partner = |domain: &str| {
        format!(
            "---\napiVersion: relayfed.io/v1alpha1\nkind: Peer\nmetadata: {{name: partner}}\n\
             spec: {{nodeId: hub, trustDomain: {domain}, endpoints: [\"127.0.0.1:7100\"], identity: {{fingerprint: \"sha256:{}\"}}, trustLevel: verified}}\n",
            "a".repeat(64)
        )
    };
    let e = compile(&yaml(&format!("{base}{policy}{hub}{}", partner("other.example"))), &Placement::offline(keys(), 1))
        .unwrap_err();
    assert!(
        e.iter().any(|e| e.object == "Peer/partner" && e.field == "spec.nodeId" && e.reason.contains("Relay/hub")),
        "{e:?}"
    );

    let none = compile(&yaml(policy), &Placement::offline(keys(), 1)).unwrap_err();
    assert!(none[0].reason.contains("exactly one RelayFederation"));
}

#[test]
fn injected_pods_without_a_reachable_main_relay_are_left_out_with_a_warning() {
    use relayfed_operator::plan::workloads::{Workload, WorkloadFacts};
    // The example without its home relays (they would need the main relays' addresses too).
    let mut resources: Vec<AnyResource> = examples()
        .into_iter()
        .filter(|r| !matches!(r, AnyResource::Relay(x) if x.spec.relay_type == relayfed_crds::RelayType::Home))
        .collect();
    // No main relay has an ip:port endpoint: workloads cannot be planned, the federation can.
    for r in &mut resources {
        if let relayfed_crds::AnyResource::Federation(f) = r {
            for m in &mut f.spec.main_relays {
                m.endpoint = Some("hub.example.net:7401".into());
            }
        }
    }
    let facts = WorkloadFacts {
        workloads: vec![Workload { node_id: "web-1-abc123".into(), pod: "shop/web-1".into(), exports: vec![] }],
        imports: vec![],
        intercept: relayfed_operator::k8s::workloads::WorkloadSettings::default().intercept,
        admin_port: 15090,
    };
    let plan = relayfed_operator::plan::compile(
        &resources,
        &Placement { workloads: Some(&facts), ..Placement::offline(keys(), 1) },
    )
    .unwrap();
    assert!(!plan.snapshots.contains_key("web-1-abc123"));
    assert!(
        plan.warnings.iter().any(|w| w.contains("shop/web-1") && w.contains("no main relay")),
        "{:?}",
        plan.warnings
    );
}

#[test]
fn the_policy_handshake_and_call_timeouts_reach_the_snapshot_separately() {
    let mut resources = examples();
    for r in &mut resources {
        if let AnyResource::RolloutPolicy(p) = r {
            p.spec.resilience.timeouts.handshake = "2s".parse().unwrap();
            p.spec.resilience.timeouts.call = "9s".parse().unwrap();
        }
    }
    let plan = compile(&resources, &Placement::offline(keys(), 1)).unwrap();
    for (node, snap) in &plan.snapshots {
        assert_eq!(snap.timeouts.handshake_ms, 2_000, "{node}: one attempt's handshake");
        assert_eq!(snap.timeouts.call_ms, 9_000, "{node}: the whole call setup");
    }
}

#[test]
fn a_main_relays_planned_anonymity_set_counts_the_distinct_services_of_its_homes() {
    let plan = compile(&examples(), &Placement::offline(keys(), 7)).unwrap();
    // hub-us hosts shop-eu (catalog) and pay-us (payments); hub-eu only shop-eu's catalog,
    // which web-eu imports rather than exports.
    let set = |node: &str| relayfed_operator::plan::planned_anonymity_set(&plan.snapshots[node]);
    assert_eq!(set("hub-us"), 2);
    assert_eq!(set("hub-eu"), 1);
    // A home snapshot has no homes of its own.
    assert_eq!(set("shop-eu"), 0);
}

/// The example federation with hub-eu's two replicas given addresses.
fn with_replicated_hub(extra: &str) -> Vec<AnyResource> {
    let mut all = examples();
    for r in &mut all {
        if let AnyResource::Relay(r) = r
            && r.spec.node_id == "hub-eu"
        {
            r.spec.replica_endpoints = vec!["127.0.0.1:7401".into(), "127.0.0.1:7411".into()];
        }
    }
    all.extend(yaml(extra));
    all
}

#[test]
fn replicas_of_a_main_relay_become_mesh_members_sharing_its_ech_keys() {
    let plan = compile(&with_replicated_hub(""), &Placement::offline(keys(), 1)).unwrap();
    assert_eq!(
        plan.snapshots.keys().collect::<Vec<_>>(),
        ["hub-eu-0", "hub-eu-1", "hub-us", "pay-us", "shop-eu", "web-eu"]
    );
    assert!(!plan.warnings.iter().any(|w| w.contains("2 replicas")), "{:?}", plan.warnings);
    let (r0, r1) = (&plan.snapshots["hub-eu-0"], &plan.snapshots["hub-eu-1"]);
    assert_eq!(r0.listen, Some("127.0.0.1:7401".parse().unwrap()));
    assert_eq!(r1.listen, Some("127.0.0.1:7411".parse().unwrap()));
    // One ECH key set for the relay; a certificate per replica.
    assert_eq!(r0.ech.as_ref().unwrap().key_file, r1.ech.as_ref().unwrap().key_file);
    assert!(r0.ech.as_ref().unwrap().key_file.ends_with("hub-eu-ech.json"));
    assert_ne!(r0.tls.cert_file, r1.tls.cert_file);
    // Every member peers with every other, siblings included; every member is known.
    let peers = |s: &relayfed_sidecar::config::Snapshot| s.peers.iter().map(|p| p.node_id.clone()).collect::<Vec<_>>();
    assert!(peers(r0).contains(&"hub-eu-1".to_owned()) && peers(r0).contains(&"hub-us".to_owned()));
    assert!(peers(&plan.snapshots["hub-us"]).starts_with(&["hub-eu-0".to_owned(), "hub-eu-1".to_owned()]));
    for s in plan.snapshots.values() {
        assert!(s.trust.known_nodes.contains(&"hub-eu-1".to_owned()), "{}", s.node.id);
    }
    // Homes that list hub-eu list both replicas at its priority (the other one is the
    // standby), then hub-us; the replicas' trust.homes name them.
    let shop = &plan.snapshots["shop-eu"];
    let listed: Vec<(&str, u16)> = shop.main_relays.iter().map(|m| (m.node_id.as_str(), m.priority)).collect();
    assert_eq!(listed.len(), 3);
    assert!(listed[..2].iter().all(|(n, p)| n.starts_with("hub-eu-") && *p == 0), "{listed:?}");
    assert_eq!(listed[2], ("hub-us", 10));
    for r in [r0, r1] {
        assert!(r.trust.homes.as_ref().unwrap().contains_key("shop-eu"));
    }
    // Both replicas have their ECH config in every home's snapshot (from Relay.status here).
    let list = relayfed_sidecar::config::base64_encode(
        &relayfed_sidecar::crypto::ech::EchKeySet::new(
            relayfed_sidecar::crypto::ech::EchKeyPair::generate(1, "relay.acme.example").unwrap(),
        )
        .config_list()
        .unwrap(),
    );
    let mut published = with_replicated_hub("");
    for r in &mut published {
        if let AnyResource::Relay(r) = r
            && r.spec.node_id == "hub-eu"
        {
            r.status.get_or_insert_with(Default::default).ech_config_list = Some(list.clone());
        }
    }
    let plan = compile(&published, &Placement::offline(keys(), 1)).unwrap();
    let configs = &plan.snapshots["web-eu"].ech_configs;
    assert_eq!((configs.get("hub-eu-0"), configs.get("hub-eu-1")), (Some(&list), Some(&list)));
}

#[test]
fn homes_spread_over_the_replicas_of_their_relay() {
    let homes: String = (0..40)
        .map(|i| {
            format!(
                "---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: h{i}, namespace: relayfed-system}}\n\
                 spec: {{type: home, nodeId: h{i}, federation: acme, mainRelays: [{{nodeId: hub-eu}}]}}\n"
            )
        })
        .collect();
    let plan = compile(&with_replicated_hub(&homes), &Placement::offline(keys(), 1)).unwrap();
    let first: Vec<&str> = (0..40).map(|i| plan.snapshots[&format!("h{i}")].main_relays[0].node_id.as_str()).collect();
    let on_0 = first.iter().filter(|n| **n == "hub-eu-0").count();
    assert!((10..=30).contains(&on_0), "{on_0} of 40 homes prefer hub-eu-0");
}

#[test]
fn a_replica_node_id_taken_by_another_relay_is_refused() {
    let clash = "apiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {name: squatter, namespace: relayfed-system}\n\
                 spec: {type: home, nodeId: hub-eu-1, federation: acme, mainRelays: [{nodeId: hub-us}]}\n";
    let errs = compile(&with_replicated_hub(clash), &Placement::offline(keys(), 1)).unwrap_err();
    assert!(errs.iter().any(|e| e.field == "spec.replicaEndpoints" && e.reason.contains("hub-eu-1")), "{errs:?}");
}
