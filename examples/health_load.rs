//! Load test of the health loop: many endpoints probed over TCP against
//! listening loopback backends, with the CPU the prober uses.
//!
//! ```text
//! cargo run --release --example health_load -- [--endpoints 10000] [--seconds 20]
//!     [--listeners 100] [--per-service <listeners>] [--interval-ms 1000] [--warmup 3]
//! ```
//!
//! The backends run in a child process (this binary with `serve`), so the
//! figure is the prober's own CPU (user + sys from `/proc/self/stat`).
//! Every service has `per-service` endpoints, one on each of as many
//! listeners (`127.1.x.y`, port 0 each); `--listeners 10000 --per-service
//! 10000` makes one service of 10,000 endpoints. It also reports how long
//! the first verdicts of all endpoints took to reach the snapshot.

use std::io::{BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use beacon::health;
use beacon::model::{Endpoint, Port, ProbeKind, Protocol, ServiceKey, ServiceSpec};
use beacon::registry::{self, Update};
use tokio_util::sync::CancellationToken;

struct Args {
    endpoints: usize,
    seconds: u64,
    listeners: usize,
    per_service: usize,
    interval: Duration,
    warmup: u64,
}

fn args() -> Args {
    let mut a = Args {
        endpoints: 10_000,
        seconds: 20,
        listeners: 100,
        per_service: 0,
        interval: Duration::from_secs(1),
        warmup: 3,
    };
    let argv: Vec<String> = std::env::args().skip(1).collect();
    for pair in argv.chunks(2) {
        let value = || {
            pair.get(1)
                .and_then(|v| v.parse::<u64>().ok())
                .expect("a number")
        };
        match pair[0].as_str() {
            "--endpoints" => a.endpoints = value() as usize,
            "--seconds" => a.seconds = value(),
            "--listeners" => a.listeners = value() as usize,
            "--per-service" => a.per_service = value() as usize,
            "--interval-ms" => a.interval = Duration::from_millis(value()),
            "--warmup" => a.warmup = value(),
            other => panic!("unknown argument {other}"),
        }
    }
    assert!((1..=16_000).contains(&a.listeners), "1..=16000 listeners");
    if a.per_service == 0 || a.per_service > a.listeners {
        a.per_service = a.listeners;
    }
    a
}

fn listener_ip(i: usize) -> IpAddr {
    IpAddr::from([127, 1, (i / 250) as u8, (i % 250 + 1) as u8])
}

/// The child: binds the listeners, prints their addresses, accepts and
/// drops connections until its stdin closes.
fn serve(listeners: usize) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    rt.block_on(async {
        let mut out = std::io::stdout().lock();
        for i in 0..listeners {
            let l = tokio::net::TcpListener::bind(SocketAddr::new(listener_ip(i), 0))
                .await
                .unwrap();
            writeln!(out, "{}", l.local_addr().unwrap()).unwrap();
            tokio::spawn(async move {
                loop {
                    if let Ok((s, _)) = l.accept().await {
                        drop(s);
                    }
                }
            });
        }
        writeln!(out, "ready").unwrap();
        out.flush().unwrap();
        drop(out);
        // Parent gone (stdin closed): exit.
        tokio::task::spawn_blocking(|| std::io::stdin().read_line(&mut String::new()))
            .await
            .ok();
    });
}

/// user + sys CPU seconds of a process.
fn cpu_seconds(pid: &str) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the ")" that ends the command name; utime and stime are
    // fields 14 and 15 of the whole line.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: u64 = f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap();
    let hz: f64 = Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0);
    ticks as f64 / hz
}

/// Seconds the process's threads spent runnable but waiting for a CPU
/// (`/proc/self/task/*/schedstat`, second field): high means the machine,
/// not the prober, limits the probe rate.
fn run_queue_wait() -> f64 {
    let mut ns = 0u64;
    for task in std::fs::read_dir("/proc/self/task")
        .into_iter()
        .flatten()
        .flatten()
    {
        let stat = std::fs::read_to_string(task.path().join("schedstat")).unwrap_or_default();
        ns += stat
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
    }
    ns as f64 / 1e9
}

fn counter(text: &str, name_and_labels: &str) -> f64 {
    text.lines()
        .find(|l| l.starts_with(name_and_labels))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0.0)
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("serve") {
        let n = std::env::args()
            .nth(2)
            .and_then(|v| v.parse().ok())
            .unwrap();
        serve(n);
        return;
    }
    let a = args();
    let mut child = Command::new(std::env::current_exe().unwrap())
        .args(["serve", &a.listeners.to_string()])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("start the backend process");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let mut addrs: Vec<SocketAddr> = Vec::new();
    for line in lines.by_ref() {
        let line = line.unwrap();
        if line == "ready" {
            break;
        }
        addrs.push(line.parse().unwrap());
    }
    assert_eq!(addrs.len(), a.listeners);

    let recorder = metrics_exporter_prometheus::PrometheusBuilder::new().build_recorder();
    let metrics = recorder.handle();
    metrics::set_global_recorder(recorder).unwrap();

    let child_pid = child.id().to_string();
    let rt = tokio::runtime::Runtime::new().unwrap();
    rt.block_on(async move {
        let shutdown = CancellationToken::new();
        let (handle, mut reader, _registry) =
            registry::spawn(vec![], Duration::from_secs(5), shutdown.clone());
        let services = a.endpoints.div_ceil(a.per_service);
        let mut specs = Vec::new();
        let mut left = a.endpoints;
        for s in 0..services {
            let mut spec = ServiceSpec::new(ServiceKey::new("load", &format!("svc{s}")));
            spec.ports.push(Port {
                name: "tcp".into(),
                port: 80,
                target_port: 80,
                protocol: Protocol::Tcp,
                listen: None,
            });
            spec.health.probe = ProbeKind::Tcp;
            spec.health.interval = a.interval;
            for addr in addrs.iter().take(left.min(a.per_service)) {
                spec.endpoints.push(Endpoint {
                    port: Some(addr.port()),
                    ..Endpoint::new(addr.ip())
                });
            }
            left -= spec.endpoints.len();
            specs.push(spec);
        }
        let (_outcomes_tx, outcomes) = tokio::sync::mpsc::channel(1);
        let (_health, stats) =
            health::spawn_with_stats(reader.clone(), handle.clone(), outcomes, shutdown.clone());
        let reset_at = Instant::now();
        assert!(handle.source(&"load".into(), Update::Reset(specs)).await);
        reader.ready().await;
        let all_verdicts = async {
            loop {
                let snap = reader.latest();
                let up = snap
                    .services
                    .values()
                    .flat_map(|s| s.endpoints.iter())
                    .filter(|e| e.health.probe == beacon::model::ProbeState::Up)
                    .count();
                if up == a.endpoints {
                    return reset_at.elapsed();
                }
                if reader.changed().await.is_none() {
                    return reset_at.elapsed();
                }
            }
        };
        match tokio::time::timeout(Duration::from_secs(60), all_verdicts).await {
            Ok(t) => println!("first verdicts of all endpoints in the snapshot after {t:.2?}"),
            Err(_) => println!("first verdicts: not all within 60 s"),
        }
        tokio::time::sleep(Duration::from_secs(a.warmup)).await;

        let me = std::process::id().to_string();
        let checks = |text: &str| {
            (
                counter(text, "beacon_health_checks_total{result=\"success\"}"),
                counter(text, "beacon_health_checks_total{result=\"failure\"}"),
            )
        };
        let (ok0, fail0) = checks(&metrics.render());
        let load0 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let wait0 = run_queue_wait();
        let (cpu0, child0, t0) = (cpu_seconds(&me), cpu_seconds(&child_pid), Instant::now());
        // Sample the probes in flight: with the probe rate, Little's law
        // gives the mean probe latency.
        let mut samples = 0u64;
        let mut in_flight_sum = 0u64;
        while t0.elapsed() < Duration::from_secs(a.seconds) {
            tokio::time::sleep(Duration::from_millis(100)).await;
            in_flight_sum += stats.borrow().in_flight as u64;
            samples += 1;
        }
        let (cpu1, child1, wall) = (cpu_seconds(&me), cpu_seconds(&child_pid), t0.elapsed());
        let wait1 = run_queue_wait();
        let load1 = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
        let (ok1, fail1) = checks(&metrics.render());

        let wall = wall.as_secs_f64();
        let snap = reader.current();
        let healthy = snap
            .services
            .values()
            .flat_map(|s| s.endpoints.iter())
            .filter(|e| e.healthy)
            .count();
        let s = *stats.borrow();
        println!(
            "endpoints={} interval={:?} window={wall:.1}s",
            a.endpoints, a.interval
        );
        println!(
            "probes: {:.0}/s ok, {:.0}/s failed; healthy endpoints {healthy}/{}; targets {} in flight {}",
            (ok1 - ok0) / wall,
            (fail1 - fail0) / wall,
            snap.endpoint_count(),
            s.targets,
            s.in_flight
        );
        println!(
            "prober cpu (user+sys): {:.3} s over {wall:.1} s = {:.1}% of one core",
            cpu1 - cpu0,
            100.0 * (cpu1 - cpu0) / wall
        );
        println!(
            "backend process cpu: {:.1}% of one core",
            100.0 * (child1 - child0) / wall
        );
        let in_flight = in_flight_sum as f64 / samples.max(1) as f64;
        println!(
            "mean probes in flight {in_flight:.0} => mean probe latency {:.1} ms",
            1000.0 * in_flight / ((ok1 - ok0 + fail1 - fail0) / wall).max(1.0)
        );
        println!(
            "cpu per probe {:.0} us; threads waited {:.1} s for a CPU (run queue) during the window",
            1e6 * (cpu1 - cpu0) / (ok1 - ok0 + fail1 - fail0).max(1.0),
            wait1 - wait0
        );
        println!("loadavg before: {}loadavg after:  {}", load0, load1);
        shutdown.cancel();
    });
    drop(child.stdin.take());
    let _ = child.kill();
    let _ = child.wait();
}
