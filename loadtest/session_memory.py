"""Memory per persistent session, in bytes, in the protocol core (the in-memory simulated cluster, every node's
``NodeCore``): ``--sessions`` clients say HELLO (clean false) on n1, subscribe to their own topic at QoS 1 and go
away; then one QoS 1 message of ``--payload`` bytes is queued for each. Measured with tracemalloc over the whole
cluster (holder state at n1, directory and queue records at the session shards' R owners), per session.

    .venv/bin/python -m shardmq.loadtest.session_memory --sessions 10000
"""

from __future__ import annotations

import argparse
import gc
import tracemalloc

from shardmq.router import codec
from shardmq.testing.simulation import Sim, SimConfig


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sessions", type=int, default=10_000)
    parser.add_argument("--payload", type=int, default=100)
    args = parser.parse_args(argv)
    sim = Sim(SimConfig(shard_count=256, replication=2))
    for _ in range(3):
        sim.join()
    assert sim.settle()
    n1, n2, _ = sorted(sim.nodes)
    gc.collect()
    tracemalloc.start()
    base = tracemalloc.get_traced_memory()[0]
    for i in range(args.sessions):
        rid = b"car-%d" % i
        sim.client_send(rid, n1, codec.HELLO, {"id": 1, "clean": False, "expiry": 600})
        sim.client_send(rid, n1, codec.SUB, {"id": 2, "filters": [f"cars/{i}/cmd"], "qos": 1})
        if i % 500 == 499:
            sim.drain()
    assert sim.settle()
    for i in range(args.sessions):
        sim.client_send(b"car-%d" % i, n1, codec.BYE, {})
        sim.session_clients[b"car-%d" % i].node_id = None
    assert sim.settle()
    sim.session_clients.clear()  # the simulated clients' own frames and the step trace are not the cluster's memory
    sim.trace.clear()
    gc.collect()
    idle = tracemalloc.get_traced_memory()[0] - base
    pad = b"x" * args.payload
    publisher = sim.nodes[n2].enter()
    for i in range(args.sessions):
        publisher.on_client_parts([b"pub", *codec.encode(codec.PUB, {"id": i + 1, "topic": f"cars/{i}/cmd", "qos": 1},
                                                           pad)])  # fmt: skip
        if i % 500 == 499:
            publisher.flush()
            sim.drain()
    publisher.flush()
    assert sim.settle()
    sim.clients.clear()
    sim.trace.clear()
    sim.publishes.clear()
    gc.collect()
    queued = tracemalloc.get_traced_memory()[0] - base
    held = sum(len(n.core.destination.sessions) for n in sim.nodes.values())
    records = sum(len(n.core.owner.retained) for n in sim.nodes.values())
    print(f"sessions={args.sessions} held={held} store_records={records} "
          f"bytes_per_idle_session={idle / args.sessions:.0f} "
          f"bytes_per_session_with_one_queued={queued / args.sessions:.0f} payload={args.payload}")  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
