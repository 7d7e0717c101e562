#!/usr/bin/env python3
"""Generates one data set for every DNS server in the load bench.

N services x K endpoints in namespace `default` of zone `cluster.local`:
headless service `svc-<i>` with endpoints `ep-<j>` (10.x.y.z, unique), one
named port `http` 80/tcp. Written as:

  knot.zone          knot zone file
  unbound-local.conf unbound local-zone/local-data
  dnsmasq.hosts      dnsmasq addn-hosts file (A of services and endpoints)
  dnsmasq.conf       dnsmasq srv-host lines
  services/          beacon file source: one svc-<i>.toml per service
  q-hit.txt q-nx.txt q-srv.txt q-ep.txt   dnsperf query files
  upstream.zone q-fwd.txt                 the forwarding run's upstream zone

Every server answers the same names with the same records:
  svc-i.default.svc.cluster.local            A    K endpoint addresses
  ep-j.svc-i.default.svc.cluster.local       A    one address
  _http._tcp.svc-i.default.svc.cluster.local SRV  K x (0 1 80 ep-j.svc-i...)
"""

import argparse
import ipaddress
import os
import random

ZONE = "cluster.local"
UPSTREAM_ZONE = "upstream.test"


def ip_of(i, j, k):
    return str(ipaddress.IPv4Address(0x0A000000 + 1 + i * k + j))


def service_toml(i, k, health_none=True):
    lines = [
        "[[service]]",
        f'name = "svc-{i}"',
        'namespace = "default"',
        "",
        "  [[service.port]]",
        '  name = "http"',
        "  port = 80",
        "",
    ]
    for j in range(k):
        lines += [
            "  [[service.endpoint]]",
            f'  ip = "{ip_of(i, j, k)}"',
            f'  hostname = "ep-{j}"',
            "",
        ]
    if health_none:
        lines += ["  [service.health]", '  kind = "none"', ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=3)
    ap.add_argument("--queries", type=int, default=20000)
    ap.add_argument("--out", required=True)
    ap.add_argument("--beacon-only", action="store_true",
                    help="only the beacon services directory")
    a = ap.parse_args()
    n, k = a.services, a.endpoints
    if n * k >= 2**24 - 2:
        raise SystemExit("too many endpoints for 10.0.0.0/8")
    os.makedirs(os.path.join(a.out, "services"), exist_ok=True)
    for i in range(n):
        with open(os.path.join(a.out, "services", f"svc-{i:05d}.toml"), "w") as f:
            f.write(service_toml(i, k))
    if a.beacon_only:
        return

    soa = f"ns.dns.{ZONE}. hostmaster.{ZONE}. 1 3600 600 86400 5"
    with open(os.path.join(a.out, "knot.zone"), "w") as z, \
         open(os.path.join(a.out, "unbound-local.conf"), "w") as u, \
         open(os.path.join(a.out, "dnsmasq.hosts"), "w") as h, \
         open(os.path.join(a.out, "dnsmasq.conf"), "w") as d:
        z.write(f"$ORIGIN {ZONE}.\n$TTL 5\n@ SOA {soa}\n@ NS ns.dns\nns.dns A 127.0.0.1\n")
        u.write(f'server:\n  local-zone: "{ZONE}." static\n')
        u.write(f'  local-data: "{ZONE}. 5 IN SOA {soa}"\n')
        u.write(f'  local-data: "{ZONE}. 5 IN NS ns.dns.{ZONE}."\n')
        for i in range(n):
            svc = f"svc-{i}.default.svc"
            fq = f"{svc}.{ZONE}"
            for j in range(k):
                ip = ip_of(i, j, k)
                z.write(f"{svc} A {ip}\nep-{j}.{svc} A {ip}\n"
                        f"_http._tcp.{svc} SRV 0 1 80 ep-{j}.{svc}\n")
                u.write(f'  local-data: "{fq}. 5 IN A {ip}"\n'
                        f'  local-data: "ep-{j}.{fq}. 5 IN A {ip}"\n'
                        f'  local-data: "_http._tcp.{fq}. 5 IN SRV 0 1 80 ep-{j}.{fq}."\n')
                h.write(f"{ip} {fq} ep-{j}.{fq}\n")
                d.write(f"srv-host=_http._tcp.{fq},ep-{j}.{fq},80,0,1\n")

    rnd = random.Random(42)

    def qfile(name, gen):
        with open(os.path.join(a.out, name), "w") as f:
            for _ in range(a.queries):
                f.write(gen() + "\n")

    qfile("q-hit.txt", lambda: f"svc-{rnd.randrange(n)}.default.svc.{ZONE} A")
    qfile("q-ep.txt", lambda: f"ep-{rnd.randrange(k)}.svc-{rnd.randrange(n)}.default.svc.{ZONE} A")
    qfile("q-nx.txt", lambda: f"nope-{rnd.randrange(n)}.default.svc.{ZONE} A")
    qfile("q-srv.txt", lambda: f"_http._tcp.svc-{rnd.randrange(n)}.default.svc.{ZONE} SRV")

    # The forwarding run: an upstream zone of 1000 names, queried cache-hot.
    with open(os.path.join(a.out, "upstream.zone"), "w") as z:
        z.write(f"$ORIGIN {UPSTREAM_ZONE}.\n$TTL 3600\n@ SOA ns.{UPSTREAM_ZONE}. h.{UPSTREAM_ZONE}. 1 3600 600 86400 3600\n")
        z.write("@ NS ns\nns A 127.0.0.1\n")
        for i in range(1000):
            z.write(f"host-{i} A 192.0.2.{i % 250 + 1}\n")
    qfile("q-fwd.txt", lambda: f"host-{rnd.randrange(1000)}.{UPSTREAM_ZONE} A")


if __name__ == "__main__":
    main()
