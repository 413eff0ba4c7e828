"""The retained messages a node holds, per shard: one :class:`~.retained.RetainedIndex` each.

Rules of this file:
* The retained message of topic ``T`` lives in ``T``'s own shard (``shard_for_key(T, S)``: where ``T``'s exact
  routes live), so the owner side keeps one index per shard next to its route table and moves, snapshots and
  drops it with the shard. An index is created on first use and dropped when empty.
* A :class:`RetainedMessage` holds the payload, its qos and the writer's order stamp ``(shard epoch, seq)``: the
  shard's primary stamps every write it accepts (one writer per shard). A copy is replaced only by a write with
  a stamp at least as new, so a write that reached a replica twice (direct and relayed) cannot undo a newer one.
* ``bytes`` counts payload plus topic of every message held, which the node bounds (``max_retained_bytes``).
* Pure: nothing here knows nodes, epochs of the assignment or frames.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

from .retained import RetainedIndex

__all__ = ["RetainedMessage", "RetainedTable", "Stamp"]

Stamp = tuple[int, int]  # (shard epoch of the writing primary, its sequence number)


@dataclass(frozen=True, slots=True)
class RetainedMessage:
    payload: bytes
    qos: int
    stamp: Stamp


class RetainedTable:
    """shard -> RetainedIndex[RetainedMessage], with the bytes held in all."""

    __slots__ = ("bytes", "shards")

    def __init__(self) -> None:
        self.shards: dict[int, RetainedIndex[RetainedMessage]] = {}
        self.bytes = 0

    def __len__(self) -> int:
        return sum(len(index) for index in self.shards.values())

    @staticmethod
    def cost(topic: str, payload: bytes) -> int:
        return len(topic) + len(payload)

    def get(self, shard: int, topic: str) -> RetainedMessage | None:
        index = self.shards.get(shard)
        return None if index is None else index.get(topic)

    def growth(self, shard: int, topic: str, payload: bytes) -> int:
        """Bytes held more after storing ``payload`` as ``topic``'s retained message (negative: fewer)."""
        old = self.get(shard, topic)
        return self.cost(topic, payload) - (self.cost(topic, old.payload) if old is not None else 0)

    def set(self, shard: int, topic: str, message: RetainedMessage) -> bool:
        """Store unless the copy held has a newer stamp; True when stored."""
        index = self.shards.get(shard)
        if index is None:
            index = self.shards[shard] = RetainedIndex()
        old = index.get(topic)
        if old is not None:
            if old.stamp > message.stamp:
                return False
            self.bytes -= self.cost(topic, old.payload)
        index.set(topic, message)
        self.bytes += self.cost(topic, message.payload)
        return True

    def delete(self, shard: int, topic: str, stamp: Stamp | None = None) -> bool:
        """Forget the topic's message unless the copy held is newer than ``stamp``; True when one was removed."""
        index = self.shards.get(shard)
        old = None if index is None else index.get(topic)
        if index is None or old is None or (stamp is not None and old.stamp > stamp):
            return False
        index.delete(topic)
        self.bytes -= self.cost(topic, old.payload)
        if not len(index):
            del self.shards[shard]
        return True

    def match(self, shard: int, filt: str) -> list[tuple[str, RetainedMessage]]:
        index = self.shards.get(shard)
        return [] if index is None else index.match(filt)

    def shard_items(self, shard: int) -> list[tuple[str, RetainedMessage]]:
        """The shard's messages, sorted by topic (snapshots must be deterministic)."""
        index = self.shards.get(shard)
        return [] if index is None else sorted(index.items())

    def count(self, shard: int) -> int:
        index = self.shards.get(shard)
        return 0 if index is None else len(index)

    def drop_shard(self, shard: int) -> int:
        """Forget a shard's messages; returns how many there were."""
        index = self.shards.pop(shard, None)
        if index is None:
            return 0
        self.bytes -= sum(self.cost(t, m.payload) for t, m in index.items())
        return len(index)

    def held_shards(self) -> Iterator[int]:
        return iter(sorted(self.shards))
