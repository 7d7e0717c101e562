//! The proxy in the real binary: balancing across backend processes over
//! splice, SIGTERM drain, and descriptor exhaustion under a low `ulimit -n`.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::harness::*;

const FILE_SOURCE: &str = "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n";

fn services(listen: SocketAddr, endpoints: &[SocketAddr], extra: &str) -> String {
    let mut s = format!(
        "[[service]]\nname = \"web\"\n{extra}\n[[service.port]]\nname = \"http\"\nport = 80\nlisten = \"{listen}\"\n"
    );
    for e in endpoints {
        s += &format!(
            "[[service.endpoint]]\nip = \"{}\"\nport = {}\n",
            e.ip(),
            e.port()
        );
    }
    s
}

#[test]
fn round_robin_across_backend_processes_through_splice() {
    let _lock = timing_lock();
    let port = free_port();
    let backends: Vec<BackendProcess> = (1..=3)
        .map(|i| {
            BackendProcess::start(
                &format!("web-{i}"),
                format!("127.0.0.7{i}:{port}").parse().unwrap(),
            )
        })
        .collect();
    let addrs: Vec<SocketAddr> = backends.iter().map(|b| b.addr).collect();
    let listen = free_addr();
    let beacon = Beacon::start(Options {
        extra: FILE_SOURCE.into(),
        // No probes: no snapshot change (and balancer rebuild) mid-count.
        services: Some(services(
            listen,
            &addrs,
            "balance = \"round_robin\"\n[service.health]\nkind = \"none\"",
        )),
        ..Options::default()
    });
    beacon.wait_ready();
    let mut seen: BTreeMap<String, usize> = BTreeMap::new();
    for _ in 0..30 {
        let name = fetch_name(listen).unwrap_or_else(|e| panic!("proxied GET failed: {e}"));
        *seen.entry(name).or_default() += 1;
    }
    let want: BTreeMap<String, usize> = (1..=3).map(|i| (format!("web-{i}"), 10)).collect();
    assert_eq!(seen, want);
    let ok = r#"beacon_proxy_connections_total{service="web.default",result="ok"}"#;
    eventually(Duration::from_secs(5), "connections counted", || {
        (beacon.metric(ok)? >= 30.0).then_some(())
    });
    // Both directions of every connection went through splice(2).
    eventually(Duration::from_secs(5), "splice used", || {
        (beacon.metric(r#"beacon_proxy_splice_total{mode="splice"}"#)? >= 60.0).then_some(())
    });
    assert_eq!(
        beacon.metric(r#"beacon_proxy_splice_total{mode="fallback"}"#),
        None
    );
    let to_client = r#"beacon_proxy_bytes_total{service="web.default",direction="to_client"}"#;
    assert!(beacon.metric(to_client).unwrap() > 0.0);
}

/// A backend that echoes lines on every connection, in this process.
fn echo_backend(ip: &str) -> SocketAddr {
    let l = TcpListener::bind((ip, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    std::thread::spawn(move || {
        for s in l.incoming().take(16) {
            let Ok(s) = s else { continue };
            std::thread::spawn(move || {
                let mut w = s.try_clone().unwrap();
                for line in BufReader::new(s).lines().map_while(Result::ok) {
                    if w.write_all(format!("{line}\n").as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

fn echo(s: &mut BufReader<TcpStream>, msg: &str) -> String {
    s.get_mut()
        .write_all(format!("{msg}\n").as_bytes())
        .unwrap();
    let mut line = String::new();
    s.read_line(&mut line).unwrap();
    line.trim_end().to_string()
}

#[test]
fn sigterm_closes_listeners_and_drains_live_connections() {
    let _lock = timing_lock();
    let backend = echo_backend("127.0.0.74");
    let listen = free_addr();
    let mut beacon = Beacon::start(Options {
        extra: format!("{FILE_SOURCE}[proxy]\ndrain_timeout = \"2s\"\n"),
        services: Some(services(listen, &[backend], "")),
        ..Options::default()
    });
    beacon.wait_ready();
    let live = TcpStream::connect(listen).unwrap();
    live.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let mut live = BufReader::new(live);
    assert_eq!(echo(&mut live, "before"), "before");
    let term = Instant::now();
    beacon.signal(15);
    eventually(Duration::from_secs(2), "listener closed", || {
        TcpStream::connect_timeout(&listen, Duration::from_millis(200))
            .is_err()
            .then_some(())
    });
    // The live connection still works during the drain...
    assert_eq!(echo(&mut live, "during drain"), "during drain");
    // ...and is closed once the drain timeout has passed, with a reset: a
    // connection cut by the deadline must not look complete.
    let mut rest = Vec::new();
    let end = live.read_to_end(&mut rest);
    let closed = term.elapsed();
    assert!(
        matches!(&end, Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset),
        "the drain deadline must reset the connection: {end:?}"
    );
    assert!(
        closed >= Duration::from_millis(1800) && closed < Duration::from_secs(5),
        "closed after {closed:?}"
    );
    let status = beacon.wait_exit(Duration::from_secs(5));
    assert!(status.success(), "{status}");
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// beacon under `ulimit -n 64`, flooded with idle proxied connections:
/// accept(2) fails with EMFILE, the process does not spin, and it serves
/// again once the flood goes away.
#[test]
fn emfile_under_low_ulimit_backs_off_and_recovers() {
    let _lock = timing_lock();
    let port = free_port();
    let backend = BackendProcess::start("web-1", format!("127.0.0.75:{port}").parse().unwrap());
    let listen = free_addr();
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr();
    let dns = free_addr();
    std::fs::write(
        dir.path().join("beacon.toml"),
        format!(
            "shutdown_grace = \"3s\"\n[dns]\nlisten = \"{dns}\"\nudp_sockets = 1\n[admin]\nlisten = \"{admin}\"\n{FILE_SOURCE}"
        ),
    )
    .unwrap();
    std::fs::write(
        dir.path().join("services.toml"),
        services(listen, &[backend.addr], "[service.health]\nkind = \"none\""),
    )
    .unwrap();
    let log = dir.path().join("beacon.log");
    let child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
        .arg(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("beacon.toml"))
        .env("RUST_LOG", "info,beacon=debug")
        .stdout(Stdio::null())
        .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
        .spawn()
        .unwrap();
    let pid = child.id();
    let mut beacon = Beacon {
        child,
        dir,
        admin,
        dns,
        log,
    };
    eventually(Duration::from_secs(15), "beacon ready", || {
        matches!(http_get(admin, "/readyz"), Ok((200, _))).then_some(())
    });
    assert_eq!(fetch_name(listen).as_deref(), Ok("web-1"));
    // Idle client connections hold two descriptors each in beacon.
    let mut flood: Vec<TcpStream> = (0..80)
        .filter_map(|_| TcpStream::connect_timeout(&listen, Duration::from_secs(1)).ok())
        .collect();
    std::thread::sleep(Duration::from_millis(1500));
    let before = cpu_ticks(pid);
    std::thread::sleep(Duration::from_secs(1));
    let spent = cpu_ticks(pid) - before;
    assert!(
        spent < 30,
        "beacon spins out of descriptors: {spent} ticks in 1 s"
    );
    assert!(
        beacon.log_text().contains("accept failing; backing off"),
        "EMFILE never reached"
    );
    for s in &mut flood {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    drop(flood);
    eventually(Duration::from_secs(15), "served again", || {
        (fetch_name(listen).as_deref() == Ok("web-1")).then_some(())
    });
    assert!(beacon.log_text().contains("proxy accepting again"));
    beacon.signal(15);
    assert!(beacon.wait_exit(Duration::from_secs(10)).success());
}

#[test]
fn access_log_writes_json_lines_with_log_format_json() {
    let backend = echo_backend("127.0.0.75");
    let listen = free_addr();
    let dead = free_addr();
    let beacon = Beacon::start(Options {
        extra: format!("[proxy]\naccess_log = \"access.log\"\n{FILE_SOURCE}"),
        services: Some(format!(
            "{}\n{}",
            services(listen, &[backend], "[service.health]\nkind = \"none\""),
            services(dead, &[], "").replace("\"web\"", "\"empty\"")
        )),
        args: vec!["--log-format".into(), "json".into()],
        ..Options::default()
    });
    beacon.wait_ready();
    let mut s = BufReader::new(TcpStream::connect(listen).unwrap());
    assert_eq!(echo(&mut s, "hello"), "hello");
    let client = s.get_ref().local_addr().unwrap();
    s.get_ref().shutdown(std::net::Shutdown::Write).unwrap();
    let mut rest = String::new();
    s.read_to_string(&mut rest).unwrap();
    drop(s);
    // A service with no endpoint: refused.
    let mut r = TcpStream::connect(dead).unwrap();
    let _ = r.read(&mut [0u8; 8]);
    let path = beacon.path("access.log");
    let lines: Vec<serde_json::Value> = eventually(Duration::from_secs(5), "two lines", || {
        let text = std::fs::read_to_string(&path).ok()?;
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is JSON"))
            .collect();
        (lines.len() == 2).then_some(lines)
    });
    let fin = lines
        .iter()
        .find(|l| l["service"] == "web.default")
        .unwrap();
    assert_eq!(fin["end"], "fin");
    assert_eq!(fin["client"], client.to_string());
    assert_eq!(fin["endpoint"], backend.to_string());
    assert_eq!(fin["to_upstream"], 6);
    assert_eq!(fin["to_client"], 6);
    assert!(fin["timestamp"].as_str().unwrap().ends_with('Z'));
    let refused = lines
        .iter()
        .find(|l| l["service"] == "empty.default")
        .unwrap();
    assert_eq!(refused["end"], "refused");
    assert_eq!(refused["detail"], "no_endpoints");
    assert!(refused["endpoint"].is_null());
}

#[test]
fn slow_start_shows_a_growing_effective_weight_in_v1_services() {
    let a = echo_backend("127.0.0.76");
    let b = echo_backend("127.0.0.77");
    let listen = free_addr();
    let extra = "[service.health]\nkind = \"none\"";
    let beacon = Beacon::start(Options {
        extra: format!("[proxy]\nslow_start = \"3s\"\n{FILE_SOURCE}"),
        services: Some(services(listen, &[a], extra)),
        ..Options::default()
    });
    beacon.wait_ready();
    let weight_of = |ip: &str| -> Option<f64> {
        let v = beacon.services_json();
        let eps = v["services"][0]["endpoints"].as_array()?.clone();
        eps.iter()
            .find(|e| e["ip"] == ip)
            .and_then(|e| e["effective_weight"].as_f64())
    };
    // At start-up nothing ramps.
    assert_eq!(weight_of("127.0.0.76"), Some(1.0));
    let file = beacon.path("services.toml");
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, services(listen, &[a, b], extra)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    let first = eventually(Duration::from_secs(5), "b listed", || {
        weight_of("127.0.0.77")
    });
    assert!(first < 0.5, "b starts small: {first}");
    let mid = eventually(Duration::from_secs(5), "b ramping", || {
        weight_of("127.0.0.77").filter(|&w| w > first && w < 1.0)
    });
    eventually(Duration::from_secs(10), "b at full weight", || {
        (weight_of("127.0.0.77")? == 1.0).then_some(())
    });
    assert!(mid > first);
    assert_eq!(weight_of("127.0.0.76"), Some(1.0));
}
