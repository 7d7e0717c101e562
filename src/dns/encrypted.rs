//! What DoT and DoH share: [`Encrypted`], DoH's [`Answer`], answers each
//! request with the same [`Handler`](super::handler::Handler), snapshot,
//! fast-path cache and forwarder as UDP and TCP, under the same
//! forwarding ACL, forward slots and metrics (`proto` = `doh`); DoT runs
//! TCP's own stream loop over TLS ([`dot`]). [`serve`] starts both
//! listeners. The replies are the bytes beacon encodes, as over TCP.
//!
//! Neither runs on hickory-server any more: its 0.26 DoH answers no GET
//! and refuses clients that accept `*/*` ([`doh`] says more), and its TLS
//! loop answers one query of a connection at a time and re-encodes every
//! reply ([`dot`] has the numbers).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use tokio_util::sync::CancellationToken;

use super::doh::{self, Answer};
use super::dot;
use super::handler::Reply;
use super::server::Shared;
use super::tcp::TcpSettings;
use super::tls::CertStore;
use super::wire::{self, Proto};
use crate::registry::Reader;

/// beacon's request handler for one encrypted transport.
pub struct Encrypted {
    shared: Arc<Shared>,
    reader: Reader,
    proto: Proto,
    rotate: AtomicUsize,
}

impl Encrypted {
    pub fn new(shared: Arc<Shared>, reader: Reader, proto: Proto) -> Self {
        Self {
            shared,
            reader,
            proto,
            rotate: AtomicUsize::new(fastrand::usize(..)),
        }
    }

    /// The reply bytes to `bytes` from `peer`, as UDP and TCP make them;
    /// `None` when nothing is to be sent.
    pub async fn reply(&self, bytes: &[u8], peer: SocketAddr) -> Option<Vec<u8>> {
        let started = Instant::now();
        let snapshot = self.reader.current();
        let rotate = self.rotate.fetch_add(1, Ordering::Relaxed);
        let mut out = Vec::with_capacity(512);
        let reply = {
            let mut cache = self
                .shared
                .tcp_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.handler.handle(
                &mut cache,
                &snapshot,
                bytes,
                peer.ip(),
                self.proto,
                rotate,
                &mut out,
            )
        };
        let metrics = &self.shared.metrics;
        match reply {
            Reply::Send { rcode, qtype } => {
                metrics.record(self.proto, qtype, Some(rcode), started);
                Some(out)
            }
            Reply::Drop => {
                metrics.record(self.proto, None, None, started);
                None
            }
            Reply::Forward(job) => {
                let qtype = job.request.queries.first().map(|q| q.query_type);
                let Some(permit) = self.shared.forwards.take(peer.ip()) else {
                    let rcode = ResponseCode::ServFail;
                    metrics.record(self.proto, qtype, Some(rcode), started);
                    return Some(wire::header_only(bytes, rcode));
                };
                let (bytes, rcode) = job.run().await;
                drop(permit);
                metrics.record(self.proto, qtype, Some(rcode), started);
                Some(bytes)
            }
        }
    }
}

impl Answer for Encrypted {
    async fn answer(&self, bytes: Vec<u8>, peer: SocketAddr) -> Option<Vec<u8>> {
        self.reply(&bytes, peer).await
    }
}

/// Where the encrypted listeners are and what they serve.
pub struct Listeners {
    pub tls: Option<std::net::TcpListener>,
    pub https: Option<std::net::TcpListener>,
    pub certs: Arc<CertStore>,
    /// Per connection: the TLS handshake and the wait for the next query.
    pub timeout: Duration,
    /// DoT connections at most (TCP's cap).
    pub max_connections: usize,
}

impl Listeners {
    /// Where DoT listens (the real port when the config said 0).
    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Where DoH listens.
    pub fn https_addr(&self) -> Option<SocketAddr> {
        self.https.as_ref().and_then(|l| l.local_addr().ok())
    }
}

/// Serves DoT ([`dot`]) and DoH ([`doh`]) until `shutdown`.
pub async fn serve(
    listeners: Listeners,
    shared: Arc<Shared>,
    reader: Reader,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let dot = match listeners.tls {
        Some(l) => Some(tokio::spawn(dot::serve(
            tokio::net::TcpListener::from_std(l)?,
            shared.clone(),
            reader.clone(),
            listeners.certs.clone(),
            TcpSettings {
                idle_timeout: listeners.timeout,
                max_connections: listeners.max_connections,
            },
            shutdown.clone(),
        ))),
        None => None,
    };
    let doh = match listeners.https {
        Some(l) => Some(tokio::spawn(doh::serve(
            tokio::net::TcpListener::from_std(l)?,
            Arc::new(Encrypted::new(shared, reader, Proto::Doh)),
            listeners.certs.clone(),
            listeners.timeout,
            shutdown.clone(),
        ))),
        None => None,
    };
    tokio::spawn(listeners.certs.clone().watch(shutdown.clone()));
    shutdown.cancelled().await;
    for (name, task) in [("DoT", dot), ("DoH", doh)] {
        let Some(task) = task else { continue };
        match task.await {
            Ok(Err(e)) => tracing::debug!(error = %e, "dns {name} listener ended"),
            Err(e) => tracing::error!(error = %e, "dns {name} listener panicked"),
            Ok(Ok(())) => {}
        }
    }
    Ok(())
}

/// Binds a TCP listener for DoT or DoH (non-blocking, for tokio).
pub fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    let l = std::net::TcpListener::bind(addr)?;
    l.set_nonblocking(true)?;
    Ok(l)
}

#[cfg(test)]
mod tests;
