//! The sans-IO TURN server (RFC 8656) with STUN Binding (RFC 8489).
//!
//! [`Server`] holds every allocation, permission and channel, the relay port pool and a timer
//! queue. It never touches a socket or a clock: the driver passes `now` into every call, sends
//! what the returned actions say, and opens and closes relay sockets through the
//! [`RelaySockets`] it lends to the calls that may need them.
//!
//! Inputs: [`Server::handle_client`] (a datagram or stream frame from a client),
//! [`Server::handle_peer`] (a datagram received on a relay socket),
//! [`Server::handle_timeout`], [`Server::handle_client_closed`] (a stream client went away).
//! Outputs: the returned [`ClientAction`] / [`PeerAction`], and [`Server::poll_timeout`], the
//! instant by which `handle_timeout` must be called next.
//!
//! The relay path (ChannelData and Send from a client, datagrams from peers) allocates nothing:
//! it borrows the input, looks the allocation up once, and returns byte ranges.

pub mod discovery;
mod limits;
pub mod policy;
mod ports;
mod quota;
mod stats;

#[cfg(test)]
mod tests;

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tracing::{debug, info};

use crate::auth::{
    Key, NONCE_LEN, NonceCheck, NonceMint, PASSWORD_ALGORITHMS, PasswordAlgorithm, Users, Verdict,
};
use crate::wire::{
    self, AttrType, ChannelData, ChannelNumber, Class, ErrorCode, FAMILY_IPV4, FAMILY_IPV6,
    HEADER_LEN, Integrity, MAGIC_COOKIE, MessageRef, MessageWriter, Method, PROTO_UDP, ParseError,
    TransactionId, pad4,
};

pub use discovery::NatDiscovery;
pub use policy::{Cidr, PeerPolicy};
pub use ports::PortPool;
pub use quota::{Exceeded, Limits, QuotaBook};
pub use stats::{
    COUNTED_ERRORS, COUNTED_METHODS, Drop, EndReason, Flow, OUTCOMES, Stats, TRANSPORTS,
};

/// Permission lifetime (RFC 8656 9).
pub const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
/// Channel binding lifetime (RFC 8656 12).
pub const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
/// After a channel binding expires, neither its number nor its peer may be rebound to anything
/// else for this long (RFC 8656 12).
pub const CHANNEL_COOLDOWN: Duration = Duration::from_secs(300);
/// How long a port reserved by EVEN-PORT with the R bit stays reserved (RFC 8656 7.2: about 30 s).
pub const RESERVATION_LIFETIME: Duration = Duration::from_secs(30);
/// How many ports an Allocate tries to bind before answering 508.
const BIND_ATTEMPTS: usize = 16;
/// Buckets of the challenge and password-guess limiters.
const CHALLENGE_BUCKETS: usize = 4096;
/// 401 and 438 answers per source address: a client needs one or two per allocation; beyond
/// this rate they are dropped, so a forged source address draws at most this much traffic.
const CHALLENGES_PER_SECOND: f32 = 20.0;
const CHALLENGE_BURST: f32 = 100.0;
/// Password checks per user and source address once the burst is spent: one every 6 s.
const GUESSES_PER_SECOND: f32 = 1.0 / 6.0;
const GUESS_BURST: f32 = 20.0;

/// The client transport of a 5-tuple.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
    Dtls,
}

impl Transport {
    pub fn name(self) -> &'static str {
        match self {
            Transport::Udp => "udp",
            Transport::Tcp => "tcp",
            Transport::Tls => "tls",
            Transport::Dtls => "dtls",
        }
    }

    /// Stream transports carry ChannelData padded to a multiple of four (RFC 8656 12.5).
    pub fn is_stream(self) -> bool {
        matches!(self, Transport::Tcp | Transport::Tls)
    }

    /// Transports with a per-client connection or association (all but plain UDP).
    pub fn is_connection(self) -> bool {
        self != Transport::Udp
    }
}

/// A client's 5-tuple: transport, client address, and the server address it reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientId {
    pub transport: Transport,
    pub remote: SocketAddr,
    pub local: SocketAddr,
}

impl std::fmt::Display for ClientId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.transport.name(), self.remote)
    }
}

/// What the driver does with a client's input.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientAction {
    /// Nothing to send (dropped and counted, or consumed).
    None,
    /// Send the first `n` bytes of the output buffer back to the client.
    Reply(usize),
    /// Send the first `len` bytes of the output buffer from the UDP listener bound to `from`
    /// to `to` (an RFC 5780 Binding response asked for from another address or port, or to
    /// another port of the client). Only for clients over UDP.
    ReplyFrom {
        len: usize,
        from: SocketAddr,
        to: SocketAddr,
    },
    /// Send `input[payload]` from the relay socket bound to `relay` to `peer`.
    Forward {
        relay: SocketAddr,
        peer: SocketAddr,
        payload: Range<usize>,
    },
}

/// What the driver does with a datagram received on a relay socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerAction {
    /// Dropped and counted.
    None,
    /// Send `buf[range]` to the client.
    Forward {
        client: ClientId,
        range: Range<usize>,
    },
}

/// Relay sockets, owned by the driver. The core asks for one when it creates an allocation and
/// gives it back when the allocation ends.
pub trait RelaySockets {
    /// Binds a UDP socket to `addr` and starts receiving on it. `false` if the address cannot
    /// be bound (for example the port is taken by another program); the core tries another.
    fn open(&mut self, addr: SocketAddr) -> bool;
    /// Closes the socket bound to `addr`.
    fn close(&mut self, addr: SocketAddr);
    /// Binds `addr` for a reservation (EVEN-PORT with R): held, so that nobody else takes the
    /// port, until [`RelaySockets::adopt`] or [`RelaySockets::unpark`]. Where the servers share
    /// their reservations ([`Shared`]), the socket must be kept where every server's driver can
    /// adopt it. By default it is simply opened.
    fn park(&mut self, addr: SocketAddr) -> bool {
        self.open(addr)
    }
    /// Starts receiving on a parked socket, for the allocation that redeemed its reservation;
    /// `false` if there is no such socket. By default (parking opened it) nothing to do.
    fn adopt(&mut self, addr: SocketAddr) -> bool {
        let _ = addr;
        true
    }
    /// Releases a parked socket whose reservation expired.
    fn unpark(&mut self, addr: SocketAddr) {
        self.close(addr)
    }
}

/// What the servers of one process share when it runs one per core: the relay port pool, the
/// port reservations (an EVEN-PORT pair's second port may be redeemed by a client another core
/// serves), the allocation counts behind the quotas, and the rate limits on 401/438 answers
/// and password checks (per source address, whichever core the source's packets reach). Each
/// sits behind its own mutex, taken when an allocation or reservation starts or ends, on
/// challenges and password checks, and once a timer tick for expired reservations; never on
/// the relay path.
#[derive(Clone)]
pub struct Shared {
    ports: Arc<Mutex<PortPool>>,
    reservations: Arc<Mutex<Vec<Reservation>>>,
    quotas: QuotaBook,
    /// 401/438 challenges per source address (against reflection and amplification).
    challenges: Arc<Mutex<limits::RateLimiter>>,
    /// Password attempts per (user, source address).
    guesses: Arc<Mutex<limits::RateLimiter>>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("ports", &self.ports)
            .field("reservations", &self.reservations)
            .field("quotas", &self.quotas)
            .finish_non_exhaustive()
    }
}

impl Shared {
    /// A pool of `min_port..=max_port` in an order drawn from `seed`, no reservation, no
    /// allocation counted, full rate-limit buckets as of `now`.
    pub fn new(min_port: u16, max_port: u16, seed: u64, now: Instant) -> Self {
        let limiter = |per_second, burst| {
            Arc::new(Mutex::new(limits::RateLimiter::new(
                CHALLENGE_BUCKETS,
                per_second,
                burst,
                now,
            )))
        };
        Shared {
            ports: Arc::new(Mutex::new(PortPool::new(
                min_port,
                max_port,
                &mut Rng::new(seed),
            ))),
            reservations: Arc::new(Mutex::new(Vec::new())),
            quotas: QuotaBook::default(),
            challenges: limiter(CHALLENGES_PER_SECOND, CHALLENGE_BURST),
            guesses: limiter(GUESSES_PER_SECOND, GUESS_BURST),
        }
    }

    fn challenges(&self) -> MutexGuard<'_, limits::RateLimiter> {
        self.challenges.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn guesses(&self) -> MutexGuard<'_, limits::RateLimiter> {
        self.guesses.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn ports(&self) -> MutexGuard<'_, PortPool> {
        // Nothing panics while holding these locks; were it to, the data is still whole.
        self.ports.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn reservations(&self) -> MutexGuard<'_, Vec<Reservation>> {
        self.reservations.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether another server holds a clone.
    fn is_shared(&self) -> bool {
        Arc::strong_count(&self.ports) > 1
    }
}

/// The core's configuration: already validated, with no file or socket in it.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    /// The realm and user keys; `None` turns authentication off.
    pub users: Option<Users>,
    /// SOFTWARE sent in responses; empty sends none.
    pub software: String,
    /// Add FINGERPRINT to every response (it is also added when the request carried one).
    pub fingerprint: bool,
    /// Local addresses relay sockets bind to.
    pub relay_ips: Vec<IpAddr>,
    /// (public, private) pairs: a relay address equal to `private` (or any, when `None`) is
    /// advertised as `public`.
    pub external_ips: Vec<(IpAddr, Option<IpAddr>)>,
    pub min_port: u16,
    pub max_port: u16,
    /// Seconds.
    pub default_lifetime: u32,
    /// Seconds.
    pub max_lifetime: u32,
    /// Seconds a nonce stays valid.
    pub stale_nonce: u32,
    pub allow_loopback_peers: bool,
    /// Allocations per user; 0 means no limit.
    pub user_quota: u32,
    /// Allocations in total; 0 means no limit beyond the port range.
    pub total_quota: u32,
    /// Allocations per client IP address; 0 means no limit.
    pub ip_quota: u32,
    /// Bytes per second an allocation may relay in each direction; 0 means no limit. Beyond
    /// it (after a burst of one second's worth, at least 64 KiB) datagrams are dropped.
    pub max_bps: u32,
    /// Peer prefixes allowed although a default refusal covers them.
    pub allowed_peers: Vec<policy::Cidr>,
    /// Peer prefixes always refused.
    pub denied_peers: Vec<policy::Cidr>,
    /// Permissions per allocation.
    pub max_permissions: usize,
    /// Channels per allocation.
    pub max_channels: usize,
    /// Where Allocate requests over UDP and TCP are redirected (300 Try Alternate); empty for
    /// none.
    pub alternate_servers: Vec<SocketAddr>,
    /// The same for TLS and DTLS.
    pub tls_alternate_servers: Vec<SocketAddr>,
    /// The UDP listeners that answer RFC 5780 (NAT behaviour discovery) Binding requests.
    pub nat_discovery: NatDiscovery,
}

impl ServerConfig {
    /// A configuration for tests and examples: one relay address, the given users.
    pub fn new(relay_ip: IpAddr, users: Option<Users>) -> Self {
        ServerConfig {
            users,
            software: concat!("turnserver ", env!("CARGO_PKG_VERSION")).to_string(),
            fingerprint: true,
            relay_ips: vec![relay_ip],
            external_ips: Vec::new(),
            min_port: 49152,
            max_port: 65535,
            default_lifetime: 600,
            max_lifetime: 3600,
            stale_nonce: 600,
            allow_loopback_peers: false,
            user_quota: 0,
            total_quota: 0,
            ip_quota: 0,
            max_bps: 0,
            allowed_peers: Vec::new(),
            denied_peers: Vec::new(),
            max_permissions: 64,
            max_channels: 64,
            alternate_servers: Vec::new(),
            tls_alternate_servers: Vec::new(),
            nat_discovery: NatDiscovery::default(),
        }
    }
}

/// A small, fast, non-cryptographic generator (SplitMix64), used only to shuffle the port
/// pool at start. Its outputs never leave the server: reservation tokens and the transaction
/// IDs of Data indications come from [`Prf`], which peers cannot predict.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

/// A keyed pseudo-random function over a counter, SHA-256(key || label || counter): the source
/// of reservation tokens and of Data indication transaction IDs, which must be unpredictable to
/// clients and peers (RFC 8489 5, RFC 8656 7.2). The input has a fixed length of 54 bytes, one
/// SHA-256 block (HMAC would take four compressions), and each block yields 32 bytes handed out
/// in pieces, so a Data indication costs under half a compression.
struct Prf {
    key: [u8; 32],
    counter: u64,
    block: [u8; 32],
    used: usize,
}

impl Prf {
    fn new(key: [u8; 32]) -> Self {
        Prf {
            key,
            counter: 0,
            block: [0; 32],
            used: 32,
        }
    }

    fn fill(&mut self, out: &mut [u8]) {
        use sha2::{Digest, Sha256};
        for b in out {
            if self.used == self.block.len() {
                let mut h = Sha256::new();
                h.update(self.key);
                h.update(b"turnserver prf");
                h.update(self.counter.to_be_bytes());
                self.block.copy_from_slice(&h.finalize());
                self.counter += 1;
                self.used = 0;
            }
            *b = self.block[self.used];
            self.used += 1;
        }
    }
}

#[derive(Debug, Clone)]
struct Permission {
    ip: IpAddr,
    until: Instant,
}

#[derive(Debug, Clone)]
struct Channel {
    number: ChannelNumber,
    peer: SocketAddr,
    /// Usable until then; reserved (not usable, not rebindable to anything else) for
    /// [`CHANNEL_COOLDOWN`] after.
    until: Instant,
}

#[derive(Debug)]
struct Allocation {
    client: ClientId,
    /// The relayed transport address (the family asked for, IPv4 by default) and the address
    /// it is advertised as.
    relay: SocketAddr,
    advertised: SocketAddr,
    /// A dual allocation's second relayed address, of the other family, on the same port
    /// (RFC 8656 ADDITIONAL-ADDRESS-FAMILY), and its advertised address.
    second: Option<(SocketAddr, SocketAddr)>,
    username: Box<str>,
    expires: Instant,
    created_by: TransactionId,
    perms: Vec<Permission>,
    channels: Vec<Channel>,
    /// The deadline of this allocation's entry in the timer queue, if one is queued.
    timer: Option<Instant>,
    /// A port reserved for a later Allocate (EVEN-PORT with R) and its token.
    reservation: Option<[u8; 8]>,
    /// Bandwidth budgets toward the peer ([0]) and toward the client ([1]), when `max-bps`
    /// is set.
    budgets: [Budget; 2],
}

/// A token bucket of bytes.
#[derive(Debug, Clone, Copy)]
struct Budget {
    bytes: f64,
    at: Instant,
}

impl Budget {
    fn new(now: Instant, burst: f64) -> Self {
        Budget {
            bytes: burst,
            at: now,
        }
    }

    /// Spends `len` bytes if the bucket, refilled at `rate` up to `burst`, holds them.
    #[inline]
    fn spend(&mut self, len: usize, now: Instant, rate: f64, burst: f64) -> bool {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.bytes = (self.bytes + elapsed * rate).min(burst);
        self.at = now;
        if self.bytes >= len as f64 {
            self.bytes -= len as f64;
            true
        } else {
            false
        }
    }
}

impl Allocation {
    /// The relayed address that reaches `peer`: the one of its family.
    #[inline]
    fn relay_for(&self, peer: SocketAddr) -> Option<SocketAddr> {
        if peer.is_ipv4() == self.relay.is_ipv4() {
            return Some(self.relay);
        }
        self.second
            .map(|(r, _)| r)
            .filter(|r| r.is_ipv4() == peer.is_ipv4())
    }

    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.perms.iter().any(|p| p.ip == ip && p.until > now)
    }

    /// When something of this allocation next expires: the allocation, a permission, a
    /// channel binding, or the cooldown of an expired channel.
    fn next_deadline(&self, now: Instant) -> Instant {
        let mut t = self.expires;
        for p in &self.perms {
            t = t.min(p.until);
        }
        for c in &self.channels {
            t = t.min(if c.until > now {
                c.until
            } else {
                c.until + CHANNEL_COOLDOWN
            });
        }
        t
    }

    /// Removes expired permissions, and channels whose cooldown is over.
    fn sweep(&mut self, now: Instant) {
        self.perms.retain(|p| p.until > now);
        self.channels.retain(|c| c.until + CHANNEL_COOLDOWN > now);
    }
}

#[derive(Debug)]
struct Reservation {
    token: [u8; 8],
    port: u16,
    ip: IpAddr,
    until: Instant,
}

/// The identity an authenticated request carries.
struct Auth<'a> {
    /// From USERNAME, or the configured user a USERHASH names.
    username: std::borrow::Cow<'a, str>,
    key: Key,
    integrity: Integrity,
}

/// A refusal: the error code and the reason logged with it.
type Refused = (ErrorCode, &'static str);

enum Success {
    Allocate {
        relayed: SocketAddr,
        /// A dual allocation's second relayed address.
        second: Option<SocketAddr>,
        lifetime: u32,
        mapped: SocketAddr,
        token: Option<[u8; 8]>,
        /// The family refused in a dual-allocation request, and why.
        address_error: Option<(u8, ErrorCode)>,
    },
    Lifetime(u32),
    Empty,
}

/// The relayed address picked for a new allocation, the second one of a dual allocation, and
/// the token of a port reserved beside the first.
type Picked = (SocketAddr, Option<SocketAddr>, Option<[u8; 8]>);

/// The TURN server state machine. See the module documentation.
pub struct Server {
    cfg: ServerConfig,
    policy: PeerPolicy,
    nonces: NonceMint,
    epoch: Instant,
    /// Unix seconds at `epoch`.
    unix_epoch: u64,
    /// Turns of the alternate-server rotation.
    alternate_turn: usize,
    /// Turns of the rotation among relay addresses of one family.
    relay_turn: usize,
    /// (relay address, advertised address) for each relay address `external-ip` maps to
    /// another: how the server recognises its own relayed addresses among peers.
    nat: Vec<(IpAddr, IpAddr)>,
    prf: Prf,
    allocs: Vec<Option<Allocation>>,
    /// Generation of each slot, bumped when the slot is freed, so that stale timer entries
    /// are recognised.
    gens: Vec<u32>,
    free_slots: Vec<u32>,
    by_client: HashMap<ClientId, u32>,
    /// A direct-mapped cache in front of `by_client` for the relay path (see
    /// [`Server::client_slot`]): slot numbers, each checked against the allocation's client.
    client_cache: Box<[std::cell::Cell<u32>]>,
    /// Odd multiplier of the cache index, drawn from the secret.
    cache_key: u64,
    /// Allocation slot by relay port (index `port - min_port`); `u32::MAX` when none.
    by_port: Vec<u32>,
    /// Ports, reservations and quota counts, shared with the other cores' servers.
    shared: Shared,
    failures: limits::FailureLog,
    /// Refused requests logged in the current second, refusals not logged in it, and when it
    /// began (see [`Server::may_log_refusal`]).
    refusals_logged: u32,
    refusals_unlogged: u64,
    refusal_window: Instant,
    timers: BinaryHeap<Reverse<(Instant, u32, u32)>>,
    live: usize,
    stats: Stats,
}

const NO_SLOT: u32 = u32::MAX;
/// Refused requests logged per second by one server (relay thread).
const REFUSAL_LOGS: u32 = 50;
/// Entries of the client cache (a power of two): 16 KiB.
const CLIENT_CACHE: usize = 4096;

impl Server {
    /// `secret` keys the nonces (take it from a cryptographic source); `seed` seeds port order.
    pub fn new(cfg: ServerConfig, secret: [u8; 32], seed: u64, now: Instant) -> Self {
        let mut own: Vec<IpAddr> = cfg.relay_ips.clone();
        own.extend(cfg.external_ips.iter().map(|(public, _)| *public));
        let policy = PeerPolicy {
            allow_loopback: cfg.allow_loopback_peers,
            own,
            allowed: cfg.allowed_peers.clone(),
            denied: cfg.denied_peers.clone(),
        };
        let span = cfg.max_port as usize - cfg.min_port as usize + 1;
        let nat = cfg
            .relay_ips
            .iter()
            .map(|ip| (*ip, advertise(&cfg.external_ips, *ip)))
            .filter(|(ip, public)| ip != public)
            .collect();
        Server {
            nonces: NonceMint::new(derive_key(&secret, b"nonce"), cfg.stale_nonce),
            policy,
            epoch: now,
            alternate_turn: 0,
            relay_turn: 0,
            nat,
            unix_epoch: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
            prf: Prf::new(derive_key(&secret, b"prf")),
            allocs: Vec::new(),
            gens: Vec::new(),
            free_slots: Vec::new(),
            by_client: HashMap::new(),
            client_cache: (0..CLIENT_CACHE)
                .map(|_| std::cell::Cell::new(NO_SLOT))
                .collect(),
            cache_key: {
                let k = derive_key(&secret, b"client cache");
                u64::from_le_bytes([k[0], k[1], k[2], k[3], k[4], k[5], k[6], k[7]]) | 1
            },
            by_port: vec![NO_SLOT; span],
            shared: Shared::new(cfg.min_port, cfg.max_port, seed, now),
            failures: limits::FailureLog::default(),
            refusals_logged: 0,
            refusals_unlogged: 0,
            refusal_window: now,
            timers: BinaryHeap::new(),
            live: 0,
            stats: Stats::default(),
            cfg,
        }
    }

    /// Makes this server share ports, reservations and quotas with others (one per core),
    /// before it serves anyone. `shared` must cover this server's port range.
    pub fn with_shared(mut self, shared: Shared) -> Self {
        debug_assert_eq!(self.shared.ports().capacity(), shared.ports().capacity());
        self.shared = shared;
        self
    }

    pub fn stats(&self) -> &Stats {
        &self.stats
    }

    pub fn config(&self) -> &ServerConfig {
        &self.cfg
    }

    /// Allocations alive now.
    pub fn allocation_count(&self) -> usize {
        self.live
    }

    /// Relay ports in use (allocations and reservations).
    pub fn ports_in_use(&self) -> usize {
        self.shared.ports().used()
    }

    /// Relay ports in the configured range.
    pub fn port_capacity(&self) -> usize {
        self.shared.ports().capacity()
    }

    /// Whether `client` holds a live allocation.
    pub fn has_allocation(&self, client: &ClientId) -> bool {
        self.by_client.contains_key(client)
    }

    /// Permissions and channels of the allocation of `client`, for tests and introspection.
    pub fn allocation_info(&self, client: &ClientId) -> Option<(SocketAddr, usize, usize)> {
        let a = self.alloc(*self.by_client.get(client)?)?;
        Some((a.relay, a.perms.len(), a.channels.len()))
    }

    fn alloc(&self, slot: u32) -> Option<&Allocation> {
        self.allocs.get(slot as usize)?.as_ref()
    }

    /// The allocation slot of `client`, for the relay path. A keyed hash map lookup costs a
    /// few hundred instructions for a 5-tuple; a direct-mapped cache indexed by a multiplicative
    /// hash of the addresses answers in a few dozen. An entry is only a hint: it is used when
    /// the allocation in that slot belongs to `client`, so a stale or colliding entry (clients
    /// that map to the same index evict each other) costs one map lookup, never a wrong
    /// answer, and nobody can make a lookup slower than the map alone.
    #[inline]
    fn client_slot(&self, client: &ClientId) -> Option<u32> {
        let (ip, port) = match client.remote {
            SocketAddr::V4(a) => (u64::from(a.ip().to_bits()), a.port()),
            SocketAddr::V6(a) => {
                let b = a.ip().to_bits();
                ((b as u64) ^ ((b >> 64) as u64), a.port())
            }
        };
        let x = (ip << 16 | u64::from(port)) ^ (u64::from(client.local.port()) << 48);
        let i = (x.wrapping_mul(self.cache_key) >> (64 - CLIENT_CACHE.trailing_zeros())) as usize;
        let entry = &self.client_cache[i];
        let slot = entry.get();
        if self.alloc(slot).is_some_and(|a| a.client == *client) {
            return Some(slot);
        }
        let slot = *self.by_client.get(client)?;
        entry.set(slot);
        Some(slot)
    }

    fn secs(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() + 1
    }

    /// Unix time at `now`: the wall clock read when the server started, advanced by `now`
    /// (REST credential expiry is in Unix seconds).
    fn unix_secs(&self, now: Instant) -> u64 {
        self.unix_epoch + now.saturating_duration_since(self.epoch).as_secs()
    }

    fn advertise(&self, relay: IpAddr) -> IpAddr {
        advertise(&self.cfg.external_ips, relay)
    }

    /// A peer address as clients know it. A datagram from one of the server's own relay
    /// addresses (one allocation relaying to another) shows the address that relay is
    /// advertised as, which is the address the client was given and permitted.
    #[inline]
    fn outward(&self, peer: SocketAddr) -> SocketAddr {
        self.translate(peer, |&(relay, public)| (relay, public))
    }

    /// Where to send a datagram for `peer`. One of the server's own advertised addresses is
    /// reached at the relay address behind it, on this host: a 1:1 NAT often does not turn a
    /// packet to its own public address back in (no hairpinning), and the round trip through
    /// it would be wasted anyway.
    #[inline]
    fn inward(&self, peer: SocketAddr) -> SocketAddr {
        self.translate(peer, |&(relay, public)| (public, relay))
    }

    /// `peer` with its address replaced by the second of the first pair of [`Server::nat`]
    /// (ordered by `from_to`) whose first is that address; `peer` itself when none is (and at
    /// once when there is no mapping).
    #[inline]
    fn translate(
        &self,
        peer: SocketAddr,
        from_to: impl Fn(&(IpAddr, IpAddr)) -> (IpAddr, IpAddr),
    ) -> SocketAddr {
        self.nat
            .iter()
            .map(from_to)
            .find(|(from, _)| *from == peer.ip())
            .map_or(peer, |(_, to)| SocketAddr::new(to, peer.port()))
    }

    /// The client's reflexive address for XOR-MAPPED-ADDRESS: its source address, except that
    /// a client on one of the server's own addresses (a program on the same host) is shown
    /// the address `external-ip` maps it to, which is how the rest of the network reaches it
    /// through a 1:1 NAT.
    fn mapped(&self, client: &ClientId) -> SocketAddr {
        let ip = client.remote.ip();
        if self.cfg.external_ips.is_empty()
            || !(ip == client.local.ip() || self.cfg.relay_ips.contains(&ip))
        {
            return client.remote;
        }
        SocketAddr::new(self.advertise(ip), client.remote.port())
    }

    // ---------------------------------------------------------------- client input

    /// Handles one datagram (UDP) or frame (stream transports) from `client`. A reply is
    /// written into `out`, which should hold at least 2048 bytes.
    pub fn handle_client(
        &mut self,
        now: Instant,
        client: ClientId,
        input: &[u8],
        out: &mut [u8],
        relays: &mut impl RelaySockets,
    ) -> ClientAction {
        match wire::classify(input) {
            wire::Kind::ChannelData => self.client_channel_data(now, client, input),
            wire::Kind::Stun => self.client_stun(now, client, input, out, relays),
            wire::Kind::Other => self.dropped(Drop::NotTurn),
        }
    }

    fn dropped(&mut self, d: Drop) -> ClientAction {
        self.stats.drop(d);
        ClientAction::None
    }

    #[inline]
    fn client_channel_data(
        &mut self,
        now: Instant,
        client: ClientId,
        input: &[u8],
    ) -> ClientAction {
        let Some(cd) = ChannelData::parse(input) else {
            return self.dropped(Drop::Malformed);
        };
        let Some(slot) = self.client_slot(&client) else {
            return self.dropped(Drop::NoAllocation);
        };
        let Some(a) = self.alloc(slot) else {
            return self.dropped(Drop::NoAllocation);
        };
        if a.expires <= now {
            return self.dropped(Drop::NoAllocation);
        }
        let Some(ch) = a
            .channels
            .iter()
            .find(|c| c.number.get() == cd.number && c.until > now)
        else {
            return self.dropped(Drop::NoChannel);
        };
        if !a.permitted(ch.peer.ip(), now) {
            return self.dropped(Drop::NoPermission);
        }
        let relay = a.relay_for(ch.peer).unwrap_or(a.relay);
        let peer = self.inward(ch.peer);
        let len = cd.payload.len();
        if !self.within_budget(slot, 0, len, now) {
            return self.dropped(Drop::Bandwidth);
        }
        self.stats.relayed_to_peer(client.transport, len);
        ClientAction::Forward {
            relay,
            peer,
            payload: wire::CHANNEL_DATA_HEADER_LEN..wire::CHANNEL_DATA_HEADER_LEN + len,
        }
    }

    fn client_stun(
        &mut self,
        now: Instant,
        client: ClientId,
        input: &[u8],
        out: &mut [u8],
        relays: &mut impl RelaySockets,
    ) -> ClientAction {
        let msg = match MessageRef::parse(input) {
            Ok(m) => m,
            Err(e) => {
                // A message that fails the framing checks of RFC 8489 5 (bits, cookie, length)
                // is discarded; a request that is framed right but carries a malformed
                // attribute gets 400.
                let framed = matches!(e, ParseError::BadAttribute | ParseError::TooManyAttributes);
                if let Some((method, Class::Request, txid)) =
                    MessageRef::header(input).filter(|_| framed)
                {
                    debug!(%client, error = %e, "malformed request");
                    self.stats.drop(Drop::Malformed);
                    return self.bare_error(out, method, &txid, ErrorCode::BAD_REQUEST);
                }
                return self.dropped(Drop::Malformed);
            }
        };
        if msg.fingerprint_valid() == Some(false) {
            return self.dropped(Drop::BadFingerprint);
        }
        match (msg.method(), msg.class()) {
            (Method::SEND, Class::Indication) => {
                self.stats.request(Method::SEND);
                self.send_indication(now, client, &msg)
            }
            (Method::BINDING, Class::Request) => {
                self.stats.request(Method::BINDING);
                self.binding(client, &msg, out)
            }
            (
                Method::ALLOCATE
                | Method::REFRESH
                | Method::CREATE_PERMISSION
                | Method::CHANNEL_BIND,
                Class::Request,
            ) => {
                self.stats.request(msg.method());
                self.turn_request(now, client, &msg, out, relays)
            }
            (m, Class::Request) => {
                self.stats.request(m);
                self.refuse(
                    client,
                    &msg,
                    out,
                    None,
                    (ErrorCode::BAD_REQUEST, "unknown method"),
                )
            }
            // Binding indications are keepalives; responses are not ours to act on.
            _ => self.dropped(Drop::Unexpected),
        }
    }

    fn binding(&mut self, client: ClientId, msg: &MessageRef, out: &mut [u8]) -> ClientAction {
        // RFC 5780: its request attributes are understood where it is served (a UDP listener
        // with an other address) and nowhere else, where CHANGE-REQUEST gets 420 (section 6).
        let other = self.cfg.nat_discovery.other(&client);
        let mut unknown = [0u16; 8];
        let mut n = msg.unknown_required(&mut unknown);
        if other.is_some() {
            let mut kept = 0;
            for i in 0..n {
                if !AttrType::RFC5780_REQUEST.contains(&AttrType(unknown[i])) {
                    unknown[kept] = unknown[i];
                    kept += 1;
                }
            }
            n = kept;
        }
        if n > 0 {
            if AttrType::RFC5780_REQUEST.iter().any(|t| msg.has(*t)) {
                self.stats.nat_discovery_refused += 1;
            }
            return self.unknown_attributes(client, msg, out, None, &unknown[..n]);
        }
        let mapped = self.mapped(&client);
        let Some(other) = other else {
            self.stats.response(Method::BINDING, None);
            return self.respond(out, msg, None, None, |w| {
                w.add_xor_address(AttrType::XOR_MAPPED_ADDRESS, mapped)
                    .add_address(AttrType::MAPPED_ADDRESS, mapped);
            });
        };
        let plan = match discovery::Plan::new(&client, msg, other) {
            Ok(plan) => plan,
            Err((code, reason)) => {
                // Unauthenticated and cheap to send: counted, logged at debug only.
                debug!(%client, code = code.0, reason, "binding refused");
                self.stats.nat_discovery_refused += 1;
                self.stats.response(Method::BINDING, Some(code.0));
                return self.respond(out, msg, Some(code), None, |_| {});
            }
        };
        // Both addresses as clients see them: behind a 1:1 NAT, the public ones.
        let origin = SocketAddr::new(self.advertise(plan.from.ip()), plan.from.port());
        let other = SocketAddr::new(self.advertise(plan.other.ip()), plan.other.port());
        let trailer = if self.cfg.fingerprint || msg.fingerprint_valid().is_some() {
            8
        } else {
            0
        };
        let request_len = msg.as_bytes().len();
        self.stats.response(Method::BINDING, None);
        let action = self.respond(out, msg, None, None, |w| {
            w.add_xor_address(AttrType::XOR_MAPPED_ADDRESS, mapped)
                .add_address(AttrType::MAPPED_ADDRESS, mapped)
                .add_address(AttrType::RESPONSE_ORIGIN, origin)
                .add_address(AttrType::OTHER_ADDRESS, other);
            if plan.padding {
                let len = discovery::Plan::padding(request_len, w.len(), trailer);
                w.add_padding(len);
            }
        });
        let ClientAction::Reply(len) = action else {
            return action;
        };
        if plan.from == client.local && plan.to == client.remote {
            return action;
        }
        if plan.from != client.local {
            self.stats.nat_discovery_other_source += 1;
        }
        if plan.to != client.remote {
            self.stats.nat_discovery_response_port += 1;
        }
        ClientAction::ReplyFrom {
            len,
            from: plan.from,
            to: plan.to,
        }
    }

    /// Writes a response to `req`: the error (if any), the attributes `add` appends, SOFTWARE,
    /// the integrity attribute (if `auth`), and FINGERPRINT.
    fn respond(
        &self,
        out: &mut [u8],
        req: &MessageRef,
        error: Option<ErrorCode>,
        auth: Option<&Auth>,
        add: impl FnOnce(&mut MessageWriter),
    ) -> ClientAction {
        let class = if error.is_some() {
            Class::Error
        } else {
            Class::Success
        };
        let mut w = MessageWriter::new(out, req.method(), class, req.transaction_id());
        if let Some(e) = error {
            w.add_error(e);
        }
        add(&mut w);
        // SOFTWARE only to authenticated clients: answers to anyone else stay small, so that
        // a forged source address gains little (the 401 carries just REALM and NONCE).
        if auth.is_some() && !self.cfg.software.is_empty() {
            w.add(AttrType::SOFTWARE, self.cfg.software.as_bytes());
        }
        if let Some(a) = auth {
            match a.integrity {
                Integrity::Sha1 => w.add_integrity(a.key.as_slice()),
                Integrity::Sha256 => w.add_integrity_sha256(a.key.as_slice()),
            };
        }
        if self.cfg.fingerprint || req.fingerprint_valid().is_some() {
            w.add_fingerprint();
        }
        match w.finish() {
            Some(n) => ClientAction::Reply(n),
            None => ClientAction::None,
        }
    }

    /// A 400 for a request that could not be parsed past its header.
    fn bare_error(
        &mut self,
        out: &mut [u8],
        method: Method,
        txid: &TransactionId,
        code: ErrorCode,
    ) -> ClientAction {
        self.stats.response(method, Some(code.0));
        let mut w = MessageWriter::new(out, method, Class::Error, txid);
        w.add_error(code);
        if self.cfg.fingerprint {
            w.add_fingerprint();
        }
        w.finish().map_or(ClientAction::None, ClientAction::Reply)
    }

    /// An error response, counted and logged.
    /// Whether a refused request may be logged: at most [`REFUSAL_LOGS`] in each second (the
    /// timer, at least once a second, starts the next one and says how many went unlogged), so
    /// a flood of bad requests cannot flood the log. The response counters count every one.
    fn may_log_refusal(&mut self) -> bool {
        if self.refusals_logged < REFUSAL_LOGS {
            self.refusals_logged += 1;
            true
        } else {
            self.refusals_unlogged += 1;
            false
        }
    }

    fn refuse(
        &mut self,
        client: ClientId,
        req: &MessageRef,
        out: &mut [u8],
        auth: Option<&Auth>,
        (code, reason): Refused,
    ) -> ClientAction {
        self.stats.response(req.method(), Some(code.0));
        if self.may_log_refusal() {
            info!(%client, method = req.method().name(), code = code.0, reason, "request refused");
        }
        self.respond(out, req, Some(code), auth, |_| {})
    }

    fn unknown_attributes(
        &mut self,
        client: ClientId,
        req: &MessageRef,
        out: &mut [u8],
        auth: Option<&Auth>,
        unknown: &[u16],
    ) -> ClientAction {
        let code = ErrorCode::UNKNOWN_ATTRIBUTE;
        self.stats.response(req.method(), Some(code.0));
        if self.may_log_refusal() {
            info!(%client, method = req.method().name(), code = code.0, ?unknown, "request refused: unknown comprehension-required attributes");
        }
        self.respond(out, req, Some(code), auth, |w| {
            w.add_unknown_attributes(unknown);
        })
    }

    /// A 401 or 438 carrying REALM and a fresh NONCE (RFC 8489 9.2.4), without
    /// MESSAGE-INTEGRITY. `user` names who failed, when the request named a user.
    fn challenge(
        &mut self,
        now: Instant,
        client: ClientId,
        req: &MessageRef,
        out: &mut [u8],
        (code, reason): Refused,
        user: Option<&str>,
    ) -> ClientAction {
        if !self.shared.challenges().allow(client.remote.ip(), now) {
            return self.dropped(Drop::RateLimited);
        }
        self.stats.response(req.method(), Some(code.0));
        let mut nonce = [0u8; NONCE_LEN];
        self.nonces.issue(self.secs(now), client.remote, &mut nonce);
        let method = req.method().name();
        if req.integrity().is_none() {
            // The first request of every client: the normal start of the exchange.
            debug!(%client, method, "challenging for credentials");
        } else {
            // A nonce that aged (438) is the normal course of a long session, and bad
            // credentials (401) are logged per user and window by the failure log.
            debug!(%client, method, code = code.0, reason, user, "request refused");
        }
        let realm = self.cfg.users.as_ref().map_or("", |u| u.realm());
        self.respond(out, req, Some(code), None, |w| {
            w.add(AttrType::REALM, realm.as_bytes())
                .add(AttrType::NONCE, &nonce)
                .add(AttrType::PASSWORD_ALGORITHMS, &PASSWORD_ALGORITHMS);
        })
    }

    /// Long-term credential check (RFC 8489 9.2.4). `Err` holds the response already written.
    fn authenticate<'m>(
        &mut self,
        now: Instant,
        client: ClientId,
        msg: &MessageRef<'m>,
        out: &mut [u8],
    ) -> Result<Option<Auth<'m>>, ClientAction> {
        let Some(users) = &self.cfg.users else {
            return Ok(None);
        };
        let Some(integrity) = msg.integrity() else {
            let refused = (ErrorCode::UNAUTHORIZED, "no credentials");
            return Err(self.challenge(now, client, msg, out, refused, None));
        };
        let bad_request = |reason| (ErrorCode::BAD_REQUEST, reason);
        let (Ok(Some(_realm)), Ok(Some(nonce))) = (msg.realm(), msg.nonce()) else {
            let refused = bad_request("integrity without REALM and NONCE");
            return Err(self.refuse(client, msg, out, None, refused));
        };
        // The user: USERNAME, or USERHASH (RFC 8489 14.4), which names a configured user only.
        let username: std::borrow::Cow<'m, str> = match msg.username() {
            Ok(Some(u)) => u.into(),
            Ok(None) => match msg.get(AttrType::USERHASH) {
                Some(hash) => match users.user_by_hash(hash) {
                    Some(u) => u.to_owned().into(),
                    None => {
                        self.stats.auth_failures += 1;
                        let refused = (ErrorCode::UNAUTHORIZED, "unknown USERHASH");
                        return Err(self.challenge(now, client, msg, out, refused, None));
                    }
                },
                None => {
                    let refused = bad_request("integrity without USERNAME or USERHASH");
                    return Err(self.refuse(client, msg, out, None, refused));
                }
            },
            Err(_) => {
                let refused = bad_request("malformed USERNAME");
                return Err(self.refuse(client, msg, out, None, refused));
            }
        };
        // The password algorithm (RFC 8489 9.2.4): MD5 when the client names none; otherwise
        // PASSWORD-ALGORITHMS must repeat this server's offer byte for byte (so that a removed
        // SHA-256 shows: downgrade protection) and PASSWORD-ALGORITHM must be one of it.
        let algorithm = match (
            msg.get(AttrType::PASSWORD_ALGORITHMS),
            msg.get(AttrType::PASSWORD_ALGORITHM),
        ) {
            (None, None) => PasswordAlgorithm::Md5,
            (Some(offer), Some(&[a, b, 0, 0])) if offer == PASSWORD_ALGORITHMS => {
                match PasswordAlgorithm::from_code(u16::from_be_bytes([a, b])) {
                    Some(alg) => alg,
                    None => {
                        let refused = bad_request("PASSWORD-ALGORITHM not offered");
                        return Err(self.refuse(client, msg, out, None, refused));
                    }
                }
            }
            _ => {
                let refused = bad_request(
                    "PASSWORD-ALGORITHMS differs from the offer, or PASSWORD-ALGORITHM is \
                     missing or malformed",
                );
                return Err(self.refuse(client, msg, out, None, refused));
            }
        };
        let username_str: &str = &username;
        // RFC 8489 9.2.4 order: the user, then the integrity, then the nonce. Password checks
        // are rate-limited per user and source address; beyond the limit the answer is 401
        // without a check, so guessing gains nothing.
        let guess = (username_str, client.remote.ip());
        let checked = self.shared.guesses().has_token(guess, now);
        let verdict = if checked {
            users.verify(username_str, self.unix_secs(now), algorithm, |k| {
                msg.verify(k)
            })
        } else {
            Verdict::BadIntegrity
        };
        let Verdict::Valid(key) = verdict else {
            // Only failures spend the budget.
            self.shared.guesses().allow(guess, now);
            self.stats.auth_failures += 1;
            let known = users.key(username_str).is_some()
                || (users.has_secrets() && crate::auth::rest_expiry(username_str).is_some());
            let shown = if known {
                username_str
            } else {
                "(unknown user)"
            };
            let reason = match verdict {
                _ if !checked => "too many attempts",
                Verdict::Expired(expiry) => {
                    debug!(%client, user = username_str, expiry, "REST credentials past their expiry");
                    "expired credentials (REST username past its expiry time)"
                }
                _ => "bad credentials",
            };
            self.failures.record(shown, &client, reason, now);
            return Err(self.challenge(
                now,
                client,
                msg,
                out,
                (ErrorCode::UNAUTHORIZED, reason),
                Some(username_str),
            ));
        };
        if self.nonces.check(nonce, self.secs(now), client.remote) == NonceCheck::Stale {
            let refused = (ErrorCode::STALE_NONCE, "stale nonce");
            return Err(self.challenge(now, client, msg, out, refused, Some(username_str)));
        }
        Ok(Some(Auth {
            username,
            key,
            integrity,
        }))
    }

    fn turn_request(
        &mut self,
        now: Instant,
        client: ClientId,
        msg: &MessageRef,
        out: &mut [u8],
        relays: &mut impl RelaySockets,
    ) -> ClientAction {
        let auth = match self.authenticate(now, client, msg, out) {
            Ok(a) => a,
            Err(action) => return action,
        };
        let mut unknown = [0u16; 8];
        let n = msg.unknown_required(&mut unknown);
        if n > 0 {
            return self.unknown_attributes(client, msg, out, auth.as_ref(), &unknown[..n]);
        }
        if msg.method() == Method::ALLOCATE
            && let Some(alternate) = self.alternate_server(&client)
        {
            debug!(%client, %alternate, "allocate redirected (300 Try Alternate)");
            self.stats
                .response(msg.method(), Some(ErrorCode::TRY_ALTERNATE.0));
            return self.respond(
                out,
                msg,
                Some(ErrorCode::TRY_ALTERNATE),
                auth.as_ref(),
                |w| {
                    w.add_address(AttrType::ALTERNATE_SERVER, alternate);
                },
            );
        }
        let username = auth.as_ref().map_or("", |a| &*a.username);
        let result = match msg.method() {
            Method::ALLOCATE => self.allocate(now, client, msg, auth.as_ref(), relays),
            m => match self
                .by_client
                .get(&client)
                .copied()
                .filter(|s| self.alloc(*s).is_some_and(|a| a.expires > now))
            {
                None => Err((
                    ErrorCode::ALLOCATION_MISMATCH,
                    "no allocation for this 5-tuple",
                )),
                Some(slot) if self.alloc(slot).is_some_and(|a| &*a.username != username) => Err((
                    ErrorCode::WRONG_CREDENTIALS,
                    "allocation belongs to another user",
                )),
                Some(slot) => match m {
                    Method::REFRESH => self.refresh(now, slot, msg, relays),
                    Method::CREATE_PERMISSION => self.create_permission(now, slot, msg),
                    _ => self.channel_bind(now, slot, msg),
                },
            },
        };
        match result {
            Err(refused) => self.refuse(client, msg, out, auth.as_ref(), refused),
            Ok(success) => {
                self.stats.response(msg.method(), None);
                self.respond(out, msg, None, auth.as_ref(), |w| match success {
                    Success::Allocate {
                        relayed,
                        second,
                        lifetime,
                        mapped,
                        token,
                        address_error,
                    } => {
                        w.add_xor_address(AttrType::XOR_RELAYED_ADDRESS, relayed);
                        if let Some(second) = second {
                            w.add_xor_address(AttrType::XOR_RELAYED_ADDRESS, second);
                        }
                        w.add_u32(AttrType::LIFETIME, lifetime);
                        if let Some(t) = token {
                            w.add(AttrType::RESERVATION_TOKEN, &t);
                        }
                        if let Some((family, code)) = address_error {
                            w.add_address_error(family, code);
                        }
                        w.add_xor_address(AttrType::XOR_MAPPED_ADDRESS, mapped);
                    }
                    Success::Lifetime(l) => {
                        w.add_u32(AttrType::LIFETIME, l);
                    }
                    Success::Empty => {}
                })
            }
        }
    }

    /// The next alternate server for `client` (RFC 8489 10): the configured servers for its
    /// transport, in turn, among those of its address family; `None` when there are none.
    fn alternate_server(&mut self, client: &ClientId) -> Option<SocketAddr> {
        let list = match client.transport {
            Transport::Udp | Transport::Tcp => &self.cfg.alternate_servers,
            Transport::Tls | Transport::Dtls => &self.cfg.tls_alternate_servers,
        };
        let v4 = client.remote.is_ipv4();
        let n = list.iter().filter(|a| a.is_ipv4() == v4).count();
        if n == 0 {
            return None;
        }
        self.alternate_turn = self.alternate_turn.wrapping_add(1);
        list.iter()
            .filter(|a| a.is_ipv4() == v4)
            .nth(self.alternate_turn % n)
            .copied()
    }

    /// The lifetime granted for a requested one (RFC 8656 7.2): the request capped at the
    /// maximum, and never below the default.
    fn granted_lifetime(&self, requested: Option<u32>) -> u32 {
        let max = self.cfg.max_lifetime;
        match requested {
            None => self.cfg.default_lifetime.min(max),
            Some(r) => r.min(max).max(self.cfg.default_lifetime.min(max)),
        }
    }

    fn allocate(
        &mut self,
        now: Instant,
        client: ClientId,
        msg: &MessageRef,
        auth: Option<&Auth>,
        relays: &mut impl RelaySockets,
    ) -> Result<Success, Refused> {
        // An allocation past its lifetime whose timer has not run yet is gone already.
        if let Some(&slot) = self.by_client.get(&client)
            && self.alloc(slot).is_some_and(|a| a.expires <= now)
        {
            self.remove(slot, EndReason::Expired, relays);
        }
        if let Some(&slot) = self.by_client.get(&client) {
            let Some(a) = self.alloc(slot) else {
                return Err((ErrorCode::SERVER_ERROR, "allocation table inconsistent"));
            };
            // A retransmission of the request that created the allocation gets the same answer.
            if a.created_by == *msg.transaction_id() {
                let lifetime = a.expires.saturating_duration_since(now).as_secs() as u32;
                let address_error = (a.second.is_none()
                    && msg.additional_address_family().is_ok_and(|f| f.is_some()))
                .then_some((FAMILY_IPV6, ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED));
                return Ok(Success::Allocate {
                    relayed: a.advertised,
                    second: a.second.map(|(_, advertised)| advertised),
                    lifetime,
                    mapped: self.mapped(&client),
                    token: a.reservation,
                    address_error,
                });
            }
            return Err((
                ErrorCode::ALLOCATION_MISMATCH,
                "5-tuple already has an allocation",
            ));
        }
        // Every attribute is checked before a port is taken (RFC 8656 7.2).
        let bad = (ErrorCode::BAD_REQUEST, "malformed attribute");
        match msg.requested_transport().map_err(|_| bad)? {
            None => return Err((ErrorCode::BAD_REQUEST, "no REQUESTED-TRANSPORT")),
            Some(PROTO_UDP) => {}
            Some(_) => {
                return Err((
                    ErrorCode::UNSUPPORTED_TRANSPORT_PROTOCOL,
                    "only UDP relaying is offered",
                ));
            }
        }
        let even = msg.even_port().map_err(|_| bad)?;
        let token = msg.reservation_token().map_err(|_| bad)?;
        let family = msg.requested_address_family().map_err(|_| bad)?;
        let additional = msg.additional_address_family().map_err(|_| bad)?;
        let requested_lifetime = msg.lifetime().map_err(|_| bad)?;
        // DONT-FRAGMENT is accepted: relay sockets use the kernel's path-MTU discovery
        // default, which sets DF on every datagram that fits the known path MTU.
        if token.is_some() && (even.is_some() || family.is_some()) {
            return Err((
                ErrorCode::BAD_REQUEST,
                "RESERVATION-TOKEN with EVEN-PORT or REQUESTED-ADDRESS-FAMILY",
            ));
        }
        // RFC 8656 7.2 steps 5, 6, 8, 9: ADDITIONAL-ADDRESS-FAMILY asks for an IPv6 relay
        // besides the IPv4 one, and combines with nothing that picks a single address.
        let dual = match additional {
            None => false,
            Some(_) if token.is_some() || family.is_some() || even == Some(true) => {
                return Err((
                    ErrorCode::BAD_REQUEST,
                    "ADDITIONAL-ADDRESS-FAMILY with RESERVATION-TOKEN, \
                     REQUESTED-ADDRESS-FAMILY or EVEN-PORT",
                ));
            }
            Some(FAMILY_IPV6) => true,
            Some(_) => {
                return Err((
                    ErrorCode::BAD_REQUEST,
                    "ADDITIONAL-ADDRESS-FAMILY must be IPv6",
                ));
            }
        };
        let want_v4 = match family {
            None | Some(FAMILY_IPV4) => true,
            Some(FAMILY_IPV6) => false,
            Some(_) => {
                return Err((
                    ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
                    "unknown address family",
                ));
            }
        };
        let username = auth.map_or("", |a| &*a.username);
        let limits = Limits {
            total: self.cfg.total_quota,
            user: self.cfg.user_quota,
            ip: self.cfg.ip_quota,
        };
        if let Err(e) = self
            .shared
            .quotas
            .take(username, client.remote.ip(), limits)
        {
            let reason = match e {
                Exceeded::Total => "total quota reached",
                Exceeded::User => "user quota reached",
                Exceeded::Ip => "client address quota reached",
            };
            return Err((ErrorCode::ALLOCATION_QUOTA_REACHED, reason));
        }
        // A dual allocation without an IPv6 relay address gets its IPv4 one, and the IPv6 one
        // is refused in ADDRESS-ERROR-CODE (RFC 8656 7.2 step 9).
        let v6_ip = if dual { self.relay_ip(false) } else { None };
        let address_error = (dual && v6_ip.is_none())
            .then_some((FAMILY_IPV6, ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED));
        let picked = match v6_ip {
            Some(v6) => self.bind_dual(v6, even.is_some(), relays),
            None => self.pick_relay(now, token, want_v4, even, relays),
        };
        let (relay, second, reservation) = match picked {
            Ok(r) => r,
            Err(refused) => {
                self.shared.quotas.give_back(username, client.remote.ip());
                return Err(refused);
            }
        };

        let lifetime = self.granted_lifetime(requested_lifetime);
        let advertised = SocketAddr::new(self.advertise(relay.ip()), relay.port());
        let second = second.map(|r| (r, SocketAddr::new(self.advertise(r.ip()), r.port())));
        let a = Allocation {
            client,
            relay,
            advertised,
            second,
            username: username.into(),
            expires: now + Duration::from_secs(lifetime as u64),
            created_by: *msg.transaction_id(),
            perms: Vec::new(),
            channels: Vec::new(),
            timer: None,
            reservation,
            budgets: [Budget::new(now, self.burst()); 2],
        };
        let slot = self.insert(a);
        self.schedule(slot, now);
        self.stats.allocations_created += 1;
        match second {
            None => {
                info!(%client, user = username, relay = %relay, advertised = %advertised, lifetime, "allocation created");
            }
            Some((relay2, advertised2)) => {
                info!(%client, user = username, relay = %relay, advertised = %advertised, relay2 = %relay2, advertised2 = %advertised2, lifetime, "allocation created (dual)");
            }
        }
        Ok(Success::Allocate {
            relayed: advertised,
            second: second.map(|(_, a)| a),
            lifetime,
            mapped: self.mapped(&client),
            token: reservation,
            address_error,
        })
    }

    /// The relay address for a new allocation: the reserved port a token names, or a port
    /// taken from the pool and bound (with the next one reserved for an even pair).
    fn pick_relay(
        &mut self,
        now: Instant,
        token: Option<[u8; 8]>,
        want_v4: bool,
        even: Option<bool>,
        relays: &mut impl RelaySockets,
    ) -> Result<Picked, Refused> {
        if let Some(t) = token {
            let unknown = (
                ErrorCode::INSUFFICIENT_CAPACITY,
                "unknown or expired reservation token",
            );
            let r = {
                let mut reservations = self.shared.reservations();
                let i = reservations
                    .iter()
                    .position(|r| r.token == t && r.until > now)
                    .ok_or(unknown)?;
                reservations.swap_remove(i)
            };
            // The reserved port's socket was bound (parked) when it was reserved.
            let addr = SocketAddr::new(r.ip, r.port);
            if !relays.adopt(addr) {
                self.shared.ports().release(r.port);
                return Err(unknown);
            }
            return Ok((addr, None, None));
        }
        let Some(ip) = self.relay_ip(want_v4) else {
            return Err((
                ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
                "no relay address of the requested family",
            ));
        };
        let (addr, token) = self.bind_relay(now, ip, even, relays)?;
        Ok((addr, None, token))
    }

    /// The relay address of a family for the next allocation: the configured ones of that
    /// family in turn.
    fn relay_ip(&mut self, v4: bool) -> Option<IpAddr> {
        let ips = &self.cfg.relay_ips;
        let n = ips.iter().filter(|ip| ip.is_ipv4() == v4).count();
        if n == 0 {
            return None;
        }
        self.relay_turn = self.relay_turn.wrapping_add(1);
        ips.iter()
            .copied()
            .filter(|ip| ip.is_ipv4() == v4)
            .nth(self.relay_turn % n)
    }

    /// The two relay addresses of a dual allocation: an IPv4 and the IPv6 address `v6`, on
    /// one port (so that the port alone still finds the allocation), an even one if asked.
    fn bind_dual(
        &mut self,
        v6: IpAddr,
        even: bool,
        relays: &mut impl RelaySockets,
    ) -> Result<Picked, Refused> {
        let Some(v4) = self.relay_ip(true) else {
            return Err((
                ErrorCode::ADDRESS_FAMILY_NOT_SUPPORTED,
                "no IPv4 relay address",
            ));
        };
        let full = (
            ErrorCode::INSUFFICIENT_CAPACITY,
            "relay port range exhausted",
        );
        for _ in 0..BIND_ATTEMPTS {
            let port = {
                let mut ports = self.shared.ports();
                if even {
                    ports.take_even(false)
                } else {
                    ports.take()
                }
            }
            .ok_or(full)?;
            let (a, b) = (SocketAddr::new(v4, port), SocketAddr::new(v6, port));
            if relays.open(a) {
                if relays.open(b) {
                    return Ok((a, Some(b), None));
                }
                relays.close(a);
            }
            // Taken by another program: back to the end of the queue.
            self.shared.ports().release(port);
        }
        Err(full)
    }

    /// Takes a port (even, or an even pair, when asked), binds it, and records a reservation
    /// for the odd port of a pair.
    fn bind_relay(
        &mut self,
        now: Instant,
        ip: IpAddr,
        even: Option<bool>,
        relays: &mut impl RelaySockets,
    ) -> Result<(SocketAddr, Option<[u8; 8]>), Refused> {
        let full = (
            ErrorCode::INSUFFICIENT_CAPACITY,
            "relay port range exhausted",
        );
        for _ in 0..BIND_ATTEMPTS {
            let port = {
                let mut ports = self.shared.ports();
                match even {
                    None => ports.take(),
                    Some(pair) => ports.take_even(pair),
                }
            }
            .ok_or(full)?;
            let addr = SocketAddr::new(ip, port);
            let pair = even == Some(true);
            if !relays.open(addr) {
                // Taken by another program: back to the end of the queue.
                let mut ports = self.shared.ports();
                ports.release(port);
                if pair {
                    ports.release(port + 1);
                }
                continue;
            }
            if !pair {
                return Ok((addr, None));
            }
            // RFC 8656 7.2: the next port is reserved, which means bound now, so that the
            // Allocate redeeming the token is sure to get it.
            let next = SocketAddr::new(ip, port + 1);
            if !relays.park(next) {
                relays.close(addr);
                let mut ports = self.shared.ports();
                ports.release(port);
                ports.release(port + 1);
                continue;
            }
            let mut token = [0u8; 8];
            self.prf.fill(&mut token);
            self.shared.reservations().push(Reservation {
                token,
                port: port + 1,
                ip,
                until: now + RESERVATION_LIFETIME,
            });
            return Ok((addr, Some(token)));
        }
        Err(full)
    }

    fn insert(&mut self, a: Allocation) -> u32 {
        let port_idx = (a.relay.port() - self.cfg.min_port) as usize;
        let client = a.client;
        let slot = match self.free_slots.pop() {
            Some(s) => {
                self.allocs[s as usize] = Some(a);
                s
            }
            None => {
                self.allocs.push(Some(a));
                self.gens.push(0);
                (self.allocs.len() - 1) as u32
            }
        };
        self.by_client.insert(client, slot);
        self.by_port[port_idx] = slot;
        self.live += 1;
        slot
    }

    fn remove(&mut self, slot: u32, reason: EndReason, relays: &mut impl RelaySockets) {
        let Some(a) = self.allocs.get_mut(slot as usize).and_then(Option::take) else {
            return;
        };
        self.gens[slot as usize] = self.gens[slot as usize].wrapping_add(1);
        self.free_slots.push(slot);
        self.by_client.remove(&a.client);
        self.by_port[(a.relay.port() - self.cfg.min_port) as usize] = NO_SLOT;
        self.shared.ports().release(a.relay.port());
        relays.close(a.relay);
        if let Some((second, _)) = a.second {
            relays.close(second);
        }
        self.shared
            .quotas
            .give_back(&a.username, a.client.remote.ip());
        self.live -= 1;
        self.stats.allocations_ended[reason as usize] += 1;
        info!(client = %a.client, user = &*a.username, relay = %a.relay, reason = reason.name(), "allocation deleted");
    }

    /// Queues a timer entry for the allocation's next deadline unless one as early is queued.
    fn schedule(&mut self, slot: u32, now: Instant) {
        let gen_ = self.gens[slot as usize];
        let Some(a) = self.allocs[slot as usize].as_mut() else {
            return;
        };
        let t = a.next_deadline(now);
        if a.timer.is_none_or(|q| t < q) {
            a.timer = Some(t);
            self.timers.push(Reverse((t, slot, gen_)));
            if self.timers.len() > 2 * self.live + 64 {
                self.compact_timers();
            }
        }
    }

    /// Drops timer entries that no longer match their allocation's deadline, so that the
    /// queue stays proportional to the number of allocations however clients refresh.
    fn compact_timers(&mut self) {
        let allocs = &self.allocs;
        let gens = &self.gens;
        self.timers.retain(|Reverse((t, slot, gen_))| {
            gens.get(*slot as usize) == Some(gen_)
                && allocs
                    .get(*slot as usize)
                    .and_then(Option::as_ref)
                    .is_some_and(|a| a.timer == Some(*t))
        });
    }

    fn refresh(
        &mut self,
        now: Instant,
        slot: u32,
        msg: &MessageRef,
        relays: &mut impl RelaySockets,
    ) -> Result<Success, Refused> {
        let bad = (ErrorCode::BAD_REQUEST, "malformed attribute");
        let family = msg.requested_address_family().map_err(|_| bad)?;
        let requested = msg.lifetime().map_err(|_| bad)?;
        let Some(a) = self.allocs[slot as usize].as_mut() else {
            return Err((ErrorCode::ALLOCATION_MISMATCH, "no allocation"));
        };
        if let Some(f) = family {
            let v4 = f == FAMILY_IPV4;
            let relays_of_family = [Some(a.relay), a.second.map(|(r, _)| r)]
                .into_iter()
                .flatten()
                .filter(|r| r.is_ipv4() == v4)
                .count();
            if relays_of_family == 0 || !matches!(f, FAMILY_IPV4 | FAMILY_IPV6) {
                return Err((
                    ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH,
                    "REQUESTED-ADDRESS-FAMILY differs from the allocation's",
                ));
            }
            // RFC 8656 7.3: a dual allocation loses only the relayed address of the family
            // named, with its permissions and channels; the other one lives on.
            if requested == Some(0)
                && let Some((second, advertised)) = a.second.take()
            {
                let gone = if a.relay.is_ipv4() == v4 {
                    a.advertised = advertised;
                    std::mem::replace(&mut a.relay, second)
                } else {
                    second
                };
                a.perms.retain(|p| p.ip.is_ipv4() != v4);
                a.channels.retain(|c| c.peer.is_ipv4() != v4);
                relays.close(gone);
                info!(client = %a.client, user = &*a.username, relay = %gone, "relayed address of a dual allocation deleted");
                return Ok(Success::Lifetime(0));
            }
        }
        if requested == Some(0) {
            self.remove(slot, EndReason::Refreshed0, relays);
            return Ok(Success::Lifetime(0));
        }
        let lifetime = self.granted_lifetime(requested);
        let Some(a) = self.allocs[slot as usize].as_mut() else {
            return Err((ErrorCode::ALLOCATION_MISMATCH, "no allocation"));
        };
        a.expires = now + Duration::from_secs(lifetime as u64);
        self.schedule(slot, now);
        Ok(Success::Lifetime(lifetime))
    }

    /// Checks a peer address for an allocation: family and policy.
    fn check_peer(&mut self, slot: u32, peer: SocketAddr) -> Result<(), Refused> {
        let a = self
            .alloc(slot)
            .ok_or((ErrorCode::ALLOCATION_MISMATCH, "no allocation"))?;
        if a.relay_for(peer).is_none() {
            return Err((
                ErrorCode::PEER_ADDRESS_FAMILY_MISMATCH,
                "peer address family differs from the relay's",
            ));
        }
        if let Err(r) = self.policy.check(peer.ip()) {
            self.stats.drop(Drop::Forbidden);
            return Err((ErrorCode::FORBIDDEN, r.reason()));
        }
        Ok(())
    }

    /// The bucket size of the bandwidth limit: one second's worth, and at least one maximal
    /// datagram.
    fn burst(&self) -> f64 {
        f64::from(self.cfg.max_bps).max(65_535.0)
    }

    /// Charges `len` bytes to an allocation's budget in direction `dir` (0 toward the peer, 1
    /// toward the client); `true` when there is no limit or the budget holds them.
    #[inline]
    fn within_budget(&mut self, slot: u32, dir: usize, len: usize, now: Instant) -> bool {
        if self.cfg.max_bps == 0 {
            return true;
        }
        let (rate, burst) = (f64::from(self.cfg.max_bps), self.burst());
        match self.allocs.get_mut(slot as usize).and_then(Option::as_mut) {
            Some(a) => a.budgets[dir].spend(len, now, rate, burst),
            None => false,
        }
    }

    /// The server's own addresses are peers only on relay ports (relay to relay); any other
    /// port of theirs (the listeners, other services of the host) is out of reach. Peers on
    /// loopback are exempt when `allow-loopback-peers` is on.
    #[inline]
    fn own_port_ok(&self, peer: SocketAddr) -> bool {
        let port_ok = (self.cfg.min_port..=self.cfg.max_port).contains(&peer.port());
        port_ok
            || (self.cfg.allow_loopback_peers && policy::canonical(peer.ip()).is_loopback())
            || !self.policy.is_own(peer.ip())
    }

    fn create_permission(
        &mut self,
        now: Instant,
        slot: u32,
        msg: &MessageRef,
    ) -> Result<Success, Refused> {
        let mut any = false;
        // All or nothing: check every address before installing any (RFC 8656 9.2).
        for peer in msg.xor_peer_addresses() {
            let peer = peer.map_err(|_| (ErrorCode::BAD_REQUEST, "malformed XOR-PEER-ADDRESS"))?;
            self.check_peer(slot, peer)?;
            any = true;
        }
        if !any {
            return Err((ErrorCode::BAD_REQUEST, "no XOR-PEER-ADDRESS"));
        }
        let max = self.cfg.max_permissions;
        let Some(a) = self.allocs[slot as usize].as_mut() else {
            return Err((ErrorCode::ALLOCATION_MISMATCH, "no allocation"));
        };
        let mut new = 0;
        for (i, p) in msg.xor_peer_addresses().flatten().enumerate() {
            let repeated = msg
                .xor_peer_addresses()
                .flatten()
                .take(i)
                .any(|q| q.ip() == p.ip());
            if !repeated && !a.perms.iter().any(|q| q.ip == p.ip()) {
                new += 1;
            }
        }
        if a.perms.len() + new > max {
            return Err((ErrorCode::INSUFFICIENT_CAPACITY, "too many permissions"));
        }
        let until = now + PERMISSION_LIFETIME;
        for peer in msg.xor_peer_addresses().flatten() {
            install_permission(a, peer.ip(), until, &mut self.stats);
        }
        self.schedule(slot, now);
        Ok(Success::Empty)
    }

    fn channel_bind(
        &mut self,
        now: Instant,
        slot: u32,
        msg: &MessageRef,
    ) -> Result<Success, Refused> {
        let bad = (ErrorCode::BAD_REQUEST, "malformed attribute");
        let number = msg
            .channel_number()
            .map_err(|_| bad)?
            .ok_or((ErrorCode::BAD_REQUEST, "no CHANNEL-NUMBER"))?;
        let number = ChannelNumber::new(number)
            .ok_or((ErrorCode::BAD_REQUEST, "channel number out of range"))?;
        let peer = msg
            .xor_peer_address()
            .map_err(|_| bad)?
            .ok_or((ErrorCode::BAD_REQUEST, "no XOR-PEER-ADDRESS"))?;
        self.check_peer(slot, peer)?;
        if !self.own_port_ok(peer) {
            self.stats.drop(Drop::Forbidden);
            return Err((
                ErrorCode::FORBIDDEN,
                "the server's own address outside the relay ports",
            ));
        }
        let max_channels = self.cfg.max_channels;
        let max_perms = self.cfg.max_permissions;
        let Some(a) = self.allocs[slot as usize].as_mut() else {
            return Err((ErrorCode::ALLOCATION_MISMATCH, "no allocation"));
        };
        // RFC 8656 12.2: a number is bound to one peer and a peer to one number, including
        // during the cooldown after expiry.
        let by_number = a.channels.iter().position(|c| c.number == number);
        let by_peer = a.channels.iter().position(|c| c.peer == peer);
        match (by_number, by_peer) {
            (Some(i), Some(j)) if i == j => {}
            (None, None) => {
                if a.channels.len() >= max_channels {
                    return Err((ErrorCode::INSUFFICIENT_CAPACITY, "too many channels"));
                }
            }
            (Some(_), _) => {
                return Err((
                    ErrorCode::BAD_REQUEST,
                    "channel number bound to another peer",
                ));
            }
            (None, Some(_)) => {
                return Err((ErrorCode::BAD_REQUEST, "peer bound to another channel"));
            }
        }
        let has_perm = a.perms.iter().any(|p| p.ip == peer.ip());
        if !has_perm && a.perms.len() >= max_perms {
            return Err((ErrorCode::INSUFFICIENT_CAPACITY, "too many permissions"));
        }
        let until = now + CHANNEL_LIFETIME;
        match by_number {
            Some(i) => a.channels[i].until = until,
            None => {
                a.channels.push(Channel {
                    number,
                    peer,
                    until,
                });
                self.stats.channels_bound += 1;
            }
        }
        install_permission(a, peer.ip(), now + PERMISSION_LIFETIME, &mut self.stats);
        self.schedule(slot, now);
        Ok(Success::Empty)
    }

    fn send_indication(
        &mut self,
        now: Instant,
        client: ClientId,
        msg: &MessageRef,
    ) -> ClientAction {
        let Some(slot) = self.client_slot(&client) else {
            return self.dropped(Drop::NoAllocation);
        };
        // RFC 8489 6.3.2: an indication with unknown comprehension-required attributes is
        // discarded.
        if msg.unknown_required(&mut [0u16; 1]) > 0 {
            return self.dropped(Drop::BadIndication);
        }
        let (Ok(Some(peer)), Some(payload)) =
            (msg.xor_peer_address(), msg.range_of(AttrType::DATA))
        else {
            return self.dropped(Drop::BadIndication);
        };
        let Some(a) = self.alloc(slot) else {
            return self.dropped(Drop::NoAllocation);
        };
        let Some(relay) = a.relay_for(peer).filter(|_| a.expires > now) else {
            return self.dropped(Drop::BadIndication);
        };
        if !a.permitted(peer.ip(), now) {
            return self.dropped(Drop::NoPermission);
        }
        if !self.own_port_ok(peer) {
            return self.dropped(Drop::Forbidden);
        }
        if !self.within_budget(slot, 0, payload.len(), now) {
            return self.dropped(Drop::Bandwidth);
        }
        self.stats.relayed_to_peer(client.transport, payload.len());
        ClientAction::Forward {
            relay,
            peer: self.inward(peer),
            payload,
        }
    }

    // ---------------------------------------------------------------- peer input

    /// Handles a datagram from `peer` received on the relay socket bound to `relay`. The
    /// payload is `buf[payload]`, and `payload.start` must be at least [`wire::HEADROOM`] with
    /// [`wire::TAILROOM`] bytes of `buf` after `payload.end`: the ChannelData or Data
    /// indication header is written in front of the payload, and padding after it.
    #[inline]
    pub fn handle_peer(
        &mut self,
        now: Instant,
        relay: SocketAddr,
        peer: SocketAddr,
        buf: &mut [u8],
        payload: Range<usize>,
    ) -> PeerAction {
        let slot = match relay.port().checked_sub(self.cfg.min_port) {
            Some(i) => self.by_port.get(i as usize).copied().unwrap_or(NO_SLOT),
            None => NO_SLOT,
        };
        let peer = self.outward(peer);
        let Some(a) = self.allocs.get(slot as usize).and_then(Option::as_ref) else {
            self.stats.drop(Drop::NoAllocation);
            return PeerAction::None;
        };
        let len = payload.len();
        if a.expires <= now
            || payload.start < wire::HEADROOM
            || payload.end + wire::TAILROOM > buf.len()
            || len > u16::MAX as usize - 64
        {
            self.stats.drop(Drop::NoAllocation);
            return PeerAction::None;
        }
        if !a.permitted(peer.ip(), now) {
            self.stats.drop(Drop::NoPermission);
            return PeerAction::None;
        }
        let client = a.client;
        if !self.within_budget(slot, 1, len, now) {
            self.stats.drop(Drop::Bandwidth);
            return PeerAction::None;
        }
        let Some(a) = self.allocs.get(slot as usize).and_then(Option::as_ref) else {
            return PeerAction::None;
        };
        let range = if let Some(ch) = a.channels.iter().find(|c| c.peer == peer && c.until > now) {
            let start = payload.start - wire::CHANNEL_DATA_HEADER_LEN;
            let hdr: &mut [u8; 4] = (&mut buf[start..payload.start])
                .try_into()
                .expect("a 4-byte range");
            ChannelData::write_header(hdr, ch.number, len as u16);
            let end = if client.transport.is_stream() {
                let padded = payload.start + pad4(len);
                buf[payload.end..padded].fill(0);
                padded
            } else {
                payload.end
            };
            start..end
        } else {
            let mut txid = TransactionId::default();
            self.prf.fill(&mut txid.0);
            write_data_indication(buf, payload, peer, &txid)
        };
        self.stats.relayed_to_client(client.transport, len);
        PeerAction::Forward { client, range }
    }

    // ---------------------------------------------------------------- time and teardown

    /// The instant by which [`Self::handle_timeout`] must be called next.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let t = self.timers.peek().map(|Reverse((t, _, _))| *t);
        let r = self.shared.reservations().iter().map(|r| r.until).min();
        match (t, r) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Expires permissions, channels, allocations and port reservations due at `now`.
    pub fn handle_timeout(&mut self, now: Instant, relays: &mut impl RelaySockets) {
        self.failures.sweep(now);
        if now.saturating_duration_since(self.refusal_window) >= Duration::from_secs(1) {
            if self.refusals_unlogged > 0 {
                info!(
                    count = self.refusals_unlogged,
                    "more requests refused than logged (at most {REFUSAL_LOGS} a second per \
                     relay thread; the counters have them all)"
                );
            }
            (self.refusals_logged, self.refusals_unlogged) = (0, 0);
            self.refusal_window = now;
        }
        while let Some(&Reverse((t, slot, gen_))) = self.timers.peek() {
            if t > now {
                break;
            }
            self.timers.pop();
            if self.gens.get(slot as usize) != Some(&gen_) {
                continue;
            }
            let Some(a) = self.allocs[slot as usize].as_mut() else {
                continue;
            };
            if a.timer != Some(t) {
                continue;
            }
            a.timer = None;
            if a.expires <= now {
                self.remove(slot, EndReason::Expired, relays);
                continue;
            }
            a.sweep(now);
            let next = a.next_deadline(now);
            a.timer = Some(next);
            self.timers.push(Reverse((next, slot, gen_)));
        }
        let mut expired = Vec::new();
        self.shared.reservations().retain(|r| {
            let keep = r.until > now;
            if !keep {
                expired.push(SocketAddr::new(r.ip, r.port));
            }
            keep
        });
        for addr in expired {
            self.shared.ports().release(addr.port());
            relays.unpark(addr);
        }
    }

    /// A stream client's connection closed: its allocation goes (RFC 8656 3.1 / 7).
    pub fn handle_client_closed(&mut self, client: ClientId, relays: &mut impl RelaySockets) {
        if let Some(&slot) = self.by_client.get(&client) {
            self.remove(slot, EndReason::ConnectionClosed, relays);
        }
    }

    /// Applies a new configuration to the running server, keeping every allocation. The relay
    /// addresses, their advertised addresses and the port range cannot change (they are what
    /// the allocations are bound to): those of `new` are ignored and named in the result.
    /// Permissions for peers the new peer rules refuse are withdrawn at once; data to and
    /// from those peers is dropped from then on, also on bound channels.
    pub fn reconfigure(&mut self, mut new: ServerConfig) -> Vec<&'static str> {
        let mut ignored = Vec::new();
        if new.relay_ips != self.cfg.relay_ips {
            ignored.push("relay-ips");
        }
        if new.external_ips != self.cfg.external_ips {
            ignored.push("external-ip");
        }
        if (new.min_port, new.max_port) != (self.cfg.min_port, self.cfg.max_port) {
            ignored.push("min-port / max-port");
        }
        new.relay_ips = std::mem::take(&mut self.cfg.relay_ips);
        new.external_ips = std::mem::take(&mut self.cfg.external_ips);
        new.min_port = self.cfg.min_port;
        new.max_port = self.cfg.max_port;
        self.policy.allow_loopback = new.allow_loopback_peers;
        self.policy.allowed = new.allowed_peers.clone();
        self.policy.denied = new.denied_peers.clone();
        self.nonces.set_lifetime(new.stale_nonce);
        self.cfg = new;
        let policy = &self.policy;
        for a in self.allocs.iter_mut().flatten() {
            a.perms.retain(|p| policy.check(p.ip).is_ok());
        }
        ignored
    }

    /// Permissions and channel bindings held now, over every allocation (for metrics: walks
    /// the allocations).
    pub fn permission_and_channel_count(&self) -> (usize, usize) {
        self.allocs.iter().flatten().fold((0, 0), |(p, c), a| {
            (p + a.perms.len(), c + a.channels.len())
        })
    }

    /// Deletes every allocation (at shutdown).
    pub fn close_all(&mut self, relays: &mut impl RelaySockets) {
        let slots: Vec<u32> = self.by_client.values().copied().collect();
        for s in slots {
            self.remove(s, EndReason::ConnectionClosed, relays);
        }
    }

    /// Checks the internal tables against each other (used by tests and fuzzing).
    pub fn check_invariants(&self) -> Result<(), String> {
        let live: Vec<&Allocation> = self.allocs.iter().flatten().collect();
        if live.len() != self.live || self.by_client.len() != self.live {
            return Err(format!(
                "live {} slots {} by_client {}",
                self.live,
                live.len(),
                self.by_client.len()
            ));
        }
        let mapped = self.by_port.iter().filter(|s| **s != NO_SLOT).count();
        if mapped != self.live {
            return Err(format!("by_port {mapped} != live {}", self.live));
        }
        let (used, reserved) = (self.shared.ports().used(), self.shared.reservations().len());
        // Shared ports and reservations count every server's allocations, not just these.
        if !self.shared.is_shared() && used != self.live + reserved {
            return Err(format!(
                "ports used {} != live {} + reservations {}",
                used, self.live, reserved
            ));
        }
        for a in live {
            if self
                .by_client
                .get(&a.client)
                .and_then(|s| self.alloc(*s))
                .map(|b| b.relay)
                != Some(a.relay)
            {
                return Err(format!("by_client broken for {}", a.client));
            }
            if a.timer.is_none() {
                return Err(format!("allocation {} has no timer", a.relay));
            }
            if let Some((second, _)) = a.second
                && (second.port() != a.relay.port() || second.is_ipv4() == a.relay.is_ipv4())
            {
                return Err(format!("dual allocation {} with {second}", a.relay));
            }
        }
        Ok(())
    }
}

fn install_permission(a: &mut Allocation, ip: IpAddr, until: Instant, stats: &mut Stats) {
    match a.perms.iter_mut().find(|p| p.ip == ip) {
        Some(p) => p.until = p.until.max(until),
        None => {
            a.perms.push(Permission { ip, until });
            stats.permissions_created += 1;
        }
    }
}

/// A key for one purpose, derived from the server secret.
/// The address a relay address is advertised as: the `external-ip` entry naming it as its
/// private address, else an entry without one of its family, else itself.
fn advertise(external_ips: &[(IpAddr, Option<IpAddr>)], relay: IpAddr) -> IpAddr {
    external_ips
        .iter()
        .find(|(_, private)| *private == Some(relay))
        .or_else(|| {
            external_ips
                .iter()
                .find(|(public, private)| private.is_none() && public.is_ipv4() == relay.is_ipv4())
        })
        .map_or(relay, |(public, _)| *public)
}

fn derive_key(secret: &[u8; 32], purpose: &[u8]) -> [u8; 32] {
    use hmac::{Hmac, Mac};
    let mut mac =
        <Hmac<sha2::Sha256> as Mac>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(purpose);
    mac.finalize().into_bytes().into()
}

/// Writes a Data indication (RFC 8656 11.4) around `buf[payload]` in place and returns its
/// range: header, XOR-PEER-ADDRESS and the DATA attribute header in front, padding after.
fn write_data_indication(
    buf: &mut [u8],
    payload: Range<usize>,
    peer: SocketAddr,
    tid: &TransactionId,
) -> Range<usize> {
    let len = payload.len();
    let mut addr = [0u8; 20];
    let alen = wire::encode_address(wire::xor_addr(peer, tid), &mut addr);
    let start = payload.start - (HEADER_LEN + 4 + alen + 4);
    let body = 4 + alen + 4 + pad4(len);
    let mut o = start;
    let mut put = |bytes: &[u8]| {
        buf[o..o + bytes.len()].copy_from_slice(bytes);
        o += bytes.len();
    };
    put(&wire::message_type(Method::DATA, Class::Indication).to_be_bytes());
    put(&(body as u16).to_be_bytes());
    put(&MAGIC_COOKIE.to_be_bytes());
    put(&tid.0);
    put(&AttrType::XOR_PEER_ADDRESS.0.to_be_bytes());
    put(&(alen as u16).to_be_bytes());
    put(&addr[..alen]);
    put(&AttrType::DATA.0.to_be_bytes());
    put(&(len as u16).to_be_bytes());
    let end = payload.start + pad4(len);
    buf[payload.end..end].fill(0);
    start..end
}
