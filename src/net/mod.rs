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

pub mod dtls;
mod stream;
pub mod tls;

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;
use tokio::task::{AbortHandle, JoinSet};
use tokio_rustls::TlsAcceptor;
use tracing::{debug, info, warn};

use crate::auth::Users;
use crate::config::{Config, UserKey};
use crate::core::{
    Cidr, ClientAction, ClientId, PeerAction, RelaySockets, Server, ServerConfig, Transport,
};
use crate::wire::{HEADROOM, TAILROOM};

pub use stream::StreamConn;
use tls::CertStore;

/// Largest UDP payload, and so the largest datagram a relay or listener socket reads.
const MAX_DATAGRAM: usize = 65_535;
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
    sc
}

/// Scratch buffers shared by every receive path of a driver.
struct Buffers {
    /// Datagrams are received at `HEADROOM` so a header can be written in front.
    input: Box<[u8]>,
    reply: Box<[u8]>,
}

/// The relay sockets of a driver, indexed by port, each with the task receiving on it.
pub struct RelayTable {
    min_port: u16,
    sockets: Vec<Option<(Rc<UdpSocket>, AbortHandle)>>,
    driver: Weak<Driver>,
}

impl RelayTable {
    fn get(&self, addr: SocketAddr) -> Option<&Rc<UdpSocket>> {
        let i = addr.port().checked_sub(self.min_port)? as usize;
        self.sockets.get(i)?.as_ref().map(|(s, _)| s)
    }

    fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
        UdpSocket::from_std(bind_udp(addr)?)
    }
}

impl RelaySockets for RelayTable {
    fn open(&mut self, addr: SocketAddr) -> bool {
        let Some(i) = addr.port().checked_sub(self.min_port).map(usize::from) else {
            return false;
        };
        if i >= self.sockets.len() {
            return false;
        }
        let sock = match Self::bind(addr) {
            Ok(s) => Rc::new(s),
            Err(e) => {
                debug!(%addr, error = %e, "relay port unavailable");
                return false;
            }
        };
        let task = tokio::task::spawn_local(relay_loop(self.driver.clone(), sock.clone(), addr));
        self.sockets[i] = Some((sock, task.abort_handle()));
        true
    }

    fn close(&mut self, addr: SocketAddr) {
        let Some(i) = addr.port().checked_sub(self.min_port).map(usize::from) else {
            return;
        };
        if let Some((_, abort)) = self.sockets.get_mut(i).and_then(Option::take) {
            abort.abort();
        }
    }
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
    /// Open TCP and TLS connections (handshakes included), and the most allowed.
    connections: Cell<usize>,
    max_connections: usize,
    /// Connections closed at accept because `max-connections` was reached.
    refused_connections: Cell<u64>,
    /// How long a stream connection whose client holds an allocation may stay silent.
    idle_with_allocation: Duration,
    /// How long one whose client holds none may.
    idle_without_allocation: Duration,
    bufs: RefCell<Buffers>,
}

impl Driver {
    /// Sends a relayed frame to a client over the transport it came in on.
    fn send_to_client(&self, client: &ClientId, bytes: &[u8]) {
        match client.transport {
            Transport::Udp => {
                if let Some((_, s)) = self.udp.iter().find(|(a, _)| *a == client.local) {
                    let _ = send_udp(s, bytes, client.remote);
                }
            }
            Transport::Tcp | Transport::Tls => {
                if let Some(c) = self.streams.borrow().get(&(client.remote, client.local)) {
                    c.send(bytes);
                }
            }
            Transport::Dtls => {
                if let Some(c) = self.dtls.borrow().get(&(client.remote, client.local)) {
                    c.send(bytes);
                }
            }
        }
    }

    /// Feeds one client datagram or frame to the core and performs the action. `reply_to`
    /// sends a reply back to the client.
    fn client_input(
        &self,
        now: Instant,
        client: ClientId,
        input: &[u8],
        reply: &mut [u8],
        reply_to: impl FnOnce(&[u8]),
    ) {
        let action = {
            let mut relays = self.relays.borrow_mut();
            self.server
                .borrow_mut()
                .handle_client(now, client, input, reply, &mut *relays)
        };
        match action {
            ClientAction::None => {}
            ClientAction::Reply(n) => reply_to(&reply[..n]),
            ClientAction::Forward {
                relay,
                peer,
                payload,
            } => {
                if let Some(s) = self.relays.borrow().get(relay) {
                    let _ = send_udp(s, &input[payload], peer);
                }
            }
        }
    }

    /// Returns `true` if the batch was used up (more may be waiting).
    fn drain_udp_listener(&self, sock: &UdpSocket, local: SocketAddr) -> bool {
        let mut bufs = self.bufs.borrow_mut();
        let Buffers { input, reply } = &mut *bufs;
        let now = Instant::now();
        for _ in 0..BATCH {
            match sock.try_recv_from(&mut input[..MAX_DATAGRAM]) {
                Ok((n, remote)) => {
                    let client = ClientId {
                        transport: Transport::Udp,
                        remote,
                        local,
                    };
                    self.client_input(now, client, &input[..n], reply, |r| {
                        let _ = send_udp(sock, r, remote);
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    debug!(%local, error = %e, "udp receive error");
                    return false;
                }
            }
        }
        true
    }

    /// Returns `true` if the batch was used up (more may be waiting).
    fn drain_relay(&self, sock: &UdpSocket, relay: SocketAddr) -> bool {
        let mut bufs = self.bufs.borrow_mut();
        let buf = &mut bufs.input[..];
        let now = Instant::now();
        for _ in 0..BATCH {
            match sock.try_recv_from(&mut buf[HEADROOM..HEADROOM + MAX_DATAGRAM]) {
                Ok((n, peer)) => {
                    let action = self.server.borrow_mut().handle_peer(
                        now,
                        relay,
                        peer,
                        buf,
                        HEADROOM..HEADROOM + n,
                    );
                    if let PeerAction::Forward { client, range } = action {
                        self.send_to_client(&client, &buf[range]);
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return false,
                Err(e) => {
                    debug!(%relay, error = %e, "relay receive error");
                    return false;
                }
            }
        }
        true
    }

    fn on_timer(&self) {
        let mut relays = self.relays.borrow_mut();
        self.server
            .borrow_mut()
            .handle_timeout(Instant::now(), &mut *relays);
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

async fn udp_listener_loop(driver: Rc<Driver>, idx: usize) {
    let (local, sock) = driver.udp[idx].clone();
    loop {
        if let Err(e) = sock.readable().await {
            warn!(%local, error = %e, "udp listener failed");
            return;
        }
        if driver.drain_udp_listener(&sock, local) {
            tokio::task::yield_now().await;
        }
    }
}

/// Reloads the TLS certificate on SIGHUP, and when its files change (checked every few
/// seconds), so that renewed certificates are picked up without a restart.
async fn watch_certificates(certs: Arc<CertStore>) {
    use tokio::signal::unix::{SignalKind, signal};
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| warn!(error = %e, "cannot watch SIGHUP; certificates reload on change only"))
        .ok();
    let mut tick = tokio::time::interval(Duration::from_secs(5));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    loop {
        tokio::select! {
            Some(()) = async { match hup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => {
                certs.reload_logged("SIGHUP");
            }
            _ = tick.tick() => certs.reload_if_changed(),
        }
    }
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

fn bind_udp_listener(addr: SocketAddr) -> io::Result<std::net::UdpSocket> {
    let s = new_socket(addr, socket2::Type::DGRAM)?;
    let _ = s.set_recv_buffer_size(LISTENER_RCVBUF);
    s.bind(&addr.into())?;
    Ok(s.into())
}

fn bind_tcp(addr: SocketAddr, what: &str) -> Result<std::net::TcpListener, String> {
    let listen = || -> io::Result<std::net::TcpListener> {
        let s = new_socket(addr, socket2::Type::STREAM)?;
        s.set_reuse_address(true)?;
        s.bind(&addr.into())?;
        s.listen(1024)?;
        Ok(s.into())
    };
    listen().map_err(|e| format!("cannot listen on {what} {addr}: {e}"))
}

impl Listeners {
    /// Binds every listener of the configuration, or fails naming the address.
    pub fn bind(cfg: &Config) -> Result<Self, String> {
        let mut l = Listeners {
            udp: Vec::new(),
            tcp: Vec::new(),
            tls: Vec::new(),
            certs: match cfg.tls.as_ref().or(cfg.dtls.as_ref()) {
                Some(files) => Some(CertStore::new(
                    files.clone(),
                    cfg.tls.is_some(),
                    cfg.dtls.is_some(),
                )?),
                None => None,
            },
            dtls: Vec::new(),
        };
        for ip in &cfg.listening_ips {
            let addr = SocketAddr::new(*ip, cfg.listening_port);
            if !cfg.no_udp {
                l.udp.push(
                    bind_udp_listener(addr)
                        .map_err(|e| format!("cannot listen on udp {addr}: {e}"))?,
                );
            }
            if !cfg.no_tcp {
                l.tcp.push(bind_tcp(addr, "tcp")?);
            }
            let secure = SocketAddr::new(*ip, cfg.tls_listening_port);
            if cfg.tls.is_some() {
                l.tls.push(bind_tcp(secure, "tls")?);
            }
            if cfg.dtls.is_some() {
                // The DTLS listener binds when serving; fail now, naming the address, if it
                // cannot.
                bind_udp(secure).map_err(|e| format!("cannot listen on dtls {secure}: {e}"))?;
                l.dtls.push(secure);
            }
        }
        Ok(l)
    }
}

/// Serves until `shutdown` completes. Must run inside a `LocalSet` on a current-thread runtime.
pub async fn serve(
    cfg: &Config,
    listeners: Listeners,
    shutdown: impl std::future::Future<Output = ()>,
) -> io::Result<()> {
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| io::Error::other(e.to_string()))?;
    let mut seed = [0u8; 8];
    getrandom::fill(&mut seed).map_err(|e| io::Error::other(e.to_string()))?;
    let server = Server::new(
        server_config(cfg),
        secret,
        u64::from_le_bytes(seed),
        Instant::now(),
    );
    let mut udp = Vec::new();
    for s in listeners.udp {
        let local = s.local_addr()?;
        udp.push((local, Rc::new(UdpSocket::from_std(s)?)));
    }
    let span = (cfg.max_port - cfg.min_port) as usize + 1;
    let driver = Rc::new_cyclic(|me| Driver {
        server: RefCell::new(server),
        relays: RefCell::new(RelayTable {
            min_port: cfg.min_port,
            sockets: (0..span).map(|_| None).collect(),
            driver: me.clone(),
        }),
        udp,
        streams: RefCell::new(HashMap::new()),
        dtls: RefCell::new(HashMap::new()),
        connections: Cell::new(0),
        max_connections: cfg.max_connections as usize,
        refused_connections: Cell::new(0),
        idle_with_allocation: Duration::from_secs(u64::from(cfg.max_allocate_lifetime) + 60),
        idle_without_allocation: Duration::from_secs(u64::from(cfg.idle_connection_timeout)),
        bufs: RefCell::new(Buffers {
            input: vec![0u8; HEADROOM + MAX_DATAGRAM + TAILROOM].into_boxed_slice(),
            reply: vec![0u8; REPLY_BUF].into_boxed_slice(),
        }),
    });

    let mut tasks = JoinSet::new();
    for (i, (local, _)) in driver.udp.iter().enumerate() {
        info!(listener = %local, transport = "udp", "listening");
        tasks.spawn_local(udp_listener_loop(driver.clone(), i));
    }
    for s in listeners.tcp {
        let l = tokio::net::TcpListener::from_std(s)?;
        info!(listener = %l.local_addr()?, transport = "tcp", "listening");
        tasks.spawn_local(stream::accept_tcp(driver.clone(), l));
    }
    if let Some(certs) = &listeners.certs {
        if !listeners.tls.is_empty() {
            let acceptor = TlsAcceptor::from(certs.server_config().map_err(io::Error::other)?);
            for s in listeners.tls {
                let l = tokio::net::TcpListener::from_std(s)?;
                info!(listener = %l.local_addr()?, transport = "tls", "listening");
                tasks.spawn_local(stream::accept_tls(driver.clone(), l, acceptor.clone()));
            }
        }
        for local in listeners.dtls {
            info!(listener = %local, transport = "dtls", "listening");
            tasks.spawn_local(dtls::accept_loop(driver.clone(), local, certs.clone()));
        }
        tasks.spawn_local(watch_certificates(certs.clone()));
    }
    info!(
        relay_ips = ?cfg.relay_ips,
        min_port = cfg.min_port,
        max_port = cfg.max_port,
        "relay ports"
    );
    tasks.spawn_local(timer_loop(driver.clone()));

    shutdown.await;
    info!("shutting down");
    tasks.abort_all();
    let mut relays = driver.relays.borrow_mut();
    driver.server.borrow_mut().close_all(&mut *relays);
    Ok(())
}
