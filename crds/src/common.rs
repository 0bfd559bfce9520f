//! Types shared by several kinds: conditions, durations, identifiers, permissions, limits.

use std::borrow::Cow;
use std::fmt;
use std::str::FromStr;

use schemars::{JsonSchema, Schema, SchemaGenerator, json_schema};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Regex for a node id: a DNS-1123 label (lowercase alphanumerics and `-`, at most 63 chars).
pub const NODE_ID_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$";
/// Regex for a `host:port` endpoint (DNS name, IPv4, or bracketed IPv6, then a port).
pub const ENDPOINT_PATTERN: &str = r"^([A-Za-z0-9]([-A-Za-z0-9.]*[A-Za-z0-9])?|\[[0-9A-Fa-f:.]+\]):([1-9][0-9]{0,3}|[1-5][0-9]{4}|6[0-4][0-9]{3}|65[0-4][0-9]{2}|655[0-2][0-9]|6553[0-5])$";
/// Regex for a DNS subdomain (trust domains, public names).
pub const DNS_NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";
/// Regex for a duration in Go's `time.ParseDuration` subset used here (`ms`, `s`, `m`, `h`).
pub const DURATION_PATTERN: &str = r"^([0-9]+(ms|s|m|h))+$";
/// Regex for a service name pattern in permissions: a DNS label, optionally `*`-suffixed, or `*`.
pub const SERVICE_PATTERN_PATTERN: &str = r"^(\*|[a-z0-9]([-a-z0-9.]*[a-z0-9])?(\*)?)$";

/// A duration written as in Kubernetes (`500ms`, `30s`, `10m`, `1h30m`).
///
/// Serialised as that string so CRs stay readable; the schema carries the format as a pattern
/// so the API server rejects `10 minutes` at admission.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Duration(pub std::time::Duration);

impl Duration {
    /// Builds a duration from whole seconds (used for defaults).
    pub const fn from_secs(secs: u64) -> Self {
        Self(std::time::Duration::from_secs(secs))
    }

    /// Builds a duration from milliseconds (used for defaults).
    pub const fn from_millis(ms: u64) -> Self {
        Self(std::time::Duration::from_millis(ms))
    }

    /// The value as a standard library duration.
    pub const fn get(self) -> std::time::Duration {
        self.0
    }
}

/// Why a duration string could not be parsed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid duration {input:?}: {reason} (expected e.g. 500ms, 30s, 10m, 1h30m)")]
pub struct DurationParseError {
    /// The rejected input.
    pub input: String,
    /// What was wrong with it.
    pub reason: &'static str,
}

impl FromStr for Duration {
    type Err = DurationParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = |reason| DurationParseError { input: s.to_owned(), reason };
        if s.is_empty() {
            return Err(err("empty"));
        }
        let mut total_ms: u64 = 0;
        let mut rest = s;
        while !rest.is_empty() {
            let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
            if digits == 0 {
                return Err(err("expected a number"));
            }
            let (num, tail) = rest.split_at(digits);
            let value: u64 = num.parse().map_err(|_| err("number too large"))?;
            let (unit_ms, unit_len) = if tail.starts_with("ms") {
                (1, 2)
            } else if tail.starts_with('s') {
                (1_000, 1)
            } else if tail.starts_with('m') {
                (60_000, 1)
            } else if tail.starts_with('h') {
                (3_600_000, 1)
            } else {
                return Err(err("expected a unit (ms, s, m, h)"));
            };
            let part = value.checked_mul(unit_ms).ok_or_else(|| err("too large"))?;
            total_ms = total_ms.checked_add(part).ok_or_else(|| err("too large"))?;
            rest = &tail[unit_len..];
        }
        Ok(Self::from_millis(total_ms))
    }
}

impl fmt::Display for Duration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        if ms == 0 {
            return f.write_str("0s");
        }
        let (h, rem) = (ms / 3_600_000, ms % 3_600_000);
        let (m, rem) = (rem / 60_000, rem % 60_000);
        let (s, ms) = (rem / 1_000, rem % 1_000);
        for (v, unit) in [(h, "h"), (m, "m"), (s, "s"), (ms, "ms")] {
            if v > 0 {
                write!(f, "{v}{unit}")?;
            }
        }
        Ok(())
    }
}

impl Serialize for Duration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Duration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = Cow::<'de, str>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for Duration {
    fn schema_name() -> Cow<'static, str> {
        "Duration".into()
    }

    fn json_schema(_: &mut SchemaGenerator) -> Schema {
        json_schema!({
            "type": "string",
            "pattern": DURATION_PATTERN,
            "maxLength": 32,
            "description": "A duration such as 500ms, 30s, 10m or 1h30m."
        })
    }
}

/// A standard Kubernetes condition (the shape of `metav1.Condition`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    /// Condition type in CamelCase, e.g. `Ready`, `Applied`, `Degraded`.
    #[serde(rename = "type")]
    pub type_: String,
    /// `True`, `False` or `Unknown`.
    pub status: String,
    /// A CamelCase machine-readable reason for the last transition.
    pub reason: String,
    /// A human-readable explanation.
    #[serde(default)]
    pub message: String,
    /// RFC 3339 time of the last status change.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_transition_time: Option<String>,
    /// The `.metadata.generation` the condition was computed from.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// Status fields every relayfed kind carries.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CommonStatus {
    /// The `.metadata.generation` last acted upon by the operator.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
    /// Standard conditions (`Ready`, `Applied`, ...), one per type: a list map, so field
    /// managers applying different condition types merge instead of replacing each other.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(extend("x-kubernetes-list-type" = "map", "x-kubernetes-list-map-keys" = ["type"]))]
    pub conditions: Vec<Condition>,
}

/// Which services a peer may call in our federation and which it may export into our registry.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct Permissions {
    /// Service name patterns the peer may call (`*` for all, `pay*` for a prefix).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = SERVICE_PATTERN_PATTERN), length(max = 253)))]
    pub call: Vec<String>,
    /// Service name patterns the peer may export (register) into our registry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 256), inner(regex(pattern = SERVICE_PATTERN_PATTERN), length(max = 253)))]
    pub export: Vec<String>,
}

/// A token-bucket rate limit for streams opened by one sender.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RateLimit {
    /// Sustained rate of new streams per second.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub streams_per_second: u32,
    /// Bucket size: how many streams may be opened at once after an idle period.
    #[schemars(range(min = 1, max = 1_000_000))]
    pub burst: u32,
}

/// A reference to a main relay of the federation, with its failover priority.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MainRelayRef {
    /// Node id of the main relay.
    #[schemars(regex(pattern = NODE_ID_PATTERN), length(min = 1, max = 63))]
    pub node_id: String,
    /// Where to reach it (`host:port`); may be omitted when the federation lists it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = ENDPOINT_PATTERN), length(max = 261))]
    pub endpoint: Option<String>,
    /// Lower is preferred; home nodes fail over in priority order.
    #[serde(default)]
    #[schemars(range(min = 0, max = 1000))]
    pub priority: u16,
}

/// Splits an endpoint `host:port` and checks the port is 1–65535.
pub fn parse_endpoint(endpoint: &str) -> Result<(&str, u16), &'static str> {
    let (host, port) = endpoint.rsplit_once(':').ok_or("missing ':port'")?;
    if host.is_empty() {
        return Err("missing host");
    }
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err("port must be 1-65535"),
        Ok(p) => Ok((host, p)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn durations_parse_and_print() {
        let cases = [("500ms", 500), ("30s", 30_000), ("10m", 600_000), ("1h30m", 5_400_000), ("0s", 0)];
        for (text, ms) in cases {
            let d: Duration = text.parse().unwrap();
            assert_eq!(d.get().as_millis(), ms, "{text}");
            assert_eq!(d.to_string(), text);
        }
    }

    #[test]
    fn bad_durations_name_the_problem() {
        for (text, reason) in
            [("", "empty"), ("10", "expected a unit"), ("m", "expected a number"), ("10 m", "expected a unit")]
        {
            let err = text.parse::<Duration>().unwrap_err();
            assert!(err.reason.contains(reason), "{text}: {err}");
        }
        assert_eq!("99999999999999999999h".parse::<Duration>().unwrap_err().reason, "number too large");
    }

    #[test]
    fn endpoints() {
        assert_eq!(parse_endpoint("relay.example.com:4433"), Ok(("relay.example.com", 4433)));
        assert_eq!(parse_endpoint("[::1]:1"), Ok(("[::1]", 1)));
        assert!(parse_endpoint("host:0").is_err());
        assert!(parse_endpoint("host:70000").is_err());
        assert!(parse_endpoint(":80").is_err());
    }

    proptest! {
        #[test]
        fn duration_display_roundtrips(ms in 0u64..10_000_000_000) {
            let d = Duration::from_millis(ms);
            prop_assert_eq!(d.to_string().parse::<Duration>().unwrap(), d);
        }

        #[test]
        fn duration_parse_never_panics(s in ".{0,40}") {
            let _ = s.parse::<Duration>();
        }
    }
}
