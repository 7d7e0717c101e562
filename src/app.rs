//! Wiring: builds every loop from the config, connects them with channels,
//! and runs them until shutdown. The only module that knows every part.

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

use crate::config::{Config, ConfigErrors, SourceConfig};
use crate::registry::{self, Reader};
use crate::sources::{Source, docker::DockerSource, file::FileSource};

/// Why beacon could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// Bad config or services file: exit code 2.
    #[error("{0}")]
    Config(#[from] ConfigErrors),
    /// Anything else (a port in use, ...): exit code 1.
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
    tasks: Vec<JoinHandle<()>>,
}

/// Builds the configured sources (reading files once: a broken one is a
/// config error), plus `extra` ones (the dev demo).
pub fn build_sources(config: &Config) -> Result<Vec<Box<dyn Source>>, StartError> {
    let defaults = config.service_defaults();
    let mut out: Vec<Box<dyn Source>> = Vec::new();
    for s in &config.sources {
        match s {
            SourceConfig::File { path } => {
                out.push(Box::new(FileSource::load(path, defaults.clone())?))
            }
            SourceConfig::Docker { socket, network } => out.push(Box::new(DockerSource::new(
                socket.clone(),
                network.clone(),
                defaults.clone(),
            ))),
        }
    }
    Ok(out)
}

/// Starts every loop. Returns once every listener is bound.
pub async fn start(
    config: Config,
    extra_sources: Vec<Box<dyn Source>>,
    shutdown: CancellationToken,
) -> Result<Running, StartError> {
    // The recorder first: loops may cache metric handles when they start.
    let metrics = crate::telemetry::metrics();
    let mut sources = build_sources(&config)?;
    sources.extend(extra_sources);
    let ids = sources.iter().map(|s| s.id()).collect();
    let (handle, reader, registry_task) =
        registry::spawn(ids, config.startup_timeout, shutdown.clone());
    let mut tasks = vec![registry_task];
    for source in sources {
        let id = source.id();
        let task = source.run(handle.clone(), shutdown.clone());
        tasks.push(tokio::spawn(tracing::Instrument::instrument(
            task,
            tracing::info_span!("source", source.id = %id),
        )));
    }
    // Passive health signals: the proxy's connect outcomes feed health.
    let (outcomes_tx, outcomes_rx) = tokio::sync::mpsc::channel(4096);
    tasks.push(crate::health::spawn(
        reader.clone(),
        handle.clone(),
        outcomes_rx,
        shutdown.clone(),
    ));
    let dns_addr = if config.dns.enabled {
        let dns = crate::dns::spawn(&config.dns, reader.clone(), shutdown.clone())
            .await
            .map_err(|e| anyhow::anyhow!(e))?;
        let addr = dns.local_addr;
        tasks.push(tokio::spawn(async move {
            if let Err(e) = dns.join().await {
                tracing::error!(error = %e, "dns stopped");
            }
        }));
        Some(addr)
    } else {
        None
    };
    let proxy = config.proxy.enabled.then(|| {
        crate::proxy::spawn(
            &config.proxy,
            reader.clone(),
            outcomes_tx.clone(),
            shutdown.clone(),
        )
    });
    let admin_addr = match config.admin.listen {
        Some(addr) => {
            let (local, task) =
                crate::admin::spawn(addr, reader.clone(), metrics, shutdown.clone())
                    .await
                    .map_err(|e| anyhow::anyhow!("admin: cannot listen on {addr}: {e}"))?;
            tracing::info!(addr = %local, "admin listening");
            tasks.push(task);
            Some(local)
        }
        None => None,
    };
    let mut ready = reader.clone();
    tasks.push(tokio::spawn(async move {
        if let Some(snap) = ready.ready().await {
            tracing::info!(
                services = snap.services.len(),
                endpoints = snap.endpoint_count(),
                "ready"
            );
        }
    }));
    Ok(Running {
        reader,
        admin_addr,
        dns_addr,
        outcomes: outcomes_tx,
        proxy,
        drain_timeout: config.proxy.drain_timeout.unwrap_or(config.shutdown_grace),
        tasks,
    })
}

impl Running {
    /// After `shutdown` was cancelled: waits up to `grace` for every loop.
    pub async fn stop(self, grace: Duration) {
        let proxy = self.proxy;
        let drain = self.drain_timeout.min(grace);
        let all = async move {
            // Live connections drain while the other loops finish.
            let drained = async move {
                if let Some(p) = proxy {
                    p.drain(drain).await;
                }
            };
            tokio::join!(drained, futures_join(self.tasks));
        };
        if tokio::time::timeout(grace, all).await.is_err() {
            tracing::warn!(?grace, "shutdown grace passed; closing what is left");
        }
    }
}

async fn futures_join(tasks: Vec<JoinHandle<()>>) {
    for t in tasks {
        let _ = t.await;
    }
}

/// Runs until `shutdown` is cancelled, then drains within the grace.
pub async fn run(
    config: Config,
    extra_sources: Vec<Box<dyn Source>>,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let grace = config.shutdown_grace;
    let running = start(config, extra_sources, shutdown.clone()).await?;
    shutdown.cancelled().await;
    tracing::info!("shutting down");
    running.stop(grace).await;
    Ok(())
}

/// `beacon dev`: the demo config, three demo backends, and a `web` service.
pub mod dev {
    use std::net::{IpAddr, SocketAddr};

    use tokio_util::sync::CancellationToken;

    use crate::config::Config;
    use crate::model::{Endpoint, Port, Protocol, ServiceKey, ServiceSpec};
    use crate::sources::{Source, StaticSource};

    /// The text of `config/dev.toml`.
    pub const DEV_CONFIG: &str = include_str!("../config/dev.toml");
    /// Where `dev` proxies `web`.
    pub const WEB_LISTEN: &str = "127.0.0.1:8080";

    /// Where the demo listens; the defaults are the documented ones.
    #[derive(Clone, Debug)]
    pub struct DevOptions {
        pub dns: SocketAddr,
        pub admin: SocketAddr,
        pub web: SocketAddr,
    }

    impl Default for DevOptions {
        fn default() -> Self {
            Self {
                dns: "127.0.0.1:1053".parse().unwrap(),
                admin: "127.0.0.1:9153".parse().unwrap(),
                web: WEB_LISTEN.parse().unwrap(),
            }
        }
    }

    /// Starts the demo backends and returns the config and the demo source.
    pub async fn prepare(
        opts: &DevOptions,
        shutdown: CancellationToken,
    ) -> std::io::Result<(Config, Vec<Box<dyn Source>>)> {
        let mut config = Config::parse(
            DEV_CONFIG,
            std::path::Path::new("<dev>"),
            std::path::Path::new(""),
        )
        .expect("the embedded dev config is valid (a test checks it)");
        config.dns.listen = opts.dns;
        config.admin.listen = Some(opts.admin);
        let mut web = ServiceSpec::new(ServiceKey::new("default", "web"));
        web.health = config.health.clone();
        web.proxy = config.proxy.defaults.clone();
        web.ports.push(Port {
            name: "http".into(),
            port: 8080,
            target_port: 8080,
            protocol: Protocol::Tcp,
            listen: Some(opts.web),
        });
        for i in 0..3u8 {
            let ip = IpAddr::from([127, 0, 0, 11 + i]);
            let name = format!("web-{i}");
            let (addr, _) =
                crate::backend::start(&name, SocketAddr::new(ip, 0), shutdown.clone()).await?;
            let mut ep = Endpoint::new(ip);
            ep.hostname = Some(name.as_str().into());
            ep.port = Some(addr.port());
            web.endpoints.push(ep);
            tracing::info!(backend = %name, %addr, "demo backend listening");
        }
        let source: Box<dyn Source> = Box::new(StaticSource {
            id: "dev".into(),
            services: vec![web],
        });
        Ok((config, vec![source]))
    }
}
