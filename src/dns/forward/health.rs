//! Upstream health, as CoreDNS's `forward` keeps it.
//!
//! An upstream that fails `max_fails` queries in a row is marked down. A
//! failure is a network-side one: no reply within the try's time, a socket
//! error (a UDP port with nobody on it answers ICMP "port unreachable",
//! seen as a refused connection) or a reply that cannot be read. Any reply
//! with an rcode, SERVFAIL and REFUSED included, shows the upstream alive
//! and resets its count: a recursive upstream answers SERVFAIL when a
//! domain's own servers are broken, and one broken domain must not take
//! an upstream out for every other name (CoreDNS counts the same way).
//!
//! While an upstream is down a background check sends it `. IN NS` every
//! `health_check` and marks it up on any reply; a real query that gets a
//! reply (see below) marks it up as well. Queries go to the healthy
//! upstreams in the configured order (the first healthy one first, the
//! next ones if it fails within the forward timeout). When every upstream
//! is down the checks may be what is broken: all of them are tried,
//! starting at a random one (CoreDNS sends to a random one).
//!
//! `beacon_dns_upstream_healthy{upstream}` is 1 while an upstream is up
//! and 0 while it is down. `max_fails = 0` never marks an upstream down.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RecordType};
use tokio::net::UdpSocket;

use crate::dns::wire;

/// One upstream's health.
#[derive(Debug)]
struct Upstream {
    addr: SocketAddr,
    /// Failures in a row since its last reply.
    fails: AtomicU32,
    down: AtomicBool,
    /// A background check is running for it.
    checking: AtomicBool,
    gauge: metrics::Gauge,
}

/// The health of every upstream of a forwarder.
#[derive(Debug)]
pub struct Health {
    upstreams: Vec<Upstream>,
    max_fails: u32,
    interval: Duration,
}

impl Health {
    pub fn new(addrs: &[SocketAddr], max_fails: u32, interval: Duration) -> Arc<Self> {
        let upstreams = addrs
            .iter()
            .map(|&addr| {
                let gauge = metrics::gauge!(
                    crate::telemetry::DNS_UPSTREAM_HEALTHY,
                    "upstream" => addr.to_string()
                );
                gauge.set(1.0);
                Upstream {
                    addr,
                    fails: AtomicU32::new(0),
                    down: AtomicBool::new(false),
                    checking: AtomicBool::new(false),
                    gauge,
                }
            })
            .collect();
        Arc::new(Self {
            upstreams,
            max_fails,
            interval: interval.max(Duration::from_millis(10)),
        })
    }

    pub fn addr(&self, i: usize) -> SocketAddr {
        self.upstreams[i].addr
    }

    pub fn is_up(&self, i: usize) -> bool {
        !self.upstreams[i].down.load(Ordering::Acquire)
    }

    /// The upstreams to ask, in order: the healthy ones as configured; when
    /// none is healthy, every one, starting at a random one.
    pub fn order(&self) -> Vec<usize> {
        let n = self.upstreams.len();
        let healthy: Vec<usize> = (0..n).filter(|&i| self.is_up(i)).collect();
        if !healthy.is_empty() || n == 0 {
            return healthy;
        }
        let start = fastrand::usize(..n);
        (0..n).map(|k| (start + k) % n).collect()
    }

    /// Upstream `i` replied: its count starts over and it is up.
    pub fn replied(&self, i: usize) {
        let u = &self.upstreams[i];
        u.fails.store(0, Ordering::Release);
        if u.down.swap(false, Ordering::AcqRel) {
            u.gauge.set(1.0);
            tracing::info!(upstream = %u.addr, "DNS upstream is up again");
        }
    }

    /// Upstream `i` failed a query: at `max_fails` in a row it is marked
    /// down and a background check starts (on the current tokio runtime).
    pub fn failed(self: &Arc<Self>, i: usize) {
        let u = &self.upstreams[i];
        let fails = u.fails.fetch_add(1, Ordering::AcqRel).saturating_add(1);
        if self.max_fails == 0 || fails < self.max_fails || u.down.swap(true, Ordering::AcqRel) {
            return;
        }
        u.gauge.set(0.0);
        tracing::warn!(
            upstream = %u.addr,
            fails,
            "DNS upstream marked down; checking it every {:?}",
            self.interval
        );
        self.start_check(i);
    }

    fn start_check(self: &Arc<Self>, i: usize) {
        if self.upstreams[i].checking.swap(true, Ordering::AcqRel) {
            return;
        }
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            self.upstreams[i].checking.store(false, Ordering::Release);
            return;
        };
        runtime.spawn(check(Arc::downgrade(self), i));
    }
}

/// Probes upstream `i` every interval while it is down; ends when it is up
/// again or the forwarder is gone.
async fn check(health: Weak<Health>, i: usize) {
    loop {
        let Some(interval) = health.upgrade().map(|h| h.interval) else {
            return;
        };
        tokio::time::sleep(interval).await;
        let Some(h) = health.upgrade() else {
            return;
        };
        let u = &h.upstreams[i];
        if !u.down.load(Ordering::Acquire) {
            u.checking.store(false, Ordering::Release);
            // Marked down again between the load and the store: go on.
            if u.down.load(Ordering::Acquire) && !u.checking.swap(true, Ordering::AcqRel) {
                continue;
            }
            return;
        }
        let addr = u.addr;
        drop(h);
        if probe(addr, interval).await
            && let Some(h) = health.upgrade()
        {
            h.replied(i);
        }
    }
}

/// Sends `. IN NS` to `addr`; true on any reply with its ID within `wait`.
pub async fn probe(addr: SocketAddr, wait: Duration) -> bool {
    let msg = wire::query(Query::query(Name::root(), RecordType::NS), false);
    let Ok(bytes) = msg.to_vec() else {
        return false;
    };
    let exchange = async {
        let local: SocketAddr = if addr.is_ipv4() {
            (Ipv4Addr::UNSPECIFIED, 0).into()
        } else {
            (Ipv6Addr::UNSPECIFIED, 0).into()
        };
        let sock = UdpSocket::bind(local).await?;
        sock.connect(addr).await?;
        sock.send(&bytes).await?;
        let mut buf = vec![0u8; 4096];
        loop {
            let n = sock.recv(&mut buf).await?;
            if n >= 2 && u16::from_be_bytes([buf[0], buf[1]]) == msg.metadata.id {
                return Ok::<_, std::io::Error>(Message::from_vec(&buf[..n]).is_ok());
            }
        }
    };
    matches!(tokio::time::timeout(wait, exchange).await, Ok(Ok(true)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addrs(n: u16) -> Vec<SocketAddr> {
        (0..n)
            .map(|i| SocketAddr::from(([127, 0, 0, 1], 10_000 + i)))
            .collect()
    }

    #[tokio::test]
    async fn an_upstream_goes_down_after_max_fails_in_a_row_and_a_reply_brings_it_back() {
        let h = Health::new(&addrs(2), 2, Duration::from_secs(60));
        assert_eq!(h.order(), vec![0, 1]);
        h.failed(0);
        assert!(h.is_up(0), "one failure is below max_fails");
        h.replied(0);
        h.failed(0);
        assert!(h.is_up(0), "a reply resets the count");
        h.failed(0);
        assert!(!h.is_up(0), "two in a row: down");
        assert_eq!(h.order(), vec![1], "only the healthy one is asked");
        assert!(h.upstreams[0].checking.load(Ordering::Acquire), "checked");
        h.failed(0);
        assert!(!h.is_up(0));
        h.replied(0);
        assert!(h.is_up(0));
        assert_eq!(h.order(), vec![0, 1]);
    }

    #[tokio::test]
    async fn with_every_upstream_down_all_are_tried_from_a_random_one() {
        let h = Health::new(&addrs(3), 1, Duration::from_secs(60));
        for i in 0..3 {
            h.failed(i);
        }
        let mut starts = std::collections::HashSet::new();
        for _ in 0..200 {
            let order = h.order();
            let mut sorted = order.clone();
            sorted.sort();
            assert_eq!(sorted, vec![0, 1, 2], "{order:?}");
            assert_eq!(order[1], (order[0] + 1) % 3);
            starts.insert(order[0]);
        }
        assert_eq!(starts.len(), 3, "random start: {starts:?}");
    }

    #[tokio::test]
    async fn max_fails_zero_never_marks_down() {
        let h = Health::new(&addrs(1), 0, Duration::from_secs(60));
        for _ in 0..10 {
            h.failed(0);
        }
        assert!(h.is_up(0));
    }

    #[tokio::test]
    async fn the_background_check_marks_a_down_upstream_up_when_it_answers() {
        // A port with nobody on it, then something answering there.
        let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
        let addr = sock.local_addr().unwrap();
        drop(sock);
        let h = Health::new(&[addr], 1, Duration::from_millis(50));
        h.failed(0);
        assert!(!h.is_up(0));
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!h.is_up(0), "nobody answers yet: still down");
        let sock = UdpSocket::bind(addr).await.unwrap();
        let seen = tokio::spawn(async move {
            let mut buf = vec![0u8; 512];
            let (n, peer) = sock.recv_from(&mut buf).await.unwrap();
            let req = Message::from_vec(&buf[..n]).unwrap();
            // Any reply counts, even REFUSED.
            let mut resp = wire::response(&req, hickory_proto::op::ResponseCode::Refused, false);
            resp.queries = req.queries.clone();
            sock.send_to(&resp.to_vec().unwrap(), peer).await.unwrap();
            req.queries[0].clone()
        });
        let q = tokio::time::timeout(Duration::from_secs(2), seen)
            .await
            .expect("the check asks within its interval")
            .unwrap();
        assert_eq!((q.name, q.query_type), (Name::root(), RecordType::NS));
        let deadline = std::time::Instant::now() + Duration::from_secs(2);
        while !h.is_up(0) && std::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(h.is_up(0), "marked up on the check's reply");
        tokio::time::sleep(Duration::from_millis(150)).await;
        assert!(
            !h.upstreams[0].checking.load(Ordering::Acquire),
            "the check ends once the upstream is up"
        );
    }
}
