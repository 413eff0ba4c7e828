"""The route cache (``shardmq.router.route_cache``): the pure objects under hypothesis, then a real cluster.

1. ``RouteCache`` against a brute-force reference (a dict that forgets a shard's answers when told to).
2. A state machine of one owner and one entry node joined by two FIFO pipes, with route changes, LOOKUPs,
   INVALIDATEs and flips in any interleaving. Invariant: once every INVALIDATE of an added route has been
   acknowledged (when the owner would send ROUTE_ACK), no cached answer at the entry's current epoch lacks a
   node that has a matching route at the owner.
3. A real 3-node cluster: hot topics take one hop, and a subscriber added after an entry cached an answer gets
   the very next publish.
"""

from __future__ import annotations

import uuid
from collections import Counter, deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardmq.client import Client
from shardmq.router.route_cache import LookupWatchers, RouteCache

TOPICS = ["a", "b", "c"]
SHARDS = [0, 1]
NODES = ["n1", "n2", "n3"]


# ---------------------------------------------------------------------------------------------- 1. reference
class ReferenceCache:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, int], tuple[int, tuple[str, ...]]] = {}
        self.generation: dict[int, int] = {}
        self.era = 0

    def ticket(self, shard: int) -> tuple[int, int]:
        return (self.era, self.generation.get(shard, 0))

    def get(self, topic: str, shard: int, epoch: int) -> tuple[str, ...] | None:
        answer = self.answers.get((topic, shard))
        return answer[1] if answer is not None and answer[0] == epoch else None

    def put(self, topic: str, shard: int, epoch: int, ticket: tuple[int, int], nodes: tuple[str, ...]) -> bool:
        if ticket != self.ticket(shard):
            return False
        self.answers[(topic, shard)] = (epoch, nodes)
        return True

    def invalidate(self, shards: list[int]) -> None:
        for shard in shards:
            self.generation[shard] = self.generation.get(shard, 0) + 1
            for key in [k for k in self.answers if k[1] == shard]:
                del self.answers[key]

    def clear(self) -> None:
        self.answers.clear()
        self.era += 1


_topic = st.sampled_from(TOPICS)
_shard = st.sampled_from(SHARDS)
_epoch = st.integers(0, 2)
_nodes = st.lists(st.sampled_from(NODES), unique=True).map(tuple)
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("get"), _topic, _shard, _epoch),
        st.tuples(st.just("put"), _topic, _shard, _epoch, st.tuples(st.integers(0, 2), st.integers(0, 3)), _nodes),
        st.tuples(st.just("put_now"), _topic, _shard, _epoch, _nodes),
        st.tuples(st.just("invalidate"), st.lists(_shard, max_size=2)),
        st.tuples(st.just("clear")),
    ),
    max_size=60,
)


@given(_ops)
def test_cache_matches_reference(ops: list[tuple[Any, ...]]) -> None:
    cache, ref = RouteCache(capacity=1000), ReferenceCache()
    for op in ops:
        if op[0] == "get":
            assert cache.get(*op[1:]) == ref.get(*op[1:])
        elif op[0] == "put":
            assert cache.put(*op[1:]) == ref.put(*op[1:])
        elif op[0] == "put_now":  # the common case: no invalidation between LOOKUP and reply
            _, topic, shard, epoch, nodes = op
            assert cache.ticket(shard) == ref.ticket(shard)
            assert cache.put(topic, shard, epoch, cache.ticket(shard), nodes)
            ref.put(topic, shard, epoch, cache.ticket(shard), nodes)
        elif op[0] == "clear":
            cache.clear()
            ref.clear()
        else:
            cache.invalidate(op[1])
            ref.invalidate(op[1])
    hits_and_misses = sum(1 for op in ops if op[0] == "get")
    assert cache.hits + cache.misses == hits_and_misses


@given(st.lists(st.tuples(_topic, _shard), max_size=40), st.integers(1, 4))
def test_capacity_bound_keeps_newest(puts: list[tuple[str, int]], capacity: int) -> None:
    cache = RouteCache(capacity=capacity)
    for topic, shard in puts:
        cache.put(topic, shard, 0, cache.ticket(shard), ("n1",))
        assert len(cache) <= capacity
    if puts:
        topic, shard = puts[-1]
        assert cache.get(topic, shard, 0) == ("n1",)


def test_capacity_zero_turns_the_cache_off() -> None:
    cache = RouteCache(capacity=0)
    assert not cache.put("a", 0, 0, cache.ticket(0), ("n1",))
    assert cache.get("a", 0, 0) is None
    with pytest.raises(ValueError, match="capacity"):
        RouteCache(capacity=-1)


def test_watchers_are_one_shot_and_forget_lost_nodes() -> None:
    w = LookupWatchers()
    w.watch(1, "n2")
    w.watch(1, "n3")
    w.watch(2, "n2")
    w.forget("n3")
    assert w.take([1, 2, 3]) == {"n2": [1, 2]}
    assert w.take([1, 2]) == {}
    assert len(w) == 0


# ---------------------------------------------------------------------------------------------- 2. protocol
class CacheProtocol(RuleBasedStateMachine):
    """One owner of SHARDS and one entry node; pipes are FIFO per direction, as zmq is between two nodes."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[int, set[tuple[str, str]]] = {s: set() for s in SHARDS}  # at the owner: (topic, node)
        self.owner_epoch = dict.fromkeys(SHARDS, 1)
        self.entry_epoch = dict.fromkeys(SHARDS, 1)  # the entry's view, which may lag behind a flip
        self.cache = RouteCache(capacity=4)
        self.watchers = LookupWatchers()
        self.to_owner: deque[tuple[Any, ...]] = deque()
        self.to_entry: deque[tuple[Any, ...]] = deque()
        self.lookups: dict[int, tuple[str, int, int, tuple[int, int]]] = {}  # id -> topic, shard, epoch, ticket
        self.unacked: dict[int, int] = {}  # invalidation id -> acks still missing (an add not yet confirmed)
        self.ids = 0

    def _id(self) -> int:
        self.ids += 1
        return self.ids

    def _truth(self, topic: str, shard: int) -> set[str]:
        return {node for t, node in self.routes[shard] if t == topic}

    @rule(topic=_topic, shard=_shard)
    def entry_publishes(self, topic: str, shard: int) -> None:
        if self.cache.get(topic, shard, self.entry_epoch[shard]) is None:
            lid = self._id()
            self.lookups[lid] = (topic, shard, self.entry_epoch[shard], self.cache.ticket(shard))
            self.to_owner.append(("lookup", lid, topic, shard))

    @rule(topic=_topic, shard=_shard, node=st.sampled_from(NODES), add=st.booleans())
    def route_changes(self, topic: str, shard: int, node: str, add: bool) -> None:
        (self.routes[shard].add if add else self.routes[shard].discard)((topic, node))
        told = self.watchers.take([shard])
        iid = self._id() if add and told else 0
        for _node, shards in told.items():
            self.to_entry.append(("invalidate", iid, shards))
        if iid:
            self.unacked[iid] = len(told)

    @rule(shard=_shard)
    def flip(self, shard: int) -> None:
        """New owners at a higher epoch (routes carried over); the old owner tells its watchers, waiting for none."""
        self.owner_epoch[shard] += 1
        for _node, shards in self.watchers.take([shard]).items():
            self.to_entry.append(("invalidate", 0, shards))

    @rule()
    def entry_lease_lost(self) -> None:
        """The owner saw the entry leave (and forgot its watches); the entry, fenced meanwhile, clears its cache
        when it registers again. Replies may still be in flight."""
        self.watchers.forget("entry")
        self.cache.clear()

    @rule(shard=_shard)
    def entry_reads_assignment(self, shard: int) -> None:
        self.entry_epoch[shard] = self.owner_epoch[shard]

    @precondition(lambda self: self.to_owner)
    @rule()
    def owner_receives(self) -> None:
        msg = self.to_owner.popleft()
        if msg[0] == "lookup":
            _, lid, topic, shard = msg
            self.watchers.watch(shard, "entry")
            self.to_entry.append(("reply", lid, self.owner_epoch[shard], sorted(self._truth(topic, shard))))
        else:
            iid = msg[1]
            self.unacked[iid] -= 1
            if not self.unacked[iid]:
                del self.unacked[iid]

    @precondition(lambda self: self.to_entry)
    @rule()
    def entry_receives(self) -> None:
        msg = self.to_entry.popleft()
        if msg[0] == "reply":
            _, lid, epoch, nodes = msg
            topic, shard, asked_epoch, ticket = self.lookups.pop(lid)
            if epoch == asked_epoch:
                self.cache.put(topic, shard, asked_epoch, ticket, nodes)
        else:
            _, iid, shards = msg
            self.cache.invalidate(shards)
            if iid:
                self.to_owner.append(("ack", iid))

    @invariant()
    def confirmed_routes_are_never_missing(self) -> None:
        if self.unacked:
            return  # an add still waits for its INVALIDATE_ACKs: its SUBACK has not gone out yet
        for shard in SHARDS:
            if self.entry_epoch[shard] != self.owner_epoch[shard]:
                continue  # the entry has not read the flip; the node asks with its old epoch and is refused
            for topic in TOPICS:
                answer = self.cache._answers.get((topic, shard))
                valid = self.cache.get(topic, shard, self.entry_epoch[shard])
                if valid is not None:
                    assert answer is not None
                    assert self._truth(topic, shard) <= set(valid), (topic, shard, valid)


TestCacheProtocol = CacheProtocol.TestCase
TestCacheProtocol.settings = settings(max_examples=300, stateful_step_count=60, deadline=None)


# ---------------------------------------------------------------------------------------------- 3. cluster
def unique() -> str:
    return uuid.uuid4().hex[:8]


def counters(client: Client) -> Counter[str]:
    status = client.status()
    return Counter({**status["metrics"], **{f"cache.{k}": v for k, v in status["route_cache"].items()}})


def remote_owned_topic(entry: Client, prefix: str) -> str:
    """A one-level topic whose shard the entry node does not own: its first publish misses the cache.

    One level, so the topic is looked up in exactly one shard (its own; see router.partition).
    """
    for i in range(200):
        topic = f"{prefix}-{i}"
        before = counters(entry)["cache.misses"]
        entry.publish(topic, b"warm", qos=1)
        if counters(entry)["cache.misses"] > before:
            return topic
    raise AssertionError("every topic tried was owned by the entry node")


@pytest.mark.timeout(60)
def test_hot_topic_takes_one_hop(connect) -> None:
    p = unique()
    sub, entry = connect(0), connect(1)
    assert sub.node != entry.node
    topic = remote_owned_topic(entry, p)
    sub.subscribe(topic, qos=1)  # invalidates the entry's cached (empty) answer; the next publish asks again
    entry.publish(topic, b"first", qos=1)
    before = counters(entry)
    for i in range(100):
        entry.publish(topic, str(i).encode(), qos=1)
    after = counters(entry)
    assert after["cache.hits"] - before["cache.hits"] == 100
    assert after["cache.misses"] == before["cache.misses"]
    routed = after["publishes.routed"] - before["publishes.routed"]
    assert routed == 100
    assert after["publishes.hops"] - before["publishes.hops"] == routed  # one forward each, no lookup
    got = [sub.receive(timeout=5) for _ in range(101)]
    assert [m.payload for m in got if m is not None] == [b"first", *(str(i).encode() for i in range(100))]


@pytest.mark.timeout(90)
@pytest.mark.parametrize("kind", ["exact", "wildcard"])
def test_new_subscriber_gets_the_next_publish_despite_a_cached_answer(connect, kind: str) -> None:
    """The entry caches "nobody" for a topic; a SUBACK elsewhere must invalidate that before it is sent.

    exact: topic ``q`` and filter ``q``; wildcard: topic ``q/x`` and filter ``q/+``, both stored in the shard
    of ``q``, which the entry does not own.
    """
    entry, others = connect(1), [connect(0), connect(2)]
    for round_ in range(10):
        q = remote_owned_topic(entry, unique())
        topic, filt = (q, q) if kind == "exact" else (f"{q}/x", f"{q}/+")
        entry.publish(topic, b"cached", qos=1)
        entry.publish(topic, b"cached", qos=1)  # answered from the cache: still nobody
        before = sum(counters(c)["route_cache.invalidations_out"] for c in (entry, *others))
        sub = connect(2)
        sub.subscribe(filt, qos=1)
        entry.publish(topic, f"after-suback-{round_}".encode(), qos=1)
        msg = sub.receive(timeout=5)
        assert msg is not None and msg.payload == f"after-suback-{round_}".encode(), (round_, filt)
        after = sum(counters(c)["route_cache.invalidations_out"] for c in (entry, *others))
        assert after > before  # the owner told the entry, rather than the entry asking anew by luck
        sub.close()


@pytest.mark.timeout(60)
def test_unsubscribed_route_stops_delivery_with_a_warm_cache(connect) -> None:
    entry, sub = connect(1), connect(0)
    topic = remote_owned_topic(entry, unique())
    sub.subscribe(topic, qos=1)
    for _ in range(3):
        entry.publish(topic, b"warm", qos=1)
    assert [sub.receive(timeout=5) is not None for _ in range(3)] == [True] * 3
    sub.unsubscribe(topic)
    entry.publish(topic, b"gone", qos=1)
    assert sub.receive(timeout=0.5) is None
