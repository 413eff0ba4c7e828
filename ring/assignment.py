"""The current, versioned shard ownership document (what etcd stores), as an immutable value.

``ShardMap`` is where shards *should* live; an ``Assignment`` is where they *do* live right now. The rebalancer
moves each shard from the second towards the first one ownership flip at a time.

Rules and invariants:

* An ``Assignment`` is immutable. Every change goes through ``with_states``, which returns a new document with
  ``version + 1``; ``version`` therefore counts changes and is what an etcd compare-and-swap compares. A call that
  changes nothing returns the same document (no new version: there is nothing to write).
* Per shard, a ``ShardState`` holds ``owners`` (serving replicas holding the shard's full routes, primary first),
  ``epoch`` and ``joining`` (replicas being filled by a hand-off in progress). Always: every id is a non-empty
  ``str``; ``owners`` are distinct; ``joining`` is distinct and disjoint from ``owners``; ``epoch >= 1``; and in a
  document ``len(owners) <= replication``. ``owners`` may be empty only once a shard lost every owner
  (``initial`` never produces that).
* Epochs only rise, and every change of the ``owners`` tuple (membership *or* order, since the primary is the
  first owner) comes with ``epoch + 1`` or more. A change of ``joining`` alone keeps the epoch: it moves no
  ownership, so no request has to be fenced off. ``with_states`` raises ``ValueError`` on any violation and leaves
  the document unchanged.
* ``to_json``/``from_json`` round-trip exactly (states, ``shard_count``, ``replication``, ``version``); equal
  documents serialise to equal bytes. Owners are stored as indices into a sorted node list, which keeps 4096
  shards x R=3 near 70 KB. ``from_json`` checks everything ``with_states`` checks and interns node ids, so a
  loaded document holds one string per node, shared with the route tables.
* Pure: no I/O, clocks, threads or randomness; imports nothing of shardmq outside ``ring``. The caches (the node
  indexes of the last documents asked, derived from the parent's when ``with_states`` made one; the last
  ``to_json`` encoding) only memoize; they are keyed by a per-process serial number that every document, copies
  included, gets anew, and a lock keeps them whole when callers are threads.
"""

from __future__ import annotations

import itertools
import sys
import threading
from bisect import insort
from collections.abc import Iterable, Mapping, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import orjson

__all__ = ["FORMAT_VERSION", "Assignment", "ShardState", "promote_survivors"]

# Bumped only on an incompatible change of the JSON layout; from_json refuses any other value.
FORMAT_VERSION = 1
_JSON_KEYS = frozenset({"format", "shard_count", "replication", "version", "nodes", "owners", "epochs", "joining"})


def _is_int(value: object) -> bool:
    # bool is an int subclass; True as an epoch or shard id is always a bug.
    return isinstance(value, int) and not isinstance(value, bool)


def _check_ids(ids: object, what: str) -> None:
    if not isinstance(ids, tuple):
        raise ValueError(f"{what} must be a tuple of node ids, got {ids!r}")
    for node_id in ids:
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"{what} must hold non-empty str node ids, got {node_id!r}")
    if len(set(ids)) != len(ids):
        raise ValueError(f"{what} must be distinct, got {ids!r}")


@dataclass(frozen=True, slots=True)
class ShardState:
    """One shard's ownership: serving owners (primary first), epoch, and replicas being filled."""

    owners: tuple[str, ...]
    epoch: int
    joining: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        _check_ids(self.owners, "owners")
        _check_ids(self.joining, "joining")
        if not _is_int(self.epoch) or self.epoch < 1:
            raise ValueError(f"epoch must be an int >= 1, got {self.epoch!r}")
        overlap = set(self.owners).intersection(self.joining)
        if overlap:
            raise ValueError(f"joining replicas must not already be owners: {sorted(overlap)}")

    @property
    def primary(self) -> str | None:
        return self.owners[0] if self.owners else None


class Assignment:
    """Versioned shard -> ShardState table. Build with :meth:`initial` or :meth:`from_json`."""

    __slots__ = ("_changed_from", "_replication", "_serial", "_states", "_version")

    _states: tuple[ShardState, ...]
    _replication: int
    _version: int

    def __init__(self, states: Sequence[ShardState], replication: int, version: int) -> None:
        # Validates the whole table; with_states uses _new to check only what changed.
        if not _is_int(replication) or replication < 1:
            raise ValueError(f"replication must be an int >= 1, got {replication!r}")
        if not _is_int(version) or version < 1:
            raise ValueError(f"version must be an int >= 1, got {version!r}")
        states = tuple(states)
        if not states:
            raise ValueError("an assignment needs at least one shard")
        for shard, state in enumerate(states):
            _check_state(shard, state, replication)
        self._states = states
        self._replication = replication
        self._version = version
        self._serial = next(_serials)

    @classmethod
    def _new(cls, states: tuple[ShardState, ...], replication: int, version: int) -> Assignment:
        self = object.__new__(cls)
        self._states = states
        self._replication = replication
        self._version = version
        self._serial = next(_serials)
        return self

    @classmethod
    def initial(cls, table: Sequence[tuple[str, ...]], replication: int) -> Assignment:
        """The first document, from a target table (``ShardMap.table``): every epoch 1, version 1."""
        states = []
        for shard, owners in enumerate(table):
            if not isinstance(owners, tuple) or not owners:
                raise ValueError(f"shard {shard}: initial owners must be a non-empty tuple, got {owners!r}")
            states.append(ShardState(owners, 1))
        return cls(states, replication, 1)

    # --- reading -------------------------------------------------------------

    @property
    def shard_count(self) -> int:
        return len(self._states)

    @property
    def replication(self) -> int:
        return self._replication

    @property
    def version(self) -> int:
        return self._version

    @property
    def states(self) -> tuple[ShardState, ...]:
        return self._states

    @property
    def table(self) -> tuple[tuple[str, ...], ...]:
        """The owner tuple of every shard, comparable with ``ShardMap.table``."""
        return tuple(state.owners for state in self._states)

    def state(self, shard: int) -> ShardState:
        states = self._states
        if type(shard) is int and 0 <= shard < len(states):  # the common case, on every publish: one check
            return states[shard]
        # Explicit range check: a negative index would otherwise silently read another shard.
        if not _is_int(shard) or not 0 <= shard < len(self._states):
            raise IndexError(f"shard must be an int in [0, {len(self._states)}), got {shard!r}")
        return self._states[shard]

    def owners(self, shard: int) -> tuple[str, ...]:
        return self.state(shard).owners

    def primary(self, shard: int) -> str | None:
        return self.state(shard).primary

    def epoch(self, shard: int) -> int:
        return self.state(shard).epoch

    def joining(self, shard: int) -> tuple[str, ...]:
        return self.state(shard).joining

    def _node_index(self) -> dict[str, tuple[list[int], list[int]]]:
        """node -> (shards it owns, shards it is primary of), built once per document: every node of a cluster
        (and of a simulated one, which shares one document among all its nodes) asks for its own shards. Kept
        for the last ``_INDEXES_MAX`` documents only (a simulation keeps every document it committed), and derived
        from the parent's when ``with_states`` made this document from one whose index is kept."""
        serial = self._serial
        index = _indexes.get(serial)
        if index is not None:
            return index
        base = getattr(self, "_changed_from", None)
        parent = _indexes.get(base[0]) if base is not None else None
        if parent is not None:
            index = _updated_index(parent, base[2], self._states, base[1])  # type: ignore[index]
        else:
            index = {}
            for shard, st in enumerate(self._states):
                for position, node_id in enumerate(st.owners):
                    entry = index.get(node_id)
                    if entry is None:
                        entry = index[node_id] = ([], [])
                    entry[0].append(shard)
                    if position == 0:
                        entry[1].append(shard)
        with _indexes_lock:
            _indexes[serial] = index
            while len(_indexes) > _INDEXES_MAX:
                del _indexes[next(iter(_indexes))]
        return index

    def shards_of(self, node_id: str) -> list[int]:
        """Shards ``node_id`` owns (any replica position), ascending."""
        entry = self._node_index().get(node_id)
        return list(entry[0]) if entry else []

    def primaries_of(self, node_id: str) -> list[int]:
        entry = self._node_index().get(node_id)
        return list(entry[1]) if entry else []

    def joining_of(self, node_id: str) -> list[int]:
        """Shards ``node_id`` is being filled with, ascending."""
        return [s for s, st in enumerate(self._states) if node_id in st.joining]

    def nodes(self) -> set[str]:
        """Every node that owns or is joining at least one shard."""
        index = _indexes.get(self._serial)
        if index is None:
            found: set[str] = set()
            for st in self._states:
                found.update(st.owners)
                found.update(st.joining)
            return found
        found = set(index)  # the owners
        for st in self._states:
            if st.joining:
                found.update(st.joining)
        return found

    def load(self) -> dict[str, int]:
        """Owned replicas per node, for every node of :meth:`nodes` (joining-only nodes count 0), sorted by id."""
        load = dict.fromkeys(sorted(self.nodes()), 0)
        for st in self._states:
            for node_id in st.owners:
                load[node_id] += 1
        return load

    def primary_load(self) -> dict[str, int]:
        """Primaries per node, for every node of :meth:`nodes`, sorted by id."""
        load = dict.fromkeys(sorted(self.nodes()), 0)
        for st in self._states:
            if st.owners:
                load[st.owners[0]] += 1
        return load

    def diff(self, other: Assignment) -> list[int]:
        """Shards whose state (owners, epoch or joining) differs in ``other``, ascending."""
        if other.shard_count != self.shard_count:
            raise ValueError(f"cannot diff assignments of {self.shard_count} and {other.shard_count} shards")
        return [s for s, (a, b) in enumerate(zip(self._states, other._states, strict=True)) if a != b]

    # --- changing ------------------------------------------------------------

    def with_states(self, changes: Mapping[int, ShardState]) -> Assignment:
        """A new document with ``changes`` applied and ``version + 1``; ``self`` if nothing changes."""
        states = list(self._states)
        changed: list[int] = []
        for shard, new in changes.items():
            old = self.state(shard)
            if not isinstance(new, ShardState):
                raise ValueError(f"shard {shard}: expected a ShardState, got {new!r}")
            _check_state(shard, new, self._replication)
            if new.epoch < old.epoch:
                raise ValueError(f"shard {shard}: epoch must never decrease ({old.epoch} -> {new.epoch})")
            if new.owners != old.owners and new.epoch == old.epoch:
                # Without a new epoch, a request fenced with the old one would still be accepted by a node
                # that no longer (or not yet) serves the shard.
                raise ValueError(
                    f"shard {shard}: owners change {old.owners!r} -> {new.owners!r} needs epoch > {old.epoch}"
                )
            if new != old:
                states[shard] = new
                changed.append(shard)
        if not changed:
            return self
        doc = Assignment._new(tuple(states), self._replication, self._version + 1)
        # What the caches need to derive this document's index and encoding from ours (serials are never reused).
        parent = self._states
        object.__setattr__(doc, "_changed_from", (self._serial, tuple(changed), {s: parent[s] for s in changed}))
        return doc

    # --- serialisation -------------------------------------------------------

    def to_json(self) -> bytes:
        """Compact, deterministic JSON: owners and joining as indices into the sorted node list."""
        global _last_json
        names = sorted(self.nodes())
        index = {node_id: i for i, node_id in enumerate(names)}
        last = _last_json
        base = getattr(self, "_changed_from", None)
        if last is not None and base is not None and base[0] == last[0] and last[1] == names:
            # Made by with_states from the document serialised last, with the same node list: only the changed
            # shards' owner lists differ (a leader writes each document it commits; at 16,384 shards a full
            # encode of the owners was most of it).
            owners = list(last[2])
            for s in base[1]:
                owners[s] = [index[n] for n in self._states[s].owners]
        else:
            owners = [[index[n] for n in st.owners] for st in self._states]
        _last_json = (self._serial, names, owners)
        # Joining is empty for almost every shard, so it is stored sparsely as [shard, [indices]] pairs.
        doc = {
            "format": FORMAT_VERSION,
            "shard_count": len(self._states),
            "replication": self._replication,
            "version": self._version,
            "nodes": names,
            "owners": owners,
            "epochs": [st.epoch for st in self._states],
            "joining": [[s, [index[n] for n in st.joining]] for s, st in enumerate(self._states) if st.joining],
        }
        return orjson.dumps(doc)

    @classmethod
    def from_json(cls, raw: bytes) -> Assignment:
        """Parse and fully validate a document written by :meth:`to_json`; ``ValueError`` if malformed."""
        doc = orjson.loads(raw)  # orjson.JSONDecodeError is a ValueError
        if not isinstance(doc, dict) or set(doc) != _JSON_KEYS:
            raise ValueError(f"assignment JSON must be an object with keys {sorted(_JSON_KEYS)}")
        if doc["format"] != FORMAT_VERSION or not _is_int(doc["format"]):
            raise ValueError(f"unsupported assignment format {doc['format']!r}")
        shard_count = doc["shard_count"]
        if not _is_int(shard_count) or shard_count < 1:
            raise ValueError(f"shard_count must be an int >= 1, got {shard_count!r}")
        names = doc["nodes"]
        if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
            raise ValueError("nodes must be a list of non-empty strings")
        if len(set(names)) != len(names):
            raise ValueError("nodes must be distinct")
        # Interning here means every shard of every loaded document shares one string per node id.
        interned = [sys.intern(n) for n in names]
        owners, epochs, joining_pairs = doc["owners"], doc["epochs"], doc["joining"]
        if not isinstance(owners, list) or len(owners) != shard_count:
            raise ValueError(f"owners must be a list of {shard_count} index lists")
        if not isinstance(epochs, list) or len(epochs) != shard_count:
            raise ValueError(f"epochs must be a list of {shard_count} ints")
        if not isinstance(joining_pairs, list):
            raise ValueError("joining must be a list of [shard, [indices]] pairs")
        joining: dict[int, tuple[str, ...]] = {}
        for pair in joining_pairs:
            if not isinstance(pair, list) or len(pair) != 2:
                raise ValueError(f"joining entries must be [shard, [indices]], got {pair!r}")
            shard, idx = pair
            if not _is_int(shard) or not 0 <= shard < shard_count or shard in joining:
                raise ValueError(f"joining entry names a bad or repeated shard {shard!r}")
            joining[shard] = _resolve(idx, interned, f"joining of shard {shard}")
            if not joining[shard]:
                # to_json never writes an empty entry; accepting one would break exact round-trips.
                raise ValueError(f"joining entry of shard {shard} is empty")
        states = [
            ShardState(_resolve(owners[s], interned, f"owners of shard {s}"), epochs[s], joining.get(s, ()))
            for s in range(shard_count)
        ]
        result = cls(states, doc["replication"], doc["version"])
        if set(interned) != result.nodes():
            # An unused node name would make to_json(from_json(raw)) != raw.
            raise ValueError("nodes lists an id that no shard uses")
        return result

    # --- value semantics -----------------------------------------------------

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Assignment):
            return NotImplemented
        return (
            self._version == other._version
            and self._replication == other._replication
            and self._states == other._states
        )

    def __hash__(self) -> int:
        return hash((self._version, self._replication, self._states))

    def __reduce__(self) -> tuple[object, ...]:
        # A copy, or a document unpickled in another process, gets a serial of its own: the caches key by serial.
        return (Assignment._new, (self._states, self._replication, self._version))

    def __setattr__(self, name: str, value: object) -> None:
        # Immutable after construction: only the constructors (which run before the slots are set) may write.
        if hasattr(self, name):
            raise AttributeError(f"Assignment is immutable; cannot set {name!r}")
        object.__setattr__(self, name, value)

    def __repr__(self) -> str:
        return (
            f"Assignment(shard_count={len(self._states)}, replication={self._replication}, "
            f"version={self._version}, nodes={len(self.nodes())})"
        )


# Every document gets a serial number (unlike an id, never reused), which the caches below are keyed by.
_serials = itertools.count(1)
# The last document to_json encoded: (serial, its node list, its owners as index lists). Its lists are never
# changed: the next encoding copies the outer list before replacing entries.
_last_json: tuple[int, list[str], list[list[int]]] | None = None
# Node indexes (Assignment._node_index) of the documents asked last, by serial, oldest first.
_indexes: dict[int, dict[str, tuple[list[int], list[int]]]] = {}
_indexes_lock = threading.Lock()
_INDEXES_MAX = 32


def _updated_index(
    index: dict[str, tuple[list[int], list[int]]],
    old: Mapping[int, ShardState],
    new: tuple[ShardState, ...],
    changed: Sequence[int],
) -> dict[str, tuple[list[int], list[int]]]:
    """``Assignment._node_index`` of ``new``, from that of ``old`` and the shards that differ (lists stay sorted)."""
    result = {node_id: (list(owned), list(led)) for node_id, (owned, led) in index.items()}
    for shard in changed:
        before, after = old[shard].owners, new[shard].owners
        if before == after:
            continue
        for position, node_id in enumerate(before):
            entry = result[node_id]
            entry[0].remove(shard)
            if position == 0:
                entry[1].remove(shard)
            if not entry[0]:
                del result[node_id]
        for position, node_id in enumerate(after):
            entry = result.get(node_id)
            if entry is None:
                entry = result[node_id] = ([], [])
            insort(entry[0], shard)
            if position == 0:
                insort(entry[1], shard)
    return result


def _check_state(shard: int, state: object, replication: int) -> None:
    if not isinstance(state, ShardState):
        raise ValueError(f"shard {shard}: expected a ShardState, got {state!r}")
    if len(state.owners) > replication:
        raise ValueError(f"shard {shard}: {len(state.owners)} owners exceed replication {replication}")


def _resolve(indices: object, names: list[str], what: str) -> tuple[str, ...]:
    if not isinstance(indices, list):
        raise ValueError(f"{what} must be a list of node indices, got {indices!r}")
    for i in indices:
        if not _is_int(i) or not 0 <= i < len(names):
            raise ValueError(f"{what}: node index {i!r} out of range")
    return tuple(names[i] for i in indices)


def promote_survivors(a: Assignment, live: AbstractSet[str]) -> dict[int, ShardState]:
    """State changes that drop dead owners from every shard that has one.

    For each shard with an owner not in ``live``: owners keep only the survivors, in order (so the first surviving
    replica becomes primary), dead nodes leave ``joining``, and the epoch rises by 1. A shard with no surviving
    owner gets ``owners=()``: its data is lost, and the caller counts those. Shards whose owners are all live are
    not in the result (even if a dead node is joining them: the hand-off machine aborts that fill). Feed the
    result to ``Assignment.with_states``.
    """
    changes: dict[int, ShardState] = {}
    index = a._node_index()
    dead = [node_id for node_id in index if node_id not in live]
    if not dead:
        return changes
    states = a.states
    # Only the shards of a dead owner change: found through the per-document node index, not a walk of the table.
    for shard in sorted(set().union(*(index[node_id][0] for node_id in dead))):
        st = states[shard]
        changes[shard] = ShardState(
            owners=_keep(st.owners, live),
            epoch=st.epoch + 1,
            joining=_keep(st.joining, live),
        )
    return changes


def _keep(ids: Iterable[str], live: AbstractSet[str]) -> tuple[str, ...]:
    return tuple(node_id for node_id in ids if node_id in live)
