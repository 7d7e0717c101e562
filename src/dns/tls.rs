//! The certificate of DoT and DoH: a PEM chain and key read at start (a
//! bad pair is an error then), re-read when either file changes. A pair
//! that does not load later keeps the last good one in force and is logged.
//!
//! Also the accept loop DoT and DoH share ([`Accept`]).
//!
//! A leaf: rustls (ring), tokio and the standard library, nothing else of
//! `dns/`.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::{Duration, SystemTime};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_rustls::server::TlsStream;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

/// How often the files are looked at for a change.
pub const CERT_POLL: Duration = Duration::from_secs(1);

/// The crypto of every TLS listener: rustls with ring.
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A TLS acceptor over the certificate store beacon reloads, offering
/// `alpn` (none: any client, with or without ALPN).
pub fn acceptor(
    certs: Arc<CertStore>,
    alpn: &[&[u8]],
) -> Result<tokio_rustls::TlsAcceptor, rustls::Error> {
    let mut cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(certs);
    cfg.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

/// How a TLS listener accepts: at most `max_connections` at once (more
/// are closed at accept), each TLS handshake within `handshake`, `what`
/// (`dot`, `doh`) in the log.
pub struct Accept {
    pub acceptor: tokio_rustls::TlsAcceptor,
    pub max_connections: usize,
    pub handshake: Duration,
    pub what: &'static str,
}

impl Accept {
    /// Accepts on `listener` until `shutdown` and runs `serve` on each
    /// connection that completed its handshake, as a task of `tasks`
    /// (which the caller closes and waits on). Accept errors (out of
    /// descriptors and the like) back off 10 ms; a handshake still going
    /// at shutdown is dropped.
    pub async fn run<F, Fut>(
        self,
        listener: TcpListener,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
        serve: F,
    ) where
        F: Fn(TlsStream<TcpStream>, std::net::SocketAddr) -> Fut + Clone + Send + 'static,
        Fut: std::future::Future<Output = ()> + Send + 'static,
    {
        let what = self.what;
        let slots = Arc::new(Semaphore::new(self.max_connections.max(1)));
        loop {
            let (tcp, peer) = tokio::select! {
                _ = shutdown.cancelled() => break,
                accepted = listener.accept() => match accepted {
                    Ok(pair) => pair,
                    Err(e) => {
                        tracing::debug!(error = %e, "dns {what} accept");
                        tokio::time::sleep(Duration::from_millis(10)).await;
                        continue;
                    }
                },
            };
            let Ok(slot) = slots.clone().try_acquire_owned() else {
                tracing::debug!(%peer, "dns {what}: connection cap reached; closing");
                continue;
            };
            let _ = tcp.set_nodelay(true);
            let handshake = tokio::time::timeout(self.handshake, self.acceptor.accept(tcp));
            let (serve, shutdown) = (serve.clone(), shutdown.clone());
            tasks.spawn(async move {
                let _slot = slot;
                let stream = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    h = handshake => match h {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::debug!(%peer, error = %e, "dns {what}: TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "dns {what}: TLS handshake timed out");
                            return;
                        }
                    },
                };
                serve(stream, peer).await;
            });
        }
    }
}

/// What the files looked like when last read: modification time and length.
type Stamp = Option<(SystemTime, u64)>;

fn stamp(path: &Path) -> Stamp {
    let m = std::fs::metadata(path).ok()?;
    Some((m.modified().ok()?, m.len()))
}

/// The certificate served now, swapped when the files change.
#[derive(Debug)]
pub struct CertStore {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    /// Reads the pair once: an error when it does not load.
    pub fn load(cert: &Path, key: &Path) -> Result<Arc<CertStore>, String> {
        let pair = load_pair(cert, key)?;
        Ok(Arc::new(CertStore {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            current: RwLock::new(Arc::new(pair)),
        }))
    }

    /// The certificate chain served now (its leaf first).
    pub fn chain(&self) -> Vec<CertificateDer<'static>> {
        self.now().cert.clone()
    }

    fn now(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// Re-reads the pair: true when it loaded and is served from now on;
    /// false (logged, the last good pair kept) when it did not.
    pub fn reload(&self) -> bool {
        match load_pair(&self.cert, &self.key) {
            Ok(pair) => {
                *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(pair);
                tracing::info!(cert = %self.cert.display(), "dns tls: certificate reloaded");
                true
            }
            Err(e) => {
                tracing::warn!(
                    cert = %self.cert.display(), key = %self.key.display(), error = %e,
                    "dns tls: cannot load the new certificate; the last good one stays in force"
                );
                false
            }
        }
    }

    /// Re-reads the pair whenever either file changes, until `shutdown`.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        let mut seen = (stamp(&self.cert), stamp(&self.key));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CERT_POLL) => {}
            }
            let now = (stamp(&self.cert), stamp(&self.key));
            if now != seen {
                seen = now;
                self.reload();
            }
        }
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.now())
    }
}

/// Reads a PEM chain and a PEM private key and checks that they match.
fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, String> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("{}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("{}: {e}", cert.display()))?;
    if chain.is_empty() {
        return Err(format!("{}: no certificate in the file", cert.display()));
    }
    let der = PrivateKeyDer::from_pem_file(key).map_err(|e| format!("{}: {e}", key.display()))?;
    let signing = provider()
        .key_provider
        .load_private_key(der)
        .map_err(|e| format!("{}: {e}", key.display()))?;
    let pair = CertifiedKey::new(chain, signing);
    pair.keys_match()
        .map_err(|e| format!("{} and {}: {e}", cert.display(), key.display()))?;
    Ok(pair)
}
