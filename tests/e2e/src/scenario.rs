//! A test federation from CR YAML, compiled by the real plan: the data-plane suites run what
//! `relayfed local up` and the operator would run, not a topology of their own making.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use relayfed_operator::plan::{self, KeyLayout, Placement};
use relayfed_proto::config::keys::EchKeyFile;
use relayfed_proto::config::{Role, Snapshot, decode_key32};
use relayfed_proto::crypto::ech::EchKeyPair;

use crate::Testbed;

/// An address in scenario YAML meaning "a free loopback port, chosen when the scenario is
/// compiled" (the API server's rules refuse port 0 itself): UDP for `endpoint`s, TCP else.
pub const ANY_PORT: &str = "127.0.0.1:0";

/// A compiled scenario: every node's snapshot, key material already written.
pub struct Scenario {
    snapshots: BTreeMap<String, Snapshot>,
}

/// Snapshot files of a scenario.
pub struct ScenarioFiles {
    /// Main relay id, snapshot path, QUIC address.
    pub mains: Vec<(String, PathBuf, SocketAddr)>,
    /// Home id and snapshot path.
    pub homes: Vec<(String, PathBuf)>,
}

/// A free loopback port below Linux's ephemeral range (32768..): a port the kernel hands
/// out for `:0` can be taken by any outgoing connection between the pick and the node's bind
/// (CI saw "Address already in use" that way). Tried in a per-process window of 12000..20000.
fn free_port(udp: bool) -> anyhow::Result<SocketAddr> {
    static NEXT: std::sync::atomic::AtomicU16 = std::sync::atomic::AtomicU16::new(0);
    let base = 12_000 + (std::process::id() % 160) as u16 * 50;
    for _ in 0..8_000 {
        let port = 12_000 + (base - 12_000 + NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % 8_000) % 8_000;
        let free = if udp {
            std::net::UdpSocket::bind(("127.0.0.1", port)).is_ok()
        } else {
            std::net::TcpListener::bind(("127.0.0.1", port)).is_ok()
        };
        if free {
            return Ok(SocketAddr::from(([127, 0, 0, 1], port)));
        }
    }
    anyhow::bail!("no free loopback port in 12000..20000")
}

/// `crs` with every [`ANY_PORT`] given a free port of its own.
fn with_free_ports(crs: &str) -> anyhow::Result<String> {
    let mut out = String::with_capacity(crs.len());
    for line in crs.lines() {
        let mut rest = line;
        while let Some(i) = rest.find(ANY_PORT) {
            let after = &rest[i + ANY_PORT.len()..];
            out.push_str(&rest[..i]);
            if after.starts_with(|c: char| c.is_ascii_digit()) {
                out.push_str(ANY_PORT);
            } else {
                out.push_str(&free_port(line.contains("endpoint"))?.to_string());
            }
            rest = after;
        }
        out.push_str(rest);
        out.push('\n');
    }
    Ok(out)
}

impl Testbed {
    /// Admits and compiles `crs` (a RelayFederation, its RolloutPolicy and Relays) with the
    /// real plan, and writes what every planned node needs: certificates (homes' bound to
    /// their Noise keys), Noise keys, main relays' ECH keys; homes get the ECH configs.
    pub fn compile(&self, crs: &str) -> anyhow::Result<Scenario> {
        // Parsed in files of at most 1,000 documents (the YAML parser's per-file budget).
        let text = with_free_ports(crs)?;
        let docs: Vec<&str> = text.split("\n---\n").collect();
        let mut resources = Vec::new();
        for (i, chunk) in docs.chunks(1000).enumerate() {
            resources.extend(relayfed_crds::parse_documents(&format!("scenario part {i}"), &chunk.join("\n---\n"))?);
        }
        let placement = Placement::offline(KeyLayout { dir: self.dir.clone() }, 1);
        let compiled = plan::compile(&resources, &placement).map_err(|errs| {
            anyhow::anyhow!("{}", errs.iter().map(ToString::to_string).collect::<Vec<_>>().join("; "))
        })?;
        let mut snapshots = compiled.snapshots;
        for (node, s) in &snapshots {
            anyhow::ensure!(
                s.node.trust_domain == self.trust_domain,
                "{node}: trust domain {} is not the testbed's {}",
                s.node.trust_domain,
                self.trust_domain
            );
            match s.node.role {
                Role::Main => {
                    self.tls_bound(node, None)?;
                    let key = EchKeyPair::generate(1, "relay.test.example")?;
                    EchKeyFile::from_key(&key).save(&self.dir.join(format!("{node}-ech.json")), None)?;
                }
                Role::Home => {
                    let public = decode_key32(&self.noise_key(node)?)
                        .ok_or_else(|| anyhow::anyhow!("noise key of {node} is not 32 bytes"))?;
                    self.tls_bound(node, Some(&public))?;
                }
            }
        }
        plan::set_ech_configs(&mut snapshots, &self.ech_configs()?);
        Ok(Scenario { snapshots })
    }

    /// [`Testbed::compile`], then [`Scenario::write`].
    pub fn scenario(&self, crs: &str, target: impl Fn(&str, &str, u16) -> SocketAddr) -> anyhow::Result<ScenarioFiles> {
        self.compile(crs)?.write(self, target)
    }
}

impl Scenario {
    /// Every export: home, service, port.
    pub fn exports(&self) -> Vec<(String, String, u16)> {
        let homes = self.snapshots.values().filter(|s| s.node.role == Role::Home);
        homes.flat_map(|s| s.exports.iter().map(|e| (s.node.id.clone(), e.service.clone(), e.port))).collect()
    }

    /// Every import: home, service, port.
    pub fn imports(&self) -> Vec<(String, String, u16)> {
        let homes = self.snapshots.values().filter(|s| s.node.role == Role::Home);
        homes.flat_map(|s| s.imports.iter().map(|i| (s.node.id.clone(), i.service.clone(), i.port))).collect()
    }

    /// Writes the snapshots; `target(home, service, port)` gives the address each export
    /// delivers to (the test's servers, started before).
    pub fn write(
        mut self,
        tb: &Testbed,
        target: impl Fn(&str, &str, u16) -> SocketAddr,
    ) -> anyhow::Result<ScenarioFiles> {
        let mut files = ScenarioFiles { mains: vec![], homes: vec![] };
        for (node, s) in &mut self.snapshots {
            for e in &mut s.exports {
                e.target = target(node, &e.service, e.port);
            }
            let path = tb.save(node, s)?;
            match (s.node.role, s.listen) {
                (Role::Main, Some(addr)) => files.mains.push((node.clone(), path, addr)),
                (Role::Main, None) => anyhow::bail!("{node}: the plan gave a main relay no listen address"),
                (Role::Home, _) => files.homes.push((node.clone(), path)),
            }
        }
        Ok(files)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn any_port_endpoints_get_distinct_free_ports() {
        let text = with_free_ports("a:\n  - endpoint: 127.0.0.1:0\n  - {listen: 127.0.0.1:0, x: 127.0.0.1:01}\nc: 1\n")
            .unwrap();
        let ports: Vec<&str> =
            text.lines().flat_map(|l| l.split("127.0.0.1:").skip(1)).map(|p| p.trim_end_matches([',', '}'])).collect();
        assert_eq!(ports.len(), 3, "{text}");
        assert!(
            ports[..2].iter().all(|p| p.split([',', ' ']).next().is_some_and(|n| n.parse::<u16>().unwrap() > 0)),
            "{text}"
        );
        assert_ne!(ports[0], ports[1].split(',').next().unwrap());
        assert!(text.contains("x: 127.0.0.1:01}"), "other addresses are left alone: {text}");
        assert!(text.ends_with("c: 1\n"));
    }
}
