//! The access log through the whole proxy: one line per finished
//! connection, with its bytes and how it ended (fin, reset, timeout,
//! refused, drained).

use std::collections::HashMap;

use super::*;
use crate::config::AccessLogTarget;

/// The `key=value` fields of every text line in the file.
fn lines(path: &std::path::Path) -> Vec<HashMap<String, String>> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| {
            l.split(' ')
                .filter_map(|kv| kv.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect()
        })
        .collect()
}

/// Waits until the file holds a line for `service`; that line.
async fn line_for(path: &std::path::Path, service: &str) -> HashMap<String, String> {
    let deadline = Instant::now() + T;
    loop {
        if let Some(l) = lines(path)
            .into_iter()
            .find(|l| l.get("service").map(String::as_str) == Some(service))
        {
            return l;
        }
        assert!(
            Instant::now() < deadline,
            "no access log line for {service}"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_line_per_connection_for_each_way_it_ends() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("access.log");
    let cfg = ProxyConfig {
        access_log: Some(AccessLogTarget::File(path.clone())),
        ..proxy_config(10_000)
    };
    let mut h = harness_config(&cfg, copy::Mode::Auto, &[]);
    let backend = banner_backend("127.0.3.11", "a").await;
    let refusing = refusing_addr("127.0.3.12");
    let mut idle = service("idle", "127.0.3.2:0", &[backend.addr], Balance::RoundRobin);
    idle.proxy.idle_timeout = Duration::from_millis(300);
    h.set(vec![
        service("fin", "127.0.3.1:0", &[backend.addr], Balance::RoundRobin),
        idle,
        service("refused", "127.0.3.3:0", &[refusing], Balance::RoundRobin),
        service("reset", "127.0.3.4:0", &[backend.addr], Balance::RoundRobin),
        service(
            "drained",
            "127.0.3.5:0",
            &[backend.addr],
            Balance::RoundRobin,
        ),
    ])
    .await;

    // fin: greeting, one echoed line, then both sides close.
    let (mut s, name) = greet(h.addr("127.0.3.1:0").await).await;
    assert_eq!(name.as_deref(), Some("a"));
    s.write_all(b"hi\n").await.unwrap();
    assert_eq!(read_line(&mut s).await.as_deref(), Some("hi"));
    s.shutdown().await.unwrap();
    let mut rest = Vec::new();
    s.read_to_end(&mut rest).await.unwrap();
    let l = line_for(&path, "fin.default").await;
    assert_eq!((l["end"].as_str(), l["detail"].as_str()), ("fin", "fin"));
    assert_eq!(l["endpoint"], backend.addr.to_string());
    assert_eq!(l["to_upstream"], "3");
    assert_eq!(l["to_client"], "5");
    assert_eq!(l["client"], s.local_addr().unwrap().to_string());

    // timeout: quiet past the idle timeout.
    let (mut s, _) = greet(h.addr("127.0.3.2:0").await).await;
    assert!(reset_within(&mut s, Duration::from_secs(5)).await);
    let l = line_for(&path, "idle.default").await;
    assert_eq!(
        (l["end"].as_str(), l["detail"].as_str()),
        ("timeout", "idle_timeout")
    );
    assert_eq!(l["to_client"], "2");

    // refused: the only endpoint refuses every connect.
    let (_s, name) = greet(h.addr("127.0.3.3:0").await).await;
    assert_eq!(name, None);
    let l = line_for(&path, "refused.default").await;
    assert_eq!(
        (l["end"].as_str(), l["detail"].as_str()),
        ("refused", "connect_failed")
    );
    assert_eq!(l["endpoint"], refusing.to_string());

    // reset: the client aborts.
    let (s, _) = greet(h.addr("127.0.3.4:0").await).await;
    copy::reset_on_close(&s);
    drop(s);
    let l = line_for(&path, "reset.default").await;
    assert_eq!(
        (l["end"].as_str(), l["detail"].as_str()),
        ("reset", "client_reset")
    );

    // drained: still open when the drain grace runs out.
    let (_s, _) = greet(h.addr("127.0.3.5:0").await).await;
    h.proxy.take().unwrap().drain(Duration::ZERO).await;
    let l = line_for(&path, "drained.default").await;
    assert_eq!(
        (l["end"].as_str(), l["detail"].as_str()),
        ("drained", "drain_deadline")
    );
    assert_eq!(lines(&path).len(), 5, "one line per connection");
}
