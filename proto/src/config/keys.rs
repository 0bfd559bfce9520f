//! Key files referenced by a snapshot: the main relay's ECH keys and a home node's Noise key.
//!
//! Files are written with mode 0600. (Passphrase encryption at rest is issue 5's work.)

use std::path::Path;
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};

use super::{ConfigError, base64_decode, base64_encode};
use crate::crypto::ech::{EchKeyPair, EchKeySet};
use crate::crypto::noise::StaticKeypair;

/// One stored ECH key.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct StoredEchKey {
    /// Config id.
    pub config_id: u8,
    /// X25519 private key, base64.
    pub secret: String,
    /// For a previous key: Unix seconds when it was rotated out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rotated_at: Option<u64>,
    /// Unix seconds since the key holds its place: for the current key, since it became
    /// current (its age decides the next rotation); for a staged key, since it was staged.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<u64>,
}

/// The ECH key file of a main relay.
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct EchKeyFile {
    /// Public name written into the configs.
    pub public_name: String,
    /// The current key.
    pub current: StoredEchKey,
    /// The previous key, valid for the grace period after `rotatedAt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub previous: Option<StoredEchKey>,
    /// The staged next key: relays accept it, homes are not yet given its config.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub next: Option<StoredEchKey>,
}

fn bad(path: &Path, reason: impl Into<String>) -> ConfigError {
    ConfigError::Parse { path: path.into(), reason: reason.into() }
}

fn key_pair(path: &Path, public_name: &str, k: &StoredEchKey) -> Result<EchKeyPair, ConfigError> {
    let secret: [u8; 32] = base64_decode(&k.secret)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| bad(path, "secret must be 32 bytes, base64"))?;
    EchKeyPair::from_secret(k.config_id, public_name, secret).map_err(|e| bad(path, e.to_string()))
}

impl EchKeyFile {
    /// Builds a file holding one fresh key.
    pub fn from_key(key: &EchKeyPair) -> Self {
        Self {
            public_name: key.config().public_name.clone(),
            current: StoredEchKey {
                config_id: key.config().config_id,
                secret: base64_encode(key.secret()),
                rotated_at: None,
                since: std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).ok().map(|d| d.as_secs()),
            },
            previous: None,
            next: None,
        }
    }

    /// Reads a key file (encrypted or not).
    pub fn load(path: &Path, passphrase: Option<&[u8]>) -> Result<Self, ConfigError> {
        let bytes = read_secret(path, passphrase)?;
        serde_json::from_slice(&bytes).map_err(|e| bad(path, e.to_string()))
    }

    /// Writes the file with mode 0600, encrypted when a passphrase is given.
    pub fn save(&self, path: &Path, passphrase: Option<&[u8]>) -> Result<(), ConfigError> {
        let text = serde_json::to_string_pretty(self).map_err(|e| bad(path, e.to_string()))?;
        write_secret(path, text.as_bytes(), passphrase)
    }

    /// The key set, with the previous key honoured for `grace` after its rotation and the
    /// staged key (if any) accepted.
    pub fn key_set(&self, path: &Path, grace: Duration) -> Result<EchKeySet, ConfigError> {
        let mut set = EchKeySet::new(key_pair(path, &self.public_name, &self.current)?);
        if let Some(prev) = &self.previous {
            let rotated = SystemTime::UNIX_EPOCH + Duration::from_secs(prev.rotated_at.unwrap_or(0));
            let current = set.current().clone();
            let mut s = EchKeySet::new(key_pair(path, &self.public_name, prev)?);
            s.rotate(current, grace, rotated);
            set = s;
        }
        if let Some(next) = &self.next {
            set.stage(key_pair(path, &self.public_name, next)?);
        }
        Ok(set)
    }
}

/// Writes a secret file readable only by its owner.
pub fn write_private(path: &Path, bytes: &[u8]) -> Result<(), ConfigError> {
    use std::io::Write;
    #[cfg(unix)]
    use std::os::unix::fs::OpenOptionsExt;
    let mut opts = std::fs::OpenOptions::new();
    opts.write(true).create(true).truncate(true);
    #[cfg(unix)]
    opts.mode(0o600);
    let mut f = opts.open(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    f.write_all(bytes).map_err(|source| ConfigError::Read { path: path.into(), source })
}

/// Reads a secret file, decrypting it when it is sealed with a passphrase.
pub fn read_secret(path: &Path, passphrase: Option<&[u8]>) -> Result<Vec<u8>, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
    super::keystore::unwrap(&text, passphrase).map_err(|e| bad(path, e.to_string()))
}

/// Writes a secret file (mode 0600), sealed when a passphrase is given.
pub fn write_secret(path: &Path, bytes: &[u8], passphrase: Option<&[u8]>) -> Result<(), ConfigError> {
    match passphrase {
        Some(p) => {
            let sealed = super::keystore::seal(p, bytes).map_err(|e| bad(path, e.to_string()))?;
            write_private(path, sealed.as_bytes())
        }
        None => write_private(path, bytes),
    }
}

/// Reads a Noise static private key file (base64 text, possibly sealed).
pub fn load_noise_key(path: &Path, passphrase: Option<&[u8]>) -> Result<StaticKeypair, ConfigError> {
    let text = read_secret(path, passphrase)?;
    let bytes = base64_decode(&String::from_utf8_lossy(&text)).ok_or_else(|| bad(path, "not base64"))?;
    StaticKeypair::from_private(&bytes).map_err(|e| bad(path, e.to_string()))
}

/// Writes a Noise static private key file (base64 text, mode 0600, sealed with a passphrase).
pub fn save_noise_key(path: &Path, key: &StaticKeypair, passphrase: Option<&[u8]>) -> Result<(), ConfigError> {
    write_secret(path, base64_encode(&key.private).as_bytes(), passphrase)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ech_key_files_round_trip_with_rotation() {
        let dir = std::env::temp_dir().join(format!("relayfed-keys-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("ech.json");
        let old = EchKeyPair::generate(1, "relay.acme.example").unwrap();
        let new = EchKeyPair::generate(2, "relay.acme.example").unwrap();
        let mut file = EchKeyFile::from_key(&new);
        let now = SystemTime::now().duration_since(SystemTime::UNIX_EPOCH).unwrap().as_secs();
        file.previous = Some(StoredEchKey {
            config_id: 1,
            secret: base64_encode(old.secret()),
            rotated_at: Some(now),
            since: None,
        });
        let staged = EchKeyPair::generate(3, "relay.acme.example").unwrap();
        file.next = Some(EchKeyFile::from_key(&staged).current);
        file.save(&path, None).unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
        let set = EchKeyFile::load(&path, None).unwrap().key_set(&path, Duration::from_secs(60)).unwrap();
        // The same file sealed with a passphrase loads only with it.
        file.save(&path, Some(b"pw")).unwrap();
        assert!(EchKeyFile::load(&path, None).unwrap_err().to_string().contains("keyPassphraseFile"));
        assert!(EchKeyFile::load(&path, Some(b"wrong")).is_err());
        assert_eq!(EchKeyFile::load(&path, Some(b"pw")).unwrap().current.config_id, 2);
        assert_eq!(set.current().config().config_id, 2);
        assert!(set.find(1, SystemTime::now()).is_some());
        assert!(set.find(1, SystemTime::now() + Duration::from_secs(120)).is_none());
        assert_eq!(set.staged().map(|k| k.config().config_id), Some(3), "the staged key survives the round trip");
        assert!(set.find(3, SystemTime::now() + Duration::from_secs(120)).is_some());
        std::fs::remove_dir_all(dir).unwrap();
    }
}
