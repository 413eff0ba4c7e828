"""Immutable map from shard id to its ordered owner nodes.

Rules and invariants:

* A ``ShardMap`` is built once, from (members -> weight, shard_count,
  replication), by the deterministic ``placement.place``; equal inputs give an
  equal map in every process. It is never mutated afterwards, so it can be
  shared between readers without locks and swapped atomically.
* ``owners(s)`` is a non-empty tuple of ``min(replication, len(members))``
  distinct node ids, primary first.
* The key lookup is ``stable_hash64(key) % shard_count`` followed by one tuple
  index: nothing on that path allocates or walks the ring.
* Two maps are equal iff their owner tables are equal.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

from xxhash import xxh3_64_intdigest

from .hashing import shard_for_key
from .placement import place

__all__ = ["DEFAULT_REPLICATION", "DEFAULT_SHARD_COUNT", "ShardMap"]

DEFAULT_SHARD_COUNT = 4096
DEFAULT_REPLICATION = 2


class ShardMap:
    """Shard ownership table; build with :meth:`ShardMap.build`."""

    __slots__ = ("_members", "_owners", "_replication", "_shard_count", "owners_of_key")

    owners_of_key: Callable[[str], tuple[str, ...]]

    def __init__(
        self,
        members: Mapping[str, int],
        shard_count: int,
        replication: int,
        owners: tuple[tuple[str, ...], ...],
    ) -> None:
        # Not validated here: use build(). The constructor exists so that a table
        # produced elsewhere (e.g. a test reference) can be wrapped cheaply.
        self._members = dict(sorted(members.items()))
        self._shard_count = shard_count
        self._replication = replication
        self._owners = owners
        self.owners_of_key = _key_lookup(owners, shard_count)

    @classmethod
    def build(
        cls,
        members: Mapping[str, int],
        shard_count: int = DEFAULT_SHARD_COUNT,
        replication: int = DEFAULT_REPLICATION,
    ) -> ShardMap:
        """Place ``shard_count`` shards with ``replication`` replicas on weighted ``members``."""
        if not members:
            raise ValueError("ShardMap.build needs at least one member, got none")
        if isinstance(shard_count, bool) or not isinstance(shard_count, int) or shard_count < 1:
            raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
        if isinstance(replication, bool) or not isinstance(replication, int) or replication < 1:
            raise ValueError(f"replication must be an int >= 1, got {replication!r}")
        for node_id, weight in members.items():
            if not isinstance(node_id, str) or not node_id:
                raise ValueError(f"member ids must be non-empty str, got {node_id!r}")
            if isinstance(weight, bool) or not isinstance(weight, int) or weight < 1:
                raise ValueError(f"weight of member {node_id!r} must be an int >= 1, got {weight!r}")
        return cls(members, shard_count, replication, place(members, shard_count, replication))

    @property
    def members(self) -> dict[str, int]:
        return dict(self._members)

    @property
    def shard_count(self) -> int:
        return self._shard_count

    @property
    def replication(self) -> int:
        return self._replication

    @property
    def table(self) -> tuple[tuple[str, ...], ...]:
        """The owner tuple of every shard, indexed by shard id."""
        return self._owners

    def owners(self, shard_id: int) -> tuple[str, ...]:
        return self._owners[shard_id]

    def primary(self, shard_id: int) -> str:
        return self._owners[shard_id][0]

    def shard_of(self, key: str) -> int:
        return shard_for_key(key, self._shard_count)

    def shards_of(self, node_id: str) -> list[int]:
        return [s for s, owners in enumerate(self._owners) if node_id in owners]

    def primaries_of(self, node_id: str) -> list[int]:
        return [s for s, owners in enumerate(self._owners) if owners[0] == node_id]

    def replica_load(self) -> dict[str, int]:
        load = dict.fromkeys(self._members, 0)
        for owners in self._owners:
            for node_id in owners:
                load[node_id] += 1
        return load

    def primary_load(self) -> dict[str, int]:
        load = dict.fromkeys(self._members, 0)
        for owners in self._owners:
            load[owners[0]] += 1
        return load

    def moved_shards(self, other: ShardMap) -> list[int]:
        """Shards whose owner tuple (membership or order) differs in ``other``."""
        self._check_comparable(other)
        return [s for s, (a, b) in enumerate(zip(self._owners, other._owners, strict=True)) if a != b]

    def moved_replicas(self, other: ShardMap) -> int:
        """Replica slots ``(shard, node)`` that ``other`` has and this map lacks: data to copy."""
        self._check_comparable(other)
        return sum(
            len(set(b).difference(a)) for a, b in zip(self._owners, other._owners, strict=True) if a != b
        )

    def _check_comparable(self, other: ShardMap) -> None:
        if other._shard_count != self._shard_count:
            raise ValueError(
                "cannot compare maps with different shard counts "
                f"({self._shard_count} vs {other._shard_count})"
            )

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, ShardMap):
            return NotImplemented
        return self._owners == other._owners

    def __hash__(self) -> int:
        return hash(self._owners)

    def __repr__(self) -> str:
        return (
            f"ShardMap(members={len(self._members)}, shard_count={self._shard_count}, "
            f"replication={self._replication})"
        )


def _key_lookup(owners: tuple[tuple[str, ...], ...], shard_count: int) -> Callable[[str], tuple[str, ...]]:
    # A closure over locals is ~20 % faster than a method reading self attributes,
    # and this runs once per routed message. str.encode() defaults to UTF-8.
    def owners_of_key(key: str) -> tuple[str, ...]:
        """Owners of the shard ``key`` hashes to: ``owners(shard_of(key))``."""
        return owners[xxh3_64_intdigest(key.encode()) % shard_count]

    return owners_of_key
