//! End-to-end sessions: `Noise_XK_25519_ChaChaPoly_BLAKE2s` between the origin sidecar
//! (initiator) and the destination sidecar (responder), as plain state machines (bytes in,
//! bytes out).
//!
//! XK: the initiator knows the responder's static key in advance (from configuration or the
//! registry); the initiator's static key is sent encrypted in message 3. The prologue binds
//! the route and the ECH sealing (config id, digest of the ECH config, encapsulated key), so a
//! relay that strips or alters ECH, substitutes a key of its own, re-seals the route or
//! re-routes the stream makes the handshake fail. Transport messages carry at most 65,519 bytes of
//! plaintext; both sides rekey each direction every [`REKEY_INTERVAL`] messages, at the same
//! message, without signalling. Nonces are implicit, so replayed, dropped or reordered
//! messages fail to decrypt.

use std::sync::{Arc, Mutex};

use snow::{Builder, HandshakeState, TransportState};
use thiserror::Error;

use crate::protocol::route::{EchBinding, InnerRoute};
use crate::protocol::{DecodeError, ErrorCode};

/// The Noise protocol name.
pub const NOISE_PARAMS: &str = "Noise_XK_25519_ChaChaPoly_BLAKE2s";
/// Largest Noise message.
pub const MAX_MESSAGE: usize = 65_535;
/// Largest plaintext in one transport message (message minus the 16-byte tag).
pub const MAX_PLAINTEXT: usize = MAX_MESSAGE - 16;
/// Messages per direction between rekeys.
pub const REKEY_INTERVAL: u64 = 1 << 16;
/// Label that starts the prologue.
pub const PROLOGUE_LABEL: &[u8] = b"relayfed noise v2\0";

/// Why a Noise step failed.
#[derive(Debug, Error)]
pub enum NoiseError {
    /// The handshake failed (wrong key, altered prologue, tampered message).
    #[error("noise handshake failed: {0}")]
    Handshake(String),
    /// A transport message did not decrypt (tampered, replayed, reordered).
    #[error("noise message rejected: {0}")]
    Decrypt(String),
    /// Plaintext too long for one message.
    #[error("plaintext of {0} bytes exceeds {MAX_PLAINTEXT}")]
    TooLong(usize),
    /// The route could not be encoded into the prologue.
    #[error(transparent)]
    Route(#[from] DecodeError),
    /// Key material was malformed.
    #[error("invalid key: {0}")]
    Key(String),
}

impl NoiseError {
    /// The wire error code for this failure.
    pub fn code(&self) -> ErrorCode {
        match self {
            Self::Route(_) => ErrorCode::MalformedFrame,
            _ => ErrorCode::HandshakeFailed,
        }
    }
}

fn params() -> Result<snow::params::NoiseParams, NoiseError> {
    NOISE_PARAMS.parse().map_err(|e: snow::Error| NoiseError::Key(e.to_string()))
}

/// A Curve25519 static key pair.
#[derive(Clone)]
pub struct StaticKeypair {
    /// Private key (never logged).
    pub private: [u8; 32],
    /// Public key, published through configuration or the registry.
    pub public: [u8; 32],
}

impl std::fmt::Debug for StaticKeypair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StaticKeypair").field("public", &self.public).finish_non_exhaustive()
    }
}

impl StaticKeypair {
    /// Generates a new key pair.
    pub fn generate() -> Result<Self, NoiseError> {
        let kp = Builder::new(params()?).generate_keypair().map_err(|e| NoiseError::Key(e.to_string()))?;
        Self::from_parts(&kp.private, &kp.public)
    }

    /// Rebuilds a key pair from its private key.
    pub fn from_private(private: &[u8]) -> Result<Self, NoiseError> {
        let private: [u8; 32] =
            private.try_into().map_err(|_| NoiseError::Key("private key must be 32 bytes".into()))?;
        // The public key is X25519(private, basepoint); derive it through the HPKE KEM, which
        // uses the same curve and clamping.
        use hpke::{Deserializable, Kem, Serializable};
        let sk = <hpke::kem::X25519HkdfSha256 as Kem>::PrivateKey::from_bytes(&private)
            .map_err(|e| NoiseError::Key(e.to_string()))?;
        let pk = hpke::kem::X25519HkdfSha256::sk_to_pk(&sk);
        Self::from_parts(&private, &pk.to_bytes())
    }

    fn from_parts(private: &[u8], public: &[u8]) -> Result<Self, NoiseError> {
        Ok(Self {
            private: private.try_into().map_err(|_| NoiseError::Key("private key must be 32 bytes".into()))?,
            public: public.try_into().map_err(|_| NoiseError::Key("public key must be 32 bytes".into()))?,
        })
    }
}

/// The prologue both ends must agree on: label, ECH decision and sealing, inner route
/// (docs/protocol.md §6).
pub fn prologue(ech: Option<&EchBinding>, route: &InnerRoute) -> Result<Vec<u8>, NoiseError> {
    let mut p = PROLOGUE_LABEL.to_vec();
    match ech {
        Some(binding) => {
            p.push(1);
            p.extend_from_slice(&binding.encode()?);
        }
        None => p.push(0),
    }
    p.extend_from_slice(&route.encode()?);
    Ok(p)
}

/// The initiator before message 2 arrives.
pub struct Initiator {
    hs: HandshakeState,
}

impl Initiator {
    /// Starts a handshake to `remote_static`; returns the state and message 1.
    pub fn start(
        local: &StaticKeypair,
        remote_static: &[u8; 32],
        prologue: &[u8],
    ) -> Result<(Self, Vec<u8>), NoiseError> {
        let hs_err = |e: snow::Error| NoiseError::Handshake(e.to_string());
        let mut hs = Builder::new(params()?)
            .local_private_key(&local.private)
            .map_err(hs_err)?
            .remote_public_key(remote_static)
            .map_err(hs_err)?
            .prologue(prologue)
            .map_err(hs_err)?
            .build_initiator()
            .map_err(hs_err)?;
        let mut buf = vec![0u8; 128];
        let n = hs.write_message(&[], &mut buf).map_err(hs_err)?;
        buf.truncate(n);
        Ok((Self { hs }, buf))
    }

    /// Reads message 2, writes message 3 carrying `payload3` (the origin's certificate chain,
    /// encrypted and bound to its static key on the wire), and enters transport mode; also
    /// returns message 2's payload (the responder's certificate).
    pub fn finish(mut self, msg2: &[u8], payload3: &[u8]) -> Result<(Session, Vec<u8>, Vec<u8>), NoiseError> {
        let hs_err = |e: snow::Error| NoiseError::Handshake(e.to_string());
        // A payload is never longer than its message: sized to it, the buffer kept with the
        // certificate for the stream's life is not 64 KiB.
        let mut payload = vec![0u8; msg2.len()];
        let len = self.hs.read_message(msg2, &mut payload).map_err(hs_err)?;
        payload.truncate(len);
        if payload3.len() > MAX_MESSAGE - 96 {
            return Err(NoiseError::TooLong(payload3.len()));
        }
        let mut msg3 = vec![0u8; 96 + payload3.len()];
        let n = self.hs.write_message(payload3, &mut msg3).map_err(hs_err)?;
        msg3.truncate(n);
        Ok((Session::new(self.hs.into_transport_mode().map_err(hs_err)?), msg3, payload))
    }
}

/// The responder after message 1, waiting for message 3.
pub struct Responder {
    hs: HandshakeState,
}

impl Responder {
    /// Reads message 1; returns the state and message 2, which carries `payload` (encrypted:
    /// the destination sends its certificate there, docs/protocol.md §6).
    pub fn accept(
        local: &StaticKeypair,
        prologue: &[u8],
        msg1: &[u8],
        payload: &[u8],
    ) -> Result<(Self, Vec<u8>), NoiseError> {
        let hs_err = |e: snow::Error| NoiseError::Handshake(e.to_string());
        let mut hs = Builder::new(params()?)
            .local_private_key(&local.private)
            .map_err(hs_err)?
            .prologue(prologue)
            .map_err(hs_err)?
            .build_responder()
            .map_err(hs_err)?;
        let mut scratch = vec![0u8; msg1.len()];
        hs.read_message(msg1, &mut scratch).map_err(hs_err)?;
        if payload.len() > MAX_MESSAGE - 64 {
            return Err(NoiseError::TooLong(payload.len()));
        }
        let mut msg2 = vec![0u8; 64 + payload.len()];
        let n = hs.write_message(payload, &mut msg2).map_err(hs_err)?;
        msg2.truncate(n);
        Ok((Self { hs }, msg2))
    }

    /// Reads message 3; returns the session, the initiator's static public key and message
    /// 3's payload (the origin's certificate chain; empty from an origin that sends none).
    pub fn finish(mut self, msg3: &[u8]) -> Result<(Session, [u8; 32], Vec<u8>), NoiseError> {
        let hs_err = |e: snow::Error| NoiseError::Handshake(e.to_string());
        let mut payload = vec![0u8; msg3.len()];
        let len = self.hs.read_message(msg3, &mut payload).map_err(hs_err)?;
        payload.truncate(len);
        let remote: [u8; 32] = self
            .hs
            .get_remote_static()
            .and_then(|k| k.try_into().ok())
            .ok_or_else(|| NoiseError::Handshake("initiator sent no static key".into()))?;
        Ok((Session::new(self.hs.into_transport_mode().map_err(hs_err)?), remote, payload))
    }
}

/// An established session, split into independent send and receive halves.
pub struct Session {
    state: Arc<Mutex<TransportState>>,
}

impl Session {
    fn new(ts: TransportState) -> Self {
        Self { state: Arc::new(Mutex::new(ts)) }
    }

    /// Splits into halves that can be driven from two tasks.
    pub fn split(self) -> (SendHalf, RecvHalf) {
        (SendHalf { state: self.state.clone(), sent: 0 }, RecvHalf { state: self.state, received: 0 })
    }
}

/// Encrypts outgoing messages.
pub struct SendHalf {
    state: Arc<Mutex<TransportState>>,
    sent: u64,
}

impl SendHalf {
    /// Encrypts one message (at most [`MAX_PLAINTEXT`] bytes).
    pub fn encrypt(&mut self, plain: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let mut out = vec![0u8; plain.len() + 16];
        let n = self.encrypt_into(plain, &mut out)?;
        out.truncate(n);
        Ok(out)
    }

    /// Encrypts one message (at most [`MAX_PLAINTEXT`] bytes) into `out` (at least 16 bytes
    /// longer than `plain`), where a caller building a frame wants it; returns its length.
    pub fn encrypt_into(&mut self, plain: &[u8], out: &mut [u8]) -> Result<usize, NoiseError> {
        if plain.len() > MAX_PLAINTEXT {
            return Err(NoiseError::TooLong(plain.len()));
        }
        let mut ts = self.state.lock().map_err(|_| NoiseError::Decrypt("session lock poisoned".into()))?;
        let n = ts.write_message(plain, out).map_err(|e| NoiseError::Decrypt(e.to_string()))?;
        self.sent += 1;
        if self.sent.is_multiple_of(REKEY_INTERVAL) {
            ts.rekey_outgoing();
        }
        Ok(n)
    }
}

/// Decrypts incoming messages.
pub struct RecvHalf {
    state: Arc<Mutex<TransportState>>,
    received: u64,
}

impl RecvHalf {
    /// Decrypts one message; tampered, replayed or out-of-order messages fail.
    pub fn decrypt(&mut self, msg: &[u8]) -> Result<Vec<u8>, NoiseError> {
        let mut out = vec![0u8; msg.len()];
        let mut ts = self.state.lock().map_err(|_| NoiseError::Decrypt("session lock poisoned".into()))?;
        let n = ts.read_message(msg, &mut out).map_err(|e| NoiseError::Decrypt(e.to_string()))?;
        out.truncate(n);
        self.received += 1;
        if self.received.is_multiple_of(REKEY_INTERVAL) {
            ts.rekey_incoming();
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::route::tests::inner;

    type Halves = (SendHalf, RecvHalf);

    /// Runs a full handshake in memory (the deterministic pair harness).
    fn pair(init_prologue: &[u8], resp_prologue: &[u8]) -> Result<(Halves, Halves, [u8; 32]), NoiseError> {
        let a = StaticKeypair::generate()?;
        let b = StaticKeypair::generate()?;
        let (init, m1) = Initiator::start(&a, &b.public, init_prologue)?;
        let (resp, m2) = Responder::accept(&b, resp_prologue, &m1, &[])?;
        let (sa, m3, payload) = init.finish(&m2, &[])?;
        assert!(payload.is_empty());
        assert_eq!((m1.len(), m2.len(), m3.len()), (48, 48, 64), "sizes documented in docs/protocol.md §6");
        let (sb, remote, payload3) = resp.finish(&m3)?;
        assert_eq!(remote, a.public);
        assert!(payload3.is_empty());
        Ok((sa.split(), sb.split(), a.public))
    }

    fn bound(config_id: u8, digest: u8, enc: u8) -> EchBinding {
        EchBinding { config_id, config_digest: [digest; 32], enc: vec![enc; 32] }
    }

    #[test]
    fn handshake_and_transport() {
        let p = prologue(Some(&bound(3, 1, 2)), &inner()).unwrap();
        let ((mut a_tx, mut a_rx), (mut b_tx, mut b_rx), _) = pair(&p, &p).unwrap();
        let m = a_tx.encrypt(b"hello").unwrap();
        assert_eq!(b_rx.decrypt(&m).unwrap(), b"hello");
        let m = b_tx.encrypt(&vec![9u8; MAX_PLAINTEXT]).unwrap();
        assert_eq!(m.len(), MAX_MESSAGE);
        assert_eq!(a_rx.decrypt(&m).unwrap().len(), MAX_PLAINTEXT);
        assert!(matches!(a_tx.encrypt(&vec![0; MAX_PLAINTEXT + 1]), Err(NoiseError::TooLong(_))));
    }

    #[test]
    fn a_stripped_ech_decision_fails_the_handshake() {
        let sealed = prologue(Some(&bound(3, 1, 2)), &inner()).unwrap();
        let plain = prologue(None, &inner()).unwrap();
        assert!(pair(&sealed, &plain).is_err());
        let mut rerouted = inner();
        rerouted.service = "other".into();
        assert!(pair(&sealed, &prologue(Some(&bound(3, 1, 2)), &rerouted).unwrap()).is_err());
        let rotated = prologue(Some(&bound(4, 1, 2)), &inner()).unwrap();
        assert!(pair(&sealed, &rotated).is_err());
        let substituted_key = prologue(Some(&bound(3, 9, 2)), &inner()).unwrap();
        assert!(pair(&sealed, &substituted_key).is_err(), "another ECH key under the same config id");
        let resealed = prologue(Some(&bound(3, 1, 9)), &inner()).unwrap();
        assert!(pair(&sealed, &resealed).is_err(), "the route re-sealed with another encapsulation");
    }

    #[test]
    fn message_2_carries_the_responders_payload_encrypted() {
        let p = prologue(None, &inner()).unwrap();
        let a = StaticKeypair::generate().unwrap();
        let b = StaticKeypair::generate().unwrap();
        let (init, m1) = Initiator::start(&a, &b.public, &p).unwrap();
        let cert = b"-- a certificate, 600 bytes or so --".repeat(16);
        let (resp, m2) = Responder::accept(&b, &p, &m1, &cert).unwrap();
        assert_eq!(m2.len(), 48 + cert.len());
        assert!(!m2.windows(16).any(|w| w == &cert[..16]), "the payload is not in clear");
        let origin_cert = b"-- the origin's chain --".repeat(30);
        let (_, m3, payload) = init.finish(&m2, &origin_cert).unwrap();
        assert_eq!(payload, cert);
        // Message 3 carries the origin's certificate the same way, after its static key.
        assert_eq!(m3.len(), 64 + origin_cert.len());
        assert!(!m3.windows(16).any(|w| w == &origin_cert[..16]), "the payload is not in clear");
        let (_, remote, payload3) = resp.finish(&m3).unwrap();
        assert_eq!((remote, payload3), (a.public, origin_cert));
    }

    #[test]
    fn wrong_responder_key_fails() {
        let p = prologue(None, &inner()).unwrap();
        let a = StaticKeypair::generate().unwrap();
        let b = StaticKeypair::generate().unwrap();
        let impostor = StaticKeypair::generate().unwrap();
        let (_init, m1) = Initiator::start(&a, &b.public, &p).unwrap();
        assert!(Responder::accept(&impostor, &p, &m1, &[]).is_err());
    }

    #[test]
    fn replayed_reordered_and_tampered_messages_are_rejected() {
        let p = prologue(None, &inner()).unwrap();
        let ((mut a_tx, _), (_, mut b_rx), _) = pair(&p, &p).unwrap();
        let m1 = a_tx.encrypt(b"one").unwrap();
        let m2 = a_tx.encrypt(b"two").unwrap();
        assert!(b_rx.decrypt(&m2).is_err(), "reordered");
        let ((mut a_tx, _), (_, mut b_rx), _) = pair(&p, &p).unwrap();
        let m1b = a_tx.encrypt(b"one").unwrap();
        assert_eq!(b_rx.decrypt(&m1b).unwrap(), b"one");
        assert!(b_rx.decrypt(&m1b).is_err(), "replayed");
        let mut t = a_tx.encrypt(b"three").unwrap();
        t[0] ^= 1;
        assert!(b_rx.decrypt(&t).is_err(), "tampered");
        drop(m1);
    }

    #[test]
    fn both_sides_rekey_at_the_same_message() {
        let p = prologue(None, &inner()).unwrap();
        let ((mut a_tx, _), (_, mut b_rx), _) = pair(&p, &p).unwrap();
        for i in 0..(REKEY_INTERVAL + 3) {
            let m = a_tx.encrypt(&i.to_be_bytes()).unwrap();
            assert_eq!(b_rx.decrypt(&m).unwrap(), i.to_be_bytes());
        }
    }

    #[test]
    fn private_key_rebuilds_public() {
        let k = StaticKeypair::generate().unwrap();
        assert_eq!(StaticKeypair::from_private(&k.private).unwrap().public, k.public);
    }
}
