//! Batched UDP I/O for the DNS threads: `recvmmsg` with `MSG_WAITFORONE`
//! (block for the first datagram, then take whatever else is already
//! queued, never wait to fill a batch) and `sendmmsg` for the replies of
//! one batch, through nix's safe wrappers. One system call per batch
//! instead of one per datagram each way when the socket is busy; the same
//! single call as before when one query comes alone.

use std::io::{self, IoSlice, IoSliceMut};
use std::net::{SocketAddr, SocketAddrV4, SocketAddrV6, UdpSocket};
use std::os::fd::AsRawFd;

use nix::errno::Errno;
use nix::sys::socket::{MsgFlags, MultiHeaders, SockaddrLike, SockaddrStorage, recvmmsg, sendmmsg};

/// Receive buffer per slot: the largest UDP payload.
const SLOT: usize = 65536;

/// One thread's receive slots.
pub struct RecvBatch {
    bufs: Vec<Vec<u8>>,
    headers: MultiHeaders<SockaddrStorage>,
    /// (length, sender) of each datagram of the last receive.
    got: Vec<(usize, SocketAddr)>,
}

/// The replies of one batch, sent together; buffers reused across batches.
pub struct SendBatch {
    /// One per datagram of a receive: the batch size.
    replies: Vec<Vec<u8>>,
    peers: Vec<Option<SockaddrStorage>>,
    pending: usize,
    headers: MultiHeaders<SockaddrStorage>,
}

impl SendBatch {
    /// Room for `batch` replies (at least one).
    pub fn new(batch: usize) -> Self {
        let batch = batch.max(1);
        Self {
            replies: (0..batch).map(|_| Vec::with_capacity(512)).collect(),
            peers: vec![None; batch],
            pending: 0,
            headers: MultiHeaders::preallocate(batch, None),
        }
    }
}

impl RecvBatch {
    /// `batch` receive slots (at least one) of the largest UDP payload.
    pub fn new(batch: usize) -> Self {
        let batch = batch.max(1);
        Self {
            bufs: (0..batch).map(|_| vec![0u8; SLOT]).collect(),
            headers: MultiHeaders::preallocate(batch, None),
            got: Vec::with_capacity(batch),
        }
    }

    /// Receives at least one datagram (blocking up to the socket's read
    /// timeout), at most the batch size; how many. `WouldBlock`/`TimedOut`
    /// when none came in time.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.got.clear();
        let mut slices: Vec<[IoSliceMut<'_>; 1]> =
            self.bufs.iter_mut().map(|b| [IoSliceMut::new(b)]).collect();
        let res = recvmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            slices.iter_mut(),
            MsgFlags::MSG_WAITFORONE,
            None,
        )
        .map_err(io::Error::from)?;
        for r in res {
            if let Some(peer) = r.address.as_ref().and_then(to_std) {
                self.got.push((r.bytes, peer));
            }
        }
        Ok(self.got.len())
    }

    /// Datagram `i` of the last receive and its sender.
    pub fn datagram(&self, i: usize) -> (&[u8], SocketAddr) {
        let (n, peer) = self.got[i];
        (&self.bufs[i][..n.min(SLOT)], peer)
    }
}

impl SendBatch {
    /// Queues a reply to send with the batch's others (at most the batch
    /// size are queued: one per datagram received).
    pub fn reply(&mut self, sock: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
        if self.pending == self.replies.len() {
            self.send(sock);
        }
        let i = self.pending;
        self.replies[i].clear();
        self.replies[i].extend_from_slice(bytes);
        self.peers[i] = Some(SockaddrStorage::from(peer));
        self.pending += 1;
    }

    /// Sends the queued replies: one `sendmmsg`, then one by one what it
    /// did not take (a reply that fails is dropped, as a lost datagram).
    pub fn send(&mut self, sock: &UdpSocket) {
        let n = std::mem::take(&mut self.pending);
        if n == 0 {
            return;
        }
        let slices: Vec<[IoSlice<'_>; 1]> = self.replies[..n]
            .iter()
            .map(|r| [IoSlice::new(r)])
            .collect();
        let sent = match sendmmsg(
            sock.as_raw_fd(),
            &mut self.headers,
            slices.iter(),
            &self.peers[..n],
            [],
            MsgFlags::empty(),
        ) {
            Ok(res) => res.count(),
            Err(Errno::EINTR | Errno::EAGAIN) => 0,
            Err(e) => {
                tracing::debug!(error = %e, "dns udp sendmmsg");
                0
            }
        };
        for i in sent..n {
            let peer = self.peers[i].as_ref().and_then(to_std);
            if let Some(peer) = peer
                && let Err(e) = sock.send_to(&self.replies[i], peer)
            {
                tracing::debug!(error = %e, %peer, "dns udp send");
            }
        }
    }
}

fn to_std(a: &SockaddrStorage) -> Option<SocketAddr> {
    if let Some(v4) = a.as_sockaddr_in() {
        return Some(SocketAddr::V4(SocketAddrV4::from(*v4)));
    }
    a.as_sockaddr_in6()
        .map(|v6| SocketAddr::V6(SocketAddrV6::from(*v6)))
        .filter(|_| a.family().is_some())
}
