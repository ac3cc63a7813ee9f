//! TURN over TLS: handshakes with a client that checks the certificate (IP SAN 127.0.0.1,
//! signed by a throw-away CA), STUN over the TLS stream, TLS 1.2 and 1.3, certificate reload
//! on SIGHUP without dropping established connections, and refusal to start without the files.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::time::timeout;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use turnserver::wire::{AttrType, Class, MessageRef};

use common::{TempDir, TestCerts};

const NET: Duration = Duration::from_secs(5);

fn connector(
    ca: &std::path::Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> TlsConnector {
    let mut roots = rustls::RootCertStore::empty();
    for c in CertificateDer::pem_file_iter(ca).unwrap() {
        roots.add(c.unwrap()).unwrap();
    }
    let cfg = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_protocol_versions(versions)
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    TlsConnector::from(Arc::new(cfg))
}

async fn connect(
    port: u16,
    ca: &std::path::Path,
    versions: &[&'static rustls::SupportedProtocolVersion],
) -> std::io::Result<TlsStream<TcpStream>> {
    let tcp = timeout(NET, TcpStream::connect(("127.0.0.1", port))).await??;
    let name = ServerName::IpAddress("127.0.0.1".parse::<std::net::IpAddr>().unwrap().into());
    timeout(NET, connector(ca, versions).connect(name, tcp)).await?
}

/// Sends a Binding request on the stream and returns the reflexive address of the answer.
async fn binding(s: &mut TlsStream<TcpStream>, id: u8) -> SocketAddr {
    s.write_all(&common::binding_request(id)).await.unwrap();
    let mut hdr = [0u8; 20];
    timeout(NET, s.read_exact(&mut hdr)).await.unwrap().unwrap();
    let len = u16::from_be_bytes([hdr[2], hdr[3]]) as usize;
    let mut msg = hdr.to_vec();
    msg.resize(20 + len, 0);
    timeout(NET, s.read_exact(&mut msg[20..]))
        .await
        .unwrap()
        .unwrap();
    let m = MessageRef::parse(&msg).unwrap();
    assert_eq!(m.class(), Class::Success);
    assert_eq!(m.transaction_id().0, [id; 12]);
    m.xor_address(AttrType::XOR_MAPPED_ADDRESS)
        .unwrap()
        .unwrap()
}

fn peer_cert(s: &TlsStream<TcpStream>) -> Vec<u8> {
    s.get_ref().1.peer_certificates().unwrap()[0].to_vec()
}

#[tokio::test]
async fn stun_over_tls_1_3_and_1_2_with_a_verified_certificate() {
    let dir = TempDir::new("tls");
    let certs = TestCerts::generate(&dir.0, "a");
    let (server, port) = common::start_tls(&certs, "");
    for versions in [
        &[&rustls::version::TLS13][..],
        &[&rustls::version::TLS12][..],
    ] {
        let mut s = connect(port, &certs.ca, versions).await.expect("handshake");
        let v = s.get_ref().1.protocol_version().unwrap();
        assert_eq!(v, versions[0].version);
        assert_eq!(peer_cert(&s), certs.cert_der);
        let local = s.get_ref().0.local_addr().unwrap();
        assert_eq!(binding(&mut s, 1).await, local);
        // Two requests in one write, answered in order.
        let mut two = common::binding_request(2);
        two.extend_from_slice(&common::binding_request(3));
        s.write_all(&two).await.unwrap();
        let mut buf = vec![0u8; 2048];
        let mut got = Vec::new();
        let mut have = 0;
        while got.len() < 2 {
            let n = timeout(NET, s.read(&mut buf[have..]))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0);
            have += n;
            while have >= 20 {
                let len = 20 + u16::from_be_bytes([buf[2], buf[3]]) as usize;
                if have < len {
                    break;
                }
                got.push(MessageRef::parse(&buf[..len]).unwrap().transaction_id().0[0]);
                buf.copy_within(len..have, 0);
                have -= len;
            }
        }
        assert_eq!(got, [2, 3]);
    }
    // A client that does not trust the CA is refused by its own check; the server goes on.
    let other = TestCerts::generate(&dir.0, "other");
    assert!(
        connect(port, &other.ca, &[&rustls::version::TLS13])
            .await
            .is_err()
    );
    // Plain TURN on the TLS port: the handshake fails, the server goes on.
    let mut plain = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    plain.write_all(&common::binding_request(9)).await.unwrap();
    let mut b = [0u8; 64];
    let n = timeout(NET, plain.read(&mut b)).await.unwrap().unwrap_or(0);
    assert!(n == 0 || b[0] == 0x15, "closed or a TLS alert, not STUN");
    let mut s = connect(port, &certs.ca, &[&rustls::version::TLS13])
        .await
        .unwrap();
    binding(&mut s, 4).await;
    assert!(server.wait_log("transport=\"tls\"", Duration::from_secs(3)));
}

#[tokio::test]
async fn certificate_reload_on_sighup_keeps_established_connections() {
    let dir = TempDir::new("tls-reload");
    let first = TestCerts::generate(&dir.0, "first");
    let (server, port) = common::start_tls(&first, "");
    let mut old = connect(port, &first.ca, &[&rustls::version::TLS13])
        .await
        .unwrap();
    assert_eq!(peer_cert(&old), first.cert_der);
    binding(&mut old, 1).await;

    // Renew: new CA, new key, written over the same paths.
    let second = TestCerts::generate(&dir.0, "second");
    std::fs::copy(&second.cert, &first.cert).unwrap();
    std::fs::copy(&second.key, &first.key).unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut reloaded = false;
    for _ in 0..50 {
        if server.log().contains("tls certificate reloaded") {
            reloaded = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(reloaded, "{}", server.log());
    let mut new = connect(port, &second.ca, &[&rustls::version::TLS13])
        .await
        .unwrap();
    assert_eq!(peer_cert(&new), second.cert_der);
    binding(&mut new, 2).await;
    // The connection made before the reload still works.
    binding(&mut old, 3).await;

    // A broken file is not loaded: the server keeps the current certificate.
    std::fs::write(&first.key, "not a key").unwrap();
    let hup = std::process::Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(hup.success());
    let mut refused = false;
    for _ in 0..50 {
        if server.log().contains("tls certificate not reloaded") {
            refused = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(refused, "{}", server.log());
    let mut after = connect(port, &second.ca, &[&rustls::version::TLS13])
        .await
        .unwrap();
    assert_eq!(peer_cert(&after), second.cert_der);
    binding(&mut after, 4).await;
}

#[test]
fn missing_or_mismatched_certificate_refuses_start() {
    let dir = TempDir::new("tls-bad");
    let a = TestCerts::generate(&dir.0, "a");
    let b = TestCerts::generate(&dir.0, "b");
    let missing = dir.0.join("missing.pem");
    let cases = [
        (
            missing.clone(),
            a.key.clone(),
            missing.display().to_string(),
        ),
        (a.cert.clone(), b.key.clone(), "does not match".to_string()),
        (a.key.clone(), a.key.clone(), a.key.display().to_string()),
    ];
    for (cert, key, needle) in cases {
        let config = dir.0.join("bad.toml");
        std::fs::write(
            &config,
            format!(
                "listening-ips = [\"127.0.0.1\"]\nlistening-port = {}\ntls-listening-port = {}\ncert = \"{}\"\npkey = \"{}\"\n[users]\na = \"b\"\n",
                common::free_tcp_port(0),
                common::free_tcp_port(0),
                cert.display(),
                key.display()
            ),
        )
        .unwrap();
        for check in [true, false] {
            let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_turnserver"));
            if check {
                cmd.arg("--check-config");
            }
            let out = cmd.arg("--config").arg(&config).output().unwrap();
            assert_eq!(out.status.code(), Some(1), "{out:?}");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(err.contains(&needle), "{needle:?} not in {err}");
        }
    }
}

/// Operators put `turns:` on 443. Where this test may bind it (root, or the capability) and
/// the port is free, the server serves TLS there; elsewhere it says why it skipped.
#[tokio::test]
async fn tls_on_port_443() {
    if std::net::TcpListener::bind("127.0.0.1:443").is_err() {
        eprintln!("skipping: cannot bind 127.0.0.1:443 here (not root, or in use)");
        return;
    }
    let dir = TempDir::new("tls-443");
    let certs = TestCerts::generate(&dir.0, "443");
    let server = common::start(&format!(
        "tls-listening-port = 443\ncert = \"{}\"\npkey = \"{}\"\n",
        certs.cert.display(),
        certs.key.display()
    ));
    assert!(
        server
            .log()
            .contains("listener=127.0.0.1:443 transport=\"tls\"")
    );
    let mut s = connect(443, &certs.ca, &[&rustls::version::TLS13])
        .await
        .unwrap();
    let local = s.get_ref().0.local_addr().unwrap();
    assert_eq!(binding(&mut s, 1).await, local);
}
