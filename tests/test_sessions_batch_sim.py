"""Batched writes of the replicated session queue (RETAINS) through the protocol core, in the in-memory cluster.

What is checked: the records a forwarded batch queues for a persistent session go to the session shard's primary in
one RETAINS and on to the replica in one frame, and the forwards are acknowledged only once the replica answered; a
replica that does not answer fails the forwards (the publisher is told and publishes again, and then every message
is in the queue at both owners and reaches the client); every record of a batch is journaled for the store
(``durable``) and the forwards wait for the replica's store; a batch sent to a primary that is no longer one is
told stale once and sent again whole to the new primary; a batch past ``max_retained_bytes`` is refused whole
(``overloaded``); a seeded schedule of node kills with batched publishes loses no acknowledged message; the
deletions of acknowledged messages go as one RETAINS; a
batch written while the session shard streams to a hand-off target reaches the target (relayed), and the records
are all at the shard's owners after the hand-off.
"""

from __future__ import annotations

import random
from collections import deque
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from shardmq.protocol.records import decode_queued
from shardmq.router import codec
from shardmq.testing.simulation import Sim, SimConfig
from tests.test_retained_sim import SHARDS, cluster
from tests.test_sessions_sim import (
    TOPIC,
    bye,
    directory_owners,
    got,
    hello,
    kill_schedule,
    metric,
    queue_records,
    subscribe,
)

PUBLISHER = b"pub-1"


def frames_of(sim: Sim, keep: Callable[[str, str, list[bytes]], bool] | None = None) -> list[tuple[str, str, Any]]:
    """From now on, record every peer frame sent as (src, dst, type, header); ``keep(src, dst, parts)`` False
    holds a frame back (not delivered) instead. Returns the record; held frames are in ``sim.held``."""
    sent: list[tuple[str, str, Any]] = []
    held: list[tuple[str, str, list[bytes]]] = []
    original = sim.send

    def send(src: str, dst: str, parts: list[bytes]) -> None:
        sent.append((src, dst, parts[0], orjson.loads(parts[1])))
        if keep is not None and not keep(src, dst, parts):
            held.append((src, dst, parts))
            return
        original(src, dst, parts)

    sim.send = send  # type: ignore[method-assign]
    sim.held = held  # type: ignore[attr-defined]
    return sent


def release(sim: Sim) -> None:
    """Deliver the frames ``frames_of`` held back (in the order they were sent)."""
    for src, dst, parts in sim.held:  # type: ignore[attr-defined]
        sim.channels.setdefault((src, dst), deque()).append(parts)
    sim.held.clear()  # type: ignore[attr-defined]


def publish_batch(sim: Sim, node: str, first: int, count: int, topic: str = TOPIC) -> list[bytes]:
    """One PUBS of ``count`` QoS 1 messages (ids ``first``.., payloads their ids) through ``node``, not settled."""
    payloads = [b"m%d" % i for i in range(first, first + count)]
    items = [[topic, 1, i] for i in range(first, first + count)]
    header = {"items": items, "sizes": [len(p) for p in payloads]}
    sim.client_send(PUBLISHER, node, codec.PUBS, header, b"".join(payloads))
    return payloads


def acked_ids(sim: Sim) -> set[int]:
    return {i for f in sim.session_clients[PUBLISHER].frames if f.type == codec.PUBACK for i in f.header["ids"]}


def refused_ids(sim: Sim) -> dict[int, str]:
    return {f.header["ref"]: f.header["code"] for f in sim.session_clients[PUBLISHER].frames
            if f.type == codec.ERROR and "ref" in f.header}  # fmt: skip


def away_on_a_non_owner(sim: Sim) -> tuple[str, str, str]:
    """The persistent session of CLIENT, subscribed to sensors/# at QoS 1, away, held by the node that does not own
    its session shard: (holder, primary, replica) of the session shard."""
    primary, replica = directory_owners(sim)
    holder = next(n for n in sorted(sim.nodes) if n not in (primary, replica))
    hello(sim, holder)
    subscribe(sim, holder)
    bye(sim, holder)
    return holder, primary, replica


@pytest.mark.timeout(60)
def test_a_forwarded_batch_is_one_write_acknowledged_only_after_the_replica() -> None:
    sim = cluster()
    holder, primary, replica = away_on_a_non_owner(sim)
    # The replica's answer is held back: nothing may be acknowledged before it comes.
    sent = frames_of(sim, keep=lambda src, dst, parts: not (src == replica and parts[0] == codec.RETAIN_ACK))
    payloads = publish_batch(sim, primary, 1, 50)
    sim.drain()
    writes = [(s, d, h) for s, d, t, h in sent if t == codec.RETAINS]
    assert [(s, d, h["replica"], len(h["items"])) for s, d, h in writes] == [
        (holder, primary, False, 50), (primary, replica, True, 50),
    ]  # fmt: skip
    assert not [1 for _, _, t, _ in sent if t == codec.RETAIN]  # no write went alone
    assert acked_ids(sim) == set()
    assert queue_records(sim, replica) == payloads  # it holds them; its answer is what is missing
    release(sim)
    assert sim.settle()
    assert acked_ids(sim) == set(range(1, 51))
    assert queue_records(sim, primary) == queue_records(sim, replica) == payloads
    assert metric(sim, "sessions.queue_written") == 50
    hello(sim, holder)
    assert sim.settle()
    assert got(sim) == payloads


@pytest.mark.timeout(60)
def test_a_silent_replica_fails_the_batch_and_the_publisher_publishes_again() -> None:
    sim = cluster()
    holder, primary, replica = away_on_a_non_owner(sim)
    original = sim.send
    frames_of(sim, keep=lambda src, dst, parts: not (dst == replica and parts[0] == codec.RETAINS))
    publish_batch(sim, primary, 1, 20)
    assert sim.settle()
    assert acked_ids(sim) == set()
    refused = refused_ids(sim)
    assert sorted(refused) == list(range(1, 21))
    assert set(refused.values()) <= {codec.E_UNAVAILABLE, codec.E_TIMEOUT}
    assert queue_records(sim, replica) == []
    # The replica answers again; the publisher sends the same messages again (new ids): acknowledged, in the
    # queue at both owners, delivered (those of the failed attempt may come twice: at least once).
    sim.send = original  # type: ignore[method-assign]
    payloads = publish_batch(sim, primary, 1, 20)
    assert sim.settle()
    assert acked_ids(sim) == set(range(1, 21))
    assert set(payloads) <= set(queue_records(sim, replica))
    hello(sim, holder)
    assert sim.settle()
    assert set(got(sim)) == set(payloads)
    assert holder not in (primary, replica)


@pytest.mark.timeout(60)
def test_acknowledged_messages_are_deleted_in_one_frame() -> None:
    sim = cluster()
    holder, primary, replica = away_on_a_non_owner(sim)
    payloads = publish_batch(sim, primary, 1, 40)
    assert sim.settle()
    assert queue_records(sim, replica) == payloads
    sent = frames_of(sim)
    hello(sim, holder)  # the client comes back and acknowledges everything (DACK)
    for _ in range(12):  # the trim tick (redelivery_interval) sends the deletions
        sim.tick(0.25)
        sim.drain()
        sim.pump_clients()
    assert sim.settle()
    assert got(sim) == payloads
    deletes = [(s, d, h) for s, d, t, h in sent if t == codec.RETAINS]
    assert [(s, d, h["replica"]) for s, d, h in deletes] == [(holder, primary, False), (primary, replica, True)]
    assert all(set(h["sizes"]) == {0} and len(h["items"]) == 40 for _, _, h in deletes)
    assert queue_records(sim, primary) == queue_records(sim, replica) == []
    assert metric(sim, "sessions.trimmed") == 40


def stream_some_shards_to_a_newcomer(sim: Sim) -> tuple[str, set[int]]:
    """Join a node and step the cluster until some source streams shards to it, its SNAPSHOTs held back: the
    newcomer and the shards streaming."""
    newcomer = sim.join()
    for _ in range(200):
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
            return newcomer, streaming
    raise AssertionError("no hand-off started")


@pytest.mark.timeout(60)
def test_a_batch_during_a_handoff_reaches_the_target_and_loses_nothing() -> None:
    sim = cluster()
    holder = sorted(sim.nodes)[0]
    clients = [b"dev-%d" % i for i in range(24)]  # sessions on many shards: some stream during the hand-off
    for rid in clients:
        hello(sim, holder, rid=rid)
        subscribe(sim, holder, rid=rid)
        bye(sim, holder, rid=rid)
    newcomer, streaming = stream_some_shards_to_a_newcomer(sim)
    moving = [rid for rid in clients if sim.shard_of("$session/" + rid.decode()) in streaming]
    assert moving, "no session shard streams"
    sent = frames_of(sim)
    payloads = publish_batch(sim, holder, 1, 30)
    assert sim.settle()
    assert acked_ids(sim) == set(range(1, 31))
    assert any(t in (codec.RETAINS, codec.RETAINM) and d == newcomer for _, d, t, _ in sent)  # reached the target
    a = sim.etcd.doc
    assert a is not None
    for rid in clients:
        for owner in directory_owners(sim, rid):
            assert queue_records(sim, owner, rid) == payloads, (rid, owner)
    assert any(newcomer in directory_owners(sim, rid) for rid in moving)
    for rid in moving[:3]:  # a moved session's client gets everything
        hello(sim, sorted(sim.nodes)[1], rid=rid)
        assert sim.settle()
        assert got(sim, rid) == payloads
    assert holder != newcomer


@pytest.mark.timeout(60)
def test_every_batched_record_is_journaled_and_the_ack_waits_for_the_replicas_store() -> None:
    sim = Sim(SimConfig(shard_count=SHARDS, replication=2, snapshot_chunk=2, durable=True))
    for _ in range(3):
        sim.join()
    assert sim.settle()
    holder, primary, replica = away_on_a_non_owner(sim)
    held = sim.nodes[replica].persist_held = []
    payloads = publish_batch(sim, primary, 1, 30)
    sim.settle(max_rounds=4)  # 1 s of simulated time: less than the request timeout
    assert acked_ids(sim) == set(), "acknowledged before the replica's store committed"
    sim.nodes[replica].persist_held = None
    for changes, then in held:
        sim.nodes[replica].persisted.extend(changes)
        then()
        sim.nodes[replica].core.flush()  # what the shell's loop does after an event
    assert sim.settle()
    assert acked_ids(sim) == set(range(1, 31))
    for node in (primary, replica):
        stored = [c for c in sim.nodes[node].persisted if c[0] == "retained" and c[2].startswith("$sessionq/")]
        assert sorted(decode_queued(c[-1])[3] for c in stored) == sorted(payloads), node  # type: ignore[index]
    hello(sim, holder)  # acknowledged: every record's deletion is journaled too
    for _ in range(12):
        sim.tick(0.25)
        sim.drain()
        sim.pump_clients()
    assert sim.settle()
    for node in (primary, replica):
        deleted = {c[2] for c in sim.nodes[node].persisted if c[0] == "retained_del"}
        assert len({t for t in deleted if t.startswith("$sessionq/")}) == 30, node


@pytest.mark.timeout(60)
def test_a_batch_sent_to_an_old_primary_is_told_stale_and_sent_again_whole() -> None:
    sim = cluster()
    holder = sorted(sim.nodes)[0]
    core = sim.nodes[holder].core
    old, old_revision = core.view.assignment, core.view.assignment_revision
    assert old is not None
    sim.join()
    assert sim.settle()
    new = sim.etcd.doc
    assert new is not None
    rid = next(
        r for r in (b"dev-%d" % i for i in range(500))
        if new.owners(s := sim.shard_of("$session/" + r.decode()))[0] != old.owners(s)[0]
        and holder not in (old.owners(s)[0], new.owners(s)[0])
    )  # fmt: skip
    hello(sim, holder, rid=rid)
    subscribe(sim, holder, rid=rid)
    bye(sim, holder, rid=rid)
    core.view.assignment, core.view.assignment_revision = old, old_revision  # the holder's view lags
    sent = frames_of(sim)
    entry = next(n for n in sorted(sim.nodes) if n != holder)
    payloads = publish_batch(sim, entry, 1, 25)
    assert sim.settle()
    assert acked_ids(sim) == set(range(1, 26))
    assert core.metrics["retained.stale_retries"] == 1  # once for the batch, not per record
    writes = [(d, len(h["items"])) for s, d, t, h in sent if t == codec.RETAINS and s == holder]
    shard = sim.shard_of("$session/" + rid.decode())
    assert writes == [(old.owners(shard)[0], 25), (new.owners(shard)[0], 25)]
    for owner in new.owners(shard):
        assert queue_records(sim, owner, rid) == payloads


@pytest.mark.timeout(60)
def test_a_batch_past_the_byte_limit_is_refused_whole_with_overloaded() -> None:
    sim = cluster()
    holder, primary, replica = away_on_a_non_owner(sim)
    room = sim.nodes[primary].core.owner.retained.bytes + 600  # a few records more, not 30
    for n in sim.nodes.values():
        n.core.cfg = type(n.core.cfg)(**{**{f: getattr(n.core.cfg, f) for f in n.core.cfg.__slots__},
                                         "max_retained_bytes": room})  # fmt: skip
    publish_batch(sim, primary, 1, 30)
    assert sim.settle()
    assert acked_ids(sim) == set()
    assert set(refused_ids(sim).items()) == {(i, codec.E_OVERLOADED) for i in range(1, 31)}
    assert queue_records(sim, primary) == queue_records(sim, replica) == []  # nothing of it was applied
    payloads = publish_batch(sim, primary, 31, 5)
    assert sim.settle()
    assert acked_ids(sim) == set(range(31, 36))
    assert queue_records(sim, primary) == queue_records(sim, replica) == payloads
    assert holder not in (primary, replica)


def publish_in_one_flush(sim: Sim, node: str, topics: list[str]) -> None:
    """``sim.publish`` of each topic through ``node`` with the node's flush held until all are in: its forwards to
    one holder leave as one FWDS, so the holder writes their records as RETAINS."""
    core = sim.nodes[node].core
    flush = core.flush
    core.flush = lambda: None  # type: ignore[method-assign]
    try:
        for topic in topics:
            sim.publish(node, topic)
    finally:
        del core.flush  # the class's again
    flush()
    sim.pump_clients()


@pytest.mark.parametrize("seed", [1, 2])
@pytest.mark.timeout(120)
def test_batched_appends_survive_node_kills_seeded(seed: int) -> None:
    """``test_sessions_sim.kill_schedule`` with publishes in batches (several messages to several persistent
    clients in one forward frame), which do go as batched queue writes."""

    def publish_some(sim: Sim, rng: random.Random, node: str, topics: list[str]) -> None:
        publish_in_one_flush(sim, node, [rng.choice(topics) for _ in range(rng.randint(2, 12))])

    sim = kill_schedule(seed, publish_some)
    assert metric(sim, "retained.batches_out") > 0
