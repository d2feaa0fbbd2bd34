//! TLS on the listener: rustls with certificate and key files from config,
//! optional client-certificate verification (mTLS), and reload without a
//! restart.
//!
//! The whole rustls `ServerConfig` is rebuilt on a change and swapped in:
//! each new connection takes the current one, connections already open keep
//! theirs. The files (certificate chain, key, client CA) are checked every
//! `tls.reload_interval` (their modification time and size) and at SIGHUP;
//! a change that does not load (a missing file, a key that does not match
//! the certificate, a half-written file) is logged as an error and the
//! previous configuration stays in use. A file that stays bad is reported
//! once, not at every check.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::server::WebPkiClientVerifier;
use rustls::{RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Whether a client must present a certificate signed by `tls.client_ca`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClientAuth {
    /// A client may present a certificate; if it does, it must verify.
    Optional,
    /// Every connection must present a certificate that verifies.
    Required,
}

/// The `[tls]` settings.
#[derive(Debug, Clone)]
pub struct TlsSettings {
    /// PEM file: the server certificate, then its intermediates.
    pub cert: PathBuf,
    /// PEM file: the private key (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
    /// PEM file of CA certificates that client certificates must chain to.
    pub client_ca: Option<PathBuf>,
    pub client_auth: ClientAuth,
    /// Bound on a TLS handshake; a connection that has not finished it in
    /// time is closed.
    pub handshake_timeout: Duration,
    /// How often the files are checked for changes.
    pub reload_interval: Duration,
}

/// A certificate, key or CA file that cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {what} {path}: {source}")]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid {what} {path}: {message}")]
    Invalid {
        what: &'static str,
        path: PathBuf,
        message: String,
    },
}

/// ALPN: HTTP/2 for gRPC, HTTP/1.1 for gRPC-Web, Connect and plain HTTP
/// clients (blob URLs, /metrics).
const ALPN: [&[u8]; 2] = [b"h2", b"http/1.1"];

/// Builds a rustls server configuration from the files named in `settings`.
pub fn load(settings: &TlsSettings) -> Result<ServerConfig, TlsError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = read_certs("certificate", &settings.cert)?;
    let key_bytes = read("key", &settings.key)?;
    let key = PrivateKeyDer::from_pem_slice(&key_bytes).map_err(|e| TlsError::Invalid {
        what: "key",
        path: settings.key.clone(),
        message: format!("no usable PEM private key ({e})"),
    })?;
    let builder = ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("ring supports the default protocol versions");
    let builder = match &settings.client_ca {
        None => builder.with_no_client_auth(),
        Some(path) => {
            let mut roots = RootCertStore::empty();
            for cert in read_certs("client CA", path)? {
                roots.add(cert).map_err(|e| TlsError::Invalid {
                    what: "client CA",
                    path: path.clone(),
                    message: e.to_string(),
                })?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider);
            let verifier = match settings.client_auth {
                ClientAuth::Required => verifier,
                ClientAuth::Optional => verifier.allow_unauthenticated(),
            };
            let verifier = verifier.build().map_err(|e| TlsError::Invalid {
                what: "client CA",
                path: path.clone(),
                message: e.to_string(),
            })?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut config = builder
        .with_single_cert(certs, key)
        .map_err(|e| TlsError::Invalid {
            what: "certificate or key",
            path: settings.cert.clone(),
            message: format!("{e} (with key {})", settings.key.display()),
        })?;
    config.alpn_protocols = ALPN.iter().map(|p| p.to_vec()).collect();
    Ok(config)
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        what,
        path: path.to_owned(),
        source,
    })
}

fn read_certs(what: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read(what, path)?;
    let invalid = |message: String| TlsError::Invalid {
        what,
        path: path.to_owned(),
        message,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| invalid(format!("not PEM certificates ({e})")))?;
    if certs.is_empty() {
        return Err(invalid("no PEM certificate in the file".into()));
    }
    Ok(certs)
}

/// The listener's current TLS configuration, swapped on reload.
#[derive(Clone)]
pub struct Tls {
    current: Arc<RwLock<Arc<ServerConfig>>>,
    pub handshake_timeout: Duration,
}

impl std::fmt::Debug for Tls {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("handshake_timeout", &self.handshake_timeout)
            .finish_non_exhaustive()
    }
}

impl Tls {
    /// Loads the files; fails if they cannot be used.
    pub fn new(settings: &TlsSettings) -> Result<Self, TlsError> {
        Ok(Self {
            current: Arc::new(RwLock::new(Arc::new(load(settings)?))),
            handshake_timeout: settings.handshake_timeout,
        })
    }

    /// An acceptor with the current configuration, for one connection.
    pub fn acceptor(&self) -> TlsAcceptor {
        TlsAcceptor::from(
            self.current
                .read()
                .unwrap_or_else(|e| e.into_inner())
                .clone(),
        )
    }

    fn swap(&self, config: ServerConfig) {
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(config);
    }

    /// Watches the files until `stop` fires: every `reload_interval` it
    /// reloads them when one changed, and at each SIGHUP (when `hangup`, from
    /// [`hangup_signal`], is given) it reloads them regardless.
    pub async fn watch(self, settings: TlsSettings, hangup: Hangup, stop: CancellationToken) {
        let mut seen = fingerprint(&settings);
        #[cfg(unix)]
        let mut hangup = hangup;
        #[cfg(not(unix))]
        let _ = hangup;
        let mut ticker = tokio::time::interval(settings.reload_interval);
        ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticker.tick().await;
        loop {
            #[cfg(unix)]
            let forced = tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => false,
                Some(()) = async { match hangup.as_mut() { Some(h) => h.recv().await, None => std::future::pending().await } } => true,
            };
            #[cfg(not(unix))]
            let forced = tokio::select! {
                () = stop.cancelled() => return,
                _ = ticker.tick() => false,
            };
            let now = fingerprint(&settings);
            if now == seen && !forced {
                continue;
            }
            seen = now;
            // Reading files is blocking I/O; they are small.
            let loading = settings.clone();
            match tokio::task::spawn_blocking(move || load(&loading)).await {
                Ok(Ok(config)) => {
                    self.swap(config);
                    info!(cert = %settings.cert.display(), "TLS certificate reloaded");
                }
                Ok(Err(err)) => {
                    error!(error = %err, "cannot reload the TLS certificate: the previous one stays in use");
                }
                Err(err) => error!(error = %err, "TLS reload task failed"),
            }
        }
    }
}

#[cfg(unix)]
pub type Hangup = Option<tokio::signal::unix::Signal>;
#[cfg(not(unix))]
pub type Hangup = Option<()>;

/// Registers for SIGHUP. Called before the daemon reports that it listens,
/// so that a SIGHUP sent after that reloads rather than ending the process.
pub fn hangup_signal() -> Hangup {
    #[cfg(unix)]
    {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
            Ok(signal) => Some(signal),
            Err(err) => {
                error!(error = %err, "cannot listen for SIGHUP: TLS files are reloaded by polling only");
                None
            }
        }
    }
    #[cfg(not(unix))]
    None
}

/// Modification time, size and (on Unix) inode of each file; `None` for a
/// file that cannot be read, so that its reappearance counts as a change.
/// The inode catches a file replaced by rename within one clock tick.
type Fingerprint = Vec<Option<(SystemTime, u64, u64)>>;

fn fingerprint(settings: &TlsSettings) -> Fingerprint {
    [
        Some(&settings.cert),
        Some(&settings.key),
        settings.client_ca.as_ref(),
    ]
    .into_iter()
    .flatten()
    .map(|path| {
        let meta = std::fs::metadata(path).ok()?;
        #[cfg(unix)]
        let inode = std::os::unix::fs::MetadataExt::ino(&meta);
        #[cfg(not(unix))]
        let inode = 0;
        Some((meta.modified().ok()?, meta.len(), inode))
    })
    .collect()
}
