"""CPU per message of each node's protocol core on the many-topic publish path, in process (a script, not a test).

The nodes' real cores (``shardmq.protocol.NodeCore``) in the deterministic simulation (``shardmq.testing.
simulation``): no sockets, no other processes, so the figures are the cores' own cost and far less noisy than a
cluster's. Three nodes; a subscriber session on the first holds K exact topics (``<prefix>/t<i>``, subscribed in
one SUB per 1,000); a publisher on the third sends PUBS frames of ``--batch`` QoS 0 messages of 100 bytes, each
to the next topic in turn, as the SDK batches them. Every frame is delivered through the cluster (lookups,
answers, forwards, deliveries) before the next; the simulated clock advances by ``--batch / --rate`` seconds per
frame, so cached answers age (and expire, ``route_cache_ttl`` 1 s) as they would at that rate. Each node's
``on_client_parts``, ``on_peer_parts`` and ``flush`` are timed with ``time.thread_time`` (CPU, not wall time).

The rate sets how often a topic comes back: K / rate seconds. With K = 100,000 at 30,000 msg/s it is 3.3 s, past
the cache ttl, so every publish needs a lookup; ``--topics 20000 --rate 6000`` gives the same revisit time at a
fifth of the run time.

Usage: ``python -m shardmq.loadtest.topic_costs [--topics 1,1000,20000] [--messages 200000] [--rate 30000]``.
"""

from __future__ import annotations

import argparse
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from shardmq.router import codec
from shardmq.testing.simulation import Sim, SimConfig

PAYLOAD = b"x" * 100


def measure(k: int, messages: int, rate: float, batch: int, shard_count: int) -> dict[str, Any]:
    sim = Sim(SimConfig(shard_count=shard_count, replication=2, lookup_timeout=1.0, request_timeout=5.0))
    ids = [sim.join() for _ in range(3)]
    if not sim.settle():
        raise RuntimeError("the simulated cluster did not settle")
    sub, owner, pub = ids
    topics = [f"bench/k{k}/t{i}" for i in range(k)]
    node = sim.nodes[sub]
    for at in range(0, k, 1000):
        header = {"id": at + 1, "filters": topics[at : at + 1000], "qos": 0}
        node.enter().on_client_parts([b"subscriber", *codec.encode(codec.SUB, header)])
        node.core.flush()
        sim.drain()
    sim.settle()
    spent: Counter[str] = Counter()
    for nid in ids:
        core = sim.nodes[nid].core
        for name in ("on_client_parts", "on_peer_parts", "flush"):
            fn: Callable[..., None] = getattr(core, name)

            def timed(*args: Any, fn: Callable[..., None] = fn, nid: str = nid) -> None:
                started = time.thread_time()
                fn(*args)
                spent[nid] += time.thread_time() - started

            setattr(core, name, timed)
    publisher = sim.nodes[pub]
    dt = batch / rate
    sent = 0
    while sent < messages:
        runs = [([topics[(sent + j) % k], 0, None], None, PAYLOAD) for j in range(batch)]
        publisher.enter().on_client_parts([b"publisher", *codec.encode_runs(codec.PUBS, {}, runs)])
        publisher.core.flush()
        sim.drain()
        sent += batch
        sim.tick(dt)  # leases renewed, timers run
    delivered = sim.nodes[sub].core.metrics["deliveries.qos0"]
    entry = sim.nodes[pub].core
    return {
        "k": k,
        "sent": sent,
        "delivered": delivered,
        "entry_us": 1e6 * spent[pub] / sent,
        "owner_us": 1e6 * spent[owner] / sent,
        "destination_us": 1e6 * spent[sub] / sent,
        "peer_frames_out": entry.metrics["frames_out.peer"],
        "cache_misses": entry.entry.route_cache.misses,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", default="1,1000,20000", help="comma-separated topic counts K")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--rate", type=float, default=30_000.0, help="msg/s the simulated clock advances at")
    parser.add_argument("--batch", type=int, default=128, help="messages per PUBS frame")
    parser.add_argument("--shard-count", type=int, default=4096)
    args = parser.parse_args(argv)
    print(
        f"CPU per message of each core (us), {args.messages:,} messages at a simulated {args.rate:,.0f} msg/s, "
        f"{args.batch} per PUBS frame, {args.shard_count} shards; the destination node also owns shards\n"
    )
    rows = [("K", "delivered", "entry us", "owner us", "destination us", "all us", "cache misses")]
    for k in (int(x) for x in args.topics.split(",")):
        r = measure(k, args.messages, args.rate, args.batch, args.shard_count)
        total = r["entry_us"] + r["owner_us"] + r["destination_us"]
        rows.append((f"{k:,}", f"{r['delivered']:,} of {r['sent']:,}", f"{r['entry_us']:.2f}", f"{r['owner_us']:.2f}",
                     f"{r['destination_us']:.2f}", f"{total:.2f}", f"{r['cache_misses']:,}"))  # fmt: skip
        print(f"K={k}: {r}", flush=True)
    print()
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    for i, row in enumerate(rows):
        print("| " + " | ".join(cell.ljust(widths[j]) for j, cell in enumerate(row)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()
