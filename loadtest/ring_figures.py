"""Print the ShardMap balance, movement and lookup figures next to raw uhashring.

Rules: everything printed is measured in this run (no cached numbers); the
workload is deterministic (fixed node names and topics), so only the timing
columns vary between runs. Run ``python -m shardmq.loadtest.ring_figures``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence

from uhashring import HashRing

from shardmq.ring import ShardMap

S = 4096
R = 2
SIZES = (3, 5, 10)
TOPIC_COUNT = 200_000


def members(n: int) -> dict[str, int]:
    return {f"node-{i}": 1 for i in range(n)}


def raw_table(n: int) -> list[tuple[str, ...]]:
    return raw_table_of(members(n))


def raw_table_of(nodes: dict[str, int]) -> list[tuple[str, ...]]:
    # Raw uhashring as usually deployed: default md5 ring, 160 vnodes, first R distinct nodes clockwise.
    ring = HashRing(nodes=list(nodes))
    return [tuple(node["nodename"] for node in ring.range(f"shard-{s}", size=R)) for s in range(S)]


def ratios(table: Sequence[tuple[str, ...]]) -> tuple[float, float]:
    primary: dict[str, int] = {}
    replica: dict[str, int] = {}
    for owners in table:
        primary[owners[0]] = primary.get(owners[0], 0) + 1
        for node in owners:
            replica[node] = replica.get(node, 0) + 1
    n = len(replica)
    return max(primary.values()) / (S / n), max(replica.values()) / (S * R / n)


def copies(old: Sequence[tuple[str, ...]], new: Sequence[tuple[str, ...]]) -> int:
    return sum(len(set(b) - set(a)) for a, b in zip(old, new, strict=True))


def held(table: Sequence[tuple[str, ...]], node: str) -> int:
    return sum(node in owners for owners in table)


def placement_rows() -> list[str]:
    rows = []
    for n in SIZES:
        builders: tuple[tuple[str, Callable[[int], Sequence[tuple[str, ...]]]], ...] = (
            ("ShardMap", lambda k: ShardMap.build(members(k), S, R).table),
            ("uhashring", raw_table),
        )
        for name, build in builders:
            t0 = time.perf_counter()
            before: Sequence[tuple[str, ...]] = build(n)
            build_s = time.perf_counter() - t0
            after: Sequence[tuple[str, ...]] = build(n + 1)
            p_ratio, r_ratio = ratios(before)
            join = copies(before, after) / (S * R / (n + 1))
            # Leave: the (n+1)-node cluster loses node-0; ideal is exactly what node-0 held.
            survivors = members(n + 1)
            del survivors["node-0"]
            left = ShardMap.build(survivors, S, R).table if name == "ShardMap" else raw_table_of(survivors)
            leave = copies(after, left) / held(after, "node-0")
            rows.append(
                f"{n:>3} {name:<10} {p_ratio:>9.3f} {r_ratio:>9.3f} {join:>11.3f} {leave:>12.3f}"
                f" {build_s * 1000:>9.0f}"
            )
    return rows


def lookups_per_second(fn: Callable[[str], object], topics: list[str]) -> float:
    t0 = time.perf_counter()
    for topic in topics:
        fn(topic)
    return len(topics) / (time.perf_counter() - t0)


def main() -> None:
    print(f"placement: S={S} R={R}; ratios are busiest/mean; join/leave are replica copies / ideal")
    print("  N placement  primary  replica  join/ideal  leave/ideal  build ms")
    for row in placement_rows():
        print(row)
    topics = [f"tenant-{i % 97:02d}/device-{i:08d}/telemetry/".ljust(40, "x") for i in range(TOPIC_COUNT)]
    shard_map = ShardMap.build(members(10), S, R)
    ring = HashRing(nodes=list(members(10)))
    # Best of 3 on each side so a scheduler hiccup does not decide the ratio.
    ours = max(lookups_per_second(shard_map.owners_of_key, topics) for _ in range(3))
    theirs = max(lookups_per_second(ring.get_node, topics) for _ in range(3))
    print(f"\nlookups ({TOPIC_COUNT} x 40-byte topics, 10 nodes):")
    print(f"  ShardMap.owners_of_key {ours:>12,.0f}/s")
    print(f"  HashRing.get_node      {theirs:>12,.0f}/s")
    print(f"  ratio                  {ours / theirs:>12.1f}x")


if __name__ == "__main__":
    main()
