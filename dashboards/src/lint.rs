//! The rules of grafana/dashboard-linter that matter here, checked on the generated JSON
//! (the linter's Go module is not available to this build): every panel has a title, a
//! description and a unit; every target uses the `$datasource` variable; every query
//! filters on the `$federation` and `$node` variables; `rate` and `increase` use
//! `$__rate_interval`; counters (`_total`) and histogram buckets are only read through
//! `rate`/`increase`, and aggregated after it (`sum(rate(...))`, never `rate(sum(...))`).

use serde_json::Value;

/// One broken rule: dashboard title, panel title, what is wrong.
pub type Finding = (String, String, String);

fn counter_reads_outside_rate(expr: &str) -> bool {
    // Every `_total` or `_bucket` series name must be directly inside rate( or increase(.
    let mut rest = expr;
    while let Some(i) = rest.find("relayfed_") {
        let name_end = rest[i..].find(|c: char| !(c.is_ascii_alphanumeric() || c == '_')).map_or(rest.len(), |e| i + e);
        let name = &rest[i..name_end];
        if name.ends_with("_total") || name.ends_with("_bucket") {
            let before = rest[..i].trim_end();
            if !(before.ends_with("rate(") || before.ends_with("increase(")) {
                return true;
            }
        }
        rest = &rest[name_end..];
    }
    false
}

/// Checks one dashboard's JSON model.
pub fn check(dashboard: &Value) -> Vec<Finding> {
    let title = dashboard["title"].as_str().unwrap_or_default().to_owned();
    let mut out = Vec::new();
    let mut bad = |panel: &str, what: String| out.push((title.clone(), panel.to_owned(), what));
    if dashboard["uid"].as_str().is_none_or(str::is_empty) {
        bad("", "no uid".into());
    }
    let vars: Vec<&str> =
        dashboard["templating"]["list"].as_array().into_iter().flatten().filter_map(|v| v["name"].as_str()).collect();
    for v in ["datasource", "federation", "node"] {
        if !vars.contains(&v) {
            bad("", format!("no ${v} variable"));
        }
    }
    let mut titles = std::collections::BTreeSet::new();
    for p in dashboard["panels"].as_array().into_iter().flatten().filter(|p| p["type"] != "row") {
        let pt = p["title"].as_str().unwrap_or_default();
        if pt.is_empty() {
            bad(pt, "no title".into());
        }
        if !titles.insert(pt) {
            bad(pt, "title used twice".into());
        }
        if p["description"].as_str().is_none_or(str::is_empty) {
            bad(pt, "no description".into());
        }
        if p["fieldConfig"]["defaults"]["unit"].as_str().is_none_or(str::is_empty) {
            bad(pt, "no unit".into());
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            bad(pt, "no query".into());
        }
        for t in &targets {
            if t["datasource"]["uid"] != "${datasource}" || p["datasource"]["uid"] != "${datasource}" {
                bad(pt, "does not use the $datasource variable".into());
            }
            let expr = t["expr"].as_str().unwrap_or_default();
            if !(expr.contains("$federation") && expr.contains("$node")) {
                bad(pt, format!("query does not filter on $federation and $node: {expr}"));
            }
            for f in ["rate(", "increase("] {
                for (i, _) in expr.match_indices(f) {
                    let window = expr[i..].find(']').map(|e| &expr[i..=i + e]).unwrap_or_default();
                    if !window.ends_with("[$__rate_interval]") {
                        bad(pt, format!("{f}...) without [$__rate_interval]: {expr}"));
                    }
                }
            }
            if counter_reads_outside_rate(expr) {
                bad(pt, format!("a counter or bucket read outside rate()/increase(): {expr}"));
            }
            if expr.contains("rate(sum") || expr.contains("rate(max") || expr.contains("increase(sum") {
                bad(pt, format!("aggregation before rate: {expr}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn with_expr(expr: &str) -> Value {
        json!({"uid": "u", "title": "T",
            "templating": {"list": [{"name": "datasource"}, {"name": "federation"}, {"name": "node"}]},
            "panels": [{"type": "timeseries", "title": "P", "description": "d",
                "datasource": {"uid": "${datasource}"}, "fieldConfig": {"defaults": {"unit": "s"}},
                "targets": [{"datasource": {"uid": "${datasource}"}, "expr": expr}]}]})
    }

    #[test]
    fn a_clean_query_passes_and_each_rule_can_fail() {
        let ok =
            r#"sum(rate(relayfed_relay_streams_total{federation=~"$federation",node=~"$node"}[$__rate_interval]))"#;
        assert!(check(&with_expr(ok)).is_empty(), "{:?}", check(&with_expr(ok)));
        for broken in [
            r#"sum(rate(relayfed_relay_streams_total{federation=~"$federation",node=~"$node"}[5m]))"#,
            r#"sum(relayfed_relay_streams_total{federation=~"$federation",node=~"$node"})"#,
            r#"sum(rate(relayfed_relay_streams_total[$__rate_interval]))"#,
            r#"rate(sum(relayfed_relay_streams_total{federation=~"$federation",node=~"$node"})[$__rate_interval])"#,
        ] {
            assert!(!check(&with_expr(broken)).is_empty(), "not caught: {broken}");
        }
        let mut no_desc = with_expr(ok);
        no_desc["panels"][0]["description"] = json!("");
        assert_eq!(check(&no_desc).len(), 1);
    }
}
