//! Message bytes → the DNS handler, over UDP and TCP rules, with a cold and
//! a warm fast-path cache. Checks: no panic; a reply carries the query's ID,
//! has QR set, parses, fits the UDP limit; the fast path's bytes equal the
//! slow path's.
#![no_main]

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use beacon::config::DnsConfig;
use beacon::dns::fast::FastCache;
use beacon::dns::{Handler, Proto, Reply};
use beacon::model::{Endpoint, EndpointState, Health, Port, Protocol, ServiceKey, ServiceSpec, ServiceState, Snapshot};
use hickory_proto::op::Message;
use libfuzzer_sys::fuzz_target;

fn fixture() -> &'static (Handler, Snapshot) {
    static FIXTURE: OnceLock<(Handler, Snapshot)> = OnceLock::new();
    FIXTURE.get_or_init(|| {
        let cfg = DnsConfig {
            enabled: true,
            listen: "127.0.0.1:0".parse().unwrap(),
            zone: "cluster.local".into(),
            ttl: 5,
            forward: vec!["127.0.0.1:9".parse().unwrap()],
            forward_allow: vec!["127.0.0.0/8".parse().unwrap()],
            cache_size: 100,
            udp_sockets: 1,
            forward_timeout: Duration::from_millis(100),
            tcp_idle_timeout: Duration::from_secs(1),
            tcp_max_connections: 1,
            ..DnsConfig::default()
        };
        let mut services = BTreeMap::new();
        for (name, vip, n) in [("web", Some("10.96.0.1"), 3), ("db", None, 2), ("big", None, 60)] {
            let mut spec = ServiceSpec::new(ServiceKey::new("default", name));
            spec.vip = vip.map(|v| v.parse().unwrap());
            spec.ports = vec![Port {
                name: "http".into(),
                port: 80,
                target_port: 8080,
                protocol: Protocol::Tcp,
                listen: None,
            }];
            spec.endpoints = (0..n)
                .map(|i| Endpoint {
                    hostname: (i == 0).then(|| "first".into()),
                    ..Endpoint::new(format!("10.0.{}.{}", n, i + 1).parse().unwrap())
                })
                .collect();
            let spec = Arc::new(spec);
            let eps = spec
                .endpoints
                .iter()
                .map(|e| EndpointState::new(e.clone(), Health::default(), &spec.health))
                .collect();
            services.insert(spec.key.clone(), Arc::new(ServiceState::new(spec.clone(), "fuzz".into(), eps)));
        }
        let snap = Snapshot {
            version: 1,
            ready: true,
            services: services.into(),
            ..Default::default()
        };
        (beacon::dns::handler(&cfg).unwrap(), snap)
    })
}

fuzz_target!(|data: &[u8]| {
    let (handler, snap) = fixture();
    let client: IpAddr = "127.0.0.1".parse().unwrap();
    for proto in [Proto::Udp, Proto::Tcp] {
        let rotate = data.len();
        let mut slow = Vec::new();
        let slow_reply = handler.slow(snap, data, client, proto, rotate, &mut slow);
        let mut cache = FastCache::new(8 * 1024, 8);
        for _ in 0..2 {
            let mut out = Vec::new();
            let reply = handler.handle(&mut cache, snap, data, client, proto, rotate, &mut out);
            match (&reply, &slow_reply) {
                (Reply::Send { .. }, Reply::Send { .. }) => {
                    assert_eq!(out, slow, "fast and slow paths differ");
                    assert_eq!(&out[..2], &data[..2], "reply keeps the ID");
                    assert!(out[2] & 0x80 != 0, "reply has QR");
                    if proto == Proto::Udp {
                        assert!(out.len() <= 1232);
                    }
                    assert!(Message::from_vec(&out).is_ok(), "our reply parses");
                }
                (Reply::Forward(_), Reply::Forward(_)) | (Reply::Drop, Reply::Drop) => {}
                (a, b) => panic!("fast {a:?} vs slow {b:?}"),
            }
        }
    }
});
