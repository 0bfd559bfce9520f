//! The NAT matrix (`make nat-matrix`; a short run is part of `make test`): two homes behind
//! routers of each kind, built from network namespaces and iptables, and a main relay on the
//! "internet" namespace. For every pair it records whether the calling home's path went
//! direct, how long the punch took (p50/p95 over the trials), and every failed call (four
//! callers call back to back through the switch).
//!
//! Kinds: `public` (no NAT), `one-to-one` (static SNAT/DNAT: endpoint-independent mapping and
//! filtering), `home` (MASQUERADE: endpoint-independent mapping, address-and-port-dependent
//! filtering), `addr-filter` (MASQUERADE plus inbound accepted from any port of an address
//! the home sent to: address-dependent filtering), `symmetric` (MASQUERADE --random:
//! endpoint-dependent mapping), `double` (a carrier-grade MASQUERADE under a home one).
//! The relay sits in its own namespace behind the "internet" one; this kernel has no netem,
//! so `RELAYFED_NAT_LATENCY_MS` (one way, default 0) is added on that link in user space
//! (`nat_wire.py`: TUN devices and a delay line). The homes' direct path gets none.
//!
//! Needs root (namespaces, iptables, TUN). Environment: `RELAYFED_NAT_TRIALS` (trials per pair,
//! default 2), `RELAYFED_NAT_ORDERED=1` (both homes of each pair call; default: the kind
//! listed first), `RELAYFED_NAT_WRITE=1` (write the table into docs/benchmarks.md).
//!
//! The same binary, re-executed inside a namespace, is the echo server and the trial client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::io::{BufRead, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use relayfed_e2e::Testbed;
use serde_json::{Value, json};

const KINDS: [&str; 6] = ["public", "one-to-one", "home", "addr-filter", "symmetric", "double"];
/// The main relay, in its own namespace behind the "internet" one.
const RELAY: &str = "198.51.100.1";
/// The "internet" namespace's address on the bridge: every router's (and public home's)
/// default gateway.
const GATEWAY: &str = "203.0.113.254";
const RELAY_PORT: u16 = 7400;
const ECHO_PORT: u16 = 7401;
const IMPORT_PORT: u16 = 7402;
/// How long a trial waits for a direct path before it counts as relayed (an attempt gives
/// up after 3 s; the relay's answer and the call that starts it come first).
const TRIAL_WAIT: Duration = Duration::from_secs(5);

fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("echo") => echo(args[2].parse().unwrap()),
        Some("trial") => trial(args[2].parse().unwrap(), args[3].parse().unwrap()),
        _ => matrix(),
    }
}

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().unwrap();
    assert!(out.status.success(), "{cmd}: {}", String::from_utf8_lossy(&out.stderr));
}

fn quiet(cmd: &str) {
    let _ = Command::new("sh").args(["-c", cmd]).stderr(Stdio::null()).status();
}

/// Where side `i` (1 or 2) is, and its namespaces.
struct Side {
    public_ip: String,
    namespaces: Vec<String>,
}

/// The namespaces of one pair; removed on drop (with every process in them).
struct Topology {
    sides: [Side; 2],
    children: Vec<Child>,
    dir: PathBuf,
}

impl Topology {
    /// The namespaces for `kinds`; the relay's link adds `latency_ms` each way.
    fn build(kinds: [&'static str; 2], latency_ms: u64) -> Self {
        for ns in ["rfn-inet", "rfn-relay", "rfn-r1", "rfn-c1", "rfn-h1", "rfn-r2", "rfn-c2", "rfn-h2"] {
            quiet(&format!("ip netns del {ns}"));
        }
        sh("ip netns add rfn-inet && ip -n rfn-inet link set lo up");
        sh("ip netns exec rfn-inet sysctl -qw net.ipv4.ip_forward=1");
        sh("ip -n rfn-inet link add br0 type bridge && ip -n rfn-inet link set br0 up");
        sh(&format!("ip -n rfn-inet addr add {GATEWAY}/24 dev br0"));
        sh("ip netns add rfn-relay && ip -n rfn-relay link set lo up");
        let sides = [Self::side(1, kinds[0]), Self::side(2, kinds[1])];
        let dir = std::env::temp_dir().join(format!("relayfed-nat-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let mut topo = Self { sides, children: vec![], dir };
        topo.relay_link(latency_ms);
        topo
    }

    /// Links the relay's namespace to the "internet": a veth, or with latency two TUN
    /// devices and `nat_wire.py` carrying packets between them `latency_ms` late.
    fn relay_link(&mut self, latency_ms: u64) {
        if latency_ms == 0 {
            sh("ip link add r1 netns rfn-inet type veth peer name r0 netns rfn-relay");
            sh("ip -n rfn-inet link set r1 up && ip -n rfn-relay link set r0 up");
            // The relay's side answers for every address (it has one route: out of r0).
            sh("ip netns exec rfn-inet sysctl -qw net.ipv4.conf.r1.proxy_arp=1");
            sh(&format!("ip -n rfn-relay addr add {RELAY}/32 dev r0 && ip -n rfn-relay route add default dev r0"));
            sh(&format!("ip -n rfn-inet route add {RELAY}/32 dev r1"));
            return;
        }
        sh("ip -n rfn-inet tuntap add dev r1 mode tun && ip -n rfn-relay tuntap add dev r0 mode tun");
        let wire = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/nat_wire.py");
        let log = std::fs::File::create(self.dir.join("wire.log")).unwrap();
        let mut child = Command::new("/usr/bin/python3")
            .arg(&wire)
            .args(["rfn-inet", "r1", "rfn-relay", "r0", &latency_ms.to_string()])
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        let mut line = String::new();
        std::io::BufReader::new(child.stdout.take().unwrap()).read_line(&mut line).unwrap();
        assert_eq!(line.trim(), "ready", "nat_wire.py did not start: {}", self.dir.join("wire.log").display());
        self.children.push(child);
        sh("ip -n rfn-inet link set r1 up && ip -n rfn-relay link set r0 up");
        sh(&format!("ip -n rfn-relay addr add {RELAY}/32 dev r0 && ip -n rfn-relay route add default dev r0"));
        sh(&format!("ip -n rfn-inet route add {RELAY}/32 dev r1"));
    }

    /// Side `i` behind a router of `kind`; the home's namespace is `rfn-h<i>`.
    fn side(i: u8, kind: &'static str) -> Side {
        let public_ip = format!("203.0.113.{}", 10 * i);
        let home = format!("rfn-h{i}");
        let (lan, gw) = (format!("10.{i}.0.2"), format!("10.{i}.0.1"));
        sh(&format!("ip netns add {home} && ip -n {home} link set lo up"));
        // Links `a` (in `ns_a`) and `b` (in `ns_b`).
        let veth = |ns_a: &str, a: &str, ns_b: &str, b: &str| {
            sh(&format!("ip link add {a} netns {ns_a} type veth peer name {b} netns {ns_b}"));
            sh(&format!("ip -n {ns_a} link set {a} up && ip -n {ns_b} link set {b} up"));
        };
        let on_bridge = |ns: &str, ip: &str| {
            veth(ns, "wan", "rfn-inet", &format!("br-{ns}"));
            sh(&format!("ip -n rfn-inet link set br-{ns} master br0"));
            sh(&format!("ip -n {ns} addr add {ip}/24 dev wan"));
        };
        if kind == "public" {
            on_bridge(&home, &public_ip);
            sh(&format!("ip -n {home} route add default via {GATEWAY}"));
            return Side { public_ip, namespaces: vec![home] };
        }
        let router = format!("rfn-r{i}");
        sh(&format!("ip netns add {router} && ip -n {router} link set lo up"));
        sh(&format!("ip netns exec {router} sysctl -qw net.ipv4.ip_forward=1"));
        veth(&router, "lan", &home, "eth0");
        sh(&format!("ip -n {router} addr add {gw}/24 dev lan && ip -n {home} addr add {lan}/24 dev eth0"));
        sh(&format!("ip -n {home} route add default via {gw}"));
        let mut namespaces = vec![home.clone(), router.clone()];
        let nat = |ns: &str, rule: &str| sh(&format!("ip netns exec {ns} iptables {rule}"));
        // Like a real router, none answers unsolicited packets itself: they are dropped
        // before conntrack records them (an unsolicited probe delivered to the router would
        // leave an entry that takes the port the home's own mapping needs).
        nat(&router, "-A INPUT -i wan -j DROP");
        match kind {
            "double" => {
                // Carrier-grade NAT: the home router's WAN is in 100.64.<i>.0/24.
                let cgn = format!("rfn-c{i}");
                sh(&format!("ip netns add {cgn} && ip -n {cgn} link set lo up"));
                sh(&format!("ip netns exec {cgn} sysctl -qw net.ipv4.ip_forward=1"));
                veth(&cgn, "cpe", &router, "wan");
                sh(&format!(
                    "ip -n {cgn} addr add 100.64.{i}.1/24 dev cpe && ip -n {router} addr add 100.64.{i}.2/24 dev wan"
                ));
                sh(&format!("ip -n {router} route add default via 100.64.{i}.1"));
                on_bridge(&cgn, &public_ip);
                sh(&format!("ip -n {cgn} route add default via {GATEWAY}"));
                nat(&router, "-t nat -A POSTROUTING -o wan -j MASQUERADE");
                nat(&cgn, "-t nat -A POSTROUTING -o wan -j MASQUERADE");
                nat(&cgn, "-A INPUT -i wan -j DROP");
                namespaces.push(cgn);
            }
            _ => {
                on_bridge(&router, &public_ip);
                sh(&format!("ip -n {router} route add default via {GATEWAY}"));
                match kind {
                    "one-to-one" => {
                        nat(&router, &format!("-t nat -A POSTROUTING -o wan -s {lan} -j SNAT --to-source {public_ip}"));
                        nat(
                            &router,
                            &format!("-t nat -A PREROUTING -i wan -d {public_ip} -j DNAT --to-destination {lan}"),
                        );
                    }
                    "home" => nat(&router, "-t nat -A POSTROUTING -o wan -j MASQUERADE"),
                    "addr-filter" => {
                        nat(&router, "-t nat -A POSTROUTING -o wan -j MASQUERADE");
                        // Remember every address the home sends to; let new inbound UDP from
                        // those addresses (any port) through to the home, port unchanged.
                        nat(&router, "-A FORWARD -o wan -m recent --name sent --rdest --set");
                        nat(
                            &router,
                            &format!(
                                "-t nat -A PREROUTING -i wan -p udp -m recent --name sent --rsource --rcheck --seconds 300 -j DNAT --to-destination {lan}"
                            ),
                        );
                    }
                    "symmetric" => nat(&router, "-t nat -A POSTROUTING -o wan -j MASQUERADE --random"),
                    other => panic!("unknown NAT kind {other}"),
                }
            }
        }
        Side { public_ip, namespaces }
    }

    /// Stops the process started last (a calling home).
    fn stop_last(&mut self) {
        if let Some(mut c) = self.children.pop() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts `program args` in `ns`, its stderr in the topology's log directory.
    fn spawn(&mut self, ns: &str, program: &Path, args: &[&str]) -> &mut Child {
        let log = std::fs::File::create(self.dir.join(format!("{ns}-{}.log", self.children.len()))).unwrap();
        let child = Command::new("ip")
            .args(["netns", "exec", ns])
            .arg(program)
            .args(args)
            .env("RELAYFED_LOG", std::env::var("RELAYFED_LOG").unwrap_or_else(|_| "warn".into()))
            .stdout(Stdio::piped())
            .stderr(log)
            .spawn()
            .unwrap();
        self.children.push(child);
        self.children.last_mut().unwrap()
    }
}

impl Drop for Topology {
    fn drop(&mut self) {
        for c in &mut self.children {
            let _ = c.kill();
            let _ = c.wait();
        }
        for s in &self.sides {
            for ns in &s.namespaces {
                quiet(&format!("ip netns del {ns}"));
            }
        }
        quiet("ip netns del rfn-inet");
        quiet("ip netns del rfn-relay");
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Runs the trial client in the calling home's namespace against its admin port `admin`, in
/// `phase` (`""`: a normal trial); its JSON.
fn run_trial(me: &Path, admin: &str, phase: &str) -> Value {
    let out = Command::new("ip")
        .args(["netns", "exec", "rfn-h1"])
        .arg(me)
        .args(["trial", admin, &format!("127.0.0.1:{IMPORT_PORT}"), phase])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("trial output: {e}: {}", String::from_utf8_lossy(&out.stdout)))
}

/// Reads a node's ready line (its admin address) and keeps draining its stdout.
fn ready(child: &mut Child) -> Value {
    let mut lines = std::io::BufReader::new(child.stdout.take().unwrap()).lines();
    loop {
        let line = lines.next().expect("the node exited before its ready line").unwrap();
        if let Ok(v) = serde_json::from_str::<Value>(&line)
            && v["event"] == "ready"
        {
            std::thread::spawn(move || for _ in lines {});
            return v;
        }
    }
}

/// One trial's result, as the trial client prints it.
#[derive(Debug)]
struct Trial {
    direct: bool,
    millis: Option<f64>,
    ok: u64,
    failed: u64,
}

fn crs() -> String {
    format!(
        "apiVersion: relayfed.io/v1alpha1\nkind: RelayFederation\nmetadata: {{name: nat, namespace: test}}\n\
         spec: {{trustDomain: nat.test, publicName: relay.nat.test, defaultRolloutPolicy: default, \
         mainRelays: [{{nodeId: hub, endpoint: \"{RELAY}:{RELAY_PORT}\"}}]}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {{name: default, namespace: test}}\n\
         spec:\n  directPaths: {{enabled: true}}\n  resilience: {{timeouts: {{linkIdle: 2s}}}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: hub, namespace: test}}\nspec: {{type: main, nodeId: hub, federation: nat}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: shop, namespace: test}}\n\
         spec: {{type: home, nodeId: shop, federation: nat, mainRelays: [{{nodeId: hub}}], imports: [{{name: pay, port: 80, listen: \"127.0.0.1:{IMPORT_PORT}\"}}]}}\n\
         ---\napiVersion: relayfed.io/v1alpha1\nkind: Relay\nmetadata: {{name: pay, namespace: test}}\n\
         spec: {{type: home, nodeId: pay, federation: nat, mainRelays: [{{nodeId: hub}}], exports: [{{name: pay, port: 80, target: \"127.0.0.1:{ECHO_PORT}\"}}]}}\n"
    )
}

fn percentile(v: &[f64], p: f64) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    Some(s[((s.len() as f64 - 1.0) * p).round() as usize])
}

fn matrix() {
    let root = Command::new("id").arg("-u").output().is_ok_and(|o| o.stdout.starts_with(b"0\n"));
    assert!(root, "the NAT matrix needs root (network namespaces and iptables)");
    let trials: usize = std::env::var("RELAYFED_NAT_TRIALS").ok().and_then(|t| t.parse().ok()).unwrap_or(2);
    let latency_ms: u64 = std::env::var("RELAYFED_NAT_LATENCY_MS").ok().and_then(|t| t.parse().ok()).unwrap_or(0);
    let tb = Testbed::new("nat.test").unwrap();
    let files = tb.scenario(&crs(), |_, _, _| SocketAddr::from(([127, 0, 0, 1], ECHO_PORT))).unwrap();
    let proxy = Path::new(env!("CARGO_BIN_EXE_relayfed-proxy"));
    let me = std::env::current_exe().unwrap();
    let config = |id: &str| files.homes.iter().find(|(h, _)| h == id).unwrap().1.to_str().unwrap().to_owned();
    let relay_config = files.mains[0].1.to_str().unwrap().to_owned();
    let mut rows = Vec::new();
    let mut failures = Vec::new();
    // Each unordered pair once (the earlier kind calls), or both ways round.
    let ordered = std::env::var_os("RELAYFED_NAT_ORDERED").is_some();
    // `RELAYFED_NAT_PAIRS=home:symmetric,...`: only those pairs (to look into one).
    let only: Option<Vec<String>> =
        std::env::var("RELAYFED_NAT_PAIRS").ok().map(|p| p.split(',').map(str::to_owned).collect());
    for (i, a) in KINDS.iter().enumerate() {
        for b in if ordered || only.is_some() { &KINDS[..] } else { &KINDS[i..] } {
            if only.as_ref().is_some_and(|o| !o.contains(&format!("{a}:{b}"))) {
                continue;
            }
            let mut topo = Topology::build([a, b], latency_ms);
            let relay = topo.spawn("rfn-relay", proxy, &["main-relay", "--config", &relay_config]);
            ready(relay);
            let echo = topo.spawn("rfn-h2", &me, &["echo", &ECHO_PORT.to_string()]);
            let mut line = String::new();
            std::io::BufReader::new(echo.stdout.take().unwrap()).read_line(&mut line).unwrap();
            let pay = topo.spawn("rfn-h2", proxy, &["home", "--config", &config("pay")]);
            ready(pay);
            // The called home is registered (a call goes through) before the trials count.
            let warm = topo.spawn("rfn-h1", proxy, &["home", "--config", &config("shop")]);
            let admin = ready(warm)["admin"].as_str().unwrap().to_owned();
            assert_eq!(run_trial(&me, &admin, "warmup")["ok"], true, "{a} -> {b}: no call went through");
            topo.stop_last();
            let mut results = Vec::new();
            for _ in 0..trials {
                // A fresh calling home each trial: a new port, so new NAT mappings.
                let shop = topo.spawn("rfn-h1", proxy, &["home", "--config", &config("shop")]);
                let admin = ready(shop)["admin"].as_str().unwrap().to_owned();
                let v = run_trial(&me, &admin, "");
                let t = Trial {
                    direct: v["direct"].as_bool().unwrap(),
                    millis: v["millis"].as_f64(),
                    ok: v["ok"].as_u64().unwrap(),
                    failed: v["failed"].as_u64().unwrap(),
                };
                if t.failed > 0 || (!t.direct && punchable(a, b)) {
                    // Keep the nodes' logs of a trial with a failed call or a missed punch.
                    let keep = std::env::temp_dir().join(format!("relayfed-nat-failed-{a}-{b}-{}", results.len()));
                    let _ = std::fs::create_dir_all(&keep);
                    for e in std::fs::read_dir(&topo.dir).into_iter().flatten().flatten() {
                        let _ = std::fs::copy(e.path(), keep.join(e.file_name()));
                    }
                    println!("failed calls {} (direct: {}): logs in {}", v["errors"], t.direct, keep.display());
                }
                topo.stop_last();
                results.push(t);
            }
            let direct = results.iter().filter(|t| t.direct).count();
            let times: Vec<f64> = results.iter().filter_map(|t| t.millis).collect();
            let failed: u64 = results.iter().map(|t| t.failed).sum();
            let calls: u64 = results.iter().map(|t| t.ok + t.failed).sum();
            let expect_direct = punchable(a, b);
            println!(
                "{a:>11} -> {b:<11} direct {direct}/{trials}  p50 {:?} ms  p95 {:?} ms  calls {calls} failed {failed}",
                percentile(&times, 0.5),
                percentile(&times, 0.95)
            );
            if failed > 0 {
                failures.push(format!("{a} -> {b}: {failed} failed calls"));
            }
            // At least 95% direct where it is possible; never direct where it is not.
            let enough = if expect_direct { direct * 100 >= trials * 95 } else { direct == 0 };
            if !enough {
                failures.push(format!(
                    "{a} -> {b}: {direct}/{trials} direct, expected {}",
                    if expect_direct { "direct" } else { "relayed" }
                ));
            }
            rows.push(json!({"from": a, "to": b, "direct": direct, "trials": trials,
                "p50": percentile(&times, 0.5), "p95": percentile(&times, 0.95), "calls": calls, "failed": failed}));
            if *a == "home"
                && *b == "home"
                && let Some(f) = fallback(&mut topo, proxy, &me, &config("shop"))
            {
                failures.push(f);
            }
        }
    }
    if std::env::var_os("RELAYFED_NAT_WRITE").is_some() {
        write_table(&rows, trials, latency_ms);
    }
    assert!(failures.is_empty(), "NAT matrix: {failures:#?}");
}

/// Whether a pair can be punched: at least one side maps endpoint-independently. Against a
/// port-filtering NAT, a symmetric NAT's fresh port is found by a port sweep (a fan of
/// sockets on the symmetric side, many ports probed from the other); two symmetric NATs
/// leave nothing to aim at.
fn punchable(a: &str, b: &str) -> bool {
    !(a == "symmetric" && b == "symmetric")
}

/// With a direct path up between two home routers, the path is cut (the routers drop each
/// other's packets): calls go on through the relay without a failure, and the path shows
/// relayed. Returns what went wrong.
fn fallback(topo: &mut Topology, proxy: &Path, me: &Path, shop_config: &str) -> Option<String> {
    let shop = topo.spawn("rfn-h1", proxy, &["home", "--config", shop_config]);
    let admin = ready(shop)["admin"].as_str().unwrap().to_owned();
    let run = |phase: &str| run_trial(me, &admin, phase);
    let up = run("direct");
    if up["direct"] != true {
        return Some(format!("fallback: no direct path to cut: {up}"));
    }
    let other = topo.sides[1].public_ip.clone();
    sh(&format!("ip netns exec rfn-r1 iptables -I FORWARD -s {other} -j DROP"));
    sh(&format!("ip netns exec rfn-r1 iptables -I FORWARD -d {other} -j DROP"));
    let cut = run("cut");
    println!("fallback after cutting the direct path: {cut}");
    topo.stop_last();
    sh(&format!("ip netns exec rfn-r1 iptables -D FORWARD -s {other} -j DROP"));
    sh(&format!("ip netns exec rfn-r1 iptables -D FORWARD -d {other} -j DROP"));
    match (cut["failed"].as_u64(), cut["relayed"].as_bool()) {
        (Some(0), Some(true)) => None,
        _ => Some(format!("fallback: {cut}")),
    }
}

fn write_table(rows: &[Value], trials: usize, latency_ms: u64) {
    let mut t = format!(
        "<!-- nat-matrix: begin -->\n`make nat-matrix` ({trials} trials per ordered pair, {latency_ms} ms one way between each home and the relay, on {}; the row's home calls the column's). Cells: trials that went direct, then the time from the attempt's start to the direct connection, p50 / p95 in ms; `relayed` where no trial went direct. Failed calls in all trials: {}.\n\n| caller \\ called |",
        Command::new("date")
            .args(["-u", "+%Y-%m-%d"])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
            .unwrap_or_default(),
        rows.iter().map(|r| r["failed"].as_u64().unwrap_or(0)).sum::<u64>()
    );
    for k in KINDS {
        t += &format!(" {k} |");
    }
    t += "\n|---|";
    t += &"---|".repeat(KINDS.len());
    t += "\n";
    for a in KINDS {
        t += &format!("| {a} |");
        for b in KINDS {
            let cell = rows.iter().find(|r| r["from"] == a && r["to"] == b).map(|r| {
                let d = r["direct"].as_u64().unwrap_or(0);
                if d == 0 {
                    "relayed".to_owned()
                } else {
                    format!(
                        "{d}/{}: {:.0} / {:.0}",
                        r["trials"],
                        r["p50"].as_f64().unwrap_or(0.0),
                        r["p95"].as_f64().unwrap_or(0.0)
                    )
                }
            });
            t += &format!(" {} |", cell.unwrap_or_else(|| "·".into()));
        }
        t += "\n";
    }
    t += "<!-- nat-matrix: end -->";
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/benchmarks.md");
    let doc = std::fs::read_to_string(&path).unwrap();
    let (Some(b), Some(e)) = (doc.find("<!-- nat-matrix: begin -->"), doc.find("<!-- nat-matrix: end -->")) else {
        panic!("docs/benchmarks.md has no nat-matrix markers");
    };
    let out = format!("{}{}{}", &doc[..b], t, &doc[e + "<!-- nat-matrix: end -->".len()..]);
    std::fs::write(&path, out).unwrap();
}

/// Echo server (runs in the called home's namespace): prints a line when listening.
fn echo(port: u16) {
    let l = TcpListener::bind(("127.0.0.1", port)).unwrap();
    println!("listening");
    std::io::stdout().flush().unwrap();
    for s in l.incoming().flatten() {
        std::thread::spawn(move || {
            let mut s = s;
            let mut buf = [0u8; 4096];
            while let Ok(n) = s.read(&mut buf) {
                if n == 0 || s.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
    }
}

/// One 1 KiB call through the import, echoed intact; else what went wrong.
fn call(import: SocketAddr) -> Result<(), String> {
    let payload: Vec<u8> = (0..1024).map(|i| (i % 251) as u8).collect();
    let mut s = TcpStream::connect_timeout(&import, Duration::from_secs(2)).map_err(|e| format!("connect: {e}"))?;
    let _ = s.set_read_timeout(Some(Duration::from_secs(10)));
    s.write_all(&payload).map_err(|e| format!("write: {e}"))?;
    let mut back = vec![0u8; payload.len()];
    s.read_exact(&mut back).map_err(|e| format!("read: {e}"))?;
    if back == payload { Ok(()) } else { Err("the echo differs".into()) }
}

/// `GET path` on the admin port; the JSON body.
fn admin_json(admin: SocketAddr, path: &str) -> Value {
    let Ok(mut s) = TcpStream::connect(admin) else { return Value::Null };
    let _ = write!(s, "GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    out.split_once("\r\n\r\n").and_then(|(_, b)| serde_json::from_str(b).ok()).unwrap_or(Value::Null)
}

/// The path the calling home shows to `pay`, and how long its last attempt took.
fn path_to_pay(admin: SocketAddr) -> (Option<String>, Option<f64>) {
    let v = admin_json(admin, "/federation/peers");
    let p = v.as_array().and_then(|a| a.iter().find(|p| p["kind"] == "home" && p["node"] == "pay").cloned());
    (
        p.as_ref().and_then(|p| p["path"].as_str().map(str::to_owned)),
        p.as_ref().and_then(|p| p["lastAttemptMillis"].as_f64()),
    )
}

/// Callers running at once in a trial, each calling back to back: calls are in flight
/// whenever the path switches.
const CALLERS: usize = 4;

/// Trial client (runs in the calling home's namespace). Phase `warmup`: calls until one
/// succeeds (the called home is registered), for at most 10 s. Otherwise [`CALLERS`] threads
/// call back to back until the path has been direct for 100 ms or [`TRIAL_WAIT`] passes;
/// phase `cut` (the direct path was just cut): for 6 s, then whether the path went back to
/// relayed. Prints JSON.
fn trial(admin: SocketAddr, import: SocketAddr) {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};
    let phase = std::env::args().nth(4).unwrap_or_default();
    let started = Instant::now();
    if phase == "warmup" {
        let ok = std::iter::repeat_with(|| call(import))
            .take_while(|_| started.elapsed() < Duration::from_secs(10))
            .any(|r| r.is_ok());
        return println!("{}", json!({ "ok": ok }));
    }
    let stop = Arc::new(AtomicBool::new(false));
    let results = Arc::new(Mutex::new((0u64, Vec::<String>::new())));
    let callers: Vec<_> = (0..CALLERS)
        .map(|_| {
            let (stop, results) = (stop.clone(), results.clone());
            std::thread::spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let r = call(import);
                    let mut res = results.lock().unwrap();
                    match r {
                        Ok(()) => res.0 += 1,
                        Err(e) => res.1.push(format!("{} ms: {e}", started.elapsed().as_millis())),
                    }
                }
            })
        })
        .collect();
    let limit = if phase == "cut" { Duration::from_secs(6) } else { TRIAL_WAIT };
    let mut direct_at: Option<(Instant, Option<f64>)> = None;
    while started.elapsed() < limit && direct_at.is_none_or(|(at, _)| at.elapsed() < Duration::from_millis(100)) {
        if phase != "cut" && direct_at.is_none() {
            let (path, millis) = path_to_pay(admin);
            if path.as_deref() == Some("direct") {
                direct_at = Some((Instant::now(), millis));
            }
        }
        // Polling pace of the admin endpoint (the calls run meanwhile).
        std::thread::sleep(Duration::from_millis(5));
    }
    stop.store(true, Ordering::Relaxed);
    for c in callers {
        let _ = c.join();
    }
    let (path, _) = path_to_pay(admin);
    let (ok, errors) = std::mem::take(&mut *results.lock().unwrap());
    let out = json!({
        "direct": direct_at.is_some(),
        "millis": direct_at.and_then(|(_, m)| m),
        "ok": ok,
        "failed": errors.len(),
        "relayed": path.as_deref() != Some("direct"),
        "errors": errors,
    });
    println!("{out}");
}
