//! One DNS message in, one reply out: the protocol rules around
//! [`answer`](super::answer::answer) (the slow path, on hickory-proto), and
//! the entry point that tries the [fast path](super::fast) first.
//!
//! Zone answers are computed for the lower-cased question and encoded with
//! hickory; then the question section is overwritten with the question as
//! asked. Every answer owner is the question name, which hickory compresses
//! into a pointer to the question, so answers read in the question's case.
//! That makes the encoded reply depend on the question's case only through
//! those bytes, which is what lets the fast path cache one encoding per
//! lower-cased name.

use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Edns, Message, MessageType, OpCode, Query, ResponseCode};
use hickory_proto::rr::RecordType;
use ipnet::IpNet;

use super::answer::{self, Outcome, Zone, ZoneAnswer};
use super::fast::{self, FastCache};
use super::forward::{ForwardJob, Forwarder};
use crate::model::Snapshot;

/// Our EDNS UDP payload size (DNS flag day 2020).
pub const EDNS_PAYLOAD: u16 = 1232;
/// Largest reply without EDNS over UDP.
pub const PLAIN_UDP_LIMIT: usize = 512;
/// Largest DNS message over TCP.
pub const TCP_LIMIT: usize = 65535;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Proto {
    Udp,
    Tcp,
}

impl Proto {
    pub fn as_str(self) -> &'static str {
        match self {
            Proto::Udp => "udp",
            Proto::Tcp => "tcp",
        }
    }
}

/// What to do with one received message.
#[derive(Debug)]
pub enum Reply {
    /// Send the bytes written to the output buffer.
    Send { rcode: ResponseCode, qtype: QType },
    /// Ask the upstreams, then send what the job returns.
    Forward(Box<ForwardJob>),
    /// Send nothing (no readable header, or a response sent to us).
    Drop,
}

/// The question type of a request, for the `qtype` metric label (`None` when
/// no question could be read).
pub type QType = Option<RecordType>;

/// The message handler shared by every UDP and TCP task.
#[derive(Debug)]
pub struct Handler {
    zone: Zone,
    /// RA in replies: we recurse (forward) for allowed clients.
    recursion_available: bool,
    forward_allow: Vec<IpNet>,
    forwarder: Option<Arc<Forwarder>>,
}

impl Handler {
    pub fn new(zone: Zone, forward_allow: Vec<IpNet>, forwarder: Option<Arc<Forwarder>>) -> Self {
        Self {
            zone,
            recursion_available: forwarder.is_some(),
            forward_allow,
            forwarder,
        }
    }

    pub fn zone(&self) -> &Zone {
        &self.zone
    }

    /// Handles one message: the fast path when it applies, else the slow one.
    /// The reply bytes are written to `out`.
    #[allow(clippy::too_many_arguments)]
    pub fn handle(
        &self,
        cache: &mut FastCache,
        snapshot: &Snapshot,
        bytes: &[u8],
        client: IpAddr,
        proto: Proto,
        rotate: usize,
        out: &mut Vec<u8>,
    ) -> Reply {
        if let Some(q) = fast::parse(bytes, proto) {
            cache.sync(snapshot.version);
            if let Some(entry) = cache.get(q.key()) {
                entry.render(bytes, &q, rotate, out);
                return Reply::Send {
                    rcode: entry.rcode,
                    qtype: Some(q.qtype()),
                };
            }
            if let Some(entry) = self.template(snapshot, bytes, &q) {
                entry.render(bytes, &q, rotate, out);
                let reply = Reply::Send {
                    rcode: entry.rcode,
                    qtype: Some(q.qtype()),
                };
                cache.insert(q.key(), entry);
                return reply;
            }
        }
        self.slow(snapshot, bytes, client, proto, rotate, out)
    }

    /// Builds the cacheable encoding of a fast-path query: the reply to the
    /// same query with ID 0, RD and CD clear, the lower-case question, and
    /// no rotation. `None` when the name is not ours (forward or refuse).
    fn template(
        &self,
        snapshot: &Snapshot,
        bytes: &[u8],
        q: &fast::FastQuery,
    ) -> Option<fast::Entry> {
        let mut req = Message::from_vec(bytes).ok()?;
        req.metadata.id = 0;
        req.metadata.recursion_desired = false;
        req.metadata.checking_disabled = false;
        let query = req.queries.first()?;
        let lower = lowercase(query);
        let Outcome::Answer(za) = answer::answer(snapshot, &self.zone, &lower, 0) else {
            return None;
        };
        let rcode = za.rcode;
        let encoded = self.encode_zone(&req, lower, za, q.limit())?;
        fast::Entry::new(encoded, q, rcode)
    }

    /// The reference path: parse with hickory, answer, encode with hickory.
    pub fn slow(
        &self,
        snapshot: &Snapshot,
        bytes: &[u8],
        client: IpAddr,
        proto: Proto,
        rotate: usize,
        out: &mut Vec<u8>,
    ) -> Reply {
        out.clear();
        if bytes.len() < 12 || bytes[2] & 0x80 != 0 {
            // No header, or a response: never answer those (no loops).
            return Reply::Drop;
        }
        let req = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS message");
                out.extend_from_slice(&header_only(bytes, ResponseCode::FormErr));
                return Reply::Send {
                    rcode: ResponseCode::FormErr,
                    qtype: None,
                };
            }
        };
        let qtype = req.queries.first().map(|q| q.query_type);
        let mut send = |rcode: ResponseCode, encoded: Vec<u8>| {
            *out = encoded;
            Reply::Send { rcode, qtype }
        };
        let limit = limit(proto, req.edns.as_ref());
        if req.metadata.op_code != OpCode::Query {
            return send(ResponseCode::NotImp, self.error(&req, ResponseCode::NotImp));
        }
        if req.queries.len() != 1 {
            return send(
                ResponseCode::FormErr,
                self.error(&req, ResponseCode::FormErr),
            );
        }
        if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
            return send(
                ResponseCode::BADVERS,
                self.error(&req, ResponseCode::BADVERS),
            );
        }
        let query = &req.queries[0];
        if matches!(query.query_type, RecordType::AXFR | RecordType::IXFR) {
            return send(
                ResponseCode::Refused,
                self.error(&req, ResponseCode::Refused),
            );
        }
        let lower = lowercase(query);
        match answer::answer(snapshot, &self.zone, &lower, rotate) {
            Outcome::Answer(za) => {
                let rcode = za.rcode;
                match self.encode_zone(&req, lower, za, limit) {
                    Some(mut encoded) => {
                        patch_question_case(&mut encoded, &query.name);
                        send(rcode, encoded)
                    }
                    None => send(
                        ResponseCode::ServFail,
                        self.error(&req, ResponseCode::ServFail),
                    ),
                }
            }
            Outcome::NotOurs => match &self.forwarder {
                Some(fwd) if self.allowed(client) => Reply::Forward(Box::new(ForwardJob {
                    forwarder: fwd.clone(),
                    request: req,
                    limit,
                })),
                _ => send(
                    ResponseCode::Refused,
                    self.error(&req, ResponseCode::Refused),
                ),
            },
        }
    }

    fn allowed(&self, client: IpAddr) -> bool {
        let client = canonical(client);
        self.forward_allow.iter().any(|net| net.contains(&client))
    }

    /// Encodes an authoritative answer; truncates (TC, no records) past `limit`.
    fn encode_zone(
        &self,
        req: &Message,
        question: Query,
        za: ZoneAnswer,
        limit: usize,
    ) -> Option<Vec<u8>> {
        let mut msg = self.response(req, za.rcode);
        msg.metadata.authoritative = true;
        msg.queries.push(question);
        msg.answers = za.answers;
        msg.authorities = za.authorities;
        msg.additionals = za.additionals;
        encode_within(&msg, limit)
    }

    /// The response skeleton for `req`: ID, opcode, RD and CD copied; EDNS
    /// when the request had it.
    fn response(&self, req: &Message, rcode: ResponseCode) -> Message {
        let mut msg = Message::new(req.metadata.id, MessageType::Response, req.metadata.op_code);
        msg.metadata.recursion_desired = req.metadata.recursion_desired;
        msg.metadata.checking_disabled = req.metadata.checking_disabled;
        msg.metadata.recursion_available = self.recursion_available;
        msg.metadata.response_code = rcode;
        if req.edns.is_some() {
            msg.edns = Some(our_edns());
        }
        msg
    }

    /// An error reply that echoes the question(s).
    fn error(&self, req: &Message, rcode: ResponseCode) -> Vec<u8> {
        let mut msg = self.response(req, rcode);
        msg.queries = req.queries.clone();
        encode_within(&msg, TCP_LIMIT).unwrap_or_else(|| {
            let mut h = vec![0u8; 12];
            h[..2].copy_from_slice(&req.metadata.id.to_be_bytes());
            header_only(&h, rcode)
        })
    }
}

/// The OPT record of our replies.
pub fn our_edns() -> Edns {
    let mut edns = Edns::new();
    edns.set_max_payload(EDNS_PAYLOAD);
    edns
}

/// The reply size limit for a request.
pub fn limit(proto: Proto, edns: Option<&Edns>) -> usize {
    match (proto, edns) {
        (Proto::Tcp, _) => TCP_LIMIT,
        (Proto::Udp, None) => PLAIN_UDP_LIMIT,
        (Proto::Udp, Some(e)) => usize::from(e.max_payload().clamp(512, EDNS_PAYLOAD)),
    }
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

/// A header-only reply to a message whose body could not be read: same ID,
/// opcode and RD, QR set, `rcode`.
pub fn header_only(req: &[u8], rcode: ResponseCode) -> Vec<u8> {
    let mut h = vec![0u8; 12];
    h[..2].copy_from_slice(&req[..2]);
    h[2] = 0x80 | (req[2] & 0x79);
    h[3] = rcode.low();
    h
}

pub fn lowercase(q: &Query) -> Query {
    let mut lower = q.clone();
    lower.name = q.name.to_lowercase();
    lower
}

/// Overwrites the question name of an encoded reply (at offset 12, written
/// uncompressed from the lower-cased name) with the name as asked.
fn patch_question_case(encoded: &mut [u8], name: &hickory_proto::rr::Name) {
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

/// IPv4-mapped IPv6 clients count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}
