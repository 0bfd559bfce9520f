//! Route header decoder: never panics; whatever decodes re-encodes to the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::protocol::RouteHeader;

fuzz_target!(|data: &[u8]| {
    if let Ok(h) = RouteHeader::decode(data) {
        let again = h.encode().expect("a decoded header encodes");
        assert!(again == data, "decode/encode must be lossless");
    }
});
