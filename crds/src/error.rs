//! The crate's error type: invalid resources, with field paths, and unreadable documents.

use std::fmt;

/// One problem with one field of a resource.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FieldError {
    /// JSON path of the offending field, e.g. `spec.ech.percentage`.
    pub field: String,
    /// What is wrong and, where possible, what to do instead.
    pub reason: String,
}

impl FieldError {
    /// Builds a field error.
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self { field: field.into(), reason: reason.into() }
    }
}

impl fmt::Display for FieldError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.field, self.reason)
    }
}

/// Formats a list of field errors as `a: x; b: y`.
fn join(errors: &[FieldError]) -> String {
    errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("; ")
}

/// Errors from parsing or validating relayfed custom resources.
#[derive(Debug, thiserror::Error)]
pub enum CrdError {
    /// The resource is well-formed but breaks one or more rules (schema, CEL or semantic).
    #[error("{kind}.relayfed.io {name:?} is invalid: {}", join(errors))]
    Invalid {
        /// Kind of the rejected object.
        kind: String,
        /// `metadata.name` of the rejected object.
        name: String,
        /// Every problem found (validation does not stop at the first).
        errors: Vec<FieldError>,
    },
    /// A YAML/JSON document could not be read as a relayfed resource.
    #[error("document {index} of {source_name}: {reason}")]
    Document {
        /// File name or other label of the input.
        source_name: String,
        /// Zero-based index of the document within a multi-document file.
        index: usize,
        /// What the parser said.
        reason: String,
    },
    /// A document names a kind or apiVersion relayfed does not serve.
    #[error(
        "document {index} of {source_name}: unsupported {api_version}/{kind}; expected relayfed.io/v1alpha1 RelayFederation, Relay, Peer or RolloutPolicy"
    )]
    UnsupportedKind {
        /// File name or other label of the input.
        source_name: String,
        /// Zero-based index of the document.
        index: usize,
        /// The document's apiVersion.
        api_version: String,
        /// The document's kind.
        kind: String,
    },
}

impl CrdError {
    /// Stable, low-cardinality error code (documented in docs/operations.md; usable as a metric label).
    pub fn code(&self) -> &'static str {
        match self {
            Self::Invalid { .. } => "INVALID_RESOURCE",
            Self::Document { .. } => "MALFORMED_DOCUMENT",
            Self::UnsupportedKind { .. } => "UNSUPPORTED_KIND",
        }
    }

    /// The field errors of an `Invalid` error (empty for other variants).
    pub fn field_errors(&self) -> &[FieldError] {
        match self {
            Self::Invalid { errors, .. } => errors,
            _ => &[],
        }
    }
}

/// Collects field errors while a resource is checked, then turns them into a result.
#[derive(Debug, Default)]
pub struct Errors(Vec<FieldError>);

impl Errors {
    /// Records a problem with `field`.
    pub fn push(&mut self, field: impl Into<String>, reason: impl Into<String>) {
        self.0.push(FieldError::new(field, reason));
    }

    /// Adds errors found by another check.
    pub fn extend(&mut self, other: impl IntoIterator<Item = FieldError>) {
        self.0.extend(other);
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok(())` when nothing was recorded, else `CrdError::Invalid` for `kind`/`name`.
    pub fn into_result(self, kind: &str, name: &str) -> Result<(), CrdError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(CrdError::Invalid { kind: kind.to_owned(), name: name.to_owned(), errors: self.0 })
        }
    }
}
