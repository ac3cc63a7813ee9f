//! TURN over stream transports, TCP and TLS (RFC 8656 3.1, RFC 7065): STUN messages and
//! ChannelData frames (padded to four bytes) back to back on one connection. Closing the
//! connection deletes its allocation.
//!
//! Per connection, one task reads and feeds the core, and one writer task drains the
//! connection's outgoing queue. On plain TCP a frame is written straight to the socket when
//! nothing is queued (the common case: no task wake-up per relayed frame); on TLS every frame
//! goes through the queue to the writer task, which owns the encrypting half of the stream.
//! The queue holds whole frames up to a bound; beyond it frames are dropped and counted.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::tcp::OwnedWriteHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tracing::{debug, warn};

use super::{Driver, bump};
use crate::core::{ClientId, Transport};
use crate::wire::{Frame, frame_len};

/// Bytes a connection may have queued for writing; frames beyond it are dropped.
const MAX_QUEUED: usize = 256 * 1024;
/// Initial read buffer; it grows up to the largest frame.
const READ_BUF: usize = 4096;
/// The largest frame: a STUN message of 20 + 65,532 bytes (ChannelData tops out at
/// 4 + 65,535 + 1 of padding).
const MAX_FRAME: usize = 20 + 65_532;
/// A TLS client must finish its handshake within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The sending side of one client connection, shared with the tasks that relay to it.
pub struct StreamConn {
    /// Plain TCP: the socket, written directly while nothing is queued. `None` on TLS.
    direct: Option<OwnedWriteHalf>,
    queue: RefCell<Vec<u8>>,
    notify: Notify,
    closed: Cell<bool>,
    /// Set when the writer task has ended (after its TLS close_notify, if any).
    finished: Cell<bool>,
    dropped: Cell<u64>,
}

impl StreamConn {
    fn new(direct: Option<OwnedWriteHalf>) -> Self {
        StreamConn {
            direct,
            queue: RefCell::new(Vec::new()),
            notify: Notify::new(),
            closed: Cell::new(false),
            finished: Cell::new(false),
            dropped: Cell::new(0),
        }
    }

    /// Sends a whole frame: written now if possible, else queued; dropped (and counted) if the
    /// queue is full. Returns whether the frame was written or queued.
    pub fn send(&self, frame: &[u8]) -> bool {
        if self.closed.get() {
            return false;
        }
        let mut q = self.queue.borrow_mut();
        let mut rest = frame;
        if q.is_empty()
            && let Some(w) = &self.direct
        {
            match w.try_write(frame) {
                Ok(n) if n == frame.len() => return true,
                Ok(n) => rest = &frame[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.close();
                    return false;
                }
            }
        } else if q.len() + frame.len() > MAX_QUEUED {
            self.dropped.set(self.dropped.get() + 1);
            return false;
        }
        q.extend_from_slice(rest);
        self.notify.notify_one();
        true
    }

    /// Stops sending: the writer ends (a TLS writer sends close_notify first).
    pub(super) fn close(&self) {
        self.closed.set(true);
        self.notify.notify_one();
    }

    /// Whether the writer has ended.
    pub(super) fn finished(&self) -> bool {
        self.finished.get()
    }
}

/// Accepts plain TCP connections.
pub(super) async fn accept_tcp(driver: Rc<Driver>, listener: TcpListener, idx: usize) {
    accept_loop(
        driver.clone(),
        listener,
        idx,
        |stream, remote, local, slot| {
            let (rd, wr) = stream.into_split();
            let conn = Rc::new(StreamConn::new(Some(wr)));
            let client = ClientId {
                transport: Transport::Tcp,
                remote,
                local,
            };
            let driver = driver.clone();
            tokio::task::spawn_local(async move {
                serve_connection(driver, conn, client, idx, rd, None).await;
                drop(slot);
            });
        },
    )
    .await
}

/// Accepts TLS connections: each handshake runs in the connection's own task, bounded in time.
pub(super) async fn accept_tls(
    driver: Rc<Driver>,
    listener: TcpListener,
    idx: usize,
    acceptor: TlsAcceptor,
) {
    accept_loop(
        driver.clone(),
        listener,
        idx,
        |stream, remote, local, slot| {
            let driver = driver.clone();
            let acceptor = acceptor.clone();
            tokio::task::spawn_local(async move {
                let _slot = slot;
                let client = ClientId {
                    transport: Transport::Tls,
                    remote,
                    local,
                };
                let tls =
                    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(e)) => {
                            debug!(%client, error = %e, "tls handshake failed");
                            return;
                        }
                        Err(_) => {
                            debug!(%client, "tls handshake timed out");
                            return;
                        }
                    };
                let (rd, wr) = tokio::io::split(tls);
                let conn = Rc::new(StreamConn::new(None));
                serve_connection(driver, conn, client, idx, rd, Some(wr)).await;
            });
        },
    )
    .await
}

/// One open connection, counted against `max-connections` until dropped.
pub(super) struct ConnSlot(Rc<Driver>);

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections while fewer than `max-connections` are open; beyond it a new
/// connection is closed at once (and counted).
async fn accept_loop(
    driver: Rc<Driver>,
    listener: TcpListener,
    idx: usize,
    mut on_accept: impl FnMut(TcpStream, SocketAddr, SocketAddr, ConnSlot),
) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "stream listener has no address");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let counters = &driver.listeners[idx];
                // Checked and counted in two steps: with several drivers accepting at once, the
                // limit may be passed by a connection or two, which is harmless.
                if driver.connections.load(Ordering::Relaxed) >= driver.max_connections.get() {
                    bump(&counters.refused, 1);
                    debug!(%local, %remote, "connection refused: max-connections reached");
                    continue;
                }
                bump(&counters.accepted, 1);
                let _ = stream.set_nodelay(true);
                driver.connections.fetch_add(1, Ordering::Relaxed);
                on_accept(stream, remote, local, ConnSlot(driver.clone()));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

type TlsWriter = WriteHalf<TlsStream<TcpStream>>;

/// Drains the queue of a connection until it closes, then marks it finished.
async fn writer(conn: Rc<StreamConn>, tls: Option<TlsWriter>) {
    write_queue(&conn, tls).await;
    conn.finished.set(true);
}

async fn write_queue(conn: &Rc<StreamConn>, mut tls: Option<TlsWriter>) {
    let mut chunk = Vec::new();
    loop {
        conn.notify.notified().await;
        loop {
            if conn.closed.get() {
                if let Some(w) = tls.as_mut() {
                    let _ = w.shutdown().await;
                }
                return;
            }
            if conn.queue.borrow().is_empty() {
                break;
            }
            let ok = match (&conn.direct, tls.as_mut()) {
                (Some(w), _) => write_direct(conn, w).await,
                (None, Some(w)) => {
                    // Take what is queued (swapping buffers, so the queue keeps accepting
                    // frames while this awaits), encrypt and send it.
                    std::mem::swap(&mut chunk, &mut *conn.queue.borrow_mut());
                    let ok = write_records(w, &chunk).await;
                    chunk.clear();
                    ok
                }
                (None, None) => false,
            };
            if !ok {
                conn.close();
                return;
            }
        }
    }
}

/// Encrypts queued frames one TLS record per frame, then flushes. TLS is a byte stream and
/// a record may carry several frames, but some clients (coturn's test client among them)
/// read one message per record, as coturn writes them; the cost is a record header per frame.
async fn write_records(w: &mut TlsWriter, frames: &[u8]) -> bool {
    let mut rest = frames;
    while !rest.is_empty() {
        // The queue holds whole frames only; anything unframable is written as it is.
        let n = match frame_len(rest) {
            Frame::Complete(n) => n,
            _ => rest.len(),
        };
        if w.write_all(&rest[..n]).await.is_err() {
            return false;
        }
        rest = &rest[n..];
    }
    w.flush().await.is_ok()
}

/// Writes queued bytes to a plain TCP socket once it is writable.
async fn write_direct(conn: &StreamConn, w: &OwnedWriteHalf) -> bool {
    if w.writable().await.is_err() {
        return false;
    }
    let mut q = conn.queue.borrow_mut();
    match w.try_write(&q) {
        Ok(n) => {
            q.drain(..n);
            true
        }
        Err(e) => e.kind() == io::ErrorKind::WouldBlock,
    }
}

async fn serve_connection(
    driver: Rc<Driver>,
    conn: Rc<StreamConn>,
    client: ClientId,
    listener: usize,
    reader: impl AsyncRead + Unpin,
    tls: Option<TlsWriter>,
) {
    driver
        .streams
        .borrow_mut()
        .insert((client.remote, client.local), conn.clone());
    let writer_task = tokio::task::spawn_local(writer(conn.clone(), tls));
    let open = &driver.open[client.transport as usize];
    bump(open, 1);
    debug!(%client, "connection opened");

    let reason = read_frames(&driver, &conn, client, listener, reader).await;

    open.set(open.get().saturating_sub(1));
    debug!(%client, reason, dropped = conn.dropped.get(), "connection closed");
    conn.close();
    driver
        .streams
        .borrow_mut()
        .remove(&(client.remote, client.local));
    {
        let mut relays = driver.relays.borrow_mut();
        driver
            .server
            .borrow_mut()
            .handle_client_closed(client, &mut *relays);
    }
    // Let the writer flush a TLS close_notify, but not wait on a client that stopped reading.
    let abort = writer_task.abort_handle();
    if tokio::time::timeout(Duration::from_secs(1), writer_task)
        .await
        .is_err()
    {
        abort.abort();
    }
}

/// Reads and dispatches frames until the connection ends; returns why it ended.
async fn read_frames(
    driver: &Driver,
    conn: &StreamConn,
    client: ClientId,
    listener: usize,
    mut reader: impl AsyncRead + Unpin,
) -> &'static str {
    let counters = &driver.listeners[listener];
    let mut buf = vec![0u8; READ_BUF];
    let mut filled = 0;
    // Silence is measured from the last complete frame, not the last byte: a client that
    // trickles a frame a byte at a time is as idle as one that sends nothing.
    let mut last_frame = Instant::now();
    loop {
        // Dispatch every complete frame in the buffer; payloads forwarded to peers are held
        // in the driver's outbox and sent together after the last one.
        let mut start = 0;
        let now = Instant::now();
        let mut ended = None;
        {
            let mut bufs = driver.bufs.borrow_mut();
            loop {
                match frame_len(&buf[start..filled]) {
                    Frame::Complete(n) => {
                        let frame = &buf[start..start + n];
                        counters.count(n);
                        driver.frame_input(now, client, frame, &mut bufs, |r| {
                            conn.send(r);
                        });
                        start += n;
                        last_frame = now;
                    }
                    Frame::Incomplete(need) => {
                        if need > MAX_FRAME {
                            ended = Some("frame too large");
                        } else if need > buf.len() {
                            buf.resize(need.max(buf.len() * 2).min(MAX_FRAME), 0);
                        }
                        break;
                    }
                    Frame::Invalid => {
                        ended = Some("not STUN or ChannelData");
                        break;
                    }
                }
            }
            driver.flush(&mut bufs.out);
        }
        if let Some(reason) = ended {
            return reason;
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if conn.closed.get() {
            return "write failed";
        }
        // A connection with an allocation hears from its client at least once per lifetime
        // (Refresh); one without may idle only briefly.
        let idle = if driver.server.borrow().has_allocation(&client) {
            driver.idle_with_allocation.get()
        } else {
            driver.idle_without_allocation.get()
        };
        let deadline = tokio::time::Instant::from_std(last_frame + idle);
        match tokio::time::timeout_at(deadline, reader.read(&mut buf[filled..])).await {
            Ok(Ok(0)) => return "closed by client",
            Ok(Ok(n)) => filled += n,
            Ok(Err(_)) => return "read failed",
            Err(_) => return "idle",
        }
    }
}
