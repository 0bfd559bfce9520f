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

    proptest! {
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = Control::decode(&bytes);
        }
    }
}
