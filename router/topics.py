"""Topic names and topic filters, validated exactly as MQTT 3.1.1 section 4.7 says.

Rules:

* A topic name or filter is a ``str`` of 1 to 65535 bytes once encoded as UTF-8
  (the length prefix on the wire is a 16-bit integer).
* It must be encodable as UTF-8: lone surrogates (U+D800..U+DFFF) are rejected.
* It must not contain U+0000.
* A topic name (what a PUBLISH carries) contains no wildcard at all: neither ``+`` nor ``#``.
* In a topic filter (what a SUBSCRIBE carries) ``+`` must occupy a whole level, and ``#`` must
  occupy a whole level that is the last level of the filter.
* Levels are separated by ``/``; empty levels are legal (``"a//b"``, ``"/a"``, ``"a/"``).
* Everything else (case, spaces, ``$`` prefixes, control characters) is accepted unchanged:
  the spec only says clients SHOULD avoid them, and the router must not be stricter than the
  peers it serves.

Every rejection raises :class:`TopicError`, whose ``code`` is machine-readable
(``"invalid_topic"`` or ``"invalid_filter"``) and whose ``reason`` says what is wrong and how
to fix it.
"""

from __future__ import annotations

from typing import Final, Literal

__all__ = [
    "MAX_TOPIC_BYTES",
    "TopicError",
    "first_level",
    "is_wildcard",
    "validate_topic_filter",
    "validate_topic_name",
]

MAX_TOPIC_BYTES: Final = 65535

TopicErrorCode = Literal["invalid_topic", "invalid_filter"]

# Reasons quote the offending string; a 64 KiB topic quoted in full would drown the log line.
_SHOW_CHARS: Final = 60


class TopicError(ValueError):
    """A topic name or filter that MQTT 3.1.1 section 4.7 forbids."""

    code: TopicErrorCode
    reason: str

    def __init__(self, code: TopicErrorCode, reason: str) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason

    def __str__(self) -> str:
        return self.reason

    def __repr__(self) -> str:
        return f"TopicError({self.code!r}, {self.reason!r})"


def _show(s: str) -> str:
    if len(s) <= _SHOW_CHARS:
        return repr(s)
    return repr(s[:_SHOW_CHARS]) + f"... ({len(s)} characters)"


def _check_common(s: object, code: TopicErrorCode, what: str) -> str:
    """The limits shared by names and filters; returns ``s`` typed as str."""
    if not isinstance(s, str):
        raise TopicError(code, f"a topic {what} must be a str, not {type(s).__name__}: {s!r}")
    if not s:
        raise TopicError(code, f"a topic {what} must not be empty; use at least one character")
    try:
        size = len(s.encode("utf-8"))
    except UnicodeEncodeError as exc:
        raise TopicError(
            code,
            f"a topic {what} must be valid UTF-8, but it contains the lone surrogate "
            f"U+{ord(s[exc.start]):04X} at index {exc.start}: {_show(s)}",
        ) from None
    if size > MAX_TOPIC_BYTES:
        raise TopicError(
            code,
            f"a topic {what} must be at most {MAX_TOPIC_BYTES} bytes in UTF-8, "
            f"but it is {size} bytes: {_show(s)}",
        )
    nul = s.find("\x00")
    if nul >= 0:
        raise TopicError(
            code,
            f"a topic {what} must not contain the null character U+0000 (found at index {nul}); "
            f"remove it: {_show(s)}",
        )
    return s


def validate_topic_name(topic: str) -> str:
    """Return ``topic`` if it is a legal topic name for PUBLISH, else raise :class:`TopicError`."""
    _check_common(topic, "invalid_topic", "name")
    for ch in "+#":
        pos = topic.find(ch)
        if pos >= 0:
            raise TopicError(
                "invalid_topic",
                f"a topic name must not contain the wildcard {ch!r} (found at index {pos}); "
                f"wildcards are only allowed in subscription filters: {_show(topic)}",
            )
    return topic


def validate_topic_filter(f: str) -> str:
    """Return ``f`` if it is a legal topic filter for SUBSCRIBE, else raise :class:`TopicError`."""
    _check_common(f, "invalid_filter", "filter")
    # The common case (no wildcard) needs no split at all.
    if "+" not in f and "#" not in f:
        return f
    levels = f.split("/")
    last = len(levels) - 1
    for i, level in enumerate(levels):
        if level == "+":
            continue
        if level == "#":
            if i != last:
                raise TopicError(
                    "invalid_filter",
                    f"'#' must be the last level of a filter (level {i} of {last + 1}): {_show(f)}",
                )
            continue
        if "+" in level:
            raise TopicError(
                "invalid_filter",
                f"'+' must occupy a whole level of a filter, but level {i} is {level!r}; "
                f"put '+' between slashes: {_show(f)}",
            )
        if "#" in level:
            raise TopicError(
                "invalid_filter",
                f"'#' must occupy a whole level of a filter, but level {i} is {level!r}; "
                f"write it as '/#' at the end: {_show(f)}",
            )
    return f


def is_wildcard(f: str) -> bool:
    """True when the filter contains ``+`` or ``#`` (assumes ``f`` is a validated filter)."""
    return "+" in f or "#" in f


def first_level(topic: str) -> str:
    """The text before the first ``/`` (the whole string when it has a single level)."""
    return topic.partition("/")[0]
