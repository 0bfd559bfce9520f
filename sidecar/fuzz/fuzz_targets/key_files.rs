//! Key material at rest: sealed-key envelopes (with and without a passphrase), ECH key files
//! (JSON, then the keys they hold) and Noise key files (base64).
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_sidecar::config::keys::EchKeyFile;
use relayfed_sidecar::config::keystore::unwrap;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let _ = unwrap(&text, None);
    // Argon2 cost is bounded by the decoder (m <= 1 GiB, t <= 16), but a bound that high
    // would turn every such input into a fuzzer timeout: derive keys only for cheap inputs.
    let cost = serde_json::from_str::<serde_json::Value>(&text)
        .map(|v| v["m"].as_u64().unwrap_or(0).saturating_mul(v["t"].as_u64().unwrap_or(0).max(1)))
        .unwrap_or(0);
    if cost <= 64 * 1024 {
        let _ = unwrap(&text, Some(b"fuzz passphrase"));
    }
    if let Ok(file) = serde_json::from_slice::<EchKeyFile>(data) {
        let _ = file.key_set(std::path::Path::new("fuzz-ech.json"), std::time::Duration::from_secs(60));
    }
    if let Some(bytes) = relayfed_sidecar::config::base64_decode(&text) {
        let _ = relayfed_sidecar::crypto::noise::StaticKeypair::from_private(&bytes);
    }
});
