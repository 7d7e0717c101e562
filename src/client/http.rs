//! The pieces every client command shares: errors, exit codes, one
//! HTTP/1.1 GET. A leaf: uses nothing else of `client`.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("bad URL `{0}`: expected http://HOST[:PORT]/PATH or tcp://HOST:PORT")]
    Url(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}: timed out")]
    Timeout(String),
    #[error("DNS: {0}")]
    Dns(String),
    #[error("HTTP status {0}")]
    Status(u16),
}

pub fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ClientError {
    let what = what.into();
    move |source| ClientError::Io { what, source }
}

/// One HTTP/1.1 GET on a new connection; returns the status and body.
pub async fn http_get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String), ClientError> {
    let what = format!("GET http://{addr}{path}");
    let exchange = async {
        let mut s = TcpStream::connect(addr).await?;
        let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await?;
        let mut buf = Vec::new();
        (&mut s).take(1 << 20).read_to_end(&mut buf).await?;
        Ok::<_, std::io::Error>(buf)
    };
    let buf = tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| ClientError::Timeout(what.clone()))?
        .map_err(io(&what))?;
    let text = String::from_utf8_lossy(&buf);
    let status = text
        .strip_prefix("HTTP/1.")
        .and_then(|r| r.get(2..5))
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| ClientError::Io {
            what,
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP response"),
        })?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// How a client command ended: the process exit code.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Exit {
    Ok = 0,
    /// The server said no, or could not be reached.
    Failed = 1,
    /// Bad arguments.
    Usage = 2,
}
