//! `beacon dev`: the demo config, three demo backends, and a `web` service.

use std::net::{IpAddr, SocketAddr};

use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::model::{Endpoint, Port, Protocol, ServiceKey, ServiceSpec};
use crate::sources::{Source, StaticSource};

/// The text of `config/dev.toml`.
pub const DEV_CONFIG: &str = include_str!("../../config/dev.toml");
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
    // A demo in a terminal stops at Ctrl-C, without the lameduck.
    config.dns.lameduck = std::time::Duration::ZERO;
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

/// What `beacon dev` prints: the commands to try.
pub fn banner(config: &Config, web: SocketAddr) -> String {
    let dns = config.dns.listen;
    let admin = config
        .admin
        .listen
        .map(|a| a.to_string())
        .unwrap_or_default();
    format!(
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
    )
}
