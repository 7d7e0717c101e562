//! Fixtures shared by the unit tests of `dns/`: a config, snapshots,
//! queries, and an in-process server with its clients.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query};
use hickory_proto::rr::{Name, RData, RecordType};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};
use tokio_util::sync::CancellationToken;

pub(crate) use super::answer::tests::demo;
use super::answer::tests::{ep, service};
use super::server::DnsServer;
use crate::config::DnsConfig;
use crate::model::Snapshot;
use crate::registry::Reader;

pub(crate) const LOCAL: IpAddr = IpAddr::V4(std::net::Ipv4Addr::LOCALHOST);

pub(crate) fn cfg() -> DnsConfig {
    DnsConfig {
        enabled: true,
        listen: "127.0.0.1:0".parse().unwrap(),
        zone: "cluster.local".into(),
        ttl: 5,
        forward: Vec::new(),
        forward_allow: vec!["127.0.0.0/8".parse().unwrap()],
        cache_size: 100,
        udp_sockets: 2,
        forward_timeout: Duration::from_millis(600),
        tcp_idle_timeout: Duration::from_secs(5),
        tcp_max_connections: 64,
        ..DnsConfig::default()
    }
}

/// demo() plus `big`: a headless service with 60 healthy endpoints.
pub(crate) fn big_snapshot() -> Snapshot {
    let mut snap = demo();
    let eps = (0..60)
        .map(|i| {
            ep(Box::leak(
                format!("10.9.{}.{}", i / 200, i % 200 + 1).into_boxed_str(),
            ))
        })
        .collect();
    let big = service("default", "big", None, eps);
    snap.services.insert(big.key().clone(), Arc::new(big));
    snap
}

pub(crate) fn query(name: &str, qtype: RecordType, edns: Option<u16>) -> Message {
    let mut msg = Message::new(0x1234, MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.queries
        .push(Query::query(Name::from_ascii(name).unwrap(), qtype));
    if let Some(payload) = edns {
        let mut e = Edns::new();
        e.set_max_payload(payload);
        msg.edns = Some(e);
    }
    msg
}

pub(crate) fn parse(bytes: &[u8]) -> Message {
    Message::from_vec(bytes).expect("reply parses")
}

pub(crate) fn a_records(msg: &Message) -> Vec<IpAddr> {
    msg.answers
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            _ => None,
        })
        .collect()
}

/// An in-process server; shut down on drop, or with [`Running::stop`].
pub(crate) struct Running {
    pub server: Option<DnsServer>,
    pub shutdown: CancellationToken,
    pub addr: SocketAddr,
}

impl Running {
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        let server = self.server.take().unwrap();
        tokio::time::timeout(Duration::from_secs(5), server.join())
            .await
            .expect("dns server stops within 5 s of shutdown")
            .expect("every loop ends cleanly at shutdown");
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

pub(crate) async fn start(cfg: DnsConfig, reader: Reader) -> Running {
    let shutdown = CancellationToken::new();
    let server = super::spawn(&cfg, reader, shutdown.clone())
        .await
        .expect("dns binds");
    let addr = server.local_addr;
    assert_ne!(addr.port(), 0);
    Running {
        server: Some(server),
        shutdown,
        addr,
    }
}

pub(crate) async fn udp_ask(addr: SocketAddr, bytes: &[u8]) -> Option<Vec<u8>> {
    let sock = UdpSocket::bind("127.0.0.1:0").await.unwrap();
    sock.send_to(bytes, addr).await.unwrap();
    let mut buf = vec![0u8; 65536];
    let n = tokio::time::timeout(Duration::from_secs(2), sock.recv(&mut buf))
        .await
        .ok()?
        .ok()?;
    Some(buf[..n].to_vec())
}

pub(crate) async fn tcp_ask(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(&framed(bytes)).await.unwrap();
    read_frame(&mut s).await.expect("a tcp reply")
}

/// `bytes` with a length prefix, framed here rather than by the code
/// under test.
pub(crate) fn framed(bytes: &[u8]) -> Vec<u8> {
    let mut f = (bytes.len() as u16).to_be_bytes().to_vec();
    f.extend_from_slice(bytes);
    f
}

/// One length-prefixed reply within 3 s; `None` on close or timeout.
pub(crate) async fn read_frame(s: &mut TcpStream) -> Option<Vec<u8>> {
    let fut = async {
        let len = s.read_u16().await.ok()?;
        let mut body = vec![0u8; usize::from(len)];
        s.read_exact(&mut body).await.ok()?;
        Some(body)
    };
    tokio::time::timeout(Duration::from_secs(3), fut)
        .await
        .ok()?
}
