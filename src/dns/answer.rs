//! The pure core of the DNS responder: a question and a [`Snapshot`] in,
//! the records of the answer out. No I/O, no clock, no randomness (the A/AAAA
//! rotation is an argument), so every rule of the Kubernetes DNS
//! specification 1.1.0 is a plain `#[test]`.
//!
//! Names inside the zone:
//! - `<zone>`: SOA and NS.
//! - `dns-version.<zone>`: TXT `"1.1.0"`.
//! - `<svc>.<ns>.svc.<zone>`: A/AAAA of the vip, or of every serving endpoint
//!   of a headless service (a headless service without one does not exist);
//!   for an alias (Kubernetes `ExternalName`) a CNAME to its target, for
//!   every type, followed by the target's A/AAAA only when the target is a
//!   service or endpoint in the zone (one step, never a loop).
//! - `<host>.<svc>.<ns>.svc.<zone>`: one serving endpoint, by its hostname or
//!   by its dashed address (`10-0-0-1`, the SRV target of an endpoint
//!   without a hostname).
//! - `_<port>._<proto>.<svc>.<ns>.svc.<zone>`: SRV of a named port, the
//!   targets' addresses in the additional section.
//! - `svc.<zone>`, `<ns>.svc.<zone>` (a namespace with a service),
//!   `_<proto>.<svc>.<ns>.svc.<zone>`, `dns.<zone>`, `ns.dns.<zone>`: names
//!   that exist without data (NODATA).
//!
//! Everything else in the zone is NXDOMAIN; negative answers carry the zone
//! SOA in the authority section. ANY on an existing name gets one HINFO
//! record (RFC 8482). Until the snapshot is ready every name in the zone is
//! SERVFAIL. PTR names (`in-addr.arpa`, `ip6.arpa`) of vips and serving
//! endpoints are answered; other reverse names are not ours.

use std::net::IpAddr;

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::rdata::{A, AAAA, CNAME, HINFO, NS, PTR, SOA, SRV, TXT};
use hickory_proto::rr::{DNSClass, Label, Name, RData, Record, RecordType};

use crate::model::{EndpointState, ServiceKey, ServiceState, Snapshot};

/// The version of the Kubernetes DNS specification served at `dns-version`.
pub const SPEC_VERSION: &str = "1.1.0";

/// The zone beacon is authoritative for.
#[derive(Clone, Debug)]
pub struct Zone {
    /// Lower-case, fully qualified.
    apex: Name,
    labels: Vec<Vec<u8>>,
    /// TTL of every answer and of negative answers (SOA minimum).
    pub ttl: u32,
}

impl Zone {
    /// `zone` as in the config: lower-case, without the trailing dot.
    pub fn new(zone: &str, ttl: u32) -> Result<Self, hickory_proto::ProtoError> {
        let mut apex = Name::from_ascii(zone)?.to_lowercase();
        apex.set_fqdn(true);
        let labels = apex.iter().map(<[u8]>::to_vec).collect();
        Ok(Self { apex, labels, ttl })
    }

    pub fn apex(&self) -> &Name {
        &self.apex
    }

    /// The labels of `name` below the apex, or `None` when `name` is not in
    /// the zone. Case-insensitive.
    fn relative<'n>(&self, name: &'n Name) -> Option<Vec<&'n [u8]>> {
        let labels: Vec<&[u8]> = name.iter().collect();
        let z = self.labels.len();
        if labels.len() < z {
            return None;
        }
        let (rel, tail) = labels.split_at(labels.len() - z);
        let matches = tail
            .iter()
            .zip(&self.labels)
            .all(|(a, b)| a.eq_ignore_ascii_case(b));
        matches.then(|| rel.to_vec())
    }
}

/// The zone's part of an answer.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ZoneAnswer {
    pub rcode: ResponseCode,
    pub answers: Vec<Record>,
    pub authorities: Vec<Record>,
    pub additionals: Vec<Record>,
}

/// What [`answer`] decided.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// We are authoritative for the name: send this.
    Answer(ZoneAnswer),
    /// Not ours (outside the zone, or a reverse name we do not know):
    /// forward it or refuse it.
    NotOurs,
}

/// Answers `query` from `snapshot`. `rotate` rotates the order of A/AAAA
/// answers (callers pass a per-response counter). Owner names of answers are
/// the question name as given, so they echo its case.
pub fn answer(snapshot: &Snapshot, zone: &Zone, query: &Query, rotate: usize) -> Outcome {
    let name = &query.name;
    if query.query_class != DNSClass::IN {
        return Outcome::NotOurs;
    }
    let Some(rel) = zone.relative(name) else {
        return reverse(snapshot, zone, query);
    };
    let mut b = Builder {
        snapshot,
        zone,
        query,
        apex_labels: zone.labels.len(),
        out: ZoneAnswer::default(),
    };
    if !snapshot.ready {
        b.out.rcode = ResponseCode::ServFail;
        return Outcome::Answer(b.out);
    }
    b.lookup(&rel, rotate);
    Outcome::Answer(b.out)
}

/// What a name in the zone is.
enum Node<'s> {
    Apex,
    DnsVersion,
    /// Exists, holds no records (empty non-terminals and `ns.dns`).
    Empty,
    Service(&'s ServiceState),
    Endpoint(&'s EndpointState),
    Srv(&'s ServiceState, &'s crate::model::Port),
}

struct Builder<'a> {
    snapshot: &'a Snapshot,
    zone: &'a Zone,
    query: &'a Query,
    apex_labels: usize,
    out: ZoneAnswer,
}

impl<'a> Builder<'a> {
    fn ttl(&self) -> u32 {
        self.zone.ttl
    }

    fn lookup(&mut self, rel: &[&[u8]], rotate: usize) {
        let Some(node) = self.node(rel) else {
            self.out.rcode = ResponseCode::NXDomain;
            self.soa_authority();
            return;
        };
        let qtype = self.query.query_type;
        let owner = self.query.name.clone();
        if qtype == RecordType::ANY {
            // RFC 8482: one synthesized record instead of everything.
            let hinfo = HINFO::new("RFC8482".into(), String::new());
            self.out
                .answers
                .push(Record::from_rdata(owner, self.ttl(), RData::HINFO(hinfo)));
            return;
        }
        match (node, qtype) {
            (Node::Service(svc), _) if svc.spec.external_name.is_some() => {
                self.alias(owner, svc, qtype, rotate)
            }
            (Node::Apex, RecordType::SOA) => {
                let soa = self.soa();
                self.out.answers.push(soa);
            }
            (Node::Apex, RecordType::NS) => {
                let ns = RData::NS(NS(self.ns_name()));
                self.out
                    .answers
                    .push(Record::from_rdata(owner, self.ttl(), ns));
            }
            (Node::DnsVersion, RecordType::TXT) => {
                let txt = RData::TXT(TXT::new(vec![SPEC_VERSION.into()]));
                self.out
                    .answers
                    .push(Record::from_rdata(owner, self.ttl(), txt));
            }
            (Node::Service(svc), RecordType::A | RecordType::AAAA) => {
                let ips: Vec<IpAddr> = match svc.spec.vip {
                    Some(_) => svc.spec.vips().collect(),
                    None => svc.serving().map(|e| e.endpoint.ip).collect(),
                };
                self.addresses(owner, ips, qtype, rotate);
            }
            (Node::Endpoint(ep), RecordType::A | RecordType::AAAA) => {
                self.addresses(owner, vec![ep.endpoint.ip], qtype, rotate);
            }
            (Node::Srv(svc, port), RecordType::SRV) => self.srv(owner, svc, port),
            _ => {}
        }
        if self.out.answers.is_empty() {
            // NODATA.
            self.soa_authority();
        }
    }

    /// Resolves the labels below the apex to a node, or `None` (NXDOMAIN).
    fn node(&self, rel: &[&[u8]]) -> Option<Node<'a>> {
        let lower = |l: &[u8]| String::from_utf8_lossy(l).to_ascii_lowercase();
        let is = |l: &[u8], s: &str| l.eq_ignore_ascii_case(s.as_bytes());
        match rel {
            [] => Some(Node::Apex),
            [v] if is(v, "dns-version") => Some(Node::DnsVersion),
            [d] if is(d, "dns") => Some(Node::Empty),
            [n, d] if is(n, "ns") && is(d, "dns") => Some(Node::Empty),
            [s] if is(s, "svc") => Some(Node::Empty),
            [ns, s] if is(s, "svc") => {
                let ns = lower(ns);
                let exists = self.snapshot.index().namespaces.contains(ns.as_str());
                exists.then_some(Node::Empty)
            }
            [svc, ns, s] if is(s, "svc") => self.service(ns, svc).map(Node::Service),
            [host, svc, ns, s] if is(s, "svc") => {
                let svc = self.service(ns, svc)?;
                if host.first() == Some(&b'_') {
                    let proto = lower(&host[1..]);
                    let has = svc
                        .spec
                        .ports
                        .iter()
                        .any(|p| !p.name.is_empty() && p.protocol.as_str() == proto);
                    return has.then_some(Node::Empty);
                }
                let ep = svc
                    .serving()
                    .find(|e| endpoint_label(e).as_bytes().eq_ignore_ascii_case(host))?;
                Some(Node::Endpoint(ep))
            }
            [port, proto, svc, ns, s] if is(s, "svc") => {
                let svc = self.service(ns, svc)?;
                let (port, proto) = (port.strip_prefix(b"_")?, proto.strip_prefix(b"_")?);
                let port = svc.spec.ports.iter().find(|p| {
                    !p.name.is_empty()
                        && p.name.as_bytes().eq_ignore_ascii_case(port)
                        && p.protocol.as_str().as_bytes().eq_ignore_ascii_case(proto)
                })?;
                Some(Node::Srv(svc, port))
            }
            _ => None,
        }
    }

    /// A service exists for DNS unless it is headless with nothing serving.
    fn service_exists(&self, key: &ServiceKey) -> bool {
        self.snapshot.service(key).is_some_and(|s| s.in_dns())
    }

    /// The CNAME of an alias, then (for A/AAAA) the addresses of its target
    /// when the target is a service or endpoint of this zone.
    fn alias(&mut self, owner: Name, svc: &ServiceState, qtype: RecordType, rotate: usize) {
        let Some(target) = svc.spec.external_name.as_deref() else {
            return;
        };
        let Ok(mut target) = Name::from_ascii(target) else {
            return;
        };
        target.set_fqdn(true);
        let cname = RData::CNAME(CNAME(target.clone()));
        self.out
            .answers
            .push(Record::from_rdata(owner, self.ttl(), cname));
        if !matches!(qtype, RecordType::A | RecordType::AAAA) {
            return;
        }
        let Some(rel) = self.zone.relative(&target) else {
            return;
        };
        let ips = match self.node(&rel) {
            Some(Node::Service(t)) if t.spec.external_name.is_none() => match t.spec.vip {
                Some(_) => t.spec.vips().collect(),
                None => t.serving().map(|e| e.endpoint.ip).collect(),
            },
            Some(Node::Endpoint(ep)) => vec![ep.endpoint.ip],
            _ => return,
        };
        self.addresses(target, ips, qtype, rotate);
    }

    fn service(&self, ns: &[u8], name: &[u8]) -> Option<&'a ServiceState> {
        let key = ServiceKey::new(&String::from_utf8_lossy(ns), &String::from_utf8_lossy(name));
        let svc = self.snapshot.service(&key)?;
        self.service_exists(&key).then_some(&**svc)
    }

    fn addresses(&mut self, owner: Name, mut ips: Vec<IpAddr>, qtype: RecordType, rotate: usize) {
        ips.retain(|ip| ip.is_ipv4() == (qtype == RecordType::A));
        if ips.is_empty() {
            return;
        }
        let k = rotate % ips.len();
        ips.rotate_left(k);
        let ttl = self.ttl();
        self.out.answers.extend(
            ips.into_iter()
                .map(|ip| address_record(owner.clone(), ttl, ip)),
        );
    }

    fn srv(&mut self, owner: Name, svc: &ServiceState, port: &crate::model::Port) {
        let ttl = self.ttl();
        // The service name `<svc>.<ns>.svc.<zone>`, in the question's case.
        let service_name = owner.trim_to(self.apex_labels + 3);
        match svc.spec.vip {
            Some(vip) => {
                let srv = SRV::new(0, 100, port.port, service_name.clone());
                self.out
                    .answers
                    .push(Record::from_rdata(owner, ttl, RData::SRV(srv)));
                self.out
                    .additionals
                    .push(address_record(service_name.clone(), ttl, vip));
                if let Some(second) = svc.spec.second_vip {
                    self.out
                        .additionals
                        .push(address_record(service_name, ttl, second));
                }
            }
            None => {
                for ep in svc.serving() {
                    let Ok(label) = Label::from_raw_bytes(endpoint_label(ep).as_bytes()) else {
                        continue;
                    };
                    let Ok(target) = service_name.prepend_label(label) else {
                        continue;
                    };
                    let weight = u16::try_from(ep.endpoint.weight).unwrap_or(u16::MAX);
                    let target_port = ep.endpoint.port.unwrap_or(port.target_port);
                    let srv = SRV::new(0, weight, target_port, target.clone());
                    self.out
                        .answers
                        .push(Record::from_rdata(owner.clone(), ttl, RData::SRV(srv)));
                    self.out
                        .additionals
                        .push(address_record(target, ttl, ep.endpoint.ip));
                }
            }
        }
    }

    /// The apex in the question's case (so it compresses into the question).
    fn apex_name(&self) -> Name {
        self.query.name.trim_to(self.apex_labels)
    }

    fn ns_name(&self) -> Name {
        let apex = self.apex_name();
        apex.prepend_label("dns")
            .and_then(|n| n.prepend_label("ns"))
            .unwrap_or(apex)
    }

    fn soa(&self) -> Record {
        let apex = self.apex_name();
        let rname = apex.prepend_label("hostmaster").unwrap_or(apex.clone());
        let soa = SOA::new(
            self.ns_name(),
            rname,
            self.snapshot.version as u32,
            7200,
            1800,
            86400,
            self.ttl(),
        );
        Record::from_rdata(apex, self.ttl(), RData::SOA(soa))
    }

    fn soa_authority(&mut self) {
        let soa = self.soa();
        self.out.authorities.push(soa);
    }
}

fn address_record(owner: Name, ttl: u32, ip: IpAddr) -> Record {
    let data = match ip {
        IpAddr::V4(v4) => RData::A(A(v4)),
        IpAddr::V6(v6) => RData::AAAA(AAAA(v6)),
    };
    Record::from_rdata(owner, ttl, data)
}

/// The first label of an endpoint's own name: its hostname, or its address
/// with dashes (`10-0-0-1`, `fd00--1`).
pub fn endpoint_label(ep: &EndpointState) -> String {
    match &ep.endpoint.hostname {
        Some(h) => h.to_ascii_lowercase(),
        None => ep.endpoint.ip.to_string().replace(['.', ':'], "-"),
    }
}

/// The name of a service or endpoint in `zone`, for PTR answers.
fn service_name(zone: &Zone, key: &ServiceKey, host: Option<&str>) -> Option<Name> {
    let mut name = zone.apex.prepend_label("svc").ok()?;
    name = name
        .prepend_label(Label::from_raw_bytes(key.namespace.as_bytes()).ok()?)
        .ok()?;
    name = name
        .prepend_label(Label::from_raw_bytes(key.name.as_bytes()).ok()?)
        .ok()?;
    if let Some(host) = host {
        name = name
            .prepend_label(Label::from_raw_bytes(host.as_bytes()).ok()?)
            .ok()?;
    }
    Some(name)
}

/// PTR for the vips and serving endpoints of the snapshot.
fn reverse(snapshot: &Snapshot, zone: &Zone, query: &Query) -> Outcome {
    let Ok(net) = query.name.parse_arpa_name() else {
        return Outcome::NotOurs;
    };
    if net.prefix_len() != net.max_prefix_len() || !snapshot.ready {
        return Outcome::NotOurs;
    }
    // One lookup in the snapshot's index, not a scan of every endpoint:
    // an unknown address costs a hash probe (issue 11, defect 6).
    let owners = snapshot.index().by_ip.get(&net.addr());
    let mut targets: Vec<Name> = owners
        .into_iter()
        .flatten()
        .filter_map(|o| service_name(zone, &o.service, o.host.as_deref()))
        .collect();
    if targets.is_empty() {
        return Outcome::NotOurs;
    }
    targets.dedup();
    let mut out = ZoneAnswer::default();
    match query.query_type {
        RecordType::PTR => {
            for t in targets {
                out.answers.push(Record::from_rdata(
                    query.name.clone(),
                    zone.ttl,
                    RData::PTR(PTR(t)),
                ));
            }
        }
        RecordType::ANY => {
            let hinfo = HINFO::new("RFC8482".into(), String::new());
            out.answers.push(Record::from_rdata(
                query.name.clone(),
                zone.ttl,
                RData::HINFO(hinfo),
            ));
        }
        // NODATA: the reverse zone's SOA is not ours to invent, so none.
        _ => {}
    }
    Outcome::Answer(out)
}

#[cfg(test)]
pub(crate) mod tests;
