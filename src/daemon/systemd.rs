//! The systemd notification protocol (`sd_notify(3)`): datagrams of `KEY=VALUE` lines to the
//! socket named by `NOTIFY_SOCKET`, and the watchdog interval from `WATCHDOG_USEC`.
//!
//! Without `NOTIFY_SOCKET` (not started by systemd, or `Type=simple`) every call does nothing.

use std::io;
use std::os::unix::net::UnixDatagram;
use std::time::Duration;

use tracing::{debug, warn};

/// A connection to the service manager, if there is one.
pub struct Notifier {
    socket: Option<UnixDatagram>,
}

impl Notifier {
    /// Connects to `NOTIFY_SOCKET` when it is set: a path, or an abstract socket when it
    /// starts with `@`.
    pub fn from_env() -> Self {
        let Some(path) = std::env::var_os("NOTIFY_SOCKET") else {
            return Notifier { socket: None };
        };
        match connect(&path) {
            Ok(socket) => Notifier {
                socket: Some(socket),
            },
            Err(e) => {
                warn!(socket = ?path, error = %e, "cannot reach the service manager's notify socket");
                Notifier { socket: None }
            }
        }
    }

    /// Whether a service manager listens.
    pub fn enabled(&self) -> bool {
        self.socket.is_some()
    }

    /// Sends a state update such as `READY=1` or `STATUS=...` (lines separated by `\n`).
    pub fn notify(&self, state: &str) {
        if let Some(s) = &self.socket
            && let Err(e) = s.send(state.as_bytes())
        {
            debug!(error = %e, state, "notify failed");
        }
    }
}

fn connect(path: &std::ffi::OsStr) -> io::Result<UnixDatagram> {
    use std::os::unix::ffi::OsStrExt;
    let socket = UnixDatagram::unbound()?;
    let bytes = path.as_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        socket.connect_addr(&addr)?;
    } else {
        socket.connect(path)?;
    }
    Ok(socket)
}

/// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, when it is set for this process
/// (`WATCHDOG_PID` absent or equal to our pid).
pub fn watchdog_interval() -> Option<Duration> {
    let usec: u64 = std::env::var("WATCHDOG_USEC").ok()?.parse().ok()?;
    if let Ok(pid) = std::env::var("WATCHDOG_PID")
        && pid.parse::<u32>().ok() != Some(std::process::id())
    {
        return None;
    }
    (usec > 0).then(|| Duration::from_micros(usec / 2))
}

/// CLOCK_MONOTONIC in microseconds, for the `MONOTONIC_USEC=` that goes with `RELOADING=1`.
pub fn monotonic_usec() -> u64 {
    let t = rustix::time::clock_gettime(rustix::time::ClockId::Monotonic);
    t.tv_sec as u64 * 1_000_000 + t.tv_nsec as u64 / 1_000
}
