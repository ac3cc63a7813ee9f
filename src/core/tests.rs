//! Core scenarios on a fake clock: requests are built with the codec, fed to the server with an
//! explicit `now`, and the responses are parsed and checked attribute by attribute.

use super::*;
use crate::auth::long_term_key;
use crate::wire::{MessageRef, PROTO_TCP};
use std::collections::HashSet;

const REALM: &str = "example.org";
const USER: &str = "alice";
const PASS: &str = "secret";

#[derive(Default)]
struct FakeRelays {
    open: HashSet<SocketAddr>,
    /// Ports that fail to bind, as if another program held them.
    taken: HashSet<u16>,
    closed: Vec<SocketAddr>,
}

impl RelaySockets for FakeRelays {
    fn open(&mut self, addr: SocketAddr) -> bool {
        if self.taken.contains(&addr.port()) {
            return false;
        }
        assert!(self.open.insert(addr), "{addr} opened twice");
        true
    }
    fn close(&mut self, addr: SocketAddr) {
        assert!(self.open.remove(&addr), "{addr} closed but not open");
        self.closed.push(addr);
    }
}

struct H {
    s: Server,
    relays: FakeRelays,
    t0: Instant,
    now: Instant,
    nonce: Vec<u8>,
    /// The client the nonce was issued to (nonces are bound to the source address and port).
    nonce_for: Option<SocketAddr>,
    txn: u8,
}

fn relay_ip() -> IpAddr {
    "192.0.2.10".parse().unwrap()
}

fn cfg() -> ServerConfig {
    let mut users = Users::new(REALM);
    users.add_password(USER, PASS);
    users.add_password("bob", "builder");
    let mut c = ServerConfig::new(relay_ip(), Some(users));
    c.min_port = 50000;
    c.max_port = 50099;
    c
}

fn client(port: u16) -> ClientId {
    ClientId {
        transport: Transport::Udp,
        remote: SocketAddr::from(([198, 51, 100, 1], port)),
        local: SocketAddr::from(([192, 0, 2, 1], 3478)),
    }
}

fn tcp_client(port: u16) -> ClientId {
    ClientId {
        transport: Transport::Tcp,
        ..client(port)
    }
}

fn key() -> [u8; 16] {
    long_term_key(USER, REALM, PASS)
}

/// Owned copy of a response for inspection.
struct Resp(Vec<u8>);

impl Resp {
    fn msg(&self) -> MessageRef<'_> {
        MessageRef::parse(&self.0).expect("response parses")
    }
    fn code(&self) -> Option<u16> {
        self.msg().error_code().unwrap().map(|(c, _)| c)
    }
    fn class(&self) -> Class {
        self.msg().class()
    }
}

impl H {
    fn new() -> Self {
        Self::with(cfg())
    }

    fn with(c: ServerConfig) -> Self {
        let t0 = Instant::now();
        H {
            s: Server::new(c, [7; 32], 42, t0),
            relays: FakeRelays::default(),
            t0,
            now: t0,
            nonce: Vec::new(),
            nonce_for: None,
            txn: 0,
        }
    }

    fn advance(&mut self, secs: u64) {
        self.now += Duration::from_secs(secs);
        self.s.handle_timeout(self.now, &mut self.relays);
        self.s.check_invariants().unwrap();
    }

    fn at(&self) -> u64 {
        self.now.duration_since(self.t0).as_secs()
    }

    fn txid(&mut self) -> TransactionId {
        self.txn = self.txn.wrapping_add(1);
        TransactionId([self.txn; 12])
    }

    /// Builds a request; with `user` set it carries USERNAME, REALM, the last NONCE and
    /// MESSAGE-INTEGRITY under that user's key.
    fn build(
        &mut self,
        method: Method,
        txid: TransactionId,
        user: Option<(&str, &str)>,
        add: impl FnOnce(&mut MessageWriter),
    ) -> Vec<u8> {
        let mut buf = vec![0u8; 1024];
        let mut w = MessageWriter::new(&mut buf, method, Class::Request, &txid);
        add(&mut w);
        if let Some((u, p)) = user {
            w.add(AttrType::USERNAME, u.as_bytes())
                .add(AttrType::REALM, REALM.as_bytes())
                .add(AttrType::NONCE, &self.nonce)
                .add_integrity(&long_term_key(u, REALM, p));
        }
        w.add_fingerprint();
        let n = w.finish().unwrap();
        buf.truncate(n);
        buf
    }

    fn send(&mut self, c: ClientId, input: &[u8]) -> ClientAction {
        let mut out = [0u8; 2048];
        let a = self
            .s
            .handle_client(self.now, c, input, &mut out, &mut self.relays);
        self.s.check_invariants().unwrap();
        a
    }

    fn request(&mut self, c: ClientId, input: &[u8]) -> Resp {
        let mut out = [0u8; 2048];
        let a = self
            .s
            .handle_client(self.now, c, input, &mut out, &mut self.relays);
        self.s.check_invariants().unwrap();
        match a {
            ClientAction::Reply(n) => {
                let r = Resp(out[..n].to_vec());
                let m = r.msg();
                assert_eq!(m.transaction_id().0, input[8..20]);
                assert_eq!(m.fingerprint_valid(), Some(true));
                if let Ok(Some(n)) = m.nonce() {
                    self.nonce = n.to_vec();
                    self.nonce_for = Some(c.remote);
                }
                r
            }
            other => panic!("expected a reply, got {other:?}"),
        }
    }

    /// An unauthenticated request from `c`: its 401 carries a nonce for `c`.
    fn probe(&mut self, c: ClientId) {
        let t = self.txid();
        let probe = self.build(Method::ALLOCATE, t, None, |_| {});
        let r = self.request(c, &probe);
        assert_eq!(r.code(), Some(401));
    }

    /// An authenticated request as `alice`, after fetching a nonce for `c` if needed.
    fn auth(&mut self, c: ClientId, method: Method, add: impl FnOnce(&mut MessageWriter)) -> Resp {
        self.auth_as(c, method, (USER, PASS), add)
    }

    fn auth_as(
        &mut self,
        c: ClientId,
        method: Method,
        user: (&str, &str),
        add: impl FnOnce(&mut MessageWriter),
    ) -> Resp {
        if self.nonce_for != Some(c.remote) {
            self.probe(c);
        }
        let t = self.txid();
        let req = self.build(method, t, Some(user), add);
        let r = self.request(c, &req);
        if r.code() == Some(438) {
            // Like a real client: retry once, in a new transaction, with the fresh nonce.
            let mut req = req;
            let t = self.txid();
            req[8..20].copy_from_slice(&t.0);
            return self.rebuild_and_send(c, &req, user);
        }
        r
    }

    /// Re-signs `req` with the current nonce and sends it.
    fn rebuild_and_send(&mut self, c: ClientId, req: &[u8], user: (&str, &str)) -> Resp {
        let m = MessageRef::parse(req).unwrap();
        let mut buf = vec![0u8; 1024];
        let mut w = MessageWriter::new(&mut buf, m.method(), Class::Request, m.transaction_id());
        for (t, v) in m.attributes() {
            if ![AttrType::USERNAME, AttrType::REALM, AttrType::NONCE].contains(&t) {
                w.add(t, v);
            }
        }
        w.add(AttrType::USERNAME, user.0.as_bytes())
            .add(AttrType::REALM, REALM.as_bytes())
            .add(AttrType::NONCE, &self.nonce)
            .add_integrity(&long_term_key(user.0, REALM, user.1))
            .add_fingerprint();
        let n = w.finish().unwrap();
        buf.truncate(n);
        self.request(c, &buf)
    }

    fn allocate(&mut self, c: ClientId) -> Resp {
        self.auth(c, Method::ALLOCATE, |w| {
            w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
        })
    }

    fn allocate_ok(&mut self, c: ClientId) -> SocketAddr {
        let r = self.allocate(c);
        assert_eq!(r.class(), Class::Success, "allocate failed: {:?}", r.code());
        assert!(r.msg().verify_integrity(&key()));
        r.msg()
            .xor_address(AttrType::XOR_RELAYED_ADDRESS)
            .unwrap()
            .unwrap()
    }

    fn permit(&mut self, c: ClientId, peer: SocketAddr) -> Resp {
        self.auth(c, Method::CREATE_PERMISSION, |w| {
            w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        })
    }

    fn bind(&mut self, c: ClientId, number: u16, peer: SocketAddr) -> Resp {
        self.auth(c, Method::CHANNEL_BIND, |w| {
            w.add_u32(AttrType::CHANNEL_NUMBER, (number as u32) << 16)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        })
    }

    fn refresh(&mut self, c: ClientId, lifetime: Option<u32>) -> Resp {
        self.auth(c, Method::REFRESH, |w| {
            if let Some(l) = lifetime {
                w.add_u32(AttrType::LIFETIME, l);
            }
        })
    }

    fn send_indication(&mut self, c: ClientId, peer: SocketAddr, data: &[u8]) -> ClientAction {
        let mut buf = vec![0u8; 2048];
        let t = self.txid();
        let mut w = MessageWriter::new(&mut buf, Method::SEND, Class::Indication, &t);
        w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer)
            .add(AttrType::DATA, data);
        let n = w.finish().unwrap();
        buf.truncate(n);
        let a = self.send(c, &buf);
        if let ClientAction::Forward { payload, .. } = &a {
            assert_eq!(&buf[payload.clone()], data);
        }
        a
    }

    fn channel_data(&mut self, c: ClientId, number: u16, data: &[u8]) -> ClientAction {
        let mut buf = number.to_be_bytes().to_vec();
        buf.extend_from_slice(&(data.len() as u16).to_be_bytes());
        buf.extend_from_slice(data);
        let a = self.send(c, &buf);
        if let ClientAction::Forward { payload, .. } = &a {
            assert_eq!(&buf[payload.clone()], data);
        }
        a
    }

    /// A datagram from `peer` arriving at `relay`; returns the bytes for the client.
    fn peer_sends(
        &mut self,
        relay: SocketAddr,
        peer: SocketAddr,
        data: &[u8],
    ) -> Option<(ClientId, Vec<u8>)> {
        let mut buf = vec![0u8; wire::HEADROOM + data.len() + wire::TAILROOM];
        buf[wire::HEADROOM..wire::HEADROOM + data.len()].copy_from_slice(data);
        let range = wire::HEADROOM..wire::HEADROOM + data.len();
        match self.s.handle_peer(self.now, relay, peer, &mut buf, range) {
            PeerAction::Forward { client, range } => Some((client, buf[range].to_vec())),
            PeerAction::None => None,
        }
    }
}

fn peer() -> SocketAddr {
    "203.0.113.5:7000".parse().unwrap()
}

/// A public peer (documentation ranges are refused by the default policy).
fn public_peer(port: u16) -> SocketAddr {
    SocketAddr::from(([8, 8, 4, 4], port))
}

/// Public peers on distinct IP addresses.
fn other_peer(i: u8) -> SocketAddr {
    SocketAddr::from(([9, 9, 9, i], 7000))
}

#[test]
fn unauthenticated_allocate_gets_401_with_realm_and_nonce_then_succeeds() {
    let mut h = H::new();
    let t = h.txid();
    let req = h.build(Method::ALLOCATE, t, None, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    });
    let r = h.request(client(1000), &req);
    assert_eq!(r.code(), Some(401));
    let m = r.msg();
    assert_eq!(m.realm().unwrap(), Some(REALM));
    assert!(m.nonce().unwrap().is_some_and(|n| n.len() == NONCE_LEN));
    assert_eq!(
        m.integrity(),
        None,
        "a challenge carries no MESSAGE-INTEGRITY"
    );
    assert_eq!(h.s.allocation_count(), 0);

    let relay = h.allocate_ok(client(1000));
    assert_eq!(relay.ip(), relay_ip());
    assert!((50000..=50099).contains(&relay.port()));
    assert!(h.relays.open.contains(&relay));
    let r = h.allocate(client(1001));
    let m = r.msg();
    assert_eq!(m.lifetime().unwrap(), Some(600));
    assert_eq!(
        m.xor_address(AttrType::XOR_MAPPED_ADDRESS).unwrap(),
        Some(client(1001).remote)
    );
    assert_eq!(m.software().unwrap(), Some(h.s.config().software.as_str()));
    assert_eq!(h.s.allocation_count(), 2);
    assert_eq!(h.s.stats().allocations_created, 2);
}

#[test]
fn wrong_password_gets_401_and_no_allocation() {
    let mut h = H::new();
    let r = h.auth_as(client(1), Method::ALLOCATE, (USER, "nope"), |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    });
    assert_eq!(r.code(), Some(401));
    assert_eq!(r.msg().integrity(), None);
    let r = h.auth_as(client(1), Method::ALLOCATE, ("mallory", "x"), |_| {});
    assert_eq!(r.code(), Some(401));
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.s.stats().auth_failures, 2);
    assert!(h.relays.open.is_empty());
}

#[test]
fn integrity_without_username_is_400() {
    let mut h = H::new();
    let t = h.txid();
    let req = h.build(Method::ALLOCATE, t, None, |w| {
        w.add(AttrType::REALM, REALM.as_bytes())
            .add_integrity(&key());
    });
    let r = h.request(client(1), &req);
    assert_eq!(r.code(), Some(400));
    assert_eq!(r.msg().nonce().unwrap(), None);
}

#[test]
fn expired_nonce_gets_438_and_a_fresh_nonce_works() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    h.refresh(client(1), Some(3600));
    let old = h.nonce.clone();
    h.advance(601);
    let t = h.txid();
    let req = h.build(Method::REFRESH, t, Some((USER, PASS)), |w| {
        w.add_u32(AttrType::LIFETIME, 600);
    });
    let r = h.request(client(1), &req);
    assert_eq!(r.code(), Some(438));
    assert_eq!(r.msg().realm().unwrap(), Some(REALM));
    assert_ne!(h.nonce, old, "438 carries a new nonce");
    let r = h.refresh(client(1), Some(600));
    assert_eq!(r.class(), Class::Success);
    // A nonce issued to another address is stale for this one.
    let elsewhere = ClientId {
        remote: "198.51.100.2:1".parse().unwrap(),
        ..client(1)
    };
    let t = h.txid();
    let req = h.build(Method::REFRESH, t, Some((USER, PASS)), |_| {});
    assert_eq!(h.request(elsewhere, &req).code(), Some(438));
    // So is a nonce issued to another port of the same address (RFC 8489 9.2.4).
    h.probe(client(1));
    let t = h.txid();
    let req = h.build(Method::REFRESH, t, Some((USER, PASS)), |_| {});
    assert_eq!(h.request(client(2), &req).code(), Some(438));
}

#[test]
fn allocation_mismatch_and_retransmission() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    h.probe(client(2));
    let t = h.txid();
    let req = h.build(Method::ALLOCATE, t, Some((USER, PASS)), |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    });
    let first = h.request(client(2), &req);
    assert_eq!(first.class(), Class::Success);
    // The same request again (a retransmission) gets the same allocation.
    let again = h.request(client(2), &req);
    assert_eq!(again.class(), Class::Success);
    assert_eq!(
        first.msg().xor_address(AttrType::XOR_RELAYED_ADDRESS),
        again.msg().xor_address(AttrType::XOR_RELAYED_ADDRESS)
    );
    assert_eq!(h.s.allocation_count(), 2);
    // A new Allocate on the same 5-tuple is a mismatch, answered with integrity.
    let r = h.allocate(client(2));
    assert_eq!(r.code(), Some(437));
    assert!(r.msg().verify_integrity(&key()));
    // Requests on a 5-tuple without an allocation: 437.
    assert_eq!(h.refresh(client(3), None).code(), Some(437));
    assert_eq!(h.permit(client(3), peer()).code(), Some(437));
    assert_eq!(h.bind(client(3), 0x4000, peer()).code(), Some(437));
}

#[test]
fn transport_and_family_errors() {
    let mut h = H::new();
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_TCP as u32) << 24);
    });
    assert_eq!(r.code(), Some(442));
    let r = h.auth(client(1), Method::ALLOCATE, |_| {});
    assert_eq!(r.code(), Some(400));
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add_u32(
                AttrType::REQUESTED_ADDRESS_FAMILY,
                (FAMILY_IPV6 as u32) << 24,
            );
    });
    assert_eq!(r.code(), Some(440));
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add_u32(AttrType::REQUESTED_ADDRESS_FAMILY, 7 << 24);
    });
    assert_eq!(r.code(), Some(440));
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::RESERVATION_TOKEN, &[0; 8])
            .add(AttrType::EVEN_PORT, &[0]);
    });
    assert_eq!(r.code(), Some(400));
    assert_eq!(h.s.allocation_count(), 0);
    assert!(h.s.stats().errors_with(442) == 1 && h.s.stats().errors_with(440) == 2);
}

#[test]
fn user_quota_gives_486_and_frees_on_delete() {
    let mut c = cfg();
    c.user_quota = 1;
    let mut h = H::with(c);
    h.allocate_ok(client(1));
    assert_eq!(h.allocate(client(2)).code(), Some(486));
    // Another user is not affected.
    let r = h.auth_as(client(3), Method::ALLOCATE, ("bob", "builder"), |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    });
    assert_eq!(r.class(), Class::Success);
    h.refresh(client(1), Some(0));
    h.allocate_ok(client(2));
}

#[test]
fn total_quota_gives_486() {
    let mut c = cfg();
    c.total_quota = 2;
    let mut h = H::with(c);
    h.allocate_ok(client(1));
    h.allocate_ok(client(2));
    assert_eq!(h.allocate(client(3)).code(), Some(486));
}

#[test]
fn exhausted_port_range_gives_508_and_ports_return() {
    let mut c = cfg();
    c.min_port = 50000;
    c.max_port = 50002;
    let mut h = H::with(c);
    h.relays.taken.insert(50001);
    let a = h.allocate_ok(client(1));
    let b = h.allocate_ok(client(2));
    assert_ne!(a.port(), 50001);
    assert_ne!(b.port(), 50001);
    assert_eq!(h.allocate(client(3)).code(), Some(508));
    assert_eq!(h.s.stats().errors_with(508), 1);
    // Deleting one returns its port to the pool.
    assert_eq!(h.refresh(client(1), Some(0)).class(), Class::Success);
    assert_eq!(h.s.ports_in_use(), 1);
    assert_eq!(h.allocate_ok(client(3)).port(), a.port());
}

#[test]
fn refresh_lifetimes_and_expiry_return_the_port() {
    let mut h = H::new();
    let relay = h.allocate_ok(client(1));
    let lifetime = |r: Resp| r.msg().lifetime().unwrap();
    assert_eq!(lifetime(h.refresh(client(1), Some(1200))), Some(1200));
    assert_eq!(lifetime(h.refresh(client(1), Some(99999))), Some(3600));
    assert_eq!(lifetime(h.refresh(client(1), Some(10))), Some(600));
    assert_eq!(lifetime(h.refresh(client(1), None)), Some(600));
    // Refreshed at t=0 for 600 s: alive at 599, gone at 600.
    h.advance(599);
    assert_eq!(h.s.allocation_count(), 1);
    h.advance(1);
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.s.ports_in_use(), 0);
    assert_eq!(h.relays.closed, vec![relay]);
    assert_eq!(
        h.s.stats().allocations_ended[EndReason::Expired as usize],
        1
    );
    assert_eq!(h.s.poll_timeout(), None);
}

#[test]
fn refresh_zero_deletes_and_a_repeat_gets_437() {
    let mut h = H::new();
    let relay = h.allocate_ok(client(1));
    let r = h.refresh(client(1), Some(0));
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.msg().lifetime().unwrap(), Some(0));
    assert!(r.msg().verify_integrity(&key()));
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.relays.closed, vec![relay]);
    assert_eq!(h.refresh(client(1), Some(0)).code(), Some(437));
    // The 5-tuple may allocate again.
    h.allocate_ok(client(1));
}

#[test]
fn permissions_gate_both_directions_and_expire_after_300s() {
    let mut h = H::new();
    let relay = h.allocate_ok(client(1));
    let p = public_peer(9000);
    assert_eq!(h.send_indication(client(1), p, b"x"), ClientAction::None);
    assert_eq!(h.peer_sends(relay, p, b"y"), None);
    assert_eq!(h.s.stats().dropped(Drop::NoPermission), 2);

    // Several peers in one request.
    let q = public_peer(9001);
    let r = h.auth(client(1), Method::CREATE_PERMISSION, |w| {
        w.add_xor_address(AttrType::XOR_PEER_ADDRESS, p)
            .add_xor_address(
                AttrType::XOR_PEER_ADDRESS,
                SocketAddr::from(([1, 1, 1, 1], 1)),
            );
    });
    assert_eq!(r.class(), Class::Success);
    assert!(r.msg().verify_integrity(&key()));
    // The permission is for the IP: any port of it may be used.
    match h.send_indication(client(1), q, b"hello") {
        ClientAction::Forward { relay: r, peer, .. } => {
            assert_eq!((r, peer), (relay, q));
        }
        other => panic!("{other:?}"),
    }
    // Peer to client without a channel: a Data indication.
    let (to, bytes) = h.peer_sends(relay, p, b"pong").unwrap();
    assert_eq!(to, client(1));
    let m = MessageRef::parse(&bytes).unwrap();
    assert_eq!((m.method(), m.class()), (Method::DATA, Class::Indication));
    assert_eq!(m.xor_peer_address().unwrap(), Some(p));
    assert_eq!(m.data(), Some(&b"pong"[..]));

    h.advance(299);
    assert!(h.peer_sends(relay, p, b"still").is_some());
    h.advance(1);
    assert!(h.peer_sends(relay, p, b"late").is_none());
    assert_eq!(h.s.allocation_info(&client(1)).unwrap().1, 0);
    assert_eq!(h.s.stats().permissions_created, 2);
}

#[test]
fn forbidden_peers_get_403() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    for bad in [
        "10.0.0.1:1",
        "127.0.0.1:1",
        "169.254.169.254:80",
        "224.0.0.1:5",
    ] {
        let r = h.permit(client(1), bad.parse().unwrap());
        assert_eq!(r.code(), Some(403), "{bad}");
        let r = h.bind(client(1), 0x4000, bad.parse().unwrap());
        assert_eq!(r.code(), Some(403), "{bad}");
    }
    // All or nothing: one bad address refuses the whole request.
    let r = h.auth(client(1), Method::CREATE_PERMISSION, |w| {
        w.add_xor_address(AttrType::XOR_PEER_ADDRESS, public_peer(1))
            .add_xor_address(AttrType::XOR_PEER_ADDRESS, "10.1.1.1:1".parse().unwrap());
    });
    assert_eq!(r.code(), Some(403));
    assert_eq!(h.s.allocation_info(&client(1)).unwrap().1, 0);
    // The server's own relay address is allowed (relay to relay).
    let own = SocketAddr::new(relay_ip(), 50050);
    assert_eq!(h.permit(client(1), own).class(), Class::Success);
    // An IPv6 peer on an IPv4 relay: 443.
    assert_eq!(
        h.permit(client(1), "[2606:4700::1]:5".parse().unwrap())
            .code(),
        Some(443)
    );
    assert_eq!(h.permit(client(1), peer()).code(), Some(403));
}

#[test]
fn loopback_peers_when_allowed() {
    let mut c = cfg();
    c.allow_loopback_peers = true;
    let mut h = H::with(c);
    h.allocate_ok(client(1));
    assert_eq!(
        h.permit(client(1), "127.0.0.1:5000".parse().unwrap())
            .class(),
        Class::Success
    );
    assert_eq!(
        h.permit(client(1), "10.0.0.1:5000".parse().unwrap()).code(),
        Some(403)
    );
}

#[test]
fn channels_relay_both_ways_and_expire_after_600s() {
    let mut h = H::new();
    let relay = h.allocate_ok(client(1));
    let p = public_peer(7000);
    assert_eq!(
        h.channel_data(client(1), 0x4000, b"early"),
        ClientAction::None
    );
    assert_eq!(
        h.s.stats().dropped(Drop::NoAllocation) + h.s.stats().dropped(Drop::NoChannel),
        1
    );
    let r = h.bind(client(1), 0x4000, p);
    assert_eq!(r.class(), Class::Success);
    assert!(r.msg().verify_integrity(&key()));
    match h.channel_data(client(1), 0x4000, b"payload") {
        ClientAction::Forward { relay: r, peer, .. } => assert_eq!((r, peer), (relay, p)),
        other => panic!("{other:?}"),
    }
    let (_, bytes) = h.peer_sends(relay, p, b"abcde").unwrap();
    assert_eq!(
        bytes,
        [0x40, 0x00, 0x00, 0x05, b'a', b'b', b'c', b'd', b'e']
    );
    // Another port of the same IP has the permission but not the channel: Data indication.
    let (_, bytes) = h.peer_sends(relay, public_peer(7001), b"z").unwrap();
    assert_eq!(MessageRef::parse(&bytes).unwrap().method(), Method::DATA);

    // Keep the allocation and the permission alive; the channel still ends at 600 s.
    h.refresh(client(1), Some(3600));
    h.advance(250);
    h.permit(client(1), p);
    h.advance(250);
    h.permit(client(1), p);
    h.advance(99);
    assert!(matches!(
        h.channel_data(client(1), 0x4000, b"x"),
        ClientAction::Forward { .. }
    ));
    h.advance(1);
    assert_eq!(h.channel_data(client(1), 0x4000, b"x"), ClientAction::None);
    let (_, bytes) = h.peer_sends(relay, p, b"abc").unwrap();
    assert_eq!(MessageRef::parse(&bytes).unwrap().method(), Method::DATA);
    assert_eq!(h.s.allocation_info(&client(1)).unwrap().2, 1, "in cooldown");

    // During the cooldown neither the number nor the peer can be bound to something else,
    // but the same pair can be bound again.
    assert_eq!(
        h.bind(client(1), 0x4000, public_peer(7002)).code(),
        Some(400)
    );
    assert_eq!(h.bind(client(1), 0x4001, p).code(), Some(400));
    h.advance(299);
    assert_eq!(h.s.allocation_info(&client(1)).unwrap().2, 1);
    h.advance(1);
    assert_eq!(
        h.s.allocation_info(&client(1)).unwrap().2,
        0,
        "cooldown over"
    );
    assert_eq!(
        h.bind(client(1), 0x4000, public_peer(7002)).class(),
        Class::Success
    );
}

#[test]
fn channel_bind_rules() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    let (p, q) = (other_peer(1), other_peer(2));
    assert_eq!(h.bind(client(1), 0x3FFF, p).code(), Some(400));
    assert_eq!(h.bind(client(1), 0x8000, p).code(), Some(400));
    assert_eq!(h.bind(client(1), 0x4000, p).class(), Class::Success);
    // Rebinding the same pair refreshes it.
    assert_eq!(h.bind(client(1), 0x4000, p).class(), Class::Success);
    assert_eq!(h.bind(client(1), 0x4000, q).code(), Some(400));
    assert_eq!(h.bind(client(1), 0x4001, p).code(), Some(400));
    assert_eq!(h.bind(client(1), 0x4FFF, q).class(), Class::Success);
    let r = h.auth(client(1), Method::CHANNEL_BIND, |w| {
        w.add_u32(AttrType::CHANNEL_NUMBER, 0x4002 << 16);
    });
    assert_eq!(r.code(), Some(400));
    assert_eq!(h.s.stats().channels_bound, 2);
    // A channel binding installs the permission.
    assert_eq!(h.s.allocation_info(&client(1)).unwrap().1, 2);
}

#[test]
fn channel_and_permission_caps_give_508() {
    let mut c = cfg();
    c.max_channels = 2;
    c.max_permissions = 3;
    let mut h = H::with(c);
    h.allocate_ok(client(1));
    assert_eq!(
        h.bind(client(1), 0x4000, other_peer(1)).class(),
        Class::Success
    );
    assert_eq!(
        h.bind(client(1), 0x4001, other_peer(2)).class(),
        Class::Success
    );
    assert_eq!(h.bind(client(1), 0x4002, other_peer(3)).code(), Some(508));
    assert_eq!(h.permit(client(1), other_peer(9)).class(), Class::Success);
    assert_eq!(h.permit(client(1), other_peer(8)).code(), Some(508));
    // A permission that exists is refreshed, not counted again.
    assert_eq!(h.permit(client(1), other_peer(1)).class(), Class::Success);
}

#[test]
fn channel_data_to_tcp_clients_is_padded() {
    let mut h = H::new();
    let c = tcp_client(1);
    let relay = h.allocate_ok(c);
    h.bind(c, 0x4000, public_peer(1));
    let (to, bytes) = h.peer_sends(relay, public_peer(1), b"abcde").unwrap();
    assert_eq!(to, c);
    assert_eq!(
        bytes,
        [0x40, 0, 0, 5, b'a', b'b', b'c', b'd', b'e', 0, 0, 0]
    );
    // Closing the connection deletes the allocation.
    h.s.handle_client_closed(c, &mut h.relays);
    assert_eq!(h.s.allocation_count(), 0);
    assert_eq!(h.relays.closed, vec![relay]);
    assert_eq!(
        h.s.stats().allocations_ended[EndReason::ConnectionClosed as usize],
        1
    );
}

#[test]
fn other_user_on_the_same_5_tuple_gets_441() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    let r = h.auth_as(client(1), Method::REFRESH, ("bob", "builder"), |_| {});
    assert_eq!(r.code(), Some(441));
}

#[test]
fn unknown_comprehension_required_attribute_gets_420() {
    let mut h = H::new();
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType(0x7ABC), b"?");
    });
    assert_eq!(r.code(), Some(420));
    assert_eq!(
        r.msg().get(AttrType::UNKNOWN_ATTRIBUTES),
        Some(&[0x7A, 0xBC][..])
    );
    assert!(r.msg().verify_integrity(&key()));
    // Binding needs no credentials; the check applies there too.
    let t = h.txid();
    let req = h.build(Method::BINDING, t, None, |w| {
        w.add(AttrType(0x0003), &[0, 0, 0, 0]);
    });
    assert_eq!(h.request(client(1), &req).code(), Some(420));
}

#[test]
fn binding_reflects_the_source_address() {
    let mut h = H::new();
    let t = h.txid();
    let req = h.build(Method::BINDING, t, None, |_| {});
    let r = h.request(client(4242), &req);
    assert_eq!(r.class(), Class::Success);
    let m = r.msg();
    assert_eq!(
        m.xor_address(AttrType::XOR_MAPPED_ADDRESS).unwrap(),
        Some(client(4242).remote)
    );
    assert_eq!(
        m.get(AttrType::MAPPED_ADDRESS).map(wire::decode_address),
        Some(Ok(client(4242).remote))
    );
}

#[test]
fn bad_input_is_dropped_or_answered_400_and_counted() {
    let mut h = H::new();
    for junk in [
        &b""[..],
        b"\xff\xff",
        b"\x16\x03\x01\x00\x05hello",
        &[0u8; 19],
    ] {
        assert_eq!(h.send(client(1), junk), ClientAction::None);
    }
    // A request header with a broken attribute: 400.
    let mut req = h.build(Method::ALLOCATE, TransactionId([1; 12]), None, |w| {
        w.add(AttrType::SOFTWARE, b"x");
    });
    req[22..24].copy_from_slice(&0x00F0u16.to_be_bytes());
    assert_eq!(h.request(client(1), &req).code(), Some(400));
    // A bad FINGERPRINT: dropped.
    let mut req = h.build(Method::BINDING, TransactionId([2; 12]), None, |_| {});
    let n = req.len();
    req[n - 1] ^= 1;
    assert_eq!(h.send(client(1), &req), ClientAction::None);
    assert_eq!(h.s.stats().dropped(Drop::BadFingerprint), 1);
    // Responses and unknown indications are not acted on.
    let mut buf = [0u8; 64];
    let n = MessageWriter::new(
        &mut buf,
        Method::ALLOCATE,
        Class::Success,
        &TransactionId([3; 12]),
    )
    .finish()
    .unwrap();
    assert_eq!(h.send(client(1), &buf[..n]), ClientAction::None);
    // ChannelData shorter than it claims, and with no allocation.
    assert_eq!(h.send(client(1), &[0x40, 0, 0, 9, 1]), ClientAction::None);
    assert_eq!(h.send(client(1), &[0x40, 0, 0, 1, 1]), ClientAction::None);
    // An unknown method: 400.
    let req = h.build(Method(0x0FF), TransactionId([4; 12]), None, |_| {});
    assert_eq!(h.request(client(1), &req).code(), Some(400));
    let s = h.s.stats();
    assert_eq!(s.dropped(Drop::NotTurn), 3);
    assert!(s.dropped(Drop::Malformed) >= 3);
}

#[test]
fn even_port_reserves_the_next_port_for_a_token() {
    let mut h = H::new();
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.class(), Class::Success);
    let relay = r
        .msg()
        .xor_address(AttrType::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relay.port() % 2, 0);
    let token = r.msg().reservation_token().unwrap().expect("a token");
    assert_eq!(h.s.ports_in_use(), 2);
    let r = h.auth(client(2), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.class(), Class::Success);
    let second = r
        .msg()
        .xor_address(AttrType::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(second.port(), relay.port() + 1);
    // A token is good once.
    let r = h.auth(client(3), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::RESERVATION_TOKEN, &token);
    });
    assert_eq!(r.code(), Some(508));
    // EVEN-PORT without R: an even port, nothing reserved.
    let r = h.auth(client(4), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::EVEN_PORT, &[0]);
    });
    let p = r
        .msg()
        .xor_address(AttrType::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(p.port() % 2, 0);
    assert_eq!(r.msg().reservation_token().unwrap(), None);
    assert_eq!(h.s.ports_in_use(), 3);
}

#[test]
fn even_port_pairs_skip_ports_that_cannot_be_bound() {
    let mut c = cfg();
    c.min_port = 50000;
    c.max_port = 50005;
    let mut h = H::with(c);
    // Every odd port but 50005 is held by another program: only 50004/50005 can be a pair.
    h.relays.taken.extend([50001, 50003]);
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::EVEN_PORT, &[0x80]);
    });
    let relay = r
        .msg()
        .xor_address(AttrType::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(relay.port(), 50004);
    let token = r.msg().reservation_token().unwrap().unwrap();
    assert_eq!(h.relays.open.len(), 2);
    let r = h.auth(client(2), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::RESERVATION_TOKEN, &token);
    });
    let second = r
        .msg()
        .xor_address(AttrType::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert_eq!(second.port(), 50005);
    assert_eq!(h.relays.open.len(), 2);
    // No pair is left.
    let r = h.auth(client(3), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.code(), Some(508));
}

#[test]
fn unused_reservation_expires_after_30s() {
    let mut h = H::new();
    h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::EVEN_PORT, &[0x80]);
    });
    assert_eq!(h.s.ports_in_use(), 2);
    assert_eq!(h.relays.open.len(), 2, "the reserved port is bound too");
    assert!(h.s.poll_timeout().unwrap() <= h.now + RESERVATION_LIFETIME);
    h.advance(29);
    assert_eq!(h.s.ports_in_use(), 2);
    h.advance(1);
    assert_eq!(h.s.ports_in_use(), 1);
    assert_eq!(
        h.relays.open.len(),
        1,
        "and released when the reservation ends"
    );
}

#[test]
fn external_ip_is_advertised() {
    let mut c = cfg();
    c.external_ips = vec![("203.0.113.99".parse().unwrap(), Some(relay_ip()))];
    let mut h = H::with(c);
    let relay = h.allocate_ok(client(1));
    assert_eq!(relay.ip(), "203.0.113.99".parse::<IpAddr>().unwrap());
    // The socket is bound to the private address.
    assert!(h.relays.open.iter().all(|a| a.ip() == relay_ip()));
    // Peers on the advertised address are the server's own.
    assert_eq!(h.permit(client(1), relay).class(), Class::Success);
}

#[test]
fn no_auth_mode_allocates_without_credentials() {
    let mut c = cfg();
    c.users = None;
    let mut h = H::with(c);
    let t = h.txid();
    let req = h.build(Method::ALLOCATE, t, None, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    });
    let r = h.request(client(1), &req);
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.msg().integrity(), None);
}

#[test]
fn sha256_integrity_is_accepted_and_answered_in_kind() {
    let mut h = H::new();
    h.probe(client(1));
    let t = h.txid();
    let nonce = h.nonce.clone();
    let mut buf = vec![0u8; 512];
    let mut w = MessageWriter::new(&mut buf, Method::ALLOCATE, Class::Request, &t);
    w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
        .add(AttrType::USERNAME, USER.as_bytes())
        .add(AttrType::REALM, REALM.as_bytes())
        .add(AttrType::NONCE, &nonce)
        .add_integrity_sha256(&key());
    let n = w.finish().unwrap();
    let r = h.request(client(1), &buf[..n]);
    assert_eq!(r.class(), Class::Success);
    assert_eq!(r.msg().integrity(), Some(Integrity::Sha256));
    assert!(r.msg().verify_integrity_sha256(&key()));
}

#[test]
fn many_refreshes_keep_the_timer_queue_bounded() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    h.bind(client(1), 0x4000, public_peer(1));
    for _ in 0..500 {
        h.refresh(client(1), Some(600));
        h.permit(client(1), public_peer(1));
        h.bind(client(1), 0x4000, public_peer(1));
    }
    assert!(
        h.s.timers.len() <= 4,
        "timer queue grew to {}",
        h.s.timers.len()
    );
    h.advance(3600 + 300);
    assert_eq!(h.s.allocation_count(), 0);
    assert!(h.s.timers.is_empty());
}

#[test]
fn fake_clock_runs_forward_only_through_timeouts() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    let t = h.s.poll_timeout().unwrap();
    assert_eq!(t, h.now + Duration::from_secs(600));
    assert_eq!(h.at(), 0);
}

#[test]
fn a_malformed_attribute_after_the_checks_takes_no_port() {
    let mut h = H::new();
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add(AttrType::LIFETIME, &[0, 1]);
    });
    assert_eq!(r.code(), Some(400));
    assert_eq!(h.s.ports_in_use(), 0);
    assert!(h.relays.open.is_empty());
}

#[test]
fn own_addresses_are_peers_only_on_relay_ports() {
    let mut h = H::new();
    let relay = h.allocate_ok(client(1));
    let other = h.allocate_ok(client(2));
    // Relay to relay: allowed.
    assert_eq!(h.bind(client(1), 0x4000, other).class(), Class::Success);
    assert!(matches!(
        h.channel_data(client(1), 0x4000, b"hi"),
        ClientAction::Forward { .. }
    ));
    // Another port of the server's own address: refused, by channel and by Send.
    let dns = SocketAddr::new(relay.ip(), 53);
    assert_eq!(h.bind(client(1), 0x4001, dns).code(), Some(403));
    assert_eq!(h.send_indication(client(1), dns, b"x"), ClientAction::None);
    assert_eq!(h.s.stats().dropped(Drop::Forbidden), 2);
}

#[test]
fn bad_password_with_a_stale_nonce_is_401_not_438() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    h.refresh(client(1), Some(3600));
    h.advance(601);
    let t = h.txid();
    let req = h.build(Method::REFRESH, t, Some((USER, "wrong")), |_| {});
    assert_eq!(h.request(client(1), &req).code(), Some(401));
}

#[test]
fn additional_address_family() {
    let mut h = H::new();
    let dual = |w: &mut MessageWriter, family: u8| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add_u32(AttrType::ADDITIONAL_ADDRESS_FAMILY, (family as u32) << 24);
    };
    let r = h.auth(client(1), Method::ALLOCATE, |w| dual(w, FAMILY_IPV4));
    assert_eq!(r.code(), Some(400));
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        dual(w, FAMILY_IPV6);
        w.add_u32(
            AttrType::REQUESTED_ADDRESS_FAMILY,
            (FAMILY_IPV4 as u32) << 24,
        );
    });
    assert_eq!(r.code(), Some(400));
    let r = h.auth(client(1), Method::ALLOCATE, |w| {
        dual(w, FAMILY_IPV6);
        w.add(AttrType::EVEN_PORT, &[0x80]);
    });
    assert_eq!(r.code(), Some(400));
    // IPv4 relay granted, IPv6 refused in ADDRESS-ERROR-CODE.
    let r = h.auth(client(1), Method::ALLOCATE, |w| dual(w, FAMILY_IPV6));
    assert_eq!(r.class(), Class::Success);
    let relayed = r
        .msg()
        .xor_address(AttrType::XOR_RELAYED_ADDRESS)
        .unwrap()
        .unwrap();
    assert!(relayed.is_ipv4());
    let aec = r.msg().get(AttrType::ADDRESS_ERROR_CODE).unwrap().to_vec();
    assert_eq!((aec[0], aec[2], aec[3]), (FAMILY_IPV6, 4, 40));
    assert_eq!(h.s.ports_in_use(), 1);
}

#[test]
fn send_indication_with_unknown_required_attribute_is_discarded() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    h.permit(client(1), public_peer(1));
    let mut buf = vec![0u8; 256];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::SEND,
        Class::Indication,
        &TransactionId([5; 12]),
    );
    w.add_xor_address(AttrType::XOR_PEER_ADDRESS, public_peer(1))
        .add(AttrType(0x0042), b"?")
        .add(AttrType::DATA, b"data");
    let n = w.finish().unwrap();
    assert_eq!(h.send(client(1), &buf[..n]), ClientAction::None);
    assert_eq!(h.s.stats().dropped(Drop::BadIndication), 1);
}

#[test]
fn timer_queue_stays_bounded_with_shrinking_lifetimes() {
    let mut h = H::new();
    h.allocate_ok(client(1));
    for l in (600..3600).rev().step_by(3) {
        h.refresh(client(1), Some(l));
    }
    assert!(
        h.s.timers.len() <= 2 * h.s.allocation_count() + 65,
        "{}",
        h.s.timers.len()
    );
    // The last refresh asked for 602 s.
    h.advance(601);
    assert_eq!(h.s.allocation_count(), 1);
    h.advance(1);
    assert_eq!(h.s.allocation_count(), 0);
}

#[test]
fn an_expired_allocation_is_gone_before_its_timer_runs() {
    let mut h = H::new();
    let first = h.allocate_ok(client(1));
    // Time passes without handle_timeout.
    h.now += Duration::from_secs(600);
    assert_eq!(h.refresh(client(1), Some(600)).code(), Some(437));
    let second = h.allocate_ok(client(1));
    assert_eq!(h.s.allocation_count(), 1);
    assert!(h.relays.closed.contains(&first));
    assert!(h.relays.open.contains(&second));
}

#[test]
fn data_indication_transaction_ids_are_not_sequential() {
    let mut h = H::new();
    let relay = h.allocate_ok(client(1));
    h.permit(client(1), public_peer(1));
    let ids: Vec<[u8; 12]> = (0..4)
        .map(|_| {
            let (_, b) = h.peer_sends(relay, public_peer(1), b"x").unwrap();
            MessageRef::parse(&b).unwrap().transaction_id().0
        })
        .collect();
    for (i, a) in ids.iter().enumerate() {
        for b in &ids[i + 1..] {
            assert_ne!(a, b);
            // No shared 8-byte run, as a counter or a bare 64-bit generator would leave.
            assert_ne!(a[..4], b[..4]);
        }
    }
}

#[test]
fn ip_quota_gives_486_per_client_address() {
    let mut c = cfg();
    c.ip_quota = 2;
    let mut h = H::with(c);
    h.allocate_ok(client(1));
    h.allocate_ok(client(2));
    assert_eq!(h.allocate(client(3)).code(), Some(486));
    let elsewhere = ClientId {
        remote: "198.51.100.2:3".parse().unwrap(),
        ..client(3)
    };
    h.allocate_ok(elsewhere);
    h.refresh(client(1), Some(0));
    h.allocate_ok(client(3));
}

#[test]
fn operator_peer_lists_apply_to_permissions_and_channels() {
    let mut c = cfg();
    c.allowed_peers = vec![Cidr::new("10.9.0.0".parse().unwrap(), 16).unwrap()];
    c.denied_peers = vec![Cidr::new("8.8.8.8".parse().unwrap(), 32).unwrap()];
    let mut h = H::with(c);
    h.allocate_ok(client(1));
    assert_eq!(
        h.permit(client(1), "10.9.1.1:5".parse().unwrap()).class(),
        Class::Success
    );
    assert_eq!(
        h.bind(client(1), 0x4000, "10.9.1.2:5".parse().unwrap())
            .class(),
        Class::Success
    );
    assert_eq!(
        h.permit(client(1), "10.8.1.1:5".parse().unwrap()).code(),
        Some(403)
    );
    assert_eq!(
        h.permit(client(1), "8.8.8.8:5".parse().unwrap()).code(),
        Some(403)
    );
    assert_eq!(
        h.bind(client(1), 0x4001, "8.8.8.8:5".parse().unwrap())
            .code(),
        Some(403)
    );
    assert_eq!(
        h.permit(client(1), "8.8.4.4:5".parse().unwrap()).class(),
        Class::Success
    );
}

#[test]
fn challenges_are_rate_limited_per_source_address() {
    let mut h = H::new();
    let t = h.txid();
    let req = h.build(Method::ALLOCATE, t, None, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    });
    let answered = (0..300)
        .filter(|i| matches!(h.send(client(1000 + i), &req), ClientAction::Reply(_)))
        .count();
    assert_eq!(answered, 100, "the burst, then nothing");
    assert_eq!(h.s.stats().dropped(Drop::RateLimited), 200);
    // Another address is answered.
    let elsewhere = ClientId {
        remote: "198.51.100.9:1".parse().unwrap(),
        ..client(1)
    };
    assert!(matches!(h.send(elsewhere, &req), ClientAction::Reply(_)));
    // The rate comes back: 20 a second.
    h.now += Duration::from_secs(1);
    let again = (0..50)
        .filter(|i| matches!(h.send(client(2000 + i), &req), ClientAction::Reply(_)))
        .count();
    assert_eq!(again, 20);
}

#[test]
fn unauthenticated_answers_stay_small() {
    let mut h = H::new();
    let t = h.txid();
    let req = h.build(Method::ALLOCATE, t, None, |_| {});
    let r = h.request(client(1), &req);
    // Header, ERROR-CODE, REALM, NONCE, PASSWORD-ALGORITHMS, FINGERPRINT: no SOFTWARE.
    assert_eq!(r.msg().software().unwrap(), None);
    assert!(r.0.len() <= 20 + 20 + 4 + pad4(REALM.len()) + 4 + pad4(NONCE_LEN) + 12 + 8);
    let t = h.txid();
    let req = h.build(Method::BINDING, t, None, |_| {});
    let r = h.request(client(1), &req);
    assert_eq!(r.msg().software().unwrap(), None);
    assert!(r.0.len() <= 20 + 12 + 12 + 8, "{}", r.0.len());
}

#[test]
fn password_guessing_is_rate_limited_per_user_and_address() {
    let mut h = H::new();
    let transport = |w: &mut MessageWriter| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
    };
    for _ in 0..20 {
        assert_eq!(
            h.auth_as(client(1), Method::ALLOCATE, (USER, "guess"), transport)
                .code(),
            Some(401)
        );
    }
    // The budget is spent: even the right password is not checked now.
    assert_eq!(h.allocate(client(1)).code(), Some(401));
    // The same user from another address, and another user here, are not affected.
    let elsewhere = ClientId {
        remote: "198.51.100.9:1".parse().unwrap(),
        ..client(1)
    };
    h.allocate_ok(elsewhere);
    let r = h.auth_as(client(2), Method::ALLOCATE, ("bob", "builder"), transport);
    assert_eq!(r.class(), Class::Success);
    // One check comes back every 6 s.
    h.now += Duration::from_secs(6);
    h.allocate_ok(client(1));
    assert_eq!(h.s.stats().auth_failures, 21);
}

#[test]
fn max_bps_drops_beyond_the_budget_in_each_direction() {
    let mut c = cfg();
    c.max_bps = 100_000;
    let mut h = H::with(c);
    let relay = h.allocate_ok(client(1));
    let p = public_peer(1);
    h.bind(client(1), 0x4000, p);
    let data = [7u8; 1000];
    // The burst is one second's worth: 100 datagrams of 1000 bytes.
    let sent = (0..150)
        .filter(|_| {
            matches!(
                h.channel_data(client(1), 0x4000, &data),
                ClientAction::Forward { .. }
            )
        })
        .count();
    assert_eq!(sent, 100);
    let back = (0..150)
        .filter(|_| h.peer_sends(relay, p, &data).is_some())
        .count();
    assert_eq!(back, 100, "the other direction has its own budget");
    assert_eq!(h.s.stats().dropped(Drop::Bandwidth), 100);
    // Half a second refills half the budget.
    h.now += Duration::from_millis(500);
    let more = (0..100)
        .filter(|_| {
            matches!(
                h.channel_data(client(1), 0x4000, &data),
                ClientAction::Forward { .. }
            )
        })
        .count();
    assert_eq!(more, 50);
}

#[test]
fn reconfigure_keeps_allocations_and_applies_users_policy_and_limits() {
    let mut h = H::new();
    let relay = h.allocate_ok(client(1));
    let p = public_peer(9000);
    assert_eq!(h.bind(client(1), 0x4000, p).class(), Class::Success);
    assert!(h.peer_sends(relay, p, b"before").is_some());

    // New users (alice only, a new password for bob), a denied range covering the peer, a
    // quota, a different relay range (ignored: allocations are bound to it).
    let mut users = Users::new(REALM);
    users.add_password(USER, PASS);
    users.add_password("bob", "new password");
    let mut c = ServerConfig::new(relay_ip(), Some(users));
    c.min_port = 40000;
    c.max_port = 40099;
    c.user_quota = 1;
    c.denied_peers = vec![Cidr::new(p.ip(), 32).unwrap()];
    let ignored = h.s.reconfigure(c);
    assert_eq!(ignored, vec!["min-port / max-port"]);
    assert_eq!(h.s.config().min_port, 50000);
    h.s.check_invariants().unwrap();

    // The allocation is alive; the withdrawn permission stops data both ways, even on the
    // bound channel.
    assert_eq!(h.s.allocation_count(), 1);
    assert!(h.peer_sends(relay, p, b"after").is_none());
    assert_eq!(h.channel_data(client(1), 0x4000, b"x"), ClientAction::None);
    assert_eq!(h.permit(client(1), p).code(), Some(403));
    // A peer the new rules allow still works.
    let q = other_peer(1);
    assert_eq!(h.permit(client(1), q).class(), Class::Success);
    assert!(h.peer_sends(relay, q, b"ok").is_some());
    // The quota applies to new allocations.
    assert_eq!(h.allocate(client(2)).code(), Some(486));
    // Refresh still works for the allocation in flight.
    assert_eq!(h.refresh(client(1), Some(600)).class(), Class::Success);
    h.s.check_invariants().unwrap();
}

fn relay_ip6() -> IpAddr {
    "2001:db8::10".parse().unwrap()
}

/// The XOR-RELAYED-ADDRESS attributes of a response, in order.
fn relayed_addresses(r: &Resp) -> Vec<SocketAddr> {
    let m = r.msg();
    m.attributes()
        .filter(|(t, _)| *t == AttrType::XOR_RELAYED_ADDRESS)
        .map(|(_, v)| crate::wire::decode_xor_address(v, m.transaction_id()).unwrap())
        .collect()
}

fn dual_allocate(h: &mut H, c: ClientId) -> Resp {
    h.auth(c, Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add_u32(
                AttrType::ADDITIONAL_ADDRESS_FAMILY,
                (FAMILY_IPV6 as u32) << 24,
            );
    })
}

#[test]
fn dual_allocation_relays_both_families_on_one_port() {
    let mut c = cfg();
    c.relay_ips = vec![relay_ip(), relay_ip6()];
    let mut h = H::with(c);
    let r = dual_allocate(&mut h, client(1));
    assert_eq!(r.class(), Class::Success);
    assert!(r.msg().get(AttrType::ADDRESS_ERROR_CODE).is_none());
    let relayed = relayed_addresses(&r);
    assert_eq!(relayed.len(), 2, "{relayed:?}");
    let (r4, r6) = (relayed[0], relayed[1]);
    assert_eq!((r4.ip(), r6.ip()), (relay_ip(), relay_ip6()));
    assert_eq!(r4.port(), r6.port());
    assert!(h.relays.open.contains(&r4) && h.relays.open.contains(&r6));
    assert_eq!(h.s.ports_in_use(), 1);
    // A retransmission gets the same two addresses.
    let t = TransactionId([h.txn; 12]);
    let again = h.build(Method::ALLOCATE, t, Some((USER, PASS)), |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add_u32(
                AttrType::ADDITIONAL_ADDRESS_FAMILY,
                (FAMILY_IPV6 as u32) << 24,
            );
    });
    assert_eq!(relayed_addresses(&h.request(client(1), &again)), relayed);

    // Peers of either family, each through the relay of its family.
    let p4 = public_peer(9);
    let p6: SocketAddr = "[2606:4700::1111]:9".parse().unwrap();
    assert_eq!(h.permit(client(1), p4).class(), Class::Success);
    assert_eq!(h.permit(client(1), p6).class(), Class::Success);
    match h.send_indication(client(1), p6, b"six") {
        ClientAction::Forward { relay, peer, .. } => assert_eq!((relay, peer), (r6, p6)),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.bind(client(1), 0x4000, p4).class(), Class::Success);
    match h.channel_data(client(1), 0x4000, b"four") {
        ClientAction::Forward { relay, peer, .. } => assert_eq!((relay, peer), (r4, p4)),
        other => panic!("{other:?}"),
    }
    assert_eq!(h.peer_sends(r6, p6, b"back").unwrap().0, client(1));
    assert_eq!(h.peer_sends(r4, p4, b"back").unwrap().0, client(1));

    // Deleting the IPv6 half keeps the IPv4 one, its permission and its channel.
    let gone = h.auth(client(1), Method::REFRESH, |w| {
        w.add_u32(AttrType::LIFETIME, 0).add_u32(
            AttrType::REQUESTED_ADDRESS_FAMILY,
            (FAMILY_IPV6 as u32) << 24,
        );
    });
    assert_eq!(gone.class(), Class::Success);
    assert_eq!(h.relays.closed, vec![r6]);
    assert!(h.s.has_allocation(&client(1)));
    assert_eq!(h.s.allocation_info(&client(1)), Some((r4, 1, 1)));
    assert_eq!(h.send_indication(client(1), p6, b"x"), ClientAction::None);
    assert!(h.peer_sends(r4, p4, b"still").is_some());
    // The IPv6 family is gone: naming it again is 443.
    let again = h.auth(client(1), Method::REFRESH, |w| {
        w.add_u32(
            AttrType::REQUESTED_ADDRESS_FAMILY,
            (FAMILY_IPV6 as u32) << 24,
        );
    });
    assert_eq!(again.code(), Some(443));
    assert_eq!(h.refresh(client(1), Some(0)).class(), Class::Success);
    assert_eq!(h.relays.closed, vec![r6, r4]);
    assert_eq!(h.s.ports_in_use(), 0);
}

#[test]
fn dual_allocation_with_even_port() {
    let mut c = cfg();
    c.relay_ips = vec![relay_ip(), relay_ip6()];
    let mut h = H::with(c);
    // EVEN-PORT without R combines with a dual allocation: both halves on one even port.
    let r = h.auth(client(2), Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add_u32(
                AttrType::ADDITIONAL_ADDRESS_FAMILY,
                (FAMILY_IPV6 as u32) << 24,
            )
            .add(AttrType::EVEN_PORT, &[0x00]);
    });
    let even = relayed_addresses(&r);
    assert_eq!(even.len(), 2);
    assert!(even[0].port().is_multiple_of(2) && even[0].port() == even[1].port());
}

#[test]
fn dual_allocation_can_drop_its_ipv4_half() {
    let mut c = cfg();
    c.relay_ips = vec![relay_ip6(), relay_ip()];
    let mut h = H::with(c);
    let relayed = relayed_addresses(&dual_allocate(&mut h, client(1)));
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6(), "{relayed:?}");
    let r = h.auth(client(1), Method::REFRESH, |w| {
        w.add_u32(AttrType::LIFETIME, 0).add_u32(
            AttrType::REQUESTED_ADDRESS_FAMILY,
            (FAMILY_IPV4 as u32) << 24,
        );
    });
    assert_eq!(r.class(), Class::Success);
    assert_eq!(h.relays.closed, vec![relayed[0]]);
    assert_eq!(h.s.allocation_info(&client(1)).unwrap().0, relayed[1]);
    // Expiry closes what is left, once.
    h.advance(3600);
    assert_eq!(h.relays.closed, relayed);
    assert_eq!(h.s.ports_in_use(), 0);
}

#[test]
fn dual_allocation_retries_a_port_taken_on_one_family() {
    struct V6Taken(FakeRelays, u16);
    impl RelaySockets for V6Taken {
        fn open(&mut self, addr: SocketAddr) -> bool {
            (addr.is_ipv4() || addr.port() != self.1) && self.0.open(addr)
        }
        fn close(&mut self, addr: SocketAddr) {
            self.0.close(addr)
        }
    }
    let mut c = cfg();
    c.relay_ips = vec![relay_ip(), relay_ip6()];
    c.min_port = 50000;
    c.max_port = 50001;
    // Port 50000 is free on IPv4 but taken on IPv6: the allocation gets 50001 on both.
    let mut h = H::with(c);
    let mut fake = V6Taken(FakeRelays::default(), 50000);
    let mut out = [0u8; 2048];
    h.probe(client(1));
    let t = h.txid();
    let req = h.build(Method::ALLOCATE, t, Some((USER, PASS)), |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
            .add_u32(
                AttrType::ADDITIONAL_ADDRESS_FAMILY,
                (FAMILY_IPV6 as u32) << 24,
            );
    });
    let ClientAction::Reply(n) =
        h.s.handle_client(h.now, client(1), &req, &mut out, &mut fake)
    else {
        panic!("no reply");
    };
    let r = Resp(out[..n].to_vec());
    assert_eq!(r.class(), Class::Success);
    let relayed = relayed_addresses(&r);
    assert_eq!(
        relayed.iter().map(|a| a.port()).collect::<Vec<_>>(),
        [50001, 50001]
    );
    // The IPv4 socket of the refused port was closed again.
    assert!(
        fake.0
            .closed
            .iter()
            .all(|a| a.port() == 50000 && a.is_ipv4())
    );
    assert_eq!(h.s.ports_in_use(), 1);
    h.s.check_invariants().unwrap();
}

/// The relay address of [`nat_cfg`] and the public address `external-ip` maps it to.
fn nat_pair() -> (IpAddr, IpAddr) {
    ("10.0.0.5".parse().unwrap(), "8.8.8.8".parse().unwrap())
}

/// A server relaying on a private address behind 1:1 NAT.
fn nat_cfg() -> ServerConfig {
    let (private, public) = nat_pair();
    let mut c = cfg();
    c.relay_ips = vec![private];
    c.external_ips = vec![(public, Some(private))];
    c
}

#[test]
fn nat_mapped_relays_reach_each_other_inside_and_show_public_addresses() {
    let (private, public) = nat_pair();
    let mut h = H::with(nat_cfg());
    let a = h.allocate_ok(client(1));
    let b = h.allocate_ok(client(2));
    assert_eq!((a.ip(), b.ip()), (public, public));
    // Each client permits the other's advertised (public) relayed address.
    assert_eq!(h.permit(client(1), b).class(), Class::Success);
    assert_eq!(h.bind(client(2), 0x4000, a).class(), Class::Success);
    // Sent to the public address, delivered to the relay socket behind it.
    let to_b = SocketAddr::new(private, b.port());
    match h.send_indication(client(1), b, b"hello") {
        ClientAction::Forward { relay, peer, .. } => {
            assert_eq!((relay, peer), (SocketAddr::new(private, a.port()), to_b));
        }
        other => panic!("{other:?}"),
    }
    // Arriving from A's private relay address, shown to B's client as A's public one: the
    // channel bound to that address carries it.
    let from_a = SocketAddr::new(private, a.port());
    let (to, bytes) = h.peer_sends(to_b, from_a, b"hello").unwrap();
    assert_eq!(to, client(2));
    assert_eq!(&bytes[..2], &0x4000u16.to_be_bytes());
    match h.channel_data(client(2), 0x4000, b"reply") {
        ClientAction::Forward { peer, .. } => assert_eq!(peer, from_a),
        other => panic!("{other:?}"),
    }
    // B's reply reaches A's client as a Data indication from B's public address.
    let (to, bytes) = h.peer_sends(from_a, to_b, b"reply").unwrap();
    assert_eq!(to, client(1));
    let m = MessageRef::parse(&bytes).unwrap();
    assert_eq!(m.xor_peer_address().unwrap(), Some(b));
}

#[test]
fn xor_mapped_address_of_a_client_on_the_servers_own_address_is_mapped() {
    let (private, public) = nat_pair();
    let mut h = H::with(nat_cfg());
    let binding = |h: &mut H, remote: SocketAddr| {
        let t = h.txid();
        let req = h.build(Method::BINDING, t, None, |_| {});
        let c = ClientId {
            transport: Transport::Udp,
            remote,
            local: SocketAddr::new(private, 3478),
        };
        let r = h.request(c, &req);
        r.msg()
            .xor_address(AttrType::XOR_MAPPED_ADDRESS)
            .unwrap()
            .unwrap()
    };
    let local = SocketAddr::new(private, 40000);
    assert_eq!(binding(&mut h, local), SocketAddr::new(public, 40000));
    let other = SocketAddr::from(([198, 51, 100, 7], 40000));
    assert_eq!(binding(&mut h, other), other);
}
