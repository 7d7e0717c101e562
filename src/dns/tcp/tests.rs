//! The TCP side: pipelining, the idle timeout, the connection cap, and a
//! client that never reads.

use std::time::{Duration, Instant};

use hickory_proto::rr::RecordType;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::dns::testkit::{big_snapshot, cfg, demo, parse, query, read_frame, start};
use crate::registry::Reader;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_pipelining_idle_timeout_and_connection_cap() {
    let mut c = cfg();
    c.tcp_idle_timeout = Duration::from_millis(300);
    c.tcp_max_connections = 2;
    let run = start(c, Reader::fixed(demo())).await;
    // Three queries in one write; three answers, each with its ID.
    let mut s = TcpStream::connect(run.addr).await.unwrap();
    let mut wire = Vec::new();
    for (id, name) in [(1u16, "web"), (2, "db"), (3, "nope")] {
        let mut q = query(
            &format!("{name}.default.svc.cluster.local."),
            RecordType::A,
            None,
        );
        q.metadata.id = id;
        let b = q.to_vec().unwrap();
        wire.extend_from_slice(&(b.len() as u16).to_be_bytes());
        wire.extend_from_slice(&b);
    }
    s.write_all(&wire).await.unwrap();
    let mut ids = Vec::new();
    for _ in 0..3 {
        ids.push(
            parse(&read_frame(&mut s).await.expect("pipelined reply"))
                .metadata
                .id,
        );
    }
    ids.sort();
    assert_eq!(ids, vec![1, 2, 3]);
    // A second connection works; a third is over the cap and closed.
    let mut s2 = TcpStream::connect(run.addr).await.unwrap();
    let q = query("web.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    s2.write_all(&framed).await.unwrap();
    assert!(read_frame(&mut s2).await.is_some());
    let mut s3 = TcpStream::connect(run.addr).await.unwrap();
    let _ = s3.write_all(&framed).await;
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(2), s3.read(&mut buf))
        .await
        .expect("closed promptly");
    assert!(
        matches!(n, Ok(0) | Err(_)),
        "over the cap: closed without a reply"
    );
    // Idle connections are closed after the timeout.
    let started = Instant::now();
    let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
        .await
        .expect("idle close");
    assert!(matches!(n, Ok(0) | Err(_)));
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(150),
        "closed too early: {waited:?}"
    );
    drop((s2, s3));
    run.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_client_that_never_reads_loses_its_slot() {
    let mut c = cfg();
    c.tcp_idle_timeout = Duration::from_millis(300);
    c.tcp_max_connections = 1;
    let run = start(c, Reader::fixed(big_snapshot())).await;
    let q = query("big.default.svc.cluster.local.", RecordType::A, None)
        .to_vec()
        .unwrap();
    let mut framed = (q.len() as u16).to_be_bytes().to_vec();
    framed.extend_from_slice(&q);
    let flood: Vec<u8> = framed
        .iter()
        .copied()
        .cycle()
        .take(framed.len() * 20_000)
        .collect();
    let mut stalled = TcpStream::connect(run.addr).await.unwrap();
    // Writes ~1 MB of queries whose ~1 KB answers are never read.
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(10), stalled.write_all(&flood)).await;
        stalled
    });
    let started = Instant::now();
    let mut served = false;
    while started.elapsed() < Duration::from_secs(5) {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let Ok(mut s) = TcpStream::connect(run.addr).await else {
            continue;
        };
        if s.write_all(&framed).await.is_ok() && read_frame(&mut s).await.is_some() {
            served = true;
            break;
        }
    }
    assert!(served, "the stalled connection still holds the only slot");
    run.stop().await;
    drop(writer.await);
}
