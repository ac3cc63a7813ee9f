//! [`MessageRef`]: a borrowed, validated view of one STUN message (RFC 8489 5, 14).

use std::net::SocketAddr;
use std::ops::Range;

use hmac::{Hmac, Mac};
use sha1::Sha1;
use sha2::Sha256;

use super::attr::{
    AttrError, AttrType, CHANGE_IP, CHANGE_PORT, decode_error_code, decode_xor_address,
};
use super::crc32::Crc32;
use super::{Class, HEADER_LEN, MAGIC_COOKIE, Method, pad4, split_message_type};

/// The most attributes a message may carry before its MESSAGE-INTEGRITY. Real clients send
/// fewer than fifteen; a message with more is refused rather than half-read.
pub const MAX_ATTRS: usize = 32;

/// XOR value of the FINGERPRINT attribute (RFC 8489 14.7).
pub const FINGERPRINT_XOR: u32 = 0x5354_554E;

/// The 96-bit transaction ID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct TransactionId(pub [u8; 12]);

/// Why a buffer is not a well-formed STUN message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ParseError {
    /// Shorter than the 20-byte header.
    Truncated,
    /// The first two bits are not zero.
    NotStun,
    /// The magic cookie is wrong (an RFC 3489 client or not STUN at all).
    BadCookie,
    /// The length field is not a multiple of four or does not match the buffer.
    BadLength,
    /// An attribute runs past the end, has a length wrong for its type, or follows FINGERPRINT.
    BadAttribute,
    /// More than [`MAX_ATTRS`] attributes.
    TooManyAttributes,
}

impl ParseError {
    /// A short name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            ParseError::Truncated => "truncated",
            ParseError::NotStun => "not_stun",
            ParseError::BadCookie => "bad_cookie",
            ParseError::BadLength => "bad_length",
            ParseError::BadAttribute => "bad_attribute",
            ParseError::TooManyAttributes => "too_many_attributes",
        }
    }
}

impl std::fmt::Display for ParseError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::error::Error for ParseError {}

#[derive(Clone, Copy, Default)]
struct Slot {
    typ: u16,
    len: u16,
    /// Offset of the value in the message.
    start: u32,
}

/// Which message-integrity attribute a message carries, the stronger one first.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Integrity {
    Sha256,
    Sha1,
}

/// A borrowed view of one STUN message. Construction checks the framing of every attribute, so
/// accessors never read out of bounds; attribute values are decoded on access.
#[derive(Clone)]
pub struct MessageRef<'a> {
    buf: &'a [u8],
    method: Method,
    class: Class,
    txid: TransactionId,
    slots: [Slot; MAX_ATTRS],
    count: usize,
    /// Offset of the MESSAGE-INTEGRITY attribute header.
    mi: Option<u32>,
    /// Offset and value length of MESSAGE-INTEGRITY-SHA256.
    mi256: Option<(u32, u16)>,
    /// Offset of the FINGERPRINT attribute header.
    fp: Option<u32>,
}

impl std::fmt::Debug for MessageRef<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MessageRef")
            .field("method", &self.method)
            .field("class", &self.class)
            .field("len", &self.buf.len())
            .field("attrs", &self.count)
            .finish()
    }
}

impl<'a> MessageRef<'a> {
    /// Reads just the header: method, class and transaction ID, if the buffer starts with a
    /// STUN header. Used to answer a request whose attributes are malformed.
    pub fn header(buf: &[u8]) -> Option<(Method, Class, TransactionId)> {
        if buf.len() < HEADER_LEN
            || buf[0] & 0xC0 != 0
            || u32::from_be_bytes([buf[4], buf[5], buf[6], buf[7]]) != MAGIC_COOKIE
        {
            return None;
        }
        let (m, c) = split_message_type(u16::from_be_bytes([buf[0], buf[1]]));
        let mut t = [0u8; 12];
        t.copy_from_slice(&buf[8..20]);
        Some((m, c, TransactionId(t)))
    }

    /// Parses `buf`, which must hold exactly one message (a UDP datagram, or one frame cut from
    /// a stream by [`super::frame_len`]).
    pub fn parse(buf: &'a [u8]) -> Result<Self, ParseError> {
        if buf.len() < HEADER_LEN {
            return Err(ParseError::Truncated);
        }
        if buf[0] & 0xC0 != 0 {
            return Err(ParseError::NotStun);
        }
        let (method, class, txid) = Self::header(buf).ok_or(ParseError::BadCookie)?;
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        if !len.is_multiple_of(4) || HEADER_LEN + len != buf.len() {
            return Err(ParseError::BadLength);
        }
        let mut m = MessageRef {
            buf,
            method,
            class,
            txid,
            slots: [Slot::default(); MAX_ATTRS],
            count: 0,
            mi: None,
            mi256: None,
            fp: None,
        };
        let end = buf.len();
        let mut off = HEADER_LEN;
        while off < end {
            if off + 4 > end || m.fp.is_some() {
                return Err(ParseError::BadAttribute);
            }
            let typ = u16::from_be_bytes([buf[off], buf[off + 1]]);
            let vlen = u16::from_be_bytes([buf[off + 2], buf[off + 3]]);
            let start = off + 4;
            let next = start + pad4(vlen as usize);
            if next > end {
                return Err(ParseError::BadAttribute);
            }
            match AttrType(typ) {
                AttrType::FINGERPRINT => {
                    if vlen != 4 {
                        return Err(ParseError::BadAttribute);
                    }
                    m.fp = Some(off as u32);
                }
                AttrType::MESSAGE_INTEGRITY if m.mi.is_none() && m.mi256.is_none() => {
                    if vlen != 20 {
                        return Err(ParseError::BadAttribute);
                    }
                    m.mi = Some(off as u32);
                }
                AttrType::MESSAGE_INTEGRITY_SHA256 if m.mi256.is_none() => {
                    if !(16..=32).contains(&vlen) || !vlen.is_multiple_of(4) {
                        return Err(ParseError::BadAttribute);
                    }
                    m.mi256 = Some((off as u32, vlen));
                }
                // Attributes after MESSAGE-INTEGRITY(-SHA256) are ignored (RFC 8489 14.5, 14.6).
                _ if m.mi.is_some() || m.mi256.is_some() => {}
                _ => {
                    if m.count == MAX_ATTRS {
                        return Err(ParseError::TooManyAttributes);
                    }
                    m.slots[m.count] = Slot {
                        typ,
                        len: vlen,
                        start: start as u32,
                    };
                    m.count += 1;
                }
            }
            off = next;
        }
        Ok(m)
    }

    pub fn method(&self) -> Method {
        self.method
    }

    pub fn class(&self) -> Class {
        self.class
    }

    pub fn transaction_id(&self) -> &TransactionId {
        &self.txid
    }

    /// The whole message.
    pub fn as_bytes(&self) -> &'a [u8] {
        self.buf
    }

    fn value(&self, s: &Slot) -> &'a [u8] {
        let start = s.start as usize;
        &self.buf[start..start + s.len as usize]
    }

    /// The attributes before MESSAGE-INTEGRITY, in order (integrity and fingerprint excluded).
    pub fn attributes(&self) -> impl Iterator<Item = (AttrType, &'a [u8])> + '_ {
        self.slots[..self.count]
            .iter()
            .map(|s| (AttrType(s.typ), self.value(s)))
    }

    /// The value of the first attribute of type `t` (later duplicates are ignored, RFC 8489 14).
    pub fn get(&self, t: AttrType) -> Option<&'a [u8]> {
        self.slots[..self.count]
            .iter()
            .find(|s| s.typ == t.0)
            .map(|s| self.value(s))
    }

    /// The byte range of the first attribute value of type `t` within [`Self::as_bytes`].
    pub fn range_of(&self, t: AttrType) -> Option<Range<usize>> {
        self.slots[..self.count]
            .iter()
            .find(|s| s.typ == t.0)
            .map(|s| s.start as usize..s.start as usize + s.len as usize)
    }

    pub fn has(&self, t: AttrType) -> bool {
        self.get(t).is_some()
    }

    /// Comprehension-required attribute types this server does not understand, at most
    /// `out.len()` of them; returns how many were written.
    pub fn unknown_required(&self, out: &mut [u16]) -> usize {
        let mut n = 0;
        for s in &self.slots[..self.count] {
            let t = AttrType(s.typ);
            if !t.understood() && n < out.len() && !out[..n].contains(&s.typ) {
                out[n] = s.typ;
                n += 1;
            }
        }
        n
    }

    fn text(&self, t: AttrType, max: usize) -> Result<Option<&'a str>, AttrError> {
        match self.get(t) {
            None => Ok(None),
            Some(v) if v.len() > max => Err(AttrError::Text),
            Some(v) => std::str::from_utf8(v)
                .map(Some)
                .map_err(|_| AttrError::Text),
        }
    }

    /// USERNAME (at most 513 bytes, RFC 8489 14.3).
    pub fn username(&self) -> Result<Option<&'a str>, AttrError> {
        self.text(AttrType::USERNAME, 513)
    }

    /// REALM (fewer than 128 characters, at most 763 bytes, RFC 8489 14.9).
    pub fn realm(&self) -> Result<Option<&'a str>, AttrError> {
        self.text(AttrType::REALM, 763)
    }

    /// NONCE (at most 763 bytes, RFC 8489 14.10).
    pub fn nonce(&self) -> Result<Option<&'a [u8]>, AttrError> {
        match self.get(AttrType::NONCE) {
            Some(v) if v.len() > 763 => Err(AttrError::Text),
            v => Ok(v),
        }
    }

    pub fn software(&self) -> Result<Option<&'a str>, AttrError> {
        self.text(AttrType::SOFTWARE, 763)
    }

    fn u32_attr(&self, t: AttrType) -> Result<Option<u32>, AttrError> {
        match self.get(t) {
            None => Ok(None),
            Some(&[a, b, c, d]) => Ok(Some(u32::from_be_bytes([a, b, c, d]))),
            Some(_) => Err(AttrError::Length),
        }
    }

    /// LIFETIME in seconds (RFC 8656 18.2).
    pub fn lifetime(&self) -> Result<Option<u32>, AttrError> {
        self.u32_attr(AttrType::LIFETIME)
    }

    /// CHANNEL-NUMBER as sent (RFC 8656 18.1); the caller checks the range.
    pub fn channel_number(&self) -> Result<Option<u16>, AttrError> {
        Ok(self
            .u32_attr(AttrType::CHANNEL_NUMBER)?
            .map(|v| (v >> 16) as u16))
    }

    /// The protocol number of REQUESTED-TRANSPORT (RFC 8656 18.7).
    pub fn requested_transport(&self) -> Result<Option<u8>, AttrError> {
        Ok(self
            .u32_attr(AttrType::REQUESTED_TRANSPORT)?
            .map(|v| (v >> 24) as u8))
    }

    /// The family byte of REQUESTED-ADDRESS-FAMILY (RFC 8656 18.8).
    pub fn requested_address_family(&self) -> Result<Option<u8>, AttrError> {
        Ok(self
            .u32_attr(AttrType::REQUESTED_ADDRESS_FAMILY)?
            .map(|v| (v >> 24) as u8))
    }

    /// The family byte of ADDITIONAL-ADDRESS-FAMILY (RFC 8656 18.11), or of its draft code
    /// point when the RFC's is absent (see [`AttrType::ADDITIONAL_ADDRESS_FAMILY_DRAFT`]).
    pub fn additional_address_family(&self) -> Result<Option<u8>, AttrError> {
        let v = match self.u32_attr(AttrType::ADDITIONAL_ADDRESS_FAMILY)? {
            Some(v) => Some(v),
            None => self.u32_attr(AttrType::ADDITIONAL_ADDRESS_FAMILY_DRAFT)?,
        };
        Ok(v.map(|v| (v >> 24) as u8))
    }

    /// EVEN-PORT: `Some(reserve_next)` when present (RFC 8656 18.6).
    pub fn even_port(&self) -> Result<Option<bool>, AttrError> {
        match self.get(AttrType::EVEN_PORT) {
            None => Ok(None),
            Some([]) => Err(AttrError::Length),
            Some(v) => Ok(Some(v[0] & 0x80 != 0)),
        }
    }

    /// RESERVATION-TOKEN (8 bytes, RFC 8656 18.9).
    pub fn reservation_token(&self) -> Result<Option<[u8; 8]>, AttrError> {
        match self.get(AttrType::RESERVATION_TOKEN) {
            None => Ok(None),
            Some(v) => v.try_into().map(Some).map_err(|_| AttrError::Length),
        }
    }

    /// CHANGE-REQUEST (RFC 5780 7.2) as its ("change IP", "change port") flags. Bits other
    /// than the two flags are ignored.
    pub fn change_request(&self) -> Result<Option<(bool, bool)>, AttrError> {
        Ok(self
            .u32_attr(AttrType::CHANGE_REQUEST)?
            .map(|v| (v & CHANGE_IP != 0, v & CHANGE_PORT != 0)))
    }

    /// RESPONSE-PORT (RFC 5780 7.5): a 16-bit port followed by two bytes of padding, so a
    /// value of exactly four bytes.
    pub fn response_port(&self) -> Result<Option<u16>, AttrError> {
        Ok(self
            .u32_attr(AttrType::RESPONSE_PORT)?
            .map(|v| (v >> 16) as u16))
    }

    pub fn dont_fragment(&self) -> bool {
        self.has(AttrType::DONT_FRAGMENT)
    }

    /// Every XOR-PEER-ADDRESS, in order (CreatePermission may carry several, RFC 8656 9.1).
    pub fn xor_peer_addresses(&self) -> impl Iterator<Item = Result<SocketAddr, AttrError>> + '_ {
        self.slots[..self.count]
            .iter()
            .filter(|s| s.typ == AttrType::XOR_PEER_ADDRESS.0)
            .map(|s| decode_xor_address(self.value(s), &self.txid))
    }

    /// The first XOR-PEER-ADDRESS.
    pub fn xor_peer_address(&self) -> Result<Option<SocketAddr>, AttrError> {
        self.xor_peer_addresses().next().transpose()
    }

    /// Decodes an XOR address attribute of type `t`.
    pub fn xor_address(&self, t: AttrType) -> Result<Option<SocketAddr>, AttrError> {
        self.get(t)
            .map(|v| decode_xor_address(v, &self.txid))
            .transpose()
    }

    /// DATA (RFC 8656 18.4).
    pub fn data(&self) -> Option<&'a [u8]> {
        self.get(AttrType::DATA)
    }

    /// ERROR-CODE as (code, reason).
    pub fn error_code(&self) -> Result<Option<(u16, &'a str)>, AttrError> {
        self.get(AttrType::ERROR_CODE)
            .map(decode_error_code)
            .transpose()
    }

    /// Which integrity attribute is present; SHA-256 is preferred when both are (RFC 8489 9.2.4).
    pub fn integrity(&self) -> Option<Integrity> {
        if self.mi256.is_some() {
            Some(Integrity::Sha256)
        } else if self.mi.is_some() {
            Some(Integrity::Sha1)
        } else {
            None
        }
    }

    /// The header with its length field set to `len`.
    fn header_with_len(&self, len: usize) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h.copy_from_slice(&self.buf[..HEADER_LEN]);
        h[2..4].copy_from_slice(&(len as u16).to_be_bytes());
        h
    }

    /// Checks MESSAGE-INTEGRITY (HMAC-SHA1, RFC 8489 14.5) with `key`, in constant time.
    pub fn verify_integrity(&self, key: &[u8]) -> bool {
        let Some(off) = self.mi else { return false };
        let off = off as usize;
        let Ok(mut mac) = <Hmac<Sha1> as Mac>::new_from_slice(key) else {
            return false;
        };
        mac.update(&self.header_with_len(off + 24 - HEADER_LEN));
        mac.update(&self.buf[HEADER_LEN..off]);
        mac.verify_slice(&self.buf[off + 4..off + 24]).is_ok()
    }

    /// Checks MESSAGE-INTEGRITY-SHA256 (HMAC-SHA256, possibly truncated, RFC 8489 14.6) with
    /// `key`, in constant time.
    pub fn verify_integrity_sha256(&self, key: &[u8]) -> bool {
        let Some((off, vlen)) = self.mi256 else {
            return false;
        };
        let (off, vlen) = (off as usize, vlen as usize);
        let Ok(mut mac) = <Hmac<Sha256> as Mac>::new_from_slice(key) else {
            return false;
        };
        // MESSAGE-INTEGRITY, if present, comes first and is covered by the SHA-256 MAC.
        mac.update(&self.header_with_len(off + 4 + vlen - HEADER_LEN));
        mac.update(&self.buf[HEADER_LEN..off]);
        mac.verify_truncated_left(&self.buf[off + 4..off + 4 + vlen])
            .is_ok()
    }

    /// Checks the integrity attribute [`Self::integrity`] names with `key`.
    pub fn verify(&self, key: &[u8]) -> bool {
        match self.integrity() {
            Some(Integrity::Sha256) => self.verify_integrity_sha256(key),
            Some(Integrity::Sha1) => self.verify_integrity(key),
            None => false,
        }
    }

    /// `Some(valid)` if the message carries FINGERPRINT.
    pub fn fingerprint_valid(&self) -> Option<bool> {
        let off = self.fp? as usize;
        let mut crc = Crc32::new();
        crc.update(&self.header_with_len(off + 8 - HEADER_LEN));
        crc.update(&self.buf[HEADER_LEN..off]);
        let want = crc.finish() ^ FINGERPRINT_XOR;
        let got = u32::from_be_bytes([
            self.buf[off + 4],
            self.buf[off + 5],
            self.buf[off + 6],
            self.buf[off + 7],
        ]);
        Some(want == got)
    }
}
