//! The peer filter over real sockets, on UDP and TCP alike: one refused address per default
//! class, its IPv4-mapped form on an IPv6 relay, CreatePermission and ChannelBind; public peers
//! and the server's own relay ports allowed.

mod common;

use std::net::SocketAddr;

use common::Client;
use turnserver::wire::{FAMILY_IPV4, FAMILY_IPV6};

/// One address in each range refused by default.
const REFUSED_V4: &[&str] = &[
    "0.1.2.3",
    "10.0.0.1",
    "100.64.0.1",
    "127.0.0.2",
    "169.254.169.254",
    "172.16.0.1",
    "192.0.0.1",
    "192.0.2.1",
    "192.88.99.1",
    "192.168.1.1",
    "198.18.0.1",
    "198.51.100.1",
    "203.0.113.1",
    "224.0.0.1",
    "240.0.0.1",
    "255.255.255.255",
];

/// (::1 is refused too, but here it is the server's own relay address: the unit tests of the
/// policy cover it.)
const REFUSED_V6: &[&str] = &[
    "::",
    "64:ff9b::1",
    "100::1",
    "2001::1",
    "2001:db8::1",
    "2002::1",
    "fc00::1",
    "fd12::1",
    "fe80::1",
    "ff02::1",
];

fn peer(ip: &str) -> SocketAddr {
    SocketAddr::new(ip.parse().unwrap(), 5000)
}

fn server() -> common::TestServer {
    // Loopback peers off (the default); an IPv6 relay address for the IPv6 checks.
    common::start_with(&format!(
        "relay-ips = [\"127.0.0.1\", \"::1\"]\n[users]\n{} = \"{}\"\n",
        common::USER,
        common::PASSWORD
    ))
}

fn check_refusals(mut c: Client, v6: Client) {
    let mut c = {
        assert_eq!(c.allocate(Some(FAMILY_IPV4)), None);
        c
    };
    for ip in REFUSED_V4 {
        assert_eq!(c.permit(peer(ip)), Some(403), "CreatePermission {ip}");
        assert_eq!(c.bind(0x4000, peer(ip)), Some(403), "ChannelBind {ip}");
    }
    // Allowed: public peers, and the server's own relay address on a relay port.
    assert_eq!(c.permit(peer("8.8.8.8")), None);
    assert_eq!(c.bind(0x4001, peer("1.1.1.1")), None);

    let mut v6 = v6;
    assert_eq!(v6.allocate(Some(FAMILY_IPV6)), None, "an IPv6 relay on ::1");
    for ip in REFUSED_V6 {
        assert_eq!(v6.permit(peer(ip)), Some(403), "CreatePermission {ip}");
    }
    // IPv4-mapped and IPv4-compatible forms of refused IPv4 addresses are refused too.
    for ip in REFUSED_V4 {
        let v4: std::net::Ipv4Addr = ip.parse().unwrap();
        let mapped = SocketAddr::new(v4.to_ipv6_mapped().into(), 5000);
        assert_eq!(v6.permit(mapped), Some(403), "CreatePermission {mapped}");
        assert_eq!(v6.bind(0x4002, mapped), Some(403), "ChannelBind {mapped}");
    }
    let compatible: SocketAddr = "[::10.0.0.1]:5000".parse().unwrap();
    assert_eq!(v6.permit(compatible), Some(403));
    assert_eq!(v6.permit(peer("2606:4700::1111")), None);
}

#[test]
fn default_refusals_over_udp() {
    let server = server();
    check_refusals(Client::udp(server.addr()), Client::udp(server.addr()));
}

#[test]
fn default_refusals_over_tcp() {
    let server = server();
    check_refusals(Client::tcp(server.addr()), Client::tcp(server.addr()));
}
