//! Pod networking as a bridge CNI plugin does it: each pod gets a network namespace, a veth
//! whose node end is a port of the node's bridge (hairpin on, so a pod reaches itself through
//! its own Service), an address from the node's podCIDR and a default route via the bridge.
//! The runner itself runs in the node's namespace, where the bridge, kube-proxy's rules and
//! the control plane live.

use std::collections::BTreeSet;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::Mutex;

use anyhow::{Context, bail};

/// One pod's network.
#[derive(Clone, Debug)]
pub struct PodNet {
    /// Name of the pod's network namespace (`ip netns`).
    pub netns: String,
    /// The pod IP.
    pub ip: Ipv4Addr,
}

/// The node's pod network: bridge, gateway and the addresses handed out.
pub struct Network {
    bridge: String,
    gateway: Ipv4Addr,
    base: u32,
    prefix: u8,
    name_prefix: String,
    used: Mutex<BTreeSet<u32>>,
}

/// Runs `ip args...`; an error carries its stderr.
pub fn ip(args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new("ip").args(args).output().context("running ip (iproute2)")?;
    if !out.status.success() {
        bail!("ip {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// Parses `a.b.c.d/len`.
pub fn parse_cidr(cidr: &str) -> anyhow::Result<(Ipv4Addr, u8)> {
    let (addr, len) = cidr.split_once('/').with_context(|| format!("{cidr}: not a.b.c.d/len"))?;
    let len: u8 = len.parse().with_context(|| format!("{cidr}: bad prefix length"))?;
    if !(8..=30).contains(&len) {
        bail!("{cidr}: prefix length must be 8..=30");
    }
    Ok((addr.parse().with_context(|| format!("{cidr}: bad address"))?, len))
}

impl Network {
    /// The network of `pod_cidr` on `bridge` (whose address is the CIDR's first host).
    /// `name_prefix` starts every namespace name (unique per node on this machine).
    pub fn new(pod_cidr: &str, bridge: &str, name_prefix: &str) -> anyhow::Result<Self> {
        let (addr, prefix) = parse_cidr(pod_cidr)?;
        let mask = u32::MAX << (32 - prefix);
        let base = u32::from(addr) & mask;
        Ok(Self {
            bridge: bridge.to_owned(),
            gateway: Ipv4Addr::from(base + 1),
            base,
            prefix,
            name_prefix: name_prefix.to_owned(),
            used: Mutex::new(BTreeSet::new()),
        })
    }

    fn allocate(&self) -> anyhow::Result<Ipv4Addr> {
        let size = 1u32 << (32 - self.prefix);
        let mut used = self.used.lock().map_err(|_| anyhow::anyhow!("address table poisoned"))?;
        let host = (2..size - 1).find(|h| !used.contains(h)).context("the podCIDR is full")?;
        used.insert(host);
        Ok(Ipv4Addr::from(self.base + host))
    }

    fn release(&self, ip: Ipv4Addr) {
        if let Ok(mut used) = self.used.lock() {
            used.remove(&(u32::from(ip) - self.base));
        }
    }

    /// Names of the namespace and the node-side veth for a pod uid.
    fn names(&self, uid: &str) -> (String, String) {
        let short: String = uid.chars().filter(char::is_ascii_hexdigit).take(8).collect();
        (format!("{}-{short}", self.name_prefix), format!("rfv{short}"))
    }

    /// Creates the pod's namespace, veth and address.
    pub fn attach(&self, uid: &str) -> anyhow::Result<PodNet> {
        let (netns, host_if) = self.names(uid);
        // A namespace left by an earlier runner of the same pod (crash) is replaced.
        let _ = ip(&["netns", "del", &netns]);
        let ip_addr = self.allocate()?;
        let result = (|| {
            ip(&["netns", "add", &netns])?;
            ip(&["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &netns])?;
            ip(&["link", "set", &host_if, "master", &self.bridge, "up"])?;
            let _ = Command::new("bridge").args(["link", "set", "dev", &host_if, "hairpin", "on"]).output();
            let cidr = format!("{ip_addr}/{}", self.prefix);
            ip(&["-n", &netns, "addr", "add", &cidr, "dev", "eth0"])?;
            ip(&["-n", &netns, "link", "set", "lo", "up"])?;
            ip(&["-n", &netns, "link", "set", "eth0", "up"])?;
            ip(&["-n", &netns, "route", "add", "default", "via", &self.gateway.to_string()])
        })();
        match result {
            Ok(()) => Ok(PodNet { netns, ip: ip_addr }),
            Err(e) => {
                let _ = ip(&["netns", "del", &netns]);
                self.release(ip_addr);
                Err(e)
            }
        }
    }

    /// Deletes the pod's namespace (and with it the veth) and frees its address.
    pub fn detach(&self, net: &PodNet) {
        let _ = ip(&["netns", "del", &net.netns]);
        let _ = std::fs::remove_dir_all(format!("/etc/netns/{}", net.netns));
        self.release(net.ip);
    }

    /// Removes every namespace of this node (runner shutdown).
    pub fn remove_all(&self) {
        if let Ok(entries) = std::fs::read_dir("/var/run/netns") {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if name.starts_with(&format!("{}-", self.name_prefix)) {
                    let _ = ip(&["netns", "del", &name]);
                    let _ = std::fs::remove_dir_all(format!("/etc/netns/{name}"));
                }
            }
        }
    }
}
