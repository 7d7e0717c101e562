//! Moving bytes between the client and the upstream socket.
//!
//! On Linux each direction moves data with splice(2): socket → pipe →
//! socket, never through userspace. The pipe comes from a process-wide
//! pool and is held only while bytes are in flight: an idle spliced
//! direction holds no pipe and no buffer, so idle connections cost two
//! sockets and a task. Readiness comes from tokio's reactor (`readable()` /
//! `writable()` / `try_io`), which clears readiness only when the
//! operation itself says `EAGAIN`.
//!
//! Why the pipe is always empty before the socket is spliced into it:
//! with a non-empty pipe an `EAGAIN` could mean "pipe full" instead of
//! "socket empty", and clearing the socket's readiness on it would stall
//! the direction. An empty pipe always has room.
//!
//! Elsewhere, or when splice reports `ENOSYS`/`EINVAL` (or no pipe can be
//! made), a direction falls back to a userspace copy. Its buffer is
//! allocated when the source first turns readable and kept until the
//! direction ends.
//!
//! Half-close is exact: when one side's FIN arrives, everything already
//! read is written out first, then the FIN is forwarded (`shutdown(Write)`)
//! and the other direction keeps flowing until it ends too. Backpressure is
//! bounded by one pipe (or one buffer) per direction.
#![allow(unsafe_code)]

use std::io;
use std::net::Shutdown;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::net::TcpStream;
use tokio::time::Instant;

/// Userspace copy buffer per direction (only when falling back).
pub const FALLBACK_BUFFER: usize = 64 * 1024;

/// How bytes are moved.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Mode {
    /// splice(2) where available, userspace copy otherwise.
    #[default]
    Auto,
    /// Always copy through a userspace buffer.
    Userspace,
}

/// Which path a finished direction used.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Path {
    Splice,
    Fallback,
}

impl Path {
    pub fn as_str(self) -> &'static str {
        match self {
            Path::Splice => "splice",
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

/// Last time any byte moved on a connection, for the idle timeout. On
/// tokio's clock, so paused-time tests can move it.
#[derive(Debug)]
pub struct Activity {
    epoch: Instant,
    last_ms: AtomicU64,
}

impl Default for Activity {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
            last_ms: AtomicU64::new(0),
        }
    }
}

impl Activity {
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
}

impl Meter<'_> {
    fn record(&self, n: usize, path: Path) {
        self.bytes.increment(n as u64);
        self.activity.touch();
        let global = match path {
            Path::Splice => &SPLICED_BYTES,
            Path::Fallback => &COPIED_BYTES,
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

/// Copies both ways until both sides have closed their sending half,
/// forwarding each FIN once the bytes before it are written. Returns at
/// the first error (the caller drops both sockets).
pub async fn bidirectional(
    a: &TcpStream,
    b: &TcpStream,
    mode: Mode,
    a_to_b: Meter<'_>,
    b_to_a: Meter<'_>,
) -> io::Result<Totals> {
    let (x, y) = tokio::try_join!(one_way(a, b, mode, &a_to_b), one_way(b, a, mode, &b_to_a))?;
    Ok(Totals {
        a_to_b: x,
        b_to_a: y,
    })
}

/// Copies `src` to `dst` until `src` ends, then forwards the FIN.
pub async fn one_way(
    src: &TcpStream,
    dst: &TcpStream,
    mode: Mode,
    meter: &Meter<'_>,
) -> io::Result<Moved> {
    let moved = match mode {
        #[cfg(target_os = "linux")]
        Mode::Auto => match splice::one_way(src, dst, meter).await? {
            (bytes, true) => Moved {
                bytes,
                path: Path::Splice,
            },
            // Splice unusable (or no pipe to be had): go on in userspace.
            (spliced, false) => {
                let rest = userspace(src, dst, meter).await?;
                Moved {
                    bytes: spliced + rest.bytes,
                    path: if spliced > 0 {
                        Path::Splice
                    } else {
                        Path::Fallback
                    },
                }
            }
        },
        #[cfg(not(target_os = "linux"))]
        Mode::Auto => userspace(src, dst, meter).await?,
        Mode::Userspace => userspace(src, dst, meter).await?,
    };
    metrics::counter!(crate::telemetry::PROXY_SPLICE, "mode" => moved.path.as_str()).increment(1);
    match socket2::SockRef::from(dst).shutdown(Shutdown::Write) {
        Err(e) if e.kind() != io::ErrorKind::NotConnected => return Err(e),
        _ => {}
    }
    Ok(moved)
}

/// The portable path: read into a buffer, write it all, repeat.
async fn userspace(src: &TcpStream, dst: &TcpStream, meter: &Meter<'_>) -> io::Result<Moved> {
    let mut buf: Vec<u8> = Vec::new();
    let mut total = 0u64;
    loop {
        src.readable().await?;
        if buf.is_empty() {
            buf = vec![0; FALLBACK_BUFFER];
        }
        let n = match src.try_read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => return Err(e),
        };
        write_all(dst, &buf[..n]).await?;
        total += n as u64;
        meter.record(n, Path::Fallback);
    }
    Ok(Moved {
        bytes: total,
        path: Path::Fallback,
    })
}

async fn write_all(dst: &TcpStream, mut buf: &[u8]) -> io::Result<()> {
    while !buf.is_empty() {
        dst.writable().await?;
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

    use crate::proxy::copy::{Meter, Path};

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
    pub async fn one_way(
        src: &TcpStream,
        dst: &TcpStream,
        meter: &Meter<'_>,
    ) -> io::Result<(u64, bool)> {
        let (src_fd, dst_fd) = (src.as_raw_fd(), dst.as_raw_fd());
        let mut pipe: Option<Pipe> = None;
        let mut total = 0u64;
        loop {
            src.readable().await?;
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
                    return Err(e);
                }
            };
            // On error the pipe still holds bytes: drop (close) it.
            drain(&p, n, dst, dst_fd).await?;
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
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => dst.writable().await?,
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
    async fn unmetered(a: &TcpStream, b: &TcpStream, mode: Mode) -> io::Result<Totals> {
        let counter = metrics::Counter::noop();
        let activity = Activity::default();
        let meter = || Meter {
            bytes: &counter,
            activity: &activity,
        };
        bidirectional(a, b, mode, meter(), meter()).await
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

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn splice_moves_64mib_each_way_intact() {
        let before = spliced_bytes();
        let t = roundtrip(Mode::Auto, 64 << 20).await;
        if cfg!(target_os = "linux") {
            assert_eq!(t.a_to_b.path, Path::Splice);
            assert_eq!(t.b_to_a.path, Path::Splice);
            assert!(spliced_bytes() - before >= 128 << 20);
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
