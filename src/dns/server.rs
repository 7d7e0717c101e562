//! The I/O shells: one OS thread per SO_REUSEPORT UDP socket running a
//! plain blocking receive/answer/send loop, and a TCP listener with one task per
//! connection (RFC 7766: pipelined queries, idle timeout, connection cap).
//!
//! hickory-server is not used: its loop spawns a task and boxes a future per
//! UDP query, which costs about twice the CPU per query of this loop.

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use hickory_proto::op::ResponseCode;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use super::fast::FastCache;
use super::handler::{Handler, Proto, QType, Reply};
use crate::registry::Reader;

/// Packets a UDP thread handles between two flushes of its metric tallies.
const UDP_BATCH: u32 = 64;
/// Entries per task in the fast-path cache before it starts over.
const FAST_CACHE_ENTRIES: usize = 100_000;
/// Forwarded queries in flight at once (beyond: SERVFAIL at once).
const MAX_FORWARDS: usize = 4096;

const QTYPES: [&str; 9] = ["A", "AAAA", "SRV", "PTR", "TXT", "SOA", "NS", "ANY", "MX"];
const RCODES: [&str; 7] = [
    "NOERROR", "FORMERR", "SERVFAIL", "NXDOMAIN", "NOTIMP", "REFUSED", "BADVERS",
];

fn qtype_label(qtype: QType) -> &'static str {
    QTYPES.get(qtype_index(qtype)).copied().unwrap_or("other")
}

fn rcode_label(rcode: ResponseCode) -> &'static str {
    RCODES.get(rcode_index(rcode)).copied().unwrap_or("other")
}

/// Counts one request at once (TCP and forwarded queries). Metric handles
/// are looked up per call, never cached at task start: a task may start
/// before the process installs its recorder.
pub fn record(proto: Proto, qtype: QType, rcode: Option<ResponseCode>, started: Instant) {
    metrics::counter!(crate::telemetry::DNS_REQUESTS, "proto" => proto.as_str(), "qtype" => qtype_label(qtype))
        .increment(1);
    if let Some(rcode) = rcode {
        metrics::counter!(crate::telemetry::DNS_RESPONSES, "rcode" => rcode_label(rcode))
            .increment(1);
    }
    metrics::histogram!(crate::telemetry::DNS_REQUEST_DURATION)
        .record(started.elapsed().as_secs_f64());
}

fn qtype_index(qtype: QType) -> usize {
    use hickory_proto::rr::RecordType as T;
    match qtype {
        Some(T::A) => 0,
        Some(T::AAAA) => 1,
        Some(T::SRV) => 2,
        Some(T::PTR) => 3,
        Some(T::TXT) => 4,
        Some(T::SOA) => 5,
        Some(T::NS) => 6,
        Some(T::ANY) => 7,
        Some(T::MX) => 8,
        _ => 9,
    }
}

fn rcode_index(rcode: ResponseCode) -> usize {
    match rcode {
        ResponseCode::NoError => 0,
        ResponseCode::FormErr => 1,
        ResponseCode::ServFail => 2,
        ResponseCode::NXDomain => 3,
        ResponseCode::NotImp => 4,
        ResponseCode::Refused => 5,
        ResponseCode::BADVERS => 6,
        _ => 7,
    }
}

/// Per-task tallies of one UDP loop, added to the shared metrics in a batch
/// (every few dozen packets and whenever the socket runs dry): shared
/// counters are atomics both cores would otherwise contend on per packet,
/// and a lookup per packet would cost more than the answer.
struct LocalMetrics {
    requests: [u64; QTYPES.len() + 1],
    responses: [u64; RCODES.len() + 1],
    durations: Vec<f64>,
}

impl LocalMetrics {
    fn new() -> Self {
        Self {
            requests: [0; QTYPES.len() + 1],
            responses: [0; RCODES.len() + 1],
            durations: Vec::with_capacity(UDP_BATCH as usize),
        }
    }

    fn record(&mut self, qtype: QType, rcode: Option<ResponseCode>, started: Instant) {
        self.requests[qtype_index(qtype)] += 1;
        if let Some(rcode) = rcode {
            self.responses[rcode_index(rcode)] += 1;
        }
        self.durations.push(started.elapsed().as_secs_f64());
    }

    fn flush(&mut self) {
        if self.durations.is_empty() {
            return;
        }
        for (i, n) in self.requests.iter_mut().enumerate() {
            if *n > 0 {
                let qtype = QTYPES.get(i).copied().unwrap_or("other");
                metrics::counter!(crate::telemetry::DNS_REQUESTS, "proto" => "udp", "qtype" => qtype)
                    .increment(std::mem::take(n));
            }
        }
        for (i, n) in self.responses.iter_mut().enumerate() {
            if *n > 0 {
                let rcode = RCODES.get(i).copied().unwrap_or("other");
                metrics::counter!(crate::telemetry::DNS_RESPONSES, "rcode" => rcode)
                    .increment(std::mem::take(n));
            }
        }
        let histogram = metrics::histogram!(crate::telemetry::DNS_REQUEST_DURATION);
        for d in self.durations.drain(..) {
            histogram.record(d);
        }
    }
}

/// What every serving task shares.
pub struct Shared {
    pub handler: Handler,
    pub forwards: Arc<Semaphore>,
}

impl Shared {
    pub fn new(handler: Handler) -> Self {
        Self {
            handler,
            forwards: Arc::new(Semaphore::new(MAX_FORWARDS)),
        }
    }
}

/// How often an idle UDP thread looks at the shutdown token.
pub const UDP_POLL: Duration = Duration::from_millis(100);

/// Receives, answers and sends on one UDP socket until cancelled, on its own
/// OS thread: a blocking `recv_from` wakes this thread directly, without the
/// reactor's wake-up and task hand-off in between (cheaper per packet and
/// faster to answer than a task on the runtime). `sock` is blocking with a
/// read timeout of [`UDP_POLL`]. Forwarded queries run on `runtime`.
pub fn udp_thread(
    sock: std::net::UdpSocket,
    shared: Arc<Shared>,
    mut reader: Reader,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
) {
    let mut local = LocalMetrics::new();
    let mut cache = FastCache::new(FAST_CACHE_ENTRIES);
    let mut buf = vec![0u8; 65536];
    let mut out = Vec::with_capacity(4096);
    let mut snapshot = reader.latest();
    let mut rotate = fastrand::usize(..);
    let mut handled = 0u32;
    let mut flushed = Instant::now();
    while !shutdown.is_cancelled() {
        let (n, peer) = match sock.recv_from(&mut buf) {
            Ok(got) => got,
            Err(e)
                if matches!(
                    e.kind(),
                    io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                ) =>
            {
                local.flush();
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
        if reader.has_changed() {
            snapshot = reader.latest();
        }
        rotate = rotate.wrapping_add(1);
        let reply = shared.handler.handle(
            &mut cache,
            &snapshot,
            &buf[..n],
            peer.ip(),
            Proto::Udp,
            rotate,
            &mut out,
        );
        match reply {
            Reply::Send { rcode, qtype } => {
                send_udp(&sock, &out, peer);
                local.record(qtype, Some(rcode), started);
            }
            Reply::Forward(job) => {
                let qtype = job.request.queries.first().map(|q| q.query_type);
                let permit = shared.forwards.clone().try_acquire_owned();
                match (permit, sock.try_clone()) {
                    (Ok(permit), Ok(sock)) => {
                        runtime.spawn(async move {
                            let (bytes, rcode) = job.run().await;
                            send_udp(&sock, &bytes, peer);
                            record(Proto::Udp, qtype, Some(rcode), started);
                            drop(permit);
                        });
                    }
                    _ => {
                        let bytes = super::handler::header_only(&buf[..n], ResponseCode::ServFail);
                        send_udp(&sock, &bytes, peer);
                        local.record(qtype, Some(ResponseCode::ServFail), started);
                    }
                }
            }
            Reply::Drop => local.record(None, None, started),
        }
        // Tallies reach the shared metrics every UDP_BATCH packets, and at
        // least every UDP_POLL under a trickle.
        handled += 1;
        if handled >= UDP_BATCH || started.duration_since(flushed) >= UDP_POLL {
            handled = 0;
            local.flush();
            flushed = started;
        }
    }
    local.flush();
}

fn send_udp(sock: &std::net::UdpSocket, bytes: &[u8], peer: SocketAddr) {
    if let Err(e) = sock.send_to(bytes, peer) {
        tracing::debug!(error = %e, %peer, "dns udp send");
    }
}

/// Settings of the TCP side.
#[derive(Clone, Copy, Debug)]
pub struct TcpSettings {
    pub idle_timeout: Duration,
    pub max_connections: usize,
}

/// Accepts TCP connections until cancelled; each runs on its own task.
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
        let (shared, reader, shutdown) = (shared.clone(), reader.clone(), shutdown.clone());
        tracker.spawn(async move {
            tcp_connection(stream, peer, shared, reader, settings, shutdown).await;
            drop(permit);
        });
    }
    tracker.close();
    tracker.wait().await;
}

/// One TCP connection: read length-prefixed queries, answer each as soon as
/// it is ready (forwarded ones may overtake each other), close when idle.
async fn tcp_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    mut reader: Reader,
    settings: TcpSettings,
    shutdown: CancellationToken,
) {
    let _ = stream.set_nodelay(true);
    let (mut rd, mut wr) = stream.into_split();
    let (tx, mut rx) = mpsc::channel::<Vec<u8>>(64);
    // A client that stops reading cannot hold the connection forever: each
    // write must finish within the idle timeout.
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            match tokio::time::timeout(settings.idle_timeout, wr.write_all(&frame)).await {
                Ok(Ok(())) => {}
                _ => break,
            }
        }
        let _ = wr.shutdown().await;
    });
    let mut cache = FastCache::new(1024);
    let mut out = Vec::with_capacity(4096);
    let mut rotate = fastrand::usize(..);
    loop {
        let frame = tokio::select! {
            _ = shutdown.cancelled() => break,
            f = tokio::time::timeout(settings.idle_timeout, read_frame(&mut rd)) => f,
        };
        let body = match frame {
            Ok(Ok(Some(body))) => body,
            Ok(Ok(None)) => break,
            Ok(Err(e)) => {
                tracing::debug!(%peer, error = %e, "dns tcp read");
                break;
            }
            Err(_) => {
                tracing::debug!(%peer, "dns tcp connection idle; closing");
                break;
            }
        };
        let started = Instant::now();
        let snapshot = reader.latest();
        rotate = rotate.wrapping_add(1);
        let reply = shared.handler.handle(
            &mut cache,
            &snapshot,
            &body,
            peer.ip(),
            Proto::Tcp,
            rotate,
            &mut out,
        );
        match reply {
            Reply::Send { rcode, qtype } => {
                record(Proto::Tcp, qtype, Some(rcode), started);
                if tx.send(framed(&out)).await.is_err() {
                    break;
                }
            }
            Reply::Forward(job) => {
                let qtype = job.request.queries.first().map(|q| q.query_type);
                let Ok(permit) = shared.forwards.clone().try_acquire_owned() else {
                    let bytes = super::handler::header_only(&body, ResponseCode::ServFail);
                    record(Proto::Tcp, qtype, Some(ResponseCode::ServFail), started);
                    if tx.send(framed(&bytes)).await.is_err() {
                        break;
                    }
                    continue;
                };
                let tx = tx.clone();
                tokio::spawn(async move {
                    let (bytes, rcode) = job.run().await;
                    record(Proto::Tcp, qtype, Some(rcode), started);
                    let _ = tx.send(framed(&bytes)).await;
                    drop(permit);
                });
            }
            Reply::Drop => record(Proto::Tcp, None, None, started),
        }
    }
    drop(tx);
    let _ = writer.await;
}

fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(bytes.len() + 2);
    f.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    f.extend_from_slice(bytes);
    f
}

/// Reads one length-prefixed message; `None` on a clean close between messages.
async fn read_frame(rd: &mut tokio::net::tcp::OwnedReadHalf) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    rd.read_exact(&mut body).await?;
    Ok(Some(body))
}
