//! The supervisor's control API (loopback HTTP: `GET /local/status`, `POST /local/down`,
//! `POST /local/rotate-keys[/<relay>]`, `POST /local/rotate-ca[/next]`, `GET /metrics`) and the `relayfed local status` table.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use relayfed_crds::AnyResource;
use relayfed_serving::{Admitted, BoundedListener, ServerLimits, http1};
use serde_json::{Value, json};

use super::supervisor::Shared;
use crate::distribution::Distributor;
use crate::metrics::OperatorMetrics;

/// What the control API asks of the supervisor.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ControlRequest {
    /// Stop the federation.
    Down,
    /// Rotate the ECH keys of these main relays (node ids) now.
    RotateKeys(std::collections::BTreeSet<String>),
    /// Start a CA rotation with these waits.
    RotateCa {
        /// Least time every node trusts both CAs before the new one issues.
        stage_for: std::time::Duration,
        /// How long the old CA stays trusted after the new one issues.
        overlap: std::time::Duration,
    },
    /// End the current CA rotation phase's wait early.
    AdvanceCa,
}

/// Reads `POST /local/rotate-ca?stageFor=<s>&overlap=<s>` (seconds; defaults 0 and 600).
fn rotate_ca(query: Option<&str>) -> Result<ControlRequest, String> {
    let (mut stage_for, mut overlap) = (0u64, 600u64);
    for pair in query.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let n: u64 = v.parse().map_err(|_| format!("{k}={v:?}: whole seconds expected"))?;
        match k {
            "stageFor" => stage_for = n,
            "overlap" => overlap = n,
            _ => return Err(format!("unknown parameter {k:?} (stageFor, overlap)")),
        }
    }
    Ok(ControlRequest::RotateCa {
        stage_for: std::time::Duration::from_secs(stage_for),
        overlap: std::time::Duration::from_secs(overlap),
    })
}

/// Answers `POST /local/rotate-keys[/<relay>]`: which relays, or why not.
fn rotate_keys(shared: &Mutex<Shared>, path: &str) -> Result<ControlRequest, String> {
    let names: Vec<String> = path
        .strip_prefix("/local/rotate-keys")
        .map(|rest| rest.trim_start_matches('/'))
        .filter(|r| !r.is_empty())
        .map(|r| vec![r.to_owned()])
        .unwrap_or_default();
    let resources = shared.lock().map(|s| s.resources.clone()).unwrap_or_default();
    let schedules = super::rotation::schedules(&resources, std::path::Path::new(""));
    super::rotation::resolve(&schedules, &names).map(ControlRequest::RotateKeys)
}

/// Serves the control API on an ephemeral loopback port; returns its address.
pub async fn serve(
    shared: Arc<Mutex<Shared>>,
    distributor: Arc<Distributor>,
    metrics: Arc<OperatorMetrics>,
    control: Box<dyn Fn(ControlRequest) + Send + Sync>,
) -> std::io::Result<SocketAddr> {
    let listener =
        BoundedListener::bind(SocketAddr::from(([127, 0, 0, 1], 0)), ServerLimits::ADMIN, "local-control").await?;
    let local = listener.local_addr()?;
    let control: Arc<dyn Fn(ControlRequest) + Send + Sync> = Arc::from(control);
    tokio::spawn(async move {
        loop {
            let Admitted { tcp, permit, .. } = listener.accept().await;
            let (shared, distributor, metrics, control) =
                (shared.clone(), distributor.clone(), metrics.clone(), control.clone());
            tokio::spawn(async move {
                let _permit = permit;
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let (shared, distributor, metrics, control) =
                        (shared.clone(), distributor.clone(), metrics.clone(), control.clone());
                    async move {
                        let ctype = match req.uri().path() {
                            "/metrics" => relayfed_serving::OPENMETRICS,
                            p if p.starts_with("/local/") => "application/json",
                            _ => "text/plain; charset=utf-8",
                        };
                        let (status, body) = match (req.method(), req.uri().path()) {
                            (&Method::GET, "/local/status") => {
                                (StatusCode::OK, status_json(&shared, &distributor).await.to_string())
                            }
                            (&Method::POST, "/local/down") => {
                                control(ControlRequest::Down);
                                (StatusCode::ACCEPTED, "{\"stopping\":true}".to_owned())
                            }
                            (&Method::POST, p) if p.starts_with("/local/rotate-keys") => {
                                match rotate_keys(&shared, p) {
                                    Ok(ControlRequest::RotateKeys(nodes)) => {
                                        let body = json!({ "staging": nodes }).to_string();
                                        control(ControlRequest::RotateKeys(nodes));
                                        (StatusCode::ACCEPTED, body)
                                    }
                                    Ok(_) => (StatusCode::INTERNAL_SERVER_ERROR, "{}".to_owned()),
                                    Err(e) => (StatusCode::NOT_FOUND, json!({ "error": e }).to_string()),
                                }
                            }
                            (&Method::POST, "/local/rotate-ca") => match rotate_ca(req.uri().query()) {
                                Ok(r) => {
                                    control(r);
                                    (StatusCode::ACCEPTED, "{\"rotating\":true}".to_owned())
                                }
                                Err(e) => (StatusCode::BAD_REQUEST, json!({ "error": e }).to_string()),
                            },
                            (&Method::POST, "/local/rotate-ca/next") => {
                                control(ControlRequest::AdvanceCa);
                                (StatusCode::ACCEPTED, "{\"advancing\":true}".to_owned())
                            }
                            (&Method::GET, "/metrics") => (StatusCode::OK, metrics.encode()),
                            _ => (
                                StatusCode::NOT_FOUND,
                                "GET /local/status, POST /local/down, POST /local/rotate-keys[/<relay>], POST /local/rotate-ca[/next], GET /metrics\n"
                                    .into(),
                            ),
                        };
                        let mut r = Response::new(Full::new(Bytes::from(body)));
                        *r.status_mut() = status;
                        r.headers_mut()
                            .insert(hyper::header::CONTENT_TYPE, hyper::header::HeaderValue::from_static(ctype));
                        Ok::<_, Infallible>(r)
                    }
                });
                let _ = http1(&ServerLimits::ADMIN).serve_connection(TokioIo::new(tcp), svc).await;
            });
        }
    });
    Ok(local)
}

/// The rollout state of the federation's default `RolloutPolicy`.
fn rollout(resources: &[AnyResource]) -> Value {
    let default = resources.iter().find_map(|r| match r {
        AnyResource::Federation(f) => Some(f.spec.default_rollout_policy.clone()),
        _ => None,
    });
    resources
        .iter()
        .find_map(|r| match r {
            AnyResource::RolloutPolicy(p) if Some(r.name()) == default => Some(json!({
                "policy": r.name(),
                "enabled": p.spec.ech.enabled,
                "mode": p.spec.ech.mode,
                "percentage": p.spec.ech.percentage,
                "whitelist": p.spec.ech.whitelist,
                "blacklist": p.spec.ech.blacklist,
                "rejectUnknown": p.spec.trust.reject_unknown,
            })),
            _ => None,
        })
        .unwrap_or(Value::Null)
}

/// `/federation/health` of every node that has an admin address (`None`: no answer), asked
/// all at once: one slow node costs its own timeout, not everyone's.
pub async fn healths<'a>(
    nodes: impl Iterator<Item = (&'a String, &'a super::supervisor::NodeProc)>,
) -> std::collections::BTreeMap<String, Option<Value>> {
    let mut asks = tokio::task::JoinSet::new();
    for (node, p) in nodes {
        if let Some(admin) = p.ready.as_ref().and_then(|r| r["admin"].as_str()).map(str::to_owned) {
            let node = node.clone();
            asks.spawn(async move { (node, super::http::get_json(&admin, "/federation/health").await) });
        }
    }
    let mut out = std::collections::BTreeMap::new();
    while let Some(Ok((node, health))) = asks.join_next().await {
        out.insert(node, health);
    }
    out
}

/// The full status document (`relayfed local status --json`).
pub async fn status_json(shared: &Mutex<Shared>, distributor: &Distributor) -> Value {
    let s = match shared.lock() {
        Ok(s) => s.clone(),
        Err(p) => p.into_inner().clone(),
    };
    let versions = distributor.versions();
    let acks = distributor.acks();
    let mut healths = healths(s.nodes.iter()).await;
    let mut nodes = Vec::new();
    for (node, p) in &s.nodes {
        let admin = p.ready.as_ref().and_then(|r| r["admin"].as_str()).map(str::to_owned);
        let health = healths.remove(node).flatten();
        let ack = acks.get(node);
        nodes.push(json!({
            "node": node,
            "role": p.role,
            "state": p.state,
            "pid": p.pid,
            "restarts": p.restarts,
            "lastExit": p.last_exit,
            "admin": admin,
            "quic": p.ready.as_ref().and_then(|r| r["quic"].as_str()),
            "imports": p.ready.as_ref().map(|r| r["importList"].clone()).unwrap_or(Value::Null),
            "configVersion": versions.get(node),
            "ackedVersion": ack.map(|a| a.version),
            "ackResult": ack.map(|a| a.result),
            "restartRequired": ack.map(|a| a.restart_required.clone()).unwrap_or_default(),
            "health": health,
        }));
    }
    let fed = s.resources.iter().find_map(|r| match r {
        AnyResource::Federation(f) => Some((r.name(), f.spec.trust_domain.clone())),
        _ => None,
    });
    let mut rollout = rollout(&s.resources);
    if let Some(r) = rollout.as_object_mut() {
        r.insert("evaluation".into(), s.rollout["evaluation"].clone());
        r.insert("events".into(), s.rollout["events"].clone());
        if !s.rollout["directPaths"].is_null() {
            r.insert("directPaths".into(), s.rollout["directPaths"].clone());
        }
    }
    let mut warnings = s.warnings.clone();
    if rollout["enabled"].as_bool() == Some(true) {
        warnings.extend(anonymity_warnings(&nodes));
    }
    json!({
        "federation": fed.as_ref().map(|f| f.0.clone()),
        "trustDomain": fed.as_ref().map(|f| f.1.clone()),
        "caFingerprint": s.ca_fingerprint,
        "caRotation": s.ca_rotation,
        "files": s.files,
        "generation": distributor.generation(),
        "acceptedEdits": s.accepted_edits,
        "lastRejected": s.last_rejected.as_ref().map(|(at, errs)| json!({"atUnix": at, "errors": errs})),
        "warnings": warnings,
        "rollout": rollout,
        "workloads": s.workloads.iter().map(|(n, svc, a, k)| json!({"node": n, "service": svc, "address": a.to_string(), "kind": k})).collect::<Vec<_>>(),
        "nodes": nodes,
    })
}

/// Fewest services a main relay should host before ECH hides which one a stream is for.
pub const MIN_ANONYMITY_SET: u64 = 3;

/// A warning for each main relay (in status `nodes`) whose homes export fewer than
/// [`MIN_ANONYMITY_SET`] services: a stream sealed to it names one of that few.
pub fn anonymity_warnings(nodes: &[Value]) -> Vec<String> {
    nodes
        .iter()
        .filter(|n| n["role"] == "main")
        .filter_map(|n| {
            let set = n["health"]["echAnonymitySet"].as_u64()?;
            (set < MIN_ANONYMITY_SET).then(|| {
                format!(
                    "main relay {} hosts {set} service(s): relays on the path of a stream sealed to it can tell which one it is for (ECH hides a service among at least {MIN_ANONYMITY_SET})",
                    cell(&n["node"])
                )
            })
        })
        .collect()
}

fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// The rollout's evaluation: phase, success rate, and per main relay its percentage and
/// verdict; then the recent transitions.
fn render_rollout(r: &Value) -> String {
    let e = &r["evaluation"];
    if e.is_null() {
        return String::new();
    }
    let mut out = format!(
        "           phase {}, step {}%, ECH setup success {} over the window\n",
        cell(&e["phase"]),
        cell(&e["stepPercentage"]),
        e["successRate"].as_f64().map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
    );
    relay_lines(&mut out, "", &e["effectiveByMain"], &e["stepPercentage"], &e["analyses"], &r["events"]);
    let d = &r["directPaths"]["status"];
    if !d.is_null() {
        out.push_str(&format!(
            "           direct paths: phase {}, step {}%, direct setup success {} over the window\n",
            cell(&d["phase"]),
            cell(&d["effectivePercentage"]),
            d["observedSuccessRate"].as_f64().map_or("-".into(), |x| format!("{:.1}%", x * 100.0))
        ));
        let events = &r["directPaths"]["events"];
        relay_lines(&mut out, "direct ", &d["effectiveByMain"], &d["effectivePercentage"], &d["analysis"], events);
    }
    out
}

/// Per main relay its percentage (marked where rolled back below `step`) and verdict, then
/// the last three `events`.
fn relay_lines(out: &mut String, label: &str, effective: &Value, step: &Value, analyses: &Value, events: &Value) {
    for (main, pct) in effective.as_object().into_iter().flatten() {
        let a = analyses.as_array().into_iter().flatten().find(|a| a["main"] == main.as_str());
        let lowered = pct.as_u64() < step.as_u64();
        out.push_str(&format!(
            "           {label}{main}: {}%{}  {}\n",
            cell(pct),
            if lowered { " (rolled back)" } else { "" },
            a.map_or("no setups in the window".into(), |a| format!("{}: {}", cell(&a["verdict"]), cell(&a["reason"])))
        ));
    }
    for ev in events.as_array().into_iter().flatten().rev().take(3) {
        out.push_str(&format!("           event: {}\n", cell(&ev["message"])));
    }
}

/// The ECH column: a home's health over the last minute (and its success rate), a main
/// relay's current key config id.
fn ech_cell(h: &Value) -> String {
    let e = &h["ech"];
    if let Some(id) = h["echKeys"]["current"].as_u64() {
        return format!("key {id}");
    }
    if e.is_null() {
        return "-".into();
    }
    if e["enabled"].as_bool() != Some(true) {
        return "off".into();
    }
    match e["successRate"].as_f64() {
        Some(r) => format!("{} {:.0}%", cell(&e["status"]), r * 100.0),
        None => cell(&e["status"]),
    }
}

/// Renders the status document as the table `relayfed local status` prints.
pub fn render(status: &Value) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "federation {} (trust domain {}, CA {})\n",
        cell(&status["federation"]),
        cell(&status["trustDomain"]),
        cell(&status["caFingerprint"])
    ));
    let ca = &status["caRotation"];
    if !ca.is_null() {
        out.push_str(&format!(
            "CA         rotating ({}): old {} -> new {}{}\n",
            cell(&ca["phase"]),
            cell(&ca["old"]),
            cell(&ca["new"]),
            ca["waiting"].as_str().map(|w| format!("; {w}")).unwrap_or_default()
        ));
    }
    let r = &status["rollout"];
    out.push_str(&format!(
        "rollout    policy {}: ECH {} mode {} at {}%  whitelist {}  blacklist {}\n",
        cell(&r["policy"]),
        if r["enabled"].as_bool() == Some(true) { "enabled" } else { "disabled" },
        cell(&r["mode"]),
        cell(&r["percentage"]),
        cell(&r["whitelist"]),
        cell(&r["blacklist"])
    ));
    out.push_str(&render_rollout(r));
    out.push_str(&format!(
        "config     generation {}, {} edit(s) applied",
        cell(&status["generation"]),
        cell(&status["acceptedEdits"])
    ));
    match status["lastRejected"]["errors"].as_array() {
        Some(errs) if !errs.is_empty() => {
            out.push_str(", last edit REJECTED (the running configuration stays):\n");
            for e in errs {
                out.push_str(&format!("             {}\n", cell(e)));
            }
        }
        _ => out.push('\n'),
    }
    out.push('\n');
    let header =
        ["NODE", "ROLE", "PROCESS", "PID", "RESTARTS", "CONFIG", "HEALTH", "ECH", "PEERS", "SERVICES", "LISTENERS"];
    let mut rows = vec![header.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>()];
    for n in status["nodes"].as_array().into_iter().flatten() {
        let h = &n["health"];
        let peers = match cell(&n["role"]).as_str() {
            "main" => format!(
                "{}/{} peers, {} homes",
                cell(&h["connectedPeers"]),
                cell(&h["configuredPeers"]),
                cell(&h["connectedHomes"])
            ),
            _ => format!("main {}", cell(&h["mainRelay"])),
        };
        let config = match (n["configVersion"].as_u64(), n["ackedVersion"].as_u64()) {
            (Some(v), Some(a)) if a >= v => format!("v{v} acked"),
            (Some(v), Some(a)) => format!("v{v} (acked v{a})"),
            (Some(v), None) => format!("v{v} (not acked)"),
            _ => "-".into(),
        };
        let listeners: Vec<String> = n["imports"]
            .as_array()
            .into_iter()
            .flatten()
            .map(|i| format!("{}:{}->{}", cell(&i["service"]), cell(&i["port"]), cell(&i["listen"])))
            .chain(n["quic"].as_str().map(|q| format!("quic {q}")))
            .collect();
        rows.push(vec![
            cell(&n["node"]),
            cell(&n["role"]),
            cell(&n["state"]),
            cell(&n["pid"]),
            cell(&n["restarts"]),
            config,
            if h.is_null() { "unreachable".into() } else { cell(&h["status"]) },
            ech_cell(h),
            if h.is_null() { "-".into() } else { peers },
            cell(&h["services"]),
            if listeners.is_empty() { "-".into() } else { listeners.join(" ") },
        ]);
    }
    let widths: Vec<usize> = (0..header.len()).map(|i| rows.iter().map(|r| r[i].len()).max().unwrap_or(0)).collect();
    for row in rows {
        let line: Vec<String> = row.iter().enumerate().map(|(i, c)| format!("{c:<w$}", w = widths[i])).collect();
        out.push_str(line.join("  ").trim_end());
        out.push('\n');
    }
    out.push_str(&peerings(status));
    let workloads = status["workloads"].as_array().cloned().unwrap_or_default();
    if !workloads.is_empty() {
        out.push_str("\nbuilt-in workloads: ");
        let w: Vec<String> = workloads
            .iter()
            .map(|w| {
                format!("{} {}/{} on {}", cell(&w["kind"]), cell(&w["node"]), cell(&w["service"]), cell(&w["address"]))
            })
            .collect();
        out.push_str(&w.join(", "));
        out.push('\n');
    }
    for w in status["warnings"].as_array().into_iter().flatten() {
        out.push_str(&format!("warning: {}\n", cell(w)));
    }
    out
}

/// One line per peering of each main relay: trust, trust domain when it is another's, state,
/// and why a peering that is down failed last.
fn peerings(status: &Value) -> String {
    let mut out = String::new();
    for n in status["nodes"].as_array().into_iter().flatten() {
        for p in n["health"]["peers"].as_array().into_iter().flatten() {
            if out.is_empty() {
                out.push_str("\npeerings:\n");
            }
            let domain = p["trustDomain"].as_str().map(|d| format!(", {d}")).unwrap_or_default();
            let why = match (p["refusedBy"].as_str(), p["lastError"].as_str()) {
                (Some(rule), _) => format!(" ({rule})"),
                (None, Some(e)) => format!(" (last error: {e})"),
                _ => String::new(),
            };
            out.push_str(&format!(
                "  {} -> {} [{}{}] {}{}\n",
                cell(&n["node"]),
                cell(&p["node"]),
                cell(&p["trustLevel"]),
                domain,
                cell(&p["state"]),
                why
            ));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_peering_shows_its_trust_domain_state_and_reason() {
        let status = json!({"nodes": [{"node": "hub-eu", "role": "main", "health": {"peers": [
            {"node": "hub-us", "trustLevel": "trusted", "state": "up"},
            {"node": "legacy-hub", "trustLevel": "blocked", "state": "refused", "refusedBy": "blocked"},
            {"node": "partner-hub", "trustLevel": "verified", "trustDomain": "partner.example", "state": "down",
             "lastError": "unresolved: relay.partner.example:4433 does not resolve"},
        ]}}]});
        let text = peerings(&status);
        assert!(text.contains("hub-eu -> hub-us [trusted] up\n"), "{text}");
        assert!(text.contains("hub-eu -> legacy-hub [blocked] refused (blocked)\n"), "{text}");
        assert!(
            text.contains("hub-eu -> partner-hub [verified, partner.example] down (last error: unresolved: relay.partner.example:4433 does not resolve)"),
            "{text}"
        );
        assert_eq!(peerings(&json!({"nodes": []})), "");
    }

    #[test]
    fn the_direct_path_rollout_shows_under_ech_with_its_rolled_back_relays() {
        let r = json!({
            "evaluation": {"phase": "Succeeded", "stepPercentage": 100, "effectiveByMain": {"m1": 100}},
            "events": [],
            "directPaths": {
                "status": {"phase": "RolledBack", "effectivePercentage": 100, "observedSuccessRate": 0.9,
                           "effectiveByMain": {"m1": 100, "m2": 0},
                           "analysis": [{"main": "m2", "verdict": "Fail", "reason": "direct setups 90.0% successful of 40"}]},
                "events": [{"message": "direct paths to homes behind m2 rolled back from 100% to 0%"}],
            },
        });
        let text = render_rollout(&r);
        assert!(text.contains("direct paths: phase RolledBack, step 100%, direct setup success 90.0%"), "{text}");
        assert!(text.contains("direct m2: 0% (rolled back)  Fail: direct setups 90.0% successful of 40"), "{text}");
        assert!(text.contains("direct m1: 100%  no setups in the window"), "{text}");
        assert!(text.contains("event: direct paths to homes behind m2 rolled back"), "{text}");
        let without = render_rollout(&json!({"evaluation": r["evaluation"].clone(), "events": []}));
        assert!(!without.contains("direct"), "{without}");
    }

    fn main(node: &str, set: Option<u64>) -> Value {
        json!({"node": node, "role": "main", "health": set.map(|s| json!({"echAnonymitySet": s}))})
    }

    #[test]
    fn main_relays_hosting_fewer_than_three_services_are_named() {
        let nodes = [
            main("hub-a", Some(1)),
            main("hub-b", Some(3)),
            main("hub-c", None),
            json!({"node": "shop", "role": "home", "health": {"echAnonymitySet": 0}}),
        ];
        let w = anonymity_warnings(&nodes);
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(w[0].starts_with("main relay hub-a hosts 1 service(s)"), "{}", w[0]);
    }
}
