//! Which peer addresses a client may reach through the relay.
//!
//! By default every special-purpose range is refused (loopback, private, link-local, CGNAT,
//! documentation, benchmarking, multicast, reserved, and their IPv6 counterparts, RFC 6890),
//! so that the relay cannot be used to reach the network it sits in. IPv4-mapped and
//! IPv4-compatible IPv6 addresses are judged as the IPv4 address they carry. The server's own
//! relay (and advertised) addresses are always allowed so that two clients of the same server
//! can relay to each other. `allow-loopback-peers` lifts the loopback refusal; the operator's
//! `allowed-peer-ips` lift any default refusal, and `denied-peer-ips` refuse whatever else says.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// An address prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Cidr {
    addr: IpAddr,
    len: u8,
}

impl Cidr {
    pub const fn v4(a: [u8; 4], len: u8) -> Self {
        Cidr {
            addr: IpAddr::V4(Ipv4Addr::new(a[0], a[1], a[2], a[3])),
            len,
        }
    }

    /// A prefix from an address and a length; `None` if the length exceeds the family's.
    pub fn new(addr: IpAddr, len: u8) -> Option<Self> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        (len <= max).then_some(Cidr { addr, len })
    }

    pub const fn v6(segs: [u16; 8], len: u8) -> Self {
        Cidr {
            addr: IpAddr::V6(Ipv6Addr::new(
                segs[0], segs[1], segs[2], segs[3], segs[4], segs[5], segs[6], segs[7],
            )),
            len,
        }
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.addr, ip) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - self.len as u32).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - self.len as u32).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

const LOOPBACK: [Cidr; 2] = [
    Cidr::v4([127, 0, 0, 0], 8),
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 1], 128),
];

/// Refused unless allowed explicitly (RFC 6890 special-purpose registries).
const DEFAULT_DENY: [Cidr; 26] = [
    Cidr::v4([0, 0, 0, 0], 8),
    Cidr::v4([10, 0, 0, 0], 8),
    Cidr::v4([100, 64, 0, 0], 10),
    Cidr::v4([169, 254, 0, 0], 16),
    Cidr::v4([172, 16, 0, 0], 12),
    Cidr::v4([192, 0, 0, 0], 24),
    Cidr::v4([192, 0, 2, 0], 24),
    Cidr::v4([192, 88, 99, 0], 24),
    Cidr::v4([192, 168, 0, 0], 16),
    Cidr::v4([198, 18, 0, 0], 15),
    Cidr::v4([198, 51, 100, 0], 24),
    Cidr::v4([203, 0, 113, 0], 24),
    Cidr::v4([224, 0, 0, 0], 4),
    Cidr::v4([240, 0, 0, 0], 4),
    Cidr::v4([255, 255, 255, 255], 32),
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 128),
    Cidr::v6([0x64, 0xff9b, 0, 0, 0, 0, 0, 0], 96),
    Cidr::v6([0x100, 0, 0, 0, 0, 0, 0, 0], 64),
    Cidr::v6([0x2001, 0, 0, 0, 0, 0, 0, 0], 32),
    Cidr::v6([0x2001, 0xdb8, 0, 0, 0, 0, 0, 0], 32),
    Cidr::v6([0x2002, 0, 0, 0, 0, 0, 0, 0], 16),
    Cidr::v6([0xfc00, 0, 0, 0, 0, 0, 0, 0], 7),
    Cidr::v6([0xfe80, 0, 0, 0, 0, 0, 0, 0], 10),
    Cidr::v6([0xfec0, 0, 0, 0, 0, 0, 0, 0], 10),
    Cidr::v6([0xff00, 0, 0, 0, 0, 0, 0, 0], 8),
    // IPv4-compatible addresses that carry no IPv4 address (::/96 beyond :: and ::1).
    Cidr::v6([0, 0, 0, 0, 0, 0, 0, 0], 96),
];

/// The IPv4 address an IPv4-mapped (::ffff:a.b.c.d) or IPv4-compatible (::a.b.c.d) IPv6
/// address carries; any other address unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return IpAddr::V4(v4);
            }
            let s = v6.segments();
            if s[..6] == [0; 6] && (s[6] != 0 || s[7] > 1) {
                return IpAddr::V4(Ipv4Addr::new(
                    (s[6] >> 8) as u8,
                    s[6] as u8,
                    (s[7] >> 8) as u8,
                    s[7] as u8,
                ));
            }
            ip
        }
        v4 => v4,
    }
}

/// Decides whether a peer address may be used.
#[derive(Debug, Clone, Default)]
pub struct PeerPolicy {
    pub allow_loopback: bool,
    /// The server's own relay addresses and the public addresses they are advertised as.
    pub own: Vec<IpAddr>,
    /// Allowed although a default refusal covers them (`allowed-peer-ips`).
    pub allowed: Vec<Cidr>,
    /// Refused whatever else says (`denied-peer-ips`).
    pub denied: Vec<Cidr>,
}

/// Why a peer address was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    Loopback,
    SpecialPurpose,
    Denied,
}

impl Refusal {
    pub fn reason(self) -> &'static str {
        match self {
            Refusal::Loopback => "loopback peer (allow-loopback-peers is off)",
            Refusal::SpecialPurpose => "peer in a private or special-purpose range",
            Refusal::Denied => "peer in denied-peer-ips",
        }
    }
}

impl PeerPolicy {
    pub fn check(&self, ip: IpAddr) -> Result<(), Refusal> {
        let raw = ip;
        let ip = canonical(ip);
        if self.own.iter().any(|o| canonical(*o) == ip) {
            return Ok(());
        }
        // The operator's lists are matched against the canonical form, and in the form given,
        // so that an IPv6 list entry for ::ffff:0:0/96 still means something.
        let listed = |list: &[Cidr]| list.iter().any(|c| c.contains(ip) || c.contains(raw));
        if listed(&self.denied) {
            return Err(Refusal::Denied);
        }
        if listed(&self.allowed) {
            return Ok(());
        }
        if LOOPBACK.iter().any(|c| c.contains(ip)) {
            return if self.allow_loopback {
                Ok(())
            } else {
                Err(Refusal::Loopback)
            };
        }
        if DEFAULT_DENY.iter().any(|c| c.contains(ip)) {
            return Err(Refusal::SpecialPurpose);
        }
        Ok(())
    }

    /// Whether `ip` is one of the server's own addresses.
    pub fn is_own(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        self.own.iter().any(|o| canonical(*o) == ip)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn defaults_refuse_special_ranges() {
        let p = PeerPolicy::default();
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.1",
            "255.255.255.255",
            "240.0.0.1",
            "::1",
            "::",
            "fe80::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "::127.0.0.1",
            "64:ff9b::1",
            "2001:db8::1",
        ] {
            assert!(p.check(ip(bad)).is_err(), "{bad} should be refused");
        }
        for good in ["8.8.8.8", "1.1.1.1", "2606:4700::1111", "::ffff:8.8.8.8"] {
            assert_eq!(p.check(ip(good)), Ok(()), "{good} should be allowed");
        }
    }

    #[test]
    fn loopback_opt_in_and_own_addresses() {
        let mut p = PeerPolicy::default();
        assert_eq!(p.check(ip("127.0.0.1")), Err(Refusal::Loopback));
        p.allow_loopback = true;
        assert_eq!(p.check(ip("127.0.0.1")), Ok(()));
        assert_eq!(p.check(ip("::ffff:127.0.0.2")), Ok(()));
        assert!(p.check(ip("10.0.0.1")).is_err());
        p.own.push(ip("10.0.0.1"));
        assert_eq!(p.check(ip("10.0.0.1")), Ok(()));
        assert!(p.is_own(ip("::ffff:10.0.0.1")));
    }

    #[test]
    fn operator_lists_allow_and_deny() {
        let mut p = PeerPolicy::default();
        let cidr = |s: &str, l| Cidr::new(ip(s), l).unwrap();
        p.allowed = vec![cidr("10.1.0.0", 16), cidr("fd00::", 8)];
        p.denied = vec![cidr("10.1.2.0", 24), cidr("8.8.8.8", 32)];
        assert_eq!(p.check(ip("10.1.9.9")), Ok(()));
        assert_eq!(p.check(ip("::ffff:10.1.9.9")), Ok(()));
        assert_eq!(p.check(ip("fd00::1")), Ok(()));
        assert_eq!(p.check(ip("10.2.0.1")), Err(Refusal::SpecialPurpose));
        // Deny wins over allow, and over the public default.
        assert_eq!(p.check(ip("10.1.2.3")), Err(Refusal::Denied));
        assert_eq!(p.check(ip("::ffff:10.1.2.3")), Err(Refusal::Denied));
        assert_eq!(p.check(ip("8.8.8.8")), Err(Refusal::Denied));
        assert_eq!(p.check(ip("8.8.4.4")), Ok(()));
        // Own addresses stay allowed.
        p.own.push(ip("10.1.2.1"));
        assert_eq!(p.check(ip("10.1.2.1")), Ok(()));
        assert_eq!(Cidr::new(ip("10.0.0.0"), 33), None);
    }

    #[test]
    fn canonicalises_embedded_ipv4() {
        assert_eq!(canonical(ip("::ffff:1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(canonical(ip("::1.2.3.4")), ip("1.2.3.4"));
        assert_eq!(canonical(ip("::1")), ip("::1"));
        assert_eq!(canonical(ip("2001:db8::1")), ip("2001:db8::1"));
    }
}
