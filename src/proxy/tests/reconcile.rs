//! The reconcile loop (`reconcile.rs`): listeners follow the snapshot,
//! bind failures retry and stay local, routes change with their service.

use super::*;
use crate::model::Snapshot;
use crate::proxy::reconcile::{BIND_RETRY, changed_services};

#[tokio::test]
async fn listeners_follow_the_snapshot_and_bind_failures_stay_local() {
    let h = harness();
    let a = banner_backend("127.0.0.81", "a").await;
    let taken = std::net::TcpListener::bind("127.0.1.16:0").unwrap();
    let taken_addr = taken.local_addr().unwrap().to_string();
    h.set(vec![
        service("blocked", &taken_addr, &[a.addr], Balance::RoundRobin),
        service("open", "127.0.1.17:0", &[a.addr], Balance::RoundRobin),
    ])
    .await;
    let open = h.addr("127.0.1.17:0").await;
    assert_eq!(greet(open).await.1.as_deref(), Some("a"));
    assert!(h.proxy().bound_addr(taken_addr.parse().unwrap()).is_none());
    // Once the address frees up, the retry binds it, within one
    // BIND_RETRY (waited on paused time: no bytes move meanwhile).
    tokio::time::pause();
    let paused = tokio::time::Instant::now();
    drop(taken);
    let blocked = tokio::time::timeout(BIND_RETRY * 3, h.addr(&taken_addr))
        .await
        .expect("bind retried");
    let waited = paused.elapsed();
    tokio::time::resume();
    assert!(
        waited <= BIND_RETRY + Duration::from_millis(10),
        "{waited:?}"
    );
    assert_eq!(greet(blocked).await.1.as_deref(), Some("a"));
    // A service that goes away takes its listener with it.
    h.set(vec![service(
        "blocked",
        &taken_addr,
        &[a.addr],
        Balance::RoundRobin,
    )])
    .await;
    assert!(
        h.proxy()
            .bound_addr("127.0.1.17:0".parse().unwrap())
            .is_none()
    );
    let deadline = Instant::now() + T;
    while TcpStream::connect(open).await.is_ok() {
        assert!(Instant::now() < deadline, "listener still accepting");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vip_listener_serves_the_service_port() {
    let h = harness();
    let a = banner_backend("127.0.0.82", "a").await;
    let port = refusing_addr("127.0.1.18").port();
    let mut spec = service("vip", "127.0.1.19:0", &[a.addr], Balance::RoundRobin);
    spec.vip = Some("127.0.1.18".parse().unwrap());
    spec.ports[0].port = port;
    spec.ports[0].listen = None;
    h.set(vec![spec]).await;
    let vip = format!("127.0.1.18:{port}");
    assert_eq!(h.addr(&vip).await.to_string(), vip);
    assert_eq!(greet(vip.parse().unwrap()).await.1.as_deref(), Some("a"));
}

#[test]
fn changed_services_lists_added_removed_and_replaced_only() {
    use crate::model::{ServiceSpec, ServiceState};
    let state = |name: &str, fail_open: bool| {
        let mut spec = ServiceSpec::new(ServiceKey::new("default", name));
        spec.fail_open = fail_open;
        Arc::new(ServiceState::new(Arc::new(spec), "t".into(), Vec::new()))
    };
    let (a, b, c) = (state("a", false), state("b", false), state("c", false));
    let mut before = Snapshot::default();
    before.services.insert(a.key().clone(), a.clone());
    before.services.insert(b.key().clone(), b.clone());
    let mut now = Snapshot::default();
    now.services.insert(a.key().clone(), a.clone()); // same Arc: unchanged
    // An equal copy is no change either (the registry never publishes one).
    before.services.insert(c.key().clone(), c.clone());
    now.services.insert(c.key().clone(), state("c", false));
    let d = state("d", false);
    now.services.insert(d.key().clone(), d.clone()); // added
    now.services.insert(b.key().clone(), state("b", true)); // replaced
    let mut changed = changed_services(&before, &now);
    changed.sort();
    assert_eq!(
        changed,
        vec![
            ServiceKey::new("default", "b"),
            ServiceKey::new("default", "d")
        ]
    );
    let gone = changed_services(&now, &Snapshot::default());
    assert_eq!(gone.len(), 4);
}
