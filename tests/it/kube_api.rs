//! A replayed Kubernetes API server for the `kubernetes` source tests: it
//! speaks what kube-apiserver speaks for Services (v1) and EndpointSlices
//! (discovery.k8s.io/v1), no more.
//!
//! - `GET /api/v1/services`, `/apis/discovery.k8s.io/v1/endpointslices` (and
//!   the `/namespaces/<ns>/` forms): a List with `metadata.resourceVersion`.
//! - the same with `?watch=true&resourceVersion=N`: a chunked stream of
//!   newline-delimited watch events after N (`ADDED`, `MODIFIED`,
//!   `DELETED`), a `BOOKMARK` every 200 ms, and, when N is older than the
//!   compacted history, one `ERROR` event with a 410 `Expired` Status (as
//!   kube-apiserver does for a too old resourceVersion).
//!
//! Objects are stored as JSON, shaped like the API server serializes them.
//! [`ApiServer::stop`] closes the listener and every open watch; `start`
//! again on the same port resumes with the same history.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Kind {
    Service,
    Slice,
}

impl Kind {
    fn of_path(path: &str) -> Option<(Kind, Option<String>)> {
        let (prefix, rest) = if let Some(r) = path.strip_prefix("/api/v1") {
            ("core", r)
        } else if let Some(r) = path.strip_prefix("/apis/discovery.k8s.io/v1") {
            ("discovery", r)
        } else {
            return None;
        };
        let (ns, resource) = match rest.strip_prefix("/namespaces/") {
            Some(r) => {
                let (ns, res) = r.split_once('/')?;
                (Some(ns.to_string()), format!("/{res}"))
            }
            None => (None, rest.to_string()),
        };
        match (prefix, resource.as_str()) {
            ("core", "/services") => Some((Kind::Service, ns)),
            ("discovery", "/endpointslices") => Some((Kind::Slice, ns)),
            _ => None,
        }
    }

    fn list_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "ServiceList"),
            Kind::Slice => ("discovery.k8s.io/v1", "EndpointSliceList"),
        }
    }

    fn object_kind(self) -> (&'static str, &'static str) {
        match self {
            Kind::Service => ("v1", "Service"),
            Kind::Slice => ("discovery.k8s.io/v1", "EndpointSlice"),
        }
    }
}

struct Change {
    rv: u64,
    kind: Kind,
    kind_of_event: &'static str,
    object: Value,
}

#[derive(Default)]
struct State {
    rv: u64,
    /// Resource versions at or below this are compacted: 410 Gone.
    compacted: u64,
    objects: BTreeMap<(Kind, String, String), Value>,
    history: Vec<Change>,
    /// Bumped by `stop`: open watches end.
    epoch: u64,
}

/// Counts of what the server answered, for assertions.
#[derive(Default)]
pub struct Stats {
    pub lists: AtomicUsize,
    pub watches: AtomicUsize,
    pub gone: AtomicUsize,
}

pub struct ApiServer {
    pub addr: SocketAddr,
    state: Arc<(Mutex<State>, Condvar)>,
    pub stats: Arc<Stats>,
    running: Option<(Arc<AtomicBool>, JoinHandle<()>)>,
}

impl ApiServer {
    pub fn start() -> ApiServer {
        let mut s = ApiServer {
            addr: super::harness::free_addr(),
            state: Arc::new((Mutex::new(State::default()), Condvar::new())),
            stats: Arc::new(Stats::default()),
            running: None,
        };
        s.resume();
        s
    }

    /// Listens again on the same address.
    pub fn resume(&mut self) {
        assert!(self.running.is_none(), "already running");
        // The stopped accept thread may still hold the old listener for a
        // moment: retry the bind for up to 5 s.
        let started = std::time::Instant::now();
        let listener = loop {
            match TcpListener::bind(self.addr) {
                Ok(l) => break l,
                Err(e) if started.elapsed() < std::time::Duration::from_secs(5) => {
                    let _ = e;
                    std::thread::sleep(std::time::Duration::from_millis(50));
                }
                Err(e) => panic!("bind the fake API server on {}: {e}", self.addr),
            }
        };
        listener.set_nonblocking(true).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let (state, stats, flag) = (self.state.clone(), self.stats.clone(), stop.clone());
        let accept = std::thread::spawn(move || {
            while !flag.load(Ordering::SeqCst) {
                match listener.accept() {
                    Ok((conn, _)) => {
                        let (state, stats) = (state.clone(), stats.clone());
                        std::thread::spawn(move || serve(conn, &state, &stats));
                    }
                    Err(_) => std::thread::sleep(Duration::from_millis(10)),
                }
            }
        });
        self.running = Some((stop, accept));
    }

    /// The API server goes away: the listener closes, every watch ends.
    pub fn stop(&mut self) {
        if let Some((flag, accept)) = self.running.take() {
            flag.store(true, Ordering::SeqCst);
            accept.join().unwrap();
        }
        let (lock, cv) = &*self.state;
        lock.lock().unwrap().epoch += 1;
        cv.notify_all();
    }

    /// Forgets the history up to now: a watch from an older
    /// resourceVersion gets 410 Gone.
    pub fn compact(&self) {
        let (lock, _) = &*self.state;
        let mut st = lock.lock().unwrap();
        st.compacted = st.rv;
        st.history.clear();
    }

    /// Creates or replaces an object (`ADDED` or `MODIFIED`).
    pub fn apply(&self, kind: Kind, mut object: Value) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap();
        st.rv += 1;
        let rv = st.rv;
        let (api, k) = kind.object_kind();
        object["apiVersion"] = json!(api);
        object["kind"] = json!(k);
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        object["metadata"]["uid"] = json!(format!("uid-{}", name_of(&object).1));
        let id = name_of(&object);
        let key = (kind, id.0, id.1);
        let kind_of_event = if st.objects.contains_key(&key) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        st.objects.insert(key, object.clone());
        st.history.push(Change {
            rv,
            kind,
            kind_of_event,
            object,
        });
        cv.notify_all();
    }

    pub fn delete(&self, kind: Kind, namespace: &str, name: &str) {
        let (lock, cv) = &*self.state;
        let mut st = lock.lock().unwrap();
        let Some(mut object) = st
            .objects
            .remove(&(kind, namespace.to_string(), name.to_string()))
        else {
            return;
        };
        st.rv += 1;
        let rv = st.rv;
        object["metadata"]["resourceVersion"] = json!(rv.to_string());
        st.history.push(Change {
            rv,
            kind,
            kind_of_event: "DELETED",
            object,
        });
        cv.notify_all();
    }

    /// A kubeconfig pointing at this server (plain HTTP, no credentials).
    pub fn kubeconfig(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n",
            self.addr
        )
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
    }
}

fn name_of(object: &Value) -> (String, String) {
    let m = &object["metadata"];
    (
        m["namespace"].as_str().unwrap_or("default").to_string(),
        m["name"].as_str().unwrap_or_default().to_string(),
    )
}

fn query(q: &str, key: &str) -> Option<String> {
    q.split('&').find_map(|kv| {
        let (k, v) = kv.split_once('=')?;
        (k == key).then(|| v.to_string())
    })
}

fn respond(conn: &mut TcpStream, status: &str, body: &Value) {
    let body = body.to_string();
    let head = format!(
        "HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body.as_bytes());
}

fn serve(mut conn: TcpStream, state: &(Mutex<State>, Condvar), stats: &Stats) {
    conn.set_nonblocking(false).unwrap();
    let mut reader = BufReader::new(conn.try_clone().unwrap());
    let mut line = String::new();
    if reader.read_line(&mut line).is_err() {
        return;
    }
    // The headers: nothing in them matters here.
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h).unwrap_or(0) == 0 || h == "\r\n" {
            break;
        }
    }
    let target = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let (path, q) = target.split_once('?').unwrap_or((&target, ""));
    let Some((kind, ns)) = Kind::of_path(path) else {
        let status = json!({"kind": "Status", "apiVersion": "v1", "metadata": {},
            "status": "Failure", "reason": "NotFound", "code": 404});
        respond(&mut conn, "404 Not Found", &status);
        return;
    };
    if query(q, "watch").is_some_and(|w| w == "true" || w == "1") {
        let from: u64 = query(q, "resourceVersion")
            .and_then(|v| v.parse().ok())
            .unwrap_or(0);
        let timeout = query(q, "timeoutSeconds")
            .and_then(|v| v.parse().ok())
            .unwrap_or(290u64);
        stats.watches.fetch_add(1, Ordering::SeqCst);
        watch(
            conn,
            state,
            stats,
            kind,
            ns,
            from,
            Duration::from_secs(timeout),
        );
    } else {
        stats.lists.fetch_add(1, Ordering::SeqCst);
        let st = state.0.lock().unwrap();
        let items: Vec<Value> = st
            .objects
            .iter()
            .filter(|((k, n, _), _)| *k == kind && ns.as_ref().is_none_or(|ns| ns == n))
            .map(|(_, v)| v.clone())
            .collect();
        let (api, list) = kind.list_kind();
        let body = json!({"apiVersion": api, "kind": list,
            "metadata": {"resourceVersion": st.rv.to_string()}, "items": items});
        drop(st);
        respond(&mut conn, "200 OK", &body);
    }
}

fn chunk(conn: &mut TcpStream, event: &Value) -> bool {
    let mut line = event.to_string();
    line.push('\n');
    let framed = format!("{:x}\r\n{line}\r\n", line.len());
    conn.write_all(framed.as_bytes()).is_ok()
}

fn watch(
    mut conn: TcpStream,
    state: &(Mutex<State>, Condvar),
    stats: &Stats,
    kind: Kind,
    ns: Option<String>,
    from: u64,
    timeout: Duration,
) {
    let head =
        "HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n";
    if conn.write_all(head.as_bytes()).is_err() {
        return;
    }
    let (lock, cv) = state;
    let mut st = lock.lock().unwrap();
    if from < st.compacted {
        stats.gone.fetch_add(1, Ordering::SeqCst);
        let status = json!({"type": "ERROR", "object": {"kind": "Status", "apiVersion": "v1",
            "metadata": {}, "status": "Failure",
            "message": format!("too old resource version: {from} ({})", st.compacted),
            "reason": "Expired", "code": 410}});
        drop(st);
        chunk(&mut conn, &status);
        let _ = conn.write_all(b"0\r\n\r\n");
        return;
    }
    let epoch = st.epoch;
    let deadline = Instant::now() + timeout;
    let mut sent = from;
    let (api, k) = kind.object_kind();
    while st.epoch == epoch && Instant::now() < deadline {
        let events: Vec<Value> = st
            .history
            .iter()
            .filter(|c| c.rv > sent && c.kind == kind)
            .filter(|c| ns.as_ref().is_none_or(|ns| *ns == name_of(&c.object).0))
            .map(|c| json!({"type": c.kind_of_event, "object": c.object}))
            .collect();
        let bookmark = json!({"type": "BOOKMARK", "object": {"apiVersion": api, "kind": k,
            "metadata": {"resourceVersion": st.rv.to_string()}}});
        sent = st.rv;
        drop(st);
        for e in events.iter().chain([&bookmark]) {
            if !chunk(&mut conn, e) {
                return;
            }
        }
        st = lock.lock().unwrap();
        if st.rv == sent && st.epoch == epoch {
            st = cv.wait_timeout(st, Duration::from_millis(200)).unwrap().0;
        }
    }
    drop(st);
    let _ = conn.write_all(b"0\r\n\r\n");
}
