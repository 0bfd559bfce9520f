//! Punch probes: the UDP datagrams two homes send each other from their QUIC sockets to open
//! their NATs' mappings for a direct path (docs/protocol.md §12.2).
//!
//! A probe is 24 bytes: the magic `00 72 66 70 75 6e 63 68` ("\0rfpunch") and the attempt's
//! 16-byte token. Its first byte has the QUIC fixed bit (0x40) clear, so no QUIC packet is
//! ever taken for a probe, nor a probe for a QUIC packet.

use super::wire::DecodeError;

/// The first 8 bytes of every probe.
pub const MAGIC: [u8; 8] = *b"\0rfpunch";
/// Length of a probe.
pub const PROBE_LEN: usize = MAGIC.len() + TOKEN_LEN;
/// Length of an attempt's token.
pub const TOKEN_LEN: usize = 16;

/// Encodes the probe for `token`.
pub fn encode(token: &[u8; TOKEN_LEN]) -> [u8; PROBE_LEN] {
    let mut out = [0u8; PROBE_LEN];
    out[..MAGIC.len()].copy_from_slice(&MAGIC);
    out[MAGIC.len()..].copy_from_slice(token);
    out
}

/// Whether `datagram` starts like a probe (its magic), whatever its length: the socket
/// drops such datagrams before QUIC sees them.
pub fn looks_like_probe(datagram: &[u8]) -> bool {
    datagram.len() >= MAGIC.len() && datagram[..MAGIC.len()] == MAGIC
}

/// Decodes a probe: its token, or an error naming what was wrong.
pub fn decode(datagram: &[u8]) -> Result<[u8; TOKEN_LEN], DecodeError> {
    if !looks_like_probe(datagram) {
        return Err(DecodeError::invalid("punch probe", "no probe magic"));
    }
    if datagram.len() != PROBE_LEN {
        return Err(DecodeError::invalid("punch probe", format!("{} bytes, expected {PROBE_LEN}", datagram.len())));
    }
    let mut token = [0u8; TOKEN_LEN];
    token.copy_from_slice(&datagram[MAGIC.len()..]);
    Ok(token)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_probe_is_magic_then_token() {
        let token = [7u8; TOKEN_LEN];
        let p = encode(&token);
        assert_eq!(&p[..8], b"\0rfpunch");
        assert_eq!(decode(&p).unwrap(), token);
        assert_eq!(p[0] & 0x40, 0, "the QUIC fixed bit is clear");
    }

    #[test]
    fn wrong_lengths_and_magic_are_named() {
        let p = encode(&[1; TOKEN_LEN]);
        assert!(decode(&p[..20]).unwrap_err().to_string().contains("20 bytes"));
        let mut long = p.to_vec();
        long.push(0);
        assert!(decode(&long).unwrap_err().to_string().contains("25 bytes"));
        let mut bad = p;
        bad[1] = b'x';
        assert!(decode(&bad).unwrap_err().to_string().contains("magic"));
        assert!(decode(&[]).is_err());
    }

    proptest! {
        #[test]
        fn decode_never_panics_and_accepts_only_probes(bytes in prop::collection::vec(any::<u8>(), 0..64)) {
            match decode(&bytes) {
                Ok(token) => prop_assert_eq!(encode(&token).to_vec(), bytes),
                Err(_) => prop_assert!(bytes.len() != PROBE_LEN || bytes[..8] != MAGIC),
            }
        }

        #[test]
        fn round_trips(token in any::<[u8; 16]>()) {
            prop_assert_eq!(decode(&encode(&token)).unwrap(), token);
        }

        #[test]
        fn quic_packets_are_never_probes(first in 0x40u8..=0xff, rest in prop::collection::vec(any::<u8>(), 0..40)) {
            let mut packet = vec![first | 0x40];
            packet.extend(rest);
            prop_assert!(!looks_like_probe(&packet));
        }
    }
}
