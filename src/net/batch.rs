//! Datagrams relayed in one receive batch, held until the batch ends and then sent with as few
//! kernel crossings as the kernel allows: a run of same-size datagrams from one socket to one
//! destination leaves as one UDP GSO super-datagram (`UDP_SEGMENT`), which the kernel cuts
//! into the original datagrams far more cheaply than it sends them one by one.
//!
//! The [`Outbox`] owns a preallocated arena. A receive path takes the free part of the arena
//! with [`Outbox::slot`], receives a datagram into it (leaving `HEADROOM` in front for a header
//! the core may write), and, if the core forwards it, [`Outbox::push`]es the forwarded range,
//! which then stays put until [`Outbox::flush`]. A push joins the open run for its destination
//! when the run can take it (same via and destination, no larger than the run's segment size,
//! within the segment and byte limits; a shorter datagram ends the run, as GSO allows only the
//! last segment to be short). At most [`OPEN_RUNS`] destinations are followed per batch; a
//! datagram to any other goes out on its own. Order per destination is kept: runs and lone
//! datagrams are sent in the order of their first datagram, and a destination's later run only
//! starts after its earlier one ended.
//!
//! Nothing here allocates after construction.

use std::io;
use std::net::SocketAddr;
use std::ops::Range;

use crate::wire::{HEADROOM, TAILROOM};

/// Largest datagram a receive path may be handed.
pub(super) const MAX_DATAGRAM: usize = 65_535;
/// Room the arena keeps for one datagram: headroom, the largest datagram, tailroom.
const SLOT: usize = HEADROOM + MAX_DATAGRAM + TAILROOM;
/// Size of the arena: one full slot plus room for a batch of datagrams of common sizes.
const ARENA: usize = 256 * 1024;
/// Most segments the kernel takes in one GSO send (`UDP_MAX_SEGMENTS`).
const MAX_SEGMENTS: usize = 64;
/// Most bytes of payload in one GSO send: an IPv6 datagram's payload limit, less the UDP header.
const MAX_GSO_BYTES: usize = 65_535 - 8 - 40;
/// Destinations followed per batch.
pub(super) const OPEN_RUNS: usize = 8;
const NONE: u16 = u16::MAX;

/// The socket a datagram leaves by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Via {
    /// A relay socket, by its index in the relay table.
    Relay(u32),
    /// A UDP listener, by its index among the driver's UDP sockets.
    Listener(u32),
}

impl Via {
    fn kind(self) -> usize {
        match self {
            Via::Relay(_) => 0,
            Via::Listener(_) => 1,
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Item {
    via: Via,
    to: SocketAddr,
    start: u32,
    len: u32,
    /// The next datagram of this item's run, or `NONE`.
    next: u16,
    /// First datagram of a run (or alone): sent when the flush reaches it.
    head: bool,
}

/// A cheap summary of (via, destination): equal for equal pairs, so that the open runs are
/// searched by one integer comparison each.
#[inline]
fn summary(via: Via, to: SocketAddr) -> u64 {
    let v = match via {
        Via::Relay(i) => u64::from(i),
        Via::Listener(i) => u64::from(i) | 1 << 31,
    };
    let ip = match to {
        SocketAddr::V4(a) => u64::from(a.ip().to_bits()),
        SocketAddr::V6(a) => {
            let b = a.ip().to_bits();
            (b as u64) ^ ((b >> 64) as u64)
        }
    };
    ip ^ (v << 32) ^ (u64::from(to.port()) << 16)
}

#[derive(Debug, Clone, Copy)]
struct OpenRun {
    summary: u64,
    via: Via,
    to: SocketAddr,
    segment: u32,
    tail: u16,
    count: u16,
    bytes: u32,
    ended: bool,
}

/// One send the flush asks for: `segment` is `Some` for a GSO send of several datagrams.
pub(super) struct Send<'a> {
    pub via: Via,
    pub to: SocketAddr,
    pub bytes: &'a [u8],
    pub segment: Option<usize>,
}

/// Forwarded datagrams of the current batch (see the module documentation).
pub(super) struct Outbox {
    arena: Box<[u8]>,
    used: usize,
    items: Vec<Item>,
    open: Vec<OpenRun>,
    gso: Box<[u8]>,
    /// Segments per GSO send; 1 turns GSO off.
    max_segments: usize,
}

impl Outbox {
    /// An outbox that joins up to `max_segments` datagrams per send (1: none).
    pub(super) fn new(max_segments: usize) -> Self {
        Outbox {
            arena: vec![0u8; ARENA].into_boxed_slice(),
            used: 0,
            items: Vec::with_capacity(ARENA / (HEADROOM + TAILROOM)),
            open: Vec::with_capacity(OPEN_RUNS),
            gso: vec![0u8; MAX_GSO_BYTES].into_boxed_slice(),
            max_segments: max_segments.clamp(1, MAX_SEGMENTS),
        }
    }

    pub(super) fn set_max_segments(&mut self, n: usize) {
        self.max_segments = n.clamp(1, MAX_SEGMENTS);
    }

    pub(super) fn max_segments(&self) -> usize {
        self.max_segments
    }

    /// Whether datagrams wait to be sent.
    pub(super) fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Whether a slot is free; if not, flush first.
    pub(super) fn has_room(&self) -> bool {
        self.used + SLOT <= self.arena.len() && self.items.len() < self.items.capacity()
    }

    /// The free slot (call only when [`has_room`](Self::has_room)): the buffer, and the offset
    /// of the slot in it. A datagram is received at `offset + HEADROOM`.
    pub(super) fn slot(&mut self) -> (&mut [u8], usize) {
        let at = self.used;
        (&mut self.arena[..at + SLOT], at)
    }

    /// Holds `range` (of the buffer [`slot`](Self::slot) returned, within the slot) for
    /// sending by `via` to `to` at the next flush; the slot is used up.
    pub(super) fn push(&mut self, via: Via, to: SocketAddr, range: Range<usize>) {
        debug_assert!(range.start >= self.used && range.end <= self.used + SLOT);
        let idx = self.items.len() as u16;
        let len = range.len() as u32;
        let mut item = Item {
            via,
            to,
            start: range.start as u32,
            len,
            next: NONE,
            head: true,
        };
        // Keep the next slot 8-byte aligned.
        self.used = (range.end + 7) & !7;
        let max = self.max_segments as u16;
        if max == 1 {
            self.items.push(item);
            return;
        }
        let key = summary(via, to);
        if let Some(run) = self
            .open
            .iter_mut()
            .find(|r| r.summary == key && r.via == via && r.to == to)
        {
            if !run.ended
                && len <= run.segment
                && run.count < max
                && run.bytes as usize + len as usize <= MAX_GSO_BYTES
            {
                self.items[run.tail as usize].next = idx;
                item.head = false;
                run.tail = idx;
                run.count += 1;
                run.bytes += len;
                run.ended = len < run.segment;
            } else {
                *run = OpenRun::new(key, via, to, len, idx);
            }
        } else if self.open.len() < OPEN_RUNS {
            self.open.push(OpenRun::new(key, via, to, len, idx));
        }
        self.items.push(item);
    }

    /// Holds a copy of `bytes` (a datagram that was not received into the arena, such as the
    /// payload of a frame read from a TCP connection) like [`push`](Self::push). Call only when
    /// [`has_room`](Self::has_room).
    pub(super) fn push_copy(&mut self, via: Via, to: SocketAddr, bytes: &[u8]) {
        let start = self.used;
        self.arena[start..start + bytes.len()].copy_from_slice(bytes);
        self.push(via, to, start..start + bytes.len());
    }

    /// Sends everything held, in order, through `send`. A GSO send that fails for another
    /// reason than a full buffer is retried datagram by datagram. Returns the number of
    /// datagrams that could not be sent, by socket kind: relay sockets, then listeners.
    pub(super) fn flush(&mut self, mut send: impl FnMut(Send<'_>) -> io::Result<()>) -> [u64; 2] {
        let mut dropped = [0; 2];
        for i in 0..self.items.len() {
            let item = self.items[i];
            if !item.head {
                continue;
            }
            if item.next == NONE {
                let bytes = &self.arena[item.start as usize..(item.start + item.len) as usize];
                if send(Send {
                    via: item.via,
                    to: item.to,
                    bytes,
                    segment: None,
                })
                .is_err()
                {
                    dropped[item.via.kind()] += 1;
                }
                continue;
            }
            let (mut total, mut count, mut j) = (0usize, 0u64, i as u16);
            while j != NONE {
                let it = self.items[j as usize];
                let (s, n) = (it.start as usize, it.len as usize);
                self.gso[total..total + n].copy_from_slice(&self.arena[s..s + n]);
                total += n;
                count += 1;
                j = it.next;
            }
            let result = send(Send {
                via: item.via,
                to: item.to,
                bytes: &self.gso[..total],
                segment: Some(item.len as usize),
            });
            match result {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    dropped[item.via.kind()] += count;
                }
                Err(_) => {
                    // The route may not take segments this size (larger than its MTU) or
                    // the device no offload: send them one by one.
                    let seg = item.len as usize;
                    for chunk in self.gso[..total].chunks(seg) {
                        let one = Send {
                            via: item.via,
                            to: item.to,
                            bytes: chunk,
                            segment: None,
                        };
                        if send(one).is_err() {
                            dropped[item.via.kind()] += 1;
                        }
                    }
                }
            }
        }
        self.items.clear();
        self.open.clear();
        self.used = 0;
        dropped
    }
}

impl OpenRun {
    fn new(summary: u64, via: Via, to: SocketAddr, segment: u32, idx: u16) -> Self {
        OpenRun {
            summary,
            via,
            to,
            segment,
            tail: idx,
            count: 1,
            bytes: segment,
            ended: false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(port: u16) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// Pushes a datagram of `len` bytes filled with `fill`.
    fn put(out: &mut Outbox, via: Via, to: SocketAddr, len: usize, fill: u8) {
        assert!(out.has_room());
        let (buf, at) = out.slot();
        let start = at + HEADROOM;
        buf[start..start + len].fill(fill);
        out.push(via, to, start..start + len);
    }

    /// One send seen by a test: via, destination, segment size, datagrams.
    type Sent = (Via, SocketAddr, Option<usize>, Vec<Vec<u8>>);

    /// Flushes, returning every send.
    fn sends(out: &mut Outbox) -> Vec<Sent> {
        let mut v = Vec::new();
        out.flush(|s| {
            let seg = s.segment.unwrap_or(s.bytes.len());
            let parts = s.bytes.chunks(seg).map(<[u8]>::to_vec).collect();
            v.push((s.via, s.to, s.segment, parts));
            Ok(())
        });
        v
    }

    #[test]
    fn joins_same_size_datagrams_to_one_destination() {
        let mut out = Outbox::new(64);
        for k in 0..5 {
            put(&mut out, Via::Relay(1), addr(9), 100, k);
        }
        let s = sends(&mut out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].2, Some(100));
        let parts = &s[0].3;
        assert_eq!(parts.len(), 5);
        for (k, p) in parts.iter().enumerate() {
            assert_eq!(p, &vec![k as u8; 100]);
        }
        assert!(out.is_empty());
    }

    #[test]
    fn a_short_datagram_ends_a_run_and_a_longer_one_starts_the_next() {
        let mut out = Outbox::new(64);
        put(&mut out, Via::Relay(1), addr(9), 100, 1);
        put(&mut out, Via::Relay(1), addr(9), 100, 2);
        put(&mut out, Via::Relay(1), addr(9), 60, 3);
        put(&mut out, Via::Relay(1), addr(9), 60, 4);
        put(&mut out, Via::Relay(1), addr(9), 200, 5);
        let s = sends(&mut out);
        let shape: Vec<_> = s.iter().map(|x| (x.2, x.3.len())).collect();
        assert_eq!(shape, vec![(Some(100), 3), (None, 1), (None, 1)]);
        // Order within the destination is the order pushed.
        let all: Vec<u8> = s.iter().flat_map(|x| x.3.iter().map(|p| p[0])).collect();
        assert_eq!(all, vec![1, 2, 3, 4, 5]);
    }

    #[test]
    fn interleaved_destinations_each_get_their_run_in_order() {
        let mut out = Outbox::new(64);
        for k in 0..4u8 {
            put(&mut out, Via::Listener(0), addr(1), 50, k);
            put(&mut out, Via::Listener(0), addr(2), 50, 10 + k);
            put(&mut out, Via::Relay(3), addr(1), 50, 20 + k);
        }
        let s = sends(&mut out);
        assert_eq!(s.len(), 3);
        assert_eq!((s[0].0, s[0].1), (Via::Listener(0), addr(1)));
        assert_eq!((s[1].0, s[1].1), (Via::Listener(0), addr(2)));
        assert_eq!((s[2].0, s[2].1), (Via::Relay(3), addr(1)));
        let firsts: Vec<u8> = s[1].3.iter().map(|p| p[0]).collect();
        assert_eq!(firsts, vec![10, 11, 12, 13]);
    }

    #[test]
    fn beyond_the_open_runs_datagrams_go_alone_and_limits_split_runs() {
        let mut out = Outbox::new(3);
        for d in 0..OPEN_RUNS as u16 + 2 {
            put(&mut out, Via::Relay(0), addr(100 + d), 10, 0);
            put(&mut out, Via::Relay(0), addr(100 + d), 10, 0);
        }
        let s = sends(&mut out);
        // Followed destinations: one send of two; the two others: four lone sends.
        assert_eq!(s.len(), OPEN_RUNS + 4);
        assert!(s[..OPEN_RUNS].iter().all(|x| x.3.len() == 2));
        assert!(s[OPEN_RUNS..].iter().all(|x| x.2.is_none()));

        for _ in 0..7 {
            put(&mut out, Via::Relay(0), addr(1), 10, 0);
        }
        let counts: Vec<_> = sends(&mut out).iter().map(|x| x.3.len()).collect();
        assert_eq!(counts, vec![3, 3, 1]);

        out.set_max_segments(1);
        for _ in 0..3 {
            put(&mut out, Via::Relay(0), addr(1), 10, 0);
        }
        assert!(sends(&mut out).iter().all(|x| x.2.is_none()));
    }

    #[test]
    fn a_failed_gso_send_is_retried_one_by_one_and_a_full_buffer_drops() {
        let mut out = Outbox::new(64);
        for k in 0..3 {
            put(&mut out, Via::Relay(0), addr(1), 30, k);
        }
        let mut singles = Vec::new();
        let dropped = out.flush(|s| {
            if s.segment.is_some() {
                return Err(io::Error::from(io::ErrorKind::InvalidInput));
            }
            singles.push(s.bytes.to_vec());
            Ok(())
        });
        assert_eq!(dropped, [0, 0]);
        assert_eq!(singles, vec![vec![0; 30], vec![1; 30], vec![2; 30]]);

        for k in 0..3 {
            put(&mut out, Via::Relay(0), addr(1), 30, k);
        }
        let dropped = out.flush(|_| Err(io::Error::from(io::ErrorKind::WouldBlock)));
        assert_eq!(dropped, [3, 0]);
    }

    #[test]
    fn copies_join_runs_like_received_datagrams() {
        let mut out = Outbox::new(64);
        out.push_copy(Via::Relay(0), addr(1), &[7; 40]);
        put(&mut out, Via::Relay(0), addr(1), 40, 8);
        out.push_copy(Via::Relay(0), addr(1), &[9; 40]);
        let s = sends(&mut out);
        assert_eq!(s.len(), 1);
        assert_eq!(s[0].3, vec![vec![7; 40], vec![8; 40], vec![9; 40]]);
    }

    #[test]
    fn the_arena_reports_full_before_a_slot_would_overflow() {
        let mut out = Outbox::new(64);
        let mut n = 0;
        while out.has_room() {
            put(&mut out, Via::Relay(0), addr(1), 1200, 0);
            n += 1;
        }
        assert!(n > 64, "a batch of 1200-byte datagrams fits: {n}");
        let s = sends(&mut out);
        let total: usize = s.iter().map(|x| x.3.len()).sum();
        assert_eq!(total, n);
        assert!(
            s.iter()
                .all(|x| x.3.iter().map(Vec::len).sum::<usize>() <= MAX_GSO_BYTES)
        );
        assert!(out.has_room());
    }
}
