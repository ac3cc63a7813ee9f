//! A simulated client's connection to the server: a UDP socket of its own, connected to the
//! server, or a TCP connection carrying STUN messages and padded ChannelData frames
//! (RFC 8656 12.5). Non-blocking sockets registered with the thread's tokio reactor; UDP
//! datagrams are sent straight with `send(2)` (a full buffer drops the datagram, as a network
//! would, and is counted by the caller).

use std::io::{self, ErrorKind};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::ops::Range;

use socket2::{Domain, Protocol, SockRef, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpSocket, TcpStream, UdpSocket};

use crate::wire::{Frame, frame_len};

/// The largest frame read from a TCP stream (the generator's payloads are at most
/// [`super::MAX_PAYLOAD`] bytes; replies from servers are small).
pub const TCP_BUFFER: usize = 16 * 1024;

/// Socket buffer size asked for on client sockets (the kernel caps it at `net.core.*mem_max`).
const CLIENT_BUFFER: usize = 1 << 20;

/// The source address of simulated client `i` toward `server`: for an IPv4 server a distinct
/// 127.a.b.c (a in 1..=254, c in 1..=254: 16 million of them) so that no per-address limit of
/// the server bites; `::1` for an IPv6 server.
pub fn source_ip(server: SocketAddr, i: u32) -> IpAddr {
    if server.is_ipv6() {
        return IpAddr::V6(std::net::Ipv6Addr::LOCALHOST);
    }
    let c = 1 + i % 254;
    let b = (i / 254) % 256;
    let a = 1 + (i / (254 * 256)) % 254;
    IpAddr::V4(Ipv4Addr::new(127, a as u8, b as u8, c as u8))
}

/// A non-blocking UDP socket bound to `local` with large buffers.
pub fn bind_udp(local: SocketAddr, buffer: usize) -> io::Result<std::net::UdpSocket> {
    let s = Socket::new(Domain::for_address(local), Type::DGRAM, Some(Protocol::UDP))?;
    // Best effort: the kernel caps these at net.core.[rw]mem_max.
    let _ = s.set_recv_buffer_size(buffer);
    let _ = s.set_send_buffer_size(buffer);
    s.set_nonblocking(true)?;
    s.bind(&local.into())?;
    Ok(s.into())
}

/// A client connection.
pub enum Conn {
    Udp(UdpSocket),
    Tcp(Box<TcpConn>),
}

/// A TCP connection and the bytes read from it that do not yet make a whole frame.
pub struct TcpConn {
    stream: TcpStream,
    buf: Box<[u8]>,
    start: usize,
    end: usize,
}

impl Conn {
    /// Opens a connection from `local` (port chosen by the system) to `server`. Must be called
    /// within a tokio runtime.
    pub async fn connect(tcp: bool, local: IpAddr, server: SocketAddr) -> io::Result<Conn> {
        let local = SocketAddr::new(local, 0);
        if tcp {
            let s = if server.is_ipv4() {
                TcpSocket::new_v4()?
            } else {
                TcpSocket::new_v6()?
            };
            s.bind(local)?;
            let stream = s.connect(server).await?;
            stream.set_nodelay(true)?;
            Ok(Conn::Tcp(Box::new(TcpConn {
                stream,
                buf: vec![0u8; TCP_BUFFER].into_boxed_slice(),
                start: 0,
                end: 0,
            })))
        } else {
            let s = bind_udp(local, CLIENT_BUFFER)?;
            s.connect(server)?;
            Ok(Conn::Udp(UdpSocket::from_std(s)?))
        }
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self, Conn::Tcp(_))
    }

    /// Sends one datagram or frame (the caller pads ChannelData on TCP). On UDP this never
    /// waits: a full socket buffer is an error of kind `WouldBlock`.
    pub async fn send(&mut self, frame: &[u8]) -> io::Result<()> {
        match self {
            Conn::Udp(s) => SockRef::from(&*s).send(frame).map(|_| ()),
            Conn::Tcp(t) => t.stream.write_all(frame).await,
        }
    }

    /// Waits until something can be read.
    pub async fn readable(&self) -> io::Result<()> {
        match self {
            Conn::Udp(s) => s.readable().await,
            Conn::Tcp(t) => t.stream.readable().await,
        }
    }

    /// The next datagram (read into `scratch`) or complete frame already received, without
    /// waiting: `Ok(None)` when there is none yet. Errors: the socket's (on UDP an ICMP error
    /// such as `ConnectionRefused` is reported once), `UnexpectedEof` when the server closed
    /// the connection, `InvalidData` when the stream is not STUN/ChannelData framing.
    pub fn recv<'a>(&'a mut self, scratch: &'a mut [u8]) -> io::Result<Option<&'a [u8]>> {
        match self {
            Conn::Udp(s) => match s.try_recv(scratch) {
                Ok(n) => Ok(Some(&scratch[..n])),
                Err(e) if e.kind() == ErrorKind::WouldBlock => Ok(None),
                Err(e) => Err(e),
            },
            Conn::Tcp(t) => match t.next_frame() {
                Ok(Some(r)) => Ok(Some(&t.buf[r])),
                Ok(None) => Ok(None),
                Err(e) => Err(e),
            },
        }
    }
}

impl TcpConn {
    fn next_frame(&mut self) -> io::Result<Option<Range<usize>>> {
        loop {
            let need = match frame_len(&self.buf[self.start..self.end]) {
                Frame::Complete(n) => {
                    let r = self.start..self.start + n;
                    self.start += n;
                    return Ok(Some(r));
                }
                Frame::Invalid => {
                    return Err(io::Error::new(
                        ErrorKind::InvalidData,
                        "the server sent bytes that are neither STUN nor ChannelData",
                    ));
                }
                Frame::Incomplete(need) => need,
            };
            if need > self.buf.len() {
                return Err(io::Error::new(
                    ErrorKind::InvalidData,
                    format!("a frame of {need} bytes is larger than the generator reads"),
                ));
            }
            if self.start == self.end {
                self.start = 0;
                self.end = 0;
            } else if self.buf.len() - self.start < need {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            }
            match self.stream.try_read(&mut self.buf[self.end..]) {
                Ok(0) => {
                    return Err(io::Error::new(
                        ErrorKind::UnexpectedEof,
                        "the server closed the connection",
                    ));
                }
                Ok(n) => self.end += n,
                Err(e) if e.kind() == ErrorKind::WouldBlock => return Ok(None),
                Err(e) => return Err(e),
            }
        }
    }
}
