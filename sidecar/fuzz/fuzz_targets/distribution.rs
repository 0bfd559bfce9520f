//! Config distribution inputs: ack and report bodies (server side), request paths, and
//! snapshot bodies (client side) — decoding never panics, an accepted ack re-encodes to
//! itself, and an accepted report re-encodes to one that is accepted again.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::config::Snapshot;
use relayfed_sidecar::distribution::{Ack, Report, parse_path};

fuzz_target!(|data: &[u8]| {
    if let Ok(ack) = Ack::parse(data) {
        let again = Ack::parse(&serde_json::to_vec(&ack).unwrap()).unwrap();
        assert_eq!(again, ack);
    }
    if let Ok(report) = Report::parse(data) {
        let again = Report::parse(&serde_json::to_vec(&report).unwrap()).unwrap();
        assert_eq!(again.by_main.keys().collect::<Vec<_>>(), report.by_main.keys().collect::<Vec<_>>());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_path(text);
        if let Ok(s) = Snapshot::parse(text) {
            let _ = s.validate();
        }
    }
});
