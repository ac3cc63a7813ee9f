//! The echo peer and the relayed round trips.

use std::io::ErrorKind;
use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use crate::wire::{
    AttrType, ChannelData, Class, Kind, MessageRef, MessageWriter, Method, classify,
};

use super::conn::{NetError, RTO, channel_data, is_response_to, left, local_ip_toward};
use super::report::Rtt;
use super::session::{Fail, Session, new_txid};

/// The channel the probe binds.
pub const CHANNEL: u16 = 0x4000;

/// How long the peer socket waits for the server to answer its Binding request.
const PEER_BINDING_WAIT: Duration = Duration::from_secs(2);

/// The probe's own UDP peer and the address the relay will see for it.
pub struct LocalPeer {
    pub socket: UdpSocket,
    pub addr: SocketAddr,
    /// Whether `addr` came from the server (XOR-MAPPED-ADDRESS) or is the local address.
    pub mapped: bool,
}

/// Opens the peer socket on the local address toward the server and asks the server's UDP
/// port what address it sees for it; falls back to the local address when nothing answers
/// (a server without UDP, or UDP blocked).
pub fn local_peer(server: SocketAddr, timeout: Duration) -> Result<LocalPeer, Fail> {
    let io = |e: std::io::Error| Fail::new(format!("cannot open the peer's UDP socket: {e}"));
    let ip = local_ip_toward(server).map_err(io)?;
    let socket = UdpSocket::bind(SocketAddr::new(ip, 0)).map_err(io)?;
    let local = socket.local_addr().map_err(io)?;
    let deadline = Instant::now() + timeout.min(PEER_BINDING_WAIT);
    let mapped = peer_binding(&socket, server, deadline)?;
    Ok(LocalPeer {
        addr: mapped.unwrap_or(local),
        mapped: mapped.is_some(),
        socket,
    })
}

/// A Binding request from the peer socket to the server, retransmitted as RFC 8489 says
/// until `deadline`; the XOR-MAPPED-ADDRESS of the answer, if one came.
fn peer_binding(
    socket: &UdpSocket,
    server: SocketAddr,
    deadline: Instant,
) -> Result<Option<SocketAddr>, Fail> {
    let txid = new_txid()?;
    let mut buf = [0u8; 64];
    let mut w = MessageWriter::new(&mut buf, Method::BINDING, Class::Request, &txid);
    w.add_fingerprint();
    let Some(n) = w.finish() else {
        return Ok(None);
    };
    let request = &buf[..n];
    let mut rto = RTO;
    let mut next_send = Instant::now();
    let mut answer = vec![0u8; 2048];
    loop {
        let now = Instant::now();
        if now >= deadline {
            return Ok(None);
        }
        if now >= next_send {
            // An unreachable port or network just means no answer.
            let _ = socket.send_to(request, server);
            next_send = now + rto;
            rto *= 2;
        }
        if socket
            .set_read_timeout(Some(left(next_send.min(deadline))))
            .is_err()
        {
            return Ok(None);
        }
        let (len, from) = match socket.recv_from(&mut answer) {
            Ok(r) => r,
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => continue,
            Err(_) => {
                // Do not spin on a socket error that repeats.
                std::thread::sleep(Duration::from_millis(10).min(left(deadline)));
                continue;
            }
        };
        let frame = &answer[..len];
        if from != server || !is_response_to(frame, &txid) {
            continue;
        }
        let Ok(m) = MessageRef::parse(frame) else {
            return Ok(None);
        };
        let mapped = m
            .xor_address(AttrType::XOR_MAPPED_ADDRESS)
            .ok()
            .flatten()
            .or_else(|| {
                m.get(AttrType::MAPPED_ADDRESS)
                    .and_then(|v| crate::wire::decode_address(v).ok())
            });
        return Ok(mapped.filter(|_| m.class() == Class::Success));
    }
}

/// The payload of round trip `seq`: 37 bytes (not a multiple of four, so that stream
/// padding is exercised), with a random token so that stray or late datagrams are told apart.
fn payload(token: &[u8; 8], seq: u32) -> Vec<u8> {
    let mut p = Vec::with_capacity(37);
    p.extend_from_slice(b"turnserver probe ");
    p.extend_from_slice(token);
    p.extend_from_slice(&seq.to_be_bytes());
    p.extend_from_slice(&[0x00, 0xFF, 0x55, 0xAA, 0x01, 0x80, 0x7F, 0x0A]);
    p
}

/// Whether `data` is the payload of an earlier round trip of this run (a late duplicate).
fn earlier(data: &[u8], token: &[u8; 8], seq: u32) -> bool {
    data.len() == 37
        && data[17..25] == token[..]
        && u32::from_be_bytes([data[25], data[26], data[27], data[28]]) < seq
}

fn changed(sent: &[u8], got: &[u8]) -> String {
    let at = sent
        .iter()
        .zip(got)
        .position(|(a, b)| a != b)
        .unwrap_or(sent.len().min(got.len()));
    format!(
        "the relayed data changed on the way: sent {} bytes, received {} bytes, first difference at byte {at}",
        sent.len(),
        got.len()
    )
}

/// What came over the control connection while waiting for relayed data.
enum FromServer {
    /// ChannelData with this payload.
    Channel(u16, Vec<u8>),
    /// A Data indication from this peer.
    Indication(Option<SocketAddr>, Vec<u8>),
    Other,
}

fn read_server(frame: &[u8]) -> FromServer {
    match classify(frame) {
        Kind::ChannelData => match ChannelData::parse(frame) {
            Some(cd) => FromServer::Channel(cd.number, cd.payload.to_vec()),
            None => FromServer::Other,
        },
        Kind::Stun => match MessageRef::parse(frame) {
            Ok(m) if m.method() == Method::DATA && m.class() == Class::Indication => {
                FromServer::Indication(
                    m.xor_peer_address().ok().flatten(),
                    m.data().unwrap_or_default().to_vec(),
                )
            }
            _ => FromServer::Other,
        },
        Kind::Other => FromServer::Other,
    }
}

/// The failure for relayed data that came as a Data indication instead of ChannelData.
fn indication_fail(from: Option<SocketAddr>, peer: SocketAddr) -> Fail {
    match from {
        Some(f) if f != peer => Fail::new(format!(
            "the data came as a Data indication from {f}, not as ChannelData on channel 0x4000 from the bound peer {peer}: a NAT between the peer and the relay gives the peer another port toward the relay than toward the server (address-dependent mapping); probe with --peer and an external UDP echo peer"
        )),
        _ => Fail::new(format!(
            "the data from {peer} came as a Data indication, not as ChannelData on channel 0x4000: the server does not use the channel bound to the peer"
        )),
    }
}

/// The result of the round trips: times and a detail line.
pub struct Trips {
    pub rtt: Rtt,
    pub detail: String,
}

fn summary(rtts: &[Duration], resent: u32, relayed: SocketAddr, note: &str) -> Trips {
    let ms: Vec<f64> = rtts.iter().map(|d| d.as_secs_f64() * 1000.0).collect();
    let min = ms.iter().copied().fold(f64::INFINITY, f64::min);
    let max = ms.iter().copied().fold(0.0, f64::max);
    let avg = ms.iter().sum::<f64>() / ms.len().max(1) as f64;
    let mut detail = format!(
        "{n}/{n} round trips through {relayed}, rtt min/avg/max {min:.3}/{avg:.3}/{max:.3} ms",
        n = rtts.len()
    );
    if resent > 0 {
        detail.push_str(&format!(", {resent} datagrams resent"));
    }
    detail.push_str(note);
    Trips {
        rtt: Rtt { min, avg, max },
        detail,
    }
}

fn round_prefix(seq: u32, count: u32) -> String {
    if seq == 0 {
        String::new()
    } else {
        format!("round trip {} of {count}: ", seq + 1)
    }
}

/// One round trip's wait for its payload to come back to the client.
struct Wait<'a> {
    p: &'a [u8],
    token: &'a [u8; 8],
    seq: u32,
    count: u32,
    /// The peer the payload went through, for the Data-indication explanation.
    peer: SocketAddr,
    deadline: Instant,
    /// "data" or "echo", in messages.
    what: &'static str,
}

/// Waits on the control connection until `w.p` comes back as ChannelData on [`CHANNEL`]:
/// late copies of earlier rounds are skipped, anything else carrying a wrong payload fails.
/// When the retransmission timer (500 ms, doubling) runs out, `resend` sends again; at the
/// deadline the round trip fails with `unreachable`. Returns how many times it resent.
fn await_on_channel(
    s: &mut Session,
    w: &Wait<'_>,
    mut resend: impl FnMut(&mut Session) -> Result<(), Fail>,
    unreachable: String,
) -> Result<u32, Fail> {
    let prefix = || round_prefix(w.seq, w.count);
    let mut rto = RTO;
    let mut resent = 0;
    let mut next_send = Instant::now() + rto;
    loop {
        match s.ctl.recv(next_send.min(w.deadline)) {
            Ok(frame) => match read_server(&frame) {
                FromServer::Channel(n, data) if data == w.p => {
                    if n != CHANNEL {
                        return Err(Fail::new(format!(
                            "{}the {} came on channel 0x{n:04x}, not on the bound channel 0x4000",
                            prefix(),
                            w.what
                        )));
                    }
                    return Ok(resent);
                }
                FromServer::Channel(_, data) if earlier(&data, w.token, w.seq) => {}
                FromServer::Channel(CHANNEL, data) => {
                    return Err(Fail::new(format!("{}{}", prefix(), changed(w.p, &data))));
                }
                FromServer::Indication(from, data) if data == w.p => {
                    return Err(indication_fail(from, w.peer));
                }
                _ => {}
            },
            Err(NetError::Timeout) => {
                let now = Instant::now();
                if now >= w.deadline {
                    return Err(Fail::new(format!("{}{unreachable}", prefix())));
                }
                if now >= next_send {
                    resend(s)?;
                    resent += 1;
                    rto *= 2;
                    next_send = now + rto;
                }
            }
            Err(e) => return Err(s.net_fail(e, "the round trips")),
        }
    }
}

/// Round trips with the probe's own peer: the peer sends to the relayed address, the data
/// must come to the client as ChannelData on [`CHANNEL`], the client sends it back as
/// ChannelData, and the peer must get it from the relayed address. Lost datagrams are resent
/// (500 ms, doubling); each round trip may take the probe's timeout.
pub fn local_round_trips(
    s: &mut Session,
    peer: &LocalPeer,
    relayed: SocketAddr,
    count: u32,
) -> Result<Trips, Fail> {
    let mut token = [0u8; 8];
    getrandom::fill(&mut token).map_err(|e| Fail::new(format!("cannot get random bytes: {e}")))?;
    let mut rtts = Vec::new();
    let mut resent = 0u32;
    let mut note = String::new();
    let peer_io = |e: std::io::Error| Fail::new(format!("the peer's UDP socket failed: {e}"));
    for seq in 0..count {
        let p = payload(&token, seq);
        let start = Instant::now();
        let deadline = start + s.timeout;

        // Peer -> relay -> client.
        peer.socket.send_to(&p, relayed).map_err(peer_io)?;
        let unreachable = format!(
            "relay unreachable: data did not come through the relay within {} s; a firewall may block UDP to the relay ports, or the advertised relay address ({relayed}) is wrong (external-ip)",
            s.timeout_text
        );
        let wait = Wait {
            p: &p,
            token: &token,
            seq,
            count,
            peer: peer.addr,
            deadline,
            what: "data",
        };
        resent += await_on_channel(
            s,
            &wait,
            |_| {
                peer.socket.send_to(&p, relayed).map_err(peer_io)?;
                Ok(())
            },
            unreachable,
        )?;

        // Client -> relay -> peer.
        let frame = channel_data(CHANNEL, &p);
        let mut rto = RTO;
        s.ctl
            .send(&frame, deadline)
            .map_err(|e| s.net_fail(e, "the round trips"))?;
        let mut next_send = Instant::now() + rto;
        let mut buf = vec![0u8; 2048];
        loop {
            peer.socket
                .set_read_timeout(Some(left(next_send.min(deadline))))
                .map_err(peer_io)?;
            match peer.socket.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let data = &buf[..n];
                    if data == p.as_slice() {
                        if from != relayed && note.is_empty() {
                            note = format!(
                                " (data came back from {from}, not from the advertised relayed address {relayed})"
                            );
                        }
                        break;
                    }
                    if from != relayed || earlier(data, &token, seq) {
                        continue;
                    }
                    return Err(Fail::new(format!(
                        "{}{}",
                        round_prefix(seq, count),
                        changed(&p, data)
                    )));
                }
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    let now = Instant::now();
                    if now >= deadline {
                        return Err(Fail::new(format!(
                            "{}relay unreachable: data the client sent through the relay did not reach the peer at {} within {} s; the server did not forward ChannelData from the client, or a firewall blocks UDP from the relay ({relayed}) to the peer",
                            round_prefix(seq, count),
                            peer.addr,
                            s.timeout_text
                        )));
                    }
                    if now >= next_send {
                        s.ctl
                            .send(&frame, deadline)
                            .map_err(|e| s.net_fail(e, "the round trips"))?;
                        resent += 1;
                        rto *= 2;
                        next_send = now + rto;
                    }
                }
                // An ICMP error for an earlier datagram, or a signal: keep waiting.
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::ConnectionRefused | ErrorKind::Interrupted
                    ) =>
                {
                    std::thread::sleep(Duration::from_millis(1));
                }
                Err(e) => return Err(peer_io(e)),
            }
        }
        rtts.push(start.elapsed());
    }
    Ok(summary(&rtts, resent, relayed, &note))
}

/// Round trips with an external echo peer: the client sends ChannelData, the relay sends it
/// to the peer, the peer echoes it to the relay, and the client must get it back as
/// ChannelData on [`CHANNEL`].
pub fn echo_round_trips(
    s: &mut Session,
    peer: SocketAddr,
    relayed: SocketAddr,
    count: u32,
) -> Result<Trips, Fail> {
    let mut token = [0u8; 8];
    getrandom::fill(&mut token).map_err(|e| Fail::new(format!("cannot get random bytes: {e}")))?;
    let mut rtts = Vec::new();
    let mut resent = 0u32;
    for seq in 0..count {
        let p = payload(&token, seq);
        let frame = channel_data(CHANNEL, &p);
        let start = Instant::now();
        let deadline = start + s.timeout;
        s.ctl
            .send(&frame, deadline)
            .map_err(|e| s.net_fail(e, "the round trips"))?;
        let unreachable = format!(
            "relay unreachable: no echo came back through the relay within {} s; the peer {peer} did not answer (is it a UDP echo server?), a firewall blocks UDP between the relay ({relayed}) and the peer, or the server does not forward ChannelData",
            s.timeout_text
        );
        let wait = Wait {
            p: &p,
            token: &token,
            seq,
            count,
            peer,
            deadline,
            what: "echo",
        };
        resent += await_on_channel(
            s,
            &wait,
            |s| {
                s.ctl
                    .send(&frame, deadline)
                    .map_err(|e| s.net_fail(e, "the round trips"))
            },
            unreachable,
        )?;
        rtts.push(start.elapsed());
    }
    Ok(summary(&rtts, resent, relayed, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn payloads_tell_rounds_apart() {
        let token = [7u8; 8];
        let p0 = payload(&token, 0);
        let p3 = payload(&token, 3);
        assert_eq!(p0.len(), 37);
        assert!(earlier(&p0, &token, 3));
        assert!(!earlier(&p3, &token, 3));
        assert!(!earlier(&p0, &[8u8; 8], 3));
        assert!(!earlier(b"short", &token, 3));
        assert!(changed(&p0, &p3).contains("byte 28"));
    }
}
