//! The `beacon` command: parse, dispatch, exit code. Everything else lives
//! in the library (`app` runs the loops, `client` the small clients).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use beacon::app::{self, StartError};
use beacon::client;
use beacon::config::{self, Config, ConfigErrors};
use beacon::telemetry::{self, LogFormat};

/// Exit codes: 0 ok, 1 runtime failure, 2 bad config or usage.
const EXIT_RUNTIME: u8 = 1;
const EXIT_CONFIG: u8 = 2;

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
    #[command(flatten)]
    Serve(Serve),
    /// Validate a config and every services file it names.
    Check {
        #[arg(long, short)]
        config: PathBuf,
    },
    #[command(flatten)]
    Client(client::Command),
}

/// The commands that run loops until a signal.
#[derive(Subcommand)]
enum Serve {
    /// Run everything (DNS, proxy, health, sources, admin).
    Run {
        /// Main config file; without it, the embedded default (config/beacon.toml).
        #[arg(long, short)]
        config: Option<PathBuf>,
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
    match cli.command {
        Command::Check { config } => check(&config),
        Command::Client(command) => block_on(false, async move {
            ExitCode::from(client::run(command).await as u8)
        }),
        Command::Serve(command) => {
            telemetry::init_logging(cli.log_format);
            block_on(true, serve(command))
        }
    }
}

/// Runs `main` on a runtime: multi-threaded for the serving commands, one
/// thread for the small clients.
fn block_on(multi_thread: bool, main: impl Future<Output = ExitCode>) -> ExitCode {
    let mut builder = if multi_thread {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    match builder.enable_all().build() {
        Ok(runtime) => runtime.block_on(main),
        Err(e) => {
            eprintln!("beacon: cannot start the runtime: {e}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

fn check(path: &Path) -> ExitCode {
    match config::check(path) {
        Ok((config, services)) => {
            for w in &config.warnings {
                eprintln!("warning: {w}");
            }
            println!(
                "{}: ok ({} source(s), {} service(s) in services files)",
                path.display(),
                config.sources.len(),
                services
            );
            ExitCode::SUCCESS
        }
        Err(errors) => config_error(&errors),
    }
}

async fn serve(command: Serve) -> ExitCode {
    let shutdown = CancellationToken::new();
    let force = CancellationToken::new();
    tokio::spawn(wait_for_signals(shutdown.clone(), force.clone()));
    let result = match command {
        Serve::Run { config } => {
            match config.map_or_else(|| Ok(Config::embedded_default()), |p| Config::load(&p)) {
                Ok(config) => app::run(config, Vec::new(), shutdown, force).await,
                Err(e) => Err(StartError::Config(e)),
            }
        }
        Serve::Dev { dns, admin, web } => {
            dev(app::dev::DevOptions { dns, admin, web }, shutdown, force).await
        }
        Serve::Backend { name, listen } => backend(&name, listen, shutdown).await,
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(StartError::Config(e)) => config_error(&e),
        Err(StartError::Runtime(e)) => {
            eprintln!("beacon: {e:#}");
            ExitCode::from(EXIT_RUNTIME)
        }
    }
}

async fn dev(
    opts: app::dev::DevOptions,
    shutdown: CancellationToken,
    force: CancellationToken,
) -> Result<(), StartError> {
    let (config, sources) = app::dev::prepare(&opts, shutdown.clone())
        .await
        .map_err(|e| anyhow::anyhow!("dev: cannot start the demo backends: {e}"))?;
    println!("{}", app::dev::banner(&config, opts.web));
    app::run(config, sources, shutdown, force).await
}

async fn backend(
    name: &str,
    listen: SocketAddr,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    let (addr, _) = beacon::backend::start(name, listen, shutdown.clone())
        .await
        .map_err(|e| anyhow::anyhow!("backend: cannot listen on {listen}: {e}"))?;
    tracing::info!(%name, %addr, "backend listening");
    shutdown.cancelled().await;
    Ok(())
}

fn config_error(e: &ConfigErrors) -> ExitCode {
    for line in &e.0 {
        eprintln!("{line}");
    }
    ExitCode::from(EXIT_CONFIG)
}

/// The first SIGTERM/SIGINT starts the graceful shutdown; a second one
/// during the drain cuts it short (exit 1).
async fn wait_for_signals(shutdown: CancellationToken, force: CancellationToken) {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot install signal handlers");
        return;
    };
    for token in [shutdown, force] {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM"),
            _ = int.recv() => tracing::info!("SIGINT"),
        }
        token.cancel();
    }
}
