"""Pieces the Python bench drivers share (kubernetes.py, etcd.py): a free
port, a DNS A query and the addresses of its answer, a percentile."""

import socket
import struct


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def dns_query(name, qid):
    header = struct.pack(">HHHHHH", qid, 0x0100, 1, 0, 0, 0)
    q = b"".join(bytes([len(p)]) + p.encode() for p in name.split(".")) + b"\0"
    return header + q + struct.pack(">HH", 1, 1)


def a_records(data):
    """The IPv4 addresses in the answer section of reply `data`."""
    an = struct.unpack(">H", data[6:8])[0]
    i = 12
    while data[i] != 0:  # the question's name
        i += data[i] + 1
    i += 5
    out = set()
    for _ in range(an):
        if data[i] & 0xC0 == 0xC0:
            i += 2
        else:
            while data[i] != 0:
                i += data[i] + 1
            i += 1
        rtype, _, _, rdlen = struct.unpack(">HHIH", data[i:i + 10])
        i += 10
        if rtype == 1 and rdlen == 4:
            out.add(socket.inet_ntoa(data[i:i + 4]))
        i += rdlen
    return out


def percentile(xs, p):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(p / 100 * (len(xs) - 1))))]
