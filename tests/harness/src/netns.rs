//! Network namespaces that stand for cluster nodes, created and deleted by the tests: a node
//! namespace holds its cluster's control plane, kube-proxy, the pod runner and a bridge for
//! its pods; a veth links it to the test's namespace (the node's address), and a "WAN" veth
//! links two nodes, each routing the other's load-balancer pool over it and masquerading its
//! pods' traffic to the other side, as a node's egress NAT does. Everything is removed on drop:
//! deleting a namespace deletes its veths, addresses, routes and iptables rules.

use std::process::Command;

use anyhow::{Context, bail};

fn run(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd).args(args).output().with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!("{cmd} {}: {}", args.join(" "), String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

fn in_ns(ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let mut all = vec!["netns", "exec", ns, cmd];
    all.extend_from_slice(args);
    run("ip", &all)
}

/// One node's namespace.
#[derive(Debug)]
pub struct NodeNs {
    /// Namespace name (`ip netns`).
    pub name: String,
    /// The node's address (on its link to the test's namespace); the control plane listens here.
    pub address: String,
    /// The node's podCIDR (its bridge holds the first address).
    pub pod_cidr: String,
    /// The node's load-balancer pool (`/24`): addresses a test assigns to LoadBalancer Services.
    pub lb_pool: String,
}

impl NodeNs {
    /// Creates node `index` (0..=200) named `<prefix>-node`: links, bridge `cbr0`, forwarding,
    /// `bridge-nf-call-iptables` (kube-proxy's rules then see bridged pod traffic).
    pub fn create(prefix: &str, index: u8) -> anyhow::Result<Self> {
        let name = format!("{prefix}-node");
        let _ = run("ip", &["netns", "del", &name]);
        let host_if = format!("{prefix}-h");
        let _ = run("ip", &["link", "del", &host_if]);
        let node = Self {
            address: format!("172.31.{index}.2"),
            pod_cidr: format!("10.{}.0.0/24", 240 + u16::from(index)),
            lb_pool: format!("192.168.{}.0/24", 240 + u16::from(index)),
            name,
        };
        let gw = format!("10.{}.0.1/24", 240 + u16::from(index));
        let setup = || -> anyhow::Result<()> {
            run("ip", &["netns", "add", &node.name])?;
            run("ip", &["link", "add", &host_if, "type", "veth", "peer", "name", "eth0", "netns", &node.name])?;
            run("ip", &["addr", "add", &format!("172.31.{index}.1/30"), "dev", &host_if])?;
            run("ip", &["link", "set", &host_if, "up"])?;
            let n = node.name.as_str();
            run("ip", &["-n", n, "addr", "add", &format!("{}/30", node.address), "dev", "eth0"])?;
            run("ip", &["-n", n, "link", "set", "eth0", "up"])?;
            run("ip", &["-n", n, "link", "set", "lo", "up"])?;
            // A node has a default route: without one, connecting to a ClusterIP from the node
            // itself (the API server calling a webhook Service) fails before kube-proxy's DNAT.
            run("ip", &["-n", n, "route", "add", "default", "via", &format!("172.31.{index}.1")])?;
            run("ip", &["-n", n, "link", "add", "cbr0", "type", "bridge"])?;
            run("ip", &["-n", n, "addr", "add", &gw, "dev", "cbr0"])?;
            run("ip", &["-n", n, "link", "set", "cbr0", "up"])?;
            in_ns(n, "sysctl", &["-qw", "net.ipv4.ip_forward=1"])?;
            in_ns(n, "sysctl", &["-qw", "net.bridge.bridge-nf-call-iptables=1"])?;
            // Pods reach beyond the node (the other cluster) from the node's address.
            in_ns(
                n,
                "iptables",
                &[
                    "-t",
                    "nat",
                    "-A",
                    "POSTROUTING",
                    "-s",
                    &node.pod_cidr,
                    "!",
                    "-d",
                    &node.pod_cidr,
                    "!",
                    "-o",
                    "cbr0",
                    "-j",
                    "MASQUERADE",
                ],
            )
        };
        if let Err(e) = setup() {
            let _ = run("ip", &["netns", "del", &node.name]);
            return Err(e.context(format!("creating node namespace {}", node.name)));
        }
        Ok(node)
    }

    /// Links two nodes with a "WAN" veth (`192.168.239.1` and `.2`), each routing the other's
    /// load-balancer pool over it.
    pub fn link(a: &NodeNs, b: &NodeNs) -> anyhow::Result<()> {
        run("ip", &["-n", &a.name, "link", "add", "wan", "type", "veth", "peer", "name", "wan", "netns", &b.name])?;
        for (node, addr, other, via) in
            [(a, "192.168.239.1/24", b, "192.168.239.2"), (b, "192.168.239.2/24", a, "192.168.239.1")]
        {
            run("ip", &["-n", &node.name, "addr", "add", addr, "dev", "wan"])?;
            run("ip", &["-n", &node.name, "link", "set", "wan", "up"])?;
            run("ip", &["-n", &node.name, "route", "add", &other.lb_pool, "via", via])?;
        }
        Ok(())
    }

    /// Brings this node's end of the WAN link down (`false`) or up: the other cluster becomes
    /// unreachable, as in a network partition.
    pub fn set_wan(&self, up: bool) -> anyhow::Result<()> {
        run("ip", &["-n", &self.name, "link", "set", "wan", if up { "up" } else { "down" }])?;
        if up {
            // Bringing a link up again drops its routes: restore the route to the other pool.
            let other = if self.lb_pool.starts_with("192.168.241.") { "192.168.242.0/24" } else { "192.168.241.0/24" };
            let via = if self.lb_pool.starts_with("192.168.241.") { "192.168.239.2" } else { "192.168.239.1" };
            run("ip", &["-n", &self.name, "route", "replace", other, "via", via])?;
        }
        Ok(())
    }

    /// The `n`th address of the load-balancer pool.
    pub fn lb_address(&self, n: u8) -> String {
        let base = self.lb_pool.trim_end_matches(".0/24");
        format!("{base}.{n}")
    }
}

impl Drop for NodeNs {
    fn drop(&mut self) {
        if std::env::var_os("RELAYFED_KEEP_CLUSTER").is_none() {
            let _ = run("ip", &["netns", "del", &self.name]);
        }
    }
}
