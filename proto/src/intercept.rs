//! Traffic interception settings that the plan writes and `relayfed-proxy init` reads: which
//! iptables implementation installs the rules, and the CIDR syntax of exclusions. The rules
//! themselves are built and applied by the proxy (`relayfed_sidecar::intercept::rules`).

use std::net::IpAddr;

/// Which iptables implementation installs the rules: the kernel's nf_tables (`iptables-nft`),
/// the legacy x_tables (`iptables-legacy`), or whatever `iptables` resolves to in the image.
/// The node's other rules (kube-proxy, the CNI) use one of them; mixing both in one network
/// namespace works but hides each set from the other's listing.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Backend {
    /// `iptables` / `ip6tables` as installed (Debian: the nft variant unless switched).
    #[default]
    Auto,
    /// `iptables-nft` / `ip6tables-nft` (netlink; needs CAP_NET_ADMIN only).
    Nft,
    /// `iptables-legacy` / `ip6tables-legacy` (raw socket; needs CAP_NET_ADMIN and CAP_NET_RAW).
    Legacy,
}

impl Backend {
    /// The `--iptables` argument of `relayfed-proxy init` that selects this backend.
    pub fn arg(self) -> &'static str {
        match self {
            Backend::Auto => "auto",
            Backend::Nft => "nft",
            Backend::Legacy => "legacy",
        }
    }

    /// The Linux capabilities this backend needs, as a pod's securityContext names them.
    pub fn capabilities(self) -> &'static [&'static str] {
        match self {
            Backend::Nft => &["NET_ADMIN"],
            Backend::Auto | Backend::Legacy => &["NET_ADMIN", "NET_RAW"],
        }
    }
}

impl std::str::FromStr for Backend {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "auto" => Ok(Backend::Auto),
            "nft" => Ok(Backend::Nft),
            "legacy" => Ok(Backend::Legacy),
            other => Err(format!("{other:?} is not an iptables backend (auto, nft, legacy)")),
        }
    }
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.arg())
    }
}

/// Parses `ip/prefix` (or a bare IP) into the address and prefix length.
pub fn parse_cidr(s: &str) -> Option<(IpAddr, u8)> {
    let (ip, prefix) = match s.split_once('/') {
        Some((ip, p)) => (ip.parse::<IpAddr>().ok()?, p.parse::<u8>().ok()?),
        None => {
            let ip = s.parse::<IpAddr>().ok()?;
            (ip, if ip.is_ipv4() { 32 } else { 128 })
        }
    };
    let max = if ip.is_ipv4() { 32 } else { 128 };
    (prefix <= max).then_some((ip, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backends_parse_from_their_argument() {
        for b in [Backend::Auto, Backend::Nft, Backend::Legacy] {
            assert_eq!(b.arg().parse::<Backend>(), Ok(b));
        }
        assert!("iptables".parse::<Backend>().is_err());
    }
}
