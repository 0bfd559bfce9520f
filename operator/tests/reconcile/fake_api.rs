//! A small in-memory Kubernetes API behind a tower-test mock service: enough of GET, POST,
//! PUT (with resourceVersion conflicts), DELETE, server-side apply (merge) and JSON patch for
//! the reconcilers, and a log of every request so tests assert the exact calls made.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use http::{Request, Response, StatusCode};
use http_body_util::BodyExt;
use kube::client::Body;
use serde_json::{Value, json};

/// One request the client sent.
#[derive(Clone, Debug)]
pub struct Call {
    /// HTTP method.
    pub method: String,
    /// Path without the query.
    pub path: String,
    /// The query string.
    pub query: String,
    /// Content type.
    pub content_type: String,
    /// Decoded JSON body (Null when empty).
    pub body: Value,
}

impl Call {
    /// `METHOD path` for compact assertions.
    pub fn line(&self) -> String {
        format!("{} {}", self.method, self.path)
    }
}

/// The fake API server's state.
#[derive(Default)]
pub struct State {
    /// Stored objects by their full path (`/api/v1/namespaces/ns/secrets/name`).
    pub objects: BTreeMap<String, Value>,
    /// Every request, in order.
    pub calls: Vec<Call>,
    /// Paths whose next PUT fails with 409 (a concurrent writer).
    pub conflict_on_put: Vec<String>,
    /// For POSTs to these collection paths, fields merged into the answer (e.g. a
    /// TokenReview's status, which the API server computes).
    pub post_replies: BTreeMap<String, Value>,
    /// Paths the next GET answers 404 for (an object created concurrently).
    pub hide_once: Vec<String>,
    rv: u64,
}

/// A handle on the fake API.
#[derive(Clone, Default)]
pub struct FakeApi(pub Arc<Mutex<State>>);

fn status(code: u16, reason: &str, message: &str) -> (u16, Value) {
    (
        code,
        json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "message": message, "reason": reason, "code": code}),
    )
}

/// Recursive merge of `patch` into `base` (objects merged, everything else replaced).
fn merge(base: &mut Value, patch: &Value) {
    match (base, patch) {
        (Value::Object(b), Value::Object(p)) => {
            for (k, v) in p {
                merge(b.entry(k.clone()).or_insert(Value::Null), v);
            }
        }
        (b, p) => *b = p.clone(),
    }
}

impl FakeApi {
    /// A kube client talking to a new fake API.
    pub fn client() -> (kube::Client, FakeApi) {
        let (svc, mut handle) = tower_test::mock::pair::<Request<Body>, Response<Body>>();
        let api = FakeApi::default();
        let state = api.clone();
        tokio::spawn(async move {
            while let Some((req, send)) = handle.next_request().await {
                let (parts, body) = req.into_parts();
                let bytes = body.collect().await.map(|b| b.to_bytes()).unwrap_or_default();
                let call = Call {
                    method: parts.method.to_string(),
                    path: parts.uri.path().to_owned(),
                    query: parts.uri.query().unwrap_or("").to_owned(),
                    content_type: parts
                        .headers
                        .get("content-type")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned(),
                    body: serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                };
                let (code, out) = state.handle(call);
                let resp = Response::builder()
                    .status(StatusCode::from_u16(code).unwrap())
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&out).unwrap()))
                    .unwrap();
                send.send_response(resp);
            }
        });
        (kube::Client::new(svc, "default"), api)
    }

    /// Stores `obj` at `path` as if it had been created earlier.
    pub fn seed(&self, path: &str, mut obj: Value) {
        let mut s = self.0.lock().unwrap();
        s.rv += 1;
        obj["metadata"]["resourceVersion"] = json!(s.rv.to_string());
        s.objects.insert(path.to_owned(), obj);
    }

    /// The stored object at `path`.
    pub fn get(&self, path: &str) -> Option<Value> {
        self.0.lock().unwrap().objects.get(path).cloned()
    }

    /// Every request so far.
    pub fn calls(&self) -> Vec<Call> {
        self.0.lock().unwrap().calls.clone()
    }

    /// `METHOD path` of every request so far.
    pub fn lines(&self) -> Vec<String> {
        self.calls().iter().map(Call::line).collect()
    }

    /// Event reasons published so far, in order.
    pub fn events(&self) -> Vec<(String, String)> {
        self.calls()
            .iter()
            .filter(|c| c.method == "POST" && c.path.ends_with("/events"))
            .map(|c| {
                (c.body["type"].as_str().unwrap_or("").to_owned(), c.body["reason"].as_str().unwrap_or("").to_owned())
            })
            .collect()
    }

    /// Forgets the request log.
    pub fn clear_calls(&self) {
        self.0.lock().unwrap().calls.clear();
    }

    fn handle(&self, call: Call) -> (u16, Value) {
        let mut s = self.0.lock().unwrap();
        s.calls.push(call.clone());
        s.rv += 1;
        let rv = s.rv.to_string();
        let (path, sub) = match call.path.strip_suffix("/status") {
            Some(p) => (p.to_owned(), true),
            None => (call.path.clone(), false),
        };
        match call.method.as_str() {
            "GET" if s.hide_once.contains(&path) => {
                s.hide_once.retain(|p| *p != path);
                status(404, "NotFound", &format!("{path} not found"))
            }
            "GET" => match s.objects.get(&path) {
                Some(o) => (200, o.clone()),
                None => status(404, "NotFound", &format!("{path} not found")),
            },
            "POST" if s.post_replies.contains_key(&path) => {
                let mut obj = call.body.clone();
                merge(&mut obj, &s.post_replies[&path]);
                (201, obj)
            }
            "POST" => {
                let name = call.body["metadata"]["name"].as_str().unwrap_or("").to_owned();
                let full = format!("{path}/{name}");
                if s.objects.contains_key(&full) {
                    return status(409, "AlreadyExists", &format!("{full} already exists"));
                }
                let mut obj = call.body.clone();
                obj["metadata"]["resourceVersion"] = json!(rv);
                obj["metadata"]["uid"] = json!(format!("uid-{rv}"));
                s.objects.insert(full, obj.clone());
                (201, obj)
            }
            "PUT" => {
                if let Some(i) = s.conflict_on_put.iter().position(|p| *p == path) {
                    s.conflict_on_put.remove(i);
                    return status(409, "Conflict", "the object has been modified");
                }
                let Some(cur) = s.objects.get(&path) else { return status(404, "NotFound", "not found") };
                if cur["metadata"]["resourceVersion"] != call.body["metadata"]["resourceVersion"] {
                    return status(409, "Conflict", "the object has been modified");
                }
                let mut obj = call.body.clone();
                obj["metadata"]["resourceVersion"] = json!(rv);
                s.objects.insert(path, obj.clone());
                (200, obj)
            }
            "DELETE" => match s.objects.remove(&path) {
                Some(o) => (200, o),
                None => status(404, "NotFound", "not found"),
            },
            "PATCH" if call.content_type.starts_with("application/json-patch") => {
                let Some(mut cur) = s.objects.get(&path).cloned() else { return status(404, "NotFound", "not found") };
                let patch: json_patch::Patch = match serde_json::from_value(call.body.clone()) {
                    Ok(p) => p,
                    Err(e) => return status(400, "BadRequest", &e.to_string()),
                };
                // kube-apiserver treats a missing field as null for `test` operations.
                for op in &patch.0 {
                    if let json_patch::PatchOperation::Test(t) = op
                        && t.value.is_null()
                        && cur.pointer(t.path.as_str()).is_none()
                        && let Some((parent, key)) = t.path.as_str().rsplit_once('/')
                        && let Some(Value::Object(m)) = cur.pointer_mut(parent)
                    {
                        m.insert(key.to_owned(), Value::Null);
                    }
                }
                if let Err(e) = json_patch::patch(&mut cur, &patch) {
                    return status(422, "Invalid", &e.to_string());
                }
                cur["metadata"]["resourceVersion"] = json!(rv);
                s.objects.insert(path, cur.clone());
                (200, cur)
            }
            "PATCH" => {
                // Server-side apply: merge into the existing object (create when absent, except
                // for the status subresource).
                let existing = s.objects.get(&path).cloned();
                let mut cur = match (existing, sub) {
                    (Some(o), _) => o,
                    (None, true) => return status(404, "NotFound", "not found"),
                    (None, false) => json!({"metadata": {"uid": format!("uid-{rv}")}}),
                };
                if sub {
                    cur["status"] = Value::Null;
                }
                merge(&mut cur, &call.body);
                cur["metadata"]["resourceVersion"] = json!(rv);
                s.objects.insert(path, cur.clone());
                (200, cur)
            }
            _ => status(405, "MethodNotAllowed", "unsupported"),
        }
    }
}
