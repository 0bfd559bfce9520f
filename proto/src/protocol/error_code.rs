//! The structured error codes carried on the wire, in logs (`code`), metrics and the admin API.
//!
//! The table in docs/protocol.md §7 lists the same codes; a test keeps the two in step. A
//! home logs each failed call with its code's [`ErrorCode::hint`] (and path traces show it).

use std::fmt;

macro_rules! codes {
    ($( $(#[$doc:meta])* $name:ident = $value:literal, $label:literal, $hint:literal; )*) => {
        /// A structured error code (two bytes on the wire).
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $( $(#[$doc])* $name, )*
            /// A code this implementation does not know (kept, not dropped).
            Unknown(u16),
        }

        impl ErrorCode {
            /// Every known code, in wire order.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name),*];

            /// The two-byte wire value.
            pub fn to_u16(self) -> u16 {
                match self { $(ErrorCode::$name => $value,)* ErrorCode::Unknown(v) => v }
            }

            /// Decodes a wire value; unknown values are preserved.
            pub fn from_u16(v: u16) -> Self {
                match v { $($value => ErrorCode::$name,)* other => ErrorCode::Unknown(other) }
            }

            /// The SCREAMING_SNAKE label used in logs, metrics and JSON.
            pub fn label(self) -> &'static str {
                match self { $(ErrorCode::$name => $label,)* ErrorCode::Unknown(_) => "UNKNOWN" }
            }

            /// What the operator should check.
            pub fn hint(self) -> &'static str {
                match self { $(ErrorCode::$name => $hint,)* ErrorCode::Unknown(_) => "upgrade: the peer sent a newer error code" }
            }
        }
    };
}

codes! {
    /// No registered instance of the requested service.
    ServiceNotFound = 1, "SERVICE_NOT_FOUND", "is the service exported by a connected home node, and is the main relay it registered with up (relayfed_relay_peer_up)?";
    /// The destination node is not connected to the relay and no peer owns it.
    NoRoute = 2, "NO_ROUTE", "is the destination home node connected to its main relay?";
    /// The stream crossed more relays than the hop limit allows.
    HopLimitExceeded = 3, "HOP_LIMIT_EXCEEDED", "routing loop or misconfigured peers: at most 3 relay hops";
    /// The next relay or peer could not be reached.
    PeerUnreachable = 4, "PEER_UNREACHABLE", "check the peer's endpoint and that UDP is allowed through firewalls/NetworkPolicies";
    /// A step did not finish in time.
    Timeout = 5, "TIMEOUT", "the far side is slow or unreachable; see timeouts in the RolloutPolicy";
    /// The sender exceeded its rate limit.
    RateLimited = 6, "RATE_LIMITED", "the sender opens streams faster than its quota";
    /// The circuit breaker for the destination is open.
    CircuitOpen = 7, "CIRCUIT_OPEN", "the destination failed repeatedly; it is retried after openDuration";
    /// ECH is required for this destination but no usable ECH config is known.
    EchRequired = 8, "ECH_REQUIRED", "publish the destination main relay's ECHConfigList or relax the mode";
    /// The ECH-sealed route header could not be opened (tampered or wrong key).
    EchDecryptFailed = 9, "ECH_DECRYPT_FAILED", "a relay altered the sealed header, or keys are out of sync";
    /// The ECH config id is unknown or expired; retry configs accompany this code.
    EchUnknownConfig = 10, "ECH_UNKNOWN_CONFIG", "the home's ECH config is stale: is config distribution reaching it? (retry configs from the path are never used)";
    /// The end-to-end Noise handshake failed.
    HandshakeFailed = 11, "HANDSHAKE_FAILED", "wrong static key for the destination, or a relay altered the route/ECH decision";
    /// A frame or header could not be decoded.
    MalformedFrame = 12, "MALFORMED_FRAME", "version mismatch or a corrupting middlebox";
    /// The protocol version is not supported.
    UnsupportedVersion = 13, "UNSUPPORTED_VERSION", "upgrade the older side";
    /// Policy denies this call or export.
    PermissionDenied = 14, "PERMISSION_DENIED", "see the Peer's permissions and the policy's defaultPermissions";
    /// The peer's identity is not known and unknown peers are rejected.
    UnknownPeer = 15, "UNKNOWN_PEER", "add a Peer resource or disable rejectUnknown";
    /// The destination home node could not reach its local target.
    TargetUnreachable = 16, "TARGET_UNREACHABLE", "is the exported app listening on its target address?";
    /// The stream already passed through this relay.
    LoopDetected = 17, "LOOP_DETECTED", "two relays route to each other for this destination";
    /// An unexpected internal failure.
    Internal = 18, "INTERNAL", "a bug: please report it with the logs";
}

impl ErrorCode {
    /// Whether the code is about ECH itself (the rollout analysis counts it against ECH).
    pub fn is_ech(self) -> bool {
        matches!(self, Self::EchRequired | Self::EchDecryptFailed | Self::EchUnknownConfig)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Unknown(v) => write!(f, "UNKNOWN({v})"),
            other => f.write_str(other.label()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_round_trip_and_are_unique() {
        let mut seen = std::collections::HashSet::new();
        for &c in ErrorCode::ALL {
            assert_eq!(ErrorCode::from_u16(c.to_u16()), c);
            assert!(seen.insert(c.to_u16()));
        }
        assert_eq!(ErrorCode::from_u16(999), ErrorCode::Unknown(999));
        assert_eq!(ErrorCode::Unknown(999).to_u16(), 999);
    }

    #[test]
    fn the_protocol_document_lists_exactly_these_codes() {
        let doc = include_str!("../../../docs/protocol.md");
        let documented: Vec<(u16, String)> = doc
            .lines()
            .filter_map(|l| {
                let cells: Vec<&str> = l.split('|').map(str::trim).collect();
                let code = cells.get(1)?.parse::<u16>().ok()?;
                let label = cells.get(2)?.strip_prefix('`')?.strip_suffix('`')?;
                Some((code, label.to_owned()))
            })
            .collect();
        let ours: Vec<(u16, String)> = ErrorCode::ALL.iter().map(|c| (c.to_u16(), c.label().to_owned())).collect();
        assert_eq!(documented, ours, "docs/protocol.md §7 and ErrorCode differ");
        assert!(ErrorCode::ALL.iter().all(|c| !c.hint().is_empty()));
    }
}
