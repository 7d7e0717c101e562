//! Moving bytes between the client and the upstream socket.
//!
//! On Linux a direction starts by copying: each read goes through one
//! per-thread buffer ([`SMALL_BUFFER`]) straight into the other socket, so
//! short exchanges (a request, its response) cost a read and a write and
//! no pipe. The first read that fills the buffer means bulk, and from then
//! on the direction moves data with splice(2): socket → pipe → socket,
//! never through userspace (`[proxy] splice = "always"` splices from the
//! first byte, `"never"` always copies). The pipe comes from a process-wide
//! pool and is held only while bytes are in flight: an idle spliced
//! direction holds no pipe and no buffer, so idle connections cost two
//! sockets and a task. Readiness comes from tokio's reactor
//! ([`read_ready`] / [`write_ready`] / `try_io`), which clears readiness
//! only when the operation itself says `EAGAIN`.
//!
//! Why the pipe is always empty before the socket is spliced into it:
//! with a non-empty pipe an `EAGAIN` could mean "pipe full" instead of
//! "socket empty", and clearing the socket's readiness on it would stall
//! the direction. An empty pipe always has room.
//!
//! Elsewhere, or when splice reports `ENOSYS`/`EINVAL` (or no pipe can be
//! made), a direction falls back to a userspace copy of its own. Its buffer is
//! allocated when the source first turns readable and kept until the
//! direction ends.
//!
//! Half-close is exact: when one side's FIN arrives, everything already
//! read is written out first, then the FIN is forwarded (`shutdown(Write)`)
//! and the other direction keeps flowing until it ends too. Backpressure is
//! bounded by one pipe (or one buffer) per direction.
//!
//! A reset is forwarded as a reset, never as a FIN: when one socket fails
//! (the peer reset it, or any other error), whatever that socket still
//! delivers is passed on, the other socket's send queue gets a short
//! while to reach its peer ([`FLUSH_WAIT`]), and then it is closed with
//! `SO_LINGER 0`, which sends a RST. A cut stream never ends like a
//! complete one. [`reset_on_close`] does the same for forced closes.
#![allow(unsafe_code)]

use std::io;
use std::net::Shutdown;
use std::pin::pin;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::sync::Notify;
use tokio::sync::futures::Notified;
use tokio::time::Instant;

/// Userspace copy buffer per direction (only when falling back).
pub const FALLBACK_BUFFER: usize = 64 * 1024;

/// After one socket broke, how long the other one's queued bytes may take
/// to reach its peer before the reset (which drops what is still queued).
pub const FLUSH_WAIT: Duration = Duration::from_secs(1);

/// How bytes are moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// Small reads copied, bulk spliced (`[proxy] splice = "auto"`).
    #[default]
    Auto,
    /// splice(2) from the first byte where available (`"always"`).
    Splice,
    /// Always copy through a userspace buffer (`"never"`).
    Userspace,
}

/// Which path a finished direction used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    /// Bulk went through splice(2) (after a first small read, copied).
    Splice,
    /// Only small reads, each copied through a per-thread buffer.
    Copy,
    /// Userspace copy: splice unavailable, or [`Mode::Userspace`].
    Fallback,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Splice => "splice",
            Path::Copy => "copy",
            Path::Fallback => "fallback",
        }
    }
}

static SPLICED_BYTES: AtomicU64 = AtomicU64::new(0);
static COPIED_BYTES: AtomicU64 = AtomicU64::new(0);

/// Bytes moved by splice in this process so far.
pub fn spliced_bytes() -> u64 {
    SPLICED_BYTES.load(Ordering::Relaxed)
}

/// Bytes moved by the userspace fallback in this process so far.
pub fn copied_bytes() -> u64 {
    COPIED_BYTES.load(Ordering::Relaxed)
}

/// Last time any byte moved on a connection, for the idle timeout, and
/// which side has closed its sending half, for the fin timeouts. On
/// tokio's clock, so paused-time tests can move it.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
    /// Bit 0: A's FIN was forwarded; bit 1: B's.
    closed: AtomicU8,
    closed_changed: Notify,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
            closed: AtomicU8::new(0),
            closed_changed: Notify::new(),
        }
    }
}

impl Activity {
    /// Whether A and B have closed their sending half (their FIN forwarded).
    pub fn half_closed(&self) -> (bool, bool) {
        let c = self.closed.load(Ordering::Acquire);
        (c & 1 != 0, c & 2 != 0)
    }

    /// Resolves after the next change of [`Activity::half_closed`] (enable
    /// it before reading the state, as `Notify` asks).
    pub fn half_closed_changed(&self) -> Notified<'_> {
        self.closed_changed.notified()
    }

    fn mark_closed(&self, side: Side) {
        let bit = match side {
            Side::A => 1,
            Side::B => 2,
        };
        self.closed.fetch_or(bit, Ordering::AcqRel);
        self.closed_changed.notify_waiters();
    }

    pub fn touch(&self) {
        let ms = self.epoch.elapsed().as_millis() as u64;
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    pub fn idle_for(&self) -> Duration {
        let now = self.epoch.elapsed().as_millis() as u64;
        Duration::from_millis(now.saturating_sub(self.last_ms.load(Ordering::Relaxed)))
    }
}

/// Where one direction reports progress.
pub struct Meter<'a> {
    pub bytes: &'a metrics::Counter,
    pub activity: &'a Activity,
    /// This direction's bytes so far (also when the copy is cut short).
    pub moved: &'a AtomicU64,
}

impl Meter<'_> {
    fn record(&self, n: usize, path: Path) {
        self.bytes.increment(n as u64);
        self.moved.fetch_add(n as u64, Ordering::Relaxed);
        self.activity.touch();
        let global = match path {
            Path::Splice => &SPLICED_BYTES,
            Path::Copy | Path::Fallback => &COPIED_BYTES,
        };
        global.fetch_add(n as u64, Ordering::Relaxed);
    }
}

/// What one direction did.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Moved {
    pub bytes: u64,
    pub path: Path,
}

/// Both directions of a finished connection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Totals {
    pub a_to_b: Moved,
    pub b_to_a: Moved,
}

/// One of the two sockets of [`bidirectional`].
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    A,
    B,
}

/// A copy that ended because a socket failed (reset by its peer, or any
/// other error). The other socket has been set to close with a reset.
#[derive(Debug, thiserror::Error)]
#[error("{side:?} side failed: {error}")]
pub struct Broken {
    /// The socket that failed first.
    pub side: Side,
    #[source]
    pub error: io::Error,
}

/// Where one direction failed: reading its source or writing its
/// destination.
#[derive(Debug)]
enum Failed {
    Src(io::Error),
    Dst(io::Error),
}

impl Failed {
    fn into_io(self) -> io::Error {
        match self {
            Failed::Src(e) | Failed::Dst(e) => e,
        }
    }
}

/// Copies both ways until both sides have closed their sending half,
/// forwarding each FIN once the bytes before it are written.
///
/// When a socket fails, the bytes it still delivers are passed on (a peer
/// that sent data and then a RST: the data, then the reset), then the other
/// socket is flushed (up to [`FLUSH_WAIT`]) and set to reset on close:
/// the caller drops both sockets and the other peer sees a RST, not a FIN.
///
/// With `closes_after` the caller promises to close both sockets as soon
/// as this returns `Ok`: the second FIN is then left to that close (one
/// `shutdown` less per connection). Without it every FIN is a `shutdown`.
pub async fn bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    mode: Mode,
    a_to_b: Meter<'_>,
    b_to_a: Meter<'_>,
    closes_after: bool,
) -> Result<Totals, Broken> {
    // Set once a socket is known to have failed: its EOF then means the
    // reset another call already reported, not a FIN.
    let dead = [AtomicBool::new(false), AtomicBool::new(false)];
    // From 2 no direction counts as the second: every FIN is a shutdown.
    let ended = AtomicU8::new(if closes_after { 0 } else { 2 });
    // The direction futures live in this block only, so that the flush
    // below does not add its size to theirs in the connection's future.
    let first = {
        let mut up = pin!(direction(a, b, mode, &a_to_b, &dead[0], &dead[1], &ended));
        let mut down = pin!(direction(b, a, mode, &b_to_a, &dead[1], &dead[0], &ended));
        let mut up_end: Option<Result<Moved, Failed>> = None;
        let mut down_end: Option<Result<Moved, Failed>> = None;
        let mut first: Option<(Side, io::Error)> = None;
        loop {
            let (side_src, side_dst, end) = tokio::select! {
                r = &mut up, if up_end.is_none() => (Side::A, Side::B, up_end.insert(r)),
                r = &mut down, if down_end.is_none() => (Side::B, Side::A, down_end.insert(r)),
            };
            if end.is_ok() {
                let meter = if side_src == Side::A {
                    &a_to_b
                } else {
                    &b_to_a
                };
                meter.activity.mark_closed(side_src);
            }
            if first.is_none() {
                match end {
                    Ok(_) => {}
                    Err(Failed::Src(e)) => first = Some((side_src, clone_error(e))),
                    Err(Failed::Dst(e)) => first = Some((side_dst, clone_error(e))),
                }
            }
            let (Some(up_r), Some(down_r)) = (&up_end, &down_end) else {
                if first.is_none() {
                    continue;
                }
                // A direction still running goes on only to pass on what a
                // failed socket still delivers to a live one.
                let (src, dst) = if up_end.is_none() { (0, 1) } else { (1, 0) };
                if dead[src].load(Ordering::Relaxed) && !dead[dst].load(Ordering::Relaxed) {
                    continue;
                }
                break;
            };
            if let (Ok(x), Ok(y)) = (up_r, down_r) {
                return Ok(Totals {
                    a_to_b: *x,
                    b_to_a: *y,
                });
            }
            break;
        }
        first
    };
    let (side, error) = first.unwrap_or_else(|| (Side::A, io::ErrorKind::ConnectionReset.into()));
    for (i, s) in [a, b].into_iter().enumerate() {
        if !dead[i].load(Ordering::Relaxed) {
            flush(s, FLUSH_WAIT).await;
        }
        reset_on_close(s);
    }
    Err(Broken { side, error })
}

fn clone_error(e: &io::Error) -> io::Error {
    match e.raw_os_error() {
        Some(code) => io::Error::from_raw_os_error(code),
        None => io::Error::new(e.kind(), e.to_string()),
    }
}

/// Makes the socket close with a RST instead of a FIN (`SO_LINGER 0`):
/// bytes still queued are dropped. For forced closes (drain deadline,
/// idle timeout, removal) and for passing a reset on.
pub fn reset_on_close(s: &TcpStream) {
    let _ = socket2::SockRef::from(s).set_linger(Some(Duration::ZERO));
}

/// Waits (up to `limit`) until every byte written to `s` has been
/// acknowledged by its peer, so that a reset after it drops nothing the
/// peer could still have read. Gives up early if the socket fails.
async fn flush(s: &TcpStream, limit: Duration) {
    let deadline = Instant::now() + limit;
    let mut pause = Duration::from_millis(1);
    while matches!(unacked(s), Some(n) if n > 0) && Instant::now() < deadline {
        if let Ok(Some(_)) = s.take_error() {
            return;
        }
        tokio::time::sleep(pause.min(deadline - Instant::now())).await;
        pause = (pause * 2).min(Duration::from_millis(16));
    }
}

/// Bytes written to `s` and not yet acknowledged (None: unknown).
#[cfg(target_os = "linux")]
fn unacked(s: &TcpStream) -> Option<usize> {
    use std::os::fd::AsRawFd;
    let mut n: libc::c_int = 0;
    // SAFETY: TIOCOUTQ (SIOCOUTQ for TCP) writes one int through the
    // pointer, which points at `n`; the fd is open while `s` lives.
    let rc = unsafe { libc::ioctl(s.as_raw_fd(), libc::TIOCOUTQ, &mut n) };
    (rc == 0).then_some(n.max(0) as usize)
}

#[cfg(not(target_os = "linux"))]
fn unacked(_: &TcpStream) -> Option<usize> {
    None
}

/// Copies `src` to `dst` until `src` ends, then forwards the FIN.
pub async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    mode: Mode,
    meter: &Meter<'_>,
) -> io::Result<Moved> {
    let (src_dead, dst_dead) = (AtomicBool::new(false), AtomicBool::new(false));
    direction(
        src,
        dst,
        mode,
        meter,
        &src_dead,
        &dst_dead,
        &AtomicU8::new(2),
    )
    .await
    .map_err(Failed::into_io)
}

/// One direction: copies until `src` ends, then forwards the FIN. Marks
/// the socket that failed; an EOF from a socket already marked failed is
/// its reset, seen before by the other direction.
///
/// `ended` counts the directions of the pair that ended cleanly (from 2
/// when every FIN must be a `shutdown`). The second one skips it: `dst` has sent its FIN and been read to
/// the end, so the close that follows at once sends the same FIN, and a
/// short connection makes one syscall less (HAProxy closes the same way).
async fn direction(
    src: &TcpStream,
    dst: &TcpStream,
    mode: Mode,
    meter: &Meter<'_>,
    src_dead: &AtomicBool,
    dst_dead: &AtomicBool,
    ended: &AtomicU8,
) -> Result<Moved, Failed> {
    let result = async {
        let moved = copy(src, dst, mode, meter).await?;
        if src_dead.load(Ordering::Relaxed) {
            return Err(Failed::Src(io::ErrorKind::ConnectionReset.into()));
        }
        splice_counter(moved.path).increment(1);
        if ended.fetch_add(1, Ordering::AcqRel) == 1 {
            return Ok(moved);
        }
        match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
            Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(Failed::Dst(e)),
            _ => Ok(moved),
        }
    }
    .await;
    match &result {
        Err(Failed::Src(_)) => src_dead.store(true, Ordering::Relaxed),
        Err(Failed::Dst(_)) => dst_dead.store(true, Ordering::Relaxed),
        Ok(_) => {}
    }
    result
}

/// `beacon_proxy_splice_total{mode}`, resolved once per mode (not a
/// registry lookup per connection). Before a recorder is installed (unit
/// tests) the handles are no-ops, and stay so.
fn splice_counter(path: Path) -> &'static metrics::Counter {
    static COUNTERS: std::sync::OnceLock<[metrics::Counter; 3]> = std::sync::OnceLock::new();
    let c = COUNTERS.get_or_init(|| {
        [Path::Splice, Path::Copy, Path::Fallback]
            .map(|p| metrics::counter!(crate::telemetry::PROXY_SPLICE, "mode" => p.as_str()))
    });
    &c[path as usize]
}

/// Copies `src` to `dst` until `src` ends.
async fn copy(
    src: &TcpStream,
    dst: &TcpStream,
    mode: Mode,
    meter: &Meter<'_>,
) -> Result<Moved, Failed> {
    Ok(match mode {
        #[cfg(target_os = "linux")]
        Mode::Auto => match small_first(src, dst, meter).await? {
            Small::Ended(bytes) => Moved {
                bytes,
                path: Path::Copy,
            },
            Small::Bulk(copied) => after_splice(src, dst, meter, copied).await?,
        },
        #[cfg(target_os = "linux")]
        Mode::Splice => after_splice(src, dst, meter, 0).await?,
        #[cfg(not(target_os = "linux"))]
        Mode::Auto | Mode::Splice => userspace(src, dst, meter).await?,
        Mode::Userspace => userspace(src, dst, meter).await?,
    })
}

/// Splices the rest of `src` into `dst` (`copied` bytes already moved),
/// in userspace if splice turns out unusable.
#[cfg(target_os = "linux")]
async fn after_splice(
    src: &TcpStream,
    dst: &TcpStream,
    meter: &Meter<'_>,
    copied: u64,
) -> Result<Moved, Failed> {
    Ok(match splice::one_way(src, dst, meter).await? {
        (bytes, true) => Moved {
            bytes: copied + bytes,
            path: Path::Splice,
        },
        // Splice unusable (or no pipe to be had): go on in userspace.
        (spliced, false) => {
            let rest = userspace(src, dst, meter).await?;
            Moved {
                bytes: copied + spliced + rest.bytes,
                path: if spliced > 0 {
                    Path::Splice
                } else {
                    Path::Fallback
                },
            }
        }
    })
}

/// Reads at most this much at a time before a direction turns to splice:
/// a read that fills it means bulk (HAProxy's `splice-auto` idea, with
/// its default buffer size).
#[cfg(target_os = "linux")]
pub const SMALL_BUFFER: usize = 16 * 1024;

#[cfg(target_os = "linux")]
thread_local! {
    /// One buffer per thread for the small exchanges: a read and its write
    /// happen without an await between them, so no connection holds it.
    static SMALL: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; SMALL_BUFFER]);
}

/// One read of `src` into `buf`. A read that returns less than `buf`
/// holds clears the socket's readiness as it returns (what tokio's own
/// `poll_read` does), so the next read waits for the next readiness event
/// instead of making a `recv` that can only say `EAGAIN`: one syscall less
/// per exchange. Sound because the clear is of the readiness observed
/// before this read: an event that arrives meanwhile (more data, the FIN)
/// keeps the socket readable, and tokio never clears a seen FIN.
#[cfg(target_os = "linux")]
fn short_read(src: &TcpStream, buf: &mut [u8]) -> io::Result<usize> {
    use nix::sys::socket::{MsgFlags, recv};
    use std::os::fd::AsRawFd;
    let mut got = None;
    let r = src.try_io(tokio::io::Interest::READABLE, || {
        let n = recv(src.as_raw_fd(), buf, MsgFlags::empty()).map_err(io::Error::from)?;
        got = Some(n);
        if n > 0 && n < buf.len() {
            Err(io::ErrorKind::WouldBlock.into())
        } else {
            Ok(n)
        }
    });
    match got {
        Some(n) => Ok(n),
        None => r,
    }
}

/// How [`small_first`] ended.
#[cfg(target_os = "linux")]
enum Small {
    /// `src` ended; every byte went through the buffer.
    Ended(u64),
    /// A read filled the buffer (written out): bulk, to be spliced.
    Bulk(u64),
}

/// One read and its write through the thread's buffer.
#[cfg(target_os = "linux")]
enum Step {
    Eof,
    Again,
    Read {
        n: usize,
        /// What `dst` did not take at once.
        rest: Option<Vec<u8>>,
        full: bool,
    },
}

/// Copies while reads stay small: each read goes straight to `dst` from a
/// per-thread buffer (two syscalls, as splice's two, but no pipe and no
/// page references for a 100-byte request). Measured in the l4 bench's
/// `close` and `keepalive` rows (BENCHMARKS.md).
#[cfg(target_os = "linux")]
async fn small_first(src: &TcpStream, dst: &TcpStream, meter: &Meter<'_>) -> Result<Small, Failed> {
    let mut total = 0u64;
    loop {
        read_ready(src).await.map_err(Failed::Src)?;
        let step = SMALL.with_borrow_mut(|buf| {
            let n = match short_read(src, buf) {
                Ok(0) => return Ok(Step::Eof),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(Step::Again),
                Err(e) => return Err(Failed::Src(e)),
            };
            let written = match dst.try_write(&buf[..n]) {
                Ok(w) => w,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(Failed::Dst(e)),
            };
            Ok(Step::Read {
                n,
                rest: (written < n).then(|| buf[written..n].to_vec()),
                full: n == buf.len(),
            })
        })?;
        match step {
            Step::Eof => return Ok(Small::Ended(total)),
            Step::Again => continue,
            Step::Read { n, rest, full } => {
                if let Some(rest) = rest {
                    write_all(dst, &rest).await.map_err(Failed::Dst)?;
                }
                total += n as u64;
                meter.record(n, Path::Copy);
                if full {
                    return Ok(Small::Bulk(total));
                }
            }
        }
    }
}

/// The portable path: read into a buffer, write it all, repeat.
async fn userspace(src: &TcpStream, dst: &TcpStream, meter: &Meter<'_>) -> Result<Moved, Failed> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        read_ready(src).await.map_err(Failed::Src)?;
        if buf.is_empty() {
            buf = vec![0; FALLBACK_BUFFER];
        }
        let n = match src.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(Failed::Src(e)),
        };
        write_all(dst, &buf[..n]).await.map_err(Failed::Dst)?;
        total += n as u64;
        meter.record(n, Path::Fallback);
    }
    Ok(Moved {
        bytes: total,
        path: Path::Fallback,
    })
}

/// Waits until `s` is readable. `poll_read_ready` keeps the waker in the
/// socket's own slot for the direction, where `readable()` adds a waiter
/// node to the future: 152 bytes per wait, and an idle connection waits
/// on both sockets (measured in the l4 bench's idle memory row). One task
/// owns both directions of a connection, so the one slot is enough.
async fn read_ready(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_read_ready(cx)).await
}

/// Waits until `s` is writable (see [`read_ready`]).
async fn write_ready(s: &TcpStream) -> io::Result<()> {
    std::future::poll_fn(|cx| s.poll_write_ready(cx)).await
}

async fn write_all(dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        write_ready(dst).await?;
        match dst.try_write(buf) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

#[cfg(target_os = "linux")]
mod splice {
    use std::io;
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
    use std::sync::Mutex;

    use tokio::io::Interest;
    use tokio::net::TcpStream;

    use crate::proxy::copy::{Failed, Meter, Path, read_ready, write_ready};

    /// Requested pipe capacity (F_SETPIPE_SZ); the kernel may give less.
    pub const PIPE_SIZE: usize = 256 * 1024;
    /// Pipes kept for reuse; more are closed when returned.
    const POOL_MAX: usize = 128;

    pub struct Pipe {
        read: OwnedFd,
        write: OwnedFd,
        capacity: usize,
    }

    static POOL: Mutex<Vec<Pipe>> = Mutex::new(Vec::new());

    impl Pipe {
        fn new() -> io::Result<Pipe> {
            let mut fds = [0 as RawFd; 2];
            // SAFETY: `fds` is a valid array of two ints for pipe2 to fill.
            let rc = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) };
            if rc != 0 {
                return Err(io::Error::last_os_error());
            }
            // SAFETY: pipe2 succeeded, so both fds are open and owned by us.
            let (read, write) =
                unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) };
            // SAFETY: fcntl on an fd we own; failure (EPERM over the user's
            // pipe quota) leaves the default size, which we then query.
            let capacity = unsafe {
                libc::fcntl(
                    write.as_raw_fd(),
                    libc::F_SETPIPE_SZ,
                    PIPE_SIZE as libc::c_int,
                );
                libc::fcntl(write.as_raw_fd(), libc::F_GETPIPE_SZ)
            };
            let capacity = if capacity > 0 {
                capacity as usize
            } else {
                64 * 1024
            };
            Ok(Pipe {
                read,
                write,
                capacity,
            })
        }

        fn take() -> io::Result<Pipe> {
            let pooled = POOL.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match pooled {
                Some(p) => Ok(p),
                None => Pipe::new(),
            }
        }

        /// Returns an empty pipe to the pool.
        fn give_back(self) {
            let mut pool = POOL.lock().unwrap_or_else(|e| e.into_inner());
            if pool.len() < POOL_MAX {
                pool.push(self);
            }
        }
    }

    fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
        // SAFETY: plain syscall on fds the caller keeps open for the call;
        // null offsets are valid for sockets and pipes.
        let n = unsafe {
            libc::splice(
                from,
                std::ptr::null_mut(),
                to,
                std::ptr::null_mut(),
                len,
                libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
            )
        };
        if n < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(n as usize)
        }
    }

    fn unsupported(e: &io::Error) -> bool {
        matches!(e.raw_os_error(), Some(libc::EINVAL) | Some(libc::ENOSYS))
    }

    /// Splices `src` into `dst` until `src` ends: `(bytes, true)`. With
    /// `(bytes, false)` splice stopped being usable (not supported, or no
    /// pipe could be made) with no byte in flight; the caller copies the
    /// rest in userspace.
    pub(super) async fn one_way(
        src: &TcpStream,
        dst: &TcpStream,
        meter: &Meter<'_>,
    ) -> Result<(u64, bool), Failed> {
        let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
        let mut pipe: Option<Pipe> = None;
        let mut total = 0u64;
        loop {
            read_ready(src).await.map_err(Failed::Src)?;
            let p = match pipe.take() {
                Some(p) => p,
                None => match Pipe::take() {
                    Ok(p) => p,
                    Err(_) => return Ok((total, false)),
                },
            };
            let n = match src.try_io(Interest::READABLE, || {
                splice(src_fd, p.write.as_raw_fd(), p.capacity)
            }) {
                Ok(0) => {
                    p.give_back();
                    return Ok((total, true));
                }
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                    // Nothing to read after all: an idle direction holds no pipe.
                    p.give_back();
                    continue;
                }
                Err(e) if total == 0 && unsupported(&e) => {
                    p.give_back();
                    return Ok((0, false));
                }
                Err(e) => {
                    p.give_back();
                    return Err(Failed::Src(e));
                }
            };
            // On error the pipe still holds bytes: drop (close) it.
            drain(&p, n, dst, dst_fd).await.map_err(Failed::Dst)?;
            total += n as u64;
            meter.record(n, Path::Splice);
            pipe = Some(p);
        }
    }

    /// Writes the `n` bytes in the pipe to `dst`.
    async fn drain(p: &Pipe, mut n: usize, dst: &TcpStream, dst_fd: RawFd) -> io::Result<()> {
        while n > 0 {
            match dst.try_io(Interest::WRITABLE, || splice(p.read.as_raw_fd(), dst_fd, n)) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(m) => n -= m,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => write_ready(dst).await?,
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sha2::{Digest, Sha256};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A connected pair on loopback.
    async fn pair() -> (TcpStream, TcpStream) {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        let (c, s) = tokio::join!(TcpStream::connect(addr), l.accept());
        (c.unwrap(), s.unwrap().0)
    }

    /// Deterministic pseudo-random bytes (xorshift), so order matters.
    fn pattern(seed: u64, len: usize) -> Vec<u8> {
        let mut x = seed | 1;
        (0..len)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect()
    }

    /// [`bidirectional`] with no-op byte counters.
    async fn unmetered(a: &TcpStream, b: &TcpStream, mode: Mode) -> Result<Totals, Broken> {
        let counter = metrics::Counter::noop();
        let activity = Activity::default();
        let moved = [AtomicU64::new(0), AtomicU64::new(0)];
        let meter = |i: usize| Meter {
            bytes: &counter,
            activity: &activity,
            moved: &moved[i],
        };
        bidirectional(a, b, mode, meter(0), meter(1), false).await
    }

    /// client ⇄ [a | proxy copy | b] ⇄ server. Sends `len` bytes each way
    /// concurrently and checks both arrive byte-identical.
    async fn roundtrip(mode: Mode, len: usize) -> Totals {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let up = pattern(1, len);
        let down = pattern(2, len);
        let want_up = Sha256::digest(&up);
        let want_down = Sha256::digest(&down);
        let proxy = unmetered(&a, &b, mode);
        let (mut cr, mut cw) = client.split();
        let (mut sr, mut sw) = server.split();
        let client_side = async {
            let send = async {
                cw.write_all(&up).await.unwrap();
                cw.shutdown().await.unwrap();
            };
            let recv = async {
                let mut got = Vec::with_capacity(len);
                cr.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(send, recv).1
        };
        let server_side = async {
            let send = async {
                sw.write_all(&down).await.unwrap();
                sw.shutdown().await.unwrap();
            };
            let recv = async {
                let mut got = Vec::with_capacity(len);
                sr.read_to_end(&mut got).await.unwrap();
                got
            };
            tokio::join!(send, recv).1
        };
        let run = async { tokio::join!(proxy, client_side, server_side) };
        let (totals, at_client, at_server) = tokio::time::timeout(Duration::from_secs(60), run)
            .await
            .expect("copy finished");
        let totals = totals.unwrap();
        assert_eq!(at_server.len(), len);
        assert_eq!(at_client.len(), len);
        assert_eq!(
            Sha256::digest(&at_server),
            want_up,
            "client→server bytes differ"
        );
        assert_eq!(
            Sha256::digest(&at_client),
            want_down,
            "server→client bytes differ"
        );
        assert_eq!(totals.a_to_b.bytes, len as u64);
        assert_eq!(totals.b_to_a.bytes, len as u64);
        totals
    }

    #[tokio::test]
    async fn small_exchanges_are_copied_and_splice_always_splices_them() {
        let t = roundtrip(Mode::Auto, 100).await;
        assert_eq!((t.a_to_b.path, t.b_to_a.path), (Path::Copy, Path::Copy));
        if cfg!(target_os = "linux") {
            let t = roundtrip(Mode::Splice, 100).await;
            assert_eq!((t.a_to_b.path, t.b_to_a.path), (Path::Splice, Path::Splice));
        }
    }

    /// Many small writes towards a peer that reads late: the proxy's writes
    /// fall short (the rest kept and written first), reads fill the buffer
    /// and the direction turns to splice; every byte arrives, in order.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn small_writes_to_a_late_reader_arrive_whole_and_in_order() {
        let (mut client, a) = pair().await;
        let (b, mut server) = pair().await;
        let data = pattern(7, 4 << 20);
        let want = Sha256::digest(&data);
        let proxy =
            tokio::spawn(async move { unmetered(&a, &b, Mode::Auto).await.map(|t| t.a_to_b) });
        let writer = tokio::spawn(async move {
            for chunk in data.chunks(500) {
                client.write_all(chunk).await.unwrap();
            }
            client.shutdown().await.unwrap();
            client
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        let mut got = Vec::new();
        server.shutdown().await.unwrap();
        tokio::time::timeout(Duration::from_secs(60), server.read_to_end(&mut got))
            .await
            .expect("read finished")
            .unwrap();
        let _client = writer.await.unwrap();
        let moved = proxy.await.unwrap().unwrap();
        assert_eq!(got.len(), 4 << 20);
        assert_eq!(Sha256::digest(&got), want, "bytes changed or reordered");
        assert_eq!(moved.bytes, 4 << 20);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_moves_64mib_each_way_intact() {
        let before = spliced_bytes();
        let t = roundtrip(Mode::Auto, 64 << 20).await;
        if cfg!(target_os = "linux") {
            assert_eq!(t.a_to_b.path, Path::Splice);
            assert_eq!(t.b_to_a.path, Path::Splice);
            // All but the first small reads (at most a few buffers each way).
            assert!(spliced_bytes() - before >= (128 << 20) - (1 << 20));
        }
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fallback_moves_64mib_each_way_intact() {
        let before = copied_bytes();
        let t = roundtrip(Mode::Userspace, 64 << 20).await;
        assert_eq!(t.a_to_b.path, Path::Fallback);
        assert_eq!(t.b_to_a.path, Path::Fallback);
        assert!(copied_bytes() - before >= 128 << 20);
    }

    /// One side closes its sending half; the other keeps sending and the
    /// proxy forwards the FIN only after the bytes before it.
    async fn half_close(mode: Mode, client_closes_first: bool) {
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        let (mut first, mut second) = if client_closes_first {
            (client, server)
        } else {
            (server, client)
        };
        let proxy = tokio::spawn(async move { unmetered(&a, &b, mode).await });
        let t = Duration::from_secs(10);
        first.write_all(b"request").await.unwrap();
        first.shutdown().await.unwrap();
        // The other side sees the bytes, then EOF.
        let mut got = Vec::new();
        tokio::time::timeout(t, second.read_to_end(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, b"request");
        // The reverse direction still flows after the FIN.
        for i in 0..3 {
            second
                .write_all(format!("reply {i};").as_bytes())
                .await
                .unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        second.shutdown().await.unwrap();
        let mut back = Vec::new();
        tokio::time::timeout(t, first.read_to_end(&mut back))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(back, b"reply 0;reply 1;reply 2;");
        let totals = tokio::time::timeout(t, proxy)
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let (req, rep) = if client_closes_first {
            (totals.a_to_b, totals.b_to_a)
        } else {
            (totals.b_to_a, totals.a_to_b)
        };
        assert_eq!((req.bytes, rep.bytes), (7, 24));
    }

    #[tokio::test]
    async fn half_close_client_first_splice() {
        half_close(Mode::Auto, true).await;
    }

    #[tokio::test]
    async fn half_close_server_first_splice() {
        half_close(Mode::Auto, false).await;
    }

    #[tokio::test]
    async fn half_close_both_ways_fallback() {
        half_close(Mode::Userspace, true).await;
        half_close(Mode::Userspace, false).await;
    }

    /// Closes with a RST (what a crashing peer does).
    fn abort(s: TcpStream) {
        reset_on_close(&s);
        drop(s);
    }

    /// How a read loop ended: the bytes, then EOF (`Ok`) or the error.
    async fn read_until_end(s: &mut TcpStream) -> (Vec<u8>, io::Result<()>) {
        let mut got = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut got))
            .await
            .expect("ended within 10 s");
        (got, r.map(|_| ()))
    }

    fn is_reset(r: &io::Result<()>) -> bool {
        matches!(r, Err(e) if matches!(e.kind(), io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe))
    }

    /// client ⇄ [a | copy | b] ⇄ server, the copy in a task that drops
    /// both proxy sockets when it ends (as the proxy does).
    async fn proxied(
        mode: Mode,
    ) -> (
        TcpStream,
        TcpStream,
        tokio::task::JoinHandle<Result<Totals, Broken>>,
    ) {
        let (client, a) = pair().await;
        let (b, server) = pair().await;
        let copy = tokio::spawn(async move { unmetered(&a, &b, mode).await });
        (client, server, copy)
    }

    /// The server sends bytes and resets: the client reads every byte,
    /// then a reset (not EOF), in both copy modes; and the reverse.
    async fn resets_pass_through(mode: Mode) {
        let t = Duration::from_secs(10);
        // Server side resets after 50,000 bytes (read by the client first,
        // so none is in flight at the reset).
        let (mut client, mut server, copy) = proxied(mode).await;
        let data = pattern(3, 50_000);
        server.write_all(&data).await.unwrap();
        let mut got = vec![0u8; data.len()];
        tokio::time::timeout(t, client.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, data);
        abort(server);
        let (rest, end) = read_until_end(&mut client).await;
        assert!(rest.is_empty());
        assert!(
            is_reset(&end),
            "{mode:?}: server reset seen by the client as {end:?}"
        );
        let broken = copy
            .await
            .unwrap()
            .expect_err("a reset ends the copy with an error");
        assert_eq!(broken.side, Side::B);

        // Client side resets after "hello": the server sees it, then a reset.
        let (mut client, mut server, copy) = proxied(mode).await;
        client.write_all(b"hello").await.unwrap();
        let mut got = [0u8; 5];
        tokio::time::timeout(t, server.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        abort(client);
        let (rest, end) = read_until_end(&mut server).await;
        assert_eq!((&got[..], rest.len()), (&b"hello"[..], 0));
        assert!(
            is_reset(&end),
            "{mode:?}: client reset seen by the server as {end:?}"
        );
        assert_eq!(copy.await.unwrap().unwrap_err().side, Side::A);

        // Bytes in flight at the reset: the server writes and resets at
        // once; the client still gets every byte the copy read, then a
        // reset. Here: everything (50,000 bytes fit in the buffers).
        let (mut client, mut server, copy) = proxied(mode).await;
        server.write_all(&data).await.unwrap();
        abort(server);
        let (got, end) = read_until_end(&mut client).await;
        assert!(
            is_reset(&end),
            "{mode:?}: {end:?} after {} bytes",
            got.len()
        );
        assert!(got == data[..got.len()], "{mode:?}: bytes changed");
        assert_eq!(
            got.len(),
            data.len(),
            "{mode:?}: bytes lost before the reset"
        );
        assert_eq!(copy.await.unwrap().unwrap_err().side, Side::B);
    }

    #[tokio::test]
    async fn resets_pass_through_splice() {
        resets_pass_through(Mode::Auto).await;
    }

    #[tokio::test]
    async fn resets_pass_through_fallback() {
        resets_pass_through(Mode::Userspace).await;
    }

    /// The server answers part of a reply and resets while the client is
    /// still uploading: whichever direction meets the reset first, the
    /// client gets the partial reply, then a reset (on its read, or on its
    /// write: the kernel reports a reset once, to the call that meets it).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_reset_during_an_upload_still_delivers_the_partial_reply() {
        for mode in [Mode::Auto, Mode::Userspace] {
            let (client, mut server, copy) = proxied(mode).await;
            let (mut cr, mut cw) = client.into_split();
            let upload = tokio::spawn(async move {
                let chunk = pattern(4, 64 * 1024);
                // Bounded: 64 MiB at most, and it stops at the reset.
                for _ in 0..1024 {
                    cw.write_all(&chunk).await?;
                }
                Ok(())
            });
            let mut head = vec![0u8; 256 * 1024];
            tokio::time::timeout(Duration::from_secs(10), server.read_exact(&mut head))
                .await
                .unwrap()
                .unwrap();
            server.write_all(b"partial reply").await.unwrap();
            abort(server);
            let mut got = Vec::new();
            let r = tokio::time::timeout(Duration::from_secs(10), cr.read_to_end(&mut got))
                .await
                .unwrap();
            assert_eq!(got, b"partial reply", "{mode:?}");
            let sent = tokio::time::timeout(Duration::from_secs(10), upload)
                .await
                .expect("the upload stopped")
                .unwrap();
            assert!(
                is_reset(&r.map(|_| ())) || is_reset(&sent),
                "{mode:?}: must end in a reset (read and write both ended cleanly)"
            );
            assert_eq!(copy.await.unwrap().unwrap_err().side, Side::B);
        }
    }

    #[tokio::test(start_paused = true)]
    async fn activity_tracks_idle_time() {
        let a = Activity::default();
        a.touch();
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(a.idle_for() >= Duration::from_millis(25));
        a.touch();
        assert!(a.idle_for() < Duration::from_millis(25));
    }
}
