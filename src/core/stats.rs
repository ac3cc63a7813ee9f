//! Counters kept by the core: plain integers, bumped on the path that counts them and read by
//! whoever exports them. No lock, no label lookup.

use super::Transport;
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
    pub const ALL: [EndReason; EndReason::COUNT] = [
        EndReason::Expired,
        EndReason::Refreshed0,
        EndReason::ConnectionClosed,
    ];

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

/// Error codes counted by [`Stats::responses`], in index order after the success slot (the
/// last slot counts any other code).
pub const COUNTED_ERRORS: [u16; 14] = [
    300, 400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 508, 0,
];

/// Outcome slots of [`Stats::responses`]: success, then each of [`COUNTED_ERRORS`].
pub const OUTCOMES: usize = 1 + COUNTED_ERRORS.len();

/// Transports in the index order of [`Stats::to_peer`] and [`Stats::to_client`].
pub const TRANSPORTS: [Transport; 4] = [
    Transport::Udp,
    Transport::Tcp,
    Transport::Tls,
    Transport::Dtls,
];

/// Packets and payload bytes relayed in one direction over one client transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Flow {
    pub packets: u64,
    pub bytes: u64,
}

#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Requests and indications received, by method (see [`COUNTED_METHODS`]).
    pub requests: [u64; 7],
    /// Responses sent, by method and outcome: slot 0 success, slot `i + 1` the error code
    /// `COUNTED_ERRORS[i]`.
    pub responses: [[u64; OUTCOMES]; 7],
    pub drops: [u64; Drop::COUNT],
    pub allocations_created: u64,
    pub allocations_ended: [u64; EndReason::COUNT],
    pub permissions_created: u64,
    pub channels_bound: u64,
    /// Relayed from clients to peers, by the client's transport (see [`TRANSPORTS`]).
    pub to_peer: [Flow; 4],
    /// Relayed from peers to clients, by the client's transport.
    pub to_client: [Flow; 4],
    /// Requests refused for bad credentials (401 with MESSAGE-INTEGRITY present).
    pub auth_failures: u64,
    /// RFC 5780 Binding responses sent from the other address or port (CHANGE-REQUEST).
    pub nat_discovery_other_source: u64,
    /// RFC 5780 Binding responses sent to the port RESPONSE-PORT named.
    pub nat_discovery_response_port: u64,
    /// Binding requests with RFC 5780 attributes refused: 420 where RFC 5780 is not served,
    /// 400 for a malformed or forbidden combination where it is.
    pub nat_discovery_refused: u64,
}

fn method_index(m: Method) -> usize {
    COUNTED_METHODS[..6]
        .iter()
        .position(|x| *x == m)
        .unwrap_or(6)
}

fn error_index(code: u16) -> usize {
    COUNTED_ERRORS[..13]
        .iter()
        .position(|x| *x == code)
        .unwrap_or(13)
}

impl Stats {
    pub(crate) fn request(&mut self, m: Method) {
        self.requests[method_index(m)] += 1;
    }

    /// Counts a response to a request of method `m`: `None` for success, else the error code.
    pub(crate) fn response(&mut self, m: Method, error: Option<u16>) {
        let outcome = error.map_or(0, |code| 1 + error_index(code));
        self.responses[method_index(m)][outcome] += 1;
    }

    pub(crate) fn drop(&mut self, d: Drop) {
        self.drops[d as usize] += 1;
    }

    #[inline]
    pub(crate) fn relayed_to_peer(&mut self, t: Transport, bytes: usize) {
        let f = &mut self.to_peer[t as usize];
        f.packets += 1;
        f.bytes += bytes as u64;
    }

    #[inline]
    pub(crate) fn relayed_to_client(&mut self, t: Transport, bytes: usize) {
        let f = &mut self.to_client[t as usize];
        f.packets += 1;
        f.bytes += bytes as u64;
    }

    pub fn dropped(&self, d: Drop) -> u64 {
        self.drops[d as usize]
    }

    /// Error responses with `code`, whatever the method.
    pub fn errors_with(&self, code: u16) -> u64 {
        COUNTED_ERRORS[..13]
            .iter()
            .position(|x| *x == code)
            .map_or(0, |i| self.responses.iter().map(|m| m[i + 1]).sum())
    }

    /// Success responses, whatever the method.
    pub fn success_responses(&self) -> u64 {
        self.responses.iter().map(|m| m[0]).sum()
    }

    /// Packets relayed toward peers over every transport.
    pub fn to_peer_packets(&self) -> u64 {
        self.to_peer.iter().map(|f| f.packets).sum()
    }

    /// Packets relayed toward clients over every transport.
    pub fn to_client_packets(&self) -> u64 {
        self.to_client.iter().map(|f| f.packets).sum()
    }

    /// Adds `other`'s counts to these (for the total over several shards).
    pub fn add(&mut self, other: &Stats) {
        fn sum(a: &mut [u64], b: &[u64]) {
            a.iter_mut().zip(b).for_each(|(x, y)| *x += y);
        }
        sum(&mut self.requests, &other.requests);
        for (a, b) in self.responses.iter_mut().zip(&other.responses) {
            sum(a, b);
        }
        sum(&mut self.drops, &other.drops);
        self.allocations_created += other.allocations_created;
        sum(&mut self.allocations_ended, &other.allocations_ended);
        self.permissions_created += other.permissions_created;
        self.channels_bound += other.channels_bound;
        for (a, b) in self
            .to_peer
            .iter_mut()
            .zip(&other.to_peer)
            .chain(self.to_client.iter_mut().zip(&other.to_client))
        {
            a.packets += b.packets;
            a.bytes += b.bytes;
        }
        self.auth_failures += other.auth_failures;
        self.nat_discovery_other_source += other.nat_discovery_other_source;
        self.nat_discovery_response_port += other.nat_discovery_response_port;
        self.nat_discovery_refused += other.nat_discovery_refused;
    }
}
