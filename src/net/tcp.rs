//! TURN over TCP (RFC 8656 3.1): STUN messages and ChannelData frames (padded to four bytes)
//! back to back on one connection. One task reads and feeds the core; writes are attempted
//! immediately and, when the socket is full, queued (whole frames only, up to a bound) for a
//! writer task. Closing the connection deletes its allocation.

use std::cell::{Cell, RefCell};
use std::io;
use std::net::SocketAddr;
use std::rc::Rc;
use std::time::Instant;

use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Notify;
use tracing::{debug, warn};

use super::Driver;
use crate::core::{ClientId, Transport};
use crate::wire::{Frame, frame_len};

/// Bytes a connection may have queued for writing; frames beyond it are dropped.
const MAX_QUEUED: usize = 256 * 1024;
/// Initial read buffer; it grows up to the largest frame (a 64 KiB ChannelData or STUN message).
const READ_BUF: usize = 4096;
const MAX_FRAME: usize = 4 + 65_535 + 3;

/// The sending side of one client connection.
pub struct TcpConn {
    stream: TcpStream,
    queue: RefCell<Vec<u8>>,
    notify: Notify,
    closed: Cell<bool>,
    dropped: Cell<u64>,
}

impl TcpConn {
    /// Sends a whole frame: written now if the socket takes it, else queued; dropped (and
    /// counted) if the queue is full.
    pub fn send(&self, frame: &[u8]) {
        if self.closed.get() {
            return;
        }
        let mut q = self.queue.borrow_mut();
        let mut rest = frame;
        if q.is_empty() {
            match self.stream.try_write(frame) {
                Ok(n) if n == frame.len() => return,
                Ok(n) => rest = &frame[n..],
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    self.closed.set(true);
                    self.notify.notify_one();
                    return;
                }
            }
        } else if q.len() + frame.len() > MAX_QUEUED {
            self.dropped.set(self.dropped.get() + 1);
            return;
        }
        q.extend_from_slice(rest);
        self.notify.notify_one();
    }
}

pub(super) async fn accept_loop(driver: Rc<Driver>, listener: TcpListener) {
    let local = match listener.local_addr() {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %e, "tcp listener has no address");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((stream, remote)) => {
                let _ = stream.set_nodelay(true);
                tokio::task::spawn_local(connection(driver.clone(), stream, remote, local));
            }
            Err(e) => {
                // Out of file descriptors and the like: back off briefly rather than spin.
                warn!(%local, error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
}

async fn writer(conn: Rc<TcpConn>) {
    loop {
        conn.notify.notified().await;
        loop {
            if conn.closed.get() {
                return;
            }
            if conn.queue.borrow().is_empty() {
                break;
            }
            if conn.stream.writable().await.is_err() {
                conn.closed.set(true);
                return;
            }
            let mut q = conn.queue.borrow_mut();
            match conn.stream.try_write(&q) {
                Ok(n) => {
                    q.drain(..n);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(_) => {
                    conn.closed.set(true);
                    return;
                }
            }
        }
    }
}

async fn connection(driver: Rc<Driver>, stream: TcpStream, remote: SocketAddr, local: SocketAddr) {
    let client = ClientId {
        transport: Transport::Tcp,
        remote,
        local,
    };
    let conn = Rc::new(TcpConn {
        stream,
        queue: RefCell::new(Vec::new()),
        notify: Notify::new(),
        closed: Cell::new(false),
        dropped: Cell::new(0),
    });
    driver
        .tcp
        .borrow_mut()
        .insert((remote, local), conn.clone());
    let writer_task = tokio::task::spawn_local(writer(conn.clone()));
    debug!(%client, "connection opened");

    let reason = read_frames(&driver, &conn, client).await;

    debug!(%client, reason, dropped = conn.dropped.get(), "connection closed");
    conn.closed.set(true);
    conn.notify.notify_one();
    writer_task.abort();
    driver.tcp.borrow_mut().remove(&(remote, local));
    let mut relays = driver.relays.borrow_mut();
    driver
        .server
        .borrow_mut()
        .handle_client_closed(client, &mut *relays);
}

/// Reads and dispatches frames until the connection ends; returns why it ended.
async fn read_frames(driver: &Driver, conn: &TcpConn, client: ClientId) -> &'static str {
    let mut buf = vec![0u8; READ_BUF];
    let mut filled = 0;
    loop {
        // Dispatch every complete frame in the buffer.
        let mut start = 0;
        let now = Instant::now();
        loop {
            match frame_len(&buf[start..filled]) {
                Frame::Complete(n) => {
                    let frame = &buf[start..start + n];
                    let mut bufs = driver.bufs.borrow_mut();
                    driver.client_input(now, client, frame, &mut bufs.reply, |r| conn.send(r));
                    start += n;
                }
                Frame::Incomplete(need) => {
                    if need > MAX_FRAME {
                        return "frame too large";
                    }
                    if need > buf.len() {
                        buf.resize(need.max(buf.len() * 2).min(MAX_FRAME), 0);
                    }
                    break;
                }
                Frame::Invalid => return "not STUN or ChannelData",
            }
        }
        buf.copy_within(start..filled, 0);
        filled -= start;
        if conn.closed.get() {
            return "write failed";
        }
        if conn.stream.readable().await.is_err() {
            return "read failed";
        }
        match conn.stream.try_read(&mut buf[filled..]) {
            Ok(0) => return "closed by client",
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(_) => return "read failed",
        }
    }
}
