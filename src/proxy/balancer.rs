//! Balancing policies: which endpoint a new connection goes to.
//!
//! A [`Balancer`] is built once per endpoint set (every time the snapshot
//! changes a service) and then asked [`Balancer::pick`] per connection. A
//! pick is the chosen endpoint followed by fallbacks in order; the connect
//! loop walks them, so a retry never goes to the same endpoint twice in a
//! row while others exist. Picks are plain synchronous code over a few
//! atomics, with plain `#[test]`s.
//!
//! Live load (active connections) lives in [`EndpointLoad`]: the proxy
//! keeps one per service and endpoint address and hands the same one to
//! every balancer rebuilt over that endpoint, so counts survive snapshot
//! changes.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use crate::model::Balance;

/// At most this many distinct endpoints are yielded per pick.
pub const MAX_PICKS: usize = 8;

/// Size of a maglev lookup table (a prime, as the paper asks).
pub const MAGLEV_TABLE_SIZE: usize = 65537;

/// Slow start: the share of its weight a ramping endpoint starts with.
pub const RAMP_MIN_SHARE: f64 = 0.05;

/// While an endpoint of a set ramps, every weight is scaled by this, so
/// that a small share of weight 1 is still a whole number.
pub const RAMP_SCALE: u32 = 100;

/// The share of its weight an endpoint gets `elapsed` into a slow start
/// of `window`: linear from [`RAMP_MIN_SHARE`] to 1.
pub fn ramp_share(elapsed: Duration, window: Duration) -> f64 {
    if window.is_zero() {
        return 1.0;
    }
    (elapsed.as_secs_f64() / window.as_secs_f64()).clamp(RAMP_MIN_SHARE, 1.0)
}

/// The weights the policies see: each `weights[i]` times `shares[i]`,
/// scaled by [`RAMP_SCALE`] so they stay whole numbers; unchanged when no
/// share is below 1. Every policy takes its weights from here, so slow
/// start works the same in each.
pub fn ramped_weights(weights: &[u32], shares: &[f64]) -> Vec<u32> {
    if shares.iter().all(|&s| s >= 1.0) {
        return weights.to_vec();
    }
    weights
        .iter()
        .zip(shares)
        .map(|(&w, &s)| {
            let scaled = f64::from(w.max(1)) * f64::from(RAMP_SCALE) * s.clamp(0.0, 1.0);
            (scaled.round() as u32).max(1)
        })
        .collect()
}

/// What a policy may look at for one new connection.
#[derive(Clone, Copy, Debug)]
pub struct ConnInfo {
    pub client: SocketAddr,
}

pub use crate::model::EndpointLoad;

/// One endpoint as a balancer sees it.
#[derive(Clone, Debug)]
pub struct Backend {
    pub addr: SocketAddr,
    /// 1..=65535; 0 is treated as 1.
    pub weight: u32,
    pub load: Arc<EndpointLoad>,
}

impl Backend {
    pub fn new(addr: SocketAddr, weight: u32) -> Self {
        Self {
            addr,
            weight,
            load: Arc::default(),
        }
    }

    fn weight(&self) -> u64 {
        u64::from(self.weight.max(1))
    }

    fn active(&self) -> u64 {
        u64::from(self.load.active.load(Ordering::Relaxed))
    }
}

/// The chosen endpoint (first) and its fallbacks, as indices into the
/// backend slice the balancer was built from. Distinct, at most
/// [`MAX_PICKS`], never allocated.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Picks {
    idx: [u32; MAX_PICKS],
    len: u8,
}

impl Picks {
    const fn empty() -> Self {
        Self {
            idx: [0; MAX_PICKS],
            len: 0,
        }
    }

    /// Adds `i` unless already present; false when full.
    fn push(&mut self, i: usize) -> bool {
        let len = self.len as usize;
        if len == MAX_PICKS {
            return false;
        }
        if !self.idx[..len].contains(&(i as u32)) {
            self.idx[len] = i as u32;
            self.len += 1;
        }
        (self.len as usize) < MAX_PICKS
    }

    /// Fills with `start+1, start+2, …` (mod `n`) until full or all `n` are in.
    fn fill_rotating(&mut self, start: usize, n: usize) {
        for step in 1..n {
            if (self.len as usize) >= n.min(MAX_PICKS) || !self.push((start + step) % n) {
                break;
            }
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn len(&self) -> usize {
        self.len as usize
    }

    pub fn first(&self) -> Option<usize> {
        self.as_slice().first().map(|&i| i as usize)
    }

    pub fn as_slice(&self) -> &[u32] {
        &self.idx[..self.len as usize]
    }

    /// The endpoint for connect attempt `n` (0-based): the picks in order,
    /// cycling when there are more attempts than picks.
    pub fn attempt(&self, n: usize) -> Option<usize> {
        if self.len == 0 {
            return None;
        }
        Some(self.idx[n % self.len as usize] as usize)
    }
}

impl fmt::Debug for Picks {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.as_slice()).finish()
    }
}

/// A balancing policy over one endpoint set.
pub trait Balancer: Send + Sync + fmt::Debug {
    /// The endpoint for a new connection, then its fallbacks.
    fn pick(&self, conn: &ConnInfo) -> Picks;
}

/// Builds the policy's balancer over `backends` (in snapshot order).
pub fn build(policy: Balance, backends: &[Backend]) -> Box<dyn Balancer> {
    if backends.is_empty() {
        return Box::new(Empty);
    }
    match policy {
        Balance::RoundRobin => Box::new(RoundRobin::starting_anywhere(backends)),
        Balance::LeastConn => Box::new(LeastConn::new(backends)),
        Balance::P2c => Box::new(P2c::new(backends)),
        Balance::Maglev => Box::new(Maglev::new(backends)),
        Balance::Random => Box::new(Random::new(backends)),
    }
}

// === impl Empty ===

#[derive(Debug)]
struct Empty;

impl Balancer for Empty {
    fn pick(&self, _: &ConnInfo) -> Picks {
        Picks::empty()
    }
}

// === impl RoundRobin ===

/// Smooth weighted round robin (nginx's): with weights 5,1,1 the order is
/// a a b a c a a — heavy endpoints are interleaved, not bunched. Equal
/// weights take a lock-free counter.
#[derive(Debug)]
pub struct RoundRobin {
    n: usize,
    next: AtomicUsize,
    /// None when all weights are equal.
    smooth: Option<Mutex<Smooth>>,
}

#[derive(Debug)]
struct Smooth {
    weights: Vec<i64>,
    current: Vec<i64>,
    total: i64,
}

impl RoundRobin {
    /// A rotation at a random point of its cycle: rebuilt on every snapshot
    /// change of the service, a rotation always starting at the first
    /// endpoint would favour it.
    pub fn starting_anywhere(backends: &[Backend]) -> Self {
        let rr = Self::new(backends);
        match &rr.smooth {
            None => rr.next.store(fastrand::usize(..rr.n), Ordering::Relaxed),
            Some(s) => {
                let mut s = s.lock().unwrap_or_else(|e| e.into_inner());
                for _ in 0..fastrand::i64(..s.total.min(1024)) {
                    s.next();
                }
            }
        }
        rr
    }

    /// A rotation starting at the first endpoint.
    pub fn new(backends: &[Backend]) -> Self {
        let weights: Vec<i64> = backends.iter().map(|b| b.weight() as i64).collect();
        let equal = weights.windows(2).all(|w| w[0] == w[1]);
        let smooth = (!equal).then(|| {
            Mutex::new(Smooth {
                total: weights.iter().sum(),
                current: vec![0; weights.len()],
                weights,
            })
        });
        Self {
            n: backends.len(),
            next: AtomicUsize::new(0),
            smooth,
        }
    }
}

impl Smooth {
    fn next(&mut self) -> usize {
        let mut best = 0;
        for i in 0..self.weights.len() {
            self.current[i] += self.weights[i];
            if self.current[i] > self.current[best] {
                best = i;
            }
        }
        self.current[best] -= self.total;
        best
    }
}

impl Balancer for RoundRobin {
    fn pick(&self, _: &ConnInfo) -> Picks {
        let first = match &self.smooth {
            None => self.next.fetch_add(1, Ordering::Relaxed) % self.n,
            Some(s) => s.lock().unwrap_or_else(|e| e.into_inner()).next(),
        };
        let mut p = Picks::empty();
        p.push(first);
        p.fill_rotating(first, self.n);
        p
    }
}

// === impl LeastConn ===

/// Fewest active connections per unit of weight; ties go round robin so a
/// burst of connections on an idle set spreads instead of piling on one.
#[derive(Debug)]
pub struct LeastConn {
    backends: Vec<Backend>,
    start: AtomicUsize,
}

impl LeastConn {
    pub fn new(backends: &[Backend]) -> Self {
        Self {
            backends: backends.to_vec(),
            start: AtomicUsize::new(0),
        }
    }
}

/// True when `a` is less loaded than `b` (active/weight, cross-multiplied).
fn less_loaded(a: &Backend, b: &Backend) -> bool {
    a.active() * b.weight() < b.active() * a.weight()
}

impl Balancer for LeastConn {
    fn pick(&self, _: &ConnInfo) -> Picks {
        let n = self.backends.len();
        let start = self.start.fetch_add(1, Ordering::Relaxed) % n;
        let mut best = start;
        for step in 1..n {
            let i = (start + step) % n;
            if less_loaded(&self.backends[i], &self.backends[best]) {
                best = i;
            }
        }
        let mut p = Picks::empty();
        p.push(best);
        p.fill_rotating(best, n);
        p
    }
}

// === impl P2c ===

/// Power of two choices: two endpoints drawn by weight, the less loaded
/// one wins, the other is the first fallback.
#[derive(Debug)]
pub struct P2c {
    backends: Vec<Backend>,
    draw: WeightedDraw,
}

impl P2c {
    pub fn new(backends: &[Backend]) -> Self {
        Self {
            backends: backends.to_vec(),
            draw: WeightedDraw::new(backends),
        }
    }
}

impl Balancer for P2c {
    fn pick(&self, _: &ConnInfo) -> Picks {
        let n = self.backends.len();
        let a = self.draw.draw();
        let mut b = self.draw.draw();
        if n > 1 && a == b {
            // A second distinct candidate, still weighted (bounded redraws),
            // then a uniform one.
            for _ in 0..4 {
                b = self.draw.draw();
                if b != a {
                    break;
                }
            }
            if b == a {
                b = (a + 1 + fastrand::usize(..n - 1)) % n;
            }
        }
        let (win, lose) = if less_loaded(&self.backends[b], &self.backends[a]) {
            (b, a)
        } else {
            (a, b)
        };
        let mut p = Picks::empty();
        p.push(win);
        p.push(lose);
        p.fill_rotating(win, n);
        p
    }
}

// === impl Random ===

/// Weighted random choice by cumulative weights.
#[derive(Debug)]
struct WeightedDraw {
    cumulative: Vec<u64>,
}

impl WeightedDraw {
    fn new(backends: &[Backend]) -> Self {
        let mut sum = 0;
        let cumulative = backends
            .iter()
            .map(|b| {
                sum += b.weight();
                sum
            })
            .collect();
        Self { cumulative }
    }

    fn draw(&self) -> usize {
        let total = *self.cumulative.last().expect("non-empty");
        let r = fastrand::u64(..total);
        self.cumulative.partition_point(|&c| c <= r)
    }
}

#[derive(Debug)]
pub struct Random {
    n: usize,
    draw: WeightedDraw,
}

impl Random {
    pub fn new(backends: &[Backend]) -> Self {
        Self {
            n: backends.len(),
            draw: WeightedDraw::new(backends),
        }
    }
}

impl Balancer for Random {
    fn pick(&self, _: &ConnInfo) -> Picks {
        let first = self.draw.draw();
        let mut p = Picks::empty();
        p.push(first);
        p.fill_rotating(first, self.n);
        p
    }
}

// === impl Maglev ===

/// Maglev consistent hashing (Eisenbud et al., NSDI 2016) of the client IP
/// over a 65537-entry table. When an endpoint leaves, only the slots it
/// held (and a small share of others) move. Weights give an endpoint that
/// many turns per round while the table fills. Fallbacks are the next
/// distinct endpoints along the table, so they are consistent too.
pub struct Maglev {
    table: Box<[u32]>,
    n: usize,
}

impl fmt::Debug for Maglev {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Maglev").field("n", &self.n).finish()
    }
}

/// FNV-1a then a splitmix64 finaliser: stable across processes and
/// builds (std's hasher is not guaranteed to be), well mixed.
fn hash64(seed: u64, bytes: &[u8]) -> u64 {
    let mut h = 0xcbf2_9ce4_8422_2325u64 ^ seed;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h = (h ^ (h >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    h = (h ^ (h >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    h ^ (h >> 31)
}

fn addr_bytes(addr: &SocketAddr) -> ([u8; 18], usize) {
    let mut out = [0u8; 18];
    let len = match addr.ip() {
        IpAddr::V4(ip) => {
            out[..4].copy_from_slice(&ip.octets());
            4
        }
        IpAddr::V6(ip) => {
            out[..16].copy_from_slice(&ip.octets());
            16
        }
    };
    out[len..len + 2].copy_from_slice(&addr.port().to_be_bytes());
    (out, len + 2)
}

fn ip_hash(ip: IpAddr) -> u64 {
    match ip.to_canonical() {
        IpAddr::V4(ip) => hash64(0, &ip.octets()),
        IpAddr::V6(ip) => hash64(0, &ip.octets()),
    }
}

impl Maglev {
    pub fn new(backends: &[Backend]) -> Self {
        const EMPTY: u32 = u32::MAX;
        let m = MAGLEV_TABLE_SIZE as u64;
        let n = backends.len();
        let perms: Vec<(u64, u64)> = backends
            .iter()
            .map(|b| {
                let (bytes, len) = addr_bytes(&b.addr);
                let offset = hash64(0x6d61_676c, &bytes[..len]) % m;
                let skip = hash64(0x736b_6970, &bytes[..len]) % (m - 1) + 1;
                (offset, skip)
            })
            .collect();
        let gcd = backends.iter().map(Backend::weight).fold(0, gcd);
        let turns: Vec<u64> = backends.iter().map(|b| b.weight() / gcd).collect();
        let mut next = vec![0u64; n];
        let mut table = vec![EMPTY; MAGLEV_TABLE_SIZE];
        let mut filled = 0;
        'fill: loop {
            for i in 0..n {
                for _ in 0..turns[i] {
                    let (offset, skip) = perms[i];
                    let mut c = ((offset + next[i] * skip) % m) as usize;
                    while table[c] != EMPTY {
                        next[i] += 1;
                        c = ((offset + next[i] * skip) % m) as usize;
                    }
                    table[c] = i as u32;
                    next[i] += 1;
                    filled += 1;
                    if filled == MAGLEV_TABLE_SIZE {
                        break 'fill;
                    }
                }
            }
        }
        Self {
            table: table.into_boxed_slice(),
            n,
        }
    }

    /// The table slot a client IP maps to.
    pub fn slot(ip: IpAddr) -> usize {
        (ip_hash(ip) % MAGLEV_TABLE_SIZE as u64) as usize
    }

    /// The endpoint index in each slot (for disruption measurements).
    pub fn table(&self) -> &[u32] {
        &self.table
    }
}

fn gcd(a: u64, b: u64) -> u64 {
    if b == 0 { a } else { gcd(b, a % b) }
}

impl Balancer for Maglev {
    fn pick(&self, conn: &ConnInfo) -> Picks {
        let slot = Self::slot(conn.client.ip());
        let want = self.n.min(MAX_PICKS);
        let mut p = Picks::empty();
        // Walk the table for consistent fallbacks; bounded, then rotate.
        for step in 0..4096 {
            p.push(self.table[(slot + step) % MAGLEV_TABLE_SIZE] as usize);
            if p.len() >= want {
                return p;
            }
        }
        let first = p.first().unwrap_or(0);
        p.fill_rotating(first, self.n);
        p
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn backends(weights: &[u32]) -> Vec<Backend> {
        weights
            .iter()
            .enumerate()
            .map(|(i, &w)| Backend::new(format!("10.0.0.{}:80", i + 1).parse().unwrap(), w))
            .collect()
    }

    fn conn(i: u32) -> ConnInfo {
        let ip = std::net::Ipv4Addr::from(0x0a00_0000 + i);
        ConnInfo {
            client: SocketAddr::new(ip.into(), 40000),
        }
    }

    fn counts(b: &dyn Balancer, n: usize, rounds: u32) -> Vec<u32> {
        let mut c = vec![0; n];
        for i in 0..rounds {
            c[b.pick(&conn(i)).first().unwrap()] += 1;
        }
        c
    }

    fn assert_fallbacks_distinct(p: &Picks, n: usize) {
        let s = p.as_slice();
        assert_eq!(s.len(), n.min(MAX_PICKS), "picks {p:?}");
        let mut seen = s.to_vec();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), s.len(), "picks must be distinct: {p:?}");
        for a in 0..5 {
            if n > 1 {
                assert_ne!(
                    p.attempt(a),
                    p.attempt(a + 1),
                    "same endpoint twice in a row"
                );
            }
        }
    }

    #[test]
    fn round_robin_is_smooth_and_weighted() {
        let rr = RoundRobin::new(&backends(&[5, 1, 1]));
        let seq: Vec<usize> = (0..7).map(|i| rr.pick(&conn(i)).first().unwrap()).collect();
        assert_eq!(seq, vec![0, 0, 1, 0, 2, 0, 0]);
        assert_eq!(counts(&rr, 3, 700), vec![500, 100, 100]);
    }

    #[test]
    fn round_robin_rebuilt_does_not_favour_the_first() {
        fastrand::seed(3);
        let bs = backends(&[1, 1, 1]);
        let mut firsts = [0; 3];
        for _ in 0..300 {
            firsts[build(Balance::RoundRobin, &bs)
                .pick(&conn(0))
                .first()
                .unwrap()] += 1;
        }
        assert!(firsts.iter().all(|&k| k > 60), "{firsts:?}");
        // Weighted: still exact over whole cycles.
        let rr = RoundRobin::starting_anywhere(&backends(&[5, 1, 1]));
        assert_eq!(counts(&rr, 3, 700), vec![500, 100, 100]);
    }

    #[test]
    fn round_robin_equal_weights_cycles() {
        let rr = RoundRobin::new(&backends(&[1, 1, 1, 1]));
        let seq: Vec<usize> = (0..8).map(|i| rr.pick(&conn(i)).first().unwrap()).collect();
        assert_eq!(seq, vec![0, 1, 2, 3, 0, 1, 2, 3]);
        assert_fallbacks_distinct(&rr.pick(&conn(0)), 4);
    }

    #[test]
    fn least_conn_prefers_fewest_per_weight() {
        let bs = backends(&[1, 1, 2]);
        bs[0].load.active.store(3, Ordering::Relaxed);
        bs[1].load.active.store(1, Ordering::Relaxed);
        bs[2].load.active.store(4, Ordering::Relaxed); // 4/2 = 2 per weight
        let lc = LeastConn::new(&bs);
        for i in 0..10 {
            assert_eq!(lc.pick(&conn(i)).first(), Some(1));
        }
        // Ties rotate instead of piling on the first endpoint.
        let idle = LeastConn::new(&backends(&[1, 1, 1]));
        assert_eq!(counts(&idle, 3, 300), vec![100, 100, 100]);
        assert_fallbacks_distinct(&idle.pick(&conn(0)), 3);
    }

    #[test]
    fn least_conn_balances_as_connections_stay_open() {
        let bs = backends(&[1, 1, 1]);
        let lc = LeastConn::new(&bs);
        bs[0].load.active.store(10, Ordering::Relaxed);
        for i in 0..20 {
            let k = lc.pick(&conn(i)).first().unwrap();
            bs[k].load.active.fetch_add(1, Ordering::Relaxed);
        }
        let active: Vec<u32> = bs
            .iter()
            .map(|b| b.load.active.load(Ordering::Relaxed))
            .collect();
        assert_eq!(active, vec![10, 10, 10]);
    }

    #[test]
    fn p2c_avoids_the_loaded_endpoint_and_follows_weight() {
        fastrand::seed(7);
        let bs = backends(&[1, 1, 1, 1]);
        bs[0].load.active.store(100, Ordering::Relaxed);
        let p2c = P2c::new(&bs);
        let c = counts(&p2c, 4, 4000);
        // Endpoint 0 can only win against itself, which never happens.
        assert_eq!(c[0], 0, "{c:?}");
        for &k in &c[1..] {
            assert!((1100..=1600).contains(&k), "{c:?}");
        }
        assert_fallbacks_distinct(&p2c.pick(&conn(0)), 4);
        // Idle and weighted 3:1: the heavy one wins most draws.
        let w = P2c::new(&backends(&[3, 1]));
        let c = counts(&w, 2, 4000);
        assert!(c[0] > 2 * c[1], "{c:?}");
    }

    #[test]
    fn random_follows_weights() {
        fastrand::seed(11);
        let r = Random::new(&backends(&[1, 2, 7]));
        let c = counts(&r, 3, 10_000);
        // Expected 1000/2000/7000; ±15% is many standard deviations.
        for (got, want) in c.iter().zip([1000.0, 2000.0, 7000.0]) {
            assert!((f64::from(*got) - want).abs() < want * 0.15, "{c:?}");
        }
        assert_fallbacks_distinct(&r.pick(&conn(0)), 3);
    }

    #[test]
    fn maglev_is_balanced_and_sticky() {
        let bs = backends(&[1; 10]);
        let mg = Maglev::new(&bs);
        let mut per = [0usize; 10];
        for &e in mg.table() {
            per[e as usize] += 1;
        }
        let ideal = MAGLEV_TABLE_SIZE / 10;
        for &k in &per {
            assert!(k.abs_diff(ideal) <= ideal / 20, "table shares {per:?}");
        }
        for i in 0..100 {
            let a = mg.pick(&conn(i));
            assert_eq!(a, mg.pick(&conn(i)), "same client, same picks");
            assert_fallbacks_distinct(&a, 10);
        }
        // Clients spread across all endpoints.
        let c = counts(&mg, 10, 5000);
        assert!(c.iter().all(|&k| k > 300), "{c:?}");
    }

    #[test]
    fn maglev_weights_shape_the_table() {
        let mg = Maglev::new(&backends(&[3, 1]));
        let heavy = mg.table().iter().filter(|&&e| e == 0).count();
        let share = heavy as f64 / MAGLEV_TABLE_SIZE as f64;
        assert!((share - 0.75).abs() < 0.01, "share {share}");
    }

    #[test]
    fn maglev_disruption_is_minimal_when_an_endpoint_leaves() {
        let all = backends(&[1; 10]);
        let before = Maglev::new(&all);
        let removed = 3usize;
        let rest: Vec<Backend> = all
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != removed)
            .map(|(_, b)| b.clone())
            .collect();
        let after = Maglev::new(&rest);
        // Map the new indices back to the old ones.
        let old_index = |new: u32| {
            if (new as usize) < removed {
                new
            } else {
                new + 1
            }
        };
        let mut moved_survivors = 0usize;
        let mut survivors = 0usize;
        for (b, a) in before.table().iter().zip(after.table()) {
            let a = old_index(*a);
            assert_ne!(a as usize, removed);
            if *b as usize != removed {
                survivors += 1;
                if a != *b {
                    moved_survivors += 1;
                }
            }
        }
        let share = moved_survivors as f64 / survivors as f64;
        // Perfect consistency would be 0; the paper reports a few percent.
        assert!(share < 0.05, "{share:.4} of surviving slots moved");
    }

    #[test]
    fn ramp_share_grows_linearly_from_a_small_share() {
        let w = Duration::from_secs(30);
        assert_eq!(ramp_share(Duration::ZERO, w), RAMP_MIN_SHARE);
        assert_eq!(ramp_share(Duration::from_secs(15), w), 0.5);
        assert_eq!(ramp_share(Duration::from_secs(60), w), 1.0);
        assert_eq!(ramp_share(Duration::ZERO, Duration::ZERO), 1.0);
        assert_eq!(ramped_weights(&[3, 1], &[1.0, 1.0]), vec![3, 1]);
        assert_eq!(ramped_weights(&[3, 1], &[1.0, 0.05]), vec![300, 5]);
        assert_eq!(ramped_weights(&[1, 1], &[1.0, 0.001]), vec![100, 1]);
    }

    /// A ramping endpoint at 5% of weight 1 beside one at full weight gets
    /// about 5/105 of the picks in every policy (least_conn: of the
    /// connections that stay open).
    #[test]
    fn every_weighted_policy_follows_ramped_weights() {
        fastrand::seed(5);
        let weights = ramped_weights(&[1, 1], &[1.0, RAMP_MIN_SHARE]);
        let bs = |w: &[u32]| backends(w);
        let want = 5.0 / 105.0;
        for policy in Balance::ALL.map(|(_, p)| p) {
            let set = bs(&weights);
            let b = build(policy, &set);
            let share = if policy == Balance::LeastConn {
                for i in 0..2100 {
                    let k = b.pick(&conn(i)).first().unwrap();
                    set[k].load.active.fetch_add(1, Ordering::Relaxed);
                }
                f64::from(set[1].load.active.load(Ordering::Relaxed)) / 2100.0
            } else if policy == Balance::Maglev {
                let Maglev { table, .. } = Maglev::new(&set);
                table.iter().filter(|&&e| e == 1).count() as f64 / MAGLEV_TABLE_SIZE as f64
            } else {
                f64::from(counts(b.as_ref(), 2, 10_500)[1]) / 10_500.0
            };
            assert!((share - want).abs() < 0.02, "{policy:?}: share {share:.4}");
        }
    }

    #[test]
    fn single_and_empty_sets() {
        for policy in Balance::ALL.map(|(_, p)| p) {
            let one = build(policy, &backends(&[1]));
            let p = one.pick(&conn(1));
            assert_eq!(p.as_slice(), &[0]);
            assert_eq!(p.attempt(2), Some(0));
            assert!(build(policy, &[]).pick(&conn(1)).is_empty());
        }
    }
}
