"""Retained messages through the protocol core: real ``NodeCore``s in the in-memory cluster (``testing.simulation``).

What is checked: a retain publish is stored at its shard's primary and every replica; replaced; deleted by an empty
payload; an entry node with an old view is told ``stale`` and retries at the new primary; exact and wildcard
subscribes get the matching retained messages with ``retain`` (at min(stored, granted) qos); a hand-off carries them
(snapshot) including one written while the shard streams; the promoted replica serves them after the primary died.
"""

from __future__ import annotations

import pytest

from shardmq.ring import shard_for_key
from shardmq.router import codec
from shardmq.testing.simulation import Sim, SimConfig

SHARDS = 32


def cluster(nodes: int = 3, shards: int = SHARDS) -> Sim:
    """A settled simulated cluster of ``nodes`` (R = 2, snapshots in chunks of 2 routes)."""
    sim = Sim(SimConfig(shard_count=shards, replication=2, snapshot_chunk=2))
    for _ in range(nodes):
        sim.join()
    assert sim.settle()
    return sim


def retain(sim: Sim, node: str, topic: str, delete: bool = False) -> int:
    pid = sim.publish(node, topic, retain=True, delete=delete)
    assert pid is not None
    assert sim.settle()
    assert sim.publishes[pid][4] == "acked", sim.publishes[pid]
    return pid


def copies(sim: Sim, topic: str) -> dict[str, bytes | None]:
    """Each owner's copy of ``topic``'s retained payload (None: none held)."""
    shard = shard_for_key(topic, SHARDS)
    a = sim.etcd.doc
    assert a is not None
    out: dict[str, bytes | None] = {}
    for owner in a.owners(shard):
        held = sim.nodes[owner].core.owner.retained.get(shard, topic)
        out[owner] = None if held is None else held.payload
    return out


def subscribe(sim: Sim, node: str, filt: str, qos: int = 1) -> dict[str, tuple[bytes, int]]:
    assert sim.subscribe(node, filt, qos=qos)
    assert sim.settle()
    return sim.retained_got.get(sim.last_client, {})


@pytest.mark.timeout(60)
def test_stored_replicated_replaced_and_deleted() -> None:
    sim = cluster()
    nodes = sorted(sim.nodes)
    pid = retain(sim, nodes[0], "a/b/c")
    assert set(copies(sim, "a/b/c").values()) == {b"%d" % pid}  # the primary and its replica
    pid2 = retain(sim, nodes[1], "a/b/c")
    assert set(copies(sim, "a/b/c").values()) == {b"%d" % pid2}
    assert subscribe(sim, nodes[2], "a/b/c") == {"a/b/c": (b"%d" % pid2, 1)}
    retain(sim, nodes[2], "a/b/c", delete=True)
    assert set(copies(sim, "a/b/c").values()) == {None}
    assert subscribe(sim, nodes[0], "a/#") == {}
    assert sum(len(n.core.owner.retained) for n in sim.nodes.values()) == 0
    assert all(n.core.owner.retained.bytes == 0 for n in sim.nodes.values())


@pytest.mark.timeout(60)
def test_exact_and_wildcard_subscribes_get_them_with_retain() -> None:
    sim = cluster()
    nodes = sorted(sim.nodes)
    topics = ["a/x/c", "a/y/c", "a/y/d", "b/x/c", "a"]
    pids = {t: retain(sim, nodes[i % 3], t) for i, t in enumerate(topics)}
    want = {t: (b"%d" % pids[t], 1) for t in topics}
    assert subscribe(sim, nodes[1], "a/+/c") == {t: want[t] for t in ("a/x/c", "a/y/c")}
    assert subscribe(sim, nodes[2], "a/#") == {t: want[t] for t in ("a/x/c", "a/y/c", "a/y/d", "a")}
    assert subscribe(sim, nodes[0], "+/x/c") == {t: want[t] for t in ("a/x/c", "b/x/c")}
    assert subscribe(sim, nodes[0], "b/x/c", qos=0) == {"b/x/c": (b"%d" % pids["b/x/c"], 0)}  # min(1, granted 0)
    assert subscribe(sim, nodes[1], "nothing/+") == {}
    # A live publish to an existing subscriber is not flagged, even a retain publish.
    pid = sim.publish(nodes[2], "a/x/c", retain=True)
    assert sim.settle() and pid is not None and sim.publishes[pid][4] == "acked"
    assert nodes[1] in sim.publishes[pid][5]
    assert sim.retained_got[b"c1"] == {t: want[t] for t in ("a/x/c", "a/y/c")}  # unchanged: that one was live


@pytest.mark.timeout(60)
def test_entry_with_an_old_view_is_told_stale_and_retries() -> None:
    sim = cluster()
    entry = sorted(sim.nodes)[0]
    core = sim.nodes[entry].core
    old, old_revision = core.view.assignment, core.view.assignment_revision
    assert old is not None
    sim.join()
    assert sim.settle()
    new = sim.etcd.doc
    assert new is not None
    topic = next(
        t for t in (f"t/{i}" for i in range(500))
        if new.owners(s := shard_for_key(t, SHARDS))[0] != old.owners(s)[0] and old.owners(s)[0] != entry
        and new.owners(s)[0] != entry
    )  # fmt: skip
    core.view.assignment, core.view.assignment_revision = old, old_revision  # the entry node's view lags
    pid = retain(sim, entry, topic)
    assert core.metrics["retained.stale_retries"] >= 1
    assert set(copies(sim, topic).values()) == {b"%d" % pid}


@pytest.mark.timeout(60)
def test_handoff_carries_retained_including_a_write_during_the_stream() -> None:
    sim = cluster()
    nodes = sorted(sim.nodes)
    topics = [f"s/{i}/v" for i in range(40)]
    want = {t: b"%d" % retain(sim, nodes[i % 3], t) for i, t in enumerate(topics)}
    newcomer = sim.join()
    streaming: set[int] = set()
    for _ in range(200):  # step until some source streams a shard to the newcomer
        sim.tick(0.1)
        for n in sorted(sim.nodes):
            sim.refresh(n)
        leader = sim.leader_node()
        if leader is not None:
            sim.lead(leader.node_id)
        for n in sorted(sim.nodes):
            for q in [k for k in list(sim.channels) if k[1] == n]:
                while sim.channels.get(q) and sim.channels[q][0][0] != codec.SNAPSHOT:
                    sim.deliver(*q)
        streaming = {s for n in sim.nodes.values() for s in n.core.owner.source.streams}
        if streaming:
            break
    assert streaming, "no hand-off started"
    during = next(t for t in (f"w/{i}" for i in range(2000)) if shard_for_key(t, SHARDS) in streaming)
    pid = sim.publish(nodes[0], during, retain=True)
    assert sim.settle() and pid is not None and sim.publishes[pid][4] == "acked"
    want[during] = b"%d" % pid
    a = sim.etcd.doc
    assert a is not None and a.shards_of(newcomer)
    for topic, payload in want.items():
        assert set(copies(sim, topic).values()) == {payload}, topic
    assert sim.nodes[newcomer].core.metrics["handoff.retained_received"] > 0
    got = subscribe(sim, newcomer, "#")
    assert {t: p for t, (p, _) in got.items()} == want
    # Once the grace after the flips is over, every node holds only the shards it owns (a released shard's copy
    # dropped its retained messages too).
    for _ in range(20):
        sim.tick(0.25)
    assert sim.settle()
    for node in sim.nodes.values():
        held = set(node.core.owner.retained.held_shards())
        assert held <= set(a.shards_of(node.node_id))


@pytest.mark.timeout(60)
def test_promoted_replica_serves_after_the_primary_dies() -> None:
    sim = cluster(4)
    nodes = sorted(sim.nodes)
    a = sim.etcd.doc
    assert a is not None
    topic = next(t for t in (f"k/{i}" for i in range(500)) if a.owners(shard_for_key(t, SHARDS))[0] == nodes[0])
    pid = retain(sim, nodes[1], topic)
    sim.crash(nodes[0])
    assert sim.settle()
    survivor = next(n for n in nodes[1:] if n not in sim.etcd.doc.owners(shard_for_key(topic, SHARDS))[:1])
    assert subscribe(sim, survivor, topic) == {topic: (b"%d" % pid, 1)}
    assert subscribe(sim, survivor, "k/+") == {topic: (b"%d" % pid, 1)}


@pytest.mark.timeout(60)
def test_limit_refuses_a_new_retained_message_with_overloaded() -> None:
    sim = Sim(SimConfig(shard_count=SHARDS, replication=2))
    for _ in range(2):
        sim.join()
    assert sim.settle()
    for n in sim.nodes.values():  # room for one small message per node
        n.core.cfg = type(n.core.cfg)(**{**{f: getattr(n.core.cfg, f) for f in n.core.cfg.__slots__},
                                         "max_retained_bytes": 6})  # fmt: skip
    nodes = sorted(sim.nodes)
    retain(sim, nodes[0], "a/1")
    pid = sim.publish(nodes[0], "a/2", retain=True)
    assert sim.settle() and pid is not None
    assert sim.publishes[pid][4] == codec.E_OVERLOADED
    assert sum(n.core.metrics[f"errors.{codec.E_OVERLOADED}"] for n in sim.nodes.values()) >= 1


@pytest.mark.timeout(60)
def test_bad_retain_frames_are_refused_counted_and_the_node_serves() -> None:
    sim = cluster()
    nodes = sorted(sim.nodes)
    a = sim.etcd.doc
    assert a is not None
    topic = "bad/1"
    shard = shard_for_key(topic, SHARDS)
    primary = a.owners(shard)[0]
    sender = next(n for n in nodes if n != primary)
    core = sim.nodes[primary].core
    base = {"id": 9, "shard": shard, "shard_epoch": a.epoch(shard), "topic": topic, "qos": 1, "replica": False}
    for header, code in [
        ({**base, "shard": (shard + 1) % SHARDS}, codec.E_BAD_HEADER),  # the topic is not in that shard
        ({**base, "qos": 2}, codec.E_INVALID_QOS),
        ({**base, "topic": "bad/+"}, codec.E_INVALID_TOPIC),
        ({**base, "replica": True}, codec.E_BAD_HEADER),  # a replica change without its stamp
    ]:
        before = core.metrics[f"errors.{code}"]
        sim.send(sender, primary, codec.encode(codec.RETAIN, header, b"x"))
        sim.drain()
        assert core.metrics[f"errors.{code}"] == before + 1, header
    before = core.metrics["fencing.refused.not_allowed"]
    stamp = {**base, "replica": True, "stamp": [a.epoch(shard), 1]}
    sim.send(sender, primary, codec.encode(codec.RETAIN, stamp, b"x"))  # not the shard's primary: not allowed
    sim.drain()
    assert core.metrics["fencing.refused.not_allowed"] == before + 1
    assert len(core.owner.retained) == 0
    pid = retain(sim, sender, topic)  # and it still serves
    assert set(copies(sim, topic).values()) == {b"%d" % pid}


def drain_dropping(sim: Sim, kind: bytes, dst: str) -> int:
    """Deliver every queued frame, dropping those of type ``kind`` to ``dst`` (a lost frame); how many dropped."""
    dropped = 0
    for _ in range(10_000):
        ready = sim.deliverable()
        if not ready:
            return dropped
        for src, to in ready:
            q = sim.channels.get((src, to))
            while q:
                if to == dst and q[0][0] == kind:
                    q.popleft()
                    dropped += 1
                    continue
                sim.deliver(src, to)
    return dropped


@pytest.mark.timeout(60)
def test_a_silent_member_is_counted_and_an_exact_filter_falls_back_to_the_replica() -> None:
    sim = cluster()
    nodes = sorted(sim.nodes)
    a = sim.etcd.doc
    assert a is not None
    topic = next(t for t in (f"f/{i}" for i in range(500)) if a.owners(shard_for_key(t, SHARDS))[0] == nodes[0])
    pid = retain(sim, nodes[1], topic)
    subscriber = next(n for n in nodes if n not in a.owners(shard_for_key(topic, SHARDS)))
    core = sim.nodes[subscriber].core
    assert sim.subscribe(subscriber, topic)
    assert drain_dropping(sim, codec.RETAINED_GET, nodes[0]) == 1  # the primary never hears the question
    assert sim.retained_got.get(sim.last_client) is None
    assert sim.settle()  # the clock passes retained_fetch_timeout: the replica is asked
    assert core.metrics["retained.fetch_timeouts"] == 1
    assert sim.retained_got[sim.last_client] == {topic: (b"%d" % pid, 1)}
    # A wildcard filter asks every member and has no fallback: the silent member's copies are missing (a known
    # limit), and the replica's copy, which every member asked also holds, still comes.
    assert sim.subscribe(subscriber, "f/+")
    assert drain_dropping(sim, codec.RETAINED_GET, nodes[0]) == 1
    assert sim.settle()
    assert core.metrics["retained.fetch_timeouts"] == 2
    assert sim.retained_got[sim.last_client] == {topic: (b"%d" % pid, 1)}
