//! The spine end to end: shipped config, hot reload, check, CLI, shutdown.

use std::time::{Duration, Instant};

use crate::harness::*;

const FILE_SOURCE: &str = "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n";

fn service_ips(b: &Beacon, name: &str) -> Option<Vec<String>> {
    let json = b.services_json();
    let svc = json["services"]
        .as_array()?
        .iter()
        .find(|s| s["name"] == name)?
        .clone();
    Some(
        svc["endpoints"]
            .as_array()?
            .iter()
            .map(|e| e["ip"].as_str().unwrap().to_string())
            .collect(),
    )
}

#[test]
fn shipped_config_becomes_ready_and_lists_shipped_services() {
    // The shipped files, with the listen addresses moved to free ports.
    let dir = tempfile::tempdir().unwrap();
    let admin = free_addr();
    let dns = free_addr();
    let config = std::fs::read_to_string(repo_path("config/beacon.toml"))
        .unwrap()
        .replace("127.0.0.1:1053", &dns.to_string())
        .replace("127.0.0.1:9153", &admin.to_string());
    std::fs::write(dir.path().join("beacon.toml"), config).unwrap();
    std::fs::copy(
        repo_path("config/services.toml"),
        dir.path().join("services.toml"),
    )
    .unwrap();
    let cfg = dir.path().join("beacon.toml").display().to_string();
    let b = Beacon::spawn(dir, admin, dns, &["run".into(), "--config".into(), cfg]);
    b.wait_ready();
    let json = b.services_json();
    assert_eq!(json["ready"], true);
    let names: Vec<String> = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| {
            format!(
                "{}.{}",
                s["name"].as_str().unwrap(),
                s["namespace"].as_str().unwrap()
            )
        })
        .collect();
    assert_eq!(names, vec!["db.data", "web.default"]);
    let db = &json["services"][0];
    assert!(db["source"].as_str().unwrap().starts_with("file:"));
    assert_eq!(db["endpoints"][1]["healthy"], false);
    assert_eq!(db["endpoints"][1]["reason"], "not ready in source");
    assert_eq!(json["services"][1]["vip"], "127.0.0.20");
}

#[test]
fn healthz_and_readyz_answer_200_without_sources() {
    // No sources: ready at once.
    let b = Beacon::start(Options::default());
    assert_eq!(http_get(b.admin, "/healthz").unwrap().0, 200);
    b.wait_ready();
    assert_eq!(b.services_json()["ready"], true);
}

#[test]
fn edits_apply_within_a_second_and_broken_edits_keep_the_last_good_state() {
    let b = Beacon::start(Options {
        extra: FILE_SOURCE.into(),
        services: Some(
            "[[service]]\nname = \"web\"\n[[service.endpoint]]\nip = \"127.0.0.11\"\n".into(),
        ),
        ..Options::default()
    });
    b.wait_ready();
    assert_eq!(service_ips(&b, "web").unwrap(), vec!["127.0.0.11"]);
    let ok_before = b
        .metric("beacon_config_reloads_total{result=\"ok\"}")
        .unwrap_or(0.0);

    let file = b.path("services.toml");
    let started = Instant::now();
    std::fs::write(
        &file,
        "[[service]]\nname = \"web\"\n[[service.endpoint]]\nip = \"127.0.0.12\"\n",
    )
    .unwrap();
    eventually(
        Duration::from_secs(1),
        "edit visible in /v1/services",
        || (service_ips(&b, "web")? == vec!["127.0.0.12"]).then_some(()),
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(
        b.metric("beacon_config_reloads_total{result=\"ok\"}")
            .unwrap()
            > ok_before
    );

    // Broken: the endpoint IP is not an IP (line 4, column 6).
    std::fs::write(
        &file,
        "[[service]]\nname = \"web\"\n[[service.endpoint]]\nip = \"127.0.0.300\"\n",
    )
    .unwrap();
    eventually(Duration::from_secs(2), "reload error counted", || {
        (b.metric("beacon_config_reloads_total{result=\"error\"}")? >= 1.0).then_some(())
    });
    assert_eq!(
        service_ips(&b, "web").unwrap(),
        vec!["127.0.0.12"],
        "last good state stays"
    );
    let log = b.log_text();
    assert!(
        log.contains("services.toml:4:6: endpoint ip `127.0.0.300` is not an IP address"),
        "the log names file, line and column:\n{log}"
    );

    // Fixing it applies.
    std::fs::write(
        &file,
        "[[service]]\nname = \"web\"\n[[service.endpoint]]\nip = \"127.0.0.13\"\n",
    )
    .unwrap();
    eventually(Duration::from_secs(1), "fixed edit visible", || {
        (service_ips(&b, "web")? == vec!["127.0.0.13"]).then_some(())
    });
}

/// CPU seconds (user + system) the process has used, from /proc.
fn reloads(b: &Beacon, result: &str) -> f64 {
    b.metric(&format!(
        "beacon_config_reloads_total{{result=\"{result}\"}}"
    ))
    .unwrap_or(0.0)
}

/// Replaces `file` atomically (write a temporary file, rename it over).
fn replace(file: &std::path::Path, text: &str) {
    let tmp = file.with_extension("toml.tmp");
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, file).unwrap();
}

#[test]
fn reads_sighup_and_check_do_not_reload_an_unchanged_file() {
    // Issue 11 defect 1: beacon's own re-read (an open) was seen as a
    // change, which re-read the file 50 ms later, forever (~20 reloads/s).
    let web = "[[service]]\nname = \"web\"\n[[service.endpoint]]\nip = \"127.0.0.11\"\n";
    let b = Beacon::start(Options {
        extra: FILE_SOURCE.into(),
        services: Some(web.into()),
        ..Options::default()
    });
    b.wait_ready();
    let file = b.path("services.toml");
    let ok0 = reloads(&b, "ok");
    // Read it, SIGHUP, `beacon check` it: none changes its content.
    for _ in 0..3 {
        std::fs::read_to_string(&file).unwrap();
    }
    b.signal(1);
    let cfg = b.path("beacon.toml").display().to_string();
    let (status, _, stderr) = run_cmd(&["check", "--config", &cfg]);
    assert!(status.success(), "{stderr}");
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        b.log_text().contains("SIGHUP: re-reading services files"),
        "SIGHUP was handled"
    );
    assert_eq!(
        reloads(&b, "ok") - ok0,
        0.0,
        "no real change, no reload:\n{}",
        b.log_text()
    );
    // One real change: exactly one reload, then quiet.
    replace(&file, &web.replace("127.0.0.11", "127.0.0.12"));
    eventually(Duration::from_secs(2), "change visible", || {
        (service_ips(&b, "web")? == vec!["127.0.0.12"]).then_some(())
    });
    let cpu0 = cpu_seconds(b.child.id());
    std::thread::sleep(Duration::from_secs(2));
    let idle_cpu = cpu_seconds(b.child.id()) - cpu0;
    assert_eq!(reloads(&b, "ok") - ok0, 1.0, "one change, one reload");
    assert!(idle_cpu < 0.2, "idle CPU {idle_cpu:.2} s in 2 s");
    // A SIGHUP after a change the watcher missed would re-read it; with
    // nothing changed it parses nothing.
    b.signal(1);
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(reloads(&b, "ok") - ok0, 1.0);
    assert_eq!(service_ips(&b, "web").unwrap(), vec!["127.0.0.12"]);
}

#[test]
fn torn_writes_keep_the_last_good_state_dns_and_listener() {
    // Issue 11 defect 2: an empty file, or one cut at a service boundary
    // by a slow writer, was valid TOML meaning "zero services": the
    // listener closed and DNS answered NXDOMAIN.
    let listen = free_addr();
    let svc = |name: &str, vip: &str, extra: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nvip = \"{vip}\"\n{extra}[[service.endpoint]]\nip = \"127.0.0.11\"\n\n"
        )
    };
    let port = format!("[[service.port]]\nname = \"http\"\nport = 80\nlisten = \"{listen}\"\n");
    let api = svc("api", "127.0.0.21", "");
    let web = svc("web", "127.0.0.20", &port);
    let b = Beacon::start(Options {
        extra: FILE_SOURCE.into(),
        services: Some(format!("{api}{web}")),
        ..Options::default()
    });
    b.wait_ready();
    let name = "web.default.svc.cluster.local";
    let serving = |what: &str| {
        assert_eq!(
            query_a(b.dns, name),
            Some(vec!["127.0.0.20".to_string()]),
            "{what}: DNS answers web"
        );
        std::net::TcpStream::connect_timeout(&listen, Duration::from_secs(1))
            .unwrap_or_else(|e| panic!("{what}: listener gone: {e}"));
    };
    serving("before");
    let file = b.path("services.toml");
    let errors0 = reloads(&b, "error");

    // A slow writer, cut at a service boundary for 800 ms.
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&file).unwrap();
        f.write_all(api.replace("127.0.0.21", "127.0.0.22").as_bytes())
            .unwrap();
        f.flush().unwrap();
        for _ in 0..4 {
            std::thread::sleep(Duration::from_millis(200));
            serving("mid-write");
        }
        f.write_all(web.replace("127.0.0.20", "127.0.0.23").as_bytes())
            .unwrap();
    }
    eventually(Duration::from_secs(2), "whole write applied", || {
        (query_a(b.dns, name)? == vec!["127.0.0.23"]).then_some(())
    });
    assert_eq!(
        query_a(b.dns, "api.default.svc.cluster.local"),
        Some(vec!["127.0.0.22".to_string()])
    );

    // A zero-byte file is a torn write: rejected, counted, logged.
    std::fs::File::create(&file).unwrap();
    eventually(
        Duration::from_secs(2),
        "empty file counted as error",
        || (reloads(&b, "error") > errors0).then_some(()),
    );
    assert_eq!(query_a(b.dns, name), Some(vec!["127.0.0.23".to_string()]));
    std::net::TcpStream::connect_timeout(&listen, Duration::from_secs(1))
        .expect("listener stays after an empty file");
    assert!(
        b.log_text().contains("write `service = []`"),
        "the log says how to mean no services:\n{}",
        b.log_text()
    );

    // `service = []` really means none: the listener closes.
    replace(&file, "service = []\n");
    eventually(Duration::from_secs(2), "explicit empty applied", || {
        std::net::TcpStream::connect_timeout(&listen, Duration::from_millis(200))
            .is_err()
            .then_some(())
    });
    assert!(service_ips(&b, "web").is_none());
}

#[test]
fn check_reports_each_error_with_position_and_exit_2() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("beacon.toml");
    std::fs::write(
        &cfg,
        "[health]\nrise = 0\n[[source]]\ntype = \"file\"\npath = \"svc.toml\"\n",
    )
    .unwrap();
    std::fs::write(dir.path().join("svc.toml"), "[[service]]\nname = \"web\"\n").unwrap();
    let (status, _, stderr) = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("beacon.toml:2:8: rise = 0 is out of range"),
        "{stderr}"
    );

    std::fs::write(&cfg, "[[source]]\ntype = \"file\"\npath = \"svc.toml\"\n").unwrap();
    std::fs::write(
        dir.path().join("svc.toml"),
        "[[service]]\nname = \"web\"\n[[service.port]]\nport = 99999\n[[service.endpoint]]\nip = \"x\"\n",
    )
    .unwrap();
    let (status, _, stderr) = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2));
    let lines: Vec<&str> = stderr.lines().collect();
    assert_eq!(lines.len(), 2, "one line per error: {stderr}");
    assert!(
        lines[0].ends_with("svc.toml:4:8: port = 99999 is out of range; allowed: 1 to 65535"),
        "{stderr}"
    );
    assert!(
        lines[1].contains("svc.toml:6:6: endpoint ip `x` is not an IP address"),
        "{stderr}"
    );

    let (status, stdout, _) = run_cmd(&[
        "check",
        "--config",
        repo_path("config/beacon.toml").to_str().unwrap(),
    ]);
    assert!(status.success(), "{stdout}");
    assert!(stdout.contains("ok"));
}

#[test]
fn run_with_a_broken_config_exits_2_with_the_position() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("beacon.toml");
    std::fs::write(&cfg, "[dns]\nlisten = \"nowhere\"\n").unwrap();
    let (status, _, stderr) = run_cmd(&["run", "--config", cfg.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2));
    assert!(
        stderr.contains("beacon.toml:2:10: `nowhere` is not a socket address"),
        "{stderr}"
    );
}

#[test]
fn version_help_and_bad_usage() {
    let (status, stdout, _) = run_cmd(&["--version"]);
    assert!(status.success());
    assert!(stdout.starts_with("beacon "));
    let (status, stdout, _) = run_cmd(&["--help"]);
    assert!(status.success());
    for cmd in ["run", "check", "dev"] {
        assert!(stdout.contains(cmd), "{stdout}");
    }
    let (status, _, _) = run_cmd(&["frobnicate"]);
    assert_eq!(status.code(), Some(2));
}

#[test]
fn sigterm_exits_0_within_the_grace() {
    let mut b = Beacon::start(Options {
        extra: FILE_SOURCE.into(),
        services: Some("[[service]]\nname = \"web\"\n".into()),
        ..Options::default()
    });
    b.wait_ready();
    let started = Instant::now();
    b.signal(15);
    let status = b.wait_exit(Duration::from_secs(4));
    assert!(status.success(), "{status}");
    assert!(
        started.elapsed() < Duration::from_secs(3),
        "within the 3 s grace"
    );
}

#[test]
fn json_logs_on_request() {
    let b = Beacon::start(Options {
        args: vec!["--log-format".into(), "json".into()],
        ..Options::default()
    });
    b.wait_ready();
    let log = b.log_text();
    let first = log.lines().next().expect("a log line");
    let v: serde_json::Value = serde_json::from_str(first).expect("JSON log line");
    assert!(v["level"].is_string(), "{first}");
}

/// `beacon dev` on free ports (the defaults are the documented 1053/8080/9153).
pub fn start_dev() -> (Beacon, std::net::SocketAddr) {
    let dir = tempfile::tempdir().unwrap();
    let (admin, dns, web) = (free_addr(), free_addr(), free_addr());
    let args = [
        "dev",
        "--dns",
        &dns.to_string(),
        "--admin",
        &admin.to_string(),
        "--web",
        &web.to_string(),
    ]
    .map(String::from);
    let b = Beacon::spawn(dir, admin, dns, &args);
    b.wait_ready();
    (b, web)
}

#[test]
fn dev_serves_a_web_service_over_three_demo_backends() {
    let (b, web_addr) = start_dev();
    let json = b.services_json();
    let web = json["services"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["name"] == "web")
        .unwrap()
        .clone();
    let eps = web["endpoints"].as_array().unwrap();
    assert_eq!(eps.len(), 3);
    for (i, e) in eps.iter().enumerate() {
        assert_eq!(e["hostname"], format!("web-{i}"));
        assert_eq!(e["healthy"], true, "{e}");
        // Each demo backend answers with its own name.
        let addr = std::net::SocketAddr::new(
            e["ip"].as_str().unwrap().parse().unwrap(),
            e["port"].as_u64().unwrap() as u16,
        );
        let (status, body) = http_get(addr, "/").unwrap();
        assert_eq!(
            (status, body.as_str()),
            (200, format!("web-{i}\n").as_str())
        );
    }
    // DNS answers the three backends; the proxy spreads requests over them.
    let ips = dig(b.dns, "web.default.svc.cluster.local", "A", false);
    assert_eq!(ips, vec!["127.0.0.11", "127.0.0.12", "127.0.0.13"]);
    let names: std::collections::BTreeSet<String> =
        (0..30).map(|_| fetch_name(web_addr).unwrap()).collect();
    assert_eq!(names.len(), 3, "{names:?}");
    // `beacon query` (scratch images have no dig) takes names with and
    // without the root dot, as dig does.
    for name in [
        "web.default.svc.cluster.local",
        "web.default.svc.cluster.local.",
    ] {
        let server = b.dns.to_string();
        let (status, out, err) = run_cmd(&["query", name, "--server", &server]);
        assert!(status.success(), "beacon query {name}: {err}");
        assert_eq!(out.lines().count(), 3, "{out}");
        assert!(out.contains(" A 127.0.0.11"), "{out}");
    }
    let banner = std::fs::read_to_string(b.path("stdout.log")).unwrap();
    assert!(
        banner.contains("dig @127.0.0.1 -p") && banner.contains("curl http://"),
        "{banner}"
    );
}

/// Two file sources; the second's `a/evil` (which sorts before
/// `default/web`) asks for web's listen address.
fn two_sources(listen: std::net::SocketAddr) -> (String, String, String) {
    let sources = "[[source]]\ntype = \"file\"\npath = \"services.toml\"\n\
                   [[source]]\ntype = \"file\"\npath = \"two.toml\"\n";
    let svc = |ns: &str, name: &str, ip: &str| {
        format!(
            "[[service]]\nname = \"{name}\"\nnamespace = \"{ns}\"\n[[service.port]]\nport = 80\nlisten = \"{listen}\"\n[[service.endpoint]]\nip = \"{ip}\"\n[service.health]\nkind = \"none\"\n"
        )
    };
    (
        sources.to_string(),
        svc("default", "web", "127.0.0.11"),
        svc("a", "evil", "127.0.0.66"),
    )
}

#[test]
fn run_refuses_a_listener_claimed_across_sources_like_check() {
    let listen = free_addr();
    let (sources, web, evil) = two_sources(listen);
    let dir = tempfile::tempdir().unwrap();
    let (admin, dns) = (free_addr(), free_addr());
    let cfg = dir.path().join("beacon.toml");
    let main = format!("[dns]\nlisten = \"{dns}\"\n[admin]\nlisten = \"{admin}\"\n{sources}");
    std::fs::write(&cfg, main).unwrap();
    std::fs::write(dir.path().join("services.toml"), web).unwrap();
    std::fs::write(dir.path().join("two.toml"), evil).unwrap();
    let want = format!(
        "two.toml:6:10: listen address {listen} is already claimed by service `web.default`"
    );
    let (status, _, check_err) = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(status.code(), Some(2), "{check_err}");
    assert!(check_err.contains(&want), "{check_err}");
    // `run`, bounded: before the fix it served (and took web's listener).
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_beacon"))
        .args(["run", "--config", cfg.to_str().unwrap()])
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    let status = status.expect("beacon run kept running on a config check refuses");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut stderr).unwrap();
    assert_eq!(
        status.code(),
        Some(2),
        "run must refuse what check refuses: {stderr}"
    );
    assert!(stderr.contains(&want), "{stderr}");
}

#[test]
fn a_listener_claimed_at_runtime_stays_with_its_owner_and_is_reported() {
    let listen = free_addr();
    let (sources, web, evil) = two_sources(listen);
    let b = Beacon::start(Options {
        extra: sources,
        services: Some(web),
        ..Options::default()
    });
    b.wait_ready();
    // The second source names evil on web's address after start.
    std::fs::write(b.path("two.toml"), &evil).unwrap();
    let json = eventually(Duration::from_secs(10), "the conflict is listed", || {
        let json = b.services_json();
        (json["conflicts"].as_array()?.len() == 1).then_some(json)
    });
    let c = &json["conflicts"][0];
    assert_eq!(c["kind"], "listen");
    assert_eq!(c["service"]["name"], "evil");
    assert_eq!(c["claim"], listen.to_string());
    assert_eq!(c["winner"], "web.default");
    let listeners = |name: &str| {
        json["services"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["name"] == name)
            .unwrap()["listeners"]
            .clone()
    };
    assert_eq!(listeners("web"), serde_json::json!([listen.to_string()]));
    assert_eq!(listeners("evil"), serde_json::json!([]));
    assert_eq!(
        b.metric("beacon_claim_conflicts{kind=\"listen\"}"),
        Some(1.0)
    );
    // Another update of the second file: the conflict is logged once.
    std::fs::write(b.path("two.toml"), evil.replace("127.0.0.66", "127.0.0.67")).unwrap();
    eventually(Duration::from_secs(10), "the update is served", || {
        service_ips(&b, "evil").filter(|ips| ips == &["127.0.0.67"])
    });
    let log = b.log_text();
    assert_eq!(log.matches("claim refused").count(), 1, "{log}");
}

#[test]
fn check_warns_loudly_about_an_open_resolver_and_still_passes() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = dir.path().join("beacon.toml");
    std::fs::write(
        &cfg,
        "[dns]\nlisten = \"0.0.0.0:1053\"\nforward = [\"127.0.0.53:53\"]\nforward_allow = [\"0.0.0.0/0\"]\n",
    )
    .unwrap();
    let (status, stdout, stderr) = run_cmd(&["check", "--config", cfg.to_str().unwrap()]);
    assert_eq!(status.code(), Some(0), "{stderr}");
    assert!(stdout.contains("ok"), "{stdout}");
    assert!(
        stderr.contains("warning: ") && stderr.contains("beacon.toml:4:18: OPEN RESOLVER"),
        "{stderr}"
    );
}
