//! The PROXY protocol v2 header decoder (docs/protocol.md §6.1), as an app reads what the
//! sidecar writes: never a panic; a decoded header re-encodes to the bytes it came from when
//! it holds only relayfed's TLVs in relayfed's order.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::protocol::proxy_header::{decode, encode};

fuzz_target!(|data: &[u8]| {
    if let Ok((caller, used)) = decode(data) {
        assert!(used <= data.len());
        let again = encode(&caller);
        assert_eq!(decode(&again).map(|(c, _)| c), Ok(caller));
    }
});
