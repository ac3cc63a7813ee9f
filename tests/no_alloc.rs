//! The relay path allocates nothing: a counting global allocator watches (1) the core relaying
//! ChannelData, Send and Data in both directions, and (2) the whole server thread (drivers,
//! tokio, core) relaying datagrams between a client and a peer over real loopback sockets.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::net::{SocketAddr, UdpSocket};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use turnserver::auth::{Users, long_term_key};
use turnserver::core::{
    ClientAction, ClientId, PeerAction, RelaySockets, Server, ServerConfig, Transport,
};
use turnserver::wire::{
    self, AttrType, Class, MessageRef, MessageWriter, Method, PROTO_UDP, TransactionId,
};

struct Counting;

/// Allocations counted per tag; a thread counts under the tag it set (0: not counted), so that
/// tests running in parallel do not see each other's allocations.
static ALLOCS: [AtomicU64; 3] = [AtomicU64::new(0), AtomicU64::new(0), AtomicU64::new(0)];
const CORE: usize = 1;
const SERVER: usize = 2;

thread_local! {
    static TAG: Cell<usize> = const { Cell::new(0) };
}

fn count() {
    let tag = TAG.try_with(|t| t.get()).unwrap_or(0);
    if tag != 0 {
        ALLOCS[tag].fetch_add(1, Ordering::Relaxed);
    }
}

fn counted(tag: usize) -> u64 {
    ALLOCS[tag].load(Ordering::Relaxed)
}

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        count();
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        count();
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

const REALM: &str = "example.org";

struct NoSockets;
impl RelaySockets for NoSockets {
    fn open(&mut self, _: SocketAddr) -> bool {
        true
    }
    fn close(&mut self, _: SocketAddr) {}
}

/// A minimal long-term-credential client state: the nonce from the last 401.
struct Signer {
    nonce: Vec<u8>,
    key: [u8; 16],
    n: u8,
}

impl Signer {
    fn request(&mut self, method: Method, add: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
        self.n += 1;
        let mut buf = vec![0u8; 512];
        let mut w = MessageWriter::new(
            &mut buf,
            method,
            Class::Request,
            &TransactionId([self.n; 12]),
        );
        add(&mut w);
        if !self.nonce.is_empty() {
            w.add(AttrType::USERNAME, b"u")
                .add(AttrType::REALM, REALM.as_bytes())
                .add(AttrType::NONCE, &self.nonce)
                .add_integrity(&self.key);
        }
        let n = w.finish().unwrap();
        buf.truncate(n);
        buf
    }
}

fn peer_addr() -> SocketAddr {
    "8.8.8.8:9000".parse().unwrap()
}

#[test]
fn core_relay_path_allocates_nothing() {
    let mut users = Users::new(REALM);
    users.add_password("u", "p");
    let relay_ip = "192.0.2.1".parse().unwrap();
    let mut s = Server::new(
        ServerConfig::new(relay_ip, Some(users)),
        [1; 32],
        1,
        Instant::now(),
    );
    let now = Instant::now();
    let client = ClientId {
        transport: Transport::Udp,
        remote: "198.51.100.1:5000".parse().unwrap(),
        local: "192.0.2.1:3478".parse().unwrap(),
    };
    let mut out = [0u8; 2048];
    let mut signer = Signer {
        nonce: Vec::new(),
        key: long_term_key("u", REALM, "p"),
        n: 0,
    };
    let mut call = |s: &mut Server, signer: &mut Signer, req: Vec<u8>| -> Vec<u8> {
        match s.handle_client(now, client, &req, &mut out, &mut NoSockets) {
            ClientAction::Reply(n) => {
                let r = out[..n].to_vec();
                if let Ok(Some(nonce)) = MessageRef::parse(&r).unwrap().nonce() {
                    signer.nonce = nonce.to_vec();
                }
                r
            }
            other => panic!("{other:?}"),
        }
    };
    let transport = |w: &mut MessageWriter| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    };
    call(&mut s, &mut signer, signer_probe());
    let req = signer.request(Method::ALLOCATE, transport);
    let r = call(&mut s, &mut signer, req);
    let relay = MessageRef::parse(&r)
        .unwrap()
        .xor_address(AttrType::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    // Without external-ip the advertised relay address is the bound one.
    let bound = peer_addr();
    let unbound: SocketAddr = "8.8.8.8:9001".parse().unwrap();
    let req = signer.request(Method::CHANNEL_BIND, |w| {
        w.add_u32(AttrType::CHANNEL_NUMBER, 0x4000 << 16)
            .add_xor_address(AttrType::XOR_PEER_ADDRESS, bound);
    });
    let r = call(&mut s, &mut signer, req);
    assert_eq!(MessageRef::parse(&r).unwrap().class(), Class::Success);

    let mut cd = vec![0x40, 0x00, 0x04, 0xB0];
    cd.extend_from_slice(&[7u8; 1200]);
    let send = {
        let mut b = vec![0u8; 2048];
        let mut w = MessageWriter::new(
            &mut b,
            Method::SEND,
            Class::Indication,
            &TransactionId([3; 12]),
        );
        w.add_xor_address(AttrType::XOR_PEER_ADDRESS, unbound)
            .add(AttrType::DATA, &[9u8; 1200]);
        let n = w.finish().unwrap();
        b.truncate(n);
        b
    };
    let mut pbuf = vec![0u8; wire::HEADROOM + 1500 + wire::TAILROOM];

    let rounds = 10_000;
    TAG.with(|t| t.set(CORE));
    let before = counted(CORE);
    let mut forwarded = 0;
    for _ in 0..rounds {
        for input in [&cd[..], &send[..]] {
            if let ClientAction::Forward { .. } =
                s.handle_client(now, client, input, &mut out, &mut NoSockets)
            {
                forwarded += 1;
            }
        }
        for from in [bound, unbound] {
            let range = wire::HEADROOM..wire::HEADROOM + 1200;
            if let PeerAction::Forward { .. } = s.handle_peer(now, relay, from, &mut pbuf, range) {
                forwarded += 1;
            }
        }
    }
    let allocs = counted(CORE) - before;
    TAG.with(|t| t.set(0));
    assert_eq!(forwarded, 4 * rounds, "every packet relayed");
    assert_eq!(allocs, 0, "{allocs} heap allocations on the relay path");
}

fn signer_probe() -> Vec<u8> {
    let mut buf = vec![0u8; 64];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::ALLOCATE,
        Class::Request,
        &TransactionId([0xEE; 12]),
    );
    w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    let n = w.finish().unwrap();
    buf.truncate(n);
    buf
}

/// The server thread, end to end: after a warm-up, relaying thousands of datagrams through the
/// UDP listener, a relay socket and the core costs no allocation on that thread.
#[test]
fn server_thread_relays_without_allocating() {
    let port = {
        let s = UdpSocket::bind("127.0.0.1:0").unwrap();
        s.local_addr().unwrap().port()
    };
    let text = format!(
        "listening-ips = [\"127.0.0.1\"]\nlistening-port = {port}\nno-tcp = true\nmin-port = 61000\nmax-port = 61999\nrealm = \"{REALM}\"\nallow-loopback-peers = true\n[users]\nu = \"p\"\n"
    );
    let cfg = turnserver::config::parse(&text).unwrap();
    let listeners = turnserver::net::Listeners::bind(&cfg).unwrap();
    let (stop, commands) = turnserver::net::control::channel();
    let server = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let local = tokio::task::LocalSet::new();
        TAG.with(|t| t.set(SERVER));
        local
            .block_on(
                &rt,
                turnserver::net::serve(
                    &cfg,
                    listeners,
                    turnserver::net::Shard::single(&cfg).unwrap(),
                    commands,
                ),
            )
            .unwrap();
        TAG.with(|t| t.set(0));
    });

    // The echo peer.
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let peer_addr = peer.local_addr().unwrap();
    let echo = std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        while let Ok((n, from)) = peer.recv_from(&mut buf) {
            let _ = peer.send_to(&buf[..n], from);
        }
    });

    let c = UdpSocket::bind("127.0.0.1:0").unwrap();
    c.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let server_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut signer = Signer {
        nonce: Vec::new(),
        key: long_term_key("u", REALM, "p"),
        n: 0,
    };
    let mut buf = [0u8; 2048];
    let mut exchange = |req: &[u8], signer: &mut Signer| -> Vec<u8> {
        c.send_to(req, server_addr).unwrap();
        let n = c.recv(&mut buf).expect("server answers");
        let r = buf[..n].to_vec();
        if let Ok(Some(nonce)) = MessageRef::parse(&r).unwrap().nonce() {
            signer.nonce = nonce.to_vec();
        }
        r
    };
    exchange(&signer_probe(), &mut signer);
    let r = exchange(
        &signer.request(Method::ALLOCATE, |w| {
            w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
        }),
        &mut signer,
    );
    assert_eq!(MessageRef::parse(&r).unwrap().class(), Class::Success);
    let r = exchange(
        &signer.request(Method::CHANNEL_BIND, |w| {
            w.add_u32(AttrType::CHANNEL_NUMBER, 0x4000 << 16)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer_addr);
        }),
        &mut signer,
    );
    assert_eq!(MessageRef::parse(&r).unwrap().class(), Class::Success);

    let mut frame = vec![0x40, 0x00, 0x00, 0xC8];
    frame.extend_from_slice(&[5u8; 200]);
    let round_trip = |count: usize| -> usize {
        let mut got = 0;
        for _ in 0..count {
            c.send_to(&frame, server_addr).unwrap();
            let mut b = [0u8; 2048];
            if let Ok(n) = c.recv(&mut b) {
                assert_eq!(
                    &b[..n],
                    &frame[..],
                    "echo comes back as the same ChannelData"
                );
                got += 1;
            }
        }
        got
    };
    // No pause after ChannelBind: the first datagrams go out on a relay socket the reactor
    // may not have polled yet, and must not be lost.
    assert_eq!(round_trip(200), 200, "warm-up");
    let before = counted(SERVER);
    let relayed = round_trip(5000);
    let allocs = counted(SERVER) - before;
    assert_eq!(relayed, 5000);
    eprintln!("server thread: {allocs} allocations for {relayed} round trips");
    // The timer loop wakes once a second; nothing else may allocate.
    assert!(
        allocs <= 5,
        "{allocs} allocations on the server thread for 10,000 relayed datagrams"
    );

    stop.shutdown();
    server.join().unwrap();
    drop(echo);
}
