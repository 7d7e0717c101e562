//! The proxy's error type (a leaf: every file of the proxy may use it).

use std::io;
use std::net::SocketAddr;

#[derive(Debug, thiserror::Error)]
pub enum ProxyError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: SocketAddr,
        #[source]
        source: io::Error,
    },
    /// `[proxy] access_log` names a file that cannot be opened.
    #[error("cannot open the access log {target}: {source}")]
    AccessLog {
        target: String,
        #[source]
        source: io::Error,
    },
    #[error("PROXY protocol header: {0}")]
    ProxyHeader(#[source] io::Error),
    /// The registry's snapshot channel closed while the proxy was not
    /// stopping: the registry died, and the proxy would follow a frozen
    /// snapshot.
    #[error("the registry stopped; the proxy has no snapshot to follow")]
    RegistryClosed,
}
