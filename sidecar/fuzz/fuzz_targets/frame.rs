//! Frame decoder (all frame types, including ERROR and RETRY_CONFIGS bodies).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::protocol::Frame;

fuzz_target!(|data: &[u8]| {
    if let Ok((frame, used)) = Frame::decode(data) {
        assert!(used <= data.len());
        let _ = frame.encode();
    }
});
