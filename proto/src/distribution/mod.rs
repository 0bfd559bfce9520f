//! Config distribution: how relays and sidecars receive new config snapshot versions from the
//! operator (or local mode) and acknowledge them.
//!
//! HTTP/1.1 over TLS 1.3 on TCP, mutually authenticated with certificates from the federation
//! CA (the node id in the client certificate must match the node in the path). Long-poll:
//!
//! - `GET /v1/snapshot/{node}?after={version}&waitSeconds={n}`: the node's snapshot (JSON,
//!   docs/protocol.md §8) as soon as its version is greater than `after` — at once on
//!   connect, since a fresh node asks with `after=0` or its file's version — else `304` after
//!   `n` seconds (at most [`MAX_WAIT_SECONDS`]). `403` when the certificate names another
//!   node, `404` for a node the plan does not have.
//! - `POST /v1/ack/{node}` with an [`Ack`]: the version the node now runs and how it went.
//! - `POST /v1/report/{node}` with a [`Report`]: the node's cumulative ECH cohort counters
//!   (calling homes, every [`REPORT_SECONDS`] while they change), which the operator's rollout
//!   analysis reads.
//!
//! Full protocol: docs/protocol.md §10.

pub mod certificate;

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::federation::direct_cohorts::PathCohorts;
use crate::federation::ech_cohorts::{CohortCounters, Cohorts, MAX_MAINS};

/// ALPN for the distribution endpoint.
pub const ALPN: &[u8] = b"http/1.1";
/// Longest long-poll the server holds open.
pub const MAX_WAIT_SECONDS: u64 = 60;
/// How often a calling home reports its ECH cohort counters (when they changed).
pub const REPORT_SECONDS: u64 = 5;
/// Largest report body accepted: both maps full ([`MAX_MAINS`] relays each, 63-character
/// ids, every counter at its largest) fit.
pub const MAX_REPORT_BYTES: usize = 256 * 1024;
/// Node id in the distribution server's certificate unless configured otherwise.
pub const DEFAULT_SERVER_NODE: &str = "relayfed-operator";

/// What a node did with a snapshot version.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum AckResult {
    /// Everything in it is in force.
    Applied,
    /// The live parts are in force; the fields in `restartRequired` wait for a restart.
    RestartRequired,
    /// Refused (parse or validation error in `detail`); the previous version stays.
    Invalid,
}

/// Body of `POST /v1/ack/{node}`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Ack {
    /// The snapshot version this acknowledges.
    pub version: u64,
    /// Outcome.
    pub result: AckResult,
    /// Fields that changed but need a restart.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub restart_required: Vec<String>,
    /// Error text for `invalid`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Ack {
    /// Parses an ack body; the error names the field.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let mut de = serde_json::Deserializer::from_slice(body);
        serde_path_to_error::deserialize(&mut de).map_err(|e| format!("{}: {}", e.path(), e.inner()))
    }
}

/// Body of `POST /v1/report/{node}`: cumulative ECH cohort counters by destination main
/// relay, and while direct paths are on the direct-path cohort counters. The server stamps it
/// with its own clock on receipt.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct Report {
    /// ECH counters by destination main relay id.
    pub by_main: BTreeMap<String, Cohorts>,
    /// Direct-path counters by destination main relay id (absent while direct paths were
    /// never on).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub direct_by_main: BTreeMap<String, PathCohorts>,
}

impl Report {
    /// Parses and checks a report body; the error names the field.
    pub fn parse(body: &[u8]) -> Result<Self, String> {
        let mut de = serde_json::Deserializer::from_slice(body);
        let r: Report =
            serde_path_to_error::deserialize(&mut de).map_err(|e| format!("{}: {}", e.path(), e.inner()))?;
        let ech = r.by_main.iter().map(|(m, c)| (m, [("ech", &c.ech), ("plain", &c.plain)]));
        check_relays("byMain", r.by_main.len(), ech)?;
        let direct = r.direct_by_main.iter().map(|(m, c)| (m, [("direct", &c.direct), ("relayed", &c.relayed)]));
        check_relays("directByMain", r.direct_by_main.len(), direct)?;
        Ok(r)
    }
}

/// Checks one map of a report: at most [`MAX_MAINS`] relays, each a node id, with plausible
/// counters; the error names the field.
fn check_relays<'a>(
    field: &str,
    len: usize,
    relays: impl Iterator<Item = (&'a String, [(&'static str, &'a CohortCounters); 2])>,
) -> Result<(), String> {
    if len > MAX_MAINS {
        return Err(format!("{field}: {len} relays, at most {MAX_MAINS}"));
    }
    for (main, cohorts) in relays {
        if !is_node_id(main) {
            return Err(format!("{field}: {main:?} is not a node id"));
        }
        for (cohort, counters) in cohorts {
            if let Some(why) = counters.implausible() {
                return Err(format!("{field}.{main}.{cohort}: {why}"));
            }
        }
    }
    Ok(())
}

fn is_node_id(s: &str) -> bool {
    !s.is_empty() && s.len() <= 63 && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// Splits a distribution path into (kind, node): `/v1/snapshot/x` -> ("snapshot", "x").
pub fn parse_path(path: &str) -> Option<(&str, &str)> {
    let rest = path.strip_prefix("/v1/")?;
    let (kind, node) = rest.split_once('/')?;
    (matches!(kind, "snapshot" | "ack" | "report") && is_node_id(node)).then_some((kind, node))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_acks_parse_strictly() {
        assert_eq!(parse_path("/v1/snapshot/shop-eu"), Some(("snapshot", "shop-eu")));
        assert_eq!(parse_path("/v1/ack/hub-us"), Some(("ack", "hub-us")));
        for bad in ["/v1/snapshot/", "/v1/other/x", "/v2/snapshot/x", "/v1/snapshot/A", "/v1/snapshot/a/b"] {
            assert_eq!(parse_path(bad), None, "{bad}");
        }
        let ack = Ack {
            version: 3,
            result: AckResult::RestartRequired,
            restart_required: vec!["imports".into()],
            detail: None,
        };
        assert_eq!(Ack::parse(&serde_json::to_vec(&ack).unwrap()).unwrap(), ack);
        let e = Ack::parse(br#"{"version": 1, "result": "maybe"}"#).unwrap_err();
        assert!(e.contains("result"), "{e}");
        assert!(Ack::parse(b"\xff").is_err());
        assert_eq!(parse_path("/v1/report/shop-eu"), Some(("report", "shop-eu")));
    }

    #[test]
    fn reports_parse_strictly() {
        let ok =
            br#"{"byMain": {"hub-eu": {"ech": {"attempts": 4, "successes": 3, "fallbacks": 1, "setupSeconds": 0.2},
                     "plain": {"attempts": 2, "successes": 2}}}}"#;
        let r = Report::parse(ok).unwrap();
        assert_eq!(r.by_main["hub-eu"].ech.successes, 3);
        assert_eq!(r.by_main["hub-eu"].plain.fallbacks, 0);
        for (bad, names) in [
            (&br#"{"byMain": {"Hub": {"ech": {"attempts": 1, "successes": 0}, "plain": {"attempts": 0, "successes": 0}}}}"#[..], "Hub"),
            (br#"{"byMain": {"m": {"ech": {"attempts": 1, "successes": 2}, "plain": {"attempts": 0, "successes": 0}}}}"#, "byMain.m.ech"),
            (br#"{"byMain": {"m": {"ech": {"attempts": -1, "successes": 0}, "plain": {"attempts": 0, "successes": 0}}}}"#, "attempts"),
            (br#"{"byMain": {}, "extra": 1}"#, "extra"),
            (br#"{}"#, "byMain"),
            (br#"{"byMain": {}, "directByMain": {"m": {"direct": {"attempts": 1, "successes": 2}, "relayed": {"attempts": 0, "successes": 0}}}}"#, "directByMain.m.direct"),
            (br#"{"byMain": {}, "directByMain": {"M": {"direct": {"attempts": 0, "successes": 0}, "relayed": {"attempts": 0, "successes": 0}}}}"#, "directByMain"),
        ] {
            let e = Report::parse(bad).unwrap_err();
            assert!(e.contains(names), "{e}");
        }
        let many: BTreeMap<String, Cohorts> = (0..=MAX_MAINS).map(|i| (format!("m{i}"), Cohorts::default())).collect();
        let body = serde_json::to_vec(&Report { by_main: many, ..Report::default() }).unwrap();
        assert!(Report::parse(&body).unwrap_err().contains("at most"));
        let direct = br#"{"byMain": {}, "directByMain": {"hub-eu": {"direct": {"attempts": 3, "successes": 2, "setupSeconds": 0.1},
                     "relayed": {"attempts": 5, "successes": 5}}}}"#;
        let r = Report::parse(direct).unwrap();
        assert_eq!((r.direct_by_main["hub-eu"].direct.successes, r.direct_by_main["hub-eu"].relayed.attempts), (2, 5));
        let plain = serde_json::to_string(&Report::default()).unwrap();
        assert_eq!(plain, r#"{"byMain":{}}"#, "without direct paths the report is unchanged");
    }

    #[test]
    fn the_largest_possible_report_fits_the_body_limit() {
        let c = CohortCounters {
            attempts: u64::MAX,
            successes: u64::MAX,
            fallbacks: u64::MAX,
            retries: u64::MAX,
            setup_seconds: -f64::MAX,
        };
        let id = |i: usize| format!("{i:0>63}");
        let r = Report {
            by_main: (0..MAX_MAINS).map(|i| (id(i), Cohorts { ech: c, plain: c })).collect(),
            direct_by_main: (0..MAX_MAINS).map(|i| (id(i), PathCohorts { direct: c, relayed: c })).collect(),
        };
        let len = serde_json::to_vec(&r).unwrap().len();
        assert!(len <= MAX_REPORT_BYTES, "{len} bytes");
    }

    proptest::proptest! {
        #[test]
        fn arbitrary_bodies_never_panic(body in proptest::collection::vec(proptest::num::u8::ANY, 0..256)) {
            let _ = Ack::parse(&body);
            let _ = Report::parse(&body);
            let _ = parse_path(&String::from_utf8_lossy(&body));
        }

        #[test]
        fn reports_round_trip(attempts in 0u64..1_000_000, ok in 0u64..1_000_000, secs in 0u32..1_000_000) {
            // Binary fractions with short decimals: exact through JSON.
            let secs = f64::from(secs) / 1024.0;
            let counters = crate::federation::ech_cohorts::CohortCounters { attempts: attempts.max(ok), successes: ok, fallbacks: 0, retries: 0, setup_seconds: secs };
            let r = Report {
                by_main: BTreeMap::from([("m".to_owned(), Cohorts { ech: counters, plain: counters })]),
                direct_by_main: BTreeMap::from([("d".to_owned(), PathCohorts { direct: counters, relayed: counters })]),
            };
            proptest::prop_assert_eq!(Report::parse(&serde_json::to_vec(&r).unwrap()).unwrap(), r);
        }

        #[test]
        fn acks_round_trip(version in proptest::num::u64::ANY, fields in proptest::collection::vec("[a-zA-Z.]{1,12}", 0..4), detail in proptest::option::of(".{0,40}")) {
            let ack = Ack { version, result: AckResult::Invalid, restart_required: fields, detail };
            proptest::prop_assert_eq!(Ack::parse(&serde_json::to_vec(&ack).unwrap()).unwrap(), ack);
        }
    }
}
