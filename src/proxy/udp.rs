//! UDP services (`protocol = "udp"` on a port): per-client flows.
//!
//! The first datagram from a client address opens a flow: the route's
//! policy picks an endpoint and a socket connected to it; every later
//! datagram of that client goes to the same endpoint, in order (one
//! receive loop sends them one after the other). Replies come back on the
//! flow's socket and leave from the service's own socket, so the client
//! sees them from the address it sent to. A flow ends after
//! `udp_idle_timeout` without a datagram either way. The table is bounded
//! (`[proxy] udp_max_flows`): beyond it new clients' datagrams are dropped
//! and counted. An endpoint that leaves keeps its open flows; new flows go
//! to the endpoints of the route in force.

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};

use socket2::{Domain, Socket, Type};
use tokio::net::UdpSocket;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use super::balancer::ConnInfo;
use super::copy::Activity;
use super::route::Route;
use super::shared::Shared;

/// Largest datagram relayed.
const MAX_DATAGRAM: usize = 65_535;

/// Binds the service's UDP socket (SO_REUSEADDR, IP_FREEBIND like TCP).
pub(super) fn bind(addr: SocketAddr) -> io::Result<UdpSocket> {
    let sock = Socket::new(
        Domain::for_address(addr),
        Type::DGRAM,
        Some(socket2::Protocol::UDP),
    )?;
    sock.set_reuse_address(true)?;
    if addr.is_ipv6() {
        sock.set_only_v6(true)?;
    }
    #[cfg(target_os = "linux")]
    if addr.is_ipv6() {
        sock.set_freebind_v6(true)?;
    } else {
        sock.set_freebind_v4(true)?;
    }
    sock.set_nonblocking(true)?;
    sock.bind(&addr.into())?;
    UdpSocket::from_std(sock.into())
}

/// One client's flow to one endpoint.
struct Flow {
    upstream: UdpSocket,
    activity: Activity,
}

type Flows = Arc<Mutex<HashMap<SocketAddr, Arc<Flow>>>>;

/// Receives until `stop`, relaying each datagram on its client's flow.
pub(super) async fn serve(
    sock: UdpSocket,
    routes: watch::Receiver<Arc<Route>>,
    shared: Arc<Shared>,
    stop: CancellationToken,
) {
    let sock = Arc::new(sock);
    let flows: Flows = Arc::default();
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        let (n, client) = tokio::select! {
            biased;
            _ = stop.cancelled() => break,
            r = sock.recv_from(&mut buf) => match r {
                Ok(x) => x,
                // ICMP errors of earlier sends and the like: go on.
                Err(_) => continue,
            },
        };
        let existing = flows
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(&client)
            .cloned();
        let flow = match existing {
            Some(f) => f,
            None => {
                let route = routes.borrow().clone();
                match open(&shared, &route, &sock, &flows, client, &stop).await {
                    Some(f) => f,
                    None => continue,
                }
            }
        };
        flow.activity.touch();
        let _ = flow.upstream.send(&buf[..n]).await;
    }
}

/// Opens a flow for `client` (None: not ready, no endpoint, table full).
async fn open(
    shared: &Arc<Shared>,
    route: &Arc<Route>,
    sock: &Arc<UdpSocket>,
    flows: &Flows,
    client: SocketAddr,
    stop: &CancellationToken,
) -> Option<Arc<Flow>> {
    if !shared.ready.load(Ordering::Acquire) {
        route.metrics().not_ready.increment(1);
        return None;
    }
    if flows.lock().unwrap_or_else(|e| e.into_inner()).len() >= shared.udp_max_flows {
        route.metrics().over_limit.increment(1);
        metrics::counter!(crate::telemetry::PROXY_UDP_FLOWS_DROPPED, "service" => route.service.to_string())
            .increment(1);
        return None;
    }
    let Some(idx) = route.balancer.pick(&ConnInfo { client }).first() else {
        route.metrics().no_endpoints.increment(1);
        return None;
    };
    let endpoint = route.backends[idx].addr;
    let local: IpAddr = if endpoint.is_ipv6() {
        Ipv6Addr::UNSPECIFIED.into()
    } else {
        Ipv4Addr::UNSPECIFIED.into()
    };
    let upstream = UdpSocket::bind((local, 0)).await.ok()?;
    upstream.connect(endpoint).await.ok()?;
    let flow = Arc::new(Flow {
        upstream,
        activity: Activity::default(),
    });
    flows
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(client, flow.clone());
    route.metrics().ok.increment(1);
    let gauge =
        metrics::gauge!(crate::telemetry::PROXY_UDP_FLOWS, "service" => route.service.to_string());
    gauge.increment(1.0);
    tracing::debug!(client.addr = %client, %endpoint, "udp flow opened");
    let idle = route.state.spec.proxy.udp_idle_timeout;
    let (sock, flows, stop, f) = (sock.clone(), flows.clone(), stop.clone(), flow.clone());
    shared.tracker.spawn(async move {
        replies(&f, &sock, client, idle, &stop).await;
        let mut map = flows.lock().unwrap_or_else(|e| e.into_inner());
        if map.get(&client).is_some_and(|g| Arc::ptr_eq(g, &f)) {
            map.remove(&client);
        }
        gauge.decrement(1.0);
        tracing::debug!(client.addr = %client, %endpoint, "udp flow closed");
    });
    Some(flow)
}

/// Relays the endpoint's replies to the client until the flow is idle.
async fn replies(
    flow: &Flow,
    sock: &UdpSocket,
    client: SocketAddr,
    idle: std::time::Duration,
    stop: &CancellationToken,
) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            r = flow.upstream.recv(&mut buf) => {
                if let Ok(n) = r {
                    flow.activity.touch();
                    let _ = sock.send_to(&buf[..n], client).await;
                }
            }
            _ = quiet_for(&flow.activity, idle) => return,
            _ = stop.cancelled() => return,
        }
    }
}

/// Resolves once nothing moved for `idle`.
async fn quiet_for(activity: &Activity, idle: std::time::Duration) {
    loop {
        let quiet = activity.idle_for();
        if quiet >= idle {
            return;
        }
        tokio::time::sleep(idle - quiet).await;
    }
}
