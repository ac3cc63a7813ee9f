//! Attribute types (RFC 8489 18.3, RFC 8656 18, RFC 5780) and value codecs for the
//! attributes with structure: addresses, ERROR-CODE, UNKNOWN-ATTRIBUTES.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use super::{MAGIC_COOKIE, TransactionId};

/// An attribute type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AttrType(pub u16);

impl AttrType {
    pub const MAPPED_ADDRESS: AttrType = AttrType(0x0001);
    pub const CHANGE_REQUEST: AttrType = AttrType(0x0003);
    pub const USERNAME: AttrType = AttrType(0x0006);
    pub const MESSAGE_INTEGRITY: AttrType = AttrType(0x0008);
    pub const ERROR_CODE: AttrType = AttrType(0x0009);
    pub const UNKNOWN_ATTRIBUTES: AttrType = AttrType(0x000A);
    pub const CHANNEL_NUMBER: AttrType = AttrType(0x000C);
    pub const LIFETIME: AttrType = AttrType(0x000D);
    pub const XOR_PEER_ADDRESS: AttrType = AttrType(0x0012);
    pub const DATA: AttrType = AttrType(0x0013);
    pub const REALM: AttrType = AttrType(0x0014);
    pub const NONCE: AttrType = AttrType(0x0015);
    pub const XOR_RELAYED_ADDRESS: AttrType = AttrType(0x0016);
    pub const REQUESTED_ADDRESS_FAMILY: AttrType = AttrType(0x0017);
    pub const EVEN_PORT: AttrType = AttrType(0x0018);
    pub const REQUESTED_TRANSPORT: AttrType = AttrType(0x0019);
    pub const DONT_FRAGMENT: AttrType = AttrType(0x001A);
    pub const MESSAGE_INTEGRITY_SHA256: AttrType = AttrType(0x001C);
    pub const PASSWORD_ALGORITHM: AttrType = AttrType(0x001D);
    pub const USERHASH: AttrType = AttrType(0x001E);
    pub const XOR_MAPPED_ADDRESS: AttrType = AttrType(0x0020);
    pub const RESERVATION_TOKEN: AttrType = AttrType(0x0022);
    pub const PRIORITY: AttrType = AttrType(0x0024);
    pub const USE_CANDIDATE: AttrType = AttrType(0x0025);
    pub const PADDING: AttrType = AttrType(0x0026);
    pub const RESPONSE_PORT: AttrType = AttrType(0x0027);
    pub const PASSWORD_ALGORITHMS: AttrType = AttrType(0x8002);
    pub const ALTERNATE_DOMAIN: AttrType = AttrType(0x8003);
    pub const SOFTWARE: AttrType = AttrType(0x8022);
    pub const ALTERNATE_SERVER: AttrType = AttrType(0x8023);
    pub const FINGERPRINT: AttrType = AttrType(0x8028);
    pub const ICE_CONTROLLED: AttrType = AttrType(0x8029);
    pub const ICE_CONTROLLING: AttrType = AttrType(0x802A);
    pub const RESPONSE_ORIGIN: AttrType = AttrType(0x802B);
    pub const OTHER_ADDRESS: AttrType = AttrType(0x802C);
    pub const ADDITIONAL_ADDRESS_FAMILY: AttrType = AttrType(0x8000);
    pub const ADDRESS_ERROR_CODE: AttrType = AttrType(0x8001);
    /// The code point ADDITIONAL-ADDRESS-FAMILY had in the drafts of RFC 8656, still sent by
    /// coturn 4.6's clients (`turnutils_uclient -Z`). IANA has since given it to
    /// ENF-FLOW-DESCRIPTION, which has no business in an Allocate request, so it is read
    /// there only, and only when the RFC's code point is absent.
    pub const ADDITIONAL_ADDRESS_FAMILY_DRAFT: AttrType = AttrType(0x8032);
    pub const ICMP: AttrType = AttrType(0x8004);

    /// Comprehension-required attributes are those below 0x8000 (RFC 8489 14).
    #[inline]
    pub fn comprehension_required(self) -> bool {
        self.0 < 0x8000
    }

    /// The comprehension-required request attributes of RFC 5780 (NAT behaviour discovery).
    /// They are not in [`AttrType::understood`]: only a Binding request received where the
    /// server serves RFC 5780 understands them; anywhere else they get 420 (RFC 5780 6).
    pub const RFC5780_REQUEST: [AttrType; 3] = [
        AttrType::CHANGE_REQUEST,
        AttrType::PADDING,
        AttrType::RESPONSE_PORT,
    ];

    /// Whether this server understands the attribute in every request. A
    /// comprehension-required attribute that is not understood gets a 420 response listing it
    /// (RFC 8489 6.3.1.1).
    pub fn understood(self) -> bool {
        matches!(
            self,
            AttrType::MAPPED_ADDRESS
                | AttrType::USERNAME
                | AttrType::MESSAGE_INTEGRITY
                | AttrType::ERROR_CODE
                | AttrType::UNKNOWN_ATTRIBUTES
                | AttrType::CHANNEL_NUMBER
                | AttrType::LIFETIME
                | AttrType::XOR_PEER_ADDRESS
                | AttrType::DATA
                | AttrType::REALM
                | AttrType::NONCE
                | AttrType::XOR_RELAYED_ADDRESS
                | AttrType::REQUESTED_ADDRESS_FAMILY
                | AttrType::EVEN_PORT
                | AttrType::REQUESTED_TRANSPORT
                | AttrType::DONT_FRAGMENT
                | AttrType::MESSAGE_INTEGRITY_SHA256
                | AttrType::PASSWORD_ALGORITHM
                | AttrType::USERHASH
                | AttrType::XOR_MAPPED_ADDRESS
                | AttrType::RESERVATION_TOKEN
                | AttrType::ADDITIONAL_ADDRESS_FAMILY
                | AttrType::PRIORITY
                | AttrType::USE_CANDIDATE
        ) || !self.comprehension_required()
    }
}

/// The "change IP" flag of CHANGE-REQUEST (RFC 5780 7.2, bit A).
pub const CHANGE_IP: u32 = 0x04;
/// The "change port" flag of CHANGE-REQUEST (RFC 5780 7.2, bit B).
pub const CHANGE_PORT: u32 = 0x02;

/// Address family codes of the address attributes (RFC 8489 14.1).
pub const FAMILY_IPV4: u8 = 0x01;
pub const FAMILY_IPV6: u8 = 0x02;

/// Why an attribute value could not be decoded.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AttrError {
    /// The value has the wrong length for its type.
    Length,
    /// An address attribute names an unknown family.
    Family,
    /// A text attribute is not UTF-8 or too long.
    Text,
    /// A numeric field is out of its range.
    Value,
}

impl std::fmt::Display for AttrError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            AttrError::Length => "bad attribute length",
            AttrError::Family => "unknown address family",
            AttrError::Text => "bad text attribute",
            AttrError::Value => "attribute value out of range",
        })
    }
}

impl std::error::Error for AttrError {}

/// Decodes a MAPPED-ADDRESS style value.
pub fn decode_address(v: &[u8]) -> Result<SocketAddr, AttrError> {
    if v.len() < 4 {
        return Err(AttrError::Length);
    }
    let port = u16::from_be_bytes([v[2], v[3]]);
    match (v[1], v.len()) {
        (FAMILY_IPV4, 8) => {
            let ip = Ipv4Addr::new(v[4], v[5], v[6], v[7]);
            Ok(SocketAddr::new(IpAddr::V4(ip), port))
        }
        (FAMILY_IPV6, 20) => {
            let mut o = [0u8; 16];
            o.copy_from_slice(&v[4..20]);
            Ok(SocketAddr::new(IpAddr::V6(Ipv6Addr::from(o)), port))
        }
        (FAMILY_IPV4 | FAMILY_IPV6, _) => Err(AttrError::Length),
        _ => Err(AttrError::Family),
    }
}

/// Decodes an XOR-MAPPED-ADDRESS style value (RFC 8489 14.2).
pub fn decode_xor_address(v: &[u8], txid: &TransactionId) -> Result<SocketAddr, AttrError> {
    let a = decode_address(v)?;
    Ok(xor_addr(a, txid))
}

/// Applies the XOR mask of RFC 8489 14.2 (its own inverse).
#[inline]
pub fn xor_addr(a: SocketAddr, txid: &TransactionId) -> SocketAddr {
    let port = a.port() ^ (MAGIC_COOKIE >> 16) as u16;
    let ip = match a.ip() {
        IpAddr::V4(ip) => IpAddr::V4(Ipv4Addr::from(u32::from(ip) ^ MAGIC_COOKIE)),
        IpAddr::V6(ip) => {
            let mut o = ip.octets();
            let mut mask = [0u8; 16];
            mask[..4].copy_from_slice(&MAGIC_COOKIE.to_be_bytes());
            mask[4..].copy_from_slice(&txid.0);
            for (b, m) in o.iter_mut().zip(mask) {
                *b ^= m;
            }
            IpAddr::V6(Ipv6Addr::from(o))
        }
    };
    SocketAddr::new(ip, port)
}

/// Encodes an address value into `out`; returns the number of bytes (8 or 20).
#[inline]
pub fn encode_address(a: SocketAddr, out: &mut [u8; 20]) -> usize {
    out[0] = 0;
    out[2..4].copy_from_slice(&a.port().to_be_bytes());
    match a.ip() {
        IpAddr::V4(ip) => {
            out[1] = FAMILY_IPV4;
            out[4..8].copy_from_slice(&ip.octets());
            8
        }
        IpAddr::V6(ip) => {
            out[1] = FAMILY_IPV6;
            out[4..20].copy_from_slice(&ip.octets());
            20
        }
    }
}

/// Decodes ERROR-CODE (RFC 8489 14.8) into the code (300-699) and reason phrase.
pub fn decode_error_code(v: &[u8]) -> Result<(u16, &str), AttrError> {
    if v.len() < 4 {
        return Err(AttrError::Length);
    }
    let class = (v[2] & 0x07) as u16;
    let number = v[3] as u16;
    if !(3..=6).contains(&class) || number > 99 {
        return Err(AttrError::Value);
    }
    let reason = std::str::from_utf8(&v[4..]).map_err(|_| AttrError::Text)?;
    Ok((class * 100 + number, reason))
}

/// The STUN and TURN error codes this server sends, with their reason phrases.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ErrorCode(pub u16);

impl ErrorCode {
    pub const TRY_ALTERNATE: ErrorCode = ErrorCode(300);
    pub const BAD_REQUEST: ErrorCode = ErrorCode(400);
    pub const UNAUTHORIZED: ErrorCode = ErrorCode(401);
    pub const FORBIDDEN: ErrorCode = ErrorCode(403);
    pub const UNKNOWN_ATTRIBUTE: ErrorCode = ErrorCode(420);
    pub const ALLOCATION_MISMATCH: ErrorCode = ErrorCode(437);
    pub const STALE_NONCE: ErrorCode = ErrorCode(438);
    pub const ADDRESS_FAMILY_NOT_SUPPORTED: ErrorCode = ErrorCode(440);
    pub const WRONG_CREDENTIALS: ErrorCode = ErrorCode(441);
    pub const UNSUPPORTED_TRANSPORT_PROTOCOL: ErrorCode = ErrorCode(442);
    pub const PEER_ADDRESS_FAMILY_MISMATCH: ErrorCode = ErrorCode(443);
    pub const ALLOCATION_QUOTA_REACHED: ErrorCode = ErrorCode(486);
    pub const SERVER_ERROR: ErrorCode = ErrorCode(500);
    pub const INSUFFICIENT_CAPACITY: ErrorCode = ErrorCode(508);

    /// The reason phrase the RFCs suggest.
    pub fn reason(self) -> &'static str {
        match self.0 {
            300 => "Try Alternate",
            400 => "Bad Request",
            401 => "Unauthorized",
            403 => "Forbidden",
            420 => "Unknown Attribute",
            437 => "Allocation Mismatch",
            438 => "Stale Nonce",
            440 => "Address Family not Supported",
            441 => "Wrong Credentials",
            442 => "Unsupported Transport Protocol",
            443 => "Peer Address Family Mismatch",
            486 => "Allocation Quota Reached",
            500 => "Server Error",
            508 => "Insufficient Capacity",
            _ => "Error",
        }
    }
}

/// Transport protocol numbers of REQUESTED-TRANSPORT (RFC 8656 18.7).
pub const PROTO_UDP: u8 = 17;
pub const PROTO_TCP: u8 = 6;
