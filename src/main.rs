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
    /// Ask a DNS server one question (scratch images have no dig).
    Query {
        name: String,
        #[arg(long, default_value = "127.0.0.1:53")]
        server: SocketAddr,
        /// Record type: A, AAAA, SRV, PTR, TXT, SOA, ...
        #[arg(long = "type", default_value = "A")]
        rtype: String,
    },
    /// HTTP GET a URL `count` times, one connection each; prints each
    /// body's first line (the demo backends answer their name).
    Get {
        url: String,
        #[arg(long, default_value_t = 1)]
        count: u32,
        /// DNS server for the URL's host (default: /etc/resolv.conf).
        #[arg(long)]
        dns: Option<SocketAddr>,
        /// Pause between requests.
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        interval: std::time::Duration,
        /// Before counting, retry the first request this long (while the
        /// service comes up).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        wait: std::time::Duration,
    },
    /// Exit 0 when URL answers (http:// with 2xx/3xx, tcp:// connects);
    /// for Docker HEALTHCHECKs in scratch images.
    Probe {
        url: String,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: std::time::Duration,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Check { config } = &cli.command {
        return check(config);
    }
    if matches!(
        cli.command,
        Command::Query { .. } | Command::Get { .. } | Command::Probe { .. }
    ) {
        return client(cli.command);
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
        Command::Check { .. }
        | Command::Query { .. }
        | Command::Get { .. }
        | Command::Probe { .. } => {
            unreachable!("handled before the runtime starts")
        }
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

/// `query`, `get` and `probe`: small clients on a single-threaded runtime.
fn client(command: Command) -> ExitCode {
    use beacon::client;
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("beacon: cannot start the runtime: {e}");
            return ExitCode::from(1);
        }
    };
    let timeout = std::time::Duration::from_secs(2);
    runtime.block_on(async move {
        match command {
            Command::Query {
                name,
                server,
                rtype,
            } => {
                let Ok(rtype) = rtype.to_ascii_uppercase().parse() else {
                    eprintln!("beacon: unknown record type `{rtype}`");
                    return ExitCode::from(2);
                };
                match client::query(server, &name, rtype, timeout).await {
                    Ok(answer) => {
                        for r in &answer.answers {
                            println!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data);
                        }
                        let rcode = answer.metadata.response_code;
                        if rcode == hickory_proto::op::ResponseCode::NoError {
                            ExitCode::SUCCESS
                        } else {
                            eprintln!("beacon: {rcode}");
                            ExitCode::from(1)
                        }
                    }
                    Err(e) => {
                        eprintln!("beacon: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            Command::Get {
                url,
                count,
                dns,
                interval,
                wait,
            } => {
                let url = match client::parse_url(&url) {
                    Ok(u) => u,
                    Err(e) => {
                        eprintln!("beacon: {e}");
                        return ExitCode::from(2);
                    }
                };
                let deadline = tokio::time::Instant::now() + wait;
                while let Err(e) = client::get_once(&url, dns, timeout).await {
                    if tokio::time::Instant::now() >= deadline {
                        break;
                    }
                    eprintln!("beacon: {e} (retrying)");
                    tokio::time::sleep(std::time::Duration::from_millis(250)).await;
                }
                let mut failed = 0;
                let mut tally = std::collections::BTreeMap::<String, u32>::new();
                for i in 0..count {
                    if i > 0 && !interval.is_zero() {
                        tokio::time::sleep(interval).await;
                    }
                    match client::get_once(&url, dns, timeout).await {
                        Ok(line) => {
                            println!("{line}");
                            *tally.entry(line).or_default() += 1;
                        }
                        Err(e) => {
                            eprintln!("beacon: {e}");
                            failed += 1;
                        }
                    }
                }
                if count > 1 {
                    let summary: Vec<String> =
                        tally.iter().map(|(k, v)| format!("{k}={v}")).collect();
                    eprintln!(
                        "{} ok, {failed} failed: {}",
                        count - failed,
                        summary.join(" ")
                    );
                }
                if failed == 0 {
                    ExitCode::SUCCESS
                } else {
                    ExitCode::from(1)
                }
            }
            Command::Probe { url, timeout } => {
                let result = match client::parse_url(&url) {
                    Ok(u) => client::probe(&u, timeout).await,
                    Err(e) => Err(e),
                };
                match result {
                    Ok(()) => ExitCode::SUCCESS,
                    Err(e) => {
                        eprintln!("beacon: probe {url}: {e}");
                        ExitCode::from(1)
                    }
                }
            }
            _ => unreachable!("only client commands come here"),
        }
    })
}
