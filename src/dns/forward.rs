//! Forwarding for names outside the zone, with a cache and serve-stale.
//!
//! Hand-written on hickory-proto instead of hickory-resolver: the resolver
//! returns parsed lookups (NXDOMAIN as an error, no authority section) and
//! keeps its own cache, which makes answering with the upstream's exact
//! rcode and sections, serving stale entries (RFC 8767) and bounding the
//! cache by `cache_size` awkward. This forwarder asks each upstream in turn
//! over UDP (TCP when the reply is truncated), caches NOERROR and NXDOMAIN
//! replies for their TTL, and when every upstream fails within
//! `forward_timeout` answers from an expired entry (TTL 30 s, for up to a
//! day after expiry) or SERVFAIL.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};
use tokio::sync::watch;

use super::wire::{self, WireError};

/// TTL of an answer served stale (RFC 8767 section 4).
const STALE_TTL: u32 = 30;
/// How long past expiry an entry may still be served stale.
const STALE_MAX: Duration = Duration::from_secs(24 * 3600);
/// Negative answers without an SOA are cached this long.
const DEFAULT_NEGATIVE_TTL: u32 = 30;
/// Upper bound of any cached TTL.
const MAX_TTL: u32 = 86400;
/// Upper bound of a negative answer's TTL (unbound's
/// `cache-max-negative-ttl`).
const MAX_NEGATIVE_TTL: u32 = 3600;

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("upstream {0} timed out")]
    Timeout(SocketAddr),
    #[error("upstream {0}: {1}")]
    Io(SocketAddr, std::io::Error),
    #[error("upstream {0} sent an unreadable reply")]
    Malformed(SocketAddr),
    #[error("upstream {0} answered {1}")]
    Rcode(SocketAddr, ResponseCode),
    #[error("no upstream answered")]
    NoUpstream,
}

type Key = (Name, RecordType, DNSClass);

#[derive(Clone, Debug)]
struct CacheEntry {
    rcode: ResponseCode,
    answers: Vec<Record>,
    authorities: Vec<Record>,
    additionals: Vec<Record>,
    stored: Instant,
    ttl: u32,
}

impl CacheEntry {
    fn expires(&self) -> Instant {
        self.stored + Duration::from_secs(u64::from(self.ttl))
    }
}

/// Upstreams plus the shared cache of their answers.
#[derive(Debug)]
pub struct Forwarder {
    upstreams: Vec<SocketAddr>,
    /// beacon's own zone: nothing at or below it is taken from upstreams.
    zone: Name,
    timeout: Duration,
    capacity: usize,
    cache: Mutex<HashMap<Key, CacheEntry>>,
    /// Questions being asked upstream now: later identical questions wait
    /// for the first one's result instead of asking again.
    inflight: Mutex<HashMap<Key, watch::Receiver<Option<Resolved>>>>,
    /// `beacon_dns_forward_cache_total{result="hit"|"miss"}`.
    hits: metrics::Counter,
    misses: metrics::Counter,
}

/// What one upstream round gave: the cached entry, or why it failed.
type Resolved = Result<Arc<CacheEntry>, String>;

/// Removes the leader's in-flight entry when it ends, however it ends (a
/// cancelled leader must not leave followers of later questions waiting).
struct Leading<'a> {
    forwarder: &'a Forwarder,
    key: &'a Key,
    rx: watch::Receiver<Option<Resolved>>,
}

impl Drop for Leading<'_> {
    fn drop(&mut self) {
        let mut inflight = self.forwarder.inflight();
        if inflight
            .get(self.key)
            .is_some_and(|rx| rx.same_channel(&self.rx))
        {
            inflight.remove(self.key);
        }
    }
}

impl Forwarder {
    pub fn new(upstreams: Vec<SocketAddr>, zone: Name, timeout: Duration, capacity: usize) -> Self {
        Self {
            upstreams,
            zone: zone.to_lowercase(),
            timeout,
            capacity: capacity.max(1),
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            hits: metrics::counter!(crate::telemetry::DNS_FORWARD_CACHE, "result" => "hit"),
            misses: metrics::counter!(crate::telemetry::DNS_FORWARD_CACHE, "result" => "miss"),
        }
    }

    fn inflight(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Key, watch::Receiver<Option<Resolved>>>> {
        self.inflight.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, HashMap<Key, CacheEntry>> {
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn cached_len(&self) -> usize {
        self.cache().len()
    }

    /// The reply to `req` from a fresh cache entry, if there is one.
    pub fn cached(&self, req: &Message, limit: usize) -> Option<(Vec<u8>, ResponseCode)> {
        let key = key_of(req.queries.first()?);
        let now = Instant::now();
        let entry = self
            .cache()
            .get(&key)
            .filter(|e| e.expires() > now)
            .cloned();
        let Some(entry) = entry else {
            self.misses.increment(1);
            return None;
        };
        self.hits.increment(1);
        let age = now.duration_since(entry.stored).as_secs() as u32;
        Some(self.render(req, entry.rcode, Some(&entry), age, limit))
    }

    /// The reply to `req` (one question, outside the zone).
    pub async fn reply(&self, req: &Message, limit: usize) -> (Vec<u8>, ResponseCode) {
        let Some(question) = req.queries.first() else {
            return self.render(req, ResponseCode::FormErr, None, 0, limit);
        };
        // Asked again here: the handler's look was before the slot, and an
        // identical question may have filled the entry since.
        if let Some(reply) = self.cached(req, limit) {
            return reply;
        }
        let lower = wire::lowercase(question);
        let key = key_of(&lower);
        match self.resolve(&lower, &key).await {
            Ok(entry) => self.render(req, entry.rcode, Some(&entry), 0, limit),
            Err(why) => self.stale_or_fail(req, &key, limit, &why),
        }
    }

    /// Asks the upstreams once per identical in-flight question: the first
    /// asker leads, later ones wait for its result (issue 11, defect 12:
    /// 4,600 client queries had gone upstream as 3,777).
    async fn resolve(&self, lower: &Query, key: &Key) -> Resolved {
        let lead = {
            let mut inflight = self.inflight();
            match inflight.get(key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    inflight.insert(key.clone(), rx.clone());
                    Ok((tx, rx))
                }
            }
        };
        let (tx, rx) = match lead {
            Ok(lead) => lead,
            Err(mut rx) => {
                let waited = tokio::time::timeout(self.timeout, rx.wait_for(Option::is_some)).await;
                return match waited {
                    Ok(Ok(done)) => done.clone().unwrap_or_else(|| Err("no result".into())),
                    _ => Err("the identical question in flight was lost".into()),
                };
            }
        };
        let leading = Leading {
            forwarder: self,
            key,
            rx,
        };
        let result = match tokio::time::timeout(self.timeout, self.ask_upstreams(lower)).await {
            Ok(Ok(mut reply)) => {
                filter::sanitize(&mut reply, lower, &self.zone);
                let entry = entry_from(reply, Instant::now());
                self.store(key.clone(), entry.clone());
                Ok(Arc::new(entry))
            }
            Ok(Err(e)) => Err(e.to_string()),
            Err(_) => Err("timed out".into()),
        };
        drop(leading);
        let _ = tx.send(Some(result.clone()));
        result
    }

    fn stale_or_fail(
        &self,
        req: &Message,
        key: &Key,
        limit: usize,
        why: &str,
    ) -> (Vec<u8>, ResponseCode) {
        let now = Instant::now();
        let stale = self
            .cache()
            .get(key)
            .filter(|e| e.expires() + STALE_MAX > now)
            .cloned();
        match stale {
            Some(mut entry) => {
                tracing::debug!(name = %key.0, why, "upstreams failed; serving stale");
                for r in entry
                    .answers
                    .iter_mut()
                    .chain(&mut entry.authorities)
                    .chain(&mut entry.additionals)
                {
                    r.ttl = STALE_TTL;
                }
                self.render(req, entry.rcode, Some(&entry), 0, limit)
            }
            None => {
                tracing::debug!(name = %key.0, why, "upstreams failed");
                self.render(req, ResponseCode::ServFail, None, 0, limit)
            }
        }
    }

    fn store(&self, key: Key, entry: CacheEntry) {
        if !matches!(entry.rcode, ResponseCode::NoError | ResponseCode::NXDomain) {
            return;
        }
        let mut cache = self.cache();
        if cache.len() >= self.capacity && !cache.contains_key(&key) {
            let now = Instant::now();
            cache.retain(|_, e| e.expires() + STALE_MAX > now);
            if cache.len() >= self.capacity {
                // Evict the entry closest to expiry.
                if let Some(k) = cache
                    .iter()
                    .min_by_key(|(_, e)| e.expires())
                    .map(|(k, _)| k.clone())
                {
                    cache.remove(&k);
                }
            }
        }
        cache.insert(key, entry);
    }

    /// Encodes the reply to the client: its ID, question and flags; the
    /// entry's rcode and records with TTLs aged by `age` seconds.
    fn render(
        &self,
        req: &Message,
        rcode: ResponseCode,
        entry: Option<&CacheEntry>,
        age: u32,
        limit: usize,
    ) -> (Vec<u8>, ResponseCode) {
        let mut msg = wire::response(req, rcode, true);
        msg.queries = req.queries.clone();
        if let Some(e) = entry {
            let aged = |rs: &[Record]| -> Vec<Record> {
                rs.iter()
                    .map(|r| {
                        let mut r = r.clone();
                        r.ttl = r.ttl.saturating_sub(age);
                        r
                    })
                    .collect()
            };
            msg.answers = aged(&e.answers);
            msg.authorities = aged(&e.authorities);
            msg.additionals = aged(&e.additionals);
        }
        match wire::encode_within(&msg, limit) {
            Some(bytes) => (bytes, rcode),
            None => (
                wire::header_for_id(req.metadata.id, ResponseCode::ServFail),
                ResponseCode::ServFail,
            ),
        }
    }

    /// Asks each upstream in turn; the first NOERROR/NXDOMAIN reply wins.
    async fn ask_upstreams(&self, query: &Query) -> Result<Message, ForwardError> {
        let n = self.upstreams.len().max(1) as u32;
        let per_try = (self.timeout / n).max(Duration::from_millis(200));
        let mut last = ForwardError::NoUpstream;
        for &upstream in &self.upstreams {
            let started = Instant::now();
            let asked = tokio::time::timeout(per_try, ask(upstream, query)).await;
            count_upstream(upstream, &asked, started);
            match asked {
                Ok(Ok(reply))
                    if matches!(
                        reply.metadata.response_code,
                        ResponseCode::NoError | ResponseCode::NXDomain
                    ) =>
                {
                    return Ok(reply);
                }
                Ok(Ok(reply)) => last = ForwardError::Rcode(upstream, reply.metadata.response_code),
                Ok(Err(e)) => last = e,
                Err(_) => last = ForwardError::Timeout(upstream),
            }
            tracing::debug!(%upstream, error = %last, "upstream failed");
        }
        Err(last)
    }
}

/// `beacon_dns_upstream_requests_total{upstream,result}` and the
/// upstream's reply time.
fn count_upstream(
    upstream: SocketAddr,
    asked: &Result<Result<Message, ForwardError>, tokio::time::error::Elapsed>,
    started: Instant,
) {
    let result = match asked {
        Ok(Ok(reply)) => super::tally::rcode_label(reply.metadata.response_code),
        Ok(Err(_)) => "error",
        Err(_) => "timeout",
    };
    let upstream = upstream.to_string();
    if matches!(asked, Ok(Ok(_))) {
        metrics::histogram!(crate::telemetry::DNS_UPSTREAM_DURATION, "upstream" => upstream.clone())
            .record(started.elapsed().as_secs_f64());
    }
    metrics::counter!(crate::telemetry::DNS_UPSTREAM_REQUESTS, "upstream" => upstream, "result" => result)
        .increment(1);
}

fn key_of(q: &Query) -> Key {
    (q.name.to_lowercase(), q.query_type, q.query_class)
}

/// The cache entry of an (already sanitized) upstream reply: TTL is the
/// smallest record TTL; for a negative answer the smaller of the SOA's TTL
/// and its MINIMUM (RFC 2308 section 5), capped at [`MAX_NEGATIVE_TTL`],
/// and the SOA record itself carries that TTL when it is served.
fn entry_from(mut reply: Message, now: Instant) -> CacheEntry {
    let ttl = if reply.answers.is_empty() {
        let negative = reply
            .authorities
            .iter()
            .find_map(|r| match &r.data {
                RData::SOA(soa) => Some(r.ttl.min(soa.minimum)),
                _ => None,
            })
            .unwrap_or(DEFAULT_NEGATIVE_TTL)
            .min(MAX_NEGATIVE_TTL);
        for r in &mut reply.authorities {
            r.ttl = r.ttl.min(negative);
        }
        negative
    } else {
        let records = reply.answers.iter().chain(&reply.authorities);
        records.map(|r| r.ttl).min().unwrap_or(0)
    };
    CacheEntry {
        rcode: reply.metadata.response_code,
        answers: reply.answers,
        authorities: reply.authorities,
        additionals: reply.additionals,
        stored: now,
        ttl: ttl.min(MAX_TTL),
    }
}

/// One exchange with one upstream: UDP, then TCP if the reply is truncated.
async fn ask(upstream: SocketAddr, query: &Query) -> Result<Message, ForwardError> {
    let err = |e| match e {
        WireError::Io(e) => ForwardError::Io(upstream, e),
        WireError::Encode(_) | WireError::Malformed => ForwardError::Malformed(upstream),
    };
    let msg = wire::query(query.clone(), true);
    let reply = wire::udp_exchange(upstream, &msg).await.map_err(err)?;
    if !reply.metadata.truncation {
        return Ok(reply);
    }
    wire::tcp_exchange(upstream, &msg).await.map_err(err)
}

mod filter;

#[cfg(test)]
mod tests;
