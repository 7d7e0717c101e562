//! What of an upstream's reply beacon passes on and caches: only records on
//! the question's name and its CNAME chain, never a record at or below
//! beacon's own zone, and of the authority section only the SOA that
//! explains a negative answer (issue 11, defect 11: a hostile upstream put
//! `web.default.svc.cluster.local A 6.6.6.6` in the additional section and
//! it was cached and served).
//!
//! The additional section is dropped: a stub forwarder has no use for glue,
//! and it is where cache poisoning hides. DNSSEC records are not validated
//! here, so only the RRSIGs on kept names travel with them.

use hickory_proto::op::{Message, Query};
use hickory_proto::rr::{Name, RData, Record, RecordType};

/// Keeps of `reply` what answers `question` (lower-cased) and is outside
/// `zone`.
pub fn sanitize(reply: &mut Message, question: &Query, zone: &Name) {
    let outside = |n: &Name| !zone.zone_of(n);
    let mut chain: Vec<Name> = vec![question.name.to_lowercase()];
    let mut answers = std::mem::take(&mut reply.answers);
    let mut kept: Vec<Record> = Vec::new();
    // Follow the chain in as many passes as it has links (a reply may list
    // a CNAME's target before the CNAME itself).
    loop {
        let before = kept.len();
        answers.retain(|r| {
            let name = r.name.to_lowercase();
            if !chain.contains(&name) || !outside(&name) {
                return true; // not (yet) on the chain: look again next pass
            }
            let wanted = match r.record_type() {
                RecordType::CNAME => true,
                RecordType::RRSIG => true,
                t => question.query_type == RecordType::ANY || t == question.query_type,
            };
            if wanted {
                if let RData::CNAME(target) = &r.data {
                    let target = target.0.to_lowercase();
                    if !chain.contains(&target) {
                        chain.push(target);
                    }
                }
                kept.push(r.clone());
            }
            false
        });
        if kept.len() == before {
            break;
        }
    }
    reply.answers = kept;
    let last = chain.last().cloned().unwrap_or_else(Name::root);
    reply.authorities.retain(|r| {
        r.record_type() == RecordType::SOA && outside(&r.name) && r.name.zone_of(&last)
    });
    reply.additionals.clear();
}

#[cfg(test)]
mod tests {
    use hickory_proto::op::{MessageType, OpCode};
    use hickory_proto::rr::rdata::{A, CNAME, SOA};

    use super::*;

    fn name(s: &str) -> Name {
        Name::from_ascii(s).unwrap()
    }

    fn a(owner: &str, ip: &str) -> Record {
        Record::from_rdata(name(owner), 60, RData::A(A(ip.parse().unwrap())))
    }

    fn cname(owner: &str, target: &str) -> Record {
        Record::from_rdata(name(owner), 60, RData::CNAME(CNAME(name(target))))
    }

    fn soa(owner: &str) -> Record {
        let soa = SOA::new(name("ns."), name("h."), 1, 1, 1, 1, 60);
        Record::from_rdata(name(owner), 3600, RData::SOA(soa))
    }

    fn reply(answers: Vec<Record>, authorities: Vec<Record>, additionals: Vec<Record>) -> Message {
        let mut m = Message::new(1, MessageType::Response, OpCode::Query);
        m.answers = answers;
        m.authorities = authorities;
        m.additionals = additionals;
        m
    }

    fn owners(rs: &[Record]) -> Vec<String> {
        rs.iter()
            .map(|r| format!("{} {}", r.name, r.record_type()))
            .collect()
    }

    #[test]
    fn records_outside_the_question_and_inside_the_zone_are_dropped() {
        let zone = name("cluster.local.");
        let q = Query::query(name("example.com."), RecordType::A);
        let mut m = reply(
            vec![
                a("evil.example.net.", "6.6.6.6"),
                a("Example.COM.", "192.0.2.7"),
                a("web.default.svc.cluster.local.", "6.6.6.6"),
            ],
            vec![soa("cluster.local."), soa("com.")],
            vec![a("web.default.svc.cluster.local.", "6.6.6.6")],
        );
        sanitize(&mut m, &q, &zone);
        assert_eq!(owners(&m.answers), vec!["Example.COM. A"]);
        assert_eq!(owners(&m.authorities), vec!["com. SOA"]);
        assert!(m.additionals.is_empty());
    }

    #[test]
    fn a_cname_chain_is_followed_out_of_order_but_never_into_the_zone() {
        let zone = name("cluster.local.");
        let q = Query::query(name("www.example.com."), RecordType::A);
        let mut m = reply(
            vec![
                a("b.example.org.", "1.2.3.4"),
                cname("a.example.net.", "web.default.svc.cluster.local."),
                a("web.default.svc.cluster.local.", "6.6.6.6"),
                cname("www.example.com.", "a.example.net."),
            ],
            vec![],
            vec![],
        );
        sanitize(&mut m, &q, &zone);
        assert_eq!(
            owners(&m.answers),
            vec!["www.example.com. CNAME", "a.example.net. CNAME"]
        );
    }
}
