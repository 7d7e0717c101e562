//! In-process tests of the whole proxy: a real registry, real sockets on
//! 127.0.0.0/8, backends that say who they are. One file per file under
//! test; the harness and the backends and clients they share are here.
//!
//! Deadlines run on paused tokio time where the wait involves no bytes in
//! flight between tasks (bind retry, accept backoff, drain grace): with
//! time paused, tokio jumps the clock to the next timer whenever the
//! runtime has nothing to run, also while loopback bytes are between two
//! of its tasks, so a test whose deadline races real traffic (the idle
//! timeout of a busy connection, a drain that ends early) keeps real time.

mod access_log;
mod balancer;
mod conn;
mod ipv6;
mod lifecycle;
mod listener;
mod reconcile;
mod slow_start;
mod udp;

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpSocket, TcpStream};
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use super::reconcile::Reconciler;
use super::shared::Shared;
use super::{Options, Proxy, ProxyError, copy, spawn_with};
use crate::config::ProxyConfig;
use crate::model::{Balance, ConnectOutcome, Endpoint, Port, Protocol, ServiceKey, ServiceSpec};
use crate::registry::{self, Handle, Reader, Update};

const T: Duration = Duration::from_secs(10);

// --- backends -------------------------------------------------------------

/// A backend that greets with `name\n`, then echoes until EOF.
struct Banner {
    addr: SocketAddr,
    accepted: Arc<AtomicUsize>,
}

async fn banner_backend(ip: &str, name: &str) -> Banner {
    let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let greeting = format!("{name}\n").into_bytes();
    tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = l.accept().await else {
                // EMFILE in the descriptor test: wait, do not die.
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            };
            count.fetch_add(1, Ordering::SeqCst);
            let greeting = greeting.clone();
            tokio::spawn(async move {
                if s.write_all(&greeting).await.is_err() {
                    return;
                }
                let (mut r, mut w) = s.split();
                let _ = tokio::io::copy(&mut r, &mut w).await;
                let _ = w.shutdown().await;
            });
        }
    });
    Banner { addr, accepted }
}

/// A backend that hands each accepted stream to the test.
async fn scripted_backend(ip: &str) -> (SocketAddr, mpsc::Receiver<TcpStream>) {
    let l = TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0))
        .await
        .unwrap();
    let addr = l.local_addr().unwrap();
    let (tx, rx) = mpsc::channel(64);
    tokio::spawn(async move {
        while let Ok((s, _)) = l.accept().await {
            if tx.send(s).await.is_err() {
                return;
            }
        }
    });
    (addr, rx)
}

/// An address where nothing listens (connection refused).
fn refusing_addr(ip: &str) -> SocketAddr {
    let l = std::net::TcpListener::bind((ip.parse::<IpAddr>().unwrap(), 0)).unwrap();
    l.local_addr().unwrap()
}

// --- the proxy under test ---------------------------------------------------

fn service(name: &str, listen: &str, endpoints: &[SocketAddr], balance: Balance) -> ServiceSpec {
    let mut s = ServiceSpec::new(ServiceKey::new("default", name));
    s.balance = balance;
    s.ports = vec![Port {
        name: "tcp".into(),
        port: 80,
        target_port: 80,
        protocol: Protocol::Tcp,
        listen: Some(listen.parse().unwrap()),
    }];
    s.endpoints = endpoints
        .iter()
        .map(|a| Endpoint {
            port: Some(a.port()),
            ..Endpoint::new(a.ip())
        })
        .collect();
    s
}

fn weighted(mut s: ServiceSpec, weights: &[u32]) -> ServiceSpec {
    for (e, w) in s.endpoints.iter_mut().zip(weights) {
        e.weight = *w;
    }
    s
}

struct Harness {
    handle: Handle,
    reader: Reader,
    proxy: Option<Proxy>,
    /// The reconcile loop, run as the app runs it.
    task: JoinHandle<Result<(), ProxyError>>,
    shutdown: CancellationToken,
    outcomes: mpsc::Receiver<ConnectOutcome>,
}

fn proxy_config(max_connections: usize) -> ProxyConfig {
    ProxyConfig {
        enabled: true,
        max_connections,
        defaults: Default::default(),
        drain_timeout: None,
        access_log: None,
        vip_interface: None,
        udp_max_flows: 65_536,
        splice: Default::default(),
    }
}

/// A registry (ready once every one of `sources` has synced; none: at
/// once) and a proxy reading it.
fn harness_with(max_connections: usize, mode: copy::Mode, sources: &[&str]) -> Harness {
    harness_config(&proxy_config(max_connections), mode, sources)
}

/// [`harness_with`] over a whole proxy config.
fn harness_config(cfg: &ProxyConfig, mode: copy::Mode, sources: &[&str]) -> Harness {
    let shutdown = CancellationToken::new();
    let (handle, reader, _task) = registry::spawn(
        sources.iter().map(|s| (*s).into()).collect(),
        Duration::from_secs(600),
        shutdown.clone(),
    );
    let (tx, outcomes) = mpsc::channel(1024);
    let (proxy, task) = spawn_with(
        cfg,
        reader.clone(),
        tx,
        shutdown.clone(),
        Options { copy_mode: mode },
    );
    Harness {
        handle,
        reader,
        proxy: Some(proxy),
        task: tokio::spawn(task),
        shutdown,
        outcomes,
    }
}

fn harness() -> Harness {
    harness_with(10_000, copy::Mode::Auto, &[])
}

impl Harness {
    fn proxy(&self) -> &Proxy {
        self.proxy.as_ref().unwrap()
    }

    /// Publishes `specs` as source `source`'s whole truth and waits until
    /// the proxy has applied the resulting snapshot.
    async fn reset_from(&self, source: &str, specs: Vec<ServiceSpec>) {
        let before = self.reader.current().version;
        assert!(
            self.handle
                .source(&source.into(), Update::Reset(specs))
                .await
        );
        let deadline = Instant::now() + T;
        loop {
            let v = self.reader.current().version;
            if v > before && self.proxy().applied_version() >= v {
                return;
            }
            assert!(Instant::now() < deadline, "proxy never applied the update");
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }

    async fn set(&self, specs: Vec<ServiceSpec>) {
        self.reset_from("test", specs).await;
    }

    /// Serves one round-robin service over one endpoint; the bound address.
    async fn serve_one(&self, name: &str, listen: &str, endpoint: SocketAddr) -> SocketAddr {
        self.set(vec![service(
            name,
            listen,
            &[endpoint],
            Balance::RoundRobin,
        )])
        .await;
        self.addr(listen).await
    }

    /// The bound address of a configured listener, once it is open.
    async fn addr(&self, configured: &str) -> SocketAddr {
        let configured: SocketAddr = configured.parse().unwrap();
        let deadline = Instant::now() + T;
        loop {
            if let Some(a) = self.proxy().bound_addr(configured) {
                return a;
            }
            assert!(
                Instant::now() < deadline,
                "listener {configured} never opened"
            );
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
    }
}

// --- clients ----------------------------------------------------------------

/// Reads one `\n`-terminated line; None on EOF or reset before it.
async fn read_line(s: &mut TcpStream) -> Option<String> {
    let mut line = Vec::new();
    let mut byte = [0u8; 1];
    loop {
        match tokio::time::timeout(T, s.read(&mut byte))
            .await
            .expect("read timed out")
        {
            Ok(0) | Err(_) => return None,
            Ok(_) if byte[0] == b'\n' => return Some(String::from_utf8(line).unwrap()),
            Ok(_) => line.push(byte[0]),
        }
    }
}

/// Connects and reads the backend's name (None: the proxy closed it).
async fn greet(addr: SocketAddr) -> (TcpStream, Option<String>) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let name = read_line(&mut s).await;
    (s, name)
}

async fn greet_from(client_ip: &str, addr: SocketAddr) -> Option<String> {
    let sock = TcpSocket::new_v4().unwrap();
    sock.bind((client_ip.parse::<IpAddr>().unwrap(), 0).into())
        .unwrap();
    let mut s = sock.connect(addr).await.unwrap();
    read_line(&mut s).await
}

fn tally<'a>(names: impl IntoIterator<Item = &'a str>) -> HashMap<String, usize> {
    let mut m = HashMap::new();
    for n in names {
        *m.entry(n.to_string()).or_default() += 1;
    }
    m
}

/// True when the peer reset the connection within the timeout (a forced
/// close: not EOF, which would look like a complete stream).
async fn reset_within(s: &mut TcpStream, within: Duration) -> bool {
    let mut buf = [0u8; 64];
    match tokio::time::timeout(within, s.read(&mut buf)).await {
        Ok(Err(e)) => e.kind() == std::io::ErrorKind::ConnectionReset,
        _ => false,
    }
}

async fn three_backends() -> (Banner, Banner, Banner) {
    (
        banner_backend("127.0.0.11", "a").await,
        banner_backend("127.0.0.12", "b").await,
        banner_backend("127.0.0.13", "c").await,
    )
}

/// A reconciler the test drives by hand (no task) with shared state of its
/// own, so the test can read what the reconciler owns.
fn driven() -> (Reconciler, Arc<Shared>, mpsc::Receiver<ConnectOutcome>) {
    let (tx, outcomes) = mpsc::channel(1024);
    let shared = Arc::new(Shared::new(10_000, tx, copy::Mode::Auto));
    let rec = Reconciler::new(
        shared.clone(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    (rec, shared, outcomes)
}
