//! The errors of the DNS responder: what stops it from starting, and what
//! ends it while it runs. A leaf: children of `dns/` name these without
//! importing each other.

use std::net::SocketAddr;

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
    /// The DoT/DoH certificate or key does not load at start.
    #[error("dns: {0}")]
    Cert(String),
    /// A serving loop stopped outside shutdown (or panicked at any time).
    #[error("dns: the {task} {end}")]
    Died { task: String, end: String },
}
