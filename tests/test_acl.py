"""router.acl: filter coverage against a bounded brute force, and the ACL's publish and subscribe checks."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardmq.router.acl import Acl, filter_covers
from shardmq.router.matching import filter_matches
from shardmq.router.topics import validate_topic_filter

# Literal levels: two plain ones, a "$" one (wildcard first levels never match it) and the empty level.
LITERALS = ["a", "b", "$s", ""]


def topics_up_to(depth: int) -> list[str]:
    return ["/".join(levels) for n in range(1, depth + 1) for levels in itertools.product(LITERALS, repeat=n)]


TOPICS = {depth: topics_up_to(depth) for depth in range(1, 6)}


def covers_by_brute_force(allowed: str, requested: str) -> bool:
    """Every topic of up to one level more than the longer filter that ``requested`` matches, ``allowed``
    matches. Deeper topics add nothing: past the last level of both filters, a topic can only be matched by a
    trailing ``#``, and one extra level already tells whether each filter has one."""
    depth = max(allowed.count("/"), requested.count("/")) + 2
    return all(filter_matches(allowed, t) for t in TOPICS[depth] if filter_matches(requested, t))


@st.composite
def filters(draw: st.DrawFn) -> str:
    levels = draw(st.lists(st.sampled_from([*LITERALS, "+"]), min_size=1, max_size=3))
    if draw(st.booleans()):
        levels = [*levels[: draw(st.integers(0, len(levels) - 1))], "#"]
    return validate_topic_filter("/".join(levels) or "a")  # a lone empty level is the empty filter: invalid


@settings(max_examples=1500, deadline=None)
@given(filters(), filters())
def test_filter_covers_agrees_with_brute_force(allowed: str, requested: str) -> None:
    assert filter_covers(allowed, requested) is covers_by_brute_force(allowed, requested)


@pytest.mark.parametrize(
    ("allowed", "requested", "expected"),
    [
        ("sensors/#", "sensors/+/temp", True),
        ("sensors/#", "sensors", True),  # '#' matches the parent level
        ("sensors/#", "sensors/#", True),
        ("sensors/+", "sensors/#", False),
        ("sensors/+", "sensors/kitchen", True),
        ("sensors/kitchen", "sensors/+", False),
        ("#", "$SYS/#", False),  # '#' never matches "$" topics, so granting it grants none of them
        ("#", "+/x", True),  # a wildcard first level never matches "$" topics either
        ("$SYS/#", "$SYS/broker/clients", True),
        ("+/+", "/x", True),  # '+' matches the empty level
    ],
)
def test_filter_covers_examples(allowed: str, requested: str, expected: bool) -> None:
    assert filter_covers(allowed, requested) is expected


@settings(max_examples=500, deadline=None)
@given(st.lists(filters(), max_size=4), st.sampled_from(TOPICS[3]))
def test_may_publish_is_any_filter_matching(publish: list[str], topic: str) -> None:
    assert Acl(publish=tuple(publish)).may_publish(topic) is any(filter_matches(f, topic) for f in publish)


@settings(max_examples=500, deadline=None)
@given(st.lists(filters(), max_size=4), filters())
def test_may_subscribe_is_one_grant_covering(subscribe: list[str], requested: str) -> None:
    acl = Acl(subscribe=tuple(subscribe))
    assert acl.may_subscribe(requested) is any(covers_by_brute_force(f, requested) for f in subscribe)


def test_nothing_is_allowed_by_default() -> None:
    acl = Acl()
    assert not acl.may_publish("a") and not acl.may_subscribe("a") and not acl.admin
    assert acl.refused_filters(["a", "b/#"]) == ["a", "b/#"]


def test_everything_includes_dollar_topics_and_admin() -> None:
    acl = Acl.everything()
    assert acl.may_publish("$SYS/x") and acl.may_publish("a/b")
    assert acl.may_subscribe("$SYS/#") and acl.may_subscribe("#") and acl.admin
