//! Key material of a local federation, generated on first start and reused afterwards: the
//! federation CA, a certificate per node (and one for the distribution server), Noise static
//! keys for home nodes, ECH keys for main relays. Private keys are sealed with the passphrase
//! (Argon2id + ChaCha20-Poly1305, `relayfed_proto::config::keystore`).

use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use relayfed_proto::config::Role;
use relayfed_proto::config::keys::{EchKeyFile, load_noise_key, read_secret, save_noise_key, write_secret};
use relayfed_proto::crypto::ca::FederationCa;
use relayfed_proto::crypto::ech::EchKeyPair;
use relayfed_proto::crypto::noise::StaticKeypair;
use relayfed_serving::identity::HopIdentity;

use anyhow::Context;
use tracing::warn;

use super::StateDir;

/// Node certificates are valid this long ...
const CERT_VALIDITY: Duration = Duration::from_secs(30 * 86_400);
/// ... and reissued at start when they expire within this.
const RENEW_BEFORE: Duration = Duration::from_secs(7 * 86_400);

/// Why key material could not be prepared.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing a file failed.
    #[error("{path}: {reason}")]
    File {
        /// The file.
        path: PathBuf,
        /// What failed.
        reason: String,
    },
    /// The stored CA belongs to another trust domain.
    #[error(
        "{path} is the CA of trust domain {found:?}, but the federation says {wanted:?}; use another --state-dir or delete it"
    )]
    TrustDomain {
        /// CA file.
        path: PathBuf,
        /// Trust domain of the stored CA.
        found: String,
        /// Trust domain of the RelayFederation.
        wanted: String,
    },
    /// The passphrase does not open the stored keys.
    #[error("cannot open {path} with this passphrase (was the state directory created with another one?): {reason}")]
    Passphrase {
        /// The sealed file.
        path: PathBuf,
        /// What the keystore said.
        reason: String,
    },
}

fn file_err(path: &Path, e: impl std::fmt::Display) -> KeyError {
    KeyError::File { path: path.to_owned(), reason: e.to_string() }
}

/// What `ensure` did, for the start-up summary.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyReport {
    /// Files generated now.
    pub generated: Vec<String>,
    /// Files found and reused.
    pub reused: Vec<String>,
}

/// The key directory of a state directory.
pub struct KeyStore {
    /// `<state>/keys`.
    pub dir: PathBuf,
    trust_domain: String,
    public_name: String,
    passphrase: Vec<u8>,
    /// Signed ECH announcements by (relay, list, issuing CA certificate): a signature is
    /// randomised, so signing again would change every relay's snapshot at every publish.
    announced: std::sync::Mutex<std::collections::BTreeMap<(String, String, String), String>>,
}

/// A node whose key material local mode keeps.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NodeKeys {
    /// Its node id.
    pub node: String,
    /// Its role (homes get a Noise key bound into their certificate).
    pub role: Role,
    /// A main relay's ECH key file (replicas of one relay share it).
    pub ech_key: Option<PathBuf>,
}

impl KeyStore {
    /// A key store for one federation.
    pub fn new(dir: PathBuf, trust_domain: &str, public_name: &str, passphrase: Vec<u8>) -> Self {
        Self {
            dir,
            trust_domain: trust_domain.to_owned(),
            public_name: public_name.to_owned(),
            passphrase,
            announced: Default::default(),
        }
    }

    pub(super) fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    /// The passphrase sealing the private keys.
    pub(super) fn passphrase(&self) -> &[u8] {
        &self.passphrase
    }

    /// The trust domain of this federation.
    pub(super) fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// Loads the CA, creating it on first use (never overwritten afterwards).
    fn ca(&self, report: &mut KeyReport) -> Result<FederationCa, KeyError> {
        let (cert, key) = (self.path("ca.pem"), self.path("ca.key"));
        if cert.exists() {
            let pem = std::fs::read_to_string(&cert).map_err(|e| file_err(&cert, e))?;
            let der = relayfed_proto::crypto::ca::parse_cert_pem(&pem).map_err(|e| file_err(&cert, e))?;
            let found = ca_trust_domain(&der).unwrap_or_default();
            if found != self.trust_domain {
                return Err(KeyError::TrustDomain { path: cert, found, wanted: self.trust_domain.clone() });
            }
            let key_pem = read_secret(&key, Some(&self.passphrase))
                .map_err(|e| KeyError::Passphrase { path: key.clone(), reason: e.to_string() })?;
            report.reused.push("ca".into());
            // During a CA rotation `ca.pem` is a bundle; the issuing CA comes first.
            let issuer = first_pem_block(&pem);
            return FederationCa::from_pem(&self.trust_domain, issuer, &String::from_utf8_lossy(&key_pem))
                .map_err(|e| file_err(&key, e));
        }
        let ca = FederationCa::generate(&self.trust_domain).map_err(|e| file_err(&cert, e))?;
        write_secret(&key, ca.certified_key().key_pem.as_bytes(), Some(&self.passphrase))
            .map_err(|e| file_err(&key, e))?;
        std::fs::write(&cert, &ca.certified_key().cert_pem).map_err(|e| file_err(&cert, e))?;
        report.generated.push("ca".into());
        Ok(ca)
    }

    /// Makes sure every node (and the distribution server, `server_node`) has its material.
    pub fn ensure(&self, nodes: &[NodeKeys], server_node: &str) -> Result<KeyReport, KeyError> {
        std::fs::create_dir_all(&self.dir).map_err(|e| file_err(&self.dir, e))?;
        let mut report = KeyReport::default();
        let ca = self.ca(&mut report)?;
        let pass = Some(self.passphrase.as_slice());
        let all = nodes.iter().map(|n| (n.node.as_str(), Some(n.role), n.ech_key.as_ref())).chain([(
            server_node,
            None,
            None,
        )]);
        for (node, role, ech_key) in all {
            // A home's certificate binds its Noise key (relays refuse other keys), so the
            // Noise key comes first.
            let noise_public = match role {
                Some(Role::Home) => {
                    let noise = self.path(&format!("{node}-noise.key"));
                    let k = if noise.exists() {
                        report.reused.push(format!("{node} noise key"));
                        load_noise_key(&noise, pass)
                            .map_err(|e| KeyError::Passphrase { path: noise.clone(), reason: e.to_string() })?
                    } else {
                        let k = StaticKeypair::generate().map_err(|e| file_err(&noise, e))?;
                        save_noise_key(&noise, &k, pass).map_err(|e| file_err(&noise, e))?;
                        report.generated.push(format!("{node} noise key"));
                        k
                    };
                    Some(k.public)
                }
                _ => None,
            };
            let (cert, key) = (self.path(&format!("{node}.pem")), self.path(&format!("{node}.key")));
            let usable = cert.exists() && key.exists() && !expiring(&cert) && binds(&cert, noise_public.as_ref());
            if usable && issued_by(&ca, &cert) {
                report.reused.push(format!("{node} certificate"));
            } else if usable {
                // Another CA issued it (a CA rotation was promoted): a new certificate for the
                // same key, so a node reading its files while they change sees a matching pair.
                let key_pem = read_secret(&key, pass)
                    .map_err(|e| KeyError::Passphrase { path: key.clone(), reason: e.to_string() })?;
                let pem = ca
                    .reissue_bound(node, CERT_VALIDITY, noise_public.as_ref(), &String::from_utf8_lossy(&key_pem))
                    .map_err(|e| file_err(&cert, e))?;
                write_atomically(&cert, pem.as_bytes()).map_err(|e| file_err(&cert, e))?;
                report.generated.push(format!("{node} certificate (new CA)"));
            } else {
                let issued =
                    ca.issue_bound(node, CERT_VALIDITY, noise_public.as_ref()).map_err(|e| file_err(&cert, e))?;
                write_secret(&key, issued.key_pem.as_bytes(), pass).map_err(|e| file_err(&key, e))?;
                std::fs::write(&cert, &issued.cert_pem).map_err(|e| file_err(&cert, e))?;
                report.generated.push(format!("{node} certificate"));
            }
            if let Some(ech) = ech_key {
                if ech.exists() {
                    report.reused.push(format!("{node} ECH key"));
                } else {
                    let k = EchKeyPair::generate(rand::random(), &self.public_name).map_err(|e| file_err(ech, e))?;
                    EchKeyFile::from_key(&k).save(ech, pass).map_err(|e| file_err(ech, e))?;
                    report.generated.push(format!("{node} ECH key"));
                }
            }
        }
        Ok(report)
    }

    /// The ECHConfigList (base64) each main relay in `nodes` publishes, read from its key
    /// file (once per file: replicas share one): what home snapshots carry as `echConfigs`.
    pub fn ech_configs(&self, nodes: &[NodeKeys]) -> Result<std::collections::BTreeMap<String, String>, KeyError> {
        let mut lists: std::collections::BTreeMap<&Path, String> = std::collections::BTreeMap::new();
        let mut out = std::collections::BTreeMap::new();
        for (node, path) in nodes.iter().filter_map(|n| Some((&n.node, n.ech_key.as_deref()?))) {
            if !lists.contains_key(path) {
                let list = EchKeyFile::load(path, Some(&self.passphrase))
                    .and_then(|f| f.key_set(path, Duration::ZERO))
                    .map_err(|e| KeyError::Passphrase { path: path.to_owned(), reason: e.to_string() })?
                    .config_list()
                    .map_err(|e| file_err(path, e))?;
                lists.insert(path, relayfed_proto::config::base64_encode(&list));
            }
            out.insert(node.clone(), lists[path].clone());
        }
        Ok(out)
    }

    /// Each of `configs` (ECHConfigList base64 by main relay) signed by the issuing CA for
    /// its relay (docs/protocol.md §5.7): what a main relay announces to its peers, so that
    /// a partner federation's homes, which pin this CA's key, can seal to it.
    pub fn ech_announcements(
        &self,
        configs: &std::collections::BTreeMap<String, String>,
    ) -> Result<std::collections::BTreeMap<String, relayfed_proto::config::SignedEchConfig>, KeyError> {
        let ca = self.ca(&mut KeyReport::default())?;
        let path = self.path("ca.key");
        let issuer = ca.certified_key().cert_pem.clone();
        let mut cache = self.announced.lock().unwrap_or_else(|p| p.into_inner());
        // Only what is announced now is kept (a rotated key's or CA's signatures go).
        cache.retain(|(node, list, ca), _| *ca == issuer && configs.get(node) == Some(list));
        configs
            .iter()
            .map(|(node, list)| {
                let key = (node.clone(), list.clone(), issuer.clone());
                let signature = match cache.get(&key) {
                    Some(s) => s.clone(),
                    None => {
                        let raw = relayfed_proto::config::base64_decode(list)
                            .ok_or_else(|| file_err(&path, format!("the ECH config of {node} is not base64")))?;
                        let s = ca.sign_ech_config(node, &raw).map_err(|e| file_err(&path, e))?;
                        let s = relayfed_proto::config::base64_encode(&s);
                        cache.insert(key, s.clone());
                        s
                    }
                };
                Ok((node.clone(), relayfed_proto::config::SignedEchConfig { ech_config_list: list.clone(), signature }))
            })
            .collect()
    }

    /// One step of a main relay's ECH key schedule (as the Relay reconciler does in a
    /// cluster): stages, promotes or prunes keys in `path` when due, or stages now when
    /// `force`. The file is rewritten only when something changed.
    pub fn rotate_ech(
        &self,
        path: &Path,
        periods: crate::ech_rotation::Periods,
        force: bool,
        now: SystemTime,
    ) -> Result<crate::ech_rotation::Outcome, KeyError> {
        let pass = Some(self.passphrase.as_slice());
        let file = EchKeyFile::load(path, pass)
            .map_err(|e| KeyError::Passphrase { path: path.to_owned(), reason: e.to_string() })?;
        // Files written before keys recorded `since`: the file's age stands in.
        let since = match file.current.since {
            Some(t) => SystemTime::UNIX_EPOCH + Duration::from_secs(t),
            None => std::fs::metadata(path).and_then(|m| m.modified()).map_err(|e| file_err(path, e))?,
        };
        let state = crate::ech_rotation::EchState { file, current_since: since };
        let out = crate::ech_rotation::decide(Some(&state), &self.public_name, periods, force, now)
            .map_err(|e| file_err(path, e))?;
        if out.change != crate::ech_rotation::Change::Unchanged {
            out.state.file.save(path, pass).map_err(|e| file_err(path, e))?;
        }
        Ok(out)
    }

    /// The TLS identity of `node` (e.g. the distribution server's).
    pub fn identity(&self, node: &str) -> Result<HopIdentity, KeyError> {
        let read = |p: PathBuf| std::fs::read_to_string(&p).map_err(|e| file_err(&p, e));
        let key_path = self.path(&format!("{node}.key"));
        let key = read_secret(&key_path, Some(&self.passphrase))
            .map_err(|e| KeyError::Passphrase { path: key_path.clone(), reason: e.to_string() })?;
        HopIdentity::from_pem(
            &self.trust_domain,
            node,
            &read(self.path("ca.pem"))?,
            &read(self.path(&format!("{node}.pem")))?,
            &String::from_utf8_lossy(&key),
        )
        .map_err(|e| file_err(&key_path, e))
    }

    /// SHA-256 fingerprint of the CA certificate (`sha256:<hex>`), shown by `status`.
    pub fn ca_fingerprint(&self) -> Option<String> {
        let pem = std::fs::read_to_string(self.path("ca.pem")).ok()?;
        relayfed_proto::crypto::ca::cert_fingerprint(&pem).ok()
    }
}

/// The trust domain named in a CA certificate's common name (`relayfed CA <domain>`).
pub fn ca_trust_domain(der: &[u8]) -> Option<String> {
    let (_, cert) = x509_parser::parse_x509_certificate(der).ok()?;
    let cn = cert.subject().iter_common_name().next()?.as_str().ok()?.to_owned();
    cn.strip_prefix("relayfed CA ").map(str::to_owned)
}

/// Whether the certificate in `path` binds exactly `noise_key` (none: binds nothing).
fn binds(path: &Path, noise_key: Option<&[u8; 32]>) -> bool {
    let Ok(pem) = std::fs::read_to_string(path) else { return false };
    let Ok(der) = relayfed_proto::crypto::ca::parse_cert_pem(&pem) else { return false };
    relayfed_proto::crypto::ca::noise_key_from_cert(der.as_ref()).ok().flatten().as_ref() == noise_key
}

/// The first PEM block of `pem` (the issuing CA of a bundle).
pub(super) fn first_pem_block(pem: &str) -> &str {
    const END: &str = "-----END CERTIFICATE-----";
    match pem.find(END) {
        Some(i) => &pem[..i + END.len()],
        None => pem,
    }
}

/// Whether `ca` issued the certificate in `path`.
fn issued_by(ca: &FederationCa, path: &Path) -> bool {
    let Ok(pem) = std::fs::read_to_string(path) else { return false };
    relayfed_proto::crypto::ca::parse_cert_pem(&pem).is_ok_and(|der| ca.issued(der.as_ref()))
}

/// Replaces `path` with `bytes` in one step (a temporary file renamed over it), so a node
/// reading it sees the old or the new contents, never a mix; the mode of `path` is kept.
pub(super) fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let tmp = path.with_extension("tmp");
    let mode = std::fs::metadata(path).map(|m| m.permissions().mode()).unwrap_or(0o644);
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).open(&tmp)?;
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    f.write_all(bytes)?;
    f.sync_all()?;
    std::fs::rename(&tmp, path)
}

/// Whether the certificate in `path` expires within [`RENEW_BEFORE`] (or cannot be read).
fn expiring(path: &Path) -> bool {
    let Ok(pem) = std::fs::read_to_string(path) else { return true };
    let Ok(der) = relayfed_proto::crypto::ca::parse_cert_pem(&pem) else { return true };
    let Ok((_, cert)) = x509_parser::parse_x509_certificate(der.as_ref()) else { return true };
    let not_after = cert.validity().not_after.timestamp();
    let renew_at = SystemTime::now() + RENEW_BEFORE;
    let renew_at = renew_at.duration_since(SystemTime::UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(i64::MAX);
    not_after < renew_at
}

/// The passphrase file to use and whether it is ours to delete on exit.
pub fn passphrase(state: &StateDir, given: Option<&Path>) -> anyhow::Result<(PathBuf, Vec<u8>, bool)> {
    let read = |p: &Path| -> anyhow::Result<Vec<u8>> {
        let t = std::fs::read_to_string(p).with_context(|| format!("passphrase file {}", p.display()))?;
        Ok(t.trim_end_matches(['\n', '\r']).as_bytes().to_vec())
    };
    if let Some(p) = given {
        let p = std::fs::canonicalize(p).with_context(|| format!("passphrase file {}", p.display()))?;
        let pass = read(&p)?;
        return Ok((p, pass, false));
    }
    if let Some(v) = std::env::var_os("RELAYFED_PASSPHRASE") {
        let path = state.run().join("passphrase");
        std::fs::create_dir_all(state.run())?;
        relayfed_proto::config::keys::write_private(&path, v.as_encoded_bytes())?;
        return Ok((path, v.as_encoded_bytes().to_vec(), true));
    }
    let path = state.generated_passphrase();
    if !path.exists() {
        std::fs::create_dir_all(&state.root)?;
        let pass: String = (0..32).map(|_| char::from(b'a' + rand::random_range(0..26u8))).collect();
        relayfed_proto::config::keys::write_private(&path, pass.as_bytes())?;
        warn!(
            path = %path.display(),
            "generated a passphrase for the key material and stored it next to it (fine for a demo; pass --passphrase-file or RELAYFED_PASSPHRASE to keep it elsewhere)"
        );
    }
    let pass = read(&path)?;
    Ok((path, pass, false))
}
