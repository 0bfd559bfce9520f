//! The iptables rules `relayfed-proxy init` installs, as data, and how they are applied.
//!
//! Like Istio's and Linkerd's proxy-init: a dedicated chain `RELAYFED_OUTPUT` in the `nat`
//! table, jumped to once from `OUTPUT` for TCP. In it, in order: the proxy's own uid returns
//! (so its connections are never redirected and cannot loop), loopback returns, excluded
//! CIDRs and ports return, then either each import's ClusterIP:port or all TCP is
//! REDIRECTed to the outbound listener. Inbound needs no rule: federation streams reach the
//! sidecar over its own outbound QUIC connection, and the app's port stays untouched.
//!
//! Applying is idempotent: the chain is created if missing and flushed, the jump is added
//! only when `-C` says it is absent. Clean-up deletes the jump and the chain.

use std::net::IpAddr;
use std::process::Command;

use thiserror::Error;

use crate::config::{Import, Intercept, InterceptScope};
pub use relayfed_proto::intercept::{Backend, parse_cidr};

/// The dedicated chain.
pub const CHAIN: &str = "RELAYFED_OUTPUT";

/// IPv4 (`iptables`) or IPv6 (`ip6tables`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Family {
    /// iptables.
    V4,
    /// ip6tables.
    V6,
}

impl Family {
    /// The command for this family and backend.
    pub fn binary(self, backend: Backend) -> &'static str {
        match (self, backend) {
            (Family::V4, Backend::Auto) => "iptables",
            (Family::V6, Backend::Auto) => "ip6tables",
            (Family::V4, Backend::Nft) => "iptables-nft",
            (Family::V6, Backend::Nft) => "ip6tables-nft",
            (Family::V4, Backend::Legacy) => "iptables-legacy",
            (Family::V6, Backend::Legacy) => "ip6tables-legacy",
        }
    }

    fn loopback(self) -> &'static str {
        match self {
            Family::V4 => "127.0.0.0/8",
            Family::V6 => "::1/128",
        }
    }

    fn matches(self, ip: IpAddr) -> bool {
        matches!((self, ip), (Family::V4, IpAddr::V4(_)) | (Family::V6, IpAddr::V6(_)))
    }
}

/// Why installing rules failed.
#[derive(Debug, Error)]
pub enum InitError {
    /// The iptables binary is not installed.
    #[error("{0} not found: install the iptables package (Debian: apt-get install iptables) in the init image")]
    Missing(&'static str),
    /// The process lacks the capability.
    #[error(
        "{binary} {args}: permission denied: the init step needs CAP_NET_ADMIN in the pod's network namespace (securityContext.capabilities.add: [NET_ADMIN])"
    )]
    Permission {
        /// Binary.
        binary: &'static str,
        /// Arguments.
        args: String,
    },
    /// iptables refused a rule.
    #[error("{binary} {args} failed: {stderr}")]
    Failed {
        /// Binary.
        binary: &'static str,
        /// Arguments.
        args: String,
        /// What it said.
        stderr: String,
    },
}

/// The rules of the dedicated chain for one family, as iptables arguments (after `-t nat`).
pub fn chain_rules(ic: &Intercept, imports: &[Import], family: Family) -> Vec<Vec<String>> {
    let s = |v: &[&str]| v.iter().map(|x| (*x).to_owned()).collect::<Vec<String>>();
    let port = ic.outbound_port.to_string();
    let uid = ic.proxy_uid.to_string();
    let mut rules = vec![
        s(&["-A", CHAIN, "-m", "owner", "--uid-owner", &uid, "-j", "RETURN"]),
        s(&["-A", CHAIN, "-d", family.loopback(), "-j", "RETURN"]),
    ];
    for cidr in &ic.exclude_cidrs {
        if let Some((ip, prefix)) = parse_cidr(cidr)
            && family.matches(ip)
        {
            rules.push(s(&["-A", CHAIN, "-d", &format!("{ip}/{prefix}"), "-j", "RETURN"]));
        }
    }
    for p in &ic.exclude_ports {
        rules.push(s(&["-A", CHAIN, "-p", "tcp", "--dport", &p.to_string(), "-j", "RETURN"]));
    }
    match ic.scope {
        InterceptScope::Imports => {
            for addr in imports.iter().filter_map(|i| i.cluster_ip).filter(|a| family.matches(a.ip())) {
                let dst = match addr.ip() {
                    IpAddr::V4(ip) => format!("{ip}/32"),
                    IpAddr::V6(ip) => format!("{ip}/128"),
                };
                rules.push(s(&[
                    "-A",
                    CHAIN,
                    "-p",
                    "tcp",
                    "-d",
                    &dst,
                    "--dport",
                    &addr.port().to_string(),
                    "-j",
                    "REDIRECT",
                    "--to-ports",
                    &port,
                ]));
            }
        }
        InterceptScope::All => rules.push(s(&["-A", CHAIN, "-p", "tcp", "-j", "REDIRECT", "--to-ports", &port])),
    }
    rules
}

/// The jump from `OUTPUT` into the chain.
pub fn jump() -> Vec<String> {
    ["OUTPUT", "-p", "tcp", "-j", CHAIN].iter().map(|s| (*s).to_owned()).collect()
}

/// The families to configure.
pub fn families(ic: &Intercept) -> Vec<Family> {
    if ic.ipv6 { vec![Family::V4, Family::V6] } else { vec![Family::V4] }
}

/// Shell lines for `--dry-run` (what `apply` would run, minus the existence checks).
pub fn dry_run(ic: &Intercept, imports: &[Import], backend: Backend) -> Vec<String> {
    let mut out = Vec::new();
    for f in families(ic) {
        let b = f.binary(backend);
        out.push(format!("{b} -t nat -N {CHAIN}  # if missing"));
        out.push(format!("{b} -t nat -F {CHAIN}"));
        for r in chain_rules(ic, imports, f) {
            out.push(format!("{b} -t nat {}", r.join(" ")));
        }
        out.push(format!("{b} -t nat -A {}  # unless already present", jump().join(" ")));
    }
    out
}

fn run(family: Family, backend: Backend, args: &[String]) -> Result<std::process::Output, InitError> {
    let binary = family.binary(backend);
    let mut full = vec!["-w".to_owned(), "5".to_owned(), "-t".to_owned(), "nat".to_owned()];
    full.extend(args.iter().cloned());
    let out = Command::new(binary).args(&full).output().map_err(|e| match e.kind() {
        std::io::ErrorKind::NotFound => InitError::Missing(binary),
        _ => InitError::Failed { binary, args: full.join(" "), stderr: e.to_string() },
    })?;
    Ok(out)
}

fn must(family: Family, backend: Backend, args: &[String]) -> Result<(), InitError> {
    let out = run(family, backend, args)?;
    if out.status.success() {
        return Ok(());
    }
    let stderr = String::from_utf8_lossy(&out.stderr).trim().to_owned();
    let binary = family.binary(backend);
    if stderr.contains("Permission denied")
        || stderr.contains("you must be root")
        || out.status.code() == Some(4) && stderr.contains("ermission")
    {
        return Err(InitError::Permission { binary, args: args.join(" ") });
    }
    Err(InitError::Failed { binary, args: args.join(" "), stderr })
}

fn succeeds(family: Family, backend: Backend, args: &[String]) -> Result<bool, InitError> {
    Ok(run(family, backend, args)?.status.success())
}

fn strs(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

/// Installs (or refreshes) the rules; running it twice leaves one set.
pub fn apply(ic: &Intercept, imports: &[Import], b: Backend) -> Result<(), InitError> {
    for f in families(ic) {
        if !succeeds(f, b, &strs(&["-S", CHAIN]))? {
            must(f, b, &strs(&["-N", CHAIN]))?;
        }
        must(f, b, &strs(&["-F", CHAIN]))?;
        for r in chain_rules(ic, imports, f) {
            must(f, b, &r)?;
        }
        let mut check = vec!["-C".to_owned()];
        check.extend(jump());
        if !succeeds(f, b, &check)? {
            let mut add = vec!["-A".to_owned()];
            add.extend(jump());
            must(f, b, &add)?;
        }
    }
    Ok(())
}

/// Removes everything `apply` added (safe to run when nothing is installed).
pub fn cleanup(ic: &Intercept, b: Backend) -> Result<(), InitError> {
    for f in families(ic) {
        let mut check = vec!["-C".to_owned()];
        check.extend(jump());
        while succeeds(f, b, &check)? {
            let mut del = vec!["-D".to_owned()];
            del.extend(jump());
            must(f, b, &del)?;
        }
        if succeeds(f, b, &strs(&["-S", CHAIN]))? {
            must(f, b, &strs(&["-F", CHAIN]))?;
            must(f, b, &strs(&["-X", CHAIN]))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ic(scope: InterceptScope) -> Intercept {
        Intercept {
            outbound_port: 15001,
            proxy_uid: 1337,
            scope,
            exclude_cidrs: vec!["10.0.0.1/32".into(), "fd00::/8".into()],
            exclude_ports: vec![22],
            unmatched: Default::default(),
            ipv6: true,
        }
    }

    fn import(addr: &str) -> Import {
        Import {
            service: "web".into(),
            port: 80,
            listen: "127.0.0.1:0".parse().unwrap(),
            node: None,
            main: None,
            noise_public_key: None,
            cluster_ip: Some(addr.parse().unwrap()),
        }
    }

    #[test]
    fn proxy_uid_and_loopback_come_first_then_exclusions_then_redirects() {
        let imports = [import("10.96.0.10:80"), import("[fd00:96::10]:8080")];
        let v4 = chain_rules(&ic(InterceptScope::Imports), &imports, Family::V4);
        let text: Vec<String> = v4.iter().map(|r| r.join(" ")).collect();
        assert_eq!(
            text,
            [
                "-A RELAYFED_OUTPUT -m owner --uid-owner 1337 -j RETURN",
                "-A RELAYFED_OUTPUT -d 127.0.0.0/8 -j RETURN",
                "-A RELAYFED_OUTPUT -d 10.0.0.1/32 -j RETURN",
                "-A RELAYFED_OUTPUT -p tcp --dport 22 -j RETURN",
                "-A RELAYFED_OUTPUT -p tcp -d 10.96.0.10/32 --dport 80 -j REDIRECT --to-ports 15001",
            ]
        );
        let v6: Vec<String> =
            chain_rules(&ic(InterceptScope::Imports), &imports, Family::V6).iter().map(|r| r.join(" ")).collect();
        assert!(v6.contains(&"-A RELAYFED_OUTPUT -d fd00::/8 -j RETURN".to_owned()));
        assert!(v6.last().unwrap().ends_with("-d fd00:96::10/128 --dport 8080 -j REDIRECT --to-ports 15001"));
    }

    #[test]
    fn scope_all_redirects_all_tcp_last() {
        let rules = chain_rules(&ic(InterceptScope::All), &[], Family::V4);
        assert_eq!(rules.last().unwrap().join(" "), "-A RELAYFED_OUTPUT -p tcp -j REDIRECT --to-ports 15001");
        assert_eq!(rules[0].join(" "), "-A RELAYFED_OUTPUT -m owner --uid-owner 1337 -j RETURN");
    }

    #[test]
    fn dry_run_prints_both_families() {
        let lines = dry_run(&ic(InterceptScope::All), &[], Backend::Auto);
        assert!(lines.iter().any(|l| l.starts_with("iptables -t nat -A OUTPUT -p tcp -j RELAYFED_OUTPUT")));
        assert!(lines.iter().any(|l| l.starts_with("ip6tables -t nat -A RELAYFED_OUTPUT -d ::1/128 -j RETURN")));
    }

    #[test]
    fn backends_pick_their_binaries_and_capabilities() {
        let nft = dry_run(&ic(InterceptScope::All), &[], Backend::Nft);
        assert!(nft.iter().all(|l| l.starts_with("iptables-nft ") || l.starts_with("ip6tables-nft ")), "{nft:?}");
        let legacy = dry_run(&ic(InterceptScope::All), &[], Backend::Legacy);
        assert!(legacy.iter().any(|l| l.starts_with("ip6tables-legacy -t nat -F RELAYFED_OUTPUT")), "{legacy:?}");
        assert_eq!(Backend::Nft.capabilities(), ["NET_ADMIN"]);
        assert_eq!(Backend::Legacy.capabilities(), ["NET_ADMIN", "NET_RAW"]);
    }

    #[test]
    fn cidrs() {
        assert_eq!(parse_cidr("10.0.0.0/8"), Some(("10.0.0.0".parse().unwrap(), 8)));
        assert_eq!(parse_cidr("::1"), Some(("::1".parse().unwrap(), 128)));
        assert_eq!(parse_cidr("10.0.0.0/33"), None);
        assert_eq!(parse_cidr("nope"), None);
    }
}
