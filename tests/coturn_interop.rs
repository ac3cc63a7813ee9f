//! Interoperability tests against coturn's client tools (Debian package `coturn`):
//! `turnutils_uclient` relays traffic through our server to a `turnutils_peer` echo peer over
//! UDP and TCP, with channels and with Send indications; `turnutils_stunclient` asks for its
//! mapped address.
//!
//! coturn's own server binary is also called `turnserver`: ours is only ever started through
//! the harness (`env!("CARGO_BIN_EXE_turnserver")`), never through `PATH`.
//!
//! When the tools are missing the tests print a note and pass, unless
//! `TURNSERVER_REQUIRE_INTEROP=1` is set (as `.ci/run` does), in which case they fail.
//!
//! Every test uses its own server, peer and ports, so they run in parallel; every external
//! process runs under a deadline and is killed when it expires.

mod common;

use std::io::Read;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

const UCLIENT: &str = "turnutils_uclient";
const PEER: &str = "turnutils_peer";
const STUNCLIENT: &str = "turnutils_stunclient";

/// The longest any one run of a coturn tool may take before it is killed.
const RUN_DEADLINE: Duration = Duration::from_secs(60);

/// The harness's relay ranges lie in 50000..=61999; echo peers stay out of them.
const RELAY_PORTS: std::ops::RangeInclusive<u16> = 50000..=61999;

// ---------------------------------------------------------------------------------------------
// Tool discovery
// ---------------------------------------------------------------------------------------------

/// True when the coturn tools are installed (see [`common::coturn_tools`]).
fn tools_available() -> bool {
    common::coturn_tools(&[UCLIENT, PEER, STUNCLIENT])
}

// ---------------------------------------------------------------------------------------------
// Running a process with a deadline
// ---------------------------------------------------------------------------------------------

struct RunOutput {
    /// None when the process was killed (deadline expired or `done` said so).
    status: Option<ExitStatus>,
    /// Whether the deadline expired.
    timed_out: bool,
    /// Standard output followed by standard error.
    text: String,
}

impl RunOutput {
    fn success(&self) -> bool {
        self.status.is_some_and(|s| s.success())
    }
}

fn collect(mut pipe: impl Read + Send + 'static) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut bytes = Vec::new();
        let _ = pipe.read_to_end(&mut bytes);
        String::from_utf8_lossy(&bytes).into_owned()
    })
}

/// Runs `cmd` until it exits or `deadline` passes (then it is killed).
fn run(cmd: &mut Command, deadline: Duration) -> RunOutput {
    run_until(cmd, deadline, || false)
}

/// Runs `cmd` until it exits, `done()` returns true (then it is killed, without counting as a
/// time-out) or `deadline` passes (then it is killed).
fn run_until(cmd: &mut Command, deadline: Duration, done: impl Fn() -> bool) -> RunOutput {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {cmd:?}: {e}"));
    let out = collect(child.stdout.take().unwrap());
    let err = collect(child.stderr.take().unwrap());
    let start = Instant::now();
    let mut timed_out = false;
    let status = loop {
        match child.try_wait() {
            Ok(Some(status)) => break Some(status),
            Ok(None) => {}
            Err(e) => panic!("waiting for {cmd:?}: {e}"),
        }
        let expired = start.elapsed() >= deadline;
        if expired || done() {
            timed_out = expired;
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(25));
    };
    let mut text = out.join().unwrap_or_default();
    text.push_str(&err.join().unwrap_or_default());
    RunOutput {
        status,
        timed_out,
        text,
    }
}

/// Waits (boundedly) until the server log contains `needle`.
fn wait_for_log(server: &common::TestServer, needle: &str, timeout: Duration) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if server.log().contains(needle) {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The last lines of the server log, for failure messages.
fn log_tail(server: &common::TestServer) -> String {
    let log = server.log();
    let lines: Vec<&str> = log.lines().collect();
    lines[lines.len().saturating_sub(60)..].join("\n")
}

fn assert_server_healthy(server: &common::TestServer) {
    let log = server.log();
    assert!(
        !log.contains("panicked"),
        "the server panicked; log:\n{log}"
    );
}

// ---------------------------------------------------------------------------------------------
// turnutils_peer
// ---------------------------------------------------------------------------------------------

/// A `turnutils_peer` UDP echo peer on 127.0.0.1, killed when dropped. It listens on `port`
/// and `port + 1` (uclient sends its RTCP streams to `port + 1`).
struct Peer {
    child: Child,
    port: u16,
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port `p` with `p` and `p + 1` free for UDP on 127.0.0.1 (at the time of asking), outside
/// the harness's relay ranges when possible.
fn free_udp_port_pair() -> u16 {
    let mut fallback = None;
    for _ in 0..200 {
        let first = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = first.local_addr().unwrap().port();
        if port == u16::MAX || UdpSocket::bind(("127.0.0.1", port + 1)).is_err() {
            continue;
        }
        if !RELAY_PORTS.contains(&port) && !RELAY_PORTS.contains(&(port + 1)) {
            return port;
        }
        fallback.get_or_insert(port);
    }
    fallback.expect("no pair of free UDP ports on 127.0.0.1")
}

impl Peer {
    fn start() -> Peer {
        for _ in 0..5 {
            let port = free_udp_port_pair();
            let child = Command::new(PEER)
                .args(["-p", &port.to_string(), "-L", "127.0.0.1", "-L", "::1"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {PEER}: {e}"));
            let mut peer = Peer { child, port };
            // turnutils_peer does not exit when it cannot bind, so check that it echoes on
            // both ports before using it (this also waits until it is ready).
            if peer.echoes(IpAddr::from([127, 0, 0, 1]), port)
                && peer.echoes(IpAddr::from([127, 0, 0, 1]), port + 1)
            {
                return peer;
            }
            eprintln!("{PEER} on port {port} does not echo, retrying with another port");
            let _ = peer.child.kill();
        }
        panic!("{PEER} did not start");
    }

    fn echoes(&mut self, ip: IpAddr, port: u16) -> bool {
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0)).unwrap();
        sock.set_read_timeout(Some(Duration::from_millis(50)))
            .unwrap();
        let target = SocketAddr::new(ip, port);
        let probe = format!("probe {} {port}", std::process::id());
        let mut buf = [0u8; 256];
        for _ in 0..60 {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return false;
            }
            let _ = sock.send_to(probe.as_bytes(), target);
            if let Ok((n, from)) = sock.recv_from(&mut buf)
                && from == target
                && &buf[..n] == probe.as_bytes()
            {
                return true;
            }
        }
        false
    }
}

// ---------------------------------------------------------------------------------------------
// turnutils_uclient
// ---------------------------------------------------------------------------------------------

/// The totals turnutils_uclient prints at the end of a run.
#[derive(Debug, PartialEq)]
struct Totals {
    sent: u64,
    received: u64,
    sent_bytes: u64,
    received_bytes: u64,
    lost: u64,
    send_dropped: Option<u64>,
}

/// The number right after `key` in `line` (spaces skipped), e.g. `tot_send_msgs=` or
/// `tot_send_bytes ~`.
fn number_after(line: &str, key: &str) -> Option<u64> {
    let rest = &line[line.find(key)? + key.len()..];
    let rest = rest.trim_start();
    let end = rest
        .find(|c: char| !c.is_ascii_digit())
        .unwrap_or(rest.len());
    rest[..end].parse().ok()
}

/// Parses the final report of turnutils_uclient, e.g.
/// ```text
/// 7: : start_mclient: tot_send_msgs=200, tot_recv_msgs=200
/// 7: : start_mclient: tot_send_bytes ~ 24000, tot_recv_bytes ~ 24000
/// 7: : Total lost packets 0 (0.000000%), total send dropped 0 (0.000000%)
/// ```
/// (The per-second progress lines carry `msz=` and are skipped.)
fn parse_totals(text: &str) -> Option<Totals> {
    let finals = || {
        text.lines()
            .filter(|l| l.contains("start_mclient:") && !l.contains("msz="))
    };
    let msgs = finals().rfind(|l| l.contains("tot_send_msgs="))?;
    let bytes = finals().rfind(|l| l.contains("tot_send_bytes"))?;
    let lost = text.lines().rfind(|l| l.contains("Total lost packets"))?;
    Some(Totals {
        sent: number_after(msgs, "tot_send_msgs=")?,
        received: number_after(msgs, "tot_recv_msgs=")?,
        sent_bytes: number_after(bytes, "tot_send_bytes ~")?,
        received_bytes: number_after(bytes, "tot_recv_bytes ~")?,
        lost: number_after(lost, "Total lost packets")?,
        send_dropped: number_after(lost, "total send dropped"),
    })
}

fn uclient(
    server_port: u16,
    (peer_ip, peer_port): (&str, u16),
    (user, password): (&str, &str),
    flags: &[&str],
    clients: u32,
    messages: u32,
    length: u32,
) -> (Command, String) {
    let mut cmd = Command::new(UCLIENT);
    cmd.args(flags)
        .args(["-u", user, "-w", password])
        .args(["-e", peer_ip, "-r", &peer_port.to_string()])
        .args(["-p", &server_port.to_string()])
        .args(["-m", &clients.to_string()])
        .args(["-n", &messages.to_string()])
        .args(["-l", &length.to_string()])
        .arg("127.0.0.1");
    let line = format!("{cmd:?}");
    (cmd, line)
}

/// Relays `messages` messages of each payload size in `lengths` for each of `clients` uclient
/// sessions through a fresh server to a fresh echo peer (one uclient per payload size, all at
/// once) and checks that every message came back.
///
/// uclient (without `-c`) runs its sessions in RTP/RTCP pairs, each with its own allocation,
/// and every session sends `messages` messages, so `clients` is even and the expected totals
/// are `clients * messages`.
fn relay_traffic(flags: &[&str], clients: u32, messages: u32, lengths: &[u32]) {
    if !tools_available() {
        return;
    }
    assert!(
        clients.is_multiple_of(2),
        "uclient rounds odd client counts up"
    );
    // `-S` is TLS (over TCP): the server then needs a certificate and its TLS port.
    let dir = common::TempDir::new("uclient-tls");
    let (server, port) = if flags.contains(&"-S") {
        let certs = common::TestCerts::generate(&dir.0, "uclient");
        common::start_tls(&certs, "")
    } else {
        let server = common::start("");
        let port = server.port;
        (server, port)
    };
    let credentials = (common::USER, common::PASSWORD);
    relay_through(
        &server,
        port,
        credentials,
        flags,
        clients,
        messages,
        lengths,
    );
}

/// The traffic of [`relay_traffic`] through a running server listening on `port`.
fn relay_through(
    server: &common::TestServer,
    port: u16,
    credentials: (&str, &str),
    flags: &[&str],
    clients: u32,
    messages: u32,
    lengths: &[u32],
) {
    relay_to(
        server,
        port,
        credentials,
        flags,
        clients,
        messages,
        lengths,
        "127.0.0.1",
    );
}

/// The same traffic to an echo peer on `peer_ip` (127.0.0.1 or ::1).
#[allow(clippy::too_many_arguments)]
fn relay_to(
    server: &common::TestServer,
    port: u16,
    (user, password): (&str, &str),
    flags: &[&str],
    clients: u32,
    messages: u32,
    lengths: &[u32],
    peer_ip: &str,
) {
    let mut peer = Peer::start();
    let peer_addr: IpAddr = peer_ip.parse().unwrap();
    let peer_port = peer.port;
    assert!(
        peer.echoes(peer_addr, peer_port) && peer.echoes(peer_addr, peer_port + 1),
        "{PEER} does not echo on {peer_ip}"
    );

    let results: Vec<(u32, String, RunOutput)> = std::thread::scope(|s| {
        let handles: Vec<_> = lengths
            .iter()
            .map(|&length| {
                let (mut cmd, line) = uclient(
                    port,
                    (peer_ip, peer.port),
                    (user, password),
                    flags,
                    clients,
                    messages,
                    length,
                );
                s.spawn(move || (length, line, run(&mut cmd, RUN_DEADLINE)))
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });

    let expected = u64::from(clients) * u64::from(messages);
    for (length, line, out) in &results {
        let context = || {
            format!(
                "{line}\nexit: {:?}, timed out: {}\nuclient output:\n{}\nserver log (tail):\n{}",
                out.status,
                out.timed_out,
                out.text,
                log_tail(server)
            )
        };
        assert!(
            !out.timed_out,
            "uclient did not finish in time\n{}",
            context()
        );
        assert!(out.success(), "uclient failed\n{}", context());
        assert!(
            !out.text.contains("Cannot complete Allocation"),
            "allocation failed\n{}",
            context()
        );
        let totals = parse_totals(&out.text)
            .unwrap_or_else(|| panic!("cannot parse the uclient totals\n{}", context()));
        let expected_bytes = expected * u64::from(*length);
        assert_eq!(
            totals,
            Totals {
                sent: expected,
                received: expected,
                sent_bytes: expected_bytes,
                received_bytes: expected_bytes,
                lost: 0,
                send_dropped: Some(0),
            },
            "unexpected uclient totals\n{}",
            context()
        );
    }
    assert_server_healthy(server);
}

#[test]
fn uclient_udp_channel_data() {
    relay_traffic(&[], 10, 100, &[120, 1200]);
}

/// Dual allocation (RFC 8656 ADDITIONAL-ADDRESS-FAMILY): `uclient -Z` asks for an IPv4 and an
/// IPv6 relayed address in one Allocate, refreshes naming either family at random, and relays
/// to an IPv4 and then an IPv6 peer, over ChannelData and over Send/Data.
#[test]
fn uclient_dual_allocation_relays_to_both_families() {
    if !tools_available() {
        return;
    }
    let server = common::start_with(&format!(
        "relay-ips = [\"127.0.0.1\", \"::1\"]\nallow-loopback-peers = true\n[users]\n{} = \"{}\"\n",
        common::USER,
        common::PASSWORD
    ));
    let credentials = (common::USER, common::PASSWORD);
    for peer in ["127.0.0.1", "::1"] {
        for flags in [&["-Z"][..], &["-Z", "-s"][..]] {
            relay_to(
                &server,
                server.port,
                credentials,
                flags,
                4,
                50,
                &[120],
                peer,
            );
        }
    }
    let log = server.log();
    let dual = log.matches("allocation created (dual)").count();
    // Each uclient session allocates twice (a probe, then its own).
    assert!(dual >= 16, "{dual} dual allocations; log:\n{log}");
    assert_eq!(
        log.matches("allocation created").count(),
        dual,
        "every allocation is dual; log:\n{log}"
    );
    assert!(log.contains("relay2=[::1]:"), "{log}");
}

#[test]
fn uclient_udp_send_indications() {
    relay_traffic(&["-s"], 4, 200, &[120, 1200]);
}

#[test]
fn uclient_tcp_channel_data() {
    relay_traffic(&["-t"], 6, 100, &[120, 1200]);
}

#[test]
fn uclient_tcp_send_indications() {
    relay_traffic(&["-t", "-s"], 4, 150, &[120, 1200]);
}

#[test]
fn uclient_tls_channel_data() {
    relay_traffic(&["-t", "-S"], 6, 100, &[120, 1200]);
}

#[test]
fn uclient_tls_send_indications() {
    relay_traffic(&["-t", "-S", "-s"], 4, 100, &[120, 1200]);
}

/// `-S` without `-t` is DTLS (RFC 7350) on the TLS port over UDP.
#[test]
fn uclient_dtls_channel_data() {
    relay_traffic(&["-S"], 6, 100, &[120, 1200]);
}

#[test]
fn uclient_dtls_send_indications() {
    relay_traffic(&["-S", "-s"], 4, 100, &[120, 1200]);
}

/// An independent DTLS 1.2 client (OpenSSL) completes a handshake with a modern suite and
/// verifies the certificate against the test CA.
#[test]
fn openssl_dtls_handshake() {
    if !tools_available() {
        return;
    }
    if !common::on_path("openssl") {
        assert!(
            std::env::var("TURNSERVER_REQUIRE_INTEROP").as_deref() != Ok("1"),
            "openssl is not installed (apt-get install openssl)"
        );
        eprintln!("skipping: openssl not installed");
        return;
    }
    let dir = common::TempDir::new("dtls-openssl");
    let certs = common::TestCerts::generate(&dir.0, "dtls");
    let (server, port) = common::start_tls(&certs, "");
    let handshake = |ca: &std::path::Path| {
        let mut cmd = Command::new("openssl");
        cmd.args([
            "s_client",
            "-dtls1_2",
            "-connect",
            &format!("127.0.0.1:{port}"),
        ])
        .arg("-CAfile")
        .arg(ca)
        .stdin(std::process::Stdio::null());
        run(&mut cmd, RUN_DEADLINE).text
    };
    let out = handshake(&certs.ca);
    assert!(out.contains("Protocol  : DTLSv1.2"), "{out}");
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("CN = turnserver test dtls"), "{out}");
    let cipher = out
        .lines()
        .find_map(|l| l.split("Cipher is ").nth(1))
        .unwrap_or("");
    assert!(
        cipher.starts_with("ECDHE-") && (cipher.contains("GCM") || cipher.contains("CHACHA20")),
        "cipher {cipher:?}\n{out}"
    );
    let association = wait_for_log(&server, "dtls association", Duration::from_secs(5));
    assert!(association);

    // A renewed certificate is used for new DTLS handshakes after SIGHUP.
    let renewed = common::TestCerts::generate(&dir.0, "renewed");
    std::fs::copy(&renewed.cert, &certs.cert).unwrap();
    std::fs::copy(&renewed.key, &certs.key).unwrap();
    let hup = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let reloaded = wait_for_log(&server, "tls certificate reloaded", Duration::from_secs(5));
    assert!(reloaded);
    let out = handshake(&renewed.ca);
    assert!(out.contains("Verify return code: 0 (ok)"), "{out}");
    assert!(out.contains("CN = turnserver test renewed"), "{out}");
}

/// uclient (without `-c`) allocates in RTP/RTCP pairs: EVEN-PORT with the R bit for the RTP
/// session, then RESERVATION-TOKEN for the RTCP one. A port reserved that way must really be
/// kept for the second Allocate (RFC 8656 7.2), even when other processes bind ports of the
/// relay range: here every port `4k + 1` of the range is held by the test, so half of the
/// even ports have a successor that cannot be bound, and the server must pick pairs whose
/// both ports it can bind, and hold the second until it is claimed.
#[test]
fn uclient_rtp_rtcp_pairs_with_busy_odd_ports() {
    if !tools_available() {
        return;
    }
    let server = common::start("");
    let peer = Peer::start();
    let _held: Vec<UdpSocket> = (server.min_port..=server.max_port)
        .filter(|p| p % 4 == 1)
        .filter_map(|p| UdpSocket::bind(("127.0.0.1", p)).ok())
        .collect();
    let (clients, messages, length) = (10, 20, 120);
    let (mut cmd, line) = uclient(
        server.port,
        ("127.0.0.1", peer.port),
        (common::USER, common::PASSWORD),
        &[],
        clients,
        messages,
        length,
    );
    let out = run(&mut cmd, RUN_DEADLINE);
    let context = format!(
        "{line}\nexit: {:?}, timed out: {}\nuclient output:\n{}\nserver log (tail):\n{}",
        out.status,
        out.timed_out,
        out.text,
        log_tail(&server)
    );
    assert!(out.success(), "uclient failed\n{context}");
    let expected = u64::from(clients) * u64::from(messages);
    let totals = parse_totals(&out.text)
        .unwrap_or_else(|| panic!("cannot parse the uclient totals\n{context}"));
    assert_eq!(
        (totals.sent, totals.received, totals.lost),
        (expected, expected, 0),
        "{context}"
    );
    assert_server_healthy(&server);
}

#[test]
fn uclient_wrong_password_is_refused() {
    if !tools_available() {
        return;
    }
    let server = common::start("");
    let peer = Peer::start();
    for flags in [&[][..], &["-t"][..]] {
        let (mut cmd, line) = uclient(
            server.port,
            ("127.0.0.1", peer.port),
            (common::USER, "wrong"),
            flags,
            2,
            10,
            120,
        );
        let out = run(&mut cmd, RUN_DEADLINE);
        let context = format!(
            "{line}\nexit: {:?}, timed out: {}\nuclient output:\n{}\nserver log (tail):\n{}",
            out.status,
            out.timed_out,
            out.text,
            log_tail(&server)
        );
        assert!(!out.timed_out, "uclient did not finish in time\n{context}");
        assert!(
            out.text.contains("Cannot complete Allocation") || !out.success(),
            "uclient did not report a failed allocation\n{context}"
        );
        if let Some(totals) = parse_totals(&out.text) {
            assert_eq!(totals.received, 0, "traffic was relayed\n{context}");
        }
    }
    assert!(
        wait_for_log(&server, "bad credentials", Duration::from_secs(5)),
        "the server log does not mention bad credentials; log:\n{}",
        server.log()
    );
    assert!(
        !server.log().contains("allocation created"),
        "an allocation was created; log:\n{}",
        server.log()
    );
    assert_server_healthy(&server);
}

// ---------------------------------------------------------------------------------------------
// turnutils_stunclient
// ---------------------------------------------------------------------------------------------

/// A UDP relay between a client and the server, so that the test knows exactly which address
/// the server sees (`server_side`) and can look at the server's answers.
struct UdpProxy {
    /// Where the client sends to.
    client_side: SocketAddr,
    /// The address the server sees the client's datagrams come from.
    server_side: SocketAddr,
    /// Every datagram the server sent back.
    responses: Arc<Mutex<Vec<Vec<u8>>>>,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl UdpProxy {
    fn start(server: SocketAddr) -> UdpProxy {
        let front = UdpSocket::bind("127.0.0.1:0").unwrap();
        let back = UdpSocket::bind("127.0.0.1:0").unwrap();
        back.connect(server).unwrap();
        front
            .set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        back.set_read_timeout(Some(Duration::from_millis(5)))
            .unwrap();
        let client_side = front.local_addr().unwrap();
        let server_side = back.local_addr().unwrap();
        let responses = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let thread = {
            let responses = responses.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let deadline = Instant::now() + RUN_DEADLINE;
                let mut client = None;
                let mut buf = vec![0u8; 65536];
                while !stop.load(Ordering::Relaxed) && Instant::now() < deadline {
                    if let Ok((n, from)) = front.recv_from(&mut buf) {
                        client = Some(from);
                        let _ = back.send(&buf[..n]);
                    }
                    if let Ok(n) = back.recv(&mut buf) {
                        responses.lock().unwrap().push(buf[..n].to_vec());
                        if let Some(client) = client {
                            let _ = front.send_to(&buf[..n], client);
                        }
                    }
                }
            })
        };
        UdpProxy {
            client_side,
            server_side,
            responses,
            stop,
            thread: Some(thread),
        }
    }

    fn responses(&self) -> Vec<Vec<u8>> {
        self.responses.lock().unwrap().clone()
    }
}

impl Drop for UdpProxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// The addresses in stunclient's "UDP reflexive addr: 127.0.0.1:40000" lines.
fn reflexive_addrs(text: &str) -> Vec<SocketAddr> {
    const KEY: &str = "UDP reflexive addr:";
    text.lines()
        .filter_map(|l| l[l.find(KEY)? + KEY.len()..].trim().parse().ok())
        .collect()
}

/// STUN attributes as (type, value).
type StunAttrs = Vec<(u16, Vec<u8>)>;

/// STUN message type and attributes of a datagram, if it is a STUN message.
fn stun_parse(msg: &[u8]) -> Option<(u16, StunAttrs)> {
    if msg.len() < 20 || msg[4..8] != [0x21, 0x12, 0xa4, 0x42] {
        return None;
    }
    let kind = u16::from_be_bytes([msg[0], msg[1]]);
    let len = usize::from(u16::from_be_bytes([msg[2], msg[3]]));
    if msg.len() != 20 + len {
        return None;
    }
    let mut attrs = Vec::new();
    let mut rest = &msg[20..];
    while rest.len() >= 4 {
        let t = u16::from_be_bytes([rest[0], rest[1]]);
        let l = usize::from(u16::from_be_bytes([rest[2], rest[3]]));
        let value = rest.get(4..4 + l)?.to_vec();
        attrs.push((t, value));
        rest = rest.get((4 + l).next_multiple_of(4)..).unwrap_or(&[]);
    }
    Some((kind, attrs))
}

fn stunclient(port: u16) -> Command {
    let mut cmd = Command::new(STUNCLIENT);
    cmd.args(["-p", &port.to_string(), "127.0.0.1"]);
    cmd
}

#[test]
fn stunclient_reports_mapped_address() {
    if !tools_available() {
        return;
    }
    let server = common::start("");

    // Directly: the mapped address is the client's own loopback address.
    let out = run(&mut stunclient(server.port), RUN_DEADLINE);
    assert!(
        out.success(),
        "stunclient failed ({:?}, timed out: {}):\n{}",
        out.status,
        out.timed_out,
        out.text
    );
    let addrs = reflexive_addrs(&out.text);
    assert!(!addrs.is_empty(), "no reflexive address in:\n{}", out.text);
    for addr in &addrs {
        assert_eq!(addr.ip().to_string(), "127.0.0.1", "output:\n{}", out.text);
        assert!(
            addr.port() != 0 && addr.port() != server.port,
            "implausible mapped port in:\n{}",
            out.text
        );
    }

    // Through a relay whose server-side address the test knows: the server must report
    // exactly that address (XOR-MAPPED-ADDRESS decoded by coturn's client).
    let proxy = UdpProxy::start(server.addr());
    let out = run(&mut stunclient(proxy.client_side.port()), RUN_DEADLINE);
    assert!(
        out.success(),
        "stunclient via proxy failed ({:?}, timed out: {}):\n{}",
        out.status,
        out.timed_out,
        out.text
    );
    let addrs = reflexive_addrs(&out.text);
    assert!(!addrs.is_empty(), "no reflexive address in:\n{}", out.text);
    for addr in &addrs {
        assert_eq!(
            *addr, proxy.server_side,
            "the server reported a wrong mapped address; output:\n{}",
            out.text
        );
    }
    let responses = proxy.responses();
    assert!(!responses.is_empty(), "the proxy saw no response");
    for response in &responses {
        let (kind, _) =
            stun_parse(response).unwrap_or_else(|| panic!("not a STUN message: {response:02x?}"));
        assert_eq!(kind, 0x0101, "not a Binding success response");
    }
    assert_server_healthy(&server);
}

/// `stunclient -f` (RFC 5780 NAT behaviour discovery) sends CHANGE-REQUEST, a
/// comprehension-required attribute, to a server with one listening address, which cannot
/// serve RFC 5780: RFC 5780 section 6 and RFC 8489 section 6.3.1 want a 420 (Unknown
/// Attribute) error listing it in UNKNOWN-ATTRIBUTES. (stunclient then waits for ever, so it
/// is killed once the answer was seen.) `tests/rfc5780.rs` covers a server with two.
#[test]
fn stunclient_rfc5780_request_gets_unknown_attribute() {
    if !tools_available() {
        return;
    }
    let server = common::start("");
    let proxy = UdpProxy::start(server.addr());
    let mut cmd = stunclient(proxy.client_side.port());
    cmd.arg("-f");
    // stunclient -f first sends a plain Binding request, then one with CHANGE-REQUEST.
    let error_response = || {
        proxy
            .responses()
            .iter()
            .filter_map(|r| stun_parse(r))
            .find(|(kind, _)| *kind == 0x0111)
            .map(|(_, attrs)| attrs)
    };
    let out = run_until(&mut cmd, Duration::from_secs(20), || {
        error_response().is_some()
    });
    let attrs = error_response().unwrap_or_else(|| {
        panic!(
            "no Binding error response to stunclient -f (timed out: {}); \
             responses: {:02x?}\noutput:\n{}\nserver log (tail):\n{}",
            out.timed_out,
            proxy.responses(),
            out.text,
            log_tail(&server)
        )
    });
    let error = attrs
        .iter()
        .find(|(t, _)| *t == 0x0009)
        .map(|(_, v)| v)
        .expect("no ERROR-CODE");
    assert!(error.len() >= 4, "short ERROR-CODE");
    assert_eq!(
        u16::from(error[2] & 0x07) * 100 + u16::from(error[3]),
        420,
        "wrong error code"
    );
    let unknown: Vec<u16> = attrs
        .iter()
        .find(|(t, _)| *t == 0x000a)
        .map(|(_, v)| {
            v.chunks_exact(2)
                .map(|c| u16::from_be_bytes([c[0], c[1]]))
                .collect()
        })
        .expect("no UNKNOWN-ATTRIBUTES");
    assert!(
        unknown.contains(&0x0003),
        "CHANGE-REQUEST not listed in UNKNOWN-ATTRIBUTES: {unknown:04x?}"
    );
    assert_server_healthy(&server);
}

#[test]
fn uclient_totals_are_parsed() {
    let text = "\
1: : start_mclient: msz=4, tot_send_msgs=49, tot_recv_msgs=48, tot_send_bytes ~ 5880, tot_recv_bytes ~ 5760
7: : start_mclient: tot_send_msgs=200, tot_recv_msgs=199
7: : start_mclient: tot_send_bytes ~ 24000, tot_recv_bytes ~ 23880
7: : Total transmit time is 7
7: : Total lost packets 1 (0.500000%), total send dropped 0 (0.000000%)
";
    assert_eq!(
        parse_totals(text),
        Some(Totals {
            sent: 200,
            received: 199,
            sent_bytes: 24000,
            received_bytes: 23880,
            lost: 1,
            send_dropped: Some(0),
        })
    );
    assert_eq!(
        parse_totals("0: : ERROR: Cannot complete Allocation\n"),
        None
    );
    assert_eq!(
        reflexive_addrs("0: : IPv4. UDP reflexive addr: 127.0.0.1:37039\n"),
        vec!["127.0.0.1:37039".parse::<SocketAddr>().unwrap()]
    );
}

// ---------------------------------------------------------------------------------------------
// migrate-config: coturn configurations carried over, then used by coturn's own client
// ---------------------------------------------------------------------------------------------

/// Runs `turnserver migrate-config` on `coturn_conf` and returns the TOML it wrote.
fn migrate_config(coturn_conf: &str) -> String {
    let dir = common::TempDir::new("migrate");
    let input = dir.0.join("turnserver.conf");
    let output = dir.0.join("turnserver.toml");
    std::fs::write(&input, coturn_conf).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_turnserver"))
        .arg("migrate-config")
        .arg(&input)
        .arg("-o")
        .arg(&output)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    let toml = std::fs::read_to_string(&output).unwrap_or_default();
    assert!(out.status.success(), "migrate-config: {stderr}\n{toml}");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(&output).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600, "the migrated file holds passwords: owner only");
    assert!(stderr.contains("valid configuration"), "{stderr}");
    toml
}

/// Starts our server on the configuration migrated from `coturn(port, min_port, max_port)`.
fn migrated_server(coturn: impl Fn(u16, u16, u16) -> String) -> (common::TestServer, String) {
    let toml = std::sync::Mutex::new(String::new());
    let server = common::start_custom(
        |port, min, max| {
            let t = migrate_config(&coturn(port, min, max));
            *toml.lock().unwrap() = t.clone();
            t
        },
        &[],
    );
    let toml = toml.into_inner().unwrap();
    (server, toml)
}

/// Debian's coturn package ships /etc/turnserver.conf with every line commented out. This
/// uncomments a realistic set (with this test's ports and loopback addresses), migrates it,
/// and relays uclient traffic through the result.
#[test]
fn debian_example_config_migrates_and_relays() {
    if !tools_available() {
        return;
    }
    let Ok(debian) = std::fs::read_to_string("/etc/turnserver.conf") else {
        if std::env::var("TURNSERVER_REQUIRE_INTEROP").as_deref() == Ok("1") {
            panic!("/etc/turnserver.conf (coturn's example) is missing");
        }
        eprintln!("skipping: /etc/turnserver.conf (coturn's example) is missing");
        return;
    };
    let (server, toml) = migrated_server(|port, min, max| {
        let mut text = debian.clone();
        for (key, line) in [
            ("#listening-port=", format!("listening-port={port}")),
            ("#listening-ip=", "listening-ip=127.0.0.1".into()),
            ("#relay-ip=", "relay-ip=127.0.0.1".into()),
            ("#min-port=", format!("min-port={min}")),
            ("#max-port=", format!("max-port={max}")),
            ("#verbose", "verbose".into()),
            ("#fingerprint", "fingerprint".into()),
            ("#lt-cred-mech", "lt-cred-mech".into()),
            (
                "#user=username1:password1",
                format!("user={}:{}", common::USER, common::PASSWORD),
            ),
            ("#realm=", format!("realm={}", common::REALM)),
            ("#total-quota=", "total-quota=100".into()),
            ("#stale-nonce", "stale-nonce=600".into()),
            ("#no-tls", "no-tls".into()),
            ("#no-dtls", "no-dtls".into()),
            ("#allow-loopback-peers", "allow-loopback-peers".into()),
            ("#no-multicast-peers", "no-multicast-peers".into()),
            ("#no-cli", "no-cli".into()),
            ("#pidfile=", "pidfile=\"/var/run/turnserver.pid\"".into()),
            (
                "# denied-peer-ip=83.166.64.0-83.166.95.255",
                "denied-peer-ip=83.166.64.0-83.166.95.255".into(),
            ),
        ] {
            let at = text
                .lines()
                .position(|l| l.starts_with(key))
                .unwrap_or_else(|| panic!("{key} is not in Debian's /etc/turnserver.conf"));
            let mut lines: Vec<String> = text.lines().map(str::to_owned).collect();
            lines[at] = line;
            text = lines.join("\n");
        }
        text
    });
    assert!(
        toml.contains("denied-peer-ips = [\"83.166.64.0/19\"]"),
        "{toml}"
    );
    assert!(
        toml.contains("no-cli"),
        "every dropped line is named:\n{toml}"
    );
    let port = server.port;
    relay_through(
        &server,
        port,
        (common::USER, common::PASSWORD),
        &[],
        4,
        50,
        &[120, 1200],
    );
}

/// The configuration of every coturn tutorial (listening-ip, external-ip PUBLIC/PRIVATE,
/// min/max port, verbose, fingerprint, lt-cred-mech, realm, user=someId:somePasswd), on
/// loopback: migrated, started, and relaying uclient traffic over UDP and TCP.
#[test]
fn tutorial_config_migrates_and_relays() {
    if !tools_available() {
        return;
    }
    let (server, toml) = migrated_server(|port, min, max| {
        format!(
            "# /etc/turnserver.conf\n\
             listening-port={port}\n\
             listening-ip=127.0.0.1\n\
             external-ip=127.0.0.1/127.0.0.1\n\
             min-port={min}\n\
             max-port={max}\n\
             verbose\n\
             fingerprint\n\
             lt-cred-mech\n\
             realm={}\n\
             user=someId:somePasswd\n\
             allow-loopback-peers\n\
             log-file=/var/log/turnserver.log\n",
            common::REALM
        )
    });
    assert!(
        toml.contains("external-ip = \"127.0.0.1/127.0.0.1\""),
        "{toml}"
    );
    assert!(toml.contains("someId = \"somePasswd\""), "{toml}");
    let port = server.port;
    for flags in [&[][..], &["-t"][..]] {
        relay_through(
            &server,
            port,
            ("someId", "somePasswd"),
            flags,
            2,
            50,
            &[120],
        );
    }
}
