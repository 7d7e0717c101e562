//! The descriptor budget. At start the soft `RLIMIT_NOFILE` goes up to the
//! hard limit (through the `rlimit` crate's safe wrapper), and a warning
//! says when what the config allows at once cannot fit in it: running out
//! of descriptors later makes every probe and connect fail at once.

use crate::config::Config;

/// Descriptors beacon holds beside connections and probes: stdio, the
/// runtime, listeners, DNS sockets, file watches, log files, and the splice
/// pipe pool (up to 128 pipes of two descriptors each).
const RESERVE: u64 = 512;

/// Raises the soft descriptor limit to the hard one; the limit in force
/// (None where it cannot be read).
pub fn raise_nofile_limit() -> Option<u64> {
    let before = rlimit::Resource::NOFILE.get().ok();
    match rlimit::increase_nofile_limit(u64::MAX) {
        Ok(now) => {
            if let Some((soft, hard)) = before
                && now > soft
            {
                tracing::debug!(from = soft, to = now, hard, "raised the descriptor limit");
            }
            Some(now)
        }
        Err(e) => {
            tracing::warn!(error = %e, "cannot raise the descriptor limit");
            before.map(|(soft, _)| soft)
        }
    }
}

/// What the config may hold open at once, by part.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Budget {
    /// Two per proxied connection (client and upstream).
    pub proxy: u64,
    pub dns_tcp: u64,
    pub probes: u64,
    pub admin: u64,
    pub reserve: u64,
}

impl Budget {
    pub fn of(config: &Config, limit: u64) -> Self {
        let proxy = if config.proxy.enabled {
            2 * config.proxy.max_connections as u64
        } else {
            0
        };
        let dns_tcp = if config.dns.enabled {
            config.dns.tcp_max_connections as u64
        } else {
            0
        };
        let admin = if config.admin.listen.is_some() {
            crate::admin::MAX_CONNECTIONS as u64
        } else {
            0
        };
        Self {
            proxy,
            dns_tcp,
            probes: crate::health::probe_slots(limit) as u64,
            admin,
            reserve: RESERVE,
        }
    }

    pub fn total(&self) -> u64 {
        self.proxy + self.dns_tcp + self.probes + self.admin + self.reserve
    }
}

/// Warns when the config's caps cannot fit in `limit` descriptors.
pub fn check_budget(config: &Config, limit: Option<u64>) {
    let Some(limit) = limit else { return };
    let b = Budget::of(config, limit);
    if b.total() > limit {
        tracing::warn!(
            limit,
            needed = b.total(),
            proxy = b.proxy,
            dns_tcp = b.dns_tcp,
            probes = b.probes,
            admin = b.admin,
            reserve = b.reserve,
            "the descriptor limit cannot hold [proxy] max_connections ({}, two descriptors each) \
             with DNS TCP connections, probes and admin clients; raise the hard limit \
             (ulimit -Hn, systemd LimitNOFILE=) or lower max_connections",
            config.proxy.max_connections
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_adds_up_what_each_part_may_hold() {
        let mut config = Config::embedded_default();
        config.proxy.enabled = true;
        config.proxy.max_connections = 1000;
        config.dns.enabled = true;
        config.dns.tcp_max_connections = 100;
        let b = Budget::of(&config, 4096);
        assert_eq!((b.proxy, b.dns_tcp, b.probes), (2000, 100, 512));
        assert_eq!(b.total(), 2000 + 100 + 512 + b.admin + RESERVE);
        config.proxy.enabled = false;
        config.dns.enabled = false;
        let b = Budget::of(&config, 4096);
        assert_eq!((b.proxy, b.dns_tcp), (0, 0));
    }
}
