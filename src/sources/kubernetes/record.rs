//! What the source keeps of a Service and an EndpointSlice: only the fields
//! [`super::map`] reads, taken from the k8s-openapi object when it arrives
//! (the object is dropped then). At 10k services / 100k endpoints the whole
//! objects held about 130 MB (k8s-openapi's structs are wide: every field
//! of the API is an `Option` inline, and a BTree node holds 11 of them);
//! these records hold a few MB.
//!
//! Everything that does not depend on another object is decided here
//! (addresses parsed, conditions defaulted, unsupported protocols
//! dropped); what depends on the service and all its slices together
//! (ports matched by name, duplicate addresses) stays in [`super::map`].

use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Service, ServicePort};
use k8s_openapi::api::discovery::v1::{Endpoint as K8sEndpoint, EndpointSlice};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;

use crate::model::Protocol;

pub const ANNOTATION_LISTEN: &str = "beacon.io/listen";
pub const ANNOTATION_LISTEN_VIP: &str = "beacon.io/listen-vip";
pub const ANNOTATION_BALANCE: &str = "beacon.io/balance";

/// A Service as the mapping reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ServiceRecord {
    /// No `spec`: a service without address, port or endpoint.
    Bare,
    /// `type: ExternalName`: the target, lower-case without the trailing
    /// dot; `None` when it names nothing (the service is not served).
    Alias(Option<Arc<str>>),
    /// Every other type: a ClusterIP or headless service.
    Cluster(Box<ClusterRecord>),
}

/// The part of a ClusterIP or headless Service the mapping reads.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ClusterRecord {
    /// The primary ClusterIP (`None`: headless).
    pub vip: Option<IpAddr>,
    /// A dual-stack service's ClusterIP of the other family.
    pub second_vip: Option<IpAddr>,
    /// TCP and UDP ports (SCTP and out-of-range numbers are left out).
    pub ports: Box<[ServicePortRecord]>,
    pub publish_not_ready: bool,
    /// The `beacon.io/*` annotations, as written.
    pub listen: Option<Box<str>>,
    pub listen_vip: bool,
    pub balance: Option<Box<str>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServicePortRecord {
    /// As written (slice ports match it exactly); "" when unnamed.
    pub name: Box<str>,
    pub protocol: Protocol,
    pub port: u16,
    /// `targetPort` when it is a number.
    pub target_port: Option<u16>,
}

/// An EndpointSlice as the mapping reads it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceRecord {
    /// Its ports (an FQDN slice's too: ports match by name over every slice).
    pub ports: Box<[SlicePortRecord]>,
    /// The endpoints with an IP address (none for an FQDN slice).
    pub endpoints: Box<[SliceEndpointRecord]>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SlicePortRecord {
    /// "" when unnamed.
    pub name: Box<str>,
    /// `None`: a protocol beacon does not serve (SCTP).
    pub protocol: Option<Protocol>,
    pub port: Option<i32>,
}

/// One slice endpoint: its first address, its hostname when it is a DNS
/// label, and its conditions with the API's defaults applied (`ready`
/// unset means ready, `serving` unset means `ready`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SliceEndpointRecord {
    pub ip: IpAddr,
    pub hostname: Option<Arc<str>>,
    pub ready: bool,
    pub serving: bool,
    pub terminating: bool,
}

/// TCP when unset; `None` for a protocol beacon does not serve.
pub fn protocol_of(p: Option<&str>) -> Option<Protocol> {
    match p.unwrap_or("TCP") {
        "TCP" => Some(Protocol::Tcp),
        "UDP" => Some(Protocol::Udp),
        _ => None,
    }
}

impl ServiceRecord {
    pub fn new(svc: &Service) -> Self {
        let Some(k8s) = svc.spec.as_ref() else {
            return ServiceRecord::Bare;
        };
        if k8s.type_.as_deref() == Some("ExternalName") {
            let target = k8s
                .external_name
                .as_deref()
                .unwrap_or("")
                .trim_end_matches('.');
            let target = (!target.is_empty()).then(|| target.to_ascii_lowercase().into());
            return ServiceRecord::Alias(target);
        }
        let (vip, second_vip) = cluster_ips(k8s.cluster_ips.as_deref(), k8s.cluster_ip.as_deref());
        let annotations = svc.metadata.annotations.as_ref();
        let annotation = |name: &str| annotations.and_then(|a| a.get(name)).map(String::as_str);
        ServiceRecord::Cluster(Box::new(ClusterRecord {
            vip,
            second_vip,
            ports: k8s
                .ports
                .iter()
                .flatten()
                .filter_map(service_port)
                .collect(),
            publish_not_ready: k8s.publish_not_ready_addresses == Some(true),
            listen: annotation(ANNOTATION_LISTEN).map(Into::into),
            listen_vip: annotation(ANNOTATION_LISTEN_VIP).is_some_and(|v| v.trim() == "true"),
            balance: annotation(ANNOTATION_BALANCE).map(Into::into),
        }))
    }
}

impl SliceRecord {
    pub fn new(slice: &EndpointSlice) -> Self {
        let ports = slice
            .ports
            .iter()
            .flatten()
            .map(|p| SlicePortRecord {
                name: p.name.as_deref().unwrap_or("").into(),
                protocol: protocol_of(p.protocol.as_deref()),
                port: p.port,
            })
            .collect();
        let endpoints = if matches!(slice.address_type.as_str(), "IPv4" | "IPv6") {
            slice.endpoints.iter().filter_map(slice_endpoint).collect()
        } else {
            Box::default()
        };
        SliceRecord { ports, endpoints }
    }
}

/// The primary ClusterIP (`None`: headless, for `None` or no address),
/// and a dual-stack service's ClusterIP of the other family.
fn cluster_ips(ips: Option<&[String]>, ip: Option<&str>) -> (Option<IpAddr>, Option<IpAddr>) {
    let first = ips.and_then(|l| l.first()).map(String::as_str).or(ip);
    let Some(vip) = first.and_then(|s| s.parse::<IpAddr>().ok()) else {
        return (None, None);
    };
    let second = ips
        .into_iter()
        .flatten()
        .filter_map(|s| s.parse::<IpAddr>().ok())
        .find(|other| other.is_ipv4() != vip.is_ipv4());
    (Some(vip), second)
}

fn service_port(p: &ServicePort) -> Option<ServicePortRecord> {
    Some(ServicePortRecord {
        name: p.name.as_deref().unwrap_or("").into(),
        protocol: protocol_of(p.protocol.as_deref())?,
        port: u16::try_from(p.port).ok()?,
        target_port: match &p.target_port {
            Some(IntOrString::Int(n)) => u16::try_from(*n).ok(),
            _ => None,
        },
    })
}

fn slice_endpoint(e: &K8sEndpoint) -> Option<SliceEndpointRecord> {
    let ip: IpAddr = e.addresses.first()?.parse().ok()?;
    let c = e.conditions.as_ref();
    let ready = c.and_then(|c| c.ready).unwrap_or(true);
    Some(SliceEndpointRecord {
        ip,
        hostname: e
            .hostname
            .as_deref()
            .filter(|h| crate::config::is_dns_label(h))
            .map(Into::into),
        ready,
        serving: c.and_then(|c| c.serving).unwrap_or(ready),
        terminating: c.and_then(|c| c.terminating).unwrap_or(false),
    })
}
