//! TLS and auth to etcd: a real etcd with `--client-cert-auth` and
//! certificates made here with `openssl`, and a real etcd with auth enabled
//! by `etcdctl`; beacon nodes publish through it and serve each other.

use std::path::Path;
use std::time::Duration;

use super::etcd::Node;
use super::etcd_harness::{EtcdCluster, Tls};
use super::harness::{eventually, openssl, self_signed};

const CONNECTED: &str = "beacon_source_connected{source=\"etcd\"}";

/// A self-signed CA `name` (`name.pem`, `name.key`).
fn make_ca(dir: &Path, name: &str) {
    self_signed(dir, name, &format!("/CN={name}"), &[]);
}

/// A certificate `name` signed by CA `ca`, for 127.0.0.1, usable by a
/// server and a client.
fn make_leaf(dir: &Path, ca: &str, name: &str) {
    let (key, csr, pem, subj) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
        format!("/CN={name}"),
    );
    openssl(
        dir,
        &[
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-subj",
            &subj,
            "-keyout",
            &key,
            "-out",
            &csr,
        ],
    );
    let ext = format!("{name}.ext");
    std::fs::write(
        dir.join(&ext),
        "basicConstraints=CA:FALSE\nsubjectAltName=IP:127.0.0.1,DNS:localhost\nextendedKeyUsage=serverAuth,clientAuth\n",
    )
    .unwrap();
    let (ca_pem, ca_key) = (format!("{ca}.pem"), format!("{ca}.key"));
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            &ca_pem,
            "-CAkey",
            &ca_key,
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    );
}

/// A CA, etcd's server certificate, a client certificate for etcdctl and
/// one for the beacon nodes, and an unrelated CA (`other.pem`).
fn pki(dir: &Path) -> Tls {
    make_ca(dir, "ca");
    make_ca(dir, "other");
    for leaf in ["server", "ctl", "node"] {
        make_leaf(dir, "ca", leaf);
    }
    Tls {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("ctl.pem"),
        client_key: dir.join("ctl.key"),
    }
}

fn tls_keys(dir: &Path, ca: &str) -> String {
    format!(
        "ca = \"{}\"\ncert = \"{}\"\nkey = \"{}\"\n",
        dir.join(ca).display(),
        dir.join("node.pem").display(),
        dir.join("node.key").display()
    )
}

/// Nodes a and c (its etcd source given `keys`) serve each other's backend.
fn a_and_c_serve_each_other(etcd: &EtcdCluster, keys: &str) -> (Node, Node) {
    let e = etcd.endpoints_toml();
    let a = Node::start_with("node-a", 1, &e, keys);
    let c = Node::start_with("node-c", 3, &e, keys);
    let both = vec![a.ip.clone(), c.ip.clone()];
    for n in [&a, &c] {
        n.beacon.wait_ready();
        eventually(Duration::from_secs(10), "each serves both backends", || {
            (n.a() == both).then_some(())
        });
        assert_eq!(n.beacon.metric(CONNECTED), Some(1.0));
    }
    let keys = etcd.keys("/beacon/v1/nodes/");
    assert!(
        keys.contains(&"/beacon/v1/nodes/node-a/endpoints/default/web/127.0.0.11".to_string()),
        "{keys:?}"
    );
    (a, c)
}

/// A node that cannot get in: says disconnected and logs `why`.
fn shut_out(n: &Node, why: &str) {
    let logged = || {
        let log = n.beacon.log_text();
        log.lines()
            .find(|l| l.contains("etcd: cannot watch") && l.contains(why))
            .map(String::from)
    };
    let line = eventually(Duration::from_secs(10), "the refusal is logged", logged);
    eprintln!("shut out: {line}");
    assert_eq!(n.beacon.metric(CONNECTED), Some(0.0));
}

#[test]
fn etcd_over_tls_with_client_certificates_publishes_and_serves() {
    let dir = tempfile::tempdir().unwrap();
    let tls = pki(dir.path());
    let etcd = EtcdCluster::start_with(1, Some(tls));
    assert!(etcd.endpoints()[0].starts_with("https://"));
    let (_a, _c) = a_and_c_serve_each_other(&etcd, &tls_keys(dir.path(), "ca.pem"));
    // A CA that did not sign etcd's certificate: a clear error, disconnected.
    let b = Node::start_with(
        "node-b",
        2,
        &etcd.endpoints_toml(),
        &tls_keys(dir.path(), "other.pem"),
    );
    shut_out(&b, "invalid peer certificate");
}

#[test]
fn etcd_with_auth_a_node_with_username_and_password_publishes_and_serves() {
    let mut etcd = EtcdCluster::start(1);
    for args in [
        &["role", "add", "root"][..],
        &["user", "add", "root:rootpw"],
        &["user", "grant-role", "root", "root"],
        &["role", "add", "beacon"],
        &[
            "role",
            "grant-permission",
            "beacon",
            "--prefix=true",
            "readwrite",
            "/beacon/",
        ],
        &["user", "add", "beacon:s3cret"],
        &["user", "grant-role", "beacon", "beacon"],
        &["auth", "enable"],
    ] {
        etcd.ctl(args);
    }
    etcd.ctl_user = Some("root:rootpw".into());
    let (_a, _c) =
        a_and_c_serve_each_other(&etcd, "username = \"beacon\"\npassword = \"s3cret\"\n");
    let b = Node::start_with(
        "node-b",
        2,
        &etcd.endpoints_toml(),
        "username = \"beacon\"\npassword = \"wrong\"\n",
    );
    shut_out(&b, "authentication failed");
}
