"""Retained messages on a real cluster: subscribe latency against the number retained, and memory per message.

Starts a 3-node ``LocalCluster`` (R=2), publishes ``--topics`` retained messages ``site<i>/dev<j>/<metric>``
(100 sites x N/1000 devices x 10 metrics, QoS 1, batched with ``publish_many(retain=True)``), then measures,
from the ``subscribe()`` call to the last retained message received (median of ``--repeats``, a fresh client on
another node each time):

- ``site<k>/+/temp`` (N/1000 matches: a wildcard subscribe asks every member),
- ``site<k>/dev<j>/+`` (10 matches),
- an exact topic (1 match: asks the primary of its shard only),

and the nodes' resident memory growth per retained message (``/proc/<pid>/statm`` of the node processes before
and after the fill, summed over the nodes: each message is held by R=2 owners).

    .venv/bin/python -m shardmq.loadtest.retained_load --topics 100000
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from shardmq.client import Client
from shardmq.testing import LocalCluster

METRICS = ("temp", "humidity", "battery", "rssi", "state", "fw", "uptime", "load", "door", "power")
SITES = 100


def rss(pid: int) -> int:
    with open(f"/proc/{pid}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def topics(n: int) -> list[str]:
    devices = max(1, n // (SITES * len(METRICS)))
    return [f"site{i}/dev{j}/{m}" for i in range(SITES) for j in range(devices) for m in METRICS][:n]


def subscribe_latency(endpoint: str, creds: Path, filt: str, expected: int, timeout: float = 60.0) -> float:
    with Client([endpoint], credentials=creds, timeout=timeout) as c:
        started = time.perf_counter()
        c.subscribe(filt, qos=1)
        got = 0
        while got < expected:
            msg = c.receive(timeout=timeout)
            if msg is None:
                raise SystemExit(f"{filt}: {got} of {expected} retained messages within {timeout}s")
            got += msg.retain
        return time.perf_counter() - started


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m shardmq.loadtest.retained_load", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--topics", type=int, default=100_000)
    parser.add_argument("--payload", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--dir", default=None, help="cluster directory (default: a temporary one)")
    args = parser.parse_args(argv)
    names = topics(args.topics)
    devices = max(1, args.topics // (SITES * len(METRICS)))
    payload = b"x" * args.payload
    directory = Path(args.dir or tempfile.mkdtemp(prefix="shardmq-retained-"))
    cluster = LocalCluster(directory, nodes=3, log_level="warning")
    try:
        cluster.up(timeout=60)
        assert cluster.state is not None
        nodes = cluster.state.nodes
        endpoints = [p.client_endpoint for p in nodes]
        creds = cluster.admin_credentials
        before = {p.name: rss(p.pid) for p in nodes}
        started = time.perf_counter()
        with Client(endpoints, credentials=creds, timeout=60.0) as pub:
            pub.publish_many(((t, payload) for t in names), qos=1, batch=500, retain=True)
            pub.flush()
        fill_s = time.perf_counter() - started
        time.sleep(1.0)
        after = {p.name: rss(p.pid) for p in nodes}
        growth = sum(after.values()) - sum(before.values())
        print(f"retained={len(names)} payload={args.payload}B fill_s={fill_s:.1f} "
              f"fill_rate={len(names) / fill_s:.0f}/s")  # fmt: skip
        print(f"rss_growth_total={growth / 2**20:.1f}MiB per_message={growth / len(names):.0f}B "
              f"(all nodes; R=2 copies) per_copy={growth / (2 * len(names)):.0f}B "
              + " ".join(f"{n}={(after[n] - before[n]) / 2**20:.1f}MiB" for n in sorted(after)))
        cases = [
            ("site<k>/+/temp", lambda k: f"site{k}/+/temp", devices),
            ("site<k>/dev<j>/+", lambda k: f"site{k}/dev{k % devices}/+", len(METRICS)),
            ("exact", lambda k: f"site{k}/dev{k % devices}/temp", 1),
        ]
        for label, make, expected in cases:
            samples = [
                subscribe_latency(endpoints[(k + 1) % len(endpoints)], creds, make(k), expected)
                for k in range(args.repeats)
            ]
            print(f"subscribe {label:18s} matches={expected:6d} median_ms={1000 * statistics.median(samples):8.1f} "
                  f"max_ms={1000 * max(samples):8.1f}")  # fmt: skip
    finally:
        cluster.down()
        if args.dir is None:  # only the directory this run made
            shutil.rmtree(directory, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
