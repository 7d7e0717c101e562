//! A tiny demo backend: answers with its own name so balancing is visible.
//!
//! - HTTP (`GET`/`HEAD`): `/healthz` answers 200, or 500 after `/fail`
//!   (until `/recover`); any other path answers 200 with `<name>\n`.
//! - Anything else: `<name>\n` first, then an echo of what the client sends.
//!   A client that sends nothing gets its name after 200 ms.
//!
//! Used by `beacon dev`, `beacon backend`, the compose demo and the tests.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A demo backend's shared state.
#[derive(Debug)]
pub struct Backend {
    pub name: Arc<str>,
    failing: AtomicBool,
}

impl Backend {
    pub fn new(name: &str) -> Arc<Self> {
        Arc::new(Self {
            name: name.into(),
            failing: AtomicBool::new(false),
        })
    }

    /// Makes `/healthz` answer 500 (true) or 200 (false).
    pub fn set_failing(&self, failing: bool) {
        self.failing.store(failing, Ordering::Relaxed);
    }

    /// Serves connections until `shutdown`.
    pub async fn serve(self: Arc<Self>, listener: TcpListener, shutdown: CancellationToken) {
        loop {
            let accepted = tokio::select! {
                _ = shutdown.cancelled() => return,
                a = listener.accept() => a,
            };
            match accepted {
                Ok((stream, _)) => {
                    let me = self.clone();
                    tokio::spawn(async move {
                        let _ = me.handle(stream).await;
                    });
                }
                Err(e) => {
                    tracing::debug!(error = %e, "backend accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }

    async fn handle(&self, mut stream: TcpStream) -> std::io::Result<()> {
        let _ = stream.set_nodelay(true);
        let mut buf = vec![0u8; 16 * 1024];
        let first = tokio::time::timeout(Duration::from_millis(200), stream.read(&mut buf)).await;
        let n = match first {
            Ok(Ok(0)) => return Ok(()),
            Ok(Ok(n)) => n,
            Ok(Err(e)) => return Err(e),
            Err(_) => 0,
        };
        let head = &buf[..n];
        if head.starts_with(b"GET ") || head.starts_with(b"HEAD ") {
            return self.http(stream, buf, n).await;
        }
        stream
            .write_all(format!("{}\n", self.name).as_bytes())
            .await?;
        stream.write_all(head).await?;
        let (mut rd, mut wr) = stream.split();
        tokio::io::copy(&mut rd, &mut wr).await?;
        wr.shutdown().await
    }

    async fn http(
        &self,
        mut stream: TcpStream,
        mut buf: Vec<u8>,
        mut n: usize,
    ) -> std::io::Result<()> {
        // Read until the end of the request head (bounded by the buffer).
        while !buf[..n].windows(4).any(|w| w == b"\r\n\r\n") && n < buf.len() {
            let m = tokio::time::timeout(Duration::from_secs(5), stream.read(&mut buf[n..]))
                .await
                .map_err(|_| std::io::ErrorKind::TimedOut)??;
            if m == 0 {
                break;
            }
            n += m;
        }
        let line = buf[..n].split(|&b| b == b'\n').next().unwrap_or_default();
        let path = std::str::from_utf8(line)
            .ok()
            .and_then(|l| l.split_whitespace().nth(1))
            .unwrap_or("/");
        let (status, body) = match path {
            "/healthz" if self.failing.load(Ordering::Relaxed) => {
                ("500 Internal Server Error", "failing\n".to_string())
            }
            "/healthz" => ("200 OK", "ok\n".to_string()),
            "/fail" => {
                self.set_failing(true);
                ("200 OK", "health now fails\n".to_string())
            }
            "/recover" => {
                self.set_failing(false);
                ("200 OK", "health now passes\n".to_string())
            }
            _ => ("200 OK", format!("{}\n", self.name)),
        };
        let head_only = buf.starts_with(b"HEAD ");
        let response = format!(
            "HTTP/1.1 {status}\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nX-Backend: {}\r\nConnection: close\r\n\r\n{}",
            body.len(),
            self.name,
            if head_only { "" } else { &body }
        );
        stream.write_all(response.as_bytes()).await?;
        stream.shutdown().await
    }
}

/// Binds `addr` and serves a backend named `name` until `shutdown`.
/// Returns the bound address and the backend handle.
pub async fn start(
    name: &str,
    addr: SocketAddr,
    shutdown: CancellationToken,
) -> std::io::Result<(SocketAddr, Arc<Backend>)> {
    let listener = TcpListener::bind(addr).await?;
    let local = listener.local_addr()?;
    let backend = Backend::new(name);
    tokio::spawn(backend.clone().serve(listener, shutdown));
    Ok((local, backend))
}

#[cfg(test)]
mod tests {
    use super::*;

    async fn get(addr: SocketAddr, path: &str) -> String {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\n\r\n").as_bytes())
            .await
            .unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        out
    }

    #[tokio::test]
    async fn answers_name_health_and_echo() {
        let shutdown = CancellationToken::new();
        let (addr, _b) = start("b-1", "127.0.0.1:0".parse().unwrap(), shutdown.clone())
            .await
            .unwrap();
        assert!(get(addr, "/").await.ends_with("\r\n\r\nb-1\n"));
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        get(addr, "/fail").await;
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 500"));
        get(addr, "/recover").await;
        assert!(get(addr, "/healthz").await.starts_with("HTTP/1.1 200"));
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"ping").await.unwrap();
        s.shutdown().await.unwrap();
        let mut out = String::new();
        s.read_to_string(&mut out).await.unwrap();
        assert_eq!(out, "b-1\nping");
        // A silent client gets the name.
        let mut s = TcpStream::connect(addr).await.unwrap();
        let mut line = [0u8; 4];
        s.read_exact(&mut line).await.unwrap();
        assert_eq!(&line, b"b-1\n");
        shutdown.cancel();
    }
}
