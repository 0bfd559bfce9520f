//! CA-signed ECH configs as homes check them from views (docs/protocol.md §5.7): the relay
//! sending the view chooses the node id, the list and the signature; the CA is the home's own.
#![no_main]

use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::crypto::ca::{FederationCa, parse_cert_pem};
use relayfed_sidecar::crypto::ech_signature::verify_ech_config;

fn ca_der() -> &'static [u8] {
    static CA: OnceLock<Vec<u8>> = OnceLock::new();
    CA.get_or_init(|| {
        let ca = FederationCa::generate("fuzz.example").expect("a CA");
        parse_cert_pem(&ca.certified_key().cert_pem).expect("its certificate").to_vec()
    })
}

fuzz_target!(|data: &[u8]| {
    // [node id length][node id][list length (1 byte)][list][signature]
    let Some((&n, rest)) = data.split_first() else { return };
    let (node, rest) = rest.split_at(usize::from(n).min(rest.len()));
    let Some((&l, rest)) = rest.split_first() else { return };
    let (list, signature) = rest.split_at(usize::from(l).min(rest.len()));
    let node = String::from_utf8_lossy(node);
    assert!(verify_ech_config(ca_der(), &node, list, signature).is_err(), "only the CA signs");
});
