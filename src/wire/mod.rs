//! Zero-copy STUN / TURN codec.
//!
//! * [`classify`] tells a STUN message from a ChannelData frame by its first byte (RFC 7983).
//! * [`MessageRef`] is a borrowed view of one STUN message (RFC 8489 5, 14): the header and the
//!   offsets of its attributes, checked once at parse time; accessors decode on demand.
//! * [`MessageWriter`] writes a message into a caller-provided buffer; MESSAGE-INTEGRITY,
//!   MESSAGE-INTEGRITY-SHA256 and FINGERPRINT are computed over the bytes already written.
//! * [`ChannelData`] is the TURN ChannelData framing (RFC 8656 12.4), and [`frame_len`] splits a
//!   stream transport (TCP, TLS) into messages (RFC 8656 12.5, 4-byte padding).
//!
//! Nothing here allocates, touches a socket or reads a clock.

mod attr;
mod crc32;
mod message;
mod writer;

pub use attr::*;
pub use message::{Integrity, MAX_ATTRS, MessageRef, ParseError, TransactionId};
pub use writer::MessageWriter;

/// The magic cookie of RFC 8489 5.
pub const MAGIC_COOKIE: u32 = 0x2112_A442;
/// Length of the STUN message header.
pub const HEADER_LEN: usize = 20;
/// Length of the ChannelData header.
pub const CHANNEL_DATA_HEADER_LEN: usize = 4;
/// Room a driver leaves in front of a peer datagram so that a ChannelData header or a Data
/// indication header (20-byte header, XOR-PEER-ADDRESS of an IPv6 peer, DATA attribute header)
/// can be written in place without copying the payload.
pub const HEADROOM: usize = HEADER_LEN + 4 + 20 + 4;
/// Room a driver leaves after a peer datagram for padding and a FINGERPRINT attribute.
pub const TAILROOM: usize = 3 + 8 + 1;

/// What the first byte of a datagram or frame says it is (RFC 7983 7).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Stun,
    ChannelData,
    Other,
}

/// Classifies a packet by its first byte: 0-3 STUN, 64-127 ChannelData (RFC 7983 gives
/// TURN channels 64-79; clients of RFC 5766 use channel numbers up to 0x7FFF, so the server,
/// which sees nothing but TURN on a client's 5-tuple, takes the whole old range), anything else
/// other.
#[inline]
pub fn classify(buf: &[u8]) -> Kind {
    match buf.first() {
        Some(0..=3) => Kind::Stun,
        Some(0x40..=0x7F) => Kind::ChannelData,
        _ => Kind::Other,
    }
}

/// STUN method (the 12 method bits of the message type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Method(pub u16);

impl Method {
    pub const BINDING: Method = Method(0x001);
    pub const ALLOCATE: Method = Method(0x003);
    pub const REFRESH: Method = Method(0x004);
    pub const SEND: Method = Method(0x006);
    pub const DATA: Method = Method(0x007);
    pub const CREATE_PERMISSION: Method = Method(0x008);
    pub const CHANNEL_BIND: Method = Method(0x009);

    /// A short lower-case name for logs and metrics.
    pub fn name(self) -> &'static str {
        match self {
            Method::BINDING => "binding",
            Method::ALLOCATE => "allocate",
            Method::REFRESH => "refresh",
            Method::SEND => "send",
            Method::DATA => "data",
            Method::CREATE_PERMISSION => "create_permission",
            Method::CHANNEL_BIND => "channel_bind",
            _ => "other",
        }
    }
}

/// STUN message class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Class {
    Request,
    Indication,
    Success,
    Error,
}

/// Encodes method and class into the 14-bit message type (RFC 8489 5, figure 3).
#[inline]
pub fn message_type(method: Method, class: Class) -> u16 {
    let m = method.0 & 0x0FFF;
    let c: u16 = match class {
        Class::Request => 0b00,
        Class::Indication => 0b01,
        Class::Success => 0b10,
        Class::Error => 0b11,
    };
    (m & 0x000F) | ((m & 0x0070) << 1) | ((m & 0x0F80) << 2) | ((c & 1) << 4) | ((c & 2) << 7)
}

/// Splits a 14-bit message type into method and class.
#[inline]
pub fn split_message_type(t: u16) -> (Method, Class) {
    let m = (t & 0x000F) | ((t >> 1) & 0x0070) | ((t >> 2) & 0x0F80);
    let class = match ((t >> 4) & 1) | ((t >> 7) & 2) {
        0 => Class::Request,
        1 => Class::Indication,
        2 => Class::Success,
        _ => Class::Error,
    };
    (Method(m), class)
}

/// Rounds up to a multiple of four (attribute and stream padding).
#[inline]
pub const fn pad4(n: usize) -> usize {
    (n + 3) & !3
}

/// A bindable TURN channel number. RFC 8656 12 gives 0x4000 through 0x4FFF; RFC 5766, which
/// many deployed clients still follow (coturn's own test client among them), allowed up to
/// 0x7FFF, and refusing those would break them, so the server accepts the old range too.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ChannelNumber(u16);

impl ChannelNumber {
    pub const MIN: u16 = 0x4000;
    pub const MAX: u16 = 0x7FFF;
    /// The top of the range RFC 8656 assigns.
    pub const MAX_RFC8656: u16 = 0x4FFF;

    /// Returns the channel number if it lies in the range a client may bind.
    pub fn new(n: u16) -> Option<Self> {
        (Self::MIN..=Self::MAX)
            .contains(&n)
            .then_some(ChannelNumber(n))
    }

    pub fn get(self) -> u16 {
        self.0
    }
}

/// A borrowed ChannelData message (RFC 8656 12.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChannelData<'a> {
    /// The channel number as sent; may lie outside the bindable range (the caller drops it).
    pub number: u16,
    pub payload: &'a [u8],
}

impl<'a> ChannelData<'a> {
    /// Parses a ChannelData message at the start of `buf`. Bytes after the announced length
    /// (padding, on UDP optional) are ignored. `None` if `buf` is too short for the length it
    /// announces or the first two bits are not 01.
    #[inline]
    pub fn parse(buf: &'a [u8]) -> Option<Self> {
        if buf.len() < CHANNEL_DATA_HEADER_LEN || buf[0] & 0xC0 != 0x40 {
            return None;
        }
        let number = u16::from_be_bytes([buf[0], buf[1]]);
        let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
        let payload = buf.get(CHANNEL_DATA_HEADER_LEN..CHANNEL_DATA_HEADER_LEN + len)?;
        Some(ChannelData { number, payload })
    }

    /// Writes the 4-byte ChannelData header for a payload of `len` bytes into `out`.
    #[inline]
    pub fn write_header(out: &mut [u8; 4], number: ChannelNumber, len: u16) {
        out[..2].copy_from_slice(&number.0.to_be_bytes());
        out[2..].copy_from_slice(&len.to_be_bytes());
    }
}

/// Outcome of [`frame_len`] on the bytes buffered from a stream transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Frame {
    /// A complete frame of this many bytes (padding included) is at the start of the buffer.
    Complete(usize),
    /// More bytes are needed; at least this many in total.
    Incomplete(usize),
    /// The stream does not carry STUN or ChannelData: the connection must be closed.
    Invalid,
}

/// Finds the first frame in bytes buffered from a stream transport (RFC 8656 12.5): a STUN
/// message (20 + length, already a multiple of four) or a ChannelData message padded to a
/// multiple of four.
#[inline]
pub fn frame_len(buf: &[u8]) -> Frame {
    if buf.len() < 4 {
        return match classify(buf) {
            Kind::Other if !buf.is_empty() => Frame::Invalid,
            _ => Frame::Incomplete(4),
        };
    }
    let len = u16::from_be_bytes([buf[2], buf[3]]) as usize;
    let total = match classify(buf) {
        Kind::Stun if len.is_multiple_of(4) => HEADER_LEN + len,
        Kind::ChannelData => CHANNEL_DATA_HEADER_LEN + pad4(len),
        _ => return Frame::Invalid,
    };
    if buf.len() >= total {
        Frame::Complete(total)
    } else {
        Frame::Incomplete(total)
    }
}

#[cfg(test)]
mod tests;
