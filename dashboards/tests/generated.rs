//! The committed dashboards and alert rules are what the code generates, and they follow the
//! linter rules.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};

/// The repository, from the running test's package (not the path it was compiled at: a
/// shared target directory serves checkouts at other paths).
fn root() -> PathBuf {
    Path::new(&std::env::var_os("CARGO_MANIFEST_DIR").expect("run by cargo")).join("..")
}

#[test]
fn committed_files_are_current() {
    for (path, text) in relayfed_dashboards::files() {
        let committed = std::fs::read_to_string(root().join(&path)).unwrap_or_default();
        assert!(committed == text, "{path} is stale: run `make dashboards`");
    }
}

#[test]
fn every_dashboard_is_lint_clean_and_has_every_promised_panel() {
    for (name, d) in relayfed_dashboards::dashboards::all() {
        let findings = relayfed_dashboards::lint::check(&d.to_json());
        assert!(findings.is_empty(), "{name}: {findings:#?}");
        assert!(d.queries().len() >= 4, "{name} has few queries");
    }
}

#[test]
fn every_alert_has_a_runbook_section_in_operations_md() {
    let ops = std::fs::read_to_string(root().join("docs/operations.md")).unwrap();
    for g in relayfed_dashboards::alerts::rules().groups {
        for a in g.rules {
            assert!(ops.contains(&format!("### {}", a.alert)), "docs/operations.md has no runbook for {}", a.alert);
            assert!(a.annotations["runbook_url"].ends_with(&a.alert.to_lowercase()));
        }
    }
}

/// Runs promtool with `args` and asserts that it succeeds.
fn promtool(args: &[&str]) {
    let out = std::process::Command::new("promtool")
        .args(args)
        .current_dir(root())
        .output()
        .unwrap_or_else(|e| panic!("promtool ({e}): `make prometheus` builds it; make test puts it on PATH"));
    let text = format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success(), "promtool {args:?}: {text}");
}

#[test]
fn the_alert_rules_are_valid_and_each_alert_fires_and_stays_quiet_in_promtool() {
    promtool(&["check", "rules", "charts/relayfed/alerts/relayfed.rules.yaml"]);
    promtool(&["test", "rules", "tests/prometheus/alerts.test.yaml"]);
    // Every alert has a case in the test file.
    let cases = std::fs::read_to_string(root().join("tests/prometheus/alerts.test.yaml")).unwrap();
    for a in relayfed_dashboards::alerts::rules().groups.into_iter().flat_map(|g| g.rules) {
        assert!(cases.contains(&format!("alertname: {}", a.alert)), "no promtool case for {}", a.alert);
    }
}
