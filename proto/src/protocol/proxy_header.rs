//! The PROXY protocol v2 header a destination home writes to its app before a federated
//! stream's bytes, for exports with `proxyProtocol: true` (docs/protocol.md §6.1): command
//! PROXY, family UNSPEC (the addresses on the path are relays', not the caller's), and TLVs
//! naming the caller as the Noise session authenticated it.

use thiserror::Error;

/// The 12-byte signature every PROXY v2 header starts with.
pub const SIGNATURE: [u8; 12] = *b"\r\n\r\n\0\r\nQUIT\n";
/// TLV: the caller's authenticated identity, `relayfed://<trust domain>/<node>` (absent when
/// the caller sent no certificate).
pub const TLV_IDENTITY: u8 = 0xE0;
/// TLV: the caller's main relay.
pub const TLV_ORIGIN_MAIN: u8 = 0xE1;
/// TLV: the service called.
pub const TLV_SERVICE: u8 = 0xE2;

/// What the header says about the caller.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Caller {
    /// `relayfed://<trust domain>/<node>`, when authenticated.
    pub identity: Option<String>,
    /// The caller's main relay (from the route).
    pub origin_main: String,
    /// The service called.
    pub service: String,
}

/// Why bytes are not a header this module wrote.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum ProxyHeaderError {
    /// Fewer bytes than the header announces.
    #[error("truncated PROXY v2 header")]
    Truncated,
    /// Not a PROXY v2 header (signature, version, command or family).
    #[error("not a relayfed PROXY v2 header: {0}")]
    Invalid(&'static str),
}

fn tlv(out: &mut Vec<u8>, kind: u8, value: &str) {
    // Values are identities, relay ids and service names: far below 64 KiB.
    let v = &value.as_bytes()[..value.len().min(u16::MAX as usize)];
    out.push(kind);
    out.extend_from_slice(&(v.len() as u16).to_be_bytes());
    out.extend_from_slice(v);
}

/// The header for `caller`.
pub fn encode(caller: &Caller) -> Vec<u8> {
    let mut tlvs = Vec::new();
    if let Some(id) = &caller.identity {
        tlv(&mut tlvs, TLV_IDENTITY, id);
    }
    tlv(&mut tlvs, TLV_ORIGIN_MAIN, &caller.origin_main);
    tlv(&mut tlvs, TLV_SERVICE, &caller.service);
    let mut out = Vec::with_capacity(16 + tlvs.len());
    out.extend_from_slice(&SIGNATURE);
    out.push(0x21); // version 2, command PROXY
    out.push(0x00); // AF_UNSPEC, UNSPEC
    out.extend_from_slice(&(tlvs.len().min(u16::MAX as usize) as u16).to_be_bytes());
    out.extend_from_slice(&tlvs);
    out
}

/// Reads a header from the start of `bytes`: the caller and the header's length. For apps
/// written in Rust and for tests; other apps use any PROXY v2 parser and read the TLVs.
pub fn decode(bytes: &[u8]) -> Result<(Caller, usize), ProxyHeaderError> {
    if bytes.len() < 16 {
        return Err(ProxyHeaderError::Truncated);
    }
    if bytes[..12] != SIGNATURE {
        return Err(ProxyHeaderError::Invalid("signature"));
    }
    if bytes[12] >> 4 != 2 || bytes[12] & 0x0f > 1 {
        return Err(ProxyHeaderError::Invalid("version or command"));
    }
    if bytes[13] != 0x00 {
        return Err(ProxyHeaderError::Invalid("family (relayfed sends UNSPEC)"));
    }
    let len = u16::from_be_bytes([bytes[14], bytes[15]]) as usize;
    let body = bytes.get(16..16 + len).ok_or(ProxyHeaderError::Truncated)?;
    let mut caller = Caller::default();
    let mut rest = body;
    while !rest.is_empty() {
        if rest.len() < 3 {
            return Err(ProxyHeaderError::Truncated);
        }
        let (kind, n) = (rest[0], u16::from_be_bytes([rest[1], rest[2]]) as usize);
        let value = rest.get(3..3 + n).ok_or(ProxyHeaderError::Truncated)?;
        let text = std::str::from_utf8(value).map_err(|_| ProxyHeaderError::Invalid("TLV value not UTF-8"))?;
        match kind {
            TLV_IDENTITY => caller.identity = Some(text.to_owned()),
            TLV_ORIGIN_MAIN => caller.origin_main = text.to_owned(),
            TLV_SERVICE => caller.service = text.to_owned(),
            _ => {} // TLVs of other senders are skipped, as the spec asks
        }
        rest = &rest[3 + n..];
    }
    Ok((caller, 16 + len))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn the_header_is_proxy_v2_with_the_callers_tlvs() {
        let caller = Caller {
            identity: Some("relayfed://acme.example/shop".into()),
            origin_main: "hub-a".into(),
            service: "inventory".into(),
        };
        let h = encode(&caller);
        assert_eq!(&h[..12], &SIGNATURE);
        assert_eq!((h[12], h[13]), (0x21, 0x00));
        assert_eq!(u16::from_be_bytes([h[14], h[15]]) as usize, h.len() - 16);
        let mut with_data = h.clone();
        with_data.extend_from_slice(b"GET / HTTP/1.1\r\n");
        assert_eq!(decode(&with_data), Ok((caller, h.len())));
        assert_eq!(decode(&h[..h.len() - 1]), Err(ProxyHeaderError::Truncated));
        assert!(decode(b"GET / HTTP/1.1\r\n\r\n").is_err());
    }

    proptest! {
        #[test]
        fn decoding_never_panics_and_encoding_round_trips(
            bytes in proptest::collection::vec(any::<u8>(), 0..300),
            identity in proptest::option::of("[a-z./:]{0,60}"),
            main in "[a-z0-9-]{0,63}",
            service in "[a-z0-9.-]{0,100}",
        ) {
            let _ = decode(&bytes);
            let caller = Caller { identity, origin_main: main, service };
            let h = encode(&caller);
            prop_assert_eq!(decode(&h), Ok((caller, h.len())));
        }
    }
}
