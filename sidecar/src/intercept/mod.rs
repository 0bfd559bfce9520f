//! Transparent interception for unmodified pods: the init step's iptables rules and the
//! original-destination lookup used by the outbound listener.

pub mod original_dst;
pub mod rules;
