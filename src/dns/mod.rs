//! The DNS responder: answers the cluster zone from the registry snapshot
//! (Kubernetes DNS specification 1.1.0) and forwards other names for allowed
//! clients, through a cache that serves stale answers while upstreams are
//! down.
//!
//! ```text
//!  UDP thread ×N (SO_REUSEPORT) ─┐                       ┌─ zone: answer::answer (pure)
//!  TCP listener → connection ────┴─► handler ─ fast path ┤
//!                                     (per task cache)   └─ else: forward (upstreams + cache)
//! ```
//!
//! - [`answer`] is the pure core: `(snapshot, zone, question) → records`.
//! - [`handler`] applies the protocol rules (EDNS, truncation, opcodes,
//!   FORMERR/BADVERS/REFUSED) with hickory-proto: the slow path.
//! - [`fast`] caches the slow path's encodings per snapshot version and
//!   patches ID, flags, case and rotation: the fast path, byte-identical.
//! - [`server`] holds the UDP loops and the TCP connections; [`forward`]
//!   the upstream client and its cache.

pub mod answer;
pub mod fast;
pub mod forward;
pub mod handler;
pub mod server;

use std::net::SocketAddr;
use std::sync::Arc;

use socket2::{Domain, Protocol as SockProtocol, Socket, Type};
use std::net::UdpSocket;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::DnsConfig;
use crate::registry::Reader;

pub use answer::{Outcome, Zone, ZoneAnswer, answer};
pub use handler::{Handler, Proto, Reply};

#[derive(Debug, thiserror::Error)]
pub enum DnsError {
    #[error("dns zone {zone:?} is not a valid name: {source}")]
    Zone {
        zone: String,
        source: hickory_proto::ProtoError,
    },
    #[error("dns: cannot bind {proto} {addr}: {source}")]
    Bind {
        proto: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
}

/// The running responder.
pub struct DnsServer {
    /// Where UDP and TCP listen (the real port when the config said 0).
    pub local_addr: SocketAddr,
    tasks: Vec<JoinHandle<()>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl DnsServer {
    /// Waits for every task; they end once the shutdown token is cancelled
    /// (open TCP connections finish the query they are reading).
    pub async fn join(self) {
        for task in self.tasks {
            let _ = task.await;
        }
        // UDP threads notice the shutdown within `server::UDP_POLL`.
        let threads = self.threads;
        let _ = tokio::task::spawn_blocking(move || {
            for t in threads {
                let _ = t.join();
            }
        })
        .await;
    }
}

/// Builds the handler for a config (no sockets): used by [`spawn`], tests,
/// benches and the fuzz target.
pub fn handler(cfg: &DnsConfig) -> Result<Handler, DnsError> {
    let zone = Zone::new(&cfg.zone, cfg.ttl).map_err(|source| DnsError::Zone {
        zone: cfg.zone.clone(),
        source,
    })?;
    let forwarder = (!cfg.forward.is_empty()).then(|| {
        Arc::new(forward::Forwarder::new(
            cfg.forward.clone(),
            cfg.forward_timeout,
            cfg.cache_size,
        ))
    });
    Ok(Handler::new(zone, cfg.forward_allow.clone(), forwarder))
}

/// Binds UDP (`cfg.udp_sockets` sockets with SO_REUSEPORT) and TCP on
/// `cfg.listen`, then serves until `shutdown` is cancelled. Bind errors are
/// returned here, before anything is served.
pub async fn spawn(
    cfg: &DnsConfig,
    reader: Reader,
    shutdown: CancellationToken,
) -> Result<DnsServer, DnsError> {
    let handler = handler(cfg)?;
    let (udp, tcp, local_addr) = bind_all(cfg.listen, cfg.udp_sockets.max(1))?;
    let shared = Arc::new(server::Shared::new(handler));
    let mut tasks = Vec::new();
    let mut threads = Vec::new();
    for (i, sock) in udp.into_iter().enumerate() {
        let (shared, reader, shutdown) = (shared.clone(), reader.clone(), shutdown.clone());
        let runtime = tokio::runtime::Handle::current();
        let thread = std::thread::Builder::new()
            .name(format!("beacon-dns-udp-{i}"))
            .spawn(move || server::udp_thread(sock, shared, reader, shutdown, runtime))
            .map_err(|source| DnsError::Bind {
                proto: "udp",
                addr: local_addr,
                source,
            })?;
        threads.push(thread);
    }
    let settings = server::TcpSettings {
        idle_timeout: cfg.tcp_idle_timeout,
        max_connections: cfg.tcp_max_connections.max(1),
    };
    tasks.push(tokio::spawn(server::tcp_accept_loop(
        tcp, shared, reader, settings, shutdown,
    )));
    tracing::info!(addr = %local_addr, zone = %cfg.zone, "dns serving");
    Ok(DnsServer {
        local_addr,
        tasks,
        threads,
    })
}

/// Binds every socket. With port 0, the first UDP socket picks the port and
/// the rest follow it; if TCP cannot have that port, try another few times.
fn bind_all(
    listen: SocketAddr,
    udp_sockets: usize,
) -> Result<(Vec<UdpSocket>, TcpListener, SocketAddr), DnsError> {
    let attempts = if listen.port() == 0 { 8 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        match bind_once(listen, udp_sockets) {
            Ok(bound) => return Ok(bound),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

fn bind_once(
    listen: SocketAddr,
    udp_sockets: usize,
) -> Result<(Vec<UdpSocket>, TcpListener, SocketAddr), DnsError> {
    let first = bind_udp(listen)?;
    let addr = first.local_addr().map_err(|source| DnsError::Bind {
        proto: "udp",
        addr: listen,
        source,
    })?;
    let mut udp = vec![first];
    for _ in 1..udp_sockets {
        udp.push(bind_udp(addr)?);
    }
    let tcp = bind_tcp(addr)?;
    Ok((udp, tcp, addr))
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, DnsError> {
    let err = |source| DnsError::Bind {
        proto: "udp",
        addr,
        source,
    };
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(SockProtocol::UDP),
    )
    .map_err(err)?;
    sock.set_reuse_port(true).map_err(err)?;
    // Blocking, woken by the kernel; the timeout lets the thread see shutdown.
    sock.set_read_timeout(Some(server::UDP_POLL)).map_err(err)?;
    // The kernel's default receive buffer: at saturation a short queue sheds
    // load (clients retry) where a deep one only adds latency to every query.
    sock.bind(&addr.into()).map_err(err)?;
    Ok(sock.into())
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, DnsError> {
    let err = |source| DnsError::Bind {
        proto: "tcp",
        addr,
        source,
    };
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::STREAM,
        Some(SockProtocol::TCP),
    )
    .map_err(err)?;
    sock.set_reuse_address(true).map_err(err)?;
    sock.set_nonblocking(true).map_err(err)?;
    sock.bind(&addr.into()).map_err(err)?;
    sock.listen(1024).map_err(err)?;
    TcpListener::from_std(sock.into()).map_err(err)
}

#[cfg(test)]
mod tests;
