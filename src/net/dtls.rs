//! TURN over DTLS (RFC 7350): DTLS 1.2 on UDP `tls-listening-port`, one DTLS association per
//! client address, each record carrying one STUN message or ChannelData message.
//!
//! The DTLS protocol comes from the `dtls` crate (webrtc-rs). Its own listener completes each
//! handshake inside `accept`, one client at a time, so a client that stalls its handshake would
//! hold up every other; here the inner UDP listener hands out per-address connections and each
//! handshake runs in its own task, bounded in time. Associations idle for longer than the
//! longest allocation lifetime are closed. DTLS is not on the zero-allocation path: the crate
//! allocates per record.

use std::cell::{Cell, RefCell};
use std::net::SocketAddr;
use std::pin::Pin;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use dtls::cipher_suite::CipherSuiteId;
use dtls::config::{Config as DtlsConfig, ExtendedMasterSecretType};
use dtls::conn::DTLSConn;
use dtls::crypto::{Certificate, CryptoPrivateKey, CryptoPrivateKeyKind};
use ring::signature::{ECDSA_P256_SHA256_ASN1_SIGNING, EcdsaKeyPair, Ed25519KeyPair};
use rustls::pki_types::PrivateKeyDer;
use tokio::sync::Notify;
use tracing::{debug, warn};
use webrtc_util::conn::conn_udp_listener::ListenConfig;
use webrtc_util::conn::{Conn, Listener};

use super::tls::CertStore;
use super::{Driver, bump};
use crate::config::TlsFiles;
use crate::core::{ClientId, Transport};

/// A DTLS handshake must finish within this time.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Datagrams a connection may have queued for sending; more are dropped.
const MAX_QUEUED: usize = 256 * 1024;

/// Reads the certificate chain and key for DTLS; errors name the file. The key must be
/// PKCS#8 (ECDSA P-256 or Ed25519) or RSA (PKCS#8 or PKCS#1).
pub fn load(files: &TlsFiles) -> Result<Certificate, String> {
    let key_name = files.pkey.display();
    let (certificate, key) = super::tls::read_pem(files)?;
    let der = key.secret_der().to_vec();
    let rng = ring::rand::SystemRandom::new();
    let kind = match &key {
        PrivateKeyDer::Pkcs8(_) => {
            if let Ok(k) = EcdsaKeyPair::from_pkcs8(&ECDSA_P256_SHA256_ASN1_SIGNING, &der, &rng) {
                CryptoPrivateKeyKind::Ecdsa256(k)
            } else if let Ok(k) = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der) {
                CryptoPrivateKeyKind::Ed25519(k)
            } else if let Ok(k) = ring::rsa::KeyPair::from_pkcs8(&der) {
                CryptoPrivateKeyKind::Rsa256(k)
            } else {
                return Err(format!(
                    "pkey {key_name}: DTLS needs an ECDSA P-256, Ed25519 or RSA key"
                ));
            }
        }
        PrivateKeyDer::Pkcs1(_) => CryptoPrivateKeyKind::Rsa256(
            ring::rsa::KeyPair::from_der(&der).map_err(|e| format!("pkey {key_name}: {e}"))?,
        ),
        _ => {
            return Err(format!(
                "pkey {key_name}: DTLS needs the key in PKCS#8 (\"BEGIN PRIVATE KEY\") or PKCS#1 \
                 form; convert it with `openssl pkcs8 -topk8 -nocrypt`"
            ));
        }
    };
    Ok(Certificate {
        certificate,
        private_key: CryptoPrivateKey {
            kind,
            serialized_der: der,
        },
    })
}

/// The DTLS server configuration: ECDHE with AES-GCM (or ChaCha20-Poly1305), extended master
/// secret required, no client certificates.
pub fn server_config(cert: Certificate) -> DtlsConfig {
    DtlsConfig {
        certificates: vec![cert],
        cipher_suites: vec![
            CipherSuiteId::Tls_Ecdhe_Ecdsa_With_Aes_128_Gcm_Sha256,
            CipherSuiteId::Tls_Ecdhe_Rsa_With_Aes_128_Gcm_Sha256,
            CipherSuiteId::Tls_Ecdhe_Ecdsa_With_ChaCha20_Poly1305_Sha256,
            CipherSuiteId::Tls_Ecdhe_Rsa_With_ChaCha20_Poly1305_Sha256,
        ],
        extended_master_secret: ExtendedMasterSecretType::Require,
        ..Default::default()
    }
}

/// The sending side of one DTLS association: whole datagrams, each prefixed by its length in
/// the queue, sent by the connection's writer task.
pub struct DtlsConn {
    queue: RefCell<Vec<u8>>,
    notify: Notify,
    closed: Cell<bool>,
    dropped: Cell<u64>,
}

impl DtlsConn {
    /// Queues one datagram; dropped (and counted) when the queue is full. Returns whether it
    /// was queued.
    pub fn send(&self, datagram: &[u8]) -> bool {
        let mut q = self.queue.borrow_mut();
        if self.closed.get() || q.len() + datagram.len() + 2 > MAX_QUEUED {
            self.dropped.set(self.dropped.get() + 1);
            return false;
        }
        q.extend_from_slice(&(datagram.len() as u16).to_be_bytes());
        q.extend_from_slice(datagram);
        self.notify.notify_one();
        true
    }

    /// Stops sending.
    pub(super) fn close(&self) {
        self.closed.set(true);
        self.notify.notify_one();
    }
}

/// Whether a first datagram from an unknown address may start an association: it must be a
/// DTLS handshake record (content type 22).
fn handshake_filter(packet: &[u8]) -> Pin<Box<dyn std::future::Future<Output = bool> + Send>> {
    let ok = packet.first() == Some(&22);
    Box::pin(async move { ok })
}

/// Accepts DTLS associations on `local` until the task is aborted. Each handshake uses the
/// certificate current in `certs` when it starts.
pub(super) async fn accept_loop(
    driver: Rc<Driver>,
    local: SocketAddr,
    idx: usize,
    certs: Arc<CertStore>,
) {
    let listener = match (ListenConfig {
        accept_filter: Some(Box::new(handshake_filter)),
        ..Default::default()
    })
    .listen(local)
    .await
    {
        Ok(l) => Arc::new(l),
        Err(e) => {
            warn!(%local, error = %e, "cannot listen on dtls");
            return;
        }
    };
    loop {
        match listener.accept().await {
            Ok((conn, remote)) => {
                let client = ClientId {
                    transport: Transport::Dtls,
                    remote,
                    local,
                };
                let Some(config) = certs.dtls_config() else {
                    return;
                };
                bump(&driver.listeners[idx].accepted, 1);
                let idle = driver.idle_with_allocation.get();
                tokio::task::spawn_local(association(
                    driver.clone(),
                    conn,
                    client,
                    idx,
                    config,
                    idle,
                ));
            }
            Err(e) => {
                warn!(%local, error = %e, "dtls listener stopped");
                return;
            }
        }
    }
}

async fn association(
    driver: Rc<Driver>,
    conn: Arc<dyn Conn + Send + Sync>,
    client: ClientId,
    listener: usize,
    config: DtlsConfig,
    idle: Duration,
) {
    let dtls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        DTLSConn::new(conn.clone(), config, false, None),
    )
    .await
    {
        Ok(Ok(d)) => Arc::new(d),
        Ok(Err(e)) => {
            debug!(%client, error = %e, "dtls handshake failed");
            let _ = conn.close().await;
            return;
        }
        Err(_) => {
            debug!(%client, "dtls handshake timed out");
            let _ = conn.close().await;
            return;
        }
    };
    let out = Rc::new(DtlsConn {
        queue: RefCell::new(Vec::new()),
        notify: Notify::new(),
        closed: Cell::new(false),
        dropped: Cell::new(0),
    });
    let key = (client.remote, client.local);
    driver.dtls.borrow_mut().insert(key, out.clone());
    let writer_task = tokio::task::spawn_local(writer(dtls.clone(), out.clone()));
    let open = &driver.open[Transport::Dtls as usize];
    bump(open, 1);
    debug!(%client, "dtls association opened");

    let mut buf = vec![0u8; 65_536];
    let reason = loop {
        match tokio::time::timeout(idle, dtls.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                driver.listeners[listener].count(n);
                let now = Instant::now();
                let mut bufs = driver.bufs.borrow_mut();
                driver.frame_input(now, client, &buf[..n], &mut bufs, |r| {
                    out.send(r);
                });
                driver.flush(&mut bufs.out);
            }
            Ok(Err(_)) => break "closed",
            Err(_) => break "idle",
        }
        if out.closed.get() {
            break "write failed";
        }
    };

    open.set(open.get().saturating_sub(1));
    debug!(%client, reason, dropped = out.dropped.get(), "dtls association closed");
    out.closed.set(true);
    out.notify.notify_one();
    writer_task.abort();
    driver.dtls.borrow_mut().remove(&key);
    {
        let mut relays = driver.relays.borrow_mut();
        driver
            .server
            .borrow_mut()
            .handle_client_closed(client, &mut *relays);
    }
    let _ = tokio::time::timeout(Duration::from_secs(1), dtls.close()).await;
}

/// Sends queued datagrams, each as its own DTLS record.
async fn writer(dtls: Arc<DTLSConn>, out: Rc<DtlsConn>) {
    let mut chunk = Vec::new();
    loop {
        out.notify.notified().await;
        while !out.closed.get() && !out.queue.borrow().is_empty() {
            std::mem::swap(&mut chunk, &mut *out.queue.borrow_mut());
            let mut rest = &chunk[..];
            while rest.len() >= 2 {
                let n = u16::from_be_bytes([rest[0], rest[1]]) as usize;
                let Some(datagram) = rest.get(2..2 + n) else {
                    break;
                };
                if dtls.send(datagram).await.is_err() {
                    out.closed.set(true);
                    return;
                }
                rest = &rest[2 + n..];
            }
            chunk.clear();
        }
        if out.closed.get() {
            return;
        }
    }
}
