//! The accept loop (`listener.rs`): backoff on accept errors, and real
//! descriptor exhaustion in a child process.

use std::io;
use std::sync::atomic::AtomicU32;

use tokio::sync::watch;

use super::*;
use crate::proxy::listener::{AcceptBackoff, Acceptor, BACKOFF_MAX, BACKOFF_MIN, accept_loop};

#[test]
fn accept_backoff_doubles_caps_and_skips_per_connection_errors() {
    let mut b = AcceptBackoff::default();
    let emfile = io::Error::from_raw_os_error(libc::EMFILE);
    let waits: Vec<Duration> = (0..10).map(|_| b.on_error(&emfile).unwrap()).collect();
    assert_eq!(waits[0], BACKOFF_MIN);
    assert_eq!(waits[1], BACKOFF_MIN * 2);
    assert_eq!(waits[9], BACKOFF_MAX);
    assert!(waits.windows(2).all(|w| w[0] <= w[1]));
    assert_eq!(
        b.on_error(&io::Error::from(io::ErrorKind::ConnectionAborted)),
        None
    );
    assert!(b.on_success());
    assert!(!b.on_success());
    assert_eq!(b.on_error(&emfile), Some(BACKOFF_MIN));
}

/// Fails the first `fail` accepts with EMFILE, then accepts for real.
struct Exhausted {
    inner: TcpListener,
    fail: AtomicU32,
    calls: Arc<AtomicU32>,
}

impl Acceptor for Exhausted {
    async fn accept(&self) -> io::Result<(TcpStream, SocketAddr)> {
        self.calls.fetch_add(1, Ordering::SeqCst);
        if self
            .fail
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok()
        {
            return Err(io::Error::from_raw_os_error(libc::EMFILE));
        }
        self.inner.accept().await
    }
}

#[tokio::test]
async fn accept_loop_backs_off_on_emfile_and_recovers() {
    let h = harness();
    let a = banner_backend("127.0.0.97", "a").await;
    h.set(vec![service(
        "emfile",
        "127.0.1.23:0",
        &[a.addr],
        Balance::RoundRobin,
    )])
    .await;
    // A route as the reconcile loop builds it, on a listener we control.
    let snap = h.reader.current();
    let state = snap.services.values().next().unwrap().clone();
    let shared = h.proxy().shared.clone();
    let mut rec = Reconciler::new(
        shared.clone(),
        CancellationToken::new(),
        CancellationToken::new(),
    );
    let route = Arc::new(rec.route(&state, 0));
    let inner = TcpListener::bind("127.0.1.24:0").await.unwrap();
    let addr = inner.local_addr().unwrap();
    let calls = Arc::new(AtomicU32::new(0));
    let acceptor = Exhausted {
        inner,
        fail: AtomicU32::new(7),
        calls: calls.clone(),
    };
    let (_tx, rx) = watch::channel(route);
    let stop = CancellationToken::new();
    // A client is waiting in the backlog all along; it is served once
    // accept works again, after 5+10+20+40+80+160+320 ms of pauses. They
    // pass on paused time (no byte moves until then), so the test checks
    // the backoff, not the machine's speed.
    tokio::time::pause();
    let started = tokio::time::Instant::now();
    let task = tokio::spawn(accept_loop(acceptor, rx, shared, stop.clone()));
    let mut client = TcpStream::connect(addr).await.unwrap();
    while calls.load(Ordering::SeqCst) < 8 {
        assert!(started.elapsed() < T, "accept never tried again");
        tokio::time::sleep(Duration::from_millis(1)).await;
    }
    let took = started.elapsed();
    tokio::time::resume();
    assert_eq!(read_line(&mut client).await.as_deref(), Some("a"));
    assert!(took >= Duration::from_millis(600), "no backoff: {took:?}");
    // 7 failures + 1 success (+ the pending next accept): no spinning.
    assert!(calls.load(Ordering::SeqCst) <= 9, "{calls:?}");
    stop.cancel();
    tokio::time::timeout(T, task).await.unwrap().unwrap();
}

/// The child half of `emfile_recovers_in_a_child_process`: a proxy in a
/// process with a low descriptor limit. Prints its address, uses up every
/// free descriptor, frees them when the parent says so, ends when stdin
/// closes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "run by emfile_recovers_in_a_child_process under `ulimit -n 64`"]
async fn emfile_child() {
    let h = harness();
    // The parent runs the backend; standalone, bring one.
    let backend = match std::env::var("BEACON_TEST_BACKEND") {
        Ok(addr) => addr.parse().unwrap(),
        Err(_) => banner_backend("127.0.0.98", "a").await.addr,
    };
    let addr = h.serve_one("fd", "127.0.1.25:0", backend).await;
    println!("LISTEN {addr}");
    tokio::task::spawn_blocking(|| {
        let mut hog = Vec::new();
        while let Ok(f) = std::fs::File::open("/dev/null") {
            hog.push(f);
            assert!(hog.len() < 100_000, "no descriptor limit in force");
        }
        println!("FULL {}", hog.len());
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line); // "release"
        drop(hog);
        let _ = std::io::stdin().read_line(&mut line); // EOF: done
    })
    .await
    .unwrap();
}

/// CPU time (user + system, in clock ticks) a process has used.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    let f: Vec<&str> = after.split_whitespace().collect();
    f[11].parse::<u64>().unwrap() + f[12].parse::<u64>().unwrap()
}

/// Reads a banner line with a timeout; None if closed or silent.
fn std_banner(s: &mut std::net::TcpStream, wait: Duration) -> Option<String> {
    use std::io::Read;
    s.set_read_timeout(Some(wait)).unwrap();
    let mut buf = [0u8; 16];
    match s.read(&mut buf) {
        Ok(n) if n > 0 => Some(String::from_utf8_lossy(&buf[..n]).trim().to_string()),
        _ => None,
    }
}

/// A backend in this process: greets, then holds each connection until
/// the proxy forwards the client's FIN. Runs until `stop` (at most 2 min).
fn std_backend(
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> (SocketAddr, std::thread::JoinHandle<()>) {
    use std::io::{Read, Write};
    let backend = std::net::TcpListener::bind("127.0.0.99:0").unwrap();
    let addr = backend.local_addr().unwrap();
    backend.set_nonblocking(true).unwrap();
    let thread = std::thread::spawn(move || {
        let mut held: Vec<std::net::TcpStream> = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
            match backend.accept() {
                Ok((mut s, _)) => {
                    let _ = s.write_all(b"a\n");
                    s.set_nonblocking(true).unwrap();
                    held.push(s);
                }
                Err(_) => std::thread::sleep(Duration::from_millis(5)),
            }
            held.retain_mut(|s| {
                let mut buf = [0u8; 64];
                matches!(s.read(&mut buf), Err(e) if e.kind() == io::ErrorKind::WouldBlock)
            });
        }
    });
    (addr, thread)
}

/// Starts `emfile_child` under `ulimit -n 64`: its stdin, and a channel
/// of what it prints (its address after `LISTEN`, an empty line for `FULL`).
fn start_emfile_child(
    backend: SocketAddr,
) -> (
    std::process::Child,
    std::process::ChildStdin,
    std::sync::mpsc::Receiver<String>,
) {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};

    let exe = std::env::current_exe().unwrap();
    let mut child = Command::new("sh")
        .arg("-c")
        .arg("ulimit -n 64 && exec \"$0\" \"$@\"")
        .arg(exe)
        .args([
            "--exact",
            "proxy::tests::listener::emfile_child",
            "--ignored",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("BEACON_TEST_BACKEND", backend.to_string())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let stdin = child.stdin.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        // The harness may print "test … ... " before a line on the same line.
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(at) = line.find("LISTEN ") {
                let _ = tx.send(line[at + 7..].trim().to_string());
            } else if line.contains("FULL ") {
                let _ = tx.send(String::new());
            }
        }
    });
    (child, stdin, rx)
}

/// The child's exit status, or None (killed) if it runs past `within`.
fn wait_exit(
    child: &mut std::process::Child,
    within: Duration,
) -> Option<std::process::ExitStatus> {
    let deadline = Instant::now() + within;
    loop {
        if let Some(st) = child.try_wait().unwrap() {
            return Some(st);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            return None;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Real descriptor exhaustion: a proxy process at `ulimit -n 64` with
/// every descriptor in use gets EMFILE from accept(2) while clients wait.
/// It must not spin, and must serve the waiting clients once descriptors
/// are free again.
#[cfg(target_os = "linux")]
#[test]
fn emfile_recovers_in_a_child_process() {
    use std::io::Write;

    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (backend_addr, backend_thread) = std_backend(stop.clone());
    let (mut child, mut stdin, rx) = start_emfile_child(backend_addr);
    let pid = child.id();
    let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
        let wait = Duration::from_secs(60);
        let addr: SocketAddr = rx
            .recv_timeout(wait)
            .expect("child listening")
            .parse()
            .unwrap();
        assert_eq!(rx.recv_timeout(wait).expect("child out of descriptors"), "");
        // Clients wait in the backlog while accept(2) says EMFILE.
        let mut waiting: Vec<std::net::TcpStream> = (0..5)
            .map(|_| std::net::TcpStream::connect(addr).unwrap())
            .collect();
        std::thread::sleep(Duration::from_millis(300));
        let before = cpu_ticks(pid);
        std::thread::sleep(Duration::from_secs(1));
        let spent = cpu_ticks(pid) - before;
        assert!(
            spent < 30,
            "proxy spins while out of descriptors: {spent} ticks in 1 s"
        );
        assert_eq!(std_banner(&mut waiting[0], Duration::from_millis(50)), None);
        // Free the descriptors: every waiting client is served.
        stdin.write_all(b"release\n").unwrap();
        stdin.flush().unwrap();
        for s in &mut waiting {
            assert_eq!(std_banner(s, Duration::from_secs(10)).as_deref(), Some("a"));
        }
    }));
    drop(stdin); // the child test returns
    let status = wait_exit(&mut child, Duration::from_secs(20));
    stop.store(true, Ordering::SeqCst);
    backend_thread.join().unwrap();
    if let Err(p) = result {
        std::panic::resume_unwind(p);
    }
    assert!(status.expect("child exits").success());
}
