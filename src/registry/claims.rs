//! Exclusive claims across services: vips and proxy listen addresses (and,
//! within one service, endpoint hostnames).
//!
//! Sources may disagree: two services can ask for one listen address or
//! one vip. The registry decides, whatever the order events arrive in
//! within a priority:
//! 1. a service of a higher-priority source (listed first in the config)
//!    gets the claim;
//! 2. among services of the same priority, the first to claim it keeps it
//!    for as long as it claims it (a live listener is never handed over to
//!    a newcomer; it passes on only when its holder stops asking or a
//!    higher-priority source asks).
//!
//! The losers are served without the claim and listed as [`Conflict`]s.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::hash::Hash;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use crate::model::{Conflict, Endpoint, ServiceKey, ServiceSpec, ServiceState, SourceId};

/// Who asks for each claim of one kind (vips or listen addresses).
#[derive(Clone, Debug)]
pub(super) struct Claims<C> {
    /// Every claimant of a claim, in order of arrival.
    claimants: HashMap<C, Vec<ServiceKey>>,
    /// What each service asks for.
    wanted: HashMap<ServiceKey, Vec<C>>,
    /// The holder of each claim.
    holder: HashMap<C, ServiceKey>,
    /// Claims with more than one claimant.
    contested: BTreeSet<C>,
}

impl<C> Default for Claims<C> {
    fn default() -> Self {
        Self {
            claimants: HashMap::new(),
            wanted: HashMap::new(),
            holder: HashMap::new(),
            contested: BTreeSet::new(),
        }
    }
}

impl<C: Copy + Eq + Hash + Ord> Claims<C> {
    /// Sets what `key` asks for. A claim it kept asking for keeps its place
    /// in the order of arrival. Returns every claim it asked for before or
    /// asks for now (each needs a new decision: its rank may have moved).
    pub(super) fn set(&mut self, key: &ServiceKey, wants: Vec<C>) -> Vec<C> {
        let old = self.wanted.remove(key).unwrap_or_default();
        for c in old.iter().filter(|c| !wants.contains(c)) {
            if let Some(list) = self.claimants.get_mut(c) {
                list.retain(|k| k != key);
                if list.is_empty() {
                    self.claimants.remove(c);
                }
            }
        }
        for c in wants.iter().filter(|c| !old.contains(c)) {
            self.claimants.entry(*c).or_default().push(key.clone());
        }
        let mut touched = old;
        touched.extend(wants.iter().copied());
        touched.sort();
        touched.dedup();
        if !wants.is_empty() {
            self.wanted.insert(key.clone(), wants);
        }
        touched
    }

    /// Decides who holds `claim`: the lowest `rank` (source priority), then
    /// the first to arrive. Returns the holder before and after.
    pub(super) fn decide(
        &mut self,
        claim: C,
        rank: impl Fn(&ServiceKey) -> usize,
    ) -> (Option<ServiceKey>, Option<ServiceKey>) {
        let before = self.holder.get(&claim).cloned();
        let after = self
            .claimants
            .get(&claim)
            .and_then(|list| list.iter().enumerate().min_by_key(|(i, k)| (rank(k), *i)))
            .map(|(_, k)| k.clone());
        match &after {
            Some(k) => self.holder.insert(claim, k.clone()),
            None => self.holder.remove(&claim),
        };
        if self.claimants.get(&claim).is_some_and(|l| l.len() > 1) {
            self.contested.insert(claim);
        } else {
            self.contested.remove(&claim);
        }
        (before, after)
    }

    pub(super) fn holds(&self, key: &ServiceKey, claim: &C) -> bool {
        self.holder.get(claim) == Some(key)
    }

    /// Every claimant that asked for a claim and did not get it, with the
    /// holder.
    pub(super) fn losers(&self) -> impl Iterator<Item = (C, &ServiceKey, &ServiceKey)> + '_ {
        self.contested.iter().flat_map(move |c| {
            let holder = self.holder.get(c);
            self.claimants[c]
                .iter()
                .filter(move |k| Some(*k) != holder)
                .filter_map(move |k| Some((*c, k, holder?)))
        })
    }
}

/// The vip and listen claims of every service, and the conflicts they make.
#[derive(Clone, Debug, Default)]
pub(super) struct Ledger {
    pub(super) vips: Claims<IpAddr>,
    pub(super) listens: Claims<SocketAddr>,
    /// Hostnames lost within each service (decided when it is rebuilt).
    pub(super) hostnames: HashMap<ServiceKey, Vec<Conflict>>,
}

impl Ledger {
    /// Every conflict in force, in order.
    pub(super) fn conflicts(&self) -> Vec<Conflict> {
        let name = |k: &ServiceKey| -> Arc<str> { k.to_string().into() };
        let vips = self.vips.losers().map(|(ip, loser, holder)| Conflict {
            kind: "vip",
            service: loser.clone(),
            claim: ip.to_string().into(),
            winner: name(holder),
        });
        let listens = self.listens.losers().map(|(a, loser, holder)| Conflict {
            kind: "listen",
            service: loser.clone(),
            claim: a.to_string().into(),
            winner: name(holder),
        });
        let hostnames = self.hostnames.values().flatten().cloned();
        let mut all: Vec<Conflict> = vips.chain(listens).chain(hostnames).collect();
        all.sort();
        all
    }
}

/// Whether two of `endpoints` ask for one hostname.
pub(super) fn duplicate_hostnames(endpoints: &[Endpoint]) -> bool {
    let mut seen: std::collections::HashSet<&str> = std::collections::HashSet::new();
    endpoints
        .iter()
        .filter_map(|e| e.hostname.as_deref())
        .any(|h| !seen.insert(h))
}

/// Gives each hostname of `endpoints` to one endpoint: the one that held
/// it in `previous` while it still asks for it, else the first listed.
/// The others lose it (returned as conflicts of `key`).
pub(super) fn settle_hostnames(
    key: &ServiceKey,
    endpoints: &mut [Endpoint],
    previous: Option<&ServiceState>,
) -> Vec<Conflict> {
    if !duplicate_hostnames(endpoints) {
        return Vec::new();
    }
    let mut holder: HashMap<Arc<str>, IpAddr> = HashMap::new();
    let asks = |ip: IpAddr, h: &Arc<str>| {
        endpoints
            .iter()
            .any(|e| e.ip == ip && e.hostname.as_ref() == Some(h))
    };
    for e in previous.into_iter().flat_map(|s| &s.endpoints) {
        if let Some(h) = &e.endpoint.hostname
            && asks(e.endpoint.ip, h)
        {
            holder.insert(h.clone(), e.endpoint.ip);
        }
    }
    let mut lost = Vec::new();
    for e in endpoints.iter_mut() {
        let Some(h) = e.hostname.clone() else {
            continue;
        };
        let winner = *holder.entry(h.clone()).or_insert(e.ip);
        if winner != e.ip {
            e.hostname = None;
            lost.push(Conflict {
                kind: "hostname",
                service: key.clone(),
                claim: format!("{h} ({})", e.ip).into(),
                winner: winner.to_string().into(),
            });
        }
    }
    lost
}

/// The source that owns `key` (the first in priority order naming it),
/// with its place in that order.
pub(super) fn owner<'a>(
    sources: &'a [SourceId],
    desired: &'a HashMap<SourceId, BTreeMap<ServiceKey, Arc<ServiceSpec>>>,
    key: &ServiceKey,
) -> Option<(usize, &'a SourceId, &'a Arc<ServiceSpec>)> {
    sources
        .iter()
        .enumerate()
        .find_map(|(i, s)| desired.get(s)?.get(key).map(|spec| (i, s, spec)))
}
