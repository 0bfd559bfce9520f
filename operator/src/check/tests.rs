#![allow(clippy::unwrap_used)]
use super::*;

fn healthy() -> Facts {
    let now = SystemTime::now();
    let mut f = Facts {
        namespace: "relayfed-system".into(),
        release: "relayfed".into(),
        server_version: Ok((1, 36)),
        lease: Some(LeaseFact { holder: Some("op-0".into()), renewed: Some(now), duration: Duration::from_secs(15) }),
        operator_ready: Some((2, 2)),
        webhook: WebhookFact { registered: true, ready_endpoints: Some(2), ..Default::default() },
        now,
        ..Default::default()
    };
    for name in CRDS {
        f.crds.insert(name.into(), CrdFact { established: true, current: true });
    }
    f
}

/// The first resource `pick` accepts in an example file.
fn example<T>(yaml: &str, pick: fn(relayfed_crds::AnyResource) -> Option<T>) -> T {
    relayfed_crds::parse_documents("example", yaml).unwrap().into_iter().find_map(pick).unwrap()
}

/// A `Ready` condition.
fn ready(status: &str, reason: &str, message: &str) -> relayfed_crds::Condition {
    relayfed_crds::Condition {
        type_: "Ready".into(),
        status: status.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: None,
        observed_generation: None,
    }
}

fn conditions(list: Vec<relayfed_crds::Condition>) -> relayfed_crds::common::CommonStatus {
    relayfed_crds::common::CommonStatus { observed_generation: None, conditions: list }
}

fn failed(f: &Facts) -> Vec<String> {
    evaluate(f).into_iter().filter(|o| o.status == Status::Fail).map(|o| o.name).collect()
}

#[test]
fn a_healthy_install_passes() {
    let out = evaluate(&healthy());
    assert!(passed(&out), "{}", render_text(&out));
    assert!(render_text(&out).ends_with("passed (8 checks, 0 warnings)\n"), "{}", render_text(&out));
}

#[test]
fn each_broken_state_fails_with_a_remedy() {
    let mut missing_crd = healthy();
    missing_crd.crds.remove("relays.relayfed.io");
    let mut stale_crd = healthy();
    stale_crd.crds.insert("peers.relayfed.io".into(), CrdFact { established: true, current: false });
    let mut old = healthy();
    old.server_version = Ok((1, 28));
    let mut no_leader = healthy();
    no_leader.lease.as_mut().unwrap().renewed = Some(no_leader.now - Duration::from_secs(60));
    let mut webhook_down = healthy();
    webhook_down.webhook.ready_endpoints = Some(0);
    let mut bad_ca = healthy();
    bad_ca.webhook.ca_problem = Some("not a PEM certificate".into());
    let mut tls = healthy();
    tls.webhook.handshake = Some(Err("invalid peer certificate: UnknownIssuer".into()));
    for (f, name) in [
        (missing_crd, "CRD relays.relayfed.io"),
        (stale_crd, "CRD peers.relayfed.io"),
        (old, "API server version"),
        (no_leader, "operator leading"),
        (webhook_down, "injection webhook"),
        (bad_ca, "injection webhook"),
        (tls, "injection webhook"),
    ] {
        let out = evaluate(&f);
        assert_eq!(failed(&f), [name], "{}", render_text(&out));
        assert!(!passed(&out));
        let o = out.iter().find(|o| o.name == name).unwrap();
        assert!(o.remedy.as_deref().is_some_and(|r| !r.is_empty()), "{name}: no remedy");
    }
}

#[test]
fn pre_install_checks_only_the_api_and_the_crds() {
    let mut f = healthy();
    f.pre_install = true;
    f.lease = None;
    f.operator_ready = None;
    let out = evaluate(&f);
    assert_eq!(out.len(), 1 + CRDS.len());
    assert!(passed(&out));
}

#[test]
fn relays_peers_and_policies_are_read_from_their_status() {
    let mut f = healthy();
    let mut relay = example(include_str!("../../../examples/federation/10-main-relays.yaml"), |d| match d {
        relayfed_crds::AnyResource::Relay(r) => Some(*r),
        _ => None,
    });
    let status = |status: &str, rotated: &str| relayfed_crds::relay::RelayStatus {
        common: conditions(vec![ready(status, "Progressing", "0/2 replicas ready")]),
        last_key_rotation: Some(rotated.into()),
        ..Default::default()
    };
    let now_rfc = k8s_openapi::jiff::Timestamp::now().to_string();
    relay.status = Some(status("True", &now_rfc));
    f.relays = vec![relay.clone()];
    assert!(passed(&evaluate(&f)), "{}", render_text(&evaluate(&f)));
    // A small anonymity set warns (and passes); a large one is fine.
    for (set, want) in [(1, Status::Warn), (3, Status::Ok)] {
        relay.status.as_mut().unwrap().ech_anonymity_set = Some(set);
        f.relays = vec![relay.clone()];
        let out = evaluate(&f);
        let o = out.iter().find(|o| o.name == "relay hub-eu ECH anonymity set").unwrap();
        assert_eq!(o.status, want, "{set}: {}", render_text(&out));
        assert!(passed(&out));
    }
    // Config acknowledgement: behind is a warning, refused is a failure.
    let ack_of = |relay: &Relay, f: &Facts| {
        let mut f = f.clone();
        f.relays = vec![relay.clone()];
        let out = evaluate(&f);
        out.into_iter().find(|o| o.name == "relay hub-eu config acknowledged").unwrap().status
    };
    relay.status.as_mut().unwrap().ech_anonymity_set = None;
    for (version, acked, result, want) in [
        (Some(7), Some(7), Some("applied"), Status::Ok),
        (Some(8), Some(7), Some("applied"), Status::Warn),
        (Some(8), None, None, Status::Warn),
        (Some(8), Some(8), Some("invalid"), Status::Fail),
        (None, None, None, Status::Ok),
    ] {
        let s = relay.status.as_mut().unwrap();
        s.config_version = version;
        s.acknowledged_version = acked;
        s.acknowledged_result = result.map(str::to_owned);
        assert_eq!(ack_of(&relay, &f), want, "{version:?} {acked:?} {result:?}");
    }
    relay.status = Some(status("False", "2020-01-01T00:00:00Z"));
    f.relays = vec![relay];
    assert_eq!(failed(&f), ["relay hub-eu Ready", "relay hub-eu ECH keys"]);
}

#[test]
fn a_federation_whose_plan_fails_is_reported_with_its_message() {
    let mut f = healthy();
    let mut fed = example(include_str!("../../../examples/federation/00-federation.yaml"), |d| match d {
        relayfed_crds::AnyResource::Federation(r) => Some(*r),
        _ => None,
    });
    let cond = |status: &str| {
        ready(
            status,
            "PlanInvalid",
            "RelayFederation/acme spec.defaultRolloutPolicy: RolloutPolicy \"default\" not found",
        )
    };
    fed.status =
        Some(relayfed_crds::RelayFederationStatus { common: conditions(vec![cond("False")]), ..Default::default() });
    f.federations = vec![fed.clone()];
    let out = evaluate(&f);
    assert_eq!(failed(&f), ["federation acme Ready"]);
    assert!(out.iter().any(|o| o.detail.contains("defaultRolloutPolicy")));
    fed.status.as_mut().unwrap().common.conditions = vec![cond("True")];
    f.federations = vec![fed];
    assert!(passed(&evaluate(&f)));
}
