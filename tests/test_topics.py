"""Validation of topic names and filters against MQTT 3.1.1 section 4.7."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shardmq.router.topics import (
    MAX_TOPIC_BYTES,
    TopicError,
    first_level,
    is_wildcard,
    validate_topic_filter,
    validate_topic_name,
)

LEGAL_NAMES = [
    "a",
    "sport/tennis/player1",
    "/finance",
    "finance/",
    "/",
    "//",
    "a//b",
    "$SYS/broker/clients",
    " spaced level ",
    "ünïcödé/日本語/🙂",
    "A/a",
    "x" * MAX_TOPIC_BYTES,
    "é" * (MAX_TOPIC_BYTES // 2),  # 2 bytes each: 65534 bytes
]

LEGAL_FILTERS = LEGAL_NAMES + [
    "#",
    "+",
    "+/+",
    "/+",
    "+/",
    "sport/#",
    "sport/tennis/+",
    "sport/+/player1",
    "+/tennis/#",
    "/#",
    "+/#",
    "a//+//#",
    "$SYS/#",
    "$SYS/+/x",
    "+/monitor/Clients",
]


@pytest.mark.parametrize("topic", LEGAL_NAMES)
def test_legal_names(topic: str) -> None:
    assert validate_topic_name(topic) is topic


@pytest.mark.parametrize("f", LEGAL_FILTERS)
def test_legal_filters(f: str) -> None:
    assert validate_topic_filter(f) is f


def _reject_name(topic: object) -> TopicError:
    with pytest.raises(TopicError) as info:
        validate_topic_name(topic)  # type: ignore[arg-type]
    assert info.value.code == "invalid_topic"
    assert str(info.value) == info.value.reason
    assert isinstance(info.value, ValueError)
    return info.value


def _reject_filter(f: object) -> TopicError:
    with pytest.raises(TopicError) as info:
        validate_topic_filter(f)  # type: ignore[arg-type]
    assert info.value.code == "invalid_filter"
    assert str(info.value) == info.value.reason
    return info.value


@pytest.mark.parametrize("bad", [None, b"a/b", 3, ["a"]])
def test_non_str_rejected(bad: object) -> None:
    assert "must be a str" in _reject_name(bad).reason
    assert "must be a str" in _reject_filter(bad).reason


def test_empty_rejected() -> None:
    assert "must not be empty" in _reject_name("").reason
    assert "must not be empty" in _reject_filter("").reason


def test_too_long_rejected() -> None:
    long_ascii = "x" * (MAX_TOPIC_BYTES + 1)
    err = _reject_name(long_ascii)
    assert "at most 65535 bytes" in err.reason and "65536 bytes" in err.reason
    # Quoting is truncated so the message stays readable.
    assert len(err.reason) < 300
    _reject_filter(long_ascii)
    # Counted in UTF-8 bytes, not characters: 32768 two-byte characters are 65536 bytes.
    long_utf8 = "é" * (MAX_TOPIC_BYTES // 2 + 1)
    assert len(long_utf8) < MAX_TOPIC_BYTES
    assert "65536 bytes" in _reject_name(long_utf8).reason
    assert "65536 bytes" in _reject_filter(long_utf8).reason


def test_nul_rejected() -> None:
    err = _reject_name("a/\x00b")
    assert "U+0000" in err.reason and "index 2" in err.reason
    assert "U+0000" in _reject_filter("a/\x00/#").reason


def test_lone_surrogate_rejected() -> None:
    err = _reject_name("a/\ud800")
    assert "UTF-8" in err.reason and "U+D800" in err.reason and "index 2" in err.reason
    assert "U+DFFF" in _reject_filter("\udfff/#").reason


@pytest.mark.parametrize(
    ("topic", "wildcard", "index"),
    [("+", "+", 0), ("#", "#", 0), ("a/+", "+", 2), ("a/b#", "#", 3), ("sport/tennis/#", "#", 13)],
)
def test_wildcards_in_names_rejected(topic: str, wildcard: str, index: int) -> None:
    err = _reject_name(topic)
    assert f"wildcard {wildcard!r}" in err.reason
    assert f"index {index}" in err.reason
    assert "only allowed in subscription filters" in err.reason


@pytest.mark.parametrize(
    ("f", "level"),
    [("sport+", "sport+"), ("a/b+/c", "b+"), ("+a", "+a"), ("a/++", "++"), ("a/+b/#", "+b")],
)
def test_plus_must_be_whole_level(f: str, level: str) -> None:
    err = _reject_filter(f)
    assert "'+' must occupy a whole level" in err.reason
    assert repr(level) in err.reason


@pytest.mark.parametrize(("f", "level"), [("sport/tennis#", "tennis#"), ("#a", "#a"), ("a/##", "##")])
def test_hash_must_be_whole_level(f: str, level: str) -> None:
    err = _reject_filter(f)
    assert "'#' must occupy a whole level" in err.reason
    assert repr(level) in err.reason


@pytest.mark.parametrize("f", ["sport/tennis/#/ranking", "a/#/b", "#/", "#/#", "/#/"])
def test_hash_must_be_last(f: str) -> None:
    err = _reject_filter(f)
    assert "'#' must be the last level of a filter" in err.reason
    assert repr(f) in err.reason


def test_error_repr_and_attributes() -> None:
    err = TopicError("invalid_filter", "why")
    assert err.code == "invalid_filter" and err.reason == "why" and str(err) == "why"
    assert "invalid_filter" in repr(err)


def test_is_wildcard_and_first_level() -> None:
    assert is_wildcard("+") and is_wildcard("a/#") and is_wildcard("a/+/b")
    assert not is_wildcard("a/b") and not is_wildcard("$SYS")
    assert first_level("a/b/c") == "a"
    assert first_level("abc") == "abc"
    assert first_level("/finance") == ""
    assert first_level("$SYS/x") == "$SYS"


@given(st.text(min_size=1, max_size=40))
def test_name_validation_agrees_with_spec_predicate(s: str) -> None:
    try:
        encoded = s.encode("utf-8")
    except UnicodeEncodeError:
        encoded = None
    legal = encoded is not None and "\x00" not in s and "+" not in s and "#" not in s
    if legal:
        assert validate_topic_name(s) == s
    else:
        _reject_name(s)


@given(st.lists(st.sampled_from(["a", "", "+", "#", "a+", "#b", "$x", "é"]), min_size=1, max_size=6))
def test_filter_validation_agrees_with_spec_predicate(levels: list[str]) -> None:
    f = "/".join(levels)
    legal = f != "" and all(
        (lv == "+" or "+" not in lv) and (lv == "#" and i == len(levels) - 1 or "#" not in lv)
        for i, lv in enumerate(levels)
    )
    if legal:
        assert validate_topic_filter(f) == f
    else:
        _reject_filter(f)
