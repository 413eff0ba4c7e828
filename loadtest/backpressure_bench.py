"""QoS 1 back pressure: a publisher against a subscriber that reads slower than it publishes.

Starts a private 3-node cluster, runs a QoS 1 ``publish_many`` publisher on n1 and a subscriber on n2 for
``--duration`` seconds, twice in the same run: first with a subscriber that reads as fast as it can (the
baseline), then with one throttled to ``--read-rate`` messages per second. It prints, for each run, what the
publisher got acknowledged per second while publishing, what the subscriber received per second until it had
drained everything (``drained/s``), the publishes refused with
``overloaded`` at the subscriber's node (each retried by the SDK), the largest QoS 1 backlog and RSS seen at that
node, duplicates, and acknowledged messages that never arrived (must be 0). Every process it starts is stopped.

    python -m shardmq.loadtest.backpressure_bench --duration 10 --read-rate 2000
"""

from __future__ import annotations

import argparse
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

from shardmq.client import Client, ShardMQError
from shardmq.testing import LocalCluster


@dataclass
class Figures:
    acked_per_s: float
    received_per_s: float
    refused_overloaded: int
    max_backlog: int
    max_inflight: int
    rss_mib_max: float
    duplicates: int
    lost: int


def run(lc: LocalCluster, duration: float, read_rate: float | None) -> Figures:
    assert lc.state is not None
    by_name = {p.name: p for p in lc.state.nodes}
    sub_ep, pub_ep = by_name["n2"].client_endpoint, by_name["n1"].client_endpoint
    prefix = uuid.uuid4().hex[:8]
    acked: set[bytes] = set()
    got: list[bytes] = []
    stop = threading.Event()
    sub = Client([sub_ep], timeout=5.0)
    sub.subscribe(f"{prefix}/#", qos=1)

    def subscriber() -> None:
        started = time.monotonic()
        while not stop.is_set() or (time.monotonic() - started < duration * 4 and len(set(got)) < len(acked)):
            msg = sub.receive(timeout=0.5)
            if msg is None:
                if stop.is_set():
                    break
                continue
            got.append(msg.payload)
            if read_rate:  # hold each message as long as a reader at read_rate would
                behind = len(got) / read_rate - (time.monotonic() - started)
                if behind > 0:
                    time.sleep(behind)

    def publisher() -> None:
        with Client([pub_ep], timeout=5.0) as pub:
            i = 0
            while not stop.is_set():
                batch = [(f"{prefix}/{(i + k) % 100}", f"{i + k}-{prefix}".encode()) for k in range(200)]
                try:
                    pub.publish_many(batch, qos=1, batch=200)
                    acked.update(m for _, m in batch)
                except ShardMQError:
                    pass  # not acknowledged: not counted (overloaded past the SDK's timeout)
                i += 200

    with Client([sub_ep]) as probe:
        refused_before = probe.status()["metrics"].get("qos1.refused_overloaded", 0)
    threads = [threading.Thread(target=subscriber), threading.Thread(target=publisher)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    max_backlog = max_inflight = 0
    rss = 0.0
    with Client([sub_ep]) as probe:
        while time.monotonic() - t0 < duration:
            st = probe.status()
            max_backlog, max_inflight = max(max_backlog, st["qos1_backlog"]), max(max_inflight, st["qos1_inflight"])
            rss = max(rss, st["rss_bytes"] / 2**20)
            time.sleep(0.25)
        stop.set()
        acked_at_stop, elapsed = len(acked), time.monotonic() - t0
        threads[1].join(30)
        threads[0].join(duration * 5)
        refused = probe.status()["metrics"].get("qos1.refused_overloaded", 0) - refused_before
    sub.close()
    unique = set(got)
    return Figures(
        acked_at_stop / elapsed, len(unique) / max(elapsed, time.monotonic() - t0), refused, max_backlog,
        max_inflight, rss, len(got) - len(unique), len(acked - unique),
    )  # fmt: skip


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--duration", type=float, default=10.0)
    ap.add_argument("--read-rate", type=float, default=2000.0, help="messages/s the slow subscriber reads")
    ap.add_argument("--max-inflight", type=int, default=1000)
    ap.add_argument("--max-queued", type=int, default=10_000)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="shardmq-backpressure-") as directory:
        lc = LocalCluster(
            directory, nodes=3, log_level="warning",
            node_args=["--max-inflight", str(args.max_inflight), "--max-queued", str(args.max_queued)],
        )  # fmt: skip
        lc.up(timeout=60)
        lc.export_credentials()
        try:
            rows = [("fast reader", run(lc, args.duration, None)),
                    (f"reader at {args.read_rate:.0f}/s", run(lc, args.duration, args.read_rate))]  # fmt: skip
        finally:
            lc.down()
    print(f"QoS 1 publish_many on n1 -> subscriber on n2, {args.duration:.0f} s each, window {args.max_inflight}, "
          f"backlog {args.max_queued}")  # fmt: skip
    print(f"{'subscriber':<20} {'acked/s':>9} {'drained/s':>11} {'overloaded':>10} {'max backlog':>11} "
          f"{'max inflight':>12} {'RSS MiB':>8} {'dups':>5} {'lost':>5}")  # fmt: skip
    for name, f in rows:
        print(
            f"{name:<20} {f.acked_per_s:>9.0f} {f.received_per_s:>11.0f} {f.refused_overloaded:>10} "
            f"{f.max_backlog:>11} {f.max_inflight:>12} {f.rss_mib_max:>8.0f} {f.duplicates:>5} {f.lost:>5}"
        )
    base, slow = rows[0][1], rows[1][1]
    print(f"publisher rate with the slow reader: {slow.acked_per_s / max(base.acked_per_s, 1):.2f}x the fast one; "
          f"acknowledged and lost: {base.lost + slow.lost}")  # fmt: skip
    raise SystemExit(1 if base.lost + slow.lost else 0)


if __name__ == "__main__":
    main()
