//! Proxy copy throughput over loopback TCP: splice(2) through a pipe
//! (`Mode::Auto` on Linux) against the userspace buffer fallback
//! (`Mode::Userspace`). One direction, 16 MiB per iteration: writer →
//! [socket → copy → socket] → reader that discards.
//!
//! Run: `cargo bench --bench copy`.

use std::time::Duration;

use beacon::proxy::copy::{self, Activity, Meter, Mode, Path};
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const BYTES: usize = 16 << 20;

async fn pair(listener: &TcpListener) -> (TcpStream, TcpStream) {
    let addr = listener.local_addr().unwrap();
    let (client, server) = tokio::join!(TcpStream::connect(addr), listener.accept());
    (client.unwrap(), server.unwrap().0)
}

/// Moves BYTES through one copy; returns the path it took.
async fn one_transfer(listener: &TcpListener, mode: Mode) -> Path {
    let (mut writer, src) = pair(listener).await;
    let (dst, mut reader) = pair(listener).await;
    let write = tokio::spawn(async move {
        let chunk = vec![7u8; 256 * 1024];
        let mut left = BYTES;
        while left > 0 {
            let n = left.min(chunk.len());
            writer.write_all(&chunk[..n]).await.unwrap();
            left -= n;
        }
        writer.shutdown().await.unwrap();
    });
    let read = tokio::spawn(async move {
        let mut buf = vec![0u8; 256 * 1024];
        let mut total = 0;
        loop {
            let n = reader.read(&mut buf).await.unwrap();
            if n == 0 {
                break total;
            }
            total += n;
        }
    });
    let counter = metrics::Counter::noop();
    let activity = Activity::default();
    let moved = std::sync::atomic::AtomicU64::new(0);
    let meter = Meter {
        bytes: &counter,
        activity: &activity,
        moved: &moved,
    };
    let moved = copy::one_way(&src, &dst, mode, &meter).await.unwrap();
    write.await.unwrap();
    assert_eq!(read.await.unwrap(), BYTES);
    assert_eq!(moved.bytes as usize, BYTES);
    moved.path
}

fn throughput(c: &mut Criterion) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap();
    let listener = rt.block_on(TcpListener::bind("127.0.0.1:0")).unwrap();
    let mut group = c.benchmark_group("proxy_copy_16MiB");
    group.throughput(Throughput::Bytes(BYTES as u64));
    group.sample_size(20);
    group.measurement_time(Duration::from_secs(5));
    for (name, mode, path) in [
        ("splice", Mode::Auto, Path::Splice),
        ("userspace", Mode::Userspace, Path::Fallback),
    ] {
        if cfg!(target_os = "linux") || path == Path::Fallback {
            assert_eq!(rt.block_on(one_transfer(&listener, mode)), path, "{name}");
        }
        group.bench_function(BenchmarkId::from_parameter(name), |b| {
            b.iter(|| rt.block_on(one_transfer(&listener, mode)))
        });
    }
    group.finish();
}

criterion_group!(benches, throughput);
criterion_main!(benches);
