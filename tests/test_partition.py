"""The partition function: a filter's placement key is always among a matching topic's lookup keys."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.router.matching import filter_matches
from shardmq.router.partition import lookup_keys, placement_key
from shardmq.router.routes import RouteTable
from shardmq.router.topics import validate_topic_filter, validate_topic_name

TOPIC_LEVELS = ["a", "b", "$x", "", "é"]

topic_levels = st.lists(st.sampled_from(TOPIC_LEVELS) | st.text("ab$/é", max_size=3), min_size=1, max_size=5)


@st.composite
def topics(draw: st.DrawFn) -> str:
    t = "/".join(draw(topic_levels))
    return validate_topic_name(t or "a")


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*TOPIC_LEVELS, "+"]), min_size=0, max_size=4))
    if draw(st.booleans()) or not levels:
        levels.append("#")
    return validate_topic_filter("/".join(levels) or "+")


@st.composite
def matching_pairs(draw: st.DrawFn) -> tuple[str, str]:
    """A topic and a filter derived from it that matches it, so the property is never vacuous."""
    topic = draw(topics())
    levels = [lv if not draw(st.booleans()) else "+" for lv in topic.split("/")]
    if draw(st.booleans()):
        levels = [*levels[: draw(st.integers(0, len(levels)))], "#"]
    filt = validate_topic_filter("/".join(levels))
    if topic.startswith("$") and filt[0] in "+#":
        filt = topic  # the '$' rule forbids this pair; fall back to the exact filter
    assert filter_matches(filt, topic)
    return filt, topic


@pytest.mark.parametrize(
    ("filt", "key"),
    [
        ("a/b/c", "a/b/c"),
        ("a", "a"),
        ("/finance", "/finance"),
        ("sport/#", "sport"),
        ("sport/+/player1", "sport"),
        ("/+", ""),
        ("$SYS/#", "$SYS"),
        ("#", None),
        ("+", None),
        ("+/tennis/#", None),
        ("+/monitor/Clients", None),
    ],
)
def test_placement_key_examples(filt: str, key: str | None) -> None:
    assert placement_key(filt) == key


@pytest.mark.parametrize(
    ("topic", "keys"),
    [
        ("a", ("a",)),
        ("a/b/c", ("a/b/c", "a")),
        ("/finance", ("/finance", "")),
        ("a/", ("a/", "a")),
        ("$SYS/x", ("$SYS/x", "$SYS")),
    ],
)
def test_lookup_keys_examples(topic: str, keys: tuple[str, ...]) -> None:
    assert lookup_keys(topic) == keys


def _check(filt: str, topic: str) -> None:
    keys = lookup_keys(topic)
    assert 1 <= len(keys) <= 2
    assert len(set(keys)) == len(keys)
    if filter_matches(filt, topic):
        key = placement_key(filt)
        assert key is None or key in keys, (filt, topic, key, keys)


@settings(max_examples=500)
@given(matching_pairs())
def test_placement_key_in_lookup_keys_for_matching_pairs(pair: tuple[str, str]) -> None:
    _check(*pair)


@settings(max_examples=500)
@given(filters() | topics(), topics())
def test_placement_key_in_lookup_keys_for_any_pair(filt: str, topic: str) -> None:
    _check(filt, topic)


@given(topics())
def test_lookup_keys_at_most_two(topic: str) -> None:
    keys = lookup_keys(topic)
    assert len(keys) == (1 if "/" not in topic else 2)
    assert keys[0] == topic


@settings(max_examples=200, deadline=None)
@given(st.lists(filters() | topics(), max_size=15), topics())
def test_partitioned_table_finds_every_match(filts: list[str], topic: str) -> None:
    """End to end: place routes by key, look up by keys plus ROOT, and lose nothing."""

    def shard_of(key: str) -> int:
        return hash(key) % 4  # stand-in for the ring; any function of the key will do

    table = RouteTable()
    for i, f in enumerate(filts):
        key = placement_key(f)
        table.add(RouteTable.ROOT if key is None else shard_of(key), f, f"n{i}")
    found: set[str] = set(table.match(RouteTable.ROOT, topic))
    for key in lookup_keys(topic):
        found |= table.match(shard_of(key), topic)
    expected = {f"n{i}" for i, f in enumerate(filts) if filter_matches(f, topic)}
    assert found == expected
