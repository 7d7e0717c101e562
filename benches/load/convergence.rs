//! Convergence at scale: how long after a one-endpoint change DNS answers
//! it and the proxy routes by it, with 10k services x 10 endpoints loaded.
//!
//! Two ways, one process each:
//!
//! - `convergence inproc`: the registry, DNS server and proxy run in this
//!   process (`registry::spawn`, `dns::spawn`, `proxy::spawn`). The clock
//!   starts when the update is handed to the registry (`Handle::source`)
//!   and stops when a real UDP query to the DNS server answers the new
//!   endpoint, and when a real TCP connection through the proxy reaches the
//!   new backend. Bar: p99 < 10 ms.
//! - `convergence e2e --beacon PATH`: the real binary with a file source
//!   over a directory of one services file per service. The clock starts
//!   when the changed file is renamed into place. Bar: p99 < 1 s. Also the
//!   time from start to serving every service (first full sync) and the
//!   RSS at that scale (bar: < 200 MB).
//!
//! The changed service, `edge`, has a proxy listener and one endpoint that
//! flips between two live backends (127.0.0.31 and 127.0.0.32), which say
//! their name on connect. Every change is awaited before the next.
//!
//! Output: tab-separated `area test server metric value` lines on stdout
//! (the load bench's results format); progress on stderr.
//!
//! ```text
//! cargo run --release --example convergence -- inproc
//! cargo run --release --example convergence -- e2e --beacon target/release/beacon
//! ```

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use beacon::config::Config;
use beacon::model::{Endpoint, Port, ProbeKind, Protocol, ServiceKey, ServiceSpec, SourceId};
use beacon::registry::{self, Update};
use hickory_proto::op::{Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio_util::sync::CancellationToken;

const BACKEND_IPS: [Ipv4Addr; 2] = [Ipv4Addr::new(127, 0, 0, 31), Ipv4Addr::new(127, 0, 0, 32)];
const BACKEND_NAMES: [&str; 2] = ["backend-a", "backend-b"];
const EDGE_NAME: &str = "edge.default.svc.cluster.local.";
/// Longest wait for one change to show; a change slower than this counts
/// as this (and is reported as a timeout).
const WAIT_LIMIT: Duration = Duration::from_secs(5);
/// Pause between polls: 100 µs in process (bar 10 ms), 1 ms end to end
/// (bar 1 s).
const POLL_INPROC: Duration = Duration::from_micros(100);
const POLL_E2E: Duration = Duration::from_millis(1);

struct Args {
    mode: String,
    beacon: Option<PathBuf>,
    services: u32,
    endpoints: u32,
    changes: usize,
}

fn args() -> Args {
    let mut it = std::env::args().skip(1);
    let mut a = Args {
        mode: it.next().unwrap_or_default(),
        beacon: None,
        services: 10_000,
        endpoints: 10,
        changes: 100,
    };
    while let Some(flag) = it.next() {
        let value = it
            .next()
            .unwrap_or_else(|| usage(&format!("{flag} needs a value")));
        match flag.as_str() {
            "--beacon" => a.beacon = Some(value.into()),
            "--services" => a.services = value.parse().unwrap_or_else(|_| usage("--services N")),
            "--endpoints" => a.endpoints = value.parse().unwrap_or_else(|_| usage("--endpoints K")),
            "--changes" => a.changes = value.parse().unwrap_or_else(|_| usage("--changes N")),
            _ => usage(&format!("unknown flag {flag}")),
        }
    }
    a
}

fn usage(why: &str) -> ! {
    eprintln!(
        "convergence: {why}\nusage: convergence inproc|e2e [--beacon PATH] [--services N] [--endpoints K] [--changes N]"
    );
    std::process::exit(2)
}

fn main() {
    let a = args();
    if a.services < 1 || a.endpoints < 1 || a.changes < 1 {
        usage("--services, --endpoints and --changes must be at least 1");
    }
    let backends = start_backends();
    match a.mode.as_str() {
        "inproc" => inproc(&a, backends),
        "e2e" => {
            let beacon = a
                .beacon
                .clone()
                .unwrap_or_else(|| usage("e2e needs --beacon PATH"));
            e2e(&a, &beacon, backends)
        }
        _ => usage("mode must be inproc or e2e"),
    }
}

// ===== backends and probes =====

/// Two loopback backends that write their name and close; their ports.
fn start_backends() -> [u16; 2] {
    let mut ports = [0u16; 2];
    for (i, ip) in BACKEND_IPS.iter().enumerate() {
        let listener = TcpListener::bind((*ip, 0)).expect("bind a backend on 127.0.0.31/32");
        ports[i] = listener.local_addr().unwrap().port();
        let name = BACKEND_NAMES[i];
        std::thread::spawn(move || {
            for mut conn in listener.incoming().flatten() {
                let _ = conn.write_all(format!("{name}\n").as_bytes());
            }
        });
    }
    ports
}

fn dns_query(name: &str, qtype: RecordType, id: u16) -> Vec<u8> {
    let mut msg = Message::new(id, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.queries
        .push(Query::query(Name::from_ascii(name).unwrap(), qtype));
    msg.to_vec().unwrap()
}

/// One UDP query; the A addresses of the answer (None: no usable answer).
fn resolve(sock: &UdpSocket, server: SocketAddr, name: &str, id: u16) -> Option<Vec<IpAddr>> {
    sock.send_to(&dns_query(name, RecordType::A, id), server)
        .ok()?;
    let mut buf = [0u8; 4096];
    loop {
        let (n, _) = sock.recv_from(&mut buf).ok()?;
        let Ok(msg) = Message::from_vec(&buf[..n]) else {
            return None;
        };
        if msg.metadata.id != id {
            continue; // a late answer to an earlier query
        }
        if msg.metadata.response_code != ResponseCode::NoError {
            return None;
        }
        return Some(
            msg.answers
                .iter()
                .filter_map(|r| match &r.data {
                    RData::A(a) => Some(IpAddr::V4(a.0)),
                    _ => None,
                })
                .collect(),
        );
    }
}

fn udp_client() -> UdpSocket {
    let sock = UdpSocket::bind("127.0.0.1:0").unwrap();
    sock.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    sock
}

/// Polls DNS until `name` answers exactly `want`; the time since `t0`.
/// `pause` between queries keeps the poller from eating the CPU the
/// server needs (this machine has 2 cores).
fn wait_dns(
    server: SocketAddr,
    name: &str,
    want: IpAddr,
    t0: Instant,
    pause: Duration,
) -> Option<Duration> {
    let sock = udp_client();
    let mut id = 1u16;
    while t0.elapsed() < WAIT_LIMIT {
        id = id.wrapping_add(1);
        if resolve(&sock, server, name, id).is_some_and(|ips| ips == [want]) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(pause);
    }
    None
}

/// The name of the backend a connection through `addr` reaches.
fn route(addr: SocketAddr) -> Option<String> {
    let mut conn = TcpStream::connect_timeout(&addr, Duration::from_millis(200)).ok()?;
    conn.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    let mut s = String::new();
    conn.read_to_string(&mut s).ok()?;
    Some(s.trim().to_string())
}

/// Polls the proxy until connections reach `want`; the time since `t0`.
/// `gate` is a cheap check that must pass before a connection is tried.
fn wait_proxy(
    addr: SocketAddr,
    want: &str,
    t0: Instant,
    pause: Duration,
    gate: &dyn Fn() -> bool,
) -> Option<Duration> {
    while t0.elapsed() < WAIT_LIMIT {
        if gate() && route(addr).as_deref() == Some(want) {
            return Some(t0.elapsed());
        }
        std::thread::sleep(pause);
    }
    None
}

/// Waits for DNS and proxy in parallel, each on its own thread.
fn wait_both(
    dns: SocketAddr,
    proxy: SocketAddr,
    which: usize,
    t0: Instant,
    pause: Duration,
    gate: &(dyn Fn() -> bool + Sync),
) -> (Option<Duration>, Option<Duration>) {
    let want_ip = IpAddr::V4(BACKEND_IPS[which]);
    std::thread::scope(|s| {
        let d = s.spawn(move || wait_dns(dns, EDGE_NAME, want_ip, t0, pause));
        let p = s.spawn(move || wait_proxy(proxy, BACKEND_NAMES[which], t0, pause, gate));
        (d.join().unwrap(), p.join().unwrap())
    })
}

const NO_GATE: &(dyn Fn() -> bool + Sync) = &|| true;

// ===== results =====

#[derive(Default)]
struct Samples {
    dns: Vec<Duration>,
    proxy: Vec<Duration>,
    timeouts: usize,
}

impl Samples {
    fn push(&mut self, (dns, proxy): (Option<Duration>, Option<Duration>)) {
        for (v, into) in [(dns, &mut self.dns), (proxy, &mut self.proxy)] {
            match v {
                Some(d) => into.push(d),
                None => {
                    self.timeouts += 1;
                    into.push(WAIT_LIMIT);
                }
            }
        }
    }

    fn report(&self, test: &str) {
        for (what, v) in [("dns", &self.dns), ("proxy", &self.proxy)] {
            let (p50, p99, max) = percentiles(v);
            result(test, &format!("{what}_p50_ms"), ms(p50));
            result(test, &format!("{what}_p99_ms"), ms(p99));
            result(test, &format!("{what}_max_ms"), ms(max));
        }
        result(test, "timeouts", self.timeouts.to_string());
    }
}

fn percentiles(v: &[Duration]) -> (Duration, Duration, Duration) {
    let mut s = v.to_vec();
    s.sort();
    let at = |q: f64| s[((q * s.len() as f64).ceil() as usize).clamp(1, s.len()) - 1];
    (at(0.50), at(0.99), *s.last().unwrap())
}

fn ms(d: Duration) -> String {
    format!("{:.3}", d.as_secs_f64() * 1e3)
}

fn result(test: &str, metric: &str, value: String) {
    println!("convergence\t{test}\tbeacon\t{metric}\t{value}");
}

fn rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

// ===== the data =====

fn bench_service(i: u32, endpoints: u32) -> ServiceSpec {
    let mut s = ServiceSpec::new(ServiceKey::new("default", &format!("svc-{i}")));
    s.health.probe = ProbeKind::None;
    s.ports.push(Port {
        name: "http".into(),
        port: 80,
        target_port: 80,
        protocol: Protocol::Tcp,
        listen: None,
    });
    for j in 0..endpoints {
        let mut ep = Endpoint::new(IpAddr::V4(Ipv4Addr::from(0x0a00_0001 + i * endpoints + j)));
        ep.hostname = Some(format!("ep-{j}").into());
        s.endpoints.push(ep);
    }
    s
}

fn edge_service(which: usize, ports: [u16; 2], listen: SocketAddr) -> ServiceSpec {
    let mut s = ServiceSpec::new(ServiceKey::new("default", "edge"));
    s.health.probe = ProbeKind::None;
    s.ports.push(Port {
        name: "tcp".into(),
        port: 9000,
        target_port: 9000,
        protocol: Protocol::Tcp,
        listen: Some(listen),
    });
    let mut ep = Endpoint::new(IpAddr::V4(BACKEND_IPS[which]));
    ep.port = Some(ports[which]);
    s.endpoints.push(ep);
    s
}

fn edge_toml(which: usize, ports: [u16; 2], listen: SocketAddr) -> String {
    format!(
        "[[service]]\nname = \"edge\"\n\n  [[service.port]]\n  name = \"tcp\"\n  port = 9000\n  listen = \"{listen}\"\n\n  [[service.endpoint]]\n  ip = \"{}\"\n  port = {}\n\n  [service.health]\n  kind = \"none\"\n",
        BACKEND_IPS[which], ports[which]
    )
}

fn service_toml(i: u32, endpoints: u32) -> String {
    let mut s = format!(
        "[[service]]\nname = \"svc-{i}\"\n\n  [[service.port]]\n  name = \"http\"\n  port = 80\n"
    );
    for j in 0..endpoints {
        let ip = Ipv4Addr::from(0x0a00_0001 + i * endpoints + j);
        s.push_str(&format!(
            "\n  [[service.endpoint]]\n  ip = \"{ip}\"\n  hostname = \"ep-{j}\"\n"
        ));
    }
    s.push_str("\n  [service.health]\n  kind = \"none\"\n");
    s
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

// ===== (i) in process =====

fn inproc(a: &Args, ports: [u16; 2]) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let config = Config::parse(
        "[dns]\nlisten = \"127.0.0.1:0\"\n[health]\nkind = \"none\"\n",
        Path::new("<convergence>"),
        Path::new(""),
    )
    .expect("bench config parses");
    let shutdown = CancellationToken::new();
    let source: SourceId = "bench".into();
    let listen: SocketAddr = "127.0.0.1:0".parse().unwrap();
    let (handle, reader, dns, proxy) = rt.block_on(async {
        let (handle, reader, _task) = registry::spawn(
            vec![source.clone()],
            Duration::from_secs(60),
            shutdown.clone(),
        );
        let dns = beacon::dns::spawn(&config.dns, reader.clone(), shutdown.clone())
            .await
            .expect("dns binds");
        let (outcomes, mut drain) = tokio::sync::mpsc::channel(1024);
        tokio::spawn(async move { while drain.recv().await.is_some() {} });
        let (proxy, task) =
            beacon::proxy::spawn(&config.proxy, reader.clone(), outcomes, shutdown.clone());
        tokio::spawn(task);
        (handle, reader, dns, proxy)
    });
    let dns_addr = dns.local_addr;

    // First full sync: one Reset with every service.
    let mut specs: Vec<ServiceSpec> = (0..a.services - 1)
        .map(|i| bench_service(i, a.endpoints))
        .collect();
    specs.push(edge_service(0, ports, listen));
    let t0 = Instant::now();
    rt.block_on(handle.source(&source, Update::Reset(specs)));
    let last = format!("svc-{}.default.svc.cluster.local.", a.services - 2);
    let sock = udp_client();
    let mut id = 0u16;
    while resolve(&sock, dns_addr, &last, {
        id = id.wrapping_add(1);
        id
    })
    .is_none_or(|ips| ips.is_empty())
    {
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "no answer after the first sync"
        );
    }
    let sync = t0.elapsed();
    let proxy_addr = loop {
        if let Some(addr) = proxy.bound_addr(listen) {
            break addr;
        }
        assert!(
            t0.elapsed() < Duration::from_secs(60),
            "proxy never listened"
        );
        std::thread::sleep(Duration::from_millis(1));
    };
    let snap = reader.current();
    eprintln!(
        "inproc: {} services, {} endpoints; first sync served after {:?}",
        snap.services.len(),
        snap.endpoint_count(),
        sync
    );
    assert!(
        wait_proxy(
            proxy_addr,
            BACKEND_NAMES[0],
            Instant::now(),
            POLL_INPROC,
            NO_GATE
        )
        .is_some()
    );

    let edge_key = ServiceKey::new("default", "edge");
    let mut samples = Samples::default();
    for c in 0..a.changes {
        let which = (c + 1) % 2;
        let spec = edge_service(which, ports, listen);
        let t0 = Instant::now();
        assert!(rt.block_on(handle.source(&source, Update::Upsert(Box::new(spec)))));
        // Try a connection only once the proxy has applied a snapshot that
        // holds the change (an atomic load), so the poller does not flood
        // the proxy with connections while it reconciles.
        let want = IpAddr::V4(BACKEND_IPS[which]);
        let gate = || {
            let snap = reader.current();
            let has = snap
                .service(&edge_key)
                .is_some_and(|s| s.endpoints.iter().any(|e| e.endpoint.ip == want));
            has && proxy.applied_version() >= snap.version
        };
        samples.push(wait_both(
            dns_addr,
            proxy_addr,
            which,
            t0,
            POLL_INPROC,
            &gate,
        ));
    }
    let test = "registry_to_serving";
    result(test, "services", snap.services.len().to_string());
    result(test, "endpoints", snap.endpoint_count().to_string());
    result(test, "sync_s", format!("{:.3}", sync.as_secs_f64()));
    samples.report(test);
    eprintln!("inproc: {} changes measured", a.changes);
    shutdown.cancel();
    drop(reader);
}

// ===== (ii) end to end through the file source =====

/// The beacon child; killed when dropped.
struct Beacon(Child);

impl Drop for Beacon {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn write_atomically(path: &Path, text: &str) {
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, path).unwrap();
}

fn e2e(a: &Args, beacon: &Path, ports: [u16; 2]) {
    let dir = tempfile::tempdir().unwrap();
    let services = dir.path().join("services");
    std::fs::create_dir(&services).unwrap();
    for i in 0..a.services - 1 {
        std::fs::write(
            services.join(format!("svc-{i:05}.toml")),
            service_toml(i, a.endpoints),
        )
        .unwrap();
    }
    let listen: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let edge = services.join("edge.toml");
    std::fs::write(&edge, edge_toml(0, ports, listen)).unwrap();
    let dns_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.path().join("beacon.toml");
    std::fs::write(
        &config,
        format!(
            "startup_timeout = \"120s\"\nshutdown_grace = \"1s\"\n[dns]\nlisten = \"{dns_addr}\"\n[admin]\nenabled = false\n[health]\nkind = \"none\"\n[[source]]\ntype = \"file\"\npath = \"services\"\n"
        ),
    )
    .unwrap();
    let log = std::fs::File::create(dir.path().join("beacon.log")).unwrap();
    let t0 = Instant::now();
    let child = Command::new(beacon)
        .arg("run")
        .arg("--config")
        .arg(&config)
        .env("RUST_LOG", "warn")
        .stdin(Stdio::null())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .expect("start beacon");
    let mut child = Beacon(child);
    let pid = child.0.id();
    let last = format!("svc-{}.default.svc.cluster.local.", a.services - 2);
    let sock = udp_client();
    let mut id = 0u16;
    loop {
        id = id.wrapping_add(1);
        if resolve(&sock, dns_addr, &last, id).is_some_and(|ips| !ips.is_empty()) {
            break;
        }
        if let Ok(Some(status)) = child.0.try_wait() {
            let text = std::fs::read_to_string(dir.path().join("beacon.log")).unwrap_or_default();
            panic!("beacon exited ({status}) before serving:\n{text}");
        }
        assert!(
            t0.elapsed() < Duration::from_secs(120),
            "beacon did not serve within 120 s"
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    let sync = t0.elapsed();
    assert!(
        wait_proxy(listen, BACKEND_NAMES[0], Instant::now(), POLL_E2E, NO_GATE).is_some(),
        "the proxy never routed edge"
    );
    let rss_after_sync = rss_mb(pid);
    eprintln!(
        "e2e: beacon pid {pid} served {} services after {:?}, RSS {:.1} MB",
        a.services, sync, rss_after_sync
    );

    let mut samples = Samples::default();
    for c in 0..a.changes {
        let which = (c + 1) % 2;
        let text = edge_toml(which, ports, listen);
        let t0 = Instant::now();
        write_atomically(&edge, &text);
        samples.push(wait_both(dns_addr, listen, which, t0, POLL_E2E, NO_GATE));
    }
    let rss_end = rss_mb(pid);
    let test = "file_to_serving";
    result(test, "services", a.services.to_string());
    result(
        test,
        "endpoints",
        ((a.services - 1) * a.endpoints + 1).to_string(),
    );
    result(test, "sync_s", format!("{:.3}", sync.as_secs_f64()));
    result(
        test,
        "rss_mb",
        format!("{:.1}", rss_after_sync.max(rss_end)),
    );
    samples.report(test);
    eprintln!(
        "e2e: {} changes measured; RSS at the end {:.1} MB",
        a.changes, rss_end
    );
    drop(child);
}
