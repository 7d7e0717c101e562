//! UDP load for the L4 bench (benches/load/l4.sh): an echo backend and a
//! closed-loop client, so a UDP proxy (beacon's `protocol = "udp"`, nginx
//! stream's `listen ... udp`) is measured the way wrk measures TCP.
//!
//! ```text
//! udp_load echo ADDR...                       # one echo thread per address
//! udp_load run NAME ADDR [--flows 32] [--seconds 5] [--size 64]
//! ```
//!
//! `run` opens `flows` sockets (one flow each, as many clients), keeps one
//! datagram in flight on each, and prints the bench's TSV rows: datagrams
//! per second answered, p50/p99 round trip in µs, and datagrams lost (no
//! echo within 200 ms; the flow then sends its next one). Every datagram
//! carries its flow's sequence number, so a late echo is never counted as
//! the next one's.

use std::net::{SocketAddr, UdpSocket as StdUdpSocket};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use tokio::net::UdpSocket;

const LOST_AFTER: Duration = Duration::from_millis(200);

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match args.first().map(String::as_str) {
        Some("echo") => echo(&args[1..]),
        Some("run") => run(&args[1..]),
        _ => {
            eprintln!(
                "usage: udp_load echo ADDR... | udp_load run NAME ADDR [--flows N] [--seconds S] [--size B]"
            );
            std::process::exit(2);
        }
    }
}

fn echo(addrs: &[String]) {
    let threads: Vec<_> = addrs
        .iter()
        .map(|a| {
            let sock = StdUdpSocket::bind(a.as_str()).unwrap_or_else(|e| panic!("bind {a}: {e}"));
            std::thread::spawn(move || {
                let mut buf = [0u8; 65_535];
                loop {
                    if let Ok((n, from)) = sock.recv_from(&mut buf) {
                        let _ = sock.send_to(&buf[..n], from);
                    }
                }
            })
        })
        .collect();
    eprintln!("udp_load: echoing on {}", addrs.join(" "));
    for t in threads {
        let _ = t.join();
    }
}

fn flag(args: &[String], name: &str, default: u64) -> u64 {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .map(|v| {
            v.parse()
                .unwrap_or_else(|_| panic!("{name} {v}: not a number"))
        })
        .unwrap_or(default)
}

fn run(args: &[String]) {
    let (Some(name), Some(target)) = (args.first(), args.get(1)) else {
        eprintln!("udp_load run NAME ADDR ...");
        std::process::exit(2);
    };
    let target: SocketAddr = target.parse().expect("target address");
    let flows = flag(args, "--flows", 32) as usize;
    let seconds = flag(args, "--seconds", 5);
    let size = flag(args, "--size", 64).max(8) as usize;
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let stop = Arc::new(AtomicBool::new(false));
    let results = rt.block_on(async {
        let tasks: Vec<_> = (0..flows)
            .map(|_| tokio::spawn(flow(target, size, stop.clone())))
            .collect();
        tokio::time::sleep(Duration::from_secs(seconds)).await;
        stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in tasks {
            all.push(t.await.expect("flow task"));
        }
        all
    });
    let mut rtts: Vec<u32> = Vec::new();
    let mut lost = 0u64;
    for (r, l) in results {
        rtts.extend(r);
        lost += l;
    }
    rtts.sort_unstable();
    let pct = |p: f64| {
        rtts.get(((rtts.len().max(1) - 1) as f64 * p).round() as usize)
            .copied()
            .unwrap_or(0)
    };
    println!(
        "l4\tudp\t{name}\tdps\t{:.0}",
        rtts.len() as f64 / seconds as f64
    );
    println!("l4\tudp\t{name}\tp50_us\t{}", pct(0.5));
    println!("l4\tudp\t{name}\tp99_us\t{}", pct(0.99));
    println!("l4\tudp\t{name}\tlost\t{lost}");
}

/// One flow: send, wait for the echo of that datagram, repeat. Round trips
/// in µs, and datagrams lost.
async fn flow(target: SocketAddr, size: usize, stop: Arc<AtomicBool>) -> (Vec<u32>, u64) {
    let sock = UdpSocket::bind("127.0.0.1:0").await.expect("client bind");
    sock.connect(target).await.expect("client connect");
    let mut out = vec![0u8; size];
    let mut buf = vec![0u8; 65_535];
    let (mut rtts, mut lost) = (Vec::new(), 0u64);
    let mut seq = 0u64;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        out[..8].copy_from_slice(&seq.to_le_bytes());
        let sent = Instant::now();
        if sock.send(&out).await.is_err() {
            lost += 1;
            tokio::time::sleep(Duration::from_millis(1)).await;
            continue;
        }
        let answered = tokio::time::timeout(LOST_AFTER, async {
            loop {
                match sock.recv(&mut buf).await {
                    Ok(n) if n >= 8 && buf[..8] == seq.to_le_bytes() => return true,
                    Ok(_) => continue, // a late echo of an earlier datagram
                    Err(_) => return false,
                }
            }
        })
        .await;
        match answered {
            Ok(true) => rtts.push(sent.elapsed().as_micros().min(u32::MAX as u128) as u32),
            _ => lost += 1,
        }
    }
    (rtts, lost)
}
