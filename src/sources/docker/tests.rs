use super::*;

fn container(name: &str, ip: &str, labels: &[(&str, &str)]) -> Container {
    Container {
        id: format!("id-{name}"),
        name: name.to_string(),
        labels: labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        state: RunState::Running,
        health: HealthStatus::None,
        networks: BTreeMap::from([("demo".to_string(), Some(ip.parse().unwrap()))]),
    }
}

fn web(name: &str, ip: &str) -> Container {
    container(
        name,
        ip,
        &[("beacon.service", "web"), ("beacon.port", "8080")],
    )
}

fn err_text(c: &Container) -> String {
    member(c, None).unwrap_err().to_string()
}

#[test]
fn minimal_labels_make_a_ready_endpoint_in_default_namespace() {
    let m = member(&web("web-1", "172.28.0.11"), None).unwrap().unwrap();
    assert_eq!(m.key, ServiceKey::new("default", "web"));
    assert_eq!(m.container, "web-1");
    assert_eq!(m.endpoint.ip.to_string(), "172.28.0.11");
    assert!(m.endpoint.ready);
    assert_eq!(m.endpoint.weight, 1);
    assert_eq!(m.endpoint.hostname, None);
    assert_eq!(m.ports.len(), 1);
    assert_eq!((m.ports[0].port, m.ports[0].target_port), (8080, 8080));
    assert_eq!(&*m.ports[0].name, "");
    assert_eq!(m.ports[0].listen, None);
    assert_eq!(m.balance, None);
}

#[test]
fn every_label_is_read() {
    let c = container(
        "api-a",
        "10.1.2.3",
        &[
            ("beacon.service", "API"),
            ("beacon.namespace", "shop"),
            ("beacon.port", "http:8080, admin:9090"),
            ("beacon.listen", "http=0.0.0.0:80,admin=127.0.0.1:9090"),
            ("beacon.weight", "7"),
            ("beacon.hostname", "api-0"),
            ("beacon.balance", "least_conn"),
        ],
    );
    let m = member(&c, None).unwrap().unwrap();
    assert_eq!(m.key, ServiceKey::new("shop", "api"));
    assert_eq!(m.endpoint.weight, 7);
    assert_eq!(m.endpoint.hostname.as_deref(), Some("api-0"));
    assert_eq!(m.balance, Some(Balance::LeastConn));
    let ports: Vec<(&str, u16, Option<String>)> = m
        .ports
        .iter()
        .map(|p| (&*p.name, p.port, p.listen.map(|l| l.to_string())))
        .collect();
    assert_eq!(
        ports,
        vec![
            ("http", 8080, Some("0.0.0.0:80".to_string())),
            ("admin", 9090, Some("127.0.0.1:9090".to_string())),
        ]
    );
    // A single port takes a bare listen address.
    let c = container(
        "w",
        "10.1.2.3",
        &[
            ("beacon.service", "w"),
            ("beacon.port", "8080"),
            ("beacon.listen", "0.0.0.0:80"),
        ],
    );
    let m = member(&c, None).unwrap().unwrap();
    assert_eq!(m.ports[0].listen, Some("0.0.0.0:80".parse().unwrap()));
}

#[test]
fn no_port_label_means_dns_only() {
    let c = container("w", "10.0.0.1", &[("beacon.service", "w")]);
    let m = member(&c, None).unwrap().unwrap();
    assert!(m.ports.is_empty());
    let spec = service_spec(&m.key, [&m], &ServiceDefaults::default()).unwrap();
    assert_eq!(spec.health.probe, ProbeKind::None);
}

#[test]
fn malformed_labels_are_errors_that_name_the_label() {
    let cases: &[(&[(&str, &str)], &str)] = &[
        (
            &[("beacon.service", "web_1")],
            "label beacon.service=`web_1`",
        ),
        (
            &[("beacon.service", "w"), ("beacon.namespace", "-x")],
            "beacon.namespace",
        ),
        (
            &[("beacon.service", "w"), ("beacon.port", "80a")],
            "`80a` is not a port",
        ),
        (
            &[("beacon.service", "w"), ("beacon.port", "0")],
            "`0` is not a port",
        ),
        (
            &[("beacon.service", "w"), ("beacon.port", "80,81")],
            "name each",
        ),
        (
            &[("beacon.service", "w"), ("beacon.port", "a:80,a:81")],
            "used twice",
        ),
        (
            &[("beacon.service", "w"), ("beacon.weight", "0")],
            "beacon.weight",
        ),
        (
            &[("beacon.service", "w"), ("beacon.weight", "70000")],
            "1-65535",
        ),
        (
            &[("beacon.service", "w"), ("beacon.hostname", "a.b")],
            "beacon.hostname",
        ),
        (
            &[("beacon.service", "w"), ("beacon.balance", "fastest")],
            "valid: round_robin",
        ),
        (
            &[("beacon.service", "w"), ("beacon.listen", "0.0.0.0:80")],
            "needs beacon.port",
        ),
        (
            &[
                ("beacon.service", "w"),
                ("beacon.port", "80"),
                ("beacon.listen", "80"),
            ],
            "not IP:PORT",
        ),
        (
            &[
                ("beacon.service", "w"),
                ("beacon.port", "http:80"),
                ("beacon.listen", "web=0.0.0.0:80"),
            ],
            "no port named `web`",
        ),
    ];
    for (labels, expect) in cases {
        let text = err_text(&container("c", "10.0.0.1", labels));
        assert!(
            text.contains(expect),
            "{labels:?}: `{text}` lacks `{expect}`"
        );
    }
}

#[test]
fn unlabeled_paused_and_stopped_contribute_nothing() {
    assert_eq!(
        member(&container("x", "10.0.0.1", &[("other", "1")]), None),
        Ok(None)
    );
    for state in [RunState::Paused, RunState::Stopped] {
        let mut c = web("w", "10.0.0.1");
        c.state = state;
        assert_eq!(member(&c, None), Ok(None), "{state:?}");
        // Even with a malformed label: a stopped container is just gone.
        c.labels.insert("beacon.port".into(), "nope".into());
        assert_eq!(member(&c, None), Ok(None), "{state:?}");
    }
}

#[test]
fn healthcheck_starting_or_unhealthy_is_not_ready() {
    for (health, ready) in [
        (HealthStatus::None, true),
        (HealthStatus::Healthy, true),
        (HealthStatus::Starting, false),
        (HealthStatus::Unhealthy, false),
    ] {
        let mut c = web("w", "10.0.0.1");
        c.health = health;
        let m = member(&c, None).unwrap().unwrap();
        assert_eq!(m.endpoint.ready, ready, "{health:?}");
    }
}

#[test]
fn ip_comes_from_the_configured_or_only_network() {
    let mut c = web("w", "10.0.0.1");
    c.networks
        .insert("other".into(), Some("192.168.5.5".parse().unwrap()));
    let ip =
        |c: &Container, n: Option<&str>| member(c, n).map(|m| m.unwrap().endpoint.ip.to_string());
    assert_eq!(ip(&c, Some("demo")).unwrap(), "10.0.0.1");
    assert_eq!(ip(&c, Some("other")).unwrap(), "192.168.5.5");
    let e = ip(&c, None).unwrap_err().to_string();
    assert!(e.contains("several networks (demo, other)"), "{e}");
    let e = ip(&c, Some("missing")).unwrap_err().to_string();
    assert!(e.contains("not attached to network `missing`"), "{e}");
    c.networks.remove("other");
    assert_eq!(ip(&c, None).unwrap(), "10.0.0.1");
    c.networks.insert("demo".into(), None);
    let e = ip(&c, None).unwrap_err().to_string();
    assert!(e.contains("no IP address on network `demo`"), "{e}");
    c.networks.clear();
    assert!(ip(&c, None).unwrap_err().to_string().contains("no network"));
}

#[test]
fn containers_with_one_service_label_form_one_service() {
    let mut defaults = ServiceDefaults::default();
    defaults.health.rise = 5;
    defaults.proxy.connect_attempts = 9;
    let mut b = web("web-b", "10.0.0.12");
    b.labels.insert("beacon.port".into(), "9999".into());
    let mut a = web("web-a", "10.0.0.13");
    a.labels.insert("beacon.balance".into(), "p2c".into());
    let cs = [
        b,
        a,
        web("web-c", "10.0.0.11"),
        container("db", "10.0.0.20", &[("beacon.service", "db")]),
    ];
    let members: Vec<Member> = cs
        .iter()
        .map(|c| member(c, None).unwrap().unwrap())
        .collect();
    let all = all_services(members.iter(), &defaults);
    assert_eq!(all.len(), 2);
    let web = &all[&ServiceKey::new("default", "web")];
    let ips: Vec<String> = web.endpoints.iter().map(|e| e.ip.to_string()).collect();
    assert_eq!(ips, ["10.0.0.11", "10.0.0.12", "10.0.0.13"]);
    // Service-wide settings come from the container whose name sorts first.
    assert_eq!(web.ports[0].port, 8080);
    assert_eq!(web.balance, Balance::P2c);
    assert_eq!(web.health.rise, 5);
    assert_eq!(web.proxy.connect_attempts, 9);
    assert!(web.is_headless());
    // Order of members does not matter.
    let reversed = all_services(members.iter().rev(), &defaults);
    assert_eq!(all, reversed);
    assert_eq!(
        service_spec(
            &ServiceKey::new("default", "none"),
            members.iter(),
            &defaults
        ),
        None
    );
}

fn event(
    typ: EventMessageTypeEnum,
    action: &str,
    id: &str,
    attrs: &[(&str, &str)],
) -> EventMessage {
    EventMessage {
        typ: Some(typ),
        action: Some(action.to_string()),
        actor: Some(bollard::models::EventActor {
            id: Some(id.to_string()),
            attributes: Some(
                attrs
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect(),
            ),
        }),
        ..Default::default()
    }
}

#[test]
fn classify_keeps_lifecycle_health_and_network_events() {
    use EventMessageTypeEnum::{CONTAINER, IMAGE, NETWORK};
    for action in [
        "start",
        "die",
        "stop",
        "kill",
        "pause",
        "unpause",
        "health_status: healthy",
        "health_status: unhealthy",
        "rename",
        "destroy",
    ] {
        assert_eq!(
            classify(&event(CONTAINER, action, "c1", &[])),
            EventAction::Inspect("c1".into()),
            "{action}"
        );
    }
    for action in [
        "exec_create: /beacon probe",
        "exec_start: x",
        "exec_die",
        "create",
        "attach",
    ] {
        assert_eq!(
            classify(&event(CONTAINER, action, "c1", &[])),
            EventAction::Ignore,
            "{action}"
        );
    }
    assert_eq!(
        classify(&event(NETWORK, "connect", "net1", &[("container", "c2")])),
        EventAction::Inspect("c2".into())
    );
    assert_eq!(
        classify(&event(NETWORK, "create", "net1", &[])),
        EventAction::Ignore
    );
    assert_eq!(
        classify(&event(IMAGE, "pull", "i", &[])),
        EventAction::Ignore
    );
}

#[test]
fn from_inspect_reads_state_health_labels_and_networks() {
    // A trimmed `docker inspect` of a running, unhealthy, labeled container.
    let json = r#"{
        "Id": "abc123",
        "Name": "/demo_web_1",
        "State": {"Status": "running", "Running": true, "Paused": false,
                  "Health": {"Status": "unhealthy", "FailingStreak": 3}},
        "Config": {"Labels": {"beacon.service": "web", "beacon.port": "8080"}},
        "NetworkSettings": {"Networks": {
            "demo": {"IPAddress": "172.28.0.11"},
            "empty": {"IPAddress": ""}
        }}
    }"#;
    let r: ContainerInspectResponse = serde_json::from_str(json).unwrap();
    let c = from_inspect(&r);
    assert_eq!(c.id, "abc123");
    assert_eq!(c.name, "demo_web_1");
    assert_eq!(c.state, RunState::Running);
    assert_eq!(c.health, HealthStatus::Unhealthy);
    assert_eq!(c.labels["beacon.service"], "web");
    assert_eq!(c.networks["demo"], Some("172.28.0.11".parse().unwrap()));
    assert_eq!(c.networks["empty"], None);
    let m = member(&c, Some("demo")).unwrap().unwrap();
    assert!(!m.endpoint.ready);

    let paused = r#"{"Id": "p", "Name": "/p", "State": {"Status": "paused", "Running": true, "Paused": true}}"#;
    let c = from_inspect(&serde_json::from_str(paused).unwrap());
    assert_eq!((c.state, c.health), (RunState::Paused, HealthStatus::None));
    let exited = r#"{"Id": "e", "Name": "/e", "State": {"Status": "exited", "Running": false}}"#;
    let c = from_inspect(&serde_json::from_str(exited).unwrap());
    assert_eq!(c.state, RunState::Stopped);
}
