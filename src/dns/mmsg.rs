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

/// Datagrams per system call. Queued queries beyond it wait for the next
/// call, which comes right after this batch is answered.
pub const BATCH: usize = 16;
/// Receive buffer per slot: the largest UDP payload.
const SLOT: usize = 65536;

/// One thread's receive slots.
pub struct RecvBatch {
    bufs: [Vec<u8>; BATCH],
    headers: MultiHeaders<SockaddrStorage>,
    /// (length, sender) of each datagram of the last receive.
    got: Vec<(usize, SocketAddr)>,
}

/// The replies of one batch, sent together; buffers reused across batches.
pub struct SendBatch {
    replies: Vec<Vec<u8>>,
    peers: Vec<Option<SockaddrStorage>>,
    pending: usize,
    headers: MultiHeaders<SockaddrStorage>,
}

impl Default for RecvBatch {
    fn default() -> Self {
        Self {
            bufs: std::array::from_fn(|_| vec![0u8; SLOT]),
            headers: MultiHeaders::preallocate(BATCH, None),
            got: Vec::with_capacity(BATCH),
        }
    }
}

impl Default for SendBatch {
    fn default() -> Self {
        Self {
            replies: (0..BATCH).map(|_| Vec::with_capacity(512)).collect(),
            peers: vec![None; BATCH],
            pending: 0,
            headers: MultiHeaders::preallocate(BATCH, None),
        }
    }
}

impl RecvBatch {
    /// Receives at least one datagram (blocking up to the socket's read
    /// timeout), at most [`BATCH`]; how many. `WouldBlock`/`TimedOut` when
    /// none came in time.
    pub fn recv(&mut self, sock: &UdpSocket) -> io::Result<usize> {
        self.got.clear();
        let mut slices = self.bufs.each_mut().map(|b| [IoSliceMut::new(b)]);
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
    /// Queues a reply to send with the batch's others (at most [`BATCH`]
    /// are queued: one per datagram received).
    pub fn reply(&mut self, sock: &UdpSocket, bytes: &[u8], peer: SocketAddr) {
        if self.pending == BATCH {
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
