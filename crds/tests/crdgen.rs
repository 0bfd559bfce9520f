//! The committed CRD YAML is exactly what the Rust types generate, and it carries the
//! validations the API promises.

use std::path::Path;

use relayfed_crds::generate::crd_files;

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../charts/relayfed/crds");
    let generated = crd_files().unwrap();
    let mut committed: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    committed.sort();
    let mut names: Vec<String> = generated.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(committed, names, "charts/relayfed/crds holds files crdgen does not write; run `make crds`");
    for (name, text) in generated {
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap();
        assert!(on_disk == text, "charts/relayfed/crds/{name} is stale: run `make crds` and commit the result");
    }
}

#[test]
fn crds_carry_the_promised_validations() {
    let files = crd_files().unwrap();
    let text = |plural: &str| files.iter().find(|(n, _)| n.starts_with(plural)).map(|(_, t)| t.clone()).unwrap();
    let rollout = text("rolloutpolicies");
    for needle in ["maximum: 100", "- opportunistic", "x-kubernetes-validations", "name: SuccessRate", "- rp", "status: {}"] {
        assert!(rollout.contains(needle), "rolloutpolicies CRD lacks {needle:?}");
    }
    let relay = text("relays");
    for needle in ["a home relay must name at least one main relay", "pattern: ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", "duration(self.gracePeriod)"] {
        assert!(relay.contains(needle), "relays CRD lacks {needle:?}");
    }
    for (name, t) in &files {
        assert!(t.contains("subresources:\n      status: {}"), "{name} has no status subresource");
        assert!(t.contains("shortNames:"), "{name} has no short names");
        assert!(t.contains("observedGeneration"), "{name} status has no observedGeneration");
        assert!(t.contains("conditions"), "{name} status has no conditions");
    }
}
