//! How the rest of the process talks to a running driver: commands over a channel, answered
//! on the driver's own thread between packets. Nothing here touches the relay path: a snapshot
//! copies the plain counters the driver keeps, once per request.

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::sync::{mpsc, oneshot};

use crate::config::Config;
use crate::core::{Stats, Transport};

/// A request to a driver.
#[derive(Debug)]
pub enum Command {
    /// Apply the reloadable settings of a new configuration; answered with the settings that
    /// were left as they are (they need a restart).
    Reconfigure(Arc<Config>, oneshot::Sender<Vec<&'static str>>),
    /// Copy the counters and gauges.
    Snapshot(oneshot::Sender<Snapshot>),
    /// Answer when the driver's event loop gets to it (a liveness check for the watchdog).
    Ping(oneshot::Sender<()>),
    /// Stop: close the listeners, delete every allocation, close the connections, return.
    Shutdown,
}

/// The sending end of a driver's command channel. Cheap to clone, usable from any thread.
#[derive(Debug, Clone)]
pub struct Handle {
    tx: mpsc::UnboundedSender<Command>,
}

/// The receiving end, given to [`super::serve`].
pub type Commands = mpsc::UnboundedReceiver<Command>;

/// A command channel for one driver.
pub fn channel() -> (Handle, Commands) {
    let (tx, rx) = mpsc::unbounded_channel();
    (Handle { tx }, rx)
}

impl Handle {
    /// The driver's counters, or `None` if it has stopped.
    pub async fn snapshot(&self) -> Option<Snapshot> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Snapshot(tx)).ok()?;
        rx.await.ok()
    }

    /// Whether the driver's loop answers (it has not stopped and is not stuck).
    pub async fn ping(&self) -> bool {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Ping(tx)).is_ok() && rx.await.is_ok()
    }

    /// Applies a new configuration; returns the settings the driver could not change.
    pub async fn reconfigure(&self, cfg: Arc<Config>) -> Option<Vec<&'static str>> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(Command::Reconfigure(cfg, tx)).ok()?;
        rx.await.ok()
    }

    /// Asks the driver to stop (it returns from `serve` once done).
    pub fn shutdown(&self) {
        let _ = self.tx.send(Command::Shutdown);
    }
}

/// Counters of one listening socket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerStats {
    pub transport: Transport,
    pub addr: SocketAddr,
    /// Datagrams (UDP) or frames (TCP, TLS, DTLS) received.
    pub received: u64,
    /// Bytes of those.
    pub received_bytes: u64,
    /// Connections (TCP, TLS) or associations (DTLS) accepted.
    pub accepted: u64,
    /// Connections closed at accept because `max-connections` was reached.
    pub refused: u64,
}

/// What a driver reports: the core's counters, the gauges, and the driver's own counters.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    pub core: Stats,
    pub allocations: u64,
    pub permissions: u64,
    pub channels: u64,
    pub relay_ports_used: u64,
    pub relay_ports: u64,
    pub listeners: Vec<ListenerStats>,
    /// Open connections (TCP, TLS) and associations (DTLS), by transport.
    pub open_connections: [u64; 4],
    /// Frames to clients dropped because the client's send queue or socket buffer was full, by
    /// transport.
    pub send_dropped: [u64; 4],
    /// UDP segmentation offload: GSO sends, and the datagrams they carried.
    pub gso_sends: u64,
    pub gso_datagrams: u64,
}

impl Snapshot {
    /// Adds another driver's figures to these.
    pub fn add(&mut self, other: &Snapshot) {
        self.core.add(&other.core);
        self.allocations += other.allocations;
        self.permissions += other.permissions;
        self.channels += other.channels;
        // The port pool is shared: every driver reports the same figures.
        self.relay_ports_used = self.relay_ports_used.max(other.relay_ports_used);
        self.relay_ports = self.relay_ports.max(other.relay_ports);
        for l in &other.listeners {
            match self
                .listeners
                .iter_mut()
                .find(|m| m.transport == l.transport && m.addr == l.addr)
            {
                Some(m) => {
                    m.received += l.received;
                    m.received_bytes += l.received_bytes;
                    m.accepted += l.accepted;
                    m.refused += l.refused;
                }
                None => self.listeners.push(l.clone()),
            }
        }
        self.gso_sends += other.gso_sends;
        self.gso_datagrams += other.gso_datagrams;
        for i in 0..4 {
            self.open_connections[i] += other.open_connections[i];
            self.send_dropped[i] += other.send_dropped[i];
        }
    }
}
