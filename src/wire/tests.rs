//! Codec tests: RFC 5769 vectors byte for byte, round trips, and malformed input.

use super::*;
use std::net::SocketAddr;

const TXID_A: TransactionId = TransactionId([
    0xb7, 0xe7, 0xa7, 0x01, 0xbc, 0x34, 0xd6, 0x86, 0xfa, 0x87, 0xdf, 0xae,
]);
const PASSWORD: &[u8] = b"VOkJxbRl1RmTxUk/WvJxBt";

fn hex(s: &str) -> Vec<u8> {
    let s: String = s.chars().filter(|c| c.is_ascii_hexdigit()).collect();
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

/// RFC 5769 2.1.
fn sample_request() -> Vec<u8> {
    hex("0001 0058 2112a442 b7e7a701 bc34d686 fa87dfae
         8022 0010 5354554e 20746573 7420636c 69656e74
         0024 0004 6e0001ff
         8029 0008 932ff9b1 51263b36
         0006 0009 6576746a 3a683676 59202020
         0008 0014 9aeaa70c bfd8cb56 781ef2b5 b2d3f249 c1b571a2
         8028 0004 e57a3bcf")
}

/// RFC 5769 2.2.
fn sample_ipv4_response() -> Vec<u8> {
    hex("0101 003c 2112a442 b7e7a701 bc34d686 fa87dfae
         8022 000b 74657374 20766563 746f7220
         0020 0008 0001a147 e112a643
         0008 0014 2b91f599 fd9e90c3 8c7489f9 2af9ba53 f06be7d7
         8028 0004 c07d4c96")
}

/// RFC 5769 2.3.
fn sample_ipv6_response() -> Vec<u8> {
    hex("0101 0048 2112a442 b7e7a701 bc34d686 fa87dfae
         8022 000b 74657374 20766563 746f7220
         0020 0014 0002a147 0113a9fa a5d3f179 bc25f4b5 bed2b9d9
         0008 0014 a382954e 4be67bf1 1784c97c 8292c275 bfe3ed41
         8028 0004 c8fb0b4c")
}

/// RFC 5769 2.4.
fn sample_long_term_request() -> Vec<u8> {
    hex("0001 0060 2112a442 78ad3433 c6ad72c0 29da412e
         0006 0012 e3839ee3 8388e383 aae38383 e382afe3 82b90000
         0015 001c 662f2f34 39396b39 35346436 4f4c3334 6f4c3946 53547679 36347341
         0014 000b 6578616d 706c652e 6f726700
         0008 0014 f6702465 6dd64a3e 02b8e071 2e85c9a2 8ca89666")
}

fn long_term_key() -> [u8; 16] {
    crate::auth::long_term_key("マトリックス", "example.org", "TheMatrIX")
}

#[test]
fn rfc5769_sample_request_parses_and_verifies() {
    let buf = sample_request();
    let m = MessageRef::parse(&buf).unwrap();
    assert_eq!(m.method(), Method::BINDING);
    assert_eq!(m.class(), Class::Request);
    assert_eq!(m.transaction_id(), &TXID_A);
    assert_eq!(m.software().unwrap(), Some("STUN test client"));
    assert_eq!(m.username().unwrap(), Some("evtj:h6vY"));
    assert_eq!(
        m.get(AttrType::PRIORITY),
        Some(&[0x6e, 0x00, 0x01, 0xff][..])
    );
    assert_eq!(m.integrity(), Some(Integrity::Sha1));
    assert!(m.verify_integrity(PASSWORD));
    assert!(!m.verify_integrity(b"wrong"));
    assert_eq!(m.fingerprint_valid(), Some(true));
    let mut unknown = [0u16; 8];
    assert_eq!(m.unknown_required(&mut unknown), 0);
}

#[test]
fn rfc5769_sample_request_written_byte_for_byte() {
    let mut out = [0u8; 256];
    let mut w = MessageWriter::new(&mut out, Method::BINDING, Class::Request, &TXID_A);
    w.set_padding(0x20)
        .add(AttrType::SOFTWARE, b"STUN test client")
        .add(AttrType::PRIORITY, &[0x6e, 0x00, 0x01, 0xff])
        .add(
            AttrType::ICE_CONTROLLED,
            &[0x93, 0x2f, 0xf9, 0xb1, 0x51, 0x26, 0x3b, 0x36],
        )
        .add(AttrType::USERNAME, b"evtj:h6vY")
        .add_integrity(PASSWORD)
        .add_fingerprint();
    let n = w.finish().unwrap();
    assert_eq!(&out[..n], &sample_request()[..]);
}

fn write_response(addr: SocketAddr) -> Vec<u8> {
    let mut out = [0u8; 256];
    let mut w = MessageWriter::new(&mut out, Method::BINDING, Class::Success, &TXID_A);
    w.set_padding(0x20)
        .add(AttrType::SOFTWARE, b"test vector")
        .add_xor_address(AttrType::XOR_MAPPED_ADDRESS, addr)
        .add_integrity(PASSWORD)
        .add_fingerprint();
    let n = w.finish().unwrap();
    out[..n].to_vec()
}

#[test]
fn rfc5769_ipv4_response_both_ways() {
    let addr: SocketAddr = "192.0.2.1:32853".parse().unwrap();
    let buf = sample_ipv4_response();
    let m = MessageRef::parse(&buf).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(
        m.xor_address(AttrType::XOR_MAPPED_ADDRESS).unwrap(),
        Some(addr)
    );
    assert!(m.verify_integrity(PASSWORD));
    assert_eq!(m.fingerprint_valid(), Some(true));
    assert_eq!(write_response(addr), buf);
}

#[test]
fn rfc5769_ipv6_response_both_ways() {
    let addr: SocketAddr = "[2001:db8:1234:5678:11:2233:4455:6677]:32853"
        .parse()
        .unwrap();
    let buf = sample_ipv6_response();
    let m = MessageRef::parse(&buf).unwrap();
    assert_eq!(
        m.xor_address(AttrType::XOR_MAPPED_ADDRESS).unwrap(),
        Some(addr)
    );
    assert!(m.verify_integrity(PASSWORD));
    assert_eq!(m.fingerprint_valid(), Some(true));
    assert_eq!(write_response(addr), buf);
}

#[test]
fn rfc5769_long_term_request_both_ways() {
    let buf = sample_long_term_request();
    let m = MessageRef::parse(&buf).unwrap();
    assert_eq!(m.username().unwrap(), Some("マトリックス"));
    assert_eq!(m.realm().unwrap(), Some("example.org"));
    assert_eq!(
        m.nonce().unwrap(),
        Some(&b"f//499k954d6OL34oL9FSTvy64sA"[..])
    );
    assert!(m.verify_integrity(&long_term_key()));
    assert_eq!(m.fingerprint_valid(), None);

    let mut out = [0u8; 256];
    let txid = *m.transaction_id();
    let mut w = MessageWriter::new(&mut out, Method::BINDING, Class::Request, &txid);
    w.add(AttrType::USERNAME, "マトリックス".as_bytes())
        .add(AttrType::NONCE, b"f//499k954d6OL34oL9FSTvy64sA")
        .add(AttrType::REALM, b"example.org")
        .add_integrity(&long_term_key());
    let n = w.finish().unwrap();
    assert_eq!(&out[..n], &buf[..]);
}

#[test]
fn sha256_integrity_round_trip_and_truncation() {
    let key = long_term_key();
    let mut out = [0u8; 256];
    let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Request, &TXID_A);
    w.add(AttrType::USERNAME, b"alice")
        .add_integrity(&key)
        .add_integrity_sha256(&key)
        .add_fingerprint();
    let n = w.finish().unwrap();
    let m = MessageRef::parse(&out[..n]).unwrap();
    assert_eq!(m.integrity(), Some(Integrity::Sha256));
    assert!(m.verify(&key));
    assert!(m.verify_integrity(&key));
    assert!(!m.verify(&[0u8; 16]));
    assert_eq!(m.fingerprint_valid(), Some(true));

    // Flipping any covered byte breaks it.
    let mut bad = out[..n].to_vec();
    bad[25] ^= 1;
    assert!(!MessageRef::parse(&bad).unwrap().verify(&key));
}

#[test]
fn message_type_round_trip() {
    for method in [
        Method::BINDING,
        Method::ALLOCATE,
        Method::REFRESH,
        Method::SEND,
        Method::DATA,
        Method::CREATE_PERMISSION,
        Method::CHANNEL_BIND,
        Method(0xFFF),
    ] {
        for class in [
            Class::Request,
            Class::Indication,
            Class::Success,
            Class::Error,
        ] {
            let t = message_type(method, class);
            assert!(t < 0x4000);
            assert_eq!(split_message_type(t), (method, class));
        }
    }
    assert_eq!(message_type(Method::BINDING, Class::Success), 0x0101);
    assert_eq!(message_type(Method::ALLOCATE, Class::Error), 0x0113);
    assert_eq!(message_type(Method::SEND, Class::Indication), 0x0016);
    assert_eq!(message_type(Method::DATA, Class::Indication), 0x0017);
}

#[test]
fn error_code_and_unknown_attributes_round_trip() {
    let mut out = [0u8; 128];
    let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Error, &TXID_A);
    w.add_error(ErrorCode::UNKNOWN_ATTRIBUTE)
        .add_unknown_attributes(&[0x7777, 0x0042, 0x0043]);
    let n = w.finish().unwrap();
    let m = MessageRef::parse(&out[..n]).unwrap();
    assert_eq!(m.error_code().unwrap(), Some((420, "Unknown Attribute")));
    assert_eq!(
        m.get(AttrType::UNKNOWN_ATTRIBUTES).unwrap(),
        &[0x77, 0x77, 0x00, 0x42, 0x00, 0x43]
    );
}

#[test]
fn turn_attributes_decode() {
    let peer4: SocketAddr = "198.51.100.7:4000".parse().unwrap();
    let peer6: SocketAddr = "[2001:db8::9]:5000".parse().unwrap();
    let mut out = [0u8; 256];
    let mut w = MessageWriter::new(&mut out, Method::CREATE_PERMISSION, Class::Request, &TXID_A);
    w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer4)
        .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer6)
        .add_u32(AttrType::LIFETIME, 777)
        .add_u32(AttrType::CHANNEL_NUMBER, 0x4001 << 16)
        .add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24)
        .add_u32(
            AttrType::REQUESTED_ADDRESS_FAMILY,
            (FAMILY_IPV6 as u32) << 24,
        )
        .add(AttrType::EVEN_PORT, &[0x80])
        .add(AttrType::RESERVATION_TOKEN, &[1, 2, 3, 4, 5, 6, 7, 8])
        .add(AttrType::DONT_FRAGMENT, &[])
        .add(AttrType::DATA, b"hello");
    let n = w.finish().unwrap();
    let m = MessageRef::parse(&out[..n]).unwrap();
    let peers: Vec<_> = m.xor_peer_addresses().map(|r| r.unwrap()).collect();
    assert_eq!(peers, vec![peer4, peer6]);
    assert_eq!(m.lifetime().unwrap(), Some(777));
    assert_eq!(m.channel_number().unwrap(), Some(0x4001));
    assert_eq!(m.requested_transport().unwrap(), Some(PROTO_UDP));
    assert_eq!(m.requested_address_family().unwrap(), Some(FAMILY_IPV6));
    assert_eq!(m.even_port().unwrap(), Some(true));
    assert_eq!(
        m.reservation_token().unwrap(),
        Some([1, 2, 3, 4, 5, 6, 7, 8])
    );
    assert!(m.dont_fragment());
    assert_eq!(m.data(), Some(&b"hello"[..]));
    let r = m.range_of(AttrType::DATA).unwrap();
    assert_eq!(&out[r], b"hello");
}

#[test]
fn attributes_after_integrity_are_ignored() {
    let mut out = [0u8; 128];
    let mut w = MessageWriter::new(&mut out, Method::REFRESH, Class::Request, &TXID_A);
    w.add(AttrType::USERNAME, b"u")
        .add_integrity(b"k")
        .add_u32(AttrType::LIFETIME, 0);
    let n = w.finish().unwrap();
    let m = MessageRef::parse(&out[..n]).unwrap();
    assert_eq!(m.lifetime().unwrap(), None);
    assert_eq!(m.username().unwrap(), Some("u"));
}

#[test]
fn duplicate_attributes_first_wins() {
    let mut out = [0u8; 128];
    let mut w = MessageWriter::new(&mut out, Method::REFRESH, Class::Request, &TXID_A);
    w.add_u32(AttrType::LIFETIME, 1)
        .add_u32(AttrType::LIFETIME, 2);
    let n = w.finish().unwrap();
    assert_eq!(
        MessageRef::parse(&out[..n]).unwrap().lifetime().unwrap(),
        Some(1)
    );
}

#[test]
fn unknown_comprehension_required_listed() {
    let mut out = [0u8; 128];
    let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Request, &TXID_A);
    w.add(AttrType(0x7F01), b"x")
        .add(AttrType(0xC001), b"ignored: optional")
        .add(AttrType(0x7F01), b"dup")
        .add(AttrType(0x0003), b"change-request is not understood");
    let n = w.finish().unwrap();
    let m = MessageRef::parse(&out[..n]).unwrap();
    let mut unk = [0u16; 8];
    let k = m.unknown_required(&mut unk);
    assert_eq!(&unk[..k], &[0x7F01, 0x0003]);
}

#[test]
fn malformed_messages_are_refused() {
    let good = sample_request();
    assert_eq!(
        MessageRef::parse(&good[..19]).unwrap_err(),
        ParseError::Truncated
    );
    let mut b = good.clone();
    b[0] |= 0x80;
    assert_eq!(MessageRef::parse(&b).unwrap_err(), ParseError::NotStun);
    let mut b = good.clone();
    b[4] = 0;
    assert_eq!(MessageRef::parse(&b).unwrap_err(), ParseError::BadCookie);
    // Length not a multiple of four, too long, too short for the buffer.
    for len in [0x57u16, 0x5c, 0x54] {
        let mut b = good.clone();
        b[2..4].copy_from_slice(&len.to_be_bytes());
        assert_eq!(MessageRef::parse(&b).unwrap_err(), ParseError::BadLength);
    }
    // Trailing bytes after the announced length.
    let mut b = good.clone();
    b.extend_from_slice(&[0, 0, 0, 0]);
    assert_eq!(MessageRef::parse(&b).unwrap_err(), ParseError::BadLength);
    // An attribute whose length runs past the end.
    let mut b = good.clone();
    b[22..24].copy_from_slice(&0xFFF0u16.to_be_bytes());
    assert_eq!(MessageRef::parse(&b).unwrap_err(), ParseError::BadAttribute);
    // An attribute after FINGERPRINT.
    let mut b = good.clone();
    b.extend_from_slice(&[0x80, 0x22, 0, 0]);
    let l = (b.len() - 20) as u16;
    b[2..4].copy_from_slice(&l.to_be_bytes());
    assert_eq!(MessageRef::parse(&b).unwrap_err(), ParseError::BadAttribute);
    // MESSAGE-INTEGRITY with a wrong length.
    let mut out = [0u8; 64];
    let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Request, &TXID_A);
    w.add(AttrType::MESSAGE_INTEGRITY, &[0; 16]);
    let n = w.finish().unwrap();
    assert_eq!(
        MessageRef::parse(&out[..n]).unwrap_err(),
        ParseError::BadAttribute
    );
    // Too many attributes.
    let mut out = [0u8; 1024];
    let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Request, &TXID_A);
    for _ in 0..=MAX_ATTRS {
        w.add(AttrType::SOFTWARE, b"x");
    }
    let n = w.finish().unwrap();
    assert_eq!(
        MessageRef::parse(&out[..n]).unwrap_err(),
        ParseError::TooManyAttributes
    );
}

#[test]
fn bad_attribute_values_are_errors_not_panics() {
    let mut out = [0u8; 128];
    let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Request, &TXID_A);
    w.add(AttrType::LIFETIME, &[1, 2])
        .add(AttrType::XOR_PEER_ADDRESS, &[0, 3, 0, 0, 1, 2, 3, 4])
        .add(AttrType::USERNAME, &[0xFF, 0xFE])
        .add(AttrType::EVEN_PORT, &[])
        .add(AttrType::RESERVATION_TOKEN, &[1, 2, 3])
        .add(AttrType::ERROR_CODE, &[0, 0, 9, 200]);
    let n = w.finish().unwrap();
    let m = MessageRef::parse(&out[..n]).unwrap();
    assert_eq!(m.lifetime(), Err(AttrError::Length));
    assert_eq!(m.xor_peer_address(), Err(AttrError::Family));
    assert_eq!(m.username(), Err(AttrError::Text));
    assert_eq!(m.even_port(), Err(AttrError::Length));
    assert_eq!(m.reservation_token(), Err(AttrError::Length));
    assert_eq!(m.error_code(), Err(AttrError::Value));
}

#[test]
fn rfc5780_attributes_decode() {
    let mut out = [0u8; 256];
    let mut w = MessageWriter::new(&mut out, Method::BINDING, Class::Request, &TXID_A);
    w.add_u32(AttrType::CHANGE_REQUEST, CHANGE_IP | CHANGE_PORT)
        .add(AttrType::RESPONSE_PORT, &[0xC3, 0x50, 0, 0])
        .add_padding(5);
    let n = w.finish().unwrap();
    // The padding value is rounded up to four bytes on the wire.
    assert_eq!(n, 20 + 8 + 8 + 4 + 8);
    let m = MessageRef::parse(&out[..n]).unwrap();
    assert_eq!(m.change_request().unwrap(), Some((true, true)));
    assert_eq!(m.response_port().unwrap(), Some(50000));
    assert_eq!(m.get(AttrType::PADDING), Some(&[0u8; 5][..]));
    let mut unk = [0u16; 4];
    assert_eq!(
        m.unknown_required(&mut unk),
        3,
        "RFC 5780 attributes are understood only where the server serves RFC 5780"
    );
    assert_eq!(&unk[..3], &[0x0003, 0x0027, 0x0026]);

    for (flags, expect) in [
        (0, (false, false)),
        (CHANGE_IP, (true, false)),
        (CHANGE_PORT, (false, true)),
        // Bits other than the two flags are ignored.
        (0xFFFF_FFF9, (false, false)),
    ] {
        let mut out = [0u8; 64];
        let mut w = MessageWriter::new(&mut out, Method::BINDING, Class::Request, &TXID_A);
        w.add_u32(AttrType::CHANGE_REQUEST, flags);
        let n = w.finish().unwrap();
        let m = MessageRef::parse(&out[..n]).unwrap();
        assert_eq!(m.change_request().unwrap(), Some(expect), "{flags:#x}");
        assert_eq!(m.response_port().unwrap(), None);
    }
}

#[test]
fn malformed_rfc5780_attributes_are_errors() {
    for len in [0usize, 1, 2, 3, 5, 8] {
        let value = vec![0u8; len];
        let mut out = [0u8; 64];
        let mut w = MessageWriter::new(&mut out, Method::BINDING, Class::Request, &TXID_A);
        w.add(AttrType::CHANGE_REQUEST, &value)
            .add(AttrType::RESPONSE_PORT, &value);
        let n = w.finish().unwrap();
        let m = MessageRef::parse(&out[..n]).unwrap();
        assert_eq!(m.change_request(), Err(AttrError::Length), "length {len}");
        assert_eq!(m.response_port(), Err(AttrError::Length), "length {len}");
    }
}

#[test]
fn writer_reports_overflow() {
    let mut out = [0u8; 30];
    let mut w = MessageWriter::new(&mut out, Method::BINDING, Class::Success, &TXID_A);
    w.add(AttrType::SOFTWARE, b"0123456789");
    assert_eq!(w.finish(), None);
    let mut tiny = [0u8; 10];
    assert_eq!(
        MessageWriter::new(&mut tiny, Method::BINDING, Class::Success, &TXID_A).finish(),
        None
    );
}

#[test]
fn channel_data_parse_and_padding() {
    let buf = [0x40, 0x01, 0x00, 0x03, b'a', b'b', b'c', 0];
    let cd = ChannelData::parse(&buf).unwrap();
    assert_eq!(cd.number, 0x4001);
    assert_eq!(cd.payload, b"abc");
    assert_eq!(ChannelData::parse(&buf[..6]), None);
    assert_eq!(ChannelData::parse(&[0x40, 0x01]), None);
    assert_eq!(ChannelData::parse(&[0x80, 0x01, 0, 0]), None);
    let empty = ChannelData::parse(&[0x4F, 0xFF, 0, 0]).unwrap();
    assert_eq!(empty.payload, b"");
    assert_eq!(ChannelNumber::new(0x3FFF), None);
    assert_eq!(ChannelNumber::new(0x8000), None);
    assert_eq!(ChannelNumber::new(0x4FFF).map(|c| c.get()), Some(0x4FFF));
    assert_eq!(ChannelNumber::new(0x7FFF).map(|c| c.get()), Some(0x7FFF));
    let mut hdr = [0u8; 4];
    ChannelData::write_header(&mut hdr, ChannelNumber::new(0x4abc).unwrap(), 300);
    assert_eq!(hdr, [0x4a, 0xbc, 0x01, 0x2c]);
}

#[test]
fn stream_framing() {
    let stun = sample_request();
    assert_eq!(frame_len(&stun), Frame::Complete(stun.len()));
    assert_eq!(frame_len(&stun[..10]), Frame::Incomplete(stun.len()));
    assert_eq!(frame_len(&stun[..2]), Frame::Incomplete(4));
    assert_eq!(frame_len(&[]), Frame::Incomplete(4));
    // ChannelData frames are padded to four bytes on streams.
    let cd = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5, 0, 0, 0, 0x40];
    assert_eq!(frame_len(&cd), Frame::Complete(12));
    assert_eq!(frame_len(&cd[..9]), Frame::Incomplete(12));
    assert_eq!(frame_len(&[0x16, 3, 1, 0, 0x40]), Frame::Invalid);
    assert_eq!(frame_len(&[0x80, 0, 0, 0]), Frame::Invalid);
    // "GET " starts with 0x47, inside the ChannelData range: it frames as channel 0x4745 with
    // a 21,536-byte payload, which the core then drops as a channel that is not bound.
    assert_eq!(frame_len(b"GET / HTTP/1.1"), Frame::Incomplete(4 + 0x5420));
    assert_eq!(frame_len(&[0x16]), Frame::Invalid);
    // A STUN header whose length is not a multiple of four cannot be framed.
    assert_eq!(frame_len(&[0, 1, 0, 3, 0x21]), Frame::Invalid);
    assert_eq!(classify(&[0x00]), Kind::Stun);
    assert_eq!(classify(&[0x4F]), Kind::ChannelData);
    assert_eq!(classify(&[0x7F]), Kind::ChannelData);
    assert_eq!(classify(&[0x80]), Kind::Other);
    assert_eq!(classify(&[]), Kind::Other);
}

#[test]
fn writer_refuses_a_body_longer_than_the_length_field() {
    let mut big = vec![0u8; 100_000];
    let mut w = MessageWriter::new(&mut big, Method::BINDING, Class::Success, &TXID_A);
    w.add(AttrType::SOFTWARE, &[b'a'; 40_000])
        .add(AttrType::SOFTWARE, &[b'b'; 40_000]);
    assert_eq!(w.finish(), None);
}

#[test]
fn long_error_reasons_are_cut_at_a_character_boundary() {
    let reason = format!("{}é", "x".repeat(762));
    let mut out = [0u8; 1024];
    let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Error, &TXID_A);
    w.add_error_reason(400, &reason);
    let n = w.finish().unwrap();
    let m = MessageRef::parse(&out[..n]).unwrap();
    let (code, text) = m.error_code().unwrap().unwrap();
    assert_eq!(code, 400);
    assert_eq!(text, "x".repeat(762));
}

#[test]
fn additional_address_family_is_read_at_the_rfc_or_the_draft_code_point() {
    let allocate = |attrs: &[(AttrType, u32)]| {
        let mut out = [0u8; 128];
        let mut w = MessageWriter::new(&mut out, Method::ALLOCATE, Class::Request, &TXID_A);
        for (t, v) in attrs {
            w.add_u32(*t, *v);
        }
        let n = w.finish().unwrap();
        out[..n].to_vec()
    };
    let family = |buf: &[u8]| {
        MessageRef::parse(buf)
            .unwrap()
            .additional_address_family()
            .unwrap()
    };
    let v6 = u32::from(FAMILY_IPV6) << 24;
    let v4 = u32::from(FAMILY_IPV4) << 24;
    assert_eq!(family(&allocate(&[])), None);
    assert_eq!(
        family(&allocate(&[(AttrType::ADDITIONAL_ADDRESS_FAMILY, v6)])),
        Some(FAMILY_IPV6)
    );
    assert_eq!(
        family(&allocate(&[(
            AttrType::ADDITIONAL_ADDRESS_FAMILY_DRAFT,
            v6
        )])),
        Some(FAMILY_IPV6)
    );
    // The RFC's code point wins over the draft's.
    assert_eq!(
        family(&allocate(&[
            (AttrType::ADDITIONAL_ADDRESS_FAMILY_DRAFT, v6),
            (AttrType::ADDITIONAL_ADDRESS_FAMILY, v4),
        ])),
        Some(FAMILY_IPV4)
    );
}
