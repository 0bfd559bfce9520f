//! A relay opening a sealed route: arbitrary encapsulated keys, suites and ciphertexts against
//! a fixed ECH key (HPKE open), and arbitrary plaintexts through the padding and inner-route
//! decoder that runs after a successful open.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::crypto::ech::EchKeyPair;
use relayfed_sidecar::protocol::route::{InnerRoute, SealedRoute};

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    if selector & 1 == 0 {
        // What an open yields: padding plus the inner route.
        if let Ok(route) = InnerRoute::from_padded(rest) {
            let again = route.padded().expect("a decoded route re-encodes");
            assert_eq!(InnerRoute::from_padded(&again).expect("its own padding decodes"), route);
        }
        return;
    }
    let Ok(key) = EchKeyPair::from_secret(7, "relay.example", [0x42; 32]) else { return };
    let (head, payload) = rest.split_at(rest.len().min(37));
    let enc_len = head.len().saturating_sub(5);
    let sealed = SealedRoute {
        main: "hub".into(),
        config_id: head.first().copied().unwrap_or(7),
        kdf_id: u16::from_be_bytes([head.get(1).copied().unwrap_or(0), head.get(2).copied().unwrap_or(1)]),
        aead_id: u16::from_be_bytes([head.get(3).copied().unwrap_or(0), head.get(4).copied().unwrap_or(3)]),
        enc: head.get(5..5 + enc_len).unwrap_or_default().to_vec(),
        payload: payload.to_vec(),
    };
    // Never a panic: garbage fails to open with an error.
    let _ = key.open(&sealed);
});
