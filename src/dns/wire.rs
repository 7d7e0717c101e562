//! The wire level that every part of `dns/` (and `beacon query`) shares:
//! message size limits, the transport, the response skeleton, encoding
//! within a limit, the header-only fallback, RFC 1035 TCP length framing,
//! and one UDP and one TCP exchange with a server.
//!
//! A leaf: it uses hickory-proto and tokio, nothing else of `dns/`.

use std::io;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::RecordType;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpStream, UdpSocket};

/// Our EDNS UDP payload size (DNS flag day 2020).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest reply without EDNS over UDP.
pub const PLAIN_UDP_LIMIT: usize = 512;
/// Largest DNS message over TCP.
pub const TCP_LIMIT: usize = 65535;
/// Length of the fixed DNS header.
pub const HEADER_LEN: usize = 12;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
    /// DNS over TLS (RFC 7858).
    Dot,
    /// DNS over HTTPS (RFC 8484).
    Doh,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
            Proto::Dot => "dot",
            Proto::Doh => "doh",
        }
    }
}

/// The question type of a request, for the `qtype` metric label (`None`
/// when no question could be read).
pub type QType = Option<RecordType>;

/// Why an exchange with a server failed.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("cannot encode the query: {0}")]
    Encode(hickory_proto::ProtoError),
    #[error("{0}")]
    Io(#[from] io::Error),
    #[error("unreadable or unrelated reply")]
    Malformed,
}

/// The OPT record of our messages.
pub fn our_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    edns
}

/// The reply size limit for a request over `proto` whose OPT record (if
/// any) advertises `edns_payload`.
pub fn limit(proto: Proto, edns_payload: Option<u16>) -> usize {
    match (proto, edns_payload) {
        (Proto::Tcp | Proto::Dot | Proto::Doh, _) => TCP_LIMIT,
        (Proto::Udp, None) => PLAIN_UDP_LIMIT,
        (Proto::Udp, Some(p)) => usize::from(p.clamp(512, EDNS_PAYLOAD)),
    }
}

/// The response skeleton for `req`: ID and opcode copied, RD and CD copied
/// for a standard query only (RFC 1035 and RFC 4035 define them for QUERY;
/// other opcodes get them clear), RA as given, `rcode`; EDNS when the
/// request had it. No sections.
pub fn response(req: &Message, rcode: ResponseCode, recursion_available: bool) -> Message {
    let mut msg = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
    if req.metadata.op_code == OpCode::Query {
        msg.metadata.recursion_desired = req.metadata.recursion_desired;
        msg.metadata.checking_disabled = req.metadata.checking_disabled;
    }
    msg.metadata.recursion_available = recursion_available;
    msg.metadata.response_code = rcode;
    if req.edns.is_some() {
        msg.edns = Some(our_edns());
    }
    msg
}

/// Encodes `msg`; if that exceeds `limit`, encodes it without records and
/// with TC set (the client retries over TCP).
pub fn encode_within(msg: &Message, limit: usize) -> Option<Vec<u8>> {
    let bytes = msg.to_vec().ok()?;
    if bytes.len() <= limit {
        return Some(bytes);
    }
    let truncated = msg.truncate().to_vec().ok()?;
    (truncated.len() <= limit).then_some(truncated)
}

/// A header-only reply to a message whose body could not be read: same ID
/// and opcode, RD for a standard query only, QR set, `rcode`. `req` holds
/// at least a header.
pub fn header_only(req: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut h = vec![0u8; HEADER_LEN];
    h[..2].copy_from_slice(&req[..2]);
    let opcode = req[2] & 0x78;
    let rd = if opcode == 0 { req[2] & 0x01 } else { 0 };
    h[2] = 0x80 | opcode | rd;
    h[3] = rcode.low();
    h
}

/// The last resort when a reply cannot be encoded: a bare header with the
/// request's ID, QR and `rcode`.
pub fn header_for_id(id: u16, rcode: ResponseCode) -> Vec<u8> {
    let mut h = [0u8; HEADER_LEN];
    h[..2].copy_from_slice(&id.to_be_bytes());
    header_only(&h, rcode)
}

/// `q` with its name lower-cased.
pub fn lowercase(q: &Query) -> Query {
    let mut lower = q.clone();
    lower.name = q.name.to_lowercase();
    lower
}

/// Overwrites the question name of an encoded reply (at offset 12, written
/// uncompressed from the lower-cased name) with the name as asked.
pub fn patch_question_case(encoded: &mut [u8], name: &hickory_proto::rr::Name) {
    let mut at = 12;
    for label in name.iter() {
        let end = at + 1 + label.len();
        if end > encoded.len() {
            return;
        }
        encoded[at + 1..end].copy_from_slice(label);
        at = end;
    }
}

/// `bytes` with their two-byte length prefix, ready for a TCP stream.
pub fn frame(bytes: &[u8]) -> Vec<u8> {
    let mut f = Vec::with_capacity(bytes.len() + 2);
    f.extend_from_slice(&(bytes.len() as u16).to_be_bytes());
    f.extend_from_slice(bytes);
    f
}

/// Reads one length-prefixed message; `None` on a clean close between
/// messages.
pub async fn read_frame<R: AsyncRead + Unpin>(rd: &mut R) -> io::Result<Option<Vec<u8>>> {
    let mut len = [0u8; 2];
    match rd.read_exact(&mut len).await {
        Ok(_) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(e),
    }
    let mut body = vec![0u8; usize::from(u16::from_be_bytes(len))];
    rd.read_exact(&mut body).await?;
    Ok(Some(body))
}

/// A standard query for `question` with a random ID and RD set; with our
/// OPT record when `edns`.
pub fn query(question: Query, edns: bool) -> Message {
    let mut msg = Message::new(fastrand::u16(..), MessageType::Query, OpCode::Query);
    msg.metadata.recursion_desired = true;
    msg.queries.push(question);
    if edns {
        msg.edns = Some(our_edns());
    }
    msg
}

/// Whether `reply` answers `query`: same ID, QR set, and the same first
/// question (name compared case-insensitively).
pub fn answers(reply: &Message, query: &Message) -> bool {
    let same_question = match (reply.queries.first(), query.queries.first()) {
        (Some(r), Some(q)) => {
            r.name.to_lowercase() == q.name.to_lowercase() && r.query_type == q.query_type
        }
        (None, None) => true,
        _ => false,
    };
    reply.metadata.id == query.metadata.id
        && reply.metadata.message_type == MessageType::Response
        && same_question
}

/// Sends `query` to `server` over UDP and waits for its reply; datagrams
/// that do not answer it (another ID, another question, unreadable) are
/// ignored. No timeout: the caller bounds the wait.
pub async fn udp_exchange(server: SocketAddr, query: &Message) -> Result<Message, WireError> {
    let bytes = query.to_vec().map_err(WireError::Encode)?;
    let local: SocketAddr = if server.is_ipv4() {
        (Ipv4Addr::UNSPECIFIED, 0).into()
    } else {
        (Ipv6Addr::UNSPECIFIED, 0).into()
    };
    let sock = UdpSocket::bind(local).await?;
    sock.connect(server).await?;
    sock.send(&bytes).await?;
    let mut buf = vec![0u8; TCP_LIMIT];
    loop {
        let n = sock.recv(&mut buf).await?;
        if let Ok(reply) = Message::from_vec(&buf[..n])
            && answers(&reply, query)
        {
            return Ok(reply);
        }
    }
}

/// Sends `query` to `server` on a new TCP connection and reads one reply,
/// which must answer it. No timeout: the caller bounds the wait.
pub async fn tcp_exchange(server: SocketAddr, query: &Message) -> Result<Message, WireError> {
    let bytes = query.to_vec().map_err(WireError::Encode)?;
    let mut stream = TcpStream::connect(server).await?;
    stream.write_all(&frame(&bytes)).await?;
    let body = read_frame(&mut stream)
        .await?
        .ok_or_else(|| io::Error::from(io::ErrorKind::UnexpectedEof))?;
    let reply = Message::from_vec(&body).map_err(|_| WireError::Malformed)?;
    if !answers(&reply, query) {
        return Err(WireError::Malformed);
    }
    Ok(reply)
}

#[cfg(test)]
mod tests;
