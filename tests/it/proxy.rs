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
fn round_robin_across_backend_processes_small_exchanges_copied() {
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
    // Both directions of every connection were small: copied through the
    // per-thread buffer, never spliced, never the fallback.
    eventually(Duration::from_secs(5), "small exchanges copied", || {
        (beacon.metric(r#"beacon_proxy_splice_total{mode="copy"}"#)? >= 60.0).then_some(())
    });
    // (The three series exist from the first connection on, at 0.)
    for mode in ["splice", "fallback"] {
        let m = format!("beacon_proxy_splice_total{{mode=\"{mode}\"}}");
        assert_eq!(beacon.metric(&m).unwrap_or(0.0), 0.0, "{mode}");
    }
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

/// A network namespace of this test's own, deleted on drop.
struct Netns(String);

impl Netns {
    fn new(tag: &str) -> Netns {
        let name = format!("beacon-{tag}-{}", std::process::id());
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        let added = Command::new("ip").args(["netns", "add", &name]).status();
        assert!(
            added.is_ok_and(|s| s.success()),
            "this test needs iproute2's `ip` and root (ip netns add {name})"
        );
        let ns = Netns(name);
        ns.run(&["ip", "link", "set", "lo", "up"]);
        ns
    }

    /// A command in the namespace: its stdout; panics when it fails.
    fn run(&self, cmd: &[&str]) -> String {
        let out = self.command(cmd).output().expect("run ip netns exec");
        assert!(
            out.status.success(),
            "{cmd:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn command(&self, cmd: &[&str]) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", &self.0]).args(cmd);
        c
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Kills the child on drop.
struct Killed(std::process::Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn vip_service(name: &str, vip: &str, backend_port: u16) -> String {
    format!(
        "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\n[service.health]\nkind = \"none\"\n\
         [[service.port]]\nname = \"http\"\nport = 80\ntarget_port = {backend_port}\n\
         [[service.endpoint]]\nip = \"127.0.0.1\"\n"
    )
}

#[test]
fn vip_interface_adds_and_removes_vips_in_a_network_namespace() {
    let ns = Netns::new("vips");
    // beacon makes a dummy interface when the name is missing; this
    // machine's kernel may lack the dummy type, so the interface exists
    // already here (a veth), which beacon then uses as it is.
    if ns
        .command(&["ip", "link", "add", "beacon0", "type", "dummy"])
        .status()
        .is_ok_and(|s| !s.success())
    {
        ns.run(&[
            "ip", "link", "add", "beacon0", "type", "veth", "peer", "name", "beacon0p",
        ]);
    }
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("beacon.toml");
    std::fs::write(
        &config,
        "shutdown_grace = \"1s\"\n[dns]\nlisten = \"127.0.0.1:15353\"\n[admin]\nlisten = \"127.0.0.1:19153\"\n\
         [proxy]\nvip_interface = \"beacon0\"\n[[source]]\ntype = \"file\"\npath = \"services.toml\"\n",
    )
    .unwrap();
    let file = dir.path().join("services.toml");
    let both = format!(
        "{}\n{}",
        vip_service("web", "10.77.0.1", 9001),
        vip_service("api", "10.77.0.2", 9002)
    );
    std::fs::write(&file, &both).unwrap();
    let backend = |name: &str, port: u16| {
        let listen = format!("127.0.0.1:{port}");
        Killed(
            ns.command(&[BIN, "backend", "--name", name, "--listen", &listen])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        )
    };
    let _web = backend("web-0", 9001);
    let _api = backend("api-0", 9002);
    let log = std::fs::File::create(dir.path().join("beacon.log")).unwrap();
    let _beacon = Killed(
        ns.command(&[BIN, "run", "--config", config.to_str().unwrap()])
            .env("RUST_LOG", "info,beacon=debug")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap(),
    );
    let log_text = || std::fs::read_to_string(dir.path().join("beacon.log")).unwrap_or_default();
    let get = |vip: &str| -> Option<String> {
        let out = ns
            .command(&[BIN, "get", &format!("http://{vip}:80/")])
            .output()
            .ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_string())
    };
    let addrs = || ns.run(&["ip", "-o", "addr", "show", "dev", "beacon0"]);
    // Both vips are on the interface and reach their service by address.
    let web = eventually(Duration::from_secs(15), "web by its vip", || {
        get("10.77.0.1")
    });
    assert!(web.contains("web-0"), "{web}\n{}", log_text());
    let api = eventually(Duration::from_secs(5), "api by its vip", || {
        get("10.77.0.2")
    });
    assert!(api.contains("api-0"), "{api}");
    let a = addrs();
    assert!(
        a.contains("10.77.0.1/32") && a.contains("10.77.0.2/32"),
        "{a}"
    );
    // The api service goes: its address goes with it, web's stays.
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, vip_service("web", "10.77.0.1", 9001)).unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    eventually(Duration::from_secs(10), "api's vip removed", || {
        (!addrs().contains("10.77.0.2/")).then_some(())
    });
    assert!(addrs().contains("10.77.0.1/32"));
    assert!(get("10.77.0.1").is_some_and(|b| b.contains("web-0")));
    assert!(log_text().contains("vip removed"), "{}", log_text());
}

#[test]
fn vip_interface_without_cap_net_admin_warns_once_and_keeps_serving() {
    let ns = Netns::new("nocap");
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("beacon.toml");
    std::fs::write(
        &config,
        "shutdown_grace = \"1s\"\n[dns]\nlisten = \"127.0.0.1:15353\"\n[admin]\nlisten = \"127.0.0.1:19153\"\n\
         [proxy]\nvip_interface = \"beacon0\"\n[[source]]\ntype = \"file\"\npath = \"services.toml\"\n",
    )
    .unwrap();
    let file = dir.path().join("services.toml");
    let web = format!(
        "{}\n  [[service.port]]\n  name = \"local\"\n  port = 81\n  target_port = 9001\n  listen = \"127.0.0.1:8081\"\n",
        vip_service("web", "10.77.0.1", 9001)
    );
    std::fs::write(&file, &web).unwrap();
    let _backend = Killed(
        ns.command(&[
            BIN,
            "backend",
            "--name",
            "web-0",
            "--listen",
            "127.0.0.1:9001",
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap(),
    );
    let log = std::fs::File::create(dir.path().join("beacon.log")).unwrap();
    let _beacon = Killed(
        ns.command(&[
            "setpriv",
            "--bounding-set",
            "-net_admin",
            BIN,
            "run",
            "--config",
        ])
        .arg(&config)
        .env("RUST_LOG", "info,beacon=debug")
        .env("NO_COLOR", "1")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap(),
    );
    let log_text = || std::fs::read_to_string(dir.path().join("beacon.log")).unwrap_or_default();
    let failures = || {
        log_text()
            .matches("setting up the interface failed")
            .count()
    };
    eventually(Duration::from_secs(15), "the warning", || {
        (failures() >= 1).then_some(())
    });
    // The proxy still serves (its explicit listener; the vip binds too, freebind).
    let got = ns.run(&[BIN, "get", "http://127.0.0.1:8081/", "--wait", "5s"]);
    assert!(got.contains("web-0"), "{got}");
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(
        &tmp,
        format!("{web}\n{}", vip_service("api", "10.77.0.2", 9001)),
    )
    .unwrap();
    std::fs::rename(&tmp, &file).unwrap();
    eventually(Duration::from_secs(10), "a second attempt", || {
        (failures() >= 2).then_some(())
    });
    let text = log_text();
    let warnings: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("vip interface"))
        .collect();
    assert_eq!(warnings.len(), 1, "{text}");
    assert!(warnings[0].contains("CAP_NET_ADMIN"), "{}", warnings[0]);
    assert!(!ns.run(&["ip", "-o", "link"]).contains("beacon0"));
}
