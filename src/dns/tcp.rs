//! The TCP shell (RFC 7766): an accept loop with a connection cap, one task
//! per connection, pipelined queries answered as soon as each is ready
//! (forwarded ones may overtake each other), an idle timeout, and a write
//! deadline so a client that stops reading loses its slot. The connection
//! loop is generic over the stream: DoT ([`super::dot`]) runs it over TLS.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpListener;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::handler::Reply;
use super::job::ForwardJob;
use super::server::Shared;
use super::wire::{self, Proto};
use crate::registry::Reader;

/// Replies queued for a connection's writer.
const WRITE_QUEUE: usize = 64;

/// Settings of the TCP side.
#[derive(Clone, Copy, Debug)]
pub struct TcpSettings {
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Accepts TCP connections until cancelled; each runs on its own task.
/// Returns once every connection has ended.
pub async fn tcp_accept_loop(
    listener: TcpListener,
    shared: Arc<Shared>,
    reader: Reader,
    settings: TcpSettings,
    shutdown: CancellationToken,
) {
    let slots = Arc::new(Semaphore::new(settings.max_connections));
    let tracker = tokio_util::task::TaskTracker::new();
    loop {
        let accepted = tokio::select! {
            _ = shutdown.cancelled() => break,
            a = listener.accept() => a,
        };
        #[cfg(test)]
        if super::server::Faults::take(&shared.faults.tcp_panic) {
            panic!("test fault: tcp accept loop");
        }
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning.
                tracing::warn!(error = %e, "dns tcp accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        let Ok(permit) = slots.clone().try_acquire_owned() else {
            tracing::debug!(%peer, "dns tcp connection cap reached; closing");
            drop(stream);
            continue;
        };
        let conn = Connection {
            peer,
            shared: shared.clone(),
            reader: reader.clone(),
            settings,
            proto: Proto::Tcp,
        };
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _ = stream.set_nodelay(true);
            let (rd, wr) = stream.into_split();
            conn.serve(rd, wr, shutdown).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// Serves one stream connection (its two halves) as RFC 7766 has it,
/// under `proto`'s metrics; for DoT over its TLS stream.
pub(super) async fn serve_stream<R, W>(
    (rd, wr): (R, W),
    peer: SocketAddr,
    shared: Arc<Shared>,
    reader: Reader,
    settings: TcpSettings,
    proto: Proto,
    shutdown: CancellationToken,
) where
    R: AsyncRead + Unpin + Send,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let conn = Connection {
        peer,
        shared,
        reader,
        settings,
        proto,
    };
    conn.serve(rd, wr, shutdown).await;
}

/// One TCP (or DoT) connection.
struct Connection {
    peer: SocketAddr,
    shared: Arc<Shared>,
    reader: Reader,
    settings: TcpSettings,
    proto: Proto,
}

/// The connection's writer: replies go out in the order they are ready.
type Replies = mpsc::Sender<Vec<u8>>;

impl Connection {
    /// Reads length-prefixed queries and answers each; closes when idle,
    /// on a read error, or at shutdown.
    async fn serve<R, W>(mut self, mut rd: R, wr: W, shutdown: CancellationToken)
    where
        R: AsyncRead + Unpin + Send,
        W: AsyncWrite + Unpin + Send + 'static,
    {
        let (tx, writer) = spawn_writer(wr, self.settings.idle_timeout);
        let mut out = Vec::with_capacity(4096);
        let mut rotate = fastrand::usize(..);
        loop {
            let frame = tokio::select! {
                _ = shutdown.cancelled() => break,
                f = tokio::time::timeout(self.settings.idle_timeout, wire::read_frame(&mut rd)) => f,
            };
            let body = match frame {
                Ok(Ok(Some(body))) => body,
                Ok(Ok(None)) => break,
                Ok(Err(e)) => {
                    tracing::debug!(peer = %self.peer, error = %e, "dns tcp read");
                    break;
                }
                Err(_) => {
                    tracing::debug!(peer = %self.peer, "dns tcp connection idle; closing");
                    break;
                }
            };
            rotate = rotate.wrapping_add(1);
            if !self.answer(&body, rotate, &mut out, &tx).await {
                break;
            }
        }
        drop(tx);
        let _ = writer.await;
    }

    /// Answers one query; false when the writer is gone.
    async fn answer(
        &mut self,
        body: &[u8],
        rotate: usize,
        out: &mut Vec<u8>,
        tx: &Replies,
    ) -> bool {
        let started = Instant::now();
        let snapshot = self.reader.latest();
        // The shared cache is locked for the synchronous answer only.
        let reply = {
            let mut cache = self
                .shared
                .tcp_cache
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            self.shared.handler.handle(
                &mut cache,
                &snapshot,
                body,
                self.peer.ip(),
                self.proto,
                rotate,
                out,
            )
        };
        let metrics = &self.shared.metrics;
        match reply {
            Reply::Send { rcode, qtype } => {
                metrics.record(self.proto, qtype, Some(rcode), started);
                tx.send(wire::frame(out)).await.is_ok()
            }
            Reply::Forward(job) => self.forward(job, body, tx, started).await,
            Reply::Drop => {
                metrics.record(self.proto, None, None, started);
                true
            }
        }
    }

    /// Runs a forwarded query on its own task (SERVFAIL at once when too
    /// many are in flight); false when the writer is gone.
    async fn forward(
        &self,
        job: Box<ForwardJob>,
        body: &[u8],
        tx: &Replies,
        started: Instant,
    ) -> bool {
        let qtype = job.request.queries.first().map(|q| q.query_type);
        let Some(permit) = self.shared.forwards.take(self.peer.ip()) else {
            let bytes = wire::header_only(body, ResponseCode::ServFail);
            self.shared
                .metrics
                .record(self.proto, qtype, Some(ResponseCode::ServFail), started);
            return tx.send(wire::frame(&bytes)).await.is_ok();
        };
        let (tx, shared, proto) = (tx.clone(), self.shared.clone(), self.proto);
        tokio::spawn(async move {
            let (bytes, rcode) = job.run().await;
            shared.metrics.record(proto, qtype, Some(rcode), started);
            let _ = tx.send(wire::frame(&bytes)).await;
            drop(permit);
        });
        true
    }
}

/// The task that writes replies. A client that stops reading cannot hold
/// the connection forever: each write must finish within `deadline`.
fn spawn_writer<W>(mut wr: W, deadline: Duration) -> (Replies, JoinHandle<()>)
where
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(WRITE_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            match tokio::time::timeout(deadline, wr.write_all(&frame)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    (tx, writer)
}

#[cfg(test)]
mod tests;
