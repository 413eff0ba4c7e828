"""The two ends of a hand-off, as pure state machines: the source that streams a shard, the target that fills it.

A move (``coordinator.StartHandoff``) copies one shard's routes from a current owner (the source) to new
replicas (the targets). The node's owner side (``shardmq.protocol.owner``) feeds these machines the frames and
the assignment views it gets, and sends what they decide; they never send, read a clock or touch etcd.

Rules of this file:
- Source. ``begin`` opens (or widens) the shard's change stream for a move at one shard epoch. From then on,
  every route change the source applies directly for that shard is relayed to the stream's targets
  (``relay_targets``), so a target that took the snapshot misses nothing. The stream ends ``grace`` after the
  assignment shows the flip (``flipped``: stale senders still reach the old owner meanwhile), or when the
  coordinator abandoned the move and it never flipped (``stop_abandoned``, checked against the move id: a newer
  move through the same stream is not stopped by an older move's timer).
- The snapshot goes in chunks of ``SNAPSHOT_CHUNK`` routes (or the ``chunk`` given); only the last says
  ``last``, and a target reports ready (HANDOFF_READY to the coordinator) on it.
- Target. A snapshot for a move it does not hold yet starts a fill (``take_snapshot``); only that move's source
  may forward changes for the shard to it (``may_forward``). After the flip it keeps accepting the source's
  forwards for twice the grace (the source streams until it sees the flip plus its grace). A fill that never
  flipped is abandoned only on a fresh read of the assignment (the caller's job): the view may lag the flip.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

SNAPSHOT_CHUNK = 5000


@dataclass(slots=True)
class Stream:
    """A hand-off source's change stream: route changes for the shard also go to ``targets``."""

    targets: set[str]
    shard_epoch: int  # the shard's epoch when the hand-off started; a higher one means the flip happened
    move_id: int = 0  # the latest move streaming through it (an abandoned move's timer must not stop a newer one)


class HandoffSource:
    def __init__(self) -> None:
        self.streams: dict[int, Stream] = {}

    def __contains__(self, shard: int) -> bool:
        return shard in self.streams

    def __bool__(self) -> bool:
        return bool(self.streams)

    def begin(self, shard: int, shard_epoch: int, move_id: int, targets: list[str]) -> None:
        stream = self.streams.get(shard)
        if stream is None or stream.shard_epoch != shard_epoch:
            stream = self.streams[shard] = Stream(set(), shard_epoch)
        stream.targets.update(targets)
        stream.move_id = move_id

    @staticmethod
    def snapshot_chunks(
        routes: list[list[Any]], chunk: int = SNAPSHOT_CHUNK
    ) -> Iterator[tuple[list[list[Any]], bool]]:
        """(chunk of [filter, [nodes]] routes, last) in order; an empty shard is one empty, last chunk."""
        for start in range(0, max(len(routes), 1), chunk):
            yield routes[start : start + chunk], start + chunk >= len(routes)

    def relay_targets(self, shard: int) -> set[str] | None:
        stream = self.streams.get(shard)
        return None if stream is None else stream.targets

    def flipped(self, epoch_of: Any) -> list[tuple[int, int]]:
        """(shard, stream epoch) of every stream whose shard the assignment (``epoch_of(shard)``) shows flipped."""
        return [(s, st.shard_epoch) for s, st in self.streams.items() if epoch_of(s) > st.shard_epoch]

    def stop(self, shard: int, shard_epoch: int) -> bool:
        """End the stream opened at ``shard_epoch`` (its flip's grace is over); False if another replaced it."""
        stream = self.streams.get(shard)
        if stream is None or stream.shard_epoch != shard_epoch:
            return False
        del self.streams[shard]
        return True

    def stop_abandoned(self, shard: int, shard_epoch: int, move_id: int, current_epoch: int) -> bool:
        """End the stream of a move the coordinator gave up on, if it is still that move's and never flipped."""
        stream = self.streams.get(shard)
        if stream is None or (stream.shard_epoch, stream.move_id) != (shard_epoch, move_id):
            return False
        if current_epoch != shard_epoch:
            return False
        del self.streams[shard]
        return True


class HandoffTarget:
    def __init__(self) -> None:
        self.incoming: dict[int, int] = {}  # shard -> move id of a fill in progress
        self.sources: dict[int, str] = {}  # shard -> the source streaming it to us (may forward changes)

    def __contains__(self, shard: int) -> bool:
        return shard in self.incoming

    def __bool__(self) -> bool:
        return bool(self.incoming)

    def take_snapshot(self, shard: int, move_id: int, source: str) -> bool:
        """A snapshot chunk arrived; True when it starts a fill (the caller sets the fill's abandon timer)."""
        if self.incoming.get(shard) == move_id:
            return False
        self.incoming[shard] = move_id
        self.sources[shard] = source
        return True

    def may_forward(self, shard: int, sender: str) -> bool:
        return self.sources.get(shard) == sender

    def flipped(self, shard: int) -> str | None:
        """The assignment made us an owner of ``shard``: the fill is done; returns its source (whose forwards
        are still taken for a while), or None if we were not filling it."""
        if self.incoming.pop(shard, None) is None:
            return None
        return self.sources.get(shard)

    def forget_source(self, shard: int, source: str) -> None:
        if self.sources.get(shard) == source:
            del self.sources[shard]

    def still_filling(self, shard: int, move_id: int) -> bool:
        return self.incoming.get(shard) == move_id

    def abandon(self, shard: int, move_id: int, source: str) -> bool:
        """Give up a fill that never flipped (decided on a fresh assignment read); True if it was still open."""
        if self.incoming.get(shard) != move_id:
            return False
        del self.incoming[shard]
        self.forget_source(shard, source)
        return True
