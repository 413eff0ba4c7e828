"""The route cache: lookup answers kept at the entry node, and the owner's record of who keeps them.

A publish asks the owner of each shard its topic can be stored in which nodes have matching routes (LOOKUP, two
hops). For a hot topic the answer rarely changes, so the entry node keeps it and the publish goes straight to
the destination nodes (one hop). Two objects, one per side, both pure (no sockets, clocks or threads):

``RouteCache`` (entry node) rules:
- An answer is stored per (topic, shard) with the shard's epoch at the time the LOOKUP was sent. It is valid only
  while the entry still sees that epoch: a flip (new owners) invalidates it without any message.
- ``invalidate(shards)`` drops every answer for those shards at once, by bumping a per-shard generation instead
  of walking the entries.
- An answer is stored only if no invalidation of its shard (and no ``clear``) happened between sending the
  LOOKUP and the reply (``ticket`` taken at send, checked at ``put``). With per-owner watches and FIFO pipes a
  route change's INVALIDATE always follows the reply it could contradict, so this is a second line: it keeps
  the cache right when a watch was lost, e.g. a reply still in flight while the entry node cleared its cache
  because its etcd lease expired (owners forget the watches of a node they saw leave).
- An answer also expires: ``put`` takes its expiry time, ``get`` the current time (plain numbers the caller
  supplies; the node uses the LOOKUP's send time plus its ``route_cache_ttl``). An owner gives up waiting for an
  INVALIDATE_ACK only after a longer timeout, so an entry node it cannot reach (a partition of that one link)
  has dropped the answer by then on its own: the send time precedes the owner's answer, which precedes the
  route change.
- At most ``capacity`` answers; the least recently stored goes first.
- ``version`` changes with every ``invalidate`` and ``clear``, and ``until`` tells how long a valid answer
  serves without a new ``get`` (its expiry, or its refresh time if not yet claimed): what the entry node needs
  to keep the topics it resolved from these answers (``protocol.entry``) no longer than the answers.
- Refresh ahead: ``put`` may also take a ``refresh_at`` time before the expiry. The first ``claim_refresh`` at or
  after it (on a hit) returns True, once per stored answer, and the caller asks the owner again while the
  answer still serves. A hot topic then never meets an expired answer (and the publishes that would queue
  behind the new LOOKUP); its refreshed answer follows the same rules as any other (epoch, ticket, expiry).

``LookupWatchers`` (owner) rules:
- Answering a LOOKUP registers the asker as a watcher of the shard. A route change in the shard takes (removes
  and returns) its watchers, who are sent INVALIDATE; they register again with their next LOOKUP. One-shot
  watches, as in ZooKeeper: an owner never tracks topics, only which nodes to tell.
- Every INVALIDATE is acknowledged. An added route is confirmed (ROUTE_ACK) only once every INVALIDATE still
  unacknowledged for its shard is: its own, and earlier ones (a removed route's, a flip's), which took the
  watches while the entry may still hold an answer. So once a SUBACK is out no entry node can publish from an
  answer that lacks the new route. A removed route waits for nothing: a stale answer only sends a forward the
  destination drops.

Together, with FIFO delivery between each pair of nodes (an owner's LOOKUP_REPLY and INVALIDATE to one entry
node travel the same pipe): whatever order a LOOKUP and a route change meet at the owner, the entry either gets
an answer that includes the change, or gets the INVALIDATE after the answer.
"""

from __future__ import annotations

from collections.abc import Iterable

__all__ = ["LookupWatchers", "RouteCache"]


class RouteCache:
    """Entry side: (topic, shard) -> the nodes with matching routes, valid for one shard epoch."""

    __slots__ = ("capacity", "_answers", "_generation", "_era", "hits", "misses", "version")

    def __init__(self, capacity: int = 100_000) -> None:
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        # (topic, shard) -> (epoch, ticket, expires, nodes, refresh_at)
        self._answers: dict[tuple[str, int], tuple[int, tuple[int, int], float, tuple[str, ...], float]] = {}
        self._generation: dict[int, int] = {}
        self._era = 0  # bumped by clear(): invalidates every shard at once
        self.hits = 0
        self.misses = 0
        self.version = 0  # bumped by invalidate() and clear()

    def __len__(self) -> int:
        return len(self._answers)

    def get(self, topic: str, shard: int, epoch: int, now: float) -> tuple[str, ...] | None:
        """The cached nodes for ``topic`` in ``shard`` at ``epoch`` and time ``now``, or None (a miss: ask)."""
        answer = self._answers.get((topic, shard))
        if answer is not None and self._valid(answer, shard, epoch, now):
            self.hits += 1
            return answer[3]
        self.misses += 1
        return None

    def _valid(
        self, answer: tuple[int, tuple[int, int], float, tuple[str, ...], float], shard: int, epoch: int, now: float
    ) -> bool:
        return answer[0] == epoch and answer[1] == (self._era, self._generation.get(shard, 0)) and now < answer[2]

    def until(self, topic: str, shard: int) -> float:
        """When the stored answer for ``topic`` in ``shard`` stops serving as is: expired, or due to be refreshed
        (call it after a ``get`` that found it valid)."""
        answer = self._answers.get((topic, shard))
        return float("-inf") if answer is None else min(answer[2], answer[4])

    def claim_refresh(self, topic: str, shard: int, epoch: int, now: float) -> bool:
        """True (once per stored answer) when the answer is valid and its ``refresh_at`` has come: ask again."""
        answer = self._answers.get((topic, shard))
        if answer is None or now < answer[4] or not self._valid(answer, shard, epoch, now):
            return False
        self._answers[(topic, shard)] = (*answer[:4], float("inf"))
        return True

    def ticket(self, shard: int) -> tuple[int, int]:
        """Taken when a LOOKUP is sent; ``put`` stores the reply only if the shard was not invalidated since."""
        return (self._era, self._generation.get(shard, 0))

    def put(
        self,
        topic: str,
        shard: int,
        epoch: int,
        ticket: tuple[int, int],
        expires: float,
        nodes: Iterable[str],
        refresh_at: float | None = None,
    ) -> bool:
        """Store an owner's answer until ``expires`` (to be refreshed from ``refresh_at``, default never); False
        (not stored) when the shard was invalidated after ``ticket``."""
        if ticket != self.ticket(shard) or self.capacity == 0:
            return False
        key = (topic, shard)
        self._answers.pop(key, None)
        if len(self._answers) >= self.capacity:
            del self._answers[next(iter(self._answers))]
        self._answers[key] = (epoch, ticket, expires, tuple(nodes), expires if refresh_at is None else refresh_at)
        return True

    def invalidate(self, shards: Iterable[int]) -> None:
        self.version += 1
        for shard in shards:
            self._generation[shard] = self._generation.get(shard, 0) + 1

    def clear(self) -> None:
        """Forget every answer, including replies still on their way (the owners may have forgotten us)."""
        self._answers.clear()
        self._era += 1
        self.version += 1


class LookupWatchers:
    """Owner side: which nodes may hold cached answers for each shard."""

    __slots__ = ("_by_shard",)

    def __init__(self) -> None:
        self._by_shard: dict[int, set[str]] = {}

    def __len__(self) -> int:
        return sum(len(nodes) for nodes in self._by_shard.values())

    def watch(self, shard: int, node: str) -> None:
        self._by_shard.setdefault(shard, set()).add(node)

    def take(self, shards: Iterable[int]) -> dict[str, list[int]]:
        """Remove the watchers of ``shards``; returns node -> the shards (sorted) it must be told about."""
        told: dict[str, list[int]] = {}
        by_shard = self._by_shard
        wanted = shards if isinstance(shards, (set, frozenset)) else set(shards)
        # After a big flip ``shards`` may be most of the table while few shards are watched: walk the smaller.
        found = wanted & by_shard.keys() if len(wanted) <= len(by_shard) else by_shard.keys() & wanted
        for shard in sorted(found):
            for node in sorted(by_shard.pop(shard)):
                told.setdefault(node, []).append(shard)
        return told

    def forget(self, node: str) -> None:
        """A node left: it has no cache to keep right."""
        for shard in [s for s, nodes in self._by_shard.items() if node in nodes]:
            nodes = self._by_shard[shard]
            nodes.discard(node)
            if not nodes:
                del self._by_shard[shard]
