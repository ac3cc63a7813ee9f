//! Soak load generator for turnserver (driven by `scripts/soak.sh`; runnable on its own).
//!
//! Keeps `--clients` simulated TURN clients busy over UDP on loopback for `--duration` seconds.
//! Each client:
//!
//! * binds its own source address in 127.0.0.0/8 (127.a.b.c with a >= 1, a new address for
//!   every client, so that the server's per-address 401 rate limit never bites),
//! * does the long-term credential exchange: an Allocate without credentials gets 401 with
//!   REALM and NONCE, then a signed Allocate (REQUESTED-TRANSPORT UDP, LIFETIME random in
//!   `--lifetime-min..=--lifetime-max`),
//! * binds channel 0x4000 to the UDP echo peer this program runs on 127.0.0.1,
//! * sends ChannelData at a random rate (`--rate-min..=--rate-max` per second, sizes
//!   `--size-min..=--size-max`) and checks every echo byte for byte (the payload is derived
//!   from the client and the sequence number, so nothing sent is kept),
//! * refreshes the allocation (and the channel) when half of the granted lifetime has passed,
//!   taking the fresh nonce of a 438 and retrying,
//! * after a random session length (`--session-min..=--session-max` seconds, cut at the end of
//!   the run) stops sending, waits for the last echoes, and either deletes the allocation
//!   (Refresh LIFETIME 0, `--delete-percent` of the clients) or just goes away, leaving the
//!   allocation to expire on the server.
//!
//! A client's slot then starts a new client from a new address, so that thousands of
//! allocations are made over a run. Requests are retransmitted (500 ms doubling up to 2 s, five
//! sends). Everything stops by `--duration` + about 10 s.
//!
//! Progress goes to stderr every `--progress` seconds; the totals are printed on stdout as one
//! JSON line. Only 127.0.0.0/8 is ever used.
//!
//! ```sh
//! cargo run --release --example soak -- --server 127.0.0.1:3478 \
//!     --user demo --password demo-password --duration 60 --clients 200
//! ```

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering::Relaxed};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use clap::Parser;
use tokio::net::UdpSocket;
use tokio::time::{Instant, sleep, sleep_until, timeout_at};
use turnserver::auth::long_term_key;
use turnserver::wire::{
    self, AttrType, CHANNEL_DATA_HEADER_LEN, ChannelData, ChannelNumber, Class, MessageRef,
    MessageWriter, Method, PROTO_UDP, TransactionId,
};

/// The channel every client binds to the echo peer.
const CHANNEL: u16 = ChannelNumber::MIN;
/// Bytes at the start of each payload: session id, sequence number, length.
const PAYLOAD_HEADER: usize = 12;
/// Retransmission: first timeout, largest timeout, number of sends.
const RTO_FIRST: Duration = Duration::from_millis(500);
const RTO_MAX: Duration = Duration::from_secs(2);
const SENDS: u32 = 5;
/// How long a client keeps reading echoes after its last packet.
const DRAIN: Duration = Duration::from_millis(500);
/// No new client starts this close to the end of the run.
const NO_START_BEFORE_END: Duration = Duration::from_secs(3);

#[derive(Parser, Debug)]
#[command(about = "TURN soak load generator (loopback only)")]
struct Args {
    /// The server's UDP listener (a loopback address).
    #[arg(long)]
    server: SocketAddr,
    #[arg(long)]
    user: String,
    #[arg(long)]
    password: String,
    /// Seconds of load.
    #[arg(long, default_value_t = 300)]
    duration: u64,
    /// Clients at once.
    #[arg(long, default_value_t = 2000)]
    clients: u32,
    /// Seconds over which the first clients start (default: min(10, duration / 4)).
    #[arg(long)]
    ramp: Option<u64>,
    #[arg(long, default_value_t = 5)]
    rate_min: u32,
    #[arg(long, default_value_t = 20)]
    rate_max: u32,
    #[arg(long, default_value_t = 100)]
    size_min: usize,
    #[arg(long, default_value_t = 1200)]
    size_max: usize,
    /// LIFETIME requested in Allocate and Refresh, seconds.
    #[arg(long, default_value_t = 60)]
    lifetime_min: u32,
    #[arg(long, default_value_t = 120)]
    lifetime_max: u32,
    /// Length of one client's session, seconds.
    #[arg(long, default_value_t = 10)]
    session_min: u64,
    #[arg(long, default_value_t = 150)]
    session_max: u64,
    /// Share of the clients that delete their allocation at the end; the others just stop.
    #[arg(long, default_value_t = 50)]
    delete_percent: u64,
    /// Seconds between progress lines on stderr (0: none).
    #[arg(long, default_value_t = 10)]
    progress: u64,
    /// Worker threads of the load generator.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Index of the first source address (127.a.b.c, counted from 127.1.0.1).
    #[arg(long, default_value_t = 0)]
    first_address: u32,
}

/// Totals over the run, bumped by every client.
#[derive(Default)]
struct Stats {
    sessions: AtomicU64,
    bind_errors: AtomicU64,
    allocations: AtomicU64,
    allocate_timeouts: AtomicU64,
    active: AtomicU64,
    peak_active: AtomicU64,
    deleted: AtomicU64,
    /// Refresh LIFETIME 0 answered 437 after a retransmission: the first copy deleted it.
    deleted_on_retransmit: AtomicU64,
    delete_failed: AtomicU64,
    abandoned: AtomicU64,
    /// Allocations the server no longer knew (437) while the client still used them.
    vanished: AtomicU64,
    refreshes: AtomicU64,
    channel_binds: AtomicU64,
    challenges_401: AtomicU64,
    stale_438: AtomicU64,
    retransmits: AtomicU64,
    timeouts: AtomicU64,
    bad_integrity: AtomicU64,
    unexpected: AtomicU64,
    send_errors: AtomicU64,
    sent: AtomicU64,
    sent_bytes: AtomicU64,
    received: AtomicU64,
    received_bytes: AtomicU64,
    lost: AtomicU64,
    corrupt: AtomicU64,
    duplicate: AtomicU64,
    peer_received: AtomicU64,
    peer_echoed: AtomicU64,
    /// Error responses by method and code.
    refused: Mutex<BTreeMap<(&'static str, u16), u64>>,
}

impl Stats {
    fn refused(&self, method: &'static str, code: u16) {
        *self
            .refused
            .lock()
            .unwrap()
            .entry((method, code))
            .or_insert(0) += 1;
    }

    fn get(c: &AtomicU64) -> u64 {
        c.load(Relaxed)
    }
}

struct Ctx {
    server: SocketAddr,
    peer: SocketAddr,
    user: String,
    password: String,
    args: Args,
    start: Instant,
    end: Instant,
    seed: u64,
    next_session: AtomicU32,
    stats: Stats,
}

/// SplitMix64: small, fast, good enough for choosing sizes and filling payloads.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..=hi` (near enough).
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        if hi <= lo {
            lo
        } else {
            lo + self.next() % (hi - lo + 1)
        }
    }
}

/// The source address of session `i`: 127.a.b.c with a in 1..=254, c in 1..=254.
fn source_ip(i: u32) -> IpAddr {
    let c = 1 + i % 254;
    let b = (i / 254) % 256;
    let a = 1 + (i / (254 * 256)) % 254;
    IpAddr::V4(Ipv4Addr::new(127, a as u8, b as u8, c as u8))
}

fn payload_rng(sid: u32, seq: u32) -> Rng {
    Rng((u64::from(sid) << 32 | u64::from(seq)) ^ 0x736f_616b_7061_796c)
}

/// Fills `p` with the payload of packet `seq` of session `sid`.
fn fill_payload(sid: u32, seq: u32, p: &mut [u8]) {
    p[0..4].copy_from_slice(&sid.to_be_bytes());
    p[4..8].copy_from_slice(&seq.to_be_bytes());
    let len = p.len() as u32;
    p[8..12].copy_from_slice(&len.to_be_bytes());
    let mut r = payload_rng(sid, seq);
    for chunk in p[PAYLOAD_HEADER..].chunks_mut(8) {
        let v = r.next().to_le_bytes();
        chunk.copy_from_slice(&v[..chunk.len()]);
    }
}

/// `Some((sid, seq))` if `p` is exactly a payload [`fill_payload`] writes.
fn check_payload(p: &[u8]) -> Option<(u32, u32)> {
    if p.len() < PAYLOAD_HEADER {
        return None;
    }
    let word = |i: usize| u32::from_be_bytes([p[i], p[i + 1], p[i + 2], p[i + 3]]);
    let (sid, seq, len) = (word(0), word(4), word(8));
    if len as usize != p.len() {
        return None;
    }
    let mut r = payload_rng(sid, seq);
    for chunk in p[PAYLOAD_HEADER..].chunks(8) {
        let v = r.next().to_le_bytes();
        if chunk != &v[..chunk.len()] {
            return None;
        }
    }
    Some((sid, seq))
}

#[derive(Clone, Copy)]
enum Req {
    Allocate { lifetime: u32 },
    Refresh { lifetime: u32 },
    ChannelBind,
}

impl Req {
    fn name(self) -> &'static str {
        match self {
            Req::Allocate { .. } => "allocate",
            Req::Refresh { lifetime: 0 } => "delete",
            Req::Refresh { .. } => "refresh",
            Req::ChannelBind => "channel_bind",
        }
    }
}

enum Reply {
    /// Success, with the LIFETIME granted if the response had one.
    Success(Option<u32>),
    /// An error response; `retransmitted` if the request had been sent more than once.
    Error {
        code: u16,
        retransmitted: bool,
    },
    Timeout,
}

/// One simulated client.
struct Session {
    ctx: Arc<Ctx>,
    sid: u32,
    sock: UdpSocket,
    rng: Rng,
    realm: Vec<u8>,
    nonce: Vec<u8>,
    key: Option<[u8; 16]>,
    /// Received datagrams.
    buf: Box<[u8]>,
    /// Requests and ChannelData being sent.
    out: Box<[u8]>,
    /// Next sequence number, and one bit per sequence number echoed.
    next_seq: u32,
    seen: Vec<u64>,
    received: u64,
}

impl Session {
    fn build(&mut self, req: Req, txid: &TransactionId, signed: bool) -> usize {
        let method = match req {
            Req::Allocate { .. } => Method::ALLOCATE,
            Req::Refresh { .. } => Method::REFRESH,
            Req::ChannelBind => Method::CHANNEL_BIND,
        };
        let mut w = MessageWriter::new(&mut self.out[..], method, Class::Request, txid);
        match req {
            Req::Allocate { lifetime } => {
                w.add_u32(AttrType::REQUESTED_TRANSPORT, u32::from(PROTO_UDP) << 24)
                    .add_u32(AttrType::LIFETIME, lifetime);
            }
            Req::Refresh { lifetime } => {
                w.add_u32(AttrType::LIFETIME, lifetime);
            }
            Req::ChannelBind => {
                w.add_u32(AttrType::CHANNEL_NUMBER, u32::from(CHANNEL) << 16)
                    .add_xor_address(AttrType::XOR_PEER_ADDRESS, self.ctx.peer);
            }
        }
        if let (true, Some(key)) = (signed, &self.key) {
            w.add(AttrType::USERNAME, self.ctx.user.as_bytes())
                .add(AttrType::REALM, &self.realm)
                .add(AttrType::NONCE, &self.nonce)
                .add_integrity(key);
        }
        w.add_fingerprint();
        w.finish().expect("a request fits the buffer")
    }

    /// One transaction with retransmissions. Echoes that arrive meanwhile are checked.
    async fn transact(&mut self, req: Req, signed: bool) -> Reply {
        let mut t = [0u8; 12];
        t[..8].copy_from_slice(&self.rng.next().to_le_bytes());
        t[8..].copy_from_slice(&self.rng.next().to_le_bytes()[..4]);
        let txid = TransactionId(t);
        let n = self.build(req, &txid, signed);
        let mut rto = RTO_FIRST;
        for attempt in 0..SENDS {
            if attempt > 0 {
                self.ctx.stats.retransmits.fetch_add(1, Relaxed);
            }
            let _ = self.sock.send(&self.out[..n]).await;
            let deadline = Instant::now() + rto;
            loop {
                match timeout_at(deadline, self.sock.recv(&mut self.buf)).await {
                    Err(_) => break,
                    Ok(Err(_)) => {
                        // ICMP errors (the server is gone): wait as for a lost answer.
                        sleep_until(deadline).await;
                        break;
                    }
                    Ok(Ok(len)) => {
                        if let Some(r) = self.on_datagram(len, Some(&txid), signed) {
                            return match r {
                                Reply::Error { code, .. } => Reply::Error {
                                    code,
                                    retransmitted: attempt > 0,
                                },
                                r => r,
                            };
                        }
                    }
                }
            }
            rto = (rto * 2).min(RTO_MAX);
        }
        self.ctx.stats.timeouts.fetch_add(1, Relaxed);
        Reply::Timeout
    }

    /// A transaction, answering a 401 challenge once and each 438 with the fresh nonce.
    async fn request(&mut self, req: Req) -> Reply {
        let mut challenged = false;
        for _ in 0..4 {
            let signed = self.key.is_some();
            match self.transact(req, signed).await {
                Reply::Error { code: 401, .. } if !signed && !challenged && self.key.is_some() => {
                    self.ctx.stats.challenges_401.fetch_add(1, Relaxed);
                    challenged = true;
                }
                Reply::Error { code: 438, .. } if self.key.is_some() => {
                    self.ctx.stats.stale_438.fetch_add(1, Relaxed);
                }
                Reply::Error {
                    code,
                    retransmitted,
                } => {
                    self.ctx.stats.refused(req.name(), code);
                    return Reply::Error {
                        code,
                        retransmitted,
                    };
                }
                r => return r,
            }
        }
        Reply::Timeout
    }

    /// Handles `buf[..len]`: an echo, or the response to `txid` (returned).
    fn on_datagram(
        &mut self,
        len: usize,
        txid: Option<&TransactionId>,
        signed: bool,
    ) -> Option<Reply> {
        let stats = &self.ctx.stats;
        let data = &self.buf[..len];
        match wire::classify(data) {
            wire::Kind::ChannelData => {
                match ChannelData::parse(data) {
                    Some(cd) if cd.number == CHANNEL => self.on_echo(len),
                    _ => {
                        stats.unexpected.fetch_add(1, Relaxed);
                    }
                }
                None
            }
            wire::Kind::Stun => {
                let Ok(msg) = MessageRef::parse(data) else {
                    stats.unexpected.fetch_add(1, Relaxed);
                    return None;
                };
                if Some(msg.transaction_id()) != txid
                    || !matches!(msg.class(), Class::Success | Class::Error)
                {
                    // A late answer to a retransmitted request.
                    stats.unexpected.fetch_add(1, Relaxed);
                    return None;
                }
                if msg.fingerprint_valid() == Some(false) {
                    stats.bad_integrity.fetch_add(1, Relaxed);
                    return None;
                }
                let code = match msg.error_code() {
                    Ok(Some((code, _))) => Some(code),
                    _ => None,
                };
                // Challenges (401, 438) carry no integrity; every other answer to a signed
                // request must.
                if signed
                    && !matches!(code, Some(401 | 438))
                    && !self.key.is_some_and(|k| msg.verify(&k))
                {
                    stats.bad_integrity.fetch_add(1, Relaxed);
                    return None;
                }
                if let Ok(Some(n)) = msg.nonce() {
                    self.nonce.clear();
                    self.nonce.extend_from_slice(n);
                }
                if let Ok(Some(r)) = msg.realm()
                    && (self.key.is_none() || r.as_bytes() != self.realm)
                {
                    self.realm.clear();
                    self.realm.extend_from_slice(r.as_bytes());
                    self.key = Some(long_term_key(&self.ctx.user, r, &self.ctx.password));
                }
                Some(match (msg.class(), code) {
                    (Class::Success, _) => Reply::Success(msg.lifetime().ok().flatten()),
                    (_, code) => Reply::Error {
                        code: code.unwrap_or(0),
                        retransmitted: false,
                    },
                })
            }
            wire::Kind::Other => {
                stats.unexpected.fetch_add(1, Relaxed);
                None
            }
        }
    }

    fn on_echo(&mut self, len: usize) {
        let stats = &self.ctx.stats;
        let payload = &self.buf[CHANNEL_DATA_HEADER_LEN..len];
        match check_payload(payload) {
            Some((sid, seq)) if sid == self.sid && seq < self.next_seq => {
                let (w, b) = ((seq / 64) as usize, seq % 64);
                if self.seen.len() <= w {
                    self.seen.resize(w + 1, 0);
                }
                if self.seen[w] & (1 << b) != 0 {
                    stats.duplicate.fetch_add(1, Relaxed);
                } else {
                    self.seen[w] |= 1 << b;
                    self.received += 1;
                    stats.received.fetch_add(1, Relaxed);
                    stats
                        .received_bytes
                        .fetch_add(payload.len() as u64, Relaxed);
                }
            }
            _ => {
                stats.corrupt.fetch_add(1, Relaxed);
            }
        }
    }

    async fn send_packet(&mut self) {
        let a = &self.ctx.args;
        let len = self.rng.range(a.size_min as u64, a.size_max as u64) as usize;
        let seq = self.next_seq;
        self.next_seq += 1;
        let mut header = [0u8; 4];
        ChannelData::write_header(
            &mut header,
            ChannelNumber::new(CHANNEL).expect("a bindable channel"),
            len as u16,
        );
        self.out[..CHANNEL_DATA_HEADER_LEN].copy_from_slice(&header);
        fill_payload(
            self.sid,
            seq,
            &mut self.out[CHANNEL_DATA_HEADER_LEN..CHANNEL_DATA_HEADER_LEN + len],
        );
        let stats = &self.ctx.stats;
        match self
            .sock
            .send(&self.out[..CHANNEL_DATA_HEADER_LEN + len])
            .await
        {
            Ok(_) => {
                stats.sent.fetch_add(1, Relaxed);
                stats.sent_bytes.fetch_add(len as u64, Relaxed);
            }
            Err(_) => {
                // Never sent: not counted as lost.
                self.next_seq -= 1;
                stats.send_errors.fetch_add(1, Relaxed);
            }
        }
    }

    /// Reads echoes until `until` or, if `send_every` is given, sends at that pace, refreshing
    /// at `refresh_at`. Returns `false` if the allocation is gone.
    async fn run_traffic(&mut self, until: Instant, send_every: Duration, granted: u32) -> bool {
        enum Ev {
            Recv(std::io::Result<usize>),
            Timer,
        }
        let mut refresh_at = Instant::now() + Duration::from_secs(u64::from(granted) / 2);
        let mut next_send = Instant::now();
        loop {
            let wake = next_send.min(refresh_at).min(until);
            let ev = tokio::select! {
                r = self.sock.recv(&mut self.buf) => Ev::Recv(r),
                _ = sleep_until(wake) => Ev::Timer,
            };
            match ev {
                Ev::Recv(Ok(len)) => {
                    self.on_datagram(len, None, false);
                }
                Ev::Recv(Err(_)) => sleep(Duration::from_millis(100)).await,
                Ev::Timer => {
                    let now = Instant::now();
                    if now >= until {
                        return true;
                    }
                    if now >= refresh_at {
                        let a = &self.ctx.args;
                        let lifetime =
                            self.rng.range(a.lifetime_min.into(), a.lifetime_max.into()) as u32;
                        match self.request(Req::Refresh { lifetime }).await {
                            Reply::Success(l) => {
                                self.ctx.stats.refreshes.fetch_add(1, Relaxed);
                                let l = l.unwrap_or(lifetime);
                                refresh_at = Instant::now() + Duration::from_secs(u64::from(l) / 2);
                            }
                            Reply::Error { code: 437, .. } => {
                                self.ctx.stats.vanished.fetch_add(1, Relaxed);
                                return false;
                            }
                            Reply::Error { .. } | Reply::Timeout => {
                                refresh_at = Instant::now() + Duration::from_secs(5);
                            }
                        }
                        // Keep the channel (and its permission) fresh too.
                        if let Reply::Success(_) = self.request(Req::ChannelBind).await {
                            self.ctx.stats.channel_binds.fetch_add(1, Relaxed);
                        }
                        next_send = Instant::now();
                        continue;
                    }
                    self.send_packet().await;
                    next_send += send_every;
                    if next_send < now {
                        next_send = now + send_every;
                    }
                }
            }
        }
    }

    /// Reads the last echoes for [`DRAIN`], then counts what never came back.
    async fn drain(&mut self) {
        let until = Instant::now() + DRAIN;
        while let Ok(Ok(len)) = timeout_at(until, self.sock.recv(&mut self.buf)).await {
            self.on_datagram(len, None, false);
        }
        let lost = u64::from(self.next_seq) - self.received;
        self.ctx.stats.lost.fetch_add(lost, Relaxed);
    }
}

/// One client from its first Allocate to its end.
async fn run_session(ctx: &Arc<Ctx>, sid: u32) {
    let stats = &ctx.stats;
    let a = &ctx.args;
    let mut rng = Rng(ctx.seed ^ u64::from(sid).wrapping_mul(0xA24B_AED4_963E_E407));
    let ip = source_ip(a.first_address.wrapping_add(sid));
    let sock = match UdpSocket::bind(SocketAddr::new(ip, 0)).await {
        Ok(s) if s.connect(ctx.server).await.is_ok() => s,
        _ => {
            stats.bind_errors.fetch_add(1, Relaxed);
            sleep(Duration::from_secs(1)).await;
            return;
        }
    };
    let session_len = Duration::from_secs(rng.range(a.session_min, a.session_max));
    let lifetime = rng.range(a.lifetime_min.into(), a.lifetime_max.into()) as u32;
    let rate = rng.range(a.rate_min.into(), a.rate_max.into()).max(1);
    let delete = rng.range(1, 100) <= a.delete_percent;
    let started = Instant::now();
    let mut s = Session {
        ctx: ctx.clone(),
        sid,
        sock,
        rng,
        realm: Vec::new(),
        nonce: Vec::new(),
        key: None,
        buf: vec![0u8; 2048].into_boxed_slice(),
        out: vec![0u8; 2048].into_boxed_slice(),
        next_seq: 0,
        seen: Vec::new(),
        received: 0,
    };
    stats.sessions.fetch_add(1, Relaxed);
    let granted = match s.request(Req::Allocate { lifetime }).await {
        Reply::Success(l) => l.unwrap_or(lifetime),
        Reply::Error { .. } => {
            sleep(Duration::from_secs(1)).await;
            return;
        }
        Reply::Timeout => {
            stats.allocate_timeouts.fetch_add(1, Relaxed);
            return;
        }
    };
    stats.allocations.fetch_add(1, Relaxed);
    let now_active = stats.active.fetch_add(1, Relaxed) + 1;
    stats.peak_active.fetch_max(now_active, Relaxed);

    let mut alive = true;
    if let Reply::Success(_) = s.request(Req::ChannelBind).await {
        stats.channel_binds.fetch_add(1, Relaxed);
        let until = (started + session_len).min(ctx.end);
        let every = Duration::from_secs(1) / rate as u32;
        alive = s.run_traffic(until, every, granted).await;
        s.drain().await;
    }
    if !alive {
        // The server dropped the allocation early (counted as vanished).
    } else if delete {
        match s.request(Req::Refresh { lifetime: 0 }).await {
            Reply::Success(_) => stats.deleted.fetch_add(1, Relaxed),
            Reply::Error {
                code: 437,
                retransmitted: true,
            } => stats.deleted_on_retransmit.fetch_add(1, Relaxed),
            _ => stats.delete_failed.fetch_add(1, Relaxed),
        };
    } else {
        stats.abandoned.fetch_add(1, Relaxed);
    }
    stats.active.fetch_sub(1, Relaxed);
}

/// One client slot: clients one after the other until the end of the run.
async fn run_slot(ctx: Arc<Ctx>, slot: u32) {
    let ramp =
        Duration::from_millis(ctx.args.ramp.unwrap_or((ctx.args.duration / 4).min(10)) * 1000);
    sleep(ramp * slot / ctx.args.clients.max(1)).await;
    let mut rng = Rng(ctx.seed ^ 0x5107 ^ u64::from(slot) << 20);
    while Instant::now() + NO_START_BEFORE_END < ctx.end {
        let sid = ctx.next_session.fetch_add(1, Relaxed);
        run_session(&ctx, sid).await;
        sleep(Duration::from_millis(rng.range(0, 1000))).await;
    }
}

async fn progress(ctx: Arc<Ctx>) {
    let every = Duration::from_secs(ctx.args.progress);
    let s = &ctx.stats;
    loop {
        sleep(every).await;
        eprintln!(
            "soak: t={:>4}s sessions={} allocations={} active={} deleted={} abandoned={} refreshes={} \
             438s={} sent={} received={} retransmits={} timeouts={} corrupt={}",
            ctx.start.elapsed().as_secs(),
            Stats::get(&s.sessions),
            Stats::get(&s.allocations),
            Stats::get(&s.active),
            Stats::get(&s.deleted),
            Stats::get(&s.abandoned),
            Stats::get(&s.refreshes),
            Stats::get(&s.stale_438),
            Stats::get(&s.sent),
            Stats::get(&s.received),
            Stats::get(&s.retransmits),
            Stats::get(&s.timeouts),
            Stats::get(&s.corrupt),
        );
    }
}

/// The echo peer: every datagram goes back to where it came from (the relay address).
fn echo_peer(sock: std::net::UdpSocket, ctx: Arc<Ctx>, stop: Arc<AtomicBool>) {
    let mut buf = vec![0u8; 65536];
    let s = &ctx.stats;
    while !stop.load(Relaxed) {
        if let Ok((n, from)) = sock.recv_from(&mut buf) {
            s.peer_received.fetch_add(1, Relaxed);
            if sock.send_to(&buf[..n], from).is_ok() {
                s.peer_echoed.fetch_add(1, Relaxed);
            }
        }
    }
}

fn bind_peer() -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::IPV4, Type::DGRAM, None)?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = s.set_recv_buffer_size(4 << 20);
    let _ = s.set_send_buffer_size(4 << 20);
    s.bind(&SocketAddr::from(([127, 0, 0, 1], 0)).into())?;
    s.set_read_timeout(Some(Duration::from_millis(200)))?;
    Ok(s.into())
}

fn summary(ctx: &Ctx, unfinished: usize) -> serde_json::Value {
    let s = &ctx.stats;
    let g = Stats::get;
    // Flat, "method_code": count, so that a shell script can read it.
    let refused: serde_json::Map<String, serde_json::Value> = s
        .refused
        .lock()
        .unwrap()
        .iter()
        .map(|((method, code), n)| (format!("{method}_{code}"), (*n).into()))
        .collect();
    serde_json::json!({
        "duration_s": ctx.start.elapsed().as_secs_f64(),
        "clients": ctx.args.clients,
        "sessions": g(&s.sessions),
        "bind_errors": g(&s.bind_errors),
        "allocations": g(&s.allocations),
        "allocate_timeouts": g(&s.allocate_timeouts),
        "peak_active": g(&s.peak_active),
        "active_at_exit": g(&s.active),
        "deleted_by_client": g(&s.deleted) + g(&s.deleted_on_retransmit),
        "deleted_on_retransmit": g(&s.deleted_on_retransmit),
        "delete_failed": g(&s.delete_failed),
        "abandoned": g(&s.abandoned),
        "vanished": g(&s.vanished),
        "refreshes": g(&s.refreshes),
        "channel_binds": g(&s.channel_binds),
        "challenges_401": g(&s.challenges_401),
        "stale_nonce_438": g(&s.stale_438),
        "refused": refused,
        "retransmits": g(&s.retransmits),
        "timeouts": g(&s.timeouts),
        "bad_integrity": g(&s.bad_integrity),
        "unexpected": g(&s.unexpected),
        "send_errors": g(&s.send_errors),
        "packets_sent": g(&s.sent),
        "packets_received": g(&s.received),
        "packets_lost": g(&s.lost),
        "packets_corrupt": g(&s.corrupt),
        "packets_duplicate": g(&s.duplicate),
        "bytes_sent": g(&s.sent_bytes),
        "bytes_received": g(&s.received_bytes),
        "peer_received": g(&s.peer_received),
        "peer_echoed": g(&s.peer_echoed),
        "unfinished_clients": unfinished,
    })
}

fn main() -> ExitCode {
    let args = Args::parse();
    let loopback = |a: SocketAddr| a.ip().is_loopback() && a.is_ipv4();
    if !loopback(args.server) {
        eprintln!("soak: --server must be an IPv4 loopback address");
        return ExitCode::FAILURE;
    }
    if args.size_min < PAYLOAD_HEADER || args.size_max > 1400 || args.size_min > args.size_max {
        eprintln!("soak: sizes must satisfy {PAYLOAD_HEADER} <= size-min <= size-max <= 1400");
        return ExitCode::FAILURE;
    }
    if args.rate_min == 0 || args.rate_min > args.rate_max || args.clients == 0 {
        eprintln!("soak: need 0 < rate-min <= rate-max and clients > 0");
        return ExitCode::FAILURE;
    }
    let peer_sock = match bind_peer() {
        Ok(s) => s,
        Err(e) => {
            eprintln!("soak: cannot bind the echo peer: {e}");
            return ExitCode::FAILURE;
        }
    };
    let peer = peer_sock.local_addr().expect("bound");
    let mut seed = [0u8; 8];
    let _ = getrandom::fill(&mut seed);
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(args.threads.max(1))
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("soak: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let start = Instant::now();
        let ctx = Arc::new(Ctx {
            server: args.server,
            peer,
            user: args.user.clone(),
            password: args.password.clone(),
            start,
            end: start + Duration::from_secs(args.duration),
            seed: u64::from_le_bytes(seed),
            next_session: AtomicU32::new(0),
            stats: Stats::default(),
            args,
        });
        let stop = Arc::new(AtomicBool::new(false));
        let peer_thread = {
            let (ctx, stop) = (ctx.clone(), stop.clone());
            std::thread::spawn(move || echo_peer(peer_sock, ctx, stop))
        };
        eprintln!(
            "soak: {} clients for {} s against {}, echo peer {peer}",
            ctx.args.clients, ctx.args.duration, ctx.server
        );
        if ctx.args.progress > 0 {
            tokio::spawn(progress(ctx.clone()));
        }
        let mut slots = tokio::task::JoinSet::new();
        for i in 0..ctx.args.clients {
            slots.spawn(run_slot(ctx.clone(), i));
        }
        // Sessions end by the end of the run plus the drain and one delete transaction.
        let hard_end = ctx.end + Duration::from_secs(12);
        while let Ok(Some(_)) = timeout_at(hard_end, slots.join_next()).await {}
        let unfinished = slots.len();
        slots.abort_all();
        stop.store(true, Relaxed);
        let _ = peer_thread.join();
        println!("{}", summary(&ctx, unfinished));
    });
    ExitCode::SUCCESS
}
