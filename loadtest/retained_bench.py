"""Retained messages at scale: memory per retained message and the cost of a wildcard subscribe's query.

Fills one ``RetainedIndex`` (what one shard owner would hold if every topic landed in its shard: the worst case)
with ``--topics`` retained messages of ``--payload`` bytes, topics ``site<i>/dev<j>/<metric>`` (sites x devices x
metrics), then times ``match`` for filters that match a few, many or none, against the baseline a store without
an index has: one pass of ``filter_matches`` over every topic, measured in the same run.

    .venv/bin/python -m shardmq.loadtest.retained_bench --topics 1000000

Prints one line per filter: matches, query time (median of ``--repeats``), the scan's time and the ratio; and
the memory per retained message (resident set growth over the fill, divided by the count, the payload included).
"""

from __future__ import annotations

import argparse
import gc
import os
import statistics
import sys
import time

from shardmq.router.matching import filter_matches
from shardmq.router.retained import RetainedIndex

METRICS = ("temp", "humidity", "battery", "rssi", "state", "fw", "uptime", "load", "door", "power")


def rss_bytes() -> int:
    with open(f"/proc/{os.getpid()}/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def timed(fn, repeats: int) -> tuple[float, object]:  # type: ignore[no-untyped-def]
    samples = []
    result = None
    for _ in range(repeats):
        start = time.perf_counter()
        result = fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples), result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", type=int, default=1_000_000)
    parser.add_argument("--sites", type=int, default=100)
    parser.add_argument("--payload", type=int, default=100, help="bytes per retained payload")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args(argv)

    metrics = len(METRICS)
    devices = max(1, args.topics // (args.sites * metrics))
    total = args.sites * devices * metrics
    gc.collect()
    before = rss_bytes()
    index: RetainedIndex[bytes] = RetainedIndex()
    started = time.perf_counter()
    for i in range(args.sites):
        for j in range(devices):
            for metric in METRICS:
                # A distinct payload object per message, as messages arriving off the wire would be.
                index.set(f"site{i}/dev{j}/{metric}", (b"%d:%d:" % (i, j)).ljust(args.payload, b"x"))
        if i % max(1, args.sites // 10) == 0:
            print(f"  filled {(i + 1) * devices * metrics:,} of {total:,}", file=sys.stderr, flush=True)
    fill_s = time.perf_counter() - started
    gc.collect()
    grown = rss_bytes() - before
    print(f"retained messages: {total:,} ({args.sites} sites x {devices} devices x {metrics} metrics), "
          f"payload {args.payload} B; fill {fill_s:.1f} s ({total / fill_s:,.0f}/s)")  # fmt: skip
    print(f"memory: {grown / total:.0f} B per retained message, resident set growth "
          f"(payload {args.payload} B and topic ~{len('site0/dev0/temp') + 4} B included)")  # fmt: skip

    topics = list(index.items())
    mid_site, mid_dev = args.sites // 2, devices // 2
    filters = [
        (f"site{mid_site}/dev{mid_dev}/temp", "exact"),
        (f"site{mid_site}/+/temp", "a/+/c: one site's temperature"),
        (f"site{mid_site}/dev{mid_dev}/+", "a/b/+: one device"),
        (f"site{mid_site}/+/nope", "a/+/x: no match"),
        (f"site{mid_site}/#", "a/#: one site"),
        ("+/+/door", "+/+/c: every door (root set)"),
        ("+/nope/+", "+/x/+: no match (root set)"),
    ]
    print(f"{'filter':<26} {'case':<32} {'matches':>9} {'query ms':>10} {'scan ms':>10} {'scan/query':>11}")
    for filt, case in filters:
        query_s, found = timed(lambda f=filt: index.match(f), args.repeats)
        scan_s, scanned = timed(lambda f=filt: [t for t, _ in topics if filter_matches(f, t)], 1)
        assert isinstance(found, list) and isinstance(scanned, list) and len(found) == len(scanned)
        print(f"{filt:<26} {case:<32} {len(found):>9,} {query_s * 1e3:>10.3f} {scan_s * 1e3:>10.1f} "
              f"{scan_s / max(query_s, 1e-9):>10.0f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
