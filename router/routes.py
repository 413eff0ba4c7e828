"""The route table: which nodes want which filters, partitioned by shard.

Rules:

* A route is a (shard, filter, node) triple; the same (filter, node) may exist in several
  shards, and each shard keeps its own :class:`~.matching.FilterIndex`.
* Shard :data:`RouteTable.ROOT` (``-1``) holds the root set: filters whose first level is a
  wildcard, which every node keeps because they can match a topic of any shard.
* Shards are created on first use and forgotten as soon as their last route goes, so an idle
  shard costs nothing.
* Node ids are interned on insertion: millions of routes then share one string per node.
* The table does not validate filters, nor decide which shard a filter belongs to; callers do
  that with :mod:`.topics` and :mod:`.partition` first.
* A shared subscription's slot route (:mod:`.shared`: its wire filter holds a NUL) is stored under its FILTER with
  the member ``node NUL share NUL slot``, so matching a topic returns it beside the plain node ids; ``remove_node``
  removes a node's slot members too.
* A persistent session's route (``node NUL NUL client_id``, :mod:`.shared`) is stored the same way; when its node
  leaves, ``retarget_sessions`` moves it to the node that adopts the session instead of dropping it (see there).
* ``version`` changes with every mutation (a call that may have changed a route), so a caller can keep
  answers it derived from the table (an entry node's resolved topics) and know when they may be stale.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Final

from .matching import FilterIndex
from .shared import SEP, SESSION_MARK, member_session, route_filter_of, slot_member

__all__ = ["RouteTable"]


class RouteTable:
    """Routes (filter -> nodes) grouped by shard id."""

    __slots__ = ("_shards", "_shared_shards", "version")

    ROOT: Final = -1

    def __init__(self) -> None:
        self._shards: dict[int, FilterIndex[str]] = {}
        self._shared_shards: set[int] = set()  # shards that got a slot route (``remove_node`` looks there only)
        self.version = 0

    # -- mutation ----------------------------------------------------------------------------

    def add(self, shard: int, filt: str, node: str) -> bool:
        """Add a route; True if it is new. ``filt`` may be a shared subscription's slot route (see the rules)."""
        self.version += 1
        if SEP in filt:
            filt, node = route_filter_of(filt), slot_member(node, filt)
        if SEP in node:  # a slot route, given as such or as its stored member (a hand-off's SNAPSHOT)
            self._shared_shards.add(shard)
        index = self._shards.get(shard)
        if index is None:
            index = self._shards[shard] = FilterIndex()
        return index.add(filt, sys.intern(node))

    def remove(self, shard: int, filt: str, node: str) -> bool:
        """Remove a route; True if it existed."""
        self.version += 1
        if SEP in filt:
            filt, node = route_filter_of(filt), slot_member(node, filt)
        index = self._shards.get(shard)
        if index is None or not index.remove(filt, node):
            return False
        if not len(index):
            del self._shards[shard]
        return True

    def has(self, shard: int, filt: str, node: str) -> bool:
        if SEP in filt:
            filt, node = route_filter_of(filt), slot_member(node, filt)
        index = self._shards.get(shard)
        return index is not None and node in index.members(filt)

    def drop_shard(self, shard: int) -> int:
        """Forget every route of ``shard`` (e.g. after handing it off); return how many."""
        self.version += 1
        index = self._shards.pop(shard, None)
        return 0 if index is None else index.route_count

    def retarget_sessions(self, node: str, target_of: Callable[[str], str | None]) -> dict[int, int]:
        """Move the session routes of ``node`` (it left the cluster) to ``target_of(client_id)``, the node that
        adopts that session, as ``target NUL NUL client_id NUL origin`` (origin: the node that held it, kept when
        the route was moved before); a session without a target loses its route. Returns shard -> routes moved,
        for the shards that changed. Call it before ``remove_node``."""
        moved: dict[int, int] = {}
        prefix = node + SESSION_MARK
        for shard in list(self._shared_shards):
            index = self._shards.get(shard)
            if index is None:
                continue
            for filt, members in list(index.items()):
                for member in members:
                    if not (isinstance(member, str) and member.startswith(prefix)):
                        continue
                    found = member_session(member)
                    assert found is not None
                    client_id, origin = found
                    index.remove(filt, member)
                    target = target_of(client_id)
                    if target is not None:
                        index.add(filt, sys.intern(f"{target}{SESSION_MARK}{client_id}{SEP}{origin or node}"))
                    moved[shard] = moved.get(shard, 0) + 1
            if not len(index):
                del self._shards[shard]
        if moved:
            self.version += 1
        return moved

    def remove_node(self, node: str) -> int:
        """Remove every route of a node that left the cluster; return how many were removed."""
        self.version += 1
        removed = 0
        prefix = node + SEP
        for shard in list(self._shards):
            index = self._shards[shard]
            before = index.route_count
            index.remove_member(node)
            if shard in self._shared_shards:
                for filt, members in list(index.items()):
                    for member in members:
                        if isinstance(member, str) and member.startswith(prefix):
                            index.remove(filt, member)
            removed += before - index.route_count
            if not len(index):
                del self._shards[shard]
        return removed

    # -- queries -----------------------------------------------------------------------------

    def match(self, shard: int, topic: str) -> set[str]:
        """Nodes with a route in ``shard`` whose filter matches the topic name ``topic``."""
        index = self._shards.get(shard)
        if index is None:
            return set()
        return index.match(topic)

    def wild_under(self, shard: int, head: str) -> bool:
        """False when no wildcard filter of ``shard`` can match a topic whose first level is ``head``."""
        index = self._shards.get(shard)
        return index is not None and index.wild_under(head)

    def shard_routes(self, shard: int) -> list[tuple[str, tuple[str, ...]]]:
        """A snapshot of the shard's routes, sorted so two snapshots compare equal."""
        index = self._shards.get(shard)
        if index is None:
            return []
        return sorted((filt, tuple(sorted(nodes))) for filt, nodes in index.items())

    def shards(self) -> list[int]:
        """Shard ids that currently hold at least one route, ascending (ROOT first)."""
        return sorted(self._shards)

    @property
    def route_count(self) -> int:
        """Total number of (shard, filter, node) routes."""
        return sum(index.route_count for index in self._shards.values())

    def route_count_of(self, shard: int) -> int:
        index = self._shards.get(shard)
        return 0 if index is None else index.route_count

    @property
    def filter_count(self) -> int:
        """Total number of (shard, filter) entries."""
        return sum(len(index) for index in self._shards.values())

    @property
    def root_size(self) -> int:
        """Number of filters in the root set."""
        index = self._shards.get(self.ROOT)
        return 0 if index is None else len(index)
