//! The fast path: replies to plain zone queries from encodings cached per
//! snapshot version.
//!
//! A query qualifies when it is a standard query with one IN question, an
//! uncompressed name, no records but an optional empty EDNS(0) OPT, and a
//! common type (see `FAST_TYPES`). Its cache key is the lower-cased name,
//! the type, whether the query has EDNS, and the reply size limit. The
//! cached encoding is the slow path's reply to the same query with ID 0,
//! RD/CD clear, the lower-case question and no rotation; per query we copy
//! it, patch ID, RD, CD and the question's case bytes, and rotate the
//! fixed-size A/AAAA records in place. A test (`handler::tests`) checks
//! that the result is byte-identical to the slow path for the same
//! rotation.
//!
//! Forward-cache hits for such queries get the same treatment (issue 14):
//! a slow hit on an entry that would be prefetched leaves the forwarder's
//! encoding of it (ID 0, RD/CD clear, lower-case question, TTLs as stored)
//! with the offset of every record's TTL; later hits copy and patch it as
//! above and subtract the entry's age from every TTL, for clients allowed
//! to forward only, and only until the entry's prefetch point (then the
//! forward cache answers again, so prefetch sees the question). A test
//! (`forward::tests::fast`) checks byte identity with the forwarder's
//! `render` at several ages.

use std::collections::HashMap;
use std::time::Instant;

use hickory_proto::op::ResponseCode;
use hickory_proto::rr::RecordType;

use super::wire::{self, Proto};

/// Longest key: a 255-byte name, type, EDNS flag, limit.
const KEY_MAX: usize = 255 + 5;
const TYPE_A: u16 = 1;
const TYPE_AAAA: u16 = 28;
const TYPE_OPT: u16 = 41;
/// Types the fast path takes: A, NS, CNAME, SOA, PTR, MX, TXT, AAAA, SRV
/// and ANY (whose zone answer is as deterministic as the others). Zone
/// transfers (refused) and every other type take the slow path.
const FAST_TYPES: [u16; 10] = [1, 2, 5, 6, 12, 15, 16, 28, 33, 255];

/// A query the fast path can answer, with its cache key.
#[derive(Debug)]
pub struct FastQuery {
    key: [u8; KEY_MAX],
    key_len: usize,
    /// Offset just past the question name (its terminating zero).
    name_end: usize,
    qtype: u16,
    limit: usize,
}

impl FastQuery {
    pub fn key(&self) -> &[u8] {
        &self.key[..self.key_len]
    }

    pub fn qtype(&self) -> RecordType {
        RecordType::from(self.qtype)
    }

    pub fn limit(&self) -> usize {
        self.limit
    }
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_be_bytes([b[at], b[at + 1]])
}

/// Reads a query if the fast path may answer it; `None` sends it the slow way.
pub fn parse(bytes: &[u8], proto: Proto) -> Option<FastQuery> {
    if bytes.len() < 17 || bytes[2] & 0xFE != 0 || bytes[3] & 0x0F != 0 {
        return None;
    }
    let arcount = u16_at(bytes, 10);
    if u16_at(bytes, 4) != 1 || u16_at(bytes, 6) != 0 || u16_at(bytes, 8) != 0 || arcount > 1 {
        return None;
    }
    let mut q = FastQuery {
        key: [0; KEY_MAX],
        key_len: 0,
        name_end: 0,
        qtype: 0,
        limit: 0,
    };
    let mut at = read_name(bytes, &mut q)?;
    q.name_end = at;
    let tail = bytes.get(at..at + 4)?;
    q.qtype = u16_at(tail, 0);
    if u16_at(tail, 2) != 1 || !FAST_TYPES.contains(&q.qtype) {
        return None;
    }
    at += 4;
    let edns = if arcount == 1 {
        // An empty OPT: root name, type, payload, ext-rcode 0, version 0,
        // flags, rdlength 0.
        let opt = bytes.get(at..at + 11)?;
        if opt[0] != 0 || u16_at(opt, 1) != TYPE_OPT || opt[5] != 0 || opt[6] != 0 {
            return None;
        }
        if u16_at(opt, 9) != 0 {
            return None;
        }
        at += 11;
        Some(u16_at(opt, 3))
    } else {
        None
    };
    if at != bytes.len() {
        return None;
    }
    q.limit = wire::limit(proto, edns);
    let tail = [
        (q.qtype >> 8) as u8,
        q.qtype as u8,
        u8::from(edns.is_some()),
        (q.limit >> 8) as u8,
        q.limit as u8,
    ];
    q.key[q.key_len..q.key_len + 5].copy_from_slice(&tail);
    q.key_len += 5;
    Some(q)
}

/// Copies the question name at offset 12, lower-cased, into the key;
/// returns the offset just past it. `None` for a compressed, extended or
/// over-long name.
fn read_name(bytes: &[u8], q: &mut FastQuery) -> Option<usize> {
    let mut at = 12;
    loop {
        let len = usize::from(*bytes.get(at)?);
        if len > 63 {
            return None; // compression pointer or extended label type
        }
        if q.key_len + 1 + len > 255 {
            return None;
        }
        let label = bytes.get(at..at + 1 + len)?;
        for (dst, src) in q.key[q.key_len..q.key_len + 1 + len].iter_mut().zip(label) {
            *dst = src.to_ascii_lowercase();
        }
        q.key_len += 1 + len;
        at += 1 + len;
        if len == 0 {
            return Some(at);
        }
    }
}

/// Where the rotatable A/AAAA records sit in a cached encoding.
#[derive(Clone, Copy, Debug)]
struct Rotation {
    start: usize,
    count: usize,
    rr_len: usize,
}

/// What a forwarded answer's encoding carries besides the bytes.
#[derive(Clone, Debug)]
struct Forwarded {
    /// Offset of every record's TTL (the OPT record's excluded).
    ttls: Box<[u16]>,
    /// When the forward cache stored the answer: TTLs are aged from here.
    stored: Instant,
    /// Served until then (the forward cache entry's prefetch point).
    until: Instant,
}

/// One cached encoding: a zone answer, or a forwarded one.
#[derive(Clone, Debug)]
pub struct Entry {
    bytes: Box<[u8]>,
    rotation: Option<Rotation>,
    pub rcode: ResponseCode,
    forwarded: Option<Forwarded>,
}

impl Entry {
    /// Wraps the slow path's template reply for `q`. `None` when it cannot be
    /// patched exactly (then the query takes the slow path every time).
    /// NXDOMAIN, or no records in the answer section (NODATA).
    pub fn is_negative(&self) -> bool {
        self.rcode != ResponseCode::NoError || u16_at(&self.bytes, 6) == 0
    }

    pub fn new(encoded: Vec<u8>, q: &FastQuery, rcode: ResponseCode) -> Option<Self> {
        let name = &q.key[..q.key_len - 5];
        if encoded.get(12..q.name_end)? != name {
            return None;
        }
        let answers = usize::from(u16_at(&encoded, 6));
        let mut rotation = None;
        if answers > 1 && (q.qtype == TYPE_A || q.qtype == TYPE_AAAA) {
            let rdlen = if q.qtype == TYPE_A { 4 } else { 16 };
            let r = Rotation {
                start: q.name_end + 4,
                count: answers,
                rr_len: 12 + rdlen,
            };
            for i in 0..answers {
                let rr = encoded.get(r.start + i * r.rr_len..r.start + (i + 1) * r.rr_len)?;
                let owner_is_question = rr[0] == 0xC0 && rr[1] == 12;
                if !owner_is_question
                    || u16_at(rr, 2) != q.qtype
                    || usize::from(u16_at(rr, 10)) != rdlen
                {
                    return None;
                }
            }
            rotation = Some(r);
        }
        Some(Self {
            bytes: encoded.into_boxed_slice(),
            rotation,
            rcode,
            forwarded: None,
        })
    }

    /// Wraps a forwarded answer's template for `q` (the forward cache's
    /// reply to it with ID 0, RD/CD clear, the lower-case question and TTLs
    /// as stored at `stored`), served until `until`. `None` when it cannot
    /// be patched exactly.
    pub fn forwarded(
        encoded: Vec<u8>,
        q: &FastQuery,
        rcode: ResponseCode,
        stored: Instant,
        until: Instant,
    ) -> Option<Self> {
        let name = &q.key[..q.key_len - 5];
        if encoded.get(12..q.name_end)? != name {
            return None;
        }
        let ttls = ttl_offsets(&encoded, q.name_end + 4)?;
        Some(Self {
            bytes: encoded.into_boxed_slice(),
            rotation: None,
            rcode,
            forwarded: Some(Forwarded {
                ttls,
                stored,
                until,
            }),
        })
    }

    /// Whether it is a forwarded answer.
    pub fn is_forwarded(&self) -> bool {
        self.forwarded.is_some()
    }

    /// A forwarded answer's age at `now` in whole seconds (as the forward
    /// cache counts it), while it may still be served; `None` past its
    /// prefetch point, or for a zone answer.
    pub fn age(&self, now: Instant) -> Option<u32> {
        let f = self.forwarded.as_ref()?;
        (now < f.until).then(|| now.duration_since(f.stored).as_secs() as u32)
    }

    /// Writes the reply to `query` from a forwarded answer `age` seconds
    /// old into `out`: as [`render`](Self::render), with every TTL less
    /// `age` (never below zero).
    pub fn render_aged(&self, query: &[u8], q: &FastQuery, age: u32, out: &mut Vec<u8>) {
        self.render(query, q, 0, out);
        let Some(f) = &self.forwarded else {
            return;
        };
        for &at in f.ttls.iter() {
            let at = usize::from(at);
            let ttl = u32::from_be_bytes([out[at], out[at + 1], out[at + 2], out[at + 3]]);
            out[at..at + 4].copy_from_slice(&ttl.saturating_sub(age).to_be_bytes());
        }
    }

    /// Writes the reply to `query` into `out`.
    pub fn render(&self, query: &[u8], q: &FastQuery, rotate: usize, out: &mut Vec<u8>) {
        out.clear();
        out.extend_from_slice(&self.bytes);
        out[..2].copy_from_slice(&query[..2]);
        out[2] |= query[2] & 0x01; // RD
        out[3] |= query[3] & 0x10; // CD
        out[12..q.name_end].copy_from_slice(&query[12..q.name_end]);
        if let Some(r) = self.rotation {
            let k = rotate % r.count;
            if k != 0 {
                out[r.start..r.start + r.count * r.rr_len].rotate_left(k * r.rr_len);
            }
        }
    }
}

/// The TTL offsets of every record of an encoded message whose records
/// start at `at`, OPT excluded; `None` when it does not read as a message.
fn ttl_offsets(b: &[u8], mut at: usize) -> Option<Box<[u16]>> {
    let records = (6..12)
        .step_by(2)
        .map(|i| usize::from(u16_at(b, i)))
        .sum::<usize>();
    let mut ttls = Vec::with_capacity(records);
    for _ in 0..records {
        at = skip_name(b, at)?;
        let fixed = b.get(at..at + 10)?;
        if u16_at(fixed, 0) != TYPE_OPT {
            ttls.push(u16::try_from(at + 4).ok()?);
        }
        at += 10 + usize::from(u16_at(fixed, 8));
    }
    (at == b.len()).then(|| ttls.into_boxed_slice())
}

/// The offset just past the (possibly compressed) name at `at`.
fn skip_name(b: &[u8], mut at: usize) -> Option<usize> {
    loop {
        let len = *b.get(at)?;
        match len {
            0 => return Some(at + 1),
            1..=63 => at += 1 + usize::from(len),
            0xC0..=0xFF => return b.get(at + 1).map(|_| at + 2),
            _ => return None,
        }
    }
}

/// Per-entry bookkeeping counted against a cache's byte budget (the map's
/// slot and the boxes' headers).
const ENTRY_OVERHEAD: usize = 64;

/// What an entry counts against a cache's byte budget.
fn cost(key: &[u8], e: &Entry) -> usize {
    let ttls = e.forwarded.as_ref().map_or(0, |f| 2 * f.ttls.len());
    key.len() + e.bytes.len() + ENTRY_OVERHEAD + ttls
}

/// Cached encodings of one UDP thread, or of all TCP connections together,
/// valid for one snapshot version. Bounded two ways (issue 11, defect 7: a
/// flood of distinct names grew a per-thread map by 85 MB): answers with
/// records count their bytes against `budget` and start over past it;
/// negative answers (NXDOMAIN, NODATA), which any client can mint without
/// end, live in a small LRU of their own so a flood of them never pushes
/// out the answers that matter.
#[derive(Debug)]
pub struct FastCache {
    version: u64,
    positive: HashMap<Box<[u8]>, Entry>,
    bytes: usize,
    budget: usize,
    negative: lru::LruCache<Box<[u8]>, Entry>,
}

impl FastCache {
    /// A cache of at most `budget` bytes of answers and `negatives` negative
    /// answers.
    pub fn new(budget: usize, negatives: usize) -> Self {
        Self {
            version: u64::MAX,
            positive: HashMap::new(),
            bytes: 0,
            budget,
            negative: lru::LruCache::new(std::num::NonZeroUsize::new(negatives.max(1)).unwrap()),
        }
    }

    /// Drops every entry when the snapshot changed.
    pub fn sync(&mut self, version: u64) {
        if version != self.version {
            self.positive.clear();
            self.negative.clear();
            self.bytes = 0;
            self.version = version;
        }
    }

    pub fn get(&mut self, key: &[u8]) -> Option<&Entry> {
        match self.positive.get(key) {
            Some(e) => Some(e),
            None => self.negative.get(key),
        }
    }

    /// Adds `entry`, replacing any entry of `key` (a forwarded answer is
    /// replaced when the forward cache refreshed it).
    pub fn insert(&mut self, key: &[u8], entry: Entry) {
        if let Some(old) = self.positive.remove(key) {
            self.bytes -= cost(key, &old);
        }
        self.negative.pop(key);
        if entry.is_negative() {
            self.negative.put(key.into(), entry);
            return;
        }
        let cost = cost(key, &entry);
        if self.bytes + cost > self.budget {
            // More distinct answers than the budget holds: start over
            // rather than grow.
            self.positive.clear();
            self.positive.shrink_to(0);
            self.bytes = 0;
        }
        self.bytes += cost;
        self.positive.insert(key.into(), entry);
    }

    pub fn len(&self) -> usize {
        self.positive.len() + self.negative.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Bytes of answers held (negative ones not counted).
    pub fn bytes(&self) -> usize {
        self.bytes
    }
}
