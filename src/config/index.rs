//! What the services files read so far claim (service names, listen
//! addresses), so that a second claim is an error that names the first.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::Path;

use crate::model::ServiceKey;

use super::report::{ConfigError, Origin};

/// Cross-file checks: duplicate services and listen addresses claimed twice.
#[derive(Debug, Default)]
pub struct ServicesIndex {
    services: HashMap<ServiceKey, Origin>,
    listeners: HashMap<SocketAddr, (ServiceKey, Origin)>,
}

impl ServicesIndex {
    /// Claims a service name; `Err` holds where it was defined first.
    pub(super) fn claim_service(&mut self, key: &ServiceKey, at: Origin) -> Result<(), &Origin> {
        if self.services.contains_key(key) {
            return Err(&self.services[key]);
        }
        self.services.insert(key.clone(), at);
        Ok(())
    }

    /// Claims a listen address for `key` (claiming it again for the same
    /// service is fine); `Err` holds the other service and where it claimed it.
    pub(super) fn claim_listener(
        &mut self,
        addr: SocketAddr,
        key: &ServiceKey,
        at: Origin,
    ) -> Result<(), &(ServiceKey, Origin)> {
        match self.listeners.get(&addr) {
            Some((owner, _)) if owner != key => Err(&self.listeners[&addr]),
            Some(_) => Ok(()),
            None => {
                self.listeners.insert(addr, (key.clone(), at));
                Ok(())
            }
        }
    }

    /// Removes and returns what `path` claimed, so the file can be re-read.
    pub fn take_file(&mut self, path: &Path) -> ServicesIndex {
        let mut taken = ServicesIndex::default();
        self.services.retain(|k, o| {
            if o.path == path {
                taken.services.insert(k.clone(), o.clone());
                false
            } else {
                true
            }
        });
        self.listeners.retain(|a, (k, o)| {
            if o.path == path {
                taken.listeners.insert(*a, (k.clone(), o.clone()));
                false
            } else {
                true
            }
        });
        taken
    }

    /// Adds the claims of another source's files, as `check` would have
    /// read them after this one's: each claim already made here is an
    /// error at the later claim, naming the first (so `run` refuses what
    /// `check` refuses).
    pub fn absorb(&mut self, other: &ServicesIndex) -> Vec<ConfigError> {
        let mut errors = Vec::new();
        let at = |o: &Origin, message: String| ConfigError {
            path: o.path.clone(),
            line: o.line,
            col: o.col,
            message,
        };
        for (key, o) in &other.services {
            if let Err(first) = self.claim_service(key, o.clone()) {
                errors.push(at(o, format!(
                    "duplicate service `{key}` (first defined at {first}); rename one or set another namespace"
                )));
            }
        }
        for (addr, (key, o)) in &other.listeners {
            if let Err((owner, first)) = self.claim_listener(*addr, key, o.clone()) {
                errors.push(at(o, format!(
                    "listen address {addr} is already claimed by service `{owner}` (at {first}); give each service its own address"
                )));
            }
        }
        errors.sort_by(|a, b| (&a.path, a.line, a.col).cmp(&(&b.path, b.line, b.col)));
        errors
    }

    /// A proxy listener on beacon's own DNS or admin address (the same
    /// port on the same IP, or on the unspecified address either side)
    /// would fail to bind or steal that traffic: an error at each claim.
    pub fn reserved(&self, reserved: &[(&str, SocketAddr)]) -> Vec<ConfigError> {
        let overlaps = |a: &SocketAddr, b: &SocketAddr| {
            a.port() == b.port()
                && (a.ip() == b.ip() || a.ip().is_unspecified() || b.ip().is_unspecified())
        };
        let mut errors: Vec<ConfigError> = self
            .listeners
            .iter()
            .flat_map(|(addr, (key, o))| {
                reserved.iter().filter(|(_, r)| overlaps(addr, r)).map(move |(what, r)| ConfigError {
                    path: o.path.clone(),
                    line: o.line,
                    col: o.col,
                    message: format!(
                        "service `{key}` listens on {addr}, which is beacon's {what} address ({r}); give the proxy listener another address or port"
                    ),
                })
            })
            .collect();
        errors.sort_by(|a, b| (&a.path, a.line, a.col).cmp(&(&b.path, b.line, b.col)));
        errors
    }

    /// Puts back what [`take_file`](Self::take_file) removed.
    pub fn merge(&mut self, other: ServicesIndex) {
        self.services.extend(other.services);
        self.listeners.extend(other.listeners);
    }
}
