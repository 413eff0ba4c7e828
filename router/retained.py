"""Retained messages of one shard, and which of them a subscription's filter matches.

This is the reverse of :class:`~.matching.FilterIndex`: topics are stored, filters ask.

Rules (all inputs are assumed already validated by :mod:`.topics`; matching is :func:`.matching.filter_matches`):

* A topic holds at most one retained value; setting it again replaces the value, ``delete`` removes it.
* ``match(filt)`` returns every stored ``(topic, value)`` whose topic ``filt`` matches, sorted by topic (the
  protocol core must be deterministic, and set order is not).
* Cost of ``match``: a filter without wildcards is one dict lookup. A wildcard filter intersects the posting
  lists of its literal levels (``(position, word)`` -> topics), rarest first, in C (a set intersection walks
  the smaller set), or, for a filter with no literal level (``+/+``, ``#``), takes the topics of the depths it
  can match. Each remaining candidate is checked with ``filter_matches``, in Python. So the Python work grows
  with what the literal levels together allow, which is what matches but for depth and the ``$`` rule, and the
  C work with the rarest literal's list; never the whole store unless the filter is ``#``-like. ``a/+/x`` with
  no ``x`` at level 2 costs nothing, however many topics sit under ``a`` (the case that made EMQX scan).
* Memory: each topic is interned once and referenced from its value entry, one posting list per level and its
  depth list: ``depth + 2`` references per retained message, besides the topic and the value themselves.
* Nothing here knows shards, epochs or nodes; the owner side keeps one index per shard it holds.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from typing import Generic, TypeVar

from .matching import filter_matches

__all__ = ["RetainedIndex"]

V = TypeVar("V")
_MISSING = object()


class RetainedIndex(Generic[V]):
    """Topic -> retained value, with filter queries whose cost follows the rarest literal level."""

    __slots__ = ("_by_depth", "_by_word", "_values")

    def __init__(self) -> None:
        self._values: dict[str, V] = {}
        self._by_word: dict[tuple[int, str], set[str]] = {}  # (level position, word) -> topics
        self._by_depth: dict[int, set[str]] = {}  # number of levels -> topics

    def __len__(self) -> int:
        return len(self._values)

    def __contains__(self, topic: str) -> bool:
        return topic in self._values

    def get(self, topic: str) -> V | None:
        return self._values.get(topic)

    def items(self) -> Iterator[tuple[str, V]]:
        return iter(self._values.items())

    # -- mutation ----------------------------------------------------------------------------

    def set(self, topic: str, value: V) -> bool:
        """Store ``value`` as the topic's retained message; True if the topic held none before."""
        if topic in self._values:
            self._values[topic] = value
            return False
        topic = sys.intern(topic)
        self._values[topic] = value
        levels = topic.split("/")
        by_word = self._by_word
        for position, word in enumerate(levels):
            key = (position, word)
            posting = by_word.get(key)
            if posting is None:
                posting = by_word[key] = set()
            posting.add(topic)
        depth = self._by_depth.get(len(levels))
        if depth is None:
            depth = self._by_depth[len(levels)] = set()
        depth.add(topic)
        return True

    def delete(self, topic: str) -> bool:
        """Forget the topic's retained message; True if there was one."""
        if self._values.pop(topic, _MISSING) is _MISSING:
            return False
        levels = topic.split("/")
        by_word = self._by_word
        for position, word in enumerate(levels):
            key = (position, word)
            posting = by_word[key]
            posting.discard(topic)
            if not posting:
                del by_word[key]
        depth = self._by_depth[len(levels)]
        depth.discard(topic)
        if not depth:
            del self._by_depth[len(levels)]
        return True

    # -- queries -----------------------------------------------------------------------------

    def match(self, filt: str) -> list[tuple[str, V]]:
        """Every stored (topic, value) that ``filt`` matches, sorted by topic."""
        values = self._values
        if "+" not in filt and "#" not in filt:
            return [(filt, values[filt])] if filt in values else []
        topics = sorted(t for t in self._candidates(filt) if filter_matches(filt, t))
        return [(t, values[t]) for t in topics]

    def count_matching(self, filt: str) -> int:
        """How many stored topics ``filt`` matches (what ``match`` would return, without building it)."""
        if "+" not in filt and "#" not in filt:
            return 1 if filt in self._values else 0
        return sum(1 for t in self._candidates(filt) if filter_matches(filt, t))

    def _candidates(self, filt: str) -> Iterator[str] | set[str]:
        """A superset of the matching topics: the smallest posting list the filter's literal levels name."""
        levels = filt.split("/")
        multi = levels[-1] == "#"
        fixed = levels[:-1] if multi else levels
        postings: list[set[str]] = []
        by_word = self._by_word
        for position, word in enumerate(fixed):
            if word == "+":
                continue
            posting = by_word.get((position, word))
            if posting is None:
                return ()
            postings.append(posting)
        if postings:
            postings.sort(key=len)
            found = postings[0]
            for posting in postings[1:]:
                found = found & posting  # C's intersection walks the smaller set: at most the rarest list's size
            return found
        # No literal level: the depths the filter can match ("#" matches its parent level too).
        if not multi:
            return self._by_depth.get(len(fixed), ())  # type: ignore[return-value]
        low = max(len(fixed), 1)
        return (t for depth, topics in self._by_depth.items() if depth >= low for t in topics)
