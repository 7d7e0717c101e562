//! DNS over TLS (RFC 7858): tokio-rustls (ring, the certificate store
//! beacon reloads) in front of beacon's own RFC 7766 stream loop, the one
//! plain TCP runs ([`super::tcp`]), with `proto` = `dot`.
//!
//! Not hickory-server's TLS loop, which DoT ran on before: it answers the
//! queries of one connection one at a time (the next is not read before
//! the last is answered), so a forwarded query holds up every zone answer
//! pipelined behind it, and it re-encodes each reply beacon has already
//! encoded (its response handle takes records, not bytes). Measured with
//! `benches/load/dns_tls.sh` (BENCHMARKS.md, "DoT and DoH beside
//! unbound"), both builds and unbound in the same alternating rounds:
//! 109k qps at 8.7 µs of CPU per query here, 64k at 11.2 µs on
//! hickory-server, 70k at 16.0 µs for unbound.
//! Here queries are answered as soon as each is ready, forwarded ones on
//! their own tasks, under the same connection cap, idle timeout and write
//! deadline as TCP.

use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::server::Shared;
use super::tcp::{self, TcpSettings};
use super::tls::{self, CertStore};
use super::wire::Proto;
use crate::registry::Reader;

/// Serves DoT on `listener` until `shutdown`; returns once every
/// connection has ended (each ends at shutdown, as TCP's do).
/// `settings.idle_timeout` also bounds the TLS handshake.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    reader: Reader,
    certs: Arc<CertStore>,
    settings: TcpSettings,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // No ALPN offered: RFC 7858 clients need none ("dot" is optional).
    let accept = tls::Accept {
        acceptor: tls::acceptor(certs, &[]).map_err(std::io::Error::other)?,
        max_connections: settings.max_connections,
        handshake: settings.idle_timeout,
        what: "dot",
    };
    let tasks = TaskTracker::new();
    let stop = shutdown.clone();
    accept
        .run(listener, &shutdown, &tasks, move |stream, peer| {
            let (shared, reader, shutdown) = (shared.clone(), reader.clone(), stop.clone());
            let halves = tokio::io::split(stream);
            tcp::serve_stream(halves, peer, shared, reader, settings, Proto::Dot, shutdown)
        })
        .await;
    tasks.close();
    tasks.wait().await;
    Ok(())
}
