#!/usr/bin/env python3
"""etcd scale bench (issue 12): N publishing beacon nodes x E endpoints each.

A 3-member etcd on loopback (fsync on, data under --work in /tmp), N beacon
nodes each publishing a file source of E endpoints (S services x E/S
endpoints; every node has the same service names, so a service answers
with N x E/S endpoints cluster-wide; ips 10.<node>.x.y, health "none").
Then a new, watch-only node is started and timed:

1. first sync: process start -> /readyz 200, and -> the registry holding
   all N*E endpoints (the `beacon_endpoints` gauges of /metrics, polled;
   then one /v1/services must show them all, and is timed);
2. VmRSS of the new node before that /v1/services, and of every beacon
   node (and etcd member) after sync;
3. propagation: node 0's file changes (a one-endpoint service `probe`
   flips between two ips), timed from the file write to the new node's DNS
   answer; node 0's own DNS answer is timed too (the hop = new - own).

Every number is printed with the load average at that moment. Started by
benches/load/etcd_scale.sh; needs etcd and etcdctl (Debian etcd-server,
etcd-client) and a release beacon (BEACON=...).
"""

import argparse
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request

PROBE = "probe.default.svc.cluster.local"
PROBE_IPS = ("127.0.0.50", "127.0.0.51")
PROCS = []


def log(msg):
    print(f"[{time.strftime('%H:%M:%S', time.gmtime())}] {msg}", file=sys.stderr, flush=True)


def loadavg():
    return open("/proc/loadavg").read().split()[0]


def free_port():
    for _ in range(500):
        p = random.randint(20000, 32000)
        t = socket.socket()
        u = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        try:
            t.bind(("127.0.0.1", p))
            u.bind(("127.0.0.1", p))
            return p
        except OSError:
            continue
        finally:
            t.close()
            u.close()
    raise SystemExit("no free port")


def spawn(name, args, work):
    out = open(os.path.join(work, f"{name}.log"), "ab")
    p = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, cwd=work)
    PROCS.append(p)
    return p


def cleanup():
    for p in PROCS:
        if p.poll() is None:
            p.terminate()
    deadline = time.time() + 5
    for p in PROCS:
        try:
            p.wait(max(0.1, deadline - time.time()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def rss_kb(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def http_get(url, timeout=10):
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, b""
    except OSError:
        return None, b""


# --- a minimal DNS A query over UDP -------------------------------------


def dns_query(sock, port, name, qid):
    q = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    for label in name.split("."):
        q += bytes([len(label)]) + label.encode()
    q += b"\x00" + struct.pack(">HH", 1, 1)
    sock.sendto(q, ("127.0.0.1", port))
    while True:
        data = sock.recv(4096)
        if struct.unpack(">H", data[:2])[0] == qid:
            return parse_a(data)


def skip_name(data, i):
    while True:
        n = data[i]
        if n == 0:
            return i + 1
        if n & 0xC0 == 0xC0:
            return i + 2
        i += n + 1


def parse_a(data):
    an = struct.unpack(">H", data[6:8])[0]
    i = skip_name(data, 12) + 4
    ips = []
    for _ in range(an):
        i = skip_name(data, i)
        rtype, _cls, _ttl, rdlen = struct.unpack(">HHIH", data[i : i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            ips.append(socket.inet_ntoa(data[i : i + 4]))
        i += rdlen
    return sorted(ips)


class Dns:
    def __init__(self, port):
        self.port = port
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.settimeout(1.0)
        self.qid = random.randint(1, 60000)

    def a(self, name):
        self.qid = (self.qid + 1) % 65536
        try:
            return dns_query(self.sock, self.port, name, self.qid)
        except (socket.timeout, OSError):
            return None


def per_query_reads(members, far, rounds=5, per_round=200):
    """What a DNS server that reads etcd per uncached query pays (CoreDNS's
    etcd plugin: one linearizable prefix Get per question, no watch)
    beside beacon answering from memory. Neither CoreDNS nor kube-proxy is
    packaged in Debian and Go's module proxy is not reachable, so the peer
    is measured by its mechanism: a linearizable Range of one name's keys
    (the probe endpoint, one key) through etcd's JSON gateway on member m0
    with a kept-alive connection (the gateway adds an in-process hop, and
    CoreDNS adds its DNS handling on top, so this is about a floor), vs a
    UDP A query for the same name to the watching node. Alternating rounds;
    medians of the rounds' p50 and p99, in microseconds."""
    import base64
    import http.client

    key = b"/beacon/v1/nodes/node-0/endpoints/default/probe/"
    end = key[:-1] + bytes([key[-1] + 1])
    body = json.dumps({"key": base64.b64encode(key).decode(), "range_end": base64.b64encode(end).decode()})
    conn = http.client.HTTPConnection("127.0.0.1", members[0]["client"], timeout=5)

    def etcd_get():
        conn.request("POST", "/v3/kv/range", body, {"content-type": "application/json"})
        r = conn.getresponse()
        data = r.read()
        assert r.status == 200 and b'"kvs"' in data, data[:200]

    def dns_get():
        assert far.a(PROBE), "no answer"

    out = {"etcd_range": ([], []), "beacon_dns": ([], [])}
    for _ in range(rounds):
        for name, fn in (("beacon_dns", dns_get), ("etcd_range", etcd_get)):
            lat = []
            for _ in range(per_round):
                t = time.perf_counter()
                fn()
                lat.append((time.perf_counter() - t) * 1e6)
            out[name][0].append(pct(lat, 0.5))
            out[name][1].append(pct(lat, 0.99))
    med = lambda v: round(sorted(v)[len(v) // 2], 1)  # noqa: E731
    return {k: {"p50_us": med(p50), "p99_us": med(p99)} for k, (p50, p99) in out.items()}


# --- etcd ---------------------------------------------------------------


def start_etcd(work, n=3):
    members = [
        {"name": f"m{i}", "client": free_port(), "peer": free_port()} for i in range(n)
    ]
    initial = ",".join(f"{m['name']}=http://127.0.0.1:{m['peer']}" for m in members)
    for m in members:
        url = f"http://127.0.0.1:{m['client']}"
        peer = f"http://127.0.0.1:{m['peer']}"
        m["proc"] = spawn(
            f"etcd-{m['name']}",
            [
                "etcd", "--name", m["name"],
                "--data-dir", os.path.join(work, f"etcd-{m['name']}"),
                "--listen-client-urls", url, "--advertise-client-urls", url,
                "--listen-peer-urls", peer, "--initial-advertise-peer-urls", peer,
                "--initial-cluster", initial, "--initial-cluster-state", "new",
                "--initial-cluster-token", "beacon-scale",
                "--heartbeat-interval", "50", "--election-timeout", "500",
            ],
            work,
        )
    endpoints = [f"http://127.0.0.1:{m['client']}" for m in members]
    for _ in range(200):
        r = etcdctl(endpoints, ["endpoint", "health"], check=False)
        if r.returncode == 0:
            return members, endpoints
        time.sleep(0.1)
    raise SystemExit("etcd cluster not healthy in 20 s")


def etcdctl(endpoints, args, check=True):
    env = dict(os.environ, ETCDCTL_API="3")
    r = subprocess.run(
        ["etcdctl", f"--endpoints={','.join(endpoints)}", "--command-timeout=10s", *args],
        capture_output=True, text=True, env=env,
    )
    if check and r.returncode != 0:
        raise SystemExit(f"etcdctl {args}: {r.stderr}")
    return r


def key_count(endpoints, prefix):
    r = etcdctl(endpoints, ["get", prefix, "--prefix", "--keys-only", "--limit=1", "-w", "json"], check=False)
    if r.returncode != 0:
        # an overloaded etcd: try again on the next poll
        log(f"etcdctl count failed: {r.stderr.strip().splitlines()[-1:]}")
        return 0
    return int(json.loads(r.stdout).get("count", 0))


# --- beacon nodes -------------------------------------------------------


def services_text(node, services, per, probe_ip=None):
    out = []
    for s in range(services):
        out.append(f'[[service]]\nname = "svc-{s:04d}"\n[[service.port]]\nname = "http"\nport = 80\n')
        for j in range(per):
            k = s * per + j
            out.append(f'[[service.endpoint]]\nip = "10.{node}.{k // 256}.{k % 256}"\nport = 8080\n')
    if probe_ip:
        out.append(
            f'[[service]]\nname = "probe"\n[[service.port]]\nname = "http"\nport = 80\n'
            f'[[service.endpoint]]\nip = "{probe_ip}"\nport = 8080\n'
        )
    return "".join(out)


def write_atomic(path, text):
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


class Node:
    def __init__(self, work, name, endpoints, beacon, services_file=None):
        self.name = name
        self.dir = os.path.join(work, name)
        os.makedirs(self.dir, exist_ok=True)
        self.dns = free_port()
        self.admin = free_port()
        self.services = os.path.join(self.dir, "services.toml")
        eps = ", ".join(f'"{e}"' for e in endpoints)
        conf = (
            'startup_timeout = "120s"\nshutdown_grace = "2s"\n'
            f'[dns]\nlisten = "127.0.0.1:{self.dns}"\nzone = "cluster.local"\nlameduck = "0s"\n'
            f'[admin]\nlisten = "127.0.0.1:{self.admin}"\n[health]\nkind = "none"\n'
        )
        if services_file is not None:
            write_atomic(self.services, services_file)
            conf += f'[[source]]\ntype = "file"\npath = "{self.services}"\n'
            publish = '["file"]'
        else:
            publish = "[]"
        conf += (
            f'[[source]]\ntype = "etcd"\nendpoints = [{eps}]\nnode = "{name}"\n'
            f'publish = {publish}\nlease_ttl = "10s"\n'
        )
        self.config = os.path.join(self.dir, "beacon.toml")
        with open(self.config, "w") as f:
            f.write(conf)
        self.beacon = beacon

    def start(self, work):
        self.started = time.monotonic()
        self.proc = spawn(self.name, [self.beacon, "run", "--config", self.config], work)

    def ready(self):
        return http_get(f"http://127.0.0.1:{self.admin}/readyz", timeout=2)[0] == 200

    def gauge_count(self):
        """Endpoints the registry holds, from the `beacon_endpoints` gauges
        of /metrics: cheap to poll, unlike /v1/services (tens of MB at
        100k endpoints, which a poll loop would turn into the node's RSS)."""
        status, body = http_get(f"http://127.0.0.1:{self.admin}/metrics", timeout=10)
        if status != 200:
            return None
        n = 0.0
        for line in body.decode().splitlines():
            if line.startswith("beacon_endpoints{"):
                n += float(line.rsplit(" ", 1)[1])
        return int(n)

    def endpoint_count(self):
        status, body = http_get(f"http://127.0.0.1:{self.admin}/v1/services", timeout=30)
        if status != 200:
            return None
        v = json.loads(body)
        return sum(len(s.get("endpoints", [])) for s in v.get("services", []))

    def alive(self):
        if self.proc.poll() is not None:
            raise SystemExit(f"{self.name} exited ({self.proc.returncode}); see its log")


def wait(what, secs, fn, every=0.05):
    deadline = time.monotonic() + secs
    while time.monotonic() < deadline:
        v = fn()
        if v:
            return v
        time.sleep(every)
    raise SystemExit(f"timeout ({secs} s): {what}")


def pct(v, p):
    v = sorted(v)
    return v[round((len(v) - 1) * p)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nodes", type=int, default=10)
    ap.add_argument("--endpoints", type=int, default=10000, help="per node")
    ap.add_argument("--per-service", type=int, default=10)
    ap.add_argument("--changes", type=int, default=100)
    ap.add_argument("--beacon", default=os.environ.get("BEACON", "target/release/beacon"))
    ap.add_argument("--publish-timeout", type=float, default=600, help="seconds for every key to be in etcd")
    ap.add_argument("--sync-timeout", type=float, default=60, help="seconds for the new node's first sync")
    ap.add_argument("--keep", action="store_true", help="keep the work dir")
    a = ap.parse_args()
    if a.endpoints % a.per_service:
        raise SystemExit("--endpoints must be a multiple of --per-service")
    if a.nodes > 250 or a.endpoints > 65536:
        raise SystemExit("at most 250 nodes and 65536 endpoints per node (ips 10.<node>.x.y)")
    for prog in ("etcd", "etcdctl"):
        if shutil.which(prog) is None:
            raise SystemExit(f"`{prog}` not found: install Debian's etcd-server and etcd-client")
    if not os.access(a.beacon, os.X_OK):
        raise SystemExit(f"beacon binary {a.beacon} not found (BEACON=...)")
    services = a.endpoints // a.per_service
    total = a.nodes * a.endpoints
    work = tempfile.mkdtemp(prefix="beacon-etcd-scale.", dir="/tmp")
    results = {"nodes": a.nodes, "endpoints_per_node": a.endpoints, "total": total}
    try:
        run(a, work, services, total, results)
    finally:
        cleanup()
        if a.keep:
            log(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(results))


def first_sync(a, new, want_eps, results):
    wait("new node ready", a.sync_timeout, lambda: (new.alive(), new.ready())[1], every=0.01)
    t_readyz = time.monotonic() - new.started
    seen = [None]

    def synced():
        new.alive()
        seen[0] = new.gauge_count()
        return seen[0] == want_eps

    try:
        wait(f"new node holds {want_eps} endpoints", a.sync_timeout, synced, every=0.01)
    except SystemExit:
        raise SystemExit(f"/readyz 200 after {t_readyz:.3f} s but the registry holds {seen[0]} of {want_eps} endpoints after {a.sync_timeout} s")
    t_sync = time.monotonic() - new.started
    time.sleep(1)
    results["rss_new_before_v1_services_kb"] = rss_kb(new.proc.pid)
    # Then once through the operators' view, which must agree.
    t = time.monotonic()
    shown = new.endpoint_count()
    results["v1_services_s"] = round(time.monotonic() - t, 3)
    if shown != want_eps:
        raise SystemExit(f"the registry holds {want_eps} endpoints but /v1/services shows {shown}")
    results["first_sync_readyz_s"] = round(t_readyz, 3)
    results["first_sync_all_endpoints_s"] = round(t_sync, 3)
    results["load_sync"] = loadavg()
    log(
        f"new node: /readyz 200 after {t_readyz:.3f} s, all {want_eps} endpoints in the registry "
        f"after {t_sync:.3f} s, VmRSS then {results['rss_new_before_v1_services_kb'] / 1024:.0f} MiB; "
        f"one /v1/services of them took {results['v1_services_s']} s (load {loadavg()})"
    )


def run(a, work, services, total, results):
    log(f"etcd: 3 members, load {loadavg()}")
    members, endpoints = start_etcd(work)
    prefix = "/beacon/v1/nodes/"
    nodes = []
    for n in range(a.nodes):
        text = services_text(n, services, a.per_service, PROBE_IPS[0] if n == 0 else None)
        nodes.append(Node(work, f"node-{n}", endpoints, a.beacon, text))
    log(f"starting {a.nodes} publishers x {a.endpoints} endpoints ({services} services), load {loadavg()}")
    t0 = time.monotonic()
    for node in nodes:
        node.start(work)
    for node in nodes:
        wait(f"{node.name} ready", 180, lambda: (node.alive(), node.ready())[1], every=0.1)
    t_ready = time.monotonic() - t0
    # keys: one per endpoint and one spec per service, per node; node 0 has the probe too
    want_keys = a.nodes * (a.endpoints + services) + 2
    last = [0]

    def published():
        for node in nodes:
            node.alive()
        last[0] = key_count(endpoints, prefix) or last[0]
        return last[0] >= want_keys

    try:
        wait(f"{want_keys} keys in etcd", a.publish_timeout, published, every=0.5)
    except SystemExit:
        log(f"only {last[0]} of {want_keys} keys in etcd")
        raise
    t_pub = time.monotonic() - t0
    results["publish_ready_s"] = round(t_ready, 3)
    results["publish_all_keys_s"] = round(t_pub, 3)
    results["load_publish"] = loadavg()
    log(f"publishers ready after {t_ready:.2f} s, all {want_keys} keys in etcd after {t_pub:.2f} s, load {loadavg()}")

    # The new node joins a converged cluster: every publisher holds every
    # node's endpoints (1.1M watch events delivered), not one still
    # digesting the publish burst.
    for node in nodes:
        wait(f"{node.name} holds all endpoints", a.publish_timeout,
             lambda: (node.alive(), node.gauge_count() == total + 1)[1], every=0.5)
    t_conv = time.monotonic() - t0
    results["publish_converged_s"] = round(t_conv, 3)
    log(f"every publisher holds all {total + 1} endpoints after {t_conv:.2f} s, load {loadavg()}")

    new = Node(work, "node-new", endpoints, a.beacon, None)
    results["load_before_sync"] = loadavg()
    new.start(work)
    watcher = new
    try:
        first_sync(a, new, total + 1, results)
    except SystemExit as e:
        # Keep measuring: RSS, and propagation to the last publisher (it
        # watches too) instead of the new node.
        results["first_sync_error"] = str(e)
        log(f"new node did not sync: {e} (load {loadavg()}); see node-new.log")
        watcher = nodes[-1]

    time.sleep(2)
    rss = {node.name: rss_kb(node.proc.pid) for node in nodes + [new]}
    rss_etcd = {m["name"]: rss_kb(m["proc"].pid) for m in members}
    results["rss_kb"] = rss
    results["rss_etcd_kb"] = rss_etcd
    results["load_rss"] = loadavg()
    pubs = [rss[n.name] for n in nodes]
    log(
        f"VmRSS publishers min {min(pubs) / 1024:.0f} / max {max(pubs) / 1024:.0f} MiB, "
        f"new node {rss['node-new'] / 1024:.0f} MiB, etcd members "
        f"{', '.join(f'{v / 1024:.0f}' for v in rss_etcd.values())} MiB (load {loadavg()})"
    )

    own, far = Dns(nodes[0].dns), Dns(watcher.dns)
    results["propagation_to"] = watcher.name
    log(f"propagation: node-0's file -> {watcher.name}'s DNS")
    wait(f"probe on {watcher.name}", 30, lambda: far.a(PROBE) == [PROBE_IPS[0]])
    results["load_before_changes"] = loadavg()
    at_new, hop, missed = [], [], 0
    for i in range(a.changes):
        ip = PROBE_IPS[(i + 1) % 2]
        text = services_text(0, services, a.per_service, ip)
        t = time.monotonic()
        write_atomic(nodes[0].services, text)
        seen_own = seen_new = None
        while seen_own is None or seen_new is None:
            el = time.monotonic() - t
            if el > 10:
                # counted as 10 s (a lower bound) and reported as missed
                log(f"change {i} not propagated in 10 s (own {seen_own}, far {seen_new})")
                missed += 1
                seen_own = seen_own if seen_own is not None else el
                seen_new = seen_new if seen_new is not None else el
                break
            if seen_own is None and own.a(PROBE) == [ip]:
                seen_own = time.monotonic() - t
            if seen_new is None and far.a(PROBE) == [ip]:
                seen_new = time.monotonic() - t
        at_new.append(seen_new)
        hop.append(max(0.0, seen_new - seen_own))
        time.sleep(0.05)
    ms = lambda v: round(v * 1000, 1)  # noqa: E731
    results["changes"] = a.changes
    results["missed_10s"] = missed
    results["file_to_far_dns_ms"] = {"p50": ms(pct(at_new, 0.5)), "p99": ms(pct(at_new, 0.99)), "max": ms(max(at_new))}
    results["hop_ms"] = {"p50": ms(pct(hop, 0.5)), "p99": ms(pct(hop, 0.99))}
    results["load_changes"] = loadavg()
    reads = per_query_reads(members, far)
    results["per_query_read"] = reads
    log(
        f"per query: beacon DNS from memory p50 {reads['beacon_dns']['p50_us']} / p99 {reads['beacon_dns']['p99_us']} us; "
        f"a linearizable etcd Range (what an uncached query costs CoreDNS's etcd plugin) p50 "
        f"{reads['etcd_range']['p50_us']} / p99 {reads['etcd_range']['p99_us']} us (load {loadavg()})"
    )
    log(
        f"{a.changes} changes ({missed} not seen in 10 s): file on node-0 -> DNS on node-new p50 {ms(pct(at_new, 0.5))} ms "
        f"p99 {ms(pct(at_new, 0.99))} ms, max {ms(max(at_new))} ms; hop (new - own) p50 {ms(pct(hop, 0.5))} ms "
        f"p99 {ms(pct(hop, 0.99))} ms (load {loadavg()})"
    )


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    main()
