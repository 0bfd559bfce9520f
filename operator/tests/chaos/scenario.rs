//! A chaos scenario as data: a federation as CR YAML (with `${udp:NAME}` / `${tcp:NAME}` port
//! placeholders) and a fault schedule (`faults.yaml`) with the load to keep up meanwhile.

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;

use serde::Deserialize;

/// The load kept up during a run.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Load {
    /// New calls per second, spread over the callers in turn.
    pub calls_per_second: u32,
    /// Homes whose import of `service` is called.
    pub callers: Vec<String>,
    /// The imported service.
    pub service: String,
    /// Bytes each call writes and expects back.
    pub payload_bytes: usize,
}

/// One fault, `at` a time from the start of the load.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Fault {
    /// When it is injected.
    pub at: relayfed_crds::Duration,
    /// kill -9 of this node's process (local mode restarts it).
    #[serde(default)]
    pub kill: Option<String>,
    /// SIGSTOP of this node's process, SIGCONT after `for`.
    #[serde(default)]
    pub hang: Option<String>,
    /// How long a hang lasts.
    #[serde(default, rename = "for")]
    pub duration: Option<relayfed_crds::Duration>,
    /// A RolloutPolicy edit to this ECH percentage.
    #[serde(default)]
    pub ech: Option<u8>,
    /// Drop every packet between these two main relays for `for` (iptables in the run's own
    /// network namespace).
    #[serde(default)]
    pub partition: Option<[String; 2]>,
    /// Drop this share of all packets (e.g. `2%`) for `for` (iptables `statistic`; the
    /// kernel here has no netem, so latency is not injected).
    #[serde(default)]
    pub loss: Option<String>,
    /// `relayfed local rotate-keys` of this main relay (a Relay name): its new ECH key is
    /// staged, then published to homes after the Relay's `echKeys.stagingPeriod`.
    #[serde(default)]
    pub rotate: Option<String>,
}

impl Fault {
    /// What it does, in a few words (report rows).
    pub fn describe(&self) -> String {
        let lasting = self.duration.map(|d| d.to_string()).unwrap_or_default();
        if let Some(n) = &self.kill {
            format!("kill -9 {n}")
        } else if let Some(n) = &self.hang {
            format!("SIGSTOP {n} for {lasting}")
        } else if let Some(p) = self.ech {
            format!("ECH -> {p}%")
        } else if let Some([a, b]) = &self.partition {
            format!("partition {a} / {b} for {lasting}")
        } else if let Some(l) = &self.loss {
            format!("{l} packet loss for {lasting}")
        } else if let Some(r) = &self.rotate {
            format!("ECH key rotation of {r}")
        } else {
            "nothing".into()
        }
    }
}

/// `faults.yaml`.
#[derive(Clone, Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Schedule {
    /// The load.
    pub load: Load,
    /// The ECH percentage of the RolloutPolicy at the start.
    pub ech: u8,
    /// The faults, in time order.
    pub faults: Vec<Fault>,
    /// When the load stops.
    pub end: relayfed_crds::Duration,
}

/// A scenario read from its directory, ports filled in.
pub struct Scenario {
    /// The federation's CR YAML.
    pub federation: String,
    /// The port given to each placeholder (`udp:m1` -> 23001).
    pub ports: BTreeMap<String, u16>,
    /// The schedule.
    pub schedule: Schedule,
}

impl Scenario {
    /// Reads `dir/federation.yaml` and `dir/faults.yaml`; `port` gives each placeholder a free
    /// port (`"udp"`/`"tcp"`, name).
    pub fn load(dir: &Path, mut port: impl FnMut(&str) -> u16) -> Result<Self, String> {
        let read = |f: &str| std::fs::read_to_string(dir.join(f)).map_err(|e| format!("{}/{f}: {e}", dir.display()));
        let schedule: Schedule =
            serde_saphyr::from_str(&read("faults.yaml")?).map_err(|e| format!("faults.yaml: {e}"))?;
        let (federation, ports) = fill(&read("federation.yaml")?, &mut port)?;
        Ok(Self { federation, ports, schedule })
    }
}

/// Replaces every `${udp:NAME}` / `${tcp:NAME}` with a port, the same port for the same
/// placeholder; returns the text and the ports.
pub fn fill(text: &str, port: &mut impl FnMut(&str) -> u16) -> Result<(String, BTreeMap<String, u16>), String> {
    let mut out = String::with_capacity(text.len());
    let mut ports: BTreeMap<String, u16> = BTreeMap::new();
    let mut rest = text;
    while let Some(i) = rest.find("${") {
        out.push_str(&rest[..i]);
        let end = rest[i..].find('}').ok_or_else(|| format!("unclosed placeholder at {:?}", &rest[i..]))?;
        let key = &rest[i + 2..i + end];
        let (proto, _) = key.split_once(':').ok_or_else(|| format!("placeholder {key:?} is not proto:name"))?;
        if proto != "udp" && proto != "tcp" {
            return Err(format!("placeholder {key:?}: expected udp or tcp"));
        }
        let p = *ports.entry(key.to_owned()).or_insert_with(|| port(proto));
        out.push_str(&p.to_string());
        rest = &rest[i + end + 1..];
    }
    out.push_str(rest);
    Ok((out, ports))
}

/// A fresh work directory for a local-mode test (`<tmp>/relayfed-<name>-<pid>`) whose
/// `manifests/00-federation.yaml` is `tests/<name>/federation.yaml` with free ports filled in.
#[allow(dead_code, reason = "used by the observability and rollout tests, which include this file")]
pub fn work_dir(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("relayfed-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("manifests")).unwrap();
    let repo = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..");
    let text = std::fs::read_to_string(repo.join("tests").join(name).join("federation.yaml")).unwrap();
    let (federation, _) = fill(&text, &mut free_port).unwrap();
    std::fs::write(dir.join("manifests/00-federation.yaml"), federation).unwrap();
    dir
}

/// A RolloutPolicy manifest with ECH at `percentage`, and `extra` (further `spec` fields,
/// indented by two spaces, may be empty).
pub fn policy_yaml(percentage: u8, extra: &str) -> String {
    format!(
        "apiVersion: relayfed.io/v1alpha1
kind: RolloutPolicy
metadata: {{name: default, namespace: relayfed-system}}
spec:
  ech: {{enabled: true, mode: opportunistic, percentage: {percentage}}}
{extra}"
    )
}

/// A free loopback port below Linux's ephemeral range (so no outgoing connection takes it
/// between the pick and the bind).
pub fn free_port(proto: &str) -> u16 {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 23_000 + (std::process::id() % 200) as u16 * 20;
    loop {
        let port = base + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 2_000;
        let free = match proto {
            "udp" => std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok(),
            _ => std::net::TcpListener::bind(("127.0.0.1", port)).is_ok(),
        };
        if free {
            return port;
        }
    }
}

/// Starts `bin local up -f <dir>/manifests --state-dir <dir>/state` with `extra` flags and
/// waits for its ready line (which it returns); the rest of its output is drained.
pub async fn local_up(bin: &Path, dir: &Path, extra: &[&str]) -> (tokio::process::Child, serde_json::Value) {
    use tokio::io::AsyncBufReadExt;
    let mut child = tokio::process::Command::new(bin)
        .args(["local", "up"])
        .args(extra)
        .arg("-f")
        .arg(dir.join("manifests"))
        .arg("--state-dir")
        .arg(dir.join("state"))
        .env("RELAYFED_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let line = tokio::time::timeout(Duration::from_secs(120), lines.next_line()).await.unwrap().unwrap();
    let ready: serde_json::Value = serde_json::from_str(&line.expect("local up exited before it was ready")).unwrap();
    assert_eq!(ready["event"], "ready");
    tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    (child, ready)
}

/// A random schedule for a long run: in every 10 s slot after the first, a fault with
/// probability `rate` (kill -9 or a 5 s hang of a main relay, kill -9 of a home, an ECH flip
/// between 0 and 100%, an ECH key rotation of a main relay, and with `netns` a 5 s partition
/// between two relays or 5 s of 2% packet loss).
pub fn random_faults(
    mains: &[String],
    homes: &[String],
    length: Duration,
    rate: f64,
    seed: u64,
    netns: bool,
) -> Vec<Fault> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut faults = Vec::new();
    let mut ech = 0u8;
    let mut t = Duration::from_secs(10);
    while t + Duration::from_secs(10) <= length {
        if rng.random_bool(rate.clamp(0.0, 1.0)) {
            let at = relayfed_crds::Duration::from_millis(t.as_millis() as u64);
            let none = Fault {
                at,
                kill: None,
                hang: None,
                duration: None,
                ech: None,
                partition: None,
                loss: None,
                rotate: None,
            };
            let pick = |rng: &mut rand::rngs::StdRng, v: &[String]| v[rng.random_range(0..v.len())].clone();
            let five = Some(relayfed_crds::Duration::from_millis(5_000));
            faults.push(match rng.random_range(0..if netns { 7 } else { 5 }) {
                0 => Fault { kill: Some(pick(&mut rng, mains)), ..none },
                1 => Fault {
                    hang: Some(pick(&mut rng, mains)),
                    duration: Some(relayfed_crds::Duration::from_millis(5_000)),
                    ..none
                },
                2 => Fault { kill: Some(pick(&mut rng, homes)), ..none },
                3 => {
                    ech = 100 - ech;
                    Fault { ech: Some(ech), ..none }
                }
                4 => Fault { rotate: Some(pick(&mut rng, mains)), ..none },
                5 => {
                    let a = rng.random_range(0..mains.len());
                    let b = (a + rng.random_range(1..mains.len().max(2))) % mains.len();
                    Fault { partition: Some([mains[a].clone(), mains[b].clone()]), duration: five, ..none }
                }
                _ => Fault { loss: Some("2%".into()), duration: five, ..none },
            });
        }
        t += Duration::from_secs(10);
    }
    faults
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn placeholders_get_one_port_each() {
        let mut n = 30_000;
        let out = fill("a ${udp:m1} b ${tcp:x} c ${udp:m1}", &mut |_| {
            n += 1;
            n
        })
        .unwrap();
        assert_eq!(out.0, "a 30001 b 30002 c 30001");
        assert_eq!(out.1["udp:m1"], 30001);
        assert!(fill("${bad}", &mut |_| 1).is_err());
        assert!(fill("${sctp:a}", &mut |_| 1).is_err());
        assert!(fill("${udp:a", &mut |_| 1).is_err());
    }
}
