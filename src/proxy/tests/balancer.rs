//! The five policies end to end: real connections through the proxy.

use super::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_follows_weights_exactly() {
    let h = harness();
    let (a, b, c) = three_backends().await;
    let spec = service(
        "rr",
        "127.0.1.1:0",
        &[a.addr, b.addr, c.addr],
        Balance::RoundRobin,
    );
    h.set(vec![weighted(spec, &[2, 1, 1])]).await;
    let addr = h.addr("127.0.1.1:0").await;
    let mut names = Vec::new();
    for _ in 0..400 {
        names.push(greet(addr).await.1.expect("proxied"));
    }
    let t = tally(names.iter().map(String::as_str));
    assert_eq!((t["a"], t["b"], t["c"]), (200, 100, 100), "{t:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_conn_and_p2c_spread_open_connections() {
    for (policy, slack) in [(Balance::LeastConn, 0), (Balance::P2c, 30)] {
        let h = harness();
        let (a, b, c) = three_backends().await;
        h.set(vec![service(
            "lc",
            "127.0.1.2:0",
            &[a.addr, b.addr, c.addr],
            policy,
        )])
        .await;
        let addr = h.addr("127.0.1.2:0").await;
        let mut open = Vec::new();
        let mut names = Vec::new();
        for _ in 0..300 {
            let (s, name) = greet(addr).await;
            names.push(name.expect("proxied"));
            open.push(s); // stays open: the backend keeps counting as loaded
        }
        let t = tally(names.iter().map(String::as_str));
        for k in ["a", "b", "c"] {
            assert!(t[k].abs_diff(100) <= slack, "{policy:?}: {t:?}");
        }
        // Close every connection to `a`: new ones go (mostly) to it now.
        let mut kept = Vec::new();
        for (s, name) in open.into_iter().zip(&names) {
            if name != "a" {
                kept.push(s);
            }
        }
        let deadline = Instant::now() + T;
        while h.proxy().active_connections() > kept.len() {
            assert!(
                Instant::now() < deadline,
                "closed connections still counted"
            );
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let mut to_a = 0;
        for _ in 0..50 {
            let (s, name) = greet(addr).await;
            to_a += usize::from(name.as_deref() == Some("a"));
            kept.push(s);
        }
        let want = if policy == Balance::LeastConn { 50 } else { 25 };
        assert!(
            to_a >= want,
            "{policy:?}: only {to_a} of 50 went to the idle endpoint"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_spreads_and_maglev_sticks_to_client_ip() {
    let h = harness();
    let (a, b, c) = three_backends().await;
    let eps = [a.addr, b.addr, c.addr];
    h.set(vec![
        service("rnd", "127.0.1.3:0", &eps, Balance::Random),
        service("mg", "127.0.1.4:0", &eps, Balance::Maglev),
    ])
    .await;
    let rnd = h.addr("127.0.1.3:0").await;
    let mut names = Vec::new();
    for _ in 0..300 {
        names.push(greet(rnd).await.1.expect("proxied"));
    }
    let t = tally(names.iter().map(String::as_str));
    for k in ["a", "b", "c"] {
        assert!((60..=140).contains(&t[k]), "random: {t:?}");
    }

    let mg = h.addr("127.0.1.4:0").await;
    let mut first: HashMap<String, String> = HashMap::new();
    for round in 0..3 {
        for i in 1..=100 {
            let ip = format!("127.2.0.{i}");
            let name = greet_from(&ip, mg).await.expect("proxied");
            if round == 0 {
                first.insert(ip, name);
            } else {
                assert_eq!(first[&ip], name, "maglev moved client {ip}");
            }
        }
    }
    let t = tally(first.values().map(String::as_str));
    for k in ["a", "b", "c"] {
        assert!(t.get(k).copied().unwrap_or(0) >= 15, "maglev spread: {t:?}");
    }
}
