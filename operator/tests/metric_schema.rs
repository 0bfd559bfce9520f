//! docs/operations.md "Metrics" lists exactly the metrics the code registers: a metric added,
//! renamed or removed without its row fails here.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::collections::BTreeSet;
use std::path::Path;

fn repo() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/.."))
}

/// The family names registered in `file`: `prefix` followed by the name literal of each
/// `register(` and `register_with_unit(` (which appends the unit; every such call here uses
/// seconds). The data plane registers each component's families in a registry whose prefix
/// is `relayfed_<component>` (the file's name).
fn registered(file: &str, prefix: &str) -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join(file)).unwrap();
    let mut out = BTreeSet::new();
    for (call, suffix) in [("register(", ""), ("register_with_unit(", "_seconds")] {
        for (i, _) in text.match_indices(call) {
            if text[..i].ends_with(|c: char| c.is_alphanumeric() || c == '_') {
                continue; // `sub_register(` and the like
            }
            let rest = &text[i + call.len()..];
            let Some(open) = rest.find('"') else { continue };
            if !rest[..open].trim().is_empty() {
                continue; // not a literal name argument
            }
            let name = &rest[open + 1..];
            let name = &name[..name.find('"').unwrap()];
            assert!(!name.contains(' '), "{file}: {name:?}");
            out.insert(format!("{prefix}{name}{suffix}"));
        }
    }
    out
}

/// The process collector's families (descriptors, not `register` calls).
fn collected() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo().join("serving/src/process.rs")).unwrap();
    text.split('"').filter(|s| s.starts_with("process_") && !s.contains(' ')).map(str::to_owned).collect()
}

/// `(family, type)` of every row of the Metrics table.
fn documented() -> Vec<(String, String)> {
    let doc = std::fs::read_to_string(repo().join("docs/operations.md")).unwrap();
    let section = doc.split("\n## Metrics\n").nth(1).expect("docs/operations.md has a Metrics section");
    let section = section.split("\n## ").next().unwrap();
    section
        .lines()
        .filter_map(|l| {
            let cells: Vec<&str> = l.split('|').map(str::trim).collect();
            let name = cells.get(1)?.strip_prefix('`')?.strip_suffix('`')?;
            let kind = (*cells.get(2)?).to_owned();
            let family = match kind.as_str() {
                "counter" => name.strip_suffix("_total").unwrap_or_else(|| panic!("counter {name} without _total")),
                "info" => name.strip_suffix("_info").unwrap_or_else(|| panic!("info {name} without _info")),
                "gauge" | "histogram" => name,
                other => panic!("{name}: unknown type {other:?}"),
            };
            Some((family.to_owned(), kind))
        })
        .collect()
}

#[test]
fn the_metric_table_lists_exactly_the_registered_metrics() {
    let mut code = collected();
    for component in ["transport", "relay", "proxy"] {
        code.extend(registered(
            &format!("sidecar/src/admin/metrics/{component}.rs"),
            &format!("relayfed_{component}_"),
        ));
    }
    for f in ["operator/src/metrics.rs", "serving/src/process.rs"] {
        code.extend(registered(f, ""));
    }
    assert!(code.len() > 40, "too few metrics found in the code: {code:?}");
    let docs = documented();
    let doc_names: BTreeSet<String> = docs.iter().map(|(n, _)| n.clone()).collect();
    assert_eq!(docs.len(), doc_names.len(), "a metric is listed twice");
    let missing: Vec<&String> = code.difference(&doc_names).collect();
    let stale: Vec<&String> = doc_names.difference(&code).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "not documented: {missing:?}; documented but not registered: {stale:?}"
    );
}

#[test]
fn documented_types_match_what_the_registries_encode() {
    let mut encoded = relayfed_sidecar::admin::metrics::Metrics::new().encode();
    encoded.push_str(&relayfed_operator::metrics::OperatorMetrics::new().encode());
    let docs = documented();
    let mut checked = 0;
    for line in encoded.lines() {
        let Some(rest) = line.strip_prefix("# TYPE ") else { continue };
        let (family, kind) = rest.split_once(' ').unwrap();
        let row = docs.iter().find(|(n, _)| n == family).unwrap_or_else(|| panic!("{family} is not documented"));
        assert_eq!(row.1, kind, "{family}: documented as {}, encoded as {kind}", row.1);
        checked += 1;
    }
    assert!(checked > 15, "only {checked} families encoded");
}
