//! `forward = ["/etc/resolv.conf"]`: upstreams read from a resolv.conf
//! file (its `nameserver` lines, port 53), as CoreDNS's `forward . /etc/resolv.conf`
//! does. A nameserver that is beacon itself (its own listen address, or
//! loopback when beacon listens on every address) is skipped: forwarding
//! to itself would loop.

use std::net::{IpAddr, SocketAddr};

/// What one resolv.conf gives.
#[derive(Debug, Default, PartialEq, Eq)]
pub(super) struct Nameservers {
    /// In file order, beacon's own address left out.
    pub(super) upstreams: Vec<SocketAddr>,
    /// Nameservers skipped because they are beacon itself.
    pub(super) own: Vec<SocketAddr>,
    /// `nameserver` lines whose address does not parse: (line, text).
    pub(super) bad: Vec<(usize, String)>,
}

/// The nameservers of resolv.conf `text` for a beacon listening on `listen`.
pub(super) fn nameservers(text: &str, listen: SocketAddr) -> Nameservers {
    let mut out = Nameservers::default();
    for (i, line) in text.lines().enumerate() {
        let line = line.split(['#', ';']).next().unwrap_or("").trim();
        let mut words = line.split_whitespace();
        if words.next() != Some("nameserver") {
            continue;
        }
        let Some(word) = words.next() else {
            out.bad.push((i + 1, line.to_string()));
            continue;
        };
        // A link-local IPv6 nameserver carries its zone (`fe80::1%eth0`);
        // the upstream socket cannot use it: reported as unusable.
        match word.parse::<IpAddr>() {
            Ok(ip) => {
                let addr = SocketAddr::new(ip, 53);
                if is_self(addr, listen) {
                    out.own.push(addr);
                } else if !out.upstreams.contains(&addr) {
                    out.upstreams.push(addr);
                }
            }
            Err(_) => out.bad.push((i + 1, word.to_string())),
        }
    }
    out
}

fn is_self(addr: SocketAddr, listen: SocketAddr) -> bool {
    if addr == listen {
        return true;
    }
    addr.port() == listen.port()
        && listen.ip().is_unspecified()
        && (addr.ip().is_loopback() || addr.ip().is_unspecified())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn nameserver_lines_in_order_with_comments_options_and_duplicates() {
        let text = "# generated\nsearch shop.svc.cluster.local svc.cluster.local\n\
                    nameserver 10.0.0.2 # router\nnameserver 2001:db8::53\n\
                    ; nameserver 9.9.9.9\noptions ndots:5\nnameserver 10.0.0.2\n\
                    nameserver    1.1.1.1\n";
        let n = nameservers(text, a("127.0.0.1:53"));
        assert_eq!(
            n.upstreams,
            [a("10.0.0.2:53"), a("[2001:db8::53]:53"), a("1.1.1.1:53")]
        );
        assert!(n.own.is_empty() && n.bad.is_empty(), "{n:?}");
    }

    #[test]
    fn beacon_itself_is_skipped() {
        let text = "nameserver 127.0.0.1\nnameserver 10.0.0.2\n";
        let n = nameservers(text, a("127.0.0.1:53"));
        assert_eq!(n.upstreams, [a("10.0.0.2:53")]);
        assert_eq!(n.own, [a("127.0.0.1:53")]);
        // Listening on every address: any loopback nameserver is beacon.
        let text = "nameserver 127.0.0.53\nnameserver ::1\nnameserver 10.0.0.2\n";
        let n = nameservers(text, a("0.0.0.0:53"));
        assert_eq!(n.upstreams, [a("10.0.0.2:53")]);
        assert_eq!(n.own.len(), 2);
        // On another port, 127.0.0.1:53 is someone else (a local resolver).
        let n = nameservers("nameserver 127.0.0.1\n", a("127.0.0.1:5353"));
        assert_eq!(n.upstreams, [a("127.0.0.1:53")]);
    }

    #[test]
    fn unusable_lines_are_reported_with_their_line() {
        let text =
            "nameserver\nnameserver fe80::1%eth0\nnameserver not-an-ip\nnameserver 10.0.0.2\n";
        let n = nameservers(text, a("127.0.0.1:53"));
        assert_eq!(n.upstreams, [a("10.0.0.2:53")]);
        assert_eq!(n.bad.iter().map(|(l, _)| *l).collect::<Vec<_>>(), [1, 2, 3]);
    }
}
