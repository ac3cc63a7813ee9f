//! Codec microbenchmarks: parsing a signed Allocate request, writing a signed success response,
//! checking MESSAGE-INTEGRITY (SHA-1 and SHA-256) and FINGERPRINT, and telling ChannelData from
//! STUN. `cargo bench --bench codec -- --quick` for a short run.

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use turnserver::auth::long_term_key;
use turnserver::wire::{
    self, AttrType, ChannelData, ChannelNumber, Class, MessageRef, MessageWriter, Method,
    PROTO_UDP, TransactionId,
};

const USER: &str = "alice";
const REALM: &str = "bench.local";
const NONCE: &[u8] = b"0000000065f1e2d3a1b2c3d4e5f60718293a4b5c";

fn key() -> [u8; 16] {
    long_term_key(USER, REALM, "wonderland")
}

/// A signed Allocate request as a WebRTC client sends it: REQUESTED-TRANSPORT, LIFETIME,
/// USERNAME, REALM, NONCE, then MESSAGE-INTEGRITY (or -SHA256) and FINGERPRINT.
fn allocate_request(sha256: bool) -> Vec<u8> {
    let mut buf = vec![0u8; 512];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::ALLOCATE,
        Class::Request,
        &TransactionId([7; 12]),
    );
    w.add_u32(AttrType::REQUESTED_TRANSPORT, u32::from(PROTO_UDP) << 24)
        .add_u32(AttrType::LIFETIME, 600)
        .add(AttrType::USERNAME, USER.as_bytes())
        .add(AttrType::REALM, REALM.as_bytes())
        .add(AttrType::NONCE, NONCE);
    if sha256 {
        w.add_integrity_sha256(&key());
    } else {
        w.add_integrity(&key());
    }
    w.add_fingerprint();
    let n = w.finish().unwrap();
    buf.truncate(n);
    buf
}

fn codec(c: &mut Criterion) {
    let req = allocate_request(false);
    let req256 = allocate_request(true);
    let key = key();
    assert!(MessageRef::parse(&req).unwrap().verify_integrity(&key));
    assert!(
        MessageRef::parse(&req256)
            .unwrap()
            .verify_integrity_sha256(&key)
    );

    c.bench_function("parse_allocate_request", |b| {
        b.iter(|| MessageRef::parse(black_box(&req)).unwrap().method())
    });

    let relayed: SocketAddr = "127.0.0.1:49152".parse().unwrap();
    let mapped: SocketAddr = "127.1.2.3:40000".parse().unwrap();
    let mut out = [0u8; 512];
    c.bench_function("write_allocate_success", |b| {
        b.iter(|| {
            let mut w = MessageWriter::new(
                &mut out,
                Method::ALLOCATE,
                Class::Success,
                black_box(&TransactionId([7; 12])),
            );
            w.add_xor_address(AttrType::XOR_RELAYED_ADDRESS, black_box(relayed))
                .add_u32(AttrType::LIFETIME, 600)
                .add_xor_address(AttrType::XOR_MAPPED_ADDRESS, black_box(mapped))
                .add(AttrType::SOFTWARE, b"turnserver 0.1.0")
                .add_integrity(black_box(&key))
                .add_fingerprint();
            w.finish().unwrap()
        })
    });

    let m = MessageRef::parse(&req).unwrap();
    c.bench_function("verify_integrity_sha1", |b| {
        b.iter(|| assert!(black_box(&m).verify_integrity(black_box(&key))))
    });
    let m256 = MessageRef::parse(&req256).unwrap();
    c.bench_function("verify_integrity_sha256", |b| {
        b.iter(|| assert!(black_box(&m256).verify_integrity_sha256(black_box(&key))))
    });
    c.bench_function("verify_fingerprint", |b| {
        b.iter(|| assert_eq!(black_box(&m).fingerprint_valid(), Some(true)))
    });

    let mut frame = [0u8; 4 + 100];
    let mut hdr = [0u8; 4];
    ChannelData::write_header(&mut hdr, ChannelNumber::new(0x4000).unwrap(), 100);
    frame[..4].copy_from_slice(&hdr);
    c.bench_function("classify_and_parse_channel_data", |b| {
        b.iter(|| {
            let f = black_box(&frame[..]);
            match wire::classify(f) {
                wire::Kind::ChannelData => ChannelData::parse(f).unwrap().payload.len(),
                _ => unreachable!(),
            }
        })
    });
}

criterion_group!(benches, codec);
criterion_main!(benches);
