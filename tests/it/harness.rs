//! Starts the real `beacon` binary with a generated config on free loopback
//! ports; kills it on drop. Blocking std I/O keeps tests simple.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_beacon");

/// A free port on 127.0.0.1 for both TCP and UDP (checked, then released).
/// Below the kernel's ephemeral range (32768 and up): a port taken from
/// that range and released can be handed straight to another test's client
/// socket before the server that was meant to have it binds it.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU16, Ordering};
    // Each test process starts at its own place and walks on from there.
    static NEXT: AtomicU16 = AtomicU16::new(0);
    let seed = (std::process::id() as u16 % 97) * 128;
    for _ in 0..2_000 {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let port = 20_000 + (seed.wrapping_add(n.wrapping_mul(7))) % 12_000;
        let Ok(_tcp) = TcpListener::bind(("127.0.0.1", port)) else {
            continue;
        };
        if UdpSocket::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port with both TCP and UDP free below 32000");
}

pub fn free_addr() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], free_port()))
}

/// Polls `f` every 20 ms until it returns Some or `timeout` passes.
pub fn eventually<T>(timeout: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let start = Instant::now();
    loop {
        if let Some(v) = f() {
            return v;
        }
        if start.elapsed() > timeout {
            panic!("not within {timeout:?}: {what}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A minimal HTTP/1.1 GET; returns (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> std::io::Result<(u16, String)> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))?;
    // One write: a request split over segments must not change what is tested.
    let request = format!("GET {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n");
    s.write_all(request.as_bytes())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)?;
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// A running beacon. Killed on drop.
pub struct Beacon {
    pub child: Child,
    pub dir: tempfile::TempDir,
    pub admin: SocketAddr,
    pub dns: SocketAddr,
    pub log: PathBuf,
}

#[derive(Default)]
pub struct Options {
    /// TOML appended to the generated config (sources, [health], ...).
    pub extra: String,
    /// Keys added to the `[dns]` table.
    pub dns_extra: String,
    /// Written to `services.toml` in the config's directory when set.
    pub services: Option<String>,
    pub args: Vec<String>,
    /// Environment variables for the process.
    pub env: Vec<(String, String)>,
}

impl Beacon {
    /// `beacon run` with a config whose `[dns]` and `[admin]` listen on free
    /// ports; `extra` adds the rest. Waits for /healthz.
    pub fn start(opts: Options) -> Beacon {
        let dir = tempfile::tempdir().unwrap();
        let admin = free_addr();
        let dns = free_addr();
        // No lameduck unless the test asks: SIGTERM tests time the exit.
        let lameduck = if opts.dns_extra.contains("lameduck") {
            ""
        } else {
            "lameduck = \"0s\"\n"
        };
        let config = format!(
            "shutdown_grace = \"3s\"\nstartup_timeout = \"5s\"\n[dns]\nlisten = \"{dns}\"\n{lameduck}{}\n[admin]\nlisten = \"{admin}\"\n{}\n",
            opts.dns_extra, opts.extra
        );
        std::fs::write(dir.path().join("beacon.toml"), config).unwrap();
        if let Some(s) = &opts.services {
            std::fs::write(dir.path().join("services.toml"), s).unwrap();
        }
        let mut args = vec![
            "run".to_string(),
            "--config".into(),
            dir.path().join("beacon.toml").display().to_string(),
        ];
        args.extend(opts.args);
        Self::spawn_env(dir, admin, dns, &args, &opts.env)
    }

    /// Runs the binary with `args` in `dir`, logging to `dir/beacon.log`.
    pub fn spawn(
        dir: tempfile::TempDir,
        admin: SocketAddr,
        dns: SocketAddr,
        args: &[String],
    ) -> Beacon {
        Self::spawn_env(dir, admin, dns, args, &[])
    }

    /// [`Beacon::spawn`] with extra environment variables.
    pub fn spawn_env(
        dir: tempfile::TempDir,
        admin: SocketAddr,
        dns: SocketAddr,
        args: &[String],
        env: &[(String, String)],
    ) -> Beacon {
        let log = dir.path().join("beacon.log");
        let child = Command::new(BIN)
            .args(args)
            .env("RUST_LOG", "info,beacon=debug")
            .envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .stdout(Stdio::from(
                std::fs::File::create(dir.path().join("stdout.log")).unwrap(),
            ))
            .stderr(Stdio::from(std::fs::File::create(&log).unwrap()))
            .spawn()
            .expect("start beacon");
        let mut b = Beacon {
            child,
            dir,
            admin,
            dns,
            log,
        };
        b.wait_healthy();
        b
    }

    fn wait_healthy(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(15) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "beacon exited early with {status}; log:\n{}",
                    self.log_text()
                );
            }
            if matches!(http_get(self.admin, "/healthz"), Ok((200, _))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("beacon not healthy within 15 s; log:\n{}", self.log_text());
    }

    pub fn wait_ready(&self) {
        eventually(Duration::from_secs(10), "/readyz 200", || {
            matches!(http_get(self.admin, "/readyz"), Ok((200, _))).then_some(())
        });
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn services_json(&self) -> serde_json::Value {
        let (status, body) = http_get(self.admin, "/v1/services").expect("GET /v1/services");
        assert_eq!(status, 200, "{body}");
        serde_json::from_str(&body).expect("JSON")
    }

    pub fn metrics(&self) -> String {
        http_get(self.admin, "/metrics").expect("GET /metrics").1
    }

    /// The value of one metric line (name with labels, exactly as rendered).
    pub fn metric(&self, series: &str) -> Option<f64> {
        self.metrics().lines().find_map(|l| {
            l.strip_prefix(series)?
                .strip_prefix(' ')?
                .trim()
                .parse()
                .ok()
        })
    }

    pub fn signal(&self, sig: i32) {
        let rc = unsafe_kill(self.child.id() as i32, sig);
        assert_eq!(rc, 0, "kill failed");
    }

    /// Waits for the process to exit within `timeout`.
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        eventually(timeout, "beacon exits", || self.child.try_wait().unwrap())
    }
}

fn unsafe_kill(pid: i32, sig: i32) -> i32 {
    // `kill(1)` keeps this test crate free of unsafe code.
    let status = Command::new("kill")
        .arg(format!("-{sig}"))
        .arg(pid.to_string())
        .status()
        .expect("run kill");
    if status.success() { 0 } else { -1 }
}

impl Drop for Beacon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        if std::thread::panicking() {
            // Only the tail here, so that the assertion (printed above it)
            // stays in view in a CI log; the whole log is kept in a file.
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let kept = std::env::temp_dir().join(format!(
                "beacon-failed-{}-{}.log",
                std::process::id(),
                self.child.id()
            ));
            let _ = std::fs::write(&kept, &text);
            eprintln!(
                "--- last 40 of {} lines of the beacon log (all of it: {}) ---\n{}",
                lines.len(),
                kept.display(),
                lines[lines.len().saturating_sub(40)..].join("\n")
            );
        }
    }
}

/// Runs the binary to completion; returns (status, stdout, stderr).
pub fn run_cmd(args: &[&str]) -> (ExitStatus, String, String) {
    let out = Command::new(BIN).args(args).output().expect("run beacon");
    (
        out.status,
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

pub fn repo_path(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `dig +short` against beacon's DNS; the answers, sorted. UDP unless `tcp`.
pub fn dig(dns: SocketAddr, name: &str, qtype: &str, tcp: bool) -> Vec<String> {
    let mut cmd = Command::new("dig");
    cmd.arg(format!("@{}", dns.ip()))
        .arg("-p")
        .arg(dns.port().to_string())
        .args(["+short", "+time=1", "+tries=1", name, qtype]);
    if tcp {
        cmd.arg("+tcp");
    }
    let out = cmd
        .output()
        .expect("dig (bind9-dnsutils) must be installed: ./scripts/test installs it");
    let mut lines: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| !l.starts_with(';'))
        .map(str::to_string)
        .collect();
    lines.sort();
    lines
}

/// Full `dig` output (header, flags, sections) for assertions on rcode etc.
pub fn dig_full(dns: SocketAddr, args: &[&str]) -> String {
    let out = Command::new("dig")
        .arg(format!("@{}", dns.ip()))
        .arg("-p")
        .arg(dns.port().to_string())
        .args(["+time=2", "+tries=1"])
        .args(args)
        .output()
        .expect("dig (bind9-dnsutils) must be installed: ./scripts/test installs it");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A demo backend as its own process (`beacon backend`); killed on drop.
pub struct BackendProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub name: String,
}

impl BackendProcess {
    pub fn start(name: &str, addr: SocketAddr) -> BackendProcess {
        let child = Command::new(BIN)
            .args(["backend", "--name", name, "--listen", &addr.to_string()])
            .env("RUST_LOG", "warn")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start backend");
        let b = BackendProcess {
            child,
            addr,
            name: name.into(),
        };
        eventually(Duration::from_secs(5), "backend listening", || {
            TcpStream::connect_timeout(&addr, Duration::from_millis(200))
                .ok()
                .map(|_| ())
        });
        b
    }

    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for BackendProcess {
    fn drop(&mut self) {
        self.stop();
    }
}

/// One HTTP GET through `addr`; the backend's name, or the error.
pub fn fetch_name(addr: SocketAddr) -> Result<String, String> {
    match http_get(addr, "/") {
        Ok((200, body)) => Ok(body.trim().to_string()),
        Ok((status, body)) => Err(format!("status {status}: {body}")),
        Err(e) => Err(e.to_string()),
    }
}

/// One UDP A query (hickory-proto client side), for tests that poll fast
/// and measure time; `None` when no reply came within 500 ms.
pub fn query_a(dns: SocketAddr, name: &str) -> Option<Vec<String>> {
    use hickory_proto::op::{Message, MessageType, OpCode, Query};
    use hickory_proto::rr::{Name, RecordType};
    let mut msg = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    msg.queries
        .push(Query::query(Name::from_ascii(name).unwrap(), RecordType::A));
    let sock = UdpSocket::bind("127.0.0.1:0").ok()?;
    sock.set_read_timeout(Some(Duration::from_millis(500)))
        .ok()?;
    sock.send_to(&msg.to_vec().ok()?, dns).ok()?;
    let mut buf = [0u8; 4096];
    let n = sock.recv(&mut buf).ok()?;
    let reply = Message::from_vec(&buf[..n]).ok()?;
    let mut ips = a_addresses(&reply);
    ips.sort();
    Some(ips)
}

/// The A addresses in a reply's answer section, in order.
pub fn a_addresses(reply: &hickory_proto::op::Message) -> Vec<String> {
    use hickory_proto::rr::RData;
    reply
        .answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(a.0.to_string()),
            _ => None,
        })
        .collect()
}

/// Serializes the tests that measure time, so they do not load each other.
pub fn timing_lock() -> std::sync::MutexGuard<'static, ()> {
    static LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());
    LOCK.lock().unwrap_or_else(|e| e.into_inner())
}

/// CPU seconds (user + system) a process has used, from /proc.
pub fn cpu_seconds(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which is in parentheses).
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = f[11].parse::<f64>().unwrap() + f[12].parse::<f64>().unwrap();
    ticks / 100.0
}

/// Resident set size of a process, in bytes (from /proc).
pub fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .expect("VmRSS line");
    kb * 1024
}

/// `openssl ARGS` in `dir` (test certificates); fails the test on an error.
/// A self-signed EC (P-256) certificate `name.pem` with its key
/// `name.key` in `dir`, for subject `subj`, valid 2 days; `more` is added
/// to the `openssl req` arguments (`-addext ...`).
pub fn self_signed(dir: &std::path::Path, name: &str, subj: &str, more: &[&str]) {
    let (key, pem) = (format!("{name}.key"), format!("{name}.pem"));
    let mut args = vec![
        "req",
        "-x509",
        "-newkey",
        "ec",
        "-pkeyopt",
        "ec_paramgen_curve:prime256v1",
        "-nodes",
        "-days",
        "2",
        "-subj",
        subj,
        "-keyout",
        &key,
        "-out",
        &pem,
    ];
    args.extend_from_slice(more);
    openssl(dir, &args);
}

pub fn openssl(dir: &std::path::Path, args: &[&str]) {
    let out = std::process::Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .expect("openssl must be installed: ./scripts/test installs it");
    assert!(
        out.status.success(),
        "openssl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}
