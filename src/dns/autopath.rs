//! `[dns] autopath`: the search-path shortcut of CoreDNS's `autopath`
//! plugin. A pod with `ndots:5` and the search path
//! `<ns>.svc.<zone> svc.<zone> <zone>` sends `api.example.com` first as
//! `api.example.com.<ns>.svc.<zone>`, and walks the whole path (an NXDOMAIN
//! round trip each) before asking the name itself. When the asking address
//! is an endpoint beacon knows (so its namespace, hence its search path, is
//! known) and that first expansion does not exist, beacon walks the path
//! itself: the first candidate that exists is answered with a CNAME from
//! the name as asked to it, plus its records. Candidates inside the zone are
//! answered from the snapshot; the name itself, when outside the zone, is
//! forwarded. If nothing exists, the client gets the NXDOMAIN it would have
//! had, and walks on by itself.
//!
//! It never fires for a client that is not an endpoint in the snapshot
//! (its search path is unknown), nor for a name that does not end in the
//! client's own `<ns>.svc.<zone>` (not a first expansion).

use std::net::IpAddr;

use hickory_proto::op::{Message, Query, ResponseCode};
use hickory_proto::rr::rdata::CNAME;
use hickory_proto::rr::{Name, RData, Record};

use super::answer::{self, Outcome, Zone, ZoneAnswer};
use super::forward::Forwarder;
use super::wire;
use crate::model::Snapshot;

/// Where the search path led.
pub enum Found {
    /// A name in the zone exists: the CNAME to it and its records.
    Zone(ZoneAnswer),
    /// The name as asked (without the search domain), outside the zone:
    /// forward it, then answer with the CNAME and what comes back.
    Forward(Name),
}

/// Walks the search path of `client` for `lower` (the lower-cased
/// question, whose zone answer was NXDOMAIN). `None`: autopath does not
/// apply, or no candidate in the zone exists and the bare name is in the zone.
pub fn search(snapshot: &Snapshot, zone: &Zone, client: IpAddr, lower: &Query) -> Option<Found> {
    let owners = snapshot.index().by_ip.get(&client)?;
    let apex = zone.apex();
    let name = &lower.name;
    let svc_apex = Name::from_labels([&b"svc"[..]])
        .ok()?
        .append_domain(apex)
        .ok()?;
    // The client's namespace whose first search domain ends the name (a
    // client may be an endpoint in more than one namespace).
    let base = owners.iter().find_map(|o| {
        let first = Name::from_labels([o.service.namespace.as_bytes()])
            .ok()?
            .append_domain(&svc_apex)
            .ok()?;
        let extra = name.num_labels().checked_sub(first.num_labels())?;
        if extra == 0 || !first.zone_of(name) {
            return None;
        }
        Name::from_labels(name.iter().take(extra as usize)).ok()
    })?;
    let mut fqdn = base.clone();
    fqdn.set_fqdn(true);
    for domain in [&svc_apex, apex] {
        if let Some(found) = in_zone(
            snapshot,
            zone,
            lower,
            base.clone().append_domain(domain).ok()?,
        ) {
            return Some(found);
        }
    }
    if apex.zone_of(&fqdn) {
        return in_zone(snapshot, zone, lower, fqdn);
    }
    Some(Found::Forward(fqdn))
}

/// The zone's answer for `target`, as a CNAME from the question to it plus
/// its records, when `target` exists (NOERROR).
fn in_zone(snapshot: &Snapshot, zone: &Zone, lower: &Query, target: Name) -> Option<Found> {
    let mut q = lower.clone();
    q.name = target.clone();
    let Outcome::Answer(za) = answer::answer(snapshot, zone, &q, 0) else {
        return None;
    };
    if za.rcode != ResponseCode::NoError {
        return None;
    }
    let mut out = ZoneAnswer {
        rcode: ResponseCode::NoError,
        answers: vec![cname(lower, target, zone.ttl)],
        authorities: za.authorities,
        additionals: za.additionals,
    };
    out.answers.extend(za.answers);
    Some(Found::Zone(out))
}

fn cname(lower: &Query, target: Name, ttl: u32) -> Record {
    Record::from_rdata(lower.name.clone(), ttl, RData::CNAME(CNAME(target)))
}

/// A forwarded autopath: what the handler computed before the upstreams.
#[derive(Debug)]
pub struct Pending {
    /// The name as the client meant it (outside the zone).
    pub target: Name,
    /// The zone's NXDOMAIN for the question as asked, sent when the
    /// target does not exist either.
    pub nxdomain: Vec<u8>,
    /// TTL of the CNAME (the zone's).
    pub ttl: u32,
}

/// Forwards `pending.target` through `forwarder` and answers `req` with a
/// CNAME to it plus its records; the zone's NXDOMAIN when the target does
/// not resolve.
pub async fn finish(
    forwarder: &Forwarder,
    req: &Message,
    pending: Pending,
    limit: usize,
) -> (Vec<u8>, ResponseCode) {
    let Some(asked) = req.queries.first() else {
        return (pending.nxdomain, ResponseCode::NXDomain);
    };
    let mut treq = req.clone();
    treq.queries[0].name = pending.target.clone();
    let (bytes, rcode) = forwarder.reply(&treq, wire::TCP_LIMIT).await;
    let resolved = match Message::from_vec(&bytes) {
        Ok(m) if rcode == ResponseCode::NoError => m,
        _ => return (pending.nxdomain, ResponseCode::NXDomain),
    };
    let mut msg = wire::response(req, ResponseCode::NoError, true);
    msg.queries = req.queries.clone();
    let lower = wire::lowercase(asked);
    msg.answers.push(cname(&lower, pending.target, pending.ttl));
    msg.answers.extend(resolved.answers);
    msg.authorities = resolved.authorities;
    match wire::encode_within(&msg, limit) {
        Some(bytes) => (bytes, ResponseCode::NoError),
        None => (
            wire::header_for_id(req.metadata.id, ResponseCode::ServFail),
            ResponseCode::ServFail,
        ),
    }
}

#[cfg(test)]
mod tests;
