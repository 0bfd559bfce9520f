//! Local mode's update path: an edited CR file (arbitrary bytes) admitted as an update of the
//! example federation, as `relayfed local up` does on every edit.
#![no_main]

use libfuzzer_sys::fuzz_target;
use relayfed_operator::local::sources::{Contents, Loaded, admit};

/// The example federation (examples/federation), as the previous admitted state.
const EXAMPLE: [(&str, &str); 5] = [
    ("00-federation.yaml", include_str!("../../../examples/federation/00-federation.yaml")),
    ("10-main-relays.yaml", include_str!("../../../examples/federation/10-main-relays.yaml")),
    ("20-home-relays.yaml", include_str!("../../../examples/federation/20-home-relays.yaml")),
    ("30-peers.yaml", include_str!("../../../examples/federation/30-peers.yaml")),
    ("40-rollout-policy.yaml", include_str!("../../../examples/federation/40-rollout-policy.yaml")),
];

fn example() -> Option<&'static Loaded> {
    static LOADED: std::sync::OnceLock<Option<Loaded>> = std::sync::OnceLock::new();
    LOADED
        .get_or_init(|| {
            let files = EXAMPLE
                .iter()
                .map(|(name, text)| (std::path::PathBuf::from(name), text.as_bytes().to_vec()))
                .collect();
            let contents = Contents { files, fingerprint: [0; 32] };
            admit(&contents, None).ok()
        })
        .as_ref()
}

fuzz_target!(|data: &[u8]| {
    let contents = Contents { files: vec![("edited.yaml".into(), data.to_vec())], fingerprint: [1; 32] };
    let _ = admit(&contents, example());
});
