//! The API on a real kube-apiserver: the chart's CRDs applied with the real kubectl, the
//! examples accepted, every invalid example rejected by the server for the field offline
//! admission names, printer columns and short names in real `kubectl get` output, and status
//! written with server-side apply by two field managers merging.

use std::collections::BTreeSet;

use kube::api::{Api, Patch, PatchParams};
use relayfed_crds::{CrdError, Relay};
use serde_json::Value;

use crate::support::{Namespace, examples_in, get_json, plane, repo};

/// Field paths (`spec.a.b[0]`) named in a message.
fn fields_in(message: &str) -> BTreeSet<String> {
    let re = regex::Regex::new(r"\b(spec(?:\.[A-Za-z0-9_]+|\[[0-9]+\])*)").unwrap();
    re.captures_iter(message).map(|c| c[1].to_owned()).collect()
}

fn header(text: &str, key: &str) -> String {
    text.lines().find_map(|l| l.strip_prefix(&format!("# {key}:"))).unwrap().trim().to_owned()
}

#[tokio::test]
async fn the_example_federation_is_accepted_with_columns_and_short_names() {
    let ns = Namespace::create("api-examples", &[]);
    let dir = examples_in("federation", &ns.name);
    let out = plane().kubectl(&["apply", "-f", &dir.display().to_string()]).unwrap();
    assert!(out.ok, "the server refused an example: {}", out.stderr);
    let listed = get_json(&ns.name, &["rfed,rly,rpeer,rp"]);
    let mut served: Vec<(String, String)> = listed["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| (o["kind"].as_str().unwrap().to_owned(), o["metadata"]["name"].as_str().unwrap().to_owned()))
        .collect();
    served.sort();
    // Exactly what offline admission reads from the same files.
    let mut offline: Vec<(String, String)> = std::fs::read_dir(&dir)
        .unwrap()
        .flat_map(|f| {
            let p = f.unwrap().path();
            relayfed_crds::parse_documents("example", &std::fs::read_to_string(&p).unwrap()).unwrap()
        })
        .map(|r| (r.kind().to_owned(), r.name()))
        .collect();
    offline.sort();
    assert_eq!(served, offline);
    assert_eq!(served.len(), 11);
    // Every printer column of every CRD is a column of `kubectl get`, under its short name.
    for file in std::fs::read_dir(repo().join(relayfed_crds::generate::CRD_TEMPLATES)).unwrap() {
        let path = file.unwrap().path();
        if path.file_name().is_some_and(|n| n == relayfed_crds::generate::MCS_TEMPLATE) {
            continue;
        }
        let crd: Value = serde_saphyr::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let short = crd["spec"]["names"]["shortNames"][0].as_str().unwrap();
        // Columns with a priority show only with `-o wide`.
        for (wide, args) in
            [(false, vec!["get", short, "-n", &ns.name]), (true, vec!["get", short, "-n", &ns.name, "-o", "wide"])]
        {
            let columns: Vec<String> = crd["spec"]["versions"][0]["additionalPrinterColumns"]
                .as_array()
                .unwrap()
                .iter()
                .filter(|c| wide || c["priority"].as_i64().unwrap_or(0) == 0)
                .map(|c| c["name"].as_str().unwrap().to_uppercase())
                .collect();
            let out = plane().kubectl(&args).unwrap();
            assert!(out.ok, "kubectl {args:?}: {}", out.stderr);
            let head = out.stdout.lines().next().unwrap_or_default().to_owned();
            for c in &columns {
                assert!(head.split_whitespace().any(|h| h == c), "`kubectl {args:?}` lacks column {c}: {head}");
            }
        }
    }
    // A printer column shows the value: the main relay's type.
    let out = plane().kubectl(&["get", "rly", "hub-eu", "-n", &ns.name, "--no-headers"]).unwrap();
    assert!(out.stdout.split_whitespace().any(|w| w == "main"), "{}", out.stdout);
}

#[tokio::test]
async fn invalid_examples_are_rejected_by_the_server_for_the_field_offline_admission_names() {
    let ns = Namespace::create("api-invalid", &[]);
    let dir = examples_in("invalid", &ns.name);
    let mut files: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().path()).collect();
    files.sort();
    let mut disagreements = Vec::new();
    for path in &files {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let text = std::fs::read_to_string(path).unwrap();
        let layer = header(&text, "rejected-by");
        let field = header(&text, "expect-field");
        let doc: Value = serde_saphyr::from_str(&text).unwrap();
        let offline = relayfed_crds::admission::admit(&name, 0, doc).expect_err(&name);
        let out = plane().kubectl(&["create", "-n", &ns.name, "-f", &path.display().to_string()]).unwrap();
        match (layer.as_str(), &offline) {
            ("kind", CrdError::UnsupportedKind { .. }) => {
                if out.ok || !out.stderr.contains("no matches for kind") {
                    disagreements.push(format!("{name}: server: {} {}", out.ok, out.stderr));
                }
            }
            (_, CrdError::Invalid { errors, .. }) => {
                let offline_fields: BTreeSet<String> = errors.iter().map(|e| e.field.clone()).collect();
                if out.ok {
                    disagreements
                        .push(format!("{name}: the server accepted it; offline admission rejects {offline_fields:?}"));
                    continue;
                }
                let server_fields = fields_in(&out.stderr);
                if !server_fields.contains(&field) || !offline_fields.contains(&field) {
                    disagreements.push(format!(
                        "{name}: expected {field}; server names {server_fields:?} ({}), offline {offline_fields:?}",
                        out.stderr.trim()
                    ));
                }
            }
            (_, other) => disagreements.push(format!("{name}: offline error {other:?}")),
        }
    }
    assert!(disagreements.is_empty(), "offline admission and the API server disagree:\n{}", disagreements.join("\n"));
    assert!(files.len() >= 15);
}

#[tokio::test]
async fn status_from_two_field_managers_merges_by_condition_type() {
    let ns = Namespace::create("api-status", &[]);
    let dir = examples_in("federation", &ns.name);
    let out = plane().kubectl(&["apply", "-f", &dir.join("10-main-relays.yaml").display().to_string()]).unwrap();
    assert!(out.ok, "{}", out.stderr);
    let client = plane().client().await.unwrap();
    let relays: Api<Relay> = Api::namespaced(client, &ns.name);
    let cond = |t: &str| {
        serde_json::json!({"apiVersion": "relayfed.io/v1alpha1", "kind": "Relay", "metadata": {"name": "hub-eu"},
            "status": {"conditions": [{"type": t, "status": "True", "reason": "Test", "message": "m",
                "lastTransitionTime": "2026-12-01T00:00:00Z"}]}})
    };
    relays
        .patch_status("hub-eu", &PatchParams::apply("manager-a").force(), &Patch::Apply(&cond("Ready")))
        .await
        .unwrap();
    relays
        .patch_status("hub-eu", &PatchParams::apply("manager-b").force(), &Patch::Apply(&cond("CertificateReady")))
        .await
        .unwrap();
    let status = relays.get_status("hub-eu").await.unwrap().status.unwrap();
    let types: BTreeSet<&str> = status.common.conditions.iter().map(|c| c.type_.as_str()).collect();
    assert_eq!(
        types,
        BTreeSet::from(["CertificateReady", "Ready"]),
        "server-side apply replaced the list instead of merging"
    );
}
