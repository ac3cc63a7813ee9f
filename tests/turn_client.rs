//! Black-box tests in which an independent TURN client, the webrtc-rs `turn` crate, drives the
//! real server binary over loopback sockets. The `stun` crate builds and checks the few
//! messages the tests send themselves; nothing here uses the server's own wire code.
//!
//! Every socket the client uses is wrapped in a [`Tap`], a `webrtc_util::Conn` that records
//! each message in both directions, so that the tests can check what crossed the wire (Send
//! and Data indications, ChannelData, ChannelBind answers) as well as what the client API
//! returned. Over TCP the tap also does the RFC 8656 stream framing, which the `turn` crate
//! leaves to its `Conn`.

mod common;

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::{Arc, Mutex as StdMutex};
use std::time::{Duration, Instant};

use common::tap::{Dir, Tap, decode, is_channel_data, payload, reply_for, round4, turn_client};
use common::{PASSWORD, REALM, TestServer, USER};
use stun::agent::TransactionId;
use stun::attributes::{ATTR_MESSAGE_INTEGRITY, ATTR_NONCE, ATTR_REALM};
use stun::error_code::ErrorCodeAttribute;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::{
    BINDING_REQUEST, BINDING_SUCCESS, CLASS_ERROR_RESPONSE, CLASS_INDICATION, CLASS_REQUEST,
    CLASS_SUCCESS_RESPONSE, Getter, METHOD_CHANNEL_BIND, METHOD_DATA, METHOD_REFRESH, METHOD_SEND,
    Message, MessageType,
};
use stun::textattrs::{Nonce, Realm, Username};
use stun::xoraddr::XorMappedAddress;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;

use turn::proto::chandata::ChannelData;
use turn::proto::channum::ChannelNumber;
use turn::proto::data::Data;
use turn::proto::lifetime::Lifetime;
use turn::proto::peeraddr::PeerAddress;
use webrtc_util::Conn;

/// Limit for any single wait on the network.
const NET: Duration = Duration::from_secs(5);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

// ---------------------------------------------------------------------------------------
// What crossed the wire.
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq, Eq)]
enum Wire {
    /// A Send (outbound) or Data (inbound) indication: XOR-PEER-ADDRESS and DATA.
    Ind(SocketAddr, Vec<u8>),
    /// A ChannelData message: channel number and application data.
    Chan(u16, Vec<u8>),
}

impl Wire {
    fn payload(&self) -> &[u8] {
        match self {
            Wire::Ind(_, d) | Wire::Chan(_, d) => d,
        }
    }
}

/// The data-carrying messages in one direction, in order. Panics on a malformed one.
fn data_messages(tap: &Tap, dir: Dir) -> Vec<Wire> {
    let method = if dir == Dir::Out {
        METHOD_SEND
    } else {
        METHOD_DATA
    };
    let mut out = Vec::new();
    for p in tap.packets(dir) {
        if is_channel_data(&p) {
            let len = u16::from_be_bytes([p[2], p[3]]) as usize;
            let padded = round4(4 + len);
            if tap.is_tcp() || dir == Dir::Out {
                assert_eq!(p.len(), padded, "{dir:?} ChannelData not padded: {p:02x?}");
            } else {
                // Over UDP the padding is optional (RFC 8656 section 12.5).
                assert!(
                    p.len() == 4 + len || p.len() == padded,
                    "{dir:?} ChannelData of length {len} in a datagram of {}",
                    p.len()
                );
            }
            let mut cd = ChannelData {
                raw: p.clone(),
                ..Default::default()
            };
            cd.decode().expect("ChannelData decodes");
            out.push(Wire::Chan(cd.number.0, cd.data));
        } else if let Some(m) = decode(&p) {
            if m.typ == MessageType::new(method, CLASS_INDICATION) {
                let mut peer = PeerAddress::default();
                peer.get_from(&m).expect("XOR-PEER-ADDRESS");
                let mut data = Data::default();
                data.get_from(&m).expect("DATA");
                out.push(Wire::Ind(SocketAddr::new(peer.ip, peer.port), data.0));
            }
        } else {
            panic!("{dir:?}: neither STUN nor ChannelData: {p:02x?}");
        }
    }
    out
}

/// The response to the request with `tid`, if the tap has seen it.
fn response_to(tap: &Tap, tid: &TransactionId) -> Option<Message> {
    tap.packets(Dir::In)
        .iter()
        .filter_map(|p| decode(p))
        .find(|m| m.transaction_id == *tid && m.typ.class != CLASS_REQUEST)
}

async fn wait_response(tap: &Tap, tid: &TransactionId) -> Message {
    let deadline = Instant::now() + NET;
    loop {
        if let Some(m) = response_to(tap, tid) {
            return m;
        }
        assert!(Instant::now() < deadline, "no response to {tid:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// The channels the client asked for and the server granted (a success response seen):
/// (number, peer).
fn granted_channels(tap: &Tap) -> Vec<(u16, SocketAddr)> {
    let mut out = Vec::new();
    for p in tap.packets(Dir::Out) {
        let Some(m) = decode(&p) else { continue };
        if m.typ != MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST) {
            continue;
        }
        let mut num = ChannelNumber::default();
        num.get_from(&m).expect("CHANNEL-NUMBER");
        let mut peer = PeerAddress::default();
        peer.get_from(&m).expect("XOR-PEER-ADDRESS");
        let granted = response_to(tap, &m.transaction_id).is_some_and(|r| {
            r.typ == MessageType::new(METHOD_CHANNEL_BIND, CLASS_SUCCESS_RESPONSE)
        });
        if granted {
            out.push((num.0, SocketAddr::new(peer.ip, peer.port)));
        }
    }
    out
}

/// Checks the data messages exchanged with `peer`: outbound carry `sent` and inbound carry
/// `received`, in order; each direction starts with indications and, once the channel is
/// bound, uses only ChannelData on the granted channel, for at least `min_chan` messages.
fn check_wire(
    tap: &Tap,
    peer: SocketAddr,
    sent: &[Vec<u8>],
    received: &[Vec<u8>],
    min_chan: usize,
) {
    let channels = granted_channels(tap);
    let chan = channels
        .iter()
        .find(|(_, p)| *p == peer)
        .map(|(n, _)| *n)
        .unwrap_or_else(|| panic!("no channel granted for {peer}: {channels:?}"));
    for (dir, expected) in [(Dir::Out, sent), (Dir::In, received)] {
        let msgs: Vec<Wire> = data_messages(tap, dir)
            .into_iter()
            .filter(|w| match w {
                Wire::Ind(p, _) => *p == peer,
                Wire::Chan(n, _) => *n == chan,
            })
            .collect();
        let payloads: Vec<&[u8]> = msgs.iter().map(Wire::payload).collect();
        let expected: Vec<&[u8]> = expected.iter().map(Vec::as_slice).collect();
        assert_eq!(payloads.len(), expected.len(), "{dir:?} message count");
        for (i, (got, want)) in payloads.iter().zip(&expected).enumerate() {
            assert_eq!(got, want, "{dir:?} message {i} payload");
        }
        let first_chan = msgs
            .iter()
            .position(|w| matches!(w, Wire::Chan(..)))
            .unwrap_or(msgs.len());
        assert!(
            msgs[first_chan..]
                .iter()
                .all(|w| matches!(w, Wire::Chan(..))),
            "{dir:?}: an indication after ChannelData began: {:?}",
            msgs.iter()
                .map(|w| matches!(w, Wire::Chan(..)))
                .collect::<Vec<_>>()
        );
        let n_chan = msgs.len() - first_chan;
        assert!(
            n_chan >= min_chan,
            "{dir:?}: only {n_chan} of {} messages were ChannelData",
            msgs.len()
        );
    }
}

// ---------------------------------------------------------------------------------------
// The peer, the payloads, the client.
// ---------------------------------------------------------------------------------------

/// A UDP peer that records what it receives and answers each datagram with
/// [`reply_for`] of it, so that each direction is checked on its own.
struct Peer {
    addr: SocketAddr,
    seen: Arc<StdMutex<Vec<Datagram>>>,
}

/// A datagram as a peer saw it: its source and its payload.
type Datagram = (SocketAddr, Vec<u8>);

impl Peer {
    async fn start(max: usize) -> Peer {
        let sock = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(StdMutex::new(Vec::new()));
        let log = seen.clone();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 2048];
            for _ in 0..max {
                let Ok(Ok((n, from))) =
                    timeout(Duration::from_secs(15), sock.recv_from(&mut buf)).await
                else {
                    return;
                };
                log.lock().unwrap().push((from, buf[..n].to_vec()));
                let _ = sock.send_to(&reply_for(&buf[..n]), from).await;
            }
        });
        Peer { addr, seen }
    }

    fn seen(&self) -> Vec<Datagram> {
        self.seen.lock().unwrap().clone()
    }
}

/// Sends payloads `range` of `n` to `peer` through `relay` one at a time and checks each
/// answer byte for byte. Returns (sent, received).
async fn round_trips(
    relay: &dyn Conn,
    tap: &Tap,
    peer: &Peer,
    range: std::ops::Range<usize>,
    n: usize,
) -> (Vec<Vec<u8>>, Vec<Vec<u8>>) {
    let (peer_rec, peer) = (peer, peer.addr);
    let mut buf = vec![0u8; 2048];
    let (mut sent, mut received) = (Vec::new(), Vec::new());
    for i in range {
        let p = payload(i, n);
        // The `turn` client returns what it wrote to the server (indication or ChannelData
        // included), so the count says little; the peer's record is checked instead.
        timeout(NET, relay.send_to(&p, peer))
            .await
            .unwrap_or_else(|_| panic!("send {i} timed out"))
            .unwrap_or_else(|e| panic!("send {i}: {e}"));
        let (r, from) = timeout(NET, relay.recv_from(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "no answer to packet {i} ({} bytes); the peer saw {:?}; wire:\n{}",
                    p.len(),
                    peer_rec
                        .seen()
                        .iter()
                        .map(|(a, d)| (a, d.len()))
                        .collect::<Vec<_>>(),
                    tap.dump()
                )
            })
            .unwrap_or_else(|e| panic!("recv {i}: {e}"));
        assert_eq!(from, peer, "answer {i} source");
        assert_eq!(
            buf[..r],
            reply_for(&p)[..],
            "answer {i} ({} bytes)",
            p.len()
        );
        sent.push(p.clone());
        received.push(reply_for(&p));
    }
    (sent, received)
}

fn assert_peer_saw(peer: &Peer, relayed: SocketAddr, sent: &[Vec<u8>]) {
    let seen = peer.seen();
    assert_eq!(seen.len(), sent.len(), "datagrams at the peer");
    for (i, ((from, got), want)) in seen.iter().zip(sent).enumerate() {
        assert_eq!(*from, relayed, "datagram {i} at the peer came from {from}");
        assert_eq!(got, want, "datagram {i} at the peer");
    }
}

// ---------------------------------------------------------------------------------------
// Server log.
// ---------------------------------------------------------------------------------------

/// The server log without ANSI colour sequences (the server colours its log even into a pipe).
fn plain_log(server: &TestServer) -> String {
    let raw = server.log();
    let mut out = String::with_capacity(raw.len());
    let mut chars = raw.chars();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // CSI: ESC '[' parameters, then one final byte in '@'..='~'.
            for d in chars.by_ref() {
                if ('@'..='~').contains(&d) && d != '[' {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn log_lines(server: &TestServer, needles: &[&str]) -> Vec<String> {
    plain_log(server)
        .lines()
        .filter(|l| needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
        .collect()
}

async fn wait_log(server: &TestServer, needles: &[&str], within: Duration) -> String {
    let deadline = Instant::now() + within;
    loop {
        if let Some(l) = log_lines(server, needles).into_iter().next() {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no log line with {needles:?} within {within:?}; log:\n{}",
            plain_log(server)
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn assert_no_refusal(server: &TestServer) {
    let refused = log_lines(server, &["request refused"]);
    assert!(refused.is_empty(), "refusals: {refused:#?}");
}

// ---------------------------------------------------------------------------------------
// The tests.
// ---------------------------------------------------------------------------------------

/// Allocates through `tap`, relays 50 packets of 1 to 1200 bytes to a peer and back, checks
/// every byte at the peer, at the client and on the wire, then deletes the allocation.
async fn relay_round_trip(server: &TestServer, tap: Arc<Tap>) {
    const N: usize = 50;
    let transport = if tap.is_tcp() { "tcp" } else { "udp" };
    let client_id = format!("client={transport}:{}", tap.local());
    let peer = Peer::start(N).await;
    let client = turn_client(server.addr(), tap.clone(), USER, PASSWORD).await;
    let relay = timeout(NET, client.allocate())
        .await
        .expect("allocate timed out")
        .expect("allocate");
    let relayed = relay.local_addr().unwrap();
    assert_eq!(relayed.ip(), LOCALHOST, "relayed address");
    assert!(
        (server.min_port..=server.max_port).contains(&relayed.port()),
        "relayed port {} outside {}..={}",
        relayed.port(),
        server.min_port,
        server.max_port
    );
    let created = wait_log(server, &["allocation created", &client_id], NET).await;
    assert!(created.contains("alice"), "{created}");
    assert!(created.contains(&format!("relay={relayed}")), "{created}");

    let (sent, received) = round_trips(&relay, &tap, &peer, 0..N, N).await;
    assert_peer_saw(&peer, relayed, &sent);
    // The client binds its channel in the background after its first sends; how many go out
    // as Send indications first depends on its timing (under load, ten or more).
    check_wire(&tap, peer.addr, &sent, &received, N / 5);
    assert!(tap.errors().is_empty(), "tap: {:?}", tap.errors());
    assert_no_refusal(server);
    assert!(log_lines(server, &["allocation deleted"]).is_empty());

    timeout(NET, relay.close()).await.unwrap().unwrap();
    timeout(NET, client.close()).await.unwrap().unwrap();
    let deleted = wait_log(
        server,
        &["allocation deleted", &client_id],
        Duration::from_secs(3),
    )
    .await;
    assert!(
        deleted.contains("reason=\"deleted_by_client\""),
        "{deleted}"
    );
    assert!(deleted.contains(&format!("relay={relayed}")), "{deleted}");
    assert_no_refusal(server);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_allocate_relay_and_delete() {
    let server = common::start("");
    let tap = Tap::udp(server.addr()).await;
    relay_round_trip(&server, tap).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_allocate_relay_and_delete() {
    let server = common::start("");
    let tap = Tap::tcp(server.addr()).await;
    let local = tap.local();
    relay_round_trip(&server, tap.clone()).await;
    // Every inbound frame was delimited by the framing rules, so the stream stayed in sync;
    // closing it now ends the connection on the server too.
    timeout(NET, tap.close()).await.unwrap().unwrap();
    let closed = wait_log(
        &server,
        &["connection closed", &format!("client=tcp:{local}")],
        Duration::from_secs(3),
    )
    .await;
    assert!(!closed.contains("allocation deleted"), "{closed}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_wrong_password_and_unknown_user_are_refused() {
    let server = common::start("");
    for (user, password) in [(USER, "not-wonderland"), ("mallory", PASSWORD)] {
        let tap = Tap::udp(server.addr()).await;
        let client = turn_client(server.addr(), tap.clone(), user, password).await;
        let err = match timeout(NET, client.allocate())
            .await
            .expect("allocate timed out")
        {
            Ok(_) => panic!("allocation granted to {user} with password {password}"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains("401"), "{user}: {err}");
        timeout(NET, client.close()).await.unwrap().unwrap();

        // The final answer: 401 with REALM and a NONCE, not integrity-protected.
        let last = tap
            .packets(Dir::In)
            .iter()
            .rev()
            .find_map(|p| decode(p))
            .expect("an answer");
        assert_eq!(last.typ.class, CLASS_ERROR_RESPONSE);
        let mut code = ErrorCodeAttribute::default();
        code.get_from(&last).unwrap();
        assert_eq!(code.code.0, 401);
        assert_eq!(Realm::get_from_as(&last, ATTR_REALM).unwrap().text, REALM);
        assert!(
            !Nonce::get_from_as(&last, ATTR_NONCE)
                .unwrap()
                .text
                .is_empty()
        );
        assert!(
            last.get(ATTR_MESSAGE_INTEGRITY).is_err(),
            "401 carries MESSAGE-INTEGRITY"
        );

        let client_id = format!("client=udp:{}", tap.local());
        let refused = wait_log(&server, &["request refused", &client_id], NET).await;
        assert!(refused.contains("bad credentials"), "{refused}");
        assert!(refused.contains("code=401"), "{refused}");
        // The user is named, on that line or on one of its own.
        wait_log(&server, &[&client_id, &format!("user=\"{user}\"")], NET).await;
    }
    assert!(
        log_lines(&server, &["allocation created"]).is_empty(),
        "{}",
        plain_log(&server)
    );
}

/// A Binding request with FINGERPRINT, built with the `stun` crate.
fn binding_request() -> Message {
    let mut m = Message::new();
    m.build(&[
        Box::new(TransactionId::new()),
        Box::new(BINDING_REQUEST),
        Box::new(FINGERPRINT),
    ])
    .unwrap();
    m
}

fn check_binding_response(req: &Message, raw: &[u8], local: SocketAddr) {
    let res = decode(raw).unwrap_or_else(|| panic!("not STUN: {raw:02x?}"));
    assert_eq!(res.typ, BINDING_SUCCESS, "{res}");
    assert_eq!(res.transaction_id, req.transaction_id);
    let mut xor = XorMappedAddress::default();
    xor.get_from(&res).expect("XOR-MAPPED-ADDRESS");
    assert_eq!(SocketAddr::new(xor.ip, xor.port), local);
    // The server adds FINGERPRINT by default; if it is there it must be right.
    if res.contains(stun::attributes::ATTR_FINGERPRINT) {
        FINGERPRINT.check(&res).expect("FINGERPRINT");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stun_binding_reports_the_client_address() {
    let server = common::start("");

    // UDP, by hand with the `stun` crate.
    let sock = UdpSocket::bind((LOCALHOST, 0)).await.unwrap();
    let req = binding_request();
    sock.send_to(&req.raw, server.addr()).await.unwrap();
    let mut buf = [0u8; 1500];
    let (n, from) = timeout(NET, sock.recv_from(&mut buf))
        .await
        .expect("no binding response")
        .unwrap();
    assert_eq!(from, server.addr());
    check_binding_response(&req, &buf[..n], sock.local_addr().unwrap());

    // TCP, by hand: one request, one response of 20 + length bytes.
    let mut stream = timeout(NET, TcpStream::connect(server.addr()))
        .await
        .unwrap()
        .unwrap();
    let req = binding_request();
    stream.write_all(&req.raw).await.unwrap();
    let mut head = [0u8; 20];
    timeout(NET, stream.read_exact(&mut head))
        .await
        .unwrap()
        .unwrap();
    let len = u16::from_be_bytes([head[2], head[3]]) as usize;
    let mut raw = head.to_vec();
    raw.resize(20 + len, 0);
    timeout(NET, stream.read_exact(&mut raw[20..]))
        .await
        .unwrap()
        .unwrap();
    check_binding_response(&req, &raw, stream.local_addr().unwrap());

    // And through the `turn` client's own binding transaction, over UDP and TCP.
    for tap in [Tap::udp(server.addr()).await, Tap::tcp(server.addr()).await] {
        let client = turn_client(server.addr(), tap.clone(), USER, PASSWORD).await;
        let mapped = timeout(NET, client.send_binding_request())
            .await
            .expect("binding timed out")
            .expect("binding");
        assert_eq!(mapped, tap.local());
        timeout(NET, client.close()).await.unwrap().unwrap();
    }
    assert_no_refusal(&server);
}

/// A Refresh built with the `stun` crate, on the client's own 5-tuple, after a pause:
/// first unauthenticated (401 with a nonce), then with long-term credentials.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_refresh_keeps_the_allocation() {
    const N: usize = 10;
    let server = common::start("");
    let tap = Tap::udp(server.addr()).await;
    let peer = Peer::start(N).await;
    let client = turn_client(server.addr(), tap.clone(), USER, PASSWORD).await;
    let relay = timeout(NET, client.allocate())
        .await
        .unwrap()
        .expect("allocate");
    let relayed = relay.local_addr().unwrap();
    let (mut sent, mut received) = round_trips(&relay, &tap, &peer, 0..N / 2, N).await;

    tokio::time::sleep(Duration::from_millis(1100)).await;

    let mut unauth = Message::new();
    unauth
        .build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
            Box::new(Lifetime(Duration::from_secs(1200))),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
    tap.send_to(&unauth.raw, server.addr()).await.unwrap();
    let challenge = wait_response(&tap, &unauth.transaction_id).await;
    assert_eq!(
        challenge.typ,
        MessageType::new(METHOD_REFRESH, CLASS_ERROR_RESPONSE)
    );
    let mut code = ErrorCodeAttribute::default();
    code.get_from(&challenge).unwrap();
    assert_eq!(code.code.0, 401);
    let nonce = Nonce::get_from_as(&challenge, ATTR_NONCE).unwrap();
    let realm = Realm::get_from_as(&challenge, ATTR_REALM).unwrap();
    assert_eq!(realm.text, REALM);

    let integrity =
        MessageIntegrity::new_long_term_integrity(USER.into(), REALM.into(), PASSWORD.into());
    let mut refresh = Message::new();
    refresh
        .build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
            Box::new(Lifetime(Duration::from_secs(1200))),
            Box::new(Username::new(stun::attributes::ATTR_USERNAME, USER.into())),
            Box::new(realm),
            Box::new(nonce),
            Box::new(integrity.clone()),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
    tap.send_to(&refresh.raw, server.addr()).await.unwrap();
    let mut ok = wait_response(&tap, &refresh.transaction_id).await;
    assert_eq!(
        ok.typ,
        MessageType::new(METHOD_REFRESH, CLASS_SUCCESS_RESPONSE),
        "{ok}"
    );
    integrity
        .check(&mut ok)
        .expect("MESSAGE-INTEGRITY of the Refresh response");
    let mut lifetime = Lifetime::default();
    lifetime.get_from(&ok).unwrap();
    assert_eq!(lifetime.0, Duration::from_secs(1200));

    // Still relaying, on the same relayed address and channel.
    let (s2, r2) = round_trips(&relay, &tap, &peer, N / 2..N, N).await;
    sent.extend(s2);
    received.extend(r2);
    assert_peer_saw(&peer, relayed, &sent);
    check_wire(&tap, peer.addr, &sent, &received, N / 2);
    assert!(log_lines(&server, &["allocation deleted"]).is_empty());
    assert_no_refusal(&server);
    assert_eq!(log_lines(&server, &["allocation created"]).len(), 1);

    timeout(NET, relay.close()).await.unwrap().unwrap();
    timeout(NET, client.close()).await.unwrap().unwrap();
    let deleted = wait_log(
        &server,
        &["allocation deleted", &format!("client=udp:{}", tap.local())],
        Duration::from_secs(3),
    )
    .await;
    assert!(
        deleted.contains("reason=\"deleted_by_client\""),
        "{deleted}"
    );
}

/// With `stale-nonce = 3`, requests made after the nonce expired get 438 with a fresh nonce.
///
/// All peers are on 127.0.0.1, so the `turn` client, which keys permissions by IP, sends no
/// new CreatePermission for a second peer, only a ChannelBind; on 438 it does not retry it but
/// falls back to Send indications (a client limitation). The test checks: the 438 and its
/// fresh NONCE; relaying to the second peer by indications both ways; the first peer's
/// channel unaffected; the client's Refresh(0) with the stale nonce refused with 438 and the
/// allocation kept; a Refresh(0) built with the `stun` crate and the fresh nonce deleting it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udp_stale_nonce_gets_438_and_a_fresh_nonce() {
    const N: usize = 6;
    let server = common::start("stale-nonce = 3");
    let tap = Tap::udp(server.addr()).await;
    let client_id = format!("client=udp:{}", tap.local());
    let (a, b) = (Peer::start(2 * N).await, Peer::start(N).await);
    let client = turn_client(server.addr(), tap.clone(), USER, PASSWORD).await;
    let relay = timeout(NET, client.allocate())
        .await
        .unwrap()
        .expect("allocate");
    let relayed = relay.local_addr().unwrap();
    let (mut sent_a, mut recv_a) = round_trips(&relay, &tap, &a, 0..N, 2 * N).await;
    assert_no_refusal(&server);
    // The nonce the client got in the Allocate challenge.
    let first_nonce = tap
        .packets(Dir::In)
        .iter()
        .filter_map(|p| decode(p))
        .find_map(|m| Nonce::get_from_as(&m, ATTR_NONCE).ok())
        .expect("a challenge with a NONCE")
        .text;

    // At least 2 s and at most 3 s after it was issued, the nonce is stale.
    tokio::time::sleep(Duration::from_millis(3200)).await;

    let (sent_b, recv_b) = round_trips(&relay, &tap, &b, 0..N, N).await;
    let stale = wait_log(
        &server,
        &["request refused", &client_id, "stale nonce"],
        NET,
    )
    .await;
    assert!(stale.contains("code=438"), "{stale}");
    assert!(stale.contains("method=\"channel_bind\""), "{stale}");
    // The 438 carries REALM and a fresh NONCE.
    let bind_req = tap
        .packets(Dir::Out)
        .iter()
        .filter_map(|p| decode(p))
        .filter(|m| m.typ == MessageType::new(METHOD_CHANNEL_BIND, CLASS_REQUEST))
        .find(|m| {
            let mut p = PeerAddress::default();
            p.get_from(m).is_ok() && SocketAddr::new(p.ip, p.port) == b.addr
        })
        .expect("a ChannelBind for the second peer");
    let res = wait_response(&tap, &bind_req.transaction_id).await;
    assert_eq!(
        res.typ,
        MessageType::new(METHOD_CHANNEL_BIND, CLASS_ERROR_RESPONSE)
    );
    let mut code = ErrorCodeAttribute::default();
    code.get_from(&res).unwrap();
    assert_eq!(code.code.0, 438);
    assert_eq!(Realm::get_from_as(&res, ATTR_REALM).unwrap().text, REALM);
    let fresh = Nonce::get_from_as(&res, ATTR_NONCE).unwrap();
    assert_ne!(fresh.text, first_nonce, "438 without a fresh nonce");

    // The first peer's channel needs no authentication and goes on working.
    let (s2, r2) = round_trips(&relay, &tap, &a, N..2 * N, 2 * N).await;
    sent_a.extend(s2);
    recv_a.extend(r2);
    assert_peer_saw(&a, relayed, &sent_a);
    assert_peer_saw(&b, relayed, &sent_b);
    check_wire(&tap, a.addr, &sent_a, &recv_a, N);
    // The second peer: indications only, both ways, byte for byte.
    for (dir, expected) in [(Dir::Out, &sent_b), (Dir::In, &recv_b)] {
        let msgs: Vec<Wire> = data_messages(&tap, dir)
            .into_iter()
            .filter(|w| matches!(w, Wire::Ind(p, _) if *p == b.addr))
            .collect();
        let payloads: Vec<Vec<u8>> = msgs.iter().map(|w| w.payload().to_vec()).collect();
        assert_eq!(
            &payloads, expected,
            "{dir:?} indications for the second peer"
        );
    }

    // The client's Refresh(0) still carries the stale nonce: refused, allocation kept.
    timeout(NET, relay.close()).await.unwrap().unwrap();
    let refused = wait_log(
        &server,
        &["request refused", &client_id, "method=\"refresh\""],
        NET,
    )
    .await;
    assert!(refused.contains("code=438"), "{refused}");
    let client_refresh = tap
        .packets(Dir::Out)
        .iter()
        .filter_map(|p| decode(p))
        .find(|m| m.typ == MessageType::new(METHOD_REFRESH, CLASS_REQUEST))
        .expect("the client's Refresh");
    let res = wait_response(&tap, &client_refresh.transaction_id).await;
    let fresh = Nonce::get_from_as(&res, ATTR_NONCE).expect("438 with a NONCE");
    assert!(log_lines(&server, &["allocation deleted"]).is_empty());

    // A Refresh(0) with the fresh nonce deletes the allocation.
    let integrity =
        MessageIntegrity::new_long_term_integrity(USER.into(), REALM.into(), PASSWORD.into());
    let mut refresh = Message::new();
    refresh
        .build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_REFRESH, CLASS_REQUEST)),
            Box::new(Lifetime(Duration::ZERO)),
            Box::new(Username::new(stun::attributes::ATTR_USERNAME, USER.into())),
            Box::new(Realm::new(ATTR_REALM, REALM.into())),
            Box::new(fresh),
            Box::new(integrity.clone()),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
    tap.send_to(&refresh.raw, server.addr()).await.unwrap();
    let mut ok = wait_response(&tap, &refresh.transaction_id).await;
    assert_eq!(
        ok.typ,
        MessageType::new(METHOD_REFRESH, CLASS_SUCCESS_RESPONSE),
        "{ok}"
    );
    integrity.check(&mut ok).expect("MESSAGE-INTEGRITY");
    let mut lifetime = Lifetime::default();
    lifetime.get_from(&ok).unwrap();
    assert_eq!(lifetime.0, Duration::ZERO);
    let deleted = wait_log(&server, &["allocation deleted", &client_id], NET).await;
    assert!(
        deleted.contains("reason=\"deleted_by_client\""),
        "{deleted}"
    );
    timeout(NET, client.close()).await.unwrap().unwrap();
    assert_eq!(
        log_lines(&server, &["request refused"]).len(),
        2,
        "{}",
        plain_log(&server)
    );
    assert!(tap.errors().is_empty(), "tap: {:?}", tap.errors());
}

/// Sends a signal (`-STOP`, `-CONT`) to the test's own server.
fn signal(pid: u32, sig: &str) {
    let st = std::process::Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .expect("kill");
    assert!(st.success(), "kill {sig} {pid}");
}

/// A request with long-term credentials, built with the `stun` crate.
fn authenticated(
    typ: MessageType,
    attrs: Vec<Box<dyn stun::message::Setter>>,
    nonce: &Nonce,
) -> Message {
    let mut all: Vec<Box<dyn stun::message::Setter>> =
        vec![Box::new(TransactionId::new()), Box::new(typ)];
    all.extend(attrs);
    all.push(Box::new(Username::new(
        stun::attributes::ATTR_USERNAME,
        USER.into(),
    )));
    all.push(Box::new(Realm::new(ATTR_REALM, REALM.into())));
    all.push(Box::new(nonce.clone()));
    all.push(Box::new(MessageIntegrity::new_long_term_integrity(
        USER.into(),
        REALM.into(),
        PASSWORD.into(),
    )));
    all.push(Box::new(FINGERPRINT));
    let mut m = Message::new();
    m.build(&all).unwrap();
    m
}

/// Allocate, CreatePermission and a Send indication written back to back without waiting
/// for the answers, as RFC 8656 allows (requests are handled in order). The Send's data must
/// reach the peer, and the peer's answer must come back in a Data indication.
///
/// Regression: the server used to relay with tokio's `try_send_to`, which returns WouldBlock
/// without making the system call until the reactor has seen the socket writable; a Send
/// handled in the same batch as the Allocate that opened the relay socket was dropped (strace
/// showed no `sendto` on the relay socket). The server is stopped while the three messages
/// are written so that it reads them in one batch every time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipelined_allocate_permission_send_is_relayed() {
    let server = common::start("");
    const ROUNDS: usize = 4;
    let pid = server.pid();
    let mut failures = Vec::new();
    for round in 0..ROUNDS {
        let tcp = round % 2 == 1;
        let tap = if tcp {
            Tap::tcp(server.addr()).await
        } else {
            Tap::udp(server.addr()).await
        };
        let peer = Peer::start(1).await;
        let peer_attr = || -> Box<dyn stun::message::Setter> {
            Box::new(PeerAddress {
                ip: peer.addr.ip(),
                port: peer.addr.port(),
            })
        };
        let transport = || -> Box<dyn stun::message::Setter> {
            Box::new(turn::proto::reqtrans::RequestedTransport {
                protocol: turn::proto::PROTO_UDP,
            })
        };
        let allocate = MessageType::new(stun::message::METHOD_ALLOCATE, CLASS_REQUEST);
        // The first Allocate only fetches a nonce.
        let mut first = Message::new();
        first
            .build(&[
                Box::new(TransactionId::new()),
                Box::new(allocate),
                transport(),
                Box::new(FINGERPRINT),
            ])
            .unwrap();
        tap.send_to(&first.raw, server.addr()).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let (n, _) = timeout(NET, tap.recv_from(&mut buf))
            .await
            .unwrap()
            .unwrap();
        let challenge = decode(&buf[..n]).expect("a challenge");
        let nonce = Nonce::get_from_as(&challenge, ATTR_NONCE).unwrap();

        let alloc = authenticated(allocate, vec![transport()], &nonce);
        let perm = authenticated(
            MessageType::new(stun::message::METHOD_CREATE_PERMISSION, CLASS_REQUEST),
            vec![peer_attr()],
            &nonce,
        );
        let mut send = Message::new();
        send.build(&[
            Box::new(TransactionId::new()),
            Box::new(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            peer_attr(),
            Box::new(Data(b"pipelined".to_vec())),
            Box::new(FINGERPRINT),
        ])
        .unwrap();
        // The server is stopped while the three are written, so that it reads them in one go
        // (without that, whether they share a batch is a race).
        signal(pid, "-STOP");
        let mut sent = Ok(());
        for m in [&alloc, &perm, &send] {
            sent = sent.and(tap.send_to(&m.raw, server.addr()).await.map(drop));
        }
        signal(pid, "-CONT");
        sent.unwrap();
        // The answers: Allocate, CreatePermission, and the Data indication.
        for _ in 0..3 {
            if timeout(Duration::from_secs(2), tap.recv_from(&mut buf))
                .await
                .is_err()
            {
                break;
            }
        }
        for (m, method) in [(&alloc, "Allocate"), (&perm, "CreatePermission")] {
            let r = response_to(&tap, &m.transaction_id)
                .unwrap_or_else(|| panic!("no {method} answer"));
            assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{method}: {r}");
        }
        let seen = peer.seen();
        let back = data_messages(&tap, Dir::In);
        if seen.len() != 1
            || seen[0].1 != b"pipelined"
            || back != [Wire::Ind(peer.addr, reply_for(b"pipelined"))]
        {
            failures.push(format!(
                "round {round} (tcp={tcp}): the peer got {seen:?}, the client {back:?}"
            ));
        }
    }
    assert!(
        failures.is_empty(),
        "{} of {ROUNDS} rounds lost the Send: {failures:#?}",
        failures.len()
    );
}
