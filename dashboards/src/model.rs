//! A small model of Grafana dashboards (rows of panels with PromQL targets) and its JSON
//! rendering: every dashboard gets the same datasource, federation and node variables (and
//! its own further ones, e.g. the Overview's source and destination main relays), and
//! every panel's selector goes through [`sel`] so the variables always apply.

use serde_json::{Value, json};

/// How a panel draws its queries.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Lines over time.
    TimeSeries,
    /// One current value.
    Stat,
}

/// One PromQL query of a panel, with its legend.
#[derive(Clone, Debug)]
pub struct Query {
    /// The expression; `$federation`, `$node` and `$__rate_interval` are Grafana variables.
    pub expr: String,
    /// Legend format (`{{label}}`).
    pub legend: String,
}

/// One panel.
#[derive(Clone, Debug)]
pub struct Panel {
    /// Title shown on the panel.
    pub title: String,
    /// What it answers (the panel's info tooltip).
    pub description: String,
    /// How it draws.
    pub kind: Kind,
    /// Grafana unit id (`percentunit`, `s`, `Bps`, `reqps`, `short`).
    pub unit: &'static str,
    /// Its queries.
    pub queries: Vec<Query>,
}

/// A titled row of panels.
#[derive(Clone, Debug)]
pub struct Row {
    /// Row title.
    pub title: String,
    /// Its panels, laid out two per line.
    pub panels: Vec<Panel>,
}

/// One dashboard.
#[derive(Clone, Debug)]
pub struct Dashboard {
    /// Stable uid (URLs and provisioning).
    pub uid: &'static str,
    /// Title.
    pub title: &'static str,
    /// What it is for.
    pub description: &'static str,
    /// The metric whose `node` label values fill the node variable.
    pub node_metric: &'static str,
    /// Further variables: (name, label, metric, the label whose values it offers); queries
    /// use them as `$name`.
    pub variables: &'static [(&'static str, &'static str, &'static str, &'static str)],
    /// Its rows.
    pub rows: Vec<Row>,
}

/// A selector with the dashboard variables applied, plus `extra` matchers (may be empty).
pub fn sel(extra: &str) -> String {
    let vars = r#"federation=~"$federation",node=~"$node""#;
    if extra.is_empty() { format!("{{{vars}}}") } else { format!("{{{vars},{extra}}}") }
}

/// `rate(metric{sel}[$__rate_interval])`.
pub fn rate(metric: &str, extra: &str) -> String {
    format!("rate({metric}{}[$__rate_interval])", sel(extra))
}

/// A panel builder.
pub fn panel(kind: Kind, title: &str, unit: &'static str, description: &str, queries: &[(&str, &str)]) -> Panel {
    Panel {
        title: title.to_owned(),
        description: description.to_owned(),
        kind,
        unit,
        queries: queries.iter().map(|(e, l)| Query { expr: (*e).to_owned(), legend: (*l).to_owned() }).collect(),
    }
}

/// p50, p95 and p99 of a histogram (`metric` without `_bucket`), by `by` (may be empty).
pub fn quantiles(metric: &str, extra: &str, by: &str) -> Vec<(String, String)> {
    let by_le = if by.is_empty() { "le".to_owned() } else { format!("le, {by}") };
    let legend = |q: &str| if by.is_empty() { q.to_owned() } else { format!("{q} {{{{{by}}}}}") };
    [("0.5", "p50"), ("0.95", "p95"), ("0.99", "p99")]
        .iter()
        .map(|(q, name)| {
            (
                format!("histogram_quantile({q}, sum by ({by_le}) ({}))", rate(&format!("{metric}_bucket"), extra)),
                legend(name),
            )
        })
        .collect()
}

fn datasource() -> Value {
    json!({"type": "prometheus", "uid": "${datasource}"})
}

impl Panel {
    fn to_json(&self, id: u32, x: u32, y: u32) -> Value {
        let targets: Vec<Value> = self
            .queries
            .iter()
            .enumerate()
            .map(|(i, q)| {
                json!({
                    "refId": ((b'A' + i as u8) as char).to_string(),
                    "datasource": datasource(),
                    "expr": q.expr,
                    "legendFormat": q.legend,
                })
            })
            .collect();
        let (kind, w, h) = match self.kind {
            Kind::TimeSeries => ("timeseries", 12, 8),
            Kind::Stat => ("stat", 6, 4),
        };
        json!({
            "id": id,
            "type": kind,
            "title": self.title,
            "description": self.description,
            "datasource": datasource(),
            "gridPos": {"h": h, "w": w, "x": x, "y": y},
            "fieldConfig": {"defaults": {"unit": self.unit}, "overrides": []},
            "options": {"legend": {"displayMode": "list", "placement": "bottom", "showLegend": true}},
            "targets": targets,
        })
    }
}

impl Dashboard {
    /// The dashboard's Grafana JSON model.
    pub fn to_json(&self) -> Value {
        let mut panels = Vec::new();
        let mut id = 1;
        let mut y = 0;
        for row in &self.rows {
            panels.push(json!({
                "id": id, "type": "row", "title": row.title, "collapsed": false,
                "gridPos": {"h": 1, "w": 24, "x": 0, "y": y}, "panels": [],
            }));
            id += 1;
            y += 1;
            let mut x = 0;
            let mut line_h = 0;
            for p in &row.panels {
                let pj = p.to_json(id, x, y);
                let w = pj["gridPos"]["w"].as_u64().unwrap_or(12) as u32;
                line_h = line_h.max(pj["gridPos"]["h"].as_u64().unwrap_or(8) as u32);
                panels.push(pj);
                id += 1;
                x += w;
                if x >= 24 {
                    x = 0;
                    y += line_h;
                    line_h = 0;
                }
            }
            if x > 0 {
                y += line_h;
            }
        }
        let var = |name: &str, label: &str, query: String| {
            json!({
                "name": name, "label": label, "type": "query", "datasource": datasource(),
                "query": {"query": query, "refId": name},
                "definition": query,
                "includeAll": true, "multi": true, "allValue": ".*",
                "current": {"selected": true, "text": ["All"], "value": ["$__all"]},
                "refresh": 2, "sort": 1,
            })
        };
        let mut variables = vec![
            json!({"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
                   "current": {"selected": false, "text": "default", "value": "default"}}),
            var("federation", "Federation", "label_values(relayfed_transport_config_version, federation)".to_owned()),
            var("node", "Node", format!("label_values({}{{federation=~\"$federation\"}}, node)", self.node_metric)),
        ];
        variables.extend(self.variables.iter().map(|(name, label, metric, by)| {
            var(name, label, format!("label_values({metric}{{federation=~\"$federation\"}}, {by})"))
        }));
        json!({
            "uid": self.uid,
            "title": self.title,
            "description": self.description,
            "tags": ["relayfed"],
            "editable": false,
            "schemaVersion": 39,
            "time": {"from": "now-1h", "to": "now"},
            "refresh": "30s",
            "timezone": "browser",
            "graphTooltip": 1,
            "templating": {"list": variables},
            "panels": panels,
        })
    }

    /// Every query of every panel, with the panel's title.
    pub fn queries(&self) -> Vec<(String, String)> {
        self.rows
            .iter()
            .flat_map(|r| &r.panels)
            .flat_map(|p| p.queries.iter().map(|q| (p.title.clone(), q.expr.clone())))
            .collect()
    }
}
