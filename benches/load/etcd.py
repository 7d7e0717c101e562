#!/usr/bin/env python3
"""Propagation through etcd: an endpoint change on node a to the DNS answer
on node c, over a 3-member etcd cluster on loopback (fsync on: etcd's
default, no --unsafe-no-fsync), both nodes real (release) beacon processes.

A change is an atomic rewrite (rename) of node a's services file that adds
or removes one endpoint (127.0.0.21), as in tests/it/etcd.rs
`etcd_propagation_from_node_a_to_node_c`. For each change the driver polls
both nodes' DNS in turn and records
  - a:   rename → node a answers the new set (its file watcher, debounce
         included: the local path);
  - c:   rename → node c answers it (end to end: a's publisher, etcd's
         raft commit with fsync, c's watch, c's DNS);
  - hop: c − a (the etcd round trip as beacon sees it).
p50/p99/max over CHANGES changes, one at a time.

Prints tab-separated `area test server metric value` lines on stdout.

  etcd.py --beacon target/release/beacon [--changes 200] [--etcd etcd]
"""

import argparse
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import time

from benchlib import a_records, dns_query, free_port, percentile

NAME = "web.default.svc.cluster.local"
A_IP, C_IP, EXTRA = "127.0.0.11", "127.0.0.13", "127.0.0.21"


def dns_a(sock, addr, name, qid):
    """The A records of `name` at `addr`; an empty set on a timeout."""
    sock.sendto(dns_query(name, qid), addr)
    while True:
        try:
            data, _ = sock.recvfrom(4096)
        except socket.timeout:
            return set()
        if struct.unpack(">H", data[:2])[0] == qid:
            break  # a late reply to an earlier query is skipped
    return a_records(data)


def services(ips):
    s = '[[service]]\nname = "web"\n[[service.port]]\nname = "http"\nport = 80\n'
    for ip in ips:
        s += f'[[service.endpoint]]\nip = "{ip}"\nport = 8080\n'
    return s


def write_atomic(path, text):
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.rename(path + ".tmp", path)


class Cluster:
    """Three etcd members on loopback, data in `work`."""

    def __init__(self, etcd, work):
        self.members = [(f"m{i}", free_port(), free_port()) for i in range(3)]
        initial = ",".join(f"{n}=http://127.0.0.1:{p}" for n, _, p in self.members)
        self.procs = []
        for name, client, peer in self.members:
            log = open(os.path.join(work, f"{name}.log"), "w")
            self.procs.append(subprocess.Popen([
                etcd, "--name", name, "--data-dir", os.path.join(work, name),
                "--listen-client-urls", f"http://127.0.0.1:{client}",
                "--advertise-client-urls", f"http://127.0.0.1:{client}",
                "--listen-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-advertise-peer-urls", f"http://127.0.0.1:{peer}",
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", "beacon-bench",
                "--heartbeat-interval", "50", "--election-timeout", "500",
            ], stdout=log, stderr=log))
        self.urls = [f"http://127.0.0.1:{c}" for _, c, _ in self.members]

    def wait_healthy(self):
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            r = subprocess.run(
                ["etcdctl", f"--endpoints={','.join(self.urls)}", "--command-timeout=1s",
                 "endpoint", "health"],
                env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True)
            if r.returncode == 0:
                return
            time.sleep(0.2)
        sys.exit("etcd: the cluster never became healthy")

    def stop(self):
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)


def start_node(beacon, work, name, ips, etcd_urls):
    d = os.path.join(work, name)
    os.makedirs(d)
    dns, admin = free_port(), free_port()
    write_atomic(os.path.join(d, "services.toml"), services(ips))
    endpoints = ", ".join(f'"{u}"' for u in etcd_urls)
    with open(os.path.join(d, "beacon.toml"), "w") as f:
        f.write(f'startup_timeout = "30s"\nshutdown_grace = "1s"\n'
                f'[dns]\nlisten = "127.0.0.1:{dns}"\nttl = 1\n'
                f'[admin]\nlisten = "127.0.0.1:{admin}"\n'
                f'[health]\nkind = "none"\n'
                f'[[source]]\ntype = "file"\npath = "{d}/services.toml"\n'
                f'[[source]]\ntype = "etcd"\nendpoints = [{endpoints}]\nnode = "{name}"\n'
                f'publish = ["file"]\nlease_ttl = "10s"\n')
    log = open(os.path.join(d, "beacon.log"), "w")
    proc = subprocess.Popen([beacon, "run", "--config", os.path.join(d, "beacon.toml")],
                            stdout=log, stderr=log)
    return proc, ("127.0.0.1", dns), os.path.join(d, "services.toml")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--beacon", required=True)
    ap.add_argument("--etcd", default=shutil.which("etcd") or "etcd")
    ap.add_argument("--changes", type=int, default=200)
    a = ap.parse_args()

    work = tempfile.mkdtemp(prefix="beacon-etcd-bench.")
    cluster = Cluster(a.etcd, work)
    procs = []
    try:
        cluster.wait_healthy()
        pa, dns_a_addr, file_a = start_node(a.beacon, work, "node-a", [A_IP], cluster.urls)
        pc, dns_c_addr, _ = start_node(a.beacon, work, "node-c", [C_IP], cluster.urls)
        procs = [pa, pc]
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(0.5)
        base, wide = {A_IP, C_IP}, {A_IP, C_IP, EXTRA}
        qid = 1
        deadline = time.monotonic() + 60
        while dns_a(sock, dns_c_addr, NAME, qid) != base or dns_a(sock, dns_a_addr, NAME, qid) != base:
            for p in procs:
                if p.poll() is not None:
                    sys.exit(f"beacon exited: see {work}/node-*/beacon.log")
            if time.monotonic() > deadline:
                sys.exit("etcd bench: nodes a and c never converged")
            time.sleep(0.05)

        at_a, at_c, hop = [], [], []
        for n in range(a.changes):
            want = wide if n % 2 == 0 else base
            ips = [A_IP, EXTRA] if n % 2 == 0 else [A_IP]
            t0 = time.perf_counter()
            write_atomic(file_a, services(ips))
            seen_a = seen_c = None
            while seen_a is None or seen_c is None:
                qid = (qid + 1) & 0xFFFF
                if seen_a is None and dns_a(sock, dns_a_addr, NAME, qid) == want:
                    seen_a = time.perf_counter() - t0
                qid = (qid + 1) & 0xFFFF
                if seen_c is None and dns_a(sock, dns_c_addr, NAME, qid) == want:
                    seen_c = time.perf_counter() - t0
                if time.perf_counter() - t0 > 10:
                    sys.exit(f"change {n} not propagated within 10 s")
            at_a.append(seen_a)
            at_c.append(seen_c)
            hop.append(max(0.0, seen_c - seen_a))
            time.sleep(0.02)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=10)
        cluster.stop()
        if not os.environ.get("KEEP_WORK"):
            shutil.rmtree(work, ignore_errors=True)

    ms = lambda s: f"{s * 1000:.2f}"
    test = "3members-fsync"
    rows = []
    for what, xs in (("a", at_a), ("c", at_c), ("hop", hop)):
        rows += [(f"{what}_p50_ms", ms(percentile(xs, 50))),
                 (f"{what}_p99_ms", ms(percentile(xs, 99))),
                 (f"{what}_max_ms", ms(max(xs)))]
    for metric, value in rows:
        print(f"etcd\t{test}\tbeacon\t{metric}\t{value}")
    print(f"etcd: {a.changes} changes on node a -> DNS on node c, 3 etcd members with fsync: " +
          ", ".join(f"{m} {v}" for m, v in rows), file=sys.stderr)


if __name__ == "__main__":
    main()
