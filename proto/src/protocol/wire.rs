//! Bounded big-endian readers and writers shared by every decoder of network bytes.
//!
//! A [`Reader`] never panics: every read checks the remaining length and reports what was
//! being read when the input ran out, so decoders return errors that name the field.

use thiserror::Error;

/// Why bytes could not be decoded.
#[derive(Clone, Debug, PartialEq, Eq, Error)]
pub enum DecodeError {
    /// The input ended inside `field`.
    #[error("truncated {field}: needed {needed} more bytes, {available} left")]
    Truncated {
        /// What was being read.
        field: &'static str,
        /// Bytes still required.
        needed: usize,
        /// Bytes that were left.
        available: usize,
    },
    /// A length or count exceeds the protocol bound for `field`.
    #[error("{field} too long: {len} bytes, at most {max}")]
    TooLong {
        /// What was being read.
        field: &'static str,
        /// Announced length.
        len: usize,
        /// Bound.
        max: usize,
    },
    /// A length is below the protocol minimum for `field`.
    #[error("{field} too short: {len} bytes, at least {min}")]
    TooShort {
        /// What was being read.
        field: &'static str,
        /// Announced length.
        len: usize,
        /// Bound.
        min: usize,
    },
    /// A value is not allowed in `field`.
    #[error("invalid {field}: {reason}")]
    Invalid {
        /// What was being read.
        field: &'static str,
        /// What was wrong with it.
        reason: String,
    },
    /// Bytes were left after a structure that must fill its container.
    #[error("{count} trailing bytes after {field}")]
    Trailing {
        /// The structure that should have ended.
        field: &'static str,
        /// How many bytes were left.
        count: usize,
    },
    /// The version is not one this implementation speaks.
    #[error("unsupported {field} version {version}")]
    UnsupportedVersion {
        /// Which structure.
        field: &'static str,
        /// The version read.
        version: u32,
    },
}

impl DecodeError {
    /// Shorthand for [`DecodeError::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Self::Invalid { field, reason: reason.into() }
    }
}

/// A cursor over received bytes.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
}

impl<'a> Reader<'a> {
    /// Reads from `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf }
    }

    /// Bytes not read yet.
    pub fn remaining(&self) -> usize {
        self.buf.len()
    }

    /// The unread bytes.
    pub fn rest(&self) -> &'a [u8] {
        self.buf
    }

    /// Takes exactly `n` bytes.
    pub fn take(&mut self, n: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if n > self.buf.len() {
            return Err(DecodeError::Truncated { field, needed: n - self.buf.len(), available: self.buf.len() });
        }
        let (head, tail) = self.buf.split_at(n);
        self.buf = tail;
        Ok(head)
    }

    /// Reads a `u8`.
    pub fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.take(1, field)?[0])
    }

    /// Reads a big-endian `u16`.
    pub fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        let b = self.take(2, field)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    }

    /// Reads a big-endian `u64`.
    pub fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        let b = self.take(8, field)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    /// Reads `opaque<min..max>` with a one-byte length.
    pub fn vec8(&mut self, field: &'static str, min: usize, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u8(field)?);
        self.bounded(len, field, min, max)
    }

    /// Reads `opaque<min..max>` with a two-byte length.
    pub fn vec16(&mut self, field: &'static str, min: usize, max: usize) -> Result<&'a [u8], DecodeError> {
        let len = usize::from(self.u16(field)?);
        self.bounded(len, field, min, max)
    }

    fn bounded(&mut self, len: usize, field: &'static str, min: usize, max: usize) -> Result<&'a [u8], DecodeError> {
        if len > max {
            return Err(DecodeError::TooLong { field, len, max });
        }
        if len < min {
            return Err(DecodeError::TooShort { field, len, min });
        }
        self.take(len, field)
    }

    /// Reads a UTF-8 string with a one-byte length (1..=max bytes).
    pub fn str8(&mut self, field: &'static str, max: usize) -> Result<&'a str, DecodeError> {
        let bytes = self.vec8(field, 1, max)?;
        std::str::from_utf8(bytes).map_err(|_| DecodeError::invalid(field, "not UTF-8"))
    }

    /// Fails when bytes are left over.
    pub fn finish(&self, field: &'static str) -> Result<(), DecodeError> {
        if self.buf.is_empty() { Ok(()) } else { Err(DecodeError::Trailing { field, count: self.buf.len() }) }
    }
}

/// Appends big-endian values to a buffer.
#[derive(Debug, Default)]
pub struct Writer {
    buf: Vec<u8>,
}

impl Writer {
    /// An empty writer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes written.
    pub fn into_bytes(self) -> Vec<u8> {
        self.buf
    }

    /// Appends a `u8`.
    pub fn u8(&mut self, v: u8) -> &mut Self {
        self.buf.push(v);
        self
    }

    /// Appends a big-endian `u16`.
    pub fn u16(&mut self, v: u16) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends a big-endian `u64`.
    pub fn u64(&mut self, v: u64) -> &mut Self {
        self.buf.extend_from_slice(&v.to_be_bytes());
        self
    }

    /// Appends raw bytes.
    pub fn bytes(&mut self, v: &[u8]) -> &mut Self {
        self.buf.extend_from_slice(v);
        self
    }

    /// Appends `opaque<..255>`; callers guarantee the bound (checked when the value was built).
    pub fn vec8(&mut self, v: &[u8]) -> &mut Self {
        let len = u8::try_from(v.len()).unwrap_or(u8::MAX);
        self.buf.push(len);
        self.buf.extend_from_slice(&v[..usize::from(len)]);
        self
    }

    /// Appends `opaque<..65535>`; callers guarantee the bound (checked when the value was built).
    pub fn vec16(&mut self, v: &[u8]) -> &mut Self {
        let len = u16::try_from(v.len()).unwrap_or(u16::MAX);
        self.u16(len);
        self.buf.extend_from_slice(&v[..usize::from(len)]);
        self
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn truncation_names_the_field() {
        let mut r = Reader::new(&[0x00]);
        assert_eq!(r.u16("port"), Err(DecodeError::Truncated { field: "port", needed: 1, available: 1 }));
        let mut r = Reader::new(&[5, b'a']);
        assert!(matches!(r.vec8("service", 1, 63), Err(DecodeError::Truncated { field: "service", .. })));
        let mut r = Reader::new(&[70]);
        assert!(matches!(r.vec8("service", 1, 63), Err(DecodeError::TooLong { field: "service", len: 70, max: 63 })));
    }

    proptest! {
        #[test]
        fn vec16_roundtrips(v in prop::collection::vec(any::<u8>(), 0..2000)) {
            let mut w = Writer::new();
            w.vec16(&v);
            let bytes = w.into_bytes();
            let mut r = Reader::new(&bytes);
            prop_assert_eq!(r.vec16("x", 0, 65535).unwrap(), &v[..]);
            prop_assert!(r.finish("x").is_ok());
        }
    }
}
