//! The `turn` crate's client for tests: [`Tap`], a `webrtc_util::Conn` that records each
//! message in both directions (so tests can check what crossed the wire as well as what the
//! client API returned) and, over TCP, does the RFC 8656 stream framing the `turn` crate leaves
//! to its `Conn`; [`turn_client`], a client listening on a tap; and the payloads and replies
//! the relay tests exchange with their peers.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex as StdMutex};
use std::time::Duration;

use stun::message::Message;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpStream, UdpSocket};
use tokio::time::timeout;
use turn::client::{Client, ClientConfig};
use webrtc_util::Conn;

use super::REALM;

/// Limit for connecting.
const NET: Duration = Duration::from_secs(5);
const LOCALHOST: IpAddr = IpAddr::V4(Ipv4Addr::LOCALHOST);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dir {
    Out,
    In,
}

enum Transport {
    Udp(UdpSocket),
    Tcp {
        rd: tokio::sync::Mutex<OwnedReadHalf>,
        wr: tokio::sync::Mutex<OwnedWriteHalf>,
        local: SocketAddr,
    },
}

pub struct Tap {
    transport: Transport,
    server: SocketAddr,
    /// Every message in order. Over TCP, inbound ChannelData frames keep their padding.
    packets: StdMutex<Vec<(Dir, Vec<u8>)>>,
    /// Anything unexpected the tap saw (a frame it could not delimit, a foreign sender).
    errors: StdMutex<Vec<String>>,
}

impl Tap {
    /// A tap on a new UDP socket on 127.0.0.1.
    pub async fn udp(server: SocketAddr) -> Arc<Tap> {
        Tap::udp_on(UdpSocket::bind((LOCALHOST, 0)).await.unwrap(), server)
    }

    /// A tap on `sock` (opened by the caller, in a network namespace say).
    pub fn udp_on(sock: UdpSocket, server: SocketAddr) -> Arc<Tap> {
        Tap::with(Transport::Udp(sock), server)
    }

    /// A tap on a new TCP connection to `server`.
    pub async fn tcp(server: SocketAddr) -> Arc<Tap> {
        let stream = timeout(NET, TcpStream::connect(server))
            .await
            .expect("tcp connect timed out")
            .expect("tcp connect");
        Tap::tcp_on(stream, server)
    }

    /// A tap on `stream`, a TCP connection to `server` opened by the caller.
    pub fn tcp_on(stream: TcpStream, server: SocketAddr) -> Arc<Tap> {
        stream.set_nodelay(true).unwrap();
        let local = stream.local_addr().unwrap();
        let (rd, wr) = stream.into_split();
        let transport = Transport::Tcp {
            rd: tokio::sync::Mutex::new(rd),
            wr: tokio::sync::Mutex::new(wr),
            local,
        };
        Tap::with(transport, server)
    }

    fn with(transport: Transport, server: SocketAddr) -> Arc<Tap> {
        Arc::new(Tap {
            transport,
            server,
            packets: StdMutex::new(Vec::new()),
            errors: StdMutex::new(Vec::new()),
        })
    }

    pub fn local(&self) -> SocketAddr {
        match &self.transport {
            Transport::Udp(s) => s.local_addr().unwrap(),
            Transport::Tcp { local, .. } => *local,
        }
    }

    pub fn is_tcp(&self) -> bool {
        matches!(self.transport, Transport::Tcp { .. })
    }

    fn record(&self, dir: Dir, p: &[u8]) {
        self.packets.lock().unwrap().push((dir, p.to_vec()));
    }

    fn error(&self, e: String) -> webrtc_util::Error {
        self.errors.lock().unwrap().push(e.clone());
        webrtc_util::Error::Other(e)
    }

    pub fn packets(&self, dir: Dir) -> Vec<Vec<u8>> {
        let p = self.packets.lock().unwrap();
        p.iter()
            .filter(|(d, _)| *d == dir)
            .map(|(_, b)| b.clone())
            .collect()
    }

    /// One line per message, for failure messages.
    pub fn dump(&self) -> String {
        let p = self.packets.lock().unwrap();
        p.iter()
            .map(|(d, b)| match decode(b) {
                Some(m) => format!("{d:?} {m}"),
                None => format!("{d:?} {} bytes {:02x?}", b.len(), &b[..b.len().min(8)]),
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    pub fn errors(&self) -> Vec<String> {
        self.errors.lock().unwrap().clone()
    }

    async fn do_send(&self, buf: &[u8], target: SocketAddr) -> webrtc_util::Result<usize> {
        if target != self.server {
            return Err(self.error(format!("client sent to {target}, not the server")));
        }
        self.record(Dir::Out, buf);
        match &self.transport {
            Transport::Udp(s) => Ok(s.send_to(buf, target).await?),
            Transport::Tcp { wr, .. } => {
                // RFC 8656 section 12.5: over a stream, ChannelData is padded to a multiple
                // of 4 (the `turn` crate already pads; pad here too should it stop doing so).
                let mut frame = buf.to_vec();
                if is_channel_data(buf) {
                    frame.resize(round4(buf.len()), 0);
                }
                let mut w = wr.lock().await;
                w.write_all(&frame).await?;
                Ok(buf.len())
            }
        }
    }

    async fn do_recv(&self, buf: &mut [u8]) -> webrtc_util::Result<(usize, SocketAddr)> {
        match &self.transport {
            Transport::Udp(s) => {
                let (n, from) = s.recv_from(buf).await?;
                if from != self.server {
                    return Err(self.error(format!("datagram from {from}, not the server")));
                }
                self.record(Dir::In, &buf[..n]);
                Ok((n, from))
            }
            Transport::Tcp { rd, .. } => {
                let mut r = rd.lock().await;
                let mut head = [0u8; 4];
                r.read_exact(&mut head).await?;
                let len = u16::from_be_bytes([head[2], head[3]]) as usize;
                let total = match head[0] >> 6 {
                    // STUN: 20-byte header, attributes are 4-aligned.
                    0 if len.is_multiple_of(4) => 20 + len,
                    // ChannelData: 4-byte header, padded to 4 on streams.
                    1 => round4(4 + len),
                    _ => {
                        return Err(self.error(format!("undelimitable frame header {head:02x?}")));
                    }
                };
                if total > buf.len() {
                    return Err(self.error(format!("frame of {total} bytes")));
                }
                buf[..4].copy_from_slice(&head);
                r.read_exact(&mut buf[4..total]).await?;
                self.record(Dir::In, &buf[..total]);
                Ok((total, self.server))
            }
        }
    }
}

type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

// `Conn` is an `async_trait` trait; this is what that macro expands to, written out so the
// tests need no extra dependency.
impl Conn for Tap {
    fn connect<'l0, 'at>(&'l0 self, _addr: SocketAddr) -> BoxFut<'at, webrtc_util::Result<()>>
    where
        'l0: 'at,
        Self: 'at,
    {
        Box::pin(async { Err(webrtc_util::Error::Other("not applicable".into())) })
    }

    fn recv<'l0, 'l1, 'at>(&'l0 self, buf: &'l1 mut [u8]) -> BoxFut<'at, webrtc_util::Result<usize>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(async move { Ok(self.do_recv(buf).await?.0) })
    }

    fn recv_from<'l0, 'l1, 'at>(
        &'l0 self,
        buf: &'l1 mut [u8],
    ) -> BoxFut<'at, webrtc_util::Result<(usize, SocketAddr)>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(self.do_recv(buf))
    }

    fn send<'l0, 'l1, 'at>(&'l0 self, buf: &'l1 [u8]) -> BoxFut<'at, webrtc_util::Result<usize>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(self.do_send(buf, self.server))
    }

    fn send_to<'l0, 'l1, 'at>(
        &'l0 self,
        buf: &'l1 [u8],
        target: SocketAddr,
    ) -> BoxFut<'at, webrtc_util::Result<usize>>
    where
        'l0: 'at,
        'l1: 'at,
        Self: 'at,
    {
        Box::pin(self.do_send(buf, target))
    }

    fn local_addr(&self) -> webrtc_util::Result<SocketAddr> {
        Ok(self.local())
    }

    fn remote_addr(&self) -> Option<SocketAddr> {
        Some(self.server)
    }

    fn close<'l0, 'at>(&'l0 self) -> BoxFut<'at, webrtc_util::Result<()>>
    where
        'l0: 'at,
        Self: 'at,
    {
        Box::pin(async move {
            if let Transport::Tcp { wr, .. } = &self.transport {
                wr.lock().await.shutdown().await?;
            }
            Ok(())
        })
    }

    fn as_any(&self) -> &(dyn std::any::Any + Send + Sync) {
        self
    }
}

pub fn round4(n: usize) -> usize {
    n.div_ceil(4) * 4
}

/// RFC 8656 section 12: channel numbers 0x4000 through 0x4FFF.
pub fn is_channel_data(p: &[u8]) -> bool {
    p.len() >= 4 && (0x40..=0x4f).contains(&p[0])
}

pub fn decode(p: &[u8]) -> Option<Message> {
    if p.is_empty() || p[0] >> 6 != 0 {
        return None;
    }
    let mut m = Message::new();
    m.raw = p.to_vec();
    m.decode().ok()?;
    Some(m)
}

/// A `turn` crate client of the server at `server` over `conn`, listening (call inside a
/// runtime).
pub async fn turn_client(
    server: SocketAddr,
    conn: Arc<dyn Conn + Send + Sync>,
    user: &str,
    password: &str,
) -> Client {
    let client = Client::new(ClientConfig {
        stun_serv_addr: server.to_string(),
        turn_serv_addr: server.to_string(),
        username: user.into(),
        password: password.into(),
        realm: REALM.into(),
        software: String::new(),
        rto_in_ms: 0,
        conn,
        vnet: None,
    })
    .await
    .expect("client");
    client.listen().await.expect("listen");
    client
}

/// What an echo peer sends back for `p`: its bytes reversed and flipped, so that an answer
/// cannot be mistaken for the request.
pub fn reply_for(p: &[u8]) -> Vec<u8> {
    p.iter().rev().map(|b| b ^ 0xa5).collect()
}

/// Payload `i` of `n`: sizes spread from 1 to 1200 bytes, contents varying with `i`.
pub fn payload(i: usize, n: usize) -> Vec<u8> {
    let size = 1 + i * 1199 / (n - 1).max(1);
    (0..size)
        .map(|j| (i as u32 * 131 + j as u32 * 7 + (j as u32 >> 8)) as u8)
        .collect()
}
