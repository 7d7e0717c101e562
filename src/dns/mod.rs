//! The DNS responder: answers the cluster zone from the registry snapshot
//! (Kubernetes DNS specification 1.1.0) and forwards other names for allowed
//! clients, through a cache that serves stale answers while upstreams are
//! down.
//!
//! ```text
//!  UDP thread ×N (SO_REUSEPORT) ─┐                        ┌─ zone: answer::answer (pure)
//!  TCP accept → task per conn ───┴─► handler ─ fast path ─┤
//!                                    (per loop cache)     └─ else: forward (upstreams + cache)
//! ```
//!
//! - [`answer`] is the pure core: `(snapshot, zone, question) → records`.
//! - [`handler`] applies the protocol rules (EDNS, truncation, opcodes,
//!   FORMERR/BADVERS/REFUSED) with hickory-proto: the slow path.
//! - [`fast`] caches the slow path's encodings per snapshot version and
//!   patches ID, flags, case and rotation: the fast path, byte-identical.
//! - [`forward`] is the upstream client and its cache.
//! - [`udp`] and [`tcp`] are the I/O shells; [`bind`] opens their sockets;
//!   [`server`] holds what they share and supervises them ([`DnsServer`]).
//! - [`wire`] is the wire level they all use (limits, skeletons, framing,
//!   exchanges); [`tally`] the metrics; [`error`] the error type. These
//!   three use nothing else of `dns/`.
//!
//! This module is the facade: [`spawn`], [`handler`] and re-exports. No
//! child imports it.

pub mod answer;
pub mod autopath;
pub mod bind;
pub mod doh;
pub mod dot;
pub mod encrypted;
pub mod error;
pub mod fast;
pub mod forward;
pub mod handler;
pub mod job;
mod mmsg;
pub mod server;
mod slots;
pub mod tally;
pub mod tcp;
pub mod tls;
pub mod udp;
pub mod wire;

#[cfg(test)]
mod testkit;

use std::sync::Arc;

use tokio_util::sync::CancellationToken;

use crate::config::DnsConfig;
use crate::registry::Reader;

pub use answer::{Outcome, Zone, ZoneAnswer, answer};
pub use error::DnsError;
pub use handler::{Handler, Reply};
pub use server::DnsServer;
pub use wire::Proto;

/// Builds the handler for a config (no sockets): used by [`spawn`], tests,
/// benches and the fuzz target.
pub fn handler(cfg: &DnsConfig) -> Result<Handler, DnsError> {
    let zone = Zone::new(&cfg.zone, cfg.ttl).map_err(|source| DnsError::Zone {
        zone: cfg.zone.clone(),
        source,
    })?;
    let forwarder = (!cfg.forward.is_empty()).then(|| {
        forward::Forwarder::new(
            cfg.forward.clone(),
            zone.apex().clone(),
            cfg.forward_timeout,
            cfg.cache_size,
            forward::Tuning {
                max_fails: cfg.max_fails,
                health_check: cfg.health_check,
                prefetch: cfg.prefetch,
            },
        )
    });
    Ok(Handler::new(zone, cfg.forward_allow.clone(), forwarder).with_autopath(cfg.autopath))
}

/// Binds UDP (`cfg.udp_sockets` sockets with SO_REUSEPORT) and TCP on
/// `cfg.listen`, then serves until `shutdown` is cancelled. Bind errors are
/// returned here, before anything is served; [`DnsServer::join`] reports a
/// loop that dies later.
pub async fn spawn(
    cfg: &DnsConfig,
    reader: Reader,
    shutdown: CancellationToken,
) -> Result<DnsServer, DnsError> {
    let handler = handler(cfg)?;
    let bound = bind::bind_all(cfg.listen, cfg.udp_sockets.max(1))?;
    let local_addr = bound.addr;
    let shared = Arc::new(server::Shared::new(handler));
    let mut server = DnsServer::new(local_addr, &shared, shutdown.clone());
    for (i, sock) in bound.udp.into_iter().enumerate() {
        let (shared, reader, shutdown) = (shared.clone(), reader.clone(), shutdown.clone());
        let runtime = tokio::runtime::Handle::current();
        let batch = cfg.udp_batch.max(1);
        server
            .spawn_udp_thread(format!("beacon-dns-udp-{i}"), move || {
                udp::udp_thread(sock, shared, reader, shutdown, runtime, batch)
            })
            .map_err(|source| DnsError::Bind {
                proto: "udp",
                addr: local_addr,
                source,
            })?;
    }
    let settings = tcp::TcpSettings {
        idle_timeout: cfg.tcp_idle_timeout,
        max_connections: cfg.tcp_max_connections.max(1),
    };
    server.set_tcp_task(tokio::spawn(tcp::tcp_accept_loop(
        bound.tcp,
        shared.clone(),
        reader.clone(),
        settings,
        shutdown.clone(),
    )));
    if let Some(listeners) = encrypted_listeners(cfg)? {
        let (tls, https) = (listeners.tls_addr(), listeners.https_addr());
        let serve = encrypted::serve(listeners, shared, reader, shutdown);
        server.add_task(
            "DoT/DoH listeners",
            tokio::spawn(async move {
                if let Err(e) = serve.await {
                    tracing::error!(error = %e, "dns: DoT/DoH listeners");
                }
            }),
        );
        tracing::info!(dot = ?tls, doh = ?https, "dns over TLS/HTTPS serving");
    }
    tracing::info!(addr = %local_addr, zone = %cfg.zone, "dns serving");
    Ok(server)
}

/// Loads the certificate and binds DoT and DoH when configured.
fn encrypted_listeners(cfg: &DnsConfig) -> Result<Option<encrypted::Listeners>, DnsError> {
    if cfg.tls_listen.is_none() && cfg.https_listen.is_none() {
        return Ok(None);
    }
    let (Some(cert), Some(key)) = (&cfg.cert, &cfg.key) else {
        return Err(DnsError::Cert("DoT/DoH need `cert` and `key`".into()));
    };
    let certs = tls::CertStore::load(cert, key).map_err(DnsError::Cert)?;
    let bind = |addr: Option<std::net::SocketAddr>, proto| {
        addr.map(|addr| {
            encrypted::bind(addr).map_err(|source| DnsError::Bind {
                proto,
                addr,
                source,
            })
        })
        .transpose()
    };
    Ok(Some(encrypted::Listeners {
        tls: bind(cfg.tls_listen, "dot")?,
        https: bind(cfg.https_listen, "doh")?,
        certs,
        timeout: cfg.tcp_idle_timeout,
        max_connections: cfg.tcp_max_connections.max(1),
    }))
}
