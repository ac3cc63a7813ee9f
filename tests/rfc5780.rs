//! RFC 5780 NAT behaviour discovery against the real server on loopback, listening on
//! 127.0.0.1 and 127.0.0.2 (loopback covers 127/8, so both exist without setup): the source
//! a response leaves from for each CHANGE-REQUEST, OTHER-ADDRESS and RESPONSE-ORIGIN,
//! RESPONSE-PORT, PADDING bounds, 400 for malformed attributes and 420 where RFC 5780 is not
//! served, `external-ip` in the addresses, the alternate port taken by someone else, and
//! coturn's `turnutils_natdiscovery` classifying the (absent) NAT.
//!
//! IPv6 is not covered: ::1 is the only loopback-scope IPv6 address, and a pair needs two.
//!
//! The coturn test prints a note and passes when `turnutils_natdiscovery` is missing, unless
//! `TURNSERVER_REQUIRE_INTEROP=1` is set, as in `tests/coturn_interop.rs`.

mod common;

use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::TestServer;
use turnserver::wire::{
    AttrType, CHANGE_IP, CHANGE_PORT, Class, MessageRef, MessageWriter, Method, TransactionId,
    decode_address,
};

const A1: [u8; 4] = [127, 0, 0, 1];
const A2: [u8; 4] = [127, 0, 0, 2];
const WAIT: Duration = Duration::from_secs(2);

/// A server listening on 127.0.0.1 and 127.0.0.2 (UDP and TCP) with `extra` keys; its
/// alternate port is `listening-port + 1` unless `extra` sets it.
fn start_pair(extra: &str) -> TestServer {
    start_on(&["127.0.0.1", "127.0.0.2"], extra)
}

fn start_on(ips: &[&str], extra: &str) -> TestServer {
    let ips = ips
        .iter()
        .map(|ip| format!("\"{ip}\""))
        .collect::<Vec<_>>()
        .join(", ");
    common::start_custom(
        |port, min_port, max_port| {
            format!(
                "listening-ips = [{ips}]\nlistening-port = {port}\nmin-port = {min_port}\n\
                 max-port = {max_port}\nno-auth = true\nlog-level = \"debug\"\n{extra}\n"
            )
        },
        &[],
    )
}

fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
    SocketAddr::from((ip, port))
}

/// A client socket on 127.0.0.1 that waits at most [`WAIT`] for a datagram.
fn client() -> UdpSocket {
    let s = UdpSocket::bind("127.0.0.1:0").unwrap();
    s.set_read_timeout(Some(WAIT)).unwrap();
    s
}

/// A Binding request (transaction ID `[id; 12]`) with `add`'s attributes and FINGERPRINT.
fn request(id: u8, add: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
    let mut buf = vec![0u8; 4096];
    let mut w = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Request,
        &TransactionId([id; 12]),
    );
    add(&mut w);
    w.add_fingerprint();
    let n = w.finish().unwrap();
    buf.truncate(n);
    buf
}

fn change_request(id: u8, flags: u32) -> Vec<u8> {
    request(id, |w| {
        w.add_u32(AttrType::CHANGE_REQUEST, flags);
    })
}

/// The next datagram on `sock` that answers transaction `[id; 12]`, and where it came from.
fn receive(sock: &UdpSocket, id: u8) -> Option<(Vec<u8>, SocketAddr)> {
    let deadline = Instant::now() + WAIT;
    let mut buf = [0u8; 65536];
    while Instant::now() < deadline {
        let Ok((n, from)) = sock.recv_from(&mut buf) else {
            return None;
        };
        if n >= 20 && buf[8..20] == [id; 12] {
            return Some((buf[..n].to_vec(), from));
        }
    }
    None
}

fn exchange(sock: &UdpSocket, to: SocketAddr, req: &[u8]) -> (Vec<u8>, SocketAddr) {
    sock.send_to(req, to).unwrap();
    receive(sock, req[8]).unwrap_or_else(|| panic!("no answer from {to}"))
}

struct Answer {
    class: Class,
    code: Option<u16>,
    xor_mapped: Option<SocketAddr>,
    mapped: Option<SocketAddr>,
    origin: Option<SocketAddr>,
    other: Option<SocketAddr>,
    padding: Option<usize>,
    unknown: Vec<u16>,
}

fn parse(resp: &[u8]) -> Answer {
    let m = MessageRef::parse(resp).expect("the response parses");
    assert_eq!(m.method(), Method::BINDING);
    assert_eq!(m.fingerprint_valid(), Some(true), "FINGERPRINT");
    let plain = |t| m.get(t).map(|v| decode_address(v).expect("an address"));
    Answer {
        class: m.class(),
        code: m.error_code().unwrap().map(|(c, _)| c),
        xor_mapped: m.xor_address(AttrType::XOR_MAPPED_ADDRESS).unwrap(),
        mapped: plain(AttrType::MAPPED_ADDRESS),
        origin: plain(AttrType::RESPONSE_ORIGIN),
        other: plain(AttrType::OTHER_ADDRESS),
        padding: m.get(AttrType::PADDING).map(<[u8]>::len),
        unknown: m
            .get(AttrType::UNKNOWN_ATTRIBUTES)
            .map(|v| {
                v.chunks_exact(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect()
            })
            .unwrap_or_default(),
    }
}

/// RFC 5780 6.1 table 1: for each of the four listeners and each CHANGE-REQUEST, the response
/// comes from exactly the expected address and port and says so, with the client's mapped
/// address and the listener's other address.
#[test]
fn change_request_picks_the_source_address_and_port() {
    let server = start_pair("");
    let (p1, p2) = (server.port, server.port + 1);
    assert!(
        server.wait_log("RFC 5780 NAT behaviour discovery on udp", WAIT),
        "no start-up line naming the RFC 5780 addresses:\n{}",
        server.log()
    );
    let sock = client();
    let me = sock.local_addr().unwrap();
    let mut id = 0;
    for (da, ca) in [(A1, A2), (A2, A1)] {
        for (dp, cp) in [(p1, p2), (p2, p1)] {
            for (flags, from) in [
                (None, addr(da, dp)),
                (Some(0), addr(da, dp)),
                (Some(CHANGE_IP), addr(ca, dp)),
                (Some(CHANGE_PORT), addr(da, cp)),
                (Some(CHANGE_IP | CHANGE_PORT), addr(ca, cp)),
            ] {
                id += 1;
                let req = match flags {
                    None => request(id, |_| {}),
                    Some(f) => change_request(id, f),
                };
                let (resp, source) = exchange(&sock, addr(da, dp), &req);
                let what = format!("to {} with {flags:?}", addr(da, dp));
                assert_eq!(source, from, "source of the response {what}");
                let a = parse(&resp);
                assert_eq!((a.class, a.code), (Class::Success, None), "{what}");
                assert_eq!(a.xor_mapped, Some(me), "XOR-MAPPED-ADDRESS {what}");
                assert_eq!(a.mapped, Some(me), "MAPPED-ADDRESS {what}");
                assert_eq!(a.origin, Some(from), "RESPONSE-ORIGIN {what}");
                assert_eq!(a.other, Some(addr(ca, cp)), "OTHER-ADDRESS {what}");
                assert_eq!(a.padding, None);
            }
        }
    }
    assert!(!server.log().contains("ERROR"), "{}", server.log());
}

/// RESPONSE-PORT sends the response to another port of the client's address: the socket that
/// asked gets nothing, the named one gets the answer, whose XOR-MAPPED-ADDRESS is still the
/// asking socket's.
#[test]
fn response_port_delivers_to_the_named_port() {
    let server = start_pair("");
    let asking = client();
    let other = client();
    other.set_read_timeout(Some(WAIT)).unwrap();
    let port = other.local_addr().unwrap().port();
    for (id, flags, from) in [
        (1u8, 0, addr(A1, server.port)),
        (2, CHANGE_IP | CHANGE_PORT, addr(A2, server.port + 1)),
    ] {
        let req = request(id, |w| {
            w.add_u32(AttrType::RESPONSE_PORT, u32::from(port) << 16)
                .add_u32(AttrType::CHANGE_REQUEST, flags);
        });
        asking.send_to(&req, addr(A1, server.port)).unwrap();
        let (resp, source) = receive(&other, id).expect("the answer at RESPONSE-PORT");
        assert_eq!(source, from);
        let a = parse(&resp);
        assert_eq!(a.code, None);
        assert_eq!(a.xor_mapped, Some(asking.local_addr().unwrap()));
        assert_eq!(a.origin, Some(from));
        asking
            .set_read_timeout(Some(Duration::from_millis(300)))
            .unwrap();
        assert!(
            receive(&asking, id).is_none(),
            "the asking socket got the answer too"
        );
    }
}

/// PADDING is answered with PADDING, never making the response larger than the request (or
/// than a plain response with an empty PADDING); with RESPONSE-PORT it is a 400 that goes back
/// to the asking socket.
#[test]
fn padding_is_bounded_by_the_request() {
    let server = start_pair("");
    let sock = client();
    let to = addr(A1, server.port);
    let (plain, _) = exchange(&sock, to, &request(1, |_| {}));
    for (id, pad) in [(2u8, 0usize), (3, 16), (4, 1500), (5, 4000)] {
        let req = request(id, |w| {
            w.add_padding(pad);
        });
        let (resp, source) = exchange(&sock, to, &req);
        assert_eq!(source, to);
        let a = parse(&resp);
        assert_eq!(a.code, None, "padding {pad}");
        let got = a.padding.expect("PADDING in the response");
        assert!(got <= 1500, "padding {pad}: {got} bytes of PADDING");
        assert!(
            resp.len() <= req.len().max(plain.len() + 4),
            "padding {pad}: request {} bytes, response {}",
            req.len(),
            resp.len()
        );
        if pad == 1500 {
            // A request padded to an MTU gets a response about as large (fragmentation tests).
            assert!(
                resp.len() + 4 > req.len(),
                "{} vs {}",
                resp.len(),
                req.len()
            );
        }
    }
    let req = request(6, |w| {
        w.add_u32(AttrType::RESPONSE_PORT, 40000 << 16)
            .add_padding(1500);
    });
    let (resp, source) = exchange(&sock, to, &req);
    assert_eq!(source, to);
    assert_eq!(parse(&resp).code, Some(400));
}

/// Malformed CHANGE-REQUEST and RESPONSE-PORT (wrong lengths), and RESPONSE-PORT 0: 400 from
/// the listener that got the request, counted; the server goes on answering.
#[test]
fn malformed_attributes_get_400_and_are_counted() {
    let http = common::free_tcp_port(0);
    let server = start_pair(&format!("prometheus-port = {http}"));
    let sock = client();
    let to = addr(A2, server.port + 1);
    let bad: [(u8, AttrType, &[u8]); 5] = [
        (1, AttrType::CHANGE_REQUEST, &[0, 0, 6]),
        (2, AttrType::CHANGE_REQUEST, &[0, 0, 0, 6, 0, 0, 0, 0]),
        (3, AttrType::RESPONSE_PORT, &[0x9c, 0x40]),
        (4, AttrType::RESPONSE_PORT, &[0x9c, 0x40, 0, 0, 0, 0]),
        (5, AttrType::RESPONSE_PORT, &[0, 0, 0, 0]),
    ];
    for (id, t, value) in bad {
        let (resp, source) = exchange(
            &sock,
            to,
            &request(id, |w| {
                w.add(t, value);
            }),
        );
        assert_eq!(source, to, "{t:?} {value:?}");
        let a = parse(&resp);
        assert_eq!(
            (a.class, a.code),
            (Class::Error, Some(400)),
            "{t:?} {value:?}"
        );
    }
    let (resp, _) = exchange(&sock, to, &change_request(9, CHANGE_IP));
    assert_eq!(parse(&resp).code, None, "still serving");
    let (status, text) = common::http_get(http, "/metrics");
    assert_eq!(status, 200);
    let sample = |s: &str| common::metric(&text, s).unwrap_or_else(|| panic!("{s} in\n{text}"));
    assert_eq!(
        sample("turnserver_nat_discovery_responses_total{outcome=\"refused\"}"),
        5.0
    );
    assert_eq!(
        sample("turnserver_nat_discovery_responses_total{outcome=\"other_source\"}"),
        1.0
    );
    assert_eq!(
        sample("turnserver_responses_total{method=\"binding\",code=\"400\"}"),
        5.0
    );
}

/// Asserts that `server` answers Binding on 127.0.0.1 without RFC 5780: no OTHER-ADDRESS or
/// RESPONSE-ORIGIN, and 420 listing CHANGE-REQUEST (RFC 5780 6), RESPONSE-PORT and PADDING.
fn assert_not_served(server: &TestServer) {
    let sock = client();
    let to = addr(A1, server.port);
    let (resp, _) = exchange(&sock, to, &request(1, |_| {}));
    let a = parse(&resp);
    assert_eq!(a.code, None);
    assert_eq!(a.xor_mapped, Some(sock.local_addr().unwrap()));
    assert_eq!((a.other, a.origin), (None, None));
    for (id, t, value) in [
        (2u8, AttrType::CHANGE_REQUEST, &[0, 0, 0, 6][..]),
        (3, AttrType::CHANGE_REQUEST, &[0, 0, 0, 0][..]),
        (4, AttrType::RESPONSE_PORT, &[0x9c, 0x40, 0, 0][..]),
        (5, AttrType::PADDING, &[0; 8][..]),
    ] {
        let (resp, source) = exchange(
            &sock,
            to,
            &request(id, |w| {
                w.add(t, value);
            }),
        );
        assert_eq!(source, to);
        let a = parse(&resp);
        assert_eq!(a.code, Some(420), "{t:?}");
        assert_eq!(a.unknown, [t.0], "{t:?}");
        assert_eq!(a.other, None);
    }
}

#[test]
fn single_address_answers_420() {
    let server = start_on(&["127.0.0.1"], "");
    assert_not_served(&server);
    assert!(
        server.wait_log("RFC 5780 NAT behaviour discovery not on 127.0.0.1", WAIT),
        "no line saying why RFC 5780 is off:\n{}",
        server.log()
    );
}

#[test]
fn rfc5780_false_answers_420_and_binds_no_alternate_port() {
    let server = start_pair("rfc5780 = false");
    assert_not_served(&server);
    assert!(server.wait_log(
        "RFC 5780 NAT behaviour discovery off (rfc5780 = false)",
        WAIT
    ));
    // No listener on the alternate port.
    for ip in ["127.0.0.1", "127.0.0.2"] {
        let line = format!("listener={ip}:{} ", server.port + 1);
        assert!(
            !server.log().contains(&line),
            "{line} in:\n{}",
            server.log()
        );
        let line = format!("listener={ip}:{} ", server.port);
        assert!(
            server.log().contains(&line),
            "{line} not in:\n{}",
            server.log()
        );
    }
}

/// Over TCP there is one connection to answer on: no OTHER-ADDRESS, and CHANGE-REQUEST is a
/// 420 (the alternate address is served over UDP only).
#[test]
fn tcp_binding_has_no_rfc5780() {
    use std::io::{Read, Write};
    let server = start_pair("");
    let mut tcp = std::net::TcpStream::connect(addr(A2, server.port)).unwrap();
    tcp.set_read_timeout(Some(WAIT)).unwrap();
    let read = |tcp: &mut std::net::TcpStream| {
        let mut head = [0u8; 20];
        tcp.read_exact(&mut head).unwrap();
        let len = u16::from_be_bytes([head[2], head[3]]) as usize;
        let mut msg = head.to_vec();
        msg.resize(20 + len, 0);
        tcp.read_exact(&mut msg[20..]).unwrap();
        msg
    };
    tcp.write_all(&request(1, |_| {})).unwrap();
    let a = parse(&read(&mut tcp));
    assert_eq!((a.code, a.other, a.origin), (None, None, None));
    tcp.write_all(&change_request(2, CHANGE_IP | CHANGE_PORT))
        .unwrap();
    let a = parse(&read(&mut tcp));
    assert_eq!(a.code, Some(420));
    assert_eq!(a.unknown, [AttrType::CHANGE_REQUEST.0]);
}

/// Behind a 1:1 NAT (`external-ip` mapping both addresses) OTHER-ADDRESS and RESPONSE-ORIGIN
/// carry the public addresses, while the datagrams leave the local sockets.
#[test]
fn external_ip_is_reflected() {
    let (e1, e2): (IpAddr, IpAddr) = ([198, 51, 100, 1].into(), [198, 51, 100, 2].into());
    let server = start_pair(&format!(
        "external-ip = [\"{e1}/127.0.0.1\", \"{e2}/127.0.0.2\"]"
    ));
    let (p1, p2) = (server.port, server.port + 1);
    let sock = client();
    for (id, flags, from, origin) in [
        (1u8, 0, addr(A1, p1), SocketAddr::new(e1, p1)),
        (2, CHANGE_IP, addr(A2, p1), SocketAddr::new(e2, p1)),
        (3, CHANGE_PORT, addr(A1, p2), SocketAddr::new(e1, p2)),
    ] {
        let (resp, source) = exchange(&sock, addr(A1, p1), &change_request(id, flags));
        assert_eq!(source, from);
        let a = parse(&resp);
        assert_eq!(a.origin, Some(origin), "RESPONSE-ORIGIN for {flags:#x}");
        assert_eq!(a.other, Some(SocketAddr::new(e2, p2)), "OTHER-ADDRESS");
    }
}

/// The alternate port held by another socket refuses start, naming the address.
#[test]
fn alternate_port_in_use_refuses_start() {
    let taken = UdpSocket::bind("127.0.0.2:0").unwrap();
    let alt = taken.local_addr().unwrap().port();
    let dir = std::env::temp_dir().join(format!("turnserver-rfc5780-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("busy.toml");
    // listening-port: a port free now on both addresses, other than the taken one.
    let port = loop {
        let p = UdpSocket::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        if p != alt && UdpSocket::bind(addr(A2, p)).is_ok() {
            break p;
        }
    };
    std::fs::write(
        &path,
        format!(
            "listening-ips = [\"127.0.0.1\", \"127.0.0.2\"]\nlistening-port = {port}\n\
             alt-listening-port = {alt}\nno-tcp = true\nno-auth = true\n\
             min-port = 62000\nmax-port = 62010\n"
        ),
    )
    .unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnserver"))
        .arg("--config")
        .arg(&path)
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let _ = std::fs::remove_dir_all(&dir);
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "started with the port taken:\n{log}");
    assert!(
        log.contains(&format!(
            "cannot listen on udp 127.0.0.2:{alt} (alt-listening-port, RFC 5780)"
        )),
        "{log}"
    );
    drop(taken);
}

// ---------------------------------------------------------------------------------------------
// coturn's turnutils_natdiscovery
// ---------------------------------------------------------------------------------------------

const NATDISCOVERY: &str = "turnutils_natdiscovery";

/// Runs `turnutils_natdiscovery ARGS` with a deadline; its standard output and error.
fn natdiscovery(args: &[&str]) -> String {
    let mut child = Command::new(NATDISCOVERY)
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start turnutils_natdiscovery");
    let deadline = Instant::now() + Duration::from_secs(60);
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output().unwrap();
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// Mapping and filtering discovery (with and without 1500 bytes of PADDING) from 127.0.0.1
/// against the server on 127.0.0.1 with 127.0.0.2 as its other address: on loopback there is
/// no NAT, so the tool finds its reflexive address equal to its local one (endpoint-independent
/// mapping), the same mapping from the other address, and the response from the other
/// address and port arriving (endpoint-independent filtering).
#[test]
fn natdiscovery_classifies_loopback_as_no_nat() {
    if !common::coturn_tools(&[NATDISCOVERY]) {
        return;
    }
    let server = start_pair("");
    let port = server.port.to_string();
    for padding in [false, true] {
        let mut args = vec!["-m", "-f", "-L", "127.0.0.1", "-p", &port];
        if padding {
            args.push("-P");
        }
        args.push("127.0.0.1");
        let text = natdiscovery(&args);
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let has = |line: &str| lines.contains(&line);
        for line in [
            "-= Mapping Behavior Discovery =-",
            "-= Filtering Behavior Discovery =-",
            "No NAT! (Endpoint Independent Mapping)",
            "NAT with Endpoint Independent Mapping!",
            "NAT with Endpoint Independent Filtering!",
            "No ALG: Mapped == XOR-Mapped",
        ] {
            assert!(has(line), "padding {padding}: no {line:?} in:\n{text}");
        }
        for wrong in [
            "Address Dependent",
            "Port Dependent",
            "timeout",
            "error",
            "ALG detected",
        ] {
            assert!(
                !text.contains(wrong),
                "padding {padding}: {wrong:?} in:\n{text}"
            );
        }
        // Both addresses and both ports show up as origins and other addresses.
        for shown in [
            format!("Response origin: : 127.0.0.2:{}", server.port),
            format!("Response origin: : 127.0.0.2:{}", server.port + 1),
            format!("Other addr: : 127.0.0.2:{}", server.port + 1),
        ] {
            assert!(text.contains(&shown), "no {shown:?} in:\n{text}");
        }
    }
    assert!(!server.log().contains("ERROR"), "{}", server.log());
}
