//! `[[source]] type = "etcd"` → [`EtcdConfig`]: the cluster of beacon nodes.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use super::raw::RawSource;
use super::report::Reporter;

/// Where this node shares its endpoints and reads everyone else's.
#[derive(Clone, Debug, PartialEq)]
pub struct EtcdConfig {
    /// etcd members (`http://host:port`); the client fails over between them.
    pub endpoints: Vec<String>,
    /// Key prefix, with the format version in it (default `/beacon/v1`).
    pub prefix: String,
    /// This node's name (default: the hostname).
    pub node: Arc<str>,
    /// Local sources (by type or id) whose services this node publishes.
    pub publish: Vec<String>,
    /// A node that dies leaves everyone's answers within this.
    pub lease_ttl: Duration,
    /// `username` and `password` for etcd's auth.
    pub user: Option<(String, String)>,
    /// TLS to etcd (`https://` endpoints).
    pub tls: Option<EtcdTls>,
}

/// PEM files (relative paths from the config's folder), read at every
/// connect: a renewed certificate is used from the next connect on.
#[derive(Clone, Debug, PartialEq)]
pub struct EtcdTls {
    /// `ca`: the roots etcd's server certificate is checked against.
    pub ca: PathBuf,
    /// `cert` and `key`: this node's client certificate
    /// (`--client-cert-auth`).
    pub identity: Option<(PathBuf, PathBuf)>,
}

pub const DEFAULT_PREFIX: &str = "/beacon/v1";
pub const DEFAULT_LEASE_TTL: Duration = Duration::from_secs(10);

pub(super) fn validate(r: &mut Reporter<'_>, s: &RawSource, base: &Path) -> Option<EtcdConfig> {
    if s.path.is_some() || s.socket.is_some() || s.namespaces.is_some() {
        r.error(
            s.kind.span(),
            "`path`, `socket` and `namespaces` belong to file and docker sources, not an etcd source",
        );
    }
    let endpoints = endpoints(r, s)?;
    let tls = tls(r, s, base, endpoints[0].starts_with("https://"));
    let prefix = match &s.prefix {
        Some(p) if !p.get_ref().starts_with('/') || p.get_ref().ends_with('/') => {
            r.error(
                p.span(),
                "`prefix` starts with '/' and does not end with one, e.g. `/beacon/v1`",
            );
            return None;
        }
        Some(p) => p.get_ref().clone(),
        None => DEFAULT_PREFIX.to_string(),
    };
    let node: Arc<str> = match &s.node {
        Some(n) if !valid_node(n.get_ref()) => {
            r.error(
                n.span(),
                "`node` is 1-253 letters, digits, '-', '_' or '.' (it is part of etcd keys)",
            );
            return None;
        }
        Some(n) => n.get_ref().as_str().into(),
        None => hostname().into(),
    };
    let lease_ttl = match &s.lease_ttl {
        Some(t) if t.get_ref().into_inner() < Duration::from_secs(2) => {
            r.error(
                t.span(),
                "`lease_ttl` is at least 2s (etcd counts it in seconds)",
            );
            return None;
        }
        Some(t) => t.get_ref().into_inner(),
        None => DEFAULT_LEASE_TTL,
    };
    let user = match (&s.username, &s.password) {
        (Some(u), Some(p)) => Some((u.get_ref().clone(), p.get_ref().clone())),
        (None, None) => None,
        (Some(v), None) | (None, Some(v)) => {
            r.error(v.span(), "`username` and `password` go together");
            None
        }
    };
    Some(EtcdConfig {
        endpoints,
        prefix,
        node,
        publish: s
            .publish
            .iter()
            .flatten()
            .map(|v| v.get_ref().clone())
            .collect(),
        lease_ttl,
        user,
        tls,
    })
}

/// `ca`, `cert`, `key`: given with `https://` endpoints, never without.
fn tls(r: &mut Reporter<'_>, s: &RawSource, base: &Path, https: bool) -> Option<EtcdTls> {
    if !https {
        for v in [&s.ca, &s.cert, &s.key].into_iter().flatten() {
            r.error(
                v.span(),
                "`ca`, `cert` and `key` are for TLS to etcd: write the endpoints as https://HOST:PORT",
            );
        }
        return None;
    }
    let Some(ca) = &s.ca else {
        r.error(
            s.kind.span(),
            "https:// etcd endpoints need `ca` (the PEM file of the CA that signed etcd's certificate)",
        );
        return None;
    };
    let identity = match (&s.cert, &s.key) {
        (Some(c), Some(k)) => Some((base.join(c.get_ref()), base.join(k.get_ref()))),
        (None, None) => None,
        (Some(v), None) | (None, Some(v)) => {
            r.error(
                v.span(),
                "`cert` and `key` go together (this node's client certificate and its key, PEM)",
            );
            None
        }
    };
    Some(EtcdTls {
        ca: base.join(ca.get_ref()),
        identity,
    })
}

fn endpoints(r: &mut Reporter<'_>, s: &RawSource) -> Option<Vec<String>> {
    let Some(list) = &s.endpoints else {
        r.error(
            s.kind.span(),
            "an etcd source needs `endpoints`, e.g. [\"http://127.0.0.1:2379\"]",
        );
        return None;
    };
    let mut out = Vec::new();
    for v in list {
        let e = v.get_ref();
        let scheme = ["http://", "https://"]
            .into_iter()
            .find(|p| e.starts_with(p) && e.len() > p.len());
        match (scheme, list[0].get_ref().starts_with("https://")) {
            (None, _) => r.error(
                v.span(),
                format!("`{e}` is not an etcd endpoint; write http://HOST:PORT (https:// for TLS)"),
            ),
            (Some(p), https) if (p == "https://") != https => r.error(
                v.span(),
                "the etcd endpoints are all http:// or all https://",
            ),
            (Some(_), _) => out.push(e.clone()),
        }
    }
    if list.is_empty() {
        r.error(s.kind.span(), "`endpoints` lists at least one etcd member");
    }
    (!out.is_empty() && out.len() == list.len()).then_some(out)
}

fn valid_node(n: &str) -> bool {
    !n.is_empty()
        && n.len() <= 253
        && n.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

/// This host's name, for `node`'s default.
fn hostname() -> String {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default();
    if valid_node(&name) {
        name
    } else {
        "localhost".to_string()
    }
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::config::{Config, SourceConfig};

    fn parse(text: &str) -> Result<Config, crate::config::ConfigErrors> {
        Config::parse(text, Path::new("b.toml"), Path::new(""))
    }

    fn error(text: &str) -> String {
        let e = parse(text).expect_err("expected an error");
        e.to_string()
    }

    #[test]
    fn an_etcd_source_with_defaults_and_with_every_key() {
        let c = parse("[[source]]\ntype = \"etcd\"\nendpoints = [\"http://127.0.0.1:2379\"]\n")
            .unwrap();
        let SourceConfig::Etcd(e) = &c.sources[0] else {
            panic!()
        };
        assert_eq!(e.prefix, DEFAULT_PREFIX);
        assert_eq!(e.lease_ttl, DEFAULT_LEASE_TTL);
        assert!(e.publish.is_empty() && e.user.is_none() && !e.node.is_empty());
        let c = parse(
            "[[source]]\ntype = \"file\"\npath = \"s.toml\"\n[[source]]\ntype = \"etcd\"\nendpoints = [\"http://a:2379\", \"http://b:2379\"]\nprefix = \"/x/v1\"\nnode = \"host-a\"\npublish = [\"file\"]\nlease_ttl = \"3s\"\nusername = \"u\"\npassword = \"p\"\n",
        )
        .unwrap();
        let SourceConfig::Etcd(e) = &c.sources[1] else {
            panic!()
        };
        assert_eq!(e.endpoints.len(), 2);
        assert_eq!((&*e.node, e.prefix.as_str()), ("host-a", "/x/v1"));
        assert_eq!(e.lease_ttl, Duration::from_secs(3));
        assert_eq!(e.publish, ["file"]);
        assert_eq!(e.user, Some(("u".into(), "p".into())));
        assert_eq!(e.tls, None);
        let c = parse(
            "[[source]]\ntype = \"etcd\"\nendpoints = [\"https://a:2379\"]\nca = \"tls/ca.pem\"\ncert = \"/etc/c.pem\"\nkey = \"tls/k.pem\"\n",
        )
        .unwrap();
        let SourceConfig::Etcd(e) = &c.sources[0] else {
            panic!()
        };
        let tls = e.tls.as_ref().expect("tls");
        assert_eq!(tls.ca, Path::new("tls/ca.pem"));
        assert_eq!(
            tls.identity,
            Some(("/etc/c.pem".into(), "tls/k.pem".into()))
        );
    }

    #[test]
    fn config_errors_point_at_the_key_and_say_what_to_do() {
        let base = "[[source]]\ntype = \"etcd\"\n";
        let cases = [
            ("", "needs `endpoints`"),
            (
                "endpoints = [\"127.0.0.1:2379\"]\n",
                "write http://HOST:PORT",
            ),
            ("endpoints = [\"https://e:2379\"]\n", "need `ca`"),
            (
                "endpoints = [\"http://e:2379\"]\nca = \"ca.pem\"\n",
                "write the endpoints as https://",
            ),
            (
                "endpoints = [\"https://e:2379\", \"http://f:2379\"]\nca = \"ca.pem\"\n",
                "all http:// or all https://",
            ),
            (
                "endpoints = [\"https://e:2379\"]\nca = \"ca.pem\"\ncert = \"c.pem\"\n",
                "`cert` and `key` go together",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nprefix = \"beacon\"\n",
                "`prefix` starts with '/'",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nnode = \"a/b\"\n",
                "`node` is 1-253",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nlease_ttl = \"500ms\"\n",
                "at least 2s",
            ),
            (
                "endpoints = [\"http://e:2379\"]\nusername = \"u\"\n",
                "go together",
            ),
            (
                "endpoints = [\"http://e:2379\"]\npublish = [\"docker\"]\n",
                "not a configured file or docker source",
            ),
        ];
        for (extra, want) in cases {
            let e = error(&format!("{base}{extra}"));
            assert!(e.contains(want), "{extra:?}: {e}");
            assert!(e.starts_with("b.toml:"), "positioned: {e}");
        }
    }
}
