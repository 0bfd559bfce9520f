//! What the local-mode supervisor reads from its node processes: the JSON ready line a node
//! prints on start, and the `/federation/health` JSON it serves, rendered into
//! `relayfed local status` (table and warnings) whatever shape they have.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_operator::local::status::{anonymity_warnings, render};
use serde_json::{Value, json};

fuzz_target!(|data: &[u8]| {
    let Ok(line) = std::str::from_utf8(data) else { return };
    let Ok(v) = serde_json::from_str::<Value>(line) else { return };
    let nodes = vec![json!({
        "node": v["node"].clone(),
        "role": v["role"].clone(),
        "quic": v["quic"].clone(),
        "imports": v["importList"].clone(),
        "health": v.clone(),
        "configVersion": v["version"].clone(),
        "ackedVersion": v["acked"].clone(),
    })];
    let _ = anonymity_warnings(&nodes);
    let _ = render(&json!({"federation": v["federation"].clone(), "rollout": v.clone(), "nodes": nodes, "warnings": v["warnings"].clone(), "lastRejected": v.clone(), "workloads": v["workloads"].clone()}));
});
