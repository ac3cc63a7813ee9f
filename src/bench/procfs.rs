//! CPU time and resident memory of a process, from `/proc` (Linux).

use std::io;

/// Clock ticks per second of the times in `/proc/PID/stat` (`USER_HZ`, 100 on Linux for every
/// architecture this runs on).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// One reading of a process's counters.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sample {
    /// User-space CPU time of all its threads, in clock ticks.
    pub utime: u64,
    /// Kernel CPU time of all its threads, in clock ticks.
    pub stime: u64,
    /// Resident set size, kB (`VmRSS`).
    pub rss_kb: u64,
    /// Threads.
    pub threads: u64,
}

impl Sample {
    /// Reads `/proc/PID/stat` and `/proc/PID/status` (`pid` 0: this process).
    pub fn read(pid: u32) -> io::Result<Sample> {
        let dir = if pid == 0 {
            "/proc/self".to_string()
        } else {
            format!("/proc/{pid}")
        };
        let stat = std::fs::read_to_string(format!("{dir}/stat"))?;
        let status = std::fs::read_to_string(format!("{dir}/status"))?;
        let mut s = parse_stat(&stat)
            .ok_or_else(|| io::Error::new(io::ErrorKind::InvalidData, "unexpected /proc stat"))?;
        s.rss_kb = status_kb(&status, "VmRSS:").unwrap_or(0);
        Ok(s)
    }

    /// CPU seconds, user and kernel together.
    pub fn cpu_s(&self) -> f64 {
        (self.utime + self.stime) as f64 / TICKS_PER_SECOND
    }
}

/// Parses the fields of `/proc/PID/stat` after the command name (which may hold spaces and
/// parentheses, so the last `)` ends it): utime and stime are fields 14 and 15, num_threads 20.
pub fn parse_stat(stat: &str) -> Option<Sample> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // f[0] is field 3 (state).
    let field = |n: usize| f.get(n - 3)?.parse::<u64>().ok();
    Some(Sample {
        utime: field(14)?,
        stime: field(15)?,
        rss_kb: 0,
        threads: field(20)?,
    })
}

/// The value in kB of a `Key:   1234 kB` line of `/proc/PID/status`.
pub fn status_kb(status: &str, key: &str) -> Option<u64> {
    let line = status.lines().find(|l| l.starts_with(key))?;
    line[key.len()..].split_whitespace().next()?.parse().ok()
}

/// Where UDP datagrams were dropped on arrival (a full receive buffer), from the `drops` column
/// of `/proc/net/udp` and `/proc/net/udp6`, summed over sockets by role. Counters are per
/// socket since it was opened, so a difference of two readings counts the drops in between.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UdpDrops {
    /// The socket bound to the server's listening address.
    pub server_listener: u64,
    /// Other sockets on 127.0.0.1 or ::1 (the server's relay sockets; the generator's echo
    /// peers are counted apart).
    pub server_relays: u64,
    /// The generator's echo peers.
    pub peers: u64,
    /// Sockets on other loopback addresses: the generator's clients (127.a.b.c).
    pub clients: u64,
}

impl UdpDrops {
    /// Reads the tables; `listener` is the server's address, `peers` the echo peers' ports on
    /// 127.0.0.1.
    pub fn read(listener: std::net::SocketAddr, peers: &[u16]) -> UdpDrops {
        let mut d = UdpDrops::default();
        for file in ["/proc/net/udp", "/proc/net/udp6"] {
            if let Ok(t) = std::fs::read_to_string(file) {
                for (addr, drops) in t.lines().skip(1).filter_map(parse_udp_line) {
                    d.add(addr, drops, listener, peers);
                }
            }
        }
        d
    }

    fn add(
        &mut self,
        a: std::net::SocketAddr,
        drops: u64,
        listener: std::net::SocketAddr,
        peers: &[u16],
    ) {
        use std::net::IpAddr;
        let host = match a.ip() {
            IpAddr::V4(v4) => v4 == std::net::Ipv4Addr::LOCALHOST,
            IpAddr::V6(v6) => v6 == std::net::Ipv6Addr::LOCALHOST,
        };
        if a == listener {
            self.server_listener += drops;
        } else if host && a.is_ipv4() && peers.contains(&a.port()) {
            self.peers += drops;
        } else if host {
            self.server_relays += drops;
        } else if a.ip().is_loopback() {
            self.clients += drops;
        }
    }

    /// Drops between `before` and `self` (never negative).
    pub fn since(&self, before: &UdpDrops) -> UdpDrops {
        UdpDrops {
            server_listener: self.server_listener.saturating_sub(before.server_listener),
            server_relays: self.server_relays.saturating_sub(before.server_relays),
            peers: self.peers.saturating_sub(before.peers),
            clients: self.clients.saturating_sub(before.clients),
        }
    }
}

/// The local address and the drop count of one line of `/proc/net/udp{,6}`: addresses are hex
/// in the kernel's byte order (32-bit words in host order, little-endian here), ports hex.
pub fn parse_udp_line(line: &str) -> Option<(std::net::SocketAddr, u64)> {
    let f: Vec<&str> = line.split_whitespace().collect();
    let (ip_hex, port_hex) = f.get(1)?.split_once(':')?;
    let drops = f.last()?.parse().ok()?;
    let port = u16::from_str_radix(port_hex, 16).ok()?;
    let words: Option<Vec<u32>> = (0..ip_hex.len() / 8)
        .map(|i| u32::from_str_radix(ip_hex.get(i * 8..i * 8 + 8)?, 16).ok())
        .collect();
    let words = words?;
    let ip: std::net::IpAddr = match words.len() {
        1 => std::net::Ipv4Addr::from(words[0].to_le_bytes()).into(),
        4 => {
            let mut b = [0u8; 16];
            for (i, w) in words.iter().enumerate() {
                b[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
            }
            std::net::Ipv6Addr::from(b).into()
        }
        _ => return None,
    };
    Some((std::net::SocketAddr::new(ip, port), drops))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_stat_and_status() {
        let stat = "1234 (turn server) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 3 0 \
                    100 12345678 900 18446744073709551615 1 1 0 0 0 0 0 0 0 0 0 0 17 1 0 0 0 0 0";
        let s = parse_stat(stat).unwrap();
        assert_eq!((s.utime, s.stime, s.threads), (250, 75, 3));
        assert!((s.cpu_s() - 3.25).abs() < 1e-9);
        let status = "Name:\tturnserver\nVmPeak:\t  20000 kB\nVmRSS:\t    4321 kB\n";
        assert_eq!(status_kb(status, "VmRSS:"), Some(4321));
        assert_eq!(status_kb(status, "VmSwap:"), None);
    }

    #[test]
    fn parses_udp_tables_and_sorts_drops_by_role() {
        let v4 = "10966: 0100007F:0DFA 00000000:0000 07 00000000:00000000 00:00000000 00000000     0        0 678359 2 000000003208b35b 17";
        let (a, d) = parse_udp_line(v4).unwrap();
        assert_eq!((a, d), ("127.0.0.1:3578".parse().unwrap(), 17));
        let v6 = "1: 00000000000000000000000001000000:0DFA 00000000000000000000000000000000:0000 07 00000000:00000000 00:00000000 00000000 0 0 1 2 0000000000000000 3";
        let (a, d) = parse_udp_line(v6).unwrap();
        assert_eq!((a, d), ("[::1]:3578".parse().unwrap(), 3));
        let client = "5: 0301017F:9C40 0100007F:0DFA 01 00000000:00000000 00:00000000 00000000 0 0 9 2 0000000000000000 5";
        assert_eq!(
            parse_udp_line(client).unwrap().0,
            "127.1.1.3:40000".parse::<std::net::SocketAddr>().unwrap()
        );
        assert!(parse_udp_line("  sl  local_address rem_address").is_none());

        let listener = "127.0.0.1:3578".parse().unwrap();
        let mut d = UdpDrops::default();
        for (addr, n) in [
            ("127.0.0.1:3578", 1),
            ("127.0.0.1:41000", 2),
            ("127.0.0.1:50001", 4),
            ("127.1.1.3:40000", 8),
            ("10.0.0.1:53", 16),
        ] {
            d.add(addr.parse().unwrap(), n, listener, &[50001]);
        }
        assert_eq!(
            d,
            UdpDrops {
                server_listener: 1,
                server_relays: 2,
                peers: 4,
                clients: 8
            }
        );
        let later = UdpDrops {
            server_listener: 3,
            ..d
        };
        assert_eq!(later.since(&d).server_listener, 2);
        assert_eq!(later.since(&d).clients, 0);
    }

    #[test]
    fn reads_own_process() {
        let s = Sample::read(0).unwrap();
        assert!(s.rss_kb > 0);
        assert!(s.threads >= 1);
    }
}
