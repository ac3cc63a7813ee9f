//! ALTERNATE-SERVER (RFC 8489 10): with `alternate-servers` set, an authenticated Allocate is
//! answered 300 (Try Alternate) naming the next server of the client's family, signed with the
//! client's key; unauthenticated requests still get 401, other requests are served. (The
//! rotation is per relay thread; one thread here.)

mod common;

use std::net::SocketAddr;

use common::Client;
use turnserver::wire::{AttrType, MessageRef};

/// ALTERNATE-SERVER of a raw answer (a plain address attribute: family, port, address).
fn alternate(answer: &[u8]) -> Option<SocketAddr> {
    let m = MessageRef::parse(answer).ok()?;
    let v = m.get(AttrType::ALTERNATE_SERVER)?;
    let port = u16::from_be_bytes([v[2], v[3]]);
    match v[1] {
        0x01 => Some(SocketAddr::from(([v[4], v[5], v[6], v[7]], port))),
        0x02 => {
            let ip: [u8; 16] = v[4..20].try_into().ok()?;
            Some(SocketAddr::from((ip, port)))
        }
        _ => None,
    }
}

#[test]
fn authenticated_allocations_are_sent_to_the_alternates_in_turn() {
    let server = common::start(
        "alternate-servers = [\"127.0.0.2:4000\", \"127.0.0.3\", \"[::1]:4002\"]\n\
         tls-alternate-servers = [\"127.0.0.9\"]\nworkers = 1",
    );
    let key = turnserver::auth::long_term_key(common::USER, common::REALM, common::PASSWORD);
    let mut seen = Vec::new();
    for tcp in [false, false, true, true] {
        let mut c = if tcp {
            Client::tcp(server.addr())
        } else {
            Client::udp(server.addr())
        };
        assert_eq!(c.allocate(None), Some(300), "tcp {tcp}");
        let answer = c.last_response.clone();
        let to = alternate(&answer).expect("ALTERNATE-SERVER");
        assert!(to.is_ipv4(), "the client's family only: {to}");
        assert!(
            MessageRef::parse(&answer).unwrap().verify(&key),
            "the 300 is signed with the client's key"
        );
        seen.push(to);
    }
    let expected: Vec<SocketAddr> = vec![
        "127.0.0.3:3478".parse().unwrap(),
        "127.0.0.2:4000".parse().unwrap(),
    ];
    assert_eq!(
        &seen[..2],
        &expected[..],
        "in turn, port 3478 when left out"
    );
    assert_eq!(&seen[2..], &expected[..]);
    // No relay was allocated, and Binding is served as usual.
    let mut c = Client::udp(server.addr());
    c.send_raw(&common::binding_request(7));
    let r = c
        .recv_raw(std::time::Duration::from_secs(2))
        .expect("binding answer");
    assert_eq!(MessageRef::parse(&r).unwrap().error_code().unwrap(), None);
}

#[test]
fn unauthenticated_allocations_are_challenged_not_redirected() {
    let server = common::start("alternate-servers = [\"127.0.0.2:4000\"]");
    let mut c = Client::udp(server.addr());
    c.password = "wrong".into();
    assert_eq!(c.allocate(None), Some(401));
    assert_eq!(alternate(&c.last_response), None);
}
