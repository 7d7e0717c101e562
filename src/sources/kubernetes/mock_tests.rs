//! The watches over kube's mock client (tower-test `mock::pair`, as
//! kube-rs tests its own client): what kube-runtime's watcher makes of a
//! list, a 410 Gone on the watch and a failing API server, through
//! [`Store`]. Time is paused, so the watcher's backoff runs instantly.

use std::collections::{BTreeMap, VecDeque};
use std::pin::pin;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hyper::{Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock;

use super::*;

type Reply = (StatusCode, Value);

/// What the mock API server answers, per request kind, in order; a
/// request with nothing left waits forever (a quiet watch).
#[derive(Default)]
struct Script {
    replies: BTreeMap<&'static str, VecDeque<Reply>>,
    /// Requests seen: kind, then the query.
    seen: Vec<(&'static str, String)>,
}

fn kind_of(req: &Request<Body>) -> &'static str {
    let path = req.uri().path();
    let watch = req.uri().query().unwrap_or("").contains("watch=true");
    match (path.ends_with("/services"), watch) {
        (true, false) => "list services",
        (true, true) => "watch services",
        (false, false) => "list slices",
        (false, true) => "watch slices",
    }
}

/// Serves `script` to a client, as the API server would.
fn client(script: Arc<Mutex<Script>>) -> Client {
    let (service, handle) = mock::pair::<Request<Body>, Response<Body>>();
    tokio::spawn(async move {
        let mut handle = pin!(handle);
        let mut quiet = Vec::new();
        while let Some((req, send)) = handle.next_request().await {
            let kind = kind_of(&req);
            let query = req.uri().query().unwrap_or("").to_string();
            let reply = {
                let mut s = script.lock().unwrap();
                s.seen.push((kind, query));
                s.replies.get_mut(kind).and_then(VecDeque::pop_front)
            };
            match reply {
                Some((status, body)) => {
                    let bytes = match body {
                        // Watch events: newline-delimited JSON.
                        Value::Array(events) => events
                            .iter()
                            .map(|e| format!("{e}\n"))
                            .collect::<String>()
                            .into_bytes(),
                        other => other.to_string().into_bytes(),
                    };
                    let mut resp = Response::new(Body::from(bytes));
                    *resp.status_mut() = status;
                    send.send_response(resp);
                }
                None => quiet.push(send),
            }
        }
    });
    Client::new(service, "default")
}

fn service(name: &str, ip: &str) -> Value {
    json!({"apiVersion": "v1", "kind": "Service",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": "5"},
        "spec": {"clusterIP": ip, "ports": [{"name": "http", "port": 80}]}})
}

fn slice(name: &str, svc: &str, ips: &[&str]) -> Value {
    let endpoints: Vec<Value> = ips.iter().map(|ip| json!({"addresses": [ip]})).collect();
    json!({"apiVersion": "discovery.k8s.io/v1", "kind": "EndpointSlice",
        "metadata": {"name": name, "namespace": "shop", "resourceVersion": "6",
            "labels": {"kubernetes.io/service-name": svc}},
        "addressType": "IPv4", "endpoints": endpoints})
}

fn list(kind: &str, rv: &str, items: Vec<Value>) -> Reply {
    (
        StatusCode::OK,
        json!({"kind": kind, "apiVersion": "v1",
            "metadata": {"resourceVersion": rv}, "items": items}),
    )
}

fn events(events: Vec<Value>) -> Reply {
    (StatusCode::OK, Value::Array(events))
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
        "message": reason, "reason": reason, "code": code})
}

fn script(replies: Vec<(&'static str, Reply)>) -> Arc<Mutex<Script>> {
    let mut s = Script::default();
    for (kind, reply) in replies {
        s.replies.entry(kind).or_default().push_back(reply);
    }
    Arc::new(Mutex::new(s))
}

/// Runs the source's watches into a store until `want` updates came (or
/// a minute of paused time passed); the updates, described.
async fn run(
    store: &mut Store,
    events: &mut BoxStream<'static, Tagged>,
    want: usize,
) -> Vec<String> {
    let mut out = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while out.len() < want {
        let ev = tokio::select! {
            ev = events.next() => ev.expect("the watches never end"),
            _ = tokio::time::sleep_until(deadline) => break,
        };
        out.extend(store.apply(ev));
    }
    super::tests::describe(&out)
}

fn watches(script: &Arc<Mutex<Script>>) -> (Store, BoxStream<'static, Tagged>) {
    let store = Store::new(&[], ServiceDefaults::default());
    let source = KubernetesSource::new(KubernetesConfig::default(), ServiceDefaults::default());
    let events = source.watches(&client(script.clone()), &store);
    (store, events)
}

fn seen(script: &Arc<Mutex<Script>>, kind: &str) -> Vec<String> {
    let s = script.lock().unwrap();
    s.seen
        .iter()
        .filter(|(k, _)| *k == kind)
        .map(|(_, q)| q.clone())
        .collect()
}

#[tokio::test(start_paused = true)]
async fn init_to_init_done_of_both_watches_is_one_reset() {
    let script = script(vec![
        (
            "list services",
            list("ServiceList", "10", vec![service("web", "10.96.0.1")]),
        ),
        (
            "list slices",
            list(
                "EndpointSliceList",
                "11",
                vec![
                    slice("web-a", "web", &["10.0.0.1"]),
                    slice("web-b", "web", &["10.0.0.2"]),
                ],
            ),
        ),
    ]);
    let (mut store, mut events) = watches(&script);
    assert_eq!(run(&mut store, &mut events, 1).await, ["reset[web.shop:2]"]);
    // Nothing more: the watches are quiet.
    assert!(run(&mut store, &mut events, 1).await.is_empty());
    // Each watch starts from its list's resourceVersion, with bookmarks.
    let watch = seen(&script, "watch slices");
    assert_eq!(watch.len(), 1, "{watch:?}");
    assert!(watch[0].contains("resourceVersion=11"), "{watch:?}");
    assert!(watch[0].contains("allowWatchBookmarks=true"), "{watch:?}");
    assert!(seen(&script, "watch services")[0].contains("resourceVersion=10"));
}

#[tokio::test(start_paused = true)]
async fn a_410_gone_on_the_watch_lists_again_and_sends_the_difference() {
    let script = script(vec![
        (
            "list services",
            list("ServiceList", "10", vec![service("web", "10.96.0.1")]),
        ),
        (
            "list slices",
            list(
                "EndpointSliceList",
                "11",
                vec![slice("web-a", "web", &["10.0.0.1"])],
            ),
        ),
        (
            "watch slices",
            events(vec![
                json!({"type": "BOOKMARK", "object": {"kind": "EndpointSlice",
                    "apiVersion": "discovery.k8s.io/v1", "metadata": {"resourceVersion": "12"},
                    "addressType": "IPv4", "endpoints": []}}),
                json!({"type": "ERROR", "object": status(410, "Expired")}),
            ]),
        ),
        (
            "list slices",
            list(
                "EndpointSliceList",
                "20",
                vec![slice("web-a", "web", &["10.0.0.1", "10.0.0.9"])],
            ),
        ),
    ]);
    let (mut store, mut events) = watches(&script);
    assert_eq!(run(&mut store, &mut events, 1).await, ["reset[web.shop:1]"]);
    // The re-list sends only what changed: no second Reset, and the
    // source stays connected (a 410 comes from a server that answers).
    let out = run(&mut store, &mut events, 1).await;
    assert_eq!(out, ["upsert web.shop:2"]);
    assert!(store.connected());
    assert_eq!(seen(&script, "list slices").len(), 2, "listed again");
    assert_eq!(
        seen(&script, "list services").len(),
        1,
        "services not re-listed"
    );
    // The watch resumes from the new list's resourceVersion.
    assert!(run(&mut store, &mut events, 1).await.is_empty());
    let watch = seen(&script, "watch slices");
    assert_eq!(watch.len(), 2, "{watch:?}");
    assert!(
        watch.last().unwrap().contains("resourceVersion=20"),
        "{watch:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn errors_back_off_keep_the_last_state_and_recover() {
    let fail = || {
        (
            StatusCode::INTERNAL_SERVER_ERROR,
            status(500, "InternalError"),
        )
    };
    let script = script(vec![
        // The first list fails twice: nothing is sent until it succeeds.
        ("list services", fail()),
        ("list services", fail()),
        (
            "list services",
            list("ServiceList", "10", vec![service("web", "10.96.0.1")]),
        ),
        (
            "list slices",
            list(
                "EndpointSliceList",
                "11",
                vec![slice("web-a", "web", &["10.0.0.1"])],
            ),
        ),
        // Synced; then the slice watch fails three times.
        ("watch slices", fail()),
        ("watch slices", fail()),
        ("watch slices", fail()),
        (
            "watch slices",
            events(vec![json!({"type": "MODIFIED",
                "object": slice("web-a", "web", &["10.0.0.1", "10.0.0.2"])})]),
        ),
    ]);
    let (mut store, mut events) = watches(&script);
    let started = tokio::time::Instant::now();
    assert_eq!(run(&mut store, &mut events, 1).await, ["reset[web.shop:1]"]);
    assert_eq!(seen(&script, "list services").len(), 3);

    let out = run(&mut store, &mut events, 1).await;
    assert_eq!(out, ["connected false"]);
    assert!(!store.connected());
    // While failing: the last state is kept, nothing else is sent.
    assert_eq!(
        store.sent()[&ServiceKey::new("shop", "web")]
            .endpoints
            .len(),
        1
    );
    let out = run(&mut store, &mut events, 2).await;
    assert_eq!(out, ["connected true", "upsert web.shop:2"]);
    assert_eq!(seen(&script, "watch slices").len(), 4);
    // Four failures, each retried after a backoff (kube's default: from
    // 800 ms, doubling, with jitter): not a busy loop.
    let waited = started.elapsed();
    assert!(waited >= Duration::from_secs(2), "retried after {waited:?}");
}
