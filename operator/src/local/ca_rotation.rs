//! Rotating a local federation's own CA with an overlap window, without a failed call
//! (`relayfed local rotate-ca`). Three steps, each taken only when every running node shows
//! in `/federation/health` that it has the files of the previous one:
//!
//! 1. **trusting**: a new CA is generated (`ca-next.pem`, `ca-next.key`) and every node's
//!    trust bundle (`ca.pem`) becomes old + new. Nodes reload their files; certificates from
//!    either CA are accepted everywhere. A partner pins the new key now (`relayfed local
//!    identity` prints it as `nextFingerprint`).
//! 2. **overlap**: after every node trusts the new CA and `stageFor` has passed, the new CA
//!    issues (`ca.key`, first in `ca.pem`) and every node certificate is re-issued by it for
//!    the node's same key. Both CAs stay trusted for `overlap`.
//! 3. **done**: after every node presents its new certificate and `overlap` has passed, the
//!    old CA leaves the bundle.
//!
//! The decision is [`decide`], a pure function of the rotation, what the nodes report and the
//! time; the file steps are [`begin`], [`promote`] and [`finish`].

use std::collections::BTreeMap;
use std::time::Duration;

use relayfed_proto::crypto::ca::FederationCa;
use serde::{Deserialize, Serialize};

use super::keys::{KeyError, KeyStore, first_pem_block, write_atomically};

/// The state file of a rotation in progress (in the key directory).
const STATE_FILE: &str = "ca-rotation.json";

/// Where a rotation is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Phase {
    /// Every node is being given the new CA to trust; the old one still issues.
    Trusting,
    /// The new CA issues; the old one is still trusted.
    Overlap,
}

/// A rotation in progress (persisted: a restarted supervisor carries on).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct CaRotation {
    /// The current step.
    pub phase: Phase,
    /// SPKI fingerprint of the CA being replaced.
    pub old: String,
    /// SPKI fingerprint of the new CA.
    pub new: String,
    /// The least time every node trusts both CAs before the new one issues (seconds).
    pub stage_for_seconds: u64,
    /// How long both stay trusted after the new one issues (seconds).
    pub overlap_seconds: u64,
    /// When the current phase began (Unix seconds).
    pub phase_since: u64,
    /// The operator asked to end the current phase's wait early (the acknowledgements are
    /// still required).
    #[serde(default)]
    pub advance: bool,
}

/// What one node reports about its TLS files (`/federation/health` `tls`).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct NodeTls {
    /// SPKI fingerprints of the CAs it trusts.
    pub roots: Vec<String>,
    /// Fingerprint of the certificate it presents.
    pub certificate: String,
}

/// What to do next.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet; why (shown by `status`).
    Wait(String),
    /// Make the new CA the issuer and re-issue every certificate.
    Promote,
    /// Drop the old CA from the bundle.
    Finish,
}

/// The next step of `rotation` at `now` (Unix seconds), given each running node's report
/// (`None`: it did not answer) and the fingerprint of the certificate file written for it.
pub fn decide(rotation: &CaRotation, nodes: &BTreeMap<String, (Option<NodeTls>, String)>, now: u64) -> Step {
    let waited = now.saturating_sub(rotation.phase_since);
    match rotation.phase {
        Phase::Trusting => {
            let missing = lagging(nodes, |t, _| t.roots.contains(&rotation.new));
            if !missing.is_empty() {
                return Step::Wait(format!("{missing} do not trust the new CA yet"));
            }
            if waited < rotation.stage_for_seconds && !rotation.advance {
                return Step::Wait(format!(
                    "every node trusts both CAs; the new one issues in {} s (stageFor)",
                    rotation.stage_for_seconds - waited
                ));
            }
            Step::Promote
        }
        Phase::Overlap => {
            let missing = lagging(nodes, |t, file| &t.certificate == file);
            if !missing.is_empty() {
                return Step::Wait(format!("{missing} do not present their new certificate yet"));
            }
            if waited < rotation.overlap_seconds && !rotation.advance {
                return Step::Wait(format!(
                    "every node presents a certificate of the new CA; the old CA is trusted for {} s more (overlap)",
                    rotation.overlap_seconds - waited
                ));
            }
            Step::Finish
        }
    }
}

/// "n of m nodes: a, b" for the nodes whose report does not pass `done` (no report: not done),
/// or "" when all pass.
fn lagging(nodes: &BTreeMap<String, (Option<NodeTls>, String)>, done: impl Fn(&NodeTls, &String) -> bool) -> String {
    let missing: Vec<&str> = nodes
        .iter()
        .filter(|(_, (tls, file))| !tls.as_ref().is_some_and(|t| done(t, file)))
        .map(|(n, _)| n.as_str())
        .collect();
    if missing.is_empty() {
        return String::new();
    }
    format!("{} of {} nodes ({})", missing.len(), nodes.len(), missing.join(", "))
}

fn io(path: &std::path::Path) -> impl Fn(std::io::Error) -> KeyError + '_ {
    move |e| KeyError::File { path: path.to_owned(), reason: e.to_string() }
}

fn read(path: &std::path::Path) -> Result<String, KeyError> {
    std::fs::read_to_string(path).map_err(io(path))
}

/// The SPKI fingerprint of the first certificate of `pem`.
fn fingerprint_of(pem: &str, path: &std::path::Path) -> Result<String, KeyError> {
    relayfed_proto::crypto::ca::parse_cert_pem(pem)
        .ok()
        .and_then(|der| relayfed_serving::partners::spki_fingerprint(&der))
        .ok_or_else(|| KeyError::File { path: path.to_owned(), reason: "no readable CA certificate".into() })
}

/// The rotation in progress in `keys`, if any.
pub fn current(keys: &KeyStore) -> Result<Option<CaRotation>, KeyError> {
    current_in(&keys.dir)
}

/// The rotation in progress in the key directory `dir`, if any.
pub fn current_in(dir: &std::path::Path) -> Result<Option<CaRotation>, KeyError> {
    let path = dir.join(STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| KeyError::File { path, reason: format!("unreadable rotation state: {e}") }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io(&path)(e)),
    }
}

fn save(keys: &KeyStore, r: &CaRotation) -> Result<(), KeyError> {
    let path = keys.path(STATE_FILE);
    let bytes =
        serde_json::to_vec_pretty(r).map_err(|e| KeyError::File { path: path.clone(), reason: e.to_string() })?;
    write_atomically(&path, &bytes).map_err(io(&path))
}

/// Step 1: generates the new CA and adds it to the bundle every node trusts. Refused while
/// another rotation is in progress.
pub fn begin(keys: &KeyStore, stage_for: Duration, overlap: Duration, now: u64) -> Result<CaRotation, KeyError> {
    let bundle_path = keys.path("ca.pem");
    if let Some(r) = current(keys)? {
        return Err(KeyError::File {
            path: keys.path(STATE_FILE),
            reason: format!("a CA rotation is already in progress ({:?} since {})", r.phase, r.phase_since),
        });
    }
    let bundle = read(&bundle_path)?;
    let issuer = first_pem_block(&bundle).to_owned();
    let next = FederationCa::generate(keys.trust_domain())
        .map_err(|e| KeyError::File { path: keys.path("ca-next.pem"), reason: e.to_string() })?;
    let (next_cert, next_key) = (keys.path("ca-next.pem"), keys.path("ca-next.key"));
    relayfed_proto::config::keys::write_secret(
        &next_key,
        next.certified_key().key_pem.as_bytes(),
        Some(keys.passphrase()),
    )
    .map_err(|e| KeyError::File { path: next_key.clone(), reason: e.to_string() })?;
    std::fs::write(&next_cert, &next.certified_key().cert_pem).map_err(io(&next_cert))?;
    let rotation = CaRotation {
        phase: Phase::Trusting,
        old: fingerprint_of(&issuer, &bundle_path)?,
        new: fingerprint_of(&next.certified_key().cert_pem, &next_cert)?,
        stage_for_seconds: stage_for.as_secs(),
        overlap_seconds: overlap.as_secs(),
        phase_since: now,
        advance: false,
    };
    save(keys, &rotation)?;
    write_atomically(&bundle_path, format!("{}\n{}", issuer.trim_end(), next.certified_key().cert_pem).as_bytes())
        .map_err(io(&bundle_path))?;
    Ok(rotation)
}

/// Step 2: the new CA becomes the issuer (first in the bundle, its key in `ca.key`); the
/// caller then re-issues the node certificates (`KeyStore::ensure` re-issues every one the
/// issuer did not sign). Repeating it after a crash is harmless.
pub fn promote(keys: &KeyStore, rotation: &mut CaRotation, now: u64) -> Result<(), KeyError> {
    let (bundle_path, next_cert, next_key) = (keys.path("ca.pem"), keys.path("ca-next.pem"), keys.path("ca-next.key"));
    if next_cert.exists() {
        let bundle = read(&bundle_path)?;
        let old = first_pem_block(&bundle).to_owned();
        let new = read(&next_cert)?;
        // The bundle first (both CAs, the new one first), then the key: whichever of the two
        // a crash leaves behind, every certificate issued still chains to a trusted CA.
        write_atomically(&bundle_path, format!("{}\n{}", new.trim_end(), old).as_bytes()).map_err(io(&bundle_path))?;
        std::fs::rename(&next_key, keys.path("ca.key")).map_err(io(&next_key))?;
        std::fs::remove_file(&next_cert).map_err(io(&next_cert))?;
    }
    rotation.phase = Phase::Overlap;
    rotation.phase_since = now;
    rotation.advance = false;
    save(keys, rotation)
}

/// Step 3: the old CA leaves the bundle; the rotation is over.
pub fn finish(keys: &KeyStore) -> Result<(), KeyError> {
    let bundle_path = keys.path("ca.pem");
    let bundle = read(&bundle_path)?;
    let issuer = format!("{}\n", first_pem_block(&bundle).trim_end());
    write_atomically(&bundle_path, issuer.as_bytes()).map_err(io(&bundle_path))?;
    let state = keys.path(STATE_FILE);
    std::fs::remove_file(&state).map_err(io(&state))
}

/// Asks the current phase to end as soon as every node has acknowledged it.
pub fn advance(keys: &KeyStore) -> Result<Option<CaRotation>, KeyError> {
    let Some(mut r) = current(keys)? else { return Ok(None) };
    r.advance = true;
    save(keys, &r)?;
    Ok(Some(r))
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn rotation(phase: Phase) -> CaRotation {
        CaRotation {
            phase,
            old: "sha256:old".into(),
            new: "sha256:new".into(),
            stage_for_seconds: 60,
            overlap_seconds: 600,
            phase_since: 1000,
            advance: false,
        }
    }

    fn node(roots: &[&str], cert: &str, file: &str) -> (Option<NodeTls>, String) {
        (Some(NodeTls { roots: roots.iter().map(|r| r.to_string()).collect(), certificate: cert.into() }), file.into())
    }

    #[test]
    fn the_new_ca_issues_only_once_every_node_trusts_it_and_stage_for_passed() {
        let r = rotation(Phase::Trusting);
        let mut nodes = BTreeMap::from([
            ("hub".to_owned(), node(&["sha256:old", "sha256:new"], "c1", "c1")),
            ("shop".to_owned(), node(&["sha256:old"], "c2", "c2")),
        ]);
        assert!(matches!(decide(&r, &nodes, 5000), Step::Wait(w) if w.contains("shop")));
        nodes.insert("shop".into(), (None, "c2".into()));
        assert!(matches!(decide(&r, &nodes, 5000), Step::Wait(w) if w.contains("shop")), "no answer is no ack");
        nodes.insert("shop".into(), node(&["sha256:old", "sha256:new"], "c2", "c2"));
        assert!(matches!(decide(&r, &nodes, 1059), Step::Wait(w) if w.contains("stageFor")));
        assert_eq!(decide(&r, &nodes, 1060), Step::Promote);
        let early = CaRotation { advance: true, ..r };
        assert_eq!(decide(&early, &nodes, 1000), Step::Promote, "advance skips the wait, not the acks");
    }

    #[test]
    fn the_old_ca_goes_only_once_every_node_presents_its_new_certificate_and_overlap_passed() {
        let r = rotation(Phase::Overlap);
        let mut nodes = BTreeMap::from([
            ("hub".to_owned(), node(&["sha256:new", "sha256:old"], "new-hub", "new-hub")),
            ("shop".to_owned(), node(&["sha256:new", "sha256:old"], "old-shop", "new-shop")),
        ]);
        assert!(matches!(decide(&r, &nodes, 9999), Step::Wait(w) if w.contains("shop")));
        nodes.insert("shop".into(), node(&["sha256:new", "sha256:old"], "new-shop", "new-shop"));
        assert!(matches!(decide(&r, &nodes, 1599), Step::Wait(w) if w.contains("overlap")));
        assert_eq!(decide(&r, &nodes, 1600), Step::Finish);
        assert_eq!(decide(&r, &BTreeMap::new(), 1600), Step::Finish, "no running node: nothing to wait for");
    }

    #[test]
    fn the_files_go_through_the_three_steps_and_certificates_move_to_the_new_ca() {
        let dir = std::env::temp_dir().join(format!("relayfed-ca-rotation-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys = KeyStore::new(dir.clone(), "acme.example", "relay.acme.example", b"pass".to_vec());
        let nodes = vec![super::super::keys::NodeKeys {
            node: "shop".into(),
            role: relayfed_proto::config::Role::Home,
            ech_key: None,
        }];
        keys.ensure(&nodes, "server").unwrap();
        let cert = || std::fs::read_to_string(dir.join("shop.pem")).unwrap();
        let key = || std::fs::read(dir.join("shop.key")).unwrap();
        let (cert0, key0) = (cert(), key());
        let ca0 = std::fs::read_to_string(dir.join("ca.pem")).unwrap();

        let mut r = begin(&keys, Duration::ZERO, Duration::ZERO, 1).unwrap();
        assert!(begin(&keys, Duration::ZERO, Duration::ZERO, 1).is_err(), "one rotation at a time");
        let bundle = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        assert!(bundle.starts_with(ca0.trim_end()) && bundle.matches("BEGIN CERTIFICATE").count() == 2);
        keys.ensure(&nodes, "server").unwrap();
        assert_eq!(cert(), cert0, "the old CA still issues while nodes learn the new one");

        promote(&keys, &mut r, 2).unwrap();
        assert_eq!(current(&keys).unwrap().unwrap().phase, Phase::Overlap);
        let report = keys.ensure(&nodes, "server").unwrap();
        assert!(report.generated.iter().any(|g| g.contains("shop certificate")), "{report:?}");
        assert_ne!(cert(), cert0);
        assert_eq!(key(), key0, "the node keeps its key");
        let bundle = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        assert_eq!(fingerprint_of(&bundle, &dir).unwrap(), r.new, "the new CA comes first");

        finish(&keys).unwrap();
        assert!(current(&keys).unwrap().is_none());
        let bundle = std::fs::read_to_string(dir.join("ca.pem")).unwrap();
        assert_eq!(bundle.matches("BEGIN CERTIFICATE").count(), 1);
        assert_eq!(fingerprint_of(&bundle, &dir).unwrap(), r.new);
        let old_leaf = relayfed_proto::crypto::ca::parse_cert_pem(&cert0).unwrap();
        let id = keys.identity("shop").unwrap();
        assert!(id.verify_node_cert(old_leaf.as_ref()).is_err(), "the old CA is gone");
        assert_eq!(
            id.verify_node_cert(id.leaf_der()).unwrap().0,
            "shop",
            "the new certificate verifies by the new CA alone"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }
}
