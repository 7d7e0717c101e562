//! The etcd client as both loops use it: one member at a time, failover to
//! the next, request timeout.
//!
//! etcd-client's own multi-endpoint client is a tonic balance channel: a
//! member that died stays "ready" in it (its reconnect error is handed to
//! the next call), so a share of every request, and any new watch or lease
//! keepalive stream, goes to the dead member and fails, retried after a
//! growing backoff. Instead each loop holds a client of ONE member, checked
//! by a status call when connecting (which, leader required, also refuses a
//! member cut off from the quorum), and on any error moves to the next
//! member in the list, at once.

use std::path::Path;
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, Identity, TlsOptions};

use crate::config::{EtcdConfig, EtcdTls};

/// One etcd request at most this long (a watch stream is not a request).
const CALL_TIMEOUT: Duration = Duration::from_secs(3);
/// Connecting to one member and its status call, at most.
const MEMBER_TIMEOUT: Duration = Duration::from_secs(2);
/// The TCP (and TLS) connect to one member, at most.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(1);
/// Between HTTP/2 keepalive pings (above etcd's 5 s minimum).
const KEEPALIVE_INTERVAL: Duration = Duration::from_secs(6);

/// The members of one loop and the one it uses.
pub struct Members {
    /// Which loop, for the log.
    role: &'static str,
    /// Where the next connect starts.
    next: usize,
    /// The member of the client handed out last.
    current: Option<usize>,
}

impl Members {
    pub fn new(role: &'static str) -> Self {
        Self {
            role,
            next: 0,
            current: None,
        }
    }

    /// A client of the first member, from the one after the member used
    /// last (it failed, or its loop would not reconnect), that answers a
    /// status call with a leader.
    pub async fn connect(&mut self, config: &EtcdConfig) -> Result<Client, etcd_client::Error> {
        let n = config.endpoints.len();
        if let Some(c) = self.current.take() {
            self.next = (c + 1) % n;
        }
        let mut last = None;
        for i in (0..n).map(|k| (self.next + k) % n) {
            let endpoint = &config.endpoints[i];
            match member(config, endpoint).await {
                Ok(client) => {
                    tracing::info!(role = self.role, member = %endpoint, "etcd: using member");
                    self.current = Some(i);
                    return Ok(client);
                }
                Err(e) => {
                    tracing::debug!(role = self.role, member = %endpoint, error = %e, "etcd: member not usable");
                    last = Some((endpoint, e));
                }
            }
        }
        let (endpoint, e) = last.expect("at least one endpoint");
        Err(etcd_client::Error::EndpointError(format!(
            "no etcd member usable (the last, {endpoint}: {e})"
        )))
    }
}

/// A client of one member, checked; the error with its causes.
async fn member(config: &EtcdConfig, endpoint: &str) -> Result<Client, String> {
    let attempt = async {
        let mut client = Client::connect([endpoint], Some(options(config)?)).await?;
        client.status().await?;
        Ok(client)
    };
    match tokio::time::timeout(MEMBER_TIMEOUT, attempt).await {
        Ok(r) => r.map_err(|e| describe(&e)),
        Err(_) => Err(format!("no answer in {MEMBER_TIMEOUT:?}")),
    }
}

fn options(config: &EtcdConfig) -> Result<ConnectOptions, etcd_client::Error> {
    let mut options = ConnectOptions::new()
        .with_connect_timeout(CONNECT_TIMEOUT)
        // HTTP/2 pings find a hung member (connections open, nothing
        // answers). No oftener than etcd allows: its server refuses pings
        // closer than `--grpc-keepalive-min-time` (5 s by default) and, after
        // two, closes the connection (GOAWAY too_many_pings): at 1 s every
        // watch was cut every 4 s, idle or not.
        .with_keep_alive(KEEPALIVE_INTERVAL, Duration::from_secs(3))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if let Some((user, password)) = &config.user {
        options = options.with_user(user.clone(), password.clone());
    }
    if let Some(tls) = &config.tls {
        options = options.with_tls(tls_options(tls)?);
    }
    Ok(options)
}

/// The PEM files, read now (a renewed certificate is taken at the next
/// connect).
fn tls_options(tls: &EtcdTls) -> Result<TlsOptions, etcd_client::Error> {
    let read = |key: &str, path: &Path| {
        std::fs::read(path).map_err(|e| {
            etcd_client::Error::IoError(std::io::Error::new(
                e.kind(),
                format!("cannot read `{key}` {}: {e}", path.display()),
            ))
        })
    };
    let mut options = TlsOptions::new().ca_certificate(Certificate::from_pem(read("ca", &tls.ca)?));
    if let Some((cert, key)) = &tls.identity {
        options = options.identity(Identity::from_pem(read("cert", cert)?, read("key", key)?));
    }
    Ok(options)
}

/// An error with its chain of causes (tonic's transport errors say little
/// on their own: the cause holds "connection refused" or the TLS verdict).
pub fn describe(e: &etcd_client::Error) -> String {
    let mut out = e.to_string();
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        let text = s.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = s.source();
    }
    out
}

/// A request with [`CALL_TIMEOUT`].
pub async fn call<T>(
    f: impl Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, etcd_client::Error> {
    tokio::time::timeout(CALL_TIMEOUT, f)
        .await
        .map_err(|_| etcd_client::Error::EndpointError(format!("no answer in {CALL_TIMEOUT:?}")))?
}
