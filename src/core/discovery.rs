//! RFC 5780 NAT behaviour discovery on Binding requests: which UDP listeners serve it, and
//! where a response goes (the source socket CHANGE-REQUEST picks, the port RESPONSE-PORT
//! names) and how much PADDING it carries. Decisions only: the caller writes and sends.

use std::net::{IpAddr, SocketAddr};

use crate::wire::{AttrType, ErrorCode, MessageRef};

use super::{ClientId, Refused, Transport};

/// PADDING value length aimed at (RFC 5780 6.1: the MTU of the outgoing interface, which the
/// sans-IO core does not know; 1500 is Ethernet's, and what coturn's tools send). The request's
/// own length caps it: see [`Plan::padding`].
pub const PADDING_TARGET: usize = 1500;

/// Where the server serves RFC 5780: pairs of UDP listening addresses of one family, and the
/// two ports every one of them listens on. Empty `pairs`: nowhere.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct NatDiscovery {
    /// (A1, A2): two local addresses of one family, each the other's "other address"
    /// (RFC 5780 6.1). An address is in at most one pair.
    pub pairs: Vec<(IpAddr, IpAddr)>,
    /// (P1, P2): `listening-port` and `alt-listening-port`.
    pub ports: (u16, u16),
}

impl NatDiscovery {
    /// The other address and port (Ca, Cp) of a client's listener, when the request came over
    /// UDP to a listener that serves RFC 5780.
    pub fn other(&self, client: &ClientId) -> Option<SocketAddr> {
        if client.transport != Transport::Udp {
            return None;
        }
        let local = client.local;
        let (p1, p2) = self.ports;
        let cp = match local.port() {
            p if p == p1 => p2,
            p if p == p2 => p1,
            _ => return None,
        };
        let ca = self.pairs.iter().find_map(|&(a1, a2)| match local.ip() {
            ip if ip == a1 => Some(a2),
            ip if ip == a2 => Some(a1),
            _ => None,
        })?;
        Some(SocketAddr::new(ca, cp))
    }
}

/// How to answer a Binding request received where RFC 5780 is served.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Plan {
    /// The local socket the response leaves from (RFC 5780 6.1, table 1), before any
    /// `external-ip` mapping.
    pub from: SocketAddr,
    /// Where it goes: the client's address, at RESPONSE-PORT's port if given.
    pub to: SocketAddr,
    /// Ca:Cp, for OTHER-ADDRESS.
    pub other: SocketAddr,
    /// Whether the request carried PADDING (the response then carries it too).
    pub padding: bool,
}

impl Plan {
    /// Reads CHANGE-REQUEST, RESPONSE-PORT and PADDING of `msg`, a Binding request `client`
    /// sent to a listener whose other address is `other`. A malformed attribute, RESPONSE-PORT
    /// with PADDING (RFC 5780 6.1: that pair would let a small request aim a large response at
    /// a chosen port) or a RESPONSE-PORT of 0 (nothing can be sent there) is a 400.
    pub fn new(client: &ClientId, msg: &MessageRef, other: SocketAddr) -> Result<Plan, Refused> {
        let (change_ip, change_port) = msg
            .change_request()
            .map_err(|_| (ErrorCode::BAD_REQUEST, "malformed CHANGE-REQUEST"))?
            .unwrap_or((false, false));
        let response_port = msg
            .response_port()
            .map_err(|_| (ErrorCode::BAD_REQUEST, "malformed RESPONSE-PORT"))?;
        let padding = msg.has(AttrType::PADDING);
        if padding && response_port.is_some() {
            return Err((ErrorCode::BAD_REQUEST, "RESPONSE-PORT with PADDING"));
        }
        if response_port == Some(0) {
            return Err((ErrorCode::BAD_REQUEST, "RESPONSE-PORT 0"));
        }
        let local = client.local;
        let from = SocketAddr::new(
            if change_ip { other.ip() } else { local.ip() },
            if change_port {
                other.port()
            } else {
                local.port()
            },
        );
        // RESPONSE-PORT only ever changes the port: the response goes to the address the
        // request came from, so it reaches no host a plain Binding response could not.
        let to = SocketAddr::new(
            client.remote.ip(),
            response_port.unwrap_or(client.remote.port()),
        );
        Ok(Plan {
            from,
            to,
            other,
            padding,
        })
    }

    /// The PADDING value length for a response to a request of `request_len` bytes whose other
    /// attributes take `written` bytes (header included) and after which `trailer` bytes
    /// (FINGERPRINT) follow: [`PADDING_TARGET`], but never so much that the response outgrows
    /// the request, rounded down to a multiple of four. So a padded response is at most as long
    /// as the padded request, or as a plain response with an empty PADDING when the request is
    /// shorter than that: the server never sends more than it was sent (no amplification, also
    /// toward a forged source address), and a client that pads its request to its MTU gets a
    /// response about as large, which is what the fragmentation test needs.
    pub fn padding(request_len: usize, written: usize, trailer: usize) -> usize {
        let room = request_len.saturating_sub(written + 4 + trailer);
        room.min(PADDING_TARGET) & !3
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::core::{ClientAction, RelaySockets, Server, ServerConfig};
    use crate::wire::{CHANGE_IP, CHANGE_PORT, Class, MessageWriter, Method, TransactionId};

    struct NoRelays;

    impl RelaySockets for NoRelays {
        fn open(&mut self, _: SocketAddr) -> bool {
            false
        }
        fn close(&mut self, _: SocketAddr) {}
    }

    const A1: [u8; 4] = [192, 0, 2, 1];
    const A2: [u8; 4] = [192, 0, 2, 2];
    const P1: u16 = 3478;
    const P2: u16 = 3479;

    fn addr(ip: [u8; 4], port: u16) -> SocketAddr {
        SocketAddr::from((ip, port))
    }

    fn discovery() -> NatDiscovery {
        NatDiscovery {
            pairs: vec![(A1.into(), A2.into())],
            ports: (P1, P2),
        }
    }

    fn server(nat: NatDiscovery, external: Vec<(IpAddr, Option<IpAddr>)>) -> Server {
        let mut cfg = ServerConfig::new(A1.into(), None);
        cfg.relay_ips = vec![A1.into(), A2.into()];
        cfg.external_ips = external;
        cfg.nat_discovery = nat;
        Server::new(cfg, [3; 32], 1, Instant::now())
    }

    fn client(transport: Transport, local: SocketAddr) -> ClientId {
        ClientId {
            transport,
            remote: SocketAddr::from(([198, 51, 100, 7], 40000)),
            local,
        }
    }

    /// A Binding request with `add`'s attributes and FINGERPRINT.
    fn request(add: impl FnOnce(&mut MessageWriter)) -> Vec<u8> {
        let mut buf = vec![0u8; 4096];
        let mut w = MessageWriter::new(
            &mut buf,
            Method::BINDING,
            Class::Request,
            &TransactionId([9; 12]),
        );
        add(&mut w);
        w.add_fingerprint();
        let n = w.finish().unwrap();
        buf.truncate(n);
        buf
    }

    /// What the server does with `req` from `client`: the response, and where it goes from
    /// and to (`None` for a plain reply on the socket the request came in on).
    fn answer(
        s: &mut Server,
        client: ClientId,
        req: &[u8],
    ) -> (Vec<u8>, Option<(SocketAddr, SocketAddr)>) {
        let mut out = [0u8; 4096];
        match s.handle_client(Instant::now(), client, req, &mut out, &mut NoRelays) {
            ClientAction::Reply(n) => (out[..n].to_vec(), None),
            ClientAction::ReplyFrom { len, from, to } => (out[..len].to_vec(), Some((from, to))),
            other => panic!("no reply: {other:?}"),
        }
    }

    fn code(resp: &[u8]) -> Option<u16> {
        MessageRef::parse(resp)
            .unwrap()
            .error_code()
            .unwrap()
            .map(|(c, _)| c)
    }

    fn address(resp: &[u8], t: AttrType) -> Option<SocketAddr> {
        MessageRef::parse(resp)
            .unwrap()
            .get(t)
            .map(|v| crate::wire::decode_address(v).unwrap())
    }

    #[test]
    fn other_address_only_for_udp_listeners_of_a_pair() {
        let nat = discovery();
        for (local, other) in [
            (addr(A1, P1), addr(A2, P2)),
            (addr(A2, P1), addr(A1, P2)),
            (addr(A1, P2), addr(A2, P1)),
            (addr(A2, P2), addr(A1, P1)),
        ] {
            assert_eq!(nat.other(&client(Transport::Udp, local)), Some(other));
        }
        for t in [Transport::Tcp, Transport::Tls, Transport::Dtls] {
            assert_eq!(nat.other(&client(t, addr(A1, P1))), None, "{t:?}");
        }
        assert_eq!(nat.other(&client(Transport::Udp, addr(A1, 5349))), None);
        assert_eq!(
            nat.other(&client(Transport::Udp, addr([192, 0, 2, 3], P1))),
            None
        );
        assert_eq!(
            NatDiscovery::default().other(&client(Transport::Udp, addr(A1, P1))),
            None
        );
    }

    /// RFC 5780 6.1 table 1, from each of the four listeners.
    #[test]
    fn change_request_picks_the_source() {
        let mut s = server(discovery(), Vec::new());
        for (da, ca) in [(A1, A2), (A2, A1)] {
            for (dp, cp) in [(P1, P2), (P2, P1)] {
                let local = addr(da, dp);
                let c = client(Transport::Udp, local);
                for (ip, port, from) in [
                    (false, false, addr(da, dp)),
                    (true, false, addr(ca, dp)),
                    (false, true, addr(da, cp)),
                    (true, true, addr(ca, cp)),
                ] {
                    let flags = if ip { CHANGE_IP } else { 0 } | if port { CHANGE_PORT } else { 0 };
                    let req = request(|w| {
                        w.add_u32(AttrType::CHANGE_REQUEST, flags);
                    });
                    let (resp, route) = answer(&mut s, c, &req);
                    assert_eq!(code(&resp), None);
                    let expected = (from != local).then_some((from, c.remote));
                    assert_eq!(route, expected, "{local} ip {ip} port {port}");
                    let m = MessageRef::parse(&resp).unwrap();
                    assert_eq!(m.fingerprint_valid(), Some(true));
                    assert_eq!(
                        m.xor_address(AttrType::XOR_MAPPED_ADDRESS).unwrap(),
                        Some(c.remote)
                    );
                    assert_eq!(address(&resp, AttrType::MAPPED_ADDRESS), Some(c.remote));
                    assert_eq!(address(&resp, AttrType::RESPONSE_ORIGIN), Some(from));
                    assert_eq!(address(&resp, AttrType::OTHER_ADDRESS), Some(addr(ca, cp)));
                }
            }
        }
        assert_eq!(s.stats().nat_discovery_other_source, 12);
        assert_eq!(s.stats().nat_discovery_refused, 0);
    }

    #[test]
    fn plain_binding_carries_origin_and_other_address() {
        let mut s = server(discovery(), Vec::new());
        let c = client(Transport::Udp, addr(A1, P1));
        let (resp, route) = answer(&mut s, c, &request(|_| {}));
        assert_eq!(route, None);
        assert_eq!(
            address(&resp, AttrType::RESPONSE_ORIGIN),
            Some(addr(A1, P1))
        );
        assert_eq!(address(&resp, AttrType::OTHER_ADDRESS), Some(addr(A2, P2)));
    }

    #[test]
    fn response_port_changes_only_the_port() {
        let mut s = server(discovery(), Vec::new());
        let c = client(Transport::Udp, addr(A1, P1));
        let req = request(|w| {
            w.add(AttrType::RESPONSE_PORT, &[0xAB, 0xCD, 0, 0]);
        });
        let (resp, route) = answer(&mut s, c, &req);
        assert_eq!(code(&resp), None);
        let to = SocketAddr::new(c.remote.ip(), 0xABCD);
        assert_eq!(route, Some((addr(A1, P1), to)));
        // XOR-MAPPED-ADDRESS still names where the request came from.
        assert_eq!(
            MessageRef::parse(&resp)
                .unwrap()
                .xor_address(AttrType::XOR_MAPPED_ADDRESS)
                .unwrap(),
            Some(c.remote)
        );
        // With CHANGE-REQUEST too: from the other address, to the named port.
        let req = request(|w| {
            w.add(AttrType::RESPONSE_PORT, &[0xAB, 0xCD, 0, 0])
                .add_u32(AttrType::CHANGE_REQUEST, CHANGE_IP | CHANGE_PORT);
        });
        assert_eq!(answer(&mut s, c, &req).1, Some((addr(A2, P2), to)));
        // The client's own port: a plain reply.
        let own = (c.remote.port() as u32) << 16;
        let req = request(|w| {
            w.add_u32(AttrType::RESPONSE_PORT, own);
        });
        assert_eq!(answer(&mut s, c, &req).1, None);
        assert_eq!(s.stats().nat_discovery_response_port, 2);
    }

    #[test]
    fn padding_is_bounded_by_the_request() {
        let mut s = server(discovery(), Vec::new());
        let c = client(Transport::Udp, addr(A1, P1));
        // No request larger than needed is ever answered with more bytes than it had, and a
        // short one gets an empty PADDING (which RFC 5780 6.1 still requires).
        for pad in [0usize, 1, 4, 40, 100, 500, 1500, 3000] {
            let req = request(|w| {
                w.add_padding(pad);
            });
            let (resp, _) = answer(&mut s, c, &req);
            assert_eq!(code(&resp), None);
            let m = MessageRef::parse(&resp).unwrap();
            let got = m
                .get(AttrType::PADDING)
                .expect("PADDING in the response")
                .len();
            assert!(got <= PADDING_TARGET, "pad {pad}: {got}");
            let plain = answer(&mut s, c, &request(|_| {})).0.len() + 4;
            assert!(
                resp.len() <= req.len().max(plain),
                "pad {pad}: request {} response {}",
                req.len(),
                resp.len()
            );
            if req.len() >= plain + 8 && pad <= PADDING_TARGET {
                // As large as the request, to a multiple of four.
                assert!(resp.len() + 4 > req.len(), "pad {pad}: {}", resp.len());
            }
        }
        assert_eq!(Plan::padding(100, 80, 8), 8);
        assert_eq!(Plan::padding(10, 80, 8), 0);
        assert_eq!(Plan::padding(65535, 80, 8), PADDING_TARGET);
    }

    #[test]
    fn malformed_or_forbidden_attributes_get_400() {
        let mut s = server(discovery(), Vec::new());
        let c = client(Transport::Udp, addr(A1, P1));
        let bad: [&dyn Fn(&mut MessageWriter); 5] = [
            &|w| {
                w.add(AttrType::CHANGE_REQUEST, &[0, 0, 6]);
            },
            &|w| {
                w.add(AttrType::CHANGE_REQUEST, &[0, 0, 0, 6, 0, 0, 0, 0]);
            },
            &|w| {
                w.add(AttrType::RESPONSE_PORT, &[0xAB, 0xCD]);
            },
            &|w| {
                w.add_u32(AttrType::RESPONSE_PORT, 0);
            },
            &|w| {
                w.add_u32(AttrType::RESPONSE_PORT, 5000 << 16)
                    .add_padding(8);
            },
        ];
        for (i, add) in bad.iter().enumerate() {
            let (resp, route) = answer(&mut s, c, &request(add));
            assert_eq!(code(&resp), Some(400), "case {i}");
            assert_eq!(
                route, None,
                "case {i}: an error goes back where the request came from"
            );
        }
        assert_eq!(s.stats().nat_discovery_refused, 5);
        assert_eq!(s.stats().errors_with(400), 5);
    }

    /// Without a pair (one address, `rfc5780 = false`, a wildcard) or over a stream: no
    /// OTHER-ADDRESS, and the RFC 5780 request attributes are unknown (420).
    #[test]
    fn where_not_served_rfc5780_attributes_get_420() {
        for (mut s, c) in [
            (
                server(NatDiscovery::default(), Vec::new()),
                client(Transport::Udp, addr(A1, P1)),
            ),
            (
                server(discovery(), Vec::new()),
                client(Transport::Tcp, addr(A1, P1)),
            ),
            (
                server(discovery(), Vec::new()),
                client(Transport::Udp, addr([192, 0, 2, 9], P1)),
            ),
        ] {
            let (resp, _) = answer(&mut s, c, &request(|_| {}));
            assert_eq!(code(&resp), None);
            assert_eq!(address(&resp, AttrType::OTHER_ADDRESS), None);
            assert_eq!(address(&resp, AttrType::RESPONSE_ORIGIN), None);
            for (t, value) in [
                (AttrType::CHANGE_REQUEST, &[0, 0, 0, 6][..]),
                (AttrType::RESPONSE_PORT, &[0x13, 0x88, 0, 0][..]),
                (AttrType::PADDING, &[0; 8][..]),
            ] {
                let (resp, route) = answer(
                    &mut s,
                    c,
                    &request(|w| {
                        w.add(t, value);
                    }),
                );
                assert_eq!(code(&resp), Some(420), "{t:?} {c:?}");
                assert_eq!(route, None);
                let unknown = MessageRef::parse(&resp)
                    .unwrap()
                    .get(AttrType::UNKNOWN_ATTRIBUTES)
                    .unwrap()
                    .to_vec();
                assert_eq!(unknown, t.0.to_be_bytes());
            }
            assert_eq!(s.stats().nat_discovery_refused, 3);
        }
    }

    #[test]
    fn other_unknown_attributes_still_get_420_where_served() {
        let mut s = server(discovery(), Vec::new());
        let c = client(Transport::Udp, addr(A1, P1));
        let req = request(|w| {
            w.add_u32(AttrType::CHANGE_REQUEST, CHANGE_IP)
                .add(AttrType(0x7F00), b"?");
        });
        let (resp, route) = answer(&mut s, c, &req);
        assert_eq!(code(&resp), Some(420));
        assert_eq!(route, None);
        let unknown = MessageRef::parse(&resp)
            .unwrap()
            .get(AttrType::UNKNOWN_ATTRIBUTES)
            .unwrap()
            .to_vec();
        assert_eq!(unknown, [0x7F, 0x00]);
    }

    /// Behind a 1:1 NAT the addresses in the response are the public ones; the sockets are
    /// the local ones.
    #[test]
    fn external_ip_mapping_is_reflected() {
        let (e1, e2): (IpAddr, IpAddr) = ([203, 0, 113, 1].into(), [203, 0, 113, 2].into());
        let mut s = server(
            discovery(),
            vec![(e1, Some(A1.into())), (e2, Some(A2.into()))],
        );
        let c = client(Transport::Udp, addr(A1, P1));
        let req = request(|w| {
            w.add_u32(AttrType::CHANGE_REQUEST, CHANGE_IP);
        });
        let (resp, route) = answer(&mut s, c, &req);
        assert_eq!(route, Some((addr(A2, P1), c.remote)));
        assert_eq!(
            address(&resp, AttrType::RESPONSE_ORIGIN),
            Some(SocketAddr::new(e2, P1))
        );
        assert_eq!(
            address(&resp, AttrType::OTHER_ADDRESS),
            Some(SocketAddr::new(e2, P2))
        );
    }
}
