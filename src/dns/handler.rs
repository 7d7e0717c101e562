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
use std::time::Instant;

use hickory_proto::op::{Edns, Message, OpCode, Query, ResponseCode};
use hickory_proto::rr::RecordType;
use ipnet::IpNet;

use super::answer::{self, Outcome, Zone, ZoneAnswer};
use super::autopath;
use super::fast::{self, FastCache};
use super::forward::{FastTemplate, Forwarder};
use super::job::ForwardJob;
use super::wire::{self, Proto, QType};
use crate::model::Snapshot;

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

/// What the slow path made of a well-formed query.
enum Answered {
    Send(ResponseCode, Vec<u8>),
    Forward(Box<ForwardJob>),
}

/// The message handler shared by every UDP and TCP task.
#[derive(Debug)]
pub struct Handler {
    zone: Zone,
    /// RA in replies: we recurse (forward) for allowed clients.
    recursion_available: bool,
    forward_allow: Vec<IpNet>,
    forwarder: Option<Arc<Forwarder>>,
    /// `[dns] autopath`: walk a known client's search path for it.
    autopath: bool,
}

impl Handler {
    pub fn new(zone: Zone, forward_allow: Vec<IpNet>, forwarder: Option<Arc<Forwarder>>) -> Self {
        Self {
            zone,
            recursion_available: forwarder.is_some(),
            forward_allow,
            forwarder,
            autopath: false,
        }
    }

    /// `[dns] autopath` (see [`autopath`](super::autopath)).
    pub fn with_autopath(mut self, on: bool) -> Self {
        self.autopath = on;
        self
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
        let Some(q) = fast::parse(bytes, proto) else {
            return self.slow(snapshot, bytes, client, proto, rotate, out);
        };
        cache.sync(snapshot.version);
        if let Some(entry) = cache.get(q.key()) {
            if !entry.is_forwarded() {
                return fast_reply(entry, bytes, &q, rotate, out);
            }
            // A forwarded answer: only for clients allowed to forward, and
            // only until its prefetch point (then the forward cache is
            // asked, which counts the question and starts the prefetch).
            let age = entry.age(Instant::now());
            if let (Some(fwd), Some(age)) = (self.forwarder_for(client), age) {
                entry.render_aged(bytes, &q, age, out);
                fwd.count_fast_hit();
                return Reply::Send {
                    rcode: entry.rcode,
                    qtype: Some(q.qtype()),
                };
            }
        } else if let Some(entry) = self.template(snapshot, bytes, &q) {
            let reply = fast_reply(&entry, bytes, &q, rotate, out);
            cache.insert(q.key(), entry);
            return reply;
        }
        let fast = Some((cache, &q));
        self.slow_with(snapshot, bytes, client, (proto, rotate), fast, out)
    }

    /// The forwarder, when `client` may use it.
    fn forwarder_for(&self, client: IpAddr) -> Option<&Arc<Forwarder>> {
        self.forwarder.as_ref().filter(|_| self.allowed(client))
    }

    /// Keeps a forwarded answer's template in the fast cache. Not an
    /// NXDOMAIN with autopath on, as for zone answers (autopath answers
    /// depend on who asks).
    fn keep_forwarded(&self, cache: &mut FastCache, q: &fast::FastQuery, t: FastTemplate) {
        if self.autopath && t.rcode == ResponseCode::NXDomain {
            return;
        }
        if let Some(entry) = fast::Entry::forwarded(t.bytes, q, t.rcode, t.stored, t.until) {
            cache.insert(q.key(), entry);
        }
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
        let lower = wire::lowercase(query);
        let Outcome::Answer(za) = answer::answer(snapshot, &self.zone, &lower, 0) else {
            return None;
        };
        // With autopath an NXDOMAIN depends on who asks: never cached.
        if self.autopath && za.rcode == ResponseCode::NXDomain {
            return None;
        }
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
        self.slow_with(snapshot, bytes, client, (proto, rotate), None, out)
    }

    /// [`slow`](Self::slow); a forward-cache hit for a fast-path query `q`
    /// also leaves its template in `cache` when it may be served from one.
    fn slow_with(
        &self,
        snapshot: &Snapshot,
        bytes: &[u8],
        client: IpAddr,
        (proto, rotate): (Proto, usize),
        fast: Option<(&mut FastCache, &fast::FastQuery)>,
        out: &mut Vec<u8>,
    ) -> Reply {
        out.clear();
        if bytes.len() < wire::HEADER_LEN || bytes[2] & 0x80 != 0 {
            // No header, or a response: never answer those (no loops).
            return Reply::Drop;
        }
        let req = match Message::from_vec(bytes) {
            Ok(m) => m,
            Err(e) => {
                tracing::debug!(error = %e, "malformed DNS message");
                out.extend_from_slice(&wire::header_only(bytes, ResponseCode::FormErr));
                return Reply::Send {
                    rcode: ResponseCode::FormErr,
                    qtype: None,
                };
            }
        };
        let qtype = req.queries.first().map(|q| q.query_type);
        let (rcode, encoded) = match refusal(&req) {
            Some(rcode) => (rcode, self.error(&req, rcode)),
            None => match self.answer(snapshot, req, client, (proto, rotate), fast) {
                Answered::Send(rcode, encoded) => (rcode, encoded),
                Answered::Forward(job) => return Reply::Forward(job),
            },
        };
        *out = encoded;
        Reply::Send { rcode, qtype }
    }

    /// The reply to a request that passed the protocol checks: the zone's
    /// answer, a forward job, or REFUSED for names we may not forward.
    fn answer(
        &self,
        snapshot: &Snapshot,
        req: Message,
        client: IpAddr,
        (proto, rotate): (Proto, usize),
        fast: Option<(&mut FastCache, &fast::FastQuery)>,
    ) -> Answered {
        let limit = wire::limit(proto, req.edns.as_ref().map(Edns::max_payload));
        let query = &req.queries[0];
        let lower = wire::lowercase(query);
        match answer::answer(snapshot, &self.zone, &lower, rotate) {
            Outcome::Answer(za) => {
                let rcode = za.rcode;
                match self.encode_zone(&req, lower.clone(), za, limit) {
                    Some(mut encoded) => {
                        wire::patch_question_case(&mut encoded, &query.name);
                        if self.autopath && rcode == ResponseCode::NXDomain {
                            return self.search_path(snapshot, &req, lower, client, limit, encoded);
                        }
                        Answered::Send(rcode, encoded)
                    }
                    None => Answered::Send(
                        ResponseCode::ServFail,
                        self.error(&req, ResponseCode::ServFail),
                    ),
                }
            }
            Outcome::NotOurs => match &self.forwarder {
                // A forward-cache hit is answered here, like a zone answer:
                // it takes no forward slot and no task.
                Some(fwd) if self.allowed(client) => match self.forward_hit(fwd, &req, limit, fast)
                {
                    Some((encoded, rcode)) => Answered::Send(rcode, encoded),
                    None => Answered::Forward(Box::new(ForwardJob {
                        forwarder: fwd.clone(),
                        request: req,
                        limit,
                        autopath: None,
                    })),
                },
                _ => Answered::Send(
                    ResponseCode::Refused,
                    self.error(&req, ResponseCode::Refused),
                ),
            },
        }
    }

    /// The reply from a fresh forward-cache entry, if there is one; its
    /// template goes to the fast cache when `fast` is given and it may.
    fn forward_hit(
        &self,
        fwd: &Forwarder,
        req: &Message,
        limit: usize,
        fast: Option<(&mut FastCache, &fast::FastQuery)>,
    ) -> Option<(Vec<u8>, ResponseCode)> {
        let Some((cache, q)) = fast else {
            return fwd.cached(req, limit);
        };
        let (encoded, rcode, template) = fwd.cached_fast(req, limit)?;
        if let Some(t) = template {
            self.keep_forwarded(cache, q, t);
        }
        Some((encoded, rcode))
    }

    /// Autopath for a question whose zone answer (`nxdomain`) is NXDOMAIN:
    /// a CNAME to the name the client meant, or `nxdomain` as it was.
    fn search_path(
        &self,
        snapshot: &Snapshot,
        req: &Message,
        lower: Query,
        client: IpAddr,
        limit: usize,
        nxdomain: Vec<u8>,
    ) -> Answered {
        let fail = |nxdomain| Answered::Send(ResponseCode::NXDomain, nxdomain);
        match autopath::search(snapshot, &self.zone, canonical(client), &lower) {
            None => fail(nxdomain),
            Some(autopath::Found::Zone(za)) => match self.encode_zone(req, lower, za, limit) {
                Some(mut encoded) => {
                    wire::patch_question_case(&mut encoded, &req.queries[0].name);
                    Answered::Send(ResponseCode::NoError, encoded)
                }
                None => fail(nxdomain),
            },
            Some(autopath::Found::Forward(target)) => match &self.forwarder {
                Some(fwd) if self.allowed(client) => Answered::Forward(Box::new(ForwardJob {
                    forwarder: fwd.clone(),
                    request: req.clone(),
                    limit,
                    autopath: Some(autopath::Pending {
                        target,
                        nxdomain,
                        ttl: self.zone.ttl,
                    }),
                })),
                _ => fail(nxdomain),
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
        let mut msg = wire::response(req, za.rcode, self.recursion_available);
        msg.metadata.authoritative = true;
        msg.queries.push(question);
        msg.answers = za.answers;
        msg.authorities = za.authorities;
        msg.additionals = za.additionals;
        wire::encode_within(&msg, limit)
    }

    /// An error reply that echoes the question(s).
    fn error(&self, req: &Message, rcode: ResponseCode) -> Vec<u8> {
        let mut msg = wire::response(req, rcode, self.recursion_available);
        msg.queries = req.queries.clone();
        wire::encode_within(&msg, wire::TCP_LIMIT)
            .unwrap_or_else(|| wire::header_for_id(req.metadata.id, rcode))
    }
}

/// Writes a fast-path reply from a cached (or just built) encoding.
fn fast_reply(
    entry: &fast::Entry,
    bytes: &[u8],
    q: &fast::FastQuery,
    rotate: usize,
    out: &mut Vec<u8>,
) -> Reply {
    entry.render(bytes, q, rotate, out);
    Reply::Send {
        rcode: entry.rcode,
        qtype: Some(q.qtype()),
    }
}

/// The error a request gets before any name is looked at, in the order the
/// checks apply: opcode, question count, EDNS version, zone transfer.
fn refusal(req: &Message) -> Option<ResponseCode> {
    if req.metadata.op_code != OpCode::Query {
        return Some(ResponseCode::NotImp);
    }
    if req.queries.len() != 1 {
        return Some(ResponseCode::FormErr);
    }
    if req.edns.as_ref().is_some_and(|e| e.version() > 0) {
        return Some(ResponseCode::BADVERS);
    }
    if matches!(
        req.queries[0].query_type,
        RecordType::AXFR | RecordType::IXFR
    ) {
        return Some(ResponseCode::Refused);
    }
    None
}

/// IPv4-mapped IPv6 clients count as their IPv4 address.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

#[cfg(test)]
mod tests;
