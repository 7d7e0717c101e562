//! Churn soak (issue 11): 50 endpoint updates per second for 60 s through
//! the file source (atomic renames), while one client opens proxy
//! connections and another queries DNS. Every pool backend stays alive, so
//! every connection must succeed; every DNS answer must be one endpoint set
//! the file held within the last two seconds (never a mix, never an endpoint
//! removed long ago); beacon's memory must stay flat and it must go quiet
//! when the churn stops.

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use crate::harness::*;

const POOL: usize = 6;
const UPDATES_PER_SEC: u64 = 50;
const SOAK: Duration = Duration::from_secs(60);
const NAME: &str = "churn.default.svc.cluster.local";

fn services_file(listen: &str, port: u16, ips: &BTreeSet<String>) -> String {
    let mut s = format!(
        "[[service]]\nname = \"churn\"\n  [[service.port]]\n  name = \"http\"\n  port = 80\n  target_port = {port}\n  listen = \"{listen}\"\n  [service.health]\n  kind = \"none\"\n"
    );
    for ip in ips {
        s.push_str(&format!("  [[service.endpoint]]\n  ip = \"{ip}\"\n"));
    }
    s
}

/// A random subset of the pool, 2 to 5 addresses.
fn subset(rng: &mut fastrand::Rng) -> BTreeSet<String> {
    let n = rng.usize(2..=5);
    let mut all: Vec<usize> = (1..=POOL).collect();
    rng.shuffle(&mut all);
    all[..n].iter().map(|i| format!("127.0.3.{i}")).collect()
}

#[test]
fn fifty_updates_a_second_for_a_minute_lose_no_connection_and_serve_no_stale_answer() {
    let port = free_port();
    let backends: Vec<BackendProcess> = (1..=POOL)
        .map(|i| {
            let addr = format!("127.0.3.{i}:{port}").parse().unwrap();
            BackendProcess::start(&format!("b{i}"), addr)
        })
        .collect();
    let listen = free_addr();
    let mut rng = fastrand::Rng::with_seed(7);
    let first = subset(&mut rng);
    let b = Beacon::start(Options {
        extra: "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        services: Some(services_file(&listen.to_string(), port, &first)),
        ..Options::default()
    });
    b.wait_ready();
    eventually(Duration::from_secs(5), "first set served", || {
        query_a(b.dns, NAME).filter(|a| !a.is_empty()).map(|_| ())
    });
    let pid = b.child.id();
    let history = Arc::new(Mutex::new(vec![first]));
    let current = Arc::new(AtomicUsize::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let file = b.path("services.toml");
    let tmp = b.path(".services.toml.tmp");
    let writer = {
        let (history, current, stop) = (history.clone(), current.clone(), stop.clone());
        let listen = listen.to_string();
        std::thread::spawn(move || {
            let start = Instant::now();
            let mut i = 0u64;
            while start.elapsed() < SOAK {
                let set = subset(&mut rng);
                std::fs::write(&tmp, services_file(&listen, port, &set)).unwrap();
                let mut h = history.lock().unwrap();
                h.push(set);
                std::fs::rename(&tmp, &file).unwrap();
                current.store(h.len() - 1, Ordering::SeqCst);
                drop(h);
                i += 1;
                let next = start + Duration::from_millis(i * 1000 / UPDATES_PER_SEC);
                std::thread::sleep(next.saturating_duration_since(Instant::now()));
            }
            stop.store(true, Ordering::SeqCst);
            i
        })
    };
    let connector = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            let (mut ok, mut failed) = (0u64, Vec::new());
            while !stop.load(Ordering::SeqCst) {
                match fetch_name(listen) {
                    Ok(_) => ok += 1,
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    let resolver = {
        let (history, current, stop) = (history.clone(), current.clone(), stop.clone());
        let dns = b.dns;
        std::thread::spawn(move || {
            let (mut answers, mut bad, mut max_lag) = (0u64, Vec::new(), 0usize);
            while !stop.load(Ordering::SeqCst) {
                let Some(got) = query_a(dns, NAME) else {
                    bad.push("no reply in 500 ms".to_string());
                    continue;
                };
                let got: BTreeSet<String> = got.into_iter().collect();
                let now = current.load(Ordering::SeqCst);
                let h = history.lock().unwrap();
                // The newest update the answer matches, at most 2 s back.
                let window = 2 * UPDATES_PER_SEC as usize;
                let from = now.saturating_sub(window);
                match (from..h.len()).rev().find(|&k| h[k] == got) {
                    Some(k) => max_lag = max_lag.max(now.saturating_sub(k)),
                    None => bad.push(format!(
                        "answer {got:?} is no set of updates {from}..={now}"
                    )),
                }
                answers += 1;
                drop(h);
                std::thread::sleep(Duration::from_millis(2));
            }
            (answers, bad, max_lag)
        })
    };
    std::thread::sleep(Duration::from_secs(10));
    let rss_early = rss_bytes(pid);
    let updates = writer.join().unwrap();
    let rss_end = rss_bytes(pid);
    let (connections, failed) = connector.join().unwrap();
    let (answers, bad, max_lag) = resolver.join().unwrap();
    // Idle after the churn: no reload storm, no busy loop.
    std::thread::sleep(Duration::from_millis(500));
    let cpu0 = cpu_seconds(pid);
    std::thread::sleep(Duration::from_secs(2));
    let idle_cpu = cpu_seconds(pid) - cpu0;
    let mb = |x: u64| x as f64 / 1048576.0;
    eprintln!(
        "soak: {updates} updates, {connections} connections ({} failed), {answers} DNS answers ({} bad, max lag {max_lag} updates), rss {:.1} MB at 10 s, {:.1} MB at the end, idle CPU {idle_cpu:.2} s in 2 s",
        failed.len(),
        bad.len(),
        mb(rss_early),
        mb(rss_end)
    );
    assert!(updates >= 2_900, "only {updates} updates in {SOAK:?}");
    assert!(connections > 1_000, "only {connections} connections");
    assert!(
        failed.is_empty(),
        "failed connections: {:?}",
        &failed[..failed.len().min(5)]
    );
    assert!(answers > 1_000, "only {answers} answers");
    assert!(
        bad.is_empty(),
        "stale or mixed answers: {:?}",
        &bad[..bad.len().min(5)]
    );
    assert!(
        rss_end < rss_early + 10 * 1024 * 1024,
        "rss grew from {:.1} MB to {:.1} MB",
        mb(rss_early),
        mb(rss_end)
    );
    assert!(
        idle_cpu < 0.2,
        "idle CPU {idle_cpu:.2} s in 2 s after the churn"
    );
    drop(backends);
}
