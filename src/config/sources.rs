//! `[[source]]` → [`SourceConfig`]: where endpoints come from.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use std::sync::Arc;

use ipnet::IpNet;
use toml::Spanned;

use super::raw::RawSource;
use super::report::Reporter;
use super::values::{cidr, label};

#[derive(Clone, Debug, PartialEq)]
pub enum SourceConfig {
    /// A services file, or a directory of `*.toml` services files.
    File { path: PathBuf },
    /// The Docker engine on its unix socket.
    Docker {
        socket: PathBuf,
        network: Option<String>,
        trust: DockerTrust,
    },
    /// The cluster: this node publishes to etcd and watches every node.
    Etcd(super::EtcdConfig),
    /// Services and EndpointSlices from a Kubernetes API server.
    Kubernetes(KubernetesConfig),
}

/// What a `kubernetes` source watches and how it reaches the API server.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct KubernetesConfig {
    /// None: in-cluster service account, else `$KUBECONFIG`, else `~/.kube/config`.
    pub kubeconfig: Option<PathBuf>,
    /// Empty: every namespace.
    pub namespaces: Vec<Arc<str>>,
    /// A label selector on Services.
    pub label_selector: Option<String>,
}

/// What container labels may do. Labels are untrusted input: any container,
/// or any image (its `LABEL` lines), sets them.
#[derive(Clone, Debug, PartialEq)]
pub struct DockerTrust {
    /// Namespaces a container may join services in (default `["default"]`).
    pub namespaces: Vec<Arc<str>>,
    /// Addresses a `beacon.listen` label may name (default none: ignored).
    pub allow_listen: Vec<IpNet>,
    /// Addresses a `beacon.vip` label may name (default none: ignored).
    pub allow_vip: Vec<IpNet>,
}

impl Default for DockerTrust {
    fn default() -> Self {
        Self {
            namespaces: vec!["default".into()],
            allow_listen: Vec::new(),
            allow_vip: Vec::new(),
        }
    }
}

impl SourceConfig {
    /// The name the registry knows this source by.
    pub fn id(&self) -> crate::model::SourceId {
        match self {
            SourceConfig::File { path } => format!("file:{}", path.display()).into(),
            SourceConfig::Docker { .. } => "docker".into(),
            SourceConfig::Etcd(_) => "etcd".into(),
            SourceConfig::Kubernetes(_) => "kubernetes".into(),
        }
    }

    /// The source's `type` in the config.
    pub fn kind(&self) -> &'static str {
        match self {
            SourceConfig::File { .. } => "file",
            SourceConfig::Docker { .. } => "docker",
            SourceConfig::Etcd(_) => "etcd",
            SourceConfig::Kubernetes(_) => "kubernetes",
        }
    }

    /// Whether a `publish` entry (a type or an id) names this source.
    pub fn is_named(&self, name: &str) -> bool {
        self.kind() == name || &*self.id() == name
    }
}

/// Every valid source, in order; `base` is where relative paths point from.
pub(super) fn validate(r: &mut Reporter<'_>, raw: &[RawSource], base: &Path) -> Vec<SourceConfig> {
    let sources: Vec<SourceConfig> = raw.iter().filter_map(|s| source(r, s, base)).collect();
    let mut seen = HashMap::new();
    for (i, s) in sources.iter().enumerate() {
        if let Some(first) = seen.insert(s.id(), i) {
            // Known gap, kept as it was: `i` counts valid sources, so after
            // an invalid `[[source]]` this points at the table before.
            let span = raw[i].kind.span();
            r.error(
                span,
                format!(
                    "source `{}` is configured twice (also as source #{}); remove one",
                    s.id(),
                    first + 1
                ),
            );
        }
    }
    check_publish(r, raw, &sources);
    sources
}

/// Every `publish` entry of an etcd source names another configured source.
fn check_publish(r: &mut Reporter<'_>, raw: &[RawSource], sources: &[SourceConfig]) {
    for s in raw {
        for p in s.publish.iter().flatten() {
            let name = p.get_ref();
            let local = sources
                .iter()
                .any(|c| !matches!(c, SourceConfig::Etcd(_)) && c.is_named(name));
            if !local {
                r.error(
                    p.span(),
                    format!("`publish` names `{name}`, which is not a configured file or docker source (write its type or id)"),
                );
            }
        }
    }
}

fn source(r: &mut Reporter<'_>, s: &RawSource, base: &Path) -> Option<SourceConfig> {
    match s.kind.get_ref().as_str() {
        "file" => {
            if let Some(sock) = &s.socket {
                r.error(
                    sock.span(),
                    "`socket` belongs to a docker source, not a file source",
                );
            }
            if s.namespaces.is_some() || s.allow_listen.is_some() || s.allow_vip.is_some() {
                r.error(
                    s.kind.span(),
                    "`namespaces`, `allow_listen` and `allow_vip` belong to a docker source, not a file source",
                );
            }
            match &s.path {
                Some(p) => Some(SourceConfig::File {
                    path: base.join(p.get_ref()),
                }),
                None => {
                    r.error(
                        s.kind.span(),
                        "a file source needs `path` (a services file or a directory of *.toml files)",
                    );
                    None
                }
            }
        }
        "docker" => {
            if let Some(p) = &s.path {
                r.error(
                    p.span(),
                    "`path` belongs to a file source; a docker source takes `socket` and `network`",
                );
            }
            let socket = s.socket.as_ref().map_or_else(
                || PathBuf::from("/var/run/docker.sock"),
                |v| PathBuf::from(v.get_ref()),
            );
            Some(SourceConfig::Docker {
                socket,
                network: s.network.clone(),
                trust: trust(r, s),
            })
        }
        "etcd" => super::etcd::validate(r, s, base).map(SourceConfig::Etcd),
        "kubernetes" => Some(SourceConfig::Kubernetes(kubernetes(r, s, base))),
        other => {
            r.error(
                s.kind.span(),
                format!(
                    "unknown source type `{other}`; valid types: `file`, `docker`, `etcd`, `kubernetes`"
                ),
            );
            None
        }
    }
}

/// A kubernetes source: `kubeconfig`, `namespaces`, `label_selector`.
fn kubernetes(r: &mut Reporter<'_>, s: &RawSource, base: &Path) -> KubernetesConfig {
    for (set, name) in [
        (s.path.as_ref().map(Spanned::span), "path"),
        (s.socket.as_ref().map(Spanned::span), "socket"),
    ] {
        if let Some(span) = set {
            r.error(
                span,
                format!("`{name}` does not belong to a kubernetes source; it takes `kubeconfig`, `namespaces` and `label_selector`"),
            );
        }
    }
    if s.allow_listen.is_some() || s.allow_vip.is_some() || s.network.is_some() {
        r.error(
            s.kind.span(),
            "`network`, `allow_listen` and `allow_vip` belong to a docker source, not a kubernetes source",
        );
    }
    let namespaces = s
        .namespaces
        .iter()
        .flatten()
        .filter_map(|v| label(r, v, "namespace"))
        .collect();
    KubernetesConfig {
        kubeconfig: s.kubeconfig.as_ref().map(|p| base.join(p.get_ref())),
        namespaces,
        label_selector: s.label_selector.as_ref().map(|v| v.get_ref().clone()),
    }
}

/// `namespaces`, `allow_listen` and `allow_vip` of a docker source.
fn trust(r: &mut Reporter<'_>, s: &RawSource) -> DockerTrust {
    let mut t = DockerTrust::default();
    if let Some(list) = &s.namespaces {
        t.namespaces = list
            .iter()
            .filter_map(|v| label(r, v, "namespace"))
            .collect();
    }
    let nets = |r: &mut Reporter<'_>, list: &Option<Vec<Spanned<String>>>| {
        list.iter()
            .flatten()
            .filter_map(|v| cidr(r, v))
            .collect::<Vec<_>>()
    };
    t.allow_listen = nets(r, &s.allow_listen);
    t.allow_vip = nets(r, &s.allow_vip);
    t
}
