//! What operators see: the event history, `beacon status`, the status page
//! in a real browser (headless Chromium), and the Grafana dashboard and
//! Prometheus rules checked against a running beacon's `/metrics`.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use crate::harness::*;

const HEALTH: &str = "[service.health]\nkind = \"tcp\"\ninterval = \"100ms\"\nfast_interval = \"50ms\"\ntimeout = \"100ms\"\nrise = 1\nfall = 1\n";

struct Setup {
    beacon: Beacon,
    backends: Vec<BackendProcess>,
    port: u16,
    proxy: SocketAddr,
}

/// `web` (two live backends on 127.0.0.61/62, a proxy listener) and
/// `dark` (one endpoint nothing listens on) from a services file.
fn setup() -> Setup {
    let port = free_port();
    let proxy = free_addr();
    let backends = (1..=2)
        .map(|i| BackendProcess::start(&format!("web-{i}"), ip_port(i, port)))
        .collect();
    let mut services = format!(
        "[[service]]\nname = \"web\"\n[[service.port]]\nname = \"http\"\nport = 80\ntarget_port = {port}\nlisten = \"{proxy}\"\n"
    );
    for i in 1..=2 {
        services +=
            &format!("[[service.endpoint]]\nip = \"127.0.0.6{i}\"\nhostname = \"web-{i}\"\n");
    }
    services += HEALTH;
    services += &format!(
        "[[service]]\nname = \"dark\"\nnamespace = \"shop\"\n[[service.port]]\nport = {port}\n[[service.endpoint]]\nip = \"127.0.0.69\"\n{HEALTH}"
    );
    let beacon = Beacon::start(Options {
        extra: "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        services: Some(services),
        ..Options::default()
    });
    beacon.wait_ready();
    let s = Setup {
        beacon,
        backends,
        port,
        proxy,
    };
    wait_verdict(&s.beacon, "127.0.0.69", false);
    wait_verdict(&s.beacon, "127.0.0.61", true);
    s
}

fn ip_port(i: u8, port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 60 + i], port))
}

/// Waits until the endpoint `ip` has the verdict `healthy` in /v1/services.
fn wait_verdict(b: &Beacon, ip: &str, healthy: bool) {
    eventually(
        Duration::from_secs(5),
        &format!("{ip} healthy={healthy}"),
        || {
            let v = b.services_json();
            v["services"]
                .as_array()?
                .iter()
                .any(|s| {
                    s["endpoints"].as_array().is_some_and(|eps| {
                        eps.iter().any(|e| {
                            e["ip"] == ip
                                && e["healthy"] == healthy
                                && e["health"]["probe"]["state"] != "unknown"
                        })
                    })
                })
                .then_some(())
        },
    );
}

fn events(b: &Beacon, query: &str) -> serde_json::Value {
    let (status, body) = http_get(b.admin, &format!("/v1/events?{query}")).unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[test]
fn a_backend_stopped_and_started_is_two_events_in_order_with_versions() {
    let mut s = setup();
    let since = events(&s.beacon, "")["version"].as_u64().unwrap();
    s.backends[0].stop();
    wait_verdict(&s.beacon, "127.0.0.61", false);
    s.backends[0] = BackendProcess::start("web-1", ip_port(1, s.port));
    wait_verdict(&s.beacon, "127.0.0.61", true);
    let v = events(&s.beacon, &format!("since={since}&service=web.default"));
    let list: Vec<&serde_json::Value> = v["events"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["endpoint"] == "127.0.0.61")
        .collect();
    assert_eq!(list.len(), 2, "{v:#}");
    assert_eq!(
        (&list[0]["kind"], &list[1]["kind"]),
        (&"unhealthy".into(), &"healthy".into())
    );
    let reason = list[0]["reason"].as_str().unwrap();
    assert!(reason.contains("refused"), "the reason says why: {reason}");
    assert_eq!(list[1]["reason"], "probe passing");
    let (v0, v1) = (
        list[0]["version"].as_u64().unwrap(),
        list[1]["version"].as_u64().unwrap(),
    );
    assert!(since < v0 && v0 < v1, "versions {since} < {v0} < {v1}");
    assert!(list[0]["time"].as_str().unwrap().ends_with('Z'));
    // The first sync is history too, and each change is logged once.
    let all = events(&s.beacon, "since=0");
    let kinds: BTreeSet<&str> = all["events"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap())
        .collect();
    assert!(
        kinds.contains("source_connected") && kinds.contains("service_added"),
        "{kinds:?}"
    );
    let log = s.beacon.log_text();
    let logged = log
        .lines()
        .filter(|l| {
            l.contains("state change") && l.contains("127.0.0.61") && l.contains("unhealthy")
        })
        .count();
    assert_eq!(logged, 1, "{log}");
    // Newer than the newest version: nothing.
    let newest = all["version"].as_u64().unwrap();
    assert_eq!(
        events(&s.beacon, &format!("since={newest}"))["events"],
        serde_json::json!([])
    );
}

fn status(b: &Beacon, args: &[&str]) -> (i32, String) {
    let admin = b.admin.to_string();
    let mut full = vec!["status", "--admin", &admin];
    full.extend_from_slice(args);
    let (code, out, err) = run_cmd(&full);
    (code.code().unwrap_or(-1), out + &err)
}

#[test]
fn beacon_status_prints_the_table_the_json_and_fails_on_a_dark_service() {
    let s = setup();
    let (code, out) = status(&s.beacon, &["web"]);
    assert_eq!(code, 0, "{out}");
    let lines: Vec<&str> = out.lines().collect();
    assert!(
        lines[0].starts_with("SERVICE")
            && lines[0].contains("VERDICT")
            && lines[0].contains("CONNECTIONS"),
        "{out}"
    );
    assert!(
        lines[1].starts_with("web.default")
            && lines[1].contains("127.0.0.61")
            && lines[1].contains("healthy  probe passing"),
        "{out}"
    );
    assert!(
        lines[2].contains("127.0.0.62") && lines[2].contains("healthy"),
        "{out}"
    );
    assert!(
        out.contains("RECENT EVENTS") && out.contains("service_added"),
        "{out}"
    );
    assert!(!out.contains('\x1b'), "no color when piped: {out:?}");
    // Every service: `dark` serves nothing, so exit 1, and it says why.
    let (code, out) = status(&s.beacon, &[]);
    assert_eq!(code, 1, "{out}");
    let dark = out
        .lines()
        .find(|l| l.starts_with("dark.shop"))
        .unwrap_or_else(|| panic!("{out}"));
    assert!(
        dark.contains("unhealthy") && dark.contains("refused"),
        "{dark}"
    );
    let (code, out) = status(&s.beacon, &["dark.shop", "--output", "json"]);
    assert_eq!(code, 1, "{out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("JSON passed through");
    assert_eq!(v["services"][0]["name"], "dark");
    assert_eq!(v["services"][0]["serving"], 0);
    let (code, out) = status(&s.beacon, &["nosuch"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("no service nosuch"), "{out}");
    // Connections show per endpoint while they are open: the held one on
    // the endpoint it went to, none on the other.
    let mut held = std::net::TcpStream::connect(s.proxy).unwrap();
    std::io::Write::write_all(&mut held, b"GET / HTTP/1.1\r\nHost: x\r\n").unwrap();
    eventually(Duration::from_secs(3), "an open connection", || {
        let (_, out) = status(&s.beacon, &["web"]);
        let conns: Vec<String> = out
            .lines()
            .skip(1)
            .take(2)
            .map(|l| l.rsplit(' ').next().unwrap_or("").to_string())
            .collect();
        let mut sorted = conns.clone();
        sorted.sort();
        (sorted == ["0", "1"]).then_some(())
    });
    let (_, out) = status(&s.beacon, &["web", "--output", "json"]);
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    let per_endpoint: Vec<u64> = v["services"][0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["connections"].as_u64().expect("connections per endpoint"))
        .collect();
    assert_eq!(per_endpoint.iter().sum::<u64>(), 1, "{out}");
    drop(held);
    eventually(Duration::from_secs(3), "the connection gone", || {
        let (_, out) = status(&s.beacon, &["web", "--output", "json"]);
        let v: serde_json::Value = serde_json::from_str(&out).ok()?;
        let sum: u64 = v["services"][0]["endpoints"]
            .as_array()?
            .iter()
            .filter_map(|e| e["connections"].as_u64())
            .sum();
        (sum == 0).then_some(())
    });
    // A beacon that is not there: exit 1 with the reason.
    let (code, out, err) = run_cmd(&["status", "--admin", &free_addr().to_string()]);
    assert_eq!(code.code(), Some(1), "{out}{err}");
    assert!(err.contains("status from"), "{err}");
}

/// Runs headless Chromium on `url` with `args`; its stdout.
/// Each run has its own profile (parallel runs never share one) and is
/// killed after 60 s: a hung browser (seen once under load, stuck in a
/// utility process) is retried once instead of hanging the suite.
fn chromium(url: &str, args: &[&str]) -> String {
    let mut last = String::new();
    for _ in 0..2 {
        let profile = tempfile::tempdir().unwrap();
        let out = Command::new("timeout")
            .args(["-k", "5", "60", "chromium"])
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--hide-scrollbars",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .args(["--virtual-time-budget=1500", "--window-size=1280,900"])
            .args(args)
            .arg(url)
            .output()
            .expect("timeout (coreutils) runs chromium");
        if out.status.success() {
            return String::from_utf8_lossy(&out.stdout).into_owned();
        }
        last = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(
            out.status.code() == Some(124) || out.status.code() == Some(137),
            "chromium failed ({:?}; it must be installed: Debian package `chromium`, \
             ./scripts/test installs it): {last}",
            out.status
        );
    }
    panic!("chromium hung twice (60 s each): {last}");
}

/// The `data-verdict` of the endpoint row of `ip` in a dumped DOM.
fn dom_verdict<'a>(dom: &'a str, ip: &str) -> Option<&'a str> {
    let at = dom.find(&format!("data-ip=\"{ip}\""))?;
    let rest = &dom[at..];
    let v = rest.find("data-verdict=\"")? + "data-verdict=\"".len();
    rest[v..].split('"').next()
}

#[test]
fn the_status_page_in_chromium_shows_services_endpoints_and_verdicts() {
    let mut s = setup();
    let url = format!("http://{}/?refresh=300", s.beacon.admin);
    let dom = chromium(&url, &["--dump-dom"]);
    for svc in ["web.default", "dark.shop"] {
        assert!(
            dom.contains(&format!("data-service=\"{svc}\"")),
            "{svc} missing:\n{dom}"
        );
    }
    assert_eq!(dom_verdict(&dom, "127.0.0.61"), Some("healthy"), "{dom}");
    assert_eq!(dom_verdict(&dom, "127.0.0.62"), Some("healthy"), "{dom}");
    assert_eq!(dom_verdict(&dom, "127.0.0.69"), Some("unhealthy"), "{dom}");
    // Each endpoint row has its open connections and its weight now (the
    // unhealthy one balances with 0 of its weight).
    assert!(
        dom.contains("<th>connections</th>") && dom.contains("<th>weight now</th>"),
        "{dom}"
    );
    assert_eq!(dom.matches("class=\"num conns\"").count(), 3, "{dom}");
    assert!(dom.contains(">0 of 1</td>"), "{dom}");
    assert!(
        dom.contains("connection refused") || dom.contains("refused"),
        "the reason is shown"
    );
    assert!(dom.contains("service_added"), "recent events are shown");
    // Turned unhealthy: the next refresh shows it.
    s.backends[1].stop();
    wait_verdict(&s.beacon, "127.0.0.62", false);
    let shot = s.beacon.path("status.png");
    let dom = chromium(
        &url,
        &["--dump-dom", &format!("--screenshot={}", shot.display())],
    );
    assert_eq!(dom_verdict(&dom, "127.0.0.62"), Some("unhealthy"), "{dom}");
    assert!(
        dom.contains("data-kind=\"unhealthy\""),
        "the event is listed"
    );
    let png = std::fs::read(&shot).expect("a screenshot was written");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 10_000,
        "{} bytes",
        png.len()
    );
    if let Ok(dest) = std::env::var("BEACON_SCREENSHOT") {
        std::fs::copy(&shot, dest).unwrap();
    }
}

/// Metric names (`beacon_…`) in PromQL text, histogram suffixes removed.
fn metric_names(promql: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let bytes = promql.as_bytes();
    let mut i = 0;
    while let Some(at) = promql[i..].find("beacon_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let boundary =
            start == 0 || !(bytes[start - 1].is_ascii_alphanumeric() || bytes[start - 1] == b'_');
        if boundary {
            let name = &promql[start..end];
            let base = ["_bucket", "_sum", "_count"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(name);
            out.insert(base.to_string());
        }
        i = end;
    }
    out
}

#[test]
fn the_dashboard_and_the_alerts_use_metrics_a_running_beacon_exports() {
    let s = setup();
    // Some traffic, so that every family has a sample.
    assert!(fetch_name(s.proxy).is_ok());
    dig(s.beacon.dns, "web.default.svc.cluster.local", "A", false);
    let dashboard: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(repo_path("deploy/grafana/beacon.json")).unwrap(),
    )
    .expect("the dashboard is JSON");
    for field in [
        "title",
        "uid",
        "panels",
        "schemaVersion",
        "time",
        "templating",
    ] {
        assert!(dashboard.get(field).is_some(), "dashboard field {field}");
    }
    let mut exprs = Vec::new();
    for p in dashboard["panels"].as_array().unwrap() {
        assert!(
            p["type"].is_string() && p["title"].is_string() && p["gridPos"].is_object(),
            "{p}"
        );
        for t in p["targets"].as_array().into_iter().flatten() {
            exprs.push(t["expr"].as_str().expect("a PromQL target").to_string());
        }
    }
    assert!(exprs.len() >= 10, "{} queries", exprs.len());
    let rules = std::fs::read_to_string(repo_path("deploy/prometheus/rules.yml")).unwrap();
    let alerts: Vec<&str> = rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("expr:"))
        .collect();
    assert!(alerts.len() >= 4, "{rules}");
    exprs.extend(alerts.iter().map(|a| a.to_string()));
    let scrape = std::fs::read_to_string(repo_path("deploy/prometheus/prometheus.yml")).unwrap();
    assert!(
        scrape.contains("rules.yml") && scrape.contains("scrape_configs"),
        "{scrape}"
    );
    let used: BTreeSet<String> = exprs.iter().flat_map(|e| metric_names(e)).collect();
    assert!(used.len() >= 12, "{used:?}");
    // DNS tallies are flushed in batches: wait for them.
    let metrics = eventually(Duration::from_secs(5), "DNS metrics", || {
        let m = s.beacon.metrics();
        m.contains("# TYPE beacon_dns_request_duration_seconds")
            .then_some(m)
    });
    // The forwarder's metrics appear once it forwards: a second beacon
    // forwards one outside name to an upstream nothing listens on.
    let fwd = Beacon::start(Options {
        dns_extra: format!(
            "forward = [\"{}\"]\nforward_timeout = \"200ms\"\n",
            free_addr()
        ),
        ..Options::default()
    });
    let _ = dig(fwd.dns, "www.example.org", "A", false);
    let forwarding = eventually(Duration::from_secs(5), "forwarder metrics", || {
        let m = fwd.metrics();
        m.contains("# TYPE beacon_dns_upstream_requests_total")
            .then_some(m)
    });
    let exported: BTreeSet<&str> = metrics
        .lines()
        .chain(forwarding.lines())
        .filter_map(|l| l.strip_prefix("# TYPE ")?.split(' ').next())
        .collect();
    let missing: Vec<&String> = used
        .iter()
        .filter(|m| !exported.contains(m.as_str()))
        .collect();
    assert!(
        missing.is_empty(),
        "used but not exported: {missing:?}\n{metrics}"
    );
}

#[test]
fn at_ten_thousand_services_a_page_is_small_and_the_log_is_not_flooded() {
    let mut services = String::new();
    for i in 0..10_000u32 {
        services += &format!(
            "[[service]]\nname = \"svc-{i}\"\nnamespace = \"ns-{}\"\n[[service.port]]\nport = 80\n[[service.endpoint]]\nip = \"10.{}.{}.1\"\n[service.health]\nkind = \"none\"\n",
            i % 10,
            i >> 8,
            i & 255
        );
    }
    let b = Beacon::start(Options {
        extra: "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        services: Some(services),
        ..Options::default()
    });
    b.wait_ready();
    let started = std::time::Instant::now();
    let (status, body) = http_get(
        b.admin,
        "/v1/services?namespace=ns-3&search=svc-1&offset=50&limit=50",
    )
    .unwrap();
    let took = started.elapsed();
    assert_eq!(status, 200);
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(v["services"].as_array().unwrap().len(), 50);
    // ns-3 holds i % 10 == 3; of those, names starting svc-1: 13, 103..193, 1003..1993.
    assert_eq!(v["total"], 1 + 10 + 100);
    assert!(
        body.len() < 64 * 1024,
        "{} bytes for 50 services",
        body.len()
    );
    assert!(took < Duration::from_secs(2), "a page took {took:?}");
    // The first sync is 10,000 events in the ring (bounded) and a bounded
    // number of log lines.
    let ev = events(&b, "since=0&limit=1000");
    assert_eq!(ev["events"].as_array().unwrap().len(), 1000);
    let logged = b
        .log_text()
        .lines()
        .filter(|l| l.contains("state change"))
        .count();
    assert!(logged <= 101, "{logged} log lines");
    eprintln!(
        "10k services: a filtered page in {took:?}, {} bytes",
        body.len()
    );
}
