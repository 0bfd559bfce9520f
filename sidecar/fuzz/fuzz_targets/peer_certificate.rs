//! Peer certificate parsing: the node id in the URI SAN and the bound Noise key extension,
//! as relays read them from every hop certificate and origins from Noise message 2, and the
//! certificate chain a destination of another trust domain sends in Noise message 2.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::crypto::ca::{node_id_from_cert, noise_key_from_cert, split_der_chain};

fuzz_target!(|data: &[u8]| {
    let _ = node_id_from_cert(data, "fuzz.example");
    let _ = noise_key_from_cert(data);
    if let Ok(chain) = split_der_chain(data) {
        // Nothing lost, nothing invented: the pieces are the input.
        let joined: Vec<u8> = chain.iter().flat_map(|c| c.as_ref().iter().copied()).collect();
        assert_eq!(joined, data);
        for c in &chain {
            let _ = node_id_from_cert(c, "fuzz.example");
        }
    }
});
