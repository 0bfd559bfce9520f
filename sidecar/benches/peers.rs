//! relayfed next to its peers on one network-namespace topology (`make bench-peers`, root).
//!
//! ```text
//!   ns rfp-a (10.77.1.2) ---- ns rfp-r (10.77.1.1 | 10.77.2.1) ---- ns rfp-b (10.77.2.2)
//!   client side               relays / router                       server side
//! ```
//!
//! Every path carries the same traffic from `rfp-a` to the same servers in `rfp-b` (iperf3 for
//! throughput, this program's 1 KiB request/response server for latency and setup):
//!
//! - direct: routed by the kernel in `rfp-r`, no encryption;
//! - stunnel4: TLS hop by hop, a client stunnel in `a`, one (or two) relaying stunnels in `r`
//!   (TLS in, TLS out), a server stunnel in `b`;
//! - boringtun: a WireGuard tunnel `a` <-> `b` (userspace), routed by `r`;
//! - Nebula: an overlay of two hosts `a` and `b` (Noise, AES-256-GCM, TUN devices), routed
//!   by `r`, no lighthouse (each host's underlay address given);
//! - relayfed: a home in `a`, one main relay (or two, peered) in `r`, a home in `b` (Noise end
//!   to end inside QUIC hops), plain and ECH.
//!
//! Runs are interleaved (every path once per round, three rounds) and each figure is given as
//! the median with the range. Output: a Markdown section on stdout. Subcommands (this binary
//! re-executed inside a namespace): `rpc-server PORT`, `rpc ADDR RATE SECONDS`, `setup ADDR N`.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relayfed_e2e::Testbed;
use relayfed_e2e::procs::status_kib;
use serde_json::Value;

const NS: [&str; 3] = ["rfp-a", "rfp-r", "rfp-b"];
const IPERF_PORT: u16 = 5201;
const RPC_PORT: u16 = 7007;
const ROUNDS: usize = 3;
const SECONDS: u64 = 4;
/// Requests per second of the latency run (one connection, 1 KiB each way).
const RPC_RATE: u64 = 500;

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("rpc-server") => return rpc_server(args[2].parse().unwrap()),
        Some("rpc") => return rpc_client(args[2].parse().unwrap(), args[3].parse().unwrap(), args[4].parse().unwrap()),
        Some("setup") => return setup_client(args[2].parse().unwrap(), args[3].parse().unwrap()),
        _ => {}
    }
    let _ = rustls::crypto::ring::default_provider().install_default();
    let tools = Tools::find();
    let topo = Topology::create();
    // The servers (stopped with the topology).
    topo.spawn("rfp-b", Path::new("iperf3"), &["-s", "-p", &IPERF_PORT.to_string()]);
    topo.spawn("rfp-b", &std::env::current_exe().unwrap(), &["rpc-server", &RPC_PORT.to_string()]);
    wait_tcp("rfp-b", "10.77.2.2", IPERF_PORT);
    wait_tcp("rfp-b", "10.77.2.2", RPC_PORT);

    // RELAYFED_PEERS_ONLY=<word>: only the paths whose kind contains it (while iterating).
    let only = std::env::var("RELAYFED_PEERS_ONLY").unwrap_or_default();
    let wanted = |kind: &str| kind.contains(only.as_str());
    let mut paths: Vec<Box<dyn PathUnderTest>> = Vec::new();
    if wanted("direct") {
        paths.push(Box::new(Direct));
    }
    if wanted("stunnel") {
        paths.push(Box::new(Stunnel::start(&topo, &tools, 1)));
        paths.push(Box::new(Stunnel::start(&topo, &tools, 2)));
    }
    match &tools.boringtun {
        Some(bt) if wanted("boringtun") => paths.push(Box::new(Boringtun::start(&topo, bt))),
        Some(_) => {}
        None => eprintln!("boringtun-cli not found (make bench-peers builds it): its rows are left out"),
    }
    match &tools.nebula {
        Some(n) if wanted("nebula") => match Nebula::start(&topo, n) {
            Some(path) => paths.push(Box::new(path)),
            // Seen once after the stunnel and boringtun paths had started (alone it comes up):
            // the row is left out rather than the whole run lost.
            None => eprintln!("Nebula's overlay did not come up in 20 s: its row is left out"),
        },
        Some(_) => {}
        None => eprintln!("nebula not found (apt-get install nebula): its row is left out"),
    }
    if wanted("relayfed") {
        for (relays, ech) in [(1, false), (1, true), (2, false)] {
            paths.push(Box::new(Relayfed::start(&topo, relays, ech)));
        }
    }
    let idle: Vec<u64> = paths.iter().map(|p| p.pids().iter().map(|&pid| rss_kib(pid)).sum()).collect();

    let mut results: Vec<Results> = paths.iter().map(|_| Results::default()).collect();
    for round in 0..ROUNDS {
        for (p, r) in paths.iter().zip(results.iter_mut()) {
            eprintln!("round {}: {}", round + 1, p.name());
            let (iperf, rpc_addr) = p.targets();
            let cpu0 = cpu_seconds(&p.pids());
            let (mbps, bytes) = iperf3(&iperf, 1);
            let cpu = cpu_seconds(&p.pids()) - cpu0;
            r.one.push(mbps);
            if !p.pids().is_empty() {
                r.cpu_per_gb.push(cpu / (bytes / 1e9));
            }
            r.eight.push(iperf3(&iperf, 8).0);
            let (p50, p99) = rpc(&rpc_addr);
            r.p50.push(p50);
            r.p99.push(p99);
            r.setup.push(setup(&rpc_addr));
        }
    }
    // The processes' peaks together, and the largest one's.
    let peak: Vec<(u64, u64)> = paths
        .iter()
        .map(|p| {
            let each: Vec<u64> = p.pids().iter().map(|&pid| hwm_kib(pid)).collect();
            (each.iter().sum(), each.iter().copied().max().unwrap_or(0))
        })
        .collect();
    let bound = CryptoBound::measure();
    print_table(&paths, &results, &idle, &peak, &bound);
    drop(paths);
}

/// Programs the other paths need.
struct Tools {
    stunnel: PathBuf,
    boringtun: Option<PathBuf>,
    /// `nebula` and `nebula-cert`, side by side.
    nebula: Option<PathBuf>,
}

impl Tools {
    fn find() -> Self {
        let which = |name: &str| -> Option<PathBuf> {
            std::env::var_os("PATH")?.to_str()?.split(':').map(|d| Path::new(d).join(name)).find(|p| p.is_file())
        };
        let stunnel = which("stunnel4").or_else(|| which("stunnel")).expect("stunnel4 (apt-get install stunnel4)");
        assert!(which("iperf3").is_some(), "iperf3 (apt-get install iperf3)");
        let boringtun = std::env::var_os("RELAYFED_BORINGTUN").map(PathBuf::from).or_else(|| which("boringtun-cli"));
        if boringtun.is_some() {
            assert!(which("wg").is_some(), "wg (apt-get install wireguard-tools) configures boringtun");
        }
        let nebula = which("nebula").filter(|_| which("nebula-cert").is_some());
        Self { stunnel, boringtun, nebula }
    }
}

/// The namespaces; deleted (with every process started in them) when dropped.
struct Topology {
    dir: PathBuf,
    children: std::sync::Mutex<Vec<u32>>,
}

fn sh(cmd: &str) {
    let ok = Command::new("sh").args(["-c", cmd]).status().map(|s| s.success()).unwrap_or(false);
    assert!(ok, "failed: {cmd}");
}

impl Topology {
    fn create() -> Self {
        for ns in NS {
            let _ = Command::new("ip").args(["netns", "del", ns]).stderr(Stdio::null()).status();
            sh(&format!("ip netns add {ns} && ip -n {ns} link set lo up"));
        }
        sh("ip link add rfp-a0 netns rfp-a type veth peer name rfp-ra netns rfp-r");
        sh("ip link add rfp-b0 netns rfp-b type veth peer name rfp-rb netns rfp-r");
        sh("ip -n rfp-a addr add 10.77.1.2/24 dev rfp-a0 && ip -n rfp-a link set rfp-a0 up");
        sh("ip -n rfp-b addr add 10.77.2.2/24 dev rfp-b0 && ip -n rfp-b link set rfp-b0 up");
        sh("ip -n rfp-r addr add 10.77.1.1/24 dev rfp-ra && ip -n rfp-r link set rfp-ra up");
        sh("ip -n rfp-r addr add 10.77.2.1/24 dev rfp-rb && ip -n rfp-r link set rfp-rb up");
        sh("ip -n rfp-a route add default via 10.77.1.1 && ip -n rfp-b route add default via 10.77.2.1");
        sh("ip netns exec rfp-r sysctl -qw net.ipv4.ip_forward=1");
        let dir = std::env::temp_dir().join(format!("relayfed-peers-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        Self { dir, children: Default::default() }
    }

    /// Starts `program args` in `ns`; its pid is the program's (`ip netns exec` execs it).
    fn spawn(&self, ns: &str, program: &Path, args: &[&str]) -> u32 {
        self.spawn_piped(ns, program, args, Stdio::null()).id()
    }

    fn spawn_piped(&self, ns: &str, program: &Path, args: &[&str], stdout: Stdio) -> Child {
        let mut children = self.children.lock().unwrap();
        let log = std::fs::File::create(self.log(children.len())).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .stdout(stdout)
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", program.display()));
        children.push(child.id());
        child
    }

    /// The stderr of the `n`th process started.
    fn log(&self, n: usize) -> PathBuf {
        self.dir.join(format!("process-{n}.log"))
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for pid in self.children.lock().unwrap().iter() {
            let _ = Command::new("kill").arg(pid.to_string()).status();
        }
        std::thread::sleep(Duration::from_millis(300));
        for pid in self.children.lock().unwrap().iter() {
            let _ = Command::new("kill").args(["-9", &pid.to_string()]).stderr(Stdio::null()).status();
        }
        for ns in NS {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Whether `host:port` accepts a TCP connection from `ns` within 20 s.
fn reachable(ns: &str, host: &str, port: u16) -> bool {
    let deadline = Instant::now() + Duration::from_secs(20);
    while Instant::now() < deadline {
        let probe = format!("exec 3<>/dev/tcp/{host}/{port}");
        if Command::new("ip")
            .args(["netns", "exec", ns, "bash", "-c", &probe])
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
        {
            return true;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    false
}

/// Waits until `host:port` accepts a TCP connection from `ns`.
fn wait_tcp(ns: &str, host: &str, port: u16) {
    if reachable(ns, host, port) {
        return;
    }
    // What the processes started so far said (the topology's directory goes with it).
    let dir = std::env::temp_dir().join(format!("relayfed-peers-{}", std::process::id()));
    for entry in std::fs::read_dir(&dir).into_iter().flatten().flatten() {
        let text = std::fs::read_to_string(entry.path()).unwrap_or_default();
        if entry.path().extension().is_some_and(|e| e == "log") && !text.is_empty() {
            eprintln!("--- {}\n{}", entry.path().display(), text.lines().rev().take(15).collect::<Vec<_>>().join("\n"));
        }
    }
    panic!("{host}:{port} never accepted a connection from {ns}");
}

/// One way from `rfp-a` to the servers in `rfp-b`.
trait PathUnderTest {
    fn name(&self) -> String;
    /// Where a client in `rfp-a` connects for iperf3 and for the RPC server.
    fn targets(&self) -> (SocketAddr, SocketAddr);
    /// The processes of the path (their CPU time and memory are its cost).
    fn pids(&self) -> Vec<u32>;
    /// AEAD passes over each byte: (ChaCha20-Poly1305, AES-GCM).
    fn aead_passes(&self) -> (f64, f64);
}

/// The iperf3 and RPC servers at `ip`.
fn servers_at(ip: [u8; 4]) -> (SocketAddr, SocketAddr) {
    (SocketAddr::from((ip, IPERF_PORT)), SocketAddr::from((ip, RPC_PORT)))
}

struct Direct;

impl PathUnderTest for Direct {
    fn name(&self) -> String {
        "direct (routed, no encryption)".into()
    }
    fn targets(&self) -> (SocketAddr, SocketAddr) {
        servers_at([10, 77, 2, 2])
    }
    fn pids(&self) -> Vec<u32> {
        vec![]
    }
    fn aead_passes(&self) -> (f64, f64) {
        (0.0, 0.0)
    }
}

/// stunnel4: TLS 1.3 on every hop, `relays` relaying stunnels in `rfp-r`.
struct Stunnel {
    relays: usize,
    pids: Vec<u32>,
    base: u16,
}

impl Stunnel {
    fn start(topo: &Topology, tools: &Tools, relays: usize) -> Self {
        let ca = relayfed_proto::crypto::ca::FederationCa::generate("peers.example").unwrap();
        let cert = ca.issue("stunnel", Duration::from_secs(86_400)).unwrap();
        let pem = topo.dir.join(format!("stunnel-{relays}.pem"));
        std::fs::write(&pem, format!("{}{}", cert.cert_pem, cert.key_pem)).unwrap();
        let base = 6000 + relays as u16 * 100;
        let global = "foreground = yes\npid =\nsyslog = no\nsocket = l:TCP_NODELAY=1\nsocket = r:TCP_NODELAY=1\n";
        let write = |name: &str, body: String| {
            let path = topo.dir.join(format!("stunnel-{relays}-{name}.conf"));
            std::fs::write(&path, format!("{global}{body}")).unwrap();
            path
        };
        let mut pids = Vec::new();
        // Two services per stunnel: iperf3 (ports base + hop) and rpc (base + 50 + hop).
        let svc = |off: u16, hop: u16| base + off + hop;
        // Server side: TLS in from the last relay, plain to the servers.
        let server = write(
            "server",
            [(0, IPERF_PORT), (50, RPC_PORT)]
                .map(|(off, target)| {
                    format!(
                        "[s{off}]\ncert = {}\naccept = 10.77.2.2:{}\nconnect = 127.0.0.1:{target}\n",
                        pem.display(),
                        svc(off, 9)
                    )
                })
                .concat(),
        );
        pids.push(topo.spawn("rfp-b", &tools.stunnel, &[server.to_str().unwrap()]));
        // Relays: TLS in, TLS out; relay i listens on hop i and forwards to hop i+1 (the last to
        // the server).
        for i in 1..=relays as u16 {
            let listen = if i == 1 { "10.77.1.1".to_owned() } else { "127.0.0.1".to_owned() };
            let body = [0u16, 50]
                .map(|off| {
                    let next = if i as usize == relays {
                        format!("10.77.2.2:{}", svc(off, 9))
                    } else {
                        format!("127.0.0.1:{}", svc(off, i + 1))
                    };
                    format!(
                        "[in{off}]\ncert = {pem}\naccept = {listen}:{}\nconnect = 127.0.0.1:{}\n\
                         [out{off}]\nclient = yes\naccept = 127.0.0.1:{}\nconnect = {next}\n",
                        svc(off, i),
                        svc(off, 20 + i),
                        svc(off, 20 + i),
                        pem = pem.display()
                    )
                })
                .concat();
            let conf = write(&format!("relay{i}"), body);
            pids.push(topo.spawn("rfp-r", &tools.stunnel, &[conf.to_str().unwrap()]));
        }
        // Client side: plain in, TLS out to the first relay.
        let client = write(
            "client",
            [0u16, 50]
                .map(|off| {
                    format!(
                        "[c{off}]\nclient = yes\naccept = 127.0.0.1:{}\nconnect = 10.77.1.1:{}\n",
                        svc(off, 40),
                        svc(off, 1)
                    )
                })
                .concat(),
        );
        pids.push(topo.spawn("rfp-a", &tools.stunnel, &[client.to_str().unwrap()]));
        let s = Self { relays, pids, base };
        wait_tcp("rfp-a", "127.0.0.1", s.base + 40);
        s
    }
}

impl PathUnderTest for Stunnel {
    fn name(&self) -> String {
        format!("stunnel4, {} relay{}", self.relays, if self.relays > 1 { "s" } else { "" })
    }
    fn targets(&self) -> (SocketAddr, SocketAddr) {
        (SocketAddr::from(([127, 0, 0, 1], self.base + 40)), SocketAddr::from(([127, 0, 0, 1], self.base + 90)))
    }
    fn pids(&self) -> Vec<u32> {
        self.pids.clone()
    }
    fn aead_passes(&self) -> (f64, f64) {
        // Each TLS hop: one seal, one open.
        (0.0, 2.0 * (self.relays as f64 + 1.0))
    }
}

/// boringtun: WireGuard between `rfp-a` and `rfp-b`, routed by `rfp-r`.
struct Boringtun {
    pids: Vec<u32>,
}

impl Boringtun {
    fn start(topo: &Topology, bt: &Path) -> Self {
        let key = || {
            let out = Command::new("wg").arg("genkey").output().unwrap();
            let private = String::from_utf8(out.stdout).unwrap().trim().to_owned();
            let mut p = Command::new("wg").arg("pubkey").stdin(Stdio::piped()).stdout(Stdio::piped()).spawn().unwrap();
            std::io::Write::write_all(p.stdin.as_mut().unwrap(), private.as_bytes()).unwrap();
            let public = String::from_utf8(p.wait_with_output().unwrap().stdout).unwrap().trim().to_owned();
            (private, public)
        };
        let (ka, kb) = (key(), key());
        let mut pids = Vec::new();
        for (ns, dev, own, peer, addr, endpoint, peer_addr) in [
            ("rfp-a", "rfpwga", &ka, &kb, "10.78.0.1/24", "10.77.2.2:51820", "10.78.0.2/32"),
            ("rfp-b", "rfpwgb", &kb, &ka, "10.78.0.2/24", "10.77.1.2:51820", "10.78.0.1/32"),
        ] {
            let pid = topo.spawn(ns, bt, &[dev, "--foreground", "--disable-drop-privileges", "--threads", "2"]);
            pids.push(pid);
            let sock = format!("/var/run/wireguard/{dev}.sock");
            let deadline = Instant::now() + Duration::from_secs(10);
            while !Path::new(&sock).exists() {
                assert!(Instant::now() < deadline, "boringtun never created {sock}");
                std::thread::sleep(Duration::from_millis(20));
            }
            let keyfile = topo.dir.join(format!("{dev}.key"));
            std::fs::write(&keyfile, &own.0).unwrap();
            sh(&format!(
                "ip netns exec {ns} wg set {dev} listen-port 51820 private-key {} peer {} endpoint {endpoint} allowed-ips {peer_addr}",
                keyfile.display(),
                peer.1
            ));
            sh(&format!("ip -n {ns} addr add {addr} dev {dev} && ip -n {ns} link set {dev} up"));
        }
        wait_tcp("rfp-a", "10.78.0.2", RPC_PORT);
        Self { pids }
    }
}

impl PathUnderTest for Boringtun {
    fn name(&self) -> String {
        "boringtun (WireGuard, routed)".into()
    }
    fn targets(&self) -> (SocketAddr, SocketAddr) {
        servers_at([10, 78, 0, 2])
    }
    fn pids(&self) -> Vec<u32> {
        self.pids.clone()
    }
    fn aead_passes(&self) -> (f64, f64) {
        (2.0, 0.0)
    }
}

/// Nebula: hosts `a` (overlay 10.79.0.1) and `b` (10.79.0.2) of one CA, each told the
/// other's underlay address (no lighthouse), routed by `rfp-r`.
struct Nebula {
    pids: Vec<u32>,
}

impl Nebula {
    /// Starts both hosts; `None` when the overlay does not carry a connection in time.
    fn start(topo: &Topology, nebula: &Path) -> Option<Self> {
        let cert = nebula.with_file_name("nebula-cert");
        let dir = topo.dir.join("nebula");
        std::fs::create_dir_all(&dir).unwrap();
        let d = dir.display();
        sh(&format!("cd {d} && {} ca -name relayfed-bench", cert.display()));
        let hosts = [("a", "rfp-a", "10.79.0.1", "rfpneba"), ("b", "rfp-b", "10.79.0.2", "rfpnebb")];
        let underlay = |host: &str| if host == "a" { "10.77.1.2" } else { "10.77.2.2" };
        let mut pids = Vec::new();
        for (i, (host, ns, ip, dev)) in hosts.iter().enumerate() {
            sh(&format!("cd {d} && {} sign -name {host} -ip {ip}/24", cert.display()));
            let (other, other_ip) = if i == 0 { ("b", hosts[1].2) } else { ("a", hosts[0].2) };
            let config = format!(
                "pki: {{ca: {d}/ca.crt, cert: {d}/{host}.crt, key: {d}/{host}.key}}\n\
                 static_host_map: {{\"{other_ip}\": [\"{}:4242\"]}}\n\
                 lighthouse: {{am_lighthouse: false, hosts: []}}\n\
                 listen: {{host: 0.0.0.0, port: 4242}}\n\
                 punchy: {{punch: false}}\n\
                 tun: {{dev: {dev}, mtu: 1300}}\n\
                 logging: {{level: warning}}\n\
                 firewall:\n  outbound: [{{port: any, proto: any, host: any}}]\n  inbound: [{{port: any, proto: any, host: any}}]\n",
                underlay(other)
            );
            let path = dir.join(format!("{host}.yml"));
            std::fs::write(&path, config).unwrap();
            pids.push(topo.spawn(ns, nebula, &["-config", path.to_str().unwrap()]));
        }
        reachable("rfp-a", "10.79.0.2", RPC_PORT).then_some(Self { pids })
    }
}

impl PathUnderTest for Nebula {
    fn name(&self) -> String {
        "Nebula (overlay, routed)".into()
    }
    fn targets(&self) -> (SocketAddr, SocketAddr) {
        servers_at([10, 79, 0, 2])
    }
    fn pids(&self) -> Vec<u32> {
        self.pids.clone()
    }
    fn aead_passes(&self) -> (f64, f64) {
        (0.0, 2.0)
    }
}

/// relayfed: home `shop` in `rfp-a`, one or two main relays in `rfp-r`, home `pay` in `rfp-b`.
struct Relayfed {
    relays: usize,
    ech: bool,
    pids: Vec<u32>,
    imports: (SocketAddr, SocketAddr),
}

impl Relayfed {
    fn start(topo: &Topology, relays: usize, ech: bool) -> Self {
        let base = 7100 + (relays as u16) * 20 + u16::from(ech) * 10;
        let pay_main = if relays == 2 { "hub-b" } else { "hub-a" };
        let crs = format!(
            "apiVersion: relayfed.io/v1alpha1\nkind: RelayFederation\nmetadata: {{name: peers, namespace: test}}\n\
             spec:\n  trustDomain: peers.example\n  publicName: relay.peers.example\n  defaultRolloutPolicy: default\n  \
             mainRelays:\n    - {{nodeId: hub-a, endpoint: \"10.77.1.1:{base}\"}}\n    - {{nodeId: hub-b, endpoint: \"10.77.2.1:{}\"}}\n\
             ---\napiVersion: relayfed.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {{name: default, namespace: test}}\n\
             spec:\n  ech: {{enabled: true, mode: opportunistic, percentage: {}}}\n  resilience:\n    timeouts: {{linkIdle: 30s}}\n\
             ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: hub-a, namespace: test}}\nspec: {{type: main, nodeId: hub-a, federation: peers}}\n\
             ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: hub-b, namespace: test}}\nspec: {{type: main, nodeId: hub-b, federation: peers}}\n\
             ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: shop, namespace: test}}\n\
             spec: {{type: home, nodeId: shop, federation: peers, mainRelays: [{{nodeId: hub-a}}], \
             imports: [{{name: iperf, port: {IPERF_PORT}, listen: \"127.0.0.1:{}\"}}, {{name: rpc, port: {RPC_PORT}, listen: \"127.0.0.1:{}\"}}]}}\n\
             ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: pay, namespace: test}}\n\
             spec: {{type: home, nodeId: pay, federation: peers, mainRelays: [{{nodeId: {pay_main}}}], \
             exports: [{{name: iperf, port: {IPERF_PORT}, target: \"127.0.0.1:1\"}}, {{name: rpc, port: {RPC_PORT}, target: \"127.0.0.1:1\"}}]}}\n",
            base + 5,
            if ech { 100 } else { 0 },
            base + 50,
            base + 51,
        );
        let tb = Testbed::new("peers.example").unwrap();
        let files = tb
            .scenario(&crs, |_, service, _| {
                let port = if service == "iperf" { IPERF_PORT } else { RPC_PORT };
                SocketAddr::from(([10, 77, 2, 2], port))
            })
            .unwrap();
        let proxy = Path::new(env!("CARGO_BIN_EXE_relayfed-proxy"));
        let mut pids = Vec::new();
        let mains: Vec<&(String, PathBuf, SocketAddr)> =
            files.mains.iter().filter(|(id, _, _)| relays == 2 || id == "hub-a").collect();
        for (_, path, _) in mains {
            pids.push(start_node(topo, "rfp-r", proxy, "main-relay", path).0);
        }
        let home = |id: &str| files.homes.iter().find(|(h, _)| h == id).unwrap().1.clone();
        pids.push(start_node(topo, "rfp-b", proxy, "home", &home("pay")).0);
        let (shop, _) = start_node(topo, "rfp-a", proxy, "home", &home("shop"));
        pids.push(shop);
        let imports = (SocketAddr::from(([127, 0, 0, 1], base + 50)), SocketAddr::from(([127, 0, 0, 1], base + 51)));
        // The path is up once a call goes through (the registry reached shop).
        let deadline = Instant::now() + Duration::from_secs(30);
        while !rpc_once("rfp-a", imports.1) {
            assert!(Instant::now() < deadline, "relayfed path ({relays} relays) never carried a call");
            std::thread::sleep(Duration::from_millis(100));
        }
        Self { relays, ech, pids, imports }
    }
}

/// Starts a relayfed node in `ns` and waits for its ready line.
fn start_node(topo: &Topology, ns: &str, proxy: &Path, mode: &str, config: &Path) -> (u32, Value) {
    use std::io::BufRead;
    let mut child = topo.spawn_piped(ns, proxy, &[mode, "--config", config.to_str().unwrap()], Stdio::piped());
    let log = topo.log(topo.children.lock().unwrap().len() - 1);
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let Some(Ok(line)) = lines.next() else {
            let _ = child.wait();
            panic!(
                "{} exited before its ready line: {}",
                config.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        };
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["event"] == "ready"
        {
            // Keep draining stdout so the node never blocks on a full pipe.
            std::thread::spawn(move || for _ in lines {});
            return (child.id(), v);
        }
    }
}

/// Whether one RPC through `addr` (from `ns`) succeeds.
fn rpc_once(ns: &str, addr: SocketAddr) -> bool {
    this_in(ns, &["setup", &addr.to_string(), "1"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

impl PathUnderTest for Relayfed {
    fn name(&self) -> String {
        format!(
            "relayfed, {} relay{}{}",
            self.relays,
            if self.relays > 1 { "s" } else { "" },
            if self.ech { ", ECH" } else { ", plain" }
        )
    }
    fn targets(&self) -> (SocketAddr, SocketAddr) {
        self.imports
    }
    fn pids(&self) -> Vec<u32> {
        self.pids.clone()
    }
    fn aead_passes(&self) -> (f64, f64) {
        // Noise end to end (seal at one home, open at the other) and a QUIC seal and open per hop.
        (2.0, 2.0 * (self.relays as f64 + 1.0))
    }
}

/// iperf3 from `rfp-a` to `target` with `streams` parallel streams: received MB/s and bytes.
fn iperf3(target: &SocketAddr, streams: usize) -> (f64, f64) {
    let out = Command::new("ip")
        .args(["netns", "exec", "rfp-a", "iperf3", "-J", "-c"])
        .arg(target.ip().to_string())
        .args(["-p", &target.port().to_string(), "-t", &SECONDS.to_string(), "-P", &streams.to_string()])
        .output()
        .unwrap();
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
    let sum = &v["end"]["sum_received"];
    let bytes = sum["bytes"].as_f64().unwrap_or(0.0);
    assert!(bytes > 0.0, "iperf3 to {target} carried nothing: {}", String::from_utf8_lossy(&out.stdout));
    (sum["bits_per_second"].as_f64().unwrap_or(0.0) / 8e6, bytes)
}

/// 1 KiB request/response at [`RPC_RATE`] over one connection: p50 and p99 in µs.
fn rpc(target: &SocketAddr) -> (f64, f64) {
    let out = self_in("rfp-a", &["rpc", &target.to_string(), &RPC_RATE.to_string(), "3"]);
    let v: Value = serde_json::from_str(&out).unwrap();
    (v["p50"].as_f64().unwrap(), v["p99"].as_f64().unwrap())
}

/// New-connection setup: connect and one 1 KiB request/response, p50 over 200, in ms.
fn setup(target: &SocketAddr) -> f64 {
    let out = self_in("rfp-a", &["setup", &target.to_string(), "200"]);
    serde_json::from_str::<Value>(&out).unwrap()["p50"].as_f64().unwrap() / 1e3
}

/// This program re-executed in `ns` with `args` (a subcommand).
fn this_in(ns: &str, args: &[&str]) -> Command {
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(std::env::current_exe().unwrap()).args(args);
    c
}

fn self_in(ns: &str, args: &[&str]) -> String {
    let out = this_in(ns, args).output().unwrap();
    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8(out.stdout).unwrap()
}

/// `rpc-server PORT`: answers every 1 KiB request with 1 KiB, on every address.
fn rpc_server(port: u16) {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind(("0.0.0.0", port)).unwrap();
    for conn in listener.incoming().flatten() {
        std::thread::spawn(move || {
            let mut conn = conn;
            let _ = conn.set_nodelay(true);
            let mut buf = [0u8; 1024];
            while conn.read_exact(&mut buf).is_ok() {
                if conn.write_all(&buf).is_err() {
                    break;
                }
            }
        });
    }
}

fn percentiles(mut us: Vec<f64>) -> String {
    us.sort_by(f64::total_cmp);
    let at = |q: f64| us[((us.len() as f64 - 1.0) * q).round() as usize];
    serde_json::json!({"p50": at(0.5), "p99": at(0.99), "n": us.len()}).to_string()
}

/// `rpc ADDR RATE SECONDS`: one connection, a 1 KiB request every 1/RATE s (open loop: a
/// late answer delays the next request, and counts from its scheduled time).
fn rpc_client(addr: SocketAddr, rate: u64, seconds: u64) {
    use std::io::{Read, Write};
    let mut conn = std::net::TcpStream::connect(addr).unwrap();
    conn.set_nodelay(true).unwrap();
    let mut buf = [7u8; 1024];
    let start = Instant::now();
    let interval = Duration::from_nanos(1_000_000_000 / rate);
    let mut times = Vec::new();
    for i in 0..rate * seconds {
        let due = start + interval * i as u32;
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
        conn.write_all(&buf).unwrap();
        conn.read_exact(&mut buf).unwrap();
        // Warm-up: the first 5% do not count.
        if i >= rate * seconds / 20 {
            times.push(due.elapsed().as_secs_f64() * 1e6);
        }
    }
    println!("{}", percentiles(times));
}

/// `setup ADDR N`: N times a new connection and one 1 KiB request/response; p50 in µs.
fn setup_client(addr: SocketAddr, n: usize) {
    use std::io::{Read, Write};
    let mut times = Vec::new();
    for _ in 0..n {
        let t = Instant::now();
        let mut conn = std::net::TcpStream::connect(addr).unwrap();
        conn.set_nodelay(true).unwrap();
        let mut buf = [7u8; 1024];
        conn.write_all(&buf).unwrap();
        if conn.read_exact(&mut buf).is_err() {
            std::process::exit(1);
        }
        times.push(t.elapsed().as_secs_f64() * 1e6);
    }
    println!("{}", percentiles(times));
}

/// CPU seconds (user + system) the processes used so far.
fn cpu_seconds(pids: &[u32]) -> f64 {
    pids.iter()
        .filter_map(|pid| std::fs::read_to_string(format!("/proc/{pid}/stat")).ok())
        .map(|s| {
            let fields: Vec<&str> = s.rsplit_once(')').map(|(_, r)| r).unwrap_or_default().split_whitespace().collect();
            let ticks = |i: usize| fields.get(i).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
            (ticks(11) + ticks(12)) / 100.0
        })
        .sum()
}

fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS:")
}

fn hwm_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM:")
}

#[derive(Default)]
struct Results {
    one: Vec<f64>,
    eight: Vec<f64>,
    p50: Vec<f64>,
    p99: Vec<f64>,
    setup: Vec<f64>,
    cpu_per_gb: Vec<f64>,
}

/// Median and range of `v` with `digits` decimals.
fn spread(v: &[f64], digits: usize) -> String {
    if v.is_empty() {
        return "—".into();
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let med = s[s.len() / 2];
    format!("{med:.digits$} ({:.digits$}–{:.digits$})", s[0], s[s.len() - 1])
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    s.get(s.len() / 2).copied().unwrap_or(0.0)
}

/// Single-core AEAD speed on this machine (`openssl speed`, 16 KiB blocks), bytes/s.
struct CryptoBound {
    chacha: f64,
    aes: f64,
}

impl CryptoBound {
    fn measure() -> Self {
        let speed = |alg: &str| -> f64 {
            let out = Command::new("openssl")
                .args(["speed", "-seconds", "2", "-bytes", "16384", "-evp", alg])
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default();
            // The last line: "<alg>   <k bytes/s>k"
            out.lines()
                .last()
                .and_then(|l| l.split_whitespace().last())
                .and_then(|v| v.trim_end_matches('k').parse::<f64>().ok())
                .map(|k| k * 1e3)
                .unwrap_or(f64::NAN)
        };
        Self { chacha: speed("chacha20-poly1305"), aes: speed("aes-128-gcm") }
    }

    /// The most a path making `passes` AEAD passes over each byte can carry on 2 cores, MB/s.
    fn limit(&self, (chacha, aes): (f64, f64)) -> Option<f64> {
        let seconds_per_byte = chacha / self.chacha + aes / self.aes;
        (seconds_per_byte > 0.0).then(|| 2.0 / seconds_per_byte / 1e6)
    }
}

fn print_table(
    paths: &[Box<dyn PathUnderTest>],
    results: &[Results],
    idle: &[u64],
    peak: &[(u64, u64)],
    bound: &CryptoBound,
) {
    let st = paths.iter().position(|p| p.name() == "stunnel4, 1 relay").map_or(f64::NAN, |i| median(&results[i].one));
    println!(
        "| path | 1 stream MB/s | 8 streams MB/s | 1 KiB RPC p50 / p99 µs ({RPC_RATE}/s) | setup ms (connect + 1 KiB RPC, p50) | CPU s per GB | share of the 2-core AEAD bound | RSS idle / peak MiB (largest process's peak) | 1 stream vs stunnel, 1 relay |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for (i, (p, r)) in paths.iter().zip(results).enumerate() {
        let share = bound.limit(p.aead_passes()).map(|l| format!("{:.0}% of {l:.0} MB/s", median(&r.one) / l * 100.0));
        println!(
            "| {} | {} | {} | {} / {} | {} | {} | {} | {} | {:.2}× |",
            p.name(),
            spread(&r.one, 0),
            spread(&r.eight, 0),
            spread(&r.p50, 0),
            spread(&r.p99, 0),
            spread(&r.setup, 2),
            spread(&r.cpu_per_gb, 1),
            share.unwrap_or_else(|| "—".into()),
            if p.pids().is_empty() {
                "—".into()
            } else {
                let mib = |kib: u64| kib as f64 / 1024.0;
                format!("{:.1} / {:.1} ({:.1})", mib(idle[i]), mib(peak[i].0), mib(peak[i].1))
            },
            median(&r.one) / st
        );
    }
    println!();
    println!(
        "AEAD on one core (`openssl speed -evp`, 16 KiB blocks): ChaCha20-Poly1305 {:.0} MB/s, AES-128-GCM {:.0} MB/s. \
         Passes per byte: relayfed 2 ChaCha20-Poly1305 (Noise, end to end) + 2 AES-GCM per hop (QUIC); stunnel 2 per TLS hop \
         (AES-GCM); boringtun 2 ChaCha20-Poly1305; Nebula 2 AES-256-GCM. {ROUNDS} interleaved rounds of {SECONDS} s iperf3 runs; median (min–max).",
        bound.chacha / 1e6,
        bound.aes / 1e6
    );
}
