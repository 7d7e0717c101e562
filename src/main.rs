//! The `beacon` command: parse, load config, start telemetry, run, wait for
//! a signal, drain within the grace.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use beacon::app::{self, StartError};
use beacon::config::{self, Config};
use beacon::telemetry::{self, LogFormat};

#[derive(Parser)]
#[command(
    name = "beacon",
    version,
    about = "Service discovery and load balancing for containers: DNS + zero-copy L4 proxy + health checks"
)]
struct Cli {
    /// Log format on stderr (filter with RUST_LOG, default `info`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run everything (DNS, proxy, health, sources, admin).
    Run {
        /// Main config file; without it, the embedded default (config/beacon.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
    },
    /// Validate a config and every services file it names.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    /// The demo: three backends, a `web` service, DNS on 127.0.0.1:1053,
    /// proxy on 127.0.0.1:8080, admin on 127.0.0.1:9153.
    Dev {
        /// DNS listen address (UDP and TCP).
        #[arg(long, default_value = "127.0.0.1:1053")]
        dns: SocketAddr,
        /// Admin HTTP listen address.
        #[arg(long, default_value = "127.0.0.1:9153")]
        admin: SocketAddr,
        /// Where the proxy serves the `web` service.
        #[arg(long, default_value = app::dev::WEB_LISTEN)]
        web: SocketAddr,
    },
    /// A demo backend answering TCP and HTTP with its name.
    Backend {
        #[arg(long)]
        name: String,
        #[arg(long, default_value = "0.0.0.0:8080")]
        listen: SocketAddr,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Check { config } = &cli.command {
        return check(config);
    }
    telemetry::init_logging(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("beacon: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    runtime.block_on(async_main(cli.command))
}

fn check(path: &std::path::Path) -> ExitCode {
    match config::check(path) {
        Ok((config, services)) => {
            println!(
                "{}: ok ({} source(s), {} service(s) in services files)",
                path.display(),
                config.sources.len(),
                services
            );
            ExitCode::SUCCESS
        }
        Err(errors) => {
            for e in &errors.0 {
                eprintln!("{e}");
            }
            ExitCode::from(2)
        }
    }
}

async fn async_main(command: Command) -> ExitCode {
    let shutdown = CancellationToken::new();
    tokio::spawn(wait_for_signal(shutdown.clone()));
    let result = match command {
        Command::Run { config } => {
            let config = match config {
                Some(path) => match Config::load(&path) {
                    Ok(c) => c,
                    Err(e) => return config_error(&e),
                },
                None => Config::embedded_default(),
            };
            app::run(config, Vec::new(), shutdown).await
        }
        Command::Dev { dns, admin, web } => {
            match app::dev::prepare(&app::dev::DevOptions { dns, admin, web }, shutdown.clone())
                .await
            {
                Ok((config, sources)) => {
                    print_dev_banner(&config, web);
                    app::run(config, sources, shutdown).await
                }
                Err(e) => Err(StartError::Runtime(anyhow::anyhow!(
                    "dev: cannot start the demo backends: {e}"
                ))),
            }
        }
        Command::Backend { name, listen } => {
            match beacon::backend::start(&name, listen, shutdown.clone()).await {
                Ok((addr, _)) => {
                    tracing::info!(%name, %addr, "backend listening");
                    shutdown.cancelled().await;
                    Ok(())
                }
                Err(e) => Err(StartError::Runtime(anyhow::anyhow!(
                    "backend: cannot listen on {listen}: {e}"
                ))),
            }
        }
        Command::Check { .. } => unreachable!("handled before the runtime starts"),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(e)) => config_error(&e),
        Err(StartError::Runtime(e)) => {
            eprintln!("beacon: {e:#}");
            ExitCode::from(1)
        }
    }
}

fn config_error(e: &config::ConfigErrors) -> ExitCode {
    for line in &e.0 {
        eprintln!("{line}");
    }
    ExitCode::from(2)
}

fn print_dev_banner(config: &Config, web: SocketAddr) {
    let dns = config.dns.listen;
    let admin = config
        .admin
        .listen
        .map(|a| a.to_string())
        .unwrap_or_default();
    println!(
        "beacon dev: a `web` service over three demo backends (web-0, web-1, web-2)\n\
         try:\n  \
           dig @{ip} -p {port} web.default.svc.{zone}\n  \
           dig @{ip} -p {port} _http._tcp.web.default.svc.{zone} SRV\n  \
           curl http://{web}/            (repeat: answers rotate across backends)\n  \
           curl http://{admin}/v1/services\n  \
           curl http://{admin}/metrics\n\
         Ctrl-C stops.",
        ip = dns.ip(),
        port = dns.port(),
        zone = config.dns.zone,
    );
}

async fn wait_for_signal(shutdown: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM"),
        _ = int.recv() => tracing::info!("SIGINT"),
    }
    shutdown.cancel();
}
