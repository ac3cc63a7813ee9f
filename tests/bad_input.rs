//! Hostile and malformed input over real sockets: the server drops or answers it and keeps
//! serving everyone else.

mod common;

use std::io::{Read, Write};
use std::net::{TcpStream, UdpSocket};
use std::time::Duration;

use turnserver::wire::{AttrType, Class, MessageRef, MessageWriter, Method, TransactionId};

/// The server still answers a Binding request over UDP with the right reflexive address.
fn still_serves(server: &common::TestServer) {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    s.send_to(&common::binding_request(0x77), server.addr())
        .unwrap();
    let mut buf = [0u8; 1500];
    let n = s.recv(&mut buf).expect("server still answers");
    let m = MessageRef::parse(&buf[..n]).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.transaction_id().0, [0x77; 12]);
    assert_eq!(
        m.xor_address(AttrType::XOR_MAPPED_ADDRESS).unwrap(),
        Some(s.local_addr().unwrap())
    );
}

#[test]
fn malformed_udp_datagrams_are_dropped_or_answered_400() {
    let server = common::start("");
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(Duration::from_millis(300)))
        .unwrap();
    let good = common::binding_request(1);
    let mut junk: Vec<Vec<u8>> = vec![
        vec![],
        vec![0],
        good[..19].to_vec(),
        vec![0xff; 1200],
        b"GET / HTTP/1.1\r\n\r\n".to_vec(),
        vec![0x40, 0x00, 0xff, 0xff, 1, 2, 3],
    ];
    let mut bad_cookie = good.clone();
    bad_cookie[4] ^= 0xff;
    junk.push(bad_cookie);
    let mut long = good.clone();
    long[2..4].copy_from_slice(&400u16.to_be_bytes());
    junk.push(long);
    // Deterministic pseudo-random datagrams, some starting like STUN.
    let mut x: u32 = 0x1234_5678;
    for i in 0..300 {
        let len = (i * 7) % 200 + 1;
        let mut d: Vec<u8> = (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                x as u8
            })
            .collect();
        if i % 2 == 0 {
            d[0] &= 0x01;
        }
        junk.push(d);
    }
    for (i, d) in junk.iter().enumerate() {
        s.send_to(d, server.addr()).unwrap();
        if i % 32 == 0 {
            // Pace the burst so the kernel does not drop it before the server sees it.
            std::thread::sleep(Duration::from_millis(2));
        }
    }
    // A request whose header is sound but whose attribute overruns the message: 400.
    let mut req = vec![0u8; 64];
    let mut w = MessageWriter::new(
        &mut req,
        Method::ALLOCATE,
        Class::Request,
        &TransactionId([9; 12]),
    );
    w.add(AttrType::SOFTWARE, b"abcd");
    let n = w.finish().unwrap();
    req.truncate(n);
    req[22..24].copy_from_slice(&0x0100u16.to_be_bytes());
    let mut buf = [0u8; 1500];
    let mut got_400 = false;
    for _ in 0..3 {
        s.send_to(&req, server.addr()).unwrap();
        while let Ok(n) = s.recv(&mut buf) {
            let m = MessageRef::parse(&buf[..n]).expect("only well-formed answers");
            assert_eq!(m.transaction_id().0, [9; 12], "junk gets no answer");
            assert_eq!(m.error_code().unwrap().map(|(c, _)| c), Some(400));
            got_400 = true;
        }
        if got_400 {
            break;
        }
    }
    assert!(got_400, "a malformed request gets 400");
    still_serves(&server);
}

#[test]
fn garbage_on_tcp_closes_that_connection_only() {
    let server = common::start("");
    // A connection that speaks something else is closed.
    let mut bad = TcpStream::connect(server.addr()).unwrap();
    bad.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    bad.write_all(&[0x16, 0x03, 0x01, 0x00, 0x10]).unwrap();
    let mut b = [0u8; 16];
    assert_eq!(
        bad.read(&mut b).unwrap_or(0),
        0,
        "connection closed by the server"
    );

    // A frame that announces more than it sends, then the peer goes away: no harm done.
    let mut partial = TcpStream::connect(server.addr()).unwrap();
    partial
        .write_all(&[0x00, 0x01, 0x00, 0x40, 0x21, 0x12])
        .unwrap();
    drop(partial);

    // A well-behaved TCP client on another connection is answered, twice in one write.
    let mut good = TcpStream::connect(server.addr()).unwrap();
    good.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut two = common::binding_request(1);
    two.extend_from_slice(&common::binding_request(2));
    good.write_all(&two).unwrap();
    let mut got = Vec::new();
    let mut buf = [0u8; 1500];
    while got.len() < 2 {
        let n = good.read(&mut buf).unwrap();
        assert!(n > 0);
        let mut off = 0;
        while off < n {
            let len = 20 + u16::from_be_bytes([buf[off + 2], buf[off + 3]]) as usize;
            let m = MessageRef::parse(&buf[off..off + len]).unwrap();
            assert_eq!(m.class(), Class::Success);
            got.push(m.transaction_id().0[0]);
            off += len;
        }
    }
    assert_eq!(got, vec![1, 2]);
    still_serves(&server);
    // The log line comes through a pipe: give it a moment.
    assert!(
        server.wait_log("connection closed", Duration::from_secs(3)),
        "{}",
        server.log()
    );
}
