//! Key material at rest, encrypted with a passphrase: Argon2id (memory-hard) derives a key
//! from the passphrase and a random salt; ChaCha20-Poly1305 seals the secret.
//!
//! A sealed file is one JSON object:
//! `{"relayfed":"sealed-key/v1","kdf":"argon2id","m":19456,"t":2,"p":1,"salt":B64,"nonce":B64,"ciphertext":B64}`.
//! Loaders accept plain and sealed files alike; a sealed file without a passphrase, a wrong
//! passphrase and a tampered file are distinct errors. Files are written with mode 0600.

use argon2::{Algorithm, Argon2, Block, Params, Version};
use chacha20poly1305::aead::{Aead, KeyInit};
use chacha20poly1305::{ChaCha20Poly1305, Key, Nonce};
use serde::{Deserialize, Serialize};

use super::{base64_decode, base64_encode};

/// Format marker.
pub const FORMAT: &str = "sealed-key/v1";

/// Why a sealed secret could not be produced or opened.
#[derive(Debug, thiserror::Error)]
pub enum KeystoreError {
    /// The file is sealed and no passphrase was configured.
    #[error("the key file is encrypted: set keyPassphraseFile in the config snapshot")]
    NeedPassphrase,
    /// Wrong passphrase, or the file was modified.
    #[error("cannot decrypt the key file: wrong passphrase or the file was altered")]
    Decrypt,
    /// The envelope is malformed.
    #[error("malformed encrypted key file: {0}")]
    Malformed(String),
    /// Key derivation failed (bad parameters).
    #[error("key derivation: {0}")]
    Kdf(String),
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Envelope {
    relayfed: String,
    kdf: String,
    m: u32,
    t: u32,
    p: u32,
    salt: String,
    nonce: String,
    ciphertext: String,
}

/// OWASP's Argon2id baseline: 19 MiB, 2 passes, 1 lane.
const M_KIB: u32 = 19 * 1024;
const T: u32 = 2;
const P: u32 = 1;

fn derive(passphrase: &[u8], salt: &[u8], m: u32, t: u32, p: u32) -> Result<[u8; 32], KeystoreError> {
    if m > 1024 * 1024 || t > 16 || p > 8 {
        return Err(KeystoreError::Malformed("KDF parameters out of range".into()));
    }
    let params = Params::new(m, t, p, Some(32)).map_err(|e| KeystoreError::Kdf(e.to_string()))?;
    let mut key = [0u8; 32];
    let blocks = params.block_count();
    // The work area is reserved above glibc's dynamic mmap threshold ceiling (32 MiB on 64-bit;
    // mallopt(3)): freeing a smaller mmapped block raises the threshold to its size, after which
    // every allocation up to it is served from a heap the process never gives back — an idle
    // node kept ~40 MB it did not use. Only the `blocks` used are ever touched.
    let mut memory: Vec<Block> = Vec::with_capacity(blocks.max(WORK_AREA_RESERVE / Block::SIZE));
    memory.resize(blocks, Block::default());
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
        .hash_password_into_with_memory(passphrase, salt, &mut key, &mut memory[..])
        .map_err(|e| KeystoreError::Kdf(e.to_string()))?;
    Ok(key)
}

/// What the Argon2 work area reserves at least (see [`derive`]).
const WORK_AREA_RESERVE: usize = 33 << 20;

/// Encrypts `secret` under `passphrase`.
pub fn seal(passphrase: &[u8], secret: &[u8]) -> Result<String, KeystoreError> {
    let salt: [u8; 16] = rand::random();
    let nonce: [u8; 12] = rand::random();
    let key = derive(passphrase, &salt, M_KIB, T, P)?;
    let ct = ChaCha20Poly1305::new(Key::from_slice(&key))
        .encrypt(Nonce::from_slice(&nonce), secret)
        .map_err(|_| KeystoreError::Decrypt)?;
    let env = Envelope {
        relayfed: FORMAT.into(),
        kdf: "argon2id".into(),
        m: M_KIB,
        t: T,
        p: P,
        salt: base64_encode(&salt),
        nonce: base64_encode(&nonce),
        ciphertext: base64_encode(&ct),
    };
    serde_json::to_string(&env).map_err(|e| KeystoreError::Malformed(e.to_string()))
}

/// Whether `text` is a sealed envelope.
pub fn is_sealed(text: &str) -> bool {
    text.trim_start().starts_with('{') && text.contains(FORMAT)
}

/// Decrypts a sealed envelope.
pub fn open(passphrase: &[u8], text: &str) -> Result<Vec<u8>, KeystoreError> {
    let env: Envelope = serde_json::from_str(text).map_err(|e| KeystoreError::Malformed(e.to_string()))?;
    if env.relayfed != FORMAT || env.kdf != "argon2id" {
        return Err(KeystoreError::Malformed(format!("unsupported format {} / {}", env.relayfed, env.kdf)));
    }
    let field =
        |name: &str, v: &str| base64_decode(v).ok_or_else(|| KeystoreError::Malformed(format!("{name} is not base64")));
    let salt = field("salt", &env.salt)?;
    let nonce = field("nonce", &env.nonce)?;
    let ct = field("ciphertext", &env.ciphertext)?;
    if nonce.len() != 12 || salt.len() < 8 {
        return Err(KeystoreError::Malformed("bad salt or nonce length".into()));
    }
    let key = derive(passphrase, &salt, env.m, env.t, env.p)?;
    ChaCha20Poly1305::new(Key::from_slice(&key))
        .decrypt(Nonce::from_slice(&nonce), ct.as_slice())
        .map_err(|_| KeystoreError::Decrypt)
}

/// The secret in a key file's text: sealed (needs `passphrase`) or plain (returned as is).
pub fn unwrap(text: &str, passphrase: Option<&[u8]>) -> Result<Vec<u8>, KeystoreError> {
    if !is_sealed(text) {
        return Ok(text.as_bytes().to_vec());
    }
    open(passphrase.ok_or(KeystoreError::NeedPassphrase)?, text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_wrong_passphrase_and_tampering() {
        let sealed = seal(b"correct horse", b"-----BEGIN PRIVATE KEY-----\nsecret\n").unwrap();
        assert!(is_sealed(&sealed));
        assert!(!sealed.contains("secret"), "nothing in clear");
        assert_eq!(open(b"correct horse", &sealed).unwrap(), b"-----BEGIN PRIVATE KEY-----\nsecret\n");
        assert!(matches!(open(b"battery staple", &sealed), Err(KeystoreError::Decrypt)));
        let mut env: serde_json::Value = serde_json::from_str(&sealed).unwrap();
        let mut ct = base64_decode(env["ciphertext"].as_str().unwrap()).unwrap();
        ct[0] ^= 1;
        env["ciphertext"] = base64_encode(&ct).into();
        assert!(matches!(open(b"correct horse", &env.to_string()), Err(KeystoreError::Decrypt)));
        assert!(matches!(unwrap(&sealed, None), Err(KeystoreError::NeedPassphrase)));
        assert_eq!(unwrap("plain", None).unwrap(), b"plain");
    }
}
