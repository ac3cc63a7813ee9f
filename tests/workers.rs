//! Several relay threads (`workers`): clients spread over them, every client's relay works
//! whichever thread serves it, and what must be global is: quotas, and EVEN-PORT reservations
//! redeemed by a client another thread serves.

mod common;

use std::collections::HashSet;
use std::time::Duration;

use common::{Client, channel_data};
use turnserver::wire::{AttrType, MessageRef, Method, PROTO_UDP};

const CHANNEL: u16 = 0x4000;

/// The relay threads that logged "allocation created" lines (thread names `relay-N`).
fn threads_that_allocated(log: &str) -> HashSet<String> {
    log.lines()
        .filter(|l| l.contains("allocation created"))
        .filter_map(|l| l.split_whitespace().find(|w| w.starts_with("relay-")))
        .map(str::to_owned)
        .collect()
}

#[test]
fn clients_spread_over_threads_and_all_relay() {
    let server = common::start("workers = 4");
    let peer = common::udp_echo_peer(10_000, Duration::from_secs(10));
    let mut clients = Vec::new();
    for _ in 0..32 {
        let mut c = Client::udp(server.addr());
        assert_eq!(c.allocate(None), None);
        assert_eq!(c.bind(CHANNEL, peer), None);
        clients.push(c);
    }
    for (i, c) in clients.iter_mut().enumerate() {
        for seq in 0..10u32 {
            let payload = [i as u32, seq].map(u32::to_be_bytes).concat();
            c.send_raw(&channel_data(CHANNEL, &payload));
            let echo = c.recv_raw(Duration::from_secs(2)).expect("an echo");
            assert_eq!(&echo[4..4 + payload.len()], &payload[..], "client {i}");
        }
    }
    // TCP clients too (a connection stays with the thread that accepted it).
    for i in 0..8u32 {
        let mut c = Client::tcp(server.addr());
        assert_eq!(c.allocate(None), None);
        assert_eq!(c.bind(CHANNEL, peer), None);
        let payload = i.to_be_bytes();
        c.send_raw(&channel_data(CHANNEL, &payload));
        let echo = c.recv_raw(Duration::from_secs(2)).expect("an echo");
        assert_eq!(&echo[4..8], &payload[..]);
    }
    assert!(server.wait_log("allocation created", Duration::from_secs(2)));
    std::thread::sleep(Duration::from_millis(100));
    let threads = threads_that_allocated(&server.log());
    // 40 clients over 4 threads: all on one thread would mean the listeners are not shared.
    assert!(threads.len() >= 2, "allocations only on {threads:?}");
}

#[test]
fn quotas_count_across_threads() {
    let server = common::start("workers = 4\nuser-quota = 10");
    let mut granted = 0;
    let mut refused = 0;
    let mut keep = Vec::new();
    for _ in 0..24 {
        let mut c = Client::udp(server.addr());
        match c.allocate(None) {
            None => granted += 1,
            Some(486) => refused += 1,
            other => panic!("{other:?}"),
        }
        keep.push(c);
    }
    assert_eq!((granted, refused), (10, 14));
}

#[test]
fn even_port_reservations_are_redeemed_on_any_thread() {
    let server = common::start("workers = 4");
    for pair in 0..12 {
        let mut rtp = Client::udp(server.addr());
        assert_eq!(
            rtp.request(Method::ALLOCATE, |w| {
                w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
                    .add(AttrType::EVEN_PORT, &[0x80]);
            }),
            None,
            "pair {pair}: EVEN-PORT with R"
        );
        let first = rtp.relayed().unwrap();
        assert_eq!(first.port() % 2, 0);
        let token = MessageRef::parse(&rtp.last_response)
            .unwrap()
            .reservation_token()
            .unwrap()
            .expect("a RESERVATION-TOKEN");
        // Another socket (so, most of the time, another thread) redeems it.
        let mut rtcp = Client::udp(server.addr());
        assert_eq!(
            rtcp.request(Method::ALLOCATE, |w| {
                w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
                    .add(AttrType::RESERVATION_TOKEN, &token);
            }),
            None,
            "pair {pair}: the token is honoured whichever thread serves the redeeming client"
        );
        assert_eq!(rtcp.relayed().unwrap().port(), first.port() + 1);
        // And the adopted socket relays.
        let peer = common::udp_echo_peer(10, Duration::from_secs(5));
        assert_eq!(rtcp.bind(CHANNEL, peer), None);
        rtcp.send_raw(&channel_data(CHANNEL, b"rtcp"));
        let echo = rtcp.recv_raw(Duration::from_secs(2)).expect("an echo");
        assert_eq!(&echo[4..8], b"rtcp");
    }
}
