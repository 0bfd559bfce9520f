//! Where a plan's nodes run, told to the plan instead of guessed: the placement decides the
//! addresses main relays listen and serve their admin API on, how an endpoint (`ip:port` or
//! `host:port`) becomes an address, and the settings that differ between one machine and a
//! cluster. The plan stays a pure function: resolving names is the caller's function.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;

use relayfed_proto::config::{Role, Snapshot};

use super::KeyLayout;
use super::workloads::WorkloadFacts;

/// The admin port of a main relay in a cluster (probes and scraping; the chart's
/// PodMonitor and the relay Deployment name it).
pub const CLUSTER_ADMIN_PORT: u16 = 9901;

/// Local mode's health-check interval ceiling: peers ping every 2 s on loopback (dead links
/// are noticed by the QUIC idle timeout, `timeouts.linkIdle`, as in a cluster).
const LOCAL_HEALTH_CHECK_SECONDS: u64 = 2;

/// One machine or a cluster.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Site {
    /// `relayfed local up`: every node a process on this machine.
    Local,
    /// A Kubernetes cluster: main relays in Deployments behind Services, homes injected.
    Cluster,
}

/// Everything the plan is told about where it runs.
pub struct Placement<'a> {
    /// One machine or a cluster.
    pub site: Site,
    /// Where each node's key material lives.
    pub keys: KeyLayout,
    /// The version stamped on every snapshot (the distributor renumbers on publish).
    pub version: u64,
    /// Turns an endpoint into an address; `None`: it does not resolve here.
    pub resolve: &'a dyn Fn(&str) -> Option<SocketAddr>,
    /// Injected pods to plan a home for each (cluster).
    pub workloads: Option<&'a WorkloadFacts>,
    /// The file holding the passphrase of the key material (local mode seals keys at rest).
    pub key_passphrase_file: Option<PathBuf>,
}

/// An `ip:port` endpoint, without any lookup.
pub fn literal(endpoint: &str) -> Option<SocketAddr> {
    endpoint.parse().ok()
}

/// An `ip:port` endpoint, or a `host:port` looked up with the system resolver (the first
/// address). For local mode, where a name such as `localhost:4433` or a host in `/etc/hosts`
/// is as good as an address.
pub fn system_lookup(endpoint: &str) -> Option<SocketAddr> {
    literal(endpoint).or_else(|| endpoint.to_socket_addrs().ok()?.next())
}

impl<'a> Placement<'a> {
    /// Offline planning (`relayfed validate`, tests): literal endpoints only.
    pub fn offline(keys: KeyLayout, version: u64) -> Self {
        Self { site: Site::Local, keys, version, resolve: &literal, workloads: None, key_passphrase_file: None }
    }

    /// A cluster: literal endpoints (main relays' observed Service addresses come from their
    /// status) and the injected pods in `workloads`.
    pub fn cluster(keys: KeyLayout, workloads: Option<&'a WorkloadFacts>) -> Self {
        Self { site: Site::Cluster, keys, version: 0, resolve: &literal, workloads, key_passphrase_file: None }
    }

    /// Local mode: names resolved with the system resolver, keys sealed with `passphrase_file`.
    pub fn local(keys: KeyLayout, passphrase_file: PathBuf) -> Self {
        Self {
            site: Site::Local,
            keys,
            version: 0,
            resolve: &system_lookup,
            workloads: None,
            key_passphrase_file: Some(passphrase_file),
        }
    }

    /// Where a main relay (or one replica, `endpoint`) listens: on one machine its own
    /// federation endpoint; in a cluster every address of its pod at `listenPort` (the
    /// federation endpoint is the Service's address, not the pod's).
    pub fn main_listen(&self, endpoint: Option<&str>, listen_port: u16) -> SocketAddr {
        let any = SocketAddr::from(([0, 0, 0, 0], listen_port));
        match self.site {
            Site::Local => endpoint.and_then(|e| (self.resolve)(e)).unwrap_or(any),
            Site::Cluster => any,
        }
    }

    /// Applies what the site decides for every node: admin address, passphrase, health-check
    /// interval.
    pub fn finish(&self, s: &mut Snapshot) {
        match self.site {
            Site::Local => {
                s.admin = Some(SocketAddr::from(([127, 0, 0, 1], 0)));
                s.key_passphrase_file.clone_from(&self.key_passphrase_file);
                s.health_check_seconds = s.health_check_seconds.min(LOCAL_HEALTH_CHECK_SECONDS);
            }
            Site::Cluster if s.node.role == Role::Main => {
                s.admin = Some(SocketAddr::from(([0, 0, 0, 0], CLUSTER_ADMIN_PORT)));
            }
            Site::Cluster => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_resolve_as_the_placement_says() {
        assert_eq!(literal("10.0.0.1:4433"), Some(SocketAddr::from(([10, 0, 0, 1], 4433))));
        assert_eq!(literal("hub.example:4433"), None, "no lookups offline or in a cluster");
        assert!(system_lookup("localhost:4433").is_some_and(|a| a.ip().is_loopback() && a.port() == 4433));
        assert_eq!(system_lookup("no-such-host.invalid:1"), None);
    }

    #[test]
    fn listen_addresses_follow_the_site() {
        let keys = || KeyLayout { dir: "/k".into() };
        let local = Placement::local(keys(), "/p".into());
        assert_eq!(local.main_listen(Some("127.0.0.1:7000"), 4433), SocketAddr::from(([127, 0, 0, 1], 7000)));
        let cluster = Placement::cluster(keys(), None);
        assert_eq!(cluster.main_listen(Some("10.0.0.9:7000"), 4433), SocketAddr::from(([0, 0, 0, 0], 4433)));
    }
}
