//! Listening sockets and the accept loop: each accepted connection goes
//! to admission ([`conn::admit`]) with the route in force; accept errors
//! back off (EMFILE never makes the loop spin).

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::conn;
use super::route::Route;
use super::shared::Shared;

const BACKLOG: i32 = 4096;
/// First pause after an accept error that is not about one connection.
pub(super) const BACKOFF_MIN: Duration = Duration::from_millis(5);
pub(super) const BACKOFF_MAX: Duration = Duration::from_secs(1);

/// Binds a listening socket: SO_REUSEADDR (restart without waiting for
/// TIME_WAIT), SO_REUSEPORT (a second process may take over), IP_FREEBIND
/// (the address may come later), keepalive
/// and no-delay inherited by accepted sockets.
pub(super) fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    sock.set_reuse_address(true)?;
    #[cfg(unix)]
    sock.set_reuse_port(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    // A vip need not be a local address yet (`vip_interface` adds it, or
    // an operator does): bind anyway and serve once it arrives.
    #[cfg(target_os = "linux")]
    if addr.is_ipv6() {
        sock.set_freebind_v6(true)?;
    } else {
        sock.set_freebind_v4(true)?;
    }
    sock.set_keepalive(true)?;
    sock.set_tcp_nodelay(true)?;
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    sock.listen(BACKLOG)?;
    TcpListener::from_std(sock.into())
}

/// Where connections come from: a `TcpListener`, or a test double that
/// injects errors.
pub(super) trait Acceptor: Send + 'static {
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send;
}

impl Acceptor for TcpListener {
    fn accept(&self) -> impl Future<Output = io::Result<(TcpStream, SocketAddr)>> + Send {
        TcpListener::accept(self)
    }
}

/// Accept-error policy: errors about one connection are skipped at once;
/// anything else (EMFILE, ENFILE, ENOBUFS, ENOMEM, …) pauses the loop,
/// doubling from [`BACKOFF_MIN`] to [`BACKOFF_MAX`], so it never spins.
#[derive(Debug, Default)]
pub(super) struct AcceptBackoff {
    streak: u32,
}

impl AcceptBackoff {
    /// How long to pause after `e` (None: go on at once).
    pub(super) fn on_error(&mut self, e: &io::Error) -> Option<Duration> {
        if per_connection(e) {
            return None;
        }
        let wait = BACKOFF_MIN
            .saturating_mul(1 << self.streak.min(16))
            .min(BACKOFF_MAX);
        self.streak += 1;
        Some(wait)
    }

    /// A connection was accepted; true if that ends a streak of errors.
    pub(super) fn on_success(&mut self) -> bool {
        std::mem::take(&mut self.streak) > 0
    }
}

/// Errors accept(2) reports for one pending connection (Linux passes
/// pending network errors through accept; retry at once).
fn per_connection(e: &io::Error) -> bool {
    use io::ErrorKind::*;
    if matches!(
        e.kind(),
        ConnectionAborted | ConnectionReset | Interrupted | WouldBlock | TimedOut
    ) {
        return true;
    }
    #[cfg(unix)]
    if let Some(code) = e.raw_os_error() {
        return matches!(
            code,
            libc::EPROTO
                | libc::ENOPROTOOPT
                | libc::EHOSTDOWN
                | libc::EHOSTUNREACH
                | libc::ENETDOWN
                | libc::ENETUNREACH
                | libc::EOPNOTSUPP
                | libc::EPERM
        );
    }
    false
}

fn fd_exhausted(e: &io::Error) -> bool {
    #[cfg(unix)]
    if let Some(code) = e.raw_os_error() {
        return matches!(
            code,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        );
    }
    false
}

/// Accepts until `stop`, handing each connection to its route.
pub(super) async fn accept_loop<A: Acceptor>(
    acceptor: A,
    routes: watch::Receiver<Arc<Route>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let mut backoff = AcceptBackoff::default();
    // Both series exist from the start, so that rates and alerts see them.
    for kind in ["fd_exhausted", "other"] {
        metrics::counter!(crate::telemetry::PROXY_ACCEPT_ERRORS, "kind" => kind).increment(0);
    }
    loop {
        let accepted = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = acceptor.accept() => r,
        };
        match accepted {
            Ok((stream, peer)) => {
                if backoff.on_success() {
                    tracing::info!("proxy accepting again");
                }
                let route = routes.borrow().clone();
                conn::admit(&shared, route, stream, peer);
            }
            Err(e) => {
                let Some(wait) = backoff.on_error(&e) else {
                    tracing::debug!(error = %e, "accept: connection error");
                    continue;
                };
                let kind = if fd_exhausted(&e) {
                    "fd_exhausted"
                } else {
                    "other"
                };
                metrics::counter!(crate::telemetry::PROXY_ACCEPT_ERRORS, "kind" => kind)
                    .increment(1);
                if wait == BACKOFF_MIN {
                    tracing::warn!(error = %e, "accept failing; backing off");
                } else {
                    tracing::debug!(error = %e, ?wait, "accept still failing");
                }
                tokio::select! {
                    _ = stop.cancelled() => break,
                    _ = tokio::time::sleep(wait) => {}
                }
            }
        }
    }
}
