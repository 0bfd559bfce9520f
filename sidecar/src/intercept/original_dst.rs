//! The original destination of a redirected connection (`SO_ORIGINAL_DST`, IPv4 and IPv6).

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4, SocketAddrV6};
use std::os::fd::AsFd;

use nix::sys::socket::{getsockopt, sockopt};

/// The address the client dialed before iptables redirected it here; `None` when the
/// connection was not redirected (a direct connection to the listener).
pub fn original_dst<S: AsFd>(sock: &S, local: SocketAddr) -> Option<SocketAddr> {
    let dst = match local {
        SocketAddr::V4(_) => {
            let sa = getsockopt(sock, sockopt::OriginalDst).ok()?;
            SocketAddr::V4(SocketAddrV4::new(
                Ipv4Addr::from(u32::from_be(sa.sin_addr.s_addr)),
                u16::from_be(sa.sin_port),
            ))
        }
        SocketAddr::V6(_) => {
            let sa = getsockopt(sock, sockopt::Ip6tOriginalDst).ok()?;
            SocketAddr::V6(SocketAddrV6::new(
                Ipv6Addr::from(sa.sin6_addr.s6_addr),
                u16::from_be(sa.sin6_port),
                sa.sin6_flowinfo,
                sa.sin6_scope_id,
            ))
        }
    };
    // Without a NAT entry the kernel reports the local address itself.
    (dst != local).then_some(dst)
}
