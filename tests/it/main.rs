//! beacon's integration tests: one binary, a harness that starts the real
//! `beacon` on free loopback ports and stops it on drop.

mod dns;
mod dns_tls;
mod dns_wire;
mod docker;
mod faults;
mod harness;
mod health_e2e;
mod proxy;
mod soak;
mod spine;
mod supervision;
