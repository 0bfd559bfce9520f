//! ECHConfig / ECHConfigList in the wire format of the TLS Encrypted Client Hello
//! specification (draft-ietf-tls-esni, version `0xfe0d`), so standard tooling reads our keys.
//!
//! ```text
//! ECHConfigList = opaque<4..2^16-1> of ECHConfig
//! ECHConfig     = version(u16) length(u16) contents[length]
//! contents      = config_id(u8) kem_id(u16) public_key<1..2^16-1>
//!                 cipher_suites<4..2^16-4> of {kdf_id(u16) aead_id(u16)}
//!                 maximum_name_length(u8) public_name<1..255>
//!                 extensions<0..2^16-1> of {type(u16) data<0..2^16-1>}
//! ```
//!
//! Configs of an unknown version, or with an unsupported mandatory extension (type with the
//! high bit set), are skipped as the specification requires; the reason is kept.

use serde::Serialize;

use super::wire::{DecodeError, Reader, Writer};

/// The ECHConfig version this implementation understands.
pub const ECH_VERSION: u16 = 0xfe0d;
/// HPKE KEM id of DHKEM(X25519, HKDF-SHA256).
pub const KEM_X25519_SHA256: u16 = 0x0020;
/// HPKE KDF id of HKDF-SHA256.
pub const KDF_HKDF_SHA256: u16 = 0x0001;
/// HPKE AEAD id of AES-128-GCM.
pub const AEAD_AES_128_GCM: u16 = 0x0001;
/// HPKE AEAD id of ChaCha20-Poly1305.
pub const AEAD_CHACHA20_POLY1305: u16 = 0x0003;

/// An HPKE symmetric cipher suite.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize)]
pub struct CipherSuite {
    /// HPKE KDF id.
    pub kdf_id: u16,
    /// HPKE AEAD id.
    pub aead_id: u16,
}

impl CipherSuite {
    /// Whether relayfed can use this suite (HKDF-SHA256 with AES-128-GCM or ChaCha20-Poly1305).
    pub fn supported(self) -> bool {
        self.kdf_id == KDF_HKDF_SHA256 && matches!(self.aead_id, AEAD_AES_128_GCM | AEAD_CHACHA20_POLY1305)
    }
}

/// An ECHConfig extension.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct Extension {
    /// Extension type; the high bit marks it mandatory.
    pub ext_type: u16,
    /// Extension payload.
    #[serde(with = "hex_bytes")]
    pub data: Vec<u8>,
}

/// One parsed ECHConfig of version `0xfe0d`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct EchConfig {
    /// Identifies the key at the relay that owns it.
    pub config_id: u8,
    /// HPKE KEM id.
    pub kem_id: u16,
    /// Encoded HPKE public key.
    #[serde(with = "hex_bytes")]
    pub public_key: Vec<u8>,
    /// Offered symmetric suites, in preference order.
    pub cipher_suites: Vec<CipherSuite>,
    /// Padding hint for names.
    pub maximum_name_length: u8,
    /// The non-secret outer name.
    pub public_name: String,
    /// Extensions, in order.
    pub extensions: Vec<Extension>,
}

/// A config that was skipped while decoding a list, and why.
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
pub struct SkippedConfig {
    /// Position in the list.
    pub index: usize,
    /// Its version field.
    pub version: u16,
    /// Why it was skipped.
    pub reason: String,
    /// The whole ECHConfig as received (kept so re-encoding loses nothing).
    #[serde(skip)]
    pub raw: Vec<u8>,
}

/// An entry of a list: usable, or skipped with its bytes kept.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ListEntry {
    /// A config we can use.
    Config(EchConfig),
    /// A config we skip.
    Skipped(SkippedConfig),
}

/// A decoded ECHConfigList.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EchConfigList {
    /// Entries in wire order.
    pub entries: Vec<ListEntry>,
}

impl EchConfig {
    /// Encodes this config as an `ECHConfig` (version, length, contents). Lengths beyond the
    /// wire bounds are rejected here, so a config that encodes also decodes.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        if self.public_key.is_empty() || self.public_key.len() > 0xffff {
            return Err(DecodeError::invalid("public_key", "must be 1..65535 bytes"));
        }
        if self.cipher_suites.is_empty() || self.cipher_suites.len() * 4 > 0xfffc {
            return Err(DecodeError::invalid("cipher_suites", "must hold 1..16383 suites"));
        }
        if self.public_name.is_empty() || self.public_name.len() > 255 {
            return Err(DecodeError::invalid("public_name", "must be 1..255 bytes"));
        }
        let mut exts = Writer::new();
        for e in &self.extensions {
            if e.data.len() > 0xffff {
                return Err(DecodeError::invalid("extension", "data longer than 65535 bytes"));
            }
            exts.u16(e.ext_type).vec16(&e.data);
        }
        let exts = exts.into_bytes();
        let mut suites = Writer::new();
        for s in &self.cipher_suites {
            suites.u16(s.kdf_id).u16(s.aead_id);
        }
        let mut contents = Writer::new();
        contents
            .u8(self.config_id)
            .u16(self.kem_id)
            .vec16(&self.public_key)
            .vec16(&suites.into_bytes())
            .u8(self.maximum_name_length)
            .vec8(self.public_name.as_bytes())
            .vec16(&exts);
        let contents = contents.into_bytes();
        let len = u16::try_from(contents.len()).map_err(|_| DecodeError::invalid("ECHConfig", "longer than 65535"))?;
        let mut out = Writer::new();
        out.u16(ECH_VERSION).u16(len).bytes(&contents);
        Ok(out.into_bytes())
    }

    /// Decodes the contents of a version-`0xfe0d` config.
    fn decode_contents(contents: &[u8]) -> Result<Self, DecodeError> {
        let mut r = Reader::new(contents);
        let config_id = r.u8("config_id")?;
        let kem_id = r.u16("kem_id")?;
        let public_key = r.vec16("public_key", 1, 0xffff)?.to_vec();
        let suites_raw = r.vec16("cipher_suites", 4, 0xfffc)?;
        if suites_raw.len() % 4 != 0 {
            return Err(DecodeError::invalid("cipher_suites", "length is not a multiple of 4"));
        }
        let mut sr = Reader::new(suites_raw);
        let mut cipher_suites = Vec::with_capacity(suites_raw.len() / 4);
        while sr.remaining() > 0 {
            cipher_suites.push(CipherSuite { kdf_id: sr.u16("kdf_id")?, aead_id: sr.u16("aead_id")? });
        }
        let maximum_name_length = r.u8("maximum_name_length")?;
        let name = r.vec8("public_name", 1, 255)?;
        let public_name =
            std::str::from_utf8(name).map_err(|_| DecodeError::invalid("public_name", "not ASCII/UTF-8"))?.to_owned();
        let ext_raw = r.vec16("extensions", 0, 0xffff)?;
        let mut er = Reader::new(ext_raw);
        let mut extensions = Vec::new();
        while er.remaining() > 0 {
            let ext_type = er.u16("extension type")?;
            let data = er.vec16("extension data", 0, 0xffff)?.to_vec();
            extensions.push(Extension { ext_type, data });
        }
        r.finish("ECHConfig contents")?;
        Ok(Self { config_id, kem_id, public_key, cipher_suites, maximum_name_length, public_name, extensions })
    }

    /// Why relayfed cannot use this config, if it cannot (unsupported KEM, suites, or a
    /// mandatory extension; an invalid public name).
    pub fn unusable_reason(&self) -> Option<String> {
        if let Some(e) = self.extensions.iter().find(|e| e.ext_type & 0x8000 != 0) {
            return Some(format!("unsupported mandatory extension 0x{:04x}", e.ext_type));
        }
        if !valid_public_name(&self.public_name) {
            return Some(format!("public_name {:?} is not a valid DNS name", self.public_name));
        }
        None
    }

    /// The first suite relayfed supports, if the KEM is supported too.
    pub fn usable_suite(&self) -> Option<CipherSuite> {
        if self.kem_id != KEM_X25519_SHA256 || self.public_key.len() != 32 {
            return None;
        }
        self.cipher_suites.iter().copied().find(|s| s.supported())
    }
}

/// A public name must be a DNS name (letters, digits, hyphens, dots), not an IPv4 address.
fn valid_public_name(name: &str) -> bool {
    let labels_ok = name
        .split('.')
        .all(|l| !l.is_empty() && l.len() <= 63 && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-'));
    let ipv4 = name.split('.').count() == 4 && name.split('.').all(|l| l.bytes().all(|b| b.is_ascii_digit()));
    labels_ok && !ipv4
}

impl EchConfigList {
    /// Decodes an `ECHConfigList`. Unknown versions and configs with unsupported mandatory
    /// extensions are skipped (kept as [`ListEntry::Skipped`]); structural errors fail.
    pub fn decode(bytes: &[u8]) -> Result<Self, DecodeError> {
        let mut outer = Reader::new(bytes);
        let body = outer.vec16("ECHConfigList", 4, 0xffff)?;
        outer.finish("ECHConfigList")?;
        let mut r = Reader::new(body);
        let mut entries = Vec::new();
        while r.remaining() > 0 {
            let start = r.rest();
            let version = r.u16("ECHConfig.version")?;
            let contents = r.vec16("ECHConfig.contents", 0, 0xffff)?;
            let raw = start[..4 + contents.len()].to_vec();
            let index = entries.len();
            if version != ECH_VERSION {
                entries.push(ListEntry::Skipped(SkippedConfig {
                    index,
                    version,
                    reason: format!("unknown version 0x{version:04x}"),
                    raw,
                }));
                continue;
            }
            let config = EchConfig::decode_contents(contents)?;
            match config.unusable_reason() {
                Some(reason) => entries.push(ListEntry::Skipped(SkippedConfig { index, version, reason, raw })),
                None => entries.push(ListEntry::Config(config)),
            }
        }
        Ok(Self { entries })
    }

    /// Encodes the list; skipped entries are written back exactly as received.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        let mut body = Vec::new();
        for e in &self.entries {
            match e {
                ListEntry::Config(c) => body.extend_from_slice(&c.encode()?),
                ListEntry::Skipped(s) => body.extend_from_slice(&s.raw),
            }
        }
        if body.len() < 4 || body.len() > 0xffff {
            return Err(DecodeError::invalid("ECHConfigList", "must hold 4..65535 bytes of configs"));
        }
        let mut w = Writer::new();
        w.vec16(&body);
        Ok(w.into_bytes())
    }

    /// Usable configs, in list order.
    pub fn configs(&self) -> impl Iterator<Item = &EchConfig> {
        self.entries.iter().filter_map(|e| match e {
            ListEntry::Config(c) => Some(c),
            ListEntry::Skipped(_) => None,
        })
    }

    /// Skipped configs, in list order.
    pub fn skipped(&self) -> impl Iterator<Item = &SkippedConfig> {
        self.entries.iter().filter_map(|e| match e {
            ListEntry::Skipped(s) => Some(s),
            ListEntry::Config(_) => None,
        })
    }

    /// The first config relayfed can seal to, with the suite to use.
    pub fn first_usable(&self) -> Option<(&EchConfig, CipherSuite)> {
        self.configs().find_map(|c| c.usable_suite().map(|s| (c, s)))
    }
}

mod hex_bytes {
    use serde::Serializer;

    pub fn serialize<S: Serializer>(v: &[u8], s: S) -> Result<S::Ok, S::Error> {
        let hex: String = v.iter().map(|b| format!("{b:02x}")).collect();
        s.serialize_str(&hex)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn sample(config_id: u8) -> EchConfig {
        EchConfig {
            config_id,
            kem_id: KEM_X25519_SHA256,
            public_key: vec![7; 32],
            cipher_suites: vec![
                CipherSuite { kdf_id: KDF_HKDF_SHA256, aead_id: AEAD_AES_128_GCM },
                CipherSuite { kdf_id: KDF_HKDF_SHA256, aead_id: AEAD_CHACHA20_POLY1305 },
            ],
            maximum_name_length: 0,
            public_name: "relay.acme.example".into(),
            extensions: vec![],
        }
    }

    #[test]
    fn list_round_trips_and_skips_unknown_versions() {
        let mut body = sample(1).encode().unwrap();
        body.extend_from_slice(&[0xfe, 0x0e, 0x00, 0x02, 0xaa, 0xbb]); // a future version
        body.extend_from_slice(&sample(2).encode().unwrap());
        let mut w = Writer::new();
        w.vec16(&body);
        let bytes = w.into_bytes();
        let list = EchConfigList::decode(&bytes).unwrap();
        assert_eq!(list.configs().map(|c| c.config_id).collect::<Vec<_>>(), [1, 2]);
        let skipped: Vec<_> = list.skipped().collect();
        assert_eq!(skipped.len(), 1);
        assert_eq!(skipped[0].reason, "unknown version 0xfe0e");
        assert_eq!(list.encode().unwrap(), bytes, "re-encoding loses nothing");
    }

    /// The ECHConfigList Cloudflare publishes in the HTTPS DNS record of crypto.cloudflare.com
    /// (public name cloudflare-ech.com; a snapshot of a rotating key), decoded by an
    /// independent deployment's encoder.
    #[test]
    fn a_public_deployment_list_decodes() {
        use base64::Engine;
        let b64 = "AEX+DQBBNAAgACBEVvV6qv+2EGSHksMVtzMtBb0W4uDonEFEC5F+QK8lNAAEAAEAAQASY2xvdWRmbGFyZS1lY2guY29tAAA=";
        let bytes = base64::engine::general_purpose::STANDARD.decode(b64).unwrap();
        let list = EchConfigList::decode(&bytes).unwrap();
        let configs: Vec<_> = list.configs().collect();
        assert_eq!(configs.len(), 1);
        let c = configs[0];
        assert_eq!(c.config_id, 0x34);
        assert_eq!(c.kem_id, KEM_X25519_SHA256);
        assert_eq!(c.public_key.len(), 32);
        assert_eq!(c.cipher_suites, [CipherSuite { kdf_id: KDF_HKDF_SHA256, aead_id: AEAD_AES_128_GCM }]);
        assert_eq!(c.maximum_name_length, 0);
        assert_eq!(c.public_name, "cloudflare-ech.com");
        assert!(c.extensions.is_empty());
        assert!(c.usable_suite().is_some(), "relayfed could seal to it");
        assert_eq!(list.encode().unwrap(), bytes);
    }

    #[test]
    fn mandatory_unknown_extension_is_skipped() {
        let mut c = sample(3);
        c.extensions.push(Extension { ext_type: 0xfa00, data: vec![1] });
        let mut w = Writer::new();
        w.vec16(&c.encode().unwrap());
        let list = EchConfigList::decode(&w.into_bytes()).unwrap();
        assert_eq!(list.configs().count(), 0);
        assert!(list.skipped().next().unwrap().reason.contains("mandatory extension 0xfa00"));
    }

    #[test]
    fn malformed_lists_name_the_field() {
        assert!(matches!(
            EchConfigList::decode(&[0, 2, 0xfe, 0x0d]),
            Err(DecodeError::TooShort { field: "ECHConfigList", .. })
        ));
        let mut bytes = {
            let mut w = Writer::new();
            w.vec16(&sample(1).encode().unwrap());
            w.into_bytes()
        };
        bytes.truncate(bytes.len() - 3);
        assert!(EchConfigList::decode(&bytes).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            let _ = EchConfigList::decode(&bytes);
        }

        #[test]
        fn decoded_lists_reencode_identically(bytes in prop::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(list) = EchConfigList::decode(&bytes) {
                prop_assert_eq!(list.encode().unwrap(), bytes);
            }
        }

        #[test]
        fn configs_round_trip(id in any::<u8>(), key in prop::collection::vec(any::<u8>(), 1..64), name in "[a-z]{1,20}(\\.[a-z]{1,10}){0,3}", max in any::<u8>()) {
            let mut c = sample(id);
            c.public_key = key;
            c.public_name = name;
            c.maximum_name_length = max;
            let mut w = Writer::new();
            w.vec16(&c.encode().unwrap());
            let list = EchConfigList::decode(&w.into_bytes()).unwrap();
            prop_assert_eq!(list.configs().next(), Some(&c));
        }
    }
}
