//! The control connection between the probe and the server: a connected UDP socket, or a TCP
//! stream carrying STUN and ChannelData framed as RFC 8656 12.5 says. Blocking sockets with
//! timeouts; every wait ends at a deadline.

use std::io::{self, ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream, UdpSocket};
use std::time::{Duration, Instant};

use crate::wire::{
    CHANNEL_DATA_HEADER_LEN, Class, Frame, HEADER_LEN, MessageRef, TransactionId, frame_len, pad4,
};

use super::url::Transport;

/// The initial retransmission timeout of RFC 8489 6.2.1; it doubles after every send.
pub const RTO: Duration = Duration::from_millis(500);

/// The largest datagram or frame the probe reads.
const MAX_FRAME: usize = 65_536 + HEADER_LEN;

/// Why a wait on the network ended without what was waited for.
#[derive(Debug)]
pub enum NetError {
    /// Nothing (matching) arrived before the deadline.
    Timeout,
    /// The server closed the TCP connection.
    Closed,
    /// The server sent bytes that are neither STUN nor ChannelData on the TCP stream.
    Garbage,
    /// A socket error.
    Io(io::Error),
}

impl std::fmt::Display for NetError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NetError::Timeout => f.write_str("timed out"),
            NetError::Closed => f.write_str("the server closed the connection"),
            NetError::Garbage => {
                f.write_str("the server sent bytes that are neither STUN nor ChannelData")
            }
            NetError::Io(e) => write!(f, "{e}"),
        }
    }
}

/// A UDP socket bound to the unspecified address of `server`'s family.
pub fn udp_socket_for(server: SocketAddr) -> io::Result<UdpSocket> {
    let any: IpAddr = if server.is_ipv4() {
        Ipv4Addr::UNSPECIFIED.into()
    } else {
        Ipv6Addr::UNSPECIFIED.into()
    };
    UdpSocket::bind(SocketAddr::new(any, 0))
}

/// The local address the system would send from toward `server` (no packet is sent).
pub fn local_ip_toward(server: SocketAddr) -> io::Result<IpAddr> {
    let s = udp_socket_for(server)?;
    s.connect(server)?;
    Ok(s.local_addr()?.ip())
}

/// The time left until `deadline`, at least a millisecond (a zero timeout means "forever" to
/// the socket API).
pub fn left(deadline: Instant) -> Duration {
    deadline
        .saturating_duration_since(Instant::now())
        .max(Duration::from_millis(1))
}

fn timed_out(e: &io::Error) -> bool {
    matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut)
}

enum Socket {
    Udp(UdpSocket),
    Tcp(TcpStream),
}

/// The control connection.
pub struct Control {
    socket: Socket,
    /// Bytes read from the TCP stream and not yet returned as frames.
    pending: Vec<u8>,
    /// An ICMP port unreachable came back for a UDP datagram (Linux reports it on the
    /// connected socket as ECONNREFUSED).
    pub port_unreachable: bool,
}

impl Control {
    /// A UDP socket connected to `server` (only its datagrams are received).
    pub fn udp(server: SocketAddr) -> io::Result<Control> {
        let s = udp_socket_for(server)?;
        s.connect(server)?;
        Ok(Control {
            socket: Socket::Udp(s),
            pending: Vec::new(),
            port_unreachable: false,
        })
    }

    /// A TCP connection to `server`, opened within `timeout`.
    pub fn tcp(server: SocketAddr, timeout: Duration) -> io::Result<Control> {
        let s = TcpStream::connect_timeout(&server, timeout)?;
        let _ = s.set_nodelay(true);
        Ok(Control {
            socket: Socket::Tcp(s),
            pending: Vec::new(),
            port_unreachable: false,
        })
    }

    pub fn transport(&self) -> Transport {
        match self.socket {
            Socket::Udp(_) => Transport::Udp,
            Socket::Tcp(_) => Transport::Tcp,
        }
    }

    /// The probe's own address on the control connection.
    pub fn local_addr(&self) -> io::Result<SocketAddr> {
        match &self.socket {
            Socket::Udp(s) => s.local_addr(),
            Socket::Tcp(s) => s.local_addr(),
        }
    }

    /// Sends one STUN message or ChannelData frame; on TCP a ChannelData frame is padded to a
    /// multiple of four.
    pub fn send(&mut self, frame: &[u8], deadline: Instant) -> Result<(), NetError> {
        match &mut self.socket {
            Socket::Udp(s) => match s.send(frame) {
                Ok(_) => Ok(()),
                Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                    self.port_unreachable = true;
                    Ok(())
                }
                Err(e) => Err(NetError::Io(e)),
            },
            Socket::Tcp(s) => {
                let padding = [0u8; 3];
                let pad = pad4(frame.len()) - frame.len();
                s.set_write_timeout(Some(left(deadline)))
                    .map_err(NetError::Io)?;
                let r = s
                    .write_all(frame)
                    .and_then(|()| s.write_all(&padding[..pad]));
                match r {
                    Ok(()) => Ok(()),
                    Err(e) if timed_out(&e) => Err(NetError::Timeout),
                    Err(e) if e.kind() == ErrorKind::BrokenPipe => Err(NetError::Closed),
                    Err(e) => Err(NetError::Io(e)),
                }
            }
        }
    }

    /// The next datagram or frame from the server, waiting until `deadline` at most.
    pub fn recv(&mut self, deadline: Instant) -> Result<Vec<u8>, NetError> {
        match &mut self.socket {
            Socket::Udp(s) => loop {
                if Instant::now() >= deadline {
                    return Err(NetError::Timeout);
                }
                s.set_read_timeout(Some(left(deadline)))
                    .map_err(NetError::Io)?;
                let mut buf = vec![0u8; MAX_FRAME];
                match s.recv(&mut buf) {
                    Ok(n) => {
                        buf.truncate(n);
                        return Ok(buf);
                    }
                    Err(e) if timed_out(&e) => return Err(NetError::Timeout),
                    Err(e) if e.kind() == ErrorKind::ConnectionRefused => {
                        self.port_unreachable = true;
                        // Do not spin on a stream of ICMP errors.
                        std::thread::sleep(Duration::from_millis(10).min(left(deadline)));
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => return Err(NetError::Io(e)),
                }
            },
            Socket::Tcp(s) => loop {
                match frame_len(&self.pending) {
                    Frame::Complete(n) => {
                        let rest = self.pending.split_off(n);
                        return Ok(std::mem::replace(&mut self.pending, rest));
                    }
                    Frame::Invalid => return Err(NetError::Garbage),
                    Frame::Incomplete(_) => {}
                }
                if Instant::now() >= deadline {
                    return Err(NetError::Timeout);
                }
                s.set_read_timeout(Some(left(deadline)))
                    .map_err(NetError::Io)?;
                let mut chunk = [0u8; 4096];
                match s.read(&mut chunk) {
                    Ok(0) => return Err(NetError::Closed),
                    Ok(n) => self.pending.extend_from_slice(&chunk[..n]),
                    Err(e) if timed_out(&e) => return Err(NetError::Timeout),
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) if e.kind() == ErrorKind::ConnectionReset => {
                        return Err(NetError::Closed);
                    }
                    Err(e) => return Err(NetError::Io(e)),
                }
            },
        }
    }

    /// Sends a request and returns the response (success or error) with its transaction ID.
    /// Over UDP the request is retransmitted after 500 ms, then after twice as long each time
    /// (RFC 8489 6.2.1), until `deadline`; over TCP it is sent once. Other traffic is skipped.
    pub fn transact(
        &mut self,
        request: &[u8],
        txid: &TransactionId,
        deadline: Instant,
    ) -> Result<Vec<u8>, NetError> {
        let udp = self.transport() == Transport::Udp;
        let mut rto = RTO;
        self.send(request, deadline)?;
        let mut next_send = Instant::now() + rto;
        loop {
            let wait_until = if udp {
                next_send.min(deadline)
            } else {
                deadline
            };
            match self.recv(wait_until) {
                Ok(frame) => {
                    if is_response_to(&frame, txid) {
                        return Ok(frame);
                    }
                }
                Err(NetError::Timeout) => {
                    let now = Instant::now();
                    if !udp || now >= deadline {
                        return Err(NetError::Timeout);
                    }
                    if now >= next_send {
                        rto *= 2;
                        self.send(request, deadline)?;
                        next_send = now + rto;
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// Whether `frame` is a success or error response carrying `txid`.
pub fn is_response_to(frame: &[u8], txid: &TransactionId) -> bool {
    matches!(
        MessageRef::header(frame),
        Some((_, Class::Success | Class::Error, t)) if t == *txid
    )
}

/// A ChannelData frame: 4-byte header and payload (the TCP padding is added by
/// [`Control::send`]).
pub fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(CHANNEL_DATA_HEADER_LEN + payload.len());
    f.extend_from_slice(&number.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    f
}
