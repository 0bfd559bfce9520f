//! Reading CR YAML (multi-document files) into typed resources, admitted as the API server would.

use serde_json::Value;

use crate::admission;
use crate::error::CrdError;
use crate::{Peer, Relay, RelayFederation, RolloutPolicy};

/// Any relayfed resource, after admission.
#[derive(Clone, Debug, PartialEq)]
pub enum AnyResource {
    /// A `RelayFederation`.
    Federation(Box<RelayFederation>),
    /// A `Relay`.
    Relay(Box<Relay>),
    /// A `Peer`.
    Peer(Box<Peer>),
    /// A `RolloutPolicy`.
    RolloutPolicy(Box<RolloutPolicy>),
}

impl AnyResource {
    /// The kind, as written in YAML.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Federation(_) => "RelayFederation",
            Self::Relay(_) => "Relay",
            Self::Peer(_) => "Peer",
            Self::RolloutPolicy(_) => "RolloutPolicy",
        }
    }

    /// `metadata.name`.
    pub fn name(&self) -> String {
        let meta = match self {
            Self::Federation(r) => &r.metadata,
            Self::Relay(r) => &r.metadata,
            Self::Peer(r) => &r.metadata,
            Self::RolloutPolicy(r) => &r.metadata,
        };
        crate::name_of(meta)
    }
}

/// Parses every document of a YAML stream and admits each one (schema, CEL, `validate()`).
///
/// `source_name` labels errors (usually the file name). Empty documents are skipped. The first
/// rejected document stops parsing: a federation is applied whole or not at all.
pub fn parse_documents(source_name: &str, yaml: &str) -> Result<Vec<AnyResource>, CrdError> {
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).map_err(|e| CrdError::Document {
        source_name: source_name.to_owned(),
        index: 0,
        reason: e.to_string(),
    })?;
    docs.into_iter()
        .enumerate()
        .filter(|(_, doc)| !doc.is_null())
        .map(|(index, doc)| admission::admit(source_name, index, doc))
        .collect()
}
