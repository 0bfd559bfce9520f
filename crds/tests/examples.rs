//! The examples under `examples/` are admitted exactly as documented: every valid file passes
//! schema, CEL and `validate()`; every invalid file is rejected by the layer its header names,
//! with a message naming the field its header names.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::{Path, PathBuf};

use relayfed_crds::admission::{admit, admit_update, check_schema, schema_of};
use relayfed_crds::error::Errors;
use relayfed_crds::{AnyResource, CrdError, Peer, Relay, RelayFederation, RolloutPolicy, parse_documents};
use serde_json::Value;

fn examples_dir() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../examples")
}

fn yaml_files(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no examples in {}", dir.display());
    files
}

#[test]
fn the_example_federation_is_admitted_whole() {
    let mut kinds = Vec::new();
    for path in yaml_files(&examples_dir().join("federation")) {
        let text = std::fs::read_to_string(&path).unwrap();
        let resources =
            parse_documents(&path.display().to_string(), &text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        kinds.extend(resources.iter().map(AnyResource::kind));
    }
    kinds.sort();
    assert_eq!(
        kinds,
        [
            "Peer",
            "Peer",
            "Peer",
            "Peer",
            "Relay",
            "Relay",
            "Relay",
            "Relay",
            "Relay",
            "RelayFederation",
            "RolloutPolicy"
        ]
    );
}

/// The `# rejected-by:` and `# expect-field:` header lines of an invalid example.
fn header(text: &str, key: &str) -> String {
    text.lines()
        .find_map(|l| l.strip_prefix(&format!("# {key}:")))
        .unwrap_or_else(|| panic!("missing '# {key}:' header"))
        .trim()
        .to_owned()
}

fn schema_errors(kind: &str, doc: &Value) -> Errors {
    let schema = match kind {
        "RelayFederation" => schema_of::<RelayFederation>(),
        "Relay" => schema_of::<Relay>(),
        "Peer" => schema_of::<Peer>(),
        "RolloutPolicy" => schema_of::<RolloutPolicy>(),
        other => panic!("no schema for {other}"),
    };
    let mut errs = Errors::default();
    check_schema(&schema, doc, "", &mut errs);
    errs
}

fn cel_passes(kind: &str, doc: &Value) -> bool {
    let schema = match kind {
        "RelayFederation" => schema_of::<RelayFederation>(),
        "Relay" => schema_of::<Relay>(),
        "Peer" => schema_of::<Peer>(),
        _ => schema_of::<RolloutPolicy>(),
    };
    kube::core::cel::Validator::new().validate(&schema, doc, None).is_ok()
}

#[test]
fn every_invalid_example_is_rejected_by_its_layer_naming_its_field() {
    let files = yaml_files(&examples_dir().join("invalid"));
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let layer = header(&text, "rejected-by");
        let field = header(&text, "expect-field");
        let doc: Value = serde_saphyr::from_str(&text).unwrap();
        let kind = doc["kind"].as_str().unwrap().to_owned();

        let err = admit(&name, 0, doc.clone()).expect_err(&name);
        let message = err.to_string();
        match (&err, layer.as_str()) {
            (CrdError::UnsupportedKind { .. }, "kind") => continue,
            (CrdError::Invalid { errors, .. }, _) => {
                assert!(
                    errors.iter().any(|e| e.field == field),
                    "{name}: expected an error on {field}, got: {message}"
                );
                assert!(message.contains(&field), "{name}: message does not name {field}: {message}");
            }
            _ => panic!("{name}: unexpected error {err:?}"),
        }
        // The layer that rejects it is the one the header names, and no earlier one.
        let schema_ok = schema_errors(&kind, &doc).is_empty();
        let cel_ok = cel_passes(&kind, &doc);
        match layer.as_str() {
            "schema" => assert!(!schema_ok, "{name}: expected the schema to reject it"),
            "cel" => assert!(
                schema_ok && !cel_ok,
                "{name}: expected schema to pass and CEL to reject (schema ok {schema_ok}, cel ok {cel_ok})"
            ),
            "validate" => assert!(schema_ok && cel_ok, "{name}: expected schema and CEL to pass, validate() to reject"),
            other => panic!("{name}: unknown layer {other}"),
        }
    }
    assert!(files.len() >= 15, "keep a broad set of invalid examples");
}

#[test]
fn immutable_fields_are_enforced_on_update() {
    let text = std::fs::read_to_string(examples_dir().join("federation/00-federation.yaml")).unwrap();
    let old: Value = serde_saphyr::from_str(&text).unwrap();
    let mut new = old.clone();
    new["spec"]["trustDomain"] = Value::from("other.example");
    let err = admit_update("edit", 0, new, Some(&old)).unwrap_err();
    assert!(err.field_errors().iter().any(|e| e.field == "spec.trustDomain"), "{err}");
    // An update that leaves the trust domain alone is fine.
    let mut ok = old.clone();
    ok["spec"]["registryTtl"] = Value::from("20m");
    admit_update("edit", 0, ok, Some(&old)).unwrap();
}

#[test]
fn all_problems_are_reported_not_just_the_first() {
    let doc: Value = serde_json::json!({
        "apiVersion": "relayfed.io/v1alpha1", "kind": "RolloutPolicy",
        "metadata": {"name": "many"},
        "spec": {"ech": {"percentage": 101, "mode": "always"}, "resilience": {"retry": {"maxAttempts": 0}}}
    });
    let err = admit("inline", 0, doc).unwrap_err();
    let fields: Vec<&str> = err.field_errors().iter().map(|e| e.field.as_str()).collect();
    assert_eq!(fields, ["spec.ech.mode", "spec.ech.percentage", "spec.resilience.retry.maxAttempts"], "{err}");
    assert_eq!(err.code(), "INVALID_RESOURCE");
}

#[test]
fn defaults_are_applied_when_fields_are_omitted() {
    let doc = "apiVersion: relayfed.io/v1alpha1\nkind: RolloutPolicy\nmetadata: {name: bare}\nspec: {}\n";
    let resources = parse_documents("bare", doc).unwrap();
    let [AnyResource::RolloutPolicy(p)] = resources.as_slice() else { panic!("expected one policy: {resources:?}") };
    assert!(!p.spec.ech.enabled);
    assert_eq!(p.spec.ech.percentage, 0);
    assert_eq!(p.spec.ech.mode, relayfed_crds::EchMode::Opportunistic);
    assert_eq!(p.spec.resilience.retry.max_attempts, 3);
    assert_eq!(p.spec.resilience.timeouts.connect.to_string(), "5s");
    assert!((p.spec.ech.auto_rollback.min_success_rate - 0.99).abs() < f64::EPSILON);
}

#[test]
fn malformed_yaml_is_a_document_error() {
    let err = parse_documents("broken.yaml", "kind: [unclosed").unwrap_err();
    assert_eq!(err.code(), "MALFORMED_DOCUMENT", "{err}");
    assert!(err.to_string().contains("broken.yaml"));
}
