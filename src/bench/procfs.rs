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
    fn reads_own_process() {
        let s = Sample::read(0).unwrap();
        assert!(s.rss_kb > 0);
        assert!(s.threads >= 1);
    }
}
