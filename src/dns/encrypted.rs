//! DNS over TLS (RFC 7858) on hickory-server, and over HTTPS (RFC 8484) on
//! hyper ([`doh`](super::doh), which says why not hickory-server's):
//! [`hickory_server::Server`] owns DoT's TLS and framing; [`Encrypted`],
//! beacon's `RequestHandler` (and DoH's [`Answer`]), answers each request
//! with the same [`Handler`](super::handler::Handler), snapshot, fast-path
//! cache and forwarder as UDP and TCP, under the same forwarding ACL,
//! forward slots and metrics (`proto` = `dot`/`doh`).
//!
//! hickory's response handle takes records, not bytes, so the reply beacon
//! encoded is parsed and handed over to be encoded again: the same header,
//! question (from the request's own bytes, as asked), sections and OPT
//! record, but not byte for byte: hickory-server 0.26 stores its
//! compression pointer for the whole question entry, so the answers' owner
//! names go out uncompressed (a unit test holds the rest).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hickory_proto::op::{
    Header, HeaderCounts, Message, MessageType, Metadata, OpCode, ResponseCode,
};
use hickory_server::net::runtime::Time;
use hickory_server::server::{Request, RequestHandler, ResponseHandler, ResponseInfo};
use hickory_server::zone_handler::MessageResponseBuilder;
use tokio_util::sync::CancellationToken;

use super::doh::{self, Answer};
use super::handler::Reply;
use super::server::Shared;
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

/// A header-only `ResponseInfo` for when nothing was sent.
fn nothing_sent(request: &Request) -> ResponseInfo {
    let mut metadata = Metadata::new(request.metadata.id, MessageType::Response, OpCode::Query);
    metadata.response_code = ResponseCode::ServFail;
    ResponseInfo::from(Header {
        metadata,
        counts: HeaderCounts::default(),
    })
}

/// Hands the reply beacon encoded (`bytes`) to hickory's response handle:
/// parsed, then encoded again by hickory with the request's question.
pub async fn send_bytes<R: ResponseHandler>(
    request: &Request,
    bytes: &[u8],
    mut response_handle: R,
) -> ResponseInfo {
    let Ok(msg) = Message::from_vec(bytes) else {
        tracing::warn!("dns: cannot read back our own reply");
        return nothing_sent(request);
    };
    let mut builder = MessageResponseBuilder::from_message_request(request);
    if let Some(edns) = &msg.edns {
        builder.edns(edns);
    }
    let response = builder.build(
        msg.metadata,
        msg.answers.iter(),
        msg.authorities.iter(),
        std::iter::empty(),
        msg.additionals.iter(),
    );
    match response_handle.send_response(response).await {
        Ok(info) => info,
        Err(e) => {
            tracing::debug!(error = %e, "dns: encrypted send failed");
            nothing_sent(request)
        }
    }
}

#[async_trait::async_trait]
impl RequestHandler for Encrypted {
    async fn handle_request<R: ResponseHandler, T: Time>(
        &self,
        request: &Request,
        response_handle: R,
    ) -> ResponseInfo {
        match self.reply(request.as_slice(), request.src()).await {
            Some(bytes) => send_bytes(request, &bytes, response_handle).await,
            None => nothing_sent(request),
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

/// Serves DoT (a hickory `Server`) and DoH until `shutdown`.
pub async fn serve(
    listeners: Listeners,
    shared: Arc<Shared>,
    reader: Reader,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let mut dot = None;
    if let Some(l) = listeners.tls {
        let mut server =
            hickory_server::Server::new(Encrypted::new(shared.clone(), reader.clone(), Proto::Dot));
        server.register_tls_listener(
            tokio::net::TcpListener::from_std(l)?,
            listeners.timeout,
            listeners.certs.clone(),
        )?;
        dot = Some(server);
    }
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
    if let Some(server) = &mut dot
        && let Err(e) = server.shutdown_gracefully().await
    {
        tracing::debug!(error = %e, "dns DoT listener ended");
    }
    if let Some(task) = doh {
        match task.await {
            Ok(Err(e)) => tracing::debug!(error = %e, "dns DoH listener ended"),
            Err(e) => tracing::error!(error = %e, "dns DoH listener panicked"),
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
