//! Tokio drivers: the sockets, the buffers, and the loops that feed the sans-IO core.
//!
//! One [`Driver`] runs on one thread (a current-thread runtime with a `LocalSet`) and owns one
//! [`Server`]. Every task on that thread shares the driver through an `Rc`; the core sits in a
//! `RefCell` that is borrowed only between awaits, so no lock is ever taken.
//!
//! Receive paths wait for readiness and then drain the socket with non-blocking reads into
//! one preallocated buffer per driver: a relay socket or a UDP listener owns no buffer of its
//! own, and a relayed packet is received, given a header in place, and sent without a copy or
//! an allocation. Sends are non-blocking too: a UDP send that would block drops the datagram
//! (as a full network would); a TCP send that would block queues whole frames up to a bound.

mod batch;
pub mod control;
pub mod dtls;
mod stream;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::auth::Users;
use crate::config::{Config, UserKey};
use crate::core::{
    Cidr, ClientAction, ClientId, NatDiscovery, PeerAction, RelaySockets, Server, ServerConfig,
    Transport,
};
use crate::wire::HEADROOM;
use batch::{MAX_DATAGRAM, Outbox, Via};

pub use control::{Command, Commands, Handle, ListenerStats, Snapshot};
pub use stream::StreamConn;
use tls::CertStore;

/// Datagrams drained from one socket per wakeup before yielding to other tasks.
const BATCH: usize = 64;
/// Size of the reply buffer: a response never carries DATA, so this bounds REALM, NONCE,
/// SOFTWARE and addresses with room to spare.
const REPLY_BUF: usize = 4096;

/// Sends a datagram now, or fails with `WouldBlock` if the socket buffer is full. This goes
/// straight to the socket: tokio's `try_send_to` refuses to try until the reactor has seen the
/// socket writable once, which loses the first datagrams sent on a relay socket created in the
/// same reactor turn. UDP sends are never awaited here, so tokio's write readiness is not needed.
#[inline]
fn send_udp(sock: &UdpSocket, buf: &[u8], to: SocketAddr) -> io::Result<usize> {
    socket2::SockRef::from(sock).send_to(buf, &to.into())
}

/// Sockets bound for port reservations (EVEN-PORT with R), shared by the drivers of a process:
/// the reservation may be redeemed by a client another driver serves, which then adopts the
/// socket.
type Parked = Arc<std::sync::Mutex<HashMap<SocketAddr, std::net::UdpSocket>>>;

/// One driver's place among the drivers of a process, and what they share: the nonce secret (a
/// nonce one driver issued is good on every other), the relay port pool, port reservations and
/// allocation quotas ([`crate::core::Shared`]), the sockets parked for reservations, and the
/// count of open connections behind `max-connections`. A relay socket, and every datagram a
/// peer sends to it, belongs to the driver that opened it.
#[derive(Debug, Clone)]
pub struct Shard {
    pub index: usize,
    secret: [u8; 32],
    shared: crate::core::Shared,
    parked: Parked,
    connections: Arc<AtomicUsize>,
}

impl Shard {
    /// `count` shards for `cfg`, sharing a fresh secret, the port pool, reservations, quotas
    /// and the connection count.
    pub fn all(count: usize, cfg: &Config) -> io::Result<Vec<Shard>> {
        let random =
            |buf: &mut [u8]| getrandom::fill(buf).map_err(|e| io::Error::other(e.to_string()));
        let mut secret = [0u8; 32];
        random(&mut secret)?;
        let mut seed = [0u8; 8];
        random(&mut seed)?;
        let shared = crate::core::Shared::new(
            cfg.min_port,
            cfg.max_port,
            u64::from_le_bytes(seed),
            Instant::now(),
        );
        let parked = Parked::default();
        let connections = Arc::new(AtomicUsize::new(0));
        let count = count.max(1);
        Ok((0..count)
            .map(|index| Shard {
                index,
                secret,
                shared: shared.clone(),
                parked: parked.clone(),
                connections: connections.clone(),
            })
            .collect())
    }

    /// The only shard of a one-driver process.
    pub fn single(cfg: &Config) -> io::Result<Shard> {
        Ok(Self::all(1, cfg)?.remove(0))
    }
}

/// Builds the core's configuration from the validated file configuration.
pub fn server_config(cfg: &Config) -> ServerConfig {
    let users = cfg.auth.then(|| {
        let mut u = Users::new(&cfg.realm);
        for (name, key) in &cfg.users {
            match key {
                UserKey::Password(p) => u.add_password(name, p),
                UserKey::Ha1(k) => u.add_key(name, *k),
            }
        }
        for secret in &cfg.auth_secrets {
            u.add_secret(secret.expose());
        }
        u
    });
    let mut sc = ServerConfig::new(cfg.relay_ips[0], users);
    sc.relay_ips = cfg.relay_ips.clone();
    sc.external_ips = cfg
        .external_ips
        .iter()
        .map(|e| (e.public, e.private))
        .collect();
    sc.software = cfg.software.clone();
    sc.fingerprint = cfg.fingerprint;
    sc.min_port = cfg.min_port;
    sc.max_port = cfg.max_port;
    sc.default_lifetime = cfg.default_allocate_lifetime;
    sc.max_lifetime = cfg.max_allocate_lifetime;
    sc.stale_nonce = cfg.stale_nonce;
    sc.allow_loopback_peers = cfg.allow_loopback_peers;
    let cidrs = |list: &[(std::net::IpAddr, u8)]| -> Vec<Cidr> {
        // The configuration checked the prefix lengths.
        list.iter().filter_map(|(a, l)| Cidr::new(*a, *l)).collect()
    };
    sc.allowed_peers = cidrs(&cfg.allowed_peer_ips);
    sc.denied_peers = cidrs(&cfg.denied_peer_ips);
    sc.user_quota = cfg.user_quota;
    sc.total_quota = cfg.total_quota;
    sc.ip_quota = cfg.ip_quota;
    sc.max_bps = cfg.max_bps;
    sc.max_permissions = cfg.max_permissions as usize;
    sc.max_channels = cfg.max_channels as usize;
    sc.alternate_servers = cfg.alternate_servers.clone();
    sc.tls_alternate_servers = cfg.tls_alternate_servers.clone();
    sc.nat_discovery = NatDiscovery {
        pairs: cfg.rfc5780().pairs,
        ports: (cfg.listening_port, cfg.alt_listening_port),
    };
    sc
}

/// Scratch buffers shared by every receive path of a driver.
struct Buffers {
    /// UDP datagrams are received into the outbox's arena (at `HEADROOM`, so a header can be
    /// written in front) and forwarded from there when the receive batch ends.
    out: Outbox,
    reply: Box<[u8]>,
    /// Frames for one TCP or TLS client gathered from a relay socket's batch, written with one
    /// send at its end.
    gather: Box<[u8]>,
}

/// Size of the gather buffer: a batch of common frames; a larger frame goes alone.
const GATHER: usize = 64 * 1024;

/// Whether `msg` (a datagram from a client) is a STUN message other than a Send indication:
/// a request may change allocations, so the datagrams held before it are sent first.
#[inline]
fn is_request(msg: &[u8]) -> bool {
    msg.len() >= 2 && msg[0] & 0xC0 == 0 && !(msg[0] == 0x00 && msg[1] == 0x16)
}

/// The relay sockets of a driver, indexed by family and port, each with the task receiving on
/// it. (A dual allocation holds one port on both families.)
pub struct RelayTable {
    min_port: u16,
    span: usize,
    /// Where each family's ports start in `sockets`, if the relay addresses have that family.
    bases: [Option<usize>; 2],
    sockets: Vec<Option<(Rc<UdpSocket>, AbortHandle)>>,
    driver: Weak<Driver>,
    parked: Parked,
}

impl RelayTable {
    /// The socket at index `i` (see [`index`](Self::index)).
    fn at(&self, i: usize) -> Option<&Rc<UdpSocket>> {
        self.sockets.get(i)?.as_ref().map(|(s, _)| s)
    }

    fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
        UdpSocket::from_std(bind_udp(addr)?)
    }
}

impl RelayTable {
    fn index(&self, addr: SocketAddr) -> Option<usize> {
        let i = usize::from(addr.port().checked_sub(self.min_port)?);
        let base = self.bases[usize::from(addr.is_ipv6())]?;
        (i < self.span).then_some(base + i)
    }

    /// Starts receiving on `sock`, the relay socket for `addr`.
    fn register(&mut self, i: usize, addr: SocketAddr, sock: UdpSocket) {
        let sock = Rc::new(sock);
        let task = tokio::task::spawn_local(relay_loop(self.driver.clone(), sock.clone(), addr));
        self.sockets[i] = Some((sock, task.abort_handle()));
    }

    fn parked(&self) -> std::sync::MutexGuard<'_, HashMap<SocketAddr, std::net::UdpSocket>> {
        self.parked.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl RelaySockets for RelayTable {
    fn open(&mut self, addr: SocketAddr) -> bool {
        let Some(i) = self.index(addr) else {
            return false;
        };
        match Self::bind(addr) {
            Ok(sock) => {
                self.register(i, addr, sock);
                true
            }
            Err(e) => {
                debug!(%addr, error = %e, "relay port unavailable");
                false
            }
        }
    }

    fn park(&mut self, addr: SocketAddr) -> bool {
        match bind_udp(addr) {
            Ok(sock) => {
                self.parked().insert(addr, sock);
                true
            }
            Err(e) => {
                debug!(%addr, error = %e, "relay port unavailable");
                false
            }
        }
    }

    fn adopt(&mut self, addr: SocketAddr) -> bool {
        let (Some(i), Some(std)) = (self.index(addr), self.parked().remove(&addr)) else {
            return false;
        };
        match UdpSocket::from_std(std) {
            Ok(sock) => {
                self.register(i, addr, sock);
                true
            }
            Err(e) => {
                debug!(%addr, error = %e, "cannot adopt a reserved relay socket");
                false
            }
        }
    }

    fn unpark(&mut self, addr: SocketAddr) {
        self.parked().remove(&addr);
    }

    fn close(&mut self, addr: SocketAddr) {
        let Some(i) = self.index(addr) else {
            return;
        };
        if let Some((_, abort)) = self.sockets[i].take() {
            abort.abort();
        }
    }
}

/// Counters of one listening socket, bumped on its receive and accept paths.
struct ListenerCounters {
    transport: Transport,
    addr: SocketAddr,
    received: Cell<u64>,
    received_bytes: Cell<u64>,
    accepted: Cell<u64>,
    refused: Cell<u64>,
}

impl ListenerCounters {
    fn new(transport: Transport, addr: SocketAddr) -> Self {
        ListenerCounters {
            transport,
            addr,
            received: Cell::new(0),
            received_bytes: Cell::new(0),
            accepted: Cell::new(0),
            refused: Cell::new(0),
        }
    }

    #[inline]
    fn count(&self, bytes: usize) {
        bump(&self.received, 1);
        bump(&self.received_bytes, bytes as u64);
    }

    fn stats(&self) -> ListenerStats {
        ListenerStats {
            transport: self.transport,
            addr: self.addr,
            received: self.received.get(),
            received_bytes: self.received_bytes.get(),
            accepted: self.accepted.get(),
            refused: self.refused.get(),
        }
    }
}

#[inline]
fn bump(c: &Cell<u64>, n: u64) {
    c.set(c.get() + n);
}

/// Everything one thread needs to serve: the core, the sockets, the buffers.
pub struct Driver {
    server: RefCell<Server>,
    relays: RefCell<RelayTable>,
    udp: Vec<(SocketAddr, Rc<UdpSocket>)>,
    /// TCP and TLS connections by (client, local) address.
    streams: RefCell<HashMap<(SocketAddr, SocketAddr), Rc<StreamConn>>>,
    /// DTLS associations by (client, local) address.
    dtls: RefCell<HashMap<(SocketAddr, SocketAddr), Rc<dtls::DtlsConn>>>,
    /// Open TCP and TLS connections (handshakes included) of every driver, and the most
    /// allowed.
    connections: Arc<AtomicUsize>,
    max_connections: Cell<usize>,
    /// How long a stream connection whose client holds an allocation may stay silent.
    idle_with_allocation: Cell<Duration>,
    /// How long one whose client holds none may.
    idle_without_allocation: Cell<Duration>,
    /// Every listening socket's counters; tasks know their listener by index.
    listeners: Vec<ListenerCounters>,
    /// Established connections (TCP, TLS) and associations (DTLS), by transport.
    open: [Cell<u64>; 4],
    /// Frames to clients dropped on a full socket buffer or send queue, by transport.
    send_dropped: [Cell<u64>; 4],
    bufs: RefCell<Buffers>,
    /// What the kernel offers for UDP segmentation offload; `None` where it offers none.
    gso: Option<quinn_udp::UdpSocketState>,
    /// GSO sends that went out, and the datagrams in them.
    gso_sends: Cell<u64>,
    gso_datagrams: Cell<u64>,
}

impl Driver {
    /// Sends `frames` relayed frames (back to back in `bytes`; one for UDP and DTLS) to a
    /// client over the transport it came in on.
    fn send_to_client(&self, client: &ClientId, bytes: &[u8], frames: u64) {
        let sent = match client.transport {
            Transport::Udp => self
                .udp
                .iter()
                .find(|(a, _)| *a == client.local)
                .is_none_or(|(_, s)| send_udp(s, bytes, client.remote).is_ok()),
            Transport::Tcp | Transport::Tls => self
                .streams
                .borrow()
                .get(&(client.remote, client.local))
                .is_none_or(|c| c.send(bytes)),
            Transport::Dtls => self
                .dtls
                .borrow()
                .get(&(client.remote, client.local))
                .is_none_or(|c| c.send(bytes)),
        };
        if !sent {
            bump(&self.send_dropped[client.transport as usize], frames);
        }
    }

    /// Applies the reloadable settings of `cfg`; returns those left as they were.
    fn reconfigure(&self, cfg: &Config) -> Vec<&'static str> {
        let ignored = self.server.borrow_mut().reconfigure(server_config(cfg));
        self.bufs
            .borrow_mut()
            .out
            .set_max_segments(gso_segments(self.gso.as_ref(), cfg));
        self.max_connections.set(cfg.max_connections as usize);
        self.idle_with_allocation.set(idle_with_allocation(cfg));
        self.idle_without_allocation
            .set(Duration::from_secs(u64::from(cfg.idle_connection_timeout)));
        ignored
    }

    /// Copies the counters and gauges.
    fn snapshot(&self) -> Snapshot {
        let server = self.server.borrow();
        let (permissions, channels) = server.permission_and_channel_count();
        Snapshot {
            core: server.stats().clone(),
            allocations: server.allocation_count() as u64,
            permissions: permissions as u64,
            channels: channels as u64,
            relay_ports_used: server.ports_in_use() as u64,
            relay_ports: server.port_capacity() as u64,
            listeners: self.listeners.iter().map(ListenerCounters::stats).collect(),
            open_connections: std::array::from_fn(|i| self.open[i].get()),
            send_dropped: std::array::from_fn(|i| self.send_dropped[i].get()),
            gso_sends: self.gso_sends.get(),
            gso_datagrams: self.gso_datagrams.get(),
        }
    }

    /// Hands one client datagram or frame to the core.
    fn core_input(
        &self,
        now: Instant,
        client: ClientId,
        input: &[u8],
        reply: &mut [u8],
    ) -> ClientAction {
        let mut relays = self.relays.borrow_mut();
        self.server
            .borrow_mut()
            .handle_client(now, client, input, reply, &mut *relays)
    }

    /// Receives one datagram from `sock` into the outbox's free slot (sending what the outbox
    /// holds first if it is full), at `HEADROOM` so that a header can be written in front: its
    /// range in [`Outbox::slot`]'s buffer and its sender. `None` once the socket is drained
    /// (or failed; `local` names it in the log).
    fn recv_slot(
        &self,
        sock: &UdpSocket,
        out: &mut Outbox,
        local: SocketAddr,
    ) -> Option<(std::ops::Range<usize>, SocketAddr)> {
        if !out.has_room() {
            self.flush(out);
        }
        let (buf, at) = out.slot();
        let start = at + HEADROOM;
        match sock.try_recv_from(&mut buf[start..start + MAX_DATAGRAM]) {
            Ok((n, from)) => Some((start..start + n, from)),
            Err(e) => {
                if e.kind() != io::ErrorKind::WouldBlock {
                    debug!(%local, error = %e, "udp receive error");
                }
                None
            }
        }
    }

    /// Feeds one frame read from a TCP, TLS or DTLS connection to the core and performs the
    /// action: a reply goes back through `reply_to`, a forwarded payload is copied into the
    /// outbox (the caller flushes it after the frames of one read).
    fn frame_input(
        &self,
        now: Instant,
        client: ClientId,
        frame: &[u8],
        bufs: &mut Buffers,
        reply_to: impl FnOnce(&[u8]),
    ) {
        let Buffers { out, reply, .. } = bufs;
        if is_request(frame) && !out.is_empty() {
            self.flush(out);
        }
        match self.core_input(now, client, frame, reply) {
            ClientAction::None => {}
            // The core sends replies elsewhere for UDP clients only: on a connection a reply
            // can only go back on it.
            ClientAction::Reply(n) | ClientAction::ReplyFrom { len: n, .. } => {
                reply_to(&reply[..n]);
            }
            ClientAction::Forward {
                relay,
                peer,
                payload,
            } => {
                let Some(i) = self.relays.borrow().index(relay) else {
                    return;
                };
                if !out.has_room() {
                    self.flush(out);
                }
                out.push_copy(Via::Relay(i as u32), peer, &frame[payload]);
            }
        }
    }

    /// Receives up to a batch of datagrams from a UDP listener and handles them; forwarded
    /// datagrams go out when the batch ends. Returns `true` if the batch was used up (more may
    /// be waiting).
    fn drain_udp_listener(&self, sock: &UdpSocket, local: SocketAddr, idx: usize) -> bool {
        let mut bufs = self.bufs.borrow_mut();
        let Buffers { out, reply, .. } = &mut *bufs;
        let now = Instant::now();
        let counters = &self.listeners[idx];
        let mut full = true;
        for _ in 0..BATCH {
            let Some((datagram, remote)) = self.recv_slot(sock, out, local) else {
                full = false;
                break;
            };
            counters.count(datagram.len());
            if is_request(&out.slot().0[datagram.clone()]) && !out.is_empty() {
                self.flush(out);
            }
            let start = datagram.start;
            let client = ClientId {
                transport: Transport::Udp,
                remote,
                local,
            };
            let action = self.core_input(now, client, &out.slot().0[datagram], reply);
            match action {
                ClientAction::None => {}
                ClientAction::Reply(len) => {
                    let _ = send_udp(sock, &reply[..len], remote);
                }
                ClientAction::ReplyFrom { len, from, to } => {
                    // An RFC 5780 response from another of this driver's listeners (the
                    // other address or port) or to another port of the client.
                    let sent = self
                        .udp
                        .iter()
                        .find(|(a, _)| *a == from)
                        .is_some_and(|(_, s)| send_udp(s, &reply[..len], to).is_ok());
                    if !sent {
                        bump(&self.send_dropped[Transport::Udp as usize], 1);
                    }
                }
                ClientAction::Forward {
                    relay,
                    peer,
                    payload,
                } => {
                    if let Some(i) = self.relays.borrow().index(relay) {
                        let range = start + payload.start..start + payload.end;
                        out.push(Via::Relay(i as u32), peer, range);
                    }
                }
            }
        }
        self.flush(out);
        full
    }

    /// Receives up to a batch of datagrams from a peer on a relay socket and forwards them to
    /// the client: to a UDP client when the batch ends, to others at once. Returns `true` if
    /// the batch was used up (more may be waiting).
    fn drain_relay(&self, sock: &UdpSocket, relay: SocketAddr) -> bool {
        let mut bufs = self.bufs.borrow_mut();
        let Buffers { out, gather, .. } = &mut *bufs;
        let now = Instant::now();
        let mut full = true;
        // A relay socket serves one allocation, so every frame for a stream client in this
        // batch goes to the same client.
        let mut gathered: Option<(ClientId, usize, u64)> = None;
        for _ in 0..BATCH {
            let Some((datagram, peer)) = self.recv_slot(sock, out, relay) else {
                full = false;
                break;
            };
            let (buf, _) = out.slot();
            let action = self
                .server
                .borrow_mut()
                .handle_peer(now, relay, peer, buf, datagram);
            let PeerAction::Forward { client, range } = action else {
                continue;
            };
            match client.transport {
                Transport::Udp => match self.udp.iter().position(|(a, _)| *a == client.local) {
                    Some(i) => out.push(Via::Listener(i as u32), client.remote, range),
                    None => bump(&self.send_dropped[Transport::Udp as usize], 1),
                },
                Transport::Tcp | Transport::Tls => {
                    let frame = &buf[range];
                    if let Some((c, len, frames)) = gathered
                        && len + frame.len() > GATHER
                    {
                        self.send_to_client(&c, &gather[..len], frames);
                        gathered = None;
                    }
                    if frame.len() > GATHER {
                        self.send_to_client(&client, frame, 1);
                        continue;
                    }
                    let (len, frames) = gathered.map_or((0, 0), |(_, len, frames)| (len, frames));
                    gather[len..len + frame.len()].copy_from_slice(frame);
                    gathered = Some((client, len + frame.len(), frames + 1));
                }
                Transport::Dtls => self.send_to_client(&client, &buf[range], 1),
            }
        }
        if let Some((client, len, frames)) = gathered {
            self.send_to_client(&client, &gather[..len], frames);
        }
        self.flush(out);
        full
    }

    /// Sends the datagrams the outbox holds.
    fn flush(&self, out: &mut Outbox) {
        if out.is_empty() {
            return;
        }
        let relays = self.relays.borrow();
        let [_, to_clients] = out.flush(|s| {
            let sock = match s.via {
                Via::Relay(i) => relays.at(i as usize),
                Via::Listener(i) => self.udp.get(i as usize).map(|(_, s)| s),
            };
            let Some(sock) = sock else {
                return Ok(());
            };
            match (s.segment, &self.gso) {
                (Some(segment), Some(state)) => {
                    let transmit = quinn_udp::Transmit {
                        destination: s.to,
                        ecn: None,
                        contents: s.bytes,
                        segment_size: Some(segment),
                        src_ip: None,
                    };
                    let sent = state.try_send((&**sock).into(), &transmit);
                    if sent.is_ok() {
                        bump(&self.gso_sends, 1);
                        bump(&self.gso_datagrams, s.bytes.len().div_ceil(segment) as u64);
                    }
                    sent
                }
                (Some(_), None) => Err(io::ErrorKind::Unsupported.into()),
                (None, _) => send_udp(sock, s.bytes, s.to).map(drop),
            }
        });
        bump(&self.send_dropped[Transport::Udp as usize], to_clients);
    }

    fn on_timer(&self) {
        let mut relays = self.relays.borrow_mut();
        self.server
            .borrow_mut()
            .handle_timeout(Instant::now(), &mut *relays);
    }
}

/// Asks the kernel what UDP segmentation offload it offers, on a scratch socket (the state
/// holds no socket; setting it up changes options of the socket it is given, which is why it
/// is not one of ours). Any UDP socket may then send a GSO run through it.
fn probe_gso() -> Option<quinn_udp::UdpSocketState> {
    let scratch = ["127.0.0.1:0", "[::1]:0", "0.0.0.0:0", "[::]:0"]
        .iter()
        .find_map(|a| std::net::UdpSocket::bind(a).ok())?;
    let state = quinn_udp::UdpSocketState::new((&scratch).into()).ok()?;
    (state.max_gso_segments() > 1).then_some(state)
}

/// Datagrams per send for the outbox: the kernel's limit, or 1 (no GSO) when it has none or
/// `udp-gso` is off.
fn gso_segments(gso: Option<&quinn_udp::UdpSocketState>, cfg: &Config) -> usize {
    match gso {
        Some(state) if cfg.udp_gso => state.max_gso_segments(),
        _ => 1,
    }
}

async fn relay_loop(driver: Weak<Driver>, sock: Rc<UdpSocket>, relay: SocketAddr) {
    loop {
        if sock.readable().await.is_err() {
            return;
        }
        let Some(d) = driver.upgrade() else { return };
        if d.drain_relay(&sock, relay) {
            // A full batch: let the listeners and other relays run before the next one.
            drop(d);
            tokio::task::yield_now().await;
        }
    }
}

/// Receives on the UDP listener `udp` (an index into the driver's UDP sockets), counted as
/// listener `idx`.
async fn udp_listener_loop(driver: Rc<Driver>, udp: usize, idx: usize) {
    let (local, sock) = driver.udp[udp].clone();
    loop {
        if let Err(e) = sock.readable().await {
            warn!(%local, error = %e, "udp listener failed");
            return;
        }
        if driver.drain_udp_listener(&sock, local, idx) {
            tokio::task::yield_now().await;
        }
    }
}

/// Reloads the TLS certificate when its files change (checked every few seconds), so that
/// renewed certificates are picked up without a restart. (SIGHUP reloads them too: see the
/// binary's signal handling.)
async fn watch_certificates(certs: Arc<CertStore>) {
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tick.tick().await;
        certs.reload_if_changed();
    }
}

/// How long a stream connection or DTLS association whose client holds an allocation may stay
/// silent: longer than any allocation lifetime, since a Refresh comes within one.
fn idle_with_allocation(cfg: &Config) -> Duration {
    Duration::from_secs(u64::from(cfg.max_allocate_lifetime) + 60)
}

async fn timer_loop(driver: Rc<Driver>) {
    loop {
        let next = driver.server.borrow().poll_timeout();
        let cap = Instant::now() + Duration::from_secs(1);
        let wake = next.map_or(cap, |t| t.min(cap));
        tokio::time::sleep_until(tokio::time::Instant::from_std(wake)).await;
        driver.on_timer();
    }
}

/// A bound set of listeners, ready to serve, with the TLS certificate when TLS is on.
pub struct Listeners {
    udp: Vec<std::net::UdpSocket>,
    tcp: Vec<std::net::TcpListener>,
    tls: Vec<std::net::TcpListener>,
    /// The certificate for TLS and DTLS.
    certs: Option<Arc<CertStore>>,
    /// DTLS addresses (checked free at bind time; the DTLS listener binds them when serving).
    dtls: Vec<SocketAddr>,
}

/// A socket of `addr`'s family, non-blocking, IPv6 sockets IPv6-only (an IPv4 client on a
/// dual-stack socket would be seen as `::ffff:a.b.c.d` and get IPv6 addresses back).
fn new_socket(addr: SocketAddr, ty: socket2::Type) -> io::Result<socket2::Socket> {
    let s = socket2::Socket::new(socket2::Domain::for_address(addr), ty, None)?;
    if addr.is_ipv6() {
        s.set_only_v6(true)?;
    }
    s.set_nonblocking(true)?;
    Ok(s)
}

fn bind_udp(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = new_socket(addr, socket2::Type::DGRAM)?;
    s.bind(&addr.into())?;
    Ok(s.into())
}

/// Receive buffer asked for on UDP listeners: every client's datagrams arrive on them, and a
/// burst beyond the kernel's default (about 200 KiB) would be dropped before the server sees it.
/// The kernel caps the request at `net.core.rmem_max`.
const LISTENER_RCVBUF: usize = 4 << 20;

/// `count` UDP listeners on `addr`: one socket, or `count` sockets with `SO_REUSEPORT` among
/// which the kernel spreads clients by their address and port (so a client's datagrams always
/// reach the same driver).
fn bind_udp_listeners(addr: SocketAddr, count: usize) -> io::Result<Vec<std::net::UdpSocket>> {
    if count > 1 {
        // SO_REUSEPORT would also share the port with another process of this user: check
        // first that nobody holds it.
        drop(bind_udp(addr)?);
    }
    (0..count)
        .map(|_| {
            let s = new_socket(addr, socket2::Type::DGRAM)?;
            let _ = s.set_recv_buffer_size(LISTENER_RCVBUF);
            if count > 1 {
                s.set_reuse_port(true)?;
            }
            s.bind(&addr.into())?;
            Ok(s.into())
        })
        .collect()
}

/// `count` TCP listeners on `addr`, with `SO_REUSEPORT` when more than one (the kernel then
/// spreads connections among them).
fn bind_tcp_listeners(
    addr: SocketAddr,
    what: &str,
    count: usize,
) -> Result<Vec<std::net::TcpListener>, String> {
    let listen = |reuse_port: bool| -> io::Result<std::net::TcpListener> {
        let s = new_socket(addr, socket2::Type::STREAM)?;
        s.set_reuse_address(true)?;
        if reuse_port {
            s.set_reuse_port(true)?;
        }
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    let all = || -> io::Result<Vec<std::net::TcpListener>> {
        if count == 1 {
            return Ok(vec![listen(false)?]);
        }
        // As for UDP: fail if anyone listens there already.
        drop(listen(false)?);
        (0..count).map(|_| listen(true)).collect()
    };
    all().map_err(|e| format!("cannot listen on {what} {addr}: {e}"))
}

impl Listeners {
    /// The certificate store for TLS and DTLS, when either is on (to reload it on SIGHUP).
    pub fn certificates(&self) -> Option<Arc<CertStore>> {
        self.certs.clone()
    }

    /// Binds every listener of the configuration for one driver, or fails naming the address.
    pub fn bind(cfg: &Config) -> Result<Self, String> {
        Ok(Self::bind_all(cfg, 1)?.remove(0))
    }

    /// Binds every listener of the configuration for `count` drivers: UDP, TCP and TLS
    /// listeners for each (sharing their addresses through `SO_REUSEPORT`), DTLS on the first
    /// only (its listener cannot share a port). Fails naming the address.
    pub fn bind_all(cfg: &Config, count: usize) -> Result<Vec<Self>, String> {
        let count = count.max(1);
        let certs = match cfg.tls.as_ref().or(cfg.dtls.as_ref()) {
            Some(files) => Some(CertStore::new(
                files.clone(),
                cfg.tls.is_some(),
                cfg.dtls.is_some(),
            )?),
            None => None,
        };
        let mut all: Vec<Listeners> = (0..count)
            .map(|_| Listeners {
                udp: Vec::new(),
                tcp: Vec::new(),
                tls: Vec::new(),
                certs: certs.clone(),
                dtls: Vec::new(),
            })
            .collect();
        for ip in &cfg.listening_ips {
            let addr = SocketAddr::new(*ip, cfg.listening_port);
            if !cfg.no_udp {
                let socks = bind_udp_listeners(addr, count)
                    .map_err(|e| format!("cannot listen on udp {addr}: {e}"))?;
                for (l, s) in all.iter_mut().zip(socks) {
                    l.udp.push(s);
                }
            }
            if !cfg.no_tcp {
                for (l, s) in all.iter_mut().zip(bind_tcp_listeners(addr, "tcp", count)?) {
                    l.tcp.push(s);
                }
            }
            let secure = SocketAddr::new(*ip, cfg.tls_listening_port);
            if cfg.tls.is_some() {
                for (l, s) in all
                    .iter_mut()
                    .zip(bind_tcp_listeners(secure, "tls", count)?)
                {
                    l.tls.push(s);
                }
            }
            if cfg.dtls.is_some() {
                // The DTLS listener binds when serving; fail now, naming the address, if it
                // cannot.
                bind_udp(secure).map_err(|e| format!("cannot listen on dtls {secure}: {e}"))?;
                all[0].dtls.push(secure);
            }
        }
        // RFC 5780: the second port on each address of a pair, a UDP listener like the first.
        for ip in cfg.rfc5780().pairs.iter().flat_map(|&(a, b)| [a, b]) {
            let addr = SocketAddr::new(ip, cfg.alt_listening_port);
            let socks = bind_udp_listeners(addr, count).map_err(|e| {
                format!("cannot listen on udp {addr} (alt-listening-port, RFC 5780): {e}")
            })?;
            for (l, s) in all.iter_mut().zip(socks) {
                l.udp.push(s);
            }
        }
        Ok(all)
    }
}

/// How long shutdown waits for stream connections to flush and close (a TLS close_notify).
const CLOSE_GRACE: Duration = Duration::from_secs(1);

/// Serves until a [`Command::Shutdown`] arrives (or every [`Handle`] is dropped), answering the
/// other commands between packets. Must run inside a `LocalSet` on a current-thread runtime.
///
/// Shutdown closes the listening sockets first (new TCP connections are refused, UDP listeners
/// are no longer read), then deletes every allocation (relay sockets close), then closes every
/// connection, waiting at most [`CLOSE_GRACE`] for their last writes.
pub async fn serve(
    cfg: &Config,
    listeners: Listeners,
    shard: Shard,
    mut commands: Commands,
) -> io::Result<()> {
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
    let server = Server::new(
        server_config(cfg),
        shard.secret,
        u64::from_le_bytes(seed),
        Instant::now(),
    )
    .with_shared(shard.shared.clone());
    let mut counters = Vec::new();
    let mut udp = Vec::new();
    for s in listeners.udp {
        let local = s.local_addr()?;
        counters.push(ListenerCounters::new(Transport::Udp, local));
        udp.push((local, Rc::new(UdpSocket::from_std(s)?)));
    }
    let mut tcp = Vec::new();
    for s in listeners.tcp {
        let l = tokio::net::TcpListener::from_std(s)?;
        counters.push(ListenerCounters::new(Transport::Tcp, l.local_addr()?));
        tcp.push((counters.len() - 1, l));
    }
    let mut tls = Vec::new();
    for s in listeners.tls {
        let l = tokio::net::TcpListener::from_std(s)?;
        counters.push(ListenerCounters::new(Transport::Tls, l.local_addr()?));
        tls.push((counters.len() - 1, l));
    }
    let mut dtls = Vec::new();
    for local in listeners.dtls {
        counters.push(ListenerCounters::new(Transport::Dtls, local));
        dtls.push((counters.len() - 1, local));
    }
    let span = (cfg.max_port - cfg.min_port) as usize + 1;
    let has_v4 = cfg.relay_ips.iter().any(IpAddr::is_ipv4);
    let has_v6 = cfg.relay_ips.iter().any(IpAddr::is_ipv6);
    let bases = [
        has_v4.then_some(0),
        has_v6.then_some(if has_v4 { span } else { 0 }),
    ];
    let families = usize::from(has_v4) + usize::from(has_v6);
    let gso = probe_gso();
    let driver = Rc::new_cyclic(|me| Driver {
        server: RefCell::new(server),
        relays: RefCell::new(RelayTable {
            min_port: cfg.min_port,
            span,
            bases,
            sockets: (0..span * families).map(|_| None).collect(),
            driver: me.clone(),
            parked: shard.parked.clone(),
        }),
        udp,
        streams: RefCell::new(HashMap::new()),
        dtls: RefCell::new(HashMap::new()),
        connections: shard.connections.clone(),
        max_connections: Cell::new(cfg.max_connections as usize),
        idle_with_allocation: Cell::new(idle_with_allocation(cfg)),
        idle_without_allocation: Cell::new(Duration::from_secs(u64::from(
            cfg.idle_connection_timeout,
        ))),
        listeners: counters,
        open: Default::default(),
        send_dropped: Default::default(),
        bufs: RefCell::new(Buffers {
            out: Outbox::new(gso_segments(gso.as_ref(), cfg)),
            reply: vec![0u8; REPLY_BUF].into_boxed_slice(),
            gather: vec![0u8; GATHER].into_boxed_slice(),
        }),
        gso,
        gso_sends: Cell::new(0),
        gso_datagrams: Cell::new(0),
    });

    // Tasks that take in new work (closed first at shutdown), and the rest.
    let mut accepting = JoinSet::new();
    let mut background = JoinSet::new();
    for (i, (local, _)) in driver.udp.iter().enumerate() {
        info!(listener = %local, transport = "udp", "listening");
        accepting.spawn_local(udp_listener_loop(driver.clone(), i, i));
    }
    for (idx, l) in tcp {
        info!(listener = %l.local_addr()?, transport = "tcp", "listening");
        accepting.spawn_local(stream::accept_tcp(driver.clone(), l, idx));
    }
    if let Some(certs) = &listeners.certs {
        if !tls.is_empty() {
            let acceptor = TlsAcceptor::from(certs.server_config().map_err(io::Error::other)?);
            for (idx, l) in tls {
                info!(listener = %l.local_addr()?, transport = "tls", "listening");
                accepting.spawn_local(stream::accept_tls(driver.clone(), l, idx, acceptor.clone()));
            }
        }
        for (idx, local) in dtls {
            info!(listener = %local, transport = "dtls", "listening");
            accepting.spawn_local(dtls::accept_loop(driver.clone(), local, idx, certs.clone()));
        }
        background.spawn_local(watch_certificates(certs.clone()));
    }
    info!(
        relay_ips = ?cfg.relay_ips,
        min_port = cfg.min_port,
        max_port = cfg.max_port,
        worker = shard.index,
        gso_segments = driver.bufs.borrow().out.max_segments(),
        "relay ports"
    );
    background.spawn_local(timer_loop(driver.clone()));

    loop {
        match commands.recv().await {
            Some(Command::Reconfigure(cfg, done)) => {
                let _ = done.send(driver.reconfigure(&cfg));
            }
            Some(Command::Snapshot(out)) => {
                let _ = out.send(driver.snapshot());
            }
            Some(Command::Ping(out)) => {
                let _ = out.send(());
            }
            Some(Command::Shutdown) | None => break,
        }
    }

    let started = Instant::now();
    accepting.abort_all();
    while accepting.join_next().await.is_some() {}
    let allocations = driver.server.borrow().allocation_count();
    {
        let mut relays = driver.relays.borrow_mut();
        driver.server.borrow_mut().close_all(&mut *relays);
    }
    background.abort_all();
    let conns: Vec<Rc<StreamConn>> = driver.streams.borrow().values().cloned().collect();
    let associations: Vec<Rc<dtls::DtlsConn>> = driver.dtls.borrow().values().cloned().collect();
    conns.iter().for_each(|c| c.close());
    associations.iter().for_each(|c| c.close());
    let deadline = tokio::time::Instant::now() + CLOSE_GRACE;
    while conns.iter().any(|c| !c.finished()) && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    info!(
        allocations,
        connections = conns.len() + associations.len(),
        elapsed_ms = started.elapsed().as_millis() as u64,
        "stopped: listeners closed, allocations deleted, connections closed"
    );
    Ok(())
}
