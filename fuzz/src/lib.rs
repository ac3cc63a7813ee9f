//! The bodies of turnserver's fuzz targets.
//!
//! This one file is compiled twice: as the library of the cargo-fuzz crate (`fuzz/`), which the
//! targets in `fuzz/fuzz_targets/` call, and as a module of the stable test
//! `tests/fuzz_smoke.rs` (through `#[path]`), which runs the same bodies over the seed corpus,
//! the saved regressions and pseudo-random inputs. It depends on nothing but `turnserver` and
//! `std`, so that the test needs no extra dependency.
//!
//! * [`wire_parse`]: arbitrary bytes through the codec. Nothing panics; what parses re-encodes
//!   with `MessageWriter` to a message that parses to the same method, class, transaction ID
//!   and attributes, and integrity and fingerprint written by the writer verify.
//! * [`core_sequence`]: the bytes are a configuration and a sequence of [`Op`]s (clock steps,
//!   client datagrams, authenticated requests, ChannelData, peer datagrams, stream closes) run
//!   against one `Server`. After every operation the server's own `check_invariants()` must
//!   hold, and so must what the harness checks from outside: replies parse and match their
//!   request, successful TURN replies carry integrity that verifies; relayed bytes are intact;
//!   the relay sockets open are exactly the ports counted; nothing is relayed in either
//!   direction without a permission the harness saw granted and not yet expired, ChannelData
//!   only on a live binding to that peer, a Data indication only where there is none; no
//!   allocation outlives the LIFETIME it was granted once the timers due have run. At the end
//!   the clock runs two hours on, after which no allocation, port, relay socket or timer may
//!   be left.
#![forbid(unsafe_code)]

use std::collections::{BTreeSet, HashMap};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::ops::{Range, RangeInclusive};
use std::time::{Duration, Instant};

use turnserver::auth::{Users, long_term_key};
use turnserver::core::{
    CHANNEL_LIFETIME, ClientAction, ClientId, PERMISSION_LIFETIME, PeerAction, RelaySockets,
    Server, ServerConfig, Transport,
};
use turnserver::wire::{
    self, AttrType, ChannelData, ChannelNumber, Class, Frame, HEADER_LEN, Integrity, Kind,
    MessageRef, MessageWriter, Method, ParseError, TransactionId,
};

// ==================================================================================== codec

/// The largest message body a STUN length field can announce that is a multiple of four.
const MAX_BODY: usize = 0xFFFC;

/// Key used to exercise integrity checks on fuzzer-made messages.
const WIRE_KEY: &[u8] = b"fuzz key";

/// Runs the codec over `data`. Panics (a finding) if a parser panics or an invariant of the
/// codec fails.
pub fn wire_parse(data: &[u8]) {
    let kind = wire::classify(data);
    check_frame_len(data, kind);
    check_channel_data(data, kind);
    match MessageRef::parse(data) {
        // (A message type above 0x3FF parses but is not classified as STUN: RFC 7983 gives
        // STUN the first bytes 0-3 only, and the server drops the rest unparsed.)
        Ok(m) => check_message(&m, data),
        Err(ParseError::Truncated) => assert!(data.len() < HEADER_LEN),
        Err(_) => {}
    }
}

fn check_frame_len(data: &[u8], kind: Kind) {
    match wire::frame_len(data) {
        Frame::Complete(n) => {
            assert!(
                n >= 4 && n <= data.len(),
                "frame {n} of {} bytes",
                data.len()
            );
            assert_eq!(n % 4, 0, "stream frames are padded to four");
            let frame = &data[..n];
            assert_eq!(
                wire::frame_len(frame),
                Frame::Complete(n),
                "frame_len of the frame"
            );
            match kind {
                Kind::Stun => {
                    assert!(n >= HEADER_LEN);
                    // A frame cut by frame_len has the length parse wants.
                    let r = MessageRef::parse(frame);
                    assert!(
                        !matches!(r, Err(ParseError::Truncated | ParseError::BadLength)),
                        "frame_len and parse disagree: {r:?}"
                    );
                }
                Kind::ChannelData => {
                    let cd = ChannelData::parse(frame).expect("a ChannelData frame parses");
                    assert_eq!(n, 4 + wire::pad4(cd.payload.len()));
                }
                Kind::Other => panic!("a complete frame of an unknown kind"),
            }
        }
        Frame::Incomplete(n) => {
            assert!(n > data.len(), "incomplete({n}) with {} bytes", data.len());
            assert!(data.is_empty() || kind != Kind::Other);
        }
        Frame::Invalid => assert!(!data.is_empty()),
    }
}

fn check_channel_data(data: &[u8], kind: Kind) {
    match ChannelData::parse(data) {
        Some(cd) => {
            assert_eq!(kind, Kind::ChannelData);
            let len = u16::from_be_bytes([data[2], data[3]]) as usize;
            assert_eq!(cd.number, u16::from_be_bytes([data[0], data[1]]));
            assert_eq!(cd.payload, &data[4..4 + len]);
            if let Some(number) = ChannelNumber::new(cd.number) {
                let mut h = [0u8; 4];
                ChannelData::write_header(&mut h, number, len as u16);
                assert_eq!(h, data[..4]);
            }
        }
        None => {
            if kind == Kind::ChannelData && data.len() >= 4 {
                let len = u16::from_be_bytes([data[2], data[3]]) as usize;
                assert!(
                    4 + len > data.len(),
                    "ChannelData refused although complete"
                );
            }
        }
    }
}

/// The attributes of a message as (type, value) pairs, for comparisons.
fn attrs<'a>(m: &MessageRef<'a>) -> Vec<(u16, &'a [u8])> {
    m.attributes().map(|(t, v)| (t.0, v)).collect()
}

fn check_message(m: &MessageRef, data: &[u8]) {
    assert_eq!(m.as_bytes(), data);
    assert_eq!(
        MessageRef::header(data),
        Some((m.method(), m.class(), *m.transaction_id()))
    );
    let list = attrs(m);
    assert!(list.len() <= wire::MAX_ATTRS);
    for (t, v) in &list {
        let t = AttrType(*t);
        assert!(
            t != AttrType::MESSAGE_INTEGRITY
                && t != AttrType::MESSAGE_INTEGRITY_SHA256
                && t != AttrType::FINGERPRINT,
            "integrity and fingerprint are not listed as attributes"
        );
        // get() and range_of() find the first of a type.
        let first = list.iter().find(|(u, _)| *u == t.0).map(|(_, v)| *v);
        assert_eq!(m.get(t), first);
        assert!(m.has(t));
        let r = m.range_of(t).expect("range of a present attribute");
        assert_eq!(Some(&data[r]), first);
        assert!(v.len() <= u16::MAX as usize);
    }
    let mut unknown = [0u16; 8];
    let n = m.unknown_required(&mut unknown);
    assert!(n <= unknown.len());
    for t in &unknown[..n] {
        assert!(!AttrType(*t).understood() && AttrType(*t).comprehension_required());
    }

    // Every accessor the server uses: none may panic, whatever the values.
    let _ = (m.username(), m.realm(), m.nonce(), m.software());
    let _ = (m.lifetime(), m.channel_number(), m.requested_transport());
    let _ = (m.requested_address_family(), m.additional_address_family());
    let _ = (
        m.even_port(),
        m.reservation_token(),
        m.dont_fragment(),
        m.data(),
    );
    let _ = (m.xor_peer_address(), m.xor_peer_addresses().count());
    let _ = m.xor_address(AttrType::XOR_MAPPED_ADDRESS);
    let _ = m.xor_address(AttrType::XOR_RELAYED_ADDRESS);
    let _ = m.get(AttrType::MAPPED_ADDRESS).map(wire::decode_address);
    let _ = (m.verify(WIRE_KEY), m.verify_integrity(WIRE_KEY));
    let _ = m.verify_integrity_sha256(WIRE_KEY);
    let _ = m.fingerprint_valid();
    if let Ok(Some(lifetime)) = m.lifetime() {
        assert_eq!(m.get(AttrType::LIFETIME), Some(&lifetime.to_be_bytes()[..]));
    }

    let cap = (data.len() + 128).min(HEADER_LEN + MAX_BODY);
    let mut buf = vec![0u8; cap];

    // Plain re-encoding: same method, class, transaction ID and attribute list.
    let n = rewrite(m, &mut buf, |_| {}).expect("a subset of the message fits its size");
    let again = MessageRef::parse(&buf[..n]).expect("the re-encoded message parses");
    assert_same(m, &again);
    assert_eq!(again.integrity(), None);
    assert_eq!(again.fingerprint_valid(), None);

    // With the writer's integrity and fingerprint: they verify, and the attributes stay.
    type Seal = fn(&mut MessageWriter);
    let seals: [(Seal, Integrity); 3] = [
        (
            |w| {
                w.add_integrity(WIRE_KEY);
            },
            Integrity::Sha1,
        ),
        (
            |w| {
                w.add_integrity_sha256(WIRE_KEY);
            },
            Integrity::Sha256,
        ),
        (
            |w| {
                w.add_integrity(WIRE_KEY).add_integrity_sha256(WIRE_KEY);
            },
            Integrity::Sha256,
        ),
    ];
    for (seal, kind) in seals {
        let Some(n) = rewrite(m, &mut buf, |w| {
            seal(w);
            w.add_fingerprint();
        }) else {
            // Only a message close to the largest size can fail to take 68 more bytes.
            assert!(data.len() + 68 > HEADER_LEN + MAX_BODY);
            continue;
        };
        let sealed = MessageRef::parse(&buf[..n]).expect("the sealed message parses");
        assert_same(m, &sealed);
        assert_eq!(sealed.integrity(), Some(kind));
        assert!(
            sealed.verify(WIRE_KEY),
            "writer's integrity does not verify"
        );
        assert!(!sealed.verify(b"another key"));
        if kind == Integrity::Sha1 {
            assert!(sealed.verify_integrity(WIRE_KEY));
        } else {
            assert!(sealed.verify_integrity_sha256(WIRE_KEY));
        }
        assert_eq!(sealed.fingerprint_valid(), Some(true));
    }

    // Structured values written back by the writer decode to themselves.
    let txid = *m.transaction_id();
    for peer in m.xor_peer_addresses().flatten() {
        let mut w = MessageWriter::new(&mut buf, m.method(), m.class(), &txid);
        w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        let n = w.finish().expect("room for one address");
        let back = MessageRef::parse(&buf[..n]).expect("address message parses");
        assert_eq!(back.xor_peer_address(), Ok(Some(peer)));
    }
    if let Ok(Some((code, reason))) = m.error_code()
        && reason.len() <= 763
    {
        let mut w = MessageWriter::new(&mut buf, m.method(), m.class(), &txid);
        w.add_error_reason(code, reason);
        let n = w.finish().expect("room for an error code");
        let back = MessageRef::parse(&buf[..n]).expect("error message parses");
        assert_eq!(back.error_code(), Ok(Some((code, reason))));
    }
}

/// Writes `m`'s method, class, transaction ID and attributes, in order, then what `seal` adds.
fn rewrite(m: &MessageRef, buf: &mut [u8], seal: impl FnOnce(&mut MessageWriter)) -> Option<usize> {
    let mut w = MessageWriter::new(buf, m.method(), m.class(), m.transaction_id());
    for (t, v) in m.attributes() {
        w.add(t, v);
    }
    seal(&mut w);
    w.finish()
}

fn assert_same(a: &MessageRef, b: &MessageRef) {
    assert_eq!(a.method(), b.method());
    assert_eq!(a.class(), b.class());
    assert_eq!(a.transaction_id(), b.transaction_id());
    assert_eq!(attrs(a), attrs(b), "attributes differ after re-encoding");
}

// ============================================================================ byte streams

/// Reads the fuzzer's bytes; past the end every read gives zeros, so any input is a program.
pub struct Input<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> Input<'a> {
    pub fn new(data: &'a [u8]) -> Self {
        Input { data, pos: 0 }
    }

    pub fn is_empty(&self) -> bool {
        self.pos >= self.data.len()
    }

    pub fn u8(&mut self) -> u8 {
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    pub fn u16(&mut self) -> u16 {
        u16::from_be_bytes([self.u8(), self.u8()])
    }

    /// Up to `n` bytes (fewer at the end of the input).
    pub fn bytes(&mut self, n: usize) -> Vec<u8> {
        let start = self.pos.min(self.data.len());
        let end = (start + n).min(self.data.len());
        self.pos = start + n;
        self.data[start..end].to_vec()
    }
}

// ============================================================================= operations

/// The first two bytes of a `core_sequence` input: which server to build.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Setup {
    /// Bit 0 auth on, 1 fingerprint, 2 loopback peers, 3 an IPv6 relay address too,
    /// 4 caps of 2 permissions and 2 channels, 5 quotas (2 per user, 3 in total),
    /// 6 short lifetimes (default 60 s, max 120 s), 7 short nonce lifetime (30 s).
    pub flags: u8,
    /// Bit 0 an external (advertised) address, 1 no SOFTWARE, 2-3 where the eight relay ports
    /// lie ([`PORT_BASES`]).
    pub flags2: u8,
}

pub const SETUP_AUTH: u8 = 1;
pub const SETUP_FINGERPRINT: u8 = 2;
pub const SETUP_LOOPBACK: u8 = 4;
pub const SETUP_IPV6_RELAY: u8 = 8;
pub const SETUP_SMALL_CAPS: u8 = 16;
pub const SETUP_QUOTAS: u8 = 32;
pub const SETUP_SHORT_LIFETIMES: u8 = 64;
pub const SETUP_SHORT_NONCES: u8 = 128;

/// A structured request: a well-formed message by default; the flags add or spoil parts.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Request {
    pub client: u8,
    /// 0 Allocate, 1 Refresh, 2 CreatePermission, 3 ChannelBind, 4 Binding, 5 Send
    /// indication, 6 Binding indication, 7 an unknown method.
    pub method: u8,
    pub flags: u16,
    /// 0 none, 1-3 alice with MESSAGE-INTEGRITY, 4 alice with MESSAGE-INTEGRITY-SHA256,
    /// 5 bob, 6 alice with a wrong password, 7 alice with both integrity attributes. USERNAME,
    /// REALM and the last NONCE the server gave this client's address go with it.
    pub auth: u8,
    /// REQUESTED-TRANSPORT protocol ([`REQ_TRANSPORT`]); 0 leaves it out.
    pub transport: u8,
    /// LIFETIME in seconds ([`REQ_LIFETIME`]).
    pub lifetime: u16,
    /// EVEN-PORT's first byte ([`REQ_EVEN_PORT`]).
    pub even: u8,
    /// A made-up RESERVATION-TOKEN ([`REQ_TOKEN_GARBAGE`]).
    pub token: [u8; 8],
    /// REQUESTED-ADDRESS-FAMILY ([`REQ_FAMILY`]).
    pub family: u8,
    /// ADDITIONAL-ADDRESS-FAMILY ([`REQ_ADDITIONAL`]).
    pub additional: u8,
    /// XOR-PEER-ADDRESS, an index into [`PEERS`] (and the relay addresses).
    pub peer: u8,
    /// A second XOR-PEER-ADDRESS ([`REQ_PEER2`]).
    pub peer2: u8,
    /// CHANNEL-NUMBER, by [`channel_number`].
    pub channel: u8,
    /// DATA of a Send indication.
    pub data: Vec<u8>,
    /// ([`REQ_CORRUPT`]) xor `corrupt.1` into the byte at `corrupt.0 % len` after sealing.
    pub corrupt: (u16, u8),
}

/// Request flags.
pub const REQ_TRANSPORT: u16 = 1;
pub const REQ_LIFETIME: u16 = 1 << 1;
pub const REQ_EVEN_PORT: u16 = 1 << 2;
/// RESERVATION-TOKEN: the last one the server gave out (or zeros if none yet).
pub const REQ_TOKEN: u16 = 1 << 3;
pub const REQ_FAMILY: u16 = 1 << 4;
pub const REQ_ADDITIONAL: u16 = 1 << 5;
pub const REQ_PEER2: u16 = 1 << 6;
/// Leaves out the XOR-PEER-ADDRESS, CHANNEL-NUMBER and DATA the method would carry.
pub const REQ_OMIT: u16 = 1 << 7;
/// An unknown comprehension-required attribute.
pub const REQ_UNKNOWN_ATTR: u16 = 1 << 8;
pub const REQ_DONT_FRAGMENT: u16 = 1 << 9;
pub const REQ_NO_FINGERPRINT: u16 = 1 << 10;
/// Reuses the client's previous transaction ID (a retransmission).
pub const REQ_RETRANSMIT: u16 = 1 << 11;
pub const REQ_CORRUPT: u16 = 1 << 12;
/// The token is read from the input instead of the last one given out.
pub const REQ_TOKEN_GARBAGE: u16 = 1 << 13;
/// SOFTWARE after the integrity attribute (ignored by the parser) and a zero-length DATA.
pub const REQ_TRAILING: u16 = 1 << 14;

/// One step of a `core_sequence` program.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Moves the clock. `mode % 4`: 0 `amount` milliseconds, 1 `amount % 1024` seconds, 2
    /// `amount % 8192` seconds, each running every timer due on the way as a driver would; 3
    /// `amount % 1024` seconds without running timers (a late driver).
    Advance {
        mode: u8,
        amount: u16,
    },
    /// Raw bytes from a client (cut into frames with `frame_len` on stream transports).
    Raw {
        client: u8,
        bytes: Vec<u8>,
    },
    Request(Request),
    /// ChannelData from a client. `shape % 4`: 0 exact, 1 length field one too long,
    /// 2 one too short, 3 padded to four (always padded on streams).
    ChannelData {
        client: u8,
        channel: u8,
        shape: u8,
        payload: Vec<u8>,
    },
    /// A datagram from [`PEERS`]`[peer]` arriving at a relay socket chosen by `relay`.
    /// `size` < 0xF0 means the `payload` bytes; otherwise `payload` is ignored and
    /// ((`size` - 0xEF) * 4000) zero bytes are sent (0xFF: 65 500, more than fits a Data
    /// indication).
    Peer {
        relay: u8,
        peer: u8,
        size: u8,
        payload: Vec<u8>,
    },
    /// A stream client's connection closes.
    Close {
        client: u8,
    },
    /// Makes a relay port refuse (or accept again) to be bound.
    TogglePort {
        port: u8,
    },
    /// `handle_timeout` now, whether or not something is due.
    Timeout,
}

const OP_KINDS: u8 = 8;

impl Op {
    pub fn decode(inp: &mut Input) -> Op {
        match inp.u8() % OP_KINDS {
            0 => Op::Advance {
                mode: inp.u8(),
                amount: inp.u16(),
            },
            1 => {
                let client = inp.u8();
                let n = inp.u16() as usize % 2048;
                Op::Raw {
                    client,
                    bytes: inp.bytes(n),
                }
            }
            2 => Op::Request(Request::decode(inp)),
            3 => {
                let (client, channel, shape) = (inp.u8(), inp.u8(), inp.u8());
                let n = inp.u8() as usize;
                Op::ChannelData {
                    client,
                    channel,
                    shape,
                    payload: inp.bytes(n),
                }
            }
            4 => {
                let (relay, peer, size) = (inp.u8(), inp.u8(), inp.u8());
                let payload = if size < 0xF0 {
                    inp.bytes(size as usize)
                } else {
                    Vec::new()
                };
                Op::Peer {
                    relay,
                    peer,
                    size,
                    payload,
                }
            }
            5 => Op::Close { client: inp.u8() },
            6 => Op::TogglePort { port: inp.u8() },
            _ => Op::Timeout,
        }
    }

    /// The bytes [`Op::decode`] reads back as this operation (used to write seeds).
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Advance { mode, amount } => {
                out.extend([0, *mode]);
                out.extend(amount.to_be_bytes());
            }
            Op::Raw { client, bytes } => {
                out.extend([1, *client]);
                out.extend((bytes.len() as u16).to_be_bytes());
                out.extend(bytes);
            }
            Op::Request(r) => {
                out.push(2);
                r.encode(out);
            }
            Op::ChannelData {
                client,
                channel,
                shape,
                payload,
            } => {
                out.extend([3, *client, *channel, *shape, payload.len() as u8]);
                out.extend(payload);
            }
            Op::Peer {
                relay,
                peer,
                size,
                payload,
            } => {
                out.extend([4, *relay, *peer, *size]);
                if *size < 0xF0 {
                    out.extend(payload);
                }
            }
            Op::Close { client } => out.extend([5, *client]),
            Op::TogglePort { port } => out.extend([6, *port]),
            Op::Timeout => out.push(7),
        }
    }
}

impl Request {
    fn decode(inp: &mut Input) -> Request {
        let mut r = Request {
            client: inp.u8(),
            method: inp.u8(),
            flags: inp.u16(),
            auth: inp.u8(),
            peer: inp.u8(),
            channel: inp.u8(),
            ..Request::default()
        };
        let f = r.flags;
        if f & REQ_TRANSPORT != 0 {
            r.transport = inp.u8();
        }
        if f & REQ_LIFETIME != 0 {
            r.lifetime = inp.u16();
        }
        if f & REQ_EVEN_PORT != 0 {
            r.even = inp.u8();
        }
        if f & REQ_TOKEN_GARBAGE != 0 {
            let t = inp.bytes(8);
            r.token[..t.len()].copy_from_slice(&t);
        }
        if f & REQ_FAMILY != 0 {
            r.family = inp.u8();
        }
        if f & REQ_ADDITIONAL != 0 {
            r.additional = inp.u8();
        }
        if f & REQ_PEER2 != 0 {
            r.peer2 = inp.u8();
        }
        if r.method % 8 == 5 {
            let n = inp.u8() as usize;
            r.data = inp.bytes(n);
        }
        if f & REQ_CORRUPT != 0 {
            r.corrupt = (inp.u16(), inp.u8());
        }
        r
    }

    fn encode(&self, out: &mut Vec<u8>) {
        out.extend([self.client, self.method]);
        out.extend(self.flags.to_be_bytes());
        out.extend([self.auth, self.peer, self.channel]);
        let f = self.flags;
        if f & REQ_TRANSPORT != 0 {
            out.push(self.transport);
        }
        if f & REQ_LIFETIME != 0 {
            out.extend(self.lifetime.to_be_bytes());
        }
        if f & REQ_EVEN_PORT != 0 {
            out.push(self.even);
        }
        if f & REQ_TOKEN_GARBAGE != 0 {
            out.extend(self.token);
        }
        if f & REQ_FAMILY != 0 {
            out.push(self.family);
        }
        if f & REQ_ADDITIONAL != 0 {
            out.push(self.additional);
        }
        if f & REQ_PEER2 != 0 {
            out.push(self.peer2);
        }
        if self.method % 8 == 5 {
            out.push(self.data.len() as u8);
            out.extend(&self.data);
        }
        if f & REQ_CORRUPT != 0 {
            out.extend(self.corrupt.0.to_be_bytes());
            out.push(self.corrupt.1);
        }
    }
}

/// Encodes a whole program: the setup, then the operations.
pub fn encode_program(setup: Setup, ops: &[Op]) -> Vec<u8> {
    let mut out = vec![setup.flags, setup.flags2];
    for op in ops {
        op.encode(&mut out);
    }
    out
}

/// Decodes a program as [`core_sequence`] does (at most [`MAX_OPS`] operations).
pub fn decode_program(data: &[u8]) -> (Setup, Vec<Op>) {
    let mut inp = Input::new(data);
    let setup = Setup {
        flags: inp.u8(),
        flags2: inp.u8(),
    };
    let mut ops = Vec::new();
    while !inp.is_empty() && ops.len() < MAX_OPS {
        ops.push(Op::decode(&mut inp));
    }
    (setup, ops)
}

// ========================================================================= the test world

/// Operations per input; the rest of a longer input is ignored.
pub const MAX_OPS: usize = 256;
/// Relay ports: eight, from one of these (`Setup::flags2` bits 2-3): the usual, the top of the
/// port space, an odd start, and low.
const PORT_BASES: [u16; 4] = [50000, 65528, 50001, 1024];
const PORTS: u16 = 8;
const REALM: &str = "example.org";
const USERS: [(&str, &str); 2] = [("alice", "secret"), ("bob", "builder")];

fn relay_ip4() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(192, 0, 2, 10))
}

fn relay_ip6() -> IpAddr {
    IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x10))
}

fn external_ip() -> IpAddr {
    IpAddr::V4(Ipv4Addr::new(203, 0, 113, 77))
}

/// The clients: two UDP 5-tuples on one address, TCP and TLS on another address, DTLS and UDP
/// over IPv6.
pub const CLIENTS: usize = 6;

fn client(i: u8) -> ClientId {
    let v4 = SocketAddr::from(([192, 0, 2, 1], 3478));
    let v6 = SocketAddr::new(relay_ip6(), 3478);
    let c6 = IpAddr::V6(Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1));
    let (transport, remote, local) = match i as usize % CLIENTS {
        0 => (
            Transport::Udp,
            SocketAddr::from(([198, 51, 100, 1], 40000)),
            v4,
        ),
        1 => (
            Transport::Udp,
            SocketAddr::from(([198, 51, 100, 1], 40001)),
            v4,
        ),
        2 => (
            Transport::Tcp,
            SocketAddr::from(([198, 51, 100, 2], 40000)),
            v4,
        ),
        3 => (
            Transport::Tls,
            SocketAddr::from(([198, 51, 100, 2], 40000)),
            v4,
        ),
        4 => (Transport::Dtls, SocketAddr::new(c6, 40000), v6),
        _ => (Transport::Udp, SocketAddr::new(c6, 40002), v6),
    };
    ClientId {
        transport,
        remote,
        local,
    }
}

/// Peers: public IPv4 (two ports of one address, and another address), the server's own relay
/// address on its listening port and (index 3) on the second relay port, private, loopback,
/// public IPv6, IPv4-mapped IPv6 (private and public).
pub const PEERS: [&str; 10] = [
    "8.8.4.4:7000",
    "8.8.4.4:7001",
    "9.9.9.1:7000",
    "192.0.2.10:0", // the port is replaced by the second relay port
    "192.0.2.10:3478",
    "10.0.0.1:7000",
    "127.0.0.1:7000",
    "[2606:4700::1111]:7000",
    "[::ffff:10.0.0.1]:7000",
    "[::ffff:8.8.4.4]:7000",
];

fn peer(i: u8, min_port: u16) -> SocketAddr {
    match i as usize % PEERS.len() {
        3 => SocketAddr::new(relay_ip4(), min_port + 1),
        i => PEERS[i].parse().expect("peer table parses"),
    }
}

/// Channel numbers: mostly the first four of the range, then its edges and beyond.
pub fn channel_number(c: u8) -> u16 {
    match c {
        0..=0xEF => 0x4000 + (c as u16 & 3),
        0xF0 => 0x3FFF,
        0xF1 => 0x4FFF,
        0xF2 => 0x5000,
        0xF3 => 0x7FFF,
        0xF4 => 0x8000,
        0xF5 => 0x0000,
        0xF6 => 0xFFFF,
        c => 0x4000 + c as u16,
    }
}

/// The driver's relay sockets, checked: no address opened twice or closed unopened.
struct Relays {
    ports: RangeInclusive<u16>,
    open: BTreeSet<SocketAddr>,
    /// Ports that fail to bind, as if another program held them.
    taken: BTreeSet<u16>,
    opened: u64,
    closed: u64,
}

impl RelaySockets for Relays {
    fn open(&mut self, addr: SocketAddr) -> bool {
        assert!(
            self.ports.contains(&addr.port()),
            "relay socket {addr} outside the port range"
        );
        assert!(
            addr.ip() == relay_ip4() || addr.ip() == relay_ip6(),
            "relay socket {addr} on an address not configured"
        );
        if self.taken.contains(&addr.port()) {
            return false;
        }
        assert!(self.open.insert(addr), "relay socket {addr} opened twice");
        self.opened += 1;
        true
    }

    fn close(&mut self, addr: SocketAddr) {
        assert!(
            self.open.remove(&addr),
            "relay socket {addr} closed but not open"
        );
        self.closed += 1;
    }
}

/// What one run reached, for tests that check the seeds still go deep.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Summary {
    pub ops: usize,
    pub allocations: u64,
    pub success_responses: u64,
    /// ChannelData from a client sent on to a peer.
    pub channel_to_peer: u64,
    /// Send indications sent on to a peer.
    pub send_to_peer: u64,
    /// Peer datagrams sent to a client as ChannelData.
    pub channel_to_client: u64,
    /// Peer datagrams sent to a client as Data indications.
    pub data_to_client: u64,
    /// Bit i set: an error reply with code [`ERROR_CODES`]`[i]` was seen.
    pub error_codes: u32,
}

/// The error codes [`Summary::error_codes`] records.
pub const ERROR_CODES: [u16; 13] = [
    400, 401, 403, 420, 437, 438, 440, 441, 442, 443, 486, 500, 508,
];

struct World {
    s: Server,
    relays: Relays,
    min_port: u16,
    /// When each client's allocation expires, from the LIFETIME of the replies it got.
    expiry: [Option<Instant>; CLIENTS],
    /// Permissions granted, by client and peer IP, from successful CreatePermission and
    /// ChannelBind: until when (RFC 8656 9: 300 s, refreshed, never shortened).
    perms: HashMap<(usize, IpAddr), Instant>,
    /// Channels bound, by client and number: the peer, and until when (600 s).
    chans: HashMap<(usize, u16), (SocketAddr, Instant)>,
    now: Instant,
    users: Option<Users>,
    nonces: HashMap<SocketAddr, Vec<u8>>,
    last_txid: [TransactionId; CLIENTS],
    token: [u8; 8],
    txn: u64,
    out: Vec<u8>,
    summary: Summary,
}

/// Upper bound on `handle_timeout` calls for one clock step (each strictly passes a deadline,
/// so a few thousand at most are possible with eight allocations).
const MAX_TIMER_STEPS: usize = 100_000;

impl World {
    fn new(setup: Setup) -> Self {
        let f = setup.flags;
        let users = (f & SETUP_AUTH != 0).then(|| {
            let mut u = Users::new(REALM);
            for (name, pass) in USERS {
                u.add_password(name, pass);
            }
            u
        });
        let mut cfg = ServerConfig::new(relay_ip4(), users.clone());
        let min_port = PORT_BASES[(setup.flags2 >> 2 & 3) as usize];
        cfg.min_port = min_port;
        cfg.max_port = min_port + (PORTS - 1);
        cfg.fingerprint = f & SETUP_FINGERPRINT != 0;
        cfg.allow_loopback_peers = f & SETUP_LOOPBACK != 0;
        if f & SETUP_IPV6_RELAY != 0 {
            cfg.relay_ips.push(relay_ip6());
        }
        if f & SETUP_SMALL_CAPS != 0 {
            cfg.max_permissions = 2;
            cfg.max_channels = 2;
        }
        if f & SETUP_QUOTAS != 0 {
            cfg.user_quota = 2;
            cfg.total_quota = 3;
        }
        (cfg.default_lifetime, cfg.max_lifetime) = if f & SETUP_SHORT_LIFETIMES != 0 {
            (60, 120)
        } else {
            (600, 3600)
        };
        cfg.stale_nonce = if f & SETUP_SHORT_NONCES != 0 { 30 } else { 600 };
        if setup.flags2 & 1 != 0 {
            cfg.external_ips.push((external_ip(), None));
        }
        if setup.flags2 & 2 != 0 {
            cfg.software.clear();
        }
        let now = Instant::now();
        World {
            s: Server::new(cfg, [0x5a; 32], 7, now),
            relays: Relays {
                ports: min_port..=min_port + (PORTS - 1),
                open: BTreeSet::new(),
                taken: BTreeSet::new(),
                opened: 0,
                closed: 0,
            },
            min_port,
            expiry: [None; CLIENTS],
            perms: HashMap::new(),
            chans: HashMap::new(),
            now,
            users,
            nonces: HashMap::new(),
            last_txid: [TransactionId::default(); CLIENTS],
            token: [0; 8],
            txn: 0,
            out: vec![0u8; 2048],
            summary: Summary::default(),
        }
    }

    /// The checks after every operation.
    fn check(&mut self) {
        if let Err(e) = self.s.check_invariants() {
            panic!("check_invariants: {e}");
        }
        // A dual allocation holds two sockets (IPv4 and IPv6) on one port.
        let ports: BTreeSet<u16> = self.relays.open.iter().map(|a| a.port()).collect();
        assert_eq!(
            ports.len(),
            self.s.ports_in_use(),
            "relay ports open vs ports in use"
        );
        let st = self.s.stats();
        let ended: u64 = st.allocations_ended.iter().sum();
        assert_eq!(
            st.allocations_created - ended,
            self.s.allocation_count() as u64,
            "allocations created - ended != alive"
        );
        let mut seen = 0;
        for i in 0..CLIENTS as u8 {
            let info = self.s.allocation_info(&client(i));
            if info.is_none() {
                self.forget(i as usize);
            }
            if let Some((relay, perms, channels)) = info {
                seen += 1;
                assert!(
                    self.relays.open.contains(&relay),
                    "allocation on {relay} without an open socket"
                );
                assert!(perms <= self.s.config().max_permissions);
                assert!(channels <= self.s.config().max_channels);
            }
        }
        assert_eq!(
            seen,
            self.s.allocation_count(),
            "allocations of unknown clients"
        );
    }

    /// Drops what the harness knows of a client's allocation (it is gone, or replaced).
    fn forget(&mut self, ci: usize) {
        self.expiry[ci] = None;
        self.perms.retain(|(c, _), _| *c != ci);
        self.chans.retain(|(c, _), _| *c != ci);
    }

    /// Whether the harness saw a permission for `ip` granted to `ci` that is still valid.
    fn permitted(&self, ci: usize, ip: IpAddr) -> bool {
        self.perms.get(&(ci, ip)).is_some_and(|t| *t > self.now)
    }

    /// Runs every timer due up to `target` as a driver would, then sets the clock there.
    fn advance_to(&mut self, target: Instant) {
        for _ in 0..MAX_TIMER_STEPS {
            match self.s.poll_timeout() {
                Some(t) if t <= target => {
                    self.now = self.now.max(t);
                    self.timeout();
                }
                _ => {
                    self.now = self.now.max(target);
                    self.check_lifetimes();
                    return;
                }
            }
        }
        panic!("timers still due after {MAX_TIMER_STEPS} handle_timeout calls");
    }

    fn timeout(&mut self) {
        self.s.handle_timeout(self.now, &mut self.relays);
        if let Some(t) = self.s.poll_timeout() {
            assert!(t > self.now, "handle_timeout left a deadline due");
        }
        self.check_lifetimes();
    }

    /// Timers run on time: once the timers due have run, no allocation outlives the lifetime
    /// it was granted.
    fn check_lifetimes(&self) {
        for i in 0..CLIENTS {
            if self.s.allocation_info(&client(i as u8)).is_some() {
                let e = self.expiry[i].expect("an allocation whose creation was not seen");
                assert!(
                    e > self.now,
                    "allocation of client {i} outlived its lifetime"
                );
            }
        }
    }

    fn run(&mut self, op: &Op) {
        match op {
            Op::Advance { mode, amount } => {
                let a = *amount as u64;
                let step = match mode % 4 {
                    0 => Duration::from_millis(a),
                    1 | 3 => Duration::from_secs(a % 1024),
                    _ => Duration::from_secs(a % 8192),
                };
                if mode % 4 == 3 {
                    self.now += step;
                } else {
                    self.advance_to(self.now + step);
                }
            }
            Op::Raw { client, bytes } => self.deliver(*client, bytes, None),
            Op::Request(r) => self.request(r),
            Op::ChannelData {
                client: c,
                channel,
                shape,
                payload,
            } => {
                let len = payload.len() as u16;
                let declared = match shape % 4 {
                    1 => len.wrapping_add(1),
                    2 => len.saturating_sub(1),
                    _ => len,
                };
                let mut frame = Vec::with_capacity(payload.len() + 8);
                frame.extend(channel_number(*channel).to_be_bytes());
                frame.extend(declared.to_be_bytes());
                frame.extend(payload);
                if shape % 4 == 3 || client(*c).transport.is_stream() {
                    frame.resize(wire::pad4(frame.len()), 0);
                }
                self.deliver(*c, &frame, None);
            }
            Op::Peer {
                relay,
                peer: p,
                size,
                payload,
            } => {
                let zeros;
                let payload: &[u8] = if *size < 0xF0 {
                    payload
                } else {
                    let n = match size {
                        0xFF => 65_500,
                        s => (*s as usize - 0xEF) * 4000,
                    };
                    zeros = vec![0u8; n];
                    &zeros
                };
                let relay = self.pick_relay(*relay);
                self.peer_datagram(relay, peer(*p, self.min_port), payload);
            }
            Op::Close { client: c } => {
                let id = client(*c);
                if id.transport.is_stream() {
                    self.s.handle_client_closed(id, &mut self.relays);
                }
            }
            Op::TogglePort { port } => {
                let p = self.min_port + (*port as u16 % PORTS);
                if !self.relays.taken.remove(&p) {
                    self.relays.taken.insert(p);
                }
            }
            Op::Timeout => self.timeout(),
        }
    }

    /// Mostly an open relay socket; sometimes a port in the range with no socket, or outside.
    fn pick_relay(&self, r: u8) -> SocketAddr {
        let open: Vec<SocketAddr> = self.relays.open.iter().copied().collect();
        match r {
            0..=0xDF if !open.is_empty() => open[r as usize % open.len()],
            0xFF => SocketAddr::new(relay_ip4(), self.min_port - 1),
            0xFE => SocketAddr::new(relay_ip4(), self.min_port.wrapping_add(PORTS)),
            0xFD => SocketAddr::new(relay_ip6(), self.min_port + 1),
            _ => SocketAddr::new(relay_ip4(), self.min_port + (r as u16 % PORTS)),
        }
    }

    /// Input from a client, cut into frames as the stream driver does.
    fn deliver(&mut self, c: u8, bytes: &[u8], sent_as: Option<&str>) {
        let ci = c as usize % CLIENTS;
        let id = client(c);
        if !id.transport.is_stream() {
            self.client_input(ci, bytes, sent_as);
            return;
        }
        let mut rest = bytes;
        // Each frame takes at least four bytes.
        for _ in 0..=bytes.len() / 4 {
            match wire::frame_len(rest) {
                Frame::Complete(n) => {
                    let (frame, tail) = rest.split_at(n);
                    self.client_input(ci, frame, sent_as);
                    rest = tail;
                }
                Frame::Incomplete(_) => return,
                Frame::Invalid => {
                    self.s.handle_client_closed(id, &mut self.relays);
                    return;
                }
            }
        }
    }

    /// One datagram or frame to `handle_client`, and the checks on what comes back. `sent_as`
    /// names the user whose key signed the request, if the harness signed it correctly.
    fn client_input(&mut self, ci: usize, input: &[u8], sent_as: Option<&str>) {
        let id = client(ci as u8);
        let created = self.s.stats().allocations_created;
        let action = self
            .s
            .handle_client(self.now, id, input, &mut self.out, &mut self.relays);
        if self.s.stats().allocations_created != created {
            // A new allocation for this client: nothing granted to an earlier one carries over.
            let e = self.expiry[ci];
            self.forget(ci);
            self.expiry[ci] = e;
        }
        match action {
            ClientAction::None => {}
            ClientAction::Reply(n) => self.check_reply(ci, input, n, sent_as),
            ClientAction::ReplyFrom { .. } => {
                panic!("a reply from another socket without RFC 5780 configured")
            }
            ClientAction::Forward {
                relay,
                peer,
                payload,
            } => {
                assert!(
                    self.permitted(ci, peer.ip()),
                    "client {ci} relayed to {peer} without a permission"
                );
                assert!(
                    self.relays.open.contains(&relay),
                    "forward from {relay}, which has no socket"
                );
                assert!(payload.start <= payload.end && payload.end <= input.len());
                if wire::classify(input) == Kind::ChannelData {
                    let cd = ChannelData::parse(input).expect("forwarded ChannelData parses");
                    assert_eq!(&input[payload], cd.payload);
                    let bound = self.chans.get(&(ci, cd.number));
                    assert!(
                        bound.is_some_and(|(p, t)| *p == peer && *t > self.now),
                        "ChannelData on {:#x} to {peer}, bound to {bound:?}",
                        cd.number
                    );
                    self.summary.channel_to_peer += 1;
                } else {
                    let m = MessageRef::parse(input).expect("forwarded Send parses");
                    assert_eq!((m.method(), m.class()), (Method::SEND, Class::Indication));
                    assert_eq!(Some(&input[payload]), m.data());
                    assert_eq!(m.xor_peer_address(), Ok(Some(peer)));
                    self.summary.send_to_peer += 1;
                }
            }
        }
    }

    fn check_reply(&mut self, ci: usize, input: &[u8], n: usize, sent_as: Option<&str>) {
        let id = client(ci as u8);
        assert!(n >= HEADER_LEN && n <= self.out.len());
        let out = self.out[..n].to_vec();
        let reply = MessageRef::parse(&out)
            .unwrap_or_else(|e| panic!("the server's reply does not parse: {e}"));
        let (method, class, txid) =
            MessageRef::header(input).expect("a reply answers a STUN request");
        assert_eq!(class, Class::Request, "a reply to a {class:?}");
        assert_eq!(reply.method(), method);
        assert_eq!(reply.transaction_id(), &txid);
        assert!(matches!(reply.class(), Class::Success | Class::Error));
        assert_ne!(
            reply.fingerprint_valid(),
            Some(false),
            "bad FINGERPRINT in a reply"
        );
        if let Ok(Some(nonce)) = reply.nonce() {
            self.nonces.insert(id.remote, nonce.to_vec());
        }
        if let Ok(Some(token)) = reply.reservation_token() {
            self.token = token;
        }
        if reply.class() == Class::Error {
            let (code, _) = reply
                .error_code()
                .expect("ERROR-CODE decodes")
                .expect("an error reply carries ERROR-CODE");
            if let Some(i) = ERROR_CODES.iter().position(|c| *c == code) {
                self.summary.error_codes |= 1 << i;
            }
            return;
        }
        self.summary.success_responses += 1;
        let turn = [
            Method::ALLOCATE,
            Method::REFRESH,
            Method::CREATE_PERMISSION,
            Method::CHANNEL_BIND,
        ]
        .contains(&method);
        match (&self.users, turn) {
            (Some(users), true) => {
                // Only a request that verified with a user's key can succeed, and the reply
                // is signed with the same key and the same kind of integrity.
                let req = MessageRef::parse(input).expect("a successful request parses");
                let user = req.username().ok().flatten().expect("USERNAME");
                let key = users.key(user).expect("a known user");
                assert!(
                    req.verify(key),
                    "success for a request that does not verify"
                );
                assert_eq!(reply.integrity(), req.integrity());
                assert!(reply.verify(key), "the reply's integrity does not verify");
                if let Some(u) = sent_as {
                    assert_eq!(u, user);
                }
            }
            _ => assert_eq!(reply.integrity(), None, "integrity without authentication"),
        }
        if method == Method::ALLOCATE {
            let relayed = reply
                .xor_address(AttrType::XOR_RELAYED_ADDRESS)
                .expect("XOR-RELAYED-ADDRESS decodes")
                .expect("XOR-RELAYED-ADDRESS");
            assert!(self.relays.ports.contains(&relayed.port()));
            assert!(
                self.relays.open.iter().any(|a| a.port() == relayed.port()),
                "relayed address {relayed} has no socket"
            );
            let lifetime = reply
                .lifetime()
                .expect("LIFETIME decodes")
                .expect("LIFETIME");
            assert!(lifetime <= self.s.config().max_lifetime);
            // A retransmission is answered with the time left, rounded down: keep the later.
            let e = self.now + Duration::from_secs(lifetime as u64);
            self.expiry[ci] = Some(self.expiry[ci].map_or(e, |old| old.max(e)));
            assert_eq!(
                reply.xor_address(AttrType::XOR_MAPPED_ADDRESS),
                Ok(Some(id.remote))
            );
        }
        if method == Method::REFRESH {
            let lifetime = reply
                .lifetime()
                .expect("LIFETIME decodes")
                .expect("LIFETIME");
            assert!(lifetime <= self.s.config().max_lifetime);
            if lifetime == 0 {
                self.forget(ci);
            } else {
                self.expiry[ci] = Some(self.now + Duration::from_secs(lifetime as u64));
            }
        }
        if method == Method::CREATE_PERMISSION || method == Method::CHANNEL_BIND {
            let req = MessageRef::parse(input).expect("a successful request parses");
            let until = self.now + PERMISSION_LIFETIME;
            let peers: Vec<SocketAddr> = req.xor_peer_addresses().flatten().collect();
            assert!(!peers.is_empty(), "success without XOR-PEER-ADDRESS");
            // CreatePermission installs every address it carries; ChannelBind the first.
            let n = if method == Method::CHANNEL_BIND {
                1
            } else {
                peers.len()
            };
            for p in &peers[..n] {
                let t = self.perms.entry((ci, p.ip())).or_insert(until);
                *t = (*t).max(until);
            }
            if method == Method::CHANNEL_BIND {
                let number = req
                    .channel_number()
                    .expect("CHANNEL-NUMBER decodes")
                    .expect("CHANNEL-NUMBER");
                self.chans
                    .insert((ci, number), (peers[0], self.now + CHANNEL_LIFETIME));
            }
        }
        if method == Method::BINDING {
            assert_eq!(
                reply.xor_address(AttrType::XOR_MAPPED_ADDRESS),
                Ok(Some(id.remote))
            );
        }
    }

    fn next_txid(&mut self) -> TransactionId {
        self.txn += 1;
        let mut t = [0u8; 12];
        t[..4].copy_from_slice(b"fuzz");
        t[4..].copy_from_slice(&self.txn.to_be_bytes());
        TransactionId(t)
    }

    fn request(&mut self, r: &Request) {
        let ci = r.client as usize % CLIENTS;
        let id = client(r.client);
        let f = r.flags;
        let txid = if f & REQ_RETRANSMIT != 0 {
            self.last_txid[ci]
        } else {
            self.next_txid()
        };
        self.last_txid[ci] = txid;
        let (method, class) = match r.method % 8 {
            0 => (Method::ALLOCATE, Class::Request),
            1 => (Method::REFRESH, Class::Request),
            2 => (Method::CREATE_PERMISSION, Class::Request),
            3 => (Method::CHANNEL_BIND, Class::Request),
            4 => (Method::BINDING, Class::Request),
            5 => (Method::SEND, Class::Indication),
            6 => (Method::BINDING, Class::Indication),
            _ => (Method(0x00B), Class::Request),
        };
        let peer_addr = self.request_peer(r.peer);
        let mut buf = vec![0u8; 1500];
        let mut w = MessageWriter::new(&mut buf, method, class, &txid);
        if method == Method::ALLOCATE && f & REQ_TRANSPORT == 0 {
            w.add_u32(
                AttrType::REQUESTED_TRANSPORT,
                (wire::PROTO_UDP as u32) << 24,
            );
        }
        if f & REQ_TRANSPORT != 0 && r.transport != 0 {
            w.add_u32(AttrType::REQUESTED_TRANSPORT, (r.transport as u32) << 24);
        }
        if f & REQ_LIFETIME != 0 {
            w.add_u32(AttrType::LIFETIME, r.lifetime as u32);
        }
        if f & REQ_EVEN_PORT != 0 {
            w.add(AttrType::EVEN_PORT, &[r.even]);
        }
        if f & REQ_TOKEN != 0 {
            let token = if f & REQ_TOKEN_GARBAGE != 0 {
                r.token
            } else {
                self.token
            };
            w.add(AttrType::RESERVATION_TOKEN, &token);
        }
        if f & REQ_FAMILY != 0 {
            w.add_u32(AttrType::REQUESTED_ADDRESS_FAMILY, (r.family as u32) << 24);
        }
        if f & REQ_ADDITIONAL != 0 {
            w.add_u32(
                AttrType::ADDITIONAL_ADDRESS_FAMILY,
                (r.additional as u32) << 24,
            );
        }
        if f & REQ_OMIT == 0 {
            if method == Method::CHANNEL_BIND {
                w.add_u32(
                    AttrType::CHANNEL_NUMBER,
                    (channel_number(r.channel) as u32) << 16,
                );
            }
            if [
                Method::CREATE_PERMISSION,
                Method::CHANNEL_BIND,
                Method::SEND,
            ]
            .contains(&method)
            {
                w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer_addr);
            }
            if method == Method::SEND {
                w.add(AttrType::DATA, &r.data);
            }
        }
        if f & REQ_PEER2 != 0 {
            let p2 = self.request_peer(r.peer2);
            w.add_xor_address(AttrType::XOR_PEER_ADDRESS, p2);
        }
        if f & REQ_UNKNOWN_ATTR != 0 {
            w.add(AttrType(0x0030), b"?");
        }
        if f & REQ_DONT_FRAGMENT != 0 {
            w.add(AttrType::DONT_FRAGMENT, &[]);
        }
        let mut sent_as = None;
        let signer = match r.auth % 8 {
            0 => None,
            1..=3 => Some((USERS[0].0, USERS[0].1, 1)),
            4 => Some((USERS[0].0, USERS[0].1, 2)),
            5 => Some((USERS[1].0, USERS[1].1, 1)),
            6 => Some((USERS[0].0, "wrong", 1)),
            _ => Some((USERS[0].0, USERS[0].1, 3)),
        };
        if let Some((user, pass, kinds)) = signer {
            let nonce = self
                .nonces
                .get(&id.remote)
                .cloned()
                .unwrap_or_else(|| b"no nonce yet".to_vec());
            let key = long_term_key(user, REALM, pass);
            w.add(AttrType::USERNAME, user.as_bytes())
                .add(AttrType::REALM, REALM.as_bytes())
                .add(AttrType::NONCE, &nonce);
            if kinds & 1 != 0 {
                w.add_integrity(&key);
            }
            if kinds & 2 != 0 {
                w.add_integrity_sha256(&key);
            }
            if pass != "wrong" && f & REQ_CORRUPT == 0 {
                sent_as = Some(user);
            }
        }
        if f & REQ_TRAILING != 0 {
            w.add(AttrType::SOFTWARE, b"after the integrity");
        }
        if f & REQ_NO_FINGERPRINT == 0 {
            w.add_fingerprint();
        }
        let n = w.finish().expect("a request fits 1500 bytes");
        buf.truncate(n);
        if f & REQ_CORRUPT != 0 {
            let at = r.corrupt.0 as usize % n;
            buf[at] ^= r.corrupt.1;
        }
        self.deliver(r.client, &buf, sent_as);
    }

    /// A peer for a request: from [`PEERS`], or (for the top indexes) another client's relay
    /// address, for relaying between two allocations of this server.
    fn request_peer(&self, p: u8) -> SocketAddr {
        if p >= 0xF0 {
            let open: Vec<&SocketAddr> = self.relays.open.iter().collect();
            if !open.is_empty() {
                return *open[p as usize % open.len()];
            }
        }
        peer(p, self.min_port)
    }

    fn peer_datagram(&mut self, relay: SocketAddr, from: SocketAddr, payload: &[u8]) {
        let start = wire::HEADROOM;
        let mut buf = vec![0u8; start + payload.len() + wire::TAILROOM];
        buf[start..start + payload.len()].copy_from_slice(payload);
        let range: Range<usize> = start..start + payload.len();
        let action = self
            .s
            .handle_peer(self.now, relay, from, &mut buf, range.clone());
        let PeerAction::Forward { client: to, range } = action else {
            return;
        };
        assert!(range.start <= range.end && range.end <= buf.len());
        let info = self
            .s
            .allocation_info(&to)
            .expect("forward to a client without an allocation");
        assert_eq!(
            info.0.port(),
            relay.port(),
            "forward from another allocation"
        );
        let ci = (0..CLIENTS)
            .find(|i| client(*i as u8) == to)
            .expect("forward to a client of this harness");
        assert!(
            self.permitted(ci, from.ip()),
            "{from} reached client {ci} without a permission"
        );
        let channel = self
            .chans
            .iter()
            .find(|((c, _), (p, t))| *c == ci && *p == from && *t > self.now)
            .map(|((_, n), _)| *n);
        let out = &buf[range];
        if wire::classify(out) == Kind::ChannelData {
            let cd = ChannelData::parse(out).expect("relayed ChannelData parses");
            assert_eq!(cd.payload, payload, "relayed payload altered");
            assert!(ChannelNumber::new(cd.number).is_some());
            assert_eq!(
                Some(cd.number),
                channel,
                "ChannelData from {from} on the wrong channel"
            );
            if to.transport.is_stream() {
                assert_eq!(out.len() % 4, 0, "ChannelData unpadded on a stream");
            }
            self.summary.channel_to_client += 1;
        } else {
            let m = MessageRef::parse(out).expect("Data indication parses");
            assert_eq!((m.method(), m.class()), (Method::DATA, Class::Indication));
            assert_eq!(m.xor_peer_address(), Ok(Some(from)));
            assert_eq!(m.data(), Some(payload), "relayed payload altered");
            assert_eq!(
                channel, None,
                "a Data indication from {from}, which has a channel"
            );
            self.summary.data_to_client += 1;
        }
    }

    /// Runs the clock far past every lifetime: nothing may be left.
    fn finish(&mut self) {
        self.advance_to(self.now + Duration::from_secs(2 * 3600));
        self.check();
        assert_eq!(
            self.s.allocation_count(),
            0,
            "allocations left after expiry"
        );
        assert_eq!(self.s.ports_in_use(), 0, "ports left in use after expiry");
        assert!(
            self.relays.open.is_empty(),
            "relay sockets left open: {:?}",
            self.relays.open
        );
        assert_eq!(self.relays.opened, self.relays.closed);
        assert_eq!(self.s.poll_timeout(), None, "timers left after expiry");
        let st = self.s.stats();
        self.summary.allocations = st.allocations_created;
        assert_eq!(
            st.allocations_ended.iter().sum::<u64>(),
            st.allocations_created
        );
    }
}

/// Runs the program in `data` against one server; panics on any broken invariant. Returns what
/// the run reached.
pub fn core_sequence(data: &[u8]) -> Summary {
    let (setup, ops) = decode_program(data);
    let mut w = World::new(setup);
    w.check();
    for op in &ops {
        w.run(op);
        w.check();
    }
    w.summary.ops = ops.len();
    w.finish();
    w.summary
}

// ================================================================================== seeds

fn hex(s: &str) -> Vec<u8> {
    let digits: Vec<u8> = s
        .bytes()
        .filter(u8::is_ascii_hexdigit)
        .map(|c| match c {
            b'0'..=b'9' => c - b'0',
            b'a'..=b'f' => c - b'a' + 10,
            _ => c - b'A' + 10,
        })
        .collect();
    digits.chunks_exact(2).map(|p| p[0] << 4 | p[1]).collect()
}

/// Seeds for `wire_parse`: the RFC 5769 vectors and TURN messages made by the writer.
pub fn wire_seeds() -> Vec<(&'static str, Vec<u8>)> {
    let mut seeds = vec![
        (
            "rfc5769-request",
            hex("0001 0058 2112a442 b7e7a701 bc34d686 fa87dfae
                 8022 0010 5354554e 20746573 7420636c 69656e74
                 0024 0004 6e0001ff
                 8029 0008 932ff9b1 51263b36
                 0006 0009 6576746a 3a683676 59202020
                 0008 0014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
                 8028 0004 e57a3bcf"),
        ),
        (
            "rfc5769-ipv4-response",
            hex("0101 003c 2112a442 b7e7a701 bc34d686 fa87dfae
                 8022 000b 74657374 20766563 746f7220
                 0020 0008 0001a147 e112a643
                 0008 0014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
                 8028 0004 c07d4c96"),
        ),
        (
            "rfc5769-ipv6-response",
            hex("0101 0048 2112a442 b7e7a701 bc34d686 fa87dfae
                 8022 000b 74657374 20766563 746f7220
                 0020 0014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
                 0008 0014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
                 8028 0004 c8fb0b4c"),
        ),
        (
            "rfc5769-long-term-request",
            hex("0001 0060 2112a442 78ad3433 c6ad72c0 29da412e
                 0006 0012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
                 0015 001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
                 0014 000b 6578616d 706c652e 6f726700
                 0008 0014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666"),
        ),
        ("channel-data", hex("4000 0005 68656c6c 6f000000")),
        ("channel-data-empty", hex("4fff 0000")),
    ];
    let txid = TransactionId(*b"seed-txid-01");
    let key = long_term_key("alice", REALM, "secret");
    let peer4: SocketAddr = "8.8.4.4:7000".parse().expect("address");
    let peer6: SocketAddr = "[2606:4700::1111]:7000".parse().expect("address");
    let mut add = |name: &'static str, m: Method, c: Class, f: &dyn Fn(&mut MessageWriter)| {
        let mut buf = vec![0u8; 512];
        let mut w = MessageWriter::new(&mut buf, m, c, &txid);
        f(&mut w);
        let n = w.finish().expect("seed fits");
        buf.truncate(n);
        seeds.push((name, buf));
    };
    add("allocate-auth", Method::ALLOCATE, Class::Request, &|w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, 17 << 24)
            .add_u32(AttrType::LIFETIME, 600)
            .add(AttrType::EVEN_PORT, &[0x80])
            .add(AttrType::USERNAME, b"alice")
            .add(AttrType::REALM, REALM.as_bytes())
            .add(AttrType::NONCE, b"0000000000000000000000000000abcd")
            .add_integrity(&key)
            .add_fingerprint();
    });
    add(
        "channel-bind-sha256",
        Method::CHANNEL_BIND,
        Class::Request,
        &|w| {
            w.add_u32(AttrType::CHANNEL_NUMBER, 0x4001 << 16)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer4)
                .add(AttrType::USERNAME, b"alice")
                .add(AttrType::REALM, REALM.as_bytes())
                .add(AttrType::NONCE, b"nonce")
                .add_integrity(&key)
                .add_integrity_sha256(&key)
                .add_fingerprint();
        },
    );
    add("send-ipv6", Method::SEND, Class::Indication, &|w| {
        w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer6)
            .add(AttrType::DATA, b"payload")
            .add(AttrType::DONT_FRAGMENT, &[]);
    });
    add(
        "create-permission-2",
        Method::CREATE_PERMISSION,
        Class::Request,
        &|w| {
            w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer4)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer6)
                .add(AttrType::RESERVATION_TOKEN, &[1, 2, 3, 4, 5, 6, 7, 8])
                .add_u32(AttrType::REQUESTED_ADDRESS_FAMILY, 2 << 24)
                .add_u32(AttrType::ADDITIONAL_ADDRESS_FAMILY, 2 << 24);
        },
    );
    add("error-420", Method::ALLOCATE, Class::Error, &|w| {
        w.add_error_reason(420, "Unknown Attribute")
            .add_unknown_attributes(&[0x0030, 0x7fff])
            .add(AttrType::REALM, REALM.as_bytes())
            .add(AttrType::SOFTWARE, "turnserver é".as_bytes())
            .add_fingerprint();
    });
    add("allocate-success", Method::ALLOCATE, Class::Success, &|w| {
        w.add_xor_address(AttrType::XOR_RELAYED_ADDRESS, peer4)
            .add_u32(AttrType::LIFETIME, 600)
            .add(AttrType::RESERVATION_TOKEN, b"tokentok")
            .add_address_error(2, wire::ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED)
            .add_xor_address(AttrType::XOR_MAPPED_ADDRESS, peer6)
            .add_address(AttrType::MAPPED_ADDRESS, peer4)
            .add_integrity_sha256(&key);
    });
    add("data-indication", Method::DATA, Class::Indication, &|w| {
        w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer4)
            .add(AttrType::DATA, &[0xde, 0xad, 0xbe])
            .add(AttrType::ICMP, &[0; 4]);
    });
    add("binding-bare", Method::BINDING, Class::Request, &|_| {});
    // Two frames back to back, as a stream delivers them.
    let two: Vec<u8> = [seeds[4].1.clone(), seeds[0].1.clone()].concat();
    seeds.push(("stream-two-frames", two));
    seeds
}

fn req(client: u8, method: u8, auth: u8) -> Request {
    Request {
        client,
        method,
        auth,
        ..Request::default()
    }
}

fn with(mut r: Request, f: impl FnOnce(&mut Request)) -> Op {
    f(&mut r);
    Op::Request(r)
}

fn chan(client: u8, channel: u8, payload: &[u8]) -> Op {
    Op::ChannelData {
        client,
        channel,
        shape: 0,
        payload: payload.to_vec(),
    }
}

fn from_peer(relay: u8, peer: u8, payload: &[u8]) -> Op {
    Op::Peer {
        relay,
        peer,
        size: payload.len() as u8,
        payload: payload.to_vec(),
    }
}

fn secs(s: u16) -> Op {
    Op::Advance { mode: 1, amount: s }
}

/// Seeds for `core_sequence`: programs that reach relayed ChannelData and the TURN features
/// around it. Methods: 0 Allocate, 1 Refresh, 2 CreatePermission, 3 ChannelBind, 5 Send.
pub fn core_seeds() -> Vec<(&'static str, Vec<u8>)> {
    const FP: u8 = SETUP_FINGERPRINT;
    const AUTH: u8 = SETUP_AUTH | SETUP_FINGERPRINT;
    let setup = |flags, flags2| Setup { flags, flags2 };
    // The relay of the only allocation is open socket 0.
    let channel_both_ways = |c: u8, a: u8| {
        vec![
            Op::Request(req(c, 2, a)),
            Op::Request(req(c, 3, a)),
            chan(c, 0, b"hello peer"),
            from_peer(0, 0, b"hello client"),
            from_peer(0, 1, b"same IP, other port: Data indication"),
            from_peer(0, 2, b"no permission"),
        ]
    };
    let mut seeds = Vec::new();

    let mut ops = vec![Op::Request(req(0, 0, 0))];
    ops.extend(channel_both_ways(0, 0));
    ops.extend([
        with(req(0, 5, 0), |r| r.data = b"send".to_vec()),
        secs(400),
        from_peer(0, 0, b"channel up, permission gone"),
        secs(300),
        Op::Request(with_lifetime(req(0, 1, 0), 0)),
    ]);
    seeds.push(("noauth-channel", encode_program(setup(FP, 0), &ops)));

    let mut ops = vec![Op::Request(req(0, 0, 0)), Op::Request(req(0, 0, 1))];
    ops.extend(channel_both_ways(0, 1));
    ops.extend([
        secs(650),
        Op::Request(req(0, 3, 1)),
        secs(200),
        Op::Request(req(0, 3, 1)),
    ]);
    seeds.push(("auth-channel", encode_program(setup(AUTH, 0), &ops)));

    let mut ops = vec![Op::Request(req(2, 0, 0)), Op::Request(req(2, 0, 4))];
    ops.extend(channel_both_ways(2, 4));
    ops.extend([
        chan(2, 0, b"odd"),
        Op::Raw {
            client: 2,
            bytes: hex("4000 0003 616263 00 4000 0001 7a"),
        },
        Op::Close { client: 2 },
    ]);
    seeds.push(("tcp-sha256-channel", encode_program(setup(AUTH, 0), &ops)));

    let ops = vec![
        Op::Request(req(0, 0, 0)),
        with(req(0, 0, 1), |r| {
            r.flags = REQ_EVEN_PORT;
            r.even = 0x80;
        }),
        Op::Request(req(1, 0, 0)),
        with(req(1, 0, 1), |r| r.flags = REQ_TOKEN),
        with(req(1, 0, 1), |r| r.flags = REQ_RETRANSMIT),
        Op::Request(req(2, 2, 1)),
        with(req(0, 2, 5), |r| r.peer = 0xF1),
        secs(40),
        Op::Request(with_lifetime(req(1, 1, 1), 0)),
    ];
    seeds.push(("even-port-token", encode_program(setup(AUTH, 0), &ops)));

    let ops = vec![
        Op::Request(req(0, 0, 0)),
        Op::Request(req(0, 0, 1)),
        secs(45),
        Op::Request(with_lifetime(req(0, 1, 1), 100)),
        Op::Request(with_lifetime(req(0, 1, 1), 100)),
        Op::Request(req(0, 0, 6)),
        Op::Advance {
            mode: 3,
            amount: 200,
        },
        chan(0, 0, b"late"),
        Op::Timeout,
    ];
    let flags = AUTH | SETUP_SHORT_NONCES | SETUP_SHORT_LIFETIMES;
    seeds.push(("stale-nonce-refresh", encode_program(setup(flags, 0), &ops)));

    let ops = vec![
        with(req(5, 0, 0), |r| {
            r.flags = REQ_FAMILY;
            r.family = 2;
        }),
        with(req(5, 2, 0), |r| r.peer = 7),
        with(req(5, 3, 0), |r| r.peer = 7),
        chan(5, 0, b"to v6"),
        from_peer(0, 7, b"from v6"),
        with(req(4, 0, 0), |r| {
            r.flags = REQ_ADDITIONAL;
            r.additional = 2;
        }),
    ];
    let flags = FP | SETUP_IPV6_RELAY;
    seeds.push(("ipv6-relay", encode_program(setup(flags, 1), &ops)));

    let mut ops = vec![
        Op::TogglePort { port: 3 },
        Op::Request(req(0, 0, 0)),
        Op::Request(req(1, 0, 0)),
        Op::Request(req(2, 0, 0)),
        Op::Request(req(3, 0, 0)),
    ];
    for p in [0, 2, 5, 6, 7] {
        ops.push(with(req(0, 2, 0), |r| r.peer = p));
        ops.push(with(req(0, 3, 0), |r| {
            r.peer = p;
            r.channel = p;
        }));
    }
    ops.extend([
        from_peer(0xFF, 0, b"below the range"),
        from_peer(0xF8, 0, b"no socket"),
        Op::Peer {
            relay: 0,
            peer: 0,
            size: 0xFF,
            payload: Vec::new(),
        },
        Op::Close { client: 3 },
    ]);
    let flags = FP | SETUP_SMALL_CAPS | SETUP_QUOTAS | SETUP_LOOPBACK;
    seeds.push(("caps-quotas-policy", encode_program(setup(flags, 2), &ops)));

    // The top of the port space: EVEN-PORT pairs up to 65535, peers beyond it.
    let ops = vec![
        with(req(0, 0, 0), |r| {
            r.flags = REQ_EVEN_PORT;
            r.even = 0x80;
        }),
        with(req(1, 0, 0), |r| r.flags = REQ_TOKEN),
        with(req(2, 0, 0), |r| {
            r.flags = REQ_EVEN_PORT;
            r.even = 0x80;
        }),
        with(req(0, 3, 0), |r| r.peer = 3),
        chan(0, 0, b"relay to relay"),
        from_peer(0, 3, b"relay from relay"),
        from_peer(0xFE, 0, b"past 65535"),
        secs(31),
    ];
    seeds.push(("top-ports", encode_program(setup(FP, 4), &ops)));

    // A refresh that shortens the lifetime: the allocation must go at the new expiry, not the
    // old one.
    let ops = vec![
        Op::Request(with_lifetime(req(0, 0, 0), 3600)),
        Op::Request(with_lifetime(req(1, 0, 0), 3600)),
        secs(10),
        Op::Request(with_lifetime(req(0, 1, 0), 700)),
        Op::Request(with_lifetime(req(1, 1, 0), 0)),
        secs(701),
        Op::Request(with_lifetime(req(0, 1, 0), 700)),
    ];
    seeds.push(("refresh-shrinks", encode_program(setup(FP, 0), &ops)));
    seeds
}

fn with_lifetime(mut r: Request, lifetime: u16) -> Request {
    r.flags |= REQ_LIFETIME;
    r.lifetime = lifetime;
    r
}
