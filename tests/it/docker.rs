//! End-to-end tests against the real Docker engine.
//!
//! They build the scratch image with `docker/build.sh` (a tag of their own),
//! create a network and containers with unique names, and remove all of it
//! on drop, also when an assertion fails. Without an engine they fail;
//! `BEACON_SKIP_DOCKER=1` skips them explicitly.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use beacon::config::ServiceDefaults;
use beacon::model::{ServiceKey, Snapshot};
use beacon::registry::{self, Reader};
use beacon::sources::Source;
use beacon::sources::docker::DockerSource;
use tokio_util::sync::CancellationToken;

// === docker CLI helpers ===

/// True when the tests should run; panics when the engine is missing and
/// nobody said to skip.
pub(super) fn engine_available() -> bool {
    if std::env::var("BEACON_SKIP_DOCKER").as_deref() == Ok("1") {
        eprintln!("BEACON_SKIP_DOCKER=1: docker end-to-end test skipped");
        return false;
    }
    let out = Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .output();
    match out {
        Ok(o) if o.status.success() => true,
        Ok(o) => panic!(
            "the Docker engine is not reachable ({}); these tests need it. \
             Set BEACON_SKIP_DOCKER=1 to skip them explicitly.",
            String::from_utf8_lossy(&o.stderr).trim()
        ),
        Err(e) => panic!(
            "cannot run `docker` ({e}); these tests need the Docker engine. \
             Set BEACON_SKIP_DOCKER=1 to skip them explicitly."
        ),
    }
}

pub(super) fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(super) fn docker(args: &[&str]) -> String {
    let out = run(Command::new("docker").args(args));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

pub(super) fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique, DNS-label-safe name for this process and call.
pub(super) fn unique(what: &str) -> String {
    format!(
        "bit{}x{}{}",
        std::process::id(),
        SEQ.fetch_add(1, Ordering::Relaxed),
        what
    )
}

/// Everything a test made in the engine; removed on drop, failed or not.
#[derive(Default)]
pub struct Cleanup {
    containers: Mutex<Vec<String>>,
    networks: Mutex<Vec<String>>,
    images: Mutex<Vec<String>>,
    /// (compose file, project name)
    compose: Mutex<Vec<(PathBuf, String)>>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("docker").args(args).output();
        };
        for (file, project) in self.compose.lock().unwrap().drain(..) {
            let _ = compose_cmd(&file, &project, "")
                .args(["down", "-v", "--remove-orphans", "-t", "1"])
                .output();
        }
        for c in self.containers.lock().unwrap().drain(..) {
            quiet(&["rm", "-f", "-v", &c]);
        }
        for n in self.networks.lock().unwrap().drain(..) {
            quiet(&["network", "rm", &n]);
        }
        for i in self.images.lock().unwrap().drain(..) {
            quiet(&["rmi", "-f", &i]);
        }
    }
}

impl Cleanup {
    /// Builds the beacon image under a tag of its own, plus two variants
    /// with a HEALTHCHECK: `<tag>-hc-ok` probes `/healthz` on 8080,
    /// `<tag>-hc-bad` probes a port nothing listens on.
    pub fn image(&self) -> String {
        let tag = format!("beacon:{}", unique("img"));
        self.images.lock().unwrap().push(tag.clone());
        run(Command::new(repo_root().join("docker/build.sh")).env("IMAGE", &tag));
        for (suffix, url) in [
            ("hc-ok", "http://127.0.0.1:8080/healthz"),
            ("hc-bad", "tcp://127.0.0.1:1"),
        ] {
            let name = format!("{tag}-{suffix}");
            self.images.lock().unwrap().push(name.clone());
            let dockerfile = format!(
                "FROM {tag}\nHEALTHCHECK --interval=1s --timeout=1s --retries=1 CMD [\"/beacon\", \"probe\", \"{url}\"]\n"
            );
            let ctx = tempfile::tempdir().unwrap();
            std::fs::write(ctx.path().join("Dockerfile"), dockerfile).unwrap();
            run(Command::new("docker")
                .args(["build", "-q", "-t", &name])
                .arg(ctx.path()));
        }
        tag
    }

    /// Registers an image built elsewhere for `rmi` on drop.
    pub fn adopt_image(&self, tag: &str) {
        self.images.lock().unwrap().push(tag.to_string());
    }

    /// Registers a compose project for `down` on drop.
    pub fn compose(&self, file: &Path, project: &str) {
        self.compose
            .lock()
            .unwrap()
            .push((file.to_path_buf(), project.to_string()));
    }

    pub fn network(&self) -> String {
        let name = unique("net");
        docker(&["network", "create", &name]);
        self.networks.lock().unwrap().push(name.clone());
        name
    }

    /// `docker run -d --name <unique> <args>`; returns the name.
    pub fn container(&self, what: &str, args: &[&str]) -> String {
        let name = unique(what);
        self.named_container(&name, args);
        name
    }

    /// `docker run -d --name <name> <args>`, for a name chosen beforehand
    /// (e.g. by [`unique`], when peers must know it before it starts).
    pub fn named_container(&self, name: &str, args: &[&str]) {
        self.containers.lock().unwrap().push(name.to_string());
        let mut all = vec!["run", "-d", "--name", name];
        all.extend_from_slice(args);
        docker(&all);
    }
}

/// `docker-compose -f FILE -p PROJECT` with the test's image and the
/// socket's group in the environment.
/// Uses `docker-compose` (1.29 on Debian) when installed, else the
/// `docker compose` plugin (v2).
fn compose_cmd(file: &Path, project: &str, image: &str) -> Command {
    let v1 = Command::new("docker-compose")
        .arg("version")
        .output()
        .is_ok_and(|o| o.status.success());
    let mut c = if v1 {
        Command::new("docker-compose")
    } else {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    };
    c.arg("-f")
        .arg(file)
        .args(["-p", project, "--ansi", "never"]);
    c.env("DOCKER_GID", socket_gid());
    if !image.is_empty() {
        c.env("BEACON_IMAGE", image);
    }
    c
}

pub(super) fn ip_of(container: &str, network: &str) -> IpAddr {
    let fmt = format!("{{{{(index .NetworkSettings.Networks \"{network}\").IPAddress}}}}");
    docker(&["inspect", "-f", &fmt, container])
        .parse()
        .unwrap_or_else(|e| panic!("IP of {container} on {network}: {e}"))
}

/// A labeled demo backend on `network`, listening on 8080.
fn backend(
    guard: &Cleanup,
    image: &str,
    network: &str,
    service: &str,
    name: &str,
    extra_labels: &[&str],
) -> String {
    let service_label = format!("beacon.service={service}");
    let mut args = vec![
        "--network",
        network,
        "--label",
        &service_label,
        "--label",
        "beacon.port=http:8080",
    ];
    for l in extra_labels {
        args.extend_from_slice(&["--label", l]);
    }
    args.extend_from_slice(&[image, "backend", "--name", name, "--listen", "0.0.0.0:8080"]);
    guard.container(name, &args)
}

// === in-process: the docker source against the engine ===

fn serving(s: &Snapshot, key: &ServiceKey) -> BTreeSet<IpAddr> {
    s.service(key)
        .map(|svc| svc.serving().map(|e| e.endpoint.ip).collect())
        .unwrap_or_default()
}

async fn wait_serving(
    reader: &mut Reader,
    key: &ServiceKey,
    want: &BTreeSet<IpAddr>,
    within: Duration,
    what: &str,
) -> Duration {
    let start = Instant::now();
    let deadline = tokio::time::Instant::now() + within;
    loop {
        if serving(&reader.latest(), key) == *want {
            return start.elapsed();
        }
        if tokio::time::timeout_at(deadline, reader.changed())
            .await
            .is_err()
        {
            panic!(
                "{what}: not within {within:?}; serving {:?}, want {want:?}",
                serving(&reader.current(), key)
            );
        }
    }
}

/// Records every IP that was ever served for `key`.
fn watch_served(mut reader: Reader, key: ServiceKey) -> Arc<Mutex<BTreeSet<IpAddr>>> {
    let seen = Arc::new(Mutex::new(BTreeSet::new()));
    let out = seen.clone();
    tokio::spawn(async move {
        loop {
            let s = reader.latest();
            seen.lock().unwrap().extend(serving(&s, &key));
            if reader.changed().await.is_none() {
                return;
            }
        }
    });
    out
}

fn start_source(socket: PathBuf, network: Option<String>, shutdown: &CancellationToken) -> Reader {
    let source = DockerSource::new(socket, network, ServiceDefaults::default());
    let (handle, reader, _task) =
        registry::spawn(vec![source.id()], Duration::from_secs(30), shutdown.clone());
    tokio::spawn(Box::new(source).run(handle, shutdown.clone()));
    reader
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_source_follows_containers_of_the_engine() {
    if !engine_available() {
        return;
    }
    let guard = Cleanup::default();
    let image = guard.image();
    let net = guard.network();
    let service = unique("web");
    let key = ServiceKey::new("default", &service);
    let hc_ok = format!("{image}-hc-ok");
    let names: Vec<String> = (0..3)
        .map(|i| backend(&guard, &hc_ok, &net, &service, &format!("web{i}"), &[]))
        .collect();
    let bad = backend(
        &guard,
        &format!("{image}-hc-bad"),
        &net,
        &service,
        "bad",
        &[],
    );
    // A malformed label is skipped, never fatal.
    backend(
        &guard,
        &image,
        &net,
        &service,
        "broken",
        &["beacon.weight=heavy"],
    );
    let ips: BTreeSet<IpAddr> = names.iter().map(|n| ip_of(n, &net)).collect();
    let bad_ip = ip_of(&bad, &net);

    let shutdown = CancellationToken::new();
    let mut reader = start_source("/var/run/docker.sock".into(), Some(net.clone()), &shutdown);
    let served = watch_served(reader.clone(), key.clone());
    wait_serving(
        &mut reader,
        &key,
        &ips,
        Duration::from_secs(15),
        "three healthy backends",
    )
    .await;
    let svc = reader.current().service(&key).cloned().unwrap();
    assert_eq!(
        svc.endpoints.len(),
        4,
        "the unhealthy one is listed, not ready: {svc:?}"
    );
    assert!(!svc.endpoint(bad_ip).unwrap().endpoint.ready);

    // docker stop → gone within 2 s; docker start → back.
    let stopped = &names[1];
    let stopped_ip = ip_of(stopped, &net);
    let mut rest = ips.clone();
    rest.remove(&stopped_ip);
    let t = Instant::now();
    docker(&["stop", "-t", "1", stopped]);
    wait_serving(
        &mut reader,
        &key,
        &rest,
        Duration::from_secs(2).saturating_sub(t.elapsed()),
        "stopped backend gone",
    )
    .await;
    eprintln!("docker stop → gone from the snapshot in {:?}", t.elapsed());
    docker(&["start", stopped]);
    let mut back = rest.clone();
    back.insert(ip_of(stopped, &net));
    // Back once Docker's HEALTHCHECK says healthy (interval 1 s).
    wait_serving(
        &mut reader,
        &key,
        &back,
        Duration::from_secs(10),
        "restarted backend back",
    )
    .await;

    // Paused → gone; unpaused → back. (The 2 s bound is for stop; a
    // loaded engine can take longer to pause.)
    let paused = &names[0];
    let mut without = back.clone();
    without.remove(&ip_of(paused, &net));
    docker(&["pause", paused]);
    wait_serving(
        &mut reader,
        &key,
        &without,
        Duration::from_secs(5),
        "paused backend gone",
    )
    .await;
    docker(&["unpause", paused]);
    wait_serving(
        &mut reader,
        &key,
        &back,
        Duration::from_secs(5),
        "unpaused backend back",
    )
    .await;

    // A container whose HEALTHCHECK fails was never served.
    assert!(
        !served.lock().unwrap().contains(&bad_ip),
        "the failing-HEALTHCHECK container was served"
    );
    // docker rm -f of every container → the service is gone.
    for n in names.iter().chain([&bad]) {
        docker(&["rm", "-f", n]);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while reader.current().service(&key).is_some() {
        assert!(
            Instant::now() < deadline,
            "service not removed after its containers"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    shutdown.cancel();
}

/// A unix-socket forwarder to the engine that the test can cut.
struct SocketProxy {
    path: PathBuf,
    tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
}

impl SocketProxy {
    fn start(path: &Path) -> Self {
        let _ = std::fs::remove_file(path);
        let listener = tokio::net::UnixListener::bind(path).unwrap();
        let tasks: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>> = Arc::default();
        let conns = tasks.clone();
        let accept = tokio::spawn(async move {
            while let Ok((mut client, _)) = listener.accept().await {
                let task = tokio::spawn(async move {
                    if let Ok(mut engine) =
                        tokio::net::UnixStream::connect("/var/run/docker.sock").await
                    {
                        let _ = tokio::io::copy_bidirectional(&mut client, &mut engine).await;
                    }
                });
                conns.lock().unwrap().push(task);
            }
        });
        tasks.lock().unwrap().push(accept);
        Self {
            path: path.to_path_buf(),
            tasks,
        }
    }

    /// Cuts every connection and removes the socket.
    fn stop(&self) {
        for t in self.tasks.lock().unwrap().drain(..) {
            t.abort();
        }
        let _ = std::fs::remove_file(&self.path);
    }
}

/// One hostile container: it asks for the file source's listen address
/// (inside `allow_listen`, so only the claim rules stop it) and a vip the
/// source does not allow; another names a namespace the source does not
/// list. Neither gets anything; the refusal is listed once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_source_refuses_a_hostile_container() {
    use beacon::config::DockerTrust;
    use beacon::model::{Endpoint, Port, Protocol, ServiceSpec};
    if !engine_available() {
        return;
    }
    let guard = Cleanup::default();
    let image = guard.image();
    let net = guard.network();
    let shutdown = CancellationToken::new();
    let _stop = shutdown.clone().drop_guard();
    let listen: std::net::SocketAddr = "127.0.0.1:18080".parse().unwrap();
    let trust = DockerTrust {
        allow_listen: vec!["127.0.0.0/8".parse().unwrap()],
        ..DockerTrust::default()
    };
    let source = DockerSource::new(
        PathBuf::from("/var/run/docker.sock"),
        Some(net.clone()),
        ServiceDefaults::default(),
    )
    .with_trust(trust);
    let file: beacon::model::SourceId = "file:services.toml".into();
    let (handle, mut reader, _task) = registry::spawn(
        vec![file.clone(), source.id()],
        Duration::from_secs(30),
        shutdown.clone(),
    );
    let mut web = ServiceSpec::new(ServiceKey::new("default", "web"));
    web.ports.push(Port {
        name: "http".into(),
        port: 80,
        target_port: 8080,
        protocol: Protocol::Tcp,
        listen: Some(listen),
    });
    web.endpoints
        .push(Endpoint::new("127.0.0.11".parse().unwrap()));
    assert!(
        handle
            .source(&file, registry::Update::Reset(vec![web]))
            .await
    );
    tokio::spawn(Box::new(source).run(handle, shutdown.clone()));
    // The outsider first: once evil is seen, its event was handled too.
    let outsider = unique("dns");
    backend(
        &guard,
        &image,
        &net,
        &outsider,
        "outsider",
        &["beacon.namespace=kube-system"],
    );
    let evil = unique("evil");
    let evil_labels = [
        format!("beacon.listen=http={listen}"),
        "beacon.vip=10.96.0.10".to_string(),
    ];
    let labels: Vec<&str> = evil_labels.iter().map(String::as_str).collect();
    backend(&guard, &image, &net, &evil, "evil", &labels);
    let key = ServiceKey::new("default", &evil);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let snap = loop {
        let s = reader.latest();
        if s.service(&key).is_some() && !s.conflicts.is_empty() {
            break s;
        }
        if tokio::time::timeout_at(deadline, reader.changed())
            .await
            .is_err()
        {
            panic!(
                "the hostile container never showed up: {:?}",
                reader.current().conflicts
            );
        }
    };
    let web = snap.service(&ServiceKey::new("default", "web")).unwrap();
    assert_eq!(web.listeners, vec![(listen, 0)], "web keeps its listener");
    let svc = snap.service(&key).unwrap();
    assert!(svc.listeners.is_empty(), "{:?}", svc.listeners);
    assert_eq!(
        svc.spec.vip, None,
        "beacon.vip outside allow_vip is ignored"
    );
    assert_eq!(snap.conflicts.len(), 1, "{:?}", snap.conflicts);
    assert_eq!(snap.conflicts[0].kind, "listen");
    assert_eq!(&*snap.conflicts[0].winner, "web.default");
    assert!(
        snap.service(&ServiceKey::new("kube-system", &outsider))
            .is_none(),
        "a namespace the source does not list is refused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn docker_source_keeps_state_without_engine_and_resyncs() {
    if !engine_available() {
        return;
    }
    let guard = Cleanup::default();
    let image = guard.image();
    let net = guard.network();
    let service = unique("api");
    let key = ServiceKey::new("default", &service);
    let names: Vec<String> = (0..3)
        .map(|i| backend(&guard, &image, &net, &service, &format!("api{i}"), &[]))
        .collect();
    let ips: BTreeSet<IpAddr> = names.iter().map(|n| ip_of(n, &net)).collect();

    let dir = tempfile::tempdir().unwrap();
    let sock = dir.path().join("engine.sock");
    let proxy = SocketProxy::start(&sock);
    let shutdown = CancellationToken::new();
    let mut reader = start_source(sock.clone(), None, &shutdown);
    wait_serving(&mut reader, &key, &ips, Duration::from_secs(10), "initial").await;

    // The engine connection is lost; meanwhile a container stops.
    proxy.stop();
    let away = reader.current();
    let gone = ip_of(&names[2], &net);
    docker(&["stop", "-t", "1", &names[2]]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = reader.current();
    // Only the lost connection (the event history's source status) is
    // sent: no service is rebuilt.
    assert!(
        s.services.len() == away.services.len()
            && s.services.iter().all(|(k, v)| away
                .services
                .get(k)
                .is_some_and(|w| std::sync::Arc::ptr_eq(v, w))),
        "nothing changes while the engine is away"
    );
    assert_eq!(serving(&s, &key), ips, "the last endpoints stay in force");

    // Back: a fresh list replaces the state.
    let _proxy = SocketProxy::start(&sock);
    let mut rest = ips.clone();
    rest.remove(&gone);
    wait_serving(
        &mut reader,
        &key,
        &rest,
        Duration::from_secs(15),
        "resync after reconnect",
    )
    .await;
    shutdown.cancel();
}

// === beacon in a container: DNS and proxy from the docker source ===

/// The group of the engine's socket, for `--group-add` (beacon runs as 65534).
fn socket_gid() -> String {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata("/var/run/docker.sock")
        .expect("/var/run/docker.sock")
        .gid()
        .to_string()
}

/// The A records of `name` from `server` (UDP).
async fn dns_a(server: std::net::SocketAddr, name: &str) -> BTreeSet<IpAddr> {
    let answer = beacon::client::query(
        server,
        name,
        hickory_proto::rr::RecordType::A,
        Duration::from_secs(1),
    )
    .await
    .unwrap_or_else(|e| panic!("DNS {name} @{server}: {e}"));
    answer
        .answers
        .iter()
        .filter_map(|r| r.data.ip_addr())
        .collect()
}

/// When a client connection started, and the backend that answered it.
type Attempt = (Instant, Result<String, String>);

/// One GET through the proxy; the backend's name, or the error.
async fn get_name(addr: std::net::SocketAddr) -> Result<String, String> {
    match beacon::client::http_get(addr, "web", "/", Duration::from_secs(3)).await {
        Ok((200, body)) => Ok(body.trim().to_string()),
        Ok((status, _)) => Err(format!("HTTP {status}")),
        Err(e) => Err(e.to_string()),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn beacon_container_serves_dns_and_proxy_from_docker() {
    if !engine_available() {
        return;
    }
    let guard = Cleanup::default();
    let image = guard.image();
    // The image: scratch + one static binary, non-root, entrypoint beacon.
    let config = docker(&[
        "image",
        "inspect",
        "-f",
        "{{.Config.User}} {{json .Config.Entrypoint}} {{len .RootFS.Layers}}",
        &image,
    ]);
    assert_eq!(config, r#"65534:65534 ["/beacon"] 1"#);
    let net = guard.network();
    let service = unique("web");
    let fqdn = format!("{service}.default.svc.cluster.local.");
    let hc_ok = format!("{image}-hc-ok");
    let listen = ["beacon.listen=0.0.0.0:8080"];
    let names: Vec<String> = (0..3)
        .map(|i| backend(&guard, &hc_ok, &net, &service, &format!("web{i}"), &listen))
        .collect();
    let bad = backend(
        &guard,
        &format!("{image}-hc-bad"),
        &net,
        &service,
        "bad",
        &listen,
    );
    let ips: BTreeSet<IpAddr> = names.iter().map(|n| ip_of(n, &net)).collect();
    let bad_ip = ip_of(&bad, &net);

    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("beacon.toml");
    std::fs::write(
        &config,
        format!(
            "startup_timeout = \"5s\"\n\
             [dns]\nlisten = \"0.0.0.0:53\"\nttl = 1\n\
             [admin]\nlisten = \"0.0.0.0:9153\"\n\
             [health]\ninterval = \"500ms\"\nrise = 1\nfall = 2\n\
             [[source]]\ntype = \"docker\"\nnetwork = \"{net}\"\n\
             allow_listen = [\"0.0.0.0/32\"]\n"
        ),
    )
    .unwrap();
    let mount = format!("{}:/etc/beacon.toml:ro", config.display());
    let gid = socket_gid();
    let beacon = guard.container(
        "beacon",
        &[
            "--network",
            &net,
            "--group-add",
            &gid,
            "--sysctl",
            "net.ipv4.ip_unprivileged_port_start=0",
            "-v",
            &mount,
            "-v",
            "/var/run/docker.sock:/var/run/docker.sock:ro",
            &image,
            "run",
            "--config",
            "/etc/beacon.toml",
        ],
    );
    let beacon_ip = ip_of(&beacon, &net);
    let dns = std::net::SocketAddr::new(beacon_ip, 53);
    let proxy = std::net::SocketAddr::new(beacon_ip, 8080);

    // DNS answers the three healthy container IPs (never the unhealthy one).
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = match beacon::client::query(
            dns,
            &fqdn,
            hickory_proto::rr::RecordType::A,
            Duration::from_millis(500),
        )
        .await
        {
            Ok(a) => a.answers.iter().filter_map(|r| r.data.ip_addr()).collect(),
            Err(_) => BTreeSet::new(),
        };
        assert!(!got.contains(&bad_ip), "DNS served the unhealthy container");
        if got == ips {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "DNS never answered {ips:?} (last {got:?}); beacon logs:\n{}",
            docker(&["logs", &beacon])
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // 300 proxied connections reach all three, none fails.
    let mut tally = std::collections::BTreeMap::<String, u32>::new();
    for _ in 0..300 {
        let name = get_name(proxy).await.expect("proxied GET");
        *tally.entry(name).or_default() += 1;
    }
    eprintln!("300 proxied connections: {tally:?}");
    let reached: BTreeSet<&str> = tally.keys().map(String::as_str).collect();
    assert_eq!(reached, BTreeSet::from(["web0", "web1", "web2"]));

    // Clients keep connecting while a backend stops and starts again.
    let stop = CancellationToken::new();
    let log: Arc<Mutex<Vec<Attempt>>> = Arc::default();
    let mut workers = Vec::new();
    for _ in 0..2 {
        let (stop, log) = (stop.clone(), log.clone());
        workers.push(tokio::spawn(async move {
            while !stop.is_cancelled() {
                let started = Instant::now();
                let r = get_name(proxy).await;
                log.lock().unwrap().push((started, r));
                tokio::time::sleep(Duration::from_millis(5)).await;
            }
        }));
    }
    let victim = &names[1];
    let victim_ip = ip_of(victim, &net);
    let t_stop = Instant::now();
    docker(&["stop", "-t", "1", victim]);
    let t_gone = loop {
        let got = dns_a(dns, &fqdn).await;
        if !got.contains(&victim_ip) {
            break Instant::now();
        }
        assert!(
            t_stop.elapsed() < Duration::from_secs(2),
            "stopped backend still in DNS after 2 s"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    eprintln!("docker stop → gone from DNS in {:?}", t_gone - t_stop);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t_start = Instant::now();
    docker(&["start", victim]);
    let back_ip = ip_of(victim, &net);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !dns_a(dns, &fqdn).await.contains(&back_ip) {
        assert!(
            Instant::now() < deadline,
            "restarted backend not back in DNS"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let t_back = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(5);
    while !log
        .lock()
        .unwrap()
        .iter()
        .any(|(t, r)| *t > t_back && r.as_deref() == Ok("web1"))
    {
        assert!(
            Instant::now() < deadline,
            "restarted backend gets no connections"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    for w in workers {
        w.await.unwrap();
    }
    let log = log.lock().unwrap();
    let failed: Vec<_> = log.iter().filter(|(_, r)| r.is_err()).collect();
    assert!(
        failed.is_empty(),
        "{} of {} client connections failed: {:?}",
        failed.len(),
        log.len(),
        &failed[..failed.len().min(5)]
    );
    let stray = log
        .iter()
        .filter(|(t, r)| *t > t_gone && *t < t_start && r.as_deref() == Ok("web1"))
        .count();
    assert_eq!(
        stray, 0,
        "the stopped backend got new connections after it left DNS"
    );
    assert!(
        !log.iter().any(|(_, r)| r.as_deref() == Ok("bad")),
        "the unhealthy container was proxied to"
    );
    eprintln!(
        "{} client connections across stop/start, none failed",
        log.len()
    );
}

// === the compose demo and the sidecar recipe, as documented ===

#[test]
fn compose_demo_client_resolves_and_reaches_web() {
    if !engine_available() {
        return;
    }
    let guard = Cleanup::default();
    let image = guard.image();
    let file = repo_root().join("docker/compose.yaml");
    let project = unique("demo");
    guard.compose(&file, &project);
    let out = compose_cmd(&file, &project, &image)
        .args(["up", "--exit-code-from", "client"])
        .output()
        .expect("docker-compose");
    let text =
        String::from_utf8_lossy(&out.stdout).to_string() + &String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "compose demo failed:\n{text}");
    let client: Vec<&str> = text.lines().filter(|l| l.starts_with("client")).collect();
    for name in ["web-0", "web-1", "web-2"] {
        assert!(
            client.iter().any(|l| l.ends_with(&format!("| {name}"))),
            "the client never reached {name}:\n{text}"
        );
    }
    assert!(
        client.iter().any(|l| l.contains("30 ok, 0 failed")),
        "not every request succeeded:\n{text}"
    );
}

#[test]
fn sidecar_recipe_answers_on_the_apps_loopback() {
    if !engine_available() {
        return;
    }
    let guard = Cleanup::default();
    let image = guard.image();
    let file = repo_root().join("docker/sidecar.yaml");
    let project = unique("side");
    guard.compose(&file, &project);
    run(compose_cmd(&file, &project, &image).args(["up", "-d"]));
    let exec = |args: &[&str]| {
        compose_cmd(&file, &project, &image)
            .args(["exec", "-T", "app", "/beacon"])
            .args(args)
            .output()
            .expect("docker-compose exec")
    };
    // DNS on 127.0.0.1:53 inside the app's namespace.
    let answer = eventually_output(Duration::from_secs(20), "sidecar DNS answers api", || {
        let o = exec(&[
            "query",
            "api.default.svc.cluster.local",
            "--server",
            "127.0.0.1:53",
        ]);
        let text = String::from_utf8_lossy(&o.stdout).to_string();
        (o.status.success() && text.contains(" A 127.0.0.1")).then_some(text)
    });
    eprintln!("sidecar DNS: {answer}");
    // Through the app's resolver (Docker's DNS forwards to the sidecar) and
    // the sidecar's proxy on 127.0.0.1:8080.
    let o = exec(&[
        "get",
        "http://api.default.svc.cluster.local:8080/",
        "--count",
        "30",
        "--wait",
        "10s",
    ]);
    let text = String::from_utf8_lossy(&o.stdout).to_string() + &String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "sidecar get failed:\n{text}");
    for name in ["api-0", "api-1", "api-2"] {
        assert!(
            text.lines().any(|l| l == name),
            "never reached {name}:\n{text}"
        );
    }
    // Nothing of beacon is exposed on the network: the app's IP has no DNS.
    let app = String::from_utf8_lossy(
        &run(compose_cmd(&file, &project, &image).args(["ps", "-q", "app"])).stdout,
    )
    .trim()
    .to_string();
    let app_ip: IpAddr = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &app,
    ])
    .parse()
    .unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let exposed = rt.block_on(beacon::client::query(
        std::net::SocketAddr::new(app_ip, 53),
        "api.default.svc.cluster.local.",
        hickory_proto::rr::RecordType::A,
        Duration::from_millis(500),
    ));
    assert!(
        exposed.is_err(),
        "sidecar DNS answered on the network: {exposed:?}"
    );
}

fn eventually_output<T>(within: Duration, what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "not within {within:?}: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}
