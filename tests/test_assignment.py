"""Tests for shardmq.ring.assignment: validation, accessors, JSON round-trip and promote_survivors.

Properties are checked with hypothesis against brute-force references written independently of the code.
"""

from __future__ import annotations

import sys

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.ring import Assignment, ShardMap, ShardState, promote_survivors

POOL = ["a", "b", "c", "d", "e", "f"]


# --- strategies --------------------------------------------------------------


@st.composite
def tables(draw: st.DrawFn, pool: list[str] | None = None) -> tuple[list[tuple[str, ...]], int]:
    pool = pool or POOL
    replication = draw(st.integers(1, 3))
    shard_count = draw(st.integers(1, 12))
    row = st.lists(st.sampled_from(pool), min_size=1, max_size=min(replication, len(pool)), unique=True)
    return [tuple(draw(row)) for _ in range(shard_count)], replication


@st.composite
def new_states(draw: st.DrawFn, old: ShardState, replication: int, pool: list[str]) -> ShardState:
    """A valid successor of ``old`` (owners may change, may empty out; joining disjoint from owners)."""
    owners = tuple(draw(st.lists(st.sampled_from(pool), max_size=min(replication, len(pool)), unique=True)))
    bump = draw(st.integers(1 if owners != old.owners else 0, 3))
    rest = [n for n in pool if n not in owners]
    joining = tuple(draw(st.lists(st.sampled_from(rest), max_size=2, unique=True))) if rest else ()
    return ShardState(owners, old.epoch + bump, joining)


@st.composite
def assignments(draw: st.DrawFn, pool: list[str] | None = None) -> Assignment:
    pool = pool or POOL
    table, replication = draw(tables(pool))
    a = Assignment.initial(table, replication)
    for _ in range(draw(st.integers(0, 3))):
        shards = draw(st.lists(st.integers(0, a.shard_count - 1), max_size=a.shard_count, unique=True))
        a = a.with_states({s: draw(new_states(a.state(s), replication, pool)) for s in shards})
    return a


# --- construction and validation --------------------------------------------


def test_initial_from_shard_map() -> None:
    m = ShardMap.build({"x": 1, "y": 1, "z": 2}, 64, 2)
    a = Assignment.initial(m.table, 2)
    assert a.shard_count == 64 and a.replication == 2 and a.version == 1
    assert a.table == m.table
    assert all(a.epoch(s) == 1 and a.joining(s) == () for s in range(64))
    assert a.primary(5) == m.primary(5)
    assert a.load() == m.replica_load() and a.primary_load() == m.primary_load()


@pytest.mark.parametrize(
    "table, replication",
    [
        ([], 1),
        ([()], 1),
        ([("a", "a")], 2),
        ([("a", "b")], 1),
        ([("a",), ("",)], 1),
        ([["a"]], 1),
        ([("a",)], 0),
        ([("a",)], True),
    ],
)
def test_initial_rejects(table: list, replication: int) -> None:
    with pytest.raises(ValueError):
        Assignment.initial(table, replication)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"owners": ("a",), "epoch": 0},
        {"owners": ("a",), "epoch": True},
        {"owners": ("a",), "epoch": 1.0},
        {"owners": ["a"], "epoch": 1},
        {"owners": ("a", "a"), "epoch": 1},
        {"owners": ("a",), "epoch": 1, "joining": ("a",)},
        {"owners": ("a",), "epoch": 1, "joining": ("b", "b")},
        {"owners": (1,), "epoch": 1},
    ],
)
def test_shard_state_rejects(kwargs: dict) -> None:
    with pytest.raises(ValueError):
        ShardState(**kwargs)


def test_with_states_errors() -> None:
    a = Assignment.initial([("a", "b"), ("b", "c")], 2).with_states({0: ShardState(("a", "b"), 5)})
    assert a.version == 2 and a.epoch(0) == 5
    with pytest.raises(ValueError, match="never decrease"):
        a.with_states({0: ShardState(("a", "b"), 4)})
    with pytest.raises(ValueError, match="needs epoch"):
        a.with_states({0: ShardState(("b", "a"), 5)})  # reorder is an owners change too
    with pytest.raises(ValueError, match="needs epoch"):
        a.with_states({1: ShardState(("b",), 1)})
    with pytest.raises(ValueError, match="exceed replication"):
        a.with_states({1: ShardState(("a", "b", "c"), 2)})
    with pytest.raises(ValueError, match="expected a ShardState"):
        a.with_states({1: (("a",), 2)})  # type: ignore[dict-item]
    with pytest.raises(IndexError):
        a.with_states({2: ShardState(("a",), 2)})
    with pytest.raises(IndexError):
        a.with_states({-1: ShardState(("a",), 2)})
    # A failing call changes nothing, even when an earlier entry was valid.
    with pytest.raises(ValueError):
        a.with_states({1: ShardState(("c",), 2), 0: ShardState(("a", "b"), 1)})
    assert a.owners(1) == ("b", "c")


def test_with_states_allowed_changes_and_versions() -> None:
    a = Assignment.initial([("a", "b"), ("b", "c")], 2)
    assert a.with_states({}) is a
    assert a.with_states({0: ShardState(("a", "b"), 1)}) is a  # no actual change: no new version
    b = a.with_states({0: ShardState(("a", "b"), 1, ("c",))})  # joining alone keeps the epoch
    assert b.version == 2 and b.joining_of("c") == [0] and b.epoch(0) == 1
    c = b.with_states({0: ShardState(("a", "b"), 2)})  # epoch bump without owner change is fine
    assert c.version == 3
    d = c.with_states({1: ShardState((), 7)})  # every owner lost
    assert d.primary(1) is None and d.owners(1) == () and d.version == 4
    with pytest.raises(AttributeError):
        d._version = 9  # type: ignore[misc]


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_with_states_matches_reference(data: st.DataObject) -> None:
    a = data.draw(assignments())
    shard = data.draw(st.integers(0, a.shard_count - 1))
    old = a.state(shard)
    owners = tuple(data.draw(st.lists(st.sampled_from(POOL), max_size=4, unique=True)))
    epoch = data.draw(st.integers(1, old.epoch + 2))
    new = ShardState(owners, epoch)
    valid = epoch >= old.epoch and (owners == old.owners or epoch > old.epoch) and len(owners) <= a.replication
    if not valid:
        with pytest.raises(ValueError):
            a.with_states({shard: new})
        return
    b = a.with_states({shard: new})
    assert b.state(shard) == new
    assert all(b.state(s) == a.state(s) for s in range(a.shard_count) if s != shard)
    assert b.version == (a.version if new == old else a.version + 1)
    assert a.diff(b) == ([] if new == old else [shard])


# --- accessors ---------------------------------------------------------------


@settings(max_examples=100, deadline=None)
@given(assignments())
def test_accessors_match_reference(a: Assignment) -> None:
    states = a.states
    everyone = {n for s in states for n in (*s.owners, *s.joining)}
    assert a.nodes() == everyone
    for n in [*POOL, "zz"]:
        assert a.shards_of(n) == [i for i, s in enumerate(states) if n in s.owners]
        assert a.primaries_of(n) == [i for i, s in enumerate(states) if s.owners[:1] == (n,)]
        assert a.joining_of(n) == [i for i, s in enumerate(states) if n in s.joining]
    assert a.load() == {n: sum(n in s.owners for s in states) for n in sorted(everyone)}
    assert a.primary_load() == {n: sum(s.owners[:1] == (n,) for s in states) for n in sorted(everyone)}
    assert list(a.load()) == sorted(everyone)
    for i, s in enumerate(states):
        assert a.owners(i) == s.owners and a.epoch(i) == s.epoch
        assert a.primary(i) == (s.owners[0] if s.owners else None)
    assert a.diff(a) == []
    with pytest.raises(IndexError):
        a.state(a.shard_count)
    with pytest.raises(IndexError):
        a.state(-1)


def test_diff_needs_same_shard_count() -> None:
    with pytest.raises(ValueError):
        Assignment.initial([("a",)], 1).diff(Assignment.initial([("a",), ("a",)], 1))


# --- JSON --------------------------------------------------------------------

node_ids = st.text(min_size=1, max_size=12)


@settings(max_examples=150, deadline=None)
@given(st.data())
def test_json_round_trip(data: st.DataObject) -> None:
    pool = data.draw(st.lists(node_ids, min_size=1, max_size=6, unique=True))
    a = data.draw(assignments(pool))
    raw = a.to_json()
    b = Assignment.from_json(raw)
    assert b == a and hash(b) == hash(a)
    assert b.states == a.states and b.version == a.version and b.replication == a.replication
    assert b.to_json() == raw
    for state in b.states:
        for n in (*state.owners, *state.joining):
            assert n is sys.intern(n)


def test_json_size_4096_shards_r3() -> None:
    names = [f"shardmq-node-{i:04d}.example.internal" for i in range(12)]
    table = [tuple(names[(s + k * 5) % 12] for k in range(3)) for s in range(4096)]
    a = Assignment.initial(table, 3)
    a = a.with_states({s: ShardState(table[s], 1_000_000 + s) for s in range(4096)})
    a = a.with_states({s: ShardState(table[s], a.epoch(s), (names[(s + 1) % 12],)) for s in range(0, 4096, 7)})
    raw = a.to_json()
    assert len(raw) < 150_000, len(raw)
    assert Assignment.from_json(raw) == a


def _doc() -> dict:
    a = Assignment.initial([("a", "b"), ("b", "c")], 2).with_states({1: ShardState(("b", "c"), 1, ("a",))})
    return orjson.loads(a.to_json())


@pytest.mark.parametrize(
    "mutate",
    [
        lambda d: d.update(format=2),
        lambda d: d.update(format=True),
        lambda d: d.pop("epochs"),
        lambda d: d.update(extra=1),
        lambda d: d.update(shard_count=3),
        lambda d: d.update(shard_count=0),
        lambda d: d.update(replication=1),
        lambda d: d.update(version=0),
        lambda d: d.update(nodes=["a", "b", "b"]),
        lambda d: d.update(nodes=["a", "b", "c", "d"]),
        lambda d: d.update(nodes=["a", "b", ""]),
        lambda d: d.update(owners=[[0, 1], [1, 9]]),
        lambda d: d.update(owners=[[0, 0], [1, 2]]),
        lambda d: d.update(owners=[[0, 1], [1, True]]),
        lambda d: d.update(owners=[[0, 1]]),
        lambda d: d.update(epochs=[1, 0]),
        lambda d: d.update(epochs=[1, 1.5]),
        lambda d: d.update(joining=[[1, [1]]]),
        lambda d: d.update(joining=[[1, []]]),
        lambda d: d.update(joining=[[1, [0]], [1, [0]]]),
        lambda d: d.update(joining=[[5, [0]]]),
        lambda d: d.update(joining={"1": [0]}),
    ],
)
def test_from_json_rejects(mutate) -> None:
    doc = _doc()
    assert Assignment.from_json(orjson.dumps(doc)) is not None
    mutate(doc)
    with pytest.raises(ValueError):
        Assignment.from_json(orjson.dumps(doc))


@pytest.mark.parametrize("raw", [b"", b"{", b"[]", b"null", b'{"format": 1}'])
def test_from_json_rejects_garbage(raw: bytes) -> None:
    with pytest.raises(ValueError):
        Assignment.from_json(raw)


# --- promote_survivors -------------------------------------------------------


def promote_reference(a: Assignment, live: set[str]) -> dict[int, ShardState]:
    out = {}
    for shard in range(a.shard_count):
        s = a.state(shard)
        if set(s.owners) <= live:
            continue
        out[shard] = ShardState(
            tuple(n for n in s.owners if n in live), s.epoch + 1, tuple(n for n in s.joining if n in live)
        )
    return out


@settings(max_examples=150, deadline=None)
@given(assignments(), st.sets(st.sampled_from(POOL)))
def test_promote_survivors_matches_reference(a: Assignment, live: set[str]) -> None:
    changes = promote_survivors(a, live)
    assert changes == promote_reference(a, live)
    b = a.with_states(changes)  # always a valid change
    for shard in range(a.shard_count):
        old, new = a.state(shard), b.state(shard)
        survivors = [n for n in old.owners if n in live]
        if shard in changes:
            assert new.epoch == old.epoch + 1
            assert new.primary == (survivors[0] if survivors else None)
        else:
            assert new == old
        assert set(new.owners) <= live or new == old
    assert promote_survivors(b, live) == {}  # idempotent once applied


def test_promote_survivors_example() -> None:
    a = Assignment.initial([("a", "b", "c"), ("b", "c", "a"), ("a",), ("c", "b")], 3)
    a = a.with_states({3: ShardState(("c", "b"), 1, ("a",))})
    changes = promote_survivors(a, {"b", "c"})
    assert changes == {
        0: ShardState(("b", "c"), 2),
        1: ShardState(("b", "c"), 2),
        2: ShardState((), 2),
    }
