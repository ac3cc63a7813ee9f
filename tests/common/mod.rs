//! Test harness: starts the real `turnserver` binary (by its cargo path) on loopback with a
//! configuration written for the test, and stops it when dropped.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::{SocketAddr, TcpListener, UdpSocket};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub const USER: &str = "alice";
pub const PASSWORD: &str = "wonderland";
pub const REALM: &str = "test.local";

/// A running server.
pub struct TestServer {
    child: Child,
    dir: PathBuf,
    /// The listening port (UDP and TCP).
    pub port: u16,
    pub min_port: u16,
    pub max_port: u16,
    log: Arc<Mutex<String>>,
}

impl TestServer {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// The server's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything the server logged so far.
    pub fn log(&self) -> String {
        self.log.lock().unwrap().clone()
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

static NEXT: AtomicU16 = AtomicU16::new(0);

/// A port free on 127.0.0.1 for both UDP and TCP at the time of asking.
fn free_port() -> u16 {
    loop {
        let udp = UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = udp.local_addr().unwrap().port();
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

/// A relay range of 200 ports for this server, spread by process and call so that servers of
/// tests running in parallel rarely share ports (a taken port is skipped anyway).
fn relay_range() -> (u16, u16) {
    let n = NEXT.fetch_add(1, Ordering::Relaxed) as u32;
    let slot = (std::process::id().wrapping_mul(7919).wrapping_add(n * 31)) % 60;
    let min = 50000 + (slot * 200) as u16;
    (min, min + 199)
}

/// Starts a server with the standard test user and loopback peers allowed. `extra` is
/// appended to the configuration (top-level keys only; add tables after it).
pub fn start(extra: &str) -> TestServer {
    start_with(&format!(
        "allow-loopback-peers = true\n{extra}\n[users]\n{USER} = \"{PASSWORD}\"\n"
    ))
}

/// Starts a server with the listening and relay settings filled in and `body` after them.
pub fn start_with(body: &str) -> TestServer {
    for _ in 0..5 {
        let port = free_port();
        let (min_port, max_port) = relay_range();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("turnserver-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "listening-ips = [\"127.0.0.1\"]\nlistening-port = {port}\nmin-port = {min_port}\nmax-port = {max_port}\nrealm = \"{REALM}\"\nlog-level = \"debug\"\n{body}"
        );
        let path = dir.join("turnserver.toml");
        std::fs::write(&path, &config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_turnserver"))
            .arg("--config")
            .arg(&path)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start turnserver");
        let log = Arc::new(Mutex::new(String::new()));
        let stderr = child.stderr.take().unwrap();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                let mut l = sink.lock().unwrap();
                l.push_str(&line);
                l.push('\n');
            }
        });
        let server = TestServer {
            child,
            dir,
            port,
            min_port,
            max_port,
            log,
        };
        if wait_ready(&server) {
            return server;
        }
        eprintln!("server did not start, retrying; log:\n{}", server.log());
    }
    panic!("turnserver did not start");
}

/// Waits until the server logs that it relays (every listener is bound by then).
fn wait_ready(s: &TestServer) -> bool {
    let deadline = Instant::now() + Duration::from_secs(10);
    while Instant::now() < deadline {
        if s.log().contains("relay ports") {
            return true;
        }
        if s.log().contains("ERROR") || s.log().contains("invalid configuration") {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    false
}

/// A UDP echo peer on 127.0.0.1: returns its address; echoes every datagram back to its
/// sender until `count` datagrams were echoed or `timeout` passed with nothing received.
pub fn udp_echo_peer(count: usize, timeout: Duration) -> SocketAddr {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(timeout)).unwrap();
    let addr = sock.local_addr().unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        for _ in 0..count {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let _ = sock.send_to(&buf[..n], from);
                }
                Err(_) => return,
            }
        }
    });
    addr
}

/// A throw-away CA and a server certificate it signed, for 127.0.0.1 (IP SAN) and localhost,
/// written as PEM files into `dir`.
pub struct TestCerts {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    /// The server certificate in DER, to recognise it on the wire.
    pub cert_der: Vec<u8>,
}

impl TestCerts {
    pub fn generate(dir: &std::path::Path, tag: &str) -> TestCerts {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, IsCa, Issuer, KeyPair, KeyUsagePurpose,
            SanType,
        };
        std::fs::create_dir_all(dir).unwrap();
        let ca_key = KeyPair::generate().unwrap();
        let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca.distinguished_name
            .push(DnType::CommonName, format!("turnserver test CA {tag}"));
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca_cert = ca.self_signed(&ca_key).unwrap();
        let issuer = Issuer::new(ca, ca_key);
        let key = KeyPair::generate().unwrap();
        let mut leaf = CertificateParams::new(vec!["localhost".to_string()]).unwrap();
        leaf.subject_alt_names
            .push(SanType::IpAddress("127.0.0.1".parse().unwrap()));
        leaf.distinguished_name
            .push(DnType::CommonName, format!("turnserver test {tag}"));
        let cert = leaf.signed_by(&key, &issuer).unwrap();
        let paths = TestCerts {
            ca: dir.join(format!("ca-{tag}.pem")),
            cert: dir.join(format!("cert-{tag}.pem")),
            key: dir.join(format!("key-{tag}.pem")),
            cert_der: cert.der().to_vec(),
        };
        std::fs::write(&paths.ca, ca_cert.pem()).unwrap();
        std::fs::write(&paths.cert, cert.pem()).unwrap();
        std::fs::write(&paths.key, key.serialize_pem()).unwrap();
        paths
    }
}

/// A directory for test files that is removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let p = std::env::temp_dir().join(format!("turnserver-{tag}-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A port free on 127.0.0.1 for TCP at the time of asking, other than `not`.
pub fn free_tcp_port(not: u16) -> u16 {
    loop {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = l.local_addr().unwrap().port();
        if port != not {
            return port;
        }
    }
}

/// Starts a server with TLS on a free port using `certs`; returns it and the TLS port.
pub fn start_tls(certs: &TestCerts, extra: &str) -> (TestServer, u16) {
    for _ in 0..5 {
        let tls_port = free_tcp_port(0);
        let server = start(&format!(
            "tls-listening-port = {tls_port}\ncert = \"{}\"\npkey = \"{}\"\n{extra}",
            certs.cert.display(),
            certs.key.display()
        ));
        if server.log().contains(&format!("127.0.0.1:{tls_port}")) {
            return (server, tls_port);
        }
    }
    panic!("could not start a TLS server");
}
