//! Config snapshot parser and validation: never panics on any text.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::config::Snapshot;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(s) = Snapshot::parse(text)
    {
        let _ = s.validate();
    }
});
