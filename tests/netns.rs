//! Deployment tests in network namespaces: the server behind a cloud's 1:1 NAT, a client behind
//! its home router's NAT, a peer on the "internet", and an IPv6-only network. Every namespace,
//! veth pair, route and nftables rule is made by the test (tests/common/netns.rs) and removed
//! when it ends; the namespaces are joined to each other only, so nothing leaves them. Public
//! addresses come from the documentation ranges (192.0.2.0/24, 198.51.100.0/24,
//! 203.0.113.0/24, 2001:db8::/32), private ones from RFC 1918.
//!
//! The IPv4 lab:
//!
//! ```text
//!  cli 10.0.0.2 --- 10.0.0.1 cnat 203.0.113.2 --- 203.0.113.1 \
//!                   (masquerade)                               inet (router) --- 192.0.2.1 --- 192.0.2.20 peer
//!  srv 172.16.0.2 - 172.16.0.1 gw 198.51.100.10 - 198.51.100.1 /
//!                   (1:1 NAT 198.51.100.10 <-> 172.16.0.2, no hairpin)
//! ```
//!
//! The server listens and relays on 172.16.0.2 and advertises 198.51.100.10 (`external-ip =
//! "198.51.100.10/172.16.0.2"`). The gateway does not turn around a packet from the server to
//! 198.51.100.10 (many clouds do not), so relaying from one allocation to another one's public
//! address works only if the server itself recognises its public address.
//!
//! The IPv6 lab: cli (2001:db8:1::2), srv (2001:db8:2::2) and peer (2001:db8:3::2) around an
//! `inet6` router, no NAT and no IPv4 address but loopback.
//!
//! Needs root (or CAP_NET_ADMIN and CAP_SYS_ADMIN), `ip` (iproute2) and `nft` (nftables). When
//! the machine does not allow namespaces the tests print `netns: SKIPPED: <reason>` and pass,
//! unless `TURNSERVER_REQUIRE_NETNS=1`, in which case they fail. The Chromium test also follows
//! `TURNSERVER_REQUIRE_BROWSER`, the coturn test `TURNSERVER_REQUIRE_INTEROP`.

mod common;

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, UdpSocket};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use common::netns::{Lab, NsServer, in_netns, netns_available};
use common::tap::{Tap, payload, reply_for};
use common::{PASSWORD, REALM, USER};
use serde_json::{Value, json};
use tokio::time::timeout;
use turn::client::Client;
use webrtc_util::Conn;

/// Limit for any single wait on the network.
const NET: Duration = Duration::from_secs(10);
/// Datagrams relayed each way in a round-trip test.
const ROUND_TRIPS: usize = 20;
const TURN_PORT: u16 = 3478;
const MIN_PORT: u16 = 50000;
const MAX_PORT: u16 = 50099;

const CLIENT_PRIVATE: Ipv4Addr = Ipv4Addr::new(10, 0, 0, 2);
/// The client NAT's outer address: what the server sees the client as.
const CLIENT_PUBLIC: Ipv4Addr = Ipv4Addr::new(203, 0, 113, 2);
const SERVER_PUBLIC: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const SERVER_PRIVATE: Ipv4Addr = Ipv4Addr::new(172, 16, 0, 2);
const PEER: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 20);

const CLIENT6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 1, 0, 0, 0, 0, 2);
const SERVER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 2, 0, 0, 0, 0, 2);
const PEER6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 3, 0, 0, 0, 0, 2);

// ---------------------------------------------------------------------------------------------
// The labs
// ---------------------------------------------------------------------------------------------

/// The IPv4 lab (see the module comment). `lab` is dropped last: it kills what still runs in
/// its namespaces and deletes them.
struct NatLab {
    lab: Lab,
    gw: String,
    cli: String,
    srv: String,
    peer: String,
}

impl NatLab {
    /// Builds the lab.
    fn build() -> NatLab {
        let mut lab = Lab::new();
        let inet = lab.netns("inet");
        let cnat = lab.netns("cnat");
        let cli = lab.netns("cli");
        let gw = lab.netns("gw");
        let srv = lab.netns("srv");
        let peer = lab.netns("peer");
        for router in [&inet, &cnat, &gw] {
            lab.router(router);
        }
        let (_, cnat_out) = lab.veth(&inet, &["203.0.113.1/24"], &cnat, &["203.0.113.2/24"]);
        let (_, gw_out) = lab.veth(&inet, &["198.51.100.1/24"], &gw, &["198.51.100.10/24"]);
        lab.veth(&inet, &["192.0.2.1/24"], &peer, &["192.0.2.20/24"]);
        lab.veth(&cnat, &["10.0.0.1/24"], &cli, &["10.0.0.2/24"]);
        let (gw_in, _) = lab.veth(&gw, &["172.16.0.1/24"], &srv, &["172.16.0.2/24"]);
        for (ns, via) in [
            (&cnat, "203.0.113.1"),
            (&gw, "198.51.100.1"),
            (&peer, "192.0.2.1"),
            (&cli, "10.0.0.1"),
            (&srv, "172.16.0.1"),
        ] {
            lab.ip(ns, &["route", "add", "default", "via", via]);
        }
        // The client's home router: everything leaving to the internet gets its address.
        lab.nft(
            &cnat,
            &format!(
                "table ip nat {{
                    chain postrouting {{
                        type nat hook postrouting priority srcnat; policy accept;
                        oifname \"{cnat_out}\" masquerade
                    }}
                }}\n"
            ),
        );
        // The cloud's 1:1 NAT: the public address is the server's, in both directions, for
        // packets crossing the outer interface only. Like many clouds' gateways it does not
        // turn a packet from the server to its own public address around; it counts them.
        lab.nft(
            &gw,
            &format!(
                "table ip nat {{
                    chain prerouting {{
                        type nat hook prerouting priority dstnat; policy accept;
                        iifname \"{gw_out}\" ip daddr {SERVER_PUBLIC} dnat to {SERVER_PRIVATE}
                    }}
                    chain postrouting {{
                        type nat hook postrouting priority srcnat; policy accept;
                        oifname \"{gw_out}\" ip saddr {SERVER_PRIVATE} snat to {SERVER_PUBLIC}
                    }}
                }}
                table ip filter {{
                    chain input {{
                        type filter hook input priority filter; policy accept;
                        iifname \"{gw_in}\" ip daddr {SERVER_PUBLIC} counter \
                            comment \"from the server to its public address, not turned around\"
                    }}
                }}\n"
            ),
        );
        NatLab {
            lab,
            gw,
            cli,
            srv,
            peer,
        }
    }

    /// Checks that the gateway saw no packet from the server to its own public address: two
    /// allocations relaying to each other's public addresses were served on the host.
    fn assert_nothing_hairpinned(&self) {
        let out = self
            .lab
            .exec(&self.gw, "nft", &["list", "table", "ip", "filter"]);
        let rules = String::from_utf8_lossy(&out.stdout);
        let packets = rules
            .lines()
            .find_map(|l| {
                let rest = &l[l.find("counter packets ")? + "counter packets ".len()..];
                rest.split_whitespace().next()?.parse::<u64>().ok()
            })
            .unwrap_or_else(|| panic!("no counter in the gateway's rules:\n{rules}"));
        assert_eq!(
            packets, 0,
            "the server sent to its own public address through the gateway:\n{rules}"
        );
    }

    /// Starts the server in `srv` behind the 1:1 NAT, and waits until a Binding sent from the
    /// client's namespace to the public address is answered.
    fn start_server(&self) -> NsServer {
        let config = format!(
            "listening-ips = [\"{SERVER_PRIVATE}\"]
listening-port = {TURN_PORT}
relay-ips = [\"{SERVER_PRIVATE}\"]
external-ip = \"{SERVER_PUBLIC}/{SERVER_PRIVATE}\"
min-port = {MIN_PORT}
max-port = {MAX_PORT}
realm = \"{REALM}\"
log-level = \"debug\"
allowed-peer-ips = [\"192.0.2.0/24\"]
[users]
{USER} = \"{PASSWORD}\"
"
        );
        let server = NsServer::start(&self.lab, &self.srv, &config);
        let public = SocketAddr::new(SERVER_PUBLIC.into(), TURN_PORT);
        wait_binding(&self.cli, IpAddr::V4(CLIENT_PRIVATE), public, &self.lab);
        server
    }
}

/// The IPv6 lab (see the module comment).
struct V6Lab {
    lab: Lab,
    cli: String,
    srv: String,
    peer: String,
}

impl V6Lab {
    fn build() -> V6Lab {
        let mut lab = Lab::new();
        let inet = lab.netns("inet6");
        let cli = lab.netns("cli6");
        let srv = lab.netns("srv6");
        let peer = lab.netns("peer6");
        lab.router(&inet);
        for (ns, net) in [(&cli, 1), (&srv, 2), (&peer, 3)] {
            let router = format!("2001:db8:{net}::1");
            lab.veth(
                &inet,
                &[&format!("{router}/64")],
                ns,
                &[&format!("2001:db8:{net}::2/64")],
            );
            lab.ip(ns, &["-6", "route", "add", "default", "via", &router]);
        }
        V6Lab {
            lab,
            cli,
            srv,
            peer,
        }
    }

    /// Starts the server in `srv6`, listening and relaying on its IPv6 address only.
    fn start_server(&self) -> NsServer {
        let config = format!(
            "listening-ips = [\"{SERVER6}\"]
listening-port = {TURN_PORT}
relay-ips = [\"{SERVER6}\"]
min-port = {MIN_PORT}
max-port = {MAX_PORT}
realm = \"{REALM}\"
log-level = \"debug\"
allowed-peer-ips = [\"2001:db8:3::/64\"]
[users]
{USER} = \"{PASSWORD}\"
"
        );
        let server = NsServer::start(&self.lab, &self.srv, &config);
        let addr = SocketAddr::new(SERVER6.into(), TURN_PORT);
        wait_binding(&self.cli, IpAddr::V6(CLIENT6), addr, &self.lab);
        server
    }
}

/// Sends Binding requests from `ns` (a socket on `local`) to `server` until one is answered,
/// at most 20 times a second apart: the path through routers and NATs works and the server
/// answers on it. Panics with the lab's state otherwise.
fn wait_binding(ns: &str, local: IpAddr, server: SocketAddr, lab: &Lab) {
    let sock = in_netns(ns, || UdpSocket::bind((local, 0)).unwrap());
    sock.set_read_timeout(Some(Duration::from_secs(1))).unwrap();
    let mut buf = [0u8; 1500];
    for i in 0..20u8 {
        sock.send_to(&common::binding_request(i), server).unwrap();
        let deadline = Instant::now() + Duration::from_secs(1);
        while Instant::now() < deadline {
            if let Ok((n, from)) = sock.recv_from(&mut buf)
                && from == server
                && n >= 20
                && buf[8..20] == [i; 12]
            {
                return;
            }
        }
    }
    // The server's log is printed when it is dropped during the panic.
    panic!(
        "no Binding answer from {server} in {ns}\nlab:\n{}",
        lab.describe()
    );
}

// ---------------------------------------------------------------------------------------------
// A UDP echo peer in a namespace
// ---------------------------------------------------------------------------------------------

/// A UDP peer that records what it receives (source and payload) and answers each datagram
/// with [`reply_for`] of it, until dropped (or two minutes passed).
struct EchoPeer {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Datagram>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl EchoPeer {
    fn start(ns: &str, ip: IpAddr) -> EchoPeer {
        let sock = in_netns(ns, || UdpSocket::bind((ip, 0)).unwrap());
        sock.set_read_timeout(Some(Duration::from_millis(100)))
            .unwrap();
        let addr = sock.local_addr().unwrap();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let (seen, stop) = (seen.clone(), stop.clone());
            std::thread::spawn(move || {
                let deadline = Instant::now() + Duration::from_secs(120);
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        seen.lock().unwrap().push((from, buf[..n].to_vec()));
                        let _ = sock.send_to(&reply_for(&buf[..n]), from);
                    }
                }
            })
        };
        EchoPeer {
            addr,
            seen,
            stop,
            thread: Some(thread),
        }
    }

    fn seen(&self) -> Vec<Datagram> {
        self.seen.lock().unwrap().clone()
    }

    /// Checks that the peer received exactly `sent`, in order, every datagram from `from`.
    fn assert_saw(&self, from: SocketAddr, sent: &[Vec<u8>]) {
        let seen = self.seen();
        assert_eq!(
            seen.len(),
            sent.len(),
            "datagrams at the peer: {:?}",
            seen.iter().map(|(a, d)| (a, d.len())).collect::<Vec<_>>()
        );
        for (i, ((source, got), want)) in seen.iter().zip(sent).enumerate() {
            assert_eq!(*source, from, "datagram {i} at the peer came from {source}");
            assert_eq!(got, want, "datagram {i} at the peer");
        }
    }
}

/// A datagram as a peer saw it: its source and its payload.
type Datagram = (SocketAddr, Vec<u8>);

impl Drop for EchoPeer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The `turn` crate's client, over UDP and over a framed TCP stream
// ---------------------------------------------------------------------------------------------

/// The public TURN address of the IPv4 lab's server.
fn public_turn() -> SocketAddr {
    SocketAddr::new(SERVER_PUBLIC.into(), TURN_PORT)
}

/// A UDP socket of the client's namespace, for the `turn` crate (call inside a runtime).
fn udp_conn(ns: &str) -> Arc<dyn Conn + Send + Sync> {
    let sock = in_netns(ns, || UdpSocket::bind((CLIENT_PRIVATE, 0)).unwrap());
    sock.set_nonblocking(true).unwrap();
    Arc::new(tokio::net::UdpSocket::from_std(sock).unwrap())
}

/// A TCP connection from the client's namespace to `server`, for the `turn` crate (call
/// inside a runtime).
fn tcp_conn(ns: &str, server: SocketAddr) -> Arc<dyn Conn + Send + Sync> {
    let stream = in_netns(ns, || std::net::TcpStream::connect_timeout(&server, NET))
        .unwrap_or_else(|e| panic!("tcp connect to {server}: {e}"));
    stream.set_nonblocking(true).unwrap();
    Tap::tcp_on(tokio::net::TcpStream::from_std(stream).unwrap(), server)
}

async fn turn_client(conn: Arc<dyn Conn + Send + Sync>) -> Client {
    common::tap::turn_client(public_turn(), conn, USER, PASSWORD).await
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn assert_public_relay(relayed: SocketAddr) {
    assert_eq!(
        relayed.ip(),
        IpAddr::V4(SERVER_PUBLIC),
        "relayed address {relayed}: not the external-ip mapping"
    );
    assert!(
        (MIN_PORT..=MAX_PORT).contains(&relayed.port()),
        "relayed port {} outside {MIN_PORT}..={MAX_PORT}",
        relayed.port()
    );
}

/// Through the server's public address from behind the client's NAT over `transport` ("udp"
/// or "tcp"): the reflexive address is the client NAT's, the relayed address is the public
/// one, and 20 datagrams of 1 to 1200 bytes go to the peer and back, every one checked; the
/// peer sees them come from the relayed (public) address.
fn nat_round_trips(transport: &str) {
    let net = NatLab::build();
    let server = net.start_server();
    let peer = EchoPeer::start(&net.peer, IpAddr::V4(PEER));
    runtime().block_on(async {
        let conn = match transport {
            "udp" => udp_conn(&net.cli),
            _ => tcp_conn(&net.cli, public_turn()),
        };
        let client = turn_client(conn).await;
        let mapped = timeout(NET, client.send_binding_request())
            .await
            .expect("binding timed out")
            .expect("binding");
        assert_eq!(
            mapped.ip(),
            IpAddr::V4(CLIENT_PUBLIC),
            "reflexive address {mapped}: not the client NAT's outer address"
        );
        let relay = timeout(NET, client.allocate())
            .await
            .expect("allocate timed out")
            .expect("allocate");
        let relayed = relay.local_addr().unwrap();
        assert_public_relay(relayed);
        let created = server
            .wait_log(
                &[
                    "allocation created",
                    &format!("client={transport}:{mapped}"),
                ],
                NET,
            )
            .expect("no allocation created for the client's public address");
        let private = SocketAddr::new(SERVER_PRIVATE.into(), relayed.port());
        assert!(created.contains(&format!("relay={private}")), "{created}");
        assert!(
            created.contains(&format!("advertised={relayed}")),
            "{created}"
        );

        let mut buf = vec![0u8; 2048];
        let mut sent = Vec::new();
        for i in 0..ROUND_TRIPS {
            let p = payload(i, ROUND_TRIPS);
            timeout(NET, relay.send_to(&p, peer.addr))
                .await
                .unwrap_or_else(|_| panic!("send {i} timed out"))
                .unwrap_or_else(|e| panic!("send {i}: {e}"));
            let (n, from) = timeout(NET, relay.recv_from(&mut buf))
                .await
                .unwrap_or_else(|_| {
                    panic!(
                        "no answer to datagram {i} ({} bytes); the peer saw {:?}",
                        p.len(),
                        peer.seen()
                            .iter()
                            .map(|(a, d)| (*a, d.len()))
                            .collect::<Vec<_>>()
                    )
                })
                .unwrap_or_else(|e| panic!("recv {i}: {e}"));
            assert_eq!(from, peer.addr, "answer {i} source");
            assert_eq!(
                buf[..n],
                reply_for(&p)[..],
                "answer {i} ({} bytes)",
                p.len()
            );
            sent.push(p);
        }
        peer.assert_saw(relayed, &sent);
        timeout(NET, relay.close()).await.unwrap().unwrap();
        timeout(NET, client.close()).await.unwrap().unwrap();
    });
    let refused = server.log_lines(&["request refused"]);
    assert!(refused.is_empty(), "refusals: {refused:#?}");
}

#[test]
fn nat_udp_allocation_through_public_address() {
    if !netns_available("nat_udp_allocation_through_public_address", true) {
        return;
    }
    nat_round_trips("udp");
}

#[test]
fn nat_tcp_allocation_through_public_address() {
    if !netns_available("nat_tcp_allocation_through_public_address", true) {
        return;
    }
    nat_round_trips("tcp");
}

/// Two allocations of clients behind the same NAT relay to each other's public relayed
/// address, as two WebRTC endpoints that both use the server do (relay-to-relay): 20
/// datagrams each way, each seen from the other's public relayed address.
fn relay_to_relay() {
    let net = NatLab::build();
    let server = net.start_server();
    runtime().block_on(async {
        let a = turn_client(udp_conn(&net.cli)).await;
        let b = turn_client(udp_conn(&net.cli)).await;
        let ra = timeout(NET, a.allocate())
            .await
            .unwrap()
            .expect("allocate a");
        let rb = timeout(NET, b.allocate())
            .await
            .unwrap()
            .expect("allocate b");
        let (pa, pb) = (ra.local_addr().unwrap(), rb.local_addr().unwrap());
        assert_public_relay(pa);
        assert_public_relay(pb);
        // b's first datagram installs b's permission for a's address; a has none for b's yet,
        // so it may be dropped (and is skipped below if it is not).
        let opener = b"permission opener".to_vec();
        timeout(NET, rb.send_to(&opener, pa))
            .await
            .unwrap()
            .unwrap();
        let mut buf = vec![0u8; 2048];
        for i in 0..ROUND_TRIPS {
            let p = payload(i, ROUND_TRIPS);
            let (from_side, to_side, from_addr, to_addr) = if i % 2 == 0 {
                (&ra, &rb, pa, pb)
            } else {
                (&rb, &ra, pb, pa)
            };
            timeout(NET, from_side.send_to(&p, to_addr))
                .await
                .unwrap_or_else(|_| panic!("send {i} timed out"))
                .unwrap_or_else(|e| panic!("send {i}: {e}"));
            loop {
                let (n, from) = timeout(NET, to_side.recv_from(&mut buf))
                    .await
                    .unwrap_or_else(|_| {
                        panic!(
                            "datagram {i} from {from_addr} did not reach {to_addr}\nlab:\n{}",
                            net.lab.describe()
                        )
                    })
                    .unwrap_or_else(|e| panic!("recv {i}: {e}"));
                if buf[..n] == opener[..] {
                    continue;
                }
                assert_eq!(from, from_addr, "datagram {i} source");
                assert_eq!(buf[..n], p[..], "datagram {i}");
                break;
            }
        }
        for (r, c) in [(ra, a), (rb, b)] {
            timeout(NET, r.close()).await.unwrap().unwrap();
            timeout(NET, c.close()).await.unwrap().unwrap();
        }
    });
    net.assert_nothing_hairpinned();
    drop(server);
}

#[test]
fn nat_relay_to_relay_through_public_addresses() {
    if !netns_available("nat_relay_to_relay_through_public_addresses", true) {
        return;
    }
    relay_to_relay();
}

// ---------------------------------------------------------------------------------------------
// Chromium behind the client's NAT
// ---------------------------------------------------------------------------------------------

/// The longest the runner (node and Chromium) may take before it is killed.
const RUNNER_DEADLINE: Duration = Duration::from_secs(90);
const RUNNER_BUDGET_MS: u64 = 75_000;
/// Messages each side of the data channel sends (page.html's `messages()`).
const MESSAGES_EACH_WAY: u64 = 20;

/// node and Chromium run in the client's namespace (tests/browser/run.mjs): relay-only ICE
/// through `turn:198.51.100.10:3478?transport=udp` must gather a relay candidate on the
/// public address and open a data channel between two peer connections of the page, relay to
/// relay, with 20 messages each way compared byte for byte.
fn chromium_behind_nat() {
    use common::browser::{chromium, run_node_in};
    let net = NatLab::build();
    let server = net.start_server();
    let urls = format!("turn:{SERVER_PUBLIC}:{TURN_PORT}?transport=udp");
    let config = json!({
        "chromium": chromium(),
        "deadlineMs": RUNNER_BUDGET_MS,
        "cases": [{
            "name": "udp-behind-nat",
            "urls": urls,
            "username": USER,
            "credential": PASSWORD,
            "expectRelayProtocol": "udp",
        }],
    })
    .to_string();
    let out = run_node_in(
        &["ip", "netns", "exec", &net.cli],
        "run.mjs",
        "TURNSERVER_BROWSER_CONFIG",
        &config,
        RUNNER_DEADLINE,
    );
    let context = |why: &str| {
        format!(
            "{why}\nrunner status {:?} after {:?}\nstdout:\n{}\nstderr:\n{}\nlab:\n{}",
            out.status,
            out.elapsed,
            out.stdout,
            out.stderr,
            net.lab.describe()
        )
    };
    let Some(line) = out.stdout.lines().rev().find(|l| l.starts_with('{')) else {
        panic!("{}", context("the runner printed no JSON line"));
    };
    let result: Value = serde_json::from_str(line)
        .unwrap_or_else(|e| panic!("{}", context(&format!("unexpected runner output: {e}"))));
    if result["ok"] != true {
        panic!(
            "{}",
            context(&format!("the runner failed: {}", result["error"]))
        );
    }
    let case = &result["cases"][0];
    let mut f = Vec::new();
    if !case["error"].is_null() {
        f.push(format!(
            "the case did not run to its end: {}",
            case["error"]
        ));
    }
    let on_public = |c: &Value| {
        c["address"] == SERVER_PUBLIC.to_string()
            && c["port"]
                .as_u64()
                .is_some_and(|p| (u64::from(MIN_PORT)..=u64::from(MAX_PORT)).contains(&p))
    };
    let is_relay = |c: &Value| c["type"] == "relay" || c["candidateType"] == "relay";
    let gather = &case["gather"];
    let candidates = gather["candidates"].as_array().cloned().unwrap_or_default();
    if gather["timedOut"] != false {
        f.push("gathering did not complete in time".into());
    }
    if !candidates.iter().any(|c| is_relay(c) && on_public(c)) {
        f.push(format!(
            "no relay candidate on {SERVER_PUBLIC}:[{MIN_PORT}..={MAX_PORT}]: {candidates:?}"
        ));
    }
    if !candidates.iter().all(is_relay) {
        f.push(format!(
            "a non-relay candidate under 'relay': {candidates:?}"
        ));
    }
    if gather["errors"].as_array().is_none_or(|e| !e.is_empty()) {
        f.push(format!("icecandidateerror: {}", gather["errors"]));
    }
    let d = &case["dataChannel"];
    if d["connected"] != true {
        f.push(format!(
            "the relay-only data channel did not open: states {}",
            d["connectionStates"]
        ));
    }
    if d["transferTimedOut"] != false {
        f.push("the messages did not all arrive in time".into());
    }
    if d["errors"].as_array().is_none_or(|e| !e.is_empty()) {
        f.push(format!(
            "errors during the data channel test: {}",
            d["errors"]
        ));
    }
    for dir in ["aToB", "bToA"] {
        let x = &d[dir];
        let all = ["sent", "received", "matched"]
            .iter()
            .all(|k| x[k].as_u64() == Some(MESSAGES_EACH_WAY))
            && x["mismatches"].as_array().is_some_and(Vec::is_empty)
            && x["bytesReceived"] == x["bytesSent"];
        if !all {
            f.push(format!("{dir} messages differ: {x}"));
        }
    }
    for side in ["a", "b"] {
        let pair = &d["selectedPair"][side];
        let ok = is_relay(&pair["local"])
            && is_relay(&pair["remote"])
            && on_public(&pair["local"])
            && on_public(&pair["remote"]);
        if !ok {
            f.push(format!(
                "side {side}'s selected pair is not relay/relay on {SERVER_PUBLIC}: {pair}"
            ));
        }
    }
    // One allocation for the gathering, one for each connection, all from the client NAT.
    let created = server.log_lines(&[
        "allocation created",
        &format!("client=udp:{CLIENT_PUBLIC}:"),
        &format!("advertised={SERVER_PUBLIC}:"),
    ]);
    if created.len() < 3 {
        f.push(format!(
            "{} allocations created for the client NAT's address, expected at least 3",
            created.len()
        ));
    }
    eprintln!(
        "chromium {} behind NAT in {:?}",
        result["browserVersion"], out.elapsed
    );
    if !f.is_empty() {
        // The server's log is printed when it is dropped during the panic.
        panic!("{}", context(&format!("FAILED:\n- {}", f.join("\n- "))));
    }
    net.assert_nothing_hairpinned();
}

fn chromium_ready(test: &str) -> bool {
    netns_available(test, true) && common::browser::browser_available(test, false)
}

#[test]
fn chromium_behind_nat_relays_through_public_address() {
    if !chromium_ready("chromium_behind_nat_relays_through_public_address") {
        return;
    }
    chromium_behind_nat();
}

// ---------------------------------------------------------------------------------------------
// IPv6 only
// ---------------------------------------------------------------------------------------------

/// Our raw client in the IPv6-only lab: an Allocate without REQUESTED-ADDRESS-FAMILY asks for
/// IPv4, which this server has not, and gets 440; with IPv6 requested the relayed address is
/// the server's IPv6 address, and 20 datagrams go to the peer and back over a channel.
#[test]
fn ipv6_only_allocation_and_round_trips() {
    use turnserver::wire::{AttrType, FAMILY_IPV6, MessageRef};
    if !netns_available("ipv6_only_allocation_and_round_trips", false) {
        return;
    }
    let net = V6Lab::build();
    let server = net.start_server();
    let peer = EchoPeer::start(&net.peer, IpAddr::V6(PEER6));
    let turn = SocketAddr::new(SERVER6.into(), TURN_PORT);
    let sock = in_netns(&net.cli, || UdpSocket::bind((CLIENT6, 0)).unwrap());
    let local = sock.local_addr().unwrap();
    let mut c = common::Client::udp_on(sock, turn);

    assert_eq!(c.allocate(None), Some(440), "Allocate without a family");
    let refused = server
        .wait_log(&["request refused", "code=440"], NET)
        .expect("no 440 in the log");
    assert!(
        refused.contains("no relay address of the requested family"),
        "{refused}"
    );

    assert_eq!(c.allocate(Some(FAMILY_IPV6)), None, "Allocate for IPv6");
    let relayed = c.relayed().expect("a relayed address");
    assert_eq!(
        relayed.ip(),
        IpAddr::V6(SERVER6),
        "relayed address {relayed}"
    );
    assert!((MIN_PORT..=MAX_PORT).contains(&relayed.port()), "{relayed}");
    let m = MessageRef::parse(&c.last_response).unwrap();
    let mapped = m.xor_address(AttrType::XOR_MAPPED_ADDRESS).unwrap();
    assert_eq!(mapped, Some(local), "XOR-MAPPED-ADDRESS (no NAT on IPv6)");

    const CHANNEL: u16 = 0x4000;
    assert_eq!(c.permit(peer.addr), None, "CreatePermission");
    assert_eq!(c.bind(CHANNEL, peer.addr), None, "ChannelBind");
    let mut sent = Vec::new();
    for i in 0..ROUND_TRIPS {
        let p = payload(i, ROUND_TRIPS);
        c.send_raw(&common::channel_data(CHANNEL, &p));
        let frame = c
            .recv_raw(NET)
            .unwrap_or_else(|| panic!("no answer to datagram {i}; the peer saw {:?}", peer.seen()));
        assert_eq!(frame[..2], CHANNEL.to_be_bytes(), "answer {i} channel");
        let len = u16::from_be_bytes([frame[2], frame[3]]) as usize;
        assert_eq!(frame[4..4 + len], reply_for(&p)[..], "answer {i}");
        sent.push(p);
    }
    peer.assert_saw(relayed, &sent);
    let unexpected: Vec<String> = server
        .log_lines(&["request refused"])
        .into_iter()
        .filter(|l| !l.contains("code=440") && !l.contains("code=401"))
        .collect();
    assert!(unexpected.is_empty(), "refusals: {unexpected:#?}");
}

// ---------------------------------------------------------------------------------------------
// coturn's uclient over IPv6
// ---------------------------------------------------------------------------------------------

/// A process started in a namespace, killed when dropped.
struct Process(Child);

impl Drop for Process {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Runs `cmd` until it exits or `deadline` passes (then it is killed): exit status (None if
/// killed) and standard output followed by standard error.
fn run_with_deadline(
    cmd: &mut Command,
    deadline: Duration,
) -> (Option<std::process::ExitStatus>, String) {
    use std::io::Read;
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let collect = |mut pipe: Box<dyn Read + Send>| {
        std::thread::spawn(move || {
            let mut bytes = Vec::new();
            let _ = pipe.read_to_end(&mut bytes);
            String::from_utf8_lossy(&bytes).into_owned()
        })
    };
    let out = collect(Box::new(child.stdout.take().unwrap()));
    let err = collect(Box::new(child.stderr.take().unwrap()));
    let start = Instant::now();
    let status = loop {
        if let Ok(Some(status)) = child.try_wait() {
            break Some(status);
        }
        if start.elapsed() >= deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let mut text = out.join().unwrap_or_default();
    text.push_str(&err.join().unwrap_or_default());
    (status, text)
}

/// The number right after `key` in `line` (spaces skipped).
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = line[line.find(key)? + key.len()..].trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// uclient's final totals: (messages sent, received, lost).
fn uclient_totals(text: &str) -> Option<(u64, u64, u64)> {
    let msgs = text
        .lines()
        .filter(|l| l.contains("start_mclient:") && !l.contains("msz="))
        .rfind(|l| l.contains("tot_send_msgs="))?;
    let lost = text.lines().rfind(|l| l.contains("Total lost packets"))?;
    Some((
        number_after(msgs, "tot_send_msgs=")?,
        number_after(msgs, "tot_recv_msgs=")?,
        number_after(lost, "Total lost packets")?,
    ))
}

/// coturn's `turnutils_uclient -x` (IPv6 relay requested) in the IPv6-only client namespace
/// relays to `turnutils_peer` in the peer namespace, with channels and with Send indications;
/// every message must come back, and every allocation be on the server's IPv6 address.
#[test]
fn ipv6_only_coturn_uclient() {
    if !netns_available("ipv6_only_coturn_uclient", false)
        || !common::coturn_tools(&["turnutils_uclient", "turnutils_peer"])
    {
        return;
    }
    let net = V6Lab::build();
    let server = net.start_server();
    let peer_port: u16 = 3480;
    let _peer = Process(
        Command::new("ip")
            .args(["netns", "exec", &net.peer, "turnutils_peer"])
            .args(["-p", &peer_port.to_string(), "-L", &PEER6.to_string()])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start turnutils_peer"),
    );
    // The peer echoes on its port and the next (uclient's RTCP streams): wait until both
    // answer from the client's namespace.
    let probe = in_netns(&net.cli, || UdpSocket::bind((CLIENT6, 0)).unwrap());
    probe
        .set_read_timeout(Some(Duration::from_millis(100)))
        .unwrap();
    for port in [peer_port, peer_port + 1] {
        let to = SocketAddr::new(PEER6.into(), port);
        let mut buf = [0u8; 64];
        let echoed = (0..100).any(|_| {
            probe.send_to(b"probe", to).unwrap();
            matches!(probe.recv_from(&mut buf), Ok((5, from)) if from == to && &buf[..5] == b"probe")
        });
        assert!(echoed, "turnutils_peer does not echo on {to}");
    }

    let (clients, messages) = (4u64, 50u64);
    for flags in [&["-x"][..], &["-x", "-s"][..]] {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", &net.cli, "turnutils_uclient"])
            .args(flags)
            .args(["-u", USER, "-w", PASSWORD])
            .args(["-e", &PEER6.to_string(), "-r", &peer_port.to_string()])
            .args(["-p", &TURN_PORT.to_string()])
            .args(["-m", &clients.to_string(), "-n", &messages.to_string()])
            .args(["-l", "120"])
            .arg(SERVER6.to_string());
        let line = format!("{cmd:?}");
        let (status, text) = run_with_deadline(&mut cmd, Duration::from_secs(60));
        let context = format!("{line}\nexit: {status:?}\nuclient output:\n{text}");
        assert!(
            status.is_some_and(|s| s.success()),
            "uclient failed\n{context}"
        );
        let expected = clients * messages;
        assert_eq!(
            uclient_totals(&text),
            Some((expected, expected, 0)),
            "uclient totals (sent, received, lost)\n{context}"
        );
    }
    let created = server.log_lines(&["allocation created"]);
    assert!(!created.is_empty(), "no allocation created");
    let relay = format!("relay=[{SERVER6}]:");
    let elsewhere: Vec<&String> = created.iter().filter(|l| !l.contains(&relay)).collect();
    assert!(
        elsewhere.is_empty(),
        "allocations not on {SERVER6}: {elsewhere:#?}"
    );
    let refused = server.log_lines(&["request refused"]);
    let unexpected: Vec<&String> = refused.iter().filter(|l| !l.contains("code=401")).collect();
    assert!(unexpected.is_empty(), "refusals: {unexpected:#?}");
}
