//! Certificates for TLS ("turns:" URLs) and DTLS: loading the chain and key named by `cert` and
//! `pkey`, and swapping them for new handshakes when they change.
//!
//! The server configuration uses rustls with the ring provider: TLS 1.3 and 1.2, AEAD cipher
//! suites only (AES-GCM, ChaCha20-Poly1305), no client certificates. Certificates are resolved
//! per handshake from a [`CertStore`], so a reload affects new connections only; established
//! ones keep the keys they negotiated.

use std::fmt;
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::SystemTime;

use rustls::crypto::ring;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tracing::{info, warn};

use crate::config::TlsFiles;

/// Reads the PEM certificate chain and private key named by `cert` and `pkey`. Errors name
/// the file at fault.
pub fn read_pem(
    files: &TlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), String> {
    let cert_name = files.cert.display();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&files.cert)
        .map_err(|e| format!("cert {cert_name}: {e}"))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("cert {cert_name}: {e}"))?;
    if certs.is_empty() {
        return Err(format!("cert {cert_name}: no certificate in the file"));
    }
    let key = PrivateKeyDer::from_pem_file(&files.pkey)
        .map_err(|e| format!("pkey {}: {e}", files.pkey.display()))?;
    Ok((certs, key))
}

/// Reads a certificate chain and its private key, checking that they belong together. Errors
/// name the file at fault.
pub fn load(files: &TlsFiles) -> Result<CertifiedKey, String> {
    let cert_name = files.cert.display();
    let key_name = files.pkey.display();
    let (certs, key) = read_pem(files)?;
    let provider = ring::default_provider();
    let signer = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| format!("pkey {key_name}: {e}"))?;
    let ck = CertifiedKey::new(certs, signer);
    ck.keys_match()
        .map_err(|e| format!("pkey {key_name} does not match cert {cert_name}: {e}"))?;
    Ok(ck)
}

/// What one load of the files gives: the rustls key and the DTLS certificate, as configured.
type Loaded = (
    Option<Arc<CertifiedKey>>,
    Option<::dtls::crypto::Certificate>,
);

/// The current certificate, for TLS and for DTLS as configured, replaced on reload.
pub struct CertStore {
    files: TlsFiles,
    /// The rustls key, when TLS is on.
    current: RwLock<Option<Arc<CertifiedKey>>>,
    /// The DTLS certificate, when DTLS is on.
    dtls: RwLock<Option<::dtls::crypto::Certificate>>,
    /// Modification times of (cert, pkey) when last loaded.
    stamps: Mutex<(Option<SystemTime>, Option<SystemTime>)>,
}

impl fmt::Debug for CertStore {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("CertStore")
            .field("files", &self.files)
            .finish()
    }
}

fn mtime(p: &Path) -> Option<SystemTime> {
    std::fs::metadata(p).and_then(|m| m.modified()).ok()
}

impl CertStore {
    /// Loads the files for TLS (`tls`), DTLS (`dtls`) or both; errors name the file.
    pub fn new(files: TlsFiles, tls: bool, dtls: bool) -> Result<Arc<Self>, String> {
        let store = CertStore {
            stamps: Mutex::new((mtime(&files.cert), mtime(&files.pkey))),
            current: RwLock::new(None),
            dtls: RwLock::new(None),
            files,
        };
        let (key, cert) = store.load_both(tls, dtls)?;
        *store
            .current
            .write()
            .unwrap_or_else(PoisonError::into_inner) = key;
        *store.dtls.write().unwrap_or_else(PoisonError::into_inner) = cert;
        Ok(Arc::new(store))
    }

    fn load_both(&self, tls: bool, dtls: bool) -> Result<Loaded, String> {
        let key = if tls {
            Some(Arc::new(load(&self.files)?))
        } else {
            None
        };
        let cert = if dtls {
            Some(super::dtls::load(&self.files)?)
        } else {
            None
        };
        Ok((key, cert))
    }

    /// Loads the files again; on failure the current certificates stay and the error is
    /// returned. Both TLS and DTLS change, or neither.
    pub fn reload(&self) -> Result<(), String> {
        let stamps = (mtime(&self.files.cert), mtime(&self.files.pkey));
        let tls = self
            .current
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        let dtls = self
            .dtls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some();
        let (key, cert) = self.load_both(tls, dtls)?;
        *self.current.write().unwrap_or_else(PoisonError::into_inner) = key;
        *self.dtls.write().unwrap_or_else(PoisonError::into_inner) = cert;
        *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) = stamps;
        Ok(())
    }

    /// The DTLS server configuration with the current certificate, if DTLS is on.
    pub fn dtls_config(&self) -> Option<::dtls::config::Config> {
        let cert = self
            .dtls
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()?;
        Some(super::dtls::server_config(cert))
    }

    /// Reloads if either file's modification time changed since the last load.
    pub fn reload_if_changed(&self) {
        let now = (mtime(&self.files.cert), mtime(&self.files.pkey));
        let last = *self.stamps.lock().unwrap_or_else(PoisonError::into_inner);
        if now != last {
            self.reload_logged("files changed");
        }
    }

    /// Reloads and logs the outcome.
    pub fn reload_logged(&self, why: &str) {
        match self.reload() {
            Ok(()) => info!(cert = %self.files.cert.display(), why, "tls certificate reloaded"),
            Err(e) => {
                // Remember the stamps anyway so that a broken file is reported once, not on
                // every check; fixing the file changes them again.
                *self.stamps.lock().unwrap_or_else(PoisonError::into_inner) =
                    (mtime(&self.files.cert), mtime(&self.files.pkey));
                warn!(error = %e, why, "tls certificate not reloaded; keeping the current one");
            }
        }
    }

    /// The rustls server configuration resolving certificates from this store.
    pub fn server_config(self: &Arc<Self>) -> Result<Arc<rustls::ServerConfig>, String> {
        let cfg = rustls::ServerConfig::builder_with_provider(Arc::new(ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
            .map_err(|e| e.to_string())?
            .with_no_client_auth()
            .with_cert_resolver(self.clone());
        Ok(Arc::new(cfg))
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}
