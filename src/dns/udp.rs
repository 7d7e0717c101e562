//! The UDP shell: one OS thread per SO_REUSEPORT socket running a plain
//! blocking receive/answer/send loop, batched: one `recvmmsg` takes every
//! query already queued (never waiting for more), one `sendmmsg` sends
//! their replies ([`super::mmsg`]). A blocking `recv_from` wakes the
//! thread directly, without the reactor's wake-up and task hand-off in
//! between: cheaper per packet and faster to answer than a task on the
//! runtime. Forwarded queries run as tasks on the runtime.
//!
//! This loop is hand-written rather than hickory-server's, whose UDP loop
//! spawns a task and boxes a future per query (about twice the CPU per
//! query when this loop was written). The stream transports measured the
//! same way: DoT and DoH left hickory-server too ([`super::dot`],
//! [`super::doh`]).

use std::io;
use std::net::{SocketAddr, UdpSocket};
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use tokio_util::sync::CancellationToken;

use super::fast::FastCache;
use super::handler::Reply;
use super::job::ForwardJob;
use super::mmsg::{RecvBatch, SendBatch};
use super::server::Shared;
use super::tally::UdpTally;
use super::wire::{self, Proto};
use crate::model::Snapshot;
use crate::registry::Reader;

/// How often an idle UDP thread looks at the shutdown token; also the
/// socket's read timeout.
pub const UDP_POLL: Duration = Duration::from_millis(100);
/// Packets a UDP thread handles between two flushes of its metric tallies.
const UDP_BATCH: u32 = 64;
/// Bytes of answers per thread in the fast-path cache before it starts
/// over, and its negative answers (see [`FastCache`]).
const FAST_CACHE_BYTES: usize = 8 << 20;
const FAST_CACHE_NEGATIVES: usize = 4096;

/// One UDP thread's state.
struct UdpLoop {
    /// Shared with the forwarded queries' tasks, which send their replies
    /// on it (a `try_clone` per query cost a descriptor each).
    sock: Arc<UdpSocket>,
    shared: Arc<Shared>,
    reader: Reader,
    snapshot: Arc<Snapshot>,
    runtime: tokio::runtime::Handle,
    cache: FastCache,
    out: Vec<u8>,
    rotate: usize,
    tally: UdpTally,
}

/// Receives, answers and sends on one UDP socket until cancelled. `sock`
/// is blocking with a read timeout of [`UDP_POLL`]. Forwarded queries run
/// on `runtime`.
pub fn udp_thread(
    sock: UdpSocket,
    shared: Arc<Shared>,
    mut reader: Reader,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
    batch: usize,
) {
    let snapshot = reader.latest();
    let mut lp = UdpLoop {
        sock: Arc::new(sock),
        shared,
        reader,
        snapshot,
        runtime,
        cache: FastCache::new(FAST_CACHE_BYTES, FAST_CACHE_NEGATIVES),
        out: Vec::with_capacity(4096),
        rotate: fastrand::usize(..),
        tally: UdpTally::new(UDP_BATCH as usize),
    };
    let mut recv = RecvBatch::new(batch);
    let mut send = SendBatch::new(batch);
    let mut handled = 0u32;
    let mut flushed = Instant::now();
    while !shutdown.is_cancelled() {
        #[cfg(test)]
        if lp.test_fault() {
            return;
        }
        let n = match recv.recv(&lp.sock) {
            Ok(n) => n,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                lp.flush();
                flushed = Instant::now();
                continue;
            }
            Err(e) => {
                // ICMP errors from earlier sends surface here; keep serving.
                tracing::debug!(error = %e, "dns udp recv");
                continue;
            }
        };
        let started = Instant::now();
        for i in 0..n {
            let (bytes, peer) = recv.datagram(i);
            lp.answer(bytes, peer, started, &mut send);
        }
        send.send(&lp.sock);
        // Tallies reach the shared metrics every UDP_BATCH packets, and at
        // least every UDP_POLL under a trickle.
        handled += n as u32;
        if handled >= UDP_BATCH || started.duration_since(flushed) >= UDP_POLL {
            handled = 0;
            lp.flush();
            flushed = started;
        }
    }
    lp.flush();
}

impl UdpLoop {
    fn flush(&mut self) {
        self.tally.flush(&self.shared.metrics);
    }

    /// Answers one datagram from `peer`.
    fn answer(&mut self, bytes: &[u8], peer: SocketAddr, started: Instant, send: &mut SendBatch) {
        if self.reader.has_changed() {
            self.snapshot = self.reader.latest();
        }
        self.rotate = self.rotate.wrapping_add(1);
        let reply = self.shared.handler.handle(
            &mut self.cache,
            &self.snapshot,
            bytes,
            peer.ip(),
            Proto::Udp,
            self.rotate,
            &mut self.out,
        );
        match reply {
            Reply::Send { rcode, qtype } => {
                send.reply(&self.sock, &self.out, peer);
                self.tally.record(qtype, Some(rcode), started);
            }
            Reply::Forward(job) => self.forward(job, bytes, peer, started, send),
            Reply::Drop => self.tally.record(None, None, started),
        }
    }

    /// Hands a forwarded query to the runtime; SERVFAIL at once when too
    /// many are in flight.
    fn forward(
        &mut self,
        job: Box<ForwardJob>,
        bytes: &[u8],
        peer: SocketAddr,
        started: Instant,
        send: &mut SendBatch,
    ) {
        let qtype = job.request.queries.first().map(|q| q.query_type);
        match self.shared.forwards.take(peer.ip()) {
            Some(permit) => {
                let sock = self.sock.clone();
                let shared = self.shared.clone();
                self.runtime.spawn(async move {
                    let (bytes, rcode) = job.run().await;
                    send_udp(&sock, &bytes, peer);
                    shared
                        .metrics
                        .record(Proto::Udp, qtype, Some(rcode), started);
                    drop(permit);
                });
            }
            None => {
                let reply = wire::header_only(bytes, ResponseCode::ServFail);
                send.reply(&self.sock, &reply, peer);
                self.tally
                    .record(qtype, Some(ResponseCode::ServFail), started);
            }
        }
    }

    /// The test-only fault hook: panics, or says to return, once asked to.
    #[cfg(test)]
    fn test_fault(&self) -> bool {
        use super::server::Faults;
        if Faults::take(&self.shared.faults.udp_panic) {
            panic!("test fault: udp loop");
        }
        Faults::take(&self.shared.faults.udp_end)
    }
}

fn send_udp(sock: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, peer) {
        tracing::debug!(error = %e, %peer, "dns udp send");
    }
}
