//! Hostile input over real sockets: truncated headers, lengths past the datagram, bad magic
//! cookies, attribute lengths that overflow, duplicate attributes, garbage after
//! MESSAGE-INTEGRITY, wrong FINGERPRINTs, ten thousand unauthenticated Allocates from many
//! source ports, password guessing, ChannelData outside the channel range, TCP clients that
//! stall in the middle of a frame or never read. After each, a legitimate client still
//! allocates and relays ([`legit`]: UDP, and TCP for the stream cases).
//!
//! Everything stays on 127.0.0.0/8 (other loopback addresses stand for other hosts); every loop
//! is bounded and every wait has a deadline; each test runs its own server.

mod common;

use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream, UdpSocket};
use std::sync::atomic::{AtomicU32, Ordering};
use std::thread::sleep;
use std::time::{Duration, Instant};

use common::TestServer;
use turnserver::auth::long_term_key;
use turnserver::wire::{
    AttrType, ChannelData, Class, Frame, MessageRef, MessageWriter, Method, PROTO_UDP,
    TransactionId, frame_len,
};

const LO: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 1);
const LO2: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 2);
const LO3: Ipv4Addr = Ipv4Addr::new(127, 0, 0, 3);
const SECOND: Duration = Duration::from_secs(1);

// ------------------------------------------------------------------------ messages

static TXN: AtomicU32 = AtomicU32::new(1);

/// A transaction ID unique in this process.
fn txid() -> TransactionId {
    let mut t = [0u8; 12];
    t[..4].copy_from_slice(&std::process::id().to_be_bytes());
    t[4..8].copy_from_slice(&TXN.fetch_add(1, Ordering::Relaxed).to_be_bytes());
    t[8..].copy_from_slice(b"host");
    TransactionId(t)
}

fn message(
    method: Method,
    class: Class,
    t: &TransactionId,
    add: impl FnOnce(&mut MessageWriter<'_>),
) -> Vec<u8> {
    let mut buf = vec![0u8; 70_000];
    let mut w = MessageWriter::new(&mut buf, method, class, t);
    add(&mut w);
    let n = w.finish().expect("the message fits");
    buf.truncate(n);
    buf
}

fn binding(t: &TransactionId) -> Vec<u8> {
    message(Method::BINDING, Class::Request, t, |_| {})
}

fn udp_transport(w: &mut MessageWriter<'_>) {
    w.add_u32(AttrType::REQUESTED_TRANSPORT, u32::from(PROTO_UDP) << 24);
}

fn tcp_transport(w: &mut MessageWriter<'_>) {
    w.add_u32(AttrType::REQUESTED_TRANSPORT, 6 << 24);
}

/// Sets the length field of a STUN header.
fn set_len(m: &mut [u8], len: usize) {
    m[2..4].copy_from_slice(&(len as u16).to_be_bytes());
}

/// Appends an attribute as given (declared length, value, zero padding to four bytes) and sets
/// the header's length to the bytes that follow it.
fn push_attr(m: &mut Vec<u8>, typ: u16, declared: u16, value: &[u8]) {
    m.extend_from_slice(&typ.to_be_bytes());
    m.extend_from_slice(&declared.to_be_bytes());
    m.extend_from_slice(value);
    while !m.len().is_multiple_of(4) {
        m.push(0);
    }
    let body = m.len() - 20;
    set_len(m, body);
}

/// CRC-32 (IEEE), bit by bit: independent of the server's table-driven one.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &b in data {
        crc ^= u32::from(b);
        for _ in 0..8 {
            crc = if crc & 1 != 0 {
                (crc >> 1) ^ 0xEDB8_8320
            } else {
                crc >> 1
            };
        }
    }
    !crc
}

/// Appends FINGERPRINT, XORed with `wrong` (0: the right value).
fn push_fingerprint(m: &mut Vec<u8>, wrong: u32) {
    let body = m.len() - 20 + 8;
    set_len(m, body);
    let v = crc32(m) ^ 0x5354_554E ^ wrong;
    push_attr(m, AttrType::FINGERPRINT.0, 4, &v.to_be_bytes());
}

/// Offsets at which the attributes of a well-formed message start and end.
fn boundaries(m: &[u8]) -> Vec<usize> {
    let mut v = vec![20];
    let mut off = 20;
    while off + 4 <= m.len() {
        let l = u16::from_be_bytes([m[off + 2], m[off + 3]]) as usize;
        off += 4 + l.div_ceil(4) * 4;
        v.push(off);
    }
    v
}

/// Builds a request from a client (for its nonce and key) and a transaction ID.
type SignedBuild = Box<dyn Fn(&Client, &TransactionId) -> Vec<u8>>;
/// Appends attributes to a request.
type AddAttrs = Box<dyn Fn(&mut MessageWriter<'_>)>;

fn channel_data(ch: u16, payload: &[u8], stream: bool) -> Vec<u8> {
    let mut f = ch.to_be_bytes().to_vec();
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    while stream && !f.len().is_multiple_of(4) {
        f.push(0);
    }
    f
}

/// The error code of a response (`None` for a success).
fn code(r: &[u8]) -> Option<u16> {
    let m = MessageRef::parse(r).expect("the server sends well-formed STUN");
    m.error_code()
        .expect("a well-formed ERROR-CODE")
        .map(|(c, _)| c)
}

fn is_response_to(r: &[u8], t: &TransactionId) -> bool {
    MessageRef::header(r)
        .is_some_and(|(_, c, id)| id == *t && matches!(c, Class::Success | Class::Error))
}

// ------------------------------------------------------------------------ sockets

fn remaining(deadline: Instant) -> Option<Duration> {
    deadline
        .checked_duration_since(Instant::now())
        .filter(|d| !d.is_zero())
}

fn timed_out(e: &std::io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

/// A TCP connection to `to` from `ip`, with a small receive buffer if asked.
fn tcp_from(ip: Ipv4Addr, to: SocketAddr, rcvbuf: Option<usize>) -> TcpStream {
    let s = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None).unwrap();
    if let Some(n) = rcvbuf {
        s.set_recv_buffer_size(n).unwrap();
    }
    s.bind(&SocketAddr::from((ip, 0)).into()).unwrap();
    s.connect_timeout(&to.into(), Duration::from_secs(3))
        .unwrap();
    s.set_tcp_nodelay(true).unwrap();
    s.into()
}

/// Whether the server closes `s` within `within` (anything it sends meanwhile is discarded).
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut b = [0u8; 4096];
    while let Some(left) = remaining(deadline) {
        s.set_read_timeout(Some(left)).unwrap();
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if timed_out(&e) => {}
            Err(_) => return true,
        }
    }
    false
}

#[derive(Debug)]
enum Got {
    Msg(Vec<u8>),
    Timeout,
    Closed,
}

/// A client's transport: a UDP socket, or a TCP connection with the bytes read but not yet
/// framed.
enum Conn {
    Udp(UdpSocket, SocketAddr),
    Tcp(TcpStream, Vec<u8>),
}

impl Conn {
    fn udp(server: &TestServer, ip: Ipv4Addr) -> Conn {
        Conn::Udp(UdpSocket::bind((ip, 0)).unwrap(), server.addr())
    }

    fn tcp(server: &TestServer, ip: Ipv4Addr) -> Conn {
        Conn::Tcp(tcp_from(ip, server.addr(), None), Vec::new())
    }

    fn is_stream(&self) -> bool {
        matches!(self, Conn::Tcp(..))
    }

    fn local_addr(&self) -> SocketAddr {
        match self {
            Conn::Udp(s, _) => s.local_addr().unwrap(),
            Conn::Tcp(s, _) => s.local_addr().unwrap(),
        }
    }

    fn send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        match self {
            Conn::Udp(s, to) => s.send_to(bytes, *to).map(drop),
            Conn::Tcp(s, _) => {
                s.set_write_timeout(Some(Duration::from_secs(5)))?;
                s.write_all(bytes)
            }
        }
    }

    /// The next datagram (UDP) or frame (TCP) received before `deadline`.
    fn recv(&mut self, deadline: Instant) -> Got {
        match self {
            Conn::Udp(s, _) => {
                let mut buf = vec![0u8; 65_536];
                while let Some(left) = remaining(deadline) {
                    s.set_read_timeout(Some(left)).unwrap();
                    match s.recv_from(&mut buf) {
                        Ok((n, _)) => return Got::Msg(buf[..n].to_vec()),
                        Err(e) if timed_out(&e) => {}
                        Err(_) => return Got::Closed,
                    }
                }
                Got::Timeout
            }
            Conn::Tcp(s, pending) => {
                let mut buf = vec![0u8; 65_536];
                loop {
                    match frame_len(pending) {
                        Frame::Complete(n) => return Got::Msg(pending.drain(..n).collect()),
                        Frame::Invalid => panic!(
                            "the server sent bytes that are not a frame: {:02x?}",
                            &pending[..pending.len().min(32)]
                        ),
                        Frame::Incomplete(_) => {}
                    }
                    let Some(left) = remaining(deadline) else {
                        return Got::Timeout;
                    };
                    s.set_read_timeout(Some(left)).unwrap();
                    match s.read(&mut buf) {
                        Ok(0) => return Got::Closed,
                        Ok(n) => pending.extend_from_slice(&buf[..n]),
                        Err(e) if timed_out(&e) => {}
                        Err(_) => return Got::Closed,
                    }
                }
            }
        }
    }
}

// ------------------------------------------------------------------------ the client

/// A TURN client with long-term credentials, built on the crate's own codec.
struct Client {
    conn: Conn,
    user: &'static str,
    key: [u8; 16],
    nonce: Vec<u8>,
}

impl Client {
    fn new(conn: Conn) -> Client {
        Client {
            conn,
            user: common::USER,
            key: long_term_key(common::USER, common::REALM, common::PASSWORD),
            nonce: Vec::new(),
        }
    }

    fn udp(server: &TestServer, ip: Ipv4Addr) -> Client {
        Client::new(Conn::udp(server, ip))
    }

    fn tcp(server: &TestServer, ip: Ipv4Addr) -> Client {
        Client::new(Conn::tcp(server, ip))
    }

    /// `add`'s attributes, then USERNAME, REALM, NONCE and MESSAGE-INTEGRITY.
    fn signed(
        &self,
        method: Method,
        t: &TransactionId,
        add: impl FnOnce(&mut MessageWriter<'_>),
    ) -> Vec<u8> {
        message(method, Class::Request, t, |w| {
            add(w);
            w.add(AttrType::USERNAME, self.user.as_bytes())
                .add(AttrType::REALM, common::REALM.as_bytes())
                .add(AttrType::NONCE, &self.nonce)
                .add_integrity(&self.key);
        })
    }

    /// Sends `bytes` and returns the response carrying `t`, skipping anything else; over UDP
    /// the request goes again every 500 ms. `None` if nothing came before `deadline`.
    fn exchange(&mut self, bytes: &[u8], t: &TransactionId, deadline: Instant) -> Option<Vec<u8>> {
        let resend = (!self.conn.is_stream()).then_some(Duration::from_millis(500));
        let mut next = Instant::now();
        for _ in 0..10_000 {
            let now = Instant::now();
            if now >= deadline {
                return None;
            }
            if now >= next {
                self.conn.send(bytes).ok()?;
                next = resend.map_or(deadline, |d| now + d);
            }
            match self.conn.recv(next.min(deadline)) {
                Got::Msg(r) if is_response_to(&r, t) => return Some(r),
                Got::Msg(_) | Got::Timeout => {}
                Got::Closed => return None,
            }
        }
        None
    }

    /// Sends what `build` makes with a fresh transaction ID; the answer, if any within 3 s.
    fn ask(&mut self, build: impl FnOnce(&Client, &TransactionId) -> Vec<u8>) -> Option<Vec<u8>> {
        let t = txid();
        let req = build(self, &t);
        self.exchange(&req, &t, Instant::now() + 3 * SECOND)
    }

    /// Draws a 401 with an unsigned Allocate and keeps its nonce.
    fn fetch_nonce(&mut self) -> &mut Client {
        let r = self
            .ask(|_, t| message(Method::ALLOCATE, Class::Request, t, udp_transport))
            .expect("a 401 to an unsigned Allocate");
        assert_eq!(code(&r), Some(401));
        let m = MessageRef::parse(&r).unwrap();
        self.nonce = m.nonce().unwrap().expect("a NONCE with the 401").to_vec();
        self
    }

    /// A request, signed once the server has given a nonce: on a 401 to an unsigned request,
    /// or a 438, it goes again signed with the new nonce. The final answer.
    fn request(
        &mut self,
        method: Method,
        deadline: Instant,
        add: &dyn Fn(&mut MessageWriter<'_>),
    ) -> Result<Vec<u8>, String> {
        for _ in 0..3 {
            let t = txid();
            let signed = !self.nonce.is_empty();
            let req = if signed {
                self.signed(method, &t, add)
            } else {
                message(method, Class::Request, &t, add)
            };
            let r = self
                .exchange(&req, &t, deadline)
                .ok_or_else(|| format!("no answer to {}", method.name()))?;
            let m = MessageRef::parse(&r).map_err(|e| format!("bad answer: {e}"))?;
            let code = m.error_code().ok().flatten().map(|(c, _)| c);
            if let (Some(401 | 438), Ok(Some(n))) = (code, m.nonce()) {
                self.nonce = n.to_vec();
                if !signed || code == Some(438) {
                    continue;
                }
            }
            return Ok(r);
        }
        Err(format!("{}: challenged three times", method.name()))
    }

    /// A request that must succeed, with a response signed with our key.
    fn success(
        &mut self,
        method: Method,
        deadline: Instant,
        add: &dyn Fn(&mut MessageWriter<'_>),
    ) -> Result<Vec<u8>, String> {
        let r = self.request(method, deadline, add)?;
        let m = MessageRef::parse(&r).map_err(|e| e.to_string())?;
        if m.class() != Class::Success {
            return Err(format!("{} answered {:?}", method.name(), m.error_code()));
        }
        if !m.verify(&self.key) {
            return Err(format!("{}: response integrity wrong", method.name()));
        }
        Ok(r)
    }

    fn allocate(&mut self, deadline: Instant) -> Result<SocketAddr, String> {
        let r = self.success(Method::ALLOCATE, deadline, &udp_transport)?;
        MessageRef::parse(&r)
            .unwrap()
            .xor_address(AttrType::XOR_RELAYED_ADDRESS)
            .ok()
            .flatten()
            .ok_or_else(|| "no XOR-RELAYED-ADDRESS".to_string())
    }

    fn permit(&mut self, peer: SocketAddr, deadline: Instant) -> Result<(), String> {
        self.success(Method::CREATE_PERMISSION, deadline, &|w| {
            w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        })
        .map(drop)
    }

    fn bind(&mut self, ch: u16, peer: SocketAddr, deadline: Instant) -> Result<(), String> {
        self.success(Method::CHANNEL_BIND, deadline, &|w| {
            w.add_u32(AttrType::CHANNEL_NUMBER, u32::from(ch) << 16)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        })
        .map(drop)
    }

    fn send_cd(&mut self, ch: u16, payload: &[u8]) {
        let f = channel_data(ch, payload, self.conn.is_stream());
        self.conn.send(&f).expect("send ChannelData");
    }

    /// The next ChannelData message, skipping STUN.
    fn recv_cd(&mut self, deadline: Instant) -> Option<(u16, Vec<u8>)> {
        for _ in 0..1000 {
            match self.conn.recv(deadline) {
                Got::Msg(f) => {
                    if let Some(cd) = ChannelData::parse(&f) {
                        return Some((cd.number, cd.payload.to_vec()));
                    }
                }
                Got::Timeout | Got::Closed => return None,
            }
        }
        None
    }
}

/// Sends each of `msgs` on `c`, pacing them so the kernel keeps them all.
fn send_paced(c: &mut Client, msgs: &[Vec<u8>]) {
    for (i, m) in msgs.iter().enumerate() {
        c.conn.send(m).unwrap();
        if i % 16 == 15 {
            sleep(Duration::from_millis(2));
        }
    }
}

/// Asserts that nothing `c` sent so far was answered: the answer to a Binding request sent now
/// is the first message `c` receives (the server serves one socket or connection in order, so
/// an answer to anything sent earlier would arrive first).
fn nothing_answered(c: &mut Client, what: &str) {
    let t = txid();
    let req = binding(&t);
    for _ in 0..3 {
        c.conn.send(&req).unwrap();
        match c.conn.recv(Instant::now() + SECOND) {
            Got::Msg(r) => {
                assert!(
                    is_response_to(&r, &t),
                    "{what}: answered with {:02x?}",
                    &r[..r.len().min(64)]
                );
                assert_eq!(MessageRef::parse(&r).unwrap().class(), Class::Success);
                return;
            }
            Got::Timeout => {}
            Got::Closed => panic!("{what}: the connection was closed"),
        }
    }
    panic!("{what}: the server no longer answers a Binding request");
}

// ------------------------------------------------------------------------ the legitimate client

#[derive(Debug, Clone, Copy)]
enum Via {
    Udp(Ipv4Addr),
    Tcp(Ipv4Addr),
}

fn tail(log: &str, n: usize) -> String {
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// The legitimate client: over `via`, it allocates (401, then a signed Allocate), permits and
/// binds a channel to a UDP echo peer, and sends three ChannelData messages (1, 5 and 301
/// bytes: padded on TCP) there and back, checking the bytes; over UDP it then releases the
/// allocation. The whole exchange is retried from a fresh socket until `within` has passed (a
/// rate limit may hold a source address back for a while). Returns how long it took.
fn legit(server: &TestServer, via: Via, within: Duration) -> Duration {
    let start = Instant::now();
    let deadline = start + within;
    let mut last = String::from("never tried");
    for attempt in 0..100u16 {
        if Instant::now() >= deadline {
            break;
        }
        match legit_once(server, via, 0x4000 + attempt, deadline) {
            Ok(()) => return start.elapsed(),
            Err(e) => last = e,
        }
        sleep(Duration::from_millis(300));
    }
    panic!(
        "a legitimate client over {via:?} could not allocate and relay within {within:?}: {last}\n\
         server log (tail):\n{}",
        tail(&server.log(), 30)
    );
}

fn legit_once(server: &TestServer, via: Via, ch: u16, deadline: Instant) -> Result<(), String> {
    let peer = common::udp_echo_peer(3, Duration::from_secs(5));
    let mut c = match via {
        Via::Udp(ip) => Client::udp(server, ip),
        Via::Tcp(ip) => Client::tcp(server, ip),
    };
    let relayed = c.allocate(deadline)?;
    if relayed.ip() != IpAddr::V4(LO)
        || !(server.min_port..=server.max_port).contains(&relayed.port())
    {
        return Err(format!("relayed address {relayed} outside the relay range"));
    }
    c.permit(peer, deadline)?;
    c.bind(ch, peer, deadline)?;
    for (i, len) in [1usize, 5, 301].into_iter().enumerate() {
        let payload: Vec<u8> = (0..len)
            .map(|k| (k as u8).wrapping_mul(31).wrapping_add(i as u8 + 1))
            .collect();
        c.send_cd(ch, &payload);
        match c.recv_cd(deadline.min(Instant::now() + 3 * SECOND)) {
            Some((n, p)) if n == ch && p == payload => {}
            other => return Err(format!("echo {i} ({len} bytes): got {other:?}")),
        }
    }
    if let Via::Udp(_) = via {
        let r = c.success(Method::REFRESH, deadline, &|w| {
            w.add_u32(AttrType::LIFETIME, 0);
        })?;
        let lifetime = MessageRef::parse(&r).unwrap().lifetime().unwrap();
        if lifetime != Some(0) {
            return Err(format!("Refresh 0 answered LIFETIME {lifetime:?}"));
        }
    }
    Ok(())
}

/// Resident memory of a process, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS")
}

fn assert_rss_bounded(server: &TestServer, before: u64, what: &str) {
    let after = rss_kib(server.pid());
    assert!(
        after < before + 50 * 1024,
        "{what}: server RSS grew from {before} KiB to {after} KiB"
    );
    eprintln!("{what}: server RSS {before} KiB -> {after} KiB");
}

/// Waits (boundedly) for a log line containing every one of `needles`.
fn log_line(server: &TestServer, needles: &[&str], within: Duration) -> Option<String> {
    let deadline = Instant::now() + within;
    loop {
        let log = server.log();
        if let Some(l) = log.lines().find(|l| needles.iter().all(|n| l.contains(n))) {
            return Some(l.to_string());
        }
        remaining(deadline)?;
        sleep(Duration::from_millis(20));
    }
}

// ------------------------------------------------------------------------ the cases

#[test]
fn truncated_headers_lengths_past_the_datagram_and_bad_cookies_are_dropped() {
    let server = common::start("");
    let mut c = Client::udp(&server, LO);
    c.fetch_nonce();
    let t = txid();
    let full = c.signed(Method::ALLOCATE, &t, udp_transport);
    let body = full.len() - 20;

    // Every prefix of a signed Allocate, the header unchanged (so the length runs past the
    // datagram); length fields past the datagram, short of it, or not a multiple of four;
    // bytes after the message; each byte of the magic cookie wrong; the first two bits set.
    let mut cases: Vec<Vec<u8>> = (0..full.len()).map(|cut| full[..cut].to_vec()).collect();
    for len in [
        body + 4,
        body + 8,
        body + 256,
        0xFFFC,
        body + 1,
        body + 2,
        body + 3,
        body - 1,
        body - 4,
        0,
    ] {
        let mut m = full.clone();
        set_len(&mut m, len);
        cases.push(m);
    }
    for extra in [1usize, 4, 100] {
        let mut m = full.clone();
        m.extend(std::iter::repeat_n(0u8, extra));
        cases.push(m);
    }
    for i in 4..8 {
        let mut m = full.clone();
        m[i] ^= 0x01;
        cases.push(m);
    }
    for bits in [0x40u8, 0x80, 0xC0] {
        let mut m = full.clone();
        m[0] |= bits;
        cases.push(m);
    }
    let n = cases.len();
    send_paced(&mut c, &cases);
    nothing_answered(
        &mut c,
        &format!("{n} truncated, overlong or mis-cookied copies of a signed Allocate"),
    );

    // Cut at every four bytes with the length field made to match: the header is sound, so the
    // request is answered, 400 when the cut falls inside an attribute, 401 when it falls
    // between two (the integrity is gone); never with an allocation.
    let bounds = boundaries(&full);
    for cut in (20..full.len()).step_by(4) {
        let mut m = full[..cut].to_vec();
        set_len(&mut m, cut - 20);
        let tc = txid();
        m[8..20].copy_from_slice(&tc.0);
        let r = c
            .exchange(&m, &tc, Instant::now() + 3 * SECOND)
            .unwrap_or_else(|| panic!("cut at {cut}: no answer"));
        let want = if bounds.contains(&cut) { 401 } else { 400 };
        assert_eq!(code(&r), Some(want), "cut at {cut} of {}", full.len());
    }

    // The intact request (with a new transaction ID) allocates: nothing before made an
    // allocation for this 5-tuple, which would answer 437.
    let t2 = txid();
    let ok = c.signed(Method::ALLOCATE, &t2, udp_transport);
    let r = c.exchange(&ok, &t2, Instant::now() + 3 * SECOND).unwrap();
    assert_eq!(code(&r), None, "the intact Allocate succeeds");

    let took = legit(&server, Via::Udp(LO), 5 * SECOND);
    eprintln!("{n} dropped variants; legitimate client in {took:?}");
}

#[test]
fn attribute_lengths_that_overflow_or_misfit_are_answered_400() {
    let server = common::start("");
    let mut c = Client::udp(&server, LO);

    // Framing (checked before anything else, so no credentials are needed): an attribute that
    // runs past the message by a little or by up to 64 KiB, integrity and fingerprint
    // attributes of the wrong size, FINGERPRINT not last, more attributes than allowed.
    type Build = Box<dyn Fn(&TransactionId) -> Vec<u8>>;
    let mut cases: Vec<(String, Build)> = Vec::new();
    for declared in [0xFFFFu16, 0xFFFD, 0xFFFC, 0x8000, 0x0101, 9, 12] {
        cases.push((
            format!("SOFTWARE declaring {declared} bytes with 8 present"),
            Box::new(move |t: &TransactionId| {
                let mut m = message(Method::ALLOCATE, Class::Request, t, udp_transport);
                push_attr(&mut m, AttrType::SOFTWARE.0, declared, &[b'x'; 8]);
                m
            }),
        ));
    }
    for (typ, len) in [
        (AttrType::MESSAGE_INTEGRITY, 16u16),
        (AttrType::MESSAGE_INTEGRITY, 24),
        (AttrType::MESSAGE_INTEGRITY_SHA256, 12),
        (AttrType::MESSAGE_INTEGRITY_SHA256, 18),
        (AttrType::MESSAGE_INTEGRITY_SHA256, 36),
        (AttrType::FINGERPRINT, 8),
        (AttrType::FINGERPRINT, 0),
    ] {
        cases.push((
            format!("attribute {:#06x} of {len} bytes", typ.0),
            Box::new(move |t: &TransactionId| {
                let mut m = message(Method::ALLOCATE, Class::Request, t, udp_transport);
                push_attr(&mut m, typ.0, len, &vec![0x5a; len as usize]);
                m
            }),
        ));
    }
    cases.push((
        "an attribute after FINGERPRINT".into(),
        Box::new(|t: &TransactionId| {
            let mut m = message(Method::ALLOCATE, Class::Request, t, udp_transport);
            push_fingerprint(&mut m, 0);
            push_attr(&mut m, AttrType::SOFTWARE.0, 4, b"late");
            m
        }),
    ));
    cases.push((
        "33 attributes".into(),
        Box::new(|t: &TransactionId| {
            message(Method::ALLOCATE, Class::Request, t, |w| {
                udp_transport(w);
                for _ in 0..32 {
                    w.add(AttrType::SOFTWARE, b"dup");
                }
            })
        }),
    ));
    for (what, build) in &cases {
        let r = c
            .ask(|_, t| build(t))
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(code(&r), Some(400), "{what}");
    }

    // Values whose length is wrong for their type, in signed requests: 400 too.
    c.fetch_nonce();
    let signed_cases: Vec<(&str, SignedBuild)> = vec![
        (
            "REQUESTED-TRANSPORT of 3 bytes",
            Box::new(|c: &Client, t: &TransactionId| {
                c.signed(Method::ALLOCATE, t, |w| {
                    w.add(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0]);
                })
            }),
        ),
        (
            "REQUESTED-TRANSPORT of 8 bytes",
            Box::new(|c: &Client, t: &TransactionId| {
                c.signed(Method::ALLOCATE, t, |w| {
                    w.add(AttrType::REQUESTED_TRANSPORT, &[17, 0, 0, 0, 0, 0, 0, 0]);
                })
            }),
        ),
        (
            "LIFETIME of 2 bytes",
            Box::new(|c: &Client, t: &TransactionId| {
                c.signed(Method::ALLOCATE, t, |w| {
                    udp_transport(w);
                    w.add(AttrType::LIFETIME, &[0, 1]);
                })
            }),
        ),
        (
            "EVEN-PORT of 0 bytes",
            Box::new(|c: &Client, t: &TransactionId| {
                c.signed(Method::ALLOCATE, t, |w| {
                    udp_transport(w);
                    w.add(AttrType::EVEN_PORT, &[]);
                })
            }),
        ),
        (
            "RESERVATION-TOKEN of 4 bytes",
            Box::new(|c: &Client, t: &TransactionId| {
                c.signed(Method::ALLOCATE, t, |w| {
                    udp_transport(w);
                    w.add(AttrType::RESERVATION_TOKEN, &[1, 2, 3, 4]);
                })
            }),
        ),
        (
            "REQUESTED-ADDRESS-FAMILY of 2 bytes",
            Box::new(|c: &Client, t: &TransactionId| {
                c.signed(Method::ALLOCATE, t, |w| {
                    udp_transport(w);
                    w.add(AttrType::REQUESTED_ADDRESS_FAMILY, &[1, 0]);
                })
            }),
        ),
        (
            "USERNAME of 600 bytes",
            Box::new(|c: &Client, t: &TransactionId| {
                message(Method::ALLOCATE, Class::Request, t, |w| {
                    udp_transport(w);
                    w.add(AttrType::USERNAME, &[b'a'; 600])
                        .add(AttrType::REALM, common::REALM.as_bytes())
                        .add(AttrType::NONCE, &c.nonce)
                        .add_integrity(&c.key);
                })
            }),
        ),
        (
            "USERNAME not UTF-8",
            Box::new(|c: &Client, t: &TransactionId| {
                message(Method::ALLOCATE, Class::Request, t, |w| {
                    udp_transport(w);
                    w.add(AttrType::USERNAME, &[0xff, 0xfe, 0x80])
                        .add(AttrType::REALM, common::REALM.as_bytes())
                        .add(AttrType::NONCE, &c.nonce)
                        .add_integrity(&c.key);
                })
            }),
        ),
        (
            "NONCE of 800 bytes",
            Box::new(|c: &Client, t: &TransactionId| {
                message(Method::ALLOCATE, Class::Request, t, |w| {
                    udp_transport(w);
                    w.add(AttrType::USERNAME, c.user.as_bytes())
                        .add(AttrType::REALM, common::REALM.as_bytes())
                        .add(AttrType::NONCE, &[b'0'; 800])
                        .add_integrity(&c.key);
                })
            }),
        ),
    ];
    for (what, build) in &signed_cases {
        let r = c
            .ask(|c, t| build(c, t))
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(code(&r), Some(400), "{what}");
    }
    // None of them allocated (that would answer 437 now).
    let dl = Instant::now() + 3 * SECOND;
    c.allocate(dl).expect("allocate after the malformed ones");
    let peer = common::udp_echo_peer(1, Duration::from_secs(5));
    let after: Vec<(&str, Method, AddAttrs)> = vec![
        (
            "XOR-PEER-ADDRESS of 3 bytes",
            Method::CREATE_PERMISSION,
            Box::new(|w: &mut MessageWriter<'_>| {
                w.add(AttrType::XOR_PEER_ADDRESS, &[0, 1, 2]);
            }),
        ),
        (
            "XOR-PEER-ADDRESS of family 7",
            Method::CREATE_PERMISSION,
            Box::new(|w: &mut MessageWriter<'_>| {
                w.add(AttrType::XOR_PEER_ADDRESS, &[0, 7, 0, 80, 1, 2, 3, 4]);
            }),
        ),
        (
            "XOR-PEER-ADDRESS IPv4 of 20 bytes",
            Method::CREATE_PERMISSION,
            Box::new(|w: &mut MessageWriter<'_>| {
                w.add(
                    AttrType::XOR_PEER_ADDRESS,
                    &[0, 1, 0, 80, 1, 2, 3, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0],
                );
            }),
        ),
        (
            "CHANNEL-NUMBER of 2 bytes",
            Method::CHANNEL_BIND,
            Box::new(move |w: &mut MessageWriter<'_>| {
                w.add(AttrType::CHANNEL_NUMBER, &[0x40, 0x00])
                    .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
            }),
        ),
        (
            "CHANNEL-NUMBER of 8 bytes",
            Method::CHANNEL_BIND,
            Box::new(move |w: &mut MessageWriter<'_>| {
                w.add(AttrType::CHANNEL_NUMBER, &[0x40, 0, 0, 0, 0, 0, 0, 0])
                    .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
            }),
        ),
        (
            "LIFETIME of 3 bytes in a Refresh",
            Method::REFRESH,
            Box::new(|w: &mut MessageWriter<'_>| {
                w.add(AttrType::LIFETIME, &[0, 0, 0]);
            }),
        ),
    ];
    for (what, method, add) in &after {
        let r = c.request(*method, dl + SECOND, add.as_ref()).unwrap();
        assert_eq!(code(&r), Some(400), "{what}");
    }
    // The allocation is intact.
    c.bind(0x4000, peer, Instant::now() + 3 * SECOND).unwrap();
    c.send_cd(0x4000, b"still here");
    assert_eq!(
        c.recv_cd(Instant::now() + 3 * SECOND),
        Some((0x4000, b"still here".to_vec()))
    );

    // Over TCP: the largest frame (65,552 bytes) whose only attribute declares 65,535 bytes is
    // answered 400 and the connection keeps serving; a header whose length is not a multiple
    // of four cannot be framed and closes the connection.
    let mut s = Client::tcp(&server, LO);
    let t = txid();
    let mut big = message(Method::ALLOCATE, Class::Request, &t, |_| {});
    big.extend_from_slice(&AttrType::SOFTWARE.0.to_be_bytes());
    big.extend_from_slice(&0xFFFFu16.to_be_bytes());
    big.resize(20 + 0xFFFC, b'x');
    set_len(&mut big, 0xFFFC);
    let r = s
        .exchange(&big, &t, Instant::now() + 3 * SECOND)
        .expect("an answer to the largest frame");
    assert_eq!(code(&r), Some(400));
    nothing_answered(&mut s, "after the largest frame");
    let mut odd = binding(&txid());
    set_len(&mut odd, 0xFFFD);
    s.conn.send(&odd).unwrap();
    let Conn::Tcp(stream, _) = &mut s.conn else {
        unreachable!()
    };
    assert!(
        closed_within(stream, 3 * SECOND),
        "unframable header closes the connection"
    );

    let udp = legit(&server, Via::Udp(LO), 5 * SECOND);
    let tcp = legit(&server, Via::Tcp(LO), 5 * SECOND);
    eprintln!("legitimate clients: UDP in {udp:?}, TCP in {tcp:?}");
}

#[test]
fn duplicate_attributes_the_first_one_counts() {
    let server = common::start("");
    let dl = || Instant::now() + 3 * SECOND;

    // REQUESTED-TRANSPORT: UDP then TCP allocates; TCP then UDP is 442.
    let mut a = Client::udp(&server, LO);
    let r = a
        .request(Method::ALLOCATE, dl(), &|w| {
            udp_transport(w);
            tcp_transport(w);
        })
        .unwrap();
    assert_eq!(code(&r), None, "UDP first");
    let mut b = Client::udp(&server, LO);
    let r = b
        .request(Method::ALLOCATE, dl(), &|w| {
            tcp_transport(w);
            udp_transport(w);
        })
        .unwrap();
    assert_eq!(code(&r), Some(442), "TCP first");

    // USERNAME: alice then mallory, signed with alice's key, allocates; mallory first is 401.
    let mut u = Client::udp(&server, LO);
    u.fetch_nonce();
    let with_users = |c: &Client, t: &TransactionId, first: &str, second: &str| {
        message(Method::ALLOCATE, Class::Request, t, |w| {
            udp_transport(w);
            w.add(AttrType::USERNAME, first.as_bytes())
                .add(AttrType::USERNAME, second.as_bytes())
                .add(AttrType::REALM, common::REALM.as_bytes())
                .add(AttrType::NONCE, &c.nonce)
                .add_integrity(&c.key);
        })
    };
    let r = u.ask(|c, t| with_users(c, t, "mallory", "alice")).unwrap();
    assert_eq!(code(&r), Some(401), "mallory first");
    let r = u.ask(|c, t| with_users(c, t, "alice", "mallory")).unwrap();
    assert_eq!(code(&r), None, "alice first");
    assert!(MessageRef::parse(&r).unwrap().verify(&u.key));

    // NONCE: a stale one first is 438 though the right one follows; the right one first
    // allocates though garbage follows.
    let mut n = Client::udp(&server, LO);
    n.fetch_nonce();
    let with_nonces = |c: &Client, t: &TransactionId, good_first: bool| {
        let junk = [b'f'; 32];
        let (first, second): (&[u8], &[u8]) = if good_first {
            (c.nonce.as_slice(), &junk[..])
        } else {
            (&junk[..], c.nonce.as_slice())
        };
        message(Method::ALLOCATE, Class::Request, t, |w| {
            udp_transport(w);
            w.add(AttrType::USERNAME, c.user.as_bytes())
                .add(AttrType::REALM, common::REALM.as_bytes())
                .add(AttrType::NONCE, first)
                .add(AttrType::NONCE, second)
                .add_integrity(&c.key);
        })
    };
    let r = n.ask(|c, t| with_nonces(c, t, false)).unwrap();
    assert_eq!(code(&r), Some(438), "a stale nonce first");
    let r = n.ask(|c, t| with_nonces(c, t, true)).unwrap();
    assert_eq!(code(&r), None, "the right nonce first");

    // LIFETIME in a Refresh: 600 then 0 refreshes (a server taking the last would delete).
    let r = a
        .success(Method::REFRESH, dl(), &|w| {
            w.add_u32(AttrType::LIFETIME, 600)
                .add_u32(AttrType::LIFETIME, 0);
        })
        .unwrap();
    assert_eq!(
        MessageRef::parse(&r).unwrap().lifetime().unwrap(),
        Some(600)
    );

    // CHANNEL-NUMBER 0x4001 then 0x4002, XOR-PEER-ADDRESS the echo peer then another: 0x4001
    // is bound to the echo peer; 0x4002 is not bound, and the other peer hears nothing.
    let echo = common::udp_echo_peer(4, Duration::from_secs(5));
    let other = UdpSocket::bind((LO, 0)).unwrap();
    let other_addr = other.local_addr().unwrap();
    a.success(Method::CHANNEL_BIND, dl(), &|w| {
        w.add_u32(AttrType::CHANNEL_NUMBER, 0x4001 << 16)
            .add_u32(AttrType::CHANNEL_NUMBER, 0x4002 << 16)
            .add_xor_address(AttrType::XOR_PEER_ADDRESS, echo)
            .add_xor_address(AttrType::XOR_PEER_ADDRESS, other_addr);
    })
    .unwrap();
    a.send_cd(0x4002, b"on the second number");
    a.send_cd(0x4001, b"on the first number");
    assert_eq!(
        a.recv_cd(dl()),
        Some((0x4001, b"on the first number".to_vec())),
        "only the first CHANNEL-NUMBER is bound, to the first peer"
    );
    other
        .set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    assert!(
        other.recv_from(&mut [0u8; 64]).is_err(),
        "the second peer hears nothing"
    );
    nothing_answered(&mut a, "ChannelData on an unbound number");

    let took = legit(&server, Via::Udp(LO), 5 * SECOND);
    eprintln!("legitimate client in {took:?}");
}

#[test]
fn garbage_after_message_integrity_is_ignored_or_refused_never_trusted() {
    let server = common::start("");
    let alloc = |c: &Client, t: &TransactionId| c.signed(Method::ALLOCATE, t, udp_transport);
    let fresh = || {
        let mut c = Client::udp(&server, LO);
        c.fetch_nonce();
        c
    };

    // Well-formed attributes after MESSAGE-INTEGRITY are ignored, whatever they claim: another
    // transport, another user, a zero lifetime, an unknown comprehension-required type, and a
    // hundred more (beyond the 32 attributes counted before the integrity).
    let mut c = fresh();
    let r = c
        .ask(|c, t| {
            let mut m = alloc(c, t);
            push_attr(&mut m, AttrType::REQUESTED_TRANSPORT.0, 4, &[6, 0, 0, 0]);
            push_attr(&mut m, AttrType::USERNAME.0, 7, b"mallory");
            push_attr(&mut m, AttrType::LIFETIME.0, 4, &0u32.to_be_bytes());
            push_attr(&mut m, 0x0030, 4, b"huh?");
            for i in 0..100u16 {
                push_attr(&mut m, 0x8050 + (i % 16), 4, &[i as u8; 4]);
            }
            m
        })
        .unwrap();
    assert_eq!(code(&r), None, "attributes after the integrity are ignored");
    let m = MessageRef::parse(&r).unwrap();
    assert!(m.verify(&c.key));
    assert_eq!(
        m.lifetime().unwrap(),
        Some(600),
        "the LIFETIME after MI is ignored"
    );
    // ... whereas the unknown comprehension-required type before it is refused.
    let mut c = fresh();
    let r = c
        .ask(|c, t| {
            c.signed(Method::ALLOCATE, t, |w| {
                udp_transport(w);
                w.add(AttrType(0x0030), b"huh?");
            })
        })
        .unwrap();
    assert_eq!(code(&r), Some(420));

    // FINGERPRINT after MESSAGE-INTEGRITY, directly or after ignored attributes: checked.
    let mut c = fresh();
    let r = c
        .ask(|c, t| {
            let mut m = alloc(c, t);
            push_fingerprint(&mut m, 0);
            m
        })
        .unwrap();
    assert_eq!(code(&r), None, "MI then FINGERPRINT");
    assert_eq!(
        MessageRef::parse(&r).unwrap().fingerprint_valid(),
        Some(true)
    );
    let mut c = fresh();
    let r = c
        .ask(|c, t| {
            let mut m = alloc(c, t);
            push_attr(&mut m, AttrType::SOFTWARE.0, 5, b"trail");
            push_fingerprint(&mut m, 0);
            m
        })
        .unwrap();
    assert_eq!(code(&r), None, "MI, junk, then FINGERPRINT");

    // MESSAGE-INTEGRITY-SHA256 after MESSAGE-INTEGRITY is the one checked: garbage there is
    // 401. A tampered MESSAGE-INTEGRITY is 401.
    let mut c = fresh();
    let r = c
        .ask(|c, t| {
            let mut m = alloc(c, t);
            push_attr(
                &mut m,
                AttrType::MESSAGE_INTEGRITY_SHA256.0,
                32,
                &[0xab; 32],
            );
            m
        })
        .unwrap();
    assert_eq!(code(&r), Some(401), "garbage MESSAGE-INTEGRITY-SHA256");
    let r = c
        .ask(|c, t| {
            let mut m = alloc(c, t);
            let last = m.len() - 1;
            m[last] ^= 0x01;
            m
        })
        .unwrap();
    assert_eq!(code(&r), Some(401), "tampered MESSAGE-INTEGRITY");

    // Garbage after MESSAGE-INTEGRITY that breaks the framing: an attribute running past the
    // end is 400; bytes that make the length not a multiple of four, bytes past the length,
    // and a wrong FINGERPRINT are dropped.
    let r = c
        .ask(|c, t| {
            let mut m = alloc(c, t);
            push_attr(&mut m, AttrType::SOFTWARE.0, 0x100, b"shrt");
            m
        })
        .unwrap();
    assert_eq!(
        code(&r),
        Some(400),
        "an attribute after MI running past the end"
    );
    let mut dropped = Vec::new();
    let t = txid();
    let mut m = alloc(&c, &t);
    m.extend_from_slice(&[1, 2, 3]);
    let body = m.len() - 20;
    set_len(&mut m, body);
    dropped.push(m);
    let mut m = alloc(&c, &txid());
    m.extend_from_slice(&[0xde, 0xad, 0xbe, 0xef, 0, 0, 0, 0]);
    dropped.push(m);
    let mut m = alloc(&c, &txid());
    push_fingerprint(&mut m, 0x0100_0000);
    dropped.push(m);
    send_paced(&mut c, &dropped);
    nothing_answered(&mut c, "garbage after MESSAGE-INTEGRITY");
    // None of those allocated: the 5-tuple is free.
    c.allocate(Instant::now() + 3 * SECOND).unwrap();

    let took = legit(&server, Via::Udp(LO), 5 * SECOND);
    eprintln!("legitimate client in {took:?}");
}

#[test]
fn a_wrong_fingerprint_is_dropped() {
    let server = common::start("");
    // Our CRC agrees with the server's codec.
    let t = txid();
    let theirs = message(Method::BINDING, Class::Request, &t, |w| {
        w.add_fingerprint();
    });
    let mut ours = binding(&t);
    push_fingerprint(&mut ours, 0);
    assert_eq!(ours, theirs);

    let mut c = Client::udp(&server, LO);
    c.fetch_nonce();
    let mut wrong = Vec::new();
    for bad in [1u32, 0x8000_0000, 0x5354_554E, 0xFFFF_FFFF] {
        let mut m = binding(&txid());
        push_fingerprint(&mut m, bad);
        wrong.push(m);
    }
    let mut m = message(Method::ALLOCATE, Class::Request, &txid(), udp_transport);
    push_fingerprint(&mut m, 4);
    wrong.push(m);
    let mut m = c.signed(Method::ALLOCATE, &txid(), udp_transport);
    push_fingerprint(&mut m, 0x10);
    wrong.push(m);
    send_paced(&mut c, &wrong);
    nothing_answered(&mut c, "requests with a wrong FINGERPRINT");

    // The signed Allocate with a right FINGERPRINT allocates (the wrong one did not: 437).
    let r = c
        .ask(|c, t| {
            let mut m = c.signed(Method::ALLOCATE, t, udp_transport);
            push_fingerprint(&mut m, 0);
            m
        })
        .unwrap();
    assert_eq!(code(&r), None);
    assert_eq!(
        MessageRef::parse(&r).unwrap().fingerprint_valid(),
        Some(true)
    );

    // A ChannelBind with a wrong FINGERPRINT binds nothing: ChannelData on that number goes
    // nowhere; with the right one the channel works.
    let echo = common::udp_echo_peer(2, Duration::from_secs(5));
    let bind = |c: &Client, t: &TransactionId, wrong: u32| {
        let mut m = c.signed(Method::CHANNEL_BIND, t, |w| {
            w.add_u32(AttrType::CHANNEL_NUMBER, 0x4321 << 16)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, echo);
        });
        push_fingerprint(&mut m, wrong);
        m
    };
    let m = bind(&c, &txid(), 0x0200);
    c.conn.send(&m).unwrap();
    c.send_cd(0x4321, b"unbound");
    nothing_answered(&mut c, "ChannelBind with a wrong FINGERPRINT");
    let r = c.ask(|c, t| bind(c, t, 0)).unwrap();
    assert_eq!(code(&r), None);
    c.send_cd(0x4321, b"bound");
    assert_eq!(
        c.recv_cd(Instant::now() + 3 * SECOND),
        Some((0x4321, b"bound".to_vec()))
    );

    let took = legit(&server, Via::Udp(LO), 5 * SECOND);
    eprintln!("legitimate client in {took:?}");
}

/// Sends `n` unauthenticated Allocate requests from `ports` sockets on 127.0.0.1, paced over
/// about 1.5 s, and checks each answer: a 401 with REALM and NONCE, without SOFTWARE or
/// integrity, small. Returns the number of answers and the time from the first request to
/// the last read.
fn flood_allocates(to: SocketAddr, n: usize, ports: usize) -> (usize, Duration) {
    let socks: Vec<UdpSocket> = (0..ports)
        .map(|_| {
            let s = UdpSocket::bind((LO, 0)).unwrap();
            s.set_nonblocking(true).unwrap();
            s
        })
        .collect();
    let mut answers = 0usize;
    let mut buf = [0u8; 2048];
    let mut drain = |answers: &mut usize| {
        for s in &socks {
            for _ in 0..64 {
                let Ok(k) = s.recv(&mut buf) else { break };
                let r = &buf[..k];
                let m = MessageRef::parse(r).expect("a well-formed answer");
                assert_eq!(code(r), Some(401));
                assert!(m.has(AttrType::REALM) && m.nonce().unwrap().is_some());
                assert!(!m.has(AttrType::SOFTWARE), "no SOFTWARE to strangers");
                assert!(m.integrity().is_none());
                assert!(k <= 128, "a small answer ({k} bytes)");
                *answers += 1;
            }
        }
    };
    let start = Instant::now();
    for i in 0..n {
        let req = message(Method::ALLOCATE, Class::Request, &txid(), udp_transport);
        let _ = socks[i % ports].send_to(&req, to);
        if i % 100 == 99 {
            drain(&mut answers);
            sleep(Duration::from_millis(15));
        }
    }
    let end = Instant::now() + Duration::from_millis(300);
    while Instant::now() < end {
        drain(&mut answers);
        sleep(Duration::from_millis(10));
    }
    (answers, start.elapsed())
}

#[test]
fn ten_thousand_unauthenticated_allocates_are_answered_at_a_bounded_rate() {
    let server = common::start("");
    let rss0 = rss_kib(server.pid());
    let to = server.addr();
    let flood = std::thread::spawn(move || flood_allocates(to, 10_000, 250));
    // While the flood runs, a client from another address is served at once.
    sleep(Duration::from_millis(300));
    let other = legit(&server, Via::Udp(LO2), 3 * SECOND);
    let (answers, elapsed) = flood.join().unwrap();
    let bound = 100 + (20.0 * elapsed.as_secs_f64()).ceil() as usize + 10;
    eprintln!(
        "10000 unauthenticated Allocates over {elapsed:?}: {answers} answered (bound {bound}); \
         127.0.0.2 served in {other:?} during the flood"
    );
    assert!(
        answers <= bound,
        "{answers} answers in {elapsed:?}: more than the burst of 100 and 20 per second"
    );
    assert!(
        answers >= 50,
        "only {answers} answers: the burst was not answered"
    );
    // 127.0.0.1 itself is served again once its bucket refills.
    let same = legit(&server, Via::Udp(LO), 8 * SECOND);
    eprintln!("127.0.0.1 served again after {same:?}");
    assert_rss_bounded(&server, rss0, "after the flood");
}

#[test]
fn password_guessing_is_limited_per_user_and_source_address() {
    let server = common::start_with(&format!(
        "allow-loopback-peers = true\n[users]\n{} = \"{}\"\nbob = \"builder\"\n",
        common::USER,
        common::PASSWORD
    ));
    // Sixty wrong passwords for alice from 127.0.0.3: each is 401, never anything else.
    let mut g = Client::udp(&server, LO3);
    g.key = long_term_key(common::USER, common::REALM, "not-the-password");
    g.fetch_nonce();
    for i in 0..60 {
        let r = g
            .ask(|c, t| c.signed(Method::ALLOCATE, t, udp_transport))
            .unwrap_or_else(|| panic!("guess {i}: no answer"));
        assert_eq!(code(&r), Some(401), "guess {i}");
        assert!(!MessageRef::parse(&r).unwrap().has(AttrType::SOFTWARE));
    }
    let guessed = Instant::now();
    // alice from another address, and bob from the same one, are not held back.
    let elsewhere = legit(&server, Via::Udp(LO), 2 * SECOND);
    let mut bob = Client::udp(&server, LO3);
    bob.user = "bob";
    bob.key = long_term_key("bob", common::REALM, "builder");
    bob.allocate(Instant::now() + 2 * SECOND)
        .expect("bob from the guessing address");
    // alice from 127.0.0.3 with the right password is refused while the budget refills ...
    let mut a = Client::udp(&server, LO3);
    let r = a
        .request(
            Method::ALLOCATE,
            Instant::now() + 2 * SECOND,
            &udp_transport,
        )
        .unwrap();
    assert_eq!(
        code(&r),
        Some(401),
        "the right password from the guessing address"
    );
    // ... and then served (one check every 6 s once the burst of 20 is spent).
    let same = legit(&server, Via::Udp(LO3), 10 * SECOND);
    let locked = guessed.elapsed();
    eprintln!(
        "alice elsewhere in {elsewhere:?}; alice from 127.0.0.3 after {locked:?} ({same:?} of retries)"
    );
    assert!(locked > 3 * SECOND, "the lock lasted only {locked:?}");
    assert!(server.wait_log("authentication failed", Duration::from_secs(3)));
}

#[test]
fn channel_data_outside_the_channel_range_is_dropped() {
    let server = common::start("");
    let dl = || Instant::now() + 3 * SECOND;
    let peer = UdpSocket::bind((LO, 0)).unwrap();
    let paddr = peer.local_addr().unwrap();
    peer.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let mut pbuf = [0u8; 2048];
    let mut c = Client::udp(&server, LO);
    let relayed = c.allocate(dl()).unwrap();
    c.bind(0x4000, paddr, dl()).unwrap();

    // ChannelBind refuses numbers outside 0x4000-0x7FFF.
    for n in [0x0000u16, 0x3FFF, 0x8000, 0xBFFF, 0xFFFF] {
        let r = c
            .request(Method::CHANNEL_BIND, dl(), &|w| {
                w.add_u32(AttrType::CHANNEL_NUMBER, u32::from(n) << 16)
                    .add_xor_address(AttrType::XOR_PEER_ADDRESS, paddr);
            })
            .unwrap();
        assert_eq!(code(&r), Some(400), "ChannelBind {n:#06x}");
    }

    // ChannelData on numbers outside the range (0x0000-0x3FFF looks like STUN, 0x8000 and up
    // like nothing TURN knows), on unbound numbers in it, shorter than its header, or with a
    // length past the datagram: dropped, unanswered. One whose length is short of the
    // datagram relays the announced bytes only.
    let mut hostile: Vec<Vec<u8>> = [
        0x0000u16, 0x0001, 0x0003, 0x3FFF, 0x8000, 0xBFFF, 0xC000, 0xFFFF, 0x4001, 0x4FFF, 0x5000,
        0x7FFF,
    ]
    .iter()
    .map(|&n| channel_data(n, b"bad-data", false))
    .collect();
    for len in [9u16, 100, 0xFFFF] {
        let mut f = channel_data(0x4000, b"bad-data", false);
        f[2..4].copy_from_slice(&len.to_be_bytes());
        hostile.push(f);
    }
    hostile.extend([vec![0x40], vec![0x40, 0x00], vec![0x40, 0x00, 0x00]]);
    let mut short = channel_data(0x4000, b"abcdefgh", false);
    short[2..4].copy_from_slice(&3u16.to_be_bytes());
    hostile.push(short);
    hostile.push(channel_data(0x4000, b"good", false));
    send_paced(&mut c, &hostile);
    let mut heard = Vec::new();
    while let Ok((n, from)) = peer.recv_from(&mut pbuf) {
        assert_eq!(from, relayed);
        heard.push(pbuf[..n].to_vec());
        assert!(heard.len() < 10);
    }
    assert_eq!(heard, vec![b"abc".to_vec(), b"good".to_vec()]);
    nothing_answered(&mut c, "hostile ChannelData");
    // ChannelData on 0x4000 from a socket without the allocation reaches no one.
    let mut stranger = Client::udp(&server, LO);
    stranger.send_cd(0x4000, b"spoof");
    nothing_answered(&mut stranger, "ChannelData without an allocation");
    assert!(
        peer.recv_from(&mut pbuf).is_err(),
        "the stranger's data went nowhere"
    );
    // The channel works both ways.
    peer.send_to(b"from the peer", relayed).unwrap();
    assert_eq!(c.recv_cd(dl()), Some((0x4000, b"from the peer".to_vec())));

    // Over TCP: an unbound number in the range is dropped and the connection stays; a frame
    // starting like channel 0x8000 is not TURN, and the connection (and its allocation) ends.
    let mut t = Client::tcp(&server, LO);
    let trelay = t.allocate(dl()).unwrap();
    t.bind(0x4000, paddr, dl()).unwrap();
    t.send_cd(0x7FFF, b"unbound");
    t.send_cd(0x4000, b"xyz");
    let (n, from) = peer.recv_from(&mut pbuf).expect("the bound channel relays");
    assert_eq!((&pbuf[..n], from), (&b"xyz"[..], trelay));
    nothing_answered(&mut t, "unbound ChannelData over TCP");
    t.conn.send(&channel_data(0x8000, b"abcd", true)).unwrap();
    let Conn::Tcp(stream, _) = &mut t.conn else {
        unreachable!()
    };
    assert!(
        closed_within(stream, 3 * SECOND),
        "0x80 closes the connection"
    );
    assert!(
        log_line(
            &server,
            &["allocation deleted", "tcp:", "connection_closed"],
            3 * SECOND
        )
        .is_some(),
        "{}",
        tail(&server.log(), 20)
    );

    let udp = legit(&server, Via::Udp(LO), 5 * SECOND);
    let tcp = legit(&server, Via::Tcp(LO), 5 * SECOND);
    eprintln!("legitimate clients: UDP in {udp:?}, TCP in {tcp:?}");
}

#[test]
fn tcp_clients_that_send_a_frame_header_and_stall_are_closed_and_others_served() {
    let server = common::start("idle-connection-timeout = 1\nmax-connections = 24");
    let rss0 = rss_kib(server.pid());
    let dl = Instant::now() + 5 * SECOND;
    // A client with an allocation stalls half-way through a ChannelData frame.
    let peer = UdpSocket::bind((LO, 0)).unwrap();
    let paddr = peer.local_addr().unwrap();
    let mut a = Client::tcp(&server, LO);
    a.allocate(dl).unwrap();
    a.bind(0x4000, paddr, dl).unwrap();
    let slow = channel_data(0x4000, b"completed after a stall", true);
    a.conn.send(&slow[..6]).unwrap();
    let stalled_at = Instant::now();

    // The other 23 connection slots: a STUN header announcing the largest message and 1000
    // bytes of it; a ChannelData header announcing 65,535 bytes and 1000 of them; one byte of
    // a header; nothing at all.
    let mut stalled: Vec<TcpStream> = (0..23)
        .map(|i| {
            let mut s = TcpStream::connect(server.addr()).unwrap();
            let mut head: Vec<u8> = match i % 4 {
                0 => {
                    let mut h = binding(&txid());
                    set_len(&mut h, 0xFFFC);
                    h
                }
                1 => vec![0x40, 0x00, 0xFF, 0xFF],
                2 => vec![0x00],
                _ => vec![],
            };
            if head.len() > 1 {
                head.resize(head.len() + 1000, 0x5a);
            }
            s.write_all(&head).unwrap();
            s
        })
        .collect();
    // Every slot is taken: one more connection is closed at once.
    let mut extra = TcpStream::connect(server.addr()).unwrap();
    assert!(
        closed_within(&mut extra, 2 * SECOND),
        "max-connections holds"
    );
    // UDP clients are served meanwhile.
    let udp = legit(&server, Via::Udp(LO), 5 * SECOND);
    // The stalled connections go after idle-connection-timeout.
    for (i, s) in stalled.iter_mut().enumerate() {
        assert!(
            closed_within(s, 4 * SECOND),
            "stalled connection {i} still open"
        );
    }
    let idle_logged = |n: usize| {
        let deadline = Instant::now() + 2 * SECOND;
        loop {
            let idle = server.log().matches("reason=\"idle\"").count();
            if idle >= n || remaining(deadline).is_none() {
                return idle;
            }
            sleep(Duration::from_millis(20));
        }
    };
    let idle = idle_logged(23);
    assert!(idle >= 23, "{idle} connections closed as idle");
    // TCP clients are served again.
    let tcp = legit(&server, Via::Tcp(LO), 5 * SECOND);

    // The client with an allocation was not cut off: it completes its frame, which is relayed.
    assert!(stalled_at.elapsed() > SECOND);
    a.conn.send(&slow[6..]).unwrap();
    peer.set_read_timeout(Some(3 * SECOND)).unwrap();
    let mut buf = [0u8; 256];
    let (n, _) = peer
        .recv_from(&mut buf)
        .expect("the completed frame is relayed");
    assert_eq!(&buf[..n], b"completed after a stall");
    nothing_answered(&mut a, "the client that stalled with an allocation");
    assert_rss_bounded(&server, rss0, "after the stalled connections");
    eprintln!("legitimate clients: UDP in {udp:?} during the stall, TCP in {tcp:?} after");
}

/// Slowloris: silence is measured from the last complete frame, so trickling bytes does not
/// keep a connection (and a max-connections slot) open.
#[test]
fn a_frame_trickled_a_byte_at_a_time_does_not_hold_a_connection_open() {
    let server = common::start("idle-connection-timeout = 1\nmax-connections = 2");
    // Both slots, each trickling a STUN header that announces 64 bytes, a byte every 400 ms:
    // no frame ever completes.
    let mut frame = binding(&txid());
    frame.resize(20 + 64, 0);
    set_len(&mut frame, 64);
    let mut conns: Vec<TcpStream> = (0..2)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    let start = Instant::now();
    let mut closed = [false; 2];
    // Whether a newcomer was turned away (max-connections) 3 s into the trickle.
    let mut newcomer_refused = None;
    for i in 0..frame.len() - 1 {
        if start.elapsed() > 5 * SECOND || closed.iter().all(|c| *c) {
            break;
        }
        if newcomer_refused.is_none() && start.elapsed() > 3 * SECOND {
            let mut s = TcpStream::connect(server.addr()).unwrap();
            newcomer_refused = Some(closed_within(&mut s, Duration::from_millis(300)));
        }
        for (k, s) in conns.iter_mut().enumerate() {
            if !closed[k] && s.write_all(&frame[i..i + 1]).is_err() {
                closed[k] = true;
            }
            s.set_read_timeout(Some(Duration::from_millis(10))).unwrap();
            match s.read(&mut [0u8; 64]) {
                Ok(0) => closed[k] = true,
                Err(e) if !timed_out(&e) => closed[k] = true,
                _ => {}
            }
        }
        sleep(Duration::from_millis(400));
    }
    assert!(
        closed.iter().all(|c| *c),
        "connections that never complete a frame are still open after {:?} \
         (idle-connection-timeout = 1): closed {closed:?}; a newcomer refused meanwhile: \
         {newcomer_refused:?}",
        start.elapsed()
    );
    legit(&server, Via::Tcp(LO), 3 * SECOND);
}

#[test]
fn a_tcp_client_that_never_reads_is_bounded_and_others_are_served() {
    let server = common::start("");
    let dl = Instant::now() + 5 * SECOND;
    // A client with a small receive buffer allocates and binds a channel to a peer ...
    let mut a = Client::new(Conn::Tcp(
        tcp_from(LO, server.addr(), Some(4096)),
        Vec::new(),
    ));
    let relayed = a.allocate(dl).unwrap();
    let flood = UdpSocket::bind((LO, 0)).unwrap();
    a.bind(0x4000, flood.local_addr().unwrap(), dl).unwrap();
    let a_local = a.conn.local_addr();
    let rss0 = rss_kib(server.pid());

    // ... and from now on reads nothing. The peer floods it through the relay (up to 60 MB),
    // and it sends Binding requests whose answers queue as well.
    let peer = std::thread::spawn(move || {
        let payload = vec![0x5a; 1200];
        let start = Instant::now();
        let mut sent = 0usize;
        for i in 0..50_000 {
            if flood.send_to(&payload, relayed).is_ok() {
                sent += 1;
            }
            if i % 200 == 199 {
                sleep(Duration::from_millis(1));
                if start.elapsed() > 4 * SECOND {
                    break;
                }
            }
        }
        sent
    });
    let Conn::Tcp(stream, _) = &a.conn else {
        unreachable!()
    };
    let mut w = stream.try_clone().unwrap();
    let requester = std::thread::spawn(move || {
        w.set_write_timeout(Some(2 * SECOND)).unwrap();
        let start = Instant::now();
        let mut sent = 0usize;
        for _ in 0..200 {
            let batch: Vec<u8> = (0..100).flat_map(|_| binding(&txid())).collect();
            if w.write_all(&batch).is_err() || start.elapsed() > 4 * SECOND {
                break;
            }
            sent += 100;
        }
        sent
    });
    // Meanwhile other clients are served, over UDP and TCP.
    let udp = legit(&server, Via::Udp(LO2), 5 * SECOND);
    let tcp = legit(&server, Via::Tcp(LO2), 5 * SECOND);
    let relayed_sent = peer.join().unwrap();
    let requests = requester.join().unwrap();
    assert_rss_bounded(&server, rss0, "a client that never reads");
    assert_eq!(requests, 20_000, "the server kept reading the requests");

    // It dropped what it could not queue: when the client goes, the log counts the frames.
    drop(a);
    let line = log_line(
        &server,
        &["connection closed", &format!("client=tcp:{a_local} ")],
        3 * SECOND,
    )
    .unwrap_or_else(|| {
        panic!(
            "no close logged for {a_local}:\n{}",
            tail(&server.log(), 20)
        )
    });
    let dropped: u64 = line
        .split("dropped=")
        .nth(1)
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| panic!("no dropped count in {line}"));
    assert!(dropped > 0, "nothing dropped: {line}");
    let udp2 = legit(&server, Via::Udp(LO), 5 * SECOND);
    let tcp2 = legit(&server, Via::Tcp(LO), 5 * SECOND);
    eprintln!(
        "peer sent {relayed_sent} datagrams, client {requests} requests; {dropped} frames dropped; \
         legitimate clients during: UDP {udp:?}, TCP {tcp:?}; after: UDP {udp2:?}, TCP {tcp2:?}"
    );
}

/// A flood of requests the server refuses (here Binding requests with an unknown
/// comprehension-required attribute, which need no credentials) is answered in full, 420 each,
/// but logged at most 50 lines a second per relay thread; the rest are summed up in one line a
/// second, so every refusal is accounted for and the log does not grow with the flood.
#[test]
fn a_flood_of_refused_requests_is_answered_but_not_logged_line_by_line() {
    let server = common::start("");
    let sock = UdpSocket::bind((LO, 0)).unwrap();
    sock.set_read_timeout(Some(3 * SECOND)).unwrap();
    let started = Instant::now();
    const N: usize = 300;
    let mut buf = [0u8; 1500];
    for _ in 0..N / 10 {
        let ids: Vec<TransactionId> = (0..10).map(|_| txid()).collect();
        for t in &ids {
            let req = message(Method::BINDING, Class::Request, t, |w| {
                w.add(AttrType(0x0042), b"?");
            });
            sock.send_to(&req, server.addr()).unwrap();
        }
        for t in &ids {
            let n = sock.recv(&mut buf).expect("every refusal is answered");
            assert!(is_response_to(&buf[..n], t));
            assert_eq!(code(&buf[..n]), Some(420));
        }
    }
    let seconds = started.elapsed().as_secs() as usize + 2;
    // Lines logged, and refusals summed up in the once-a-second lines.
    let accounted = |log: &str| {
        let logged = log.matches("request refused: unknown").count();
        let unlogged: usize = log
            .lines()
            .filter(|l| l.contains("more requests refused than logged"))
            .filter_map(|l| {
                let rest = &l[l.find("count=")? + "count=".len()..];
                rest.split_whitespace().next()?.parse::<usize>().ok()
            })
            .sum();
        (logged, unlogged)
    };
    let deadline = Instant::now() + 5 * SECOND;
    let (logged, unlogged) = loop {
        let (logged, unlogged) = accounted(&server.log());
        if logged + unlogged >= N || Instant::now() > deadline {
            break (logged, unlogged);
        }
        sleep(Duration::from_millis(50));
    };
    let log = server.log();
    assert_eq!(logged + unlogged, N, "log tail:\n{}", tail(&log, 20));
    assert!(unlogged > 0, "nothing was summed up");
    assert!(
        logged <= 50 * seconds,
        "{logged} refusal lines in about {seconds} s"
    );
}
