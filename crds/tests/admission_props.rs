//! Property tests: admission never panics, names a field for every rejection, and an admitted
//! resource survives a round trip through its serialised form unchanged (nothing is lost).
#![allow(clippy::unwrap_used, clippy::expect_used)] // tests fail loudly by design

use std::path::Path;

use proptest::prelude::*;
use relayfed_crds::admission::admit;
use relayfed_crds::{AnyResource, CrdError, parse_documents};
use serde_json::Value;

fn example_docs() -> Vec<Value> {
    let dir = Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("../examples/federation");
    let mut docs = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        docs.extend(serde_saphyr::from_multiple::<Value>(&text).unwrap().into_iter().filter(|d| !d.is_null()));
    }
    docs.sort_by_key(|d| d.to_string());
    docs
}

fn arb_json() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::from),
        any::<i64>().prop_map(Value::from),
        any::<f64>().prop_filter("finite", |f| f.is_finite()).prop_map(Value::from),
        "[a-z0-9:.*@ -]{0,12}".prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 32, 6, |inner| {
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map("[a-zA-Z]{1,10}", inner, 0..6)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

/// Every object/array location in `v`, as JSON pointers.
fn pointers(v: &Value, at: String, out: &mut Vec<String>) {
    match v {
        Value::Object(m) => {
            for (k, child) in m {
                // RFC 6901 escaping: annotation keys contain `/`.
                let p = format!("{at}/{}", k.replace('~', "~0").replace('/', "~1"));
                out.push(p.clone());
                pointers(child, p, out);
            }
        }
        Value::Array(a) => {
            for (i, child) in a.iter().enumerate() {
                let p = format!("{at}/{i}");
                out.push(p.clone());
                pointers(child, p, out);
            }
        }
        _ => {}
    }
}

fn check_rejection(err: &CrdError) -> Result<(), TestCaseError> {
    if let CrdError::Invalid { errors, .. } = err {
        prop_assert!(!errors.is_empty());
        for e in errors {
            prop_assert!(!e.field.is_empty() && !e.reason.is_empty(), "{e:?}");
        }
    }
    Ok(())
}

fn to_value(r: &AnyResource) -> Value {
    match r {
        AnyResource::Federation(x) => serde_json::to_value(x),
        AnyResource::Relay(x) => serde_json::to_value(x),
        AnyResource::Peer(x) => serde_json::to_value(x),
        AnyResource::RolloutPolicy(x) => serde_json::to_value(x),
    }
    .unwrap()
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn arbitrary_objects_never_panic(kind in prop::sample::select(vec!["RelayFederation", "Relay", "Peer", "RolloutPolicy"]), spec in arb_json(), name in "[a-z]{1,8}") {
        let doc = serde_json::json!({"apiVersion": "relayfed.io/v1alpha1", "kind": kind, "metadata": {"name": name}, "spec": spec});
        if let Err(e) = admit("prop", 0, doc) {
            check_rejection(&e)?;
        }
    }

    #[test]
    fn mutated_examples_never_panic_and_name_a_field(idx in any::<prop::sample::Index>(), at in any::<prop::sample::Index>(), replacement in arb_json()) {
        let docs = example_docs();
        let mut doc = docs[idx.index(docs.len())].clone();
        let mut ptrs = Vec::new();
        pointers(&doc, String::new(), &mut ptrs);
        let ptr = ptrs[at.index(ptrs.len())].clone();
        *doc.pointer_mut(&ptr).unwrap() = replacement;
        if let Err(e) = admit("prop", 0, doc) {
            check_rejection(&e)?;
        }
    }

    #[test]
    fn arbitrary_yaml_never_panics(text in "\\PC{0,200}") {
        let _ = parse_documents("prop.yaml", &text);
    }
}

#[test]
fn admitted_resources_round_trip_unchanged() {
    for doc in example_docs() {
        let first = admit("first", 0, doc).unwrap();
        let again = admit("again", 0, to_value(&first)).unwrap();
        assert_eq!(first, again, "{} {} changed on a round trip", first.kind(), first.name());
    }
}
