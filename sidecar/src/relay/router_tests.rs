//! The relay's decisions, branch by branch: every refusal code, without a process.

use std::collections::HashMap;

use super::*;
use crate::config::{PeerRelay, RateLimit, Trust};
use crate::crypto::ech::{EchKeyPair, seal};
use crate::protocol::route::{Grease, InnerRoute};

const ME: &str = "hub-eu";

fn peer(id: &str, level: TrustLevel, call: Option<&[&str]>) -> PeerRelay {
    PeerRelay {
        node_id: id.into(),
        endpoint: "127.0.0.1:1".into(),
        fallback_endpoints: vec![],
        pin: None,
        trust_level: level,
        permissions: call.map(|c| Permissions { call: c.iter().map(|s| (*s).to_owned()).collect(), export: vec![] }),
        rate_limit: None,
    }
}

fn live(peers: Vec<PeerRelay>, trust: Trust) -> MainLive {
    MainLive {
        peers: peers.into_iter().map(|p| (p.node_id.clone(), p)).collect::<HashMap<_, _>>(),
        trust,
        default_rate: Some(Limit { rate: 100.0, burst: 10.0 }),
        breaker: crate::resilience::breaker::BreakerConfig::default(),
        announcement: None,
        direct_paths: Default::default(),
    }
}

fn standard() -> MainLive {
    live(
        vec![
            peer("hub-us", TrustLevel::Trusted, None),
            peer("partner", TrustLevel::Verified, Some(&["catalog"])),
            peer("stranger", TrustLevel::Unknown, None),
            peer("evil", TrustLevel::Blocked, None),
        ],
        Trust::default(),
    )
}

fn inner(dest_node: &str, dest_main: &str, service: &str, origin: &str) -> InnerRoute {
    InnerRoute {
        dest_node: dest_node.into(),
        dest_main: dest_main.into(),
        service: service.into(),
        port: 80,
        origin: origin.into(),
    }
}

fn header(body: RouteBody) -> RouteHeader {
    RouteHeader { hop_limit: 8, probe: false, trace_context: String::new(), path: vec![], body, grease: None }
}

fn plain(r: InnerRoute) -> RouteHeader {
    header(RouteBody::Plain(r))
}

fn home(id: &str) -> Sender {
    Sender::Home(id.into())
}

fn from_peer(id: &str) -> Sender {
    Sender::Peer(id.into())
}

/// Runs [`route`] with `shop-eu` as the only connected home.
fn decide(l: &MainLive, keys: Option<&EchKeySet>, sender: &Sender, h: RouteHeader) -> (Decision, Option<EchOutcome>) {
    let connected = |n: &str| n == "shop-eu";
    let ctx = RouteContext { me: ME, live: l, keys, home_connected: &connected, now: SystemTime::now() };
    route(sender, h, &ctx)
}

fn refusal(d: &Decision) -> Option<(ErrorCode, Option<&'static str>)> {
    match d {
        Decision::Refuse(r) => Some((r.code, r.rule)),
        _ => None,
    }
}

fn keys() -> EchKeySet {
    EchKeySet::new(EchKeyPair::generate(7, "relay.example").unwrap())
}

fn sealed_to(key: &EchKeyPair, main: &str, r: &InnerRoute) -> RouteHeader {
    let suite = key.config().usable_suite().unwrap();
    header(RouteBody::Sealed(seal(key.config(), suite, main, r).unwrap()))
}

#[test]
fn every_refusal_of_a_routed_stream() {
    let l = standard();
    let ks = keys();
    let hop0 = RouteHeader { hop_limit: 0, ..plain(inner("shop-eu", ME, "catalog", "web@")) };
    let looped = RouteHeader {
        path: vec![PathEntry { node: ME.into(), at_ms: 1 }],
        ..plain(inner("shop-eu", ME, "catalog", "web-eu@hub-eu"))
    };
    let opened = header(RouteBody::Opened {
        binding: ks.current().binding(match &sealed_to(ks.current(), ME, &inner("a", ME, "s", "o@hub-us")).body {
            RouteBody::Sealed(s) => s,
            _ => unreachable!(),
        }),
        route: inner("shop-eu", ME, "catalog", "web-eu@hub-eu"),
    });
    type Case<'a> = (&'a str, Option<&'a EchKeySet>, Sender, RouteHeader, ErrorCode, Option<&'a str>);
    let cases: Vec<Case> = vec![
        ("hop limit spent", None, home("web-eu"), hop0, ErrorCode::HopLimitExceeded, None),
        ("already passed here", None, home("web-eu"), looped, ErrorCode::LoopDetected, None),
        ("an opened header from outside", Some(&ks), from_peer("hub-us"), opened, ErrorCode::MalformedFrame, None),
        (
            "sealed to us without keys",
            None,
            from_peer("hub-us"),
            sealed_to(ks.current(), ME, &inner("shop-eu", ME, "catalog", "web-us@hub-us")),
            ErrorCode::EchDecryptFailed,
            None,
        ),
        (
            "a home claims another origin",
            None,
            home("web-eu"),
            plain(inner("shop-eu", ME, "catalog", "shop-eu@hub-eu")),
            ErrorCode::PermissionDenied,
            None,
        ),
        (
            "a home claims another relay",
            None,
            home("web-eu"),
            plain(inner("shop-eu", ME, "catalog", "web-eu@hub-us")),
            ErrorCode::PermissionDenied,
            None,
        ),
        (
            "a peer claims another relay's origin",
            None,
            from_peer("hub-us"),
            plain(inner("shop-eu", ME, "catalog", "web@partner")),
            ErrorCode::PermissionDenied,
            None,
        ),
        (
            "a peer calls what it may not",
            None,
            from_peer("partner"),
            plain(inner("shop-eu", ME, "payments", "web@partner")),
            ErrorCode::PermissionDenied,
            Some("call_permission"),
        ),
        (
            "an unknown-level peer gets the default permissions (none)",
            None,
            from_peer("stranger"),
            plain(inner("shop-eu", ME, "catalog", "web@stranger")),
            ErrorCode::PermissionDenied,
            Some("call_permission"),
        ),
        (
            "a peer routes through us to a third relay",
            None,
            from_peer("hub-us"),
            plain(inner("x", "hub-ap", "catalog", "web-us@hub-us")),
            ErrorCode::NoRoute,
            None,
        ),
        (
            "the destination home is not connected",
            None,
            home("web-eu"),
            plain(inner("gone-eu", ME, "catalog", "web-eu@hub-eu")),
            ErrorCode::NoRoute,
            None,
        ),
    ];
    for (what, keys, sender, h, code, rule) in cases {
        let (d, _) = decide(&l, keys, &sender, h);
        assert_eq!(refusal(&d), Some((code, rule)), "{what}: {d:?}");
    }
}

#[test]
fn a_tampered_sealed_route_does_not_open() {
    let ks = keys();
    let mut h = sealed_to(ks.current(), ME, &inner("shop-eu", ME, "catalog", "web-us@hub-us"));
    if let RouteBody::Sealed(s) = &mut h.body {
        s.payload[0] ^= 1;
    }
    let (d, ech) = decide(&standard(), Some(&ks), &from_peer("hub-us"), h);
    assert_eq!(refusal(&d).map(|(c, _)| c), Some(ErrorCode::EchDecryptFailed), "{d:?}");
    assert_eq!(ech, Some(EchOutcome::DecryptFailed));
}

#[test]
fn an_unknown_config_id_is_answered_with_retry_configs() {
    let ks = keys();
    let other = EchKeyPair::generate(9, "relay.example").unwrap();
    let h = sealed_to(&other, ME, &inner("shop-eu", ME, "catalog", "web-us@hub-us"));
    let (d, ech) = decide(&standard(), Some(&ks), &from_peer("hub-us"), h);
    assert_eq!(d, Decision::RetryConfigs(ks.config_list().unwrap()));
    assert_eq!(ech, Some(EchOutcome::RetrySent));
}

#[test]
fn a_sealed_route_for_us_is_opened_and_delivered_with_its_binding() {
    let ks = keys();
    let r = inner("shop-eu", ME, "catalog", "web-us@hub-us");
    let h = sealed_to(ks.current(), ME, &r);
    let (d, ech) = decide(&standard(), Some(&ks), &from_peer("hub-us"), h);
    assert_eq!(ech, Some(EchOutcome::Opened));
    let Decision::Deliver { home, header } = d else { panic!("{d:?}") };
    assert_eq!(home, "shop-eu");
    assert_eq!(header.hop_limit, 7);
    assert_eq!(header.path.last().map(|p| p.node.as_str()), Some(ME));
    assert!(matches!(header.body, RouteBody::Opened { ref route, .. } if *route == r), "{header:?}");
}

#[test]
fn a_route_sealed_to_another_relay_is_forwarded_unopened() {
    let ks = keys();
    let h = sealed_to(ks.current(), "hub-us", &inner("pay-us", "hub-us", "payments", "web-eu@hub-eu"));
    let before = h.body.clone();
    let (d, ech) = decide(&standard(), Some(&ks), &home("web-eu"), h);
    assert_eq!(ech, None);
    let Decision::Forward { peer, header } = d else { panic!("{d:?}") };
    assert_eq!(peer, "hub-us");
    assert_eq!(header.body, before, "a relay that does not own the key passes the sealed route on as it is");
}

#[test]
fn plain_routes_are_forwarded_or_delivered() {
    let l = standard();
    let g = Grease { config_id: 3, kdf_id: 1, aead_id: 3, enc: vec![1; 32], payload: vec![2; 40] };
    let out = RouteHeader { grease: Some(g.clone()), ..plain(inner("pay-us", "hub-us", "payments", "web-eu@hub-eu")) };
    let (d, _) = decide(&l, None, &home("web-eu"), out);
    let Decision::Forward { peer, header } = d else { panic!("{d:?}") };
    assert_eq!((peer.as_str(), header.grease), ("hub-us", Some(g)), "GREASE travels unchanged");

    let (d, _) = decide(&l, None, &from_peer("partner"), plain(inner("shop-eu", ME, "catalog", "web@partner")));
    assert!(matches!(d, Decision::Deliver { ref home, .. } if home == "shop-eu"), "permitted call: {d:?}");
    let (d, _) = decide(&l, None, &from_peer("hub-us"), plain(inner("shop-eu", ME, "anything", "web-us@hub-us")));
    assert!(matches!(d, Decision::Deliver { .. }), "trusted peers call everything: {d:?}");
}

#[test]
fn connections_are_refused_by_trust_rules() {
    let open = standard();
    assert_eq!(refuse_connection(&open, "evil"), Some("blocked"));
    assert_eq!(refuse_connection(&open, "stranger"), None, "unknown peers connect unless rejectUnknown");
    assert_eq!(refuse_connection(&open, "anyone"), None);
    let strict = live(
        vec![peer("stranger", TrustLevel::Unknown, None), peer("hub-us", TrustLevel::Trusted, None)],
        Trust { reject_unknown: true, known_nodes: vec!["web-eu".into()], ..Trust::default() },
    );
    assert_eq!(refuse_connection(&strict, "stranger"), Some("reject_unknown"));
    assert_eq!(refuse_connection(&strict, "anyone"), Some("reject_unknown"));
    assert_eq!(refuse_connection(&strict, "web-eu"), None);
    assert_eq!(refuse_connection(&strict, "hub-us"), None);
    assert_eq!(permissions_of(&strict, "evil"), Permissions::default());
}

#[test]
fn first_frames_other_than_route_or_control_are_refused() {
    let code = |f: FirstFrame| match f {
        FirstFrame::Refuse(r) => Some(r.code),
        _ => None,
    };
    assert_eq!(code(first_frame(None)), Some(ErrorCode::Timeout));
    assert_eq!(code(first_frame(Some(Ok(Some(Frame::Noise(vec![1])))))), Some(ErrorCode::MalformedFrame));
    let future = DecodeError::UnsupportedVersion { field: "route", version: 9 };
    assert_eq!(code(first_frame(Some(Err(FrameIoError::Decode(future))))), Some(ErrorCode::UnsupportedVersion));
    let garbage = DecodeError::invalid("kind", "unknown");
    assert_eq!(code(first_frame(Some(Err(FrameIoError::Decode(garbage))))), Some(ErrorCode::MalformedFrame));
    assert!(matches!(first_frame(Some(Ok(None))), FirstFrame::Closed));
    let h = plain(inner("shop-eu", ME, "catalog", "web-eu@hub-eu"));
    assert!(matches!(first_frame(Some(Ok(Some(Frame::Route(h))))), FirstFrame::Route(_)));
}

#[test]
fn rate_buckets_and_the_rate_limited_refusal() {
    let mut l = standard();
    l.peers.get_mut("partner").unwrap().rate_limit = Some(RateLimit { streams_per_second: 2.0, burst: 4.0 });
    let b = |l: &MainLive, s: &Sender, probe| rate_bucket(l, s, probe).map(|(k, kind, lim)| (k, kind, lim.rate));
    assert_eq!(b(&l, &home("web-eu"), false), Some(("web-eu".into(), "home", 100.0)));
    assert_eq!(b(&l, &home("web-eu"), true), Some(("probe:web-eu".into(), "probe", PROBE_LIMIT.rate)));
    assert_eq!(b(&l, &from_peer("partner"), false), Some(("peer:partner".into(), "peer", 2.0)), "the peer's own limit");
    assert_eq!(b(&l, &from_peer("hub-us"), false), Some(("peer:hub-us".into(), "peer", 100.0)), "else the default");
    l.default_rate = None;
    assert_eq!(b(&l, &home("web-eu"), false), None, "no limit configured");
    let r = rate_limited(Duration::ZERO);
    assert_eq!((r.code, r.retry_after), (ErrorCode::RateLimited, Some(Duration::from_millis(1))));
}

#[test]
fn forwarding_needs_a_closed_circuit_and_a_link() {
    let code = |r: Result<(), Refusal>| r.err().map(|r| r.code);
    assert_eq!(code(forward_check("hub-us", true, PeerLink::Connected)), None);
    assert_eq!(code(forward_check("hub-us", false, PeerLink::Connected)), Some(ErrorCode::CircuitOpen));
    assert_eq!(code(forward_check("hub-us", true, PeerLink::Down)), Some(ErrorCode::PeerUnreachable));
    assert_eq!(code(forward_check("hub-ap", true, PeerLink::NotAPeer)), Some(ErrorCode::NoRoute));
}

#[test]
fn a_partners_entry_naming_one_of_our_nodes_collides() {
    use crate::config::PeerPin;
    use crate::federation::registry::Entry;
    let mut partner = peer("partner", TrustLevel::Verified, Some(&["catalog"]));
    partner.pin = Some(PeerPin { trust_domain: "partner.example".into(), ca_bundle: None, fingerprints: vec![] });
    let trust = Trust { known_nodes: vec![ME.into(), "shop-eu".into()], ..Trust::default() };
    let l = live(vec![partner, peer("hub-us", TrustLevel::Trusted, None)], trust);
    let entry = |node: &str, main: &str| Entry {
        service: "catalog".into(),
        node: node.into(),
        main: main.into(),
        ..Entry::default()
    };
    // Their own home at their own relay: kept.
    assert!(!collides(&l, "partner", &entry("web-p", "partner")));
    // A home id or a main relay id of ours: dropped.
    assert!(collides(&l, "partner", &entry("shop-eu", "partner")));
    assert!(collides(&l, "partner", &entry("web-p", ME)));
    // A peer of our own trust domain carries our own homes: kept.
    assert!(!collides(&l, "hub-us", &entry("shop-eu", "hub-us")));
}
