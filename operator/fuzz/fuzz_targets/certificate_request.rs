//! `POST /v1/certificate` bodies: parsed into a request or refused with a 400, never a panic;
//! a parsed request signs or is refused without panicking either.
#![no_main]

use std::sync::OnceLock;
use std::time::SystemTime;

use libfuzzer_sys::fuzz_target;
use relayfed_operator::identity::{Workload, issue, parse_request};
use relayfed_proto::crypto::ca::FederationCa;

static CA: OnceLock<FederationCa> = OnceLock::new();

fuzz_target!(|data: &[u8]| {
    if let Ok(req) = parse_request(data) {
        let ca = CA.get_or_init(|| FederationCa::generate("fuzz.example").expect("CA"));
        let w = Workload { namespace: "ns".into(), service_account: "sa".into(), pod: "pod-1".into() };
        let _ = issue(ca, &w, &req, SystemTime::now(), relayfed_operator::identity::CERT_VALIDITY);
    }
});
