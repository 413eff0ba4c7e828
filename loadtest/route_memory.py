"""Bytes per exact route held in a RouteTable, against the floor of one bare dict.

Rules:

* Topics are ~80-byte ASCII strings shaped like ``devices/<uuid>/telemetry/<n>/...``, all
  routed to one node id, spread over 4096 shards by the ring's ``shard_for_key(placement key)``,
  exactly as a node places them.
* The topic list is built *before* measuring and is shared by both containers, so neither
  figure includes the topic strings themselves: a route table receives the filter string from
  the SUBSCRIBE packet and keeps a reference to it, exactly as the bare dict does.
* What is counted, with tracemalloc, as the traced-memory growth while a container is built
  and still alive: dict hash tables (index + entry arrays, including their over-allocation),
  the per-shard ``FilterIndex`` objects and their dicts, the shard dict, and the interned node
  id. Temporaries (the encoded key, the crc) are freed before the reading and do not count.
  What is not counted: malloc's own per-block headers (a few thousand blocks here) and the
  topic strings (printed separately for scale).
* The floor is ``{topic: None for topic in topics}``: one dict entry per route and nothing else.
  The same topics in 4096 bare dicts (the sharding alone, no FilterIndex) is printed too, to
  separate the cost of sharding from the cost of the table's own objects.

Usage: ``python -m shardmq.loadtest.route_memory --routes 1000000,5000000``
"""

from __future__ import annotations

import argparse
import gc
import sys
import time
import tracemalloc
from collections.abc import Callable

from shardmq.ring import shard_for_key
from shardmq.router.partition import placement_key
from shardmq.router.routes import RouteTable

TOPIC_BYTES = 80
SHARDS = 4096
NODE = "node-0a1b2c3d"


def make_topics(n: int) -> list[str]:
    topics = []
    for i in range(n):
        # A multiplicative hash gives uuid-looking hex without the cost of uuid4()/md5 per topic.
        h = f"{(i * 0x9E3779B97F4A7C15F39CC0605CEDC834) & ((1 << 128) - 1):032x}"
        t = f"devices/{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}/telemetry/{i % 97}/"
        topics.append((t + "x" * (TOPIC_BYTES - len(t)))[:TOPIC_BYTES])
    return topics


def shard_of(topic: str) -> int:
    key = placement_key(topic)
    assert key is not None
    return shard_for_key(key, SHARDS)


def measure(build: Callable[[], object]) -> tuple[int, float]:
    """Traced bytes still held by the object ``build`` returns, and the build time."""
    gc.collect()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    started = time.perf_counter()
    held = build()
    elapsed = time.perf_counter() - started
    gc.collect()
    after = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del held
    return after - before, elapsed


def run(n: int) -> None:
    started = time.perf_counter()
    topics = make_topics(n)
    strings = sum(sys.getsizeof(t) for t in topics)
    print(f"\n{n:,} exact routes, {TOPIC_BYTES}-byte topics, {SHARDS} shards, one node "
          f"(topics built in {time.perf_counter() - started:.1f}s; "
          f"the strings themselves: {strings / n:.1f} B/topic, not counted below)")

    def bare_dict() -> dict[str, None]:
        return dict.fromkeys(topics)

    def sharded_dicts() -> dict[int, dict[str, None]]:
        shards: dict[int, dict[str, None]] = {}
        for t in topics:
            s = shard_of(t)
            d = shards.get(s)
            if d is None:
                d = shards[s] = {}
            d[t] = None
        return shards

    def route_table() -> RouteTable:
        table = RouteTable()
        add = table.add
        for t in topics:
            add(shard_of(t), t, NODE)
        assert table.route_count == n
        return table

    floor, t_floor = measure(bare_dict)
    sharded, t_sharded = measure(sharded_dicts)
    table, t_table = measure(route_table)
    for label, size, took in (
        ("bare dict {topic: None}", floor, t_floor),
        (f"{SHARDS} bare dicts", sharded, t_sharded),
        ("RouteTable", table, t_table),
    ):
        print(f"  {label:<26} {size / n:7.2f} B/route  ({size / 2**20:8.1f} MiB, built in {took:.1f}s)")
    ratio = table / floor
    verdict = "ok" if ratio <= 1.2 else "OVER GOAL"
    print(f"  ratio RouteTable / bare dict = {ratio:.3f}x (goal <= 1.2x: {verdict}); "
          f"including the topic strings: {(table + strings) / (floor + strings):.3f}x")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--routes",
        default="1000000,5000000",
        help="comma-separated route counts to measure (default: 1000000,5000000)",
    )
    args = parser.parse_args(argv)
    sizes = [int(s.replace("_", "")) for s in args.routes.split(",") if s.strip()]
    for n in sizes:
        run(n)
        gc.collect()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
