//! The core's relay paths, measured without sockets: `Server::handle_client` with a ChannelData
//! frame (and a Send indication) from a client whose channel is bound, and
//! `Server::handle_peer` with a datagram from a permitted peer (with a channel: ChannelData
//! header written in place; without: a Data indication). The state is built through the
//! public API: 401, signed Allocate, CreatePermission, ChannelBind.
//! `cargo bench --bench relay_path -- --quick` for a short run.

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, criterion_group, criterion_main};
use turnserver::auth::{Users, long_term_key};
use turnserver::core::{
    ClientAction, ClientId, PeerAction, RelaySockets, Server, ServerConfig, Transport,
};
use turnserver::wire::{
    self, AttrType, ChannelData, ChannelNumber, Class, MessageRef, MessageWriter, Method,
    PROTO_UDP, TransactionId,
};

const USER: &str = "alice";
const PASS: &str = "wonderland";
const REALM: &str = "bench.local";
const CHANNEL: u16 = 0x4000;

/// Relay sockets that always bind.
struct Relays;

impl RelaySockets for Relays {
    fn open(&mut self, _: SocketAddr) -> bool {
        true
    }
    fn close(&mut self, _: SocketAddr) {}
}

struct Setup {
    server: Server,
    now: Instant,
    client: ClientId,
    relay: SocketAddr,
    peer: SocketAddr,
}

fn request(
    s: &mut Server,
    now: Instant,
    client: ClientId,
    method: Method,
    nonce: Option<&[u8]>,
    add: impl Fn(&mut MessageWriter),
) -> Vec<u8> {
    let mut buf = [0u8; 512];
    let mut w = MessageWriter::new(&mut buf, method, Class::Request, &TransactionId([9; 12]));
    add(&mut w);
    if let Some(nonce) = nonce {
        w.add(AttrType::USERNAME, USER.as_bytes())
            .add(AttrType::REALM, REALM.as_bytes())
            .add(AttrType::NONCE, nonce)
            .add_integrity(&long_term_key(USER, REALM, PASS));
    }
    w.add_fingerprint();
    let n = w.finish().unwrap();
    let mut out = [0u8; 2048];
    match s.handle_client(now, client, &buf[..n], &mut out, &mut Relays) {
        ClientAction::Reply(n) => out[..n].to_vec(),
        other => panic!("expected a reply, got {other:?}"),
    }
}

fn setup(bind_channel: bool) -> Setup {
    let mut users = Users::new(REALM);
    users.add_password(USER, PASS);
    let mut cfg = ServerConfig::new("127.0.0.1".parse().unwrap(), Some(users));
    cfg.allow_loopback_peers = true;
    cfg.min_port = 40000;
    cfg.max_port = 40999;
    let now = Instant::now();
    let mut server = Server::new(cfg, [7; 32], 42, now);
    let client = ClientId {
        transport: Transport::Udp,
        remote: "127.1.0.1:50000".parse().unwrap(),
        local: "127.0.0.1:3478".parse().unwrap(),
    };
    let peer: SocketAddr = "127.0.0.1:7000".parse().unwrap();
    let transport = |w: &mut MessageWriter| {
        w.add_u32(AttrType::REQUESTED_TRANSPORT, u32::from(PROTO_UDP) << 24);
    };
    let r = request(&mut server, now, client, Method::ALLOCATE, None, transport);
    let m = MessageRef::parse(&r).unwrap();
    assert_eq!(m.error_code().unwrap().map(|(c, _)| c), Some(401));
    let nonce = m.nonce().unwrap().unwrap().to_vec();
    let r = request(
        &mut server,
        now,
        client,
        Method::ALLOCATE,
        Some(&nonce),
        transport,
    );
    let m = MessageRef::parse(&r).unwrap();
    let relay = m
        .xor_address(AttrType::XOR_RELAYED_ADDRESS)
        .unwrap()
        .expect("allocated");
    let r = request(
        &mut server,
        now,
        client,
        Method::CREATE_PERMISSION,
        Some(&nonce),
        |w| {
            w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        },
    );
    assert_eq!(MessageRef::parse(&r).unwrap().class(), Class::Success);
    if bind_channel {
        let r = request(
            &mut server,
            now,
            client,
            Method::CHANNEL_BIND,
            Some(&nonce),
            |w| {
                w.add_u32(AttrType::CHANNEL_NUMBER, u32::from(CHANNEL) << 16)
                    .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
            },
        );
        assert_eq!(MessageRef::parse(&r).unwrap().class(), Class::Success);
    }
    Setup {
        server,
        now,
        client,
        relay,
        peer,
    }
}

fn relay_path(c: &mut Criterion) {
    let mut g = c.benchmark_group("relay_path");
    for size in [100usize, 1200] {
        // Client to peer, ChannelData.
        let mut s = setup(true);
        let mut frame = vec![0u8; 4 + size];
        let mut hdr = [0u8; 4];
        ChannelData::write_header(&mut hdr, ChannelNumber::new(CHANNEL).unwrap(), size as u16);
        frame[..4].copy_from_slice(&hdr);
        let mut out = [0u8; 2048];
        assert!(matches!(
            s.server
                .handle_client(s.now, s.client, &frame, &mut out, &mut Relays),
            ClientAction::Forward { .. }
        ));
        g.bench_with_input(
            BenchmarkId::new("client_channel_data", size),
            &frame,
            |b, frame| {
                b.iter(|| {
                    s.server.handle_client(
                        s.now,
                        black_box(s.client),
                        black_box(frame),
                        &mut out,
                        &mut Relays,
                    )
                })
            },
        );

        // Peer to client, on the bound channel: the ChannelData header is written in place.
        let mut buf = vec![0u8; wire::HEADROOM + size + wire::TAILROOM];
        let payload = wire::HEADROOM..wire::HEADROOM + size;
        assert!(matches!(
            s.server
                .handle_peer(s.now, s.relay, s.peer, &mut buf, payload.clone()),
            PeerAction::Forward { .. }
        ));
        g.bench_function(BenchmarkId::new("peer_to_channel", size), |b| {
            b.iter(|| {
                s.server.handle_peer(
                    s.now,
                    black_box(s.relay),
                    black_box(s.peer),
                    &mut buf,
                    payload.clone(),
                )
            })
        });

        // The same without a channel: Send indication in, Data indication out.
        let mut s = setup(false);
        let mut send = vec![0u8; size + 64];
        let n = {
            let data = vec![0u8; size];
            let mut w = MessageWriter::new(
                &mut send,
                Method::SEND,
                Class::Indication,
                &TransactionId([3; 12]),
            );
            w.add_xor_address(AttrType::XOR_PEER_ADDRESS, s.peer)
                .add(AttrType::DATA, &data);
            w.finish().unwrap()
        };
        send.truncate(n);
        assert!(matches!(
            s.server
                .handle_client(s.now, s.client, &send, &mut out, &mut Relays),
            ClientAction::Forward { .. }
        ));
        g.bench_with_input(
            BenchmarkId::new("client_send_indication", size),
            &send,
            |b, send| {
                b.iter(|| {
                    s.server.handle_client(
                        s.now,
                        black_box(s.client),
                        black_box(send),
                        &mut out,
                        &mut Relays,
                    )
                })
            },
        );
        assert!(matches!(
            s.server
                .handle_peer(s.now, s.relay, s.peer, &mut buf, payload.clone()),
            PeerAction::Forward { .. }
        ));
        g.bench_function(BenchmarkId::new("peer_data_indication", size), |b| {
            b.iter(|| {
                s.server.handle_peer(
                    s.now,
                    black_box(s.relay),
                    black_box(s.peer),
                    &mut buf,
                    payload.clone(),
                )
            })
        });
    }
    g.finish();
}

criterion_group!(benches, relay_path);
criterion_main!(benches);
