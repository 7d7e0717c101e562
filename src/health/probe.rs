//! Active probes: a TCP connect, or an HTTP/1.1 `GET` answered 2xx/3xx.
//!
//! The HTTP client is a few lines over a `TcpStream` on purpose: probing is
//! the hot path of health checking (10,000 endpoints at 1 s is 10,000
//! requests a second), so the request bytes are built once per target and a
//! probe allocates nothing but its socket. Sockets close with `SO_LINGER 0`
//! (an RST, like HAProxy's checks) so probing leaves no `TIME_WAIT` behind
//! (nor 10,000 conntrack entries a second in `TIME_WAIT`). A TCP probe whose
//! connect completes at once never touches the reactor.

use std::io;
use std::net::SocketAddr;
use std::time::Duration;

use socket2::{Domain, Socket, Type};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::model::{ProbeKind, local_failure};

/// Why one probe failed. `Display` is the text of the `Down` reason
/// (`probe failed: connection refused 3/3`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ProbeError {
    #[error("timed out")]
    Timeout,
    #[error("{0}")]
    Io(io::ErrorKind),
    #[error("http status {0}")]
    Status(u16),
    #[error("invalid http response")]
    BadResponse,
    #[error("connection closed before a response")]
    Closed,
    /// This host could not start the probe (out of descriptors, ports,
    /// buffers or memory: [`local_failure`]); the raw OS error. Says
    /// nothing about the endpoint: never counts toward `fall`.
    #[error("could not probe: {}", io::Error::from_raw_os_error(*.0))]
    Local(i32),
}

impl ProbeError {
    /// The probe never reached the endpoint for want of local resources.
    pub fn is_local(&self) -> bool {
        matches!(self, ProbeError::Local(_))
    }
}

impl From<io::Error> for ProbeError {
    fn from(e: io::Error) -> Self {
        match e.raw_os_error() {
            Some(code) if local_failure(&e) => ProbeError::Local(code),
            _ => ProbeError::Io(e.kind()),
        }
    }
}

/// A probe spec that cannot be turned into a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    #[error("http probe {what} `{value}` contains a space or control character")]
    Invalid { what: &'static str, value: String },
}

/// What to do once connected, prepared once per target.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Check {
    Tcp,
    /// The complete request, ready to write.
    Http {
        request: Box<[u8]>,
    },
}

impl Check {
    /// The check for `kind` against `addr`; `None` for `ProbeKind::None`.
    pub fn new(kind: &ProbeKind, addr: SocketAddr) -> Result<Option<Check>, CheckError> {
        match kind {
            ProbeKind::None => Ok(None),
            ProbeKind::Tcp => Ok(Some(Check::Tcp)),
            ProbeKind::Http { path, host } => {
                let host = match host {
                    Some(h) => h.to_string(),
                    None => addr.to_string(),
                };
                for (what, value) in [("path", &**path), ("host", &host)] {
                    if value.is_empty() || value.bytes().any(|b| b <= b' ' || b == 0x7f) {
                        return Err(CheckError::Invalid {
                            what,
                            value: value.to_string(),
                        });
                    }
                }
                let request = format!(
                    "GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: beacon-health\r\n\
                     Accept: */*\r\nConnection: close\r\n\r\n"
                );
                Ok(Some(Check::Http {
                    request: request.into_bytes().into_boxed_slice(),
                }))
            }
        }
    }
}

/// Runs one probe against `addr`, bounded by `timeout` as a whole.
pub async fn run(check: &Check, addr: SocketAddr, timeout: Duration) -> Result<(), ProbeError> {
    match tokio::time::timeout(timeout, attempt(check, addr)).await {
        Ok(result) => result,
        Err(_) => Err(ProbeError::Timeout),
    }
}

async fn attempt(check: &Check, addr: SocketAddr) -> Result<(), ProbeError> {
    let (socket, connected) = start_connect(addr)?;
    if connected && *check == Check::Tcp {
        // Done without ever registering the socket with the reactor.
        return Ok(());
    }
    let stream = TcpStream::from_std(socket.into())?;
    if !connected {
        stream.writable().await?;
        if let Some(e) = stream.take_error()? {
            return Err(e.into());
        }
    }
    match check {
        Check::Tcp => Ok(()),
        Check::Http { request } => http(stream, request).await,
    }
}

/// Starts a non-blocking connect; true when it is already complete. Next to
/// the endpoint (loopback, a container bridge) the kernel finishes the
/// handshake inside `connect`, and a probe then costs five syscalls and no
/// reactor round trip.
fn start_connect(addr: SocketAddr) -> Result<(Socket, bool), ProbeError> {
    let socket = Socket::new(
        Domain::for_address(addr),
        Type::STREAM.nonblocking(),
        Some(socket2::Protocol::TCP),
    )?;
    // Close with RST: no TIME_WAIT per probe (10,000 a second would pile up).
    socket.set_linger(Some(Duration::ZERO))?;
    match socket.connect(&addr.into()) {
        Ok(()) => return Ok((socket, true)),
        Err(e) if e.raw_os_error() == Some(libc::EINPROGRESS) => {}
        Err(e) => return Err(e.into()),
    }
    // Connected already? (A refusal shows on the slow path.)
    let connected = socket.peer_addr().is_ok();
    Ok((socket, connected))
}

async fn http(mut stream: TcpStream, request: &[u8]) -> Result<(), ProbeError> {
    stream.set_nodelay(true)?;
    stream.write_all(request).await?;
    let mut buf = [0u8; 128];
    let mut len = 0;
    loop {
        let n = stream.read(&mut buf[len..]).await?;
        if n == 0 {
            return Err(if len == 0 {
                ProbeError::Closed
            } else {
                ProbeError::BadResponse
            });
        }
        len += n;
        if let Some(status) = parse_status(&buf[..len])? {
            return if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(ProbeError::Status(status))
            };
        }
    }
}

/// Reads the status code from the start of an HTTP/1.x response:
/// `Ok(None)` while more bytes are needed.
pub fn parse_status(buf: &[u8]) -> Result<Option<u16>, ProbeError> {
    const PREFIX: &[u8] = b"HTTP/1.";
    let head = &buf[..buf.len().min(PREFIX.len())];
    if !PREFIX.starts_with(head) {
        return Err(ProbeError::BadResponse);
    }
    // "HTTP/1.1 200" is 12 bytes; the reason phrase does not matter.
    if buf.len() < 12 {
        return Ok(None);
    }
    let digits = &buf[9..12];
    if !buf[7].is_ascii_digit() || buf[8] != b' ' || !digits.iter().all(u8::is_ascii_digit) {
        return Err(ProbeError::BadResponse);
    }
    let status = digits
        .iter()
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    Ok(Some(status))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n"), Ok(Some(200)));
        assert_eq!(parse_status(b"HTTP/1.0 503"), Ok(Some(503)));
        assert_eq!(parse_status(b"HTTP/1.1 30"), Ok(None));
        assert_eq!(parse_status(b"HTT"), Ok(None));
        assert_eq!(parse_status(b""), Ok(None));
        assert_eq!(parse_status(b"SSH-2.0"), Err(ProbeError::BadResponse));
        assert_eq!(
            parse_status(b"HTTP/1.1 2x0 OK"),
            Err(ProbeError::BadResponse)
        );
        assert_eq!(
            parse_status(b"HTTP/1.1200 OK"),
            Err(ProbeError::BadResponse)
        );
    }

    #[test]
    fn http_request_carries_path_and_host() {
        let addr: SocketAddr = "127.0.0.9:8080".parse().unwrap();
        let kind = ProbeKind::Http {
            path: "/healthz".into(),
            host: None,
        };
        let Some(Check::Http { request }) = Check::new(&kind, addr).unwrap() else {
            panic!("expected an http check");
        };
        let text = std::str::from_utf8(&request).unwrap();
        assert!(text.starts_with("GET /healthz HTTP/1.1\r\nHost: 127.0.0.9:8080\r\n"));
        assert!(text.ends_with("\r\n\r\n"));

        let kind = ProbeKind::Http {
            path: "/".into(),
            host: Some("web.example".into()),
        };
        let Some(Check::Http { request }) = Check::new(&kind, addr).unwrap() else {
            panic!("expected an http check");
        };
        assert!(
            std::str::from_utf8(&request)
                .unwrap()
                .contains("\r\nHost: web.example\r\n")
        );

        let bad = ProbeKind::Http {
            path: "/a\r\nX: y".into(),
            host: None,
        };
        assert!(Check::new(&bad, addr).is_err());
        assert_eq!(Check::new(&ProbeKind::None, addr), Ok(None));
    }

    #[test]
    fn io_errors_read_like_reasons() {
        let e = ProbeError::from(io::Error::from(io::ErrorKind::ConnectionRefused));
        assert_eq!(e.to_string(), "connection refused");
        assert!(!e.is_local());
        // Local resources, not the endpoint: told apart, and said plainly
        // (EMFILE used to read "uncategorized error").
        for code in [
            libc::EMFILE,
            libc::ENFILE,
            libc::ENOBUFS,
            libc::ENOMEM,
            libc::EADDRNOTAVAIL,
        ] {
            let e = ProbeError::from(io::Error::from_raw_os_error(code));
            assert_eq!(e, ProbeError::Local(code));
            assert!(e.is_local());
        }
        let emfile = ProbeError::from(io::Error::from_raw_os_error(libc::EMFILE));
        assert!(
            emfile
                .to_string()
                .starts_with("could not probe: Too many open files"),
            "{emfile}"
        );
        let refused = ProbeError::from(io::Error::from_raw_os_error(libc::ECONNREFUSED));
        assert_eq!(refused, ProbeError::Io(io::ErrorKind::ConnectionRefused));
        assert_eq!(ProbeError::Timeout.to_string(), "timed out");
        assert_eq!(ProbeError::Status(500).to_string(), "http status 500");
    }

    async fn serve_once(answer: &'static [u8]) -> SocketAddr {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = [0u8; 1024];
            let n = s.read(&mut buf).await.unwrap();
            assert!(buf[..n].starts_with(b"GET /h HTTP/1.1\r\n"));
            if !answer.is_empty() {
                s.write_all(answer).await.unwrap();
            }
            tokio::time::sleep(Duration::from_secs(2)).await;
        });
        addr
    }

    #[tokio::test]
    async fn probes_against_real_sockets() {
        let t = Duration::from_millis(300);
        let http = |addr| {
            let kind = ProbeKind::Http {
                path: "/h".into(),
                host: None,
            };
            Check::new(&kind, addr).unwrap().unwrap()
        };

        let ok = serve_once(b"HTTP/1.1 204 No Content\r\n\r\n").await;
        assert_eq!(run(&http(ok), ok, t).await, Ok(()));
        let redirect = serve_once(b"HTTP/1.1 302 Found\r\n\r\n").await;
        assert_eq!(run(&http(redirect), redirect, t).await, Ok(()));
        let failing = serve_once(b"HTTP/1.1 500 Internal Server Error\r\n\r\n").await;
        assert_eq!(
            run(&http(failing), failing, t).await,
            Err(ProbeError::Status(500))
        );
        let silent = serve_once(b"").await;
        assert_eq!(
            run(&http(silent), silent, t).await,
            Err(ProbeError::Timeout)
        );

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let open = listener.local_addr().unwrap();
        assert_eq!(run(&Check::Tcp, open, t).await, Ok(()));
        drop(listener);
        assert_eq!(
            run(&Check::Tcp, open, t).await,
            Err(ProbeError::Io(io::ErrorKind::ConnectionRefused))
        );
    }
}
