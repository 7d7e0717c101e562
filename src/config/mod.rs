//! Configuration: the main config file and the services files of the `file`
//! source, from TOML text to validated, typed values.
//!
//! Parsing goes through serde with `deny_unknown_fields` into raw tables
//! (`raw`) that keep each value's position ([`toml::Spanned`]); one module
//! per table then turns them into typed values (`dns`, `health`, `proxy`,
//! `sources` for the main config, `service` for a services file). Every
//! error carries `PATH:LINE:COL` (`report`) and says what is wrong and what
//! is allowed; validation collects every error rather than stopping at the
//! first.
//!
//! A service inherits its health check and proxy keys from the main
//! config's `[health]` and `[proxy]`: each key is declared once (`raw`) and
//! applied over the inherited value by one function (`health::inherit`,
//! `proxy::inherit`), in both places.
//!
//! Files: `raw` (the serde tables; `flat` lets two tables share a group of
//! keys), `report` (positions and errors), `values` (addresses, integers,
//! labels), one module per table, `index` (claims across services files),
//! `services` (the file source's loader and `check`).

mod dns;
mod etcd;
mod flat;
mod health;
mod index;
mod main_config;
mod proxy;
mod raw;
mod report;
mod resolv;
mod service;
mod services;
mod sources;
mod values;

pub use dns::DnsConfig;
pub use etcd::{EtcdConfig, EtcdTls};
pub use index::ServicesIndex;
pub use main_config::{AdminConfig, Config, DEFAULT_CONFIG};
pub use proxy::{AccessLogTarget, ProxyConfig, SpliceMode};
pub use report::{ConfigError, ConfigErrors};
pub use service::ServiceDefaults;
pub use services::{check, load_services, load_services_path, parse_services, services_files};
pub use sources::{DockerTrust, KubernetesConfig, SourceConfig};
pub use values::is_dns_label;

#[cfg(test)]
mod tests;
