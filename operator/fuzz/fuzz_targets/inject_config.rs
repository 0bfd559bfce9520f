//! Injection settings (`relayfed webhook serve --config`, chart values `injection.*`): the
//! JSON decoder, then the injection decision for a plain pod under the decoded settings.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_operator::webhook::{InjectConfig, decide};

fuzz_target!(|data: &[u8]| {
    if let Ok(cfg) = serde_json::from_slice::<InjectConfig>(data) {
        let pod = serde_json::json!({
            "metadata": {"name": "app", "namespace": "default", "labels": {"relayfed.io/inject": "enabled"}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        });
        let _ = decide(&pod, true, &cfg);
    }
});
