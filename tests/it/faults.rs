//! Faults on the byte path, through the real binary: a fault-injecting
//! middle box ([`FaultBox`]) sits between beacon's proxy and real
//! backends and delays, resets after N bytes, black-holes or reads
//! slowly, one direction at a time. Whatever happens, the client sees
//! exactly what the backend side did: the same bytes in the same order,
//! then a FIN where there was a FIN and a reset where there was a reset
//! (or a forced close), never a truncated stream that ends like a
//! complete one. The reverse holds for what the backend sees of a client.
//!
//! One beacon serves every scenario of a test (a service per scenario, each
//! in front of its own box or backend), so the suite starts few processes.
//! Everything runs on loopback and every wait is bounded.

use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

use crate::harness::*;

/// Bound on any single wait of a scenario.
const T: Duration = Duration::from_secs(10);

// --- the fault box ----------------------------------------------------------

/// What the box does to one direction of every connection through it.
#[derive(Clone, Copy, Debug)]
pub enum Fault {
    /// Forwards everything, FIN for FIN, reset for reset.
    Pass,
    /// Holds each chunk this long before forwarding it.
    Delay(Duration),
    /// Forwards this many bytes, then resets both of its sockets.
    ResetAfter(usize),
    /// Reads and drops everything: no byte, no FIN, no reset goes on.
    BlackHole,
    /// Reads at most `chunk` bytes, then pauses: a slow reader upstream.
    SlowReader { chunk: usize, pause: Duration },
}

/// The box's faults, per direction.
#[derive(Clone, Copy, Debug)]
pub struct Plan {
    /// Bytes from the proxy towards the backend.
    pub to_backend: Fault,
    /// Bytes from the backend towards the proxy.
    pub to_client: Fault,
}

/// A TCP middle box in front of `backend`: every connection accepted on
/// `addr` is relayed to `backend` with the plan's faults. The box is
/// faithful where the plan says nothing: a FIN goes on as a FIN and a
/// reset (or any error) as a reset, so it hides nothing of the proxy.
pub struct FaultBox {
    pub addr: SocketAddr,
}

impl FaultBox {
    pub async fn start(ip: &str, backend: SocketAddr, plan: Plan) -> FaultBox {
        let l = TcpListener::bind((ip, 0)).await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            // Bounded: no scenario opens more than a handful.
            for _ in 0..64 {
                let Ok((front, _)) = l.accept().await else {
                    return;
                };
                let Ok(back) = TcpStream::connect(backend).await else {
                    abort(front);
                    continue;
                };
                tokio::spawn(relay(front, back, plan));
            }
        });
        FaultBox { addr }
    }
}

/// How one direction of the box ended.
enum Pumped {
    /// The source's FIN was forwarded.
    Fin,
    /// The plan reset the connection, or a socket failed: reset both.
    Abort,
}

async fn relay(front: TcpStream, back: TcpStream, plan: Plan) {
    let _ = front.set_nodelay(true);
    let _ = back.set_nodelay(true);
    let (mut fr, mut fw) = front.into_split();
    let (mut br, mut bw) = back.into_split();
    let aborted = {
        let up = pump(&mut fr, &mut bw, plan.to_backend);
        let down = pump(&mut br, &mut fw, plan.to_client);
        tokio::pin!(up, down);
        let (mut up_done, mut down_done) = (false, false);
        loop {
            let ended = tokio::select! {
                r = &mut up, if !up_done => { up_done = true; r }
                r = &mut down, if !down_done => { down_done = true; r }
                else => break false,
            };
            if let Pumped::Abort = ended {
                break true;
            }
        }
    };
    let front = fr.reunite(fw).unwrap();
    let back = br.reunite(bw).unwrap();
    if aborted {
        abort(front);
        abort(back);
    }
}

async fn pump(
    src: &mut tokio::net::tcp::OwnedReadHalf,
    dst: &mut tokio::net::tcp::OwnedWriteHalf,
    fault: Fault,
) -> Pumped {
    let mut buf = vec![0u8; 64 * 1024];
    let mut forwarded = 0usize;
    loop {
        let want = match fault {
            Fault::SlowReader { chunk, .. } => chunk.min(buf.len()),
            _ => buf.len(),
        };
        let n = match src.read(&mut buf[..want]).await {
            Ok(0) => {
                if let Fault::BlackHole = fault {
                    // Swallowed like the rest: the other side never hears.
                    return std::future::pending().await;
                }
                return match dst.shutdown().await {
                    Ok(()) => Pumped::Fin,
                    Err(_) => Pumped::Abort,
                };
            }
            Ok(n) => n,
            Err(_) => return Pumped::Abort,
        };
        let chunk = match fault {
            Fault::Pass => &buf[..n],
            Fault::Delay(d) => {
                tokio::time::sleep(d).await;
                &buf[..n]
            }
            Fault::ResetAfter(limit) => &buf[..n.min(limit - forwarded)],
            Fault::BlackHole => continue,
            Fault::SlowReader { pause, .. } => {
                tokio::time::sleep(pause).await;
                &buf[..n]
            }
        };
        if dst.write_all(chunk).await.is_err() {
            return Pumped::Abort;
        }
        forwarded += chunk.len();
        if let Fault::ResetAfter(limit) = fault
            && forwarded >= limit
        {
            return Pumped::Abort;
        }
    }
}

/// Closes with a reset (SO_LINGER 0), not a FIN.
fn abort(s: TcpStream) {
    let _ = socket2::SockRef::from(&s).set_linger(Some(Duration::ZERO));
    drop(s);
}

// --- backends ---------------------------------------------------------------

/// What a backend saw of one connection: the bytes, then how it ended.
#[derive(Debug)]
struct Seen {
    bytes: Vec<u8>,
    end: End,
}

#[derive(Debug, PartialEq, Eq)]
enum End {
    Fin,
    Reset,
    /// Anything else (or the read timed out).
    Other(String),
}

impl End {
    fn of(r: &io::Result<usize>) -> End {
        match r {
            Ok(_) => End::Fin,
            Err(e) if is_reset(e) => End::Reset,
            Err(e) => End::Other(e.to_string()),
        }
    }
}

fn is_reset(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset | io::ErrorKind::BrokenPipe
    )
}

/// A backend that runs `script` on every connection it accepts (a few).
async fn backend<F, Fut>(ip: &str, script: F) -> SocketAddr
where
    F: Fn(TcpStream) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let l = TcpListener::bind((ip, 0)).await.unwrap();
    let addr = l.local_addr().unwrap();
    let script = Arc::new(script);
    tokio::spawn(async move {
        for _ in 0..64 {
            let Ok((s, _)) = l.accept().await else { return };
            tokio::spawn(script(s));
        }
    });
    addr
}

/// Reads everything until EOF or an error, bounded by [`T`].
async fn read_all(s: &mut (impl AsyncReadExt + Unpin)) -> Seen {
    let mut bytes = Vec::new();
    let r = match tokio::time::timeout(T, s.read_to_end(&mut bytes)).await {
        Ok(r) => r,
        Err(_) => Err(io::Error::new(io::ErrorKind::TimedOut, "read timed out")),
    };
    let end = End::of(&r);
    Seen { bytes, end }
}

/// Deterministic bytes (xorshift), so a lost or reordered chunk shows.
fn pattern(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

/// Sends `data` then a FIN; reports what arrived from the other side.
fn sender(data: Arc<Vec<u8>>, seen: mpsc::Sender<Seen>) -> impl Fn(TcpStream) -> SenderFut {
    move |s| Box::pin(send_and_collect(s, data.clone(), seen.clone()))
}

/// Like [`sender`], but sends only once the client's [`GO`] arrived: a
/// reply, so its faults hit a connection the proxy has surely connected
/// (a backend that resets before the proxy saw its connect complete is
/// a failed connect, and the proxy tries again).
fn responder(data: Arc<Vec<u8>>, seen: mpsc::Sender<Seen>) -> impl Fn(TcpStream) -> SenderFut {
    move |mut s| {
        let (data, seen) = (data.clone(), seen.clone());
        Box::pin(async move {
            let mut go = [0u8; GO.len()];
            if tokio::time::timeout(T, s.read_exact(&mut go)).await.is_ok() {
                send_and_collect(s, data, seen).await;
            }
        })
    }
}

/// The request a [`responder`] waits for.
const GO: &[u8] = b"go\n";

type SenderFut = std::pin::Pin<Box<dyn Future<Output = ()> + Send>>;

/// A reset shows on whichever call meets it first (a write's error is
/// then gone and a read sees EOF): a failed write counts as the end.
async fn send_and_collect(s: TcpStream, data: Arc<Vec<u8>>, seen: mpsc::Sender<Seen>) {
    let (mut r, mut w) = s.into_split();
    let write = async {
        let sent = w.write_all(&data).await;
        if sent.is_ok() {
            let _ = w.shutdown().await;
        }
        (sent, w)
    };
    let (mut got, (sent, w)) = tokio::join!(read_all(&mut r), write);
    if let Err(e) = sent {
        got.end = End::of(&Err(e));
    }
    let _ = seen.send(got).await;
    drop(r.reunite(w));
}

/// Sends nothing (and no FIN); reports what arrived.
fn collector(seen: mpsc::Sender<Seen>) -> impl Fn(TcpStream) -> SenderFut {
    move |mut s| {
        let seen = seen.clone();
        Box::pin(async move {
            let got = read_all(&mut s).await;
            let _ = seen.send(got).await;
        })
    }
}

// --- the proxy in front -------------------------------------------------------

/// One scenario's service: its listen address and its endpoint.
struct Scenario {
    name: &'static str,
    listen: SocketAddr,
    endpoint: SocketAddr,
    /// Extra keys of the `[[service]]` table.
    extra: &'static str,
}

fn services_file(scenarios: &[Scenario]) -> String {
    let mut s = String::new();
    for sc in scenarios {
        s += &format!(
            "[[service]]\nname = \"{}\"\n{}\n[service.health]\nkind = \"none\"\n\
             [[service.port]]\nname = \"tcp\"\nport = 80\nlisten = \"{}\"\n\
             [[service.endpoint]]\nip = \"{}\"\nport = {}\n",
            sc.name,
            sc.extra,
            sc.listen,
            sc.endpoint.ip(),
            sc.endpoint.port()
        );
    }
    s
}

/// beacon serving every scenario, once each one's listener is open.
fn start_beacon(scenarios: &[Scenario]) -> Beacon {
    let beacon = Beacon::start(Options {
        extra: "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        services: Some(services_file(scenarios)),
        ..Options::default()
    });
    beacon.wait_ready();
    let n = scenarios.len() as f64;
    eventually(Duration::from_secs(5), "every listener open", || {
        (beacon.metric("beacon_proxy_listeners") == Some(n)).then_some(())
    });
    beacon
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

async fn connect(addr: SocketAddr) -> TcpStream {
    let s = tokio::time::timeout(T, TcpStream::connect(addr))
        .await
        .expect("connect timed out")
        .expect("connect");
    s.set_nodelay(true).unwrap();
    s
}

async fn recv(rx: &mut mpsc::Receiver<Seen>) -> Seen {
    tokio::time::timeout(T, rx.recv())
        .await
        .expect("the backend reported within the bound")
        .expect("the backend is running")
}

fn assert_prefix(got: &[u8], of: &[u8], what: &str) {
    assert!(got.len() <= of.len(), "{what}: more bytes than were sent");
    assert!(
        got == &of[..got.len()],
        "{what}: bytes changed or reordered on the way"
    );
}

/// The value of a connection-end counter (0 while it does not exist).
fn ends(beacon: &Beacon, service: &str, end: &str) -> f64 {
    beacon
        .metric(&format!(
            "beacon_proxy_connection_ends_total{{service=\"{service}.default\",end=\"{end}\"}}"
        ))
        .unwrap_or(0.0)
}

// --- resets -----------------------------------------------------------------

/// A backend resets mid-stream (itself, then through the box at a byte
/// count with data in flight); a client resets mid-stream; the box resets
/// the upload after N bytes. Every reset reaches the other end as a reset
/// after exactly the bytes sent before it.
#[test]
fn resets_reach_the_other_end_as_resets_after_the_same_bytes() {
    let _lock = timing_lock();
    let rt = runtime();
    let down = Arc::new(pattern(7, 1 << 20));
    let (seen_tx, mut seen) = mpsc::channel::<Seen>(16);
    const N: usize = 100_000;
    const CUT: usize = 20_000;
    let scenarios = rt.block_on(async {
        // 1. The backend sends N bytes, waits for the client's ack (so
        //    nothing is in flight), then resets.
        let resetting = backend("127.0.0.81", |mut s: TcpStream| async move {
            let data = pattern(11, N);
            s.write_all(&data).await.unwrap();
            let mut ack = [0u8; 3];
            let _ = tokio::time::timeout(T, s.read_exact(&mut ack)).await;
            abort(s);
        })
        .await;
        // 2. A backend sends 1 MiB then FIN; the box cuts it after CUT bytes.
        let streaming = backend("127.0.0.82", responder(down.clone(), seen_tx.clone())).await;
        let cut_down = FaultBox::start(
            "127.0.0.83",
            streaming,
            Plan {
                to_backend: Fault::Pass,
                to_client: Fault::ResetAfter(CUT),
            },
        )
        .await;
        // 3. The client resets: the backend (no box) must see a reset.
        let collecting = backend("127.0.0.84", collector(seen_tx.clone())).await;
        // 4. The client uploads; the box resets the upload after CUT bytes.
        let sink = backend("127.0.0.85", collector(seen_tx.clone())).await;
        let cut_up = FaultBox::start(
            "127.0.0.86",
            sink,
            Plan {
                to_backend: Fault::ResetAfter(CUT),
                to_client: Fault::Pass,
            },
        )
        .await;
        vec![
            Scenario {
                name: "rst-backend",
                listen: free_addr(),
                endpoint: resetting,
                extra: "",
            },
            Scenario {
                name: "rst-box-down",
                listen: free_addr(),
                endpoint: cut_down.addr,
                extra: "",
            },
            Scenario {
                name: "rst-client",
                listen: free_addr(),
                endpoint: collecting,
                extra: "",
            },
            Scenario {
                name: "rst-box-up",
                listen: free_addr(),
                endpoint: cut_up.addr,
                extra: "",
            },
        ]
    });
    let beacon = start_beacon(&scenarios);
    rt.block_on(async {
        // 1. N bytes, then a reset: not a clean EOF.
        let mut c = connect(scenarios[0].listen).await;
        let mut got = vec![0u8; N];
        tokio::time::timeout(T, c.read_exact(&mut got))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(got, pattern(11, N));
        c.write_all(b"ack").await.unwrap();
        let rest = read_all(&mut c).await;
        assert_eq!(
            (rest.bytes.len(), &rest.end),
            (0, &End::Reset),
            "a backend reset after {N} bytes must reach the client as a reset"
        );

        // 2. Exactly CUT bytes of the stream, then a reset.
        let mut c = connect(scenarios[1].listen).await;
        c.write_all(GO).await.unwrap();
        let got = read_all(&mut c).await;
        assert_prefix(&got.bytes, &down, "rst-box-down");
        assert_eq!(
            (got.bytes.len(), &got.end),
            (CUT, &End::Reset),
            "cut after {CUT} bytes: the client sees those bytes, then a reset"
        );
        let at_backend = recv(&mut seen).await;
        assert_eq!(at_backend.end, End::Reset, "the box resets the backend too");

        // 3. The client resets after "hello": the backend sees a reset.
        let mut c = connect(scenarios[2].listen).await;
        c.write_all(b"hello").await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        abort(c);
        let at_backend = recv(&mut seen).await;
        assert_eq!(at_backend.bytes, b"hello");
        assert_eq!(
            at_backend.end,
            End::Reset,
            "a client reset must reach the backend as a reset"
        );

        // 4. The upload is cut after CUT bytes: the backend sees CUT bytes
        //    and a reset (the box), the client a reset (the proxy).
        let up = pattern(13, 1 << 20);
        let c = connect(scenarios[3].listen).await;
        let (mut r, mut w) = c.into_split();
        let sent = tokio::time::timeout(T, w.write_all(&up)).await.unwrap();
        let got = read_all(&mut r).await;
        let client_saw_reset = sent.as_ref().is_err_and(is_reset) || got.end == End::Reset;
        assert!(
            client_saw_reset,
            "upload cut by a reset: the client must see a reset (write: {sent:?}, read: {:?})",
            got.end
        );
        assert!(got.bytes.is_empty());
        let at_backend = recv(&mut seen).await;
        assert_prefix(&at_backend.bytes, &up, "rst-box-up");
        assert_eq!(
            (at_backend.bytes.len(), &at_backend.end),
            (CUT, &End::Reset)
        );
    });
    // How the connections ended, counted.
    eventually(Duration::from_secs(5), "connection ends counted", || {
        (ends(&beacon, "rst-backend", "upstream_reset") >= 1.0
            && ends(&beacon, "rst-box-down", "upstream_reset") >= 1.0
            && ends(&beacon, "rst-client", "client_reset") >= 1.0)
            .then_some(())
    });
}

// --- black holes, delays, slow readers ---------------------------------------

/// A black hole in either direction ends at the idle timeout, and that
/// forced close is a reset on both sides: an empty or cut response never
/// looks complete.
#[test]
fn black_holes_end_in_resets_at_the_idle_timeout() {
    let _lock = timing_lock();
    let rt = runtime();
    let (seen_tx, mut seen) = mpsc::channel::<Seen>(16);
    let hello = Arc::new(b"hello from the backend".to_vec());
    let scenarios = rt.block_on(async {
        let talker = backend("127.0.0.87", sender(hello.clone(), seen_tx.clone())).await;
        let swallow_down = FaultBox::start(
            "127.0.0.88",
            talker,
            Plan {
                to_backend: Fault::Pass,
                to_client: Fault::BlackHole,
            },
        )
        .await;
        let quiet = backend("127.0.0.89", collector(seen_tx.clone())).await;
        let swallow_up = FaultBox::start(
            "127.0.0.90",
            quiet,
            Plan {
                to_backend: Fault::BlackHole,
                to_client: Fault::Pass,
            },
        )
        .await;
        vec![
            Scenario {
                name: "hole-down",
                listen: free_addr(),
                endpoint: swallow_down.addr,
                extra: "idle_timeout = \"400ms\"",
            },
            Scenario {
                name: "hole-up",
                listen: free_addr(),
                endpoint: swallow_up.addr,
                extra: "idle_timeout = \"400ms\"",
            },
        ]
    });
    let beacon = start_beacon(&scenarios);
    rt.block_on(async {
        for sc in &scenarios {
            let started = Instant::now();
            let mut c = connect(sc.listen).await;
            c.write_all(b"request").await.unwrap();
            let got = read_all(&mut c).await;
            let took = started.elapsed();
            assert_eq!(
                (got.bytes.len(), &got.end),
                (0, &End::Reset),
                "{}: the idle timeout must reset the client",
                sc.name
            );
            assert!(
                took >= Duration::from_millis(350) && took < Duration::from_secs(3),
                "{}: closed after {took:?}",
                sc.name
            );
            // The backend (behind the box, which passes resets on) too.
            let at_backend = recv(&mut seen).await;
            assert_eq!(at_backend.end, End::Reset, "{}: backend side", sc.name);
        }
    });
    eventually(Duration::from_secs(5), "idle ends counted", || {
        (ends(&beacon, "hole-down", "idle_timeout") >= 1.0
            && ends(&beacon, "hole-up", "idle_timeout") >= 1.0)
            .then_some(())
    });
}

/// Delays and slow readers only slow things down: the same bytes arrive,
/// in order, then a FIN, in both directions.
#[test]
fn delays_and_slow_readers_deliver_every_byte_then_fin() {
    let _lock = timing_lock();
    let rt = runtime();
    let (seen_tx, mut seen) = mpsc::channel::<Seen>(16);
    const BULK: usize = 4 << 20;
    let down = Arc::new(pattern(21, BULK));
    let slow = Fault::SlowReader {
        chunk: 16 * 1024,
        pause: Duration::from_millis(2),
    };
    let scenarios = rt.block_on(async {
        let echo = backend("127.0.0.91", |s: TcpStream| async move {
            let (mut r, mut w) = s.into_split();
            let _ = tokio::io::copy(&mut r, &mut w).await;
            let _ = w.shutdown().await;
        })
        .await;
        let delayed = FaultBox::start(
            "127.0.0.92",
            echo,
            Plan {
                to_backend: Fault::Delay(Duration::from_millis(30)),
                to_client: Fault::Delay(Duration::from_millis(30)),
            },
        )
        .await;
        // The backend reads slowly (the box reads slowly for it).
        let sink = backend(
            "127.0.0.93",
            sender(Arc::new(b"done".to_vec()), seen_tx.clone()),
        )
        .await;
        let slow_up = FaultBox::start(
            "127.0.0.94",
            sink,
            Plan {
                to_backend: slow,
                to_client: Fault::Pass,
            },
        )
        .await;
        // The client reads slowly (itself) from a fast backend.
        let source = backend("127.0.0.95", sender(down.clone(), seen_tx.clone())).await;
        vec![
            Scenario {
                name: "delay",
                listen: free_addr(),
                endpoint: delayed.addr,
                extra: "",
            },
            Scenario {
                name: "slow-up",
                listen: free_addr(),
                endpoint: slow_up.addr,
                extra: "",
            },
            Scenario {
                name: "slow-down",
                listen: free_addr(),
                endpoint: source,
                extra: "",
            },
        ]
    });
    let beacon = start_beacon(&scenarios);
    rt.block_on(async {
        // Delay both ways: an echo of 64 KiB in four writes, then FIN.
        let msg = pattern(22, 64 * 1024);
        let c = connect(scenarios[0].listen).await;
        let (mut r, mut w) = c.into_split();
        let send = async {
            for part in msg.chunks(16 * 1024) {
                w.write_all(part).await.unwrap();
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            w.shutdown().await.unwrap();
        };
        let (got, ()) = tokio::join!(read_all(&mut r), send);
        assert_eq!(got.end, End::Fin, "delay: the echo ends with a FIN");
        assert!(got.bytes == msg, "delay: the echo differs");

        // A slow backend reader: BULK bytes up, all of them, then FIN.
        let up = pattern(23, BULK);
        let c = connect(scenarios[1].listen).await;
        let (mut r, mut w) = c.into_split();
        let send = async {
            w.write_all(&up).await.unwrap();
            w.shutdown().await.unwrap();
        };
        let (got, ()) = tokio::join!(read_all(&mut r), send);
        assert_eq!((got.bytes.as_slice(), &got.end), (&b"done"[..], &End::Fin));
        let at_backend = recv(&mut seen).await;
        assert_eq!(at_backend.end, End::Fin);
        assert!(at_backend.bytes == up, "slow-up: the upload differs");

        // A slow client reader: BULK bytes down, all of them, then FIN.
        let mut c = connect(scenarios[2].listen).await;
        c.shutdown().await.unwrap();
        let mut got = Vec::with_capacity(BULK);
        let mut buf = vec![0u8; 16 * 1024];
        let deadline = Instant::now() + T;
        let end = loop {
            assert!(Instant::now() < deadline, "slow-down: not done in {T:?}");
            match tokio::time::timeout(T, c.read(&mut buf)).await.unwrap() {
                Ok(0) => break End::Fin,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break End::of(&Err(e)),
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        };
        assert_eq!(end, End::Fin);
        assert!(got == *down, "slow-down: the download differs");
        let at_backend = recv(&mut seen).await;
        assert_eq!(at_backend.end, End::Fin);
    });
    eventually(Duration::from_secs(5), "clean ends counted", || {
        (ends(&beacon, "delay", "fin") >= 1.0
            && ends(&beacon, "slow-up", "fin") >= 1.0
            && ends(&beacon, "slow-down", "fin") >= 1.0)
            .then_some(())
    });
}

/// A reset while the client reads slowly (bytes queued in the proxy): the
/// client gets a prefix of what the backend sent, then a reset; never a
/// clean end of a cut stream.
#[test]
fn a_reset_behind_a_slow_client_is_still_a_reset() {
    let _lock = timing_lock();
    let rt = runtime();
    let (seen_tx, _seen) = mpsc::channel::<Seen>(16);
    const BULK: usize = 8 << 20;
    const CUT: usize = 6 << 20;
    let down = Arc::new(pattern(31, BULK));
    let scenarios = rt.block_on(async {
        let source = backend("127.0.0.96", responder(down.clone(), seen_tx.clone())).await;
        let cut = FaultBox::start(
            "127.0.0.97",
            source,
            Plan {
                to_backend: Fault::Pass,
                to_client: Fault::ResetAfter(CUT),
            },
        )
        .await;
        vec![Scenario {
            name: "rst-slow",
            listen: free_addr(),
            endpoint: cut.addr,
            extra: "",
        }]
    });
    let _beacon = start_beacon(&scenarios);
    rt.block_on(async {
        let mut c = connect(scenarios[0].listen).await;
        c.write_all(GO).await.unwrap();
        let mut got = Vec::new();
        let mut buf = vec![0u8; 16 * 1024];
        let deadline = Instant::now() + T;
        let end = loop {
            assert!(Instant::now() < deadline, "not done in {T:?}");
            match tokio::time::timeout(T, c.read(&mut buf)).await.unwrap() {
                Ok(0) => break End::Fin,
                Ok(n) => got.extend_from_slice(&buf[..n]),
                Err(e) => break End::of(&Err(e)),
            }
            tokio::time::sleep(Duration::from_millis(1)).await;
        };
        assert_prefix(&got, &down, "rst-slow");
        assert!(got.len() <= CUT);
        assert_eq!(
            end,
            End::Reset,
            "cut at {CUT} bytes, {} arrived: must end in a reset",
            got.len()
        );
    });
}

// --- descriptor exhaustion ------------------------------------------------------

/// CPU-free check of the process's descriptor limits: (soft, hard).
fn nofile_limits(pid: u32) -> (u64, u64) {
    let limits = std::fs::read_to_string(format!("/proc/{pid}/limits")).unwrap();
    let line = limits
        .lines()
        .find(|l| l.starts_with("Max open files"))
        .expect("a Max open files line");
    let f: Vec<&str> = line.split_whitespace().collect();
    (f[3].parse().unwrap(), f[4].parse().unwrap())
}

/// beacon started under `sh -c "ulimit ...; exec beacon run"`.
fn beacon_under_ulimit(ulimit: &str, config: &str, services: &str) -> Beacon {
    beacon_with(ulimit, "3s", config, services)
}

/// [`beacon_under_ulimit`] with a shutdown grace.
fn beacon_with(ulimit: &str, grace: &str, config: &str, services: &str) -> Beacon {
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr();
    let dns = free_addr();
    std::fs::write(
        dir.path().join("beacon.toml"),
        format!(
            "shutdown_grace = \"{grace}\"\n[dns]\nlisten = \"{dns}\"\nudp_sockets = 1\nlameduck = \"0s\"\n[admin]\nlisten = \"{admin}\"\n\
             [[source]]\ntype = \"file\"\npath = \"services.toml\"\n{config}"
        ),
    )
    .unwrap();
    std::fs::write(dir.path().join("services.toml"), services).unwrap();
    let log = dir.path().join("beacon.log");
    let child = std::process::Command::new("sh")
        .arg("-c")
        .arg(format!("{ulimit} && exec \"$0\" \"$@\""))
        .arg(BIN)
        .args(["run", "--config"])
        .arg(dir.path().join("beacon.toml"))
        .env("RUST_LOG", "info,beacon=debug")
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::from(
            std::fs::File::create(&log).unwrap(),
        ))
        .spawn()
        .unwrap();
    let beacon = Beacon {
        child,
        dir,
        admin,
        dns,
        log,
    };
    eventually(Duration::from_secs(15), "beacon ready", || {
        matches!(http_get(admin, "/readyz"), Ok((200, _))).then_some(())
    });
    beacon
}

/// At start the soft descriptor limit goes up to the hard one, and a config
/// whose connection caps cannot fit in it is reported.
#[test]
fn raises_the_soft_descriptor_limit_and_warns_when_the_caps_cannot_fit() {
    let _lock = timing_lock();
    let listen = free_addr();
    let services = format!(
        "[[service]]\nname = \"web\"\n[service.health]\nkind = \"none\"\n\
         [[service.port]]\nname = \"tcp\"\nport = 80\nlisten = \"{listen}\"\n\
         [[service.endpoint]]\nip = \"127.0.0.1\"\nport = 9\n"
    );
    let mut beacon = beacon_under_ulimit(
        "ulimit -S -n 256 && ulimit -H -n 4096",
        "[proxy]\nmax_connections = 10000\n",
        &services,
    );
    assert_eq!(nofile_limits(beacon.child.id()), (4096, 4096));
    let log = beacon.log_text();
    assert!(
        log.contains("descriptor limit") && log.contains("max_connections"),
        "no warning about 10,000 connections in 4,096 descriptors:\n{log}"
    );
    beacon.signal(15);
    assert!(beacon.wait_exit(Duration::from_secs(10)).success());
}

/// beacon under `ulimit -n 64`, its descriptors used up by idle proxied
/// connections while probes run every 100 ms (fall 2, eject after one
/// failed connect): a probe or connect that fails for want of a
/// descriptor says nothing about the backend. No endpoint goes down,
/// none is ejected, and service resumes at once when descriptors return.
#[test]
fn descriptor_exhaustion_is_not_blamed_on_the_backends() {
    let _lock = timing_lock();
    let port = free_port();
    let backends: Vec<BackendProcess> = (1..=3)
        .map(|i| {
            BackendProcess::start(
                &format!("web-{i}"),
                format!("127.0.0.10{i}:{port}").parse().unwrap(),
            )
        })
        .collect();
    let listen = free_addr();
    let mut services = format!(
        "[[service]]\nname = \"web\"\n\
         [service.health]\nkind = \"tcp\"\ninterval = \"200ms\"\ntimeout = \"200ms\"\n\
         fall = 2\nrise = 2\neject_after = 1\neject_max_percent = 100\n\
         [[service.port]]\nname = \"http\"\nport = 80\ntarget_port = {port}\nlisten = \"{listen}\"\n"
    );
    for b in &backends {
        services += &format!("[[service.endpoint]]\nip = \"{}\"\n", b.addr.ip());
    }
    let mut beacon = beacon_under_ulimit("ulimit -n 64", "", &services);
    eventually(Duration::from_secs(5), "every endpoint healthy", || {
        all_healthy(&beacon).then_some(())
    });
    assert!(fetch_name(listen).is_ok());
    // Idle client connections hold two descriptors each in beacon; the
    // ones it cannot connect upstream it closes, so new ones keep coming
    // to keep it at its limit: ten probe intervals without descriptors (a
    // connection every 2 ms for 2 s).
    let mut flood: Vec<std::net::TcpStream> = Vec::new();
    let flooding = Instant::now();
    while flooding.elapsed() < Duration::from_millis(2000) && flood.len() < 2000 {
        if let Ok(s) = std::net::TcpStream::connect_timeout(&listen, Duration::from_secs(1)) {
            flood.push(s);
        }
        std::thread::sleep(Duration::from_millis(2));
    }
    for s in &flood {
        let _ = s.shutdown(std::net::Shutdown::Both);
    }
    drop(flood);
    // Served again at once: nothing was marked down or ejected.
    let back = Instant::now();
    eventually(Duration::from_secs(5), "served again", || {
        fetch_name(listen).ok()
    });
    let resumed = back.elapsed();
    let log = beacon.log_text();
    assert!(
        log.contains("accept failing; backing off"),
        "descriptors never ran out"
    );
    // A probe that ran and timed out is a real failure (a loaded CI
    // machine can starve one); a probe that could not start is not.
    let failed: Vec<&str> = log
        .lines()
        .filter(|l| l.contains("probe failed") && !l.contains("timed out"))
        .take(5)
        .collect();
    assert!(
        failed.is_empty(),
        "a probe that could not run counted as failed:\n{}",
        failed.join("\n")
    );
    assert!(
        !log.contains("endpoint ejected"),
        "a connect that could not start ejected an endpoint:\n{}",
        grep(&log, "ejected")
    );
    assert!(all_healthy(&beacon), "{:#}", beacon.services_json());
    // The accept backoff is at most 1 s.
    assert!(
        resumed < Duration::from_millis(1500),
        "resumed after {resumed:?}"
    );
    // Counted, and logged once per burst, not once per probe.
    let local = beacon
        .metric(r#"beacon_health_checks_total{result="local_error"}"#)
        .unwrap_or(0.0);
    eprintln!("local probe errors: {local}; resumed after {resumed:?}");
    assert!(local >= 1.0, "local probe errors counted: {local}");
    let warned = log.matches("probes are skipped, not failed").count();
    assert!(
        (1..=2).contains(&warned),
        "{warned} warnings for {local} local probe errors"
    );
    let proxy_warned = log.matches("proxy connects cannot start").count();
    assert!(
        (1..=2).contains(&proxy_warned),
        "{proxy_warned} warnings about local connect errors"
    );
    beacon.signal(15);
    assert!(beacon.wait_exit(Duration::from_secs(10)).success());
}

fn all_healthy(beacon: &Beacon) -> bool {
    let v = beacon.services_json();
    let eps = v["services"][0]["endpoints"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    eps.len() == 3 && eps.iter().all(|e| e["healthy"] == true)
}

fn grep(text: &str, needle: &str) -> String {
    text.lines()
        .filter(|l| l.contains(needle))
        .take(5)
        .collect::<Vec<_>>()
        .join("\n")
}

// --- admin clients ----------------------------------------------------------

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

/// `n` admin connections that each send half a request and hold it.
fn partial_requests(admin: SocketAddr, n: usize) -> Vec<std::net::TcpStream> {
    use std::io::Write;
    (0..n)
        .filter_map(|_| {
            let mut s =
                std::net::TcpStream::connect_timeout(&admin, Duration::from_secs(1)).ok()?;
            s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n").ok()?;
            Some(s)
        })
        .collect()
}

/// 300 clients that never finish their request headers: they hold no
/// descriptor past the header timeout (and at most the connection cap
/// before it), a new client is still served, and SIGTERM does not wait
/// for such clients.
#[test]
fn admin_sheds_clients_that_never_finish_a_request() {
    let _lock = timing_lock();
    let services = "service = []";
    let mut beacon = beacon_with("true", "10s", "", services);
    let pid = beacon.child.id();
    assert_eq!(http_get(beacon.admin, "/healthz").unwrap().0, 200);
    std::thread::sleep(Duration::from_millis(200));
    let baseline = open_fds(pid);
    let held = partial_requests(beacon.admin, 300);
    assert!(held.len() >= 250, "only {} connected", held.len());
    std::thread::sleep(Duration::from_millis(500));
    let during = open_fds(pid);
    // Released within the header timeout (5 s), the clients still connected.
    let started = Instant::now();
    eventually(Duration::from_secs(8), "admin descriptors released", || {
        (open_fds(pid) <= baseline + 5).then_some(())
    });
    let released = started.elapsed();
    assert!(
        during <= baseline + 128 + 5,
        "{during} descriptors with 300 partial requests (baseline {baseline}): no cap"
    );
    assert_eq!(http_get(beacon.admin, "/healthz").unwrap().0, 200);
    eprintln!(
        "admin fds: baseline {baseline}, with 300 partial requests {during}, released after {released:?}"
    );
    drop(held);
    // SIGTERM with 300 fresh partial requests held: exits at once, not
    // after the 10 s grace.
    let _held = partial_requests(beacon.admin, 300);
    std::thread::sleep(Duration::from_millis(300));
    let term = Instant::now();
    beacon.signal(15);
    let status = beacon.wait_exit(Duration::from_secs(15));
    let took = term.elapsed();
    eprintln!("SIGTERM exit after {took:?}");
    assert!(status.success(), "{status}");
    assert!(
        took < Duration::from_secs(3),
        "SIGTERM took {took:?} (grace 10 s)"
    );
}
