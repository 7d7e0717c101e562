//! DNS over HTTPS (RFC 8484): `GET /dns-query?dns=<base64url>` and
//! `POST /dns-query` with an `application/dns-message` body, over HTTP/2
//! or HTTP/1.1 (ALPN `h2`, `http/1.1`), on hyper and tokio-rustls (ring).
//!
//! Not on hickory-server: its 0.26 DoH answers POST only (a GET is
//! refused, "GET unimplemented" in hickory-net's `h2.rs`), and RFC 8484
//! makes GET the cache-friendly form clients use.
//! The answers come from an [`Answer`] (beacon's `Encrypted`): the handler,
//! snapshot, caches, forwarder, ACL and metrics of UDP and TCP (`proto` =
//! `doh`).
//!
//! Limits: at most [`MAX_CONNECTIONS`] connections (more are closed at
//! accept), the TLS handshake and an HTTP/1.1 request's headers within the
//! listener's timeout, HTTP/2 peers pinged at that interval and dropped when
//! they stop answering, bodies of at most 65,535 bytes. On shutdown the
//! listener stops accepting, and open connections finish the requests in
//! flight (HTTP/2 GOAWAY) for at most [`DRAIN`].

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::{DecodePaddingMode, GeneralPurpose, GeneralPurposeConfig};
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{ALLOW, CONTENT_LENGTH, CONTENT_TYPE, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::tls::{self, CertStore};

/// The DoH path (RFC 8484).
pub const DOH_PATH: &str = "/dns-query";
/// The media type of a DNS message in HTTP.
pub const DNS_MESSAGE: &str = "application/dns-message";
/// Connections served at once; more are closed as they arrive.
pub const MAX_CONNECTIONS: usize = 1024;
/// How long open connections may take to finish after shutdown.
pub const DRAIN: Duration = Duration::from_secs(1);
/// The largest DNS message (and so request body).
const MAX_MESSAGE: usize = 65_535;

/// What answers one DNS message from a peer: the bytes to send back, or
/// `None` when nothing is to be sent (a response sent to us).
pub trait Answer: Send + Sync + 'static {
    fn answer(
        &self,
        bytes: Vec<u8>,
        peer: SocketAddr,
    ) -> impl Future<Output = Option<Vec<u8>>> + Send;
}

/// base64url as RFC 8484 has it (no padding), also taking padded input.
const BASE64URL: GeneralPurpose = GeneralPurpose::new(
    &base64::alphabet::URL_SAFE,
    GeneralPurposeConfig::new().with_decode_padding_mode(DecodePaddingMode::Indifferent),
);

/// Serves DoH on `listener` until `shutdown`, then drains for [`DRAIN`].
pub async fn serve<A: Answer>(
    listener: TcpListener,
    answer: Arc<A>,
    certs: Arc<CertStore>,
    timeout: Duration,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    // ALPN: h2, then HTTP/1.1.
    let accept = tls::Accept {
        acceptor: tls::acceptor(certs, &[b"h2", b"http/1.1"]).map_err(std::io::Error::other)?,
        max_connections: MAX_CONNECTIONS,
        handshake: timeout,
        what: "doh",
    };
    let tasks = TaskTracker::new();
    let stop = shutdown.clone();
    accept
        .run(listener, &shutdown, &tasks, move |stream, peer| {
            connection(stream, peer, answer.clone(), timeout, stop.clone())
        })
        .await;
    tasks.close();
    let _ = tokio::time::timeout(DRAIN, tasks.wait()).await;
    Ok(())
}

/// One TLS connection: HTTP/2 or HTTP/1.1 as ALPN chose.
async fn connection<A: Answer>(
    stream: tokio_rustls::server::TlsStream<tokio::net::TcpStream>,
    peer: SocketAddr,
    answer: Arc<A>,
    timeout: Duration,
    shutdown: CancellationToken,
) {
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(timeout);
    builder
        .http2()
        .timer(TokioTimer::new())
        .keep_alive_interval(timeout)
        .keep_alive_timeout(timeout);
    let service = hyper::service::service_fn(move |req| {
        let answer = answer.clone();
        async move { Ok::<_, Infallible>(respond(&*answer, req, peer).await) }
    });
    let conn = builder.serve_connection(TokioIo::new(stream), service);
    tokio::pin!(conn);
    let ended = tokio::select! {
        r = conn.as_mut() => Some(r),
        _ = shutdown.cancelled() => None,
    };
    let result = match ended {
        Some(r) => r,
        None => {
            conn.as_mut().graceful_shutdown();
            conn.await
        }
    };
    if let Err(e) = result {
        tracing::debug!(error = %e, %peer, "dns doh connection");
    }
}

/// The HTTP answer to one request.
async fn respond<A: Answer>(
    answer: &A,
    req: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Full<Bytes>> {
    if req.uri().path() != DOH_PATH {
        drain(req.into_body()).await;
        return status(StatusCode::NOT_FOUND);
    }
    let query = match *req.method() {
        Method::GET => match get_message(req.uri().query()) {
            Ok(bytes) => bytes,
            Err(code) => return status(code),
        },
        Method::POST => match post_message(req).await {
            Ok(bytes) => bytes,
            Err(code) => return status(code),
        },
        _ => {
            drain(req.into_body()).await;
            let mut r = status(StatusCode::METHOD_NOT_ALLOWED);
            r.headers_mut()
                .insert(ALLOW, HeaderValue::from_static("GET, POST"));
            return r;
        }
    };
    match answer.answer(query, peer).await {
        Some(reply) => {
            // As other DoH servers do (hyper's HTTP/2 sends none by itself).
            let len = HeaderValue::from(reply.len());
            let mut r = Response::new(Full::new(Bytes::from(reply)));
            let headers = r.headers_mut();
            headers.insert(CONTENT_TYPE, HeaderValue::from_static(DNS_MESSAGE));
            headers.insert(CONTENT_LENGTH, len);
            r
        }
        // A response sent to us, or no readable header.
        None => status(StatusCode::BAD_REQUEST),
    }
}

/// The message of a GET: the `dns` parameter, base64url.
pub fn get_message(query: Option<&str>) -> Result<Vec<u8>, StatusCode> {
    let value = query
        .unwrap_or("")
        .split('&')
        .find_map(|kv| kv.strip_prefix("dns="))
        .ok_or(StatusCode::BAD_REQUEST)?;
    let bytes = BASE64URL
        .decode(value)
        .map_err(|_| StatusCode::BAD_REQUEST)?;
    if bytes.len() > MAX_MESSAGE {
        return Err(StatusCode::URI_TOO_LONG);
    }
    Ok(bytes)
}

/// The message of a POST: an `application/dns-message` body.
async fn post_message(req: Request<Incoming>) -> Result<Vec<u8>, StatusCode> {
    let typed = req
        .headers()
        .get(CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| {
            v.split(';')
                .next()
                .unwrap_or("")
                .trim()
                .eq_ignore_ascii_case(DNS_MESSAGE)
        });
    if !typed {
        drain(req.into_body()).await;
        return Err(StatusCode::UNSUPPORTED_MEDIA_TYPE);
    }
    let body = Limited::new(req.into_body(), MAX_MESSAGE)
        .collect()
        .await
        .map_err(|_| StatusCode::PAYLOAD_TOO_LARGE)?;
    Ok(body.to_bytes().to_vec())
}

/// Reads (and drops) a request body that is refused, up to
/// [`MAX_MESSAGE`] bytes, before the error goes out. Answering an HTTP/2
/// request whose body is still coming makes hyper reset the stream, and
/// curl then reported "Stream error in the HTTP/2 framing layer" instead
/// of the status, now and then (CI saw it on a 415). A larger body is
/// left to that reset, as a 413 is.
async fn drain(body: Incoming) {
    let _ = Limited::new(body, MAX_MESSAGE).collect().await;
}

fn status(code: StatusCode) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = code;
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn get_takes_the_dns_parameter_in_base64url_padded_or_not() {
        let msg = vec![0xab, 0xcd, 0x01, 0x00, 0, 1, 0, 0, 0, 0, 0, 0, 0xff, 0xfe];
        let plain = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(&msg);
        let padded = base64::engine::general_purpose::URL_SAFE.encode(&msg);
        assert_eq!(get_message(Some(&format!("dns={plain}"))), Ok(msg.clone()));
        assert_eq!(get_message(Some(&format!("ct=x&dns={padded}"))), Ok(msg));
        assert_eq!(get_message(None), Err(StatusCode::BAD_REQUEST));
        assert_eq!(get_message(Some("name=x")), Err(StatusCode::BAD_REQUEST));
        // '+' and '/' are base64, not base64url.
        assert_eq!(get_message(Some("dns=q+/q")), Err(StatusCode::BAD_REQUEST));
    }
}
