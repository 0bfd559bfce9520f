//! Stream frames: `type(u8) length(u16) payload[length]`.
//!
//! The initiator's first frame is ROUTE. Any hop may answer with ERROR or RETRY_CONFIGS and
//! close the stream. After routing, both directions carry NOISE frames end to end; relays
//! copy those bytes without parsing them.

use super::ech_config::EchConfigList;
use super::error_code::ErrorCode;
use super::route::RouteHeader;
use super::wire::{DecodeError, Reader, Writer};

/// Frame header size: type and length.
pub const FRAME_HEADER: usize = 3;
/// Largest frame payload.
pub const MAX_FRAME_PAYLOAD: usize = 0xffff;
/// Longest error message.
pub const MAX_ERROR_MESSAGE: usize = 255;

/// Frame type bytes.
pub mod kind {
    /// Route header.
    pub const ROUTE: u8 = 0x01;
    /// Structured error.
    pub const ERROR: u8 = 0x02;
    /// ECH retry configs.
    pub const RETRY_CONFIGS: u8 = 0x03;
    /// Noise handshake or transport message.
    pub const NOISE: u8 = 0x04;
    /// Control message (JSON).
    pub const CONTROL: u8 = 0x05;
}

/// A structured error sent by any hop.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ErrorFrame {
    /// The code.
    pub code: ErrorCode,
    /// When set, the sender may retry after this many milliseconds (e.g. `RATE_LIMITED`).
    pub retry_after_ms: u32,
    /// Human-readable detail (no secrets).
    pub message: String,
}

/// A decoded frame.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Frame {
    /// First frame of a stream.
    Route(RouteHeader),
    /// An error; the stream ends after it.
    Error(ErrorFrame),
    /// The relay's current ECHConfigList (answer to an unknown config id).
    RetryConfigs(Vec<u8>),
    /// A Noise message.
    Noise(Vec<u8>),
    /// A control message.
    Control(super::control::Control),
}

impl Frame {
    /// Encodes the frame with its header.
    pub fn encode(&self) -> Result<Vec<u8>, DecodeError> {
        let (t, payload) = match self {
            Frame::Route(h) => (kind::ROUTE, h.encode()?),
            Frame::Error(e) => {
                let mut w = Writer::new();
                let msg = truncate_utf8(&e.message, MAX_ERROR_MESSAGE);
                w.u16(e.code.to_u16()).bytes(&e.retry_after_ms.to_be_bytes()).vec8(msg.as_bytes());
                (kind::ERROR, w.into_bytes())
            }
            Frame::RetryConfigs(list) => (kind::RETRY_CONFIGS, list.clone()),
            Frame::Noise(m) => (kind::NOISE, m.clone()),
            Frame::Control(c) => (kind::CONTROL, c.encode()),
        };
        if payload.len() > MAX_FRAME_PAYLOAD {
            return Err(DecodeError::TooLong { field: "frame payload", len: payload.len(), max: MAX_FRAME_PAYLOAD });
        }
        let mut w = Writer::new();
        w.u8(t).vec16(&payload);
        Ok(w.into_bytes())
    }

    /// Decodes a frame body given its type byte.
    pub fn decode_body(t: u8, payload: &[u8]) -> Result<Self, DecodeError> {
        match t {
            kind::ROUTE => Ok(Frame::Route(RouteHeader::decode(payload)?)),
            kind::ERROR => {
                let mut r = Reader::new(payload);
                let code = ErrorCode::from_u16(r.u16("error code")?);
                let ra = r.take(4, "retry_after_ms")?;
                let retry_after_ms = u32::from_be_bytes([ra[0], ra[1], ra[2], ra[3]]);
                let msg = r.vec8("error message", 0, MAX_ERROR_MESSAGE)?;
                let message = String::from_utf8_lossy(msg).into_owned();
                r.finish("error frame")?;
                Ok(Frame::Error(ErrorFrame { code, retry_after_ms, message }))
            }
            kind::RETRY_CONFIGS => {
                EchConfigList::decode(payload)?; // validate now; callers re-decode as needed
                Ok(Frame::RetryConfigs(payload.to_vec()))
            }
            kind::NOISE => Ok(Frame::Noise(payload.to_vec())),
            kind::CONTROL => Ok(Frame::Control(super::control::Control::decode(payload)?)),
            other => Err(DecodeError::invalid("frame type", format!("0x{other:02x} is unknown"))),
        }
    }

    /// Decodes one frame from the front of `bytes`, returning it and the bytes consumed.
    pub fn decode(bytes: &[u8]) -> Result<(Self, usize), DecodeError> {
        let mut r = Reader::new(bytes);
        let t = r.u8("frame type")?;
        let payload = r.vec16("frame payload", 0, MAX_FRAME_PAYLOAD)?;
        Ok((Self::decode_body(t, payload)?, FRAME_HEADER + payload.len()))
    }
}

fn truncate_utf8(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn error_frames_round_trip_and_truncate_messages() {
        let f =
            Frame::Error(ErrorFrame { code: ErrorCode::RateLimited, retry_after_ms: 250, message: "é".repeat(200) });
        let bytes = f.encode().unwrap();
        let (back, used) = Frame::decode(&bytes).unwrap();
        assert_eq!(used, bytes.len());
        let Frame::Error(e) = back else { panic!() };
        assert_eq!(e.code, ErrorCode::RateLimited);
        assert_eq!(e.retry_after_ms, 250);
        assert!(e.message.len() <= MAX_ERROR_MESSAGE && e.message.chars().all(|c| c == 'é'));
    }

    #[test]
    fn unknown_frame_type_is_named() {
        let err = Frame::decode(&[0x7f, 0, 0]).unwrap_err();
        assert_eq!(err.to_string(), "invalid frame type: 0x7f is unknown");
    }

    proptest! {
        #[test]
        fn decode_never_panics(bytes in prop::collection::vec(any::<u8>(), 0..400)) {
            let _ = Frame::decode(&bytes);
        }

        #[test]
        fn noise_frames_round_trip(m in prop::collection::vec(any::<u8>(), 0..3000)) {
            let bytes = Frame::Noise(m.clone()).encode().unwrap();
            prop_assert_eq!(Frame::decode(&bytes).unwrap(), (Frame::Noise(m), bytes.len()));
        }
    }
}
