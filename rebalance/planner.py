"""Pure rebalance planner: the moves that take the current ``Assignment`` to a target owner table.

A move is carried out in two steps. ``start_state`` records the replicas being filled (``joining``; owners and
epoch unchanged); the source streams its snapshot of the shard to them; then ``apply_flip`` makes the target
tuple the owners in one etcd transaction with ``epoch + 1``. Moves touch distinct shards, so any interleaving of
them is safe.

Rules and invariants:

* ``plan`` yields exactly one move per shard whose owner tuple differs from the target, a pure reorder (same set,
  new primary) included: it copies nothing (``add == remove == ()``) but still flips, so the epoch rises.
  Shards already at their target get no move, whatever their ``joining``.
* Minimal: ``add`` is the target owners missing from the current owners, so ``sum(len(m.add))`` equals the
  number of (shard, node) replicas in the target and not in the current table, and nothing else is copied.
* Safe: ``new_owners`` is the target, and every target node is a current owner or in ``add``; the flip happens
  only after ``add`` is filled, so at every step every owner of a shard holds its data. The ``source`` is a live
  current owner, the primary when it is live, else the first live replica. A shard with no live owner left gets
  ``source == ""``: no data survives, and the caller decides (for instance flip to an empty shard).
* Only ``live`` nodes are sources or targets: a target naming a node outside ``live`` is a ``ValueError``.
* Deterministic order: shards at risk first (a dead current owner, or fewer live owners than the target has),
  the fewest live owners first, then every other shard; ties by shard id.
* ``next_batch`` picks greedily in the given order, never a shard already in progress, keeps the number in
  flight <= ``max_concurrent``, and keeps every node in <= ``max_per_node`` fills in flight. A node takes part in
  a fill as its source or as an ``add`` target; a move with an empty ``add`` streams nothing, so it only counts
  towards ``max_concurrent``. With nothing in progress it always picks at least one move, so a loop of
  ``next_batch`` calls finishes any plan.
* Pure: no I/O, clocks, threads or randomness; imports only ``shardmq.ring``.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

from shardmq.ring import Assignment, ShardState

__all__ = ["Move", "PlanSummary", "apply_flip", "next_batch", "plan", "start_state", "summarize"]


@dataclass(frozen=True, slots=True)
class Move:
    """Take one shard from its current owners to ``new_owners``."""

    shard: int
    source: str  # a live current owner that streams its snapshot to ``add``; "" when no owner survives
    add: tuple[str, ...]  # target owners that are not current owners: the replicas to fill, in target order
    remove: tuple[str, ...]  # current owners absent from the target, in current order: they drop after the flip
    new_owners: tuple[str, ...]  # the target tuple, primary first

    def busy_nodes(self) -> tuple[str, ...]:
        """Nodes that stream data for this move: the source (if anything is copied) and every ``add`` target."""
        if not self.add:
            return ()
        return (self.source, *self.add) if self.source else self.add


@dataclass(frozen=True, slots=True)
class PlanSummary:
    """What a plan costs and what it achieves."""

    moves: int
    replica_copies: int  # sum(len(add)): shard replicas to stream
    replica_drops: int  # sum(len(remove)): replicas dropped after their flip (dead owners included)
    lost_shards: int  # moves with source == "": no live owner holds the data
    routes_to_copy: int | None  # sum(route_counts[shard] * len(add)); None without route_counts
    bytes_to_copy: int | None  # sum(route_bytes[shard] * len(add)); None without route_bytes
    load_before: dict[str, int]  # owned replicas per node now (Assignment.load())
    load_after: dict[str, int]  # owned replicas per node once every move flipped (0 for nodes left with none)
    balance_before: float  # max/mean of load_before over nodes with at least one replica (0.0 if none)
    balance_after: float  # the same for load_after


def plan(current: Assignment, target: Sequence[tuple[str, ...]], live: AbstractSet[str]) -> list[Move]:
    """Every move from ``current`` to the ``target`` owner table (e.g. ``ShardMap.build(live...).table``)."""
    if len(target) != current.shard_count:
        raise ValueError(f"target has {len(target)} shards, the assignment {current.shard_count}")
    _check_table(target, live, current.replication)
    keyed: list[tuple[tuple[int, int, int], Move]] = []
    for shard, state in enumerate(current.states):
        want = target[shard]
        have = state.owners
        if have == want:
            continue
        live_have = [n for n in have if n in live]
        add = tuple(n for n in want if n not in have)
        remove = tuple(n for n in have if n not in want)
        # The primary has every route change applied first, so it is the freshest copy to stream from.
        source = live_have[0] if live_have else ""
        at_risk = len(live_have) < len(have) or len(live_have) < len(want)
        key = (0, len(live_have), shard) if at_risk else (1, 0, shard)
        keyed.append((key, Move(shard, source, add, remove, want)))
    keyed.sort(key=lambda item: item[0])
    return [move for _, move in keyed]


_CHECKED: list[tuple[tuple[tuple[str, ...], ...], frozenset[str], int]] = []  # tables known valid, newest last


def _check_table(target: Sequence[tuple[str, ...]], live: AbstractSet[str], replication: int) -> None:
    """``_check_target`` for every shard, in order. The coordinator plans against the same target table (a cached
    one) at every step: a tuple of tuples cannot change, so one that passed for these members passes again."""
    members = frozenset(live)
    if isinstance(target, tuple):
        for table, checked_live, checked_replication in _CHECKED:
            if table is target and checked_live == members and checked_replication == replication:
                return
    for shard, want in enumerate(target):
        _check_target(shard, want, live, replication)
    if isinstance(target, tuple):
        _CHECKED.append((target, members, replication))
        del _CHECKED[:-4]


def _check_target(shard: int, want: object, live: AbstractSet[str], replication: int) -> None:
    if not isinstance(want, tuple) or not want:
        raise ValueError(f"shard {shard}: target owners must be a non-empty tuple, got {want!r}")
    if len(set(want)) != len(want):
        raise ValueError(f"shard {shard}: target owners must be distinct, got {want!r}")
    if len(want) > replication:
        raise ValueError(f"shard {shard}: {len(want)} target owners exceed replication {replication}")
    dead = [n for n in want if n not in live]
    if dead:
        raise ValueError(f"shard {shard}: target names nodes that are not live: {dead}")


def next_batch(
    moves: Sequence[Move], in_progress: Iterable[Move], max_concurrent: int, max_per_node: int
) -> list[Move]:
    """The moves to start now, in ``moves`` order, within the concurrency limits."""
    for name, value in (("max_concurrent", max_concurrent), ("max_per_node", max_per_node)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")
    running = list(in_progress)
    taken = {m.shard for m in running}
    per_node: Counter[str] = Counter()
    for m in running:
        per_node.update(m.busy_nodes())
    room = max_concurrent - len(running)
    chosen: list[Move] = []
    for move in moves:
        if room <= 0:
            break
        if move.shard in taken:
            continue
        busy = move.busy_nodes()
        # A move blocked by a busy node does not block the ones after it: they may use idle nodes.
        if any(per_node[n] >= max_per_node for n in busy):
            continue
        chosen.append(move)
        taken.add(move.shard)
        per_node.update(busy)
        room -= 1
    return chosen


def start_state(a: Assignment, move: Move) -> ShardState:
    """The state while ``move`` fills its replicas: same owners and epoch, ``joining = move.add``."""
    state = a.state(move.shard)
    if move.source and move.source not in state.owners:
        raise ValueError(f"shard {move.shard}: stale move, source {move.source!r} is not an owner")
    return ShardState(state.owners, state.epoch, move.add)


def apply_flip(a: Assignment, move: Move) -> ShardState:
    """The state after ``move``'s flip: ``owners = new_owners``, ``epoch + 1``, nobody joining."""
    state = a.state(move.shard)
    # Every new owner must already hold the data: a current owner or a replica this move filled.
    unfilled = [n for n in move.new_owners if n not in state.owners and n not in move.add]
    if unfilled:
        raise ValueError(f"shard {move.shard}: stale move, {unfilled} would own the shard without its data")
    return ShardState(move.new_owners, state.epoch + 1)


def summarize(
    current: Assignment,
    moves: Sequence[Move],
    route_counts: Mapping[int, int] | None = None,
    route_bytes: Mapping[int, int] | None = None,
) -> PlanSummary:
    """Cost of ``moves`` (copies, routes, bytes; per new replica) and replica load before and after."""
    owners = list(current.table)
    seen: set[int] = set()
    for move in moves:
        if move.shard in seen:
            raise ValueError(f"two moves for shard {move.shard}")
        current.state(move.shard)  # range check
        seen.add(move.shard)
        owners[move.shard] = move.new_owners
    before = current.load()
    after = dict.fromkeys(before, 0)
    for row in owners:
        for n in row:
            after[n] = after.get(n, 0) + 1
    after = dict(sorted(after.items()))

    def per_copy(weights: Mapping[int, int] | None) -> int | None:
        # Each new replica receives its own snapshot, so a shard's routes are sent len(add) times.
        if weights is None:
            return None
        return sum(weights.get(m.shard, 0) * len(m.add) for m in moves)

    return PlanSummary(
        moves=len(moves),
        replica_copies=sum(len(m.add) for m in moves),
        replica_drops=sum(len(m.remove) for m in moves),
        lost_shards=sum(1 for m in moves if not m.source),
        routes_to_copy=per_copy(route_counts),
        bytes_to_copy=per_copy(route_bytes),
        load_before=before,
        load_after=after,
        balance_before=_balance(before),
        balance_after=_balance(after),
    )


def _balance(load: Mapping[str, int]) -> float:
    counts = [c for c in load.values() if c > 0]
    if not counts:
        return 0.0
    return max(counts) * len(counts) / sum(counts)
