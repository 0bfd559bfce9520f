//! The home's decisions, branch by branch: every refusal code it decides on, without a process.

use super::*;
use crate::protocol::ErrorFrame;
use crate::protocol::wire::DecodeError;

fn entry(node: &str, main: &str, service: &str) -> Entry {
    Entry {
        service: service.into(),
        port: 80,
        node: node.into(),
        main: main.into(),
        noise_key: "a2V5".into(),
        ech: true,
        standby: false,
        attached: 1,
    }
}

fn import(service: &str) -> Import {
    Import::resolved(service, 80, "127.0.0.1:0".parse().unwrap())
}

fn code<T: std::fmt::Debug>(r: Result<T, StreamError>) -> Option<ErrorCode> {
    r.err().map(|(c, _)| c)
}

#[test]
fn calls_go_to_current_untried_registrations() {
    let view = vec![
        entry("shop-eu", "hub-eu", "catalog"),
        entry("shop-us", "hub-us", "catalog"),
        entry("pay", "hub-us", "payments"),
    ];
    let Ok(Candidates::Pick(c)) = plan_call(&import("catalog"), &view, &[]) else { panic!() };
    assert_eq!(c.iter().map(|e| e.node.as_str()).collect::<Vec<_>>(), ["shop-eu", "shop-us"]);
    let tried = [view[0].key()];
    let Ok(Candidates::Pick(c)) = plan_call(&import("catalog"), &view, &tried) else { panic!() };
    assert_eq!(
        c.iter().map(|e| e.node.as_str()).collect::<Vec<_>>(),
        ["shop-us"],
        "a failed instance is not tried again"
    );

    let standby = Entry { standby: true, attached: 0, main: "hub-us".into(), ..entry("shop-eu", "hub-us", "catalog") };
    let Ok(Candidates::Pick(c)) = plan_call(&import("catalog"), &[view[0].clone(), standby], &[]) else { panic!() };
    assert_eq!(c, vec![view[0].clone()], "the active registration wins over the standby");
}

#[test]
fn a_fixed_import_needs_no_view() {
    let fixed = Import {
        node: Some("pay".into()),
        main: Some("hub-us".into()),
        noise_public_key: Some("a2V5".into()),
        ..import("payments")
    };
    let Ok(Candidates::Fixed(e)) = plan_call(&fixed, &[], &[]) else { panic!() };
    assert_eq!((e.node.as_str(), e.main.as_str(), e.ech), ("pay", "hub-us", true));
}

#[test]
fn every_refusal_of_a_call() {
    let view = vec![entry("shop-eu", "hub-eu", "catalog")];
    assert_eq!(
        code(plan_call(&import("payments"), &view, &[])),
        Some(ErrorCode::ServiceNotFound),
        "nothing registered"
    );
    assert_eq!(code(plan_call(&import("catalog"), &view, &[view[0].key()])), Some(ErrorCode::NoRoute), "all tried");
    assert_eq!(no_healthy_instance("catalog").0, ErrorCode::CircuitOpen);
    assert_eq!(code(sealing(EchDecision::Required, false, "hub-us")), Some(ErrorCode::EchRequired));
}

#[test]
fn sealing_follows_the_policy_and_the_snapshot() {
    assert_eq!(sealing(EchDecision::Plain, true, "m").ok(), Some(Sealing::Plain));
    assert_eq!(sealing(EchDecision::Opportunistic, true, "m").ok(), Some(Sealing::Seal));
    assert_eq!(sealing(EchDecision::Required, true, "m").ok(), Some(Sealing::Seal));
    assert_eq!(sealing(EchDecision::Opportunistic, false, "m").ok(), Some(Sealing::Fallback));
}

fn binding(digest: u8) -> EchBinding {
    EchBinding { config_id: 4, config_digest: [digest; CONFIG_DIGEST_LEN], enc: vec![1; 32] }
}

#[test]
fn answers_to_a_setup() {
    let failed = |a: Answer| match a {
        Answer::Failed((c, _)) => Some(c),
        _ => None,
    };
    assert_eq!(answer(Some(Frame::Noise(vec![7])), "m", None, None, false), Answer::Noise(vec![7]));
    let used = binding(1);
    assert_eq!(
        answer(Some(Frame::RetryConfigs(vec![])), "m", Some(&used), Some([2; CONFIG_DIGEST_LEN]), false),
        Answer::RetryWithNewerConfig,
        "the snapshot has a newer config: retry once"
    );
    let stale = |digest: Option<[u8; CONFIG_DIGEST_LEN]>, retried| {
        failed(answer(Some(Frame::RetryConfigs(vec![])), "m", Some(&used), digest, retried))
    };
    assert_eq!(stale(Some([1; CONFIG_DIGEST_LEN]), false), Some(ErrorCode::EchUnknownConfig), "no newer config");
    assert_eq!(stale(None, false), Some(ErrorCode::EchUnknownConfig), "no config at all");
    assert_eq!(stale(Some([2; CONFIG_DIGEST_LEN]), true), Some(ErrorCode::EchUnknownConfig), "retried once already");
    assert_eq!(
        failed(answer(Some(Frame::RetryConfigs(vec![])), "m", None, None, false)),
        Some(ErrorCode::MalformedFrame),
        "retry configs for a plain route"
    );
    let relay_error = ErrorFrame { code: ErrorCode::RateLimited, retry_after_ms: 5, message: "slow".into() };
    assert_eq!(failed(answer(Some(Frame::Error(relay_error)), "m", None, None, false)), Some(ErrorCode::RateLimited));
    assert_eq!(failed(answer(None, "m", None, None, false)), Some(ErrorCode::PeerUnreachable));
}

fn exports() -> Vec<Export> {
    vec![Export {
        service: "catalog".into(),
        port: 80,
        target: "127.0.0.1:8080".parse().unwrap(),
        proxy_protocol: false,
    }]
}

fn route_to(node: &str, service: &str) -> InnerRoute {
    InnerRoute {
        dest_node: node.into(),
        dest_main: "hub-eu".into(),
        service: service.into(),
        port: 80,
        origin: "web@hub-us".into(),
    }
}

fn routed(body: RouteBody, probe: bool) -> Option<Result<Option<Frame>, FrameIoError>> {
    let h = RouteHeader {
        hop_limit: 6,
        probe,
        trace_context: String::new(),
        path: vec![PathEntry { node: "hub-eu".into(), at_ms: 1 }],
        body,
        grease: None,
    };
    Some(Ok(Some(Frame::Route(h))))
}

#[test]
fn every_refusal_of_an_inbound_stream() {
    let refused = |read| match inbound_route(read, "shop-eu", &exports()) {
        Err(Some((c, _))) => Some(c),
        _ => None,
    };
    assert_eq!(refused(None), Some(ErrorCode::Timeout));
    assert_eq!(refused(Some(Ok(Some(Frame::Noise(vec![1]))))), Some(ErrorCode::MalformedFrame));
    assert_eq!(
        refused(Some(Err(FrameIoError::Decode(DecodeError::invalid("kind", "bad"))))),
        Some(ErrorCode::MalformedFrame)
    );
    let sealed = crate::protocol::route::SealedRoute {
        main: "hub-eu".into(),
        config_id: 1,
        kdf_id: 1,
        aead_id: 3,
        enc: vec![1],
        payload: vec![2],
    };
    assert_eq!(refused(routed(RouteBody::Sealed(sealed), false)), Some(ErrorCode::MalformedFrame), "still sealed");
    assert_eq!(refused(routed(RouteBody::Plain(route_to("web-eu", "catalog")), false)), Some(ErrorCode::NoRoute));
    assert_eq!(
        refused(routed(RouteBody::Plain(route_to("shop-eu", "admin")), false)),
        Some(ErrorCode::ServiceNotFound)
    );
    assert!(matches!(inbound_route(Some(Ok(None)), "shop-eu", &exports()), Err(None)), "closed: nothing to answer");
}

#[test]
fn inbound_streams_for_our_exports_are_accepted() {
    let ok =
        inbound_route(routed(RouteBody::Plain(route_to("shop-eu", "catalog")), false), "shop-eu", &exports()).unwrap();
    assert_eq!((ok.export.target.port(), ok.binding.is_none(), ok.probe_path.is_none()), (8080, true, true));
    let opened = RouteBody::Opened { binding: binding(3), route: route_to("shop-eu", "catalog") };
    let probe = inbound_route(routed(opened, true), "shop-eu", &exports()).unwrap();
    assert_eq!(probe.binding, Some(binding(3)));
    assert_eq!(probe.probe_path.map(|p| p.len()), Some(1), "a probe keeps the path it took");
}
