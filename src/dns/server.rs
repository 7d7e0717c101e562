//! The running responder: what its loops share ([`Shared`]), and the
//! [`DnsServer`] handle that supervises them. Each UDP thread and the TCP
//! accept task report how they ended; [`DnsServer::join`] turns an end
//! outside shutdown, or any panic, into an error that names the loop.

use std::any::Any;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use tokio::sync::oneshot;
use tokio::task::{JoinHandle, JoinSet};
use tokio_util::sync::CancellationToken;

use super::error::DnsError;
use super::fast::FastCache;
use super::handler::Handler;
use super::slots::ForwardSlots;
use super::tally::DnsMetrics;

/// Forwarded queries in flight at once (beyond: SERVFAIL at once).
const MAX_FORWARDS: usize = 4096;
/// The shared TCP fast-path cache: bytes of answers, negative answers.
const TCP_CACHE_BYTES: usize = 4 << 20;
const TCP_CACHE_NEGATIVES: usize = 4096;
/// Of the forward slots, what one client address may hold.
const CLIENT_FORWARDS: usize = MAX_FORWARDS / 16;

/// What every serving loop shares.
pub struct Shared {
    pub handler: Handler,
    pub forwards: Arc<ForwardSlots>,
    /// The fast-path cache of every TCP connection together: one bounded
    /// cache, not one per connection (~840 KiB each under a flood).
    pub tcp_cache: Mutex<FastCache>,
    pub metrics: DnsMetrics,
    #[cfg(test)]
    pub faults: Faults,
}

impl Shared {
    pub fn new(handler: Handler) -> Self {
        Self {
            handler,
            forwards: ForwardSlots::new(MAX_FORWARDS, CLIENT_FORWARDS),
            tcp_cache: Mutex::new(FastCache::new(TCP_CACHE_BYTES, TCP_CACHE_NEGATIVES)),
            metrics: DnsMetrics::default(),
            #[cfg(test)]
            faults: Faults::default(),
        }
    }
}

/// Test-only faults: each makes one loop die the next time it looks.
#[cfg(test)]
#[derive(Debug, Default)]
pub struct Faults {
    /// One UDP thread panics (checked every packet and every poll).
    pub udp_panic: std::sync::atomic::AtomicBool,
    /// One UDP thread returns as if its socket was gone.
    pub udp_end: std::sync::atomic::AtomicBool,
    /// The TCP accept loop panics after its next accept.
    pub tcp_panic: std::sync::atomic::AtomicBool,
}

#[cfg(test)]
impl Faults {
    /// Takes a fault: true once after it was set.
    pub fn take(flag: &std::sync::atomic::AtomicBool) -> bool {
        flag.swap(false, std::sync::atomic::Ordering::SeqCst)
    }
}

/// How one loop ended.
enum Ended {
    Returned,
    Panicked(String),
    /// The task was cancelled (the runtime is shutting down) or its thread vanished.
    Lost(String),
}

/// One UDP thread, seen from its supervisor.
struct UdpThread {
    name: String,
    ended: oneshot::Receiver<Ended>,
}

/// The running responder.
pub struct DnsServer {
    /// Where UDP and TCP listen (the real port when the config said 0).
    pub local_addr: SocketAddr,
    shutdown: CancellationToken,
    udp: Vec<UdpThread>,
    tcp: Option<JoinHandle<()>>,
    /// Other loops (DoT and DoH), by name.
    tasks: Vec<(String, JoinHandle<()>)>,
    #[cfg(test)]
    pub(crate) shared: Arc<Shared>,
}

impl DnsServer {
    pub fn new(local_addr: SocketAddr, shared: &Arc<Shared>, shutdown: CancellationToken) -> Self {
        #[cfg(not(test))]
        let _ = shared;
        Self {
            local_addr,
            shutdown,
            udp: Vec::new(),
            tcp: None,
            tasks: Vec::new(),
            #[cfg(test)]
            shared: shared.clone(),
        }
    }

    /// Runs `body` on a new OS thread named `name`, watched by [`join`](Self::join).
    pub fn spawn_udp_thread(
        &mut self,
        name: String,
        body: impl FnOnce() + Send + 'static,
    ) -> std::io::Result<()> {
        let (tx, ended) = oneshot::channel();
        std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                let end = match std::panic::catch_unwind(AssertUnwindSafe(body)) {
                    Ok(()) => Ended::Returned,
                    Err(payload) => Ended::Panicked(panic_message(payload)),
                };
                let _ = tx.send(end);
            })?;
        self.udp.push(UdpThread { name, ended });
        Ok(())
    }

    /// The TCP accept task, watched by [`join`](Self::join).
    pub fn set_tcp_task(&mut self, task: JoinHandle<()>) {
        self.tcp = Some(task);
    }

    /// Another loop (DoT, DoH) named `name`, watched by [`join`](Self::join).
    pub fn add_task(&mut self, name: &str, task: JoinHandle<()>) {
        self.tasks.push((name.to_string(), task));
    }

    /// Waits for every loop. `Ok` once all of them ended after the shutdown
    /// token was cancelled (open TCP connections finish the query they are
    /// reading; UDP threads notice within `udp::UDP_POLL`). An error, as
    /// soon as it happens, when a loop panics or ends before shutdown.
    pub async fn join(self) -> Result<(), DnsError> {
        let mut loops = JoinSet::new();
        for t in self.udp {
            loops.spawn(async move {
                let end = (t.ended.await).unwrap_or_else(|_| Ended::Lost("vanished".into()));
                (format!("UDP loop {}", t.name), end)
            });
        }
        let tcp = self.tcp.map(|t| ("TCP accept loop".to_string(), t));
        for (name, task) in tcp.into_iter().chain(self.tasks) {
            loops.spawn(async move {
                let end = match task.await {
                    Ok(()) => Ended::Returned,
                    Err(e) if e.is_panic() => Ended::Panicked(panic_message(e.into_panic())),
                    Err(e) => Ended::Lost(e.to_string()),
                };
                (name, end)
            });
        }
        while let Some(done) = loops.join_next().await {
            let (task, end) = done.map_err(|e| DnsError::Died {
                task: "dns supervisor".into(),
                end: e.to_string(),
            })?;
            let end = match end {
                Ended::Panicked(msg) => format!("panicked: {msg}"),
                Ended::Lost(why) => format!("was lost: {why}"),
                Ended::Returned if !self.shutdown.is_cancelled() => "ended before shutdown".into(),
                Ended::Returned => continue,
            };
            return Err(DnsError::Died { task, end });
        }
        Ok(())
    }
}

fn panic_message(payload: Box<dyn Any + Send>) -> String {
    match payload.downcast::<String>() {
        Ok(s) => *s,
        Err(payload) => payload
            .downcast_ref::<&str>()
            .map_or_else(|| "a non-string panic".into(), |s| (*s).to_string()),
    }
}

#[cfg(test)]
mod tests;
