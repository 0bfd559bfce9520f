//! The committed CRD YAML is exactly what the Rust types generate, and it carries the
//! validations the API promises.
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;

use relayfed_crds::generate::{CRD_TEMPLATES, MCS_TEMPLATE, crd_files, mcs_template};

#[test]
fn committed_crds_match_the_types() {
    let dir = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..").join(CRD_TEMPLATES);
    let mut generated = crd_files().unwrap();
    generated.push((MCS_TEMPLATE.to_owned(), mcs_template().unwrap()));
    let mut committed: Vec<String> =
        std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name().to_string_lossy().into_owned()).collect();
    committed.sort();
    let mut names: Vec<String> = generated.iter().map(|(n, _)| n.clone()).collect();
    names.sort();
    assert_eq!(committed, names, "{CRD_TEMPLATES} holds files crdgen does not write; run `make crds`");
    for (name, text) in generated {
        let on_disk = std::fs::read_to_string(dir.join(&name)).unwrap();
        assert!(on_disk == text, "{CRD_TEMPLATES}/{name} is stale: run `make crds` and commit the result");
        assert!(text.contains("helm.sh/resource-policy: keep"), "{name}: uninstalling must not delete resources");
    }
}

#[test]
fn crds_carry_the_promised_validations() {
    let files = crd_files().unwrap();
    let text = |plural: &str| files.iter().find(|(n, _)| n.starts_with(plural)).map(|(_, t)| t.clone()).unwrap();
    let rollout = text("rolloutpolicies");
    for needle in
        ["maximum: 100", "- opportunistic", "x-kubernetes-validations", "name: SuccessRate", "- rp", "status: {}"]
    {
        assert!(rollout.contains(needle), "rolloutpolicies CRD lacks {needle:?}");
    }
    let relay = text("relays");
    for needle in [
        "a home relay must name at least one main relay",
        "pattern: ^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        "duration(self.gracePeriod)",
    ] {
        assert!(relay.contains(needle), "relays CRD lacks {needle:?}");
    }
    for (name, t) in &files {
        assert!(t.contains("subresources:\n      status: {}"), "{name} has no status subresource");
        assert!(t.contains("shortNames:"), "{name} has no short names");
        assert!(t.contains("observedGeneration"), "{name} status has no observedGeneration");
        assert!(t.contains("conditions"), "{name} status has no conditions");
    }
}

/// Every CEL rule compiles, uses only CRD-scope variables, and stays within the API server's
/// cost budget (bounded lists and strings), so a real cluster accepts the CRDs.
#[test]
fn cel_rules_compile_and_fit_the_cost_budget() {
    use kube::core::cel::{ScopeContext, analyze_rule, cel::Program, compile_schema};
    use serde_json::Value;

    fn walk(schema: &Value, path: &str, rules: &mut Vec<(String, String, Value)>) {
        if let Some(list) = schema.get("x-kubernetes-validations").and_then(Value::as_array) {
            for r in list {
                rules.push((path.to_owned(), r["rule"].as_str().unwrap().to_owned(), schema.clone()));
            }
        }
        if let Some(props) = schema.get("properties").and_then(Value::as_object) {
            for (k, v) in props {
                walk(v, &format!("{path}.{k}"), rules);
            }
        }
        if let Some(items) = schema.get("items") {
            walk(items, &format!("{path}[]"), rules);
        }
    }

    let mut rules = Vec::new();
    for crd in relayfed_crds::generate::all_crds() {
        let schema =
            serde_json::to_value(crd.spec.versions[0].schema.as_ref().unwrap().open_api_v3_schema.as_ref().unwrap())
                .unwrap();
        walk(&schema, &crd.spec.names.kind, &mut rules);
    }
    assert!(rules.len() >= 10, "expected the CEL rules of all four kinds, found {}", rules.len());
    for (path, rule, schema) in rules {
        Program::compile(&rule).unwrap_or_else(|e| panic!("{path}: rule {rule:?} does not compile: {e:?}"));
        // kube-cel's scope check does not know macro-bound variables (`all(r, ...)`); drop
        // those false positives, keep everything else (cost, bounds, real scope errors).
        let warnings: Vec<_> = analyze_rule(&rule, &compile_schema(&schema), ScopeContext::CrdValidation)
            .into_iter()
            .filter(|w| {
                let bound = w.message.split('\'').nth(1).is_some_and(|var| rule.contains(&format!("({var}, ")));
                !(w.kind == kube::core::cel::WarningKind::WrongScope && bound)
            })
            .collect();
        assert!(warnings.is_empty(), "{path}: rule {rule:?}: {warnings:?}");
    }
}
