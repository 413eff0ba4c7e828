"""Matching topic names against topic filters (MQTT 3.1.1 section 4.7), and an index of filters.

Rules (all inputs are assumed already validated by :mod:`.topics`):

* A filter and a topic are compared level by level, levels being separated by ``/``.
* A literal level matches only the identical level (case-sensitive, empty level included).
* ``+`` matches exactly one level, including an empty one: ``"+/+"`` matches ``"/finance"``.
* ``#`` matches any number of levels, including zero, so it matches the parent level too:
  ``"sport/#"`` matches ``"sport"`` and ``"#"`` matches every topic.
* A filter whose first character is ``+`` or ``#`` never matches a topic whose first character
  is ``$`` (MQTT-4.7.2-1); a filter that spells the ``$`` level out (``"$SYS/#"``) does.

:func:`filter_matches` is the brute-force reference. :class:`FilterIndex` answers the same
question for many filters at once: exact filters live in one flat dict (one entry per filter,
the bare member as value while there is only one), wildcard filters in a trie of levels.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterator
from typing import Final, Generic, TypeVar

__all__ = ["FilterIndex", "filter_matches"]

M = TypeVar("M", bound=Hashable)


def filter_matches(filt: str, topic: str) -> bool:
    """True when the topic name ``topic`` matches the topic filter ``filt``."""
    if topic[:1] == "$" and filt[:1] in ("+", "#"):
        return False
    f_levels = filt.split("/")
    t_levels = topic.split("/")
    n_topic = len(t_levels)
    for i, level in enumerate(f_levels):
        if level == "#":
            # Checked before the length test so that "a/#" matches "a" (zero remaining levels).
            return True
        if i >= n_topic:
            return False
        if level != "+" and level != t_levels[i]:
            return False
    return len(f_levels) == n_topic


class _Node:
    """One level of the wildcard trie.

    ``members`` is the very set stored in ``FilterIndex._wild`` for the filter ``filt`` that
    ends at this node, so the trie walk and the by-name lookups never disagree.
    """

    __slots__ = ("children", "filt", "members")

    def __init__(self) -> None:
        self.children: dict[str, _Node] = {}
        self.filt: str | None = None
        self.members: set[Hashable] | None = None


# Distinguishes "no entry" from a member that happens to be None.
_MISSING: Final = object()


class FilterIndex(Generic[M]):
    """Filter -> set of members, answering "which members want this topic?" quickly.

    Memory layout, because exact routes can number in the millions:

    * ``_exact`` maps each exact filter to its single member *as the bare object*; only a filter
      with two or more members gets a ``set``. Members must therefore never be ``set``
      instances themselves, which hashability already guarantees.
    * wildcard filters are few; they live in ``_wild`` (filter -> set) plus a trie whose nodes
      share those sets, and the trie root only exists while there is a wildcard filter.
    """

    __slots__ = ("_exact", "_root", "_routes", "_wild")

    def __init__(self) -> None:
        self._exact: dict[str, object] = {}
        self._wild: dict[str, set[M]] = {}
        self._root: _Node | None = None
        self._routes = 0

    # -- sizes -------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self._exact) + len(self._wild)

    @property
    def route_count(self) -> int:
        """Number of (filter, member) pairs."""
        return self._routes

    @property
    def wildcard_count(self) -> int:
        """Number of wildcard filters."""
        return len(self._wild)

    # -- mutation ----------------------------------------------------------------------------

    def add(self, filt: str, member: M) -> bool:
        """Add ``member`` to ``filt``; True if it was not already there."""
        if "+" in filt or "#" in filt:
            return self._add_wild(filt, member)
        exact = self._exact
        cur = exact.get(filt, _MISSING)
        if cur is _MISSING:
            exact[filt] = member
        elif type(cur) is set:
            if member in cur:
                return False
            cur.add(member)
        elif cur == member:
            return False
        else:
            exact[filt] = {cur, member}
        self._routes += 1
        return True

    def _add_wild(self, filt: str, member: M) -> bool:
        members = self._wild.get(filt)
        if members is None:
            node = self._root
            if node is None:
                node = self._root = _Node()
            for level in filt.split("/"):
                child = node.children.get(level)
                if child is None:
                    child = node.children[level] = _Node()
                node = child
            members = self._wild[filt] = set()
            node.filt = filt
            node.members = members  # type: ignore[assignment]
        elif member in members:
            return False
        members.add(member)
        self._routes += 1
        return True

    def remove(self, filt: str, member: M) -> bool:
        """Remove ``member`` from ``filt``; True if it was there. Empty filters are dropped."""
        if "+" in filt or "#" in filt:
            return self._remove_wild(filt, member)
        exact = self._exact
        cur = exact.get(filt, _MISSING)
        if cur is _MISSING:
            return False
        if type(cur) is set:
            if member not in cur:
                return False
            cur.discard(member)
            if len(cur) == 1:
                # Back to the bare-member form: a one-element set costs ~200 bytes per route.
                exact[filt] = next(iter(cur))
        elif cur == member:
            del exact[filt]
        else:
            return False
        self._routes -= 1
        return True

    def _remove_wild(self, filt: str, member: M) -> bool:
        members = self._wild.get(filt)
        if members is None or member not in members:
            return False
        members.discard(member)
        self._routes -= 1
        if not members:
            del self._wild[filt]
            self._prune(filt)
        return True

    def _prune(self, filt: str) -> None:
        """Forget the trie path of ``filt`` (which has no members left), keeping shared prefixes."""
        node = self._root
        assert node is not None
        path: list[tuple[_Node, str]] = []
        for level in filt.split("/"):
            path.append((node, level))
            node = node.children[level]
        node.filt = None
        node.members = None
        for parent, level in reversed(path):
            child = parent.children[level]
            if child.children or child.members:
                break
            del parent.children[level]
        if not self._root.children:
            self._root = None

    def remove_member(self, member: M) -> list[str]:
        """Remove ``member`` from every filter; return the filters left without any member."""
        emptied: list[str] = []
        exact = self._exact
        collapse: list[tuple[str, object]] = []
        removed = 0
        for filt, cur in exact.items():
            if type(cur) is set:
                if member in cur:
                    cur.discard(member)
                    removed += 1
                    if len(cur) == 1:
                        collapse.append((filt, next(iter(cur))))
            elif cur == member:
                emptied.append(filt)
                removed += 1
        # Deferred so the dict is never resized while it is being iterated.
        for filt in emptied:
            del exact[filt]
        for filt, only in collapse:
            exact[filt] = only
        self._routes -= removed
        # _remove_wild keeps _routes right by itself.
        for filt in [f for f, ms in self._wild.items() if member in ms]:
            self._remove_wild(filt, member)
            if filt not in self._wild:
                emptied.append(filt)
        return emptied

    # -- queries -----------------------------------------------------------------------------

    def wild_under(self, head: str) -> bool:
        """True when a wildcard filter may match a topic whose first level is ``head`` (one starts with ``head``,
        ``+`` or ``#``); False means none does (exact filters aside)."""
        root = self._root
        if root is None:
            return False
        children = root.children
        return head in children or "+" in children or "#" in children

    def has_filter(self, filt: str) -> bool:
        return filt in self._exact or filt in self._wild

    def members(self, filt: str) -> frozenset[M]:
        """The members subscribed with exactly this filter (no matching involved)."""
        cur = self._exact.get(filt, _MISSING)
        if cur is _MISSING:
            return frozenset(self._wild.get(filt, ()))
        if type(cur) is set:
            return frozenset(cur)
        return frozenset((cur,))  # type: ignore[arg-type]

    def filters(self) -> Iterator[str]:
        yield from self._exact
        yield from self._wild

    def items(self) -> Iterator[tuple[str, frozenset[M]]]:
        for filt, cur in self._exact.items():
            if type(cur) is set:
                yield filt, frozenset(cur)
            else:
                yield filt, frozenset((cur,))  # type: ignore[arg-type]
        for filt, members in self._wild.items():
            yield filt, frozenset(members)

    def match(self, topic: str) -> set[M]:
        """Union of the members of every filter that matches the topic name ``topic``."""
        cur = self._exact.get(topic, _MISSING)
        if cur is _MISSING:
            out: set[M] = set()
        elif type(cur) is set:
            out = set(cur)
        else:
            out = {cur}  # type: ignore[arg-type]
        if self._root is not None:
            for node in self._walk(topic):
                out.update(node.members)  # type: ignore[arg-type]
        return out

    def matching_filters(self, topic: str) -> list[str]:
        """Every filter (exact or wildcard) that matches the topic name ``topic``."""
        found = [topic] if topic in self._exact else []
        if self._root is not None:
            found.extend(node.filt for node in self._walk(topic))  # type: ignore[misc]
        return found

    def _walk(self, topic: str) -> list[_Node]:
        """Trie nodes of the wildcard filters matching ``topic`` (each node has members)."""
        root = self._root
        assert root is not None
        levels = topic.split("/")
        n = len(levels)
        hits: list[_Node] = []
        # Iterative depth-first walk: a branch per '+' child, '#' children are terminal hits.
        if topic[:1] == "$":
            # MQTT-4.7.2-1: the root's '+' and '#' must not match a '$' level.
            child = root.children.get(levels[0])
            if child is None:
                return hits
            stack = [(child, 1)]
        else:
            stack = [(root, 0)]
        while stack:
            node, i = stack.pop()
            children = node.children
            if i == n:
                if node.members:
                    hits.append(node)
                hash_node = children.get("#")
                if hash_node is not None:
                    # '#' also matches the parent level: "a/#" matches "a".
                    hits.append(hash_node)
                continue
            hash_node = children.get("#")
            if hash_node is not None:
                hits.append(hash_node)
            child = children.get(levels[i])
            if child is not None:
                stack.append((child, i + 1))
            child = children.get("+")
            if child is not None:
                stack.append((child, i + 1))
        return hits
