//! Peers of another trust domain (docs/protocol.md §2.3): two federations with their own CAs
//! peer by a pinned CA key each way, nothing else shared; each learns only the services it may
//! call; a relay whose CA key is not pinned is refused with a counted reason; routes to a
//! partner's relay are sealed with ECH when its CA, as pinned, signed its config.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use common::{Proc, eventually, identify_server, round_trip};
use relayfed_e2e::Testbed;
use relayfed_sidecar::config::{
    Export, Import, MainRelay, PartnerFederation, PeerPin, PeerRelay, Permissions, Snapshot, TrustLevel,
};
use relayfed_sidecar::federation::ech_policy::{EchMode, EchPolicy};
use relayfed_sidecar::protocol::proxy_header;

const WAIT: Duration = Duration::from_secs(15);

fn edit(path: &PathBuf, f: impl FnOnce(&mut Snapshot)) {
    let mut s = Snapshot::load(path).unwrap();
    f(&mut s);
    std::fs::write(path, serde_saphyr::to_string(&s).unwrap()).unwrap();
}

/// What a home has beyond its plain exports and registry imports.
#[derive(Default)]
struct Extra {
    /// Imports with a fixed destination (node, main relay, Noise key).
    fixed: Vec<Import>,
    /// Exports served by [`caller_server`] behind a PROXY v2 header.
    proxied: &'static [&'static str],
    /// The home's ECH policy (default: off).
    ech: EchPolicy,
}

/// One federation: its testbed (CA), its main relay's snapshot and QUIC address.
struct Federation {
    tb: Testbed,
    relay: String,
    cfg: PathBuf,
    addr: SocketAddr,
}

impl Federation {
    fn new(trust_domain: &str, relay: &str, config_id: u8) -> Self {
        let tb = Testbed::new(trust_domain).unwrap();
        let cfg = tb.main_relay(relay, config_id).unwrap();
        let addr = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
        edit(&cfg, |s| s.listen = Some(addr));
        Self { tb, relay: relay.into(), cfg, addr }
    }

    /// What the other side pins: our CA's key.
    fn fingerprint(&self) -> String {
        let der = relayfed_sidecar::crypto::ca::parse_cert_pem(&self.tb.ca.certified_key().cert_pem).unwrap();
        relayfed_sidecar::serving::partners::spki_fingerprint(&der).unwrap()
    }

    /// `other` as our peer, pinned by `fingerprint`, allowed `call` and `export`.
    fn peer_with(&self, other: &Federation, fingerprint: String, call: &[&str], export: &[&str]) {
        let strings = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect();
        let peer = PeerRelay {
            node_id: other.relay.clone(),
            endpoint: other.addr.to_string(),
            fallback_endpoints: vec![],
            pin: Some(PeerPin {
                trust_domain: other.tb.trust_domain.clone(),
                ca_bundle: None,
                fingerprints: vec![fingerprint],
            }),
            trust_level: TrustLevel::Verified,
            permissions: Some(Permissions { call: strings(call), export: strings(export) }),
            rate_limit: None,
        };
        edit(&self.cfg, |s| s.peers = vec![peer]);
    }

    /// A home of ours exporting `services` (an identify server: answers `<name>|<echo>`) and
    /// importing `imports`; it verifies `other`'s homes by the pin of `other`'s CA key.
    async fn home(&self, name: &str, relay: &Proc, services: &[&str], imports: &[&str], other: &Federation) -> Proc {
        self.home_with(name, relay, services, imports, other, Extra::default()).await
    }

    /// As [`Federation::home`], with `fixed` imports (a destination given by node, main relay
    /// and Noise key, not looked up in the registry) and the exports in `proxied` served by
    /// [`caller_server`] behind a PROXY v2 header.
    async fn home_with(
        &self,
        name: &str,
        relay: &Proc,
        services: &[&str],
        imports: &[&str],
        other: &Federation,
        extra: Extra,
    ) -> Proc {
        let Extra { fixed, proxied, ech } = extra;
        let server = identify_server(name).await;
        let caller_server = caller_server().await;
        let exports = services
            .iter()
            .map(|s| {
                let proxied = proxied.contains(s);
                let target = if proxied { caller_server } else { server };
                Export { service: (*s).into(), port: 80, target, proxy_protocol: proxied }
            })
            .collect::<Vec<_>>();
        let imports = imports
            .iter()
            .map(|s| Import::resolved(s, 80, "127.0.0.1:0".parse().unwrap()))
            .chain(fixed)
            .collect::<Vec<_>>();
        let main = MainRelay { node_id: self.relay.clone(), endpoint: relay.quic(), priority: 0 };
        let path = self.tb.home(name, main, exports, imports, ech).unwrap();
        let partner = PartnerFederation {
            relays: vec![other.relay.clone()],
            pin: PeerPin {
                trust_domain: other.tb.trust_domain.clone(),
                ca_bundle: None,
                fingerprints: vec![other.fingerprint()],
            },
        };
        edit(&path, |s| s.partners = vec![partner]);
        common::start("home", &path, &[]).await
    }
}

/// An app that authorises by caller: it reads the PROXY v2 header the sidecar writes first
/// and answers `<identity>|<origin main>|<service>|` followed by an echo of the request.
async fn caller_server() -> SocketAddr {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = l.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = l.accept().await {
            tokio::spawn(async move {
                let mut buf = Vec::new();
                let mut chunk = [0u8; 4096];
                // Read until the header is complete, then the request to its end.
                let (caller, used) = loop {
                    match proxy_header::decode(&buf) {
                        Ok(x) => break x,
                        Err(proxy_header::ProxyHeaderError::Truncated) => {}
                        Err(_) => return,
                    }
                    match s.read(&mut chunk).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => buf.extend_from_slice(&chunk[..n]),
                    }
                };
                let mut request = buf[used..].to_vec();
                let _ = s.read_to_end(&mut request).await;
                let id = caller.identity.unwrap_or_else(|| "anonymous".into());
                let head = format!("{id}|{}|{}|", caller.origin_main, caller.service);
                let _ = s.write_all(&[head.as_bytes(), &request].concat()).await;
            });
        }
    });
    addr
}

/// The services of `relay`'s federated registry entries, sorted.
async fn federated(relay: &Proc) -> Vec<String> {
    let reg = relay.json("/federation/registry").await;
    let mut v: Vec<String> = reg["federated"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| f["entry"]["service"].as_str().unwrap().to_owned())
        .collect();
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn relays_of_two_trust_domains_peer_by_pinned_keys_and_learn_only_what_they_may_call() {
    let acme = Federation::new("acme.example", "hub-a", 1);
    let partner = Federation::new("partner.example", "hub-p", 2);
    // acme lets the partner call catalog and export inventory*; the partner lets acme call
    // inventory* and export catalog. Each side writes its own Peer; only the keys cross.
    acme.peer_with(&partner, partner.fingerprint(), &["catalog"], &["inventory*"]);
    partner.peer_with(&acme, acme.fingerprint(), &["inventory*"], &["catalog"]);
    // hub-a (the smaller id) dials: its first address for the partner is a name that does not
    // resolve, the working one is its fallback.
    edit(&acme.cfg, |s| {
        let p = &mut s.peers[0];
        p.fallback_endpoints = vec![std::mem::replace(&mut p.endpoint, "nowhere.invalid:4433".into())];
    });
    let hub_a = common::start("main-relay", &acme.cfg, &[]).await;
    let hub_p = common::start("main-relay", &partner.cfg, &[]).await;
    let shop = acme.home("shop", &hub_a, &["catalog", "payroll"], &["inventory-eu", "hr"], &partner).await;
    // stock's inventory-eu authorises by caller: it gets a PROXY v2 header first.
    let stock = partner
        .home_with(
            "stock",
            &hub_p,
            &["inventory-eu", "hr"],
            &["catalog"],
            &acme,
            Extra { proxied: &["inventory-eu"], ..Extra::default() },
        )
        .await;

    eventually("both relays see the peering up (hub-a through its fallback address)", WAIT, || async {
        hub_a.metric("relayfed_relay_peer_up", &[("peer", "hub-p")]).await == 1.0
            && hub_p.metric("relayfed_relay_peer_up", &[("peer", "hub-a")]).await == 1.0
    })
    .await;
    eventually("each learns the other's permitted service", WAIT, || async {
        federated(&hub_a).await == ["inventory-eu"] && federated(&hub_p).await == ["catalog"]
    })
    .await;
    assert!(
        hub_a.metric("relayfed_transport_hop_handshakes_total", &[("role", "client"), ("result", "unresolved")]).await
            >= 1.0,
        "the first address was tried first"
    );
    // Nothing was sent that the receiver would have had to drop: the partner never learned
    // payroll, acme never learned hr.
    assert_eq!(hub_a.metric("relayfed_relay_trust_denials_total", &[("rule", "export_permission")]).await, 0.0);
    assert_eq!(hub_p.metric("relayfed_relay_trust_denials_total", &[("rule", "export_permission")]).await, 0.0);
    let text = hub_p.json("/federation/registry").await.to_string();
    assert!(!text.contains("payroll"), "{text}");

    // Calls across the boundary, each way: home -> main -> partner main -> partner home, the
    // destination's certificate verified by the partner's pinned CA key end to end.
    // The partner's app learns who calls, as the Noise session authenticated it: acme's shop,
    // by its certificate from acme's CA, verified by the pin (no relay can say otherwise).
    eventually("shop reaches inventory-eu in the partner federation", WAIT, || async {
        round_trip(shop.import("inventory-eu:80"), b"q")
            .await
            .is_ok_and(|r| r == b"relayfed://acme.example/shop|hub-a|inventory-eu|q")
    })
    .await;
    eventually("stock reaches catalog in acme", WAIT, || async {
        round_trip(stock.import("catalog:80"), b"q").await.is_ok_and(|r| r == b"shop|q")
    })
    .await;
    let trace = shop.json("/federation/trace?service=inventory-eu&port=80").await;
    let hops: Vec<&str> = trace["hops"].as_array().unwrap().iter().map(|h| h["node"].as_str().unwrap()).collect();
    assert_eq!(hops, ["shop", "hub-a", "hub-p", "stock"], "{trace}");
    assert_eq!(shop.metric("relayfed_proxy_e2e_handshakes_total", &[("result", "key_unverified")]).await, 0.0);
    // A home that pins another CA key for the partner refuses its destination: a relay on the
    // path cannot hand it a key of its own making.
    let stranger = Federation::new("partner.example", "hub-p", 3);
    let gullible = acme.home("gullible", &hub_a, &[], &["inventory-eu"], &stranger).await;
    eventually("gullible has inventory-eu in its view", WAIT, || async {
        gullible.json("/federation/registry").await.to_string().contains("inventory-eu")
    })
    .await;
    assert!(round_trip(gullible.import("inventory-eu:80"), b"q").await.is_err());
    assert!(gullible.metric("relayfed_proxy_e2e_handshakes_total", &[("result", "key_unverified")]).await >= 1.0);
    // A caller that knows where hr is (a fixed destination) is refused at the partner's
    // boundary relay: acme may call inventory* only.
    let mut hr = Import::resolved("hr", 80, "127.0.0.1:0".parse().unwrap());
    (hr.node, hr.main, hr.noise_public_key) =
        (Some("stock".into()), Some("hub-p".into()), Some(partner.tb.noise_key("stock").unwrap()));
    let pushy =
        acme.home_with("pushy", &hub_a, &[], &[], &partner, Extra { fixed: vec![hr], ..Extra::default() }).await;
    assert!(round_trip(pushy.import("hr:80"), b"q").await.is_err());
    assert_eq!(pushy.metric("relayfed_proxy_stream_errors_total", &[("code", "PERMISSION_DENIED")]).await, 1.0);
    assert_eq!(hub_p.metric("relayfed_relay_trust_denials_total", &[("rule", "call_permission")]).await, 1.0);
    // What the partner may not be called for is not reachable: acme never learned hr. (Calls
    // made while waiting for shop's first view above may have counted SERVICE_NOT_FOUND too:
    // this call's own count is the difference.)
    let not_found = || shop.metric("relayfed_proxy_stream_errors_total", &[("code", "SERVICE_NOT_FOUND")]);
    let before = not_found().await;
    assert!(round_trip(shop.import("hr:80"), b"q").await.is_err());
    assert_eq!(not_found().await - before, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_whose_ca_key_is_not_pinned_is_refused_with_a_counted_reason() {
    let acme = Federation::new("acme.example", "hub-a", 1);
    let partner = Federation::new("partner.example", "hub-p", 2);
    let stranger = Testbed::new("partner.example").unwrap();
    let wrong = {
        let der = relayfed_sidecar::crypto::ca::parse_cert_pem(&stranger.ca.certified_key().cert_pem).unwrap();
        relayfed_sidecar::serving::partners::spki_fingerprint(&der).unwrap()
    };
    // hub-a (the smaller id) dials; the partner pins a key that is not acme's.
    acme.peer_with(&partner, partner.fingerprint(), &["*"], &["*"]);
    partner.peer_with(&acme, wrong.clone(), &["*"], &["*"]);
    let hub_a = common::start("main-relay", &acme.cfg, &[]).await;
    let hub_p = common::start("main-relay", &partner.cfg, &[]).await;
    eventually("the partner refuses acme's certificate", WAIT, || async {
        hub_p.metric("relayfed_transport_hop_handshakes_total", &[("role", "server"), ("result", "pin_mismatch")]).await
            >= 1.0
    })
    .await;
    assert_eq!(hub_p.metric("relayfed_relay_peer_up", &[("peer", "hub-a")]).await, 0.0);

    // The other way round: acme pins the wrong key for the partner and refuses it as a server.
    drop((hub_a, hub_p));
    acme.peer_with(&partner, wrong, &["*"], &["*"]);
    partner.peer_with(&acme, acme.fingerprint(), &["*"], &["*"]);
    let hub_a = common::start("main-relay", &acme.cfg, &[]).await;
    let _hub_p = common::start("main-relay", &partner.cfg, &[]).await;
    eventually("acme refuses the partner's server certificate", WAIT, || async {
        hub_a.metric("relayfed_transport_hop_handshakes_total", &[("role", "client"), ("result", "pin_mismatch")]).await
            >= 1.0
    })
    .await;
    assert_eq!(hub_a.metric("relayfed_relay_peer_up", &[("peer", "hub-p")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn routes_to_a_partners_relay_are_sealed_when_its_pinned_ca_signed_its_ech_config() {
    let acme = Federation::new("acme.example", "hub-a", 1);
    let partner = Federation::new("partner.example", "hub-p", 2);
    acme.peer_with(&partner, partner.fingerprint(), &[], &["inventory*"]);
    partner.peer_with(&acme, acme.fingerprint(), &["inventory*"], &[]);
    // The partner's operator signs hub-p's config with the partner's CA (§5.7); acme's homes
    // have no config of hub-p in their snapshots.
    let list = partner.tb.ech_configs().unwrap().remove("hub-p").unwrap();
    let signature = relayfed_sidecar::config::base64_encode(
        &partner.tb.ca.sign_ech_config("hub-p", &relayfed_sidecar::config::base64_decode(&list).unwrap()).unwrap(),
    );
    edit(&partner.cfg, |s| {
        s.ech_announcement = Some(relayfed_sidecar::config::SignedEchConfig { ech_config_list: list, signature })
    });
    let hub_a = common::start("main-relay", &acme.cfg, &[]).await;
    let hub_p = common::start("main-relay", &partner.cfg, &[]).await;
    let _stock = partner.home("stock", &hub_p, &["inventory-eu"], &[], &acme).await;
    let required = EchPolicy { enabled: true, mode: EchMode::Required, percentage: 100, ..EchPolicy::default() };
    let shop = acme
        .home_with(
            "shop",
            &hub_a,
            &[],
            &["inventory-eu"],
            &partner,
            Extra { ech: required.clone(), ..Extra::default() },
        )
        .await;
    // A home whose pin for the partner is another key refuses the config: in `required` mode
    // it then sends nothing to hub-p rather than a plain route.
    let stranger = Federation::new("partner.example", "hub-p", 3);
    let gullible = acme
        .home_with("gullible", &hub_a, &[], &["inventory-eu"], &stranger, Extra { ech: required, ..Extra::default() })
        .await;

    eventually("shop reaches inventory-eu through hub-p, sealed", WAIT, || async {
        round_trip(shop.import("inventory-eu:80"), b"q").await.is_ok_and(|r| r == b"stock|q")
    })
    .await;
    assert!(shop.metric("relayfed_proxy_ech_signed_configs_total", &[("result", "accepted")]).await >= 1.0);
    assert!(shop.metric("relayfed_proxy_ech_streams_total", &[("outcome", "accepted")]).await >= 1.0);
    assert_eq!(shop.metric("relayfed_proxy_ech_signed_configs_total", &[("result", "invalid")]).await, 0.0);
    eventually("gullible refuses hub-p's config", WAIT, || async {
        gullible.metric("relayfed_proxy_ech_signed_configs_total", &[("result", "invalid")]).await >= 1.0
    })
    .await;
    assert!(round_trip(gullible.import("inventory-eu:80"), b"q").await.is_err());
    assert_eq!(gullible.metric("relayfed_proxy_ech_streams_total", &[("outcome", "accepted")]).await, 0.0);
}
