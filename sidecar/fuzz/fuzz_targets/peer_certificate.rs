//! Peer certificate parsing: the node id in the URI SAN and the bound Noise key extension,
//! as relays read them from every hop certificate and origins from Noise message 2.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::crypto::ca::{node_id_from_cert, noise_key_from_cert};

fuzz_target!(|data: &[u8]| {
    let _ = node_id_from_cert(data, "fuzz.example");
    let _ = noise_key_from_cert(data);
});
