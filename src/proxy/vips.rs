//! `[proxy] vip_interface`: beacon keeps exactly the vips it serves as
//! addresses on one interface of its own (a dummy, as kube-proxy's IPVS
//! mode does with `kube-ipvs0`), so a vip that is no address of the host
//! reaches the proxy from the host too. Listeners bind with `IP_FREEBIND`,
//! so the order of bind and address does not matter.
//!
//! The reconcile loop sends the whole wanted set (level-triggered); a
//! thread of its own applies the difference with iproute2's `ip` (never on
//! the async runtime), creating the interface (`type dummy`) when it is
//! missing and using it as it is when it exists. Without CAP_NET_ADMIN it
//! says so once, clearly, and keeps serving. On shutdown it removes the
//! addresses it added. A leaf: it uses nothing of the proxy.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::process::Command;
use std::sync::mpsc;

/// The handle the reconcile loop holds; dropping it ends the thread,
/// which then removes its addresses.
pub(super) struct VipInterface {
    tx: mpsc::Sender<BTreeSet<IpAddr>>,
    last: Option<BTreeSet<IpAddr>>,
}

impl VipInterface {
    pub(super) fn start(name: &str) -> VipInterface {
        let (tx, rx) = mpsc::channel();
        let name = name.to_string();
        let _ = std::thread::Builder::new()
            .name("vip-interface".into())
            .spawn(move || run(&name, rx));
        VipInterface { tx, last: None }
    }

    /// The vips that should be on the interface now (sent only on change).
    pub(super) fn want(&mut self, vips: BTreeSet<IpAddr>) {
        if self.last.as_ref() != Some(&vips) {
            let _ = self.tx.send(vips.clone());
            self.last = Some(vips);
        }
    }
}

/// `ip ARGS`: Ok, or the error text (stderr, or why it did not run).
fn ip(args: &[&str]) -> Result<String, String> {
    match Command::new("ip").args(args).output() {
        Ok(out) if out.status.success() => Ok(String::from_utf8_lossy(&out.stdout).into_owned()),
        Ok(out) => Err(String::from_utf8_lossy(&out.stderr).trim().to_string()),
        Err(e) => Err(format!("cannot run `ip` (iproute2): {e}")),
    }
}

fn prefix(vip: IpAddr) -> String {
    match vip {
        IpAddr::V4(v) => format!("{v}/32"),
        IpAddr::V6(v) => format!("{v}/128"),
    }
}

/// The addresses on the interface now (None: it does not exist).
fn addresses(name: &str) -> Option<BTreeSet<IpAddr>> {
    let out = ip(&["-o", "addr", "show", "dev", name]).ok()?;
    Some(
        out.lines()
            .filter_map(|l| {
                let mut words = l.split_whitespace();
                words.find(|w| *w == "inet" || *w == "inet6")?;
                words.next()?.split('/').next()?.parse().ok()
            })
            .collect(),
    )
}

/// Creates the interface when it is missing and sets it up.
fn ensure(name: &str) -> Result<(), String> {
    if addresses(name).is_none() {
        ip(&["link", "add", name, "type", "dummy"])?;
        tracing::info!(interface = name, "vip interface created");
    }
    ip(&["link", "set", name, "up"]).map(|_| ())
}

fn run(name: &str, rx: mpsc::Receiver<BTreeSet<IpAddr>>) {
    let mut warned = false;
    let mut complain = |what: &str, error: &str| {
        if !warned {
            tracing::warn!(
                interface = name,
                error,
                "vip interface: {what} failed (needs CAP_NET_ADMIN and iproute2's `ip`); vips that are not local addresses will not be reachable"
            );
            warned = true;
        } else {
            tracing::debug!(interface = name, error, "vip interface: {what} failed");
        }
    };
    // The vips beacon put there (only those: the interface may hold other
    // addresses, which are never touched).
    let mut have: Option<BTreeSet<IpAddr>> = None;
    while let Ok(mut want) = rx.recv() {
        while let Ok(newer) = rx.try_recv() {
            want = newer;
        }
        if have.is_none() {
            match ensure(name) {
                Ok(_) => have = Some(BTreeSet::new()),
                Err(e) => {
                    complain("setting up the interface", &e);
                    continue;
                }
            }
        }
        let Some(current) = have.as_mut() else {
            continue;
        };
        for vip in current.difference(&want).copied().collect::<Vec<_>>() {
            match ip(&["addr", "del", &prefix(vip), "dev", name]) {
                Ok(_) => {
                    tracing::info!(interface = name, %vip, "vip removed");
                    current.remove(&vip);
                }
                Err(e) => complain("removing a vip", &e),
            }
        }
        for vip in want.difference(&current.clone()) {
            match ip(&["addr", "add", &prefix(*vip), "dev", name]) {
                Ok(_) => {
                    tracing::info!(interface = name, %vip, "vip added");
                    current.insert(*vip);
                }
                // Already there (a previous run): ours from now on.
                Err(e) if e.contains("File exists") => {
                    current.insert(*vip);
                }
                Err(e) => complain("adding a vip", &e),
            }
        }
    }
    // The proxy stopped: take the vips away with it.
    for vip in have.into_iter().flatten() {
        let _ = ip(&["addr", "del", &prefix(vip), "dev", name]);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_are_host_routes() {
        assert_eq!(prefix("10.0.0.1".parse().unwrap()), "10.0.0.1/32");
        assert_eq!(prefix("fd00::1".parse().unwrap()), "fd00::1/128");
    }
}
