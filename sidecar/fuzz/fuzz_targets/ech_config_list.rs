//! ECHConfigList decoder: never panics; decodable lists re-encode byte for byte.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::protocol::EchConfigList;

fuzz_target!(|data: &[u8]| {
    if let Ok(list) = EchConfigList::decode(data) {
        assert!(list.encode().expect("decoded list encodes") == data);
    }
});
