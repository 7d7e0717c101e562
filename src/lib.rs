//! beacon: service discovery and load balancing for containers.
//!
//! Independent control loops around one consistent snapshot:
//!
//! ```text
//!  sources/file ─┐                      ┌─► dns     (answers from the snapshot)
//!  sources/docker├─ Update ─► registry ─┼─► proxy   (balancers rebuilt from the snapshot)
//!  StaticSource ─┘    ▲   (one writer,  └─► health  (probes what the snapshot lists)
//!  (dev demo)         │    Arc<Snapshot>)      │
//!                     └──── HealthChange ──────┘
//! ```
//!
//! - [`sources`] say what exists (`Reset`, then `Upsert`/`Remove`).
//! - [`registry`] is the one writer; it publishes an immutable
//!   [`model::Snapshot`] on a `watch` channel.
//! - [`dns`], [`proxy`] and [`health`] each reconcile against the latest
//!   snapshot; none of them imports another or any source. Only [`app`]
//!   knows every part, and supervises every loop: one that ends before
//!   shutdown stops the process (exit 1).
//! - [`config`] turns files into typed values; [`telemetry`] names every
//!   metric; [`admin`] serves the HTTP endpoints; [`client`] and
//!   [`backend`] are the small tools the binary carries (`beacon query`,
//!   `get`, `probe`, `backend`).
#![deny(unsafe_code)]

pub mod admin;
pub mod app;
pub mod backend;
pub mod client;
pub mod config;
pub mod dns;
pub mod health;
pub mod model;
pub mod proxy;
pub mod registry;
pub mod sources;
pub mod telemetry;
