#!/usr/bin/env python3
"""Idle-connection memory probe.

  idle.py serve HOST PORT
      An echo server that keeps every connection open (the backend).
  idle.py hold HOST PORT N PID [--settle S]
      Opens N connections to HOST:PORT (a proxy in front of the echo server),
      makes one round trip on each so the proxy has connected upstream and
      moved bytes both ways, waits S seconds, and prints the growth of PID's
      resident set (VmRSS, its children included) per held connection:
        held N  rss_before_kb A  rss_after_kb B  kb_per_conn C
"""

import asyncio
import os
import sys
import time


def rss_kb(pid):
    pids = [pid]
    try:
        with open(f"/proc/{pid}/task/{pid}/children") as f:
            pids += [int(p) for p in f.read().split()]
    except OSError:
        pass
    total = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1])
        except OSError:
            pass
    return total


async def serve(host, port):
    conns = []

    async def echo(reader, writer):
        conns.append(writer)
        try:
            while data := await reader.read(4096):
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(echo, host, port, backlog=4096)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


async def hold(host, port, n, pid, settle):
    # Warm the proxy (threads, pools, first allocations) before the baseline.
    warm = []
    for _ in range(10):
        r, w = await asyncio.open_connection(host, port)
        w.write(b"warm\n")
        await r.readline()
        warm.append(w)
    for w in warm:
        w.close()
    await asyncio.sleep(1.0)
    before = rss_kb(pid)
    sem = asyncio.Semaphore(200)
    held = []

    async def one(i):
        async with sem:
            try:
                r, w = await asyncio.wait_for(asyncio.open_connection(host, port), 10)
                w.write(b"ping %d\n" % i)
                await asyncio.wait_for(r.readline(), 10)
                held.append(w)
            except (OSError, asyncio.TimeoutError):
                pass

    t0 = time.monotonic()
    await asyncio.gather(*(one(i) for i in range(n)))
    opened = time.monotonic() - t0
    await asyncio.sleep(settle)
    after = rss_kb(pid)
    per = (after - before) / len(held) if held else 0.0
    print(f"held {len(held)} rss_before_kb {before} rss_after_kb {after} "
          f"kb_per_conn {per:.2f} open_s {opened:.2f}", flush=True)
    for w in held:
        w.close()


def main():
    mode = sys.argv[1]
    if mode == "serve":
        asyncio.run(serve(sys.argv[2], int(sys.argv[3])))
    elif mode == "hold":
        settle = 2.0
        if "--settle" in sys.argv:
            settle = float(sys.argv[sys.argv.index("--settle") + 1])
        asyncio.run(hold(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5]), settle))
    else:
        raise SystemExit(__doc__)


if __name__ == "__main__":
    main()
