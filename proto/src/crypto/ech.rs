//! ECH for the route header: HPKE (RFC 9180) seal and open, ECH key pairs, and a key set
//! that rotates keys while keeping the previous one valid for a grace period.
//!
//! Suite: KEM DHKEM(X25519, HKDF-SHA256), KDF HKDF-SHA256, AEAD AES-128-GCM or
//! ChaCha20-Poly1305. `info = "relayfed ech v1" || 0x00 || ECHConfig` (the whole encoded
//! config, as TLS ECH does); `aad` is [`SealedRoute::aad`]. Plain values in, bytes out: no I/O.

use std::time::{Duration, SystemTime};

use hpke::aead::{AesGcm128, ChaCha20Poly1305};
use hpke::kdf::HkdfSha256;
use hpke::kem::X25519HkdfSha256;
use hpke::{Deserializable, Kem, OpModeR, OpModeS, Serializable};
use thiserror::Error;

use crate::protocol::ech_config::{
    AEAD_AES_128_GCM, AEAD_CHACHA20_POLY1305, CipherSuite, EchConfig, EchConfigList, KDF_HKDF_SHA256,
    KEM_X25519_SHA256, ListEntry,
};
use crate::protocol::route::{CONFIG_DIGEST_LEN, EchBinding, InnerRoute, SealedRoute};
use crate::protocol::{DecodeError, ErrorCode};

/// Label that starts the HPKE `info` string.
pub const INFO_LABEL: &[u8] = b"relayfed ech v1\0";

/// Why ECH sealing or opening failed.
#[derive(Debug, Error)]
pub enum EchError {
    /// The config names a KEM, KDF or AEAD relayfed does not implement.
    #[error("unsupported HPKE suite: kem 0x{kem:04x}, kdf 0x{kdf:04x}, aead 0x{aead:04x}")]
    UnsupportedSuite {
        /// KEM id.
        kem: u16,
        /// KDF id.
        kdf: u16,
        /// AEAD id.
        aead: u16,
    },
    /// The public key in the config is malformed.
    #[error("invalid ECH public key")]
    BadPublicKey,
    /// The sealed route did not open (tampered, wrong key, wrong AAD).
    #[error("sealed route header did not open: {0}")]
    Open(String),
    /// Sealing failed.
    #[error("sealing failed: {0}")]
    Seal(String),
    /// The opened route or a config did not decode.
    #[error(transparent)]
    Decode(#[from] DecodeError),
    /// No key with this config id (unknown, or rotated out of its grace period).
    #[error("unknown ECH config id {0}")]
    UnknownConfig(u8),
}

impl EchError {
    /// The wire error code this failure is reported with.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::UnknownConfig(_) => ErrorCode::EchUnknownConfig,
            Self::Decode(_) => ErrorCode::MalformedFrame,
            _ => ErrorCode::EchDecryptFailed,
        }
    }
}

fn hpke_err(e: hpke::HpkeError) -> String {
    e.to_string()
}

/// An ECH key: the private key and the ECHConfig that publishes its public half.
#[derive(Clone)]
pub struct EchKeyPair {
    config: EchConfig,
    config_bytes: Vec<u8>,
    secret: [u8; 32],
}

impl std::fmt::Debug for EchKeyPair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EchKeyPair").field("config_id", &self.config.config_id).finish_non_exhaustive()
    }
}

impl EchKeyPair {
    /// Generates a fresh key for `public_name` with the given config id.
    pub fn generate(config_id: u8, public_name: &str) -> Result<Self, EchError> {
        let (sk, _) = X25519HkdfSha256::gen_keypair();
        let mut secret = [0u8; 32];
        secret.copy_from_slice(&sk.to_bytes());
        Self::from_secret(config_id, public_name, secret)
    }

    /// Rebuilds a key from its stored secret.
    pub fn from_secret(config_id: u8, public_name: &str, secret: [u8; 32]) -> Result<Self, EchError> {
        let sk = <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(&secret).map_err(|_| EchError::BadPublicKey)?;
        let pk = X25519HkdfSha256::sk_to_pk(&sk);
        let config = EchConfig {
            config_id,
            kem_id: KEM_X25519_SHA256,
            public_key: pk.to_bytes().to_vec(),
            cipher_suites: vec![
                CipherSuite { kdf_id: KDF_HKDF_SHA256, aead_id: AEAD_AES_128_GCM },
                CipherSuite { kdf_id: KDF_HKDF_SHA256, aead_id: AEAD_CHACHA20_POLY1305 },
            ],
            maximum_name_length: 0,
            public_name: public_name.to_owned(),
            extensions: vec![],
        };
        let config_bytes = config.encode()?;
        Ok(Self { config, config_bytes, secret })
    }

    /// The published config.
    pub fn config(&self) -> &EchConfig {
        &self.config
    }

    /// The private key bytes (for storage at rest; never log them).
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret
    }

    /// What an opened route is bound to: this key's config and the sealing's encapsulation.
    pub fn binding(&self, sealed: &SealedRoute) -> EchBinding {
        EchBinding {
            config_id: self.config.config_id,
            config_digest: digest(&self.config_bytes),
            enc: sealed.enc.clone(),
        }
    }

    /// Opens a sealed route addressed to this key.
    pub fn open(&self, sealed: &SealedRoute) -> Result<InnerRoute, EchError> {
        let sk = <X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(&self.secret).map_err(|_| EchError::BadPublicKey)?;
        let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&sealed.enc)
            .map_err(|_| EchError::Open("malformed encapsulated key".into()))?;
        let info = info_for(&self.config_bytes);
        let aad = sealed.aad();
        let open = match (sealed.kdf_id, sealed.aead_id) {
            (KDF_HKDF_SHA256, AEAD_AES_128_GCM) => open_with::<AesGcm128>,
            (KDF_HKDF_SHA256, AEAD_CHACHA20_POLY1305) => open_with::<ChaCha20Poly1305>,
            (kdf, aead) => return Err(EchError::UnsupportedSuite { kem: KEM_X25519_SHA256, kdf, aead }),
        };
        let plain = open(&sk, &enc, &info, &sealed.payload, &aad).map_err(|e| EchError::Open(hpke_err(e)))?;
        Ok(InnerRoute::from_padded(&plain)?)
    }
}

impl EchKeyPair {
    /// Does the work of opening a sealed route on a GREASE envelope (an X25519 decapsulation
    /// and an AEAD attempt, which fails), so a relay answers a greased stream no sooner than a
    /// sealed one. Nothing is learnt: the envelope is random.
    pub fn open_grease(&self, main: &str, g: &crate::protocol::route::Grease) {
        let shaped = SealedRoute {
            main: main.to_owned(),
            config_id: self.config().config_id,
            kdf_id: g.kdf_id,
            aead_id: g.aead_id,
            enc: g.enc.clone(),
            payload: g.payload.clone(),
        };
        let _ = self.open(&shaped);
    }
}

fn digest(config_bytes: &[u8]) -> [u8; CONFIG_DIGEST_LEN] {
    use sha2::Digest;
    sha2::Sha256::digest(config_bytes).into()
}

/// SHA-256 of an ECHConfig's encoding: what the Noise prologue binds (docs/protocol.md §6).
pub fn config_digest(config: &EchConfig) -> Result<[u8; CONFIG_DIGEST_LEN], EchError> {
    Ok(digest(&config.encode()?))
}

/// The binding of a route the origin sealed to `config`.
pub fn binding(config: &EchConfig, sealed: &SealedRoute) -> Result<EchBinding, EchError> {
    Ok(EchBinding { config_id: sealed.config_id, config_digest: config_digest(config)?, enc: sealed.enc.clone() })
}

fn info_for(config_bytes: &[u8]) -> Vec<u8> {
    let mut info = INFO_LABEL.to_vec();
    info.extend_from_slice(config_bytes);
    info
}

type Sk = <X25519HkdfSha256 as Kem>::PrivateKey;
type Pk = <X25519HkdfSha256 as Kem>::PublicKey;
type Enc = <X25519HkdfSha256 as Kem>::EncappedKey;

/// HPKE single-shot open with AEAD `A` (KEM X25519-HKDF-SHA256, KDF HKDF-SHA256).
fn open_with<A: hpke::aead::Aead>(
    sk: &Sk,
    enc: &Enc,
    info: &[u8],
    ct: &[u8],
    aad: &[u8],
) -> Result<Vec<u8>, hpke::HpkeError> {
    hpke::single_shot_open::<A, HkdfSha256, X25519HkdfSha256>(&OpModeR::Base, sk, enc, info, ct, aad)
}

/// HPKE seal with AEAD `A` into `outer`: encapsulates first, because the AAD (the outer
/// header) covers the encapsulated key, then fills in the ciphertext.
fn seal_with<A: hpke::aead::Aead>(
    pk: &Pk,
    info: &[u8],
    plain: &[u8],
    outer: &mut SealedRoute,
) -> Result<(), hpke::HpkeError> {
    let (enc, mut ctx) = hpke::setup_sender::<A, HkdfSha256, X25519HkdfSha256>(&OpModeS::Base, pk, info)?;
    outer.enc = enc.to_bytes().to_vec();
    outer.payload = ctx.seal(plain, &outer.aad())?;
    Ok(())
}

/// Seals `route` to `config` (owned by main relay `main`) with `suite`.
pub fn seal(config: &EchConfig, suite: CipherSuite, main: &str, route: &InnerRoute) -> Result<SealedRoute, EchError> {
    if config.kem_id != KEM_X25519_SHA256 || !suite.supported() {
        return Err(EchError::UnsupportedSuite { kem: config.kem_id, kdf: suite.kdf_id, aead: suite.aead_id });
    }
    let pk =
        <X25519HkdfSha256 as Kem>::PublicKey::from_bytes(&config.public_key).map_err(|_| EchError::BadPublicKey)?;
    let info = info_for(&config.encode()?);
    let plain = route.padded()?;
    let mut sealed = SealedRoute {
        main: main.to_owned(),
        config_id: config.config_id,
        kdf_id: suite.kdf_id,
        aead_id: suite.aead_id,
        enc: Vec::new(),
        payload: Vec::new(),
    };
    let setup = if suite.aead_id == AEAD_AES_128_GCM { seal_with::<AesGcm128> } else { seal_with::<ChaCha20Poly1305> };
    setup(&pk, &info, &plain, &mut sealed).map_err(|e| EchError::Seal(hpke_err(e)))?;
    Ok(sealed)
}

/// The keys a main relay accepts: the current one, the previous one until its grace ends,
/// and a staged next one (held before homes are told to seal to it, so a home that learns
/// the new config before this relay reloads its keys is never refused).
#[derive(Clone, Debug)]
pub struct EchKeySet {
    current: EchKeyPair,
    previous: Option<(EchKeyPair, SystemTime)>,
    next: Option<EchKeyPair>,
}

impl EchKeySet {
    /// A set with one key.
    pub fn new(current: EchKeyPair) -> Self {
        Self { current, previous: None, next: None }
    }

    /// Holds `next` as the staged key: accepted, but not published.
    pub fn stage(&mut self, next: EchKeyPair) {
        self.next = Some(next);
    }

    /// The staged key, if any.
    pub fn staged(&self) -> Option<&EchKeyPair> {
        self.next.as_ref()
    }

    /// The previous key, while its grace period lasts at `now`.
    pub fn previous(&self, now: SystemTime) -> Option<&EchKeyPair> {
        self.previous.as_ref().filter(|(_, until)| now < *until).map(|(k, _)| k)
    }

    /// Installs `next` as current; the old current stays valid until `now + grace`.
    pub fn rotate(&mut self, next: EchKeyPair, grace: Duration, now: SystemTime) {
        let old = std::mem::replace(&mut self.current, next);
        self.previous = Some((old, now + grace));
    }

    /// The current key.
    pub fn current(&self) -> &EchKeyPair {
        &self.current
    }

    /// The key for `config_id`, if it is current or still in its grace period.
    pub fn find(&self, config_id: u8, now: SystemTime) -> Option<&EchKeyPair> {
        if self.current.config.config_id == config_id {
            return Some(&self.current);
        }
        if let Some(k) = self.next.as_ref().filter(|k| k.config.config_id == config_id) {
            return Some(k);
        }
        match &self.previous {
            Some((k, until)) if k.config.config_id == config_id && now < *until => Some(k),
            _ => None,
        }
    }

    /// Opens a sealed route with the matching key.
    pub fn open(&self, sealed: &SealedRoute, now: SystemTime) -> Result<InnerRoute, EchError> {
        self.open_bound(sealed, now).map(|(route, _)| route)
    }

    /// Opens a sealed route with the matching key, and says which key and sealing it was.
    pub fn open_bound(&self, sealed: &SealedRoute, now: SystemTime) -> Result<(InnerRoute, EchBinding), EchError> {
        let key = self.find(sealed.config_id, now).ok_or(EchError::UnknownConfig(sealed.config_id))?;
        Ok((key.open(sealed)?, key.binding(sealed)))
    }

    /// The ECHConfigList to publish and to send as retry configs (current key only).
    pub fn config_list(&self) -> Result<Vec<u8>, EchError> {
        Ok(EchConfigList { entries: vec![ListEntry::Config(self.current.config.clone())] }.encode()?)
    }

    /// A config id different from every key in the set (for the next rotation).
    pub fn next_config_id(&self) -> u8 {
        let mut id = self.current.config.config_id.wrapping_add(1);
        while self.previous.as_ref().is_some_and(|(k, _)| k.config.config_id == id)
            || self.next.as_ref().is_some_and(|k| k.config.config_id == id)
        {
            id = id.wrapping_add(1);
        }
        id
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::route::tests::inner;

    fn suites() -> [CipherSuite; 2] {
        [
            CipherSuite { kdf_id: KDF_HKDF_SHA256, aead_id: AEAD_AES_128_GCM },
            CipherSuite { kdf_id: KDF_HKDF_SHA256, aead_id: AEAD_CHACHA20_POLY1305 },
        ]
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect()
    }

    /// RFC 9180 Appendix A.1.1 (AES-128-GCM) and A.2.1 (ChaCha20-Poly1305), base mode,
    /// sequence number 0: key derivation, encapsulation and the first ciphertext.
    #[test]
    fn rfc9180_test_vectors() {
        struct V {
            aead: u16,
            ikm_e: &'static str,
            ikm_r: &'static str,
            sk_r: &'static str,
            pk_r: &'static str,
            enc: &'static str,
            ct: &'static str,
        }
        let vectors = [
            V {
                aead: AEAD_AES_128_GCM,
                ikm_e: "7268600d403fce431561aef583ee1613527cff655c1343f29812e66706df3234",
                ikm_r: "6db9df30aa07dd42ee5e8181afdb977e538f5e1fec8a06223f33f7013e525037",
                sk_r: "4612c550263fc8ad58375df3f557aac531d26850903e55a9f23f21d8534e8ac8",
                pk_r: "3948cfe0ad1ddb695d780e59077195da6c56506b027329794ab02bca80815c4d",
                enc: "37fda3567bdbd628e88668c3c8d7e97d1d1253b6d4ea6d44c150f741f1bf4431",
                ct: "f938558b5d72f1a23810b4be2ab4f84331acc02fc97babc53a52ae8218a355a96d8770ac83d07bea87e13c512a",
            },
            V {
                aead: AEAD_CHACHA20_POLY1305,
                ikm_e: "909a9b35d3dc4713a5e72a4da274b55d3d3821a37e5d099e74a647db583a904b",
                ikm_r: "1ac01f181fdf9f352797655161c58b75c656a6cc2716dcb66372da835542e1df",
                sk_r: "8057991eef8f1f1af18f4a9491d16a1ce333f695d4db8e38da75975c4478e0fb",
                pk_r: "4310ee97d88cc1f088a5576c77ab0cf5c3ac797f3d95139c6c84b5429c59662a",
                enc: "1afa08d3dec047a643885163f1180476fa7ddb54c6a8029ea33f95796bf2ac4a",
                ct: "1c5250d8034ec2b784ba2cfd69dbdb8af406cfe3ff938e131f0def8c8b60b4db21993c62ce81883d2dd1b51a28",
            },
        ];
        let info = hex("4f6465206f6e2061204772656369616e2055726e");
        let aad = hex("436f756e742d30");
        let pt = hex("4265617574792069732074727574682c20747275746820626561757479");
        for v in vectors {
            let (sk, pk) = X25519HkdfSha256::derive_keypair(&hex(v.ikm_r));
            // The appendix lists skRm before clamping; hpke stores it clamped (RFC 7748 §5).
            let mut clamped = hex(v.sk_r);
            clamped[0] &= 248;
            clamped[31] = (clamped[31] & 127) | 64;
            assert_eq!(sk.to_bytes().to_vec(), clamped);
            assert_eq!(pk.to_bytes().to_vec(), hex(v.pk_r));
            let (_, pk_e) = X25519HkdfSha256::derive_keypair(&hex(v.ikm_e));
            assert_eq!(pk_e.to_bytes().to_vec(), hex(v.enc), "encapsulated key is the ephemeral public key");
            // relayfed's own key type rebuilds the same public key from the stored secret.
            let ours = EchKeyPair::from_secret(1, "relay.test.example", hex(v.sk_r).try_into().unwrap()).unwrap();
            assert_eq!(ours.config().public_key, hex(v.pk_r));
            let enc = <X25519HkdfSha256 as Kem>::EncappedKey::from_bytes(&hex(v.enc)).unwrap();
            let opened = if v.aead == AEAD_AES_128_GCM {
                open_with::<AesGcm128>(&sk, &enc, &info, &hex(v.ct), &aad)
            } else {
                open_with::<ChaCha20Poly1305>(&sk, &enc, &info, &hex(v.ct), &aad)
            };
            assert_eq!(opened.unwrap(), pt);
        }
    }

    #[test]
    fn seal_then_open_with_both_aeads() {
        let key = EchKeyPair::generate(7, "relay.acme.example").unwrap();
        for suite in suites() {
            let sealed = seal(key.config(), suite, "hub-us", &inner()).unwrap();
            assert_eq!(sealed.config_id, 7);
            assert_eq!(key.open(&sealed).unwrap(), inner());
        }
    }

    #[test]
    fn a_grease_envelope_is_worked_on_like_a_sealing_and_never_opens() {
        use crate::protocol::route::Grease;
        let key = EchKeyPair::generate(7, "relay.acme.example").unwrap();
        for suite in suites() {
            let shape = seal(key.config(), suite, "hub-us", &inner()).unwrap();
            let g = Grease::imitating(&shape, &inner(), 200, |b| b.fill(0x42)).unwrap();
            key.open_grease("hub-us", &g);
            let as_sealed = SealedRoute {
                main: "hub-us".into(),
                config_id: 7,
                kdf_id: g.kdf_id,
                aead_id: g.aead_id,
                enc: g.enc.clone(),
                payload: g.payload.clone(),
            };
            assert!(key.open(&as_sealed).is_err(), "random bytes do not open");
        }
        let odd = Grease { config_id: 1, kdf_id: 9, aead_id: 9, enc: vec![1], payload: vec![2] };
        key.open_grease("hub-us", &odd); // an unsupported suite or a short key: no panic
    }

    #[test]
    fn the_origin_and_the_key_owner_compute_the_same_binding_and_a_substitute_key_does_not() {
        let key = EchKeyPair::generate(7, "relay.acme.example").unwrap();
        let mut set = EchKeySet::new(key.clone());
        let sealed = seal(key.config(), suites()[0], "hub-us", &inner()).unwrap();
        let origin = binding(key.config(), &sealed).unwrap();
        let (route, owner) = set.open_bound(&sealed, SystemTime::now()).unwrap();
        assert_eq!((route, &owner), (inner(), &origin));
        assert_eq!(owner.enc, sealed.enc);
        // A relay's own key published under the same config id: another digest.
        let forged = EchKeyPair::generate(7, "relay.acme.example").unwrap();
        let forged_sealed = seal(forged.config(), suites()[0], "hub-us", &inner()).unwrap();
        assert_ne!(binding(forged.config(), &forged_sealed).unwrap().config_digest, origin.config_digest);
        // Re-sealing the same route to the real key: another encapsulation.
        let resealed = seal(key.config(), suites()[0], "hub-us", &inner()).unwrap();
        set.rotate(EchKeyPair::generate(8, "relay.acme.example").unwrap(), Duration::from_secs(60), SystemTime::now());
        let (_, again) = set.open_bound(&resealed, SystemTime::now()).unwrap();
        assert_eq!(again.config_digest, origin.config_digest, "the previous key still opens in its grace period");
        assert_ne!(again.enc, origin.enc);
    }

    #[test]
    fn any_tampering_fails_to_open() {
        let key = EchKeyPair::generate(1, "relay.acme.example").unwrap();
        let sealed = seal(key.config(), suites()[0], "hub-us", &inner()).unwrap();
        let mut t = sealed.clone();
        t.payload[3] ^= 1;
        assert!(matches!(key.open(&t), Err(EchError::Open(_))));
        let mut t = sealed.clone();
        t.main = "hub-eu".into(); // outer field bound by the AAD
        assert!(matches!(key.open(&t), Err(EchError::Open(_))));
        let mut t = sealed.clone();
        t.enc[0] ^= 1;
        assert!(key.open(&t).is_err());
        let other = EchKeyPair::generate(1, "relay.acme.example").unwrap();
        assert!(other.open(&sealed).is_err(), "another key with the same id must not open it");
    }

    #[test]
    fn rotation_keeps_the_old_key_for_the_grace_period() {
        let t0 = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let old = EchKeyPair::generate(1, "relay.acme.example").unwrap();
        let sealed_old = seal(old.config(), suites()[1], "hub-us", &inner()).unwrap();
        let mut set = EchKeySet::new(old);
        let next = EchKeyPair::generate(set.next_config_id(), "relay.acme.example").unwrap();
        set.rotate(next, Duration::from_secs(3600), t0);
        assert_eq!(set.open(&sealed_old, t0 + Duration::from_secs(3599)).unwrap(), inner());
        assert!(matches!(set.open(&sealed_old, t0 + Duration::from_secs(3600)), Err(EchError::UnknownConfig(1))));
        let list = EchConfigList::decode(&set.config_list().unwrap()).unwrap();
        assert_eq!(list.configs().map(|c| c.config_id).collect::<Vec<_>>(), [2]);
    }

    #[test]
    fn a_staged_key_opens_routes_but_is_not_published() {
        let now = SystemTime::now();
        let mut set = EchKeySet::new(EchKeyPair::generate(1, "relay.acme.example").unwrap());
        let staged = EchKeyPair::generate(set.next_config_id(), "relay.acme.example").unwrap();
        let sealed = seal(staged.config(), suites()[0], "hub-us", &inner()).unwrap();
        assert!(matches!(set.open(&sealed, now), Err(EchError::UnknownConfig(2))));
        set.stage(staged);
        assert_eq!(set.open(&sealed, now).unwrap(), inner(), "a home that already seals to the staged key is served");
        let list = EchConfigList::decode(&set.config_list().unwrap()).unwrap();
        assert_eq!(list.configs().map(|c| c.config_id).collect::<Vec<_>>(), [1], "only the current key is published");
        assert_eq!(set.next_config_id(), 3, "a new id avoids the staged key's");
    }
}
