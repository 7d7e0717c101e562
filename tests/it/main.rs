//! beacon's integration tests: one binary, a harness that starts the real
//! `beacon` on free loopback ports and stops it on drop.

mod autopath;
mod dns;
mod dns_forward;
mod dns_tls;
mod dns_wire;
mod docker;
mod docker_etcd;
mod etcd;
mod etcd_harness;
mod etcd_secure;
mod faults;
mod harness;
mod health_e2e;
mod kube_api;
mod kubernetes;
mod manifests;
mod operators;
mod proxy;
mod recipes;
mod soak;
mod spine;
mod supervision;
