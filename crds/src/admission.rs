//! Admission without an API server: the structural schema, the CEL rules and `validate()`.
//!
//! Local mode and tests admit CRs exactly in the order kube-apiserver does: the OpenAPI schema
//! (types, required, enums, ranges, lengths, patterns, unknown fields), then the CEL
//! `x-kubernetes-validations` rules (evaluated with kube-cel after schema defaults are applied),
//! then the semantic checks of each kind's `validate()`. Every problem names its field.

use std::cell::RefCell;
use std::collections::HashMap;

use kube::CustomResourceExt;
use regex::Regex;
use serde::de::DeserializeOwned;
use serde_json::Value;

use crate::document::AnyResource;
use crate::error::{CrdError, Errors, FieldError};
use crate::{Peer, Relay, RelayFederation, RolloutPolicy};

/// `apiVersion` of every relayfed resource.
pub const API_VERSION: &str = "relayfed.io/v1alpha1";
/// Top-level fields every object may carry that the CRD schema does not spell out.
const ROOT_FIELDS: [&str; 4] = ["apiVersion", "kind", "metadata", "status"];
/// Regex for `metadata.name`: a DNS-1123 subdomain.
const NAME_PATTERN: &str = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$";

/// The `openAPIV3Schema` of a kind's CRD, as JSON.
pub fn schema_of<K: CustomResourceExt>() -> Value {
    K::crd()
        .spec
        .versions
        .first()
        .and_then(|v| v.schema.as_ref())
        .and_then(|s| s.open_api_v3_schema.as_ref())
        .and_then(|s| serde_json::to_value(s).ok())
        .unwrap_or(Value::Null)
}

/// Admits one document (a new object): schema, CEL, typed decoding, `validate()`.
pub fn admit(source_name: &str, index: usize, doc: Value) -> Result<AnyResource, CrdError> {
    admit_update(source_name, index, doc, None)
}

/// Admits one document as an update of `old` (so transition rules such as immutability apply).
pub fn admit_update(source_name: &str, index: usize, doc: Value, old: Option<&Value>) -> Result<AnyResource, CrdError> {
    let field = |k: &str| doc.get(k).and_then(Value::as_str).unwrap_or("").to_owned();
    let (api_version, kind) = (field("apiVersion"), field("kind"));
    if api_version != API_VERSION {
        return Err(CrdError::UnsupportedKind { source_name: source_name.to_owned(), index, api_version, kind });
    }
    match kind.as_str() {
        "RelayFederation" => admit_kind::<RelayFederation>(&doc, old).and_then(|r| {
            r.validate()?;
            Ok(AnyResource::Federation(Box::new(r)))
        }),
        "Relay" => admit_kind::<Relay>(&doc, old).and_then(|r| {
            r.validate()?;
            Ok(AnyResource::Relay(Box::new(r)))
        }),
        "Peer" => admit_kind::<Peer>(&doc, old).and_then(|r| {
            r.validate()?;
            Ok(AnyResource::Peer(Box::new(r)))
        }),
        "RolloutPolicy" => admit_kind::<RolloutPolicy>(&doc, old).and_then(|r| {
            r.validate()?;
            Ok(AnyResource::RolloutPolicy(Box::new(r)))
        }),
        _ => Err(CrdError::UnsupportedKind { source_name: source_name.to_owned(), index, api_version, kind }),
    }
}

/// Schema and CEL checks for kind `K`, then typed decoding.
fn admit_kind<K>(doc: &Value, old: Option<&Value>) -> Result<K, CrdError>
where
    K: CustomResourceExt + DeserializeOwned,
{
    let kind = K::crd().spec.names.kind;
    let name = doc.pointer("/metadata/name").and_then(Value::as_str).unwrap_or("<unnamed>").to_owned();
    let schema = schema_of::<K>();
    let mut errs = Errors::default();
    check_metadata(doc, &mut errs);
    check_schema(&schema, doc, "", &mut errs);
    if !errs.is_empty() {
        errs.into_result(&kind, &name)?;
    }
    if let Err(cel) = kube::core::cel::Validator::new().validate(&schema, doc, old) {
        let mut errs = Errors::default();
        errs.extend(
            cel.into_vec().into_iter().map(|e| FieldError::new(e.field_path.trim_start_matches('.'), e.message)),
        );
        errs.into_result(&kind, &name)?;
    }
    serde_path_to_error::deserialize::<_, K>(doc).map_err(|e| CrdError::Invalid {
        kind: kind.clone(),
        name: name.clone(),
        errors: vec![FieldError::new(e.path().to_string(), e.inner().to_string())],
    })
}

/// `metadata.name` must be present and a DNS-1123 subdomain.
fn check_metadata(doc: &Value, errs: &mut Errors) {
    match doc.pointer("/metadata/name") {
        None => errs.push("metadata.name", "Required value: every resource needs a name"),
        Some(Value::String(n)) if n.len() <= 253 && matches(NAME_PATTERN, n) => {}
        Some(other) => {
            errs.push("metadata.name", format!("Invalid value: {other}: must be a lowercase DNS-1123 subdomain"))
        }
    }
}

/// Whether `s` matches `pattern`; regexes are compiled once per thread. An uncompilable
/// pattern (never produced by this crate) matches nothing, so the value is rejected.
fn matches(pattern: &str, s: &str) -> bool {
    thread_local! {
        static CACHE: RefCell<HashMap<String, Option<Regex>>> = RefCell::new(HashMap::new());
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        let re = cache.entry(pattern.to_owned()).or_insert_with(|| Regex::new(pattern).ok());
        re.as_ref().is_some_and(|re| re.is_match(s))
    })
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() { key.to_owned() } else { format!("{path}.{key}") }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "integer",
        Value::Number(_) => "number",
        Value::String(_) => "string",
        Value::Array(_) => "array",
        Value::Object(_) => "object",
    }
}

/// Validates `value` against a structural OpenAPI v3 schema, recording every violation.
pub fn check_schema(schema: &Value, value: &Value, path: &str, errs: &mut Errors) {
    let shown = if path.is_empty() { "<root>" } else { path };
    if value.is_null() {
        if schema.get("nullable").and_then(Value::as_bool) != Some(true) {
            errs.push(shown, "Invalid value: null: must not be null");
        }
        return;
    }
    if schema.get("x-kubernetes-int-or-string").and_then(Value::as_bool) == Some(true) {
        if !(value.is_string() || value.is_i64() || value.is_u64()) {
            errs.push(shown, format!("Invalid value: must be an integer or a string (got {})", type_name(value)));
        }
        return;
    }
    let actual = type_name(value);
    if let Some(expected) = schema.get("type").and_then(Value::as_str) {
        let ok = expected == actual || (expected == "number" && actual == "integer");
        if !ok {
            errs.push(shown, format!("Invalid value: {value}: must be of type {expected} (got {actual})"));
            return;
        }
    }
    if let Some(allowed) = schema.get("enum").and_then(Value::as_array)
        && !allowed.contains(value)
    {
        let list = allowed.iter().map(Value::to_string).collect::<Vec<_>>().join(", ");
        errs.push(shown, format!("Unsupported value: {value}: supported values: {list}"));
    }
    match value {
        Value::Number(n) => check_number(schema, n, shown, errs),
        Value::String(s) => check_string(schema, s, shown, errs),
        Value::Array(items) => {
            check_len(schema, "minItems", "maxItems", items.len(), "items", shown, errs);
            if let Some(item_schema) = schema.get("items") {
                for (i, item) in items.iter().enumerate() {
                    check_schema(item_schema, item, &format!("{path}[{i}]"), errs);
                }
            }
        }
        Value::Object(map) => {
            let props = schema.get("properties").and_then(Value::as_object);
            let preserve = schema.get("x-kubernetes-preserve-unknown-fields").and_then(Value::as_bool) == Some(true);
            for req in schema.get("required").and_then(Value::as_array).into_iter().flatten().filter_map(Value::as_str)
            {
                if !map.contains_key(req) {
                    errs.push(join(path, req), "Required value");
                }
            }
            for (key, v) in map {
                let child = join(path, key);
                if let Some(s) = props.and_then(|p| p.get(key)) {
                    check_schema(s, v, &child, errs);
                } else if let Some(s) = schema.get("additionalProperties").filter(|s| s.is_object()) {
                    check_schema(s, v, &child, errs);
                } else if props.is_some() && !preserve && !(path.is_empty() && ROOT_FIELDS.contains(&key.as_str())) {
                    errs.push(
                        child,
                        format!("unknown field {key:?}: not in the relayfed.io/v1alpha1 schema (check spelling)"),
                    );
                }
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

fn check_number(schema: &Value, n: &serde_json::Number, path: &str, errs: &mut Errors) {
    let Some(x) = n.as_f64() else { return };
    if let Some(min) = schema.get("minimum").and_then(Value::as_f64)
        && x < min
    {
        errs.push(path, format!("Invalid value: {n}: must be greater than or equal to {min}"));
    }
    if let Some(max) = schema.get("maximum").and_then(Value::as_f64)
        && x > max
    {
        errs.push(path, format!("Invalid value: {n}: must be less than or equal to {max}"));
    }
}

fn check_string(schema: &Value, s: &str, path: &str, errs: &mut Errors) {
    check_len(schema, "minLength", "maxLength", s.chars().count(), "characters", path, errs);
    if let Some(pattern) = schema.get("pattern").and_then(Value::as_str)
        && !matches(pattern, s)
    {
        errs.push(path, format!("Invalid value: {s:?}: must match {pattern}"));
    }
}

fn check_len(schema: &Value, min_key: &str, max_key: &str, len: usize, unit: &str, path: &str, errs: &mut Errors) {
    let bound = |k: &str| schema.get(k).and_then(Value::as_u64).and_then(|b| usize::try_from(b).ok());
    if let Some(min) = bound(min_key)
        && len < min
    {
        errs.push(path, format!("Invalid value: must have at least {min} {unit} (has {len})"));
    }
    if let Some(max) = bound(max_key)
        && len > max
    {
        errs.push(path, format!("Too long: must have at most {max} {unit} (has {len})"));
    }
}
