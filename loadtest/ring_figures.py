"""Print the ShardMap balance, movement and lookup figures next to raw uhashring.

Rules: everything printed is measured in this run (no cached numbers); the
workload is deterministic (fixed node names and topics), so only the timing
columns vary between runs. Run ``python -m shardmq.loadtest.ring_figures``.

``--scale`` prints instead how long ``place()`` takes from 3 to 1,000 nodes:
with empty caches, again for the same members, and after one member joins
(ring cache warm), next to the dense implementation it replaced
(``tests/placement_reference.py``, run in a child process that is killed
after ``--old-timeout`` seconds).

``--round-cap`` compares, at 1,000 nodes, tables made with the balancing rounds capped at ``_MAX_ROUNDS`` and at
the per-node bound alone (``_MAX_ROUNDS_PER_NODE * N``): time, largest loads against the fair share, and how far
any node's load moved.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path

from uhashring import HashRing

from shardmq.ring import ShardMap, placement

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


SCALE_CASES = ((3, 4096, 2), (12, 4096, 3), (100, 16384, 2), (1000, 16384, 2))
REFERENCE = Path(__file__).resolve().parents[1] / "tests" / "placement_reference.py"
_OLD_RUN = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("placement_reference", sys.argv[1])
module = importlib.util.module_from_spec(spec)
spec.loader.exec_module(module)
n, s, r = map(int, sys.argv[2:5])
t0 = time.perf_counter()
module.reference_place({f"n{i}": 1 for i in range(n)}, s, r)
print(time.perf_counter() - t0)
"""


def old_seconds(n: int, s: int, r: int, timeout: float) -> float | None:
    """The dense implementation's time in a child process, or None if it ran past ``timeout``."""
    if not REFERENCE.exists():
        return None
    try:
        done = subprocess.run(
            [sys.executable, "-c", _OLD_RUN, str(REFERENCE), str(n), str(s), str(r)],
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
        )
    except subprocess.TimeoutExpired:
        return None
    return float(done.stdout)


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def scale_rows(old_timeout: float) -> list[str]:
    rows = []
    for n, s, r in SCALE_CASES:
        nodes = {f"n{i}": 1 for i in range(n)}
        placement._rings.clear()
        placement._node_points.cache_clear()
        cold = timed(lambda nodes=nodes, s=s, r=r: placement.place(nodes, s, r))
        warm = timed(lambda nodes=nodes, s=s, r=r: placement.place(nodes, s, r))
        grown = {**nodes, f"n{n}": 1}
        join = timed(lambda grown=grown, s=s, r=r: placement.place(grown, s, r))
        old = old_seconds(n, s, r, old_timeout)
        old_text = f"{old:>10.3f}" if old is not None else f"{'> ' + format(old_timeout, '.0f'):>10}"
        ratio = f"{old / warm:>8.0f}x" if old is not None else f"{'-':>9}"
        rows.append(f"{n:>5} {s:>6} {r:>2} {cold:>9.3f} {warm:>9.3f} {join:>9.3f} {old_text} {ratio}")
    return rows


def scale_main(old_timeout: float) -> None:
    print("place() seconds: new with empty caches, new again (ring cached), new after one member joins")
    print(f"(ring cached), old dense implementation (killed after {old_timeout:.0f} s); ratio = old / new again")
    print("    N      S  R      cold     again      join        old    ratio")
    for row in scale_rows(old_timeout):
        print(row)


def round_cap_main(sets: int = 4) -> None:
    """Four member sets of 1,000 nodes (n0..n999 with k leaves and joins): place() with and without the cap."""
    n, shards, replication = 1000, 16_384, 2
    member_sets = []
    for k in range(sets):
        nodes = {f"n{i}": 1 for i in range(k * 7, n)}
        nodes.update({f"x{j}": 1 for j in range(k * 7)})
        member_sets.append(nodes)
    capped = placement._MAX_ROUNDS
    uncapped = placement._MAX_ROUNDS_PER_NODE * n
    print(f"N={n} S={shards} R={replication}: rounds capped at {capped:,} against {uncapped:,}")
    print("set  capped s  uncapped s  replica max/fair (capped, uncapped)  primary max/fair  largest load moved")
    for index, nodes in enumerate(member_sets):
        results = []
        for cap in (capped, uncapped):
            placement._MAX_ROUNDS = cap
            placement.place(nodes, shards, replication)  # the ring, cached: time the rounds, not the hashing
            started = time.perf_counter()
            table = placement.place(nodes, shards, replication)
            elapsed = time.perf_counter() - started
            results.append((elapsed, Counter(o for row in table for o in row), Counter(row[0] for row in table)))
        placement._MAX_ROUNDS = capped
        (t_cap, load_cap, lead_cap), (t_un, load_un, lead_un) = results
        fair, fair_lead = shards * replication / n, shards / n
        moved = max(
            max(abs(load_cap[k] - load_un[k]) for k in nodes), max(abs(lead_cap[k] - lead_un[k]) for k in nodes)
        )
        print(f"{index:>3} {t_cap:>9.2f} {t_un:>11.2f} {max(load_cap.values()) / fair:>17.3f} "
              f"{max(load_un.values()) / fair:>8.3f} {max(lead_cap.values()) / fair_lead:>13.3f} "
              f"{max(lead_un.values()) / fair_lead:>6.3f} {moved:>10}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scale", action="store_true", help="print place() times from 3 to 1,000 nodes")
    parser.add_argument("--old-timeout", type=float, default=120.0, help="seconds the old placement may run")
    parser.add_argument("--round-cap", action="store_true", help="compare place() with and without _MAX_ROUNDS")
    args = parser.parse_args()
    if args.round_cap:
        round_cap_main()
        return
    if args.scale:
        scale_main(args.old_timeout)
        return
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
