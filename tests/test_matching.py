"""filter_matches against MQTT 3.1.1 section 4.7, FilterIndex and RouteTable against brute force."""

from __future__ import annotations

import sys
from collections.abc import Hashable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.router.matching import FilterIndex, filter_matches
from shardmq.router.routes import RouteTable
from shardmq.router.topics import validate_topic_filter, validate_topic_name

# -- filter_matches: the spec's own examples (4.7.1.2, 4.7.1.3, 4.7.2) ----------------------

SPEC_CASES = [
    # 4.7.1.2 multi-level wildcard
    ("sport/tennis/player1/#", "sport/tennis/player1", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/ranking", True),
    ("sport/tennis/player1/#", "sport/tennis/player1/score/wimbledon", True),
    ("sport/#", "sport", True),
    ("#", "sport/tennis", True),
    ("#", "/", True),
    # 4.7.1.3 single-level wildcard
    ("sport/tennis/+", "sport/tennis/player1", True),
    ("sport/tennis/+", "sport/tennis/player2", True),
    ("sport/tennis/+", "sport/tennis/player1/ranking", False),
    ("sport/+", "sport", False),
    ("sport/+", "sport/", True),
    ("+/+", "/finance", True),
    ("/+", "/finance", True),
    ("+", "/finance", False),
    ("+/tennis/#", "sport/tennis", True),
    ("+/tennis/#", "sport/tennis/x/y", True),
    ("sport/+/player1", "sport/tennis/player1", True),
    # 4.7.2 topics beginning with $
    ("#", "$SYS/broker/clients", False),
    ("+/monitor/Clients", "$SYS/monitor/Clients", False),
    ("$SYS/#", "$SYS/monitor/Clients", True),
    ("$SYS/monitor/+", "$SYS/monitor/Clients", True),
    ("$SYS/#", "$SYS", True),
    ("+", "$SYS", False),
    ("+/#", "$SYS", False),
    # '$' only matters as the first character of the topic
    ("a/+", "a/$x", True),
    ("a/#", "a/$x/y", True),
    ("+/monitor/Clients", "x/monitor/Clients", True),
    # 4.7.3 case-sensitive, levels compared exactly, empty levels are levels
    ("ACCOUNTS", "Accounts", False),
    ("a/b", "a/b", True),
    ("a/b", "a/b/", False),
    ("a//b", "a//b", True),
    ("a/+/b", "a//b", True),
    ("a/b", "a", False),
    ("a", "a/b", False),
    ("a/#", "ab", False),
    ("/#", "/", True),
    ("/#", "a", False),
]


@pytest.mark.parametrize(("filt", "topic", "expected"), SPEC_CASES)
def test_spec_examples(filt: str, topic: str, expected: bool) -> None:
    validate_topic_filter(filt)
    validate_topic_name(topic)
    assert filter_matches(filt, topic) is expected
    index: FilterIndex[str] = FilterIndex()
    index.add(filt, "n")
    assert index.match(topic) == ({"n"} if expected else set())
    assert index.matching_filters(topic) == ([filt] if expected else [])


# -- strategies --------------------------------------------------------------------------------

TOPIC_LEVELS = ["a", "b", "$x", ""]
FILTER_LEVELS = [*TOPIC_LEVELS, "+"]
MEMBERS: list[Hashable] = ["n1", "n2", "n3", b"c1", 0]


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(FILTER_LEVELS), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    f = "/".join(levels)
    if f == "":
        f = "+"
    return validate_topic_filter(f)


@st.composite
def topics(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from(TOPIC_LEVELS), min_size=1, max_size=5))
    t = "/".join(levels)
    return validate_topic_name(t or "a")


any_filter = st.one_of(filters(), topics())


def _reference(f_levels: list[str], t_levels: list[str]) -> bool:
    """A second, recursive statement of the matching rules (without the '$' rule)."""
    if not f_levels:
        return not t_levels
    if f_levels[0] == "#":
        return True
    if not t_levels:
        return False
    if f_levels[0] in ("+", t_levels[0]):
        return _reference(f_levels[1:], t_levels[1:])
    return False


@given(any_filter, topics())
def test_filter_matches_agrees_with_recursive_reference(filt: str, topic: str) -> None:
    expected = _reference(filt.split("/"), topic.split("/"))
    if topic.startswith("$") and filt[0] in "+#":
        expected = False
    assert filter_matches(filt, topic) is expected


@given(topics(), st.data())
def test_filters_derived_from_topic_match(topic: str, data: st.DataObject) -> None:
    """Replace levels by '+' and cut the tail with '#': the result must match the topic."""
    levels = topic.split("/")
    derived = [lv if not data.draw(st.booleans()) else "+" for lv in levels]
    if data.draw(st.booleans()):
        derived = [*derived[: data.draw(st.integers(0, len(derived)))], "#"]
    filt = validate_topic_filter("/".join(derived))
    dollar_blocked = topic.startswith("$") and filt[0] in "+#"
    assert filter_matches(filt, topic) is (not dollar_blocked)


# -- FilterIndex against brute force --------------------------------------------------------

OPS = st.lists(
    st.one_of(
        st.tuples(st.just("add"), any_filter, st.sampled_from(MEMBERS)),
        st.tuples(st.just("add"), any_filter, st.sampled_from(MEMBERS)),
        st.tuples(st.just("remove"), any_filter, st.sampled_from(MEMBERS)),
        st.tuples(st.just("remove_member"), st.just(""), st.sampled_from(MEMBERS)),
    ),
    max_size=40,
)
PROBE_TOPICS = sorted(
    {"/".join(p) for p in [(a,) for a in TOPIC_LEVELS] + [(a, b) for a in TOPIC_LEVELS for b in TOPIC_LEVELS]}
    | {"a/b/a", "$x/a/b", "a//", "/a/", "b/a/$x/a"}
    - {""}
)


def _check_index(index: FilterIndex[Hashable], model: dict[str, set[Hashable]]) -> None:
    assert len(index) == len(model)
    assert index.route_count == sum(len(ms) for ms in model.values())
    assert index.wildcard_count == sum(1 for f in model if "+" in f or "#" in f)
    assert sorted(index.filters()) == sorted(model)
    assert dict(index.items()) == {f: frozenset(ms) for f, ms in model.items()}
    for f, ms in model.items():
        assert index.has_filter(f)
        assert index.members(f) == frozenset(ms)
    for topic in PROBE_TOPICS:
        expected = {m for f, ms in model.items() if filter_matches(f, topic) for m in ms}
        assert index.match(topic) == expected, topic
        found = index.matching_filters(topic)
        assert len(found) == len(set(found))
        assert set(found) == {f for f in model if filter_matches(f, topic)}, topic
    # Memory invariants: a lone member is stored bare, and the trie is pruned to nothing.
    for value in index._exact.values():
        assert type(value) is not set or len(value) >= 2
    if index.wildcard_count == 0:
        assert index._root is None


@settings(max_examples=300, deadline=None)
@given(OPS)
def test_filter_index_matches_brute_force(ops: list[tuple[str, str, Hashable]]) -> None:
    index: FilterIndex[Hashable] = FilterIndex()
    model: dict[str, set[Hashable]] = {}
    for op, filt, member in ops:
        if op == "add":
            new = member not in model.get(filt, set())
            assert index.add(filt, member) is new
            model.setdefault(filt, set()).add(member)
        elif op == "remove":
            present = member in model.get(filt, set())
            assert index.remove(filt, member) is present
            if present:
                model[filt].discard(member)
                if not model[filt]:
                    del model[filt]
        else:
            emptied = {f for f, ms in model.items() if ms == {member}}
            assert sorted(index.remove_member(member)) == sorted(emptied)
            for f in list(model):
                model[f].discard(member)
                if not model[f]:
                    del model[f]
    _check_index(index, model)
    for filt, ms in list(model.items()):
        for member in list(ms):
            assert index.remove(filt, member)
    assert len(index) == 0 and index.route_count == 0 and index._root is None


def test_filter_index_basics() -> None:
    index: FilterIndex[str] = FilterIndex()
    assert index.add("a/b", "n1") and not index.add("a/b", "n1")
    assert index._exact["a/b"] == "n1"  # bare, not a set
    assert index.add("a/b", "n2")
    assert index._exact["a/b"] == {"n1", "n2"}
    assert index.remove("a/b", "n1")
    assert index._exact["a/b"] == "n2"
    assert not index.remove("a/b", "n1") and not index.remove("zz", "n1")
    assert index.add("a/+", "n1") and index.add("a/+/#", "n1") and index.add("#", "n3")
    assert index.match("a/b") == {"n1", "n2", "n3"}
    assert index.wildcard_count == 3 and len(index) == 4 and index.route_count == 4
    assert index.remove("a/+", "n1")
    assert index.has_filter("a/+/#") and not index.has_filter("a/+")
    assert index.members("a/+") == frozenset()
    assert sorted(index.remove_member("n1")) == ["a/+/#"]
    assert index.remove("#", "n3")
    assert index._root is None
    assert index.match("a/b") == {"n2"}


def test_member_none_is_a_member() -> None:
    index: FilterIndex[None] = FilterIndex()
    assert index.add("a", None) and not index.add("a", None)
    assert index.match("a") == {None}
    assert index.members("a") == frozenset({None})
    assert index.remove("a", None) and len(index) == 0


# -- RouteTable ------------------------------------------------------------------------------


def test_route_table_behaviour() -> None:
    table = RouteTable()
    assert table.shards() == [] and table.route_count == 0
    node = "".join(["node", "-1"])  # a fresh, non-interned string
    assert table.add(7, "a/b", node)
    assert not table.add(7, "a/b", "node-1")
    assert table.add(7, "a/b", "node-2")
    assert table.add(7, "a/+", "node-3")
    assert table.add(9, "c", "node-1")
    assert table.add(RouteTable.ROOT, "#", "node-2")
    assert table.add(RouteTable.ROOT, "+/b", "node-1")
    assert table.shards() == [RouteTable.ROOT, 7, 9]
    assert table.route_count == 6 and table.filter_count == 5 and table.root_size == 2
    assert table.route_count_of(7) == 3 and table.route_count_of(42) == 0
    assert table.match(7, "a/b") == {"node-1", "node-2", "node-3"}
    assert table.match(RouteTable.ROOT, "a/b") == {"node-1", "node-2"}
    assert table.match(RouteTable.ROOT, "$SYS/b") == set()
    assert table.match(42, "a/b") == set()
    assert table.shard_routes(7) == [("a/+", ("node-3",)), ("a/b", ("node-1", "node-2"))]
    assert table.shard_routes(42) == []
    # Interned: every route of a node shares one string object.
    (stored,) = table.match(9, "c")
    assert stored is sys.intern("".join(["node", "-1"]))

    assert not table.remove(7, "a/b", "node-9") and not table.remove(42, "a/b", "node-1")
    assert table.remove(9, "c", "node-1")
    assert 9 not in table.shards()  # empty shards are forgotten

    assert table.remove_node("node-1") == 2  # a/b in 7 and +/b in ROOT
    assert table.match(7, "a/b") == {"node-2", "node-3"}
    assert table.root_size == 1

    assert table.drop_shard(7) == 2 and table.drop_shard(7) == 0
    assert table.shards() == [RouteTable.ROOT]
    assert table.remove_node("node-2") == 1
    assert table.shards() == [] and table.route_count == 0 and table.root_size == 0


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.sampled_from([RouteTable.ROOT, 0, 1]), any_filter, st.sampled_from(["n1", "n2", "n3"])),
        max_size=30,
    ),
    st.sampled_from(["n1", "n2", "n3"]),
)
def test_route_table_against_model(routes: list[tuple[int, str, str]], dead: str) -> None:
    table = RouteTable()
    model: set[tuple[int, str, str]] = set()
    for route in routes:
        assert table.add(*route) is (route not in model)
        model.add(route)
    assert table.route_count == len(model)
    assert table.shards() == sorted({s for s, _, _ in model})
    for shard in (RouteTable.ROOT, 0, 1):
        assert table.route_count_of(shard) == sum(1 for s, _, _ in model if s == shard)
        for topic in PROBE_TOPICS:
            expected = {n for s, f, n in model if s == shard and filter_matches(f, topic)}
            assert table.match(shard, topic) == expected
    assert table.remove_node(dead) == sum(1 for _, _, n in model if n == dead)
    model = {r for r in model if r[2] != dead}
    assert table.route_count == len(model)
    assert table.filter_count == len({(s, f) for s, f, _ in model})
    assert table.drop_shard(0) == sum(1 for s, _, _ in model if s == 0)
