//! RFC 8489 authentication over real sockets: the nonce cookie and PASSWORD-ALGORITHMS in the
//! 401, Allocate with PASSWORD-ALGORITHM SHA-256 and MESSAGE-INTEGRITY-SHA256 (by USERNAME
//! and by USERHASH), the response signed the same way, MD5 clients unchanged, and the
//! downgrade protection (an offer with SHA-256 removed gets 400).

mod common;

use std::net::{SocketAddr, UdpSocket};
use std::time::Duration;

use turnserver::auth::{long_term_key, long_term_key_sha256, userhash};
use turnserver::wire::{
    AttrType, Class, Integrity, MessageRef, MessageWriter, Method, TransactionId,
};

const HA1_USER: &str = "hashed";

/// How a test request is signed.
#[derive(Clone, Copy)]
struct Signing<'a> {
    user: &'a str,
    password: &'a str,
    /// Send USERHASH instead of USERNAME.
    userhash: bool,
    /// (PASSWORD-ALGORITHMS, PASSWORD-ALGORITHM) to send; `None`: neither (MD5).
    algorithms: Option<(&'a [u8], u16)>,
    /// MESSAGE-INTEGRITY-SHA256 instead of MESSAGE-INTEGRITY.
    sha256_integrity: bool,
}

const SHA256: Signing<'static> = Signing {
    user: common::USER,
    password: common::PASSWORD,
    userhash: false,
    algorithms: Some((&[0, 2, 0, 0, 0, 1, 0, 0], 2)),
    sha256_integrity: true,
};

struct Peer {
    sock: UdpSocket,
    server: SocketAddr,
    n: u8,
}

impl Peer {
    fn new(server: SocketAddr) -> Peer {
        let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Peer { sock, server, n: 0 }
    }

    fn exchange(&mut self, req: &[u8]) -> Vec<u8> {
        self.sock.send_to(req, self.server).unwrap();
        let mut r = vec![0u8; 1500];
        let n = self.sock.recv(&mut r).expect("an answer");
        r.truncate(n);
        r
    }

    /// An unauthenticated Allocate: returns (realm, nonce, PASSWORD-ALGORITHMS) of the 401.
    fn challenge(&mut self) -> (String, Vec<u8>, Vec<u8>) {
        let r = self.allocate(None, &[]);
        let m = MessageRef::parse(&r).unwrap();
        assert_eq!(m.error_code().unwrap().map(|(c, _)| c), Some(401));
        let realm = m.realm().unwrap().unwrap().to_owned();
        let nonce = m.nonce().unwrap().unwrap().to_vec();
        let offer = m
            .get(AttrType::PASSWORD_ALGORITHMS)
            .expect("offer")
            .to_vec();
        (realm, nonce, offer)
    }

    /// An Allocate signed as `s` says with `nonce`; returns the raw answer.
    fn allocate(&mut self, s: Option<Signing<'_>>, nonce: &[u8]) -> Vec<u8> {
        self.n += 1;
        let mut buf = vec![0u8; 512];
        let mut w = MessageWriter::new(
            &mut buf,
            Method::ALLOCATE,
            Class::Request,
            &TransactionId([self.n; 12]),
        );
        w.add_u32(AttrType::REQUESTED_TRANSPORT, 17 << 24);
        if let Some(s) = s {
            if s.userhash {
                w.add(AttrType::USERHASH, &userhash(s.user, common::REALM));
            } else {
                w.add(AttrType::USERNAME, s.user.as_bytes());
            }
            w.add(AttrType::REALM, common::REALM.as_bytes())
                .add(AttrType::NONCE, nonce);
            if let Some((offer, alg)) = s.algorithms {
                w.add(AttrType::PASSWORD_ALGORITHMS, offer);
                let mut v = [0u8; 4];
                v[..2].copy_from_slice(&alg.to_be_bytes());
                w.add(AttrType::PASSWORD_ALGORITHM, &v);
            }
            let key = key_of(&s);
            if s.sha256_integrity {
                w.add_integrity_sha256(&key);
            } else {
                w.add_integrity(&key);
            }
        }
        let n = w.finish().unwrap();
        self.exchange(&buf[..n])
    }
}

/// The long-term key a client derives for `s`.
fn key_of(s: &Signing<'_>) -> Vec<u8> {
    match s.algorithms {
        Some((_, 2)) => long_term_key_sha256(s.user, common::REALM, s.password).to_vec(),
        _ => long_term_key(s.user, common::REALM, s.password).to_vec(),
    }
}

fn code(r: &[u8]) -> Option<u16> {
    MessageRef::parse(r)
        .unwrap()
        .error_code()
        .unwrap()
        .map(|(c, _)| c)
}

fn start() -> common::TestServer {
    let ha1 = long_term_key(HA1_USER, common::REALM, "pw");
    let hex: String = ha1.iter().map(|b| format!("{b:02x}")).collect();
    common::start_with(&format!(
        "allow-loopback-peers = true\n[users]\n{} = \"{}\"\n{HA1_USER} = \"0x{hex}\"\n",
        common::USER,
        common::PASSWORD
    ))
}

#[test]
fn the_challenge_carries_the_nonce_cookie_and_the_offer() {
    let server = start();
    let (realm, nonce, offer) = Peer::new(server.addr()).challenge();
    assert_eq!(realm, common::REALM);
    // "obMatJos2" and the feature set: password algorithms and username anonymity.
    assert!(nonce.starts_with(b"obMatJos2wAAA"), "{nonce:?}");
    assert!(nonce.len() < 128);
    assert_eq!(offer, [0, 2, 0, 0, 0, 1, 0, 0], "SHA-256 first, then MD5");
}

#[test]
fn sha256_allocate_by_username_and_by_userhash_and_the_answer_is_signed_alike() {
    let server = start();
    for userhash in [false, true] {
        let mut p = Peer::new(server.addr());
        let (_, nonce, _) = p.challenge();
        let s = Signing { userhash, ..SHA256 };
        let r = p.allocate(Some(s), &nonce);
        assert_eq!(code(&r), None, "userhash {userhash}: {}", server.log());
        let m = MessageRef::parse(&r).unwrap();
        assert_eq!(m.integrity(), Some(Integrity::Sha256));
        assert!(
            m.verify(&key_of(&s)),
            "the success is signed with the SHA-256 key"
        );
        assert!(
            m.xor_address(AttrType::XOR_RELAYED_ADDRESS)
                .unwrap()
                .is_some()
        );
    }
}

#[test]
fn md5_clients_keep_working_with_either_integrity() {
    let server = start();
    for sha256_integrity in [false, true] {
        let mut p = Peer::new(server.addr());
        let (_, nonce, _) = p.challenge();
        let s = Signing {
            algorithms: None,
            sha256_integrity,
            ..SHA256
        };
        let r = p.allocate(Some(s), &nonce);
        assert_eq!(code(&r), None, "sha256 integrity {sha256_integrity}");
        assert!(MessageRef::parse(&r).unwrap().verify(&key_of(&s)));
    }
    // An HA1-only user: MD5 works, SHA-256 cannot (no password to derive its key).
    let mut p = Peer::new(server.addr());
    let (_, nonce, _) = p.challenge();
    let md5 = Signing {
        user: HA1_USER,
        password: "pw",
        algorithms: None,
        ..SHA256
    };
    assert_eq!(code(&p.allocate(Some(md5), &nonce)), None);
    let mut p = Peer::new(server.addr());
    let (_, nonce, _) = p.challenge();
    let sha = Signing {
        user: HA1_USER,
        password: "pw",
        ..SHA256
    };
    assert_eq!(code(&p.allocate(Some(sha), &nonce)), Some(401));
}

#[test]
fn a_tampered_offer_a_foreign_algorithm_or_a_wrong_password_is_refused() {
    let server = start();
    let cases: [(Signing<'_>, u16); 5] = [
        // SHA-256 stripped from the offer by someone in the middle: 400, not MD5.
        (
            Signing {
                algorithms: Some((&[0, 1, 0, 0], 1)),
                ..SHA256
            },
            400,
        ),
        // An algorithm the server did not offer.
        (
            Signing {
                algorithms: Some((&[0, 2, 0, 0, 0, 1, 0, 0], 3)),
                ..SHA256
            },
            400,
        ),
        // PASSWORD-ALGORITHM without the offer repeated.
        (
            Signing {
                algorithms: Some((&[], 2)),
                ..SHA256
            },
            400,
        ),
        (
            Signing {
                password: "wrong",
                ..SHA256
            },
            401,
        ),
        (
            Signing {
                user: "nobody",
                userhash: true,
                ..SHA256
            },
            401,
        ),
    ];
    for (i, (s, expected)) in cases.into_iter().enumerate() {
        let mut p = Peer::new(server.addr());
        let (_, nonce, _) = p.challenge();
        assert_eq!(
            code(&p.allocate(Some(s), &nonce)),
            Some(expected),
            "case {i}"
        );
    }
}
