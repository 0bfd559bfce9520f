//! The admin API's query-string parser (`/federation/trace?service=NAME&port=N`).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::admin::server::query_param;

fuzz_target!(|data: &[u8]| {
    let q = String::from_utf8_lossy(data);
    for key in ["service", "port", ""] {
        if let Some(v) = query_param(&q, key) {
            assert!(q.contains(v));
            let _ = v.parse::<u16>();
        }
    }
});
