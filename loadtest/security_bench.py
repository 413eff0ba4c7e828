"""What security costs: a secure cluster (CURVE on both ports, ACLs) against an ``--insecure`` one, in one run.

Two 3-node ``LocalCluster``s, the secure default and one started with ``--insecure``, measured alternately
(``--rounds`` rounds, the order flipped every round), one subscriber on n1 and one publisher on n3:

- **connect**: a new ``Client`` connects to n1 (TCP, the zmq handshake with CURVE's key exchange and the ZAP
  check where secure, then ``HELLO``/``WELCOME``) and is closed, ``--connects`` times per round; p50, p99, max.
- **QoS 1, one at a time**: ``publish(qos=1)`` in a loop, each waiting for its acknowledgement (no batching: the
  cipher's worst case); ``--count`` messages.
- **QoS 1, batched**: ``publish_many(qos=1, batch=128)``, 128 messages in flight per frame; ``--count`` messages,
  the subscriber reading afterwards (``--count`` stays under a session's backlog, 11,000).

Printed: medians per cluster and the ratios secure / insecure. QoS 0 throughput and latency are
``compare_brokers --only shardmq,shardmq-insecure``'s. 100-byte payloads, one topic per round.

Usage: ``python -m shardmq.loadtest.security_bench [--rounds 5] [--count 8000] [--connects 100]``. A script, not
a test: it asserts nothing. Everything it starts is stopped by pid at the end and its temp dir removed.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import tempfile
import time
from pathlib import Path

from shardmq.client import Client
from shardmq.testing import LocalCluster

PAYLOAD = b"x" * 100


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def connects(lc: LocalCluster, times: int) -> list[float]:
    assert lc.state is not None
    endpoint = lc.state.nodes[0].client_endpoint
    took = []
    for _ in range(times):
        started = time.perf_counter()
        c = Client([endpoint], timeout=5.0, credentials=lc.admin_credentials)
        took.append(time.perf_counter() - started)
        c.close()
    return took


def qos1(lc: LocalCluster, topic: str, count: int, batched: bool) -> float:
    """Delivered msg/s of ``count`` QoS 1 messages from n3 to a subscriber on n1."""
    assert lc.state is not None
    eps = lc.state.client_endpoints()
    creds = lc.admin_credentials
    with Client([eps[0]], credentials=creds) as sub, Client([eps[-1]], credentials=creds, timeout=30.0) as pub:
        sub.subscribe(topic, qos=1)
        started = time.perf_counter()
        if batched:
            pub.publish_many(((topic, PAYLOAD) for _ in range(count)), qos=1, batch=128)
        else:
            for _ in range(count):
                pub.publish(topic, PAYLOAD, qos=1)
        got = 0
        while got < count and sub.receive(timeout=5.0) is not None:
            got += 1
        return got / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--count", type=int, default=8000, help="QoS 1 messages per run (at most 11,000)")
    ap.add_argument("--connects", type=int, default=100, help="connects per cluster per round")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardmq-security-") as tmp, contextlib.ExitStack() as stack:
        clusters: dict[str, LocalCluster] = {}
        for name, insecure in (("secure", False), ("insecure", True)):
            lc = LocalCluster(Path(tmp) / name, nodes=3, log_level="warning", insecure=insecure)
            stack.callback(lc.down)
            print(f"{name}: starting etcd + 3 nodes ...", flush=True)
            lc.up(timeout=60)
            clusters[name] = lc
        connect: dict[str, list[float]] = {name: [] for name in clusters}
        sequential: dict[str, list[float]] = {name: [] for name in clusters}
        batched: dict[str, list[float]] = {name: [] for name in clusters}
        for rnd in range(args.rounds):
            for name in list(clusters) if rnd % 2 else list(reversed(clusters)):
                lc = clusters[name]
                connect[name] += connects(lc, args.connects)
                sequential[name].append(qos1(lc, f"sec/{rnd}/one", args.count // 4, batched=False))
                batched[name].append(qos1(lc, f"sec/{rnd}/batch", args.count, batched=True))
                print(f"round {rnd + 1} {name:<8}: QoS 1 one at a time {sequential[name][-1]:,.0f} msg/s, "
                      f"batched {batched[name][-1]:,.0f} msg/s", flush=True)  # fmt: skip
        print(f"\nmedians of {args.rounds} interleaved rounds; ratio = secure / insecure")
        print(f"{'':<28}{'secure':>12}{'insecure':>12}{'ratio':>8}")
        rows = [
            ("connect p50, ms", [percentile(connect[n], 0.5) * 1e3 for n in clusters]),
            ("connect p99, ms", [percentile(connect[n], 0.99) * 1e3 for n in clusters]),
            ("connect max, ms", [max(connect[n]) * 1e3 for n in clusters]),
            ("QoS 1 one at a time, msg/s", [statistics.median(sequential[n]) for n in clusters]),
            ("QoS 1 batched, msg/s", [statistics.median(batched[n]) for n in clusters]),
        ]
        for label, (secure, insecure) in rows:
            print(f"{label:<28}{secure:>12,.2f}{insecure:>12,.2f}{secure / insecure:>7.2f}x")


if __name__ == "__main__":
    main()
