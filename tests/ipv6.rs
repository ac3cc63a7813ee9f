//! IPv6 over real sockets on loopback (127.0.0.1 and ::1): an IPv6 client without
//! REQUESTED-ADDRESS-FAMILY gets an IPv4 relay (what Chromium and the `turn` crate do), one that
//! asks for IPv6 gets an IPv6 relay, dual allocation (ADDITIONAL-ADDRESS-FAMILY) relays to
//! peers of both families, and a family the server has no relay address for is refused (440,
//! or ADDRESS-ERROR-CODE in a dual allocation).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::{Client, PASSWORD, REALM, TestServer, USER};
use turnserver::wire::{
    AttrType, FAMILY_IPV4, FAMILY_IPV6, MessageRef, Method, PROTO_UDP, decode_xor_address,
};

const NET: Duration = Duration::from_secs(5);

/// A server listening on 127.0.0.1 and ::1 with the given relay addresses.
fn start(relay_ips: &str) -> TestServer {
    common::start_custom(
        |port, min, max| {
            format!(
                "listening-ips = [\"127.0.0.1\", \"::1\"]\nlistening-port = {port}\n\
                 relay-ips = [{relay_ips}]\nmin-port = {min}\nmax-port = {max}\n\
                 realm = \"{REALM}\"\nlog-level = \"debug\"\nallow-loopback-peers = true\n\
                 [users]\n{USER} = \"{PASSWORD}\"\n"
            )
        },
        &[],
    )
}

fn v6_addr(server: &TestServer) -> SocketAddr {
    SocketAddr::from((std::net::Ipv6Addr::LOCALHOST, server.port))
}

/// A UDP echo peer on `ip` that echoes until `count` datagrams or `NET` of silence.
fn echo_peer(ip: &str, count: usize) -> SocketAddr {
    let sock = UdpSocket::bind((ip, 0)).unwrap();
    sock.set_read_timeout(Some(NET)).unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 2048];
        for _ in 0..count {
            let Ok((n, from)) = sock.recv_from(&mut buf) else {
                return;
            };
            let _ = sock.send_to(&buf[..n], from);
        }
    });
    addr
}

/// Every XOR-RELAYED-ADDRESS of the client's last answer, in order.
fn relayed_addresses(c: &Client) -> Vec<SocketAddr> {
    let m = MessageRef::parse(&c.last_response).unwrap();
    m.attributes()
        .filter(|(t, _)| *t == AttrType::XOR_RELAYED_ADDRESS)
        .map(|(_, v)| decode_xor_address(v, m.transaction_id()).unwrap())
        .collect()
}

/// Sends `payload` on channel `number` and waits for the echo to come back on it.
fn round_trip(c: &mut Client, number: u16, payload: &[u8]) {
    c.send_raw(&common::channel_data(number, payload));
    let deadline = Instant::now() + NET;
    while Instant::now() < deadline {
        let Some(frame) = c.recv_raw(NET) else { break };
        if frame.len() >= 4 && u16::from_be_bytes([frame[0], frame[1]]) == number {
            let len = u16::from_be_bytes([frame[2], frame[3]]) as usize;
            assert_eq!(&frame[4..4 + len], payload);
            return;
        }
    }
    panic!("no echo on channel {number:#x}");
}

fn dual_allocate(c: &mut Client) -> Option<u16> {
    c.request(Method::ALLOCATE, |w| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, u32::from(PROTO_UDP) << 24)
            .add_u32(
                AttrType::ADDITIONAL_ADDRESS_FAMILY,
                u32::from(FAMILY_IPV6) << 24,
            );
    })
}

fn address_error(c: &Client) -> Option<(u8, u16)> {
    let m = MessageRef::parse(&c.last_response).unwrap();
    let v = m.get(AttrType::ADDRESS_ERROR_CODE)?;
    Some((v[0], u16::from(v[2]) * 100 + u16::from(v[3])))
}

/// The `turn` crate's client reaches the server over ::1 and, asking for no family, gets an
/// IPv4 relay, through which it relays to an IPv4 peer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn turn_client_over_ipv6_gets_an_ipv4_relay() {
    let server = start("\"127.0.0.1\", \"::1\"");
    let conn = Arc::new(tokio::net::UdpSocket::bind("[::1]:0").await.unwrap());
    let client = common::tap::turn_client(v6_addr(&server), conn, USER, PASSWORD).await;
    let relay = tokio::time::timeout(NET, client.allocate())
        .await
        .expect("allocate in time")
        .expect("allocate");
    let relayed = webrtc_util::Conn::local_addr(&relay).unwrap();
    assert!(
        relayed.is_ipv4() && relayed.ip().is_loopback(),
        "{relayed}\n{}",
        server.log()
    );
    let peer = echo_peer("127.0.0.1", 5);
    for i in 0..5u8 {
        let msg = [i; 40];
        webrtc_util::Conn::send_to(&relay, &msg, peer)
            .await
            .unwrap();
        let mut buf = [0u8; 128];
        let (n, from) = tokio::time::timeout(NET, webrtc_util::Conn::recv_from(&relay, &mut buf))
            .await
            .expect("echo in time")
            .unwrap();
        assert_eq!((from, &buf[..n]), (peer, &msg[..]));
    }
    client.close().await.unwrap();
}

/// Over ::1, REQUESTED-ADDRESS-FAMILY IPv6 gives an IPv6 relay that relays to an IPv6 peer;
/// an IPv4 peer on it is 443.
#[test]
fn requested_ipv6_relay_relays_to_an_ipv6_peer() {
    let server = start("\"127.0.0.1\", \"::1\"");
    let mut c = Client::udp(v6_addr(&server));
    assert_eq!(c.allocate(Some(FAMILY_IPV6)), None);
    let relayed = c.relayed().unwrap();
    assert!(relayed.is_ipv6(), "{relayed}");
    let peer = echo_peer("::1", 3);
    assert_eq!(c.bind(0x4000, peer), None);
    for i in 0..3u8 {
        round_trip(&mut c, 0x4000, &[i; 100]);
    }
    assert_eq!(c.permit(SocketAddr::from(([127, 0, 0, 1], 9))), Some(443));
}

/// Dual allocation over real sockets: one Allocate, two relayed addresses on one port, data to
/// an IPv4 and an IPv6 peer; then the IPv6 half is deleted and only IPv4 remains.
#[test]
fn dual_allocation_relays_to_both_families() {
    let server = start("\"127.0.0.1\", \"::1\"");
    let mut c = Client::udp(server.addr());
    assert_eq!(dual_allocate(&mut c), None);
    assert_eq!(address_error(&c), None);
    let relayed = relayed_addresses(&c);
    assert_eq!(relayed.len(), 2, "{relayed:?}");
    assert!(relayed[0].is_ipv4() && relayed[1].is_ipv6(), "{relayed:?}");
    assert_eq!(relayed[0].port(), relayed[1].port());

    let (p4, p6) = (echo_peer("127.0.0.1", 10), echo_peer("::1", 10));
    assert_eq!(c.bind(0x4000, p4), None);
    assert_eq!(c.bind(0x4001, p6), None);
    round_trip(&mut c, 0x4000, b"over the IPv4 relay");
    round_trip(&mut c, 0x4001, b"over the IPv6 relay");

    // A peer sending to the IPv6 relayed address reaches the client while it exists...
    let outsider = UdpSocket::bind("[::1]:0").unwrap();
    let outsider_addr = outsider.local_addr().unwrap();
    assert_eq!(c.permit(outsider_addr), None);
    outsider.send_to(b"to v6", relayed[1]).unwrap();
    let got = c.recv_raw(NET).expect("a Data indication");
    assert_eq!(MessageRef::parse(&got).unwrap().data(), Some(&b"to v6"[..]));

    // ...and not after the IPv6 half is deleted; the IPv4 half still relays.
    let code = c.request(Method::REFRESH, |w| {
        w.add_u32(AttrType::LIFETIME, 0).add_u32(
            AttrType::REQUESTED_ADDRESS_FAMILY,
            u32::from(FAMILY_IPV6) << 24,
        );
    });
    assert_eq!(code, None);
    assert!(
        server.wait_log("relayed address of a dual allocation deleted", NET),
        "{}",
        server.log()
    );
    outsider.send_to(b"gone", relayed[1]).unwrap();
    assert_eq!(c.recv_raw(Duration::from_millis(300)), None);
    round_trip(&mut c, 0x4000, b"still over IPv4");
    let code = c.request(Method::REFRESH, |w| {
        w.add_u32(
            AttrType::REQUESTED_ADDRESS_FAMILY,
            u32::from(FAMILY_IPV6) << 24,
        );
    });
    assert_eq!(code, Some(443));
}

/// A server with IPv4 relay addresses only: IPv6 is refused as RFC 8656 says.
#[test]
fn ipv4_only_relays_refuse_ipv6() {
    let server = start("\"127.0.0.1\"");
    let mut c = Client::udp(v6_addr(&server));
    assert_eq!(c.allocate(Some(FAMILY_IPV6)), Some(440));
    // Dual: the IPv4 relay is granted, the IPv6 one refused in ADDRESS-ERROR-CODE.
    assert_eq!(dual_allocate(&mut c), None);
    assert_eq!(relayed_addresses(&c).len(), 1);
    assert_eq!(address_error(&c), Some((FAMILY_IPV6, 440)));
}

/// A server with IPv6 relay addresses only: an Allocate that names no family asks for IPv4
/// and is refused (440); asking for IPv6 works.
#[test]
fn ipv6_only_relays_refuse_the_default_family() {
    let server = start("\"::1\"");
    let mut c = Client::udp(v6_addr(&server));
    assert_eq!(c.allocate(None), Some(440));
    assert_eq!(c.allocate(Some(FAMILY_IPV4)), Some(440));
    assert_eq!(dual_allocate(&mut c), Some(440));
    assert_eq!(c.allocate(Some(FAMILY_IPV6)), None);
    assert!(c.relayed().unwrap().is_ipv6());
}
