//! Supervision and the metrics contract, on the real binary.
//!
//! A loop that dies outside shutdown must take the process down with exit
//! 1 and its name in the log (the test-only fault hook `BEACON_TEST_FAULT`
//! kills one running loop); `/metrics` must carry every metric name of the
//! contract in DESIGN.md with its HELP line.

use std::time::Duration;

use crate::harness::*;

const SERVICES: &str = r#"
[[service]]
name = "web"
  [[service.port]]
  name = "http"
  port = 80
  listen = "LISTEN"
  [[service.endpoint]]
  ip = "127.0.0.1"
  port = BACKEND_PORT
"#;

fn start_with_fault(fault: &str) -> Beacon {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let services = SERVICES
        .replace("LISTEN", &free_addr().to_string())
        .replace(
            "BACKEND_PORT",
            &backend.local_addr().unwrap().port().to_string(),
        );
    Beacon::start(Options {
        extra: "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        services: Some(services),
        env: vec![("BEACON_TEST_FAULT".into(), fault.into())],
        ..Options::default()
    })
}

/// Each loop killed on purpose: the process exits 1 and names the loop.
#[test]
fn a_loop_that_dies_outside_shutdown_exits_1_and_names_the_loop() {
    for (fault, says) in [
        ("health:panic@1500", "loop `health` panicked"),
        ("registry:exit@1500", "loop `registry` ended"),
        ("dns:panic@1500", "loop `dns` panicked"),
        ("admin:exit@1500", "loop `admin` ended"),
        ("proxy:panic@1500", "loop `proxy` panicked"),
        ("source/file:panic@1500", "loop `source/file:"),
    ] {
        let mut b = start_with_fault(fault);
        let status = b.wait_exit(Duration::from_secs(10));
        let log = b.log_text();
        assert_eq!(status.code(), Some(1), "{fault}: exit status; log:\n{log}");
        let error_line = log
            .lines()
            .find(|l| l.contains("ERROR") && l.contains(says))
            .unwrap_or_else(|| panic!("{fault}: no ERROR line with `{says}`; log:\n{log}"));
        assert!(
            error_line.contains("before shutdown"),
            "{fault}: {error_line}"
        );
    }
}

/// Without a fault the same config runs and stops cleanly: the exit 1 above
/// comes from the fault, not from the setup.
#[test]
fn without_a_fault_the_same_setup_exits_0_on_sigterm() {
    let mut b = start_with_fault("");
    b.wait_ready();
    std::thread::sleep(Duration::from_millis(1700));
    assert!(b.child.try_wait().unwrap().is_none(), "still running");
    b.signal(15);
    let status = b.wait_exit(Duration::from_secs(5));
    assert_eq!(status.code(), Some(0), "log:\n{}", b.log_text());
}

/// The metric names of the contract: the `beacon_*` names listed in
/// DESIGN.md's "Metrics" section.
fn contract_metric_names() -> Vec<String> {
    let path = repo_path("../shared/DESIGN.md");
    let design = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("the contract is missing at {}: {e}", path.display()));
    let start = design
        .find("### Metrics")
        .expect("DESIGN.md has a Metrics section");
    let section = &design[start..];
    let end = section[4..].find("\n#").map_or(section.len(), |i| i + 4);
    let mut names: Vec<String> = section[..end]
        .split(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
        .filter(|w| w.starts_with("beacon_") && w.len() > "beacon_".len())
        .map(str::to_string)
        .collect();
    names.sort();
    names.dedup();
    names
}

#[test]
fn metrics_has_every_contract_name_with_its_help_line() {
    let names = contract_metric_names();
    assert!(names.len() >= 13, "parsed too few names: {names:?}");
    // Every contract name is in the catalogue.
    let catalogue: Vec<&str> = beacon::telemetry::METRICS.iter().map(|m| m.name).collect();
    for n in &names {
        assert!(
            catalogue.contains(&n.as_str()),
            "{n} is not in telemetry::METRICS"
        );
    }

    // A service behind the proxy, a health probe, one DNS query and one
    // proxied connection, so every series exists.
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = free_addr();
    let services = SERVICES.replace("LISTEN", &listen.to_string()).replace(
        "BACKEND_PORT",
        &backend.local_addr().unwrap().port().to_string(),
    );
    let b = Beacon::start(Options {
        extra: "[health]\ninterval = \"100ms\"\ntimeout = \"50ms\"\n[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        services: Some(services),
        ..Options::default()
    });
    b.wait_ready();
    assert_eq!(
        query_a(b.dns, "web.default.svc.cluster.local"),
        Some(vec!["127.0.0.1".to_string()])
    );
    let conn = eventually(Duration::from_secs(5), "proxy listener", || {
        std::net::TcpStream::connect(listen).ok()
    });
    let (_accepted, _) = backend.accept().unwrap();
    drop(conn);

    let text = eventually(Duration::from_secs(5), "every contract metric", || {
        let text = b.metrics();
        names
            .iter()
            .all(|n| {
                text.contains(&format!("# HELP {n} ")) && text.contains(&format!("# TYPE {n} "))
            })
            .then_some(text)
    });
    for n in &names {
        let help = text
            .lines()
            .find(|l| l.starts_with(&format!("# HELP {n} ")))
            .unwrap();
        let expected = beacon::telemetry::METRICS
            .iter()
            .find(|m| m.name == n)
            .unwrap()
            .help;
        assert_eq!(help, format!("# HELP {n} {expected}"));
    }
}

/// A second SIGTERM during the drain exits at once with 1, logging what it
/// cut; without it the drain waits for the open connection (the grace).
#[test]
fn a_second_sigterm_during_the_drain_exits_1_at_once() {
    let backend = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let listen = free_addr();
    let services = SERVICES.replace("LISTEN", &listen.to_string()).replace(
        "BACKEND_PORT",
        &backend.local_addr().unwrap().port().to_string(),
    );
    let mut b = Beacon::start(Options {
        extra: "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n".into(),
        services: Some(services),
        ..Options::default()
    });
    b.wait_ready();
    // One open proxied connection keeps the drain waiting (grace 3 s).
    let _client = eventually(Duration::from_secs(5), "proxy listener", || {
        std::net::TcpStream::connect(listen).ok()
    });
    let (_upstream, _) = backend.accept().unwrap();
    b.signal(15);
    std::thread::sleep(Duration::from_millis(400));
    assert!(
        b.child.try_wait().unwrap().is_none(),
        "the first SIGTERM drains: still running while a connection is open"
    );
    let second = std::time::Instant::now();
    b.signal(15);
    let status = b.wait_exit(Duration::from_secs(2));
    let took = second.elapsed();
    let log = b.log_text();
    assert_eq!(status.code(), Some(1), "log:\n{log}");
    assert!(took < Duration::from_millis(1000), "exit took {took:?}");
    let cut = log
        .lines()
        .find(|l| l.contains("second signal: exiting now"))
        .unwrap_or_else(|| panic!("no line saying what was cut; log:\n{log}"));
    assert!(cut.contains("connections=1"), "{cut}");
}
