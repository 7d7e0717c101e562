//! The registry's side of claims: deciding them when specs change, the
//! spec as served, and the published list of conflicts (see `claims`).

use std::collections::BTreeSet;
use std::sync::Arc;

use crate::model::{ServiceKey, ServiceSpec};

use super::State;
use super::claims::{duplicate_hostnames, owner, settle_hostnames};

impl State {
    /// Decides the vip and listen claims of `touched` (after their specs
    /// changed) and of every claim they share; returns the other services
    /// whose holdings moved (to rebuild too).
    pub(super) fn settle_claims(&mut self, touched: &[ServiceKey]) -> Vec<ServiceKey> {
        let (sources, desired) = (&self.sources, &self.desired);
        let rank = |k: &ServiceKey| owner(sources, desired, k).map_or(usize::MAX, |(i, _, _)| i);
        let ledger = &mut self.ledger;
        let mut moved: BTreeSet<ServiceKey> = BTreeSet::new();
        let note = |moved: &mut BTreeSet<ServiceKey>,
                    (before, after): (Option<ServiceKey>, Option<ServiceKey>)| {
            if before != after {
                moved.extend(before.into_iter().chain(after));
            }
        };
        for key in touched {
            let vips = owner(sources, desired, key)
                .map_or_else(Vec::new, |(_, _, spec)| spec.vips().collect());
            for ip in ledger.vips.set(key, vips.into_iter().collect()) {
                note(&mut moved, ledger.vips.decide(ip, rank));
            }
        }
        // A service that won or lost a vip asks for other `vip:port`s.
        let listening: BTreeSet<ServiceKey> = touched
            .iter()
            .cloned()
            .chain(moved.iter().cloned())
            .collect();
        for key in &listening {
            let wants = owner(sources, desired, key).map_or_else(Vec::new, |(_, _, spec)| {
                let vip = spec.vip.filter(|ip| ledger.vips.holds(key, ip));
                crate::model::listeners_with_vip(spec, vip)
                    .into_iter()
                    .map(|(a, _)| a)
                    .collect()
            });
            for addr in ledger.listens.set(key, wants) {
                note(&mut moved, ledger.listens.decide(addr, rank));
            }
        }
        moved.retain(|k| !touched.contains(k));
        moved.into_iter().collect()
    }

    /// The spec as served: without a vip it does not hold, and each
    /// hostname given to one endpoint. Also the listeners it holds.
    pub(super) fn effective(
        &mut self,
        key: &ServiceKey,
        spec: &Arc<ServiceSpec>,
    ) -> (Arc<ServiceSpec>, Vec<(std::net::SocketAddr, usize)>) {
        let previous = self.snapshot.services.get(key);
        let vip_lost = spec.vip.is_some_and(|ip| !self.ledger.vips.holds(key, &ip));
        let second_lost = spec
            .second_vip
            .is_some_and(|ip| !self.ledger.vips.holds(key, &ip));
        let mut endpoints = Vec::new();
        let mut lost = Vec::new();
        if duplicate_hostnames(&spec.endpoints) {
            endpoints = spec.endpoints.clone();
            lost = settle_hostnames(key, &mut endpoints, previous.map(|s| &**s));
        }
        let spec = if vip_lost || second_lost || !lost.is_empty() {
            let mut own = (**spec).clone();
            own.vip = own.vip.filter(|_| !vip_lost);
            own.second_vip = own.second_vip.filter(|_| !vip_lost && !second_lost);
            if !lost.is_empty() {
                own.endpoints = endpoints;
            }
            Arc::new(own)
        } else {
            spec.clone()
        };
        if lost.is_empty() {
            self.ledger.hostnames.remove(key);
        } else {
            self.ledger.hostnames.insert(key.clone(), lost);
        }
        let mut listeners = crate::model::wanted_listeners(&spec);
        listeners.retain(|(a, _)| self.ledger.listens.holds(key, a));
        (spec, listeners)
    }

    /// Brings `snapshot.conflicts` in line with the ledger, logging each
    /// conflict once when it starts and once when it ends. True if moved.
    pub(super) fn refresh_conflicts(&mut self) -> bool {
        let mut now = self.ledger.conflicts();
        now.extend(self.reported.values().flatten().cloned());
        if *now == *self.snapshot.conflicts {
            return false;
        }
        for c in now.iter().filter(|c| !self.snapshot.conflicts.contains(c)) {
            tracing::warn!(
                kind = c.kind, service = %c.service, claim = %c.claim, winner = %c.winner,
                "claim refused: another service (or endpoint) holds it; \
                 the higher-priority source, then the first to claim, keeps it"
            );
        }
        for c in self.snapshot.conflicts.iter().filter(|c| !now.contains(c)) {
            tracing::info!(kind = c.kind, service = %c.service, claim = %c.claim, "claim conflict ended");
        }
        self.snapshot.conflicts = now.into();
        true
    }
}
