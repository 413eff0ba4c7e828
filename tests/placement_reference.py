"""The dense placement that ``shardmq.ring.placement`` replaced, kept verbatim as the test oracle.

``reference_place`` is the implementation before the lazy ring walk (commit 5bf90f1): an S x N distance
matrix, a full sort per shard and a scan of every node per held shard in every balancing round. It is
O(S * N) and far too slow past a few hundred nodes, but obviously a function of the balancing rules, so
``tests/test_ring.py`` checks that ``place`` returns exactly its table. Do not "fix" or speed it up.
"""

from __future__ import annotations

import math
from bisect import bisect_right
from collections.abc import Mapping
from fractions import Fraction

from uhashring import HashRing

from shardmq.ring.hashing import stable_hash64

__all__ = ["reference_place"]

# 1280 rather than uhashring's 160: a finer ring needs smaller price corrections,
# and smaller corrections move fewer shards on join/leave (measured: the worst
# join over 16 naming schemes, N=2..12, R=1..3 fell from 1.15x to 1.08x ideal).
VNODES_PER_WEIGHT = 1280
BALANCE_SLACK = Fraction(105, 100)
_RING_SIZE = 1 << 64
# Bounds the rounds of each balancing phase: min(_MAX_ROUNDS_PER_NODE * N, _MAX_ROUNDS). Hitting it leaves
# a valid (still deterministic) table that is merely less balanced. (Same bound as shardmq.ring.placement.)
_MAX_ROUNDS_PER_NODE = 200
_MAX_ROUNDS = 5_000


def reference_place(members: Mapping[str, int], shard_count: int, replication: int) -> tuple[tuple[str, ...], ...]:
    """Return the owner tuple of every shard, indexed by shard id."""
    ids = sorted(members)
    # Only weight ratios matter; dividing by the gcd keeps the ring (and build time) small.
    divisor = math.gcd(*members.values())
    weights = [members[i] // divisor for i in ids]
    dist = _ring_distances(ids, weights, shard_count)
    r_eff = min(replication, len(ids))
    n = len(ids)
    if r_eff == n:
        # Every node owns every shard: only the choice of primary is left.
        owner_sets = [list(range(n)) for _ in range(shard_count)]
        replica_price = [1.0] * n
    else:
        caps = _capacities(weights, shard_count * r_eff, limit=shard_count)
        replica_price = _balance_replicas(dist, r_eff, caps)
        owner_sets = [_top(row, replica_price, r_eff) for row in dist]
    primaries = _balance_primaries(dist, owner_sets, replica_price, _capacities(weights, shard_count))
    table = []
    for s, owners in enumerate(owner_sets):
        row = dist[s]
        rest = sorted((o for o in owners if o != primaries[s]), key=lambda k: (row[k] * replica_price[k], k))
        table.append(tuple(ids[k] for k in [primaries[s], *rest]))
    return tuple(table)


def _ring_distances(ids: list[str], weights: list[int], shard_count: int) -> list[list[float]]:
    ring = HashRing(
        nodes={i: {"weight": w, "vnodes": VNODES_PER_WEIGHT} for i, w in zip(ids, weights, strict=True)},
        hash_fn=stable_hash64,
    )
    points: dict[str, list[int]] = {i: [] for i in ids}
    for pos, node in ring.get_points():
        points[node].append(pos)
    dist = [[0.0] * len(ids) for _ in range(shard_count)]
    for k, node_id in enumerate(ids):
        pts = points[node_id]
        first = pts[0]
        count = len(pts)
        for s in range(shard_count):
            pos = s * _RING_SIZE // shard_count
            i = bisect_right(pts, pos)
            # Past the last point the walk wraps to the first; uhashring does the same.
            gap = pts[i] - pos if i < count else first + _RING_SIZE - pos
            dist[s][k] = float(gap)
    return dist


def _capacities(weights: list[int], total: int, limit: int | None = None) -> list[int]:
    quotas = [Fraction(0)] * len(weights)
    open_nodes = set(range(len(weights)))
    remaining = Fraction(total)
    # Water-filling: a node whose share exceeds `limit` is pinned there and the
    # rest is spread over the others, so the quotas stay feasible.
    while open_nodes:
        weight_sum = sum(weights[k] for k in open_nodes)
        pinned = {k for k in open_nodes if limit is not None and remaining * weights[k] / weight_sum > limit}
        if not pinned:
            for k in open_nodes:
                quotas[k] = remaining * weights[k] / weight_sum
            break
        for k in pinned:
            quotas[k] = Fraction(limit or 0)
            remaining -= quotas[k]
        open_nodes -= pinned
    caps = [max(math.ceil(q), math.floor(q * BALANCE_SLACK)) for q in quotas]
    return [min(c, limit) for c in caps] if limit is not None else caps


def _top(row: list[float], price: list[float], count: int) -> list[int]:
    return sorted(range(len(row)), key=lambda k: (row[k] * price[k], k))[:count]


def _raise_price(thresholds: list[tuple[float, int]], excess: int) -> tuple[float, list[int]]:
    """Return the new price and the shards that leave: the ``excess`` cheapest to displace."""
    thresholds.sort()
    finite = [t for t in thresholds if t[0] != math.inf]
    leaving = finite[:excess]
    if not leaving:
        return math.inf, []
    low = leaving[-1][0]
    high = finite[len(leaving)][0] if len(leaving) < len(finite) else low * 2.0
    return (low + high) / 2.0, [s for _, s in leaving]


def _balance_replicas(dist: list[list[float]], r_eff: int, caps: list[int]) -> list[float]:
    n = len(caps)
    price = [1.0] * n
    owners = [set(_top(row, price, r_eff)) for row in dist]
    held: list[set[int]] = [set() for _ in range(n)]
    for s, own in enumerate(owners):
        for k in own:
            held[k].add(s)
    for _ in range(min(_MAX_ROUNDS_PER_NODE * n, _MAX_ROUNDS)):
        over = [k for k in range(n) if len(held[k]) > caps[k]]
        if not over:
            break
        node = max(over, key=lambda k: (len(held[k]) - caps[k], -k))
        thresholds = []
        best_outside: dict[int, int] = {}
        for s in held[node]:
            row = dist[s]
            own = owners[s]
            alt = min((k for k in range(n) if k not in own), key=lambda k: (row[k] * price[k], k))
            best_outside[s] = alt
            thresholds.append((row[alt] * price[alt] / row[node], s))
        new_price, leaving = _raise_price(thresholds, len(held[node]) - caps[node])
        if not leaving:
            break
        price[node] = new_price
        for s in leaving:
            alt = best_outside[s]
            owners[s].discard(node)
            owners[s].add(alt)
            held[node].discard(s)
            held[alt].add(s)
    return price


def _balance_primaries(
    dist: list[list[float]], owner_sets: list[list[int]], start: list[float], caps: list[int]
) -> list[int]:
    n = len(caps)
    price = list(start)

    def pick(s: int) -> int:
        row = dist[s]
        return min(owner_sets[s], key=lambda k: (row[k] * price[k], k))

    primary = [pick(s) for s in range(len(dist))]
    led: list[set[int]] = [set() for _ in range(n)]
    for s, p in enumerate(primary):
        led[p].add(s)
    stuck: set[int] = set()
    for _ in range(min(_MAX_ROUNDS_PER_NODE * n, _MAX_ROUNDS)):
        over = [k for k in range(n) if len(led[k]) > caps[k] and k not in stuck]
        if not over:
            break
        node = max(over, key=lambda k: (len(led[k]) - caps[k], -k))
        thresholds = []
        next_best: dict[int, int] = {}
        for s in led[node]:
            row = dist[s]
            others = [k for k in owner_sets[s] if k != node]
            if not others:
                thresholds.append((math.inf, s))
                continue
            alt = min(others, key=lambda k: (row[k] * price[k], k))
            next_best[s] = alt
            thresholds.append((row[alt] * price[alt] / row[node], s))
        new_price, leaving = _raise_price(thresholds, len(led[node]) - caps[node])
        if not leaving:
            # Every shard this node leads has no other owner: nothing can move.
            stuck.add(node)
            continue
        price[node] = new_price
        for s in leaving:
            alt = next_best[s]
            led[node].discard(s)
            led[alt].add(s)
            primary[s] = alt
    return primary
