//! Relay pod placement (`relayfed operator run --relay-pods`, chart values `relays.*`): the
//! JSON decoder, then the Deployment built for a relay under the decoded placement.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_operator::k8s::{RelayPods, Settings};

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(relay_pods) = RelayPods::parse(text) {
        let settings = Settings { relay_pods, ..Settings::default() };
        let relay: relayfed_crds::Relay = serde_json::from_value(serde_json::json!({
            "apiVersion": "relayfed.io/v1alpha1", "kind": "Relay",
            "metadata": {"name": "hub", "namespace": "ns"},
            "spec": {"type": "main", "nodeId": "hub", "federation": "acme", "listenPort": 7401},
        }))
        .expect("a fixed relay");
        let _ = relayfed_operator::k8s::relay_objects::deployment(&relay, &Default::default(), &settings);
    }
});
