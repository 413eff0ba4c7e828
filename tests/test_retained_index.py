"""RetainedIndex against brute force: every filter finds exactly the stored topics filter_matches says it matches."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from test_matching import any_filter, topics

from shardmq.router.matching import filter_matches
from shardmq.router.retained import RetainedIndex

ops = st.lists(
    st.tuples(st.sampled_from(["set", "set", "delete"]), topics(), st.integers(0, 3)),
    max_size=40,
)


def brute_force(model: dict[str, int], filt: str) -> list[tuple[str, int]]:
    return sorted((t, v) for t, v in model.items() if filter_matches(filt, t))


@settings(max_examples=300, deadline=None)
@given(ops, st.lists(any_filter, min_size=1, max_size=8))
def test_match_equals_brute_force(operations: list[tuple[str, str, int]], queries: list[str]) -> None:
    index: RetainedIndex[int] = RetainedIndex()
    model: dict[str, int] = {}
    for op, topic, value in operations:
        if op == "set":
            assert index.set(topic, value) == (topic not in model)
            model[topic] = value
        else:
            assert index.delete(topic) == (topic in model)
            model.pop(topic, None)
        assert len(index) == len(model)
    assert dict(index.items()) == model
    for filt in queries:
        expected = brute_force(model, filt)
        assert index.match(filt) == expected
        assert index.count_matching(filt) == len(expected)
    for topic in list(model):
        index.delete(topic)
    # Every posting list went with its last topic: an emptied index holds nothing.
    assert not index._by_word and not index._by_depth and not len(index)


def test_falsy_values_are_values() -> None:
    index: RetainedIndex[bytes | None] = RetainedIndex()
    index.set("a/b", None)
    index.set("a/c", b"")
    assert "a/b" in index and index.match("a/b") == [("a/b", None)]
    assert index.match("a/+") == [("a/b", None), ("a/c", b"")]
    assert index.delete("a/b") and not index.delete("a/b")
    assert index.match("#") == [("a/c", b"")]


def test_dollar_topics_need_the_dollar_spelled_out() -> None:
    index: RetainedIndex[int] = RetainedIndex()
    index.set("$SYS/load", 1)
    index.set("sys/load", 2)
    assert index.match("#") == [("sys/load", 2)]
    assert index.match("+/load") == [("sys/load", 2)]
    assert index.match("$SYS/#") == [("$SYS/load", 1)]


def test_unmatched_level_reads_no_candidates() -> None:
    """``a/+/x`` with no ``x`` at level 2 never looks at the topics under ``a``: the rarest literal decides."""
    index: RetainedIndex[int] = RetainedIndex()
    for i in range(1000):
        index.set(f"a/d{i}/c", i)
    assert list(index._candidates("a/+/x")) == []
    assert len(index._candidates("a/d7/+")) == 1  # type: ignore[arg-type]
    assert index.match("a/d7/+") == [("a/d7/c", 7)]
    assert index.count_matching("a/+/c") == 1000
