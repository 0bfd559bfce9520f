//! `make bench-scale`: one main relay (a release-build process) holding many connected,
//! registered homes (10,000 unless `RELAYFED_SCALE_HOMES` says otherwise), then killed and
//! restarted: how long until every home is registered again, and whether any registration
//! failed. The homes are QUIC clients in this process that behave like home nodes on the
//! wire: they dial with the home's client configuration, register one service each, import
//! one, acknowledge every view, and after losing the link redial with the home's backoff
//! (`Backoff::DIAL`, full jitter). They share the 2 cores with the relay.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use relayfed_e2e::Testbed;
use relayfed_e2e::procs::{Proc, status_kib};
use relayfed_proto::backoff::{Backoff, Retry};
use relayfed_sidecar::config::Snapshot;
use relayfed_sidecar::protocol::Frame;
use relayfed_sidecar::protocol::control::{Control, Service};
use relayfed_sidecar::transport::io::{read_frame, write_frames};
use relayfed_sidecar::transport::tls::{HopIdentity, QuicIdentity, grow_receive_buffer};
use tokio::sync::mpsc;

/// What a simulated home reports.
enum Event {
    /// Its registration was answered with a complete view.
    Registered(usize),
    /// Its link ended (it will redial).
    Lost(usize),
    /// A connection was established but the registration got no view.
    Failed(String),
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

/// CPU seconds (user + system) process `pid` has used.
fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    relayfed_serving::process::cpu_seconds(&stat).unwrap()
}

/// The machine's UDP receive-buffer drops so far (`RcvbufErrors` in /proc/net/snmp).
fn udp_receive_drops() -> u64 {
    let snmp = std::fs::read_to_string("/proc/net/snmp").unwrap();
    let mut udp = snmp.lines().filter(|l| l.starts_with("Udp:"));
    let (names, values) = (udp.next().unwrap(), udp.next().unwrap());
    let at = names.split_whitespace().position(|n| n == "RcvbufErrors").unwrap();
    values.split_whitespace().nth(at).unwrap().parse().unwrap()
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() as f64 - 1.0) * p).round() as usize]
}

struct Home {
    index: usize,
    node: String,
    noise_key: String,
    config: quinn::ClientConfig,
    server_name: String,
    link_idle: Duration,
    connect_timeout: Duration,
}

/// One home's life: dial, register, acknowledge views until the link ends, back off, again.
async fn home(h: Home, endpoint: quinn::Endpoint, relay: SocketAddr, events: mpsc::UnboundedSender<Event>) {
    let mut retry = Retry::new(Backoff::DIAL);
    let connect_timeout = h.connect_timeout;
    loop {
        let conn = match endpoint.connect_with(h.config.clone(), relay, &h.server_name) {
            Ok(c) => tokio::time::timeout(connect_timeout, c).await.ok().and_then(|r| r.ok()),
            Err(_) => None,
        };
        if let Some(conn) = conn {
            match register_and_serve(&h, &conn, &events).await {
                Ok(()) => {
                    retry.succeeded();
                    let _ = events.send(Event::Lost(h.index));
                }
                Err(why) => {
                    let said = conn.close_reason().map(|r| r.to_string()).unwrap_or_default();
                    let _ = events.send(Event::Failed(format!("{why} ({said})")));
                }
            }
        }
        tokio::time::sleep(retry.next_wait()).await;
    }
}

/// Registers on `conn`, then acknowledges views and pings the relay every quarter of the
/// link idle time (closing the link when it hears nothing for that long), as a home's
/// control loop does, until the link ends; `Err` when no view came.
async fn register_and_serve(
    h: &Home,
    conn: &quinn::Connection,
    events: &mpsc::UnboundedSender<Event>,
) -> Result<(), String> {
    let (mut send, mut recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
    let reg = Control::Register {
        services: vec![Service { service: format!("svc-{}", h.index), port: 80, ech: true }],
        noise_key: h.noise_key.clone(),
        imports: Some(vec![format!("svc-{}:80", (h.index + 1) % 100)]),
        standby: false,
        attached: 0,
    };
    write_frames(&mut send, &[Frame::Control(reg)]).await.map_err(|e| e.to_string())?;
    let (frames_tx, mut frames) = mpsc::channel(4);
    let reader = tokio::spawn(async move {
        loop {
            let f = read_frame(&mut recv).await;
            let end = !matches!(f, Ok(Some(_)));
            if frames_tx.send(f).await.is_err() || end {
                break;
            }
        }
    });
    let mut tick = tokio::time::interval(h.link_idle / 4);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut heard = Instant::now();
    let mut registered = false;
    let mut ping = 0;
    let outcome = loop {
        tokio::select! {
            f = frames.recv() => {
                heard = Instant::now();
                match f {
                    Some(Ok(Some(Frame::Control(Control::View { more: false, .. })))) => {
                        if !registered {
                            registered = true;
                            let _ = events.send(Event::Registered(h.index));
                        }
                        if write_frames(&mut send, &[Frame::Control(Control::ViewAck)]).await.is_err() {
                            break Ok(());
                        }
                    }
                    Some(Ok(Some(_))) => {}
                    Some(Err(e)) if !registered => break Err(format!("{}: {e}", h.node)),
                    _ => break Ok(()),
                }
            }
            _ = tick.tick() => {
                if heard.elapsed() > h.link_idle {
                    conn.close(0u32.into(), b"liveness timeout");
                    break Ok(());
                }
                ping += 1;
                if write_frames(&mut send, &[Frame::Control(Control::Ping { id: ping })]).await.is_err() {
                    break Ok(());
                }
            }
        }
    };
    reader.abort();
    match outcome {
        Ok(()) if !registered => Err(format!("{}: the link ended before a view", h.node)),
        other => other,
    }
}

/// Counts events until every home is registered (or `limit` passes); returns the time of
/// each registration since `since` and the failures seen.
async fn until_all_registered(
    events: &mut mpsc::UnboundedReceiver<Event>,
    registered: &mut [bool],
    since: Instant,
    limit: Duration,
) -> (Vec<Duration>, Vec<String>) {
    let mut times = Vec::new();
    let mut failures = Vec::new();
    let deadline = since + limit;
    while registered.iter().any(|r| !r) {
        let Ok(Some(ev)) = tokio::time::timeout_at(deadline.into(), events.recv()).await else {
            let behind = registered.iter().filter(|r| !**r).count();
            panic!("{behind} homes not registered after {limit:?}; failures: {failures:?}");
        };
        match ev {
            Event::Registered(i) => {
                registered[i] = true;
                times.push(since.elapsed());
            }
            Event::Lost(i) => registered[i] = false,
            Event::Failed(why) => failures.push(why),
        }
    }
    times.sort();
    (times, failures)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let n: usize = std::env::var("RELAYFED_SCALE_HOMES").ok().and_then(|v| v.parse().ok()).unwrap_or(10_000);
    let link_idle = std::env::var("RELAYFED_SCALE_LINK_IDLE").unwrap_or_else(|_| "1s".into());
    assert!(!link_idle.contains(['}', ',', ' ']), "RELAYFED_SCALE_LINK_IDLE is a duration such as 5s");
    let mut crs = format!(
        "apiVersion: relayfed.io/v1alpha1\nkind: RelayFederation\nmetadata: {{name: scale, namespace: test}}\n\
         spec: {{trustDomain: scale.example, publicName: relay.scale.example, \
         mainRelays: [{{nodeId: hub, endpoint: 127.0.0.1:0}}], defaultRolloutPolicy: default}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {{name: default, namespace: test}}\n\
         spec: {{ech: {{enabled: false}}, resilience: {{timeouts: {{linkIdle: {link_idle}}}}}}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: hub, namespace: test}}\n\
         spec: {{type: main, nodeId: hub, federation: scale}}\n",
    );
    for i in 0..n {
        crs.push_str(&format!(
            "---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: h-{i}, namespace: test}}\n\
             spec: {{type: home, nodeId: h-{i}, federation: scale, mainRelays: [{{nodeId: hub}}], \
             exports: [{{name: svc-{i}, port: 80, target: 127.0.0.1:1}}]}}\n"
        ));
    }
    let prepared = Instant::now();
    let tb = Testbed::new("scale.example").unwrap();
    let files = tb.scenario(&crs, |_, _, _| "127.0.0.1:1".parse().unwrap()).unwrap();
    let (_, hub_cfg, relay) = files.mains[0].clone();
    let link_idle_ms = Snapshot::load(&hub_cfg).unwrap().timeouts.idle_ms;
    let paths: std::collections::HashMap<String, std::path::PathBuf> = files.homes.into_iter().collect();
    let mut homes = Vec::with_capacity(n);
    for i in 0..n {
        let node = format!("h-{i}");
        // Each home's identity and timeouts are the plan's, from its snapshot (its certificate
        // binds the Noise key it registers, as the relay requires).
        let snap = Snapshot::load(&paths[&node]).unwrap();
        let id = HopIdentity::load(&snap).unwrap();
        homes.push(Home {
            index: i,
            server_name: id.server_name("hub"),
            noise_key: tb.noise_key(&node).unwrap(),
            config: id.client_config(&snap.timeouts).unwrap(),
            link_idle: Duration::from_millis(snap.timeouts.idle_ms),
            connect_timeout: Duration::from_millis(snap.timeouts.connect_ms),
            node,
        });
    }
    eprintln!("scale: {n} homes prepared in {:.1} s", prepared.elapsed().as_secs_f64());

    let binary = Path::new(env!("CARGO_BIN_EXE_relayfed-proxy"));
    let mut hub = Proc::start_bin(binary, "main-relay", &hub_cfg, &[]).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let idle_rss = rss_kib(hub.child.id().unwrap());

    // The homes, spread over 16 client endpoints (one UDP socket each, with a relay's
    // receive buffer: real homes each have a socket of their own), start at once.
    let endpoints: Vec<quinn::Endpoint> = (0..16)
        .map(|_| {
            let socket = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
            grow_receive_buffer(&socket);
            let runtime = quinn::default_runtime().unwrap();
            quinn::Endpoint::new(quinn::EndpointConfig::default(), None, socket, runtime).unwrap()
        })
        .collect();
    let drops_before = udp_receive_drops();
    let (tx, mut events) = mpsc::unbounded_channel();
    let mut registered = vec![false; n];
    let cold = Instant::now();
    let cold_cpu = cpu_seconds(hub.child.id().unwrap());
    for (i, h) in homes.into_iter().enumerate() {
        tokio::spawn(home(h, endpoints[i % endpoints.len()].clone(), relay, tx.clone()));
    }
    let (cold_times, cold_failures) =
        until_all_registered(&mut events, &mut registered, cold, Duration::from_secs(300)).await;
    eprintln!("scale: {n} homes registered from a cold start in {:.1} s", cold.elapsed().as_secs_f64());
    let cold_drops = udp_receive_drops() - drops_before;
    let cold_cpu = cpu_seconds(hub.child.id().unwrap()) - cold_cpu;
    let overloaded = [("role", "server"), ("result", "overloaded")];
    let cold_refused = hub.metric("relayfed_transport_hop_handshakes_total", &overloaded).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let loaded_rss = rss_kib(hub.child.id().unwrap());

    // A crash: every home sees its link end (stateless resets or the idle timeout) and backs off.
    hub.signal("KILL").await;
    let killed = Instant::now();
    while registered.iter().any(|r| *r) {
        match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
            Ok(Some(Event::Lost(i))) => registered[i] = false,
            Ok(Some(_)) => {}
            _ => panic!("homes never noticed the relay's crash"),
        }
    }
    let noticed = killed.elapsed();
    // Restarted as a kubelet would after a crash (10 s back-off at most; here at once).
    let drops_before = udp_receive_drops();
    let restarted = Instant::now();
    let hub = Proc::start_bin(binary, "main-relay", &hub_cfg, &[]).await;
    let ready = restarted.elapsed();
    let (restart_times, restart_failures) =
        until_all_registered(&mut events, &mut registered, restarted, Duration::from_secs(120)).await;
    let restart_drops = udp_receive_drops() - drops_before;
    let restart_cpu = cpu_seconds(hub.child.id().unwrap());
    let restart_refused = hub.metric("relayfed_transport_hop_handshakes_total", &overloaded).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let restarted_rss = rss_kib(hub.child.id().unwrap());

    let per_home = |rss: u64| rss.saturating_sub(idle_rss) as f64 / n as f64;
    let ms = |d: Duration| d.as_secs_f64() * 1e3;
    println!("| measurement | result |");
    println!("|---|---|");
    println!("| homes (QUIC clients in the bench process, 16 UDP sockets; one relay process; 2 cores shared) | {n} |");
    println!(
        "| link idle timeout (RolloutPolicy `timeouts.linkIdle`; keep-alives and liveness pings every quarter of it) | {link_idle_ms} ms |"
    );
    let spread = |t: &[Duration]| {
        let last = t.last().copied().unwrap_or_default();
        format!("{:.0} / {:.0} / {:.0} ms", ms(percentile(t, 0.5)), ms(percentile(t, 0.99)), ms(last))
    };
    println!("| cold start, all homes dialing at once: registered p50 / p99 / last | {} |", spread(&cold_times));
    println!("| failed registrations, cold start | {} |", cold_failures.len());
    println!(
        "| UDP datagrams dropped for a full receive buffer (whole machine), cold start / restart | {cold_drops} / {restart_drops} |"
    );
    println!(
        "| relay RSS idle / with {n} registered homes, per home | {idle_rss} KiB / {loaded_rss} KiB, {:.1} KiB |",
        per_home(loaded_rss)
    );
    println!("| relay killed (SIGKILL): every home saw its link end after | {:.0} ms |", ms(noticed));
    println!("| restarted relay ready (process start to listening) | {:.0} ms |", ms(ready));
    println!("| restart -> homes registered again p50 / p99 / last | {} |", spread(&restart_times));
    println!("| failed registrations after the restart | {} |", restart_failures.len());
    println!(
        "| dials refused by the relay's handshake admission (256 in progress, 4,096 waiting at most 2 s; redialed after backoff), cold start / restart | {cold_refused} / {restart_refused} |"
    );
    println!(
        "| relay CPU until every home registered, cold start / restart (the rest of the 2 cores ran the {n} simulated homes) | {cold_cpu:.1} / {restart_cpu:.1} s |"
    );
    println!(
        "| relay RSS after the restart with {n} homes, per home | {restarted_rss} KiB, {:.1} KiB |",
        per_home(restarted_rss)
    );
    for f in cold_failures.iter().chain(&restart_failures).take(5) {
        eprintln!("scale: failure: {f}");
    }
}
