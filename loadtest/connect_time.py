"""The time a client takes to connect: a secure node (CURVE, its key checked by the ZAP handler) against an
``--insecure`` one, in one run.

Two 1-node ``LocalCluster``s, one started secure and one with ``--insecure``. ``--rounds`` times, alternating
between them, a new ``Client`` connects (TCP, the zmq handshake with CURVE's key exchange and the ZAP check where
secure, then HELLO/WELCOME) and is closed. Printed: p50, p99 and max of the time from ``Client(...)`` to its
return, per cluster, and the ratio secure / insecure. The figures include the SDK's own socket set-up; what
CURVE adds is the difference.

Usage: ``python -m shardmq.loadtest.connect_time [--rounds 300]``. A script, not a test: it asserts nothing.
Everything it starts is stopped by pid at the end and its temp dir removed.
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from pathlib import Path

from shardmq.client import Client
from shardmq.testing import LocalCluster


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=300)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardmq-connect-") as tmp, contextlib.ExitStack() as stack:
        clusters: dict[str, LocalCluster] = {}
        for name, insecure in (("secure", False), ("insecure", True)):
            lc = LocalCluster(Path(tmp) / name, nodes=1, log_level="warning", insecure=insecure)
            stack.callback(lc.down)
            print(f"{name}: starting etcd + 1 node ...", flush=True)
            lc.up(timeout=60)
            clusters[name] = lc
        times: dict[str, list[float]] = {name: [] for name in clusters}
        for i in range(args.rounds):
            for name in (list(clusters) if i % 2 else list(reversed(clusters))):
                lc = clusters[name]
                assert lc.state is not None
                started = time.perf_counter()
                c = Client(lc.state.client_endpoints(), timeout=5.0, credentials=lc.admin_credentials)
                times[name].append(time.perf_counter() - started)
                c.close()
        print(f"\nconnect (Client() to WELCOME), {args.rounds} rounds each, interleaved; milliseconds")
        print(f"{'cluster':<10} {'p50':>8} {'p99':>8} {'max':>8}")
        for name, values in times.items():
            print(f"{name:<10} {percentile(values, 0.5) * 1e3:8.2f} {percentile(values, 0.99) * 1e3:8.2f} "
                  f"{max(values) * 1e3:8.2f}")  # fmt: skip
        ratio = percentile(times["secure"], 0.5) / percentile(times["insecure"], 0.5)
        print(f"secure / insecure p50: {ratio:.2f}x")


if __name__ == "__main__":
    main()
