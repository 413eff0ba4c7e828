"""The route cache (``shardmq.router.route_cache``): the pure objects under hypothesis, then a real cluster.

1. ``RouteCache`` against a brute-force reference (a dict that forgets a shard's answers when told to).
2. A state machine of one owner and one entry node joined by two FIFO pipes, with route changes, LOOKUPs,
   INVALIDATEs, flips, lost leases, broken links and passing time in any interleaving, following the node's
   rules (``_invalidate_caches``, ``_expire_invalidation``, the cache's ttl).
   Invariant: no cached answer at the entry's current epoch lacks a confirmed route (one whose ROUTE_ACK the
   owner would have sent: every INVALIDATE outstanding for its shard acknowledged).
3. A real 3-node cluster: hot topics take one hop, and a subscriber added after an entry cached an answer gets
   the very next publish.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter, deque
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shardmq.client import Client
from shardmq.protocol.entry import REFRESH_AFTER
from shardmq.protocol.owner import INVALIDATE_WAIT
from shardmq.router.route_cache import LookupWatchers, RouteCache
from shardmq.shard.node import NodeConfig

TOPICS = ["a", "b"]
SHARDS = [0, 1]
NODES = ["n1", "n2", "n3"]


# ---------------------------------------------------------------------------------------------- 1. reference
class ReferenceCache:
    def __init__(self) -> None:
        self.answers: dict[tuple[str, int], tuple[int, float, tuple[str, ...]]] = {}
        self.refresh: dict[tuple[str, int], float | None] = {}  # refresh time; None once claimed
        self.generation: dict[int, int] = {}
        self.era = 0

    def ticket(self, shard: int) -> tuple[int, int]:
        return (self.era, self.generation.get(shard, 0))

    def get(self, topic: str, shard: int, epoch: int, now: float) -> tuple[str, ...] | None:
        answer = self.answers.get((topic, shard))
        return answer[2] if answer is not None and answer[0] == epoch and now < answer[1] else None

    def put(
        self,
        topic: str,
        shard: int,
        epoch: int,
        ticket: tuple[int, int],
        expires: float,
        nodes: tuple[str, ...],
        refresh_at: float | None = None,
    ) -> bool:
        if ticket != self.ticket(shard):
            return False
        self.answers[(topic, shard)] = (epoch, expires, nodes)
        self.refresh[(topic, shard)] = expires if refresh_at is None else refresh_at
        return True

    def claim_refresh(self, topic: str, shard: int, epoch: int, now: float) -> bool:
        due = self.refresh.get((topic, shard))
        if self.get(topic, shard, epoch, now) is None or due is None or now < due:
            return False
        self.refresh[(topic, shard)] = None
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
_time = st.sampled_from([0.0, 0.5, 1.0, 1.5, 3.0])
_ops = st.lists(
    st.one_of(
        st.tuples(st.just("get"), _topic, _shard, _epoch, _time),
        st.tuples(
            st.just("put"), _topic, _shard, _epoch, st.tuples(st.integers(0, 2), st.integers(0, 3)), _time, _nodes
        ),
        st.tuples(st.just("put_now"), _topic, _shard, _epoch, _time, _nodes, st.none() | _time),
        st.tuples(st.just("claim"), _topic, _shard, _epoch, _time),
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
            _, topic, shard, epoch, expires, nodes, refresh_at = op
            assert cache.ticket(shard) == ref.ticket(shard)
            assert cache.put(topic, shard, epoch, cache.ticket(shard), expires, nodes, refresh_at)
            ref.put(topic, shard, epoch, cache.ticket(shard), expires, nodes, refresh_at)
        elif op[0] == "claim":
            assert cache.claim_refresh(*op[1:]) == ref.claim_refresh(*op[1:])
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
        cache.put(topic, shard, 0, cache.ticket(shard), 1.0, ("n1",))
        assert len(cache) <= capacity
    if puts:
        topic, shard = puts[-1]
        assert cache.get(topic, shard, 0, 0.5) == ("n1",)
        assert cache.get(topic, shard, 0, 1.0) is None  # expired


def test_capacity_zero_turns_the_cache_off() -> None:
    cache = RouteCache(capacity=0)
    assert not cache.put("a", 0, 0, cache.ticket(0), 1.0, ("n1",))
    assert cache.get("a", 0, 0, 0.0) is None
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
# A small world (two topics, two shards, two subscriber nodes), so that hypothesis often meets the interleavings
# that matter.
_m_node = st.sampled_from(NODES[:2])
# A cached answer lives TTL after its LOOKUP was sent: the node's default.
TTL = NodeConfig("n", "tcp://a", "tcp://b", "http://c").route_cache_ttl
GIVE_UP = INVALIDATE_WAIT * TTL  # the owner stops waiting for an INVALIDATE_ACK after this (as the node does)


class CacheProtocol(RuleBasedStateMachine):
    """One owner of SHARDS and one entry node; pipes are FIFO per direction, as zmq is between two nodes, but a
    broken link loses what was in flight; time passes in steps."""

    def __init__(self) -> None:
        super().__init__()
        self.routes: dict[int, set[tuple[str, str]]] = {s: set() for s in SHARDS}  # at the owner: (topic, node)
        self.owner_epoch = dict.fromkeys(SHARDS, 1)
        self.entry_epoch = dict.fromkeys(SHARDS, 1)  # the entry's view, which may lag behind a flip
        self.cache = RouteCache(capacity=4)
        self.watchers = LookupWatchers()
        self.to_owner: deque[tuple[Any, ...]] = deque()
        self.to_entry: deque[tuple[Any, ...]] = deque()
        self.now = 0.0
        # LOOKUP id -> topic, shard, epoch, ticket, send time
        self.lookups: dict[int, tuple[str, int, int, tuple[int, int], float]] = {}
        self.unacked: dict[int, tuple[int, set[int], float]] = {}  # INVALIDATE id -> (acks missing, shards, sent)
        self.waiting: list[tuple[set[int], tuple[str, int, str]]] = []  # adds whose ROUTE_ACK waits: (ids, route)
        self.confirmed: set[tuple[str, int, str]] = set()  # (topic, shard, node) routes whose ROUTE_ACK went out
        self.ids = 0

    def _id(self) -> int:
        self.ids += 1
        return self.ids

    def _truth(self, topic: str, shard: int) -> set[str]:
        return {node for t, node in self.routes[shard] if t == topic}

    @rule(topic=_topic, shard=_shard)
    def entry_publishes(self, topic: str, shard: int) -> None:
        """A miss asks the owner; so does a hit past its refresh time (refresh ahead, the answer still serves)."""
        epoch = self.entry_epoch[shard]
        if self.cache.get(topic, shard, epoch, self.now) is None or self.cache.claim_refresh(
            topic, shard, epoch, self.now
        ):
            lid = self._id()
            self.lookups[lid] = (topic, shard, self.entry_epoch[shard], self.cache.ticket(shard), self.now)
            self.to_owner.append(("lookup", lid, topic, shard))

    def _invalidate(self, shard: int) -> set[int]:
        """The node's ``_invalidate_caches``: tell the watchers; returns every INVALIDATE outstanding for shard."""
        told = self.watchers.take([shard])
        if told:
            iid = self._id()
            for _node, shards in told.items():
                self.to_entry.append(("invalidate", iid, shards))
            self.unacked[iid] = (len(told), {shard}, self.now)
        return {iid for iid, (_, shards, _) in self.unacked.items() if shard in shards}

    def _finish(self, iid: int) -> None:
        """Every watcher acknowledged (or the owner gave up): the adds waiting only for this are confirmed."""
        del self.unacked[iid]
        still = []
        for waits, route in self.waiting:
            waits.discard(iid)
            if waits:
                still.append((waits, route))
            elif (route[0], route[2]) in self.routes[route[1]]:
                self.confirmed.add(route)
        self.waiting = still

    @rule(topic=_topic, shard=_shard, node=_m_node, add=st.booleans())
    def route_changes(self, topic: str, shard: int, node: str, add: bool) -> None:
        route = (topic, shard, node)
        (self.routes[shard].add if add else self.routes[shard].discard)((topic, node))
        self.confirmed.discard(route)
        waits = self._invalidate(shard)
        if add:
            if waits:
                self.waiting.append((waits, route))
            else:
                self.confirmed.add(route)

    @rule(shard=_shard)
    def flip(self, shard: int) -> None:
        """New owners at a higher epoch (routes carried over); the old owner tells its watchers, waiting for none."""
        self.owner_epoch[shard] += 1
        self._invalidate(shard)

    @rule()
    def entry_lease_lost(self) -> None:
        """The owner saw the entry leave (and forgot its watches); the entry, fenced meanwhile, clears its cache
        when it registers again. Replies may still be in flight."""
        self.watchers.forget("entry")
        self.cache.clear()

    @rule(dt=st.sampled_from([0.25, 0.75, 1.5]))
    def time_passes(self, dt: float) -> None:
        self.now += dt

    @rule()
    def owner_gives_up(self) -> None:
        """The node's ``_expire_invalidation``: an INVALIDATE unacknowledged for GIVE_UP counts as done."""
        for iid in [i for i, (_, _, sent) in self.unacked.items() if self.now >= sent + GIVE_UP]:
            self._finish(iid)

    @rule()
    def link_to_entry_breaks(self) -> None:
        """A partition of the owner -> entry link: replies and INVALIDATEs in flight are lost."""
        self.to_entry.clear()

    @rule()
    def link_to_owner_breaks(self) -> None:
        """The entry -> owner link: LOOKUPs (the node asks again after its lookup timeout) and acks are lost."""
        self.to_owner.clear()

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
        elif msg[1] in self.unacked:  # (a late ack, after the owner gave up, is ignored)
            iid = msg[1]
            missing, shards, sent = self.unacked[iid]
            if missing > 1:
                self.unacked[iid] = (missing - 1, shards, sent)
            else:
                self._finish(iid)

    @precondition(lambda self: self.to_entry)
    @rule()
    def entry_receives(self) -> None:
        msg = self.to_entry.popleft()
        if msg[0] == "reply":
            _, lid, epoch, nodes = msg
            topic, shard, asked_epoch, ticket, sent = self.lookups.pop(lid)
            if epoch == asked_epoch:
                self.cache.put(topic, shard, asked_epoch, ticket, sent + TTL, nodes, sent + TTL * REFRESH_AFTER)
        else:
            _, iid, shards = msg
            self.cache.invalidate(shards)
            self.to_owner.append(("ack", iid))

    @invariant()
    def confirmed_routes_are_never_missing(self) -> None:
        for topic, shard, node in self.confirmed:
            if self.entry_epoch[shard] != self.owner_epoch[shard]:
                continue  # the entry has not read the flip; the node asks with its old epoch and is refused
            cached = self.cache.get(topic, shard, self.entry_epoch[shard], self.now)
            assert cached is None or node in cached, (topic, shard, node, cached)


TestCacheProtocol = CacheProtocol.TestCase
TestCacheProtocol.settings = settings(max_examples=1000, stateful_step_count=60, deadline=None)


def test_an_entry_cut_off_from_the_owner_drops_the_answer_before_the_route_is_confirmed() -> None:
    """The INVALIDATE is lost with the link; the owner confirms the route only after GIVE_UP, by which time the
    entry's answer (TTL from its LOOKUP) has expired on its own."""
    m = CacheProtocol()
    m.entry_publishes("a", 0)
    m.owner_receives()
    m.entry_receives()  # "nobody" cached until TTL
    m.route_changes("a", 0, "n1", add=True)  # waits for the INVALIDATE ...
    m.link_to_entry_breaks()  # ... which is lost
    while ("a", 0, "n1") not in m.confirmed:
        m.time_passes(0.25)
        m.owner_gives_up()
        m.confirmed_routes_are_never_missing()
    assert m.now >= GIVE_UP > TTL
    assert m.cache.get("a", 0, 1, m.now) is None


def test_an_add_waits_for_an_earlier_unacknowledged_invalidate() -> None:
    """Found by the machine above: a removed route's INVALIDATE took the watch, so the add that followed had
    nobody to tell and was confirmed while the entry still cached "nobody"."""
    m = CacheProtocol()
    m.entry_publishes("a", 0)
    m.owner_receives()  # answered (nobody), the entry watches shard 0; the reply is in flight
    m.route_changes("a", 0, "n1", add=False)  # takes the watch: an INVALIDATE follows the reply
    m.entry_receives()  # the reply is cached
    m.route_changes("a", 0, "n1", add=True)  # no watch left, but that INVALIDATE is not acknowledged yet
    assert ("a", 0, "n1") not in m.confirmed
    m.confirmed_routes_are_never_missing()
    m.entry_receives()  # the INVALIDATE: cache dropped, acknowledged
    m.owner_receives()
    assert ("a", 0, "n1") in m.confirmed
    m.confirmed_routes_are_never_missing()


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


@pytest.mark.timeout(60)
def test_a_hot_topic_is_refreshed_ahead_and_never_misses(connect) -> None:
    """Published to for three cache ttls: its answer is asked for again before it expires, so after the first
    lookup no publish misses the cache or takes more than the one forward hop."""
    p = unique()
    sub, entry = connect(0), connect(1)
    topic = remote_owned_topic(entry, p)
    sub.subscribe(topic, qos=1)
    entry.publish(topic, b"first", qos=1)  # asks once: the subscription invalidated the warm-up answer
    before = counters(entry)
    deadline, sent = time.monotonic() + 3 * TTL, 0
    while time.monotonic() < deadline:
        entry.publish(topic, str(sent).encode(), qos=1)
        sent += 1
        time.sleep(0.01)
    after = counters(entry)
    assert after["route_cache.refreshes"] - before["route_cache.refreshes"] >= 2
    assert after["cache.misses"] == before["cache.misses"]
    assert after["publishes.hops"] - before["publishes.hops"] == after["publishes.routed"] - before["publishes.routed"]
    got = [sub.receive(timeout=5) for _ in range(sent + 1)]
    assert [m.payload for m in got if m is not None] == [b"first", *(str(i).encode() for i in range(sent))]


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
