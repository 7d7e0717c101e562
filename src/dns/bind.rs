//! Binding the listen address: `udp_sockets` UDP sockets sharing one port
//! with SO_REUSEPORT, and a TCP listener on the same port.

use std::io;
use std::net::{SocketAddr, UdpSocket};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::net::TcpListener;

use super::error::DnsError;
use super::udp::UDP_POLL;

/// The sockets of one responder.
pub struct Bound {
    pub udp: Vec<UdpSocket>,
    pub tcp: TcpListener,
    /// The port really bound (the config may say 0).
    pub addr: SocketAddr,
}

/// Binds every socket. With port 0, the first UDP socket picks the port and
/// the rest follow it; if TCP cannot have that port, try another few times.
pub fn bind_all(listen: SocketAddr, udp_sockets: usize) -> Result<Bound, DnsError> {
    let attempts = if listen.port() == 0 { 8 } else { 1 };
    let mut last = None;
    for _ in 0..attempts {
        match bind_once(listen, udp_sockets) {
            Ok(bound) => return Ok(bound),
            Err(e) => last = Some(e),
        }
    }
    Err(last.expect("at least one attempt"))
}

fn bind_once(listen: SocketAddr, udp_sockets: usize) -> Result<Bound, DnsError> {
    let first = bind_udp(listen)?;
    let addr = first.local_addr().map_err(bind_error("udp", listen))?;
    let mut udp = vec![first];
    for _ in 1..udp_sockets {
        udp.push(bind_udp(addr)?);
    }
    let tcp = bind_tcp(addr)?;
    Ok(Bound { udp, tcp, addr })
}

fn bind_error(proto: &'static str, addr: SocketAddr) -> impl Fn(io::Error) -> DnsError {
    move |source| DnsError::Bind {
        proto,
        addr,
        source,
    }
}

fn bind_udp(addr: SocketAddr) -> Result<UdpSocket, DnsError> {
    let err = bind_error("udp", addr);
    let sock =
        Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP)).map_err(&err)?;
    sock.set_reuse_port(true).map_err(&err)?;
    // Blocking, woken by the kernel; the timeout lets the thread see shutdown.
    sock.set_read_timeout(Some(UDP_POLL)).map_err(&err)?;
    // The kernel's default receive buffer: at saturation a short queue sheds
    // load (clients retry) where a deep one only adds latency to every query.
    sock.bind(&addr.into()).map_err(&err)?;
    Ok(sock.into())
}

fn bind_tcp(addr: SocketAddr) -> Result<TcpListener, DnsError> {
    let err = bind_error("tcp", addr);
    let sock =
        Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP)).map_err(&err)?;
    sock.set_reuse_address(true).map_err(&err)?;
    sock.set_nonblocking(true).map_err(&err)?;
    sock.bind(&addr.into()).map_err(&err)?;
    sock.listen(1024).map_err(&err)?;
    TcpListener::from_std(sock.into()).map_err(&err)
}
