//! The relayed traffic: each client sends timestamped payloads to its echo peer through its
//! allocation and reads the echoes back, paced (a fixed rate per client, evenly spread) or in
//! bursts (as fast as the echoes come back, with a bounded window of packets in flight per
//! client, so that the server's speed is measured rather than the depth of socket queues).
//!
//! A payload starts with the client's index, a sequence number and the send time in
//! nanoseconds; the rest is zeros. Round-trip times go into an HDR histogram per thread.

use std::cell::{Cell, RefCell};
use std::io::{self, ErrorKind};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use socket2::SockRef;
use tokio::net::UdpSocket;

use super::conn::Conn;
use super::setup::CHANNEL;
use crate::wire::{
    self, AttrType, CHANNEL_DATA_HEADER_LEN, ChannelData, ChannelNumber, Class, MessageRef,
    MessageWriter, Method, TransactionId, pad4,
};

/// Bytes at the start of every payload: client index, sequence number, send time.
pub const MARK_LEN: usize = 16;

/// Largest latency recorded (larger values are recorded as this), nanoseconds.
const MAX_LATENCY_NS: u64 = 60_000_000_000;

/// A histogram of nanoseconds, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_NS, 3).expect("valid bounds")
}

/// How payloads travel between a client and the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// ChannelData on the bound channel (padded to 4 bytes on TCP).
    Channel,
    /// Send indications out, Data indications back.
    Indication,
    /// No server: straight to the echo peer and back (the loopback baseline).
    Direct,
}

/// The load every client of a run offers.
#[derive(Debug, Clone)]
pub struct Plan {
    /// The origin of the timestamps in payloads.
    pub epoch: Instant,
    /// Sending starts at `start` and stops at `end` (or after `count` packets).
    pub start: Instant,
    pub end: Instant,
    /// Packets per second per client; 0 for bursts.
    pub rate: f64,
    /// Bursts: packets in flight per client.
    pub window: u32,
    /// Packets per client; 0 for no limit.
    pub count: u64,
    /// Payload bytes.
    pub size: usize,
    /// Bursts: packets in flight with no echo for this long are written off as lost, so the
    /// window opens again.
    pub stall: Duration,
    /// How long echoes are awaited once sending stopped.
    pub drain: Duration,
    pub framing: Framing,
    pub tcp: bool,
}

/// Counters of one load thread (its clients and its echo peer).
pub struct Counters {
    pub sent: Cell<u64>,
    pub received: Cell<u64>,
    /// Datagrams the client could not send (socket buffer full, ICMP error).
    pub send_errors: Cell<u64>,
    /// Errors reading a client socket.
    pub recv_errors: Cell<u64>,
    /// Clients whose connection failed during the run (TCP closed, ...).
    pub conn_errors: Cell<u64>,
    /// Frames that were not an echo in the expected framing.
    pub unexpected: Cell<u64>,
    /// Echoes of the wrong length or for another client.
    pub corrupt: Cell<u64>,
    /// Bursts: times a client's window was written off after `stall`.
    pub stalls: Cell<u64>,
    pub peer_echoed: Cell<u64>,
    pub peer_errors: Cell<u64>,
    /// The latest time a packet was sent, nanoseconds after the epoch.
    pub last_send_ns: Cell<u64>,
    pub latency: RefCell<Histogram<u64>>,
    /// The thread's receive buffer for UDP (used between awaits only).
    scratch: RefCell<Box<[u8]>>,
}

impl Default for Counters {
    fn default() -> Self {
        Counters {
            sent: Cell::new(0),
            received: Cell::new(0),
            send_errors: Cell::new(0),
            recv_errors: Cell::new(0),
            conn_errors: Cell::new(0),
            unexpected: Cell::new(0),
            corrupt: Cell::new(0),
            stalls: Cell::new(0),
            peer_echoed: Cell::new(0),
            peer_errors: Cell::new(0),
            last_send_ns: Cell::new(0),
            latency: RefCell::new(histogram()),
            scratch: RefCell::new(vec![0u8; 65_536].into_boxed_slice()),
        }
    }
}

fn bump(c: &Cell<u64>) {
    c.set(c.get() + 1);
}

fn ns_since(epoch: Instant, t: Instant) -> u64 {
    t.saturating_duration_since(epoch).as_nanos() as u64
}

/// The frame a client sends, with zeros where the marks go, and the offset of the payload.
pub fn frame_template(
    framing: Framing,
    size: usize,
    tcp: bool,
    peer: SocketAddr,
) -> (Vec<u8>, usize) {
    match framing {
        Framing::Channel => {
            let total = CHANNEL_DATA_HEADER_LEN + size;
            let mut f = vec![0u8; if tcp { pad4(total) } else { total }];
            let mut hdr = [0u8; 4];
            ChannelData::write_header(
                &mut hdr,
                ChannelNumber::new(CHANNEL).expect("bindable"),
                size as u16,
            );
            f[..4].copy_from_slice(&hdr);
            (f, CHANNEL_DATA_HEADER_LEN)
        }
        Framing::Indication => {
            let mut buf = vec![0u8; size + 128];
            let payload = vec![0u8; size];
            let id = TransactionId([0x42; 12]);
            let n = {
                let mut w = MessageWriter::new(&mut buf, Method::SEND, Class::Indication, &id);
                w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer)
                    .add(AttrType::DATA, &payload);
                w.finish().expect("fits")
            };
            buf.truncate(n);
            let at = MessageRef::parse(&buf)
                .ok()
                .and_then(|m| m.range_of(AttrType::DATA))
                .expect("DATA is there")
                .start;
            (buf, at)
        }
        Framing::Direct => (vec![0u8; size], 0),
    }
}

/// The payload of an echo in `framing`, if `frame` is one.
fn payload_of(framing: Framing, frame: &[u8]) -> Option<&[u8]> {
    match framing {
        Framing::Channel => match ChannelData::parse(frame) {
            Some(cd) if cd.number == CHANNEL => Some(cd.payload),
            _ => None,
        },
        Framing::Indication => {
            if wire::classify(frame) != wire::Kind::Stun {
                return None;
            }
            let m = MessageRef::parse(frame).ok()?;
            if m.method() != Method::DATA || m.class() != Class::Indication {
                return None;
            }
            m.data()
        }
        Framing::Direct => Some(frame),
    }
}

/// Checks an echo and records its round-trip time; `true` if it is one of this client's.
fn on_frame(frame: &[u8], idx: u32, plan: &Plan, c: &Counters) -> bool {
    let Some(p) = payload_of(plan.framing, frame) else {
        bump(&c.unexpected);
        return false;
    };
    if p.len() != plan.size || p[..4] != idx.to_be_bytes() {
        bump(&c.corrupt);
        return false;
    }
    let sent = u64::from_be_bytes(p[8..16].try_into().expect("8 bytes"));
    let now = ns_since(plan.epoch, Instant::now());
    c.latency
        .borrow_mut()
        .saturating_record(now.saturating_sub(sent).max(1));
    bump(&c.received);
    true
}

/// Where in the sequence of paced sends client `idx` starts: spread over one interval by the
/// golden ratio, so that clients do not send in step.
fn phase(idx: u32, interval: Duration) -> Duration {
    let f = (f64::from(idx) * 0.618_033_988_749_895).fract();
    interval.mul_f64(f)
}

fn tokio_instant(t: Instant) -> tokio::time::Instant {
    tokio::time::Instant::from_std(t)
}

/// Runs client `idx` through the plan on `conn`; its echo peer is `peer`.
pub async fn drive(
    conn: &mut Conn,
    idx: u32,
    peer: SocketAddr,
    plan: &Plan,
    c: &Counters,
) -> io::Result<()> {
    let (mut out, at) = frame_template(plan.framing, plan.size, plan.tcp, peer);
    out[at..at + 4].copy_from_slice(&idx.to_be_bytes());
    let paced = plan.rate > 0.0;
    let interval = if paced {
        Duration::from_secs_f64(1.0 / plan.rate)
    } else {
        Duration::ZERO
    };
    let mut next_send = plan.start + phase(idx, interval);
    tokio::time::sleep_until(tokio_instant(plan.start)).await;

    let mut seq: u64 = 0;
    let mut received: u64 = 0;
    let mut written_off: u64 = 0;
    let mut last_progress = Instant::now();
    let mut last_send = plan.start;
    let mut stopped: Option<Instant> = None;
    let more = |seq: u64| plan.count == 0 || seq < plan.count;
    let result = 'run: loop {
        let now = Instant::now();
        if stopped.is_none() && (now >= plan.end || !more(seq)) {
            stopped = Some(now);
        }
        if stopped.is_none() {
            loop {
                let due = if paced {
                    next_send <= now
                } else {
                    seq.saturating_sub(received + written_off) < u64::from(plan.window)
                };
                if !due || !more(seq) {
                    break;
                }
                let t = Instant::now();
                out[at + 4..at + 8].copy_from_slice(&(seq as u32).to_be_bytes());
                out[at + 8..at + 16].copy_from_slice(&ns_since(plan.epoch, t).to_be_bytes());
                if paced {
                    next_send += interval;
                }
                match conn.send(&out).await {
                    Ok(()) => {
                        seq += 1;
                        last_send = t;
                        bump(&c.sent);
                    }
                    Err(e) if !conn.is_tcp() => {
                        // Offered but not sent: not counted as sent, so not as lost either.
                        bump(&c.send_errors);
                        if e.kind() == ErrorKind::WouldBlock && !paced {
                            break;
                        }
                    }
                    Err(e) => break 'run Err(e),
                }
                if !paced && received + written_off == 0 && seq == 1 {
                    last_progress = t;
                }
            }
        }
        let in_flight = seq.saturating_sub(received + written_off);
        if let Some(t) = stopped {
            if in_flight == 0 || now >= t + plan.drain {
                break 'run Ok(());
            }
        } else if !paced && in_flight > 0 && now >= last_progress + plan.stall {
            written_off += in_flight;
            bump(&c.stalls);
            last_progress = now;
            continue;
        }
        let wake = match stopped {
            Some(t) => t + plan.drain,
            None if paced => next_send.min(plan.end),
            None => (last_progress + plan.stall).min(plan.end),
        };
        tokio::select! {
            r = conn.readable() => {
                if let Err(e) = r {
                    break 'run Err(e);
                }
                let mut scratch = c.scratch.borrow_mut();
                let tcp = conn.is_tcp();
                loop {
                    match conn.recv(&mut scratch) {
                        Ok(Some(frame)) => {
                            if on_frame(frame, idx, plan, c) {
                                received += 1;
                                last_progress = Instant::now();
                            }
                        }
                        Ok(None) => break,
                        // An ICMP error, reported once.
                        Err(_) if !tcp => bump(&c.recv_errors),
                        Err(e) => return finish(Err(e), c, plan, last_send),
                    }
                }
            }
            _ = tokio::time::sleep_until(tokio_instant(wake)) => {}
        }
    };
    finish(result, c, plan, last_send)
}

fn finish(r: io::Result<()>, c: &Counters, plan: &Plan, last_send: Instant) -> io::Result<()> {
    let t = ns_since(plan.epoch, last_send);
    if t > c.last_send_ns.get() {
        c.last_send_ns.set(t);
    }
    if r.is_err() {
        bump(&c.conn_errors);
    }
    r
}

/// The echo peer: every datagram goes straight back to where it came from (the relay
/// address). Runs until its runtime stops.
pub async fn echo(sock: UdpSocket, c: std::rc::Rc<Counters>) {
    let mut buf = vec![0u8; 65_536];
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        loop {
            match sock.try_recv_from(&mut buf) {
                Ok((n, from)) => match SockRef::from(&sock).send_to(&buf[..n], &from.into()) {
                    Ok(_) => bump(&c.peer_echoed),
                    Err(_) => bump(&c.peer_errors),
                },
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                // ICMP errors for datagrams to closed relay ports: reported once each.
                Err(_) => bump(&c.peer_errors),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn templates_carry_the_payload_where_echoes_are_read() {
        let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
        for framing in [Framing::Channel, Framing::Indication, Framing::Direct] {
            for tcp in [false, true] {
                let (mut f, at) = frame_template(framing, 101, tcp, peer);
                f[at..at + 4].copy_from_slice(&7u32.to_be_bytes());
                // A server would turn a Send indication into a Data indication; for the check,
                // make it one.
                if framing == Framing::Indication {
                    let t = wire::message_type(Method::DATA, Class::Indication);
                    f[..2].copy_from_slice(&t.to_be_bytes());
                }
                let p = payload_of(framing, &f).expect("parses");
                assert_eq!(p.len(), 101);
                assert_eq!(p[..4], 7u32.to_be_bytes());
                if framing == Framing::Channel && tcp {
                    assert_eq!(f.len() % 4, 0);
                }
            }
        }
    }

    #[test]
    fn phases_spread_over_the_interval() {
        let iv = Duration::from_millis(20);
        let mut v: Vec<Duration> = (0..100).map(|i| phase(i, iv)).collect();
        assert!(v.iter().all(|p| *p < iv));
        v.sort();
        v.dedup();
        assert_eq!(v.len(), 100);
    }
}
