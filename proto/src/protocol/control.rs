//! Control messages: registration, registry propagation, views, health checks, path traces.
//!
//! Carried in CONTROL frames (type `0x05`) whose payload is one UTF-8 JSON object with a
//! `type` field (docs/protocol.md §3.1). A control stream is the first stream a home node
//! opens to its main relay, or a dialing main relay opens to its peer; its first frame is
//! CONTROL instead of ROUTE.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::wire::DecodeError;
use crate::federation::registry::{Delta, Entry};

/// Most addresses a home lists in `candidates` (and a relay passes on in `punch`).
pub const MAX_CANDIDATES: usize = 8;

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// A service a home node serves.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Service {
    /// Service name.
    pub service: String,
    /// Service port.
    pub port: u16,
    /// Accepts ECH-sealed routes.
    #[serde(default)]
    pub ech: bool,
}

/// What a home node learns about a main relay.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct MainInfo {
    /// Its ECHConfigList, base64.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_config_list: Option<String>,
    /// The federation CA's signature over that list (§5.7), base64: homes seal to a list
    /// their snapshot lacks only when it verifies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_signature: Option<String>,
    /// For a main relay of another trust domain: the CA certificate (DER, base64) its relay
    /// presented, which signed the list. Homes use it only when its key is the partner's
    /// pinned one (§5.7); absent for relays of our federation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ech_signer: Option<String>,
}

/// One hop of a path trace.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct TraceHop {
    /// Node id.
    pub node: String,
    /// Unix milliseconds when it forwarded (relays) or received (destination) the probe.
    pub at_ms: u64,
}

/// A control message.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase", deny_unknown_fields)]
pub enum Control {
    /// Home -> main: the full set of services this home serves (replaces the previous set).
    #[serde(rename_all = "camelCase")]
    Register {
        /// Services.
        services: Vec<Service>,
        /// The home's Noise static public key, base64.
        noise_key: String,
        /// `service:port` the home calls; its views carry only these (absent: everything).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        imports: Option<Vec<String>>,
        /// This relay is the home's warm standby, not its active relay (absent: active).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        standby: bool,
        /// When the home made this relay active (see `Entry::attached`; absent: 0).
        #[serde(default, skip_serializing_if = "is_zero")]
        attached: u64,
    },
    /// Main -> home: every instance the home may call, and the main relays' ECH configs.
    /// Large views are split across several messages; all but the last set `more`.
    #[serde(rename_all = "camelCase")]
    View {
        /// Main relays by node id (in the first part).
        mains: BTreeMap<String, MainInfo>,
        /// Instances (local first).
        entries: Vec<Entry>,
        /// More parts follow.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        more: bool,
    },
    /// Home -> main: the last complete view was applied; the relay sends at most one view at
    /// a time per home and waits for this before sending a newer one (coalescing).
    ViewAck,
    /// Main <-> main: first message on a peer control stream.
    #[serde(rename_all = "camelCase")]
    PeerHello {
        /// The sender's node id.
        node: String,
        /// The sender's ECHConfigList, base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ech_config_list: Option<String>,
        /// The federation CA's signature over that list (§5.7), base64.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        ech_signature: Option<String>,
    },
    /// Main -> main: a change to the sender's local entries.
    Delta {
        /// The change.
        delta: Delta,
    },
    /// Main -> main: the sender is alive and at `seq`; extends the TTL of its entries.
    #[serde(rename_all = "camelCase")]
    Refresh {
        /// The sender.
        origin: String,
        /// Its epoch.
        epoch: u64,
        /// Its current sequence number.
        seq: u64,
    },
    /// Health check.
    Ping {
        /// Echoed in the pong.
        id: u64,
    },
    /// Health check answer.
    Pong {
        /// The ping's id.
        id: u64,
    },
    /// Main -> home (direct paths on): the address this relay sees the home's packets come
    /// from (its reflexive address), `ip:port`.
    #[serde(rename_all = "camelCase")]
    Observed {
        /// The address, `ip:port` (IPv6 in brackets).
        address: String,
    },
    /// Home -> main (direct paths on): the home's own addresses, `ip:port`, at most
    /// [`MAX_CANDIDATES`] (replaces the previous list).
    #[serde(rename_all = "camelCase")]
    Candidates {
        /// Local addresses of the home's QUIC socket.
        local: Vec<String>,
    },
    /// Home -> main: asks for a direct path to home `peer`.
    #[serde(rename_all = "camelCase")]
    PunchRequest {
        /// The other home's node id.
        peer: String,
        /// The main relay `peer` is registered at, when it is not this one.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        main: Option<String>,
    },
    /// Main -> main: home `from` (the sender's) asks for a direct path to home `peer` (the
    /// receiver's); its candidates and the attempt's token.
    #[serde(rename_all = "camelCase")]
    PunchForward {
        /// The asking home (registered at the sender).
        from: String,
        /// The other home (registered at the receiver).
        peer: String,
        /// 16 random bytes, base64.
        token: String,
        /// `from`'s addresses, as in `punch`.
        candidates: Vec<String>,
    },
    /// Main -> main: the answer to `punchForward`: `peer`'s candidates (it was sent `punch`),
    /// or why not.
    #[serde(rename_all = "camelCase")]
    PunchAnswer {
        /// The asking home.
        from: String,
        /// The other home.
        peer: String,
        /// The token of the `punchForward`.
        token: String,
        /// `peer`'s addresses (empty when refused).
        #[serde(default, skip_serializing_if = "Vec::is_empty")]
        candidates: Vec<String>,
        /// Why not, as in `punchRefused` (absent: coordinated).
        #[serde(default, skip_serializing_if = "Option::is_none")]
        refused: Option<String>,
    },
    /// Main -> both homes at once: punch toward `peer` now.
    #[serde(rename_all = "camelCase")]
    Punch {
        /// The other home's node id.
        peer: String,
        /// 16 random bytes, base64, carried in every probe datagram of this attempt.
        token: String,
        /// The other home's addresses: reflexive first, then local ones.
        candidates: Vec<String>,
        /// This home dials (it asked); the other only sends probes and accepts.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        dial: bool,
    },
    /// Main -> home: the relay will not coordinate a direct path to `peer`.
    #[serde(rename_all = "camelCase")]
    PunchRefused {
        /// The other home's node id.
        peer: String,
        /// Why (`disabled`, `not_connected`, `no_address`, `not_permitted`).
        reason: String,
    },
    /// Destination -> origin: answer to a probe stream (route header flag `probe`).
    #[serde(rename_all = "camelCase")]
    TraceResult {
        /// Relays traversed, then the destination itself.
        hops: Vec<TraceHop>,
    },
}

impl Control {
    /// Encodes as JSON.
    pub fn encode(&self) -> Vec<u8> {
        serde_json::to_vec(self).unwrap_or_default()
    }

    /// Decodes a CONTROL payload; errors name the field.
    pub fn decode(payload: &[u8]) -> Result<Self, DecodeError> {
        let mut de = serde_json::Deserializer::from_slice(payload);
        serde_path_to_error::deserialize(&mut de)
            .map_err(|e| DecodeError::invalid("control message", format!("{}: {}", e.path(), e.inner())))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn messages_round_trip_with_readable_json() {
        let m = Control::Register {
            services: vec![Service { service: "echo".into(), port: 7, ech: true }],
            noise_key: "k".into(),
            imports: None,
            standby: false,
            attached: 0,
        };
        let bytes = m.encode();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"type":"register","services":[{"service":"echo","port":7,"ech":true}],"noiseKey":"k"}"#
        );
        assert_eq!(Control::decode(&bytes).unwrap(), m);
        let err = Control::decode(br#"{"type":"register","services":[{"service":"echo","port":"x"}],"noiseKey":"k"}"#)
            .unwrap_err();
        assert!(err.to_string().contains("expected u16"), "{err}");
        assert!(Control::decode(br#"{"type":"nope"}"#).is_err());
    }

    #[test]
    fn direct_path_messages_have_their_documented_json() {
        let m = Control::Punch {
            peer: "pay".into(),
            token: "dG9rZW4".into(),
            candidates: vec!["198.51.100.7:4433".into()],
            dial: true,
        };
        let bytes = m.encode();
        assert_eq!(
            std::str::from_utf8(&bytes).unwrap(),
            r#"{"type":"punch","peer":"pay","token":"dG9rZW4","candidates":["198.51.100.7:4433"],"dial":true}"#
        );
        assert_eq!(Control::decode(&bytes).unwrap(), m);
        let o = Control::decode(br#"{"type":"observed","address":"[2001:db8::1]:9"}"#).unwrap();
        assert_eq!(o, Control::Observed { address: "[2001:db8::1]:9".into() });
        let r = Control::decode(br#"{"type":"punchRequest","peer":"pay"}"#).unwrap();
        assert_eq!(r, Control::PunchRequest { peer: "pay".into(), main: None });
        assert!(Control::decode(br#"{"type":"punchRequest"}"#).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = Control::decode(&bytes);
        }
    }
}
