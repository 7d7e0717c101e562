//! Tiny clients for scratch containers, which have no `dig`, `curl` or
//! shell: `beacon query` (one DNS question), `beacon get` (HTTP GETs, one
//! connection each, to watch balancing) and `beacon probe` (an exit status
//! for a Docker HEALTHCHECK); `beacon status` (the operator's table, in
//! `status`).

use std::net::{IpAddr, SocketAddr};
use std::str::FromStr;
use std::time::Duration;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::TcpStream;

mod http;
pub mod status;

use http::io;
pub use http::{ClientError, Exit, http_get};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Tcp,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Url {
    pub scheme: Scheme,
    pub host: String,
    pub port: u16,
    pub path: String,
}

/// `http://host[:port]/path` (port 80 by default) or `tcp://host:port`.
pub fn parse_url(s: &str) -> Result<Url, ClientError> {
    let bad = || ClientError::Url(s.to_string());
    let (scheme, rest) = if let Some(r) = s.strip_prefix("http://") {
        (Scheme::Http, r)
    } else if let Some(r) = s.strip_prefix("tcp://") {
        (Scheme::Tcp, r)
    } else {
        return Err(bad());
    };
    let (authority, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let (host, port) = match authority.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(']') || h.starts_with('[') => {
            (h, p.parse::<u16>().map_err(|_| bad())?)
        }
        _ if scheme == Scheme::Http => (authority, 80),
        _ => return Err(bad()),
    };
    let host = host.trim_start_matches('[').trim_end_matches(']');
    if host.is_empty() {
        return Err(bad());
    }
    Ok(Url {
        scheme,
        host: host.to_string(),
        port,
        path: path.to_string(),
    })
}

/// The `nameserver` lines of a resolv.conf, on port 53.
pub fn nameservers(resolv_conf: &str) -> Vec<SocketAddr> {
    resolv_conf
        .lines()
        .filter_map(|l| {
            let mut words = l.split_whitespace();
            (words.next() == Some("nameserver")).then_some(())?;
            let ip: IpAddr = words.next()?.parse().ok()?;
            Some(SocketAddr::new(ip, 53))
        })
        .collect()
}

/// Asks `server` one question over UDP.
pub async fn query(
    server: SocketAddr,
    name: &str,
    rtype: RecordType,
    timeout: Duration,
) -> Result<Message, ClientError> {
    use crate::dns::wire::{self, WireError};
    let mut name = Name::from_str(name).map_err(|e| ClientError::Dns(format!("`{name}`: {e}")))?;
    // Names on the command line are absolute, as dig takes them: the reply
    // echoes `name.` and must match the question.
    name.set_fqdn(true);
    let msg = wire::query(Query::query(name, rtype), false);
    let what = format!("DNS query to {server}");
    tokio::time::timeout(timeout, wire::udp_exchange(server, &msg))
        .await
        .map_err(|_| ClientError::Timeout(what.clone()))?
        .map_err(|e| match e {
            WireError::Io(source) => ClientError::Io { what, source },
            other => ClientError::Dns(other.to_string()),
        })
}

/// The addresses of `host`: itself if it is an IP, else its A records from
/// `dns` (or the first nameserver of /etc/resolv.conf).
pub async fn resolve(
    host: &str,
    dns: Option<SocketAddr>,
    timeout: Duration,
) -> Result<Vec<IpAddr>, ClientError> {
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Ok(vec![ip]);
    }
    let server = match dns {
        Some(s) => s,
        None => {
            let conf =
                std::fs::read_to_string("/etc/resolv.conf").map_err(io("/etc/resolv.conf"))?;
            *nameservers(&conf)
                .first()
                .ok_or_else(|| ClientError::Dns("no nameserver in /etc/resolv.conf".into()))?
        }
    };
    let fqdn = if host.ends_with('.') {
        host.to_string()
    } else {
        format!("{host}.")
    };
    let answer = query(server, &fqdn, RecordType::A, timeout).await?;
    if answer.metadata.response_code != ResponseCode::NoError {
        return Err(ClientError::Dns(format!(
            "{host}: {} from {server}",
            answer.metadata.response_code
        )));
    }
    let ips: Vec<IpAddr> = answer
        .answers
        .iter()
        .filter_map(|r| r.data.ip_addr())
        .collect();
    if ips.is_empty() {
        return Err(ClientError::Dns(format!(
            "{host}: no address from {server}"
        )));
    }
    Ok(ips)
}

/// GETs `url` (resolving its host each time) and returns the body's first
/// line; an HTTP status outside 2xx/3xx is an error.
pub async fn get_once(
    url: &Url,
    dns: Option<SocketAddr>,
    timeout: Duration,
) -> Result<String, ClientError> {
    if url.scheme != Scheme::Http {
        return Err(ClientError::Url(format!("tcp://{}:{}", url.host, url.port)));
    }
    let ips = resolve(&url.host, dns, timeout).await?;
    let addr = SocketAddr::new(ips[0], url.port);
    let (status, body) = http_get(addr, &url.host, &url.path, timeout).await?;
    if !(200..400).contains(&status) {
        return Err(ClientError::Status(status));
    }
    Ok(body.lines().next().unwrap_or("").to_string())
}

/// Ok when `url` answers: an HTTP 2xx/3xx, or a TCP connect for `tcp://`.
pub async fn probe(url: &Url, timeout: Duration) -> Result<(), ClientError> {
    let ips = resolve(&url.host, None, timeout).await?;
    let addr = SocketAddr::new(ips[0], url.port);
    match url.scheme {
        Scheme::Tcp => tokio::time::timeout(timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ClientError::Timeout(format!("connect {addr}")))?
            .map(drop)
            .map_err(io(format!("connect {addr}"))),
        Scheme::Http => {
            let (status, _) = http_get(addr, &url.host, &url.path, timeout).await?;
            if (200..400).contains(&status) {
                Ok(())
            } else {
                Err(ClientError::Status(status))
            }
        }
    }
}

// === the `query`, `get` and `probe` commands ===

/// The client commands of the `beacon` binary.
#[derive(Clone, Debug, clap::Subcommand)]
pub enum Command {
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
        interval: Duration,
        /// Before counting, retry the first request this long (while the
        /// service comes up).
        #[arg(long, default_value = "0s", value_parser = humantime::parse_duration)]
        wait: Duration,
    },
    /// Exit 0 when URL answers (http:// with 2xx/3xx, tcp:// connects);
    /// for Docker HEALTHCHECKs in scratch images.
    Probe {
        url: String,
        #[arg(long, default_value = "2s", value_parser = humantime::parse_duration)]
        timeout: Duration,
    },
    /// Services, endpoints, verdicts and reasons from a running beacon;
    /// exit 1 when a listed service has no serving endpoint.
    Status {
        /// One service: `name` or `name.namespace` (also shows its latest events).
        service: Option<String>,
        /// The beacon's admin address.
        #[arg(long, default_value = "127.0.0.1:9153")]
        admin: SocketAddr,
        /// Refresh every 2 s until interrupted.
        #[arg(long)]
        watch: bool,
        #[arg(long, value_enum, default_value_t = status::Output::Table)]
        output: status::Output,
    },
}

/// Runs one client command, printing its results on stdout and its errors
/// on stderr.
pub async fn run(command: Command) -> Exit {
    let timeout = Duration::from_secs(2);
    match command {
        Command::Query {
            name,
            server,
            rtype,
        } => run_query(&name, server, &rtype, timeout).await,
        Command::Get {
            url,
            count,
            dns,
            interval,
            wait,
        } => match parse_url(&url) {
            Ok(url) => run_get(&url, count, dns, interval, wait, timeout).await,
            Err(e) => {
                eprintln!("beacon: {e}");
                Exit::Usage
            }
        },
        Command::Status {
            service,
            admin,
            watch,
            output,
        } => {
            let watch = watch.then_some(Duration::from_secs(2));
            let req = status::Request {
                service,
                admin,
                output,
                watch,
            };
            status::run(req, timeout).await
        }
        Command::Probe { url, timeout } => {
            let result = match parse_url(&url) {
                Ok(u) => probe(&u, timeout).await,
                Err(e) => Err(e),
            };
            match result {
                Ok(()) => Exit::Ok,
                Err(e) => {
                    eprintln!("beacon: probe {url}: {e}");
                    Exit::Failed
                }
            }
        }
    }
}

async fn run_query(name: &str, server: SocketAddr, rtype: &str, timeout: Duration) -> Exit {
    let Ok(rtype) = rtype.to_ascii_uppercase().parse() else {
        eprintln!("beacon: unknown record type `{rtype}`");
        return Exit::Usage;
    };
    match query(server, name, rtype, timeout).await {
        Ok(answer) => {
            for r in &answer.answers {
                println!("{} {} {} {}", r.name, r.ttl, r.record_type(), r.data);
            }
            let rcode = answer.metadata.response_code;
            if rcode == ResponseCode::NoError {
                Exit::Ok
            } else {
                eprintln!("beacon: {rcode}");
                Exit::Failed
            }
        }
        Err(e) => {
            eprintln!("beacon: {e}");
            Exit::Failed
        }
    }
}

async fn run_get(
    url: &Url,
    count: u32,
    dns: Option<SocketAddr>,
    interval: Duration,
    wait: Duration,
    timeout: Duration,
) -> Exit {
    let deadline = tokio::time::Instant::now() + wait;
    while let Err(e) = get_once(url, dns, timeout).await {
        if tokio::time::Instant::now() >= deadline {
            break;
        }
        eprintln!("beacon: {e} (retrying)");
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let mut failed = 0;
    let mut tally = std::collections::BTreeMap::<String, u32>::new();
    for i in 0..count {
        if i > 0 && !interval.is_zero() {
            tokio::time::sleep(interval).await;
        }
        match get_once(url, dns, timeout).await {
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
        let summary: Vec<String> = tally.iter().map(|(k, v)| format!("{k}={v}")).collect();
        eprintln!(
            "{} ok, {failed} failed: {}",
            count - failed,
            summary.join(" ")
        );
    }
    if failed == 0 { Exit::Ok } else { Exit::Failed }
}

#[cfg(test)]
mod tests {
    use super::*;
    use hickory_proto::op::OpCode;
    use tokio::net::UdpSocket;
    use tokio_util::sync::CancellationToken;

    #[test]
    fn urls() {
        let u = parse_url("http://web.default.svc.cluster.local/x?y=1").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port, u.path.as_str()),
            (Scheme::Http, "web.default.svc.cluster.local", 80, "/x?y=1")
        );
        let u = parse_url("http://127.0.0.1:8080").unwrap();
        assert_eq!((u.port, u.path.as_str()), (8080, "/"));
        let u = parse_url("tcp://[::1]:53").unwrap();
        assert_eq!(
            (u.scheme, u.host.as_str(), u.port),
            (Scheme::Tcp, "::1", 53)
        );
        for bad in ["ftp://x", "tcp://x", "http://:80/", "http://x:port/"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn resolv_conf_nameservers() {
        let conf = "# generated\nsearch x\nnameserver 127.0.0.11\nnameserver ::1\noptions ndots:0\nnameserver nope\n";
        assert_eq!(
            nameservers(conf),
            vec![
                "127.0.0.11:53".parse::<SocketAddr>().unwrap(),
                "[::1]:53".parse().unwrap()
            ]
        );
    }

    #[tokio::test]
    async fn probe_and_get_against_a_demo_backend() {
        let shutdown = CancellationToken::new();
        let (addr, backend) =
            crate::backend::start("b-1", "127.0.0.1:0".parse().unwrap(), shutdown.clone())
                .await
                .unwrap();
        let t = Duration::from_secs(2);
        let health = parse_url(&format!("http://{addr}/healthz")).unwrap();
        probe(&health, t).await.unwrap();
        backend.set_failing(true);
        assert!(matches!(
            probe(&health, t).await,
            Err(ClientError::Status(500))
        ));
        assert!(matches!(
            get_once(&health, None, t).await,
            Err(ClientError::Status(500))
        ));
        let root = parse_url(&format!("http://{addr}/")).unwrap();
        assert_eq!(get_once(&root, None, t).await.unwrap(), "b-1");
        probe(&parse_url(&format!("tcp://{addr}")).unwrap(), t)
            .await
            .unwrap();
        shutdown.cancel();
        // Nothing listens on a just-freed port.
        let free = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap();
        assert!(
            probe(&parse_url(&format!("tcp://{free}")).unwrap(), t)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn query_reads_the_answer_with_a_matching_id() {
        // A one-shot DNS server that answers A 10.9.8.7.
        let server = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = server.local_addr().unwrap();
        tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            let (n, peer) = server.recv_from(&mut buf).await.unwrap();
            let q = Message::from_vec(&buf[..n]).unwrap();
            let mut r = Message::response(q.metadata.id, OpCode::Query);
            r.add_query(q.queries[0].clone());
            r.answers.push(hickory_proto::rr::Record::from_rdata(
                q.queries[0].name().clone(),
                5,
                hickory_proto::rr::RData::A("10.9.8.7".parse().unwrap()),
            ));
            server.send_to(&r.to_vec().unwrap(), peer).await.unwrap();
        });
        let ips = resolve(
            "web.default.svc.cluster.local",
            Some(addr),
            Duration::from_secs(2),
        )
        .await
        .unwrap();
        assert_eq!(ips, vec!["10.9.8.7".parse::<IpAddr>().unwrap()]);
    }
}
