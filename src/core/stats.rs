//! Counters kept by the core: plain integers, bumped on the path that counts them and read by
//! whoever exports them. No lock, no label lookup.

use crate::wire::Method;

/// Why an input was dropped without an answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum Drop {
    /// Neither STUN nor ChannelData.
    NotTurn,
    /// A STUN message that does not parse, or a ChannelData frame shorter than it says.
    Malformed,
    /// FINGERPRINT present but wrong.
    BadFingerprint,
    /// A response or an indication the server does not act on.
    Unexpected,
    /// Data for a 5-tuple without an allocation.
    NoAllocation,
    /// ChannelData on a channel that is not bound.
    NoChannel,
    /// Data to or from a peer without a permission.
    NoPermission,
    /// A Send indication without XOR-PEER-ADDRESS or DATA, or with a bad one.
    BadIndication,
    /// A peer address the policy refuses.
    Forbidden,
    /// The output buffer was too small (should not happen with the documented sizes).
    Buffer,
    /// A 401 or 438 beyond the per-address rate.
    RateLimited,
    /// Relayed data beyond the allocation's `max-bps`.
    Bandwidth,
}

impl Drop {
    pub const COUNT: usize = 12;
    pub const ALL: [Drop; Drop::COUNT] = [
        Drop::NotTurn,
        Drop::Malformed,
        Drop::BadFingerprint,
        Drop::Unexpected,
        Drop::NoAllocation,
        Drop::NoChannel,
        Drop::NoPermission,
        Drop::BadIndication,
        Drop::Forbidden,
        Drop::Buffer,
        Drop::RateLimited,
        Drop::Bandwidth,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Drop::NotTurn => "not_turn",
            Drop::Malformed => "malformed",
            Drop::BadFingerprint => "bad_fingerprint",
            Drop::Unexpected => "unexpected",
            Drop::NoAllocation => "no_allocation",
            Drop::NoChannel => "no_channel",
            Drop::NoPermission => "no_permission",
            Drop::BadIndication => "bad_indication",
            Drop::Forbidden => "forbidden",
            Drop::Buffer => "buffer",
            Drop::RateLimited => "rate_limited",
            Drop::Bandwidth => "bandwidth",
        }
    }
}

/// Why an allocation ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(usize)]
pub enum EndReason {
    Expired,
    Refreshed0,
    ConnectionClosed,
}

impl EndReason {
    pub const COUNT: usize = 3;

    pub fn name(self) -> &'static str {
        match self {
            EndReason::Expired => "expired",
            EndReason::Refreshed0 => "deleted_by_client",
            EndReason::ConnectionClosed => "connection_closed",
        }
    }
}

/// The methods counted by [`Stats::requests`], in index order.
pub const COUNTED_METHODS: [Method; 7] = [
    Method::BINDING,
    Method::ALLOCATE,
    Method::REFRESH,
    Method::SEND,
    Method::CREATE_PERMISSION,
    Method::CHANNEL_BIND,
    Method(0),
];

/// Error codes counted by [`Stats::errors`], in index order (the last slot counts any other).
pub const COUNTED_ERRORS: [u16; 14] = [
    300, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 508, 0,
];

#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Requests and indications received, by method (see [`COUNTED_METHODS`]).
    pub requests: [u64; 7],
    /// Error responses sent, by code (see [`COUNTED_ERRORS`]).
    pub errors: [u64; 14],
    pub success_responses: u64,
    pub drops: [u64; Drop::COUNT],
    pub allocations_created: u64,
    pub allocations_ended: [u64; EndReason::COUNT],
    pub permissions_created: u64,
    pub channels_bound: u64,
    pub to_peer_packets: u64,
    pub to_peer_bytes: u64,
    pub to_client_packets: u64,
    pub to_client_bytes: u64,
    /// Requests refused for bad credentials (401 with MESSAGE-INTEGRITY present).
    pub auth_failures: u64,
}

impl Stats {
    pub(crate) fn request(&mut self, m: Method) {
        let i = COUNTED_METHODS[..6]
            .iter()
            .position(|x| *x == m)
            .unwrap_or(6);
        self.requests[i] += 1;
    }

    pub(crate) fn error(&mut self, code: u16) {
        let i = COUNTED_ERRORS[..13]
            .iter()
            .position(|x| *x == code)
            .unwrap_or(13);
        self.errors[i] += 1;
    }

    pub(crate) fn drop(&mut self, d: Drop) {
        self.drops[d as usize] += 1;
    }

    pub fn dropped(&self, d: Drop) -> u64 {
        self.drops[d as usize]
    }

    pub fn errors_with(&self, code: u16) -> u64 {
        COUNTED_ERRORS[..13]
            .iter()
            .position(|x| *x == code)
            .map_or(0, |i| self.errors[i])
    }
}
