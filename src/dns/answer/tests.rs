use std::net::IpAddr;
use std::sync::Arc;

use hickory_proto::op::{Query, ResponseCode};
use hickory_proto::rr::{DNSClass, Name, RData, Record, RecordType};

use super::*;
use crate::model::{
    Endpoint, EndpointState, Health, Port, ProbeState, Protocol, ServiceKey, ServiceSpec,
    ServiceState, Snapshot,
};

pub(crate) struct Ep {
    pub ip: &'static str,
    pub host: Option<&'static str>,
    pub healthy: bool,
    pub weight: u32,
    pub port: Option<u16>,
}

pub(crate) fn ep(ip: &'static str) -> Ep {
    Ep {
        ip,
        host: None,
        healthy: true,
        weight: 1,
        port: None,
    }
}

pub(crate) fn service(ns: &str, name: &str, vip: Option<&str>, eps: Vec<Ep>) -> ServiceState {
    let mut spec = ServiceSpec::new(ServiceKey::new(ns, name));
    spec.vip = vip.map(|v| v.parse().unwrap());
    spec.ports = vec![
        Port {
            name: "http".into(),
            port: 80,
            target_port: 8080,
            protocol: Protocol::Tcp,
            listen: None,
        },
        Port {
            name: "dns".into(),
            port: 53,
            target_port: 53,
            protocol: Protocol::Udp,
            listen: None,
        },
        Port {
            name: "".into(),
            port: 9000,
            target_port: 9000,
            protocol: Protocol::Tcp,
            listen: None,
        },
    ];
    spec.endpoints = eps
        .iter()
        .map(|e| Endpoint {
            hostname: e.host.map(Into::into),
            weight: e.weight,
            port: e.port,
            ..Endpoint::new(e.ip.parse().unwrap())
        })
        .collect();
    let spec = Arc::new(spec);
    let states = spec
        .endpoints
        .iter()
        .zip(&eps)
        .map(|(endpoint, e)| {
            let probe = if e.healthy {
                ProbeState::Up
            } else {
                ProbeState::Down("probe failed".into())
            };
            let health = Health {
                probe,
                ejected: None,
            };
            EndpointState::new(endpoint.clone(), health, &spec.health)
        })
        .collect();
    ServiceState::new(spec, "test".into(), states)
}

pub(crate) fn snapshot(services: Vec<ServiceState>) -> Snapshot {
    let services: crate::model::ServiceMap = services
        .into_iter()
        .map(|s| (s.key().clone(), Arc::new(s)))
        .collect();
    Snapshot {
        version: 7,
        ready: true,
        services,
        ..Snapshot::default()
    }
}

/// web (vip 10.96.0.10, three endpoints, one unhealthy), db (headless, with
/// hostnames), empty (headless, nothing healthy), v6 (headless, one v6 endpoint).
pub(crate) fn demo() -> Snapshot {
    snapshot(vec![
        service(
            "default",
            "web",
            Some("10.96.0.10"),
            vec![
                ep("10.0.0.1"),
                ep("10.0.0.2"),
                Ep {
                    healthy: false,
                    ..ep("10.0.0.3")
                },
            ],
        ),
        service(
            "prod",
            "db",
            None,
            vec![
                Ep {
                    host: Some("db-0"),
                    weight: 5,
                    ..ep("10.1.0.1")
                },
                Ep {
                    host: Some("db-1"),
                    port: Some(9999),
                    ..ep("10.1.0.2")
                },
                Ep {
                    host: Some("db-2"),
                    healthy: false,
                    ..ep("10.1.0.3")
                },
                ep("10.1.0.4"),
            ],
        ),
        service(
            "prod",
            "empty",
            None,
            vec![Ep {
                healthy: false,
                ..ep("10.2.0.1")
            }],
        ),
        service("prod", "v6", None, vec![ep("fd00::1")]),
    ])
}

pub(crate) fn zone() -> Zone {
    Zone::new("cluster.local", 5).unwrap()
}

fn ask(snap: &Snapshot, name: &str, qtype: RecordType) -> Outcome {
    ask_rot(snap, name, qtype, 0)
}

fn ask_rot(snap: &Snapshot, name: &str, qtype: RecordType, rotate: usize) -> Outcome {
    let q = Query::query(Name::from_ascii(name).unwrap(), qtype);
    answer(snap, &zone(), &q, rotate)
}

fn zone_answer(o: Outcome) -> ZoneAnswer {
    match o {
        Outcome::Answer(za) => za,
        Outcome::NotOurs => panic!("expected an answer, got NotOurs"),
    }
}

fn ips(records: &[Record]) -> Vec<IpAddr> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::A(a) => Some(IpAddr::V4(a.0)),
            RData::AAAA(a) => Some(IpAddr::V6(a.0)),
            _ => None,
        })
        .collect()
}

fn sorted(mut v: Vec<IpAddr>) -> Vec<IpAddr> {
    v.sort();
    v
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn assert_negative(za: &ZoneAnswer, rcode: ResponseCode) {
    assert_eq!(za.rcode, rcode);
    assert!(za.answers.is_empty(), "no answers: {:?}", za.answers);
    assert_eq!(za.authorities.len(), 1, "SOA in authority");
    let soa = &za.authorities[0];
    assert_eq!(soa.name, Name::from_ascii("cluster.local.").unwrap());
    match &soa.data {
        RData::SOA(s) => {
            assert_eq!(s.minimum, 5, "negative TTL is the zone ttl");
            assert_eq!(s.serial, 7, "serial is the snapshot version");
            assert_eq!(s.mname, Name::from_ascii("ns.dns.cluster.local.").unwrap());
        }
        other => panic!("authority is not an SOA: {other:?}"),
    }
    assert_eq!(soa.ttl, 5);
}

#[test]
fn cluster_ip_service_answers_its_vip() {
    let za = zone_answer(ask(
        &demo(),
        "web.default.svc.cluster.local.",
        RecordType::A,
    ));
    assert_eq!(za.rcode, ResponseCode::NoError);
    assert_eq!(ips(&za.answers), vec![ip("10.96.0.10")]);
    assert_eq!(za.answers[0].ttl, 5);
    assert_eq!(za.answers[0].dns_class, DNSClass::IN);
    assert!(za.authorities.is_empty());
}

#[test]
fn dual_stack_service_answers_a_and_aaaa_with_its_two_vips() {
    let mut svc = service("default", "dual", Some("10.96.0.10"), vec![ep("10.0.0.1")]);
    Arc::make_mut(&mut svc.spec).second_vip = Some(ip("fd00::10"));
    let snap = snapshot(vec![svc]);
    let name = "dual.default.svc.cluster.local.";
    let a = zone_answer(ask(&snap, name, RecordType::A));
    assert_eq!(ips(&a.answers), vec![ip("10.96.0.10")]);
    let aaaa = zone_answer(ask(&snap, name, RecordType::AAAA));
    assert_eq!(ips(&aaaa.answers), vec![ip("fd00::10")]);
    // SRV's additionals carry both.
    let srv = zone_answer(ask(
        &snap,
        "_http._tcp.dual.default.svc.cluster.local.",
        RecordType::SRV,
    ));
    assert_eq!(
        sorted(ips(&srv.additionals)),
        vec![ip("10.96.0.10"), ip("fd00::10")]
    );
    // Both point back at the service.
    let ptr = zone_answer(ask(
        &snap,
        "0.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa.",
        RecordType::PTR,
    ));
    assert_eq!(ptr.answers.len(), 1, "{ptr:?}");
}

#[test]
fn headless_service_answers_serving_endpoints_only() {
    let za = zone_answer(ask(&demo(), "db.prod.svc.cluster.local.", RecordType::A));
    assert_eq!(
        sorted(ips(&za.answers)),
        vec![ip("10.1.0.1"), ip("10.1.0.2"), ip("10.1.0.4")]
    );
}

#[test]
fn headless_service_with_nothing_healthy_is_nxdomain() {
    for name in [
        "empty.prod.svc.cluster.local.",
        "_http._tcp.empty.prod.svc.cluster.local.",
        "10-2-0-1.empty.prod.svc.cluster.local.",
    ] {
        let za = zone_answer(ask(&demo(), name, RecordType::A));
        assert_negative(&za, ResponseCode::NXDomain);
    }
}

#[test]
fn absent_names_are_nxdomain_with_soa() {
    for name in [
        "nope.default.svc.cluster.local.",
        "web.nope.svc.cluster.local.",
        "x.y.web.default.svc.cluster.local.",
        "a.b.c.d.e.f.svc.cluster.local.",
        "foo.cluster.local.",
        "nope.svc.cluster.local.",
        "db-2.db.prod.svc.cluster.local.",
        "_nope._tcp.db.prod.svc.cluster.local.",
        "_http._udp.db.prod.svc.cluster.local.",
        "_sctp.db.prod.svc.cluster.local.",
    ] {
        let za = zone_answer(ask(&demo(), name, RecordType::A));
        assert_negative(&za, ResponseCode::NXDomain);
    }
}

#[test]
fn existing_names_without_the_type_are_nodata_with_soa() {
    for (name, qtype) in [
        ("web.default.svc.cluster.local.", RecordType::AAAA),
        ("web.default.svc.cluster.local.", RecordType::MX),
        ("web.default.svc.cluster.local.", RecordType::SRV),
        ("v6.prod.svc.cluster.local.", RecordType::A),
        ("svc.cluster.local.", RecordType::A),
        ("prod.svc.cluster.local.", RecordType::A),
        ("_tcp.db.prod.svc.cluster.local.", RecordType::SRV),
        ("_http._tcp.db.prod.svc.cluster.local.", RecordType::A),
        ("cluster.local.", RecordType::A),
        ("dns-version.cluster.local.", RecordType::A),
        ("ns.dns.cluster.local.", RecordType::A),
    ] {
        let za = zone_answer(ask(&demo(), name, qtype));
        assert_negative(&za, ResponseCode::NoError);
    }
}

#[test]
fn aaaa_answers_v6_endpoints() {
    let za = zone_answer(ask(&demo(), "v6.prod.svc.cluster.local.", RecordType::AAAA));
    assert_eq!(ips(&za.answers), vec![ip("fd00::1")]);
    assert_eq!(za.answers[0].record_type(), RecordType::AAAA);
}

#[test]
fn endpoint_names_by_hostname_and_dashed_address() {
    let snap = demo();
    let za = zone_answer(ask(&snap, "db-1.db.prod.svc.cluster.local.", RecordType::A));
    assert_eq!(ips(&za.answers), vec![ip("10.1.0.2")]);
    let za = zone_answer(ask(
        &snap,
        "10-1-0-4.db.prod.svc.cluster.local.",
        RecordType::A,
    ));
    assert_eq!(ips(&za.answers), vec![ip("10.1.0.4")]);
    let za = zone_answer(ask(
        &snap,
        "fd00--1.v6.prod.svc.cluster.local.",
        RecordType::AAAA,
    ));
    assert_eq!(ips(&za.answers), vec![ip("fd00::1")]);
    // An unhealthy endpoint has no name.
    let za = zone_answer(ask(
        &snap,
        "10-0-0-3.web.default.svc.cluster.local.",
        RecordType::A,
    ));
    assert_negative(&za, ResponseCode::NXDomain);
}

#[test]
fn srv_of_headless_service_lists_endpoints_with_additionals() {
    let za = zone_answer(ask(
        &demo(),
        "_http._tcp.db.prod.svc.cluster.local.",
        RecordType::SRV,
    ));
    assert_eq!(za.rcode, ResponseCode::NoError);
    let mut srvs: Vec<(String, u16, u16, u16)> = za
        .answers
        .iter()
        .map(|r| match &r.data {
            RData::SRV(s) => (s.target.to_ascii(), s.priority, s.weight, s.port),
            other => panic!("not SRV: {other:?}"),
        })
        .collect();
    srvs.sort();
    assert_eq!(
        srvs,
        vec![
            ("10-1-0-4.db.prod.svc.cluster.local.".into(), 0, 1, 8080),
            ("db-0.db.prod.svc.cluster.local.".into(), 0, 5, 8080),
            ("db-1.db.prod.svc.cluster.local.".into(), 0, 1, 9999),
        ]
    );
    let mut extra: Vec<(String, IpAddr)> = za
        .additionals
        .iter()
        .map(|r| (r.name.to_ascii(), ips(std::slice::from_ref(r))[0]))
        .collect();
    extra.sort();
    assert_eq!(
        extra,
        vec![
            ("10-1-0-4.db.prod.svc.cluster.local.".into(), ip("10.1.0.4")),
            ("db-0.db.prod.svc.cluster.local.".into(), ip("10.1.0.1")),
            ("db-1.db.prod.svc.cluster.local.".into(), ip("10.1.0.2")),
        ]
    );
}

#[test]
fn srv_of_cluster_ip_service_points_at_the_service() {
    let za = zone_answer(ask(
        &demo(),
        "_dns._udp.web.default.svc.cluster.local.",
        RecordType::SRV,
    ));
    assert_eq!(za.answers.len(), 1);
    match &za.answers[0].data {
        RData::SRV(s) => {
            assert_eq!(s.port, 53);
            assert_eq!(s.target.to_ascii(), "web.default.svc.cluster.local.");
        }
        other => panic!("not SRV: {other:?}"),
    }
    assert_eq!(ips(&za.additionals), vec![ip("10.96.0.10")]);
}

#[test]
fn unnamed_ports_have_no_srv() {
    let za = zone_answer(ask(
        &demo(),
        "_._tcp.web.default.svc.cluster.local.",
        RecordType::SRV,
    ));
    assert_negative(&za, ResponseCode::NXDomain);
}

#[test]
fn ptr_for_endpoints_and_vips() {
    let snap = demo();
    let target = |name: &str| -> Vec<String> {
        let za = zone_answer(ask(&snap, name, RecordType::PTR));
        za.answers
            .iter()
            .map(|r| match &r.data {
                RData::PTR(p) => p.0.to_ascii(),
                other => panic!("not PTR: {other:?}"),
            })
            .collect()
    };
    assert_eq!(
        target("1.0.1.10.in-addr.arpa."),
        vec!["db-0.db.prod.svc.cluster.local."]
    );
    assert_eq!(
        target("4.0.1.10.in-addr.arpa."),
        vec!["db.prod.svc.cluster.local."]
    );
    assert_eq!(
        target("10.0.96.10.in-addr.arpa."),
        vec!["web.default.svc.cluster.local."]
    );
    assert_eq!(
        target("1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.d.f.ip6.arpa."),
        vec!["v6.prod.svc.cluster.local."]
    );
    // Unknown and unhealthy addresses are not ours (forwarded or refused).
    assert_eq!(
        ask(&snap, "3.0.1.10.in-addr.arpa.", RecordType::PTR),
        Outcome::NotOurs
    );
    assert_eq!(
        ask(&snap, "9.9.9.9.in-addr.arpa.", RecordType::PTR),
        Outcome::NotOurs
    );
    assert_eq!(
        ask(&snap, "1.10.in-addr.arpa.", RecordType::PTR),
        Outcome::NotOurs
    );
}

/// PTR and `<ns>.svc` answers come from the snapshot's index, built once
/// on the first such question, never from a scan per query (defect 6: an
/// unknown address cost a walk over every endpoint). The proof: services
/// slipped into the map after the index was built are invisible to both,
/// which a per-query scan would find.
#[test]
fn reverse_and_namespace_questions_use_the_index_built_once() {
    let mut snap = demo();
    assert!(!snap.index.is_built(), "built before any question");
    assert!(matches!(
        ask(&snap, "web.default.svc.cluster.local.", RecordType::A),
        Outcome::Answer(_)
    ));
    assert!(!snap.index.is_built(), "an A question must not build it");
    assert_eq!(
        ask(&snap, "9.9.9.9.in-addr.arpa.", RecordType::PTR),
        Outcome::NotOurs
    );
    assert!(snap.index.is_built());
    let late = service("late", "svc", Some("10.96.9.9"), vec![ep("10.9.9.1")]);
    snap.services.insert(late.key().clone(), Arc::new(late));
    assert_eq!(
        ask(&snap, "1.9.9.10.in-addr.arpa.", RecordType::PTR),
        Outcome::NotOurs
    );
    let za = zone_answer(ask(&snap, "late.svc.cluster.local.", RecordType::A));
    assert_eq!(za.rcode, ResponseCode::NXDomain, "namespace from the index");
    // A clone (what the registry publishes next) starts with no index.
    let next = snap.clone();
    assert!(!next.index.is_built());
    let za = zone_answer(ask(&next, "1.9.9.10.in-addr.arpa.", RecordType::PTR));
    assert_eq!(za.answers.len(), 1);
    let za = zone_answer(ask(&next, "late.svc.cluster.local.", RecordType::A));
    assert_eq!(za.rcode, ResponseCode::NoError);
}

#[test]
fn dns_version_apex_soa_ns_and_any() {
    let snap = demo();
    let za = zone_answer(ask(&snap, "dns-version.cluster.local.", RecordType::TXT));
    match &za.answers[0].data {
        RData::TXT(t) => assert_eq!(t.to_string(), "1.1.0"),
        other => panic!("not TXT: {other:?}"),
    }
    let za = zone_answer(ask(&snap, "cluster.local.", RecordType::SOA));
    assert!(matches!(za.answers[0].data, RData::SOA(_)));
    let za = zone_answer(ask(&snap, "cluster.local.", RecordType::NS));
    match &za.answers[0].data {
        RData::NS(ns) => assert_eq!(ns.0.to_ascii(), "ns.dns.cluster.local."),
        other => panic!("not NS: {other:?}"),
    }
    // RFC 8482: ANY gets one synthesized HINFO.
    let za = zone_answer(ask(&snap, "db.prod.svc.cluster.local.", RecordType::ANY));
    assert_eq!(za.answers.len(), 1);
    assert!(matches!(za.answers[0].data, RData::HINFO(_)));
    let za = zone_answer(ask(&snap, "nope.prod.svc.cluster.local.", RecordType::ANY));
    assert_negative(&za, ResponseCode::NXDomain);
}

#[test]
fn names_match_case_insensitively_and_echo_the_case() {
    let snap = demo();
    let za = zone_answer(ask(&snap, "DB-0.Db.PROD.svc.Cluster.LOCAL.", RecordType::A));
    assert_eq!(ips(&za.answers), vec![ip("10.1.0.1")]);
    assert_eq!(
        za.answers[0].name.to_ascii(),
        "DB-0.Db.PROD.svc.Cluster.LOCAL."
    );
    let za = zone_answer(ask(&snap, "NOPE.Cluster.Local.", RecordType::A));
    assert_eq!(za.authorities[0].name.to_ascii(), "Cluster.Local.");
}

#[test]
fn address_order_rotates() {
    let snap = demo();
    let orders: Vec<Vec<IpAddr>> = (0..3)
        .map(|k| {
            ips(&zone_answer(ask_rot(
                &snap,
                "db.prod.svc.cluster.local.",
                RecordType::A,
                k,
            ))
            .answers)
        })
        .collect();
    assert_ne!(orders[0], orders[1]);
    assert_ne!(orders[1], orders[2]);
    assert_eq!(orders[0][1], orders[1][0], "rotation by one");
    for o in &orders {
        assert_eq!(sorted(o.clone()), sorted(orders[0].clone()));
    }
}

#[test]
fn not_ready_is_servfail_in_the_zone_only() {
    let mut snap = demo();
    snap.ready = false;
    let za = zone_answer(ask(&snap, "web.default.svc.cluster.local.", RecordType::A));
    assert_eq!(za.rcode, ResponseCode::ServFail);
    assert!(za.answers.is_empty());
    assert_eq!(ask(&snap, "example.com.", RecordType::A), Outcome::NotOurs);
}

#[test]
fn outside_the_zone_or_class_is_not_ours() {
    let snap = demo();
    assert_eq!(ask(&snap, "example.com.", RecordType::A), Outcome::NotOurs);
    assert_eq!(ask(&snap, "local.", RecordType::A), Outcome::NotOurs);
    assert_eq!(
        ask(&snap, "xcluster.local.", RecordType::A),
        Outcome::NotOurs
    );
    let mut q = Query::query(
        Name::from_ascii("web.default.svc.cluster.local.").unwrap(),
        RecordType::A,
    );
    q.query_class = DNSClass::CH;
    assert_eq!(answer(&snap, &zone(), &q, 0), Outcome::NotOurs);
}

fn alias(ns: &str, name: &str, target: &str) -> ServiceState {
    let mut spec = ServiceSpec::new(ServiceKey::new(ns, name));
    spec.external_name = Some(target.into());
    ServiceState::new(Arc::new(spec), "test".into(), Vec::new())
}

fn cname_targets(records: &[Record]) -> Vec<String> {
    records
        .iter()
        .filter_map(|r| match &r.data {
            RData::CNAME(c) => Some(c.0.to_string()),
            _ => None,
        })
        .collect()
}

#[test]
fn an_alias_answers_a_cname_and_follows_it_only_inside_the_zone() {
    let mut services: Vec<ServiceState> = demo().services.values().map(|s| (**s).clone()).collect();
    services.push(alias("prod", "mail", "mail.example.com"));
    services.push(alias("prod", "front", "web.default.svc.cluster.local"));
    services.push(alias("prod", "loop", "loop.prod.svc.cluster.local"));
    let snap = snapshot(services);
    for qtype in [
        RecordType::A,
        RecordType::AAAA,
        RecordType::CNAME,
        RecordType::TXT,
    ] {
        let za = zone_answer(ask(&snap, "mail.prod.svc.cluster.local.", qtype));
        assert_eq!(za.rcode, ResponseCode::NoError);
        assert_eq!(cname_targets(&za.answers), ["mail.example.com."], "{qtype}");
        assert_eq!(za.answers.len(), 1, "the outside target is not chased");
    }
    let za = zone_answer(ask(&snap, "front.prod.svc.cluster.local.", RecordType::A));
    assert_eq!(
        cname_targets(&za.answers),
        ["web.default.svc.cluster.local."]
    );
    assert_eq!(ips(&za.answers), [ip("10.96.0.10")]);
    assert_eq!(
        za.answers[1].name.to_string(),
        "web.default.svc.cluster.local."
    );
    // A CNAME query is not chased; an alias to itself is one CNAME, no loop.
    let za = zone_answer(ask(
        &snap,
        "front.prod.svc.cluster.local.",
        RecordType::CNAME,
    ));
    assert_eq!(za.answers.len(), 1);
    let za = zone_answer(ask(&snap, "loop.prod.svc.cluster.local.", RecordType::A));
    assert_eq!(za.answers.len(), 1);
    // The alias's namespace exists.
    assert!(snap.index().namespaces.contains("prod"));
}

#[test]
fn a_terminating_endpoint_is_never_in_dns() {
    let mut spec = ServiceSpec::new(ServiceKey::new("prod", "app"));
    let mut old = Endpoint::new(ip("10.3.0.1"));
    old.ready = false;
    old.terminating = true;
    spec.endpoints = vec![old];
    let spec = Arc::new(spec);
    let states = spec
        .endpoints
        .iter()
        .map(|e| EndpointState::new(e.clone(), Health::default(), &spec.health))
        .collect();
    let state = ServiceState::new(spec, "test".into(), states);
    assert_eq!(state.proxied().count(), 1, "the proxy's fallback");
    let snap = snapshot(vec![state]);
    let za = zone_answer(ask(&snap, "app.prod.svc.cluster.local.", RecordType::A));
    assert_negative(&za, ResponseCode::NXDomain);
}
