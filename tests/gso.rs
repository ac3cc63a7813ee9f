//! UDP segmentation offload on the relay path: datagrams that queue up while the server is
//! stopped (SIGSTOP) are drained in one batch when it resumes (SIGCONT), so each direction's
//! run of same-size datagrams leaves as one GSO send (over TCP: frames read together leave
//! for the peer as runs, and datagrams for the client are written together). Every datagram must arrive whole and in
//! order, and the metrics must count the GSO sends; with `udp-gso = false` the same traffic
//! goes out datagram by datagram.

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use common::{Client, TestServer, channel_data, http_get, metric};

const CHANNEL: u16 = 0x4000;
/// Full-size datagrams per direction, then one shorter (GSO allows a short last segment).
const RUN: usize = 40;

fn start(gso: bool) -> (TestServer, u16) {
    for _ in 0..5 {
        let port = common::free_tcp_port(0);
        let s = common::start(&format!(
            "prometheus-port = {port}\nworkers = 1\nudp-gso = {gso}"
        ));
        if s.wait_log("self-test page", Duration::from_secs(2)) {
            return (s, port);
        }
    }
    panic!("no metrics listener");
}

/// Waits until every thread of `pid` is stopped (state `T`): a stop signal takes effect
/// asynchronously, and a thread still running would drain datagrams one by one.
fn wait_stopped(pid: u32) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stopped = std::fs::read_dir(format!("/proc/{pid}/task"))
            .expect("proc")
            .filter_map(Result::ok)
            .all(|t| {
                std::fs::read_to_string(t.path().join("stat")).is_ok_and(|s| {
                    s.rsplit_once(')')
                        .is_some_and(|(_, rest)| rest.trim_start().starts_with('T'))
                })
            });
        if stopped {
            return;
        }
        assert!(Instant::now() < deadline, "server threads did not stop");
        std::thread::sleep(Duration::from_millis(5));
    }
}

fn scrape(port: u16, sample: &str) -> f64 {
    let (status, body) = http_get(port, "/metrics");
    assert_eq!(status, 200, "{body}");
    metric(&body, sample).unwrap_or_else(|| panic!("{sample} missing from:\n{body}"))
}

/// Payload `k` of the run in one direction: `len` bytes, each the sequence number mixed with
/// the direction tag, so that a swapped, shortened or merged datagram shows.
fn payload(tag: u8, k: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| (k as u8) ^ tag ^ (i as u8)).collect()
}

fn len_of(k: usize, full: usize) -> usize {
    if k == RUN { full / 3 } else { full }
}

/// Relays a run each way while the server is stopped; checks order and contents. Returns the
/// GSO sends and datagrams the metrics counted.
fn burst_both_ways(gso: bool, tcp: bool) -> (f64, f64, bool) {
    let (server, port) = start(gso);
    let offered = server.log().contains("gso_segments=64");
    let peer = UdpSocket::bind("127.0.0.1:0").unwrap();
    peer.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut c = if tcp {
        Client::tcp(server.addr())
    } else {
        Client::udp(server.addr())
    };
    assert_eq!(c.allocate(None), None, "allocate");
    assert_eq!(
        c.bind(CHANNEL, peer.local_addr().unwrap()),
        None,
        "channel bind"
    );
    // One datagram each way first: the peer learns the relayed address.
    c.send_raw(&channel_data(CHANNEL, b"hello"));
    let mut buf = vec![0u8; 65_536];
    let (n, relay): (usize, SocketAddr) = peer.recv_from(&mut buf).expect("first datagram");
    assert_eq!(&buf[..n], b"hello");

    server.signal("STOP");
    wait_stopped(server.pid());
    for k in 0..=RUN {
        c.send_raw(&channel_data(CHANNEL, &payload(0x55, k, len_of(k, 300))));
        peer.send_to(&payload(0xAA, k, len_of(k, 600)), relay)
            .unwrap();
    }
    std::thread::sleep(Duration::from_millis(100));
    server.signal("CONT");

    for k in 0..=RUN {
        let n = peer
            .recv(&mut buf)
            .unwrap_or_else(|e| panic!("datagram {k}: {e}"));
        assert_eq!(
            &buf[..n],
            &payload(0x55, k, len_of(k, 300))[..],
            "datagram {k} to the peer"
        );
    }
    for k in 0..=RUN {
        let frame = c
            .recv_raw(Duration::from_secs(5))
            .unwrap_or_else(|| panic!("frame {k} to the client"));
        assert_eq!(
            frame,
            channel_data(CHANNEL, &payload(0xAA, k, len_of(k, 600))),
            "frame {k} to the client"
        );
    }
    let sends = scrape(port, "turnserver_udp_gso_sends_total");
    let datagrams = scrape(port, "turnserver_udp_gso_datagrams_total");
    (sends, datagrams, offered)
}

#[test]
fn queued_runs_leave_as_gso_sends_whole_and_in_order() {
    let (sends, datagrams, offered) = burst_both_ways(true, false);
    if !offered {
        eprintln!("skipping the GSO counts: this kernel offers no UDP segmentation offload");
        return;
    }
    // Each direction's run of RUN + 1 datagrams went out in one send.
    assert_eq!(sends, 2.0, "GSO sends");
    assert_eq!(datagrams, 2.0 * (RUN + 1) as f64, "datagrams in GSO sends");
}

#[test]
fn with_udp_gso_off_every_datagram_goes_alone() {
    let (sends, datagrams, _) = burst_both_ways(false, false);
    assert_eq!(sends, 0.0);
    assert_eq!(datagrams, 0.0);
}

/// Over TCP the frames a client wrote while the server was stopped are read several per
/// read and their payloads leave for the peer as GSO runs; the peer's datagrams are gathered
/// into one write per batch towards the client. Both arrive whole and in order.
#[test]
fn tcp_frames_are_relayed_in_runs_and_gathered_writes() {
    let (sends, datagrams, offered) = burst_both_ways(true, true);
    if !offered {
        eprintln!("skipping the GSO counts: this kernel offers no UDP segmentation offload");
        return;
    }
    assert!(sends >= 1.0, "GSO sends: {sends}");
    assert!(
        datagrams >= 2.0 * sends,
        "{datagrams} datagrams in {sends} sends"
    );
}
