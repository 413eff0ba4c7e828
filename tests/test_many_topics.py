"""Publishing to many topics (issue #11): batched lookups (LOOKUPS), first levels answered ``clear`` once, and the
entry node's resolved topics kept across frames (``protocol.entry``).

1. In the simulation (the nodes' real protocol cores): PUBS frames of many distinct topics through one entry node,
   every message delivered to exactly the nodes whose filters match it, against ``filter_matches`` (hypothesis:
   random exact and wildcard filters under a few first levels, on random nodes; two rounds, so the second is
   answered from the cache and the resolved topics). A route added after the topics were resolved is seen by
   the next publish, and a first level with a wildcard filter is never answered ``clear``.
2. ``FilterIndex.wild_under`` against the brute-force matcher.
3. A real 3-node LocalCluster: thousands of topics, each message unique, every one delivered once and in order
   per topic, with a wildcard subscriber under the same first level on another node (bounded in count and time).
"""

from __future__ import annotations

import itertools
import uuid

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shardmq.router import codec
from shardmq.router.matching import FilterIndex, filter_matches
from shardmq.testing.simulation import Sim, SimConfig

LEVELS = ["a", "b", "c", "d"]
HEADS = ["x", "y", "z"]


def topic_names(draw_levels: list[list[str]]) -> list[str]:
    return ["/".join(levels) for levels in draw_levels]


topics_st = st.lists(
    st.lists(st.sampled_from(LEVELS), min_size=0, max_size=2).flatmap(
        lambda rest: st.sampled_from(HEADS).map(lambda head: "/".join([head, *rest]))
    ),
    min_size=1,
    max_size=40,
    unique=True,
)
filter_st = st.one_of(
    st.lists(st.sampled_from(LEVELS), min_size=0, max_size=2).flatmap(
        lambda rest: st.sampled_from(HEADS).map(lambda head: "/".join([head, *rest]))
    ),  # exact
    st.tuples(st.sampled_from(HEADS), st.sampled_from(["+", "#", "a/+", "+/b", "a/#"])).map("/".join),  # keyed
    st.sampled_from(["+/a", "#", "+/+"]),  # root set
)


def cluster(nodes: int = 3) -> tuple[Sim, list[str]]:
    sim = Sim(SimConfig(shard_count=16, replication=2))
    ids = [sim.join() for _ in range(nodes)]
    assert sim.settle()
    return sim, ids


def publish_frame(sim: Sim, node_id: str, topics: list[str]) -> list[int]:
    """One PUBS frame through ``node_id``: a QoS 0 message to each topic, payload its publish id (tracked by the
    simulation like its own publishes: ``publishes[id][5]`` collects the nodes whose clients got it)."""
    ids = [track(sim, node_id, topic) for topic in topics]
    runs = [([topic, 0, None], None, b"%d" % pid) for topic, pid in zip(topics, ids, strict=True)]
    client_frame(sim, node_id, codec.encode_runs(codec.PUBS, {}, runs))
    return ids


def publish_lone(sim: Sim, node_id: str, topic: str) -> int:
    """One plain PUB (QoS 0, one message) through ``node_id``, tracked like ``publish_frame``'s messages."""
    pid = track(sim, node_id, topic)
    client_frame(sim, node_id, codec.encode(codec.PUB, {"topic": topic, "qos": 0}, b"%d" % pid))
    return pid


def track(sim: Sim, node_id: str, topic: str) -> int:
    pid = next(sim._refs)
    sim.publishes[pid] = [sim.now, node_id, topic, frozenset(sim.acked.get(topic, set())), "qos0", set()]
    return pid


def client_frame(sim: Sim, node_id: str, parts: list[bytes]) -> None:
    """A publisher's frame to ``node_id``, handled and delivered through the cluster."""
    n = sim.nodes[node_id]
    rid = b"pub/%s/%d" % (node_id.encode(), n.incarnation)
    n.enter().on_client_parts([rid, *parts])
    n.core.flush()
    sim.pump_clients()
    sim.drain()


def expected_nodes(subs: list[tuple[str, str]], topic: str) -> set[str]:
    return {node for node, filt in subs if filter_matches(filt, topic)}


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    topics=topics_st,
    subs=st.lists(st.tuples(st.integers(0, 2), filter_st), max_size=12),
    entry=st.integers(0, 2),
    late=st.tuples(st.integers(0, 2), filter_st),
)
def test_many_topics_reach_exactly_the_matching_nodes(topics, subs, entry, late) -> None:
    sim, ids = cluster()
    placed = [(ids[i], filt) for i, filt in subs]
    for node, filt in placed:
        assert sim.subscribe(node, filt)
    assert sim.settle()
    for _round in range(2):  # the second round is answered from cached answers and resolved topics
        for pid in publish_frame(sim, ids[entry], topics):
            topic = sim.publishes[pid][2]
            assert sim.publishes[pid][5] == expected_nodes(placed, topic), (topic, placed)
        sim.tick(0.1)
    # A route added after the topics were resolved: the next frame must see it (INVALIDATE drops what was kept).
    node, filt = ids[late[0]], late[1]
    assert sim.subscribe(node, filt)
    assert sim.settle()
    placed.append((node, filt))
    for pid in publish_frame(sim, ids[entry], topics):
        topic = sim.publishes[pid][2]
        assert sim.publishes[pid][5] == expected_nodes(placed, topic), (topic, placed)
    entry_core = sim.nodes[ids[entry]].core
    assert entry_core.metrics["errors.unavailable"] == 0


def subscribed(topics: list[str]) -> tuple[Sim, list[str]]:
    """A cluster whose first node subscribes to ``topics``, settled."""
    sim, ids = cluster()
    for topic in topics:
        assert sim.subscribe(ids[0], topic)
    assert sim.settle()
    return sim, ids


def test_lookups_travel_in_one_frame_and_resolved_topics_skip_them() -> None:
    topics = [f"m/t{i}" for i in range(60)]
    sim, ids = subscribed(topics)
    core = sim.nodes[ids[2]].core
    sent = []
    original = sim.nodes[ids[2]].send_peer

    def spy(node: str, parts: list[bytes]) -> bool:
        sent.append(parts[0])
        return original(node, parts)

    sim.nodes[ids[2]].send_peer = spy  # type: ignore[method-assign]
    for pid in publish_frame(sim, ids[2], topics):
        assert sim.publishes[pid][5] == {ids[0]}
    lookups = [t for t in sent if t in (codec.LOOKUP, codec.LOOKUPS)]
    assert codec.LOOKUPS in lookups and len(lookups) <= 2  # at most one frame per other node
    assert core.metrics["batches.lookups"] >= 1
    sent.clear()
    for pid in publish_frame(sim, ids[2], topics):  # the same topics again: nothing to ask
        assert sim.publishes[pid][5] == {ids[0]}
    assert not [t for t in sent if t in (codec.LOOKUP, codec.LOOKUPS)]
    assert core.metrics["publishes.resolved_kept"] == 0  # resolved from the cache, and kept from now on
    for pid in publish_frame(sim, ids[2], topics):
        assert sim.publishes[pid][5] == {ids[0]}
    assert core.metrics["publishes.resolved_kept"] == len(topics)


def test_lone_qos0_publishes_take_the_resolved_fast_path() -> None:
    """A plain PUB is a batch of one: its topic is resolved once, then kept, and a route added later is seen."""
    topics = [f"lone/t{i}" for i in range(20)]
    sim, ids = subscribed(topics)
    core = sim.nodes[ids[2]].core
    for _round in range(2):  # asked (or owned here), then answered from the cache: every topic is kept by now
        for topic in topics:
            assert sim.publishes[publish_lone(sim, ids[2], topic)][5] == {ids[0]}
    kept = core.metrics["publishes.resolved_kept"]
    for topic in topics:
        assert sim.publishes[publish_lone(sim, ids[2], topic)][5] == {ids[0]}
    assert core.metrics["publishes.resolved_kept"] - kept == len(topics)
    assert sim.subscribe(ids[1], topics[0])
    assert sim.settle()
    assert sim.publishes[publish_lone(sim, ids[2], topics[0])][5] == {ids[0], ids[1]}
    assert core.metrics["errors.unavailable"] == 0


def test_a_first_level_with_a_wildcard_filter_is_never_clear() -> None:
    """The filter "m/#" lives in shard("m"): topics under "m" whose own shard differs must still be asked about it."""
    sim, ids = cluster()
    topics = [f"m/u{i}" for i in range(40)]
    for pid in publish_frame(sim, ids[1], topics):  # nobody subscribed: first level "m" answered clear
        assert sim.publishes[pid][5] == set()
    assert sim.subscribe(ids[0], "m/#")
    assert sim.settle()
    for pid in publish_frame(sim, ids[1], topics):
        assert sim.publishes[pid][5] == {ids[0]}
    for pid in publish_frame(sim, ids[2], topics):
        assert sim.publishes[pid][5] == {ids[0]}


@settings(max_examples=200, deadline=None)
@given(
    filters=st.lists(filter_st, max_size=10),
    topic=st.lists(st.sampled_from(LEVELS), min_size=0, max_size=3).flatmap(
        lambda rest: st.sampled_from(HEADS).map(lambda head: "/".join([head, *rest]))
    ),
)
def test_wild_under_is_false_only_when_no_wildcard_filter_can_match(filters, topic) -> None:
    index: FilterIndex[str] = FilterIndex()
    for f in filters:
        index.add(f, "n")
    head = topic.partition("/")[0]
    if not index.wild_under(head):
        assert not any(filter_matches(f, topic) for f in filters if "+" in f or "#" in f)


# ---------------------------------------------------------------------------------------------- a real cluster
@pytest.mark.timeout(120)
def test_many_topics_delivered_once_in_order_through_three_nodes(connect) -> None:
    p = uuid.uuid4().hex[:8]
    k, rounds = 3000, 3
    topics = [f"{p}/t{i}" for i in range(k)]
    sub, wild, pub = connect(0), connect(1), connect(2)
    assert len({sub.node, wild.node, pub.node}) == 3
    assert sub.subscribe_many(topics, qos=0) == k
    wild.subscribe(f"{p}/#", qos=0)
    counter = itertools.count()
    sent: dict[str, list[bytes]] = {t: [] for t in topics}
    for _ in range(rounds):
        for topic in topics:
            payload = b"%d" % next(counter)
            sent[topic].append(payload)
            pub.publish(topic, payload, qos=0)
    pub.flush()
    for client in (sub, wild):
        got: dict[str, list[bytes]] = {t: [] for t in topics}
        for _ in range(k * rounds):
            msg = client.receive(timeout=10)
            assert msg is not None, f"{sum(map(len, got.values()))} of {k * rounds} delivered"
            got[msg.topic].append(msg.payload)
        assert got == sent  # every message once, in order per topic
        assert client.receive(timeout=0.2) is None
    status = pub.status()
    assert status["metrics"].get("publishes.resolved_kept", 0) > 0
    assert status["metrics"].get("batches.lookups", 0) > 0
