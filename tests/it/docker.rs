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
fn engine_available() -> bool {
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

fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

fn docker(args: &[&str]) -> String {
    let out = run(Command::new("docker").args(args));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

static SEQ: AtomicU32 = AtomicU32::new(0);

/// A unique, DNS-label-safe name for this process and call.
fn unique(what: &str) -> String {
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
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let quiet = |args: &[&str]| {
            let _ = Command::new("docker").args(args).output();
        };
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

    pub fn network(&self) -> String {
        let name = unique("net");
        docker(&["network", "create", &name]);
        self.networks.lock().unwrap().push(name.clone());
        name
    }

    /// `docker run -d --name <unique> <args>`; returns the name.
    pub fn container(&self, what: &str, args: &[&str]) -> String {
        let name = unique(what);
        self.containers.lock().unwrap().push(name.clone());
        let mut all = vec!["run", "-d", "--name", &name];
        all.extend_from_slice(args);
        docker(&all);
        name
    }
}

fn ip_of(container: &str, network: &str) -> IpAddr {
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

    // Paused → gone; unpaused → back.
    let paused = &names[0];
    let mut without = back.clone();
    without.remove(&ip_of(paused, &net));
    docker(&["pause", paused]);
    wait_serving(
        &mut reader,
        &key,
        &without,
        Duration::from_secs(2),
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
    let version = reader.current().version;
    let gone = ip_of(&names[2], &net);
    docker(&["stop", "-t", "1", &names[2]]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    let s = reader.current();
    assert_eq!(
        s.version, version,
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
