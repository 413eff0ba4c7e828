"""Tests for shardmq.rebalance.planner: plans reach the target minimally and safely, batches respect limits.

Properties are checked with hypothesis against brute-force references, and end to end over random membership
sequences placed by ShardMap.build.
"""

from __future__ import annotations

from collections import Counter
from functools import cache

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.rebalance import Move, apply_flip, next_batch, plan, start_state, summarize
from shardmq.ring import Assignment, ShardMap, ShardState, promote_survivors

POOL = ["a", "b", "c", "d", "e", "f"]


# --- strategies and references -------------------------------------------------


@st.composite
def currents(draw: st.DrawFn) -> Assignment:
    """A current assignment in any reachable shape: dead owners, empty owner tuples, joining replicas."""
    replication = draw(st.integers(1, 3))
    shard_count = draw(st.integers(1, 12))
    row = st.lists(st.sampled_from(POOL), min_size=1, max_size=replication, unique=True)
    a = Assignment.initial([tuple(draw(row)) for _ in range(shard_count)], replication)
    changes = {}
    for s in draw(st.lists(st.integers(0, shard_count - 1), unique=True)):
        owners = tuple(draw(st.lists(st.sampled_from(POOL), max_size=replication, unique=True)))
        joining = tuple(n for n in draw(st.lists(st.sampled_from(POOL), max_size=2, unique=True)) if n not in owners)
        changes[s] = ShardState(owners, a.epoch(s) + draw(st.integers(1, 3)), joining)
    return a.with_states(changes)


@st.composite
def scenarios(draw: st.DrawFn) -> tuple[Assignment, list[tuple[str, ...]], set[str]]:
    a = draw(currents())
    live = draw(st.sets(st.sampled_from(POOL), min_size=1))
    row = st.lists(st.sampled_from(sorted(live)), min_size=1, max_size=min(a.replication, len(live)), unique=True)
    target = [tuple(draw(row)) for _ in range(a.shard_count)]
    return a, target, live


def busy_reference(m: Move) -> list[str]:
    # A node streams for a move when it is the source of a move that copies something, or an add target.
    return ([m.source] if m.source and m.add else []) + list(m.add)


def apply_all(a: Assignment, moves: list[Move]) -> Assignment:
    return a.with_states({m.shard: apply_flip(a, m) for m in moves})


# --- plan ----------------------------------------------------------------------


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_plan_moves_match_reference(scenario: tuple[Assignment, list[tuple[str, ...]], set[str]]) -> None:
    a, target, live = scenario
    moves = plan(a, target, live)
    by_shard = {m.shard: m for m in moves}
    assert len(by_shard) == len(moves)
    assert set(by_shard) == {s for s in range(a.shard_count) if a.owners(s) != target[s]}
    for s, m in by_shard.items():
        have, want = a.owners(s), target[s]
        live_have = [n for n in have if n in live]
        assert m.new_owners == want
        assert m.add == tuple(n for n in want if n not in have)
        assert m.remove == tuple(n for n in have if n not in want)
        assert m.source == (live_have[0] if live_have else "")
        assert set(m.add) <= live and (m.source == "" or m.source in live)
        if set(have) == set(want):
            assert m.add == () and m.remove == ()  # a pure reorder still flips
    # Minimality: exactly the replicas the target has and the current table lacks.
    assert sum(len(m.add) for m in moves) == sum(len(set(target[s]) - set(a.owners(s))) for s in range(a.shard_count))

    # Order: at-risk shards first (fewest live owners first), then the rest, ties by shard id.
    def rank(m: Move) -> tuple[int, int, int]:
        have = a.owners(m.shard)
        n_live = sum(n in live for n in have)
        at_risk = n_live < len(have) or n_live < len(m.new_owners)
        return (0, n_live, m.shard) if at_risk else (1, 0, m.shard)

    assert [rank(m) for m in moves] == sorted(rank(m) for m in moves)
    # Deterministic, whatever the type or iteration order of `live`.
    assert plan(a, target, frozenset(sorted(live, reverse=True))) == moves
    assert plan(a, tuple(target), set(live)) == moves


@settings(max_examples=200, deadline=None)
@given(scenarios())
def test_applying_all_moves_reaches_target(scenario: tuple[Assignment, list[tuple[str, ...]], set[str]]) -> None:
    a, target, live = scenario
    moves = plan(a, target, live)
    b = apply_all(a, moves)
    assert list(b.table) == target
    for s in range(a.shard_count):
        if a.owners(s) != target[s]:
            assert b.epoch(s) == a.epoch(s) + 1
            assert b.joining(s) == ()
        else:
            assert b.state(s) == a.state(s)
    assert plan(b, target, live) == []
    assert b.version == (a.version + 1 if moves else a.version)


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.integers(1, 4), st.integers(1, 3), st.data())
def test_every_step_keeps_data_owners(
    scenario: tuple[Assignment, list[tuple[str, ...]], set[str]],
    max_concurrent: int,
    max_per_node: int,
    data: st.DataObject,
) -> None:
    a, target, live = scenario
    moves = plan(a, target, live)
    # holding[s]: nodes that hold shard s's full data. At the start, its live owners.
    holding = {s: {n for n in a.owners(s) if n in live} for s in range(a.shard_count)}
    lost = {s for s, h in holding.items() if not h}

    def check_invariant() -> None:
        for s in range(a.shard_count):
            owners = a.owners(s)
            live_owners = [n for n in owners if n in live]
            # Every live owner holds the data: never a fresh, unfilled replica serving the shard.
            assert set(live_owners) <= holding[s]
            if s not in lost:
                assert live_owners, f"shard {s} has no live owner holding data"

    pending, running = list(moves), []
    steps = 0
    while pending or running:
        steps += 1
        assert steps <= 3 * len(moves) + 2
        batch = next_batch(pending, running, max_concurrent, max_per_node)
        if not running:
            assert batch, "nothing in progress, yet no move was picked"
        for m in batch:
            a = a.with_states({m.shard: start_state(a, m)})
            assert a.joining(m.shard) == m.add
            pending.remove(m)
            running.append(m)
        check_invariant()
        m = running.pop(data.draw(st.integers(0, len(running) - 1)))
        if m.source:
            assert m.source in holding[m.shard]
        holding[m.shard] |= set(m.add)  # the hand-off filled the new replicas
        check_invariant()
        a = a.with_states({m.shard: apply_flip(a, m)})
        check_invariant()
        holding[m.shard] -= set(m.remove)  # removed replicas drop their copy only after the flip
        check_invariant()
    assert list(a.table) == target


def test_pure_reorder_and_lost_shard() -> None:
    a = Assignment.initial([("a", "b"), ("c",), ("a", "b")], 2)
    a = a.with_states(promote_survivors(a, {"a", "b"}))
    assert a.owners(1) == () and a.epoch(1) == 2
    moves = plan(a, [("b", "a"), ("a", "b"), ("a", "b")], {"a", "b"})
    assert moves == [
        Move(shard=1, source="", add=("a", "b"), remove=(), new_owners=("a", "b")),
        Move(shard=0, source="a", add=(), remove=(), new_owners=("b", "a")),
    ]
    b = apply_all(a, moves)
    assert b.table == (("b", "a"), ("a", "b"), ("a", "b"))
    assert [b.epoch(s) for s in range(3)] == [2, 3, 1]


def test_source_prefers_live_primary() -> None:
    a = Assignment.initial([("x", "y", "z"), ("x", "y", "z")], 3)
    moves = plan(a, [("y", "z", "w"), ("x", "z", "w")], {"y", "z", "w", "x"})
    assert [m.source for m in moves] == ["x", "x"]
    moves = plan(a, [("y", "z", "w"), ("w", "z")], {"y", "z", "w"})
    assert [(m.shard, m.source) for m in moves] == [(0, "y"), (1, "y")]


@pytest.mark.parametrize(
    "target, live",
    [
        ([("a",)], {"a", "b"}),  # wrong length
        ([("a",), ()], {"a", "b"}),  # empty owners
        ([("a",), ("a", "a")], {"a", "b"}),  # duplicates
        ([("a",), ("a", "b", "c")], {"a", "b", "c"}),  # above replication
        ([("a",), ("c",)], {"a", "b"}),  # not live
        ([("a",), ["b"]], {"a", "b"}),  # not a tuple
    ],
)
def test_plan_rejects_bad_target(target: list, live: set[str]) -> None:
    a = Assignment.initial([("a", "b"), ("b", "a")], 2)
    with pytest.raises(ValueError):
        plan(a, target, live)


def test_stale_moves_are_refused() -> None:
    a = Assignment.initial([("a", "b")], 2)
    (move,) = plan(a, [("b", "c")], {"a", "b", "c"})
    assert move == Move(0, "a", ("c",), ("a",), ("b", "c"))
    assert start_state(a, move) == ShardState(("a", "b"), 1, ("c",))
    assert apply_flip(a, move) == ShardState(("b", "c"), 2)
    # The shard changed under the move: c is no longer being filled from a, and d never was.
    moved = a.with_states({0: ShardState(("b",), 2)})
    with pytest.raises(ValueError, match="stale"):
        start_state(moved, move)
    assert apply_flip(moved, move) == ShardState(("b", "c"), 3)  # c was filled, b still owns: still safe
    with pytest.raises(ValueError, match="stale"):
        apply_flip(a, Move(0, "a", ("c",), ("a",), ("b", "d")))
    with pytest.raises(IndexError):
        apply_flip(a, Move(1, "a", (), (), ("a",)))


# --- next_batch ------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(scenarios(), st.integers(1, 5), st.integers(1, 3), st.data())
def test_next_batch_limits(
    scenario: tuple[Assignment, list[tuple[str, ...]], set[str]],
    max_concurrent: int,
    max_per_node: int,
    data: st.DataObject,
) -> None:
    a, target, live = scenario
    moves = plan(a, target, live)
    running = data.draw(st.lists(st.sampled_from(moves), unique_by=lambda m: m.shard)) if moves else []
    batch = next_batch(moves, running, max_concurrent, max_per_node)
    assert batch == next_batch(moves, iter(running), max_concurrent, max_per_node)  # deterministic
    running_shards = {m.shard for m in running}
    # A subsequence of `moves`, no repeated or running shard.
    positions = [moves.index(m) for m in batch]
    assert positions == sorted(set(positions))
    assert not running_shards & {m.shard for m in batch}
    assert len(running) + len(batch) <= max_concurrent or not batch
    load = Counter(n for m in [*running, *batch] for n in busy_reference(m))
    for m in batch:
        assert all(load[n] <= max_per_node for n in busy_reference(m))
    # Greedy and maximal: every move left out would break a limit.
    for m in moves:
        if m in batch or m.shard in running_shards:
            continue
        full = len(running) + len(batch) >= max_concurrent
        assert full or any(load[n] >= max_per_node for n in busy_reference(m))
    if not running and moves:
        assert batch


def test_next_batch_examples() -> None:
    moves = [
        Move(0, "a", ("b",), (), ("a", "b")),
        Move(1, "a", ("c",), (), ("a", "c")),
        Move(2, "d", ("e",), (), ("d", "e")),
        Move(3, "a", (), (), ("b", "a")),  # pure reorder: streams nothing
    ]
    assert next_batch(moves, [], 10, 1) == [moves[0], moves[2], moves[3]]
    assert next_batch(moves, [], 2, 1) == [moves[0], moves[2]]
    assert next_batch(moves, [], 10, 2) == moves
    assert next_batch(moves, [moves[0]], 10, 1) == [moves[2], moves[3]]
    assert next_batch(moves, moves[:3], 3, 5) == []
    for bad in (0, -1, True, 1.5):
        with pytest.raises(ValueError):
            next_batch(moves, [], bad, 1)  # type: ignore[arg-type]
        with pytest.raises(ValueError):
            next_batch(moves, [], 1, bad)  # type: ignore[arg-type]


# --- summarize -------------------------------------------------------------------


@settings(max_examples=150, deadline=None)
@given(scenarios(), st.data())
def test_summarize_matches_reference(
    scenario: tuple[Assignment, list[tuple[str, ...]], set[str]], data: st.DataObject
) -> None:
    a, target, live = scenario
    moves = plan(a, target, live)
    counts = data.draw(st.dictionaries(st.integers(0, a.shard_count - 1), st.integers(0, 1000)))
    sizes = data.draw(st.dictionaries(st.integers(0, a.shard_count - 1), st.integers(0, 10**6)))
    summary = summarize(a, moves, counts, sizes)
    assert summary.moves == len(moves)
    assert summary.replica_copies == sum(len(set(target[s]) - set(a.owners(s))) for s in range(a.shard_count))
    assert summary.replica_drops == sum(len(set(a.owners(s)) - set(target[s])) for s in range(a.shard_count))
    assert summary.lost_shards == sum(1 for s in range(a.shard_count) if not set(a.owners(s)) & live)
    assert summary.routes_to_copy == sum(counts.get(m.shard, 0) * len(m.add) for m in moves)
    assert summary.bytes_to_copy == sum(sizes.get(m.shard, 0) * len(m.add) for m in moves)
    assert summary.load_before == a.load()
    after = apply_all(a, moves).table
    expected_after = {n: sum(n in row for row in after) for n in set(a.load()) | {n for row in after for n in row}}
    assert summary.load_after == dict(sorted(expected_after.items()))
    used = [c for c in expected_after.values() if c]
    assert summary.balance_after == pytest.approx(max(used) / (sum(used) / len(used)))
    assert summarize(a, moves).routes_to_copy is None and summarize(a, moves).bytes_to_copy is None


def test_summarize_rejects_duplicate_shards() -> None:
    a = Assignment.initial([("a",)], 1)
    m = Move(0, "a", ("b",), ("a",), ("b",))
    with pytest.raises(ValueError):
        summarize(a, [m, m])


# --- end to end over membership changes -------------------------------------------

UNIVERSE = [f"node-{i}" for i in range(6)]
S = 64


@cache
def build(members: tuple[tuple[str, int], ...], replication: int) -> ShardMap:
    return ShardMap.build(dict(members), S, replication)


members_strategy = st.dictionaries(st.sampled_from(UNIVERSE), st.integers(1, 3), min_size=1)


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 3),
    members_strategy,
    st.lists(members_strategy, min_size=1, max_size=4),
    st.integers(1, 8),
    st.integers(1, 3),
)
def test_membership_rounds_converge_to_shard_map(
    replication: int,
    first: dict[str, int],
    rounds: list[dict[str, int]],
    max_concurrent: int,
    max_per_node: int,
) -> None:
    previous = build(tuple(sorted(first.items())), replication)
    a = Assignment.initial(previous.table, replication)
    for members in rounds:
        live = set(members)
        goal = build(tuple(sorted(members.items())), replication)
        a = a.with_states(promote_survivors(a, live))
        lost = {s for s in range(S) if not a.owners(s)}
        assert lost == {s for s in range(S) if not set(previous.owners(s)) & live}
        moves = plan(a, goal.table, live)
        assert summarize(a, moves).lost_shards == len(lost)
        if live >= set(previous.members):
            # Nobody left: the plan is exactly ShardMap's own movement count, nothing more.
            assert sorted(m.shard for m in moves) == previous.moved_shards(goal)
            assert sum(len(m.add) for m in moves) == previous.moved_replicas(goal)
        pending, running = list(moves), []
        while pending or running:
            batch = next_batch(pending, running, max_concurrent, max_per_node)
            for m in batch:
                a = a.with_states({m.shard: start_state(a, m)})
                pending.remove(m)
            running.extend(batch)
            m = running.pop(0)
            a = a.with_states({m.shard: apply_flip(a, m)})
        assert a.table == goal.table
        assert a.nodes() == live
        assert a.load() == goal.replica_load() and a.primary_load() == goal.primary_load()
        assert Assignment.from_json(a.to_json()) == a
        previous = goal
