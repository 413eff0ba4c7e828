"""Tests for shardmq.ring: determinism, shape, balance, movement and errors."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardmq.ring import (
    DEFAULT_REPLICATION,
    DEFAULT_SHARD_COUNT,
    ShardMap,
    shard_for_key,
    stable_hash64,
)

S = DEFAULT_SHARD_COUNT


def nodes(n: int, prefix: str = "node-") -> dict[str, int]:
    return {f"{prefix}{i}": 1 for i in range(n)}


def weighted_ratio(load: dict[str, int], members: dict[str, int]) -> float:
    per_weight = sum(load.values()) / sum(members.values())
    return max(load[n] / members[n] for n in members) / per_weight


# --- hashing ---------------------------------------------------------------


def test_stable_hash64_known_vectors() -> None:
    # Published XXH3-64 digest of the empty input with seed 0.
    assert stable_hash64("") == 0x2D06800538D394C2
    assert stable_hash64(b"") == 0x2D06800538D394C2
    assert stable_hash64("sensors/room-1/temp") == 4815115439298520841
    assert stable_hash64("héllo") == 7657728615535385375
    assert stable_hash64("héllo") == stable_hash64("héllo".encode())


def test_shard_for_key_known_vector() -> None:
    assert shard_for_key("sensors/room-1/temp", 4096) == 4815115439298520841 % 4096


@given(st.text(max_size=80), st.integers(min_value=1, max_value=100_000))
def test_shard_for_key_in_range_and_consistent(key: str, shard_count: int) -> None:
    shard = shard_for_key(key, shard_count)
    assert 0 <= shard < shard_count
    assert shard == stable_hash64(key) % shard_count


# --- shape and determinism -------------------------------------------------


def test_defaults() -> None:
    m = ShardMap.build(nodes(3))
    assert m.shard_count == DEFAULT_SHARD_COUNT == 4096
    assert m.replication == DEFAULT_REPLICATION == 2


def test_determinism_ignores_member_order() -> None:
    members = {"b": 2, "c": 1, "a": 3, "d": 1}
    reordered = dict(reversed(list(members.items())))
    assert list(members) != list(reordered)
    a = ShardMap.build(members, 512, 2)
    b = ShardMap.build(reordered, 512, 2)
    assert a == b
    assert a.table == b.table
    assert a != ShardMap.build(members, 512, 3)


def test_weights_scale_invariant() -> None:
    assert ShardMap.build({"a": 1, "b": 2}, 256, 1) == ShardMap.build({"a": 5, "b": 10}, 256, 1)


@pytest.mark.parametrize("n,r", [(1, 1), (1, 3), (2, 2), (2, 3), (5, 1), (5, 2), (5, 3)])
def test_owners_shape(n: int, r: int) -> None:
    m = ShardMap.build(nodes(n), 1024, r)
    for s in range(m.shard_count):
        owners = m.owners(s)
        assert len(owners) == min(r, n)
        assert len(set(owners)) == len(owners)
        assert set(owners) <= set(m.members)
        assert m.primary(s) == owners[0]


def test_members_is_a_copy() -> None:
    m = ShardMap.build({"a": 1, "b": 2}, 64, 1)
    m.members["c"] = 1
    assert m.members == {"a": 1, "b": 2}


def test_key_lookup_uses_stable_hash() -> None:
    m = ShardMap.build(nodes(4), 4096, 2)
    for key in ["", "a/b/c", "sensors/room-1/temp", "ü/ñ"]:
        assert m.shard_of(key) == stable_hash64(key) % 4096
        assert m.owners_of_key(key) == m.owners(m.shard_of(key))


# --- behavioural guarantees at production size ----------------------------


@pytest.mark.parametrize("n,r", [(2, 1), (3, 2), (5, 2), (10, 2), (12, 1), (4, 3), (7, 3), (11, 2)])
def test_balance_and_movement(n: int, r: int) -> None:
    before = ShardMap.build(nodes(n), S, r)
    after = ShardMap.build(nodes(n + 1), S, r)
    for m in (before, after):
        assert weighted_ratio(m.primary_load(), m.members) <= 1.05
        assert weighted_ratio(m.replica_load(), m.members) <= 1.05
    joined = before.moved_replicas(after)
    ideal_join = S * min(r, n + 1) / (n + 1)
    assert joined <= 1.1 * ideal_join, (joined, ideal_join)
    # The node that leaves is the one that joined above: ideal is what it held.
    left = after.moved_replicas(before)
    ideal_leave = after.replica_load()[f"node-{n}"]
    assert left <= 1.1 * ideal_leave, (left, ideal_leave)


def test_leave_of_an_old_member_moves_about_its_share() -> None:
    before = ShardMap.build(nodes(6), S, 2)
    members = nodes(6)
    del members["node-0"]
    after = ShardMap.build(members, S, 2)
    assert before.moved_replicas(after) <= 1.1 * before.replica_load()["node-0"]


def test_weighted_balance() -> None:
    members = {"small": 1, "mid": 2, "big": 3, "big2": 3}
    m = ShardMap.build(members, S, 2)
    assert weighted_ratio(m.primary_load(), members) <= 1.05
    assert weighted_ratio(m.replica_load(), members) <= 1.05


# --- properties against brute-force references -----------------------------

member_sets = st.dictionaries(
    st.text(alphabet="abcdefgh-0123", min_size=1, max_size=6),
    st.integers(min_value=1, max_value=4),
    min_size=1,
    max_size=7,
)
fast = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@fast
@given(member_sets, st.integers(min_value=1, max_value=300), st.integers(min_value=1, max_value=4))
def test_map_invariants(members: dict[str, int], shard_count: int, replication: int) -> None:
    m = ShardMap.build(members, shard_count, replication)
    r_eff = min(replication, len(members))
    for s in range(shard_count):
        owners = m.owners(s)
        assert len(owners) == r_eff and len(set(owners)) == r_eff
    replica_load = m.replica_load()
    primary_load = m.primary_load()
    assert set(replica_load) == set(primary_load) == set(members)
    assert sum(replica_load.values()) == shard_count * r_eff
    assert sum(primary_load.values()) == shard_count
    for node in members:
        assert m.shards_of(node) == [s for s in range(shard_count) if node in m.owners(s)]
        assert m.primaries_of(node) == [s for s in range(shard_count) if m.owners(s)[0] == node]
        assert len(m.shards_of(node)) == replica_load[node]
        assert len(m.primaries_of(node)) == primary_load[node]
    assert ShardMap.build(dict(sorted(members.items(), reverse=True)), shard_count, replication) == m


@fast
@given(st.integers(min_value=1, max_value=8), st.integers(min_value=20, max_value=400), st.integers(1, 3))
def test_capacity_bound_equal_weights(n: int, shard_count: int, replication: int) -> None:
    m = ShardMap.build(nodes(n), shard_count, replication)
    r_eff = min(replication, n)
    for total, load in ((shard_count * r_eff, m.replica_load()), (shard_count, m.primary_load())):
        quota = total / n
        cap = max(math.ceil(quota), math.floor(quota * 1.05 + 1e-9))
        assert max(load.values()) <= cap


@fast
@given(
    member_sets,
    member_sets,
    st.integers(min_value=1, max_value=200),
    st.integers(min_value=1, max_value=3),
)
def test_moved_against_naive(
    a_members: dict[str, int], b_members: dict[str, int], shard_count: int, r: int
) -> None:
    a = ShardMap.build(a_members, shard_count, r)
    b = ShardMap.build(b_members, shard_count, r)
    assert a.moved_shards(b) == [s for s in range(shard_count) if a.owners(s) != b.owners(s)]
    copies = 0
    for s in range(shard_count):
        for node in b.owners(s):
            if node not in a.owners(s):
                copies += 1
    assert a.moved_replicas(b) == copies
    assert a.moved_shards(a) == [] and a.moved_replicas(a) == 0


# --- errors ----------------------------------------------------------------


@pytest.mark.parametrize(
    "members,shard_count,replication,match",
    [
        ({}, 16, 1, "at least one member"),
        ({"a": 1}, 0, 1, "shard_count"),
        ({"a": 1}, 16, 0, "replication"),
        ({"a": 0}, 16, 1, "weight of member 'a'"),
        ({"a": -2}, 16, 1, "weight of member 'a'"),
        ({"a": 1.5}, 16, 1, "weight of member 'a'"),
        ({"": 1}, 16, 1, "member ids"),
    ],
)
def test_build_errors(members: dict, shard_count: int, replication: int, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        ShardMap.build(members, shard_count, replication)


def test_compare_different_shard_counts_raises() -> None:
    with pytest.raises(ValueError, match="different shard counts"):
        ShardMap.build({"a": 1}, 16).moved_shards(ShardMap.build({"a": 1}, 32))
