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
//!
//! Upstreams that fail are marked down and checked in the background
//! ([`health`]); popular entries are refreshed shortly before they expire
//! (prefetch, see [`Tuning::prefetch`]).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock, Weak};
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
/// Prefetches running at once, at most (more are skipped: the entry then
/// expires and is asked for again as a miss).
const MAX_PREFETCHES: usize = 256;

/// What the forwarder does beyond asking: health and prefetch settings
/// (`[dns] max_fails`, `health_check`, `prefetch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Tuning {
    /// Failures in a row that mark an upstream down; 0: never.
    pub max_fails: u32,
    /// How often a down upstream is checked.
    pub health_check: Duration,
    /// An entry asked for at least this many times during its life (the
    /// miss that filled it counts) is refreshed in the background when
    /// asked within the last 10 % of its TTL; 0: never.
    pub prefetch: u32,
}

impl Default for Tuning {
    fn default() -> Self {
        Self {
            max_fails: 2,
            health_check: Duration::from_millis(500),
            prefetch: 2,
        }
    }
}

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
    /// Client questions this entry answered (the miss that filled it
    /// included).
    asked: u32,
    /// A prefetch of it was started.
    refreshing: bool,
}

impl CacheEntry {
    fn expires(&self) -> Instant {
        self.stored + Duration::from_secs(u64::from(self.ttl))
    }

    /// Whether it is within the last 10 % of its TTL at `now`.
    fn nearly_expired(&self, now: Instant) -> bool {
        let left = self.expires().saturating_duration_since(now);
        left <= Duration::from_secs(u64::from(self.ttl)) / 10
    }
}

/// Upstreams plus the shared cache of their answers.
#[derive(Debug)]
pub struct Forwarder {
    /// The upstreams and their health.
    health: Arc<health::Health>,
    /// Their UDP sockets, in the same order.
    pools: Vec<pool::Pool>,
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
    prefetch: u32,
    prefetches: AtomicUsize,
    /// Itself, for the prefetch tasks it spawns.
    me: Weak<Forwarder>,
    /// The runtime prefetches run on: the one the first forwarded query
    /// ran on (cache hits are answered on the UDP threads, outside it).
    runtime: OnceLock<tokio::runtime::Handle>,
}

/// A cache entry encoded for the fast path: the reply to the query with
/// ID 0, RD and CD clear, the lower-case question and TTLs as stored; it
/// may be served (aged by the whole seconds since `stored`) until `until`,
/// the entry's prefetch point.
#[derive(Debug)]
pub struct FastTemplate {
    pub bytes: Vec<u8>,
    pub rcode: ResponseCode,
    pub stored: Instant,
    pub until: Instant,
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
    pub fn new(
        upstreams: Vec<SocketAddr>,
        zone: Name,
        timeout: Duration,
        capacity: usize,
        tuning: Tuning,
    ) -> Arc<Self> {
        Arc::new_cyclic(|me| Self {
            health: health::Health::new(&upstreams, tuning.max_fails, tuning.health_check),
            pools: upstreams
                .iter()
                .map(|&a| pool::Pool::new(a, timeout))
                .collect(),
            zone: zone.to_lowercase(),
            timeout,
            capacity: capacity.max(1),
            cache: Mutex::new(HashMap::new()),
            inflight: Mutex::new(HashMap::new()),
            hits: metrics::counter!(crate::telemetry::DNS_FORWARD_CACHE, "result" => "hit"),
            misses: metrics::counter!(crate::telemetry::DNS_FORWARD_CACHE, "result" => "miss"),
            prefetch: tuning.prefetch,
            prefetches: AtomicUsize::new(0),
            me: me.clone(),
            runtime: OnceLock::new(),
        })
    }

    /// Whether upstream `i` (in configured order) is up.
    pub fn upstream_up(&self, i: usize) -> bool {
        self.health.is_up(i)
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

    /// The reply to `req` from a fresh cache entry, if there is one; an
    /// entry popular enough and close to expiry is refreshed meanwhile.
    pub fn cached(&self, req: &Message, limit: usize) -> Option<(Vec<u8>, ResponseCode)> {
        let (entry, now) = self.hit(req.queries.first()?)?;
        let age = now.duration_since(entry.stored).as_secs() as u32;
        Some(self.render(req, entry.rcode, Some(&entry), age, limit))
    }

    /// [`cached`](Self::cached), plus the fast path's template of the
    /// entry when it may be served from one ([`FastTemplate`]): the entry
    /// was asked for often enough to be prefetched and is not yet at its
    /// prefetch point, so queries served from the template never need to
    /// count towards prefetch.
    pub fn cached_fast(
        &self,
        req: &Message,
        limit: usize,
    ) -> Option<(Vec<u8>, ResponseCode, Option<FastTemplate>)> {
        let (entry, now) = self.hit(req.queries.first()?)?;
        let age = now.duration_since(entry.stored).as_secs() as u32;
        let (reply, rcode) = self.render(req, entry.rcode, Some(&entry), age, limit);
        let ttl = Duration::from_secs(u64::from(entry.ttl));
        // nearly_expired(t) holds from `until` on.
        let until = entry.expires().checked_sub(ttl / 10);
        let template = until
            .filter(|&until| now < until && entry.asked >= self.prefetch && rcode == entry.rcode)
            .map(|until| {
                let mut t = req.clone();
                t.metadata.id = 0;
                t.metadata.recursion_desired = false;
                t.metadata.checking_disabled = false;
                t.queries = req.queries.iter().map(wire::lowercase).collect();
                FastTemplate {
                    bytes: self.render(&t, entry.rcode, Some(&entry), 0, limit).0,
                    rcode,
                    stored: entry.stored,
                    until,
                }
            });
        Some((reply, rcode, template))
    }

    /// Counts a cache hit answered by the fast path.
    pub fn count_fast_hit(&self) {
        self.hits.increment(1);
    }

    /// A fresh entry for `question` (counted as asked, a prefetch started
    /// when due) and the time it was looked up at; counts the hit or miss.
    fn hit(&self, question: &Query) -> Option<(CacheEntry, Instant)> {
        let key = key_of(question);
        let now = Instant::now();
        let mut refresh = false;
        let entry = {
            let mut cache = self.cache();
            cache.get_mut(&key).filter(|e| e.expires() > now).map(|e| {
                e.asked = e.asked.saturating_add(1);
                refresh = self.prefetch > 0
                    && !e.refreshing
                    && e.asked >= self.prefetch
                    && e.nearly_expired(now);
                e.refreshing |= refresh;
                e.clone()
            })
        };
        let Some(entry) = entry else {
            self.misses.increment(1);
            return None;
        };
        self.hits.increment(1);
        if refresh {
            self.start_prefetch(key);
        }
        Some((entry, now))
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
        let _ = self.runtime.get_or_init(tokio::runtime::Handle::current);
        let lower = wire::lowercase(question);
        let key = key_of(&lower);
        match self.resolve(&lower, &key, 1).await {
            Ok(entry) => self.render(req, entry.rcode, Some(&entry), 0, limit),
            Err(why) => self.stale_or_fail(req, &key, limit, &why),
        }
    }

    /// Asks the upstreams once per identical in-flight question: the first
    /// asker leads, later ones wait for its result (issue 11, defect 12:
    /// 4,600 client queries had gone upstream as 3,777).
    /// The entry it stores starts with `asked` client questions.
    async fn resolve(&self, lower: &Query, key: &Key, asked: u32) -> Resolved {
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
                let mut entry = entry_from(reply, Instant::now());
                entry.asked = asked;
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

    /// Refreshes `key` in the background, single-flight with the client
    /// questions in flight (an identical one in flight is waited for).
    fn start_prefetch(&self, key: Key) {
        let (Some(me), Some(runtime)) = (self.me.upgrade(), self.runtime.get()) else {
            return;
        };
        if self.prefetches.fetch_add(1, Ordering::AcqRel) >= MAX_PREFETCHES {
            self.prefetches.fetch_sub(1, Ordering::AcqRel);
            return;
        }
        runtime.spawn(async move {
            let mut query = Query::query(key.0.clone(), key.1);
            query.query_class = key.2;
            if let Err(why) = me.resolve(&query, &key, 0).await {
                tracing::debug!(name = %key.0, why, "prefetch failed");
            }
            me.prefetches.fetch_sub(1, Ordering::AcqRel);
        });
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
    /// entry's rcode and records with TTLs aged by `age` seconds. Encoded
    /// with the lower-cased question, whose bytes are then overwritten with
    /// the question as asked (as zone answers are, see
    /// [`handler`](super::handler)): the encoding depends on the question's
    /// case only through those bytes, which lets the fast path keep one
    /// template per lower-cased name.
    fn render(
        &self,
        req: &Message,
        rcode: ResponseCode,
        entry: Option<&CacheEntry>,
        age: u32,
        limit: usize,
    ) -> (Vec<u8>, ResponseCode) {
        let mut msg = wire::response(req, rcode, true);
        msg.queries = req.queries.iter().map(wire::lowercase).collect();
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
            Some(mut bytes) => {
                if let Some(q) = req.queries.first() {
                    wire::patch_question_case(&mut bytes, &q.name);
                }
                (bytes, rcode)
            }
            None => (
                wire::header_for_id(req.metadata.id, ResponseCode::ServFail),
                ResponseCode::ServFail,
            ),
        }
    }

    /// Asks each healthy upstream in turn (every one when none is); the
    /// first NOERROR/NXDOMAIN reply wins.
    async fn ask_upstreams(&self, query: &Query) -> Result<Message, ForwardError> {
        let order = self.health.order();
        let n = order.len().max(1) as u32;
        let per_try = (self.timeout / n).max(Duration::from_millis(200));
        let mut last = ForwardError::NoUpstream;
        for i in order {
            let upstream = self.health.addr(i);
            let started = Instant::now();
            let asked = tokio::time::timeout(per_try, ask(&self.pools[i], upstream, query)).await;
            count_upstream(upstream, &asked, started);
            match &asked {
                Ok(Ok(_)) => self.health.replied(i),
                _ => self.health.failed(i),
            }
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
        asked: 0,
        refreshing: false,
    }
}

/// One exchange with one upstream: UDP (on its pooled sockets), then TCP
/// if the reply is truncated.
async fn ask(
    pool: &pool::Pool,
    upstream: SocketAddr,
    query: &Query,
) -> Result<Message, ForwardError> {
    let err = |e| match e {
        WireError::Io(e) => ForwardError::Io(upstream, e),
        WireError::Encode(_) | WireError::Malformed => ForwardError::Malformed(upstream),
    };
    let msg = wire::query(query.clone(), true);
    let reply = pool.exchange(&msg).await.map_err(err)?;
    if !reply.metadata.truncation {
        return Ok(reply);
    }
    wire::tcp_exchange(upstream, &msg).await.map_err(err)
}

mod filter;
pub mod health;
mod pool;

#[cfg(test)]
mod tests;
