//! AdmissionReview bodies as kube-apiserver sends them (and anything else): the webhook
//! answers with a response or a clear error, never a panic; a response always echoes the uid.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_operator::webhook::{InjectConfig, review};

fuzz_target!(|data: &[u8]| {
    let cfg = InjectConfig::default();
    for ns in [false, true] {
        if let Ok((v, _)) = review(data, ns, &cfg) {
            assert!(v["response"]["uid"].is_string(), "a response without the request uid");
        }
    }
});
