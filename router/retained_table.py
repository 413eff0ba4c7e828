"""The retained messages a node holds: one :class:`~.retained.RetainedIndex` for all of them, and each shard's topics.

Rules of this file:
* The retained message of topic ``T`` lives in ``T``'s own shard (``shard_for_key(T, S)``: where ``T``'s exact
  routes live), and the owner side moves, snapshots and drops it with the shard: the table keeps each shard's
  topics (a set, created on first use and dropped when empty). A topic belongs to one shard only, so the
  messages themselves sit in one index for the whole node: a wildcard subscribe is one index query however many
  shards the node holds (with an index per shard it was one per shard, ~2,700 on a 3-node cluster of 4,096
  shards: ~20 ms whatever matched), and posting lists are shared by all shards (memory per message).
* A :class:`RetainedMessage` holds the payload, its qos and the writer's order stamp ``(shard epoch, seq)``: the
  shard's primary stamps every write it accepts (one writer per shard). A copy is replaced only by a write with
  a stamp at least as new, so a write that reached a replica twice (direct and relayed) cannot undo a newer one.
* ``bytes`` counts payload plus topic of every message held, which the node bounds (``max_retained_bytes``).
* ``journal``: when set (a list), every change the table makes is appended to it, as the node's store wants it
  (``protocol.durable.Change``): ``("retained", shard, topic, qos, epoch, seq, payload)``, ``("retained_del",
  shard, topic)``, ``("retained_drop", shard)``. Whatever writes through the table (retained messages, the
  session directory, any other record kept here) is stored alike.
* Pure: nothing here knows nodes, epochs of the assignment or frames.
"""

from __future__ import annotations

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
    """Retained messages by topic, in one node-wide index, and the topics of each shard."""

    __slots__ = ("_index", "_topics", "bytes", "journal")

    def __init__(self) -> None:
        self._index: RetainedIndex[RetainedMessage] = RetainedIndex()
        self._topics: dict[int, set[str]] = {}  # shard -> its topics held here
        self.bytes = 0
        self.journal: list[tuple[object, ...]] | None = None  # the store's changes (see the rules), when kept

    def __len__(self) -> int:
        return len(self._index)

    @staticmethod
    def cost(topic: str, payload: bytes) -> int:
        return len(topic) + len(payload)

    def get(self, shard: int, topic: str) -> RetainedMessage | None:
        topics = self._topics.get(shard)
        return None if topics is None or topic not in topics else self._index.get(topic)

    def growth(self, shard: int, topic: str, payload: bytes) -> int:
        """Bytes held more after storing ``payload`` as ``topic``'s retained message (negative: fewer)."""
        old = self.get(shard, topic)
        return self.cost(topic, payload) - (self.cost(topic, old.payload) if old is not None else 0)

    def set(self, shard: int, topic: str, message: RetainedMessage) -> bool:
        """Store unless the copy held has a newer stamp; True when stored."""
        old = self.get(shard, topic)
        if old is not None:
            if old.stamp > message.stamp:
                return False
            self.bytes -= self.cost(topic, old.payload)
        topics = self._topics.get(shard)
        if topics is None:
            topics = self._topics[shard] = set()
        self._index.set(topic, message)
        topics.add(topic)
        self.bytes += self.cost(topic, message.payload)
        if self.journal is not None:
            self.journal.append(("retained", shard, topic, message.qos, *message.stamp, message.payload))
        return True

    def delete(self, shard: int, topic: str, stamp: Stamp | None = None) -> bool:
        """Forget the topic's message unless the copy held is newer than ``stamp``; True when one was removed."""
        old = self.get(shard, topic)
        if old is None or (stamp is not None and old.stamp > stamp):
            return False
        self._forget(shard, topic, old)
        if self.journal is not None:
            self.journal.append(("retained_del", shard, topic))
        return True

    def _forget(self, shard: int, topic: str, old: RetainedMessage) -> None:
        self._index.delete(topic)
        self.bytes -= self.cost(topic, old.payload)
        topics = self._topics[shard]
        topics.discard(topic)
        if not topics:
            del self._topics[shard]

    def match(self, filt: str) -> list[tuple[str, RetainedMessage]]:
        """Every message held here, in any shard, whose topic ``filt`` matches, sorted by topic: one index query
        (``RetainedIndex.match``), not one per shard held."""
        return self._index.match(filt)

    def shard_items(self, shard: int) -> list[tuple[str, RetainedMessage]]:
        """The shard's messages, sorted by topic (snapshots must be deterministic)."""
        index = self._index
        return [(topic, index.get(topic)) for topic in sorted(self._topics.get(shard, ()))]  # type: ignore[misc]

    def count(self, shard: int) -> int:
        return len(self._topics.get(shard, ()))

    def drop_shard(self, shard: int) -> int:
        """Forget a shard's messages; returns how many there were."""
        topics = self._topics.get(shard)
        if topics is None:
            return 0
        count = len(topics)
        for topic in list(topics):
            message = self._index.get(topic)
            assert message is not None
            self._forget(shard, topic, message)
        if self.journal is not None:
            self.journal.append(("retained_drop", shard))
        return count

    def held_shards(self) -> list[int]:
        return sorted(self._topics)
