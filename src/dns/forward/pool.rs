//! Upstream UDP sockets, reused: a few connected sockets per upstream, each
//! with one reader task that hands replies to the queries waiting on them
//! by ID (instead of a new socket, a bind and a connect per forwarded
//! query).
//!
//! A reply is taken only from the upstream's own address (the socket is
//! connected, the kernel drops the rest), with the ID of a query waiting
//! on that socket and that query's question; anything else is ignored, as
//! a spoofed reply should be. IDs are random and unique per socket. So
//! that the source ports do not stay the same for the process's life (a
//! spoofer would then only have the ID to guess), each socket is replaced
//! by a new one (a new random port) after [`QUERIES_PER_SOCKET`] queries;
//! the old one keeps reading for its queries still in flight, then closes.
//! An ICMP "port unreachable" (a refused connection) fails every query in
//! flight on that socket at once: they all went to that upstream.

use std::collections::HashMap;
use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hickory_proto::op::Message;
use tokio::net::UdpSocket;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;

use crate::dns::wire::{self, WireError};

/// Sockets per upstream.
pub const SOCKETS: usize = 4;
/// Queries one socket sends before a new one (a new port) takes its place.
pub const QUERIES_PER_SOCKET: usize = 2000;

/// The queries waiting on a socket by ID: a number unique to the wait (an
/// ID freed by a reply may be taken again before its first waiter is gone),
/// the query, and where its reply goes.
type Waiters = HashMap<u16, (u64, Message, oneshot::Sender<Message>)>;

/// One connected socket and the queries waiting for its replies.
#[derive(Debug)]
struct Conn {
    sock: UdpSocket,
    waiting: Mutex<Waiters>,
    sent: AtomicUsize,
    /// Numbers the waits.
    waits: std::sync::atomic::AtomicU64,
    /// Cancelled when it is replaced: its reader ends after `grace`.
    retired: CancellationToken,
}

impl Conn {
    fn waiting(&self) -> std::sync::MutexGuard<'_, Waiters> {
        self.waiting.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// The sockets of one upstream.
#[derive(Debug)]
pub struct Pool {
    addr: SocketAddr,
    slots: Vec<Mutex<Option<Arc<Conn>>>>,
    next: AtomicUsize,
    /// How long a replaced socket still reads (the forward timeout).
    grace: Duration,
    /// Ends every reader when the pool is dropped.
    stop: CancellationToken,
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

/// Takes a query's ID back when its wait ends, however it ends.
struct Waiting<'a> {
    conn: &'a Conn,
    id: u16,
    wait: u64,
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        let mut waiting = self.conn.waiting();
        if waiting.get(&self.id).is_some_and(|w| w.0 == self.wait) {
            waiting.remove(&self.id);
        }
    }
}

impl Pool {
    pub fn new(addr: SocketAddr, grace: Duration) -> Self {
        Self {
            addr,
            slots: (0..SOCKETS).map(|_| Mutex::new(None)).collect(),
            next: AtomicUsize::new(0),
            grace,
            stop: CancellationToken::new(),
        }
    }

    /// A socket for the next query: the slots in turn, each opened on first
    /// use and replaced after [`QUERIES_PER_SOCKET`] queries.
    fn conn(&self) -> io::Result<Arc<Conn>> {
        let i = self.next.fetch_add(1, Ordering::Relaxed) % self.slots.len();
        let mut slot = self.slots[i].lock().unwrap_or_else(|e| e.into_inner());
        if let Some(conn) = slot.as_ref()
            && !conn.retired.is_cancelled()
            && conn.sent.fetch_add(1, Ordering::Relaxed) < QUERIES_PER_SOCKET
        {
            return Ok(conn.clone());
        }
        if let Some(old) = slot.take() {
            old.retired.cancel();
        }
        let conn = Arc::new(self.open()?);
        conn.sent.store(1, Ordering::Relaxed);
        tokio::spawn(read(conn.clone(), self.stop.child_token(), self.grace));
        *slot = Some(conn.clone());
        Ok(conn)
    }

    fn open(&self) -> io::Result<Conn> {
        let local: SocketAddr = if self.addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let std = std::net::UdpSocket::bind(local)?;
        std.connect(self.addr)?;
        std.set_nonblocking(true)?;
        Ok(Conn {
            sock: UdpSocket::from_std(std)?,
            waiting: Mutex::new(HashMap::new()),
            sent: AtomicUsize::new(0),
            waits: std::sync::atomic::AtomicU64::new(0),
            retired: CancellationToken::new(),
        })
    }

    /// Sends `query` (under an ID of this socket's choosing) and waits for
    /// its reply. No timeout: the caller bounds the wait.
    pub async fn exchange(&self, query: &Message) -> Result<Message, WireError> {
        let conn = self.conn()?;
        let mut query = query.clone();
        let (tx, rx) = oneshot::channel();
        let wait = conn.waits.fetch_add(1, Ordering::Relaxed);
        let id = {
            let mut waiting = conn.waiting();
            // At most 4096 forwarded queries are in flight (the forward
            // slots), far below 65536: a free ID is found in a few draws.
            let id = std::iter::repeat_with(|| fastrand::u16(..))
                .find(|id| !waiting.contains_key(id))
                .unwrap_or_default();
            query.metadata.id = id;
            waiting.insert(id, (wait, query.clone(), tx));
            id
        };
        let _waiting = Waiting {
            conn: &conn,
            id,
            wait,
        };
        let bytes = query.to_vec().map_err(WireError::Encode)?;
        conn.sock.send(&bytes).await?;
        rx.await
            .map_err(|_| io::Error::from(io::ErrorKind::ConnectionRefused).into())
    }
}

/// Reads `conn`'s replies and hands each to the query it answers.
async fn read(conn: Arc<Conn>, stop: CancellationToken, grace: Duration) {
    let mut buf = vec![0u8; wire::TCP_LIMIT];
    let retired = async {
        conn.retired.cancelled().await;
        tokio::time::sleep(grace).await;
    };
    tokio::pin!(retired);
    loop {
        let got = tokio::select! {
            _ = stop.cancelled() => return,
            _ = &mut retired => return,
            got = conn.sock.recv(&mut buf) => got,
        };
        let n = match got {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => {
                // Port unreachable: every query waiting here went there.
                conn.waiting().clear();
                continue;
            }
            Err(e) => {
                tracing::debug!(error = %e, "upstream socket failed; closing it");
                conn.waiting().clear();
                conn.retired.cancel();
                return;
            }
        };
        let Ok(reply) = Message::from_vec(&buf[..n]) else {
            continue;
        };
        let mut waiting = conn.waiting();
        let answers = waiting
            .get(&reply.metadata.id)
            .is_some_and(|(_, query, _)| wire::answers(&reply, query));
        if answers && let Some((_, _, tx)) = waiting.remove(&reply.metadata.id) {
            let _ = tx.send(reply);
        }
    }
}

#[cfg(test)]
mod tests;
