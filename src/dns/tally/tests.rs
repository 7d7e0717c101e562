//! The metrics of a running server: requests by proto and qtype,
//! responses by rcode, durations.

use hickory_proto::rr::RecordType;

use crate::dns::testkit::{cfg, demo, query, start, tcp_ask, udp_ask};
use crate::dns::udp::UDP_POLL;
use crate::registry::Reader;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_requests_responses_and_durations() {
    // The process-wide recorder: UDP threads are not runtime threads. Other
    // tests count too, so compare MX counts (no other test sends MX to a
    // server) before and after.
    let handle = crate::telemetry::metrics();
    let value = |series: &str| -> f64 {
        handle
            .render()
            .lines()
            .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
            .unwrap_or(0.0)
    };
    let udp_mx = r#"beacon_dns_requests_total{proto="udp",qtype="MX"}"#;
    let tcp_mx = r#"beacon_dns_requests_total{proto="tcp",qtype="MX"}"#;
    let noerror = r#"beacon_dns_responses_total{rcode="NOERROR"}"#;
    let nx = r#"beacon_dns_responses_total{rcode="NXDOMAIN"}"#;
    let before = [value(udp_mx), value(tcp_mx), value(noerror), value(nx)];
    let run = start(cfg(), Reader::fixed(demo())).await;
    let mx = query("web.default.svc.cluster.local.", RecordType::MX, None)
        .to_vec()
        .unwrap();
    let mx_nx = query("nope.default.svc.cluster.local.", RecordType::MX, None)
        .to_vec()
        .unwrap();
    for _ in 0..3 {
        assert!(udp_ask(run.addr, &mx).await.is_some());
    }
    assert!(udp_ask(run.addr, &mx_nx).await.is_some());
    let _ = tcp_ask(run.addr, &mx).await;
    // UDP threads add their tallies within UDP_POLL of going idle.
    tokio::time::sleep(UDP_POLL * 3).await;
    run.stop().await;
    let after = [value(udp_mx), value(tcp_mx), value(noerror), value(nx)];
    assert!(
        after[0] - before[0] >= 4.0,
        "udp MX: {before:?} -> {after:?}"
    );
    assert!(
        after[1] - before[1] >= 1.0,
        "tcp MX: {before:?} -> {after:?}"
    );
    assert!(
        after[2] - before[2] >= 4.0,
        "NOERROR: {before:?} -> {after:?}"
    );
    assert!(
        after[3] - before[3] >= 1.0,
        "NXDOMAIN: {before:?} -> {after:?}"
    );
    assert!(
        handle
            .render()
            .contains("beacon_dns_request_duration_seconds")
    );
}
