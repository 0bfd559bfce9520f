//! Two home nodes and one main relay as real processes on loopback: a TCP client behind home A
//! reaches an echo server behind home B, with ECH on and off, with a stale ECH config (whose
//! retry configs are not trusted), and against tampering with the ECH part on the path
//! (`common::mitm`, holding the relay's certificate, in front of the relay).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;

use common::mitm::{Attack, Mitm};
use common::{Proc, echo_server, round_trip};
use relayfed_e2e::Testbed;
use relayfed_sidecar::config::{Export, Import, MainRelay, Snapshot, base64_encode};
use relayfed_sidecar::crypto::ech::EchKeyPair;
use relayfed_sidecar::federation::ech_policy::{EchMode, EchPolicy};
use relayfed_sidecar::protocol::EchConfigList;
use relayfed_sidecar::protocol::ech_config::ListEntry;

/// One relay, a destination home (`pay`) exporting an echo server as `echo:7`, and origin
/// homes created on demand.
struct Fed {
    tb: Testbed,
    relay_cfg: std::path::PathBuf,
    relay: Proc,
    pay: Proc,
    /// What happens on the path: nothing, a bit flipped in every sealed route on the way from
    /// an origin to the relay, or ECH stripped on the way from the relay to pay.
    tamper: Tamper,
    /// The tampering relays in front of the relay (kept running).
    mitms: std::sync::Mutex<Vec<Mitm>>,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Tamper {
    None,
    FlipSealed,
    StripEch,
}

fn policy(percentage: u8, mode: EchMode) -> EchPolicy {
    EchPolicy { enabled: true, mode, percentage, ..EchPolicy::default() }
}

impl Fed {
    async fn start(tamper: Tamper) -> Fed {
        Self::start_with(tamper, true).await
    }

    async fn start_with(tamper: Tamper, ech: bool) -> Fed {
        let tb = Testbed::new("test.example").unwrap();
        let cfg = if ech { tb.main_relay("hub", 1).unwrap() } else { tb.main_relay_without_ech("hub").unwrap() };
        let relay = common::start("main-relay", &cfg, &[]).await;
        let echo = echo_server().await;
        let pay_cfg = tb
            .home("pay", Self::main_ref(&relay), vec![Export::new("echo", 7, echo)], vec![], EchPolicy::default())
            .unwrap();
        let mut mitms = Vec::new();
        if tamper == Tamper::StripEch {
            let mitm = Self::mitm(&cfg, &pay_cfg, &relay, Attack::StripOpened).await;
            let mut snap = Snapshot::load(&pay_cfg).unwrap();
            snap.main_relays[0].endpoint = mitm.addr;
            tb.save("pay", &snap).unwrap();
            mitms.push(mitm);
        }
        let pay = common::start("home", &pay_cfg, &[]).await;
        Fed { tb, relay_cfg: cfg, relay, pay, tamper, mitms: std::sync::Mutex::new(mitms) }
    }

    /// A tampering relay in front of `relay` for the home of `home_cfg`.
    async fn mitm(relay_cfg: &std::path::Path, home_cfg: &std::path::Path, relay: &Proc, attack: Attack) -> Mitm {
        let list = relay.ready["echConfigList"].as_str().and_then(relayfed_sidecar::config::base64_decode);
        let relay_snap = Snapshot::load(relay_cfg).unwrap();
        Mitm::start(&relay_snap, &Snapshot::load(home_cfg).unwrap(), relay.quic(), "hub", list.as_deref(), attack).await
    }

    fn main_ref(relay: &Proc) -> MainRelay {
        MainRelay { node_id: "hub".into(), endpoint: relay.quic(), priority: 0 }
    }

    fn relay_list(&self) -> String {
        self.relay.ready["echConfigList"].as_str().unwrap().to_owned()
    }

    /// Starts an origin home importing `echo` from `pay@hub` with `policy` and, in its config
    /// snapshot, the given ECHConfigList for `hub` (none: no config).
    async fn origin(&self, name: &str, policy: EchPolicy, ech_list: Option<String>) -> (Proc, SocketAddr) {
        let import =
            Import::fixed("echo", 7, "127.0.0.1:0".parse().unwrap(), "pay", "hub", self.tb.noise_key("pay").unwrap());
        let cfg = self.tb.home(name, Self::main_ref(&self.relay), vec![], vec![import], policy).unwrap();
        let mut snap = Snapshot::load(&cfg).unwrap();
        snap.ech_configs = ech_list.into_iter().map(|l| ("hub".to_owned(), l)).collect();
        if self.tamper == Tamper::FlipSealed {
            let mitm = Self::mitm(&self.relay_cfg, &cfg, &self.relay, Attack::FlipSealed).await;
            snap.main_relays[0].endpoint = mitm.addr;
            self.mitms.lock().unwrap().push(mitm);
        }
        let cfg = self.tb.save(name, &snap).unwrap();
        let p = common::start("home", &cfg, &[]).await;
        let addr = p.import("echo:7");
        (p, addr)
    }
}

fn pattern(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 % 251) as u8).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mebibyte_and_many_small_messages_with_ech_on_and_off() {
    let fed = Fed::start(Tamper::None).await;
    let (plain, plain_addr) = fed.origin("shop-plain", policy(0, EchMode::Opportunistic), Some(fed.relay_list())).await;
    let (sealed, sealed_addr) = fed.origin("shop-ech", policy(100, EchMode::Required), Some(fed.relay_list())).await;

    let big = pattern(1 << 20);
    for addr in [plain_addr, sealed_addr] {
        assert_eq!(round_trip(addr, &big).await.unwrap(), big, "1 MiB through {addr}");
    }

    // Many small messages on one connection, each echoed before the next is sent.
    for addr in [plain_addr, sealed_addr] {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        for i in 0..500u32 {
            let msg = format!("message {i:05} {}", "x".repeat((i % 97) as usize));
            s.write_all(msg.as_bytes()).await.unwrap();
            let mut back = vec![0u8; msg.len()];
            s.read_exact(&mut back).await.unwrap();
            assert_eq!(back, msg.as_bytes());
        }
    }

    assert_eq!(plain.metric("relayfed_proxy_ech_streams_total", &[("outcome", "attempted")]).await, 0.0);
    assert_eq!(plain.metric("relayfed_proxy_e2e_handshakes_total", &[("result", "ok")]).await, 2.0);
    assert_eq!(sealed.metric("relayfed_proxy_ech_streams_total", &[("outcome", "accepted")]).await, 2.0);
    assert_eq!(fed.relay.metric("relayfed_relay_ech_streams_total", &[("outcome", "opened")]).await, 2.0);
    assert!(
        fed.relay.metric("relayfed_transport_hop_handshakes_total", &[("role", "server"), ("result", "ok")]).await
            >= 3.0
    );
    // Every node says when its certificate expires (the testbed issues them for a year or less).
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    for node in [&plain, &sealed, &fed.relay] {
        let expiry = node.metric("relayfed_transport_certificate_expiry_timestamp_seconds", &[]).await;
        assert!(expiry > now && expiry < now + 400.0 * 86_400.0, "expiry {expiry}, now {now}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn retry_configs_for_a_stale_config_are_not_trusted_and_the_stream_fails_closed() {
    let fed = Fed::start(Tamper::None).await;
    // A config from a key the relay never had (config id 9): as after a rotation the config
    // snapshot has not caught up with. The retry configs the relay sends back arrive through
    // the path, so the origin must not seal to them.
    let stale = EchKeyPair::generate(9, "relay.test.example").unwrap();
    let list = EchConfigList { entries: vec![ListEntry::Config(stale.config().clone())] }.encode().unwrap();
    let (origin, addr) = fed.origin("shop-stale", policy(100, EchMode::Required), Some(base64_encode(&list))).await;

    for _ in 0..2 {
        let r = round_trip(addr, b"x").await;
        assert!(r.is_err() || r.unwrap().is_empty(), "no plain and no retried stream");
    }
    assert_eq!(fed.relay.metric("relayfed_relay_ech_streams_total", &[("outcome", "retry_sent")]).await, 2.0);
    assert_eq!(origin.metric("relayfed_proxy_ech_streams_total", &[("outcome", "retry_refused")]).await, 2.0);
    assert_eq!(origin.metric("relayfed_proxy_ech_streams_total", &[("outcome", "retried")]).await, 0.0);
    assert_eq!(origin.metric("relayfed_proxy_stream_errors_total", &[("code", "ECH_UNKNOWN_CONFIG")]).await, 2.0);
    assert_eq!(fed.relay.metric("relayfed_relay_ech_streams_total", &[("outcome", "opened")]).await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_flips_sealed_bytes_is_detected() {
    let fed = Fed::start(Tamper::FlipSealed).await;
    let (origin, addr) = fed.origin("shop", policy(100, EchMode::Required), Some(fed.relay_list())).await;
    let err = round_trip(addr, b"secret request").await;
    assert!(err.is_err() || err.as_ref().unwrap().is_empty(), "tampered stream must not carry data: {err:?}");
    assert_eq!(fed.relay.metric("relayfed_relay_ech_streams_total", &[("outcome", "decrypt_failed")]).await, 1.0);
    assert_eq!(origin.metric("relayfed_proxy_stream_errors_total", &[("code", "ECH_DECRYPT_FAILED")]).await, 1.0);
    assert_eq!(origin.metric("relayfed_proxy_ech_streams_total", &[("outcome", "failed")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_that_strips_ech_fails_the_noise_handshake() {
    let fed = Fed::start(Tamper::StripEch).await;
    let (origin, addr) = fed.origin("shop", policy(100, EchMode::Required), Some(fed.relay_list())).await;
    let err = round_trip(addr, b"secret request").await;
    assert!(err.is_err() || err.as_ref().unwrap().is_empty(), "downgraded stream must not carry data: {err:?}");
    assert_eq!(fed.pay.metric("relayfed_proxy_e2e_handshakes_total", &[("result", "failed")]).await, 1.0);
    assert_eq!(origin.metric("relayfed_proxy_stream_errors_total", &[("code", "HANDSHAKE_FAILED")]).await, 1.0);
    assert_eq!(origin.metric("relayfed_proxy_ech_streams_total", &[("outcome", "downgrade")]).await, 1.0);
    // Plain streams through the same relay are unaffected (it only alters sealed headers).
    let (_plain, plain_addr) = fed.origin("shop-plain", policy(0, EchMode::Opportunistic), None).await;
    assert_eq!(round_trip(plain_addr, b"hello").await.unwrap(), b"hello");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_mode_without_a_config_fails_closed_and_opportunistic_falls_back() {
    // A relay without ECH keys publishes no ECHConfigList, in config or in its view.
    let fed = Fed::start_with(Tamper::None, false).await;
    let (req, req_addr) = fed.origin("shop-req", policy(100, EchMode::Required), None).await;
    let r = round_trip(req_addr, b"x").await;
    assert!(r.is_err() || r.unwrap().is_empty());
    assert_eq!(req.metric("relayfed_proxy_stream_errors_total", &[("code", "ECH_REQUIRED")]).await, 1.0);
    let (opp, opp_addr) = fed.origin("shop-opp", policy(100, EchMode::Opportunistic), None).await;
    assert_eq!(round_trip(opp_addr, b"fallback").await.unwrap(), b"fallback");
    assert_eq!(opp.metric("relayfed_proxy_ech_streams_total", &[("outcome", "fallback")]).await, 1.0);
}
