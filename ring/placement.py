"""Deterministic, balanced shard placement over a consistent-hash ring.

Rules and invariants:

* ``place`` is a pure function of (members and their weights, shard_count,
  replication). Member ids are sorted before use and the ring is hashed with
  ``stable_hash64``, so dict insertion order, process and host never matter.
  The caches below only memoize; no result depends on them. The cyclic garbage collector is paused while it
  runs (its rounds make no cycles).
* The ring is uhashring's ``HashRing(nodes={id: {"weight": w, "vnodes":
  VNODES_PER_WEIGHT}}, hash_fn=stable_hash64)``, reproduced here (the tests
  compare it point for point): weights are first divided by their gcd (build
  time grows with the reduced weight sum, so keep weights small integers), and
  node ``id`` has the points ``stable_hash64(f"{id}-{j}")`` for
  ``j < VNODES_PER_WEIGHT * w``. A point two nodes hash to belongs to the later
  id in sorted order (uhashring's last writer). Shard ``s`` sits at the evenly
  spaced position ``s * 2**64 // S``; its distance ``d(s, n)`` to node ``n``
  is how far clockwise (wrapping past ``2**64``) the first point of ``n``
  strictly after that position lies, as a float. Walking the ring clockwise
  from a shard visits the nodes in non-decreasing ``d``: that walk is
  uhashring's ``iterate_nodes``, and its first node is what
  ``HashRing.get_node`` would answer.
* Balance is enforced with one price per node (``m`` for replicas, ``q`` for
  primaries), starting at 1. A shard's owners are the ``R_eff = min(R, N)``
  nodes with the smallest ``(d * m, node index)``; its primary is the owner
  with the smallest ``(d * q, node index)``. Only a node above its capacity
  has its price raised, and just far enough to shed its excess, in rounds
  that ``_settle`` states exactly (with how it avoids rescanning every shard
  each round), so the final table is a function of the prices alone. A
  membership change perturbs prices a little instead of reshuffling a
  processing order, which is what keeps movement near ideal.
* Distances are computed lazily and exactly. Each shard keeps the nodes its
  walk has visited so far (in ``d`` order) and walks on only when an answer
  needs it: a node not visited yet is at least as far as the last one visited
  and no price is below ``min(price)``, so its ``d * price`` is at least
  ``last_d * min(price)`` (float products are monotone). "The ``c`` cheapest
  nodes" and "the cheapest node outside the owners" are decided, with the
  ``(product, index)`` order above, once the answer's product is strictly
  below that bound or every node has been visited. The result is the one the
  full S x N distance matrix gives (``tests/placement_reference.py``).
* Rings are cached (thread-safely): the last ``_RING_CACHE_SIZE`` merged
  rings, and the sorted points of up to ``_NODE_CACHE_SIZE`` (id, point count)
  pairs. A new
  member set is derived from the closest cached ring by removing and inserting
  only the changed nodes' points, so a rebuild after one member joins or
  leaves hashes ``VNODES_PER_WEIGHT * w`` keys, not the whole ring.
* Capacity of node ``n`` for a total ``T`` is ``max(ceil(t), floor(1.05 t))``
  with ``t = T * w_n / W`` (replica quotas are water-filled so no node is asked
  for more than one replica of each shard). Hence, whenever ``t >= 20`` and the
  rounds end before their bound, every node ends at most 5 % above its
  weighted fair share.
* Every shard's owner tuple is non-empty, distinct, primary first, the rest in
  ring-price order.
"""

from __future__ import annotations

import gc
import math
import threading
from array import array
from bisect import bisect_left, bisect_right
from collections.abc import Callable, Mapping, Sequence
from fractions import Fraction
from functools import lru_cache
from heapq import heapify, heappop, heappush, heapreplace

from xxhash import xxh3_64_intdigest

__all__ = ["BALANCE_SLACK", "VNODES_PER_WEIGHT", "place"]

# 1280 rather than uhashring's 160: a finer ring needs smaller price corrections,
# and smaller corrections move fewer shards on join/leave (measured: the worst
# join over 16 naming schemes, N=2..12, R=1..3 fell from 1.15x to 1.08x ideal).
VNODES_PER_WEIGHT = 1280
BALANCE_SLACK = Fraction(105, 100)
_RING_SIZE = 1 << 64
_INF = math.inf
# Bound the rounds of each balancing phase: min(_MAX_ROUNDS_PER_NODE * N, _MAX_ROUNDS). With a dozen nodes
# they number a few dozen; from a few hundred nodes on, the last excess can circle among a few full nodes until
# the bound ends it (see _settle). Hitting it leaves a valid, still deterministic table that is merely less
# balanced. _MAX_ROUNDS caps what those circling rounds cost: at N = 1,000, S = 16,384, R = 2, the rounds past
# 5,000 (of 200,000) changed any node's load by at most three shards and the largest loads by at most one (better
# once, worse once) and took 60-85% of place()'s time (`python -m shardmq.loadtest.ring_figures --round-cap`).
_MAX_ROUNDS_PER_NODE = 200
_MAX_ROUNDS = 5_000
# Merged rings kept to derive the next one from: 12 bytes per point, ~15 MB
# for 1,000 nodes of weight 1.
_RING_CACHE_SIZE = 2
# Sorted points of this many (node id, point count) pairs: ~50 KB per weight unit.
_NODE_CACHE_SIZE = 2048


def place(members: Mapping[str, int], shard_count: int, replication: int) -> tuple[tuple[str, ...], ...]:
    """Return the owner tuple of every shard, indexed by shard id."""
    # The balancing rounds allocate millions of short-lived tuples and make no reference cycles: with the cyclic
    # collector on, they pushed a large process (the 1,000-node simulation) into full collections of its whole
    # heap, about one per call. Reference counting frees all of it.
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _place(members, shard_count, replication)
    finally:
        if collecting:
            gc.enable()


def _place(members: Mapping[str, int], shard_count: int, replication: int) -> tuple[tuple[str, ...], ...]:
    ids = sorted(members)
    # Only weight ratios matter; dividing by the gcd keeps the ring (and build time) small.
    divisor = math.gcd(*members.values())
    weights = [members[i] // divisor for i in ids]
    n = len(ids)
    r_eff = min(replication, n)
    walk = _Walk(_ring(ids, weights), ids, shard_count, r_eff + 1)
    if r_eff == n:
        # Every node owns every shard: only the choice of primary is left.
        replica_price = [1.0] * n
        # The walks took every node already; owners in ring-price order (every price is 1).
        owner_sets = [sorted(c, key=lambda k, c=c: (c[k], k)) for c in walk.cand]
    else:
        caps = _capacities(weights, shard_count * r_eff, limit=shard_count)
        replica_price = _balance_replicas(walk, r_eff, caps)
        walk.low = min(replica_price)
        top = walk.top
        owner_sets = [top(s, replica_price, r_eff) for s in range(shard_count)]
    # Owner lists are in (d * m, index) order, so the rest of a row keeps that order.
    primaries = _balance_primaries(walk.cand, owner_sets, replica_price, _capacities(weights, shard_count))
    table = []
    for owners, primary in zip(owner_sets, primaries, strict=True):
        if primary == owners[0]:
            table.append(tuple([ids[k] for k in owners]))
        else:
            table.append((ids[primary], *[ids[k] for k in owners if k != primary]))
    return tuple(table)


# --- the ring -------------------------------------------------------------------------------


@lru_cache(maxsize=_NODE_CACHE_SIZE)
def _node_points(node_id: str, count: int) -> array:
    """The sorted ring points of one node: ``stable_hash64(f"{node_id}-{j}")`` for ``j < count``."""
    # stable_hash64 inlined (xxh3-64 of the UTF-8 bytes): this runs VNODES_PER_WEIGHT times per weight unit.
    return array("Q", sorted([xxh3_64_intdigest(f"{node_id}-{j}".encode()) for j in range(count)]))


class _Ring:
    """A merged ring, immutable once built.

    ``points`` is sorted and ``slots[i]`` names the node of ``points[i]`` through ``slot_ids``. Equal points
    (hash collisions, even within one node) are all kept, the later id first: only the first entry of a run
    of equal points is on uhashring's ring, the others wait there in case that node leaves.
    """

    __slots__ = ("counts", "points", "slot_ids", "slot_of", "slots")

    def __init__(self, counts: dict[str, int], points: array, slots: array, slot_ids: list[str | None]) -> None:
        self.counts = counts
        self.points = points
        self.slots = slots
        self.slot_ids = slot_ids
        self.slot_of = {node_id: slot for slot, node_id in enumerate(slot_ids) if node_id is not None}


_rings: list[_Ring] = []  # most recently used first
_rings_lock = threading.Lock()


def _ring(ids: list[str], weights: list[int]) -> _Ring:
    counts = {node_id: VNODES_PER_WEIGHT * w for node_id, w in zip(ids, weights, strict=True)}
    closest: tuple[int, _Ring] | None = None
    with _rings_lock:
        for cached in _rings:
            if cached.counts == counts:
                _rings.remove(cached)
                _rings.insert(0, cached)
                return cached
            changed = sum(c for i, c in cached.counts.items() if counts.get(i) != c)
            changed += sum(c for i, c in counts.items() if cached.counts.get(i) != c)
            if closest is None or changed < closest[0]:
                closest = (changed, cached)
    if closest is not None and closest[0] <= sum(counts.values()) // 2:
        ring = _derive(closest[1], counts)
    else:
        ring = _build(counts)
    with _rings_lock:
        _rings.insert(0, ring)
        del _rings[_RING_CACHE_SIZE:]
    return ring


def _build(counts: dict[str, int]) -> _Ring:
    ids = sorted(counts)
    points: list[int] = []
    slots: list[int] = []
    # Later ids first: the stable sort then keeps a shared point's owner (the later id) first.
    for slot in range(len(ids) - 1, -1, -1):
        pts = _node_points(ids[slot], counts[ids[slot]])
        points.extend(pts)
        slots.extend([slot] * len(pts))
    order = sorted(range(len(points)), key=points.__getitem__)
    return _Ring(counts, array("Q", [points[i] for i in order]), array("I", [slots[i] for i in order]), ids)


def _derive(base: _Ring, counts: dict[str, int]) -> _Ring:
    """``base`` less the points of nodes gone (or reweighted), plus those of nodes new (or reweighted)."""
    points, slots = base.points, base.slots
    slot_ids = list(base.slot_ids)
    gone = [i for i, c in base.counts.items() if counts.get(i) != c]
    if gone:
        drop: set[int] = set()
        for node_id in gone:
            slot = base.slot_of[node_id]
            for p in _node_points(node_id, base.counts[node_id]):
                i = bisect_left(points, p)
                while slots[i] != slot or i in drop:  # runs of equal points: find this node's entry
                    i += 1
                drop.add(i)
            slot_ids[slot] = None
        points, slots = _without(points, slots, sorted(drop))
    new = sorted(i for i, c in counts.items() if base.counts.get(i) != c)
    if new:
        free = [slot for slot, node_id in enumerate(slot_ids) if node_id is None]
        free.reverse()
        entries: list[tuple[int, int]] = []
        for node_id in reversed(new):  # later ids first, as in _build
            if free:
                slot = free.pop()
                slot_ids[slot] = node_id
            else:
                slot = len(slot_ids)
                slot_ids.append(node_id)
            entries.extend((p, slot) for p in _node_points(node_id, counts[node_id]))
        entries.sort(key=lambda e: e[0])  # stable: a point shared by new nodes keeps the later id first
        points, slots = _with(points, slots, entries, slot_ids)
    return _Ring(counts, points, slots, slot_ids)


def _without(points: array, slots: array, drop: list[int]) -> tuple[array, array]:
    new_points, new_slots = array("Q"), array("I")
    bytes_p, bytes_s = memoryview(points).cast("B"), memoryview(slots).cast("B")
    size_p, size_s = points.itemsize, slots.itemsize
    start = 0
    for i in drop:
        new_points.frombytes(bytes_p[size_p * start : size_p * i])
        new_slots.frombytes(bytes_s[size_s * start : size_s * i])
        start = i + 1
    new_points.frombytes(bytes_p[size_p * start :])
    new_slots.frombytes(bytes_s[size_s * start :])
    return new_points, new_slots


def _with(
    points: array, slots: array, entries: list[tuple[int, int]], slot_ids: list[str | None]
) -> tuple[array, array]:
    new_points, new_slots = array("Q"), array("I")
    bytes_p, bytes_s = memoryview(points).cast("B"), memoryview(slots).cast("B")
    size_p, size_s = points.itemsize, slots.itemsize
    start = 0
    for p, slot in entries:
        i = bisect_left(points, p)
        # In a run of equal points the later id comes first: go past the entries of later ids.
        while i < len(points) and points[i] == p and slot_ids[slots[i]] > slot_ids[slot]:  # type: ignore[operator]
            i += 1
        i = max(i, start)
        new_points.frombytes(bytes_p[size_p * start : size_p * i])
        new_slots.frombytes(bytes_s[size_s * start : size_s * i])
        new_points.append(p)
        new_slots.append(slot)
        start = i
    new_points.frombytes(bytes_p[size_p * start :])
    new_slots.frombytes(bytes_s[size_s * start :])
    return new_points, new_slots


# --- the lazy walk ----------------------------------------------------------------------------


class _Walk:
    """Per shard, the nodes visited so far clockwise from its position, with their distances.

    ``cand[s]`` maps node index -> ``d(s, node)`` in visiting (non-decreasing ``d``) order; ``last[s]`` is the
    distance of the last node visited, a lower bound for every node not visited yet, or inf once all are.
    ``low`` must be at most every price that ``top`` and ``cheapest_outside`` are called with.
    """

    def __init__(self, ring: _Ring, ids: list[str], shard_count: int, want: int) -> None:
        self.n = n = len(ids)
        self.low = 1.0
        self.points = points = ring.points
        self.slots = slots = ring.slots
        index = {node_id: k for k, node_id in enumerate(ids)}
        self.node_of = node_of = [-1 if node_id is None else index[node_id] for node_id in ring.slot_ids]
        self.size = size = len(points)
        self.pos = pos = [s * _RING_SIZE // shard_count for s in range(shard_count)]
        self.start = start = [bisect_right(points, p) for p in pos]
        self.cand = cand = []
        self.last = last = []
        self.cursor = cursor = []
        want = min(want, n)
        # The first `want` nodes of every walk: what _top needs with all prices at 1, in most cases.
        for s in range(shard_count):
            c: dict[int, float] = {}
            i = start[s]
            here = pos[s]
            j = 0
            d = 0.0
            while j < size:
                if i == size:
                    i = 0
                    here -= _RING_SIZE
                p = points[i]
                j += 1
                if i and points[i - 1] == p:  # not the first of a run of equal points: not on the ring
                    i += 1
                    continue
                k = node_of[slots[i]]
                i += 1
                if k not in c:
                    d = float(p - here)
                    c[k] = d
                    if len(c) == want:
                        break
            cand.append(c)
            last.append(d if len(c) < n else _INF)
            cursor.append(j)

    def extend(self, s: int) -> None:
        """Visit the next node clockwise from shard ``s`` that is not a candidate yet."""
        points, slots, node_of, size = self.points, self.slots, self.node_of, self.size
        c = self.cand[s]
        j = self.cursor[s]
        i = self.start[s] + j
        here = self.pos[s]
        if i >= size:
            i -= size
            here -= _RING_SIZE
        while j < size:
            if i == size:
                i = 0
                here -= _RING_SIZE
            p = points[i]
            j += 1
            if i and points[i - 1] == p:
                i += 1
                continue
            k = node_of[slots[i]]
            i += 1
            if k not in c:
                d = float(p - here)
                c[k] = d
                self.cursor[s] = j
                self.last[s] = d if len(c) < self.n else _INF
                return
        self.cursor[s] = j
        self.last[s] = _INF

    def top(self, s: int, price: list[float], count: int) -> list[int]:
        """The ``count`` nodes with the smallest ``(d * price, index)``, in that order."""
        c = self.cand[s]
        while True:
            if len(c) > count:
                best = sorted([(d * price[k], k) for k, d in c.items()])
                if best[count - 1][0] < self.last[s] * self.low:
                    return [k for _, k in best[:count]]
            if self.last[s] == _INF:
                return [k for _, k in sorted([(d * price[k], k) for k, d in c.items()])[:count]]
            self.extend(s)

    def cheapest_outside(self, owners: list[set[int]], price: list[float], s: int) -> tuple[int, float]:
        """The node outside ``owners[s]`` with the smallest ``(d * price, index)``, and its ``d * price``."""
        c = self.cand[s]
        own = owners[s]
        n = self.n
        while True:
            best_k = n
            best = _INF
            for k, d in c.items():
                if k in own:
                    continue
                v = d * price[k]
                if v < best or (v == best and k < best_k):
                    best = v
                    best_k = k
            if best_k < n and (best < self.last[s] * self.low or self.last[s] == _INF):
                return best_k, best
            self.extend(s)


# --- balancing --------------------------------------------------------------------------------


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


def _balance_replicas(walk: _Walk, r_eff: int, caps: list[int]) -> list[float]:
    n = len(caps)
    price = [1.0] * n
    top = walk.top
    owners = [set(top(s, price, r_eff)) for s in range(len(walk.cand))]
    held: list[set[int]] = [set() for _ in range(n)]
    for s, own in enumerate(owners):
        for k in own:
            held[k].add(s)
    cand, last, extend = walk.cand, walk.last, walk.extend

    def cheapest_outside(s: int) -> tuple[int, float]:
        # walk.cheapest_outside(owners, price, s), inlined: this runs about once per round.
        c = cand[s]
        own = owners[s]
        while True:
            best_k = n
            best = _INF
            for k, d in c.items():
                if k in own:
                    continue
                v = d * price[k]
                if v < best or (v == best and k < best_k):
                    best = v
                    best_k = k
            if best_k < n and (best < last[s] * walk.low or last[s] == _INF):
                return best_k, best
            extend(s)

    _settle(held, caps, price, cand, cheapest_outside, owners, None, walk)
    return price


def _balance_primaries(
    cand: list[dict[int, float]], owner_sets: list[list[int]], start: list[float], caps: list[int]
) -> list[int]:
    n = len(caps)
    price = list(start)
    # The cheapest owner at the starting prices is the first of each (d * start, index)-ordered list.
    primary = [owners[0] for owners in owner_sets]
    if len(owner_sets[0]) == 1:
        # No shard has another owner: a round could only set its node aside, changing nothing.
        return primary
    led: list[set[int]] = [set() for _ in range(n)]
    for s, p in enumerate(primary):
        led[p].add(s)

    def cheapest_other(s: int) -> tuple[int, float]:
        row = cand[s]
        lead = primary[s]
        best_k = n
        best = _INF
        for k in owner_sets[s]:
            if k == lead:
                continue
            v = row[k] * price[k]
            if v < best or (v == best and k < best_k):
                best = v
                best_k = k
        return best_k, best

    _settle(led, caps, price, cand, cheapest_other, None, primary, None)
    return primary


@lru_cache(maxsize=8)
def _mixers(count: int) -> tuple[int, ...]:
    """Fixed pseudo-random multipliers for the state fingerprints in _settle."""
    return tuple(hash((i, 0x5EED)) | 1 for i in range(count))


def _settle(
    load: list[set[int]],
    caps: list[int],
    price: list[float],
    dist: list[dict[int, float]],
    cheapest: Callable[[int], tuple[int, float]],
    owners: list[set[int]] | None,
    primary: list[int] | None,
    walk: _Walk | None,
) -> None:
    """Raise prices round by round until no node is over capacity; ``load``, ``price`` and the owners change.

    A round: take the node over capacity with the largest ``(excess, -index)``. Every shard ``s`` it
    carries has the threshold ``cost(s) / d(s, node)``, where ``cost(s)`` is the ``d * price`` of the
    shard's alternative: for replicas (``owners`` given) the cheapest node outside the owners, for
    primaries (``primary`` given) the cheapest other owner, in ``(product, index)`` order. With the
    finite thresholds sorted by ``(threshold, shard)``, the first ``excess`` shards move to their
    alternative and the node's price becomes the midpoint of the last moving threshold and the next finite
    one (twice the last if none). A node that can shed nothing ends the replica rounds and is set aside
    in the primary rounds. At most ``min(_MAX_ROUNDS_PER_NODE * N, _MAX_ROUNDS)`` rounds, setting a node
    aside counting as one. (This is the dense loop of ``tests/placement_reference.py``, and the result is the same.)

    How it is done without touching every shard in every round:

    * Each node keeps its thresholds in a heap, built the first time it is the busiest. Prices only rise,
      so a stored threshold stays a lower bound of the current one until its shard's holders change
      (then ``ver[s]`` moves on and the entry is dropped). ``cost(s)`` is cached with the price of its
      alternative and recomputed, with the lazy walk, once that price moved. So making the top of the
      heap exact until it stays on top yields the ``excess + 1`` smallest thresholds, exactly and in
      order. Should a price ever go down (float rounding could, in principle), all caches are dropped.
    * Everything later rounds do depends only on (prices, loads, nodes set aside). At a thousand nodes
      the last excess can pass round and round within a few full nodes until the round bound, the
      prices converging; once the midpoints stop moving the float prices, the same states come back
      forever. Prices never go down, so a state can only come back within a run of rounds that changed
      no price and set no node aside: there the loads are fingerprinted, and a repeated state (its
      fingerprint seen before in the run, then confirmed by comparing whole states one period later)
      means every later period ends in that same state too, so the remaining whole periods are skipped.
    """
    n = len(caps)
    shard_count = len(dist)
    limit = min(_MAX_ROUNDS_PER_NODE * n, _MAX_ROUNDS)
    inf = _INF
    stuck: set[int] | None = None if owners is not None else set()
    ver = [0] * shard_count
    alt_of = [-1] * shard_count  # -1: not computed for the current holders
    alt_price = [0.0] * shard_count
    alt_cost = [0.0] * shard_count
    heaps: list[list[tuple[float, int, int, float]] | None] = [None] * n
    # The busiest node: (spare, index) with spare = cap - load < 0; stale entries are skipped.
    busiest = [(caps[k] - len(held), k) for k, held in enumerate(load) if len(held) > caps[k]]
    heapify(busiest)

    def cost(s: int) -> float:
        a = alt_of[s]
        if a < 0 or price[a] != alt_price[s]:
            a, c = cheapest(s)
            alt_of[s] = a
            alt_price[s] = price[a]
            alt_cost[s] = c
            return c
        return alt_cost[s]

    # Within a run of rounds that changed no price: the fingerprint of the loads, relative to the run's
    # start, is the sum of mix_shard[s] * mix_node[k] over (shard s, node k) in load[k].
    mix_node = _mixers(n)
    mix_shard = _mixers(shard_count)
    fingerprint = 0
    seen: dict[int, int] | None = {}
    check_at = -1
    period = 0
    check_state: tuple[object, ...] = ()
    changed = True
    rounds = 0
    while rounds < limit:
        rounds += 1
        while busiest:
            spare, node = busiest[0]
            if caps[node] - len(load[node]) == spare and (stuck is None or node not in stuck):
                break
            heappop(busiest)
        else:
            break
        excess = -spare
        h = heaps[node]
        if h is None:
            h = [(cost(s) / dist[s][node], s, ver[s], alt_cost[s]) for s in load[node]]
            heapify(h)
            heaps[node] = h
        # The excess smallest thresholds, exact and popped, then the next one (it stays in the heap).
        leaving = []
        after = None
        while h:
            # exact_top(h, node), inlined: this is most of a round's work.
            e = h[0]
            s = e[1]
            if e[2] != ver[s]:
                heappop(h)
                continue
            a = alt_of[s]
            if a >= 0 and price[a] == alt_price[s]:
                exact = alt_cost[s]
            else:
                a, exact = cheapest(s)
                alt_of[s] = a
                alt_price[s] = price[a]
                alt_cost[s] = exact
            if exact != e[3]:
                heapreplace(h, (exact / dist[s][node], s, e[2], exact))
                continue
            if len(leaving) == excess:
                after = e
                break
            leaving.append(heappop(h))
        while leaving and leaving[-1][0] == inf:
            # Only with a price grown to inf, or no alternative at all: such a shard stays.
            heappush(h, leaving.pop())
            after = None
        if not leaving:
            if stuck is None:
                break
            # Every shard this node leads has no other owner: nothing can move.
            stuck.add(node)
            changed = True
        else:
            bottom = leaving[-1][0]
            high = after[0] if after is not None and after[0] != inf else bottom * 2.0
            new_price = (bottom + high) / 2.0
            old_price = price[node]
            price[node] = new_price
            if new_price != old_price:
                changed = True
            if len(leaving) == 1:  # the usual round: no comprehension to run
                s = leaving[0][1]
                moves: Sequence[tuple[int, int]] = ((s, alt_of[s]),)
            else:
                moves = [(e[1], alt_of[e[1]]) for e in leaving]
            if new_price < old_price:
                # Stored thresholds may no longer be lower bounds: start the caches afresh.
                alt_of[:] = [-1] * shard_count
                heaps = [None] * n
                if walk is not None:
                    walk.low = min(walk.low, new_price)
            load_node = load[node]
            for s, alt in moves:
                load_node.discard(s)
                load_alt = load[alt]
                load_alt.add(s)
                if not changed:
                    fingerprint += mix_shard[s] * (mix_node[alt] - mix_node[node])
                v = ver[s] = ver[s] + 1
                if owners is not None:
                    holders = owners[s]
                    holders.discard(node)
                    holders.add(alt)
                else:
                    primary[s] = alt  # type: ignore[index]
                    holders = (alt,)
                # cost(s) for the new holders, inlined and computed at most once: this runs every round.
                alt_of[s] = -1
                c = 0.0
                known = False
                row = dist[s]
                for o in holders:
                    ho = heaps[o]
                    if ho is not None:
                        if not known:
                            known = True
                            a, c = cheapest(s)
                            alt_of[s] = a
                            alt_price[s] = price[a]
                            alt_cost[s] = c
                        heappush(ho, (c / row[o], s, v, c))
                spare = caps[alt] - len(load_alt)
                if spare < 0:
                    heappush(busiest, (spare, alt))
            spare = caps[node] - len(load_node)
            if spare < 0:
                heappush(busiest, (spare, node))
        if seen is None:
            continue
        if changed:
            # No earlier state can come back: start a new run from this one.
            changed = False
            fingerprint = 0
            if len(seen) > 1:
                seen = {}
            seen[0] = rounds
            check_at = -1
        else:
            if rounds == check_at:
                if (tuple(price), [frozenset(x) for x in load], frozenset(stuck or ())) == check_state:
                    # The state one period on is the same: so is every state a whole period later.
                    rounds += (limit - rounds) // period * period
                    seen = None
                    continue
                check_at = -1
            elif check_at < 0 and fingerprint in seen:
                period = rounds - seen[fingerprint]
                check_at = rounds + period
                check_state = (tuple(price), [frozenset(x) for x in load], frozenset(stuck or ()))
            seen[fingerprint] = rounds
