//! The crate boundaries the layout promises: the protocol crate has no I/O runtime in its
//! dependency tree, and the operator does not link the data plane's transport.
#![allow(clippy::unwrap_used, clippy::expect_used, missing_docs)]

use std::process::Command;

/// The names of the packages in `package`'s normal (non-dev, non-build) dependency tree.
fn normal_tree(package: &str) -> Vec<String> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["tree", "--offline", "-e", "normal", "--prefix", "none", "--format", "{p}", "-p", package])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("cargo tree runs");
    assert!(out.status.success(), "cargo tree -p {package}: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8(out.stdout).unwrap();
    let names: Vec<String> = text.lines().filter_map(|l| l.split_whitespace().next()).map(str::to_owned).collect();
    assert!(names.iter().any(|n| n == package), "{package} not in its own tree:\n{text}");
    names
}

fn offenders(names: &[String], banned: &[&str]) -> Vec<String> {
    let mut v: Vec<String> = names.iter().filter(|n| banned.contains(&n.as_str())).cloned().collect();
    v.sort();
    v.dedup();
    v
}

#[test]
fn the_protocol_crate_has_no_io_runtime_in_its_tree() {
    let names = normal_tree("relayfed-proto");
    let bad = offenders(&names, &["tokio", "quinn", "quinn-proto", "hyper", "kube", "kube-client", "mio"]);
    assert!(bad.is_empty(), "relayfed-proto depends on {bad:?}");
}

#[test]
fn the_operator_does_not_link_the_data_plane() {
    let names = normal_tree("relayfed-operator");
    let bad = offenders(&names, &["quinn", "quinn-proto", "relayfed-sidecar"]);
    assert!(bad.is_empty(), "relayfed-operator depends on {bad:?}");
}
