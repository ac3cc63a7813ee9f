//! Test harness: starts the real `turnserver` binary (by its cargo path) on loopback with a
//! configuration written for the test, and stops it when dropped.
#![allow(dead_code)]

pub mod browser;
pub mod netns;
pub mod tap;

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

    /// The configuration file the server was started with (rewrite it, then `signal("HUP")`).
    pub fn config_path(&self) -> PathBuf {
        self.dir.join("turnserver.toml")
    }

    /// Sends a signal by name ("HUP", "TERM", "INT") to the server.
    pub fn signal(&self, name: &str) {
        let ok = Command::new("kill")
            .args(["-s", name, &self.child.id().to_string()])
            .status()
            .expect("run kill")
            .success();
        assert!(ok, "kill -s {name} failed");
    }

    /// Waits up to `timeout` for the server to exit; its exit status, or `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits up to `timeout` until the log contains `text`.
    pub fn wait_log(&self, text: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if self.log().contains(text) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
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
    start_with_env(body, &[])
}

/// Like [`start_with`], with extra environment variables for the server process.
pub fn start_with_env(body: &str, env: &[(&str, &str)]) -> TestServer {
    start_custom(
        |port, min_port, max_port| {
            format!(
                "listening-ips = [\"127.0.0.1\"]\nlistening-port = {port}\nmin-port = {min_port}\nmax-port = {max_port}\nrealm = \"{REALM}\"\nlog-level = \"debug\"\n{body}"
            )
        },
        env,
    )
}

/// Starts a server with the whole configuration `make(port, min_port, max_port)` returns, for
/// a free listening port and a relay range of this harness.
pub fn start_custom(make: impl Fn(u16, u16, u16) -> String, env: &[(&str, &str)]) -> TestServer {
    for _ in 0..5 {
        let port = free_port();
        let (min_port, max_port) = relay_range();
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("turnserver-test-{}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let config = make(port, min_port, max_port);
        let path = dir.join("turnserver.toml");
        std::fs::write(&path, &config).unwrap();
        let mut child = Command::new(env!("CARGO_BIN_EXE_turnserver"))
            .arg("--config")
            .arg(&path)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start turnserver");
        let log = capture_stderr(&mut child);
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

/// Whether `name` is an executable file in a directory of `PATH`.
pub fn on_path(name: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::env::var_os("PATH").is_some_and(|path| {
        std::env::split_paths(&path).any(|dir| {
            std::fs::metadata(dir.join(name))
                .is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        })
    })
}

/// True when coturn's `tools` are all installed. Otherwise fails the test when
/// `TURNSERVER_REQUIRE_INTEROP=1`, and returns false after saying what is missing when not.
pub fn coturn_tools(tools: &[&str]) -> bool {
    let missing: Vec<&str> = tools.iter().copied().filter(|t| !on_path(t)).collect();
    if missing.is_empty() {
        return true;
    }
    let what = missing.join(", ");
    if std::env::var("TURNSERVER_REQUIRE_INTEROP").as_deref() == Ok("1") {
        panic!("TURNSERVER_REQUIRE_INTEROP=1 but {what} not installed (apt-get install coturn)");
    }
    eprintln!("skipping: {what} not installed (apt-get install coturn)");
    false
}

/// Collects `child`'s standard error (piped) line by line into a shared string, on a thread.
pub fn capture_stderr(child: &mut Child) -> Arc<Mutex<String>> {
    let log = Arc::new(Mutex::new(String::new()));
    let stderr = child.stderr.take().expect("stderr piped");
    let sink = log.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            let mut l = sink.lock().unwrap();
            l.push_str(&line);
            l.push('\n');
        }
    });
    log
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

/// A port free on 127.0.0.1 for TCP and UDP at the time of asking, other than `not`.
pub fn free_tcp_port(not: u16) -> u16 {
    // Free for UDP too: a TLS port is also the DTLS port.
    loop {
        let port = free_port();
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

/// A minimal TURN client for tests that need exact control over requests: long-term
/// credentials (401, then signed requests with the nonce), over UDP or TCP. Independent
/// clients (the `turn` crate, coturn, Chromium) cover interoperability; this one covers the
/// server's refusals.
pub struct Client {
    conn: ClientConn,
    relayed: Option<SocketAddr>,
    /// The last answer to a request.
    pub last_response: Vec<u8>,
    nonce: Vec<u8>,
    n: u8,
    pub user: String,
    pub password: String,
}

enum ClientConn {
    Udp(UdpSocket, SocketAddr),
    Tcp(std::net::TcpStream),
}

impl Client {
    pub fn udp(server: SocketAddr) -> Client {
        let any = if server.is_ipv4() {
            "127.0.0.1:0"
        } else {
            "[::1]:0"
        };
        let sock = UdpSocket::bind(any).unwrap();
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Client::with(ClientConn::Udp(sock, server))
    }

    /// A UDP client on `sock` (bound by the caller: in a network namespace, say).
    pub fn udp_on(sock: UdpSocket, server: SocketAddr) -> Client {
        sock.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Client::with(ClientConn::Udp(sock, server))
    }

    pub fn tcp(server: SocketAddr) -> Client {
        let s = std::net::TcpStream::connect(server).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        Client::with(ClientConn::Tcp(s))
    }

    fn with(conn: ClientConn) -> Client {
        Client {
            conn,
            relayed: None,
            last_response: Vec::new(),
            nonce: Vec::new(),
            n: 0,
            user: USER.into(),
            password: PASSWORD.into(),
        }
    }

    fn exchange(&mut self, req: &[u8]) -> Vec<u8> {
        use std::io::{Read, Write};
        match &mut self.conn {
            ClientConn::Udp(s, to) => {
                s.send_to(req, *to).unwrap();
                let mut r = vec![0u8; 1500];
                let n = s.recv(&mut r).expect("an answer");
                r.truncate(n);
                r
            }
            ClientConn::Tcp(s) => {
                s.write_all(req).unwrap();
                let mut hdr = [0u8; 20];
                s.read_exact(&mut hdr).expect("an answer");
                let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
                let mut r = hdr.to_vec();
                r.resize(20 + len, 0);
                s.read_exact(&mut r[20..]).unwrap();
                r
            }
        }
    }

    /// Sends a request (signed once a nonce is known; a 401 or 438 is retried once with the
    /// new nonce) and returns the error code of the answer, `None` for success.
    pub fn request(
        &mut self,
        method: turnserver::wire::Method,
        add: impl Fn(&mut turnserver::wire::MessageWriter),
    ) -> Option<u16> {
        use turnserver::wire::{AttrType, Class, MessageRef, MessageWriter, TransactionId};
        let key = turnserver::auth::long_term_key(&self.user, REALM, &self.password);
        let mut code = None;
        for _ in 0..2 {
            self.n = self.n.wrapping_add(1);
            let mut buf = vec![0u8; 512];
            let mut w = MessageWriter::new(
                &mut buf,
                method,
                Class::Request,
                &TransactionId([self.n; 12]),
            );
            add(&mut w);
            if !self.nonce.is_empty() {
                w.add(AttrType::USERNAME, self.user.as_bytes())
                    .add(AttrType::REALM, REALM.as_bytes())
                    .add(AttrType::NONCE, &self.nonce)
                    .add_integrity(&key);
            }
            let n = w.finish().unwrap();
            let r = self.exchange(&buf[..n]);
            self.last_response = r.clone();
            let m = MessageRef::parse(&r).expect("a STUN answer");
            assert_eq!(m.transaction_id().0, [self.n; 12]);
            code = m.error_code().unwrap().map(|(c, _)| c);
            if let Ok(Some(relayed)) = m.xor_address(AttrType::XOR_RELAYED_ADDRESS) {
                self.relayed = Some(relayed);
            }
            let had_nonce = !self.nonce.is_empty();
            if let Ok(Some(nonce)) = m.nonce() {
                self.nonce = nonce.to_vec();
            }
            let retry = code == Some(438) || (code == Some(401) && !had_nonce);
            if !retry {
                break;
            }
        }
        code
    }

    /// Sends raw bytes (a ChannelData frame, say) to the server.
    pub fn send_raw(&mut self, bytes: &[u8]) {
        use std::io::Write;
        match &mut self.conn {
            ClientConn::Udp(s, to) => {
                s.send_to(bytes, *to).unwrap();
            }
            ClientConn::Tcp(s) => s.write_all(bytes).unwrap(),
        }
    }

    /// Receives one datagram (UDP) or frame (TCP) from the server within `timeout`.
    pub fn recv_raw(&mut self, timeout: Duration) -> Option<Vec<u8>> {
        use std::io::Read;
        use turnserver::wire::{Frame, frame_len};
        match &mut self.conn {
            ClientConn::Udp(s, _) => {
                s.set_read_timeout(Some(timeout)).unwrap();
                let mut r = vec![0u8; 65_536];
                let n = s.recv(&mut r).ok()?;
                r.truncate(n);
                Some(r)
            }
            ClientConn::Tcp(s) => {
                s.set_read_timeout(Some(timeout)).unwrap();
                let mut r = vec![0u8; 4];
                s.read_exact(&mut r).ok()?;
                loop {
                    match frame_len(&r) {
                        Frame::Complete(n) => {
                            r.truncate(n);
                            return Some(r);
                        }
                        Frame::Incomplete(need) => {
                            let have = r.len();
                            r.resize(need, 0);
                            s.read_exact(&mut r[have..]).ok()?;
                        }
                        Frame::Invalid => return None,
                    }
                }
            }
        }
    }

    /// The relayed address of the last successful Allocate.
    pub fn relayed(&self) -> Option<SocketAddr> {
        self.relayed
    }

    /// Allocate with REQUESTED-TRANSPORT UDP and, if given, REQUESTED-ADDRESS-FAMILY.
    pub fn allocate(&mut self, family: Option<u8>) -> Option<u16> {
        use turnserver::wire::{AttrType, Method, PROTO_UDP};
        self.request(Method::ALLOCATE, |w| {
            w.add_u32(AttrType::REQUESTED_TRANSPORT, (PROTO_UDP as u32) << 24);
            if let Some(f) = family {
                w.add_u32(AttrType::REQUESTED_ADDRESS_FAMILY, (f as u32) << 24);
            }
        })
    }

    /// CreatePermission for one peer.
    pub fn permit(&mut self, peer: SocketAddr) -> Option<u16> {
        use turnserver::wire::{AttrType, Method};
        self.request(Method::CREATE_PERMISSION, |w| {
            w.add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        })
    }

    /// ChannelBind of `number` to one peer.
    pub fn bind(&mut self, number: u16, peer: SocketAddr) -> Option<u16> {
        use turnserver::wire::{AttrType, Method};
        self.request(Method::CHANNEL_BIND, |w| {
            w.add_u32(AttrType::CHANNEL_NUMBER, (number as u32) << 16)
                .add_xor_address(AttrType::XOR_PEER_ADDRESS, peer);
        })
    }
}

/// A ChannelData frame on channel `number` (padded to four bytes, as stream transports need).
pub fn channel_data(number: u16, payload: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(4 + payload.len() + 3);
    f.extend_from_slice(&number.to_be_bytes());
    f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    f.extend_from_slice(payload);
    while f.len() % 4 != 0 {
        f.push(0);
    }
    f
}

/// `GET path` over HTTP/1.1 from 127.0.0.1:`port`: the status code and the body.
pub fn http_get(port: u16, path: &str) -> (u16, String) {
    let (head, body) = http_get_head(port, path);
    let status = head
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .expect("a status line");
    (status, body)
}

/// `GET path` over HTTP/1.1 from 127.0.0.1:`port`: the response head (status line and
/// headers) and the body.
pub fn http_get_head(port: u16, path: &str) -> (String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).expect("http connect");
    s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n").unwrap();
    let mut response = String::new();
    s.read_to_string(&mut response).expect("http response");
    let (head, body) = response
        .split_once("\r\n\r\n")
        .unwrap_or_else(|| panic!("no end of head in {response:?}"));
    (head.to_owned(), body.to_owned())
}

/// The value of the sample `name{labels}` (or `name` alone) in a Prometheus exposition.
pub fn metric(text: &str, sample: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        l.strip_prefix(sample)?
            .strip_prefix(' ')?
            .trim()
            .parse()
            .ok()
    })
}

/// A Binding request with transaction ID `[id; 12]`.
pub fn binding_request(id: u8) -> Vec<u8> {
    use turnserver::wire::{Class, MessageWriter, Method, TransactionId};
    let mut buf = vec![0u8; 64];
    let n = MessageWriter::new(
        &mut buf,
        Method::BINDING,
        Class::Request,
        &TransactionId([id; 12]),
    )
    .finish()
    .unwrap();
    buf.truncate(n);
    buf
}
