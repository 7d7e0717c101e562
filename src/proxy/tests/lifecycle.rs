//! What `spawn` returns, end to end: the reconcile loop's outcome (what
//! the app supervises) and `Proxy::drain`, which works wherever that loop
//! runs.

use super::*;
use crate::proxy::spawn;

#[tokio::test]
async fn drain_closes_listeners_then_live_connections_after_grace() {
    let mut h = harness();
    let a = banner_backend("127.0.0.95", "a").await;
    let addr = h.serve_one("drain", "127.0.1.21:0", a.addr).await;
    let (mut live, _) = greet(addr).await;
    h.shutdown.cancel();
    let proxy = h.proxy.take().unwrap();
    let grace = Duration::from_millis(500);
    let started = tokio::time::Instant::now();
    let drain = tokio::spawn(async move {
        proxy.drain(grace).await;
        tokio::time::Instant::now()
    });
    // New connections are refused soon; the live one still streams.
    let deadline = Instant::now() + T;
    while TcpStream::connect(addr).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still open");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    live.write_all(b"during grace\n").await.unwrap();
    assert_eq!(read_line(&mut live).await.as_deref(), Some("during grace"));
    // The rest of the grace passes on paused time: nothing moves now.
    tokio::time::pause();
    // Closed with a reset at the deadline: the cut must not look complete.
    assert!(reset_within(&mut live, Duration::from_secs(3)).await);
    let ended = tokio::time::timeout(T, drain).await.unwrap().unwrap();
    tokio::time::resume();
    let took = ended - started;
    assert!(
        took >= grace && took < grace + Duration::from_secs(3),
        "{took:?}"
    );
    let loop_end = tokio::time::timeout(T, h.task).await.unwrap().unwrap();
    assert!(loop_end.is_ok(), "shutdown is a clean end: {loop_end:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_returns_early_when_connections_finish() {
    let mut h = harness();
    let a = banner_backend("127.0.0.96", "a").await;
    let addr = h.serve_one("drain2", "127.0.1.22:0", a.addr).await;
    let (live, _) = greet(addr).await;
    let proxy = h.proxy.take().unwrap();
    let started = Instant::now();
    let drain = tokio::spawn(async move { proxy.drain(Duration::from_secs(30)).await });
    tokio::time::sleep(Duration::from_millis(100)).await;
    drop(live);
    tokio::time::timeout(Duration::from_secs(5), drain)
        .await
        .expect("drain ends when the last connection does")
        .unwrap();
    assert!(started.elapsed() < Duration::from_secs(5));
}

/// The registry dying is no shutdown: the reconcile loop ends with an
/// error (the app exits on it) and its listeners close with it.
#[tokio::test]
async fn reconcile_loop_ends_with_err_when_the_registry_is_dropped() {
    let registry_stop = CancellationToken::new();
    let (handle, reader, registry) =
        registry::spawn(Vec::new(), Duration::from_secs(600), registry_stop.clone());
    let (tx, _outcomes) = mpsc::channel(16);
    let (proxy, task) = spawn(
        &proxy_config(16),
        reader.clone(),
        tx,
        CancellationToken::new(),
    );
    let task = tokio::spawn(task);
    let a = banner_backend("127.0.0.94", "a").await;
    let spec = service("gone", "127.0.1.27:0", &[a.addr], Balance::RoundRobin);
    assert!(
        handle
            .source(&"test".into(), Update::Reset(vec![spec]))
            .await
    );
    let configured = "127.0.1.27:0".parse().unwrap();
    let deadline = Instant::now() + T;
    while proxy.bound_addr(configured).is_none() {
        assert!(Instant::now() < deadline, "listener never opened");
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    registry_stop.cancel();
    registry
        .await
        .unwrap()
        .expect("the registry ends Ok on its shutdown");
    let end = tokio::time::timeout(T, task)
        .await
        .expect("the loop ended")
        .expect("the loop did not panic");
    assert!(matches!(end, Err(ProxyError::RegistryClosed)), "{end:?}");
    assert_eq!(proxy.bound_addr(configured), None, "listener closed");
    tokio::time::timeout(T, proxy.drain(Duration::from_secs(1)))
        .await
        .expect("drain after the loop ended");
}

/// Shutdown ends the loop with Ok, enabled or not.
#[tokio::test]
async fn reconcile_loop_ends_ok_on_shutdown() {
    for enabled in [true, false] {
        let (_handle, reader, _registry) = registry::spawn(
            Vec::new(),
            Duration::from_secs(600),
            CancellationToken::new(),
        );
        let (tx, _outcomes) = mpsc::channel(16);
        let shutdown = CancellationToken::new();
        let cfg = ProxyConfig {
            enabled,
            ..proxy_config(16)
        };
        let (proxy, task) = spawn(&cfg, reader, tx, shutdown.clone());
        let task = tokio::spawn(task);
        tokio::task::yield_now().await;
        assert!(
            !task.is_finished(),
            "enabled={enabled}: ended before shutdown"
        );
        shutdown.cancel();
        let end = tokio::time::timeout(T, task).await.unwrap().unwrap();
        assert!(end.is_ok(), "enabled={enabled}: {end:?}");
        tokio::time::timeout(T, proxy.drain(Duration::from_secs(1)))
            .await
            .expect("drain after shutdown");
    }
}
