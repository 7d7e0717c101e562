//! Wiring: builds every loop from the config, connects them with channels,
//! and runs them under supervision until shutdown. The only module that
//! knows every part.
//!
//! - [`supervise`]: the loops in one `JoinSet`; a loop that ends before
//!   shutdown is fatal (exit 1, the loop named in the log).
//! - [`dev`]: the `beacon dev` demo.
//! - [`fds`]: the descriptor limit raised at start, and its budget.

pub mod dev;
pub mod fds;
pub mod supervise;

use std::net::SocketAddr;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigErrors, SourceConfig};
use crate::registry::{self, Reader};
use crate::sources::{Source, docker::DockerSource, file::FileSource};
use supervise::Loops;

/// Why beacon could not start or had to stop.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad config or services file: exit code 2.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// Anything else (a port in use, a loop that died, ...): exit code 1.
    #[error(transparent)]
    Runtime(#[from] anyhow::Error),
}

/// A started beacon.
pub struct Running {
    pub reader: Reader,
    pub admin_addr: Option<SocketAddr>,
    pub dns_addr: Option<SocketAddr>,
    /// Feeds passive health signals (the proxy's connect outcomes).
    pub outcomes: tokio::sync::mpsc::Sender<crate::model::ConnectOutcome>,
    proxy: Option<crate::proxy::Proxy>,
    drain_timeout: Duration,
    /// DNS and admin keep serving this long after shutdown (`[dns] lameduck`).
    lameduck: Duration,
    /// Cancelled once the lameduck is over: DNS and admin stop then.
    serve_stop: CancellationToken,
    loops: Loops,
}

/// Builds the configured sources (reading files once: a broken one is a
/// config error).
pub fn build_sources(config: &Config) -> Result<Vec<Box<dyn Source>>, StartError> {
    let defaults = config.service_defaults();
    let mut out: Vec<Box<dyn Source>> = Vec::new();
    // Claims across file sources, as `check` makes them.
    let mut claims = crate::config::ServicesIndex::default();
    let mut conflicts = Vec::new();
    for s in &config.sources {
        match s {
            SourceConfig::File { path } => {
                let source = FileSource::load(path, defaults.clone())?;
                conflicts.extend(claims.absorb(source.index()));
                out.push(Box::new(source))
            }
            SourceConfig::Docker {
                socket,
                network,
                trust,
            } => out.push(Box::new(
                DockerSource::new(socket.clone(), network.clone(), defaults.clone())
                    .with_trust(trust.clone()),
            )),
            // Built by `start`, once the registry's reader exists.
            SourceConfig::Etcd(_) => {}
            SourceConfig::Kubernetes(k) => out.push(Box::new(
                crate::sources::kubernetes::KubernetesSource::new(k.clone(), defaults.clone()),
            )),
        }
    }
    conflicts.extend(claims.reserved(&config.reserved_addrs()));
    if !conflicts.is_empty() {
        return Err(StartError::Config(ConfigErrors(conflicts)));
    }
    Ok(out)
}

/// The registry and every source under supervision. The etcd source
/// merges the local sources it publishes (a tap on their handle) with every
/// other node's, so it outranks them (see `model::merges_local`).
fn spawn_sources(
    config: &Config,
    sources: Vec<Box<dyn Source>>,
    shutdown: &CancellationToken,
    loops: &mut Loops,
) -> (registry::Handle, Reader) {
    let etcd = config.sources.iter().find_map(|s| match s {
        SourceConfig::Etcd(e) => Some(e.clone()),
        _ => None,
    });
    // The etcd source merges the local sources it publishes with every
    // other node's, so it outranks them (see `model::merges_local`).
    let mut ids: Vec<_> = etcd.iter().map(|_| "etcd".into()).collect();
    ids.extend(sources.iter().map(|s| s.id()));
    let (handle, reader, registry_loop) =
        registry::new(ids, config.startup_timeout, shutdown.clone());
    loops.spawn("registry", registry_loop);
    let (tap_tx, tap_rx) = tokio::sync::mpsc::unbounded_channel();
    let published = |id: &crate::model::SourceId| {
        let cfg = config.sources.iter().find(|c| c.id() == *id);
        etcd.as_ref()
            .is_some_and(|e| e.publish.iter().any(|p| cfg.is_some_and(|c| c.is_named(p))))
    };
    for source in sources {
        let id = source.id();
        crate::sources::register_metrics(&id);
        let h = if published(&id) {
            handle.tapped(tap_tx.clone())
        } else {
            handle.clone()
        };
        loops.spawn(format!("source/{id}"), source.run(h, shutdown.clone()));
    }
    drop(tap_tx);
    if let Some(e) = etcd {
        let source = crate::sources::etcd::EtcdSource::new(
            e,
            config.service_defaults(),
            tap_rx,
            reader.clone(),
        );
        crate::sources::register_metrics(&source.id());
        loops.spawn(
            "source/etcd",
            Box::new(source).run(handle.clone(), shutdown.clone()),
        );
    }
    (handle, reader)
}

/// Starts every loop, plus `extra_sources` (the dev demo). Returns once
/// every listener is bound.
pub async fn start(
    config: Config,
    extra_sources: Vec<Box<dyn Source>>,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    // Before anything opens a descriptor: the soft limit up to the hard
    // one, and a warning if the config's caps cannot fit in it.
    fds::check_budget(&config, fds::raise_nofile_limit());
    for w in &config.warnings {
        tracing::warn!("{w}");
    }
    // The recorder before any loop: loops resolve their metric handles
    // when they start.
    let metrics = crate::telemetry::metrics();
    let mut loops = Loops::new();
    let mut sources = build_sources(&config)?;
    sources.extend(extra_sources);
    let (handle, reader) = spawn_sources(&config, sources, &shutdown, &mut loops);
    // Passive health signals: the proxy's connect outcomes feed health.
    let (outcomes_tx, outcomes_rx) = tokio::sync::mpsc::channel(4096);
    loops.spawn(
        "health",
        crate::health::run(
            reader.clone(),
            handle.clone(),
            outcomes_rx,
            shutdown.clone(),
        ),
    );
    // DNS and admin outlive `shutdown` by the lameduck: DNS answers on,
    // and `/readyz` says 503 so that clients move away first.
    let serve_stop = CancellationToken::new();
    let (dns_addr, lameduck) = start_dns(&config, &reader, &serve_stop, &mut loops).await?;
    let proxy = if config.proxy.enabled {
        let (proxy, reconcile) = crate::proxy::spawn(
            &config.proxy,
            reader.clone(),
            outcomes_tx.clone(),
            shutdown.clone(),
        );
        loops.spawn("proxy", reconcile);
        Some(proxy)
    } else {
        None
    };
    let admin_addr = match config.admin.listen {
        Some(addr) => {
            let live = proxy.as_ref().map(|p| p.live()).unwrap_or_default();
            let stops = (shutdown.clone(), serve_stop.clone());
            Some(start_admin(addr, &reader, metrics, live, stops, &mut loops).await?)
        }
        None => None,
    };
    Ok(Running {
        reader,
        admin_addr,
        dns_addr,
        outcomes: outcomes_tx,
        proxy,
        drain_timeout: config.proxy.drain_timeout.unwrap_or(config.shutdown_grace),
        lameduck,
        serve_stop,
        loops,
    })
}

/// Starts DNS (when enabled) until `serve_stop`; its address and lameduck.
async fn start_dns(
    config: &Config,
    reader: &Reader,
    serve_stop: &CancellationToken,
    loops: &mut Loops,
) -> Result<(Option<SocketAddr>, Duration), StartError> {
    if !config.dns.enabled {
        return Ok((None, Duration::ZERO));
    }
    let dns = crate::dns::spawn(&config.dns, reader.clone(), serve_stop.clone())
        .await
        .map_err(|e| anyhow::anyhow!(e))?;
    let addr = dns.local_addr;
    loops.spawn("dns", dns.join());
    Ok((Some(addr), config.dns.lameduck))
}

/// Binds the admin listener and supervises its loop. `stops`: the
/// shutdown (from then on `/readyz` says 503) and the end of the lameduck
/// (the listener closes then).
async fn start_admin(
    addr: std::net::SocketAddr,
    reader: &Reader,
    metrics: metrics_exporter_prometheus::PrometheusHandle,
    live: std::sync::Arc<crate::model::ProxyLive>,
    stops: (CancellationToken, CancellationToken),
    loops: &mut Loops,
) -> Result<SocketAddr, StartError> {
    let (draining, serve_stop) = stops;
    let (local, serve) =
        crate::admin::bind(addr, reader.clone(), metrics, live, draining, serve_stop)
            .await
            .map_err(|e| anyhow::anyhow!("admin: cannot listen on {addr}: {e}"))?;
    tracing::info!(addr = %local, "admin listening");
    loops.spawn("admin", serve);
    Ok(local)
}

impl Running {
    /// Waits until `shutdown` is cancelled (empty) or loops end before
    /// that (fatal): the first one, and any that end within
    /// [`supervise::SETTLE`] after it, so that a loop whose death takes
    /// others down (the registry) is named beside them.
    pub async fn watch(&mut self, shutdown: &CancellationToken) -> Vec<supervise::Ended> {
        let first = tokio::select! {
            biased;
            _ = shutdown.cancelled() => return Vec::new(),
            ended = self.loops.next_end() => ended,
        };
        if shutdown.is_cancelled() {
            // It ended because of the shutdown.
            return Vec::new();
        }
        let mut ended = vec![first];
        let settle = tokio::time::sleep(supervise::SETTLE);
        tokio::pin!(settle);
        loop {
            tokio::select! {
                _ = &mut settle => break,
                more = self.loops.next_end() => ended.push(more),
            }
        }
        ended
    }

    /// After `shutdown` was cancelled: DNS answers on for the lameduck,
    /// then every loop gets up to `grace` (counted after the lameduck).
    /// `force` (a second SIGTERM/SIGINT) cuts the wait short: what was still
    /// running is logged and aborted, and the result is `Cut`.
    pub async fn stop(mut self, grace: Duration, force: &CancellationToken) -> Stopped {
        let drain = self.drain_timeout.min(grace);
        let proxy = self.proxy.take();
        let loops = &mut self.loops;
        let (lameduck, serve_stop) = (self.lameduck, self.serve_stop.clone());
        if !lameduck.is_zero() {
            tracing::info!(?lameduck, "lameduck: DNS answers on, /readyz says 503");
        }
        let lame = async move {
            tokio::select! {
                _ = tokio::time::sleep(lameduck) => {}
                _ = force.cancelled() => {}
            }
            serve_stop.cancel();
        };
        let all = async {
            tokio::join!(lame, async {
                // Live connections drain while the other loops finish.
                let drained = async {
                    if let Some(p) = &proxy {
                        p.drain(drain).await;
                    }
                };
                tokio::join!(drained, loops.drain());
            });
        };
        let stopped = tokio::select! {
            _ = all => Stopped::Clean,
            _ = tokio::time::sleep(lameduck + grace) => Stopped::GraceOver,
            _ = force.cancelled() => Stopped::Cut,
        };
        if stopped != Stopped::Clean {
            let connections = proxy.as_ref().map_or(0, |p| p.active_connections());
            let running = self.loops.names();
            match stopped {
                Stopped::Cut => tracing::warn!(
                    connections, loops = ?running,
                    "second signal: exiting now; cut the open proxied connections and the loops still running"
                ),
                _ => tracing::warn!(
                    ?grace, connections, loops = ?running,
                    "shutdown grace passed; closing what is left"
                ),
            }
            self.loops.abort_all();
        }
        stopped
    }
}

/// How a shutdown ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stopped {
    /// Every loop finished and the proxy drained within the grace.
    Clean,
    /// The grace passed first.
    GraceOver,
    /// A second signal cut the drain short.
    Cut,
}

/// Runs until `shutdown` is cancelled, then drains within the grace. A
/// loop that ends before shutdown stops everything: `Err`, exit code 1. So
/// does `force` (a second signal) during the drain.
pub async fn run(
    config: Config,
    extra_sources: Vec<Box<dyn Source>>,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> Result<(), StartError> {
    let grace = config.shutdown_grace;
    let mut running = start(config, extra_sources, shutdown.clone()).await?;
    let died = running.watch(&shutdown).await;
    if died.is_empty() {
        tracing::info!("shutting down");
    } else {
        for ended in &died {
            tracing::error!(
                name = %ended.name,
                "{ended} before shutdown; stopping everything (a frozen loop must not leave a stale snapshot served)"
            );
        }
        shutdown.cancel();
    }
    let stopped = running.stop(grace, &force).await;
    if !died.is_empty() {
        let all: Vec<String> = died.iter().map(|e| e.to_string()).collect();
        return Err(StartError::Runtime(anyhow::anyhow!("{}", all.join("; "))));
    }
    if stopped == Stopped::Cut {
        return Err(StartError::Runtime(anyhow::anyhow!(
            "a second signal cut the shutdown short"
        )));
    }
    Ok(())
}
