//! Fuzz admission with JSON objects of each kind (reaches deeper than random YAML does).
#![no_main]

use libfuzzer_sys::fuzz_target;

const KINDS: [&str; 4] = ["RelayFederation", "Relay", "Peer", "RolloutPolicy"];

fuzz_target!(|data: &[u8]| {
    let Some((&selector, rest)) = data.split_first() else { return };
    let Ok(spec) = serde_json::from_slice::<serde_json::Value>(rest) else { return };
    let doc = serde_json::json!({
        "apiVersion": "relayfed.io/v1alpha1",
        "kind": KINDS[usize::from(selector) % KINDS.len()],
        "metadata": {"name": "fuzz"},
        "spec": spec,
    });
    let _ = relayfed_crds::admission::admit("fuzz", 0, doc);
});
