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
    refuse_tags(source_name, yaml)?;
    let docs: Vec<Value> = serde_saphyr::from_multiple(yaml).map_err(|e| CrdError::Document {
        source_name: source_name.to_owned(),
        index: 0,
        reason: yaml_error_reason(&e),
    })?;
    docs.into_iter()
        .enumerate()
        .filter(|(_, doc)| !doc.is_null())
        .map(|(index, doc)| admission::admit(source_name, index, doc))
        .collect()
}

/// The YAML parser's error, with what to do when a file has more documents than its parse
/// budget allows (1,024, against separator storms).
pub fn yaml_error_reason(e: &serde_saphyr::Error) -> String {
    use serde_saphyr::budget::BudgetBreach;
    match e.without_snippet() {
        serde_saphyr::Error::Budget { breach: BudgetBreach::Documents { .. }, .. } => {
            format!("{e} (a file holds at most 1,024 documents: split it into several files)")
        }
        _ => e.to_string(),
    }
}

/// Core-schema tags (`!!str`, `!!int`, ...) mean what kubectl's YAML-to-JSON reads them as.
const CORE_TAGS: [&str; 7] = ["bool", "float", "int", "map", "null", "seq", "str"];

/// Refuses explicit YAML tags other than the core schema's (`!!binary`, `!!timestamp`,
/// `!custom`, `%TAG` handles): a YAML library and the API server's YAML-to-JSON path read
/// them differently, so local mode would run something other than what `kubectl apply`
/// stores. Syntax errors are left to the document parser, which reports them.
fn refuse_tags(source_name: &str, yaml: &str) -> Result<(), CrdError> {
    use granit_parser::{Event, Parser};
    let mut index = 0usize;
    for item in Parser::new_from_str(yaml) {
        let Ok((event, span)) = item else { return Ok(()) };
        let tag = match &event {
            Event::DocumentEnd => {
                index += 1;
                continue;
            }
            Event::Scalar(_, _, _, tag) | Event::SequenceStart(_, _, tag) | Event::MappingStart(_, _, tag) => tag,
            _ => continue,
        };
        if let Some(tag) = tag
            && !(tag.handle == "tag:yaml.org,2002:" && CORE_TAGS.contains(&tag.suffix.as_str()))
        {
            return Err(CrdError::Document {
                source_name: source_name.to_owned(),
                index,
                reason: format!(
                    "line {}: the YAML tag {tag} is not allowed in a manifest (kubectl would read the value differently); remove it",
                    span.start.line()
                ),
            });
        }
    }
    Ok(())
}

#[cfg(test)]
mod tag_tests {
    use super::*;

    const DOC: &str = "apiVersion: relayfed.io/v1alpha1\nkind: RelayFederation\nmetadata:\n  name: f\n";

    #[test]
    fn tags_other_than_the_core_schema_are_refused_naming_the_line() {
        for (text, tag) in [
            (format!("{DOC}spec:\n  trustDomain: !!binary ZXhhbXBsZS5vcmc=\n"), "tag:yaml.org,2002:binary"),
            (format!("{DOC}spec: !custom\n  trustDomain: example.org\n"), "!custom"),
            (
                format!("---\n{DOC}---\n{DOC}spec:\n  publicName: !!timestamp 2001-12-14\n"),
                "tag:yaml.org,2002:timestamp",
            ),
        ] {
            let err = parse_documents("f.yaml", &text).unwrap_err().to_string();
            assert!(err.contains(tag) && err.contains("line "), "{err}");
        }
        let second = format!("---\n{DOC}---\n{DOC}spec: !x {{}}\n");
        assert!(matches!(parse_documents("f.yaml", &second), Err(CrdError::Document { index: 1, .. })));
    }

    #[test]
    fn a_file_of_more_documents_than_the_parser_allows_is_told_to_split() {
        let many = "---\n{}\n".repeat(1_025);
        let err = parse_documents("f.yaml", &many).unwrap_err().to_string();
        assert!(err.contains("split it into several files"), "{err}");
        let few = "---\n{}\n".repeat(3);
        assert!(parse_documents("f.yaml", &few).map_or_else(|e| !e.to_string().contains("split"), |_| true));
    }

    #[test]
    fn core_schema_tags_are_read_as_usual() {
        let text = format!("{DOC}spec: !!map\n  trustDomain: !!str example.org\n");
        // Whatever admission says about the spec, the tags themselves are not the problem.
        if let Err(e) = parse_documents("f.yaml", &text) {
            assert!(!e.to_string().contains("YAML tag"), "{e}");
        }
    }
}
