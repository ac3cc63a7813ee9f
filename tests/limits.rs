//! Limits over real sockets: the cap on TCP connections, idle connections closed, quotas
//! answered with 486, operator peer lists answered with 403.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use common::Client;
use turnserver::wire::MessageRef;

/// Waits (boundedly) for the server to log `needle`.
fn logged(server: &common::TestServer, needle: &str) -> bool {
    let deadline = Instant::now() + Duration::from_secs(3);
    while Instant::now() < deadline {
        if server.log().contains(needle) {
            return true;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// Reads until the server closes the connection (read returns 0 or fails) or `within` passes.
fn closed_within(s: &mut TcpStream, within: Duration) -> bool {
    s.set_read_timeout(Some(within)).unwrap();
    let mut b = [0u8; 512];
    let start = Instant::now();
    loop {
        match s.read(&mut b) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return true,
            Err(_) => return false,
        }
        if start.elapsed() > within {
            return false;
        }
    }
}

fn answers_binding(s: &mut TcpStream, id: u8) -> bool {
    s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    if s.write_all(&common::binding_request(id)).is_err() {
        return false;
    }
    let mut b = [0u8; 512];
    match s.read(&mut b) {
        Ok(n) if n >= 20 => {
            MessageRef::parse(&b[..n]).is_ok_and(|m| m.transaction_id().0 == [id; 12])
        }
        _ => false,
    }
}

#[test]
fn connections_beyond_max_connections_are_closed() {
    let server = common::start("max-connections = 3");
    let mut open: Vec<TcpStream> = (0..3)
        .map(|_| TcpStream::connect(server.addr()).unwrap())
        .collect();
    for (i, s) in open.iter_mut().enumerate() {
        assert!(answers_binding(s, i as u8), "connection {i} is served");
    }
    let mut extra = TcpStream::connect(server.addr()).unwrap();
    assert!(
        closed_within(&mut extra, Duration::from_secs(3)),
        "the fourth is closed"
    );
    // Once one goes, a new connection is served again.
    drop(open.pop());
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut again = TcpStream::connect(server.addr()).unwrap();
        if answers_binding(&mut again, 9) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no room after a connection closed"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    // UDP is not affected by the stream cap.
    let u = UdpSocket::bind("127.0.0.1:0").unwrap();
    u.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    u.send_to(&common::binding_request(7), server.addr())
        .unwrap();
    let mut b = [0u8; 512];
    assert!(u.recv(&mut b).is_ok());
}

#[test]
fn idle_connections_without_allocation_are_closed() {
    let server = common::start("idle-connection-timeout = 1");
    let mut silent = TcpStream::connect(server.addr()).unwrap();
    // A connection that sent half a frame and stalled is idle too.
    let mut stalled = TcpStream::connect(server.addr()).unwrap();
    stalled.write_all(&[0x00, 0x01, 0x00, 0x10, 0x21]).unwrap();
    let started = Instant::now();
    assert!(closed_within(&mut silent, Duration::from_secs(4)));
    assert!(closed_within(&mut stalled, Duration::from_secs(4)));
    assert!(started.elapsed() >= Duration::from_millis(900));
    assert!(logged(&server, "reason=\"idle\""), "{}", server.log());
}

#[test]
fn quotas_answer_486() {
    let server = common::start("user-quota = 2");
    let mut clients: Vec<Client> = (0..3).map(|_| Client::udp(server.addr())).collect();
    assert_eq!(clients[0].allocate(None), None);
    assert_eq!(clients[1].allocate(None), None);
    assert_eq!(clients[2].allocate(None), Some(486));
    assert!(logged(&server, "user quota reached"));
}

#[test]
fn operator_peer_lists_answer_403() {
    let server = common::start_with(&format!(
        "denied-peer-ips = [\"8.8.8.0/24\"]\nallowed-peer-ips = [\"10.77.0.0/16\"]\n[users]\n{} = \"{}\"\n",
        common::USER,
        common::PASSWORD
    ));
    let mut c = Client::udp(server.addr());
    assert_eq!(c.allocate(None), None);
    let permit = |c: &mut Client, peer: &str| c.permit(peer.parse().unwrap());
    assert_eq!(permit(&mut c, "10.77.3.4:1000"), None);
    assert_eq!(permit(&mut c, "10.78.3.4:1000"), Some(403));
    assert_eq!(permit(&mut c, "8.8.8.8:53"), Some(403));
    // Loopback (allow-loopback-peers is off); 127.0.0.1 itself is the relay address, which is
    // allowed on relay ports only.
    assert_eq!(permit(&mut c, "127.0.0.2:5000"), Some(403));
    assert_eq!(permit(&mut c, "[::ffff:127.0.0.2]:5000"), Some(443));
    assert_eq!(permit(&mut c, "1.1.1.1:53"), None);
}
