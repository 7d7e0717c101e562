//! The resolver recipe end to end: `forward = ["/etc/resolv.conf"]`-style
//! upstreams read from a resolv.conf the test writes, and the systemd unit
//! that runs beacon as the host's resolver, checked by systemd itself.

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use super::harness::*;

struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// dnsmasq on port 53 of a loopback address of its own (resolv.conf
/// names addresses only, never ports), answering `*.test.example`.
fn dnsmasq_on_53() -> (Killed, SocketAddr) {
    for i in 0..5u8 {
        let addr: SocketAddr = format!("127.0.53.{}:53", 10 + i).parse().unwrap();
        let child = Command::new("dnsmasq")
            .args([
                "--no-daemon",
                "--port=53",
                &format!("--listen-address={}", addr.ip()),
                "--bind-interfaces",
                "--no-resolv",
                "--no-hosts",
                "--conf-file=/dev/null",
                "--address=/test.example/127.0.0.98",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("dnsmasq must be installed: ./scripts/test installs it");
        let mut d = Killed(child);
        for _ in 0..20 {
            if d.0.try_wait().unwrap().is_some() {
                break; // that address's port 53 is taken (or no root): the next one
            }
            if dig(addr, "up.test.example", "A", false) == ["127.0.0.98"] {
                return (d, addr);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("dnsmasq did not start on port 53 of 127.0.53.10-14 (the test needs root)");
}

#[test]
fn forward_to_a_resolv_conf_skips_beacon_itself_and_forwards_to_the_rest() {
    let (_upstream, up) = dnsmasq_on_53();
    let dir = tempfile::tempdir().unwrap();
    let resolv = dir.path().join("resolv.conf");
    // The search and options lines and the comment are skipped.
    std::fs::write(
        &resolv,
        format!(
            "# written by the test\nsearch shop.svc.cluster.local\nnameserver {}\noptions ndots:5\n",
            up.ip()
        ),
    )
    .unwrap();
    let b = Beacon::start(Options {
        dns_extra: format!("forward = [\"{}\"]\n", resolv.display()),
        ..Options::default()
    });
    assert_eq!(dig(b.dns, "www.test.example", "A", false), ["127.0.0.98"]);
    let metrics = b.metrics();
    assert!(
        metrics.contains(&format!("upstream=\"{up}\"")),
        "the upstream came from the resolv.conf:\n{metrics}"
    );
    // `beacon check` names the file and line of a config whose resolv.conf
    // lists only beacon itself (the recipe's `nameserver 127.0.0.1` with
    // beacon on 127.0.0.1:53).
    std::fs::write(&resolv, "nameserver 127.0.0.1\n").unwrap();
    let config = dir.path().join("beacon.toml");
    std::fs::write(
        &config,
        format!(
            "[dns]\nlisten = \"127.0.0.1:53\"\nforward = [\"{}\"]\n",
            resolv.display()
        ),
    )
    .unwrap();
    let (code, out, err) = run_cmd(&["check", "--config", config.to_str().unwrap()]);
    assert_eq!(code.code(), Some(2), "{out}{err}");
    assert!(
        err.contains("beacon.toml:3:") && err.contains("names no upstream"),
        "{err}"
    );
    assert!(err.contains("is beacon itself"), "{err}");
}

#[test]
fn the_systemd_unit_passes_systemd_analyze_verify() {
    let unit = std::fs::read_to_string(repo_path("deploy/systemd/beacon.service")).unwrap();
    assert!(unit.contains("ExecStart=/usr/local/bin/beacon run --config /etc/beacon/beacon.toml"));
    // verify checks that ExecStart's binary exists: point it at the one
    // under test. Everything else is checked as shipped.
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("beacon.service");
    std::fs::write(&path, unit.replace("/usr/local/bin/beacon", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .args(["verify", path.to_str().unwrap()])
        .output()
        .expect("systemd-analyze must be installed (Debian package systemd; ./scripts/test installs it)");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Unknown keys and bad values are only warnings to verify: none allowed.
    let ours: Vec<&str> = err
        .lines()
        .filter(|l| l.contains("beacon.service"))
        .collect();
    assert!(ours.is_empty(), "systemd-analyze complains: {ours:?}");
    // The stop timeout leaves room for the lameduck and the proxy drain.
    assert!(unit.contains("TimeoutStopSec=45s") && unit.contains("KillSignal=SIGTERM"));
}
