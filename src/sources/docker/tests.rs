use super::*;
use crate::config::DockerTrust;
use crate::model::{Balance, ProbeKind};
use bollard::models::{ContainerInspectResponse, EventMessage, EventMessageTypeEnum};

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

/// Trust for the label-parsing tests: the namespaces they use, any address.
fn open() -> DockerTrust {
    DockerTrust {
        namespaces: vec!["default".into(), "shop".into()],
        allow_listen: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
        allow_vip: vec!["0.0.0.0/0".parse().unwrap(), "::/0".parse().unwrap()],
    }
}

fn err_text(c: &Container) -> String {
    member(c, None, &open()).unwrap_err().to_string()
}

#[test]
fn minimal_labels_make_a_ready_endpoint_in_default_namespace() {
    let m = member(&web("web-1", "172.28.0.11"), None, &open())
        .unwrap()
        .unwrap();
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
    assert_eq!(m.vip, None);
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
            ("beacon.vip", "172.28.0.53"),
        ],
    );
    let m = member(&c, None, &open()).unwrap().unwrap();
    assert_eq!(m.vip, Some("172.28.0.53".parse().unwrap()));
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
    let m = member(&c, None, &open()).unwrap().unwrap();
    assert_eq!(m.ports[0].listen, Some("0.0.0.0:80".parse().unwrap()));
}

#[test]
fn no_port_label_means_dns_only() {
    let c = container("w", "10.0.0.1", &[("beacon.service", "w")]);
    let m = member(&c, None, &open()).unwrap().unwrap();
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
            &[("beacon.service", "w"), ("beacon.vip", "web")],
            "label beacon.vip=`web`: not an IP address",
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
        member(
            &container("x", "10.0.0.1", &[("other", "1")]),
            None,
            &open()
        ),
        Ok(None)
    );
    for state in [RunState::Paused, RunState::Stopped] {
        let mut c = web("w", "10.0.0.1");
        c.state = state;
        assert_eq!(member(&c, None, &open()), Ok(None), "{state:?}");
        // Even with a malformed label: a stopped container is just gone.
        c.labels.insert("beacon.port".into(), "nope".into());
        assert_eq!(member(&c, None, &open()), Ok(None), "{state:?}");
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
        let m = member(&c, None, &open()).unwrap().unwrap();
        assert_eq!(m.endpoint.ready, ready, "{health:?}");
    }
}

#[test]
fn ip_comes_from_the_configured_or_only_network() {
    let mut c = web("w", "10.0.0.1");
    c.networks
        .insert("other".into(), Some("192.168.5.5".parse().unwrap()));
    let ip = |c: &Container, n: Option<&str>| {
        member(c, n, &open()).map(|m| m.unwrap().endpoint.ip.to_string())
    };
    assert_eq!(ip(&c, Some("demo")).unwrap(), "10.0.0.1");
    assert_eq!(ip(&c, Some("other")).unwrap(), "192.168.5.5");
    let e = ip(&c, None).unwrap_err().to_string();
    assert!(e.contains("several networks (demo, other)"), "{e}");
    // A configured network scopes the source: others' containers are skipped.
    assert_eq!(member(&c, Some("missing"), &open()), Ok(None));
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
    a.labels.insert("beacon.vip".into(), "10.0.0.100".into());
    let cs = [
        b,
        a,
        web("web-c", "10.0.0.11"),
        container("db", "10.0.0.20", &[("beacon.service", "db")]),
    ];
    let members: Vec<Member> = cs
        .iter()
        .map(|c| member(c, None, &open()).unwrap().unwrap())
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
    assert_eq!(web.vip, Some("10.0.0.100".parse().unwrap()));
    assert!(all[&ServiceKey::new("default", "db")].is_headless());
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
fn stop_signals_are_told_from_others() {
    use EventMessageTypeEnum::CONTAINER;
    for sig in ["15", "9", "SIGTERM", "KILL", "2"] {
        assert!(
            stop_signal(&event(CONTAINER, "kill", "c", &[("signal", sig)])),
            "{sig}"
        );
    }
    for sig in ["1", "SIGHUP", "10", "USR1"] {
        assert!(
            !stop_signal(&event(CONTAINER, "kill", "c", &[("signal", sig)])),
            "{sig}"
        );
    }
    assert!(!stop_signal(&event(CONTAINER, "kill", "c", &[])));
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
    let m = member(&c, Some("demo"), &open()).unwrap().unwrap();
    assert!(!m.endpoint.ready);

    let paused = r#"{"Id": "p", "Name": "/p", "State": {"Status": "paused", "Running": true, "Paused": true}}"#;
    let c = from_inspect(&serde_json::from_str(paused).unwrap());
    assert_eq!((c.state, c.health), (RunState::Paused, HealthStatus::None));
    let exited = r#"{"Id": "e", "Name": "/e", "State": {"Status": "exited", "Running": false}}"#;
    let c = from_inspect(&serde_json::from_str(exited).unwrap());
    assert_eq!(c.state, RunState::Stopped);
}

// === a fake engine on a unix socket: the loop without Docker ===

mod fake {
    use std::collections::BTreeMap;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};

    use axum::body::Body;
    use axum::extract::State;
    use axum::http::{StatusCode, Uri};
    use axum::response::{IntoResponse, Response};
    use serde_json::{Value, json};
    use tokio::sync::mpsc;

    #[derive(Default)]
    pub struct Engine {
        /// id → `docker inspect` JSON.
        pub containers: BTreeMap<String, Value>,
        events: Vec<mpsc::UnboundedSender<String>>,
        /// Every event so far, replayed to each new subscriber like the
        /// engine's `since` does.
        history: Vec<String>,
        pub inspects: usize,
    }

    /// A fake Docker engine: `/version`, `/containers/json`,
    /// `/containers/{id}/json` and a streaming `/events`.
    pub struct Fake {
        pub path: PathBuf,
        pub engine: Arc<Mutex<Engine>>,
        server: Option<tokio::task::JoinHandle<()>>,
    }

    pub fn inspect_json(
        id: &str,
        ip: &str,
        status: &str,
        health: Option<&str>,
        labels: Value,
    ) -> Value {
        let mut state =
            json!({"Status": status, "Running": status == "running", "Paused": status == "paused"});
        if let Some(h) = health {
            state["Health"] = json!({"Status": h});
        }
        json!({
            "Id": id,
            "Name": format!("/{id}"),
            "State": state,
            "Config": {"Labels": labels},
            "NetworkSettings": {"Networks": {"demo": {"IPAddress": ip}}}
        })
    }

    async fn handle(State(engine): State<Arc<Mutex<Engine>>>, uri: Uri) -> Response {
        let path = uri.path();
        // Strip the `/v1.xx` prefix bollard adds after negotiation.
        let path = match path.strip_prefix("/v1.") {
            Some(rest) => rest.find('/').map_or("", |i| &rest[i..]),
            None => path,
        };
        let mut e = engine.lock().unwrap();
        if path == "/version" {
            return axum::Json(
                json!({"ApiVersion": "1.41", "MinAPIVersion": "1.12", "Version": "fake"}),
            )
            .into_response();
        }
        if path == "/containers/json" {
            let list: Vec<Value> = e
                .containers
                .values()
                .filter(|c| c["State"]["Status"] == "running" || c["State"]["Status"] == "paused")
                .map(|c| json!({"Id": c["Id"], "Labels": c["Config"]["Labels"]}))
                .collect();
            return axum::Json(Value::Array(list)).into_response();
        }
        if path == "/events" {
            let (tx, rx) = mpsc::unbounded_channel::<String>();
            for line in &e.history {
                let _ = tx.send(line.clone());
            }
            e.events.push(tx);
            let stream = futures_util::stream::unfold(rx, |mut rx| async move {
                let line = rx.recv().await?;
                Some((Ok::<_, std::io::Error>(line + "\n"), rx))
            });
            return Body::from_stream(stream).into_response();
        }
        if let Some(id) = path
            .strip_prefix("/containers/")
            .and_then(|p| p.strip_suffix("/json"))
        {
            e.inspects += 1;
            return match e.containers.get(id) {
                Some(c) => axum::Json(c.clone()).into_response(),
                None => (
                    StatusCode::NOT_FOUND,
                    axum::Json(json!({"message": "No such container"})),
                )
                    .into_response(),
            };
        }
        (
            StatusCode::NOT_FOUND,
            axum::Json(json!({"message": "unknown path"})),
        )
            .into_response()
    }

    impl Fake {
        pub fn new(path: PathBuf) -> Self {
            Self {
                path,
                engine: Arc::default(),
                server: None,
            }
        }

        pub fn up(&mut self) {
            let _ = std::fs::remove_file(&self.path);
            let listener = tokio::net::UnixListener::bind(&self.path).unwrap();
            let app = axum::Router::new()
                .fallback(handle)
                .with_state(self.engine.clone());
            self.server = Some(tokio::spawn(async move {
                let _ = axum::serve(listener, app).await;
            }));
        }

        /// The engine goes away: the socket disappears and every event
        /// stream ends.
        pub fn down(&mut self) {
            if let Some(s) = self.server.take() {
                s.abort();
            }
            let _ = std::fs::remove_file(&self.path);
            self.engine.lock().unwrap().events.clear();
        }

        pub fn set(&self, id: &str, c: Value) {
            self.engine.lock().unwrap().containers.insert(id.into(), c);
        }

        pub fn remove(&self, id: &str) {
            self.engine.lock().unwrap().containers.remove(id);
        }

        pub fn event(&self, typ: &str, action: &str, id: &str, attrs: Value) {
            let line =
                json!({"Type": typ, "Action": action, "Actor": {"ID": id, "Attributes": attrs}})
                    .to_string();
            let mut e = self.engine.lock().unwrap();
            e.history.push(line.clone());
            e.events.retain(|tx| tx.send(line.clone()).is_ok());
        }
    }
}

mod with_fake_engine {
    use std::time::Duration;

    use serde_json::json;
    use tokio_util::sync::CancellationToken;

    use super::fake::{Fake, inspect_json};
    use crate::config::ServiceDefaults;
    use crate::model::{ServiceKey, Snapshot};
    use crate::registry;
    use crate::sources::Source;
    use crate::sources::docker::DockerSource;

    fn serving(s: &Snapshot, name: &str) -> Vec<String> {
        s.service(&ServiceKey::new("default", name))
            .map(|svc| svc.serving().map(|e| e.endpoint.ip.to_string()).collect())
            .unwrap_or_default()
    }

    async fn wait_for(reader: &mut registry::Reader, what: &str, f: impl Fn(&Snapshot) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        loop {
            if f(&reader.latest()) {
                return;
            }
            if tokio::time::timeout_at(deadline, reader.changed())
                .await
                .is_err()
            {
                panic!(
                    "not within 3 s: {what}; web serves {:?}",
                    serving(&reader.current(), "web")
                );
            }
        }
    }

    fn labels(service: &str) -> serde_json::Value {
        json!({"beacon.service": service, "beacon.port": "8080"})
    }

    #[tokio::test]
    async fn follows_events_keeps_state_without_engine_and_resets_after() {
        let dir = tempfile::tempdir().unwrap();
        let mut fake = Fake::new(dir.path().join("docker.sock"));
        fake.set(
            "c1",
            inspect_json("c1", "10.0.0.1", "running", None, labels("web")),
        );
        fake.set(
            "c2",
            inspect_json("c2", "10.0.0.2", "running", Some("healthy"), labels("web")),
        );
        fake.set(
            "other",
            inspect_json("other", "10.0.0.9", "running", None, json!({})),
        );
        fake.up();

        let source = DockerSource::new(fake.path.clone(), None, ServiceDefaults::default());
        let shutdown = CancellationToken::new();
        let (handle, mut reader, _t) =
            registry::spawn(vec![source.id()], Duration::from_secs(60), shutdown.clone());
        tokio::spawn(Box::new(source).run(handle, shutdown.clone()));
        wait_for(&mut reader, "initial list", |s| {
            s.ready && serving(s, "web") == ["10.0.0.1", "10.0.0.2"]
        })
        .await;

        // A new labeled container starts.
        fake.set(
            "c3",
            inspect_json("c3", "10.0.0.3", "running", Some("starting"), labels("web")),
        );
        fake.event("container", "start", "c3", labels("web"));
        wait_for(&mut reader, "c3 listed but not ready", |s| {
            s.service(&ServiceKey::new("default", "web"))
                .and_then(|w| {
                    w.endpoints
                        .iter()
                        .find(|e| e.endpoint.ip.to_string() == "10.0.0.3")
                })
                .is_some_and(|e| !e.endpoint.ready && !e.healthy)
        })
        .await;
        fake.set(
            "c3",
            inspect_json("c3", "10.0.0.3", "running", Some("healthy"), labels("web")),
        );
        fake.event("container", "health_status: healthy", "c3", labels("web"));
        wait_for(&mut reader, "c3 healthy", |s| serving(s, "web").len() == 3).await;

        // Unhealthy → not served; paused → gone.
        fake.set(
            "c2",
            inspect_json(
                "c2",
                "10.0.0.2",
                "running",
                Some("unhealthy"),
                labels("web"),
            ),
        );
        fake.event("container", "health_status: unhealthy", "c2", labels("web"));
        wait_for(&mut reader, "c2 unhealthy", |s| {
            serving(s, "web") == ["10.0.0.1", "10.0.0.3"]
        })
        .await;
        fake.set(
            "c1",
            inspect_json("c1", "10.0.0.1", "paused", None, labels("web")),
        );
        fake.event("container", "pause", "c1", labels("web"));
        wait_for(&mut reader, "c1 paused", |s| {
            serving(s, "web") == ["10.0.0.3"]
        })
        .await;

        // `docker stop` signals first: still running, but no longer ready.
        let web3 = || {
            let mut l = labels("web");
            l["signal"] = json!("15");
            l
        };
        fake.event("container", "kill", "c3", web3());
        wait_for(&mut reader, "c3 terminating", |s| {
            serving(s, "web").is_empty()
        })
        .await;
        let listed = reader
            .current()
            .service(&ServiceKey::new("default", "web"))
            .unwrap()
            .endpoints
            .len();
        assert_eq!(
            listed, 2,
            "a terminating container stays listed until it dies"
        );
        // It survived the signal and was started again (restart policy, or
        // a trapped signal followed by `docker start`): ready again.
        fake.event("container", "start", "c3", labels("web"));
        wait_for(&mut reader, "c3 ready again", |s| {
            serving(s, "web") == ["10.0.0.3"]
        })
        .await;
        // A reload signal changes nothing.
        let mut hup = labels("web");
        hup["signal"] = json!("1");
        fake.event("container", "kill", "c3", hup);
        // (events are handled in order: once c2's change shows, so did the HUP's)
        fake.set(
            "c2",
            inspect_json("c2", "10.0.0.2", "running", Some("healthy"), labels("web")),
        );
        fake.event("container", "health_status: healthy", "c2", labels("web"));
        wait_for(&mut reader, "c2 healthy, c3 still ready after HUP", |s| {
            serving(s, "web") == ["10.0.0.2", "10.0.0.3"]
        })
        .await;
        fake.set(
            "c2",
            inspect_json(
                "c2",
                "10.0.0.2",
                "running",
                Some("unhealthy"),
                labels("web"),
            ),
        );
        fake.event("container", "health_status: unhealthy", "c2", labels("web"));
        wait_for(&mut reader, "c2 unhealthy again", |s| {
            serving(s, "web") == ["10.0.0.3"]
        })
        .await;

        // Unlabeled containers' events cost no inspect; exec events neither.
        let before = fake.engine.lock().unwrap().inspects;
        fake.event("container", "die", "other", json!({}));
        fake.event(
            "container",
            "exec_start: /beacon probe",
            "c3",
            labels("web"),
        );
        // A marker event that does inspect, to know the two above were handled.
        fake.event("container", "rename", "c3", labels("web"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(3);
        while fake.engine.lock().unwrap().inspects == before {
            assert!(tokio::time::Instant::now() < deadline, "rename not handled");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(fake.engine.lock().unwrap().inspects, before + 1);

        // The engine goes away: the last state stays.
        let away = reader.current();
        fake.down();
        fake.set(
            "c1",
            inspect_json("c1", "10.0.0.1", "running", None, labels("web")),
        );
        fake.remove("c3");
        fake.set(
            "c4",
            inspect_json("c4", "10.0.0.4", "running", None, labels("api")),
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = reader.current();
        // Only the lost connection (and its reason) is sent: no service
        // was rebuilt.
        assert!(
            s.services.len() == away.services.len()
                && s.services.iter().all(|(k, v)| away
                    .services
                    .get(k)
                    .is_some_and(|w| std::sync::Arc::ptr_eq(v, w))),
            "nothing but the connection sent while the engine is away"
        );
        assert!(
            s.sources.values().any(|st| !st.connected),
            "the source shows as lost"
        );
        assert_eq!(serving(&s, "web"), ["10.0.0.3"]);

        // It comes back: a fresh list replaces everything.
        fake.up();
        wait_for(&mut reader, "resync after reconnect", |s| {
            serving(s, "web") == ["10.0.0.1"] && serving(s, "api") == ["10.0.0.4"]
        })
        .await;
        // c2 is still listed (unhealthy), c3 is gone.
        let s = reader.current();
        let web = s.service(&ServiceKey::new("default", "web")).unwrap();
        let ips: Vec<String> = web
            .endpoints
            .iter()
            .map(|e| e.endpoint.ip.to_string())
            .collect();
        assert_eq!(ips, ["10.0.0.1", "10.0.0.2"]);
        shutdown.cancel();
    }
}

/// A hostile container: it names another namespace's service, asks for a
/// vip and a host-wide listener. The default trust refuses the namespace
/// and ignores the addresses.
#[test]
fn labels_are_untrusted_by_default() {
    let strict = DockerTrust::default();
    let hostile = container(
        "evil",
        "172.28.0.66",
        &[
            ("beacon.service", "db"),
            ("beacon.namespace", "data"),
            ("beacon.port", "5432"),
        ],
    );
    let e = member(&hostile, None, &strict).unwrap_err().to_string();
    assert!(
        e.contains("beacon.namespace=`data`") && e.contains("`namespaces`"),
        "{e}"
    );
    let squatter = container(
        "evil",
        "172.28.0.66",
        &[
            ("beacon.service", "web"),
            ("beacon.port", "80"),
            ("beacon.listen", "0.0.0.0:80"),
            ("beacon.vip", "10.96.0.10"),
        ],
    );
    let m = member(&squatter, None, &strict).unwrap().unwrap();
    assert_eq!(m.ports[0].listen, None);
    assert_eq!(m.vip, None);
    assert_eq!(m.ignored.len(), 2, "{:?}", m.ignored);
    assert!(m.ignored[0].contains("allow_listen"), "{:?}", m.ignored);
    assert!(m.ignored[1].contains("allow_vip"), "{:?}", m.ignored);
    // Allowed CIDRs let exactly those addresses through.
    let some = DockerTrust {
        allow_listen: vec!["127.0.0.0/8".parse().unwrap()],
        allow_vip: vec!["10.96.0.0/12".parse().unwrap()],
        ..DockerTrust::default()
    };
    let m = member(&squatter, None, &some).unwrap().unwrap();
    assert_eq!(m.ports[0].listen, None, "0.0.0.0 is not in 127.0.0.0/8");
    assert_eq!(m.vip, Some("10.96.0.10".parse().unwrap()));
    let mut local = squatter.clone();
    local
        .labels
        .insert("beacon.listen".into(), "127.0.0.1:8080".into());
    let m = member(&local, None, &some).unwrap().unwrap();
    assert_eq!(m.ports[0].listen, Some("127.0.0.1:8080".parse().unwrap()));
    assert!(m.ignored.is_empty());
}
