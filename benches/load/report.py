#!/usr/bin/env python3
"""Prints the side-by-side tables of a load-bench run and draws its charts.

Input: the tab-separated results file the bench scripts append to
(area, test, server, metric, value per line).

  report.py RESULTS.tsv                 markdown tables on stdout
  report.py RESULTS.tsv --charts DIR    also DIR/<area>.svg (hand-written SVG)

Ratios are beacon / peer for every numeric metric, so they read the same
way as the metric: a qps ratio above 1 is good, a latency ratio above 1 bad.
"""

import argparse
import collections
import statistics
import html
import os

# Which way is better, by metric name.
LOWER_BETTER = ("ms", "us", "_mb", "kb", "lost", "cpu", "load_s", "sync_s")
CHART_METRICS = {
    "qps", "p99_us", "cpu_us_per_q", "gbps", "rps", "kb_per_conn",
    "p50_ms", "p99_ms", "rss_mb", "cpu_us_per_req", "sync_s",
}
PALETTE = {
    "beacon": "#e8710a", "direct": "#8c8c8c",
    "knot": "#4a6fa5", "unbound": "#6b8f71", "dnsmasq": "#9a7aa0",
    "haproxy": "#4a6fa5", "nginx": "#6b8f71",
}
PEER_COLORS = ["#4a6fa5", "#6b8f71", "#9a7aa0", "#b5a642", "#8c8c8c", "#5f9ea0"]


def lower_is_better(metric):
    return any(t in metric for t in LOWER_BETTER)


def fmt(v):
    try:
        f = float(v)
    except ValueError:
        return v
    if f == 0:
        return "0"
    if abs(f) >= 100:
        return f"{f:,.0f}"
    if abs(f) >= 10:
        return f"{f:.1f}"
    return f"{f:.3g}"


def short(v):
    """Compact value labels for crowded charts: 25,350 -> 25.4k."""
    try:
        f = float(v)
    except ValueError:
        return v
    if abs(f) >= 10000:
        return f"{f / 1000:.1f}k"
    return fmt(f)


ABBREV = {"least_conn": "lc", "round_robin": "rr", "maglev": "mag", "random": "rnd", "p2c": "p2c"}


def label(server):
    if server.startswith("beacon-"):
        policy = server[len("beacon-"):]
        return "b·" + ABBREV.get(policy, policy)
    return server[:10]


def order(servers):
    """beacon, then beacon's variants, then the peers in order of appearance."""
    return ([s for s in servers if s == "beacon"]
            + [s for s in servers if s.startswith("beacon-")]
            + [s for s in servers if not s.startswith("beacon")])


def load(path):
    """Rows of the TSV; a cell measured in several rounds (benches/load/l4.sh
    with L4_ROUNDS) becomes the median of its rounds."""
    seen = collections.OrderedDict()
    with open(path) as f:
        for line in f:
            parts = line.rstrip("\n").split("\t")
            if len(parts) == 5:
                seen.setdefault(tuple(parts[:4]), []).append(parts[4])
    rows = []
    for key, values in seen.items():
        try:
            v = statistics.median(float(x) for x in values)
            value = f"{v:.10g}" if len(values) > 1 else values[0]
        except ValueError:
            value = values[-1]
        rows.append(list(key) + [value])
    return rows


def tables(rows):
    by_area = collections.OrderedDict()
    for area, test, server, metric, value in rows:
        a = by_area.setdefault(area, {"servers": [], "cells": collections.OrderedDict()})
        if server not in a["servers"]:
            a["servers"].append(server)
        a["cells"].setdefault((test, metric), {})[server] = value
    out = []
    for area, a in by_area.items():
        servers = order(a["servers"])
        peers = [s for s in servers if s != "beacon" and not s.startswith("beacon")]
        ratio_cols = peers if "beacon" in servers else []
        head = ["test", "metric"] + servers + [f"beacon/{p}" for p in ratio_cols]
        out.append(f"### {area}\n")
        out.append("| " + " | ".join(head) + " |")
        out.append("|" + "---|" * len(head))
        for (test, metric), cells in a["cells"].items():
            row = [test, metric] + [fmt(cells.get(s, "")) for s in servers]
            for p in ratio_cols:
                try:
                    r = float(cells["beacon"]) / float(cells[p])
                    row.append(f"{r:.2f}")
                except (KeyError, ValueError, ZeroDivisionError):
                    row.append("")
            out.append("| " + " | ".join(row) + " |")
        out.append("")
    return "\n".join(out)


# The bars of the convergence issue: (test, limit in ms).
CONVERGENCE_BARS = {"registry_to_serving": 10.0, "file_to_serving": 1000.0}


def convergence_chart(cells, path):
    """p50/p99 of DNS and proxy per way of measuring, against its bar."""
    tests = [t for t in CONVERGENCE_BARS if (t, "dns_p50_ms") in cells]
    if not tests:
        return False
    pw, ph = 450, 230
    w, h = pw * len(tests), ph + 40
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        '<text x="10" y="22" font-size="15" font-weight="bold">convergence: '
        'one-endpoint change → served (10k services × 10 endpoints)</text>',
    ]
    for i, test in enumerate(tests):
        x0, y0 = i * pw, 40
        limit = CONVERGENCE_BARS[test]
        bars = []
        for what in ("dns", "proxy"):
            for q in ("p50", "p99"):
                try:
                    bars.append((f"{what} {q}", float(cells[(test, f"{what}_{q}_ms")]["beacon"])))
                except (KeyError, ValueError):
                    pass
        top = max([v for _, v in bars] + [limit]) * 1.1
        chart_h, base = 140, y0 + 185
        svg.append(f'<text x="{x0 + 10}" y="{y0 + 12}" font-weight="bold">{html.escape(test)} (ms)</text>')
        extra = []
        for metric, name in (("sync_s", "first sync"), ("rss_mb", "RSS")):
            v = cells.get((test, metric), {}).get("beacon")
            if v:
                extra.append(f"{name} {fmt(v)}{' s' if metric == 'sync_s' else ' MB'}")
        svg.append(f'<text x="{x0 + 10}" y="{y0 + 26}" fill="#666">lower is better · '
                   f'bar {fmt(limit)} ms · {html.escape(", ".join(extra))}</text>')
        ly = base - chart_h * limit / top
        svg.append(f'<line x1="{x0 + 10}" x2="{x0 + pw - 20}" y1="{ly:.1f}" y2="{ly:.1f}" '
                   f'stroke="#c0392b" stroke-dasharray="5,4"/>')
        svg.append(f'<text x="{x0 + pw - 22}" y="{ly - 3:.1f}" text-anchor="end" fill="#c0392b">'
                   f'bar {fmt(limit)} ms</text>')
        for j, (name, v) in enumerate(bars):
            bh = chart_h * v / top
            bx = x0 + 20 + j * 100
            color = "#e8710a" if v <= limit else "#8c8c8c"
            svg.append(f'<rect x="{bx}" y="{base - bh:.1f}" width="60" height="{bh:.1f}" fill="{color}"/>')
            svg.append(f'<text x="{bx + 30}" y="{base - bh - 3:.1f}" text-anchor="middle">{fmt(v)}</text>')
            svg.append(f'<text x="{bx + 30}" y="{base + 13}" text-anchor="middle">{name}</text>')
    svg.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(svg) + "\n")
    return True


def chart(area, cells_by_key, servers, path):
    if area == "convergence":
        return convergence_chart(cells_by_key, path)
    panels = [(k, v) for k, v in cells_by_key.items() if k[1] in CHART_METRICS]
    if not panels:
        return False
    cols = 3
    pw, ph = 300, 190
    rows_n = (len(panels) + cols - 1) // cols
    w, h = cols * pw, rows_n * ph + 40
    colors = {}
    peer_i = 0
    for s in servers:
        if s in PALETTE:
            colors[s] = PALETTE[s]
        elif s.startswith("beacon"):
            colors[s] = "#f4a261"
        else:
            colors[s] = PEER_COLORS[peer_i % len(PEER_COLORS)]
            peer_i += 1
    svg = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" '
        f'font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="white"/>',
        f'<text x="10" y="22" font-size="15" font-weight="bold">{html.escape(area)}</text>',
    ]
    for i, ((test, metric), cells) in enumerate(panels):
        x0, y0 = (i % cols) * pw, 40 + (i // cols) * ph
        vals = []
        for s in servers:
            try:
                vals.append((s, float(cells[s])))
            except (KeyError, ValueError):
                pass
        if not vals:
            continue
        better = "lower is better" if lower_is_better(metric) else "higher is better"
        svg.append(f'<text x="{x0 + 10}" y="{y0 + 12}" font-weight="bold">'
                   f'{html.escape(test)} · {html.escape(metric)}</text>')
        svg.append(f'<text x="{x0 + 10}" y="{y0 + 25}" fill="#666">{better}</text>')
        # An outlier (dnsmasq's CPU) would flatten every other bar: clip the
        # axis at 3x the runner-up and mark the clipped bar.
        ranked = sorted((v for _, v in vals), reverse=True)
        top = ranked[0] or 1.0
        if len(ranked) > 1 and ranked[1] > 0 and ranked[0] > 4 * ranked[1]:
            top = 3 * ranked[1]
        chart_h, base = 110, y0 + 165
        bw = min(44, (pw - 30) // max(len(vals), 1) - 8)
        for j, (s, v) in enumerate(vals):
            clipped = v > top
            bh = chart_h * min(v, top) / top
            bx = x0 + 15 + j * (bw + 8)
            svg.append(f'<rect x="{bx}" y="{base - bh:.1f}" width="{bw}" height="{bh:.1f}" '
                       f'fill="{colors[s]}"/>')
            size = 11 if len(vals) <= 4 else 9
            svg.append(f'<text x="{bx + bw / 2}" y="{base - bh - 3:.1f}" text-anchor="middle" '
                       f'font-size="{size}">{html.escape(short(v))}{" ✂" if clipped else ""}</text>')
            svg.append(f'<text x="{bx + bw / 2}" y="{base + 12}" text-anchor="middle" '
                       f'font-size="9">{html.escape(label(s))}</text>')
    svg.append("</svg>")
    with open(path, "w") as f:
        f.write("\n".join(svg) + "\n")
    return True


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("--charts", help="directory for <area>.svg")
    a = ap.parse_args()
    rows = load(a.results)
    print(tables(rows))
    if a.charts:
        os.makedirs(a.charts, exist_ok=True)
        by_area = collections.OrderedDict()
        for area, test, server, metric, value in rows:
            d = by_area.setdefault(area, (collections.OrderedDict(), []))
            d[0].setdefault((test, metric), {})[server] = value
            if server not in d[1]:
                d[1].append(server)
        for area, (cells, servers) in by_area.items():
            servers = order(servers)
            if chart(area, cells, servers, os.path.join(a.charts, f"{area}.svg")):
                print(f"chart: {os.path.join(a.charts, area + '.svg')}")


if __name__ == "__main__":
    main()
