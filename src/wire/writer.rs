//! [`MessageWriter`]: builds a STUN message in a caller-provided buffer.

use std::net::SocketAddr;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use super::attr::{AttrType, ErrorCode, encode_address, xor_addr};
use super::crc32::Crc32;
use super::message::{FINGERPRINT_XOR, TransactionId};
use super::{Class, HEADER_LEN, MAGIC_COOKIE, Method, message_type, pad4};

/// Writes one message into `buf`. Attributes are appended in call order; the header's length
/// field is kept current so that integrity and fingerprint can be computed over what is
/// already written. If the buffer is too small the writer remembers it and [`Self::finish`]
/// returns `None`: callers need not check every append.
pub struct MessageWriter<'b> {
    buf: &'b mut [u8],
    len: usize,
    overflow: bool,
    padding: u8,
}

impl<'b> MessageWriter<'b> {
    pub fn new(buf: &'b mut [u8], method: Method, class: Class, txid: &TransactionId) -> Self {
        let mut w = MessageWriter {
            buf,
            len: 0,
            overflow: false,
            padding: 0,
        };
        if w.buf.len() < HEADER_LEN {
            w.overflow = true;
            return w;
        }
        w.buf[0..2].copy_from_slice(&message_type(method, class).to_be_bytes());
        w.buf[2..4].copy_from_slice(&0u16.to_be_bytes());
        w.buf[4..8].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
        w.buf[8..20].copy_from_slice(&txid.0);
        w.len = HEADER_LEN;
        w
    }

    fn txid(&self) -> TransactionId {
        let mut t = [0u8; 12];
        t.copy_from_slice(&self.buf[8..20]);
        TransactionId(t)
    }

    fn set_len(&mut self) {
        let body = (self.len - HEADER_LEN) as u16;
        self.buf[2..4].copy_from_slice(&body.to_be_bytes());
    }

    /// Reserves an attribute of `vlen` bytes and returns its value slice (padding zeroed).
    fn reserve(&mut self, t: AttrType, vlen: usize) -> Option<&mut [u8]> {
        let total = 4 + pad4(vlen);
        if self.overflow
            || vlen > u16::MAX as usize
            || self.len + total > self.buf.len()
            || self.len + total - HEADER_LEN > u16::MAX as usize
        {
            self.overflow = true;
            return None;
        }
        let off = self.len;
        self.buf[off..off + 2].copy_from_slice(&t.0.to_be_bytes());
        self.buf[off + 2..off + 4].copy_from_slice(&(vlen as u16).to_be_bytes());
        self.buf[off + 4 + vlen..off + total].fill(self.padding);
        self.len += total;
        self.set_len();
        Some(&mut self.buf[off + 4..off + 4 + vlen])
    }

    /// Sets the byte used to pad attribute values (zero unless changed; receivers ignore it,
    /// RFC 8489 14). The RFC 5769 test vectors pad with spaces.
    pub fn set_padding(&mut self, byte: u8) -> &mut Self {
        self.padding = byte;
        self
    }

    /// Appends an attribute with an opaque value.
    pub fn add(&mut self, t: AttrType, value: &[u8]) -> &mut Self {
        if let Some(v) = self.reserve(t, value.len()) {
            v.copy_from_slice(value);
        }
        self
    }

    pub fn add_u32(&mut self, t: AttrType, value: u32) -> &mut Self {
        self.add(t, &value.to_be_bytes())
    }

    /// Appends a plain address attribute (MAPPED-ADDRESS, ALTERNATE-SERVER, ...).
    pub fn add_address(&mut self, t: AttrType, a: SocketAddr) -> &mut Self {
        let mut v = [0u8; 20];
        let n = encode_address(a, &mut v);
        self.add(t, &v[..n])
    }

    /// Appends an XOR address attribute (XOR-MAPPED-ADDRESS, XOR-PEER-ADDRESS, ...).
    pub fn add_xor_address(&mut self, t: AttrType, a: SocketAddr) -> &mut Self {
        let txid = self.txid();
        self.add_address(t, xor_addr(a, &txid))
    }

    /// Appends PADDING (RFC 5780 7.6) with a value of `len` zero bytes.
    pub fn add_padding(&mut self, len: usize) -> &mut Self {
        if let Some(v) = self.reserve(AttrType::PADDING, len) {
            v.fill(0);
        }
        self
    }

    /// Appends ERROR-CODE with the standard reason phrase.
    pub fn add_error(&mut self, code: ErrorCode) -> &mut Self {
        self.add_error_reason(code.0, code.reason())
    }

    /// Appends ERROR-CODE with a given code (300-699) and reason.
    pub fn add_error_reason(&mut self, code: u16, reason: &str) -> &mut Self {
        // At most 763 bytes (RFC 8489 14.8), cut at a character boundary.
        let mut cut = reason.len().min(763);
        while !reason.is_char_boundary(cut) {
            cut -= 1;
        }
        let reason = &reason.as_bytes()[..cut];
        if let Some(v) = self.reserve(AttrType::ERROR_CODE, 4 + reason.len()) {
            v[0] = 0;
            v[1] = 0;
            v[2] = (code / 100) as u8 & 0x07;
            v[3] = (code % 100) as u8;
            v[4..].copy_from_slice(reason);
        }
        self
    }

    /// Appends ADDRESS-ERROR-CODE (RFC 8656 18.13): the family a dual allocation could not
    /// provide, and why.
    pub fn add_address_error(&mut self, family: u8, code: ErrorCode) -> &mut Self {
        let reason = code.reason().as_bytes();
        if let Some(v) = self.reserve(AttrType::ADDRESS_ERROR_CODE, 4 + reason.len()) {
            v[0] = family;
            v[1] = 0;
            v[2] = (code.0 / 100) as u8 & 0x07;
            v[3] = (code.0 % 100) as u8;
            v[4..].copy_from_slice(reason);
        }
        self
    }

    /// Appends UNKNOWN-ATTRIBUTES listing `types` (RFC 8489 14.13).
    pub fn add_unknown_attributes(&mut self, types: &[u16]) -> &mut Self {
        if let Some(v) = self.reserve(AttrType::UNKNOWN_ATTRIBUTES, types.len() * 2) {
            for (chunk, t) in v.chunks_exact_mut(2).zip(types) {
                chunk.copy_from_slice(&t.to_be_bytes());
            }
        }
        self
    }

    /// Appends MESSAGE-INTEGRITY computed with `key` over everything written so far.
    pub fn add_integrity(&mut self, key: &[u8]) -> &mut Self {
        let covered = self.len;
        if self.reserve(AttrType::MESSAGE_INTEGRITY, 20).is_none() {
            return self;
        }
        let Ok(mut mac) = <Hmac<Sha1> as Mac>::new_from_slice(key) else {
            self.overflow = true;
            return self;
        };
        mac.update(&self.buf[..covered]);
        let tag = mac.finalize().into_bytes();
        self.buf[covered + 4..covered + 24].copy_from_slice(&tag);
        self
    }

    /// Appends MESSAGE-INTEGRITY-SHA256 (full 32 bytes) computed with `key`.
    pub fn add_integrity_sha256(&mut self, key: &[u8]) -> &mut Self {
        let covered = self.len;
        if self
            .reserve(AttrType::MESSAGE_INTEGRITY_SHA256, 32)
            .is_none()
        {
            return self;
        }
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
            self.overflow = true;
            return self;
        };
        mac.update(&self.buf[..covered]);
        let tag = mac.finalize().into_bytes();
        self.buf[covered + 4..covered + 36].copy_from_slice(&tag);
        self
    }

    /// Appends FINGERPRINT; must be the last attribute.
    pub fn add_fingerprint(&mut self) -> &mut Self {
        let covered = self.len;
        if self.reserve(AttrType::FINGERPRINT, 4).is_none() {
            return self;
        }
        let mut crc = Crc32::new();
        crc.update(&self.buf[..covered]);
        let v = crc.finish() ^ FINGERPRINT_XOR;
        self.buf[covered + 4..covered + 8].copy_from_slice(&v.to_be_bytes());
        self
    }

    /// Bytes written so far.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The message length, or `None` if the buffer was too small.
    pub fn finish(self) -> Option<usize> {
        (!self.overflow).then_some(self.len)
    }
}
