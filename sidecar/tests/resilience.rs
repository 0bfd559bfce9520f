//! Resilience and trust with real relays on loopback: rate limits, circuit breakers, retries
//! (and their limits), hostile input, rejectUnknown and export permissions.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::{Proc, echo_server, eventually, get, identify_server, round_trip};
use relayfed_e2e::Testbed;
use relayfed_sidecar::config::{
    Export, Import, MainRelay, PeerRelay, Permissions, RateLimit, Snapshot, Timeouts, TrustLevel,
};
use relayfed_sidecar::federation::ech_policy::EchPolicy;
use relayfed_sidecar::protocol::route::{InnerRoute, RouteBody, RouteHeader};
use relayfed_sidecar::protocol::{ErrorCode, Frame};
use relayfed_sidecar::transport::io::read_frame;
use relayfed_sidecar::transport::tls::HopIdentity;
use relayfed_sidecar::transport::tls::QuicIdentity;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const WAIT: Duration = Duration::from_secs(15);

fn edit(path: &PathBuf, f: impl FnOnce(&mut Snapshot)) {
    let mut s = Snapshot::load(path).unwrap();
    f(&mut s);
    std::fs::write(path, serde_saphyr::to_string(&s).unwrap()).unwrap();
}

fn main_ref(relay: &Proc) -> MainRelay {
    MainRelay { node_id: "hub".into(), endpoint: relay.quic(), priority: 0 }
}

fn import(service: &str, port: u16) -> Import {
    Import::resolved(service, port, "127.0.0.1:0".parse().unwrap())
}

fn dead_port() -> SocketAddr {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

async fn home(
    tb: &Testbed,
    name: &str,
    relay: &Proc,
    exports: Vec<Export>,
    imports: Vec<Import>,
    f: impl FnOnce(&mut Snapshot),
) -> Proc {
    let path = tb.home(name, main_ref(relay), exports, imports, EchPolicy::default()).unwrap();
    edit(&path, f);
    common::start("home", &path, &[]).await
}

async fn view_has(p: &Proc, n: usize) -> bool {
    p.json("/federation/registry").await["entries"].as_array().unwrap().len() == n
}

/// One relay (its snapshot edited by `relay`), `dest` exporting an echo server as `echo:7`
/// and `shop` importing it (both edited by `homes`), with shop's view listing dest. Bind every
/// field a test needs alive: the testbed holds the files, each process dies with its `Proc`.
struct EchoFed {
    tb: Testbed,
    cfg: PathBuf,
    relay: Proc,
    dest: Proc,
    shop: Proc,
}

async fn echo_fed(relay: impl FnOnce(&mut Snapshot), homes: impl Fn(&mut Snapshot)) -> EchoFed {
    let tb = Testbed::new("test.example").unwrap();
    let cfg = tb.main_relay("hub", 1).unwrap();
    edit(&cfg, relay);
    let relay = common::start("main-relay", &cfg, &[]).await;
    let echo = echo_server().await;
    let exports = vec![Export::new("echo", 7, echo)];
    let dest = home(&tb, "dest", &relay, exports, vec![], &homes).await;
    let shop = home(&tb, "shop", &relay, vec![], vec![import("echo", 7)], &homes).await;
    eventually("view", WAIT, || async { view_has(&shop, 1).await }).await;
    EchoFed { tb, cfg, relay, dest, shop }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flooding_sender_is_held_to_its_quota_while_others_succeed() {
    let tb = Testbed::new("test.example").unwrap();
    let cfg = tb.main_relay("hub", 1).unwrap();
    edit(&cfg, |s| s.resilience.rate_limit = Some(RateLimit { streams_per_second: 20.0, burst: 10.0 }));
    let relay = common::start("main-relay", &cfg, &[]).await;
    let echo = echo_server().await;
    let _dest = home(&tb, "dest", &relay, vec![Export::new("echo", 7, echo)], vec![], |_| {}).await;
    let flood = home(&tb, "flood", &relay, vec![], vec![import("echo", 7)], |_| {}).await;
    let good = home(&tb, "good", &relay, vec![], vec![import("echo", 7)], |_| {}).await;
    eventually("views", WAIT, || async { view_has(&flood, 1).await && view_has(&good, 1).await }).await;

    let started = Instant::now();
    let floods: Vec<_> = (0..300).map(|_| tokio::spawn(round_trip(flood.import("echo:7"), b"spam"))).collect();
    let mut good_ok = 0;
    for i in 0..8u32 {
        if round_trip(good.import("echo:7"), &i.to_be_bytes()).await.unwrap_or_default() == i.to_be_bytes() {
            good_ok += 1;
        }
    }
    let mut flood_ok = 0;
    for f in floods {
        if f.await.unwrap().is_ok_and(|r| r == b"spam") {
            flood_ok += 1;
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    assert_eq!(good_ok, 8, "the well-behaved sender is unaffected");
    let quota = 10.0 + 20.0 * elapsed + 1.0;
    assert!(
        (10..=quota as usize).contains(&flood_ok),
        "flood got {flood_ok} through in {elapsed:.2}s (quota {quota:.0})"
    );
    // Both sides agree on how many streams were refused for the rate, and that is most of
    // the flood (the rest succeeded within the quota; a loaded machine may time a few out).
    let limited = limited_for(&relay, "flood").await as usize;
    assert_eq!(
        relay.metric("relayfed_relay_rate_limited_streams_total", &[("sender_kind", "home")]).await as usize,
        limited,
        "only the flood was limited"
    );
    let seen_by_flood = flood.metric("relayfed_proxy_stream_errors_total", &[("code", "RATE_LIMITED")]).await as usize;
    assert!(seen_by_flood <= limited && seen_by_flood + 10 >= limited, "relay {limited}, origin {seen_by_flood}");
    assert!(
        limited + flood_ok <= 300 && limited >= 300usize.saturating_sub(quota as usize + 30),
        "{limited} limited, {flood_ok} ok"
    );
    assert_eq!(limited_for(&relay, "good").await, 0);
}

/// Streams the relay refused by rate limiting from `sender` (its `/federation/health`).
async fn limited_for(relay: &relayfed_e2e::procs::Proc, sender: &str) -> u64 {
    let health = relay.json("/federation/health").await;
    let list = health["rateLimited"].as_array().cloned().unwrap_or_default();
    list.iter().find(|e| e["sender"] == sender).and_then(|e| e["streams"].as_u64()).unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_trace_probe_flood_does_not_use_up_the_senders_real_quota() {
    let EchoFed { tb: _tb, relay, dest: _dest, shop, .. } =
        echo_fed(|s| s.resilience.rate_limit = Some(RateLimit { streams_per_second: 2.0, burst: 10.0 }), |_| {}).await;

    // 200 probes through the home's admin API (loopback), 40 at a time. Before probes had a
    // bucket of their own they took the home's 10-stream burst, and the calls below failed
    // with RATE_LIMITED.
    for _ in 0..5 {
        let batch: Vec<_> = (0..40)
            .map(|_| {
                let admin = shop.admin();
                tokio::spawn(async move { get(admin, "/federation/trace?service=echo&port=7").await })
            })
            .collect();
        for b in batch {
            let answer = b.await.unwrap().unwrap();
            assert!(answer.contains(" 200 "), "a probe was not answered: {answer}");
        }
    }
    let limited_probes = limited_for(&relay, "probe:shop").await;
    assert!(limited_probes >= 150, "the probes were held to their own quota: {limited_probes} limited");
    for i in 0..8u32 {
        assert_eq!(round_trip(shop.import("echo:7"), &i.to_be_bytes()).await.unwrap(), i.to_be_bytes(), "call {i}");
    }
    assert_eq!(limited_for(&relay, "shop").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relay_closes_a_stream_that_carries_nothing_for_its_idle_timeout() {
    // The homes keep their default (5 min) idle timeout: only the relay's can end the stream.
    let EchoFed { tb: _tb, relay, dest: _dest, shop, .. } = echo_fed(|s| s.timeouts.stream_idle_ms = 300, |_| {}).await;
    let mut client = tokio::net::TcpStream::connect(shop.import("echo:7")).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    client.read_exact(&mut back).await.unwrap();
    // Then silence: the relay closes the stream, so the client sees its connection end.
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the idle stream was not closed");
    eventually("the relay counted the idle stream", WAIT, || async {
        relay.metric("relayfed_relay_stream_errors_total", &[("code", "TIMEOUT")]).await == 1.0
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn losing_the_homes_own_link_opens_no_remote_breaker() {
    // A fixed port, so the relay can come back where the homes dial it.
    let port = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let quick = |s: &mut Snapshot| {
        s.timeouts.idle_ms = 1_500;
        s.timeouts.handshake_ms = 300;
        s.resilience.circuit_breaker.consecutive_failures = 2;
        s.resilience.retry.max_attempts = 1;
    };
    let EchoFed { tb: _tb, cfg, mut relay, dest: _dest, shop } = echo_fed(|s| s.listen = Some(port), quick).await;
    assert_eq!(round_trip(shop.import("echo:7"), b"before").await.unwrap(), b"before");

    // The relay dies: calls time out on shop's own dying link until it notices (1.5 s).
    relay.signal("KILL").await;
    for _ in 0..3 {
        assert!(round_trip(shop.import("echo:7"), b"during").await.unwrap_or_default().is_empty());
    }
    eventually("shop noticed its link is gone", WAIT, || async {
        shop.json("/federation/health").await["status"] == "disconnected"
    })
    .await;
    let relay = common::start("main-relay", &cfg, &[]).await;
    // Connected again (its registration brought a fresh view) and dest is back in it.
    eventually("shop reconnected and sees dest again", WAIT, || async {
        shop.json("/federation/health").await["status"] == "ok" && view_has(&shop, 1).await
    })
    .await;
    // The timeouts opened dest's breaker while the link was dying. Before the fix it stayed
    // open: CIRCUIT_OPEN for openMs (30 s) although dest was fine all along.
    let open_before = shop.metric("relayfed_proxy_stream_errors_total", &[("code", "CIRCUIT_OPEN")]).await;
    assert_eq!(round_trip(shop.import("echo:7"), b"after").await.unwrap(), b"after");
    assert_eq!(shop.metric("relayfed_proxy_stream_errors_total", &[("code", "CIRCUIT_OPEN")]).await, open_before);
    drop(relay);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_relayed_stream_cut_by_a_dead_destination_is_counted_as_an_error() {
    // The relay notices the dead destination's connection within 1.5 s.
    let EchoFed { tb: _tb, relay, mut dest, shop, .. } = echo_fed(|s| s.timeouts.idle_ms = 1_500, |_| {}).await;
    assert_eq!(round_trip(shop.import("echo:7"), b"whole").await.unwrap(), b"whole");
    let mut client = tokio::net::TcpStream::connect(shop.import("echo:7")).await.unwrap();
    client.write_all(b"ping").await.unwrap();
    let mut back = [0u8; 4];
    client.read_exact(&mut back).await.unwrap();
    dest.signal("KILL").await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(WAIT, client.read_to_end(&mut rest)).await.expect("the cut stream was not closed");
    eventually("the relay counted the cut stream", WAIT, || async {
        relay.metric("relayfed_relay_streams_total", &[("result", "error")]).await == 1.0
    })
    .await;
    assert_eq!(relay.metric("relayfed_relay_stream_errors_total", &[("code", "PEER_UNREACHABLE")]).await, 1.0);
    assert_eq!(relay.metric("relayfed_relay_streams_total", &[("result", "ok")]).await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_instance_trips_its_breaker_is_skipped_and_recovers_through_half_open() {
    let tb = Testbed::new("test.example").unwrap();
    let relay = common::start("main-relay", &tb.main_relay("hub", 1).unwrap(), &[]).await;
    let good = identify_server("good").await;
    let broken = dead_port();
    let _a = home(&tb, "good", &relay, vec![Export::new("svc", 1, good)], vec![], |_| {}).await;
    let _b = home(&tb, "broken", &relay, vec![Export::new("svc", 1, broken)], vec![], |_| {}).await;
    let caller = home(&tb, "caller", &relay, vec![], vec![import("svc", 1)], |s| {
        s.resilience.circuit_breaker.consecutive_failures = 2;
        s.resilience.circuit_breaker.open_ms = 1000;
        s.resilience.circuit_breaker.half_open_probes = 1;
        s.load_balancing.default = relayfed_sidecar::federation::balancer::Algorithm::RoundRobin;
    })
    .await;
    eventually("view", WAIT, || async { view_has(&caller, 2).await }).await;
    let target = [("service", "svc"), ("destination", "broken"), ("destination_main", "hub")];
    // Every call succeeds (a failed setup is retried on the other instance) ...
    for i in 0..6u32 {
        let r = round_trip(caller.import("svc:1"), &i.to_be_bytes()).await.unwrap();
        assert!(r.starts_with(b"good|"), "{r:?}");
    }
    // ... and after two failures the broken instance's circuit is open and it is skipped.
    assert_eq!(caller.metric("relayfed_proxy_circuit_state", &target).await, 1.0);
    let retries = caller.metric("relayfed_proxy_stream_retries_total", &[("code", "TARGET_UNREACHABLE")]).await;
    assert_eq!(retries, 2.0, "only the two calls that tripped the breaker needed a retry");
    // The instance comes back; after the open period one probe closes the circuit again.
    let server = tokio::spawn(async move {
        let l = tokio::net::TcpListener::bind(broken).await.unwrap();
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            tokio::spawn(async move {
                let (mut r, mut w) = s.split();
                let _ = w.write_all(b"broken|").await;
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    eventually("the circuit closes after a successful half-open probe", WAIT, || async {
        let _ = round_trip(caller.import("svc:1"), b"x").await;
        caller.metric("relayfed_proxy_circuit_state", &target).await == 0.0
    })
    .await;
    let mut seen = std::collections::HashSet::new();
    for _ in 0..4 {
        let r = round_trip(caller.import("svc:1"), b"y").await.unwrap();
        seen.insert(String::from_utf8_lossy(&r[..r.iter().position(|&b| b == b'|').unwrap()]).into_owned());
    }
    assert_eq!(seen.len(), 2, "both instances serve again: {seen:?}");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_home_whose_relay_is_down_connects_by_retry_once_it_is_up() {
    let tb = Testbed::new("test.example").unwrap();
    let relay_cfg = tb.main_relay("hub", 1).unwrap();
    let quic = std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    edit(&relay_cfg, |s| s.listen = Some(quic));
    let admin = dead_port();
    let path = tb
        .home(
            "early",
            MainRelay { node_id: "hub".into(), endpoint: quic, priority: 0 },
            vec![],
            vec![],
            EchPolicy::default(),
        )
        .unwrap();
    edit(&path, |s| {
        s.admin = Some(admin);
        s.timeouts = Timeouts { connect_ms: 200, ..Timeouts::default() };
    });
    let home = tokio::spawn(async move { common::start("home", &path, &[]).await });
    let failures = || async move {
        let Ok(mut s) = tokio::net::TcpStream::connect(admin).await else { return 0.0 };
        s.write_all(b"GET /metrics HTTP/1.0\r\n\r\n").await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        common::sample(&out, "relayfed_transport_hop_handshakes_total", &[("role", "client"), ("result", "timeout")])
    };
    eventually("two failed connection attempts", WAIT, || async { failures().await >= 2.0 }).await;
    let _relay = common::start("main-relay", &relay_cfg, &[]).await;
    let home = home.await.unwrap();
    assert_eq!(
        home.metric("relayfed_transport_hop_handshakes_total", &[("role", "client"), ("result", "ok")]).await,
        1.0
    );
    assert!(
        home.metric("relayfed_transport_hop_handshakes_total", &[("role", "client"), ("result", "timeout")]).await
            >= 2.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_delivered_bytes_is_not_retried() {
    let tb = Testbed::new("test.example").unwrap();
    let relay = common::start("main-relay", &tb.main_relay("hub", 1).unwrap(), &[]).await;
    // A target that answers part of the response and then resets the connection.
    let accepted = Arc::new(AtomicUsize::new(0));
    let l = relayfed_sidecar::transport::io::listen("127.0.0.1:0".parse().unwrap()).unwrap();
    let target = l.local_addr().unwrap();
    let a = accepted.clone();
    tokio::spawn(async move {
        loop {
            let (mut s, _) = l.accept().await.unwrap();
            a.fetch_add(1, Ordering::SeqCst);
            let mut buf = [0u8; 4];
            let _ = s.read_exact(&mut buf).await;
            let _ = s.write_all(b"partial").await;
            s.set_zero_linger().unwrap();
            drop(s);
        }
    });
    let echo = echo_server().await;
    let _bad = home(
        &tb,
        "bad",
        &relay,
        vec![Export { service: "svc".into(), port: 1, target, proxy_protocol: false }],
        vec![],
        |_| {},
    )
    .await;
    let _ok = home(&tb, "ok", &relay, vec![Export::new("svc", 1, echo)], vec![], |_| {}).await;
    let caller = home(&tb, "caller", &relay, vec![], vec![import("svc", 1)], |s| {
        s.load_balancing.default = relayfed_sidecar::federation::balancer::Algorithm::RoundRobin;
    })
    .await;
    eventually("view", WAIT, || async { view_has(&caller, 2).await }).await;
    // Round robin: the first two calls reach both instances once each.
    let mut partial = 0;
    for _ in 0..2 {
        if let Ok(r) = round_trip(caller.import("svc:1"), b"data").await
            && r == b"partial"
        {
            partial += 1;
        }
    }
    assert_eq!(accepted.load(Ordering::SeqCst), 1, "the broken target saw exactly one connection");
    assert!(partial <= 1);
    let m = caller.metrics().await;
    // Every retries series (exported with zeros from the start) stays at 0.
    let retried: Vec<&str> =
        m.lines().filter(|l| l.starts_with("relayfed_proxy_stream_retries_total{") && !l.ends_with(" 0")).collect();
    assert!(retried.is_empty(), "a stream that carried payload is never retried: {retried:?}");
    assert!(m.contains("relayfed_proxy_stream_retries_total{"), "the family is exported");
}

/// A raw client on a home's certificate, speaking frames directly to the relay.
async fn raw_client(tb: &Testbed, node: &str, relay: SocketAddr) -> Result<quinn::Connection, quinn::ConnectionError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let cert = tb.ca.issue(node, Duration::from_secs(600)).unwrap();
    let id =
        HopIdentity::from_pem(&tb.trust_domain, node, &tb.ca.certified_key().cert_pem, &cert.cert_pem, &cert.key_pem)
            .unwrap();
    let mut ep = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
    ep.set_default_client_config(id.client_config(&Timeouts::default()).unwrap());
    ep.connect(relay, &id.server_name("hub")).unwrap().await
}

async fn send_raw(conn: &quinn::Connection, bytes: &[u8]) -> Option<Frame> {
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    send.write_all(bytes).await.unwrap();
    let _ = send.finish();
    read_frame(&mut recv).await.ok().flatten()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_input_gets_documented_errors_and_the_relay_keeps_serving() {
    let tb = Testbed::new("test.example").unwrap();
    let cfg = tb.main_relay("hub", 1).unwrap();
    edit(&cfg, |s| {
        s.trust.reject_unknown = true;
        s.trust.known_nodes = vec!["dest".into(), "caller".into(), "raw".into()];
    });
    let relay = common::start("main-relay", &cfg, &[]).await;
    let echo = echo_server().await;
    let _dest = home(&tb, "dest", &relay, vec![Export::new("echo", 7, echo)], vec![], |_| {}).await;
    let caller = home(&tb, "caller", &relay, vec![], vec![import("echo", 7)], |_| {}).await;
    eventually("view", WAIT, || async { view_has(&caller, 1).await }).await;

    let conn = raw_client(&tb, "raw", relay.quic()).await.unwrap();
    let code = |f: Option<Frame>| match f {
        Some(Frame::Error(e)) => e.code,
        other => panic!("expected an ERROR frame, got {other:?}"),
    };
    // Unknown frame type, a header announcing more bytes than sent, an unknown route version,
    // garbage in a route frame, an oversized garbage frame.
    assert_eq!(code(send_raw(&conn, &[0x7f, 0, 0]).await), ErrorCode::MalformedFrame);
    assert_eq!(code(send_raw(&conn, &[0x01, 0x00, 0x40, 1, 2]).await), ErrorCode::MalformedFrame);
    let route = RouteHeader {
        hop_limit: 3,
        probe: false,
        trace_context: String::new(),
        path: vec![],
        body: RouteBody::Plain(InnerRoute {
            dest_node: "dest".into(),
            dest_main: "hub".into(),
            service: "echo".into(),
            port: 7,
            origin: "raw@hub".into(),
        }),
        grease: None,
    };
    let mut v2 = Frame::Route(route.clone()).encode().unwrap();
    v2[3] = 2;
    assert_eq!(code(send_raw(&conn, &v2).await), ErrorCode::UnsupportedVersion);
    assert_eq!(code(send_raw(&conn, &[0x01, 0x00, 0x03, 1, 3, 0x40]).await), ErrorCode::MalformedFrame);
    let mut big = vec![0x01, 0xff, 0xff, 0x01];
    big.extend(std::iter::repeat_n(0xa5, 0xfffe));
    assert_eq!(code(send_raw(&conn, &big).await), ErrorCode::MalformedFrame);
    // A route claiming another origin than the authenticated sender.
    let mut forged = route.clone();
    if let RouteBody::Plain(r) = &mut forged.body {
        r.origin = "caller@hub".into();
    }
    assert_eq!(code(send_raw(&conn, &Frame::Route(forged).encode().unwrap()).await), ErrorCode::PermissionDenied);
    // Hop limit exhausted.
    let mut spent = route.clone();
    spent.hop_limit = 0;
    assert_eq!(code(send_raw(&conn, &Frame::Route(spent).encode().unwrap()).await), ErrorCode::HopLimitExceeded);
    let m = relay.metrics().await;
    assert_eq!(common::sample(&m, "relayfed_relay_stream_errors_total", &[("code", "MALFORMED_FRAME")]), 4.0);
    assert_eq!(common::sample(&m, "relayfed_relay_stream_errors_total", &[("code", "UNSUPPORTED_VERSION")]), 1.0);

    // An unknown node (valid certificate from our CA) under rejectUnknown: refused, counted.
    let intruder = raw_client(&tb, "intruder", relay.quic()).await.unwrap();
    let err = intruder.closed().await;
    assert!(format!("{err:?}").contains("reject_unknown"), "{err:?}");
    assert_eq!(relay.metric("relayfed_relay_trust_denials_total", &[("rule", "reject_unknown")]).await, 1.0);

    // Still serving real traffic.
    assert_eq!(round_trip(caller.import("echo:7"), b"still here").await.unwrap(), b"still here");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_peer_cannot_export_what_it_is_not_permitted_to() {
    let tb = Testbed::new("test.example").unwrap();
    let a_cfg = tb.main_relay("hub-a", 1).unwrap();
    let b_cfg = tb.main_relay("hub-b", 2).unwrap();
    let (a_addr, b_addr) = (dead_udp(), dead_udp());
    let peer = |id: &str, addr: std::net::SocketAddr, level, perms| PeerRelay {
        node_id: id.into(),
        endpoint: addr.to_string(),
        fallback_endpoints: vec![],
        pin: None,
        trust_level: level,
        permissions: perms,
        rate_limit: None,
    };
    edit(&a_cfg, |s| {
        s.listen = Some(a_addr);
        s.peers = vec![peer("hub-b", b_addr, TrustLevel::Trusted, None)];
    });
    edit(&b_cfg, |s| {
        s.listen = Some(b_addr);
        s.peers = vec![peer(
            "hub-a",
            a_addr,
            TrustLevel::Verified,
            Some(Permissions { call: vec!["*".into()], export: vec!["public-*".into()] }),
        )];
    });
    let a = common::start("main-relay", &a_cfg, &[]).await;
    let b = common::start("main-relay", &b_cfg, &[]).await;
    let echo = echo_server().await;
    let exports = vec![Export::new("public-api", 1, echo), Export::new("secret-db", 2, echo)];
    let _h = home(&tb, "h", &a, exports, vec![], |s| s.main_relays[0].node_id = "hub-a".into()).await;
    eventually("hub-b learns hub-a's permitted export", WAIT, || async {
        let reg = b.json("/federation/registry").await;
        !reg["federated"].as_array().unwrap().is_empty()
    })
    .await;
    let reg = b.json("/federation/registry").await;
    let services: Vec<&str> =
        reg["federated"].as_array().unwrap().iter().map(|f| f["entry"]["service"].as_str().unwrap()).collect();
    assert_eq!(services, ["public-api"]);
    assert!(b.metric("relayfed_relay_trust_denials_total", &[("rule", "export_permission")]).await >= 1.0);
}

fn dead_udp() -> SocketAddr {
    std::net::UdpSocket::bind("127.0.0.1:0").unwrap().local_addr().unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_idle_stream_is_closed_after_the_stream_idle_timeout() {
    let tb = Testbed::new("test.example").unwrap();
    let relay = common::start("main-relay", &tb.main_relay("hub", 1).unwrap(), &[]).await;
    let echo = echo_server().await;
    let _dest = home(&tb, "dest", &relay, vec![Export::new("echo", 7, echo)], vec![], |_| {}).await;
    let caller =
        home(&tb, "caller", &relay, vec![], vec![import("echo", 7)], |s| s.timeouts.stream_idle_ms = 300).await;
    eventually("view", WAIT, || async { view_has(&caller, 1).await }).await;
    let mut s = tokio::net::TcpStream::connect(caller.import("echo:7")).await.unwrap();
    s.write_all(b"hi").await.unwrap();
    let mut back = [0u8; 2];
    s.read_exact(&mut back).await.unwrap();
    // Now silence: the sidecar closes the stream; the read ends (EOF or reset).
    let mut rest = Vec::new();
    let ended = tokio::time::timeout(WAIT, s.read_to_end(&mut rest)).await;
    assert!(ended.is_ok(), "the idle stream was not closed");
    assert_eq!(caller.metric("relayfed_proxy_stream_errors_total", &[("code", "TIMEOUT")]).await, 1.0);
    // The same code in the admin API.
    assert_eq!(caller.json("/federation/health").await["errors"]["TIMEOUT"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_encrypted_at_rest_load_with_the_passphrase_only() {
    let tb = Testbed::new("test.example").unwrap();
    let relay = common::start("main-relay", &tb.main_relay("hub", 1).unwrap(), &[]).await;
    let echo = echo_server().await;
    let path =
        tb.home("dest", main_ref(&relay), vec![Export::new("echo", 7, echo)], vec![], EchPolicy::default()).unwrap();
    let pass_file = tb.encrypt_keys("dest", "correct horse battery staple").unwrap();
    let key_file = Snapshot::load(&path).unwrap().tls.key_file;
    let on_disk = std::fs::read_to_string(&key_file).unwrap();
    assert!(!on_disk.contains("PRIVATE KEY") && on_disk.contains("sealed-key/v1"), "the TLS key is not in clear");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&key_file).unwrap().permissions().mode() & 0o777, 0o600);
    }
    // With the passphrase the node starts and serves.
    let dest = common::start("home", &path, &[]).await;
    let caller = home(&tb, "caller", &relay, vec![], vec![import("echo", 7)], |_| {}).await;
    eventually("view", WAIT, || async { view_has(&caller, 1).await }).await;
    assert_eq!(round_trip(caller.import("echo:7"), b"sealed keys").await.unwrap(), b"sealed keys");
    drop(dest);
    // With a wrong passphrase it refuses to start, saying why (and never prints the secret).
    std::fs::write(&pass_file, "wrong\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_relayfed-proxy"))
        .args(["home", "--config"])
        .arg(&path)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("wrong passphrase"), "{stderr}");
    assert!(!stderr.contains("correct horse"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_stalls_after_noise_message_1_releases_the_target_within_the_handshake_timeout() {
    use relayfed_sidecar::crypto::noise::{Initiator, StaticKeypair, prologue};
    let tb = Testbed::new("test.example").unwrap();
    let relay = common::start("main-relay", &tb.main_relay("hub", 1).unwrap(), &[]).await;
    // The exported target: a listener that reports each connection's end.
    let target = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let target_addr = target.local_addr().unwrap();
    let exports = vec![Export::new("db", 5432, target_addr)];
    let _dest = home(&tb, "dest", &relay, exports, vec![], |s| s.timeouts.handshake_ms = 500).await;
    let conn = raw_client(&tb, "raw", relay.quic()).await.unwrap();
    let inner = InnerRoute {
        dest_node: "dest".into(),
        dest_main: "hub".into(),
        service: "db".into(),
        port: 5432,
        origin: "raw@hub".into(),
    };
    let route = RouteHeader {
        hop_limit: 3,
        probe: false,
        trace_context: String::new(),
        path: vec![],
        body: RouteBody::Plain(inner.clone()),
        grease: None,
    };
    let remote: [u8; 32] =
        relayfed_sidecar::config::base64_decode(&tb.noise_key("dest").unwrap()).unwrap().try_into().unwrap();
    let me = StaticKeypair::generate().unwrap();
    let (_init, msg1) = Initiator::start(&me, &remote, &prologue(None, &inner).unwrap()).unwrap();
    let (mut send, mut recv) = conn.open_bi().await.unwrap();
    let mut bytes = Frame::Route(route).encode().unwrap();
    bytes.extend(Frame::Noise(msg1).encode().unwrap());
    send.write_all(&bytes).await.unwrap();
    // A valid message 1 makes the responder open the target; then the initiator stalls.
    let (mut backend, _) = tokio::time::timeout(WAIT, target.accept()).await.unwrap().unwrap();
    assert!(matches!(read_frame(&mut recv).await, Ok(Some(Frame::Noise(_)))), "expected Noise message 2");
    let started = Instant::now();
    let mut buf = [0u8; 1];
    let closed = tokio::time::timeout(WAIT, backend.read(&mut buf)).await;
    assert!(matches!(closed, Ok(Ok(0)) | Ok(Err(_))), "the target connection was held for a stalled stream");
    assert!(started.elapsed() < Duration::from_secs(5), "released after {:?}", started.elapsed());
    match read_frame(&mut recv).await {
        Ok(Some(Frame::Error(e))) => assert_eq!(e.code, ErrorCode::Timeout),
        other => panic!("expected ERROR TIMEOUT, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_home_backs_off_and_logs_the_relays_reason() {
    let tb = Testbed::new("test.example").unwrap();
    let cfg = tb.main_relay("hub", 1).unwrap();
    edit(&cfg, |s| {
        s.trust.reject_unknown = true;
        s.trust.known_nodes = vec!["someone-else".into()];
    });
    let relay = common::start("main-relay", &cfg, &[]).await;
    let path = tb.home("stranger", main_ref(&relay), vec![], vec![], EchPolicy::default()).unwrap();
    // Never ready (no relay takes it), so started by hand with its log captured.
    let log = tb.dir.join("stranger.log");
    let mut child = tokio::process::Command::new(env!("CARGO_BIN_EXE_relayfed-proxy"))
        .args(["home", "--config"])
        .arg(&path)
        .env("RELAYFED_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let denials = || async { relay.metric("relayfed_relay_trust_denials_total", &[("rule", "reject_unknown")]).await };
    eventually("the first refusal", WAIT, || async { denials().await >= 1.0 }).await;
    let first = denials().await;
    // A measurement window, not a synchronisation: without backoff this was ~60 dials.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let dials = denials().await - first;
    let _ = child.kill().await;
    assert!(dials <= 12.0, "{dials} redials in 3 s after a refusal: no backoff");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("relay_said") && text.contains("reject_unknown"), "the home's log does not say why:\n{text}");
}
