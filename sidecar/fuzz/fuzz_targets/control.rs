//! Control message decoder (JSON from homes and peer relays), then registry application.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::federation::registry::Registry;
use relayfed_sidecar::protocol::control::Control;

fuzz_target!(|data: &[u8]| {
    if let Ok(Control::Delta { delta }) = Control::decode(data) {
        let mut r = Registry::with_epoch("fuzz", std::time::Duration::from_secs(60), 1);
        let now = std::time::Instant::now();
        let _ = r.apply(&delta.origin.clone(), &delta, now);
        let _ = r.expire(now);
    }
});
