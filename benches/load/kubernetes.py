#!/usr/bin/env python3
"""Kubernetes source at scale: a replayed API server (the list and watch
endpoints for Services and EndpointSlices, as tests/it/kube_api.rs speaks
them; lists paged by `limit`/`continue` as the API server pages them) with
N headless services of M endpoints each, one slice per service.

Measures, against the real (release) binary:
  - first sync: from start to /readyz answering 200 (list of both
    resources, one Reset, DNS built);
  - convergence: from a MODIFIED EndpointSlice event written to the open
    watch to DNS answering the new address (A of the headless service),
    p50/p99 over CHANGES events, one at a time;
  - RSS (VmRSS and VmHWM) after the changes.

Prints tab-separated `area test server metric value` lines on stdout.

  kubernetes.py --beacon target/release/beacon [--services 10000]
                [--endpoints 10] [--changes 200]
"""

import argparse
import http.server
import json
import os
import random
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from urllib.parse import parse_qs, urlsplit

from benchlib import a_records, dns_query, free_port, percentile


def ip_of(n):
    return f"10.{(n >> 16) & 255}.{(n >> 8) & 255}.{n & 255}"


class Api:
    """The replayed API server's state: objects, a resourceVersion, the
    watch history (kept whole: bounded by the bench's change count)."""

    def __init__(self, services, endpoints):
        self.cond = threading.Condition()
        self.rv = 1
        self.services = []
        self.slices = {}
        for i in range(services):
            name = f"svc-{i:05}"
            self.services.append({
                "metadata": {"name": name, "namespace": "bench", "resourceVersion": "1",
                             "uid": f"s-{i}", "creationTimestamp": "2026-01-01T00:00:00Z"},
                "spec": {"type": "ClusterIP", "clusterIP": "None", "clusterIPs": ["None"],
                         "ports": [{"name": "http", "port": 80, "protocol": "TCP",
                                    "targetPort": 8080}]},
                "status": {"loadBalancer": {}},
            })
            ips = [ip_of(i * endpoints + j + 1) for j in range(endpoints)]
            self.slices[name] = self.slice(name, ips, "1")
        self.history = []  # (rv, kind, event json line)
        self.cached = {}

    @staticmethod
    def slice(service, ips, rv):
        return {
            "metadata": {"name": f"{service}-abcde", "namespace": "bench", "resourceVersion": rv,
                         "generateName": f"{service}-",
                         "labels": {"kubernetes.io/service-name": service,
                                    "endpointslice.kubernetes.io/managed-by":
                                        "endpointslice-controller.k8s.io"}},
            "addressType": "IPv4",
            "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
            "endpoints": [{"addresses": [ip], "nodeName": "node-a",
                           "conditions": {"ready": True, "serving": True, "terminating": False}}
                          for ip in ips],
        }

    def list_body(self, kind, limit=0, cont=""):
        """One page of a list, as the API server pages it: at most `limit`
        items (0: all), `metadata.continue` when more remain. beacon's
        watcher asks for pages of 500, as kube-runtime does by default."""
        with self.cond:
            rv = self.rv
            start = int(cont.split(":")[1]) if cont else 0
            key = (kind, rv, start, limit)
            if key not in self.cached:
                if kind == "services":
                    items, api, k = self.services, "v1", "ServiceList"
                else:
                    items, api, k = list(self.slices.values()), "discovery.k8s.io/v1", "EndpointSliceList"
                end = start + limit if limit else len(items)
                meta = {"resourceVersion": str(rv)}
                if end < len(items):
                    meta["continue"] = f"{rv}:{end}"
                    meta["remainingItemCount"] = len(items) - end
                self.cached[key] = json.dumps({"kind": k, "apiVersion": api, "metadata": meta,
                                               "items": items[start:end]}).encode()
            return self.cached[key]

    def modify_slice(self, service, ips):
        """Appends a MODIFIED event and wakes the watches; the time it did."""
        with self.cond:
            self.rv += 1
            obj = self.slice(service, ips, str(self.rv))
            obj["kind"], obj["apiVersion"] = "EndpointSlice", "discovery.k8s.io/v1"
            self.slices[service] = obj
            line = (json.dumps({"type": "MODIFIED", "object": obj}) + "\n").encode()
            self.history.append((self.rv, "endpointslices", line))
            t0 = time.perf_counter()
            self.cond.notify_all()
            return t0


def handler(api):
    class H(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"
        # TCP_NODELAY, as Go's net package (the API server) sets on every
        # connection. Without it, an event written while the previous one
        # waits for its delayed ACK sits in the kernel ~40 ms (Nagle), and
        # the bench measured that instead of beacon.
        disable_nagle_algorithm = True

        def log_message(self, *a):
            pass

        def do_GET(self):
            u = urlsplit(self.path)
            q = parse_qs(u.query)
            kind = "services" if u.path.endswith("/services") else "endpointslices"
            if q.get("watch", [""])[0] not in ("true", "1"):
                limit = int(q.get("limit", ["0"])[0] or 0)
                body = api.list_body(kind, limit, q.get("continue", [""])[0])
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            since = int(q.get("resourceVersion", ["0"])[0] or 0)
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            self.wfile.flush()
            sent = 0
            while True:
                with api.cond:
                    todo = [l for (rv, k, l) in api.history[sent:] if rv > since and k == kind]
                    sent = len(api.history)
                    if not todo:
                        api.cond.wait(timeout=5)
                        continue
                try:
                    for line in todo:
                        self.wfile.write(b"%x\r\n%s\r\n" % (len(line), line))
                    self.wfile.flush()
                except OSError:
                    return
    return H


def dns_a(sock, addr, name, qid):
    sock.sendto(dns_query(name, qid), addr)
    data, _ = sock.recvfrom(4096)
    return a_records(data)


def rss_kb(pid):
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(("VmRSS:", "VmHWM:")):
                out[line.split(":")[0]] = int(line.split()[1])
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--beacon", required=True)
    ap.add_argument("--services", type=int, default=10000)
    ap.add_argument("--endpoints", type=int, default=10)
    ap.add_argument("--changes", type=int, default=200)
    ap.add_argument("--page-size", type=int, default=500,
                    help="the watcher's list page size, to serialize pages before the start")
    a = ap.parse_args()

    api = Api(a.services, a.endpoints)
    for kind, count in (("services", a.services), ("endpointslices", a.services)):
        for start in range(0, count, a.page_size or count):  # serialized before beacon starts
            api.list_body(kind, a.page_size, f"1:{start}" if start else "")
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler(api))
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    api_addr = f"127.0.0.1:{server.server_address[1]}"

    work = tempfile.mkdtemp(prefix="beacon-k8s-bench.")
    kubeconfig = os.path.join(work, "kubeconfig")
    with open(kubeconfig, "w") as f:
        f.write(f"apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n"
                f"    server: http://{api_addr}\ncontexts:\n- name: fake\n  context:\n"
                f"    cluster: fake\n    user: fake\ncurrent-context: fake\nusers:\n"
                f"- name: fake\n  user: {{}}\n")
    dns_port, admin_port = free_port(), free_port()
    config = os.path.join(work, "beacon.toml")
    with open(config, "w") as f:
        f.write(f'startup_timeout = "120s"\nshutdown_grace = "1s"\n'
                f'[dns]\nlisten = "127.0.0.1:{dns_port}"\n'
                f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n'
                f'[health]\nkind = "none"\n'
                f'[[source]]\ntype = "kubernetes"\nkubeconfig = "{kubeconfig}"\n')
    log = open(os.path.join(work, "beacon.log"), "w")
    t_start = time.perf_counter()
    proc = subprocess.Popen([a.beacon, "run", "--config", config], stdout=log, stderr=log)
    try:
        deadline = time.perf_counter() + 120
        while True:
            if proc.poll() is not None:
                sys.exit(f"beacon exited: see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{admin_port}/readyz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.perf_counter() > deadline:
                sys.exit("beacon never got ready")
            time.sleep(0.005)
        first_sync = time.perf_counter() - t_start
        sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        sock.settimeout(1)
        dns = ("127.0.0.1", dns_port)
        got = dns_a(sock, dns, "svc-00000.bench.svc.cluster.local", 1)
        assert got == {ip_of(j + 1) for j in range(a.endpoints)}, got
        rss_synced = rss_kb(proc.pid)

        samples = []
        rng = random.Random(13)
        fresh = a.services * a.endpoints + 1000
        for n in range(a.changes):
            i = rng.randrange(a.services)
            name = f"svc-{i:05}"
            fresh += 1
            ips = [ip_of(fresh)] + [ip_of(i * a.endpoints + j + 1) for j in range(1, a.endpoints)]
            want = ip_of(fresh)
            t0 = api.modify_slice(name, ips)
            qname = f"{name}.bench.svc.cluster.local"
            limit = t0 + 5
            while True:
                if want in dns_a(sock, dns, qname, n & 0xFFFF):
                    samples.append(time.perf_counter() - t0)
                    break
                if time.perf_counter() > limit:
                    sys.exit(f"change {n} never answered")
        rss = rss_kb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=10)
    ms = lambda s: f"{s * 1000:.2f}"
    size = f"{a.services}svc/{a.services * a.endpoints}ep"
    rows = [
        ("first_sync_ms", ms(first_sync)),
        ("dns_p50_ms", ms(percentile(samples, 50))),
        ("dns_p99_ms", ms(percentile(samples, 99))),
        ("dns_max_ms", ms(max(samples))),
        ("rss_synced_mb", f"{rss_synced['VmRSS'] / 1024:.1f}"),
        ("rss_mb", f"{rss['VmRSS'] / 1024:.1f}"),
        ("rss_peak_mb", f"{rss['VmHWM'] / 1024:.1f}"),
    ]
    for metric, value in rows:
        print(f"kubernetes\t{size}\tbeacon\t{metric}\t{value}")
    print(f"kubernetes: {size}, {a.changes} changes: " +
          ", ".join(f"{m} {v}" for m, v in rows), file=sys.stderr)


if __name__ == "__main__":
    main()
