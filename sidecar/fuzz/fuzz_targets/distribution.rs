//! Config distribution inputs: ack bodies (server side), request paths, and snapshot bodies
//! (client side) — decoding never panics, and an accepted ack re-encodes to itself.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::config::Snapshot;
use relayfed_sidecar::distribution::{Ack, parse_path};

fuzz_target!(|data: &[u8]| {
    if let Ok(ack) = Ack::parse(data) {
        let again = Ack::parse(&serde_json::to_vec(&ack).unwrap()).unwrap();
        assert_eq!(again, ack);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = parse_path(text);
        if let Ok(s) = Snapshot::parse(text) {
            let _ = s.validate();
        }
    }
});
